//! A software TLB: cached translations keyed by (PCID, page), with the invalidation
//! semantics of INVLPG, INVPCID and MOV to CR3.
//!
//! # Model
//!
//! An entry caches what a successful walk learned about one page: its guest-physical base,
//! its size, the rights combined over all levels ([`Rights`]), whether the leaf was dirty and
//! whether it is global. Permissions are *not* cached as a yes/no answer: on every hit the
//! access is re-checked against the cached rights with the walker's current control
//! registers ([`Walker::check_rights`]), so toggling CR0.WP, SMAP or PKRU takes effect
//! without a flush, exactly as on hardware.
//!
//! Hardware rules this follows:
//! * A write through an entry whose leaf was clean goes back to the tables (the CPU must set
//!   D in memory), so such a hit is treated as a miss.
//! * A permission fault found on a hit is delivered from the cached rights and the entry is
//!   dropped, as the SDM says page faults invalidate the TLB entries for the faulting address.
//! * Like a hardware TLB it serves stale translations until the guest invalidates them: that
//!   is the architectural contract (an OS that loosens rights without a flush may take one
//!   spurious fault, which then drops the entry).
//! * Global entries match every PCID and survive flushes of non-global entries.
//!
//! Layout: one direct-mapped array per page size (4 KiB, 2 MiB, 4 MiB, 1 GiB), indexed by
//! the low bits of the page number (a mask, no hashing), so a lookup is one probe for a
//! 4 KiB page and at most four in all, with no allocation. A slot is 16 bytes, two words:
//!
//! * **tag**: the address bits above the page offset and the index bits (the slot's
//!   position supplies those), in place, ORed with the PCID in bits 15:0 and the
//!   generation of the entry in the bits just above (16 up to the top of the 4 KiB array's
//!   index bits, which every array's tag leaves zero: at least one bit, since that array
//!   has at least 32 slots) - equality of tags is equality of (page, PCID, generation),
//!   exactly;
//! * **value**: the page's guest-physical frame (bits 51:12), the rights R/W, U/S, XD and the
//!   leaf's Dirty bit in bits 3:0 (the index of a precomputed per-access verdict bitmap in
//!   the [`Walker`], so a hit is checked with one shift and one AND), Global in bit 4 and
//!   the protection key in bits 11:8. Bits 63:52 and 7:5 are always zero, so clearing the
//!   low 12 bits of the value leaves the frame.
//!
//! A hit is one 16-byte load, one tag compare (page, PCID and generation at once; the slow
//! path also accepts a global entry cached under another PCID) and the bitmap test;
//! everything else (a write through a clean entry, a fault, protection keys) leaves the
//! hit path. A full flush bumps the generation, which invalidates every slot in O(1); when
//! the generation field wraps (every `4K entries / 16 - 1` flushes) the arrays are cleared
//! for real, about 16 slot writes per flush amortised. INVLPG probes the one slot per page
//! size that can hold the address.
//!
//! ```
//! use vmkit_paging::tlb::Tlb;
//! # use vmkit_paging::{builder::*, walk::*, FlatMemory, GuestAddress};
//! # let mem = FlatMemory::new(0, 1 << 20);
//! # let mut b = PageTableBuilder::new(&mem, PagingFormat::Level4,
//! #     BumpAllocator::new(GuestAddress(0x1000), GuestAddress(0x10000))).unwrap();
//! # b.map(0x40_0000, GuestAddress(0x8000), 0x1000, MapFlags::WRITABLE).unwrap();
//! let walker = Walker::new(PagingConfig::new(PagingMode::Level4, b.root().0));
//! let mut tlb = Tlb::new(256);
//! let miss = tlb.translate(&walker, &mem, 0, 0x40_0010, Access::supervisor_read()).unwrap();
//! let hit = tlb.translate(&walker, &mem, 0, 0x40_0020, Access::supervisor_read()).unwrap();
//! assert!(!miss.hit && hit.hit && hit.gpa == 0x8020);
//! tlb.invlpg(0, 0x40_0000);
//! assert!(!tlb.translate(&walker, &mem, 0, 0x40_0020, Access::supervisor_read()).unwrap().hit);
//! ```

use alloc::vec;
use alloc::vec::Vec;

use crate::builder::PageSize;
use crate::entry::bits;
use crate::memory::PhysMemory;
use crate::walk::{
    Access, Fault, FaultReason, PageFault, PfErrorCode, Rights, TableAccess, Translation, Walker,
};

