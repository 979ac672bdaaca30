//! Seeds and input decoding for the vmkit-paging fuzz targets.
//!
//! `paging_walk`: the fuzzer's bytes are a vCPU paging state plus a physical memory image
//! that is walked as page tables - guest tables in every mode, EPT tables, and the nested
//! walk over both - through the walker, the software TLB and the page-walk caches. Nothing
//! may panic, every walk must stay bounded (at most 5 guest references; 35 nested per
//! attempt, with at most `MAX_RETRIES` restarts), and the TLB must agree with a direct walk.
//!
//! Input layout (little endian):
//! ```text
//! 0      mode (low 2 bits: 32-bit, PAE, 4-level, 5-level), EPT levels (bit 2: 5-level)
//! 1      flags: WP NXE SMEP SMAP PKE PKS AC AMD (bit 0..7)
//! 2      MAXPHYADDR - 32 (mod 21)
//! 3      access: kind (mod 3), privilege (bits 2..3, mod 3), EPT A/D (bit 4), MBEC (bit 5)
//! 4..8   PKRU
//! 8..12  IA32_PKRS
//! 12..20 linear address
//! 20..28 CR3
//! 28..36 EPTP root (low 12 bits ignored)
//! 36..   physical memory image at address 0 (at most 64 KiB)
//! ```

use std::path::Path;

use vmkit_paging::builder::{BumpAllocator, MapFlags, PageSize, PageTableBuilder, PagingFormat};
use vmkit_paging::ept::{EptConfig, EptWalker};
use vmkit_paging::nested::{NestedCaches, NestedWalker};
use vmkit_paging::tlb::Tlb;
use vmkit_paging::walk::{Access, AccessKind, PagingConfig, PagingMode, Privilege, Walker};
use vmkit_paging::{FlatMemory, GuestAddress, PhysMemory};

/// Name of the page-walk fuzz target (and of its seed directory).
pub const PAGING_WALK: &str = "paging_walk";

const HEADER: usize = 36;
const MAX_IMAGE: usize = 64 << 10;

