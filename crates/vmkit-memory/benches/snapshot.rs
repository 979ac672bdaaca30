//! Benchmarks of vmkit-memory's snapshot paths, each against the baseline a user would
//! otherwise use, in the same run:
//!
//! - `reset_1gib`: fast reset of a 1 GiB guest with 1% of its pages dirty (half by the VMM,
//!   half by the "guest" through a hypervisor dirty log) vs a full `memcpy` of 1 GiB from the
//!   baseline;
//! - `snapshot_256mib`: full snapshot write and validating copy restore vs a plain `write` /
//!   `read` of the same bytes (files on tmpfs, so the storage device does not dominate);
//! - `restore_mmap`: lazy restore by private mmap at 64 MiB and 1 GiB, to show its cost does
//!   not grow with the size.
//!
//! Run with `cargo bench -p vmkit-memory --bench snapshot`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileMemory};
use vmkit_memory::{
    snapshot, Backing, DirtyTracker, FastReset, MemoryLayout, MmapRestoreOptions, OwnedGuestRam,
    RecordingDirtyLog, PAGE_SIZE,
};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A deterministic xorshift generator (no dependency on a rand crate).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn guest(size: u64) -> OwnedGuestRam {
    let layout = MemoryLayout::new(&[(GuestAddress(0), size)]).unwrap();
    // Huge pages as a production VMM would ask for (transparent huge pages here when the
    // host has no hugetlb pool); the memcpy anchor runs on the same memory.
    Backing::anonymous()
        .with_huge_pages(true)
        .build(&layout)
        .unwrap()
}

/// Fills every page with non-zero pseudo-random bytes (the worst case: no zero pages).
fn fill(mem: &OwnedGuestRam, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut chunk = vec![0u8; MIB as usize];
    let size = mem.ram().iter().map(|r| r.len()).sum::<u64>();
    for off in (0..size).step_by(MIB as usize) {
        for w in chunk.chunks_exact_mut(8) {
            w.copy_from_slice(&(rng.next() | 1).to_le_bytes());
        }
        mem.ram().write_slice(&chunk, GuestAddress(off)).unwrap();
    }
}

fn scratch_dir() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

fn bench_reset(c: &mut Criterion) {
    let mem = guest(GIB);
    fill(&mem, 1);
    let hv = RecordingDirtyLog::new();
    let mut reset =
        FastReset::capture(mem.ram(), DirtyTracker::with_hypervisor(mem.ram(), &hv)).unwrap();
    let pages = GIB / PAGE_SIZE;
    let dirty = pages / 100;
    let mut rng = Rng(7);

    let mut g = c.benchmark_group("reset_1gib");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    // Fresh random pages every iteration: the pessimistic case (cold caches and TLB).
    g.bench_function("fast_reset_1pct_dirty_random", |b| {
        b.iter_batched(
            || {
                for i in 0..dirty {
                    let addr = GuestAddress((rng.next() % pages) * PAGE_SIZE + 8);
                    if i % 2 == 0 {
                        mem.ram().write_obj(i, addr).unwrap();
                    } else {
                        hv.guest_write(mem.ram(), addr, &i.to_le_bytes()).unwrap();
                    }
                }
            },
            |()| reset.reset(mem.ram()).unwrap(),
            BatchSize::PerIteration,
        )
    });
    // The same 1% every iteration, as when a fuzzer replays one input path.
    let fixed: Vec<u64> = (0..dirty)
        .map(|_| (rng.next() % pages) * PAGE_SIZE + 8)
        .collect();
    g.bench_function("fast_reset_1pct_dirty_same_pages", |b| {
        b.iter_batched(
            || {
                for (i, &a) in fixed.iter().enumerate() {
                    if i % 2 == 0 {
                        mem.ram().write_obj(i, GuestAddress(a)).unwrap();
                    } else {
                        hv.guest_write(mem.ram(), GuestAddress(a), &i.to_le_bytes())
                            .unwrap();
                    }
                }
            },
            |()| reset.reset(mem.ram()).unwrap(),
            BatchSize::PerIteration,
        )
    });
    // Fixed cost: nothing dirty (reading and clearing both logs of 1 GiB).
    g.bench_function("fast_reset_clean", |b| {
        b.iter(|| reset.reset(mem.ram()).unwrap())
    });
    // The anchor: restore everything from the same baseline with one memcpy.
    let base = vm_memory::mmap::MmapRegion::<()>::new(GIB as usize).unwrap();
    // SAFETY: advisory call on the mapping `base` owns, as FastReset does for its baseline.
    unsafe { libc::madvise(base.as_ptr().cast(), base.size(), libc::MADV_HUGEPAGE) };
    mem.ram()
        .iter()
        .next()
        .unwrap()
        .as_volatile_slice()
        .unwrap()
        .copy_to_volatile_slice(base.as_volatile_slice());
    g.bench_function("full_memcpy_restore", |b| {
        let region = mem.ram().iter().next().unwrap();
        b.iter(|| {
            base.as_volatile_slice()
                .copy_to_volatile_slice(region.as_volatile_slice().unwrap())
        })
    });
    g.finish();
}