const SIZES: [PageSize; 4] = [
    PageSize::Size4K,
    PageSize::Size2M,
    PageSize::Size4M,
    PageSize::Size1G,
];

const SHIFTS: [u32; 4] = [12, 21, 22, 30];

// Value word of a slot. Bits 3:0 are the walker's fast rights index (R/W, U/S, XD, dirty).
const V_WRITABLE: u64 = 1 << 0;
const V_USER: u64 = 1 << 1;
const V_NX: u64 = 1 << 2;
const V_DIRTY: u64 = 1 << 3;
const V_GLOBAL: u64 = 1 << 4;
const V_PKEY_SHIFT: u32 = 8;
const V_FRAME: u64 = bits(51, 12);
/// Lowest bit of the generation field of the tag word (just above the PCID).
const GEN_SHIFT: u32 = 16;
/// PCID field of the tag word.
const TAG_PCID: u64 = 0xffff;

/// 16 bytes: a tag word and a value word (layout in the module docs).
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(16))]
struct Slot {
    tag: u64,
    val: u64,
}

impl Slot {
    #[inline]
    fn pcid(&self) -> u16 {
        (self.tag & TAG_PCID) as u16
    }
    #[inline]
    fn global(&self) -> bool {
        self.val & V_GLOBAL != 0
    }
    #[inline]
    fn base(&self) -> u64 {
        self.val & V_FRAME
    }
    #[inline]
    fn rights(&self) -> Rights {
        Rights {
            writable: self.val & V_WRITABLE != 0,
            user: self.val & V_USER != 0,
            no_execute: self.val & V_NX != 0,
            pkey: ((self.val >> V_PKEY_SHIFT) & 15) as u8,
        }
    }
    /// Whether the slot holds `tag` (page, PCID and current generation; any PCID for a
    /// global entry). Branch-free.
    #[inline(always)]
    fn matches(&self, tag: u64) -> bool {
        let ignore = if self.global() { TAG_PCID } else { 0 };
        (self.tag ^ tag) & !ignore == 0
    }
    /// Whether the slot is of the generation in `gen_field` (the tag's generation bits).
    #[inline]
    fn live(&self, gen_field: u64, gen_bits: u64) -> bool {
        self.tag & gen_field == gen_bits
    }
    /// Moves the slot to generation 0, which never matches.
    #[inline]
    fn invalidate(&mut self, gen_field: u64) {
        self.tag &= !gen_field;
    }
}

/// One direct-mapped array (one page size).
#[derive(Debug, Clone)]
struct Way {
    /// A power of two long.
    slots: Vec<Slot>,
    /// `slots.len() - 1`.
    mask: usize,
    /// The address bits above the page offset and the index bits (page shift plus log2 of
    /// the length, always at least 16): kept in place in the tag, whose low 16 bits
    /// (always zero in `addr & tag_mask`) hold the PCID.
    tag_mask: u64,
}

impl Way {
    fn new(len: usize, class: usize) -> Self {
        Way {
            slots: vec![Slot::default(); len],
            mask: len - 1,
            tag_mask: u64::MAX
                .checked_shl(SHIFTS[class] + len.trailing_zeros())
                .unwrap_or(0),
        }
    }

    /// The slot index and tag of `addr`; `low` is the PCID ORed with the generation bits.
    #[inline(always)]
    fn locate(&self, class: usize, low: u64, addr: u64) -> (usize, u64) {
        // Truncating the page number is harmless: only the bits under `mask` are used.
        let index = (addr >> SHIFTS[class]) as usize & self.mask;
        let tag = (addr & self.tag_mask) | low;
        (index, tag)
    }
}

/// Result of a cached translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlbTranslation {
    /// Guest-physical address.
    pub gpa: u64,
    /// Size of the page.
    pub page_size: PageSize,
    /// Served from the TLB (no table access).
    pub hit: bool,
}

/// Hit/miss counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TlbStats {
    /// Lookups answered from the TLB.
    pub hits: u64,
    /// Lookups that walked the tables.
    pub misses: u64,
}

/// The largest number of 4 KiB entries [`Tlb::new`] allocates (2^24: 256 MiB of slots).
pub const MAX_ENTRIES: usize = 1 << 24;

