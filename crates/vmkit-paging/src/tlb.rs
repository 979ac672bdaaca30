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
//! the page number, so a lookup is one to four probes with no allocation. A full flush is
//! O(1): entries carry a generation number and a flush bumps the current one.
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

const F_GLOBAL: u8 = 1;
const F_DIRTY: u8 = 2;
const F_WRITABLE: u8 = 4;
const F_USER: u8 = 8;
const F_NX: u8 = 16;

/// 24 bytes: small slots keep the arrays cache-friendly.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Page number (address >> size shift).
    vpn: u64,
    /// Guest-physical base of the page.
    base: u64,
    /// Valid only when equal to the TLB's generation.
    generation: u32,
    pcid: u16,
    flags: u8,
    pkey: u8,
}

impl Slot {
    #[inline]
    fn global(&self) -> bool {
        self.flags & F_GLOBAL != 0
    }
    #[inline]
    fn rights(&self) -> Rights {
        Rights {
            writable: self.flags & F_WRITABLE != 0,
            user: self.flags & F_USER != 0,
            no_execute: self.flags & F_NX != 0,
            pkey: self.pkey,
        }
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

/// A software TLB.
#[derive(Debug, Clone)]
pub struct Tlb {
    /// One array per page size, each a power of two long.
    arrays: [Vec<Slot>; 4],
    generation: u32,
    /// Whether any entry of that size was ever inserted since the last full flush (skips
    /// probes of empty arrays).
    populated: [bool; 4],
    stats: TlbStats,
}

impl Tlb {
    /// A TLB with `entries_4k` 4 KiB entries (rounded up to a power of two, at least 16) and
    /// a quarter as many for each large size.
    pub fn new(entries_4k: usize) -> Self {
        let small = entries_4k.max(16).next_power_of_two();
        let large = (small / 4).max(4);
        Tlb {
            arrays: [
                vec![Slot::default(); small],
                vec![Slot::default(); large],
                vec![Slot::default(); large],
                vec![Slot::default(); large],
            ],
            generation: 1,
            populated: [false; 4],
            stats: TlbStats::default(),
        }
    }

    /// Hit/miss counters since creation.
    pub fn stats(&self) -> TlbStats {
        self.stats
    }

    #[inline]
    fn shift(class: usize) -> u32 {
        SHIFTS[class & 3]
    }

    #[inline]
    fn index(&self, class: usize, vpn: u64) -> usize {
        // Mix the upper bits so that aliases 4 GiB apart do not collide.
        let h = vpn ^ (vpn >> 17) ^ (vpn >> 31);
        (h as usize) & (self.arrays[class].len() - 1)
    }

    #[inline]
    fn matches(&self, slot: &Slot, pcid: u16, vpn: u64) -> bool {
        slot.generation == self.generation
            && slot.vpn == vpn
            && (slot.global() || slot.pcid == pcid)
    }

    /// Finds the entry for `addr` in `pcid`: (size class, index).
    #[inline]
    fn find(&self, pcid: u16, addr: u64) -> Option<(usize, usize)> {
        for class in 0..4 {
            if !self.populated[class] {
                continue;
            }
            let vpn = addr >> Self::shift(class);
            let i = self.index(class, vpn);
            if self.matches(&self.arrays[class][i], pcid, vpn) {
                return Some((class, i));
            }
        }
        None
    }

    /// The cached translation of `addr` in `pcid`, without permission checks.
    pub fn lookup(&self, pcid: u16, addr: u64) -> Option<(u64, PageSize, Rights)> {
        let (class, i) = self.find(pcid, addr)?;
        let slot = &self.arrays[class][i];
        let size = SIZES[class];
        Some((slot.base | (addr & (size.bytes() - 1)), size, slot.rights()))
    }

    /// Caches a successful walk of `addr` in `pcid`.
    pub fn insert(&mut self, pcid: u16, addr: u64, t: &Translation) {
        let class = SIZES.iter().position(|s| *s == t.page_size).unwrap_or(0);
        let vpn = addr >> Self::shift(class);
        let i = self.index(class, vpn);
        let mut flags = 0;
        for (on, bit) in [
            (t.global, F_GLOBAL),
            (t.dirty, F_DIRTY),
            (t.rights.writable, F_WRITABLE),
            (t.rights.user, F_USER),
            (t.rights.no_execute, F_NX),
        ] {
            if on {
                flags |= bit;
            }
        }
        self.arrays[class][i] = Slot {
            vpn,
            base: t.page_base,
            generation: self.generation,
            pcid,
            flags,
            pkey: t.rights.pkey,
        };
        self.populated[class] = true;
    }

    /// Translates through the TLB, walking (and caching the result) on a miss.
    pub fn translate<M: PhysMemory + ?Sized>(
        &mut self,
        walker: &Walker,
        mem: &M,
        pcid: u16,
        addr: u64,
        access: Access,
    ) -> Result<TlbTranslation, Fault> {
        self.translate_with(
            walker,
            &mut crate::walk::DirectTables(mem),
            pcid,
            addr,
            access,
        )
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
        if let Some((class, i)) = self.find(pcid, addr) {
            let slot = self.arrays[class][i];
            if !access.is_write() || slot.flags & F_DIRTY != 0 {
                self.stats.hits += 1;
                return match walker.check_rights(slot.rights(), access) {
                    Ok(()) => {
                        let size = SIZES[class];
                        Ok(TlbTranslation {
                            gpa: slot.base | (addr & (size.bytes() - 1)),
                            page_size: size,
                            hit: true,
                        })
                    }
                    Err(code) => {
                        // The fault invalidates the entry (SDM 4.10.4.1).
                        self.arrays[class][i].generation = 0;
                        let reason = if code.contains(PfErrorCode::PK) {
                            FaultReason::ProtectionKey { pkey: slot.pkey }
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
        let t = walker.translate_with(tables, addr, access)?;
        self.insert(pcid, addr, &t);
        Ok(TlbTranslation {
            gpa: t.gpa,
            page_size: t.page_size,
            hit: false,
        })
    }

    fn retain(&mut self, mut keep: impl FnMut(&Slot, u32) -> bool) {
        let generation = self.generation;
        for (class, array) in self.arrays.iter_mut().enumerate() {
            let shift = Self::shift(class);
            for slot in array.iter_mut() {
                if slot.generation == generation && !keep(slot, shift) {
                    slot.generation = 0;
                }
            }
        }
    }

    fn covers(slot: &Slot, shift: u32, addr: u64) -> bool {
        slot.vpn == addr >> shift
    }

    /// INVLPG executed in `pcid`: drops the entries for the page containing `addr` (any
    /// size) of that PCID, and global entries for it.
    pub fn invlpg(&mut self, pcid: u16, addr: u64) {
        self.retain(|s, shift| !(Self::covers(s, shift, addr) && (s.global() || s.pcid == pcid)));
    }

    /// INVPCID type 0 (individual address): drops non-global entries for `addr` in `pcid`.
    pub fn invpcid_address(&mut self, pcid: u16, addr: u64) {
        self.retain(|s, shift| !(Self::covers(s, shift, addr) && !s.global() && s.pcid == pcid));
    }

    /// INVPCID type 1 (single context): drops all non-global entries of `pcid`.
    pub fn invpcid_single(&mut self, pcid: u16) {
        self.retain(|s, _| s.global() || s.pcid != pcid);
    }

    /// INVPCID type 3 (all contexts, retaining globals).
    pub fn flush_non_global(&mut self) {
        self.retain(|s, _| s.global());
    }

    /// INVPCID type 2 / CR4.PGE toggle: drops everything, in O(1).
    pub fn flush_all(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            // After 2^32 flushes, clear for real so no stale slot can match again.
            for array in self.arrays.iter_mut() {
                array.fill(Slot::default());
            }
            self.generation = 1;
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
        tlb.generation = u32::MAX;
        tlb.flush_all();
        assert_eq!(tlb.generation, 1);
        assert!(tlb.lookup(2, 0x40_1000).is_none());
    }
}