fn bench_snapshot(c: &mut Criterion) {
    let size = 256 * MIB;
    let mem = guest(size);
    fill(&mem, 2);
    let dir = scratch_dir();
    let snap = tempfile::tempfile_in(&dir).unwrap();
    let plain = tempfile::tempfile_in(&dir).unwrap();
    let mut bytes = vec![0u8; size as usize];
    mem.ram().read_slice(&mut bytes, GuestAddress(0)).unwrap();

    let mut g = c.benchmark_group("snapshot_256mib");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Bytes(size));
    g.bench_function("write_full", |b| {
        b.iter(|| snapshot::write_full(mem.ram(), &snap).unwrap())
    });
    g.bench_function("baseline_plain_write", |b| {
        b.iter(|| {
            plain.set_len(0).unwrap();
            plain.write_all_at(&bytes, 4096).unwrap();
        })
    });
    // The same bytes in 1 MiB writes, in case chunked I/O is the faster plain bound.
    g.bench_function("baseline_plain_write_1mib_chunks", |b| {
        b.iter(|| {
            plain.set_len(0).unwrap();
            for (i, c) in bytes.chunks(MIB as usize).enumerate() {
                plain.write_all_at(c, 4096 + i as u64 * MIB).unwrap();
            }
        })
    });
    snapshot::write_full(mem.ram(), &snap).unwrap();
    g.bench_function("restore_copy", |b| {
        b.iter(|| snapshot::restore_copy(mem.ram(), &snap).unwrap())
    });
    plain.set_len(0).unwrap();
    plain.write_all_at(&bytes, 4096).unwrap();
    g.bench_function("baseline_plain_read", |b| {
        b.iter(|| plain.read_exact_at(&mut bytes, 4096).unwrap())
    });
    g.bench_function("baseline_plain_read_1mib_chunks", |b| {
        b.iter(|| {
            for (i, c) in bytes.chunks_mut(MIB as usize).enumerate() {
                plain.read_exact_at(c, 4096 + i as u64 * MIB).unwrap();
            }
        })
    });
    g.finish();
}

fn sparse_snapshot(size: u64) -> File {
    let mem = guest(size);
    // A few non-zero pages spread over the guest; the rest are holes.
    for i in 0..64u64 {
        mem.ram()
            .write_obj(i + 1, GuestAddress(i * (size / 64)))
            .unwrap();
    }
    let f = tempfile::tempfile_in(scratch_dir()).unwrap();
    snapshot::write_full(mem.ram(), &f).unwrap();
    f
}

fn bench_mmap_restore(c: &mut Criterion) {
    let mut g = c.benchmark_group("restore_mmap");
    g.sample_size(50)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for (name, size) in [("64mib", 64 * MIB), ("1gib", GIB)] {
        let f = sparse_snapshot(size);
        g.bench_function(name, |b| {
            b.iter_with_large_drop(|| {
                snapshot::restore_mmap(&f, &MmapRestoreOptions::default()).unwrap()
            })
        });
    }
    g.finish();
}

mod harness {
    use super::*;
    criterion_group!(benches, bench_reset, bench_snapshot, bench_mmap_restore);
}
criterion_main!(harness::benches);