/// A software TLB.
#[derive(Debug, Clone)]
pub struct Tlb {
    /// One array per page size.
    ways: [Way; 4],
    /// The current generation (1..=`gen_max`), shifted into its place in the tag word.
    gen_bits: u64,
    /// The largest generation: the field spans bits 16 up to the 4 KiB array's index bits.
    gen_max: u64,
    /// Whether any large entry of that size was inserted since the last full flush (skips
    /// probes of empty arrays; the 4 KiB array is always probed).
    populated: [bool; 4],
    stats: TlbStats,
}

impl Tlb {
    /// A TLB with `entries_4k` 4 KiB entries (rounded up to a power of two, at least 32 and
    /// at most [`MAX_ENTRIES`]) and a quarter as many for each large size.
    pub fn new(entries_4k: usize) -> Self {
        let small = entries_4k.clamp(32, MAX_ENTRIES).next_power_of_two();
        let large = (small / 4).max(4);
        Tlb {
            ways: [
                Way::new(small, 0),
                Way::new(large, 1),
                Way::new(large, 2),
                Way::new(large, 3),
            ],
            gen_bits: 1 << GEN_SHIFT,
            // Index bits of the 4 KiB array end at bit 12 + log2(small), which is >= 17.
            gen_max: (1 << (12 + small.trailing_zeros() - GEN_SHIFT)) - 1,
            populated: [false; 4],
            stats: TlbStats::default(),
        }
    }

    /// Hit/miss counters since creation.
    pub fn stats(&self) -> TlbStats {
        self.stats
    }

    /// The generation field of the tag word.
    #[inline]
    fn gen_field(&self) -> u64 {
        self.gen_max << GEN_SHIFT
    }

    /// The low bits of every tag looked up or inserted now: `pcid` and the generation.
    #[inline(always)]
    fn tag_low(&self, pcid: u16) -> u64 {
        u64::from(pcid) | self.gen_bits
    }

    /// Probes the slot of size class `class` for `addr` in `pcid`: (index, slot).
    #[inline(always)]
    fn probe(&self, class: usize, pcid: u16, addr: u64) -> Option<(usize, Slot)> {
        let way = &self.ways[class];
        let (index, tag) = way.locate(class, self.tag_low(pcid), addr);
        let slot = *way.slots.get(index)?;
        if slot.matches(tag) {
            Some((index, slot))
        } else {
            None
        }
    }

    /// Finds the entry for `addr` in `pcid`: (size class, index, slot).
    fn find(&self, pcid: u16, addr: u64) -> Option<(usize, usize, Slot)> {
        (0..4).find_map(|class| {
            if class > 0 && !self.populated[class] {
                return None;
            }
            let (index, slot) = self.probe(class, pcid, addr)?;
            Some((class, index, slot))
        })
    }

    /// The hot half of [`translate`](Self::translate), for callers that only need the
    /// guest-physical address: `Some(gpa)` when the access is answered from a 4 KiB entry
    /// cached under `pcid` whose rights allow it outright (counted as a hit); `None` means
    /// "call [`translate`](Self::translate)", which handles everything else - misses, large
    /// pages, global entries cached under another PCID, writes through clean entries,
    /// faults and protection keys - and never disagrees with this answer.
    ///
    /// It returns in registers and does one 16-byte load, one tag compare (page, PCID and
    /// generation) and one bitmap test.
    #[inline(always)]
    pub fn fast_translate(
        &mut self,
        walker: &Walker,
        pcid: u16,
        addr: u64,
        access: Access,
    ) -> Option<u64> {
        let way = &self.ways[0];
        let (index, tag) = way.locate(0, self.tag_low(pcid), addr);
        let slot = way.slots.get(index)?;
        // The exact tag only: a global entry cached under another PCID is left to the
        // slow path (which re-tags it).
        if slot.tag == tag && walker.fast_allowed(access, slot.val) {
            self.stats.hits += 1;
            // Bits 63:52 of a value word are always clear and 11:0 hold only attributes,
            // so clearing the low 12 bits leaves the frame (one AND with a short immediate
            // instead of the 52-bit frame mask).
            return Some((slot.val & !0xfff) | (addr & 0xfff));
        }
        None
    }

