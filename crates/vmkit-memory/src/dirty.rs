//! Dirty-page tracking: one view of "which guest pages changed since X", merging the VMM's
//! own writes with the hypervisor's record of guest writes.
//!
//! # Model
//!
//! Guest memory changes through two doors:
//!
//! 1. **The VMM** (device emulation, boot loaders) writes through vm-memory's `Bytes` and
//!    `VolatileSlice` APIs. Each [`GuestRam`] region carries an
//!    [`AtomicBitmap`] that those writes mark, one bit per 4 KiB page.
//! 2. **The guest** writes directly through the hypervisor's second-level page tables; only
//!    the hypervisor knows, and it reports it through a dirty log such as `KVM_GET_DIRTY_LOG`.
//!    [`HypervisorDirtyLog`] is the seam a hypervisor backend implements.
//!
//! A [`DirtyTracker`] pulls both sources, ORs them, and accumulates the result in a
//! [`DirtyBitmap`]. "Since X" means since the tracker was created or last
//! [`clear`](DirtyTracker::clear)ed / [`take`](DirtyTracker::take)n:
//!
//! - [`sync`](DirtyTracker::sync) drains both sources into the accumulated bitmap;
//! - [`dirty`](DirtyTracker::dirty) views the accumulated bitmap (call `sync` first);
//! - [`take`](DirtyTracker::take) is snapshot-and-clear: sync, return the bitmap, start over;
//! - [`clear`](DirtyTracker::clear) is the same, discarding the result.
//!
//! Both sources are *drained* by a sync (vm-memory's bitmap is reset, the hypervisor log is
//! read-and-cleared), so a tracker must be the only consumer of them.
//!
//! # Slot numbering
//!
//! Hypervisor dirty logs are per memory slot. The convention in vmkit is that **slot `i` is
//! region `i`** of the guest memory (regions sorted by guest address, as
//! [`MemoryLayout`](crate::MemoryLayout) and vm-memory order them). A VMM that numbers its
//! slots differently supplies the mapping with [`DirtyTracker::with_slots`].
//!
//! ```
//! use vm_memory::{Bytes, GuestAddress};
//! use vmkit_memory::{Backing, DirtyTracker, MemoryLayout, RecordingDirtyLog};
//!
//! let mem = Backing::anonymous().build(&MemoryLayout::x86_pc(8 << 20).unwrap()).unwrap();
//! let hv = RecordingDirtyLog::new();
//! let mut tracker = DirtyTracker::with_hypervisor(mem.ram(), &hv);
//!
//! mem.ram().write_obj(1u8, GuestAddress(0x2000)).unwrap(); // the VMM writes page 2
//! hv.guest_write(mem.ram(), GuestAddress(0x5000), &[1]).unwrap(); // the guest writes page 5
//!
//! let dirty = tracker.take(mem.ram()).unwrap();
//! let pages: Vec<u64> = dirty.iter_addrs().map(|a| a.0).collect();
//! assert_eq!(pages, [0x2000, 0x5000]);
//! assert_eq!(tracker.take(mem.ram()).unwrap().count(), 0); // cleared
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileSlice};

use crate::layout::PAGE_SIZE;
use crate::GuestRam;

/// A hypervisor's record of pages the guest wrote (KVM_GET_DIRTY_LOG and the like).
///
/// Slot numbers follow the crate convention (slot `i` = region `i`) unless the
/// [`DirtyTracker`] was given another mapping.
pub trait HypervisorDirtyLog {
    /// The hypervisor's error type.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Returns and clears the dirty bitmap of memory slot `slot` covering `len` bytes:
    /// one bit per 4 KiB page, bit i of word j is page j*64+i of the slot.
    fn get_and_clear_dirty(&self, slot: u32, len: usize) -> Result<Vec<u64>, Self::Error>;
}

impl<T: HypervisorDirtyLog + ?Sized> HypervisorDirtyLog for &T {
    type Error = T::Error;
    fn get_and_clear_dirty(&self, slot: u32, len: usize) -> Result<Vec<u64>, Self::Error> {
        (**self).get_and_clear_dirty(slot, len)
    }
}

impl<T: HypervisorDirtyLog + ?Sized> HypervisorDirtyLog for Arc<T> {
    type Error = T::Error;
    fn get_and_clear_dirty(&self, slot: u32, len: usize) -> Result<Vec<u64>, Self::Error> {
        (**self).get_and_clear_dirty(slot, len)
    }
}

