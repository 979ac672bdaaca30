//! Physical memory as the page-table code sees it.
//!
//! Walkers, the builder and the shadow MMU never touch memory directly: they go through
//! [`PhysMemory`], a deliberately tiny trait (aligned 32/64-bit loads, stores and
//! compare-exchanges) so that the same code runs over
//!
//! * any vm-memory [`GuestMemory`](vm_memory::GuestMemory) (blanket impl, `std` feature, the
//!   default): this is how a VMM uses the crate;
//! * [`FlatMemory`], a `Vec<AtomicU64>` at a base address, usable without `std` (firmware,
//!   fuzzing, benchmarks);
//! * anything a user writes (an EPT-translated view, an MMIO-aware bus, ...).
//!
//! Every method returns `None` when the address is not backed by memory: page tables are
//! guest-controlled, so "the guest pointed outside RAM" is an ordinary outcome, not a bug.
//! Addresses are naturally aligned by every caller in this crate (entries are 4 or 8 bytes at
//! an index inside an aligned table); implementations may return `None` for unaligned ones.
//!
//! One optional method serves speed: [`PhysMemory::word_span`] hands out a [`WordSpan`], a
//! run of RAM as a slice of atomic words, so that the fast page walk reads an entry with one
//! bounds check instead of a memory-map lookup per level. `FlatMemory` and every plain
//! vm-memory region provide it; other implementations simply keep the default (`None`) and
//! are read word by word.

use alloc::vec::Vec;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicU64, Ordering};

#[cfg(feature = "std")]
pub use vm_memory::GuestAddress;

/// A guest physical address (stand-in for vm-memory's type when built without `std`).
#[cfg(not(feature = "std"))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestAddress(pub u64);

/// A run of physical memory seen as atomic 64-bit words: `words[i]` is the word at physical
/// address `base + 8 * i`, the same word [`PhysMemory::read_u64`] loads there.
///
/// Page-table walks read one entry per level, usually all from the same run of RAM. A
/// walker that holds a span reads an entry with one bounds check, instead of looking the
/// address up in the memory map at every level. The load's host address is computed as
/// `(host - base) + addr`, not `host + (addr - base)`: the first sum is precomputed, so
/// between one entry and the next table's entry there is only the walk's own arithmetic
/// (mask the next-table address, add the index), and the bounds check runs beside it
/// instead of lengthening the chain of dependent loads.
///
/// A span only reads: its words are private and [`WordSpan::load`] is its one access, so
/// safe code holding a span cannot write guest RAM behind the dirty log's back or store into
/// a read-only mapping.
#[derive(Debug, Clone, Copy)]
pub struct WordSpan<'a> {
    /// Physical address of `words[0]` (8-byte aligned).
    base: u64,
    /// `8 * words.len()`.
    len_bytes: u64,
    /// `len_bytes - 4095` (0 below one page): a 4 KiB table at `table` lies wholly in the
    /// span when `table - base < table_limit`.
    table_limit: u64,
    /// `words.as_ptr()` moved down by `base` bytes (wrapping; never dereferenced as such):
    /// adding a physical address inside the span gives that word's host address.
    biased: *const AtomicU64,
    /// The borrow of the words `biased` points into.
    words: PhantomData<&'a [AtomicU64]>,
}

// SAFETY: a `WordSpan` is a shared borrow of `[AtomicU64]` (the `PhantomData` records it)
// plus plain integers; `biased` only ever addresses words of that borrowed slice and is
// only used for atomic loads. `&[AtomicU64]` is `Send` and `Sync`, so the span is too, as
// it was when it held the slice itself.
unsafe impl Send for WordSpan<'_> {}
// SAFETY: as for `Send` above: shared access through a span is atomic loads only.
unsafe impl Sync for WordSpan<'_> {}

