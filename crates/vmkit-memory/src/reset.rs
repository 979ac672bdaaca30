//! Fast reset: return guest memory to a baseline by restoring only the pages dirtied since.
//!
//! # Model
//!
//! Snapshot fuzzers (Nyx, what-the-fuzz) run a guest from the same starting state millions of
//! times. Restoring all of guest memory after each run costs a full `memcpy` of RAM; a run
//! typically dirties a few hundred pages. [`FastReset`] keeps a **baseline** copy of memory
//! and a [`DirtyTracker`] started at the baseline. [`FastReset::reset`] asks the tracker which
//! pages were dirtied (by the VMM *or* by the guest through the hypervisor), copies exactly
//! those pages back from the baseline, one copy per run of adjacent pages, and starts a new
//! interval. The cost is proportional to the pages dirtied, not to the memory size.
//!
//! The baseline is either captured from live memory ([`FastReset::capture`], held in
//! anonymous memory) or taken from a full snapshot file ([`FastReset::from_snapshot`],
//! validated, then mapped read-only so it is shared with the page cache).
//!
//! vCPUs must be paused during [`FastReset::reset`]: a page written between reading the dirty
//! log and copying would not be restored.
//!
//! ```
//! use vm_memory::{Bytes, GuestAddress};
//! use vmkit_memory::{Backing, DirtyTracker, FastReset, MemoryLayout, RecordingDirtyLog};
//!
//! let mem = Backing::anonymous().build(&MemoryLayout::x86_pc(8 << 20).unwrap()).unwrap();
//! mem.ram().write_obj(0x11u8, GuestAddress(0x3000)).unwrap();
//! let hv = RecordingDirtyLog::new();
//! let mut reset = FastReset::capture(mem.ram(), DirtyTracker::with_hypervisor(mem.ram(), &hv)).unwrap();
//!
//! // One fuzzing iteration: the VMM and the guest both write.
//! mem.ram().write_obj(0x22u8, GuestAddress(0x3000)).unwrap();
//! hv.guest_write(mem.ram(), GuestAddress(0x7000), &[0x33]).unwrap();
//!
//! let stats = reset.reset(mem.ram()).unwrap();
//! assert_eq!(stats.pages, 2);
//! assert_eq!(mem.ram().read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0x11);
//! assert_eq!(mem.ram().read_obj::<u8>(GuestAddress(0x7000)).unwrap(), 0);
//! ```

use std::fs::File;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion, VolatileMemory};

use crate::dirty::{vmm_bitmap, DirtyLogError, DirtyTracker, HypervisorDirtyLog};
use crate::layout::PAGE_SIZE;
use crate::snapshot::{self, SnapshotError, SnapshotKind};
use crate::GuestRam;

/// Errors of fast reset.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// Reading the dirty log failed; memory was not touched.
    #[error(transparent)]
    Dirty(#[from] DirtyLogError),
    /// The baseline snapshot file is unusable.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Allocating or mapping the baseline failed.
    #[error("mapping the baseline failed: {0}")]
    Mmap(#[from] vm_memory::mmap::MmapRegionError),
    /// Guest or baseline memory could not be accessed.
    #[error("memory access failed: {0}")]
    Memory(String),
}

fn mem_err(e: impl std::fmt::Display) -> ResetError {
    ResetError::Memory(e.to_string())
}

/// How many runs ahead of the copy the next pages' first lines are prefetched: dirty pages
/// are scattered, so each copy otherwise starts with a TLB miss and a cache miss.
const PREFETCH_DISTANCE: usize = 4;

/// Hints the CPU to load the cache line at `p` (and its translation). Never faults: a
/// prefetch of any address, mapped or not, is architecturally a no-op apart from caching.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is part of SSE, which every x86_64 CPU has, and it does not access
    // memory in a way that can fault or be observed; any pointer value is allowed.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// What a reset did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResetStats {
    /// Pages copied back from the baseline.
    pub pages: u64,
    /// Copies issued (runs of adjacent dirty pages).
    pub runs: u64,
}

/// A baseline and the tracker of what changed since it; see the [module docs](self).
#[derive(Debug)]
pub struct FastReset<H> {
    baseline: Vec<MmapRegion<()>>,
    tracker: DirtyTracker<H>,
}