/// A hypervisor that records nothing: for guests that never run, or VMMs that track only their
/// own writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHypervisorLog;

impl HypervisorDirtyLog for NoHypervisorLog {
    type Error = std::convert::Infallible;
    fn get_and_clear_dirty(&self, _slot: u32, len: usize) -> Result<Vec<u64>, Self::Error> {
        Ok(vec![0; words_for(len)])
    }
}

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// The hypervisor failed to return a slot's log.
    #[error("hypervisor dirty log of slot {slot} failed: {source}")]
    Hypervisor {
        /// The slot asked for.
        slot: u32,
        /// The hypervisor's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The hypervisor returned a bitmap of the wrong length.
    #[error("hypervisor dirty log of slot {slot} has {got} words, expected {expected}")]
    BitmapLength {
        /// The slot asked for.
        slot: u32,
        /// Words expected (one bit per 4 KiB page).
        expected: usize,
        /// Words returned.
        got: usize,
    },
    /// The memory passed in does not have the shape the tracker was created for.
    #[error("guest memory has regions {got:x?}, tracker was built for {expected:x?} (hex address, size)")]
    ShapeMismatch {
        /// (start, size) of the tracker's regions.
        expected: Vec<(u64, u64)>,
        /// (start, size) of the memory's regions.
        got: Vec<(u64, u64)>,
    },
    /// A slot mapping does not have one slot per region.
    #[error("slot mapping has {got} entries for {expected} regions")]
    SlotCount {
        /// Number of regions.
        expected: usize,
        /// Number of slots supplied.
        got: usize,
    },
    /// A guest address is not inside guest RAM.
    #[error("guest range {addr:#x}+{len:#x} is not inside one RAM region")]
    InvalidAddress {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: usize,
    },
}

fn words_for(len: usize) -> usize {
    len.div_ceil(PAGE_SIZE as usize).div_ceil(64)
}

/// One region's dirty pages.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RegionBits {
    guest_addr: GuestAddress,
    size: u64,
    words: Vec<u64>,
}

impl RegionBits {
    fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

/// A set of dirty guest pages, one bit per 4 KiB page per RAM region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    regions: Vec<RegionBits>,
}

impl DirtyBitmap {
    /// An all-clean bitmap shaped like `mem`.
    pub fn new(mem: &GuestRam) -> Self {
        DirtyBitmap {
            regions: mem
                .iter()
                .map(|r| RegionBits {
                    guest_addr: r.start_addr(),
                    size: r.len(),
                    words: vec![0; words_for(r.len() as usize)],
                })
                .collect(),
        }
    }