impl<'a> WordSpan<'a> {
    /// A span of `words` starting at physical address `base`, or `None` if `base` is not
    /// 8-byte aligned. For [`PhysMemory`] implementations that own their words.
    pub fn new(base: u64, words: &'a [AtomicU64]) -> Option<Self> {
        if base & 7 != 0 {
            return None;
        }
        Some(WordSpan {
            base,
            // A slice holds at most isize::MAX bytes: no overflow.
            len_bytes: words.len() as u64 * 8,
            table_limit: Self::table_limit_of(words),
            // Truncating `base` on a 32-bit host is harmless: pointer arithmetic wraps
            // modulo the address width, and `load` adds the same truncated address back.
            biased: words.as_ptr().wrapping_byte_sub(base as usize),
            words: PhantomData,
        })
    }

    /// Physical address of the first word.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Length of the span in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// `table_limit` for a span over `words`.
    fn table_limit_of(words: &[AtomicU64]) -> u64 {
        (words.len() as u64 * 8).saturating_sub(4095)
    }

    /// Loads the word at physical address `addr`: `None` if `addr` is not 8-byte aligned
    /// (as [`PhysMemory::read_u64`]) or lies outside the span.
    #[inline(always)]
    pub fn load(&self, addr: u64) -> Option<u64> {
        // An address below `base` wraps around to a huge offset and fails the check.
        if addr & 7 != 0 || addr.wrapping_sub(self.base) >= self.len_bytes {
            return None;
        }
        let word = self.biased.wrapping_byte_add(addr as usize);
        // SAFETY: `addr - base` (checked just above) is below `len_bytes = 8 * words.len()`
        // and a multiple of 8 (`addr` and `base` both are), so `biased + addr`, which is
        // `words.as_ptr() + (addr - base)` computed with wrapping arithmetic from a pointer
        // derived from the borrowed `words` slice, points at `words[(addr - base) / 8]`: inside the borrowed
        // slice, aligned, alive for `'a`. Only a shared reference to an atomic is made and
        // read, as `words[i].load` would.
        Some(unsafe { &*word }.load(Ordering::Relaxed))
    }

    /// Loads the 8-byte entry at byte `offset` (8-aligned, below 4096; other bits are
    /// ignored) of the 4 KiB table at `table` (its low 12 bits are ignored): `None` unless
    /// the whole table lies in the span.
    ///
    /// For page walks. Checking the table rather than the entry lets the load's address be
    /// `(host - base + offset) + table`, whose first sum does not depend on the previous
    /// entry: between reading an entry and reading the next level's there is one AND
    /// (the entry's address bits), and the bounds check runs beside the load.
    #[inline(always)]
    pub fn load_table_entry(&self, table: u64, offset: u64) -> Option<u64> {
        let table = table & !0xfff;
        let offset = offset & 0xff8;
        if table.wrapping_sub(self.base) >= self.table_limit {
            return None;
        }
        let word = self
            .biased
            .wrapping_byte_add(offset as usize)
            .wrapping_byte_add(table as usize);
        // SAFETY: `table - base < len_bytes - 4095` (checked just above) and `offset <=
        // 4088`, so `table - base + offset <= len_bytes - 8`; `table - base` and `offset`
        // are multiples of 8 (`base` is 8-aligned, `table` 4 KiB aligned). `biased +
        // offset + table` is therefore `words.as_ptr() + (table - base + offset)`, a
        // pointer derived from the borrowed `words` slice by wrapping arithmetic that
        // lands on an aligned word inside it, alive for `'a`. Only a shared reference to
        // an atomic is made and read.
        Some(unsafe { &*word }.load(Ordering::Relaxed))
    }
}

/// How often the default [`PhysMemory::compare_exchange_u32`] retries when only the other
/// half of its 8-byte word changes before it reports a lost race.
pub const CAS_U32_RETRIES: u32 = 64;