    /// The cached translation of `addr` in `pcid`, without permission checks.
    pub fn lookup(&self, pcid: u16, addr: u64) -> Option<(u64, PageSize, Rights)> {
        let (class, _, slot) = self.find(pcid, addr)?;
        let size = SIZES[class];
        Some((
            slot.base() | (addr & (size.bytes() - 1)),
            size,
            slot.rights(),
        ))
    }

    /// Caches a successful walk of `addr` in `pcid` by `walker`; the entry is global when
    /// the leaf's G bit is set and `walker`'s configuration has CR4.PGE.
    ///
    /// Page bases are 4 KiB aligned and below 2^52 on x86; other bits of `t.page_base()`
    /// are not stored.
    pub fn insert(&mut self, walker: &Walker, pcid: u16, addr: u64, t: &Translation) {
        let class = SIZES.iter().position(|s| *s == t.page_size()).unwrap_or(0);
        let mut val = (t.page_base() & V_FRAME) | u64::from(t.rights().pkey & 15) << V_PKEY_SHIFT;
        for (on, bit) in [
            (t.global() && walker.config().pge, V_GLOBAL),
            (t.dirty(), V_DIRTY),
            (t.rights().writable, V_WRITABLE),
            (t.rights().user, V_USER),
            (t.rights().no_execute, V_NX),
        ] {
            if on {
                val |= bit;
            }
        }
        debug_assert_eq!(val & !(V_FRAME | 0xf1f), 0, "value word layout");
        let low = self.tag_low(pcid);
        let way = &mut self.ways[class];
        let (index, tag) = way.locate(class, low, addr);
        if let Some(slot) = way.slots.get_mut(index) {
            *slot = Slot { tag, val };
        }
        self.populated[class] = true;
    }

    /// Translates through the TLB, walking (and caching the result) on a miss.
    #[inline]
    pub fn translate<M: PhysMemory + ?Sized>(
        &mut self,
        walker: &Walker,
        mem: &M,
        pcid: u16,
        addr: u64,
        access: Access,
    ) -> Result<TlbTranslation, Fault> {
        match self.fast_translate(walker, pcid, addr, access) {
            Some(gpa) => Ok(TlbTranslation {
                gpa,
                page_size: PageSize::Size4K,
                hit: true,
            }),
            None => self.translate_slow(walker, pcid, addr, access, |w, a, acc| {
                w.translate(mem, a, acc)
            }),
        }
    }

    /// [`translate`](Self::translate) with an arbitrary [`TableAccess`].
    #[inline]
    pub fn translate_with<T: TableAccess + ?Sized>(
        &mut self,
        walker: &Walker,
        tables: &mut T,
        pcid: u16,
        addr: u64,
        access: Access,
    ) -> Result<TlbTranslation, Fault> {
        match self.fast_translate(walker, pcid, addr, access) {
            Some(gpa) => Ok(TlbTranslation {
                gpa,
                page_size: PageSize::Size4K,
                hit: true,
            }),
            None => self.translate_slow(walker, pcid, addr, access, |w, a, acc| {
                w.translate_with(tables, a, acc)
            }),
        }
    }

    /// Everything but the hot path: hits on large pages or on global entries cached under
    /// another PCID, hits the verdict bitmap cannot settle (a write through a clean entry -
    /// the CPU walks to set D, so that is a miss -, a permission fault, protection keys),
    /// and misses, which `walk` resolves.
    #[inline(never)]
    fn translate_slow(
        &mut self,
        walker: &Walker,
        pcid: u16,
        addr: u64,
        access: Access,
        walk: impl FnOnce(&Walker, u64, Access) -> Result<Translation, Fault>,
    ) -> Result<TlbTranslation, Fault> {
        if let Some((class, index, slot)) = self.find(pcid, addr) {
            if !access.is_write() || slot.val & V_DIRTY != 0 {
                self.stats.hits += 1;
                if slot.global() && slot.pcid() != pcid {
                    // A global entry matches every PCID, and its PCID field is never looked
                    // at otherwise: re-tag it so the next access from `pcid` is a fast hit.
                    if let Some(s) = self.ways[class].slots.get_mut(index) {
                        s.tag = (s.tag & !TAG_PCID) | u64::from(pcid);
                    }
                }
                let size = SIZES[class];
                return match walker.check_rights(slot.rights(), access) {
                    Ok(()) => Ok(TlbTranslation {
                        gpa: slot.base() | (addr & (size.bytes() - 1)),
                        page_size: size,
                        hit: true,
                    }),
                    Err(code) => {
                        // The fault invalidates the entry (SDM 4.10.4.1).
                        let gen_field = self.gen_field();
                        if let Some(s) = self.ways[class].slots.get_mut(index) {
                            s.invalidate(gen_field);
                        }
                        let reason = if code.contains(PfErrorCode::PK) {
                            FaultReason::ProtectionKey {
                                pkey: slot.rights().pkey,
                            }
                        } else {
                            FaultReason::Protection
                        };
                        Err(Fault::PageFault(PageFault {
                            addr,
                            error_code: code,
                            reason,
                        }))
                    }
                };
            }
        }
        self.stats.misses += 1;
        let t = walk(walker, addr, access)?;
        self.insert(walker, pcid, addr, &t);
        Ok(TlbTranslation {
            gpa: t.gpa,
            page_size: t.page_size(),
            hit: false,
        })
    }