impl<H: HypervisorDirtyLog> FastReset<H> {
    /// Takes the current contents of `mem` as the baseline, and starts `tracker`'s interval
    /// now (whatever it had accumulated is dropped).
    pub fn capture(mem: &GuestRam, mut tracker: DirtyTracker<H>) -> Result<Self, ResetError> {
        let mut baseline = Vec::with_capacity(mem.num_regions());
        for region in mem.iter() {
            let copy = MmapRegion::<()>::new(region.len() as usize)?;
            // Resets touch scattered pages of the baseline: huge pages save a TLB miss per
            // page. SAFETY: advisory call on the mapping `copy` owns; it changes no contents.
            unsafe { libc::madvise(copy.as_ptr().cast(), copy.size(), libc::MADV_HUGEPAGE) };
            let src = region.as_volatile_slice().map_err(mem_err)?;
            let dst = copy.as_volatile_slice();
            src.copy_to_volatile_slice(dst);
            baseline.push(copy);
        }
        tracker.clear(mem)?;
        Ok(FastReset { baseline, tracker })
    }

    /// Takes a full snapshot file as the baseline: validates it completely (header, table,
    /// checksums, layout equal to `mem`), restores `mem` to it, and starts `tracker`'s
    /// interval. The file is then mapped read-only and must not change while in use.
    pub fn from_snapshot(
        mem: &GuestRam,
        file: &File,
        mut tracker: DirtyTracker<H>,
    ) -> Result<Self, ResetError> {
        let info = snapshot::read_info(file)?;
        if info.kind != SnapshotKind::Full {
            return Err(SnapshotError::NotFull {
                base_id: info.base_id,
            }
            .into());
        }
        // Validates everything (including the layout) before writing memory.
        snapshot::restore_copy(mem, file)?;
        let shared = Arc::new(
            file.try_clone()
                .map_err(|source| SnapshotError::Io { op: "dup", source })?,
        );
        let mut baseline = Vec::with_capacity(info.regions.len());
        for r in &info.regions {
            let map = MmapRegionBuilder::<()>::new(r.size as usize)
                .with_file_offset(FileOffset::from_arc(Arc::clone(&shared), r.data_offset))
                .with_mmap_prot(libc::PROT_READ)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()?;
            baseline.push(map);
        }
        tracker.clear(mem)?;
        Ok(FastReset { baseline, tracker })
    }

    /// The tracker (e.g. to peek at what is dirty before resetting).
    pub fn tracker(&mut self) -> &mut DirtyTracker<H> {
        &mut self.tracker
    }