/// Aligned word access to a physical address space (guest-physical or host-physical).
pub trait PhysMemory {
    /// Direct access to the run of ordinary RAM that contains `addr`, for fast reads.
    ///
    /// The default, `None`, means "no such view": callers then use
    /// [`read_u64`](Self::read_u64). An implementation that returns a span promises that
    /// loading `words[i]` is exactly what `read_u64(base + 8 * i)` does, so the fast and the
    /// word-by-word paths can never disagree. Writes always go through the other methods
    /// (they may have side effects such as dirty logging).
    #[inline]
    fn word_span(&self, addr: u64) -> Option<WordSpan<'_>> {
        let _ = addr;
        None
    }

    /// Loads the 64-bit little-endian word at `addr` (8-byte aligned).
    fn read_u64(&self, addr: u64) -> Option<u64>;

    /// Stores a 64-bit word at `addr` (8-byte aligned).
    fn write_u64(&self, addr: u64, value: u64) -> Option<()>;

    /// Atomically replaces the word at `addr` with `new` if it still equals `current`.
    ///
    /// Returns `Some(Ok(current))` on success, `Some(Err(actual))` when another agent changed
    /// the word first, `None` when `addr` is not memory. Used to set Accessed/Dirty bits without
    /// losing a concurrent guest write to the same entry.
    fn compare_exchange_u64(&self, addr: u64, current: u64, new: u64) -> Option<Result<u64, u64>>;

    /// Loads the 32-bit word at `addr` (4-byte aligned); used by 32-bit paging.
    fn read_u32(&self, addr: u64) -> Option<u32> {
        let word = self.read_u64(addr & !7)?;
        Some((word >> ((addr & 4) * 8)) as u32)
    }

    /// Stores a 32-bit word at `addr` (4-byte aligned).
    ///
    /// The default replaces the enclosing 8-byte word with a compare-exchange, retrying
    /// until it succeeds: unbounded only if another agent rewrites the other half for ever.
    /// The walkers never call it (they update entries with compare-exchange); it serves the
    /// VMM's own table writes (the builder), which do not race a hostile vCPU's stores to
    /// the same word. Implementations with 4-byte stores should override it.
    fn write_u32(&self, addr: u64, value: u32) -> Option<()> {
        let shift = (addr & 4) * 8;
        loop {
            let old = self.read_u64(addr & !7)?;
            let new = (old & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
            if self.compare_exchange_u64(addr & !7, old, new)?.is_ok() {
                return Some(());
            }
        }
    }

    /// Atomically replaces the 32-bit word at `addr` if it still equals `current`.
    ///
    /// The default builds it from [`compare_exchange_u64`](Self::compare_exchange_u64) on
    /// the enclosing 8-byte word, retrying while only the other half changes - at most
    /// [`CAS_U32_RETRIES`] times: a vCPU that keeps rewriting the neighbouring 32-bit entry
    /// then gets a lost race reported (`Err` with this half's value), so a walk restarts
    /// and stays bounded instead of spinning here. The default is therefore *weak*, like
    /// `compare_exchange_weak`: it may fail although this half still equals `current`.
    fn compare_exchange_u32(&self, addr: u64, current: u32, new: u32) -> Option<Result<u32, u32>> {
        let shift = (addr & 4) * 8;
        for _ in 0..CAS_U32_RETRIES {
            let old = self.read_u64(addr & !7)?;
            let actual = (old >> shift) as u32;
            if actual != current {
                return Some(Err(actual));
            }
            let replaced = (old & !(0xffff_ffffu64 << shift)) | (u64::from(new) << shift);
            if self.compare_exchange_u64(addr & !7, old, replaced)?.is_ok() {
                return Some(Ok(current));
            }
            // The other half of the word changed under us: retry; our half is re-checked.
        }
        Some(Err(current))
    }

    /// Fills the 4 KiB frame at `addr` with zeroes (used for freshly allocated tables).
    fn zero_frame(&self, addr: u64) -> Option<()> {
        let base = addr & !0xfff;
        for i in 0..512u64 {
            self.write_u64(base + i * 8, 0)?;
        }
        Some(())
    }
}

#[cfg(feature = "std")]
mod vm_memory_impl {
    use super::{PhysMemory, WordSpan};
    use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use vm_memory::bitmap::Bitmap;
    use vm_memory::guest_memory::GuestMemorySliceIterator;
    use vm_memory::{
        Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion,
        MemoryRegionAddress, Permissions, VolatileMemory,
    };