fn u32_at(d: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&d[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(d: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Runs one fuzz input (see the module docs for the layout). Panics only on a bug.
pub fn walk_bytes(data: &[u8]) {
    if data.len() < HEADER {
        return;
    }
    let image = &data[HEADER..data.len().min(HEADER + MAX_IMAGE)];
    let mem = FlatMemory::from_bytes(0, image);
    let mode = [
        PagingMode::Legacy32,
        PagingMode::Pae,
        PagingMode::Level4,
        PagingMode::Level5,
    ][usize::from(data[0] & 3)];
    let flags = data[1];
    let mut cfg = PagingConfig::new(mode, u64_at(data, 20));
    cfg.write_protect = flags & 1 != 0;
    cfg.nxe = flags & 2 != 0;
    cfg.smep = flags & 4 != 0;
    cfg.smap = flags & 8 != 0;
    cfg.pke = flags & 16 != 0;
    cfg.pks = flags & 32 != 0;
    cfg.alignment_check = flags & 64 != 0;
    cfg.amd = flags & 128 != 0;
    cfg.max_phys_bits = 32 + data[2] % 21;
    cfg.pkru = u32_at(data, 4);
    cfg.pkrs = u32_at(data, 8);
    let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch][usize::from(data[3] % 3)];
    let privilege = [
        Privilege::User,
        Privilege::Supervisor,
        Privilege::ImplicitSupervisor,
    ][usize::from((data[3] >> 2) % 3)];
    let access = Access::new(kind, privilege);
    let va = u64_at(data, 12);

    let walker = Walker::new(cfg);
    let direct = walker.translate(&mem, va, access);
    if let Ok(t) = &direct {
        assert!(t.memory_refs() <= 5, "unbounded guest walk: {t:?}");
        assert_eq!(
            t.gpa & (t.page_size().bytes() - 1),
            va & (t.page_size().bytes() - 1)
        );
    }
    // The TLB: a miss then a hit must agree with a direct walk. Without A/D updates the
    // memory cannot change between them (with them, an A bit set through one alias can turn
    // into a reserved bit of another - a PAE PDPTE - which is real hardware behaviour).
    let mut quiet = cfg;
    quiet.set_accessed_dirty = false;
    let quiet = Walker::new(quiet);
    let reference = quiet.translate(&mem, va, access);
    let mut tlb = Tlb::new(16);
    for _ in 0..2 {
        let cached = tlb.translate(&quiet, &mem, 0, va, access);
        match (&reference, &cached) {
            (Ok(d), Ok(c)) => assert_eq!(d.gpa, c.gpa, "TLB disagrees with the walk"),
            (Err(d), Err(c)) => assert_eq!(d.error_code(), c.error_code()),
            _ => panic!("TLB {cached:?} vs walk {reference:?}"),
        }
    }
    tlb.invlpg(0, va);

    // EPT over the same image, then the 2-D walk with and without caches.
    let ept_levels: u64 = if data[0] & 4 != 0 { 4 } else { 3 };
    let mut eptp = (u64_at(data, 28) & 0x000f_ffff_ffff_f000) | 6 | ept_levels << 3;
    if data[3] & 16 != 0 {
        eptp |= 1 << 6;
    }
    let mut ecfg = EptConfig::new(eptp);
    ecfg.mbec = data[3] & 32 != 0;
    ecfg.max_phys_bits = cfg.max_phys_bits;
    let Ok(ept) = EptWalker::new(ecfg) else {
        return;
    };
    if let Ok(t) = ept.translate(&mem, va, vmkit_paging::ept::EptAccess::read()) {
        assert!(t.memory_refs <= 5);
    }
    let nested = NestedWalker::new(walker, ept);
    let mut caches = NestedCaches::new(8);
    for c in [None, Some(&mut caches)] {
        if let Ok(t) = nested.translate(&mem, va, access, c) {
            // 35 per attempt (5x5); a walk restarts at most MAX_RETRIES times when its own
            // A-bit updates change aliased entries under it.
            let bound = 35 * (vmkit_paging::walk::MAX_RETRIES + 1);
            assert!(t.memory_refs <= bound, "unbounded nested walk: {t:?}");
        }
    }
}

fn header(mode: u8, flags: u8, access: u8, va: u64, cr3: u64, eptp: u64) -> Vec<u8> {
    let mut h = vec![mode, flags, 20, access];
    h.extend(0u32.to_le_bytes());
    h.extend(0u32.to_le_bytes());
    h.extend(va.to_le_bytes());
    h.extend(cr3.to_le_bytes());
    h.extend(eptp.to_le_bytes());
    h
}

fn image(mem: &FlatMemory, len: u64) -> Vec<u8> {
    (0..len)
        .step_by(8)
        .flat_map(|a| mem.read_u64(a).unwrap_or(0).to_le_bytes())
        .collect()
}

/// The seed inputs: (file name, bytes). Valid tables for every mode, EPT, and a
/// recursive mapping, built with the vmkit-paging builder.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let formats = [
        (0u8, PagingFormat::Legacy32),
        (1, PagingFormat::Pae),
        (2, PagingFormat::Level4),
        (3 | 4, PagingFormat::Level5),
    ];
    for (mode, format) in formats {
        let mem = FlatMemory::new(0, 0x10000);
        let mut alloc = BumpAllocator::new(GuestAddress(0x1000), GuestAddress(0xc000));
        let mut b = PageTableBuilder::new(&mem, format, &mut alloc).expect("frames");
        b.set_max_page_size(PageSize::Size4K);
        b.map(
            0x40_0000,
            GuestAddress(0xc000),
            0x2000,
            MapFlags::WRITABLE | MapFlags::USER,
        )
        .expect("map");
        b.set_max_page_size(PageSize::Size2M);
        b.map(0x80_0000, GuestAddress(0x40_0000), 4 << 20, MapFlags::USER)
            .expect("large map");
        let root = b.root().0;
        // EPT for the same image: identity for the first 64 KiB.
        let ept_format = if mode & 4 != 0 {
            PagingFormat::Ept5
        } else {
            PagingFormat::Ept4
        };
        let mut e = PageTableBuilder::new(&mem, ept_format, &mut alloc).expect("frames");
        e.set_max_page_size(PageSize::Size4K);
        e.map(0, GuestAddress(0), 0x10000, MapFlags::WRITABLE)
            .expect("ept map");
        let eptp = e.root().0;
        for (i, access) in [0x00u8, 0x01, 0x06, 0x12].into_iter().enumerate() {
            let mut input = header(mode, 0x03, access, 0x40_1234, root, eptp);
            input.extend(image(&mem, 0x10000));
            out.push((format!("{format:?}-{i}").to_lowercase(), input));
        }
    }
    // A recursive 4-level mapping: PML4[511] points at the PML4.
    let mem = FlatMemory::new(0, 0x2000);
    mem.write_u64(0x1000 + 511 * 8, 0x1000 | 3)
        .expect("in range");
    let mut input = header(2, 0x03, 0x04, 0xffff_ffff_ffff_f000, 0x1000, 0x1000);
    input.extend(image(&mem, 0x2000));
    out.push(("recursive-pml4".into(), input));
    out
}