    fn shape(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.guest_addr.0, r.size))
            .collect()
    }

    /// Fails unless `mem` has exactly the regions this bitmap describes.
    pub(crate) fn check_shape(&self, mem: &GuestRam) -> Result<(), DirtyLogError> {
        let got: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let expected = self.shape();
        if got != expected {
            return Err(DirtyLogError::ShapeMismatch { expected, got });
        }
        Ok(())
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| r.words.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Is the page holding `addr` dirty? Addresses outside RAM are clean.
    pub fn is_dirty(&self, addr: GuestAddress) -> bool {
        self.locate(addr).is_some_and(|(r, page)| {
            self.regions[r]
                .words
                .get((page / 64) as usize)
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
        })
    }

    fn locate(&self, addr: GuestAddress) -> Option<(usize, u64)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let off = addr.0.checked_sub(r.guest_addr.0)?;
            (off < r.size).then_some((i, off / PAGE_SIZE))
        })
    }

    /// Marks every page overlapping `addr..addr+len` dirty. Fails if the range is not inside
    /// one RAM region.
    pub fn mark(&mut self, addr: GuestAddress, len: usize) -> Result<(), DirtyLogError> {
        let bad = || DirtyLogError::InvalidAddress { addr: addr.0, len };
        if len == 0 {
            return Ok(());
        }
        let (r, first) = self.locate(addr).ok_or_else(bad)?;
        let region = &mut self.regions[r];
        let last_byte = addr.0.checked_add(len as u64 - 1).ok_or_else(bad)?;
        if last_byte - region.guest_addr.0 >= region.size {
            return Err(bad());
        }
        let last = (last_byte - region.guest_addr.0) / PAGE_SIZE;
        for page in first..=last {
            if let Some(w) = region.words.get_mut((page / 64) as usize) {
                *w |= 1 << (page % 64);
            }
        }
        Ok(())
    }

    /// Adds every page dirty in `other` (which must have the same shape).
    pub fn union_with(&mut self, other: &DirtyBitmap) -> Result<(), DirtyLogError> {
        if self.shape() != other.shape() {
            return Err(DirtyLogError::ShapeMismatch {
                expected: self.shape(),
                got: other.shape(),
            });
        }
        for (a, b) in self.regions.iter_mut().zip(&other.regions) {
            for (x, y) in a.words.iter_mut().zip(&b.words) {
                *x |= y;
            }
        }
        Ok(())
    }

    /// The bitmap words of region `index` (KVM layout: bit i of word j is page j*64+i).
    pub fn region_words(&self, index: usize) -> Option<&[u64]> {
        self.regions.get(index).map(|r| r.words.as_slice())
    }

    /// Dirty pages as (region index, page index within region), in address order.
    pub fn iter_pages(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.regions.iter().enumerate().flat_map(|(ri, r)| {
            let pages = r.pages();
            r.words
                .iter()
                .enumerate()
                .flat_map(move |(wi, &w)| {
                    BitIter(w).map(move |b| (ri, wi as u64 * 64 + u64::from(b)))
                })
                .filter(move |&(_, p)| p < pages)
        })
    }

    /// Runs of consecutive dirty pages as (region index, first page, page count), in address
    /// order: what a copier wants, one `memcpy` per run.
    pub fn iter_runs(&self) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        let mut pages = self.iter_pages().peekable();
        std::iter::from_fn(move || {
            let (r, first) = pages.next()?;
            let mut n = 1;
            while pages.peek() == Some(&(r, first + n)) {
                pages.next();
                n += 1;
            }
            Some((r, first, n))
        })
    }

    /// Guest addresses of the dirty pages, in order.
    pub fn iter_addrs(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        self.iter_pages()
            .map(|(r, p)| GuestAddress(self.regions[r].guest_addr.0 + p * PAGE_SIZE))
    }

    /// Forgets every dirty page.
    pub fn clear(&mut self) {
        for r in &mut self.regions {
            r.words.iter_mut().for_each(|w| *w = 0);
        }
    }

    /// Number of regions.
    pub fn num_regions(&self) -> usize {
        self.regions.len()
    }
}

/// Iterates the set bit positions of a word.
struct BitIter(u64);

impl Iterator for BitIter {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

/// The vm-memory bitmap of a region of [`GuestRam`].
pub(crate) fn vmm_bitmap(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let mmap: &MmapRegion<AtomicBitmap> = region;
    mmap.bitmap()
}

/// Accumulates dirty pages from the VMM's bitmap and a hypervisor's log; see the
/// [module docs](self).
#[derive(Debug)]
pub struct DirtyTracker<H = NoHypervisorLog> {
    acc: DirtyBitmap,
    slots: Vec<u32>,
    hypervisor: H,
}

impl DirtyTracker<NoHypervisorLog> {
    /// A tracker of the VMM's own writes only.
    pub fn new(mem: &GuestRam) -> Self {
        Self::with_hypervisor(mem, NoHypervisorLog)
    }
}

impl<H: HypervisorDirtyLog> DirtyTracker<H> {
    /// A tracker merging the VMM's writes with `hypervisor`'s log, slot `i` = region `i`.
    pub fn with_hypervisor(mem: &GuestRam, hypervisor: H) -> Self {
        let acc = DirtyBitmap::new(mem);
        let slots = (0..acc.num_regions())
            .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
            .collect();
        DirtyTracker {
            acc,
            slots,
            hypervisor,
        }
    }

    /// Like [`with_hypervisor`](Self::with_hypervisor) with an explicit slot for each region.
    pub fn with_slots(
        mem: &GuestRam,
        hypervisor: H,
        slots: Vec<u32>,
    ) -> Result<Self, DirtyLogError> {
        let mut t = Self::with_hypervisor(mem, hypervisor);
        if slots.len() != t.slots.len() {
            return Err(DirtyLogError::SlotCount {
                expected: t.slots.len(),
                got: slots.len(),
            });
        }
        t.slots = slots;
        Ok(t)
    }

    /// The hypervisor log this tracker reads.
    pub fn hypervisor(&self) -> &H {
        &self.hypervisor
    }