    /// Fast path for plain (non-IOMMU) memory: region lookup plus one atomic load, instead
    /// of vm-memory's slice iterator. Page-table walks are dominated by these loads.
    #[inline]
    fn load_direct<T: GuestMemory + ?Sized>(mem: &T, addr: u64) -> Option<u64> {
        let phys = mem.physical_memory()?;
        let region = phys.find_region(GuestAddress(addr))?;
        let offset = region.to_region_addr(GuestAddress(addr))?;
        if offset.raw_value().checked_add(8)? > region.len() {
            return None;
        }
        let host = region.get_host_address(offset).ok()?;
        if host as usize % 8 != 0 {
            return None;
        }
        // SAFETY: `host` points at 8 bytes inside the region's live host mapping (checked
        // against `region.len()` just above), which stays mapped while `mem` is borrowed
        // (vm-memory regions are immutable). It is 8-byte aligned (checked), so it is a
        // valid `AtomicU64`; the guest and other threads may access the same word
        // concurrently, which is why the load is atomic, exactly as vm-memory's own
        // `get_atomic_ref` does.
        let word = unsafe { AtomicU64::from_ptr(host.cast::<u64>()) };
        Some(word.load(Ordering::Relaxed))
    }

    /// Every vm-memory address space is a [`PhysMemory`]: loads and stores go through
    /// [`Bytes`] (so dirty bitmaps see table writes), compare-exchange through an atomic
    /// reference into the backing mapping.
    impl<T: GuestMemory + ?Sized> PhysMemory for T {
        /// The whole region holding `addr`, when it is plain memory (no IOMMU), has a host
        /// mapping and starts 8-byte aligned both in guest-physical and in host memory.
        #[inline]
        fn word_span(&self, addr: u64) -> Option<WordSpan<'_>> {
            let phys = self.physical_memory()?;
            let region = phys.find_region(GuestAddress(addr))?;
            let base = region.start_addr().raw_value();
            let host = region.get_host_address(MemoryRegionAddress(0)).ok()?;
            if base % 8 != 0 || host as usize % 8 != 0 {
                return None;
            }
            let len = usize::try_from(region.len() / 8).ok()?;
            // SAFETY: `host` is the start of the region's host mapping, `region.len()` bytes
            // long, so the `len` words lie inside it; it is 8-byte aligned (checked), which
            // is `AtomicU64`'s alignment. The mapping lives as long as the region, which
            // `self` owns immutably for the returned lifetime (vm-memory regions are never
            // unmapped while the collection is borrowed). The guest and other threads may
            // write these words concurrently: `AtomicU64` is made for shared mutation, and
            // the span's words are private with `WordSpan::load` (an atomic load, exactly as
            // `load_direct` and vm-memory's own `get_atomic_ref` do) as the only access, so
            // nothing writes through it, not even into a read-only mapping. The slice is at most the
            // mapping's size, hence below `isize::MAX` bytes.
            let words = unsafe { core::slice::from_raw_parts(host.cast::<AtomicU64>(), len) };
            WordSpan::new(base, words)
        }

        #[inline]
        fn read_u64(&self, addr: u64) -> Option<u64> {
            if addr & 7 != 0 {
                return None;
            }
            if let Some(v) = load_direct(self, addr) {
                return Some(v);
            }
            self.load::<u64>(GuestAddress(addr), Ordering::Relaxed).ok()
        }

        #[inline]
        fn read_u32(&self, addr: u64) -> Option<u32> {
            if addr & 3 != 0 {
                return None;
            }
            self.load::<u32>(GuestAddress(addr), Ordering::Relaxed).ok()
        }

        fn write_u64(&self, addr: u64, value: u64) -> Option<()> {
            if addr & 7 != 0 {
                return None;
            }
            self.store(value, GuestAddress(addr), Ordering::Release)
                .ok()
        }

        fn write_u32(&self, addr: u64, value: u32) -> Option<()> {
            if addr & 3 != 0 {
                return None;
            }
            self.store(value, GuestAddress(addr), Ordering::Release)
                .ok()
        }

