//! Seeds and input decoding for the vmkit-memory fuzz targets.
//!
//! `memory_snapshot_restore`: the fuzzer's bytes are a snapshot *file*. They are fed to the
//! validating restore of vmkit-memory ([`snapshot_restore`]), which must return a typed error
//! or succeed, never panic, and never change guest memory when it fails. The seeds are valid
//! snapshots (one full, one incremental) of the small guest the target restores into.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmkit_memory::{snapshot, Backing, DirtyBitmap, GuestRam, MemoryLayout, OwnedGuestRam};

/// Name of the snapshot-restore fuzz target (and of its seed directory).
pub const SNAPSHOT_RESTORE: &str = "memory_snapshot_restore";

/// The guest the target restores into: two small regions, so region-table checks matter.
pub fn fuzz_layout() -> MemoryLayout {
    MemoryLayout::new(&[(GuestAddress(0), 0x4000), (GuestAddress(0x10_0000), 0x2000)])
        .expect("static layout is valid")
}

fn patterned_memory() -> OwnedGuestRam {
    let mem = Backing::anonymous()
        .with_guard_pages(false)
        .build(&fuzz_layout())
        .expect("small anonymous guest");
    let mut fill = Vec::new();
    for r in mem.ram().iter() {
        fill.clear();
        fill.extend((0..r.len()).map(|i| (i as u8).wrapping_mul(7).wrapping_add(3)));
        mem.ram()
            .write_slice(&fill, r.start_addr())
            .expect("in range");
    }
    mem
}

fn contents(mem: &GuestRam) -> Vec<u8> {
    let mut out = Vec::new();
    for r in mem.iter() {
        let mut v = vec![0u8; r.len() as usize];
        mem.read_slice(&mut v, r.start_addr()).expect("in range");
        out.extend(v);
    }
    out
}

fn file_with(data: &[u8]) -> File {
    let f = snapshot::in_memory_file().expect("memfd");
    f.write_all_at(data, 0).expect("write memfd");
    f
}

/// Runs one input of `memory_snapshot_restore`. Panics only if vmkit-memory breaks its
/// contract (memory changed on a failed restore, or a lazy restore disagreeing with a copy).
pub fn snapshot_restore(data: &[u8]) {
    let file = file_with(data);
    let _ = snapshot::read_info(&file);
    let mem = patterned_memory();
    let before = contents(mem.ram());
    match snapshot::restore_copy(mem.ram(), &file) {
        Err(_) => assert_eq!(
            contents(mem.ram()),
            before,
            "a failed restore changed guest memory"
        ),
        Ok(_) => {
            // A full snapshot that restores by copy must restore identically by mmap.
            let opts = snapshot::MmapRestoreOptions {
                guard_pages: false,
                verify_checksums: true,
            };
            if let Ok(lazy) = snapshot::restore_mmap(&file, &opts) {
                assert_eq!(contents(lazy.ram()), contents(mem.ram()));
            }
        }
    }
}

fn file_bytes(f: &File) -> std::io::Result<Vec<u8>> {
    let mut v = vec![0u8; f.metadata()?.len() as usize];
    f.read_exact_at(&mut v, 0)?;
    Ok(v)
}

/// The seed snapshots: (file name, bytes).
pub fn seeds() -> std::io::Result<Vec<(&'static str, Vec<u8>)>> {
    let err = |e: Box<dyn std::error::Error>| std::io::Error::other(e.to_string());
    let mem = Backing::anonymous()
        .build(&fuzz_layout())
        .map_err(|e| err(e.into()))?;
    mem.ram()
        .write_slice(b"vmkit fuzz seed", GuestAddress(0x1000))
        .map_err(|e| err(e.into()))?;
    mem.ram()
        .write_obj(0x1234_5678u32, GuestAddress(0x10_1ffc))
        .map_err(|e| err(e.into()))?;
    let full = snapshot::in_memory_file()?;
    let info = snapshot::write_full(mem.ram(), &full).map_err(|e| err(e.into()))?;
    let mut dirty = DirtyBitmap::new(mem.ram());
    dirty
        .mark(GuestAddress(0x1000), 1)
        .and_then(|_| dirty.mark(GuestAddress(0x10_0000), 0x2000))
        .map_err(|e| err(e.into()))?;
    let inc = snapshot::in_memory_file()?;
    snapshot::write_incremental(mem.ram(), &dirty, info.id, &inc).map_err(|e| err(e.into()))?;
    Ok(vec![
        ("full.snap", file_bytes(&full)?),
        ("incremental.snap", file_bytes(&inc)?),
    ])
}

/// Writes the seed corpora of the vmkit-memory fuzz targets under `dir`.
pub fn write_seeds(dir: &Path) -> std::io::Result<()> {
    crate::write_corpus(dir, SNAPSHOT_RESTORE, seeds()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_valid_snapshots_of_the_fuzz_guest() {
        for (name, bytes) in seeds().unwrap() {
            let mem = patterned_memory();
            let f = file_with(&bytes);
            snapshot::restore_copy(mem.ram(), &f).unwrap_or_else(|e| panic!("{name}: {e}"));
            snapshot_restore(&bytes);
        }
        let dir = tempfile::tempdir().unwrap();
        write_seeds(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join(SNAPSHOT_RESTORE))
                .unwrap()
                .count(),
            2
        );
    }

    #[test]
    fn mutated_seeds_never_panic() {
        for (_, bytes) in seeds().unwrap() {
            snapshot_restore(&[]);
            snapshot_restore(&bytes[..bytes.len() / 2]);
            for i in (0..bytes.len()).step_by(97) {
                let mut b = bytes.clone();
                b[i] ^= 0xa5;
                snapshot_restore(&b);
            }
        }
    }
}