    /// Drains vm-memory's bitmaps and the hypervisor log into the accumulated set.
    ///
    /// On a hypervisor error the pages drained so far stay accumulated (nothing is lost).
    pub fn sync(&mut self, mem: &GuestRam) -> Result<(), DirtyLogError> {
        self.acc.check_shape(mem)?;
        for ((region, acc), &slot) in mem.iter().zip(&mut self.acc.regions).zip(&self.slots) {
            let vmm = vmm_bitmap(region).get_and_reset();
            for (a, v) in acc.words.iter_mut().zip(&vmm) {
                *a |= v;
            }
            let len = region.len() as usize;
            let hv = self
                .hypervisor
                .get_and_clear_dirty(slot, len)
                .map_err(|e| DirtyLogError::Hypervisor {
                    slot,
                    source: Box::new(e),
                })?;
            if hv.len() != acc.words.len() {
                return Err(DirtyLogError::BitmapLength {
                    slot,
                    expected: acc.words.len(),
                    got: hv.len(),
                });
            }
            for (a, v) in acc.words.iter_mut().zip(&hv) {
                *a |= v;
            }
        }
        Ok(())
    }

    /// The pages accumulated so far (as of the last [`sync`](Self::sync)).
    pub fn dirty(&self) -> &DirtyBitmap {
        &self.acc
    }

    /// Snapshot-and-clear: syncs, returns every page dirtied since the last clear, and starts
    /// a new interval.
    pub fn take(&mut self, mem: &GuestRam) -> Result<DirtyBitmap, DirtyLogError> {
        self.sync(mem)?;
        let fresh = DirtyBitmap::new(mem);
        Ok(std::mem::replace(&mut self.acc, fresh))
    }

    /// Starts a new interval, discarding what was dirtied so far.
    pub fn clear(&mut self, mem: &GuestRam) -> Result<(), DirtyLogError> {
        self.take(mem).map(drop)
    }
}

/// Error of the [`RecordingDirtyLog`] fake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordingDirtyLogError {
    /// A failure injected with [`RecordingDirtyLog::fail_next`].
    #[error("injected dirty-log failure for slot {0}")]
    Injected(u32),
}

/// An in-memory [`HypervisorDirtyLog`] for tests: it records the pages the test says the
/// "guest" wrote, and hands them out like `KVM_GET_DIRTY_LOG` would.
///
/// [`guest_write`](Self::guest_write) writes guest memory *around* vm-memory's dirty bitmap,
/// the way a real guest does through the hypervisor's page tables, and records the pages
/// here. Failures can be injected with [`fail_next`](Self::fail_next).
#[derive(Debug, Default)]
pub struct RecordingDirtyLog {
    state: Mutex<RecordingState>,
}

#[derive(Debug, Default)]
struct RecordingState {
    slots: BTreeMap<u32, Vec<u64>>,
    fail: Option<u32>,
}

impl RecordingDirtyLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecordingState> {
        // A panic while holding the lock cannot leave the bitmap inconsistent (it only ORs
        // bits), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that pages overlapping `offset..offset+len` of `slot` were written.
    pub fn mark(&self, slot: u32, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE;
        let last = offset.saturating_add(len - 1) / PAGE_SIZE;
        let mut st = self.lock();
        let words = st.slots.entry(slot).or_default();
        for page in first..=last {
            let w = (page / 64) as usize;
            if words.len() <= w {
                words.resize(w + 1, 0);
            }
            words[w] |= 1 << (page % 64);
        }
    }

    /// Makes the next [`get_and_clear_dirty`](HypervisorDirtyLog::get_and_clear_dirty) of
    /// `slot` fail (once), without clearing its bits.
    pub fn fail_next(&self, slot: u32) {
        self.lock().fail = Some(slot);
    }