    /// Invalidates every live slot for which `drop` says so.
    fn invalidate_where(&mut self, mut drop: impl FnMut(&Slot) -> bool) {
        let (gen_field, gen_bits) = (self.gen_field(), self.gen_bits);
        for way in self.ways.iter_mut() {
            for slot in way.slots.iter_mut() {
                if slot.live(gen_field, gen_bits) && drop(slot) {
                    slot.invalidate(gen_field);
                }
            }
        }
    }

    /// Invalidates the entries (any size) that map the page containing `addr` and for which
    /// `drop` says so: one probe per page size, since each page has exactly one slot.
    fn invalidate_page(&mut self, pcid: u16, addr: u64, drop: impl Fn(&Slot) -> bool) {
        let (gen_field, low) = (self.gen_field(), self.tag_low(pcid));
        for (class, way) in self.ways.iter_mut().enumerate() {
            let (index, tag) = way.locate(class, low, addr);
            if let Some(slot) = way.slots.get_mut(index) {
                // Same page and generation (the tag compare covers both), any PCID.
                if (slot.tag ^ tag) & !TAG_PCID == 0 && drop(slot) {
                    slot.invalidate(gen_field);
                }
            }
        }
    }

    /// INVLPG executed in `pcid`: drops the entries for the page containing `addr` (any
    /// size) of that PCID, and global entries for it.
    pub fn invlpg(&mut self, pcid: u16, addr: u64) {
        self.invalidate_page(pcid, addr, |s| s.global() || s.pcid() == pcid);
    }

    /// INVPCID type 0 (individual address): drops non-global entries for `addr` in `pcid`.
    pub fn invpcid_address(&mut self, pcid: u16, addr: u64) {
        self.invalidate_page(pcid, addr, |s| !s.global() && s.pcid() == pcid);
    }

    /// INVPCID type 1 (single context): drops all non-global entries of `pcid`.
    pub fn invpcid_single(&mut self, pcid: u16) {
        self.invalidate_where(|s| !s.global() && s.pcid() == pcid);
    }

    /// INVPCID type 3 (all contexts, retaining globals).
    pub fn flush_non_global(&mut self) {
        self.invalidate_where(|s| !s.global());
    }

    /// INVPCID type 2 / CR4.PGE toggle: drops everything, in O(1) (amortised: when the
    /// generation field wraps, every `4K entries / 16 - 1` flushes, the arrays are cleared).
    pub fn flush_all(&mut self) {
        let next = (self.gen_bits >> GEN_SHIFT) + 1;
        if next > self.gen_max {
            // Clear for real so no stale slot can match a reused generation.
            for way in self.ways.iter_mut() {
                way.slots.fill(Slot::default());
            }
            self.gen_bits = 1 << GEN_SHIFT;
        } else {
            self.gen_bits = next << GEN_SHIFT;
        }
        self.populated = [false; 4];
    }