    /// Copies every page dirtied since the baseline (or the last reset) back from the
    /// baseline, then starts a new interval. On a dirty-log error nothing is copied.
    pub fn reset(&mut self, mem: &GuestRam) -> Result<ResetStats, ResetError> {
        let dirty = self.tracker.take(mem)?;
        let regions: Vec<_> = mem.iter().collect();
        let runs: Vec<(usize, u64, u64)> = dirty.iter_runs().collect();
        let mut stats = ResetStats::default();
        for (k, &(r, first, n)) in runs.iter().enumerate() {
            let (Some(region), Some(base)) = (regions.get(r), self.baseline.get(r)) else {
                continue;
            };
            if let Some(&(r2, f2, _)) = runs.get(k + PREFETCH_DISTANCE) {
                if let (Some(g2), Some(b2)) = (regions.get(r2), self.baseline.get(r2)) {
                    let off = (f2 * PAGE_SIZE) as usize;
                    let guest: &MmapRegion<AtomicBitmap> = g2;
                    prefetch(b2.as_ptr().wrapping_add(off));
                    prefetch(guest.as_ptr().wrapping_add(off));
                }
            }
            let off = (first * PAGE_SIZE) as usize;
            let len = (n * PAGE_SIZE) as usize;
            let src = base.get_slice(off, len).map_err(mem_err)?;
            let dst = region
                .as_volatile_slice()
                .and_then(|s| s.subslice(off, len).map_err(Into::into))
                .map_err(mem_err)?;
            src.copy_to_volatile_slice(dst);
            // Our own copy marked the pages in vm-memory's bitmap; they now equal the
            // baseline again, so they are clean.
            vmm_bitmap(region).reset_addr_range(off, len);
            stats.pages += n;
            stats.runs += 1;
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backing, MemoryLayout, RecordingDirtyLog};
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> crate::OwnedGuestRam {
        let layout = MemoryLayout::new(&[
            (GuestAddress(0), 0x40_000),
            (GuestAddress(0x100_000), 0x10_000),
        ])
        .unwrap();
        Backing::anonymous().build(&layout).unwrap()
    }

    fn contents(m: &GuestRam) -> Vec<u8> {
        let mut v = vec![0u8; 0x40_000];
        m.read_slice(&mut v, GuestAddress(0)).unwrap();
        let mut w = vec![0u8; 0x10_000];
        m.read_slice(&mut w, GuestAddress(0x100_000)).unwrap();
        v.extend(w);
        v
    }

    #[test]
    fn reset_restores_exactly_the_dirty_pages() {
        let m = mem();
        m.write_slice(&[7; 0x3000], GuestAddress(0x1800)).unwrap();
        let base = contents(m.ram());
        let hv = RecordingDirtyLog::new();
        let mut fr =
            FastReset::capture(m.ram(), DirtyTracker::with_hypervisor(m.ram(), &hv)).unwrap();
        for round in 0..3u8 {
            m.write_slice(&[round + 1; 0x2001], GuestAddress(0x1000))
                .unwrap();
            hv.guest_write(m.ram(), GuestAddress(0x10_f000), &[9; 0x1000])
                .unwrap();
            hv.guest_write(m.ram(), GuestAddress(0x3_fff0), &[9; 0x10])
                .unwrap();
            let stats = fr.reset(m.ram()).unwrap();
            assert_eq!(stats, ResetStats { pages: 5, runs: 3 });
            assert_eq!(contents(m.ram()), base);
            // Nothing is left dirty after a reset.
            assert_eq!(fr.tracker().take(m.ram()).unwrap().count(), 0);
        }
    }

    #[test]
    fn reset_from_snapshot_file() {
        let m = mem();
        m.write_slice(&[3; 0x100], GuestAddress(0x100_010)).unwrap();
        let file = tempfile::tempfile().unwrap();
        snapshot::write_full(m.ram(), &file).unwrap();
        let base = contents(m.ram());
        m.write_slice(&[4; 0x100], GuestAddress(0x20)).unwrap();
        let mut fr = FastReset::from_snapshot(m.ram(), &file, DirtyTracker::new(m.ram())).unwrap();
        // from_snapshot restored memory to the file.
        assert_eq!(contents(m.ram()), base);
        m.write_slice(&[5; 0x100], GuestAddress(0x100_000)).unwrap();
        assert_eq!(fr.reset(m.ram()).unwrap().pages, 1);
        assert_eq!(contents(m.ram()), base);
    }

    #[test]
    fn dirty_log_error_leaves_memory_alone() {
        let m = mem();
        let hv = RecordingDirtyLog::new();
        let mut fr =
            FastReset::capture(m.ram(), DirtyTracker::with_hypervisor(m.ram(), &hv)).unwrap();
        m.write_obj(1u8, GuestAddress(0)).unwrap();
        hv.fail_next(0);
        assert!(matches!(fr.reset(m.ram()), Err(ResetError::Dirty(_))));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0)).unwrap(), 1);
        // The page is still known dirty and the next reset restores it.
        assert_eq!(fr.reset(m.ram()).unwrap().pages, 1);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0)).unwrap(), 0);
    }

    #[test]
    fn from_snapshot_rejects_incremental_and_bad_files() {
        let m = mem();
        let file = tempfile::tempfile().unwrap();
        let d = crate::DirtyBitmap::new(m.ram());
        snapshot::write_incremental(m.ram(), &d, 1, &file).unwrap();
        let err = FastReset::from_snapshot(m.ram(), &file, DirtyTracker::new(m.ram())).unwrap_err();
        assert!(matches!(
            err,
            ResetError::Snapshot(SnapshotError::NotFull { base_id: 1 })
        ));
        let empty = tempfile::tempfile().unwrap();
        let err =
            FastReset::from_snapshot(m.ram(), &empty, DirtyTracker::new(m.ram())).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