    /// Writes `data` at `addr` as the guest would: bypassing vm-memory's dirty bitmap and
    /// recording the pages in this log (slot = region index).
    pub fn guest_write(
        &self,
        mem: &GuestRam,
        addr: GuestAddress,
        data: &[u8],
    ) -> Result<(), DirtyLogError> {
        let bad = || DirtyLogError::InvalidAddress {
            addr: addr.0,
            len: data.len(),
        };
        let (slot, region) = mem
            .iter()
            .enumerate()
            .find(|(_, r)| r.to_region_addr(addr).is_some())
            .ok_or_else(bad)?;
        let offset = addr.0 - region.start_addr().0;
        let end = offset.checked_add(data.len() as u64).ok_or_else(bad)?;
        if end > region.len() {
            return Err(bad());
        }
        let mmap: &MmapRegion<AtomicBitmap> = region;
        // SAFETY: `offset..end` lies inside the region's mapping (checked above), which stays
        // mapped while `mem` borrows it. The slice has no bitmap, so the write is not seen by
        // vm-memory's dirty tracking, exactly like a guest write.
        let slice = unsafe { VolatileSlice::new(mmap.as_ptr().add(offset as usize), data.len()) };
        slice.copy_from(data);
        self.mark(
            u32::try_from(slot).unwrap_or(u32::MAX),
            offset,
            data.len() as u64,
        );
        Ok(())
    }
}

impl HypervisorDirtyLog for RecordingDirtyLog {
    type Error = RecordingDirtyLogError;

    fn get_and_clear_dirty(&self, slot: u32, len: usize) -> Result<Vec<u64>, Self::Error> {
        let mut st = self.lock();
        if st.fail == Some(slot) {
            st.fail = None;
            return Err(RecordingDirtyLogError::Injected(slot));
        }
        let n = words_for(len);
        let pages = (len as u64).div_ceil(PAGE_SIZE);
        let mut words = st.slots.remove(&slot).unwrap_or_default();
        words.resize(n, 0);
        // Drop bits past the slot's end, as KVM never reports them.
        if pages % 64 != 0 {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        Ok(words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backing, MemoryLayout};
    use vm_memory::Bytes;

    fn mem() -> crate::OwnedGuestRam {
        let layout = MemoryLayout::new(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x3000),
        ])
        .unwrap();
        Backing::anonymous().build(&layout).unwrap()
    }

    #[test]
    fn merges_vmm_and_hypervisor_writes() {
        let m = mem();
        let hv = RecordingDirtyLog::new();
        let mut t = DirtyTracker::with_hypervisor(m.ram(), &hv);
        m.ram().write_obj(1u32, GuestAddress(0x1ffe)).unwrap(); // pages 1 and 2
        hv.guest_write(m.ram(), GuestAddress(0x20_2000), &[9; 16])
            .unwrap();
        hv.guest_write(m.ram(), GuestAddress(0x1000), &[9; 1])
            .unwrap(); // overlaps VMM
        t.sync(m.ram()).unwrap();
        let addrs: Vec<u64> = t.dirty().iter_addrs().map(|a| a.0).collect();
        assert_eq!(addrs, [0x1000, 0x2000, 0x20_2000]);
        assert!(t.dirty().is_dirty(GuestAddress(0x2fff)));
        assert!(!t.dirty().is_dirty(GuestAddress(0x3000)));
        assert!(!t.dirty().is_dirty(GuestAddress(0x9999_9999)));
        // Guest writes really reached memory without marking vm-memory's bitmap.
        assert_eq!(m.ram().read_obj::<u8>(GuestAddress(0x20_2000)).unwrap(), 9);
        let runs: Vec<_> = t.dirty().iter_runs().collect();
        assert_eq!(runs, [(0, 1, 2), (1, 2, 1)]);
        // Sync accumulates; take returns and clears.
        m.ram().write_obj(1u8, GuestAddress(0x8000)).unwrap();
        let d = t.take(m.ram()).unwrap();
        assert_eq!(d.count(), 4);
        assert_eq!(t.dirty().count(), 0);
        t.clear(m.ram()).unwrap();
        assert_eq!(t.take(m.ram()).unwrap().count(), 0);
        assert_eq!(d.region_words(1).unwrap(), &[0b100]);
        assert!(d.region_words(2).is_none());
    }