    /// MOV to CR3 switching to `pcid`: unless `no_flush` (CR3 bit 63 with CR4.PCIDE) the
    /// non-global entries of `pcid` are dropped. Without PCIDs use PCID 0.
    pub fn mov_cr3(&mut self, pcid: u16, no_flush: bool) {
        if !no_flush {
            self.invpcid_single(pcid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{BumpAllocator, MapFlags, PageTableBuilder, PagingFormat};
    use crate::memory::{FlatMemory, GuestAddress};
    use crate::walk::{PagingConfig, PagingMode};

    fn setup() -> (FlatMemory, Walker) {
        let mem = FlatMemory::new(0, 1 << 20);
        let mut b = PageTableBuilder::new(
            &mem,
            PagingFormat::Level4,
            BumpAllocator::new(GuestAddress(0x1000), GuestAddress(0x20000)),
        )
        .unwrap();
        b.set_max_page_size(PageSize::Size1G);
        b.map(
            0x40_0000,
            GuestAddress(0x8000),
            0x2000,
            MapFlags::WRITABLE | MapFlags::USER,
        )
        .unwrap();
        b.map(
            0x60_0000,
            GuestAddress(0x20_0000),
            1 << 21,
            MapFlags::GLOBAL,
        )
        .unwrap();
        b.map(1 << 30, GuestAddress(1 << 30), 1 << 30, MapFlags::USER)
            .unwrap();
        let walker = Walker::new(PagingConfig::new(PagingMode::Level4, b.root().0));
        (mem, walker)
    }

    #[test]
    fn hits_misses_and_sizes() {
        let (mem, w) = setup();
        let mut tlb = Tlb::new(64);
        let r = Access::supervisor_read();
        for (addr, size) in [
            (0x40_0010, PageSize::Size4K),
            (0x60_1234, PageSize::Size2M),
            (0x4000_1234, PageSize::Size1G),
        ] {
            let a = tlb.translate(&w, &mem, 1, addr, r).unwrap();
            let b = tlb.translate(&w, &mem, 1, addr + 8, r).unwrap();
            assert!(!a.hit && b.hit);
            assert_eq!(b.page_size, size);
            assert_eq!(b.gpa, a.gpa + 8);
        }
        assert_eq!(tlb.stats(), TlbStats { hits: 3, misses: 3 });
        assert_eq!(tlb.lookup(1, 0x40_0fff).map(|l| l.0), Some(0x8fff));
        assert_eq!(tlb.lookup(2, 0x40_0fff), None);
        // Global entries match any PCID.
        assert!(tlb.lookup(7, 0x60_0000).is_some());
    }

    #[test]
    fn writes_through_clean_entries_walk_again() {
        let (mem, w) = setup();
        let mut tlb = Tlb::new(64);
        assert!(
            !tlb.translate(&w, &mem, 0, 0x40_0000, Access::user_read())
                .unwrap()
                .hit
        );
        // Clean entry: the write must walk to set D.
        assert!(
            !tlb.translate(&w, &mem, 0, 0x40_0000, Access::user_write())
                .unwrap()
                .hit
        );
        assert!(
            tlb.translate(&w, &mem, 0, 0x40_0000, Access::user_write())
                .unwrap()
                .hit
        );
    }

    #[test]
    fn permission_checked_on_hit_with_current_registers() {
        let (mem, w) = setup();
        let mut tlb = Tlb::new(64);
        tlb.translate(&w, &mem, 0, 0x40_0000, Access::supervisor_read())
            .unwrap();
        // Same walker config: user read allowed from cache.
        assert!(
            tlb.translate(&w, &mem, 0, 0x40_0000, Access::user_read())
                .unwrap()
                .hit
        );
        // Turn SMAP on: the cached user page now faults for the supervisor, from the cache,
        // and the entry is dropped.
        let mut cfg = *w.config();
        cfg.smap = true;
        let smap = Walker::new(cfg);
        let f = tlb
            .translate(&smap, &mem, 0, 0x40_0000, Access::supervisor_read())
            .unwrap_err();
        assert_eq!(f.error_code().unwrap().bits(), PfErrorCode::PRESENT);
        assert_eq!(tlb.lookup(0, 0x40_0000), None);
        // A protection-key fault on a hit reports PK.
        tlb.translate(&w, &mem, 0, 0x40_0000, Access::user_read())
            .unwrap();
        let mut cfg = *w.config();
        cfg.pke = true;
        cfg.pkru = 1;
        let f = tlb
            .translate(&Walker::new(cfg), &mem, 0, 0x40_0000, Access::user_read())
            .unwrap_err();
        assert_eq!(
            f.page_fault().unwrap().reason,
            FaultReason::ProtectionKey { pkey: 0 }
        );
        // Faulting walks are not cached.
        assert!(tlb
            .translate(&w, &mem, 0, 0x9000_0000, Access::user_read())
            .is_err());
        assert_eq!(tlb.lookup(0, 0x9000_0000), None);
    }

    #[test]
    fn invalidation_semantics() {
        let (mem, w) = setup();
        let mut tlb = Tlb::new(64);
        let r = Access::supervisor_read();
        let fill = |tlb: &mut Tlb| {
            for pcid in [1, 2] {
                for addr in [0x40_0000, 0x40_1000, 0x60_0000, 0x4000_0000] {
                    tlb.translate(&w, &mem, pcid, addr, r).unwrap();
                }
            }
        };
        fill(&mut tlb);
        // Direct-mapped: the second PCID's entry for the same page replaced the first one,
        // except the global 2 MiB entry which both share.
        assert!(tlb.lookup(2, 0x40_0000).is_some());

        tlb.invlpg(2, 0x40_0abc);
        assert!(tlb.lookup(2, 0x40_0000).is_none());
        assert!(tlb.lookup(2, 0x40_1000).is_some());
        // INVLPG anywhere in a large page drops it; global entries too.
        tlb.invlpg(2, 0x7f_f000);
        assert!(tlb.lookup(1, 0x60_0000).is_none());

        fill(&mut tlb);
        tlb.invpcid_address(2, 0x60_0000);
        assert!(tlb.lookup(2, 0x60_0000).is_some(), "globals survive type 0");
        tlb.invpcid_address(2, 0x40_1000);
        assert!(tlb.lookup(2, 0x40_1000).is_none());
        tlb.invpcid_address(1, 0x4000_0000);
        assert!(tlb.lookup(2, 0x4000_0000).is_some(), "other PCID untouched");

        tlb.invpcid_single(2);
        assert!(tlb.lookup(2, 0x4000_0000).is_none());
        assert!(tlb.lookup(2, 0x60_0000).is_some());

        fill(&mut tlb);
        tlb.mov_cr3(2, true);
        assert!(tlb.lookup(2, 0x4000_0000).is_some());
        tlb.mov_cr3(2, false);
        assert!(tlb.lookup(2, 0x4000_0000).is_none());
        assert!(tlb.lookup(2, 0x60_0000).is_some());

        fill(&mut tlb);
        tlb.flush_non_global();
        assert!(tlb.lookup(2, 0x40_1000).is_none());
        assert!(tlb.lookup(2, 0x60_0000).is_some());
        tlb.flush_all();
        assert!(tlb.lookup(2, 0x60_0000).is_none());
        // Generation wrap clears for real.
        fill(&mut tlb);
        tlb.gen_bits = tlb.gen_field();
        tlb.flush_all();
        assert_eq!(tlb.gen_bits, 1 << GEN_SHIFT);
        assert!(tlb.lookup(2, 0x40_1000).is_none());
    }

    #[test]
    fn generations_hide_flushed_entries_across_wraps() {
        let (mem, walker) = setup();
        let mut tlb = Tlb::new(4096);
        assert_eq!(tlb.gen_max, 255);
        let read = Access::user_read();
        // A is cached once and never again; B is refilled after every flush.
        tlb.translate(&walker, &mem, 1, 0x40_1000, read).unwrap();
        for round in 0..600 {
            tlb.translate(&walker, &mem, 1, 0x40_0000, read).unwrap();
            assert!(tlb.lookup(1, 0x40_0000).is_some(), "round {round}");
            assert_eq!(
                tlb.lookup(1, 0x40_1000).is_some(),
                round == 0,
                "round {round}"
            );
            tlb.flush_all();
            assert!(tlb.lookup(1, 0x40_0000).is_none(), "round {round}");
            // INVLPG of a flushed entry changes nothing; a walk refills it.
            tlb.invlpg(1, 0x40_0000);
            let miss = tlb.translate(&walker, &mem, 1, 0x40_0008, read).unwrap();
            let hit = tlb.translate(&walker, &mem, 1, 0x40_0010, read).unwrap();
            assert!(!miss.hit && hit.hit && hit.gpa == 0x8010, "round {round}");
            tlb.flush_all();
        }
        // The smallest TLB has one generation: every flush clears.
        let mut small = Tlb::new(1);
        assert_eq!((small.ways[0].slots.len(), small.gen_max), (32, 1));
        small.translate(&walker, &mem, 1, 0x40_0000, read).unwrap();
        small.flush_all();
        assert!(small.lookup(1, 0x40_0000).is_none());
    }
}