/// Writes the seed corpora of the vmkit-paging fuzz targets under `dir`.
pub fn write_seeds(dir: &Path) -> std::io::Result<()> {
    crate::write_corpus(dir, PAGING_WALK, seeds())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_translate_and_run_clean() {
        let seeds = seeds();
        assert_eq!(seeds.len(), 17);
        for (name, bytes) in &seeds {
            walk_bytes(bytes);
            // The seeds are meaningful: the mapped address translates in its mode.
            let mode = [
                PagingMode::Legacy32,
                PagingMode::Pae,
                PagingMode::Level4,
                PagingMode::Level5,
            ][usize::from(bytes[0] & 3)];
            if name.starts_with("recursive") {
                continue;
            }
            let mem = FlatMemory::from_bytes(0, &bytes[HEADER..]);
            let cfg = PagingConfig::new(mode, u64_at(bytes, 20));
            let t = Walker::new(cfg)
                .translate(&mem, 0x40_1234, Access::supervisor_read())
                .unwrap_or_else(|f| panic!("{name}: {f}"));
            assert_eq!(t.gpa, 0xd234, "{name}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        write_seeds(dir.path()).expect("write");
        assert_eq!(
            std::fs::read_dir(dir.path().join(PAGING_WALK))
                .unwrap()
                .count(),
            17
        );
    }

    #[test]
    fn pae_pdpte_aliased_by_a_pte_is_harmless() {
        // Found by the fuzzer: a PAE PTE that is also the PDPTE; setting its A bit sets a
        // reserved PDPTE bit, so the next walk legitimately faults.
        walk_bytes(&[
            0x01, 0x02, 0x00, 0x2d, 0x00, 0x00, 0x00, 0xf8, 0xff, 0xff, 0x06, 0x00, 0x00, 0x00,
            0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf6, 0x08, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x79,
        ]);
    }

    #[test]
    fn self_aliasing_nested_tables_restart_boundedly() {
        // Found by the fuzzer: guest entries alias each other, so setting one A bit changes
        // the next entry and the walk restarts (more than 24 references in total).
        walk_bytes(&[
            0x02, 0x3e, 0x00, 0x22, 0x00, 0x01, 0x20, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x10,
            0x20, 0x40, 0x80, 0x00, 0x00, 0x00, 0x00, 0x1c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x2a, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0xf2, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
        ]);
    }

    #[test]
    fn garbage_is_harmless() {
        walk_bytes(&[]);
        walk_bytes(&[0xff; 35]);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in [36usize, 64, 4096, 70_000] {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            walk_bytes(&bytes);
            let ones = vec![0xffu8; len];
            walk_bytes(&ones);
        }
    }
}