    #[test]
    fn hypervisor_failure_is_typed_and_keeps_pages() {
        let m = mem();
        let hv = Arc::new(RecordingDirtyLog::new());
        let mut t = DirtyTracker::with_hypervisor(m.ram(), Arc::clone(&hv));
        hv.guest_write(m.ram(), GuestAddress(0x20_0000), &[1])
            .unwrap();
        m.ram().write_obj(1u8, GuestAddress(0)).unwrap();
        hv.fail_next(1);
        let err = t.sync(m.ram()).unwrap_err();
        assert!(
            matches!(err, DirtyLogError::Hypervisor { slot: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("slot 1"));
        // The VMM page drained before the failure is still accounted, and the
        // hypervisor's bits were not lost.
        let d = t.take(m.ram()).unwrap();
        assert_eq!(
            d.iter_addrs().map(|a| a.0).collect::<Vec<_>>(),
            [0, 0x20_0000]
        );
        assert!(t.hypervisor().lock().slots.is_empty());
    }

    #[test]
    fn custom_slots_and_shape_checks() {
        let m = mem();
        let hv = RecordingDirtyLog::new();
        assert!(matches!(
            DirtyTracker::with_slots(m.ram(), &hv, vec![1]),
            Err(DirtyLogError::SlotCount {
                expected: 2,
                got: 1
            })
        ));
        let mut t = DirtyTracker::with_slots(m.ram(), &hv, vec![10, 11]).unwrap();
        hv.mark(11, 0x1000, 1);
        hv.mark(1, 0, 1); // slot 1 is not ours: ignored
        t.sync(m.ram()).unwrap();
        assert_eq!(
            t.dirty().iter_addrs().map(|a| a.0).collect::<Vec<_>>(),
            [0x20_1000]
        );
        let other = Backing::anonymous()
            .build(&MemoryLayout::new(&[(GuestAddress(0), 0x1000)]).unwrap())
            .unwrap();
        let err = t.sync(other.ram()).unwrap_err();
        assert!(matches!(err, DirtyLogError::ShapeMismatch { .. }));
        let mut b = DirtyBitmap::new(m.ram());
        assert!(b.union_with(&DirtyBitmap::new(other.ram())).is_err());
    }

    #[test]
    fn wrong_bitmap_length_is_rejected() {
        struct Short;
        impl HypervisorDirtyLog for Short {
            type Error = std::convert::Infallible;
            fn get_and_clear_dirty(&self, _: u32, _: usize) -> Result<Vec<u64>, Self::Error> {
                Ok(vec![])
            }
        }
        let m = mem();
        let mut t = DirtyTracker::with_hypervisor(m.ram(), Short);
        assert!(matches!(
            t.sync(m.ram()),
            Err(DirtyLogError::BitmapLength {
                slot: 0,
                expected: 4,
                got: 0
            })
        ));
    }

    #[test]
    fn bitmap_mark_and_union() {
        let m = mem();
        let mut a = DirtyBitmap::new(m.ram());
        a.mark(GuestAddress(0xfff), 2).unwrap();
        a.mark(GuestAddress(0), 0).unwrap();
        assert!(a.mark(GuestAddress(0xf_f000), 0x2000).is_err());
        assert!(a.mark(GuestAddress(0x10_0000), 1).is_err());
        let mut b = DirtyBitmap::new(m.ram());
        b.mark(GuestAddress(0x20_2fff), 1).unwrap();
        a.union_with(&b).unwrap();
        assert_eq!(a.count(), 3);
        assert_eq!(a.iter_runs().collect::<Vec<_>>(), [(0, 0, 2), (1, 2, 1)]);
        a.clear();
        assert_eq!(a.count(), 0);
        assert_eq!(a.num_regions(), 2);
    }

    #[test]
    fn recording_log_trims_and_reports_injected_errors() {
        let hv = RecordingDirtyLog::new();
        hv.mark(0, 0, 0);
        hv.mark(0, 0x2000 * PAGE_SIZE, 1); // beyond a 3-page slot
        hv.mark(0, PAGE_SIZE, 1);
        assert_eq!(
            hv.get_and_clear_dirty(0, 3 * PAGE_SIZE as usize).unwrap(),
            [0b10]
        );
        assert_eq!(
            hv.get_and_clear_dirty(0, 3 * PAGE_SIZE as usize).unwrap(),
            [0]
        );
        hv.fail_next(4);
        assert_eq!(
            hv.get_and_clear_dirty(4, 1).unwrap_err(),
            RecordingDirtyLogError::Injected(4)
        );
        let m = mem();
        assert!(hv
            .guest_write(m.ram(), GuestAddress(0x10_0000), &[1])
            .is_err());
        assert!(hv
            .guest_write(m.ram(), GuestAddress(0x20_2fff), &[1, 2])
            .is_err());
        assert_eq!(
            NoHypervisorLog.get_and_clear_dirty(0, 65 * 4096).unwrap(),
            [0, 0]
        );
    }
}