        fn compare_exchange_u64(
            &self,
            addr: u64,
            current: u64,
            new: u64,
        ) -> Option<Result<u64, u64>> {
            if addr & 7 != 0 {
                return None;
            }
            let slice = self
                .get_slices(GuestAddress(addr), 8, Permissions::ReadWrite)
                .ok()?
                .stop_on_error()
                .ok()?
                .next()?;
            let word = slice.get_atomic_ref::<AtomicU64>(0).ok()?;
            let result = word.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire);
            if result.is_ok() {
                slice.bitmap().mark_dirty(0, 8);
            }
            Some(result)
        }

        /// A native 32-bit compare-exchange: a 32-bit guest's entry is not disturbed by
        /// writes to its neighbour.
        fn compare_exchange_u32(
            &self,
            addr: u64,
            current: u32,
            new: u32,
        ) -> Option<Result<u32, u32>> {
            if addr & 3 != 0 {
                return None;
            }
            let slice = self
                .get_slices(GuestAddress(addr), 4, Permissions::ReadWrite)
                .ok()?
                .stop_on_error()
                .ok()?
                .next()?;
            let word = slice.get_atomic_ref::<AtomicU32>(0).ok()?;
            let result = word.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire);
            if result.is_ok() {
                slice.bitmap().mark_dirty(0, 4);
            }
            Some(result)
        }

        fn zero_frame(&self, addr: u64) -> Option<()> {
            self.write_slice(&[0u8; 4096], GuestAddress(addr & !0xfff))
                .ok()
        }
    }
}

/// A flat physical memory: `len` bytes starting at `base`, stored as atomic words.
///
/// Needs no `std` and no mmap, which makes it the memory of choice for firmware, fuzzing
/// (page tables built straight from fuzz bytes) and micro-benchmarks.
#[derive(Debug)]
pub struct FlatMemory {
    base: u64,
    words: Vec<AtomicU64>,
    /// `WordSpan::table_limit` of the span over all of it, precomputed: handing out the
    /// span is then a few register moves per walk.
    table_limit: u64,
}

impl FlatMemory {
    /// Creates `len` bytes (rounded up to 8) of zeroed memory at physical address `base`.
    pub fn new(base: u64, len: usize) -> Self {
        let mut words = Vec::with_capacity(len.div_ceil(8));
        words.resize_with(len.div_ceil(8), || AtomicU64::new(0));
        Self::with_words(base, words)
    }

    fn with_words(base: u64, words: Vec<AtomicU64>) -> Self {
        let table_limit = WordSpan::table_limit_of(&words);
        FlatMemory {
            base,
            words,
            table_limit,
        }
    }

    /// Creates memory at `base` holding `bytes` (padded with zeroes to a multiple of 8).
    pub fn from_bytes(base: u64, bytes: &[u8]) -> Self {
        let words = bytes
            .chunks(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                AtomicU64::new(u64::from_le_bytes(word))
            })
            .collect();
        Self::with_words(base, words)
    }

    /// Physical address of the first byte.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    /// Whether the memory is empty.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    #[inline]
    fn word(&self, addr: u64) -> Option<&AtomicU64> {
        if addr & 7 != 0 {
            return None;
        }
        let index = addr.checked_sub(self.base)? / 8;
        self.words.get(usize::try_from(index).ok()?)
    }
}

impl PhysMemory for FlatMemory {
    /// All of the memory, when `base` is 8-byte aligned (otherwise words would straddle
    /// two addresses and the word-by-word path is used).
    #[inline(always)]
    fn word_span(&self, _addr: u64) -> Option<WordSpan<'_>> {
        if self.base & 7 != 0 {
            return None;
        }
        // `WordSpan::new` with the limit precomputed: the same fields from the same
        // words (the vector is never resized), so `load`'s bounds argument holds.
        Some(WordSpan {
            base: self.base,
            len_bytes: self.words.len() as u64 * 8,
            table_limit: self.table_limit,
            biased: self.words.as_ptr().wrapping_byte_sub(self.base as usize),
            words: PhantomData,
        })
    }

    #[inline]
    fn read_u64(&self, addr: u64) -> Option<u64> {
        self.word(addr).map(|w| w.load(Ordering::Relaxed))
    }

    #[inline]
    fn write_u64(&self, addr: u64, value: u64) -> Option<()> {
        self.word(addr).map(|w| w.store(value, Ordering::Release))
    }

    #[inline]
    fn compare_exchange_u64(&self, addr: u64, current: u64, new: u64) -> Option<Result<u64, u64>> {
        self.word(addr)
            .map(|w| w.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_spans_only_load_aligned_words_inside_them() {
        let words = [AtomicU64::new(1), AtomicU64::new(2)];
        assert!(WordSpan::new(0x1004, &words).is_none(), "unaligned base");
        let span = WordSpan::new(0x1000, &words).unwrap();
        assert_eq!((span.base(), span.len_bytes()), (0x1000, 16));
        assert_eq!(span.load(0x1000), Some(1));
        assert_eq!(span.load(0x1008), Some(2));
        assert_eq!(span.load(0x1004), None, "unaligned address");
        assert_eq!(span.load(0x1010), None, "past the end");
        assert_eq!(span.load(0xff8), None, "below the base");
        let mem = FlatMemory::new(0x2000, 0x1000);
        mem.write_u64(0x2010, 7).unwrap();
        assert_eq!(mem.word_span(0).unwrap().load(0x2010), Some(7));
    }

    #[cfg(feature = "std")]
    #[test]
    fn spans_are_send_and_sync_like_the_slice_they_borrow() {
        fn shareable<T: Send + Sync>(_: &T) {}
        let words = [AtomicU64::new(1)];
        let span = WordSpan::new(0, &words).unwrap();
        shareable(&span);
        let got = std::thread::scope(|s| s.spawn(|| span.load(0)).join().unwrap());
        assert_eq!(got, Some(1));
    }

    #[test]
    fn table_entries_load_only_from_tables_wholly_inside_the_span() {
        // 2 pages + 8 bytes at 0x1008: the table at 0x2000 is inside, 0x1000 starts
        // below the base, 0x3000 runs past the end.
        let words: Vec<AtomicU64> = (0..1025u64).map(AtomicU64::new).collect();
        let span = WordSpan::new(0x1008, &words).unwrap();
        assert_eq!(span.load_table_entry(0x2000, 0), Some(0x1ff));
        assert_eq!(span.load_table_entry(0x2000, 0xff8), Some(0x1ff + 511));
        // Low table bits and offset bits outside 11:3 are ignored, not added.
        assert_eq!(span.load_table_entry(0x2fff, 0x1_0008), Some(0x200));
        assert_eq!(
            span.load_table_entry(0x1000, 0x8),
            None,
            "starts below the base"
        );
        assert_eq!(span.load_table_entry(0x3000, 0), None, "runs past the end");
        assert_eq!(span.load_table_entry(u64::MAX, 0), None, "wraps around");
        let small = [AtomicU64::new(5)];
        let span = WordSpan::new(0, &small).unwrap();
        assert_eq!(span.load_table_entry(0, 0), None, "smaller than a table");
        assert_eq!(span.load(0), Some(5));
    }

    #[test]
    fn flat_memory_bounds_and_halves() {
        let mem = FlatMemory::new(0x1000, 0x1000);
        assert_eq!(mem.base(), 0x1000);
        assert_eq!(mem.len(), 0x1000);
        assert!(!mem.is_empty());
        assert_eq!(mem.read_u64(0xff8), None);
        assert_eq!(mem.read_u64(0x2000), None);
        assert_eq!(mem.read_u64(0x1001), None);
        mem.write_u64(0x1008, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(mem.read_u32(0x1008), Some(0x5566_7788));
        assert_eq!(mem.read_u32(0x100c), Some(0x1122_3344));
        mem.write_u32(0x100c, 0xaabb_ccdd).unwrap();
        assert_eq!(mem.read_u64(0x1008), Some(0xaabb_ccdd_5566_7788));
        assert_eq!(
            mem.compare_exchange_u32(0x1008, 1, 2),
            Some(Err(0x5566_7788))
        );
        assert_eq!(
            mem.compare_exchange_u32(0x1008, 0x5566_7788, 2),
            Some(Ok(0x5566_7788))
        );
        assert_eq!(mem.read_u64(0x1008), Some(0xaabb_ccdd_0000_0002));
        mem.zero_frame(0x1000).unwrap();
        assert_eq!(mem.read_u64(0x1008), Some(0));
        let from = FlatMemory::from_bytes(0, &[1, 2, 3]);
        assert_eq!(from.read_u64(0), Some(0x030201));
    }

    /// A neighbour that never stops changing: the other half of the word differs on every
    /// read, so every 8-byte compare-exchange fails.
    struct Hammered(core::sync::atomic::AtomicU64);

    impl PhysMemory for Hammered {
        fn read_u64(&self, _addr: u64) -> Option<u64> {
            Some(self.0.fetch_add(1 << 32, Ordering::Relaxed))
        }
        fn write_u64(&self, _addr: u64, _value: u64) -> Option<()> {
            Some(())
        }
        fn compare_exchange_u64(&self, _: u64, _: u64, _: u64) -> Option<Result<u64, u64>> {
            Some(Err(self.0.load(Ordering::Relaxed)))
        }
    }

    #[test]
    fn default_32_bit_compare_exchange_gives_up_against_a_hammered_neighbour() {
        let mem = Hammered(AtomicU64::new(5));
        // Our half stays 5; the other half changes forever: a lost race, not a hang.
        assert_eq!(mem.compare_exchange_u32(0, 5, 6), Some(Err(5)));
        assert_eq!(
            mem.0.load(Ordering::Relaxed) >> 32,
            u64::from(CAS_U32_RETRIES)
        );
    }

    #[test]
    fn guest_memory_impl() {
        use vm_memory::GuestMemoryMmap;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        let mem = &mem;
        assert_eq!(PhysMemory::read_u64(mem, 3), None);
        assert_eq!(PhysMemory::read_u32(mem, 3), None);
        assert_eq!(PhysMemory::write_u64(mem, 3, 0), None);
        assert_eq!(PhysMemory::write_u32(mem, 3, 0), None);
        assert_eq!(mem.compare_exchange_u64(3, 0, 0), None);
        assert_eq!(PhysMemory::read_u64(mem, 0x2000), None);
        PhysMemory::write_u64(mem, 0x1ff8, 5).unwrap();
        assert_eq!(mem.compare_exchange_u64(0x1ff8, 4, 6), Some(Err(5)));
        assert_eq!(mem.compare_exchange_u64(0x1ff8, 5, 6), Some(Ok(5)));
        assert_eq!(PhysMemory::read_u64(mem, 0x1ff8), Some(6));
        PhysMemory::write_u32(mem, 0x1ffc, 7).unwrap();
        assert_eq!(PhysMemory::read_u32(mem, 0x1ffc), Some(7));
        // A native 32-bit compare-exchange: only its half is compared and replaced.
        assert_eq!(mem.compare_exchange_u32(0x1ffe, 7, 8), None);
        assert_eq!(mem.compare_exchange_u32(0x1ffc, 6, 8), Some(Err(7)));
        assert_eq!(mem.compare_exchange_u32(0x1ffc, 7, 8), Some(Ok(7)));
        assert_eq!(PhysMemory::read_u64(mem, 0x1ff8), Some(8 << 32 | 6));
        assert_eq!(mem.compare_exchange_u32(0x2000, 0, 0), None);
        assert_eq!(mem.compare_exchange_u64(0x2000, 0, 0), None);
        mem.zero_frame(0x1000).unwrap();
        assert_eq!(PhysMemory::read_u64(mem, 0x1ff8), Some(0));
        assert_eq!(mem.zero_frame(0x2000), None);
    }
}
