//! The two-dimensional walk: guest-virtual -> guest-physical -> host-physical, the way a CPU
//! with EPT (or AMD NPT) translates for a guest.
//!
//! # Model
//!
//! The guest walker ([`Walker`]) runs unchanged, but every guest paging-structure entry it
//! reads or updates is itself a guest-physical address, so it first goes through EPT
//! ([`EptWalker`]) - as a paging-structure access (exit-qualification bit 8 clear; with EPT
//! A/D on it counts as a write) - and only then is read from host memory. The final
//! guest-physical address is translated last, as an access to the final page with the
//! guest access's kind and the linear address's user/supervisor mode (for MBEC).
//!
//! Faults are attributed the way the CPU attributes them ([`NestedFault`]):
//! * a guest page fault (or #GP for a non-canonical address) goes to the guest;
//! * an EPT violation or misconfiguration while touching a guest table is a VM exit for the
//!   table's GPA;
//! * an EPT violation or misconfiguration on the final GPA is a VM exit for that GPA.
//!
//! # Cost and page-walk caches
//!
//! Without caches an `n`-level guest walk over `m`-level EPT reads `n * (m + 1) + m` entries:
//! 24 for 4x4, 35 for 5x5 ([`NestedTranslation::memory_refs`]). [`NestedCaches`] holds the
//! two caches real CPUs use to cut that:
//! * a **guest paging-structure cache**: non-leaf guest entries (whose Accessed bit is
//!   already set) keyed by their guest-physical address and paging level - physically
//!   tagged, like AMD's page-walk cache - so a warm walk reads only the guest leaf. An entry
//!   is served only at the level it was cached at: through a self-map the same entry is
//!   also a leaf, and leaves always come from memory;
//! * a **nested TLB**: guest-physical page -> host-physical page with the EPT rights, so the
//!   table pages and the final page need no EPT walk.
//!
//! A warm 4x4 walk then costs one memory reference instead of 24. Like hardware caches they
//! can go stale: flush the guest cache when the guest writes CR3, executes INVLPG/INVPCID or
//! changes its paging mode ([`NestedCaches::flush_guest`]), and both on INVEPT
//! ([`NestedCaches::flush_ept`]: cached guest entries were reached through EPT, and INVEPT
//! drops such combined mappings too). The walker keeps the guest cache coherent with its
//! own A/D updates: an entry it compare-exchanges is dropped from the cache.

use alloc::vec;
use alloc::vec::Vec;

use crate::builder::PageSize;
use crate::entry::{ACCESSED, EPT_READ, EPT_WRITE};
use crate::ept::{EptAccess, EptFault, EptWalker, LinearCause};
use crate::memory::PhysMemory;
use crate::walk::{Access, AccessKind, Fault, TableAccess, Walker};

/// Why a nested translation failed, attributed as the CPU would.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NestedFault {
    /// A fault for the guest (#PF or #GP): inject it.
    #[error("guest fault: {0}")]
    Guest(Fault),
    /// EPT refused an access to a guest paging-structure entry at `gpa`.
    #[error(
        "EPT fault on guest page-table access at GPA {gpa:#x} (translating {gva:#x}): {fault}"
    )]
    EptOnTable {
        /// The linear address being translated.
        gva: u64,
        /// Guest-physical address of the paging-structure entry.
        gpa: u64,
        /// The EPT violation or misconfiguration.
        fault: EptFault,
    },
    /// EPT refused the final access.
    #[error("EPT fault on final access to GPA {gpa:#x} (from {gva:#x}): {fault}")]
    EptOnFinal {
        /// The linear address.
        gva: u64,
        /// Its guest-physical translation.
        gpa: u64,
        /// The EPT violation or misconfiguration.
        fault: EptFault,
    },
}

/// A successful nested translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NestedTranslation {
    /// Guest-physical address.
    pub gpa: u64,
    /// Host-physical address.
    pub hpa: u64,
    /// Guest page size.
    pub guest_page_size: PageSize,
    /// EPT page size of the final page (`None` when it came from the nested TLB).
    pub ept_page_size: Option<PageSize>,
    /// Entries read, guest and EPT together.
    pub memory_refs: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct GuestSlot {
    gpa: u64,
    value: u64,
    /// The paging level the entry was read at, and whether it is an 8-byte entry.
    level: u32,
    wide: bool,
    generation: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct NtlbSlot {
    gfn: u64,
    hpa_page: u64,
    rights: u64,
    /// The translation was made as a write (EPT D is set when A/D is on).
    written: bool,
    generation: u64,
}

/// Page-walk caches for both dimensions of a nested walk.
#[derive(Debug, Clone)]
pub struct NestedCaches {
    guest: Vec<GuestSlot>,
    ntlb: Vec<NtlbSlot>,
    guest_generation: u64,
    ept_generation: u64,
}

impl NestedCaches {
    /// Caches with `slots` entries each (rounded up to a power of two, at least 4 and at
    /// most 2^20).
    pub fn new(slots: usize) -> Self {
        let n = slots.clamp(4, 1 << 20).next_power_of_two();
        NestedCaches {
            guest: vec![GuestSlot::default(); n],
            ntlb: vec![NtlbSlot::default(); n],
            guest_generation: 1,
            ept_generation: 1,
        }
    }

    /// Drops cached guest paging-structure entries (guest CR3 write, INVLPG, INVPCID, a
    /// change of paging mode).
    pub fn flush_guest(&mut self) {
        self.guest_generation += 1;
    }

    /// INVEPT: drops cached GPA -> HPA translations and the guest paging-structure entries
    /// read through them (the combined mappings INVEPT invalidates, SDM vol. 3C 29.4.3), so
    /// the next walk reaches EPT for every guest table again.
    pub fn flush_ept(&mut self) {
        self.ept_generation += 1;
        self.guest_generation += 1;
    }

    /// Fibonacci hashing: multiplicative mix, top bits select the slot.
    fn slot(key: u64, len: usize) -> usize {
        let bits = len.trailing_zeros();
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize
    }

    fn guest_index(&self, gpa: u64) -> usize {
        Self::slot(gpa >> 3, self.guest.len())
    }

    fn ntlb_index(&self, gfn: u64) -> usize {
        Self::slot(gfn, self.ntlb.len())
    }
}

/// GVA -> GPA -> HPA translation.
#[derive(Debug, Clone)]
pub struct NestedWalker {
    guest: Walker,
    ept: EptWalker,
}

/// Guest-table access through EPT (the [`TableAccess`] the guest walker runs on).
struct EptTables<'a, M: PhysMemory + ?Sized> {
    ept: &'a EptWalker,
    host: &'a M,
    caches: Option<&'a mut NestedCaches>,
    fault: Option<(u64, EptFault)>,
    refs: u32,
    /// Table pages translated during this walk: (GPA page, HPA page, EPT rights). The A/D
    /// update of an entry reuses the translation of its read, like the CPU's locked RMW.
    seen: [(u64, u64, u64); 5],
    seen_len: usize,
}

impl<M: PhysMemory + ?Sized> EptTables<'_, M> {
    /// GPA -> HPA for a paging-structure access; records the EPT fault and returns None.
    fn translate(&mut self, gpa: u64, write: bool) -> Option<u64> {
        let ad = self.ept.config().accessed_dirty();
        let needs_write = write || ad;
        let gfn = gpa >> 12;
        if let Some(c) = self.caches.as_deref() {
            let s = &c.ntlb[c.ntlb_index(gfn)];
            if s.generation == c.ept_generation
                && s.gfn == gfn
                && s.rights & EPT_READ != 0
                && (!needs_write || (s.rights & EPT_WRITE != 0 && (s.written || !ad)))
            {
                return Some(s.hpa_page | (gpa & 0xfff));
            }
        }
        let access = EptAccess {
            kind: if write {
                AccessKind::Write
            } else {
                AccessKind::Read
            },
            user_linear: false,
            linear_writable: false,
            linear_no_execute: false,
            cause: LinearCause::PagingStructure,
        };
        match self.ept.translate(self.host, gpa, access) {
            Ok(t) => {
                self.refs += t.memory_refs;
                let slot = self.seen_len % self.seen.len();
                self.seen[slot] = (gfn, t.hpa & !0xfff, t.rights);
                self.seen_len += 1;
                if let Some(c) = self.caches.as_deref_mut() {
                    let i = c.ntlb_index(gfn);
                    c.ntlb[i] = NtlbSlot {
                        gfn,
                        hpa_page: t.hpa & !0xfff,
                        rights: t.rights,
                        written: needs_write,
                        generation: c.ept_generation,
                    };
                }
                Some(t.hpa)
            }
            Err(fault) => {
                if self.fault.is_none() {
                    self.fault = Some((gpa, fault));
                }
                None
            }
        }
    }
}

impl<M: PhysMemory + ?Sized> TableAccess for EptTables<'_, M> {
    fn read_entry(&mut self, gpa: u64, level: u32, wide: bool) -> Option<u64> {
        if self.fault.is_some() {
            return None;
        }
        if let Some(c) = self.caches.as_deref() {
            let s = &c.guest[c.guest_index(gpa)];
            if s.generation == c.guest_generation
                && s.gpa == gpa
                && s.level == level
                && s.wide == wide
            {
                return Some(s.value);
            }
        }
        let hpa = self.translate(gpa, false)?;
        self.refs += 1;
        let value = if wide {
            self.host.read_u64(hpa)?
        } else {
            u64::from(self.host.read_u32(hpa)?)
        };
        Some(value)
    }

    fn update_entry(&mut self, gpa: u64, wide: bool, old: u64, new: u64) -> Option<Result<(), ()>> {
        // After an EPT fault the CPU stops: no A/D bit below the faulting access is set.
        if self.fault.is_some() {
            return None;
        }
        // Whatever happens to the entry, a cached copy of it is no longer trusted.
        if let Some(c) = self.caches.as_deref_mut() {
            let i = c.guest_index(gpa);
            if c.guest[i].gpa == gpa {
                c.guest[i].generation = 0;
            }
        }
        let reuse = self.seen[..self.seen_len.min(self.seen.len())]
            .iter()
            .find(|(gfn, _, rights)| *gfn == gpa >> 12 && rights & EPT_WRITE != 0)
            .map(|(_, hpa_page, _)| hpa_page | (gpa & 0xfff));
        let hpa = match reuse {
            Some(hpa) => hpa,
            None => self.translate(gpa, true)?,
        };
        if wide {
            Some(
                self.host
                    .compare_exchange_u64(hpa, old, new)?
                    .map(|_| ())
                    .map_err(|_| ()),
            )
        } else {
            Some(
                self.host
                    .compare_exchange_u32(hpa, old as u32, new as u32)?
                    .map(|_| ())
                    .map_err(|_| ()),
            )
        }
    }
}

impl NestedWalker {
    /// Combines a guest walker (guest CR3 and control registers) with an EPT walker.
    pub fn new(guest: Walker, ept: EptWalker) -> Self {
        NestedWalker { guest, ept }
    }

    /// The guest dimension.
    pub fn guest(&self) -> &Walker {
        &self.guest
    }

    /// The EPT dimension.
    pub fn ept(&self) -> &EptWalker {
        &self.ept
    }

    /// Translates `gva` for `access`; guest tables and guest memory live in `host` at the
    /// host-physical addresses EPT gives. `caches`, when given, is consulted and filled.
    pub fn translate<M: PhysMemory + ?Sized>(
        &self,
        host: &M,
        gva: u64,
        access: Access,
        mut caches: Option<&mut NestedCaches>,
    ) -> Result<NestedTranslation, NestedFault> {
        let mut tables = EptTables {
            ept: &self.ept,
            host,
            caches: caches.as_deref_mut(),
            fault: None,
            refs: 0,
            seen: [(u64::MAX, 0, 0); 5],
            seen_len: 0,
        };
        let result = self.guest.translate_with(&mut tables, gva, access);
        if let Some((gpa, fault)) = tables.fault {
            return Err(NestedFault::EptOnTable { gva, gpa, fault });
        }
        let mut refs = tables.refs;
        let t = result.map_err(NestedFault::Guest)?;
        // Remember the non-leaf guest entries of this walk (their A bits are now set).
        if let Some(c) = caches.as_deref_mut() {
            self.remember_guest_path(c, host, gva);
        }
        let gpa = t.gpa;
        let final_access = EptAccess {
            kind: access.kind,
            user_linear: t.rights().user,
            linear_writable: t.rights().writable,
            linear_no_execute: t.rights().no_execute,
            cause: LinearCause::FinalPage,
        };
        if let Some(c) = caches.as_deref() {
            let s = &c.ntlb[c.ntlb_index(gpa >> 12)];
            if s.generation == c.ept_generation && s.gfn == gpa >> 12 {
                let ok = match access.kind {
                    AccessKind::Read => s.rights & EPT_READ != 0,
                    AccessKind::Write => {
                        s.rights & EPT_WRITE != 0
                            && (s.written || !self.ept.config().accessed_dirty())
                    }
                    // Fetch rights depend on MBEC and the linear mode: walk for fetches.
                    AccessKind::Fetch => false,
                };
                if ok {
                    return Ok(NestedTranslation {
                        gpa,
                        hpa: s.hpa_page | (gpa & 0xfff),
                        guest_page_size: t.page_size(),
                        ept_page_size: None,
                        memory_refs: refs,
                    });
                }
            }
        }
        let e = self
            .ept
            .translate(host, gpa, final_access)
            .map_err(|fault| NestedFault::EptOnFinal { gva, gpa, fault })?;
        refs += e.memory_refs;
        if let Some(c) = caches {
            let i = c.ntlb_index(gpa >> 12);
            c.ntlb[i] = NtlbSlot {
                gfn: gpa >> 12,
                hpa_page: e.hpa & !0xfff,
                rights: e.rights,
                written: access.is_write(),
                generation: c.ept_generation,
            };
        }
        Ok(NestedTranslation {
            gpa,
            hpa: e.hpa,
            guest_page_size: t.page_size(),
            ept_page_size: Some(e.page_size),
            memory_refs: refs,
        })
    }

    /// Re-reads the non-leaf guest entries of `gva` (through the nested TLB, no counting)
    /// and caches those whose Accessed bit is set.
    fn remember_guest_path<M: PhysMemory + ?Sized>(
        &self,
        caches: &mut NestedCaches,
        host: &M,
        gva: u64,
    ) {
        let cfg = self.guest.config();
        let format = cfg.mode.format();
        let wide = format.entry_size() == 8;
        let mut table = self.guest.root();
        for level in (2..=format.levels()).rev() {
            let gpa = format.entry_addr(table, level, gva);
            let hpa = {
                let s = &caches.ntlb[caches.ntlb_index(gpa >> 12)];
                if s.generation != caches.ept_generation || s.gfn != gpa >> 12 {
                    return;
                }
                s.hpa_page | (gpa & 0xfff)
            };
            let value = if wide {
                host.read_u64(hpa)
            } else {
                host.read_u32(hpa).map(u64::from)
            };
            let Some(value) = value else { return };
            let is_pae_pdpte = level == 3 && format.levels() == 3;
            if value & ACCESSED == 0 && !is_pae_pdpte {
                return;
            }
            if value & crate::entry::PAGE_SIZE != 0 && !is_pae_pdpte {
                // A large-page leaf: not a paging-structure cache entry.
                return;
            }
            let i = caches.guest_index(gpa);
            caches.guest[i] = GuestSlot {
                gpa,
                value,
                level,
                wide,
                generation: caches.guest_generation,
            };
            table = if wide {
                value & crate::entry::ADDR_MASK_52
            } else {
                value & 0xffff_f000
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{BumpAllocator, MapFlags, PageTableBuilder, PagingFormat};
    use crate::ept::{EptConfig, ExitQualification};
    use crate::memory::{FlatMemory, GuestAddress};
    use crate::walk::{PagingConfig, PagingMode};

    const GUEST_OFFSET: u64 = 0x100_0000; // GPA g lives at HPA g + 16 MiB

    /// Host memory with EPT at the bottom and guest RAM (16 MiB) above, guest tables of
    /// `mode` mapping GVA 0x40_0000.. -> GPA 0x20_0000.., EPT of `ept_format` with 4 KiB
    /// pages (so every walk is "uncached" in the EPT dimension too).
    fn setup(mode: PagingMode, ept_format: PagingFormat) -> (FlatMemory, NestedWalker, u64) {
        let host = FlatMemory::new(0, 32 << 20);
        let mut ept = PageTableBuilder::new(
            &host,
            ept_format,
            BumpAllocator::new(GuestAddress(0x1000), GuestAddress(GUEST_OFFSET)),
        )
        .unwrap();
        ept.set_max_page_size(PageSize::Size4K);
        ept.map(
            0,
            GuestAddress(GUEST_OFFSET),
            16 << 20,
            MapFlags::WRITABLE | MapFlags::USER,
        )
        .unwrap();
        let eptp = ept.eptp(false);
        // Build guest tables in guest memory: a view of host memory shifted by the offset.
        let guest_mem = Shifted(&host);
        let mut g = PageTableBuilder::new(
            &guest_mem,
            mode.format(),
            BumpAllocator::new(GuestAddress(0x1000), GuestAddress(0x10_0000)),
        )
        .unwrap();
        g.set_max_page_size(PageSize::Size4K);
        let va = if mode == PagingMode::Level5 {
            0xff00_0000_0040_0000
        } else {
            0x40_0000
        };
        g.map(
            va,
            GuestAddress(0x20_0000),
            0x4000,
            MapFlags::WRITABLE | MapFlags::USER,
        )
        .unwrap();
        let guest = Walker::new(PagingConfig::new(mode, g.root().0));
        let walker = NestedWalker::new(guest, EptWalker::new(EptConfig::new(eptp)).unwrap());
        (host, walker, va)
    }

    struct Shifted<'a>(&'a FlatMemory);
    impl PhysMemory for Shifted<'_> {
        fn read_u64(&self, addr: u64) -> Option<u64> {
            self.0.read_u64(addr + GUEST_OFFSET)
        }
        fn write_u64(&self, addr: u64, value: u64) -> Option<()> {
            self.0.write_u64(addr + GUEST_OFFSET, value)
        }
        fn compare_exchange_u64(&self, addr: u64, c: u64, n: u64) -> Option<Result<u64, u64>> {
            self.0.compare_exchange_u64(addr + GUEST_OFFSET, c, n)
        }
    }

    #[test]
    fn uncached_reference_counts() {
        let (host, w, va) = setup(PagingMode::Level4, PagingFormat::Ept4);
        let t = w
            .translate(&host, va + 0x123, Access::user_read(), None)
            .unwrap();
        assert_eq!((t.gpa, t.hpa), (0x20_0123, 0x20_0123 + GUEST_OFFSET));
        assert_eq!(t.memory_refs, 24);
        assert_eq!(t.ept_page_size, Some(PageSize::Size4K));
        let (host, w, va) = setup(PagingMode::Level5, PagingFormat::Ept5);
        let t = w.translate(&host, va, Access::user_write(), None).unwrap();
        assert_eq!(t.memory_refs, 35);
        assert_eq!(w.guest().config().mode, PagingMode::Level5);
        assert_eq!(w.ept().levels(), 5);
        // 32-bit paging over 4-level EPT: 2 * 5 + 4.
        let (host, w, va) = setup(PagingMode::Legacy32, PagingFormat::Ept4);
        assert_eq!(
            w.translate(&host, va, Access::user_read(), None)
                .unwrap()
                .memory_refs,
            14
        );
    }

    #[test]
    fn caches_cut_references() {
        let (host, w, va) = setup(PagingMode::Level4, PagingFormat::Ept4);
        let mut c = NestedCaches::new(64);
        let cold = w
            .translate(&host, va, Access::user_read(), Some(&mut c))
            .unwrap();
        assert_eq!(cold.memory_refs, 24);
        let warm = w
            .translate(&host, va + 8, Access::user_read(), Some(&mut c))
            .unwrap();
        assert_eq!(warm.hpa, cold.hpa + 8);
        assert_eq!(warm.memory_refs, 1, "only the guest PTE is read");
        assert_eq!(warm.ept_page_size, None);
        // A neighbouring page shares the upper levels and the PT page: guest PTE + EPT walk
        // of the new final page.
        let next = w
            .translate(&host, va + 0x1000, Access::user_read(), Some(&mut c))
            .unwrap();
        assert_eq!(next.memory_refs, 1 + 4);
        // Flushing the guest dimension costs the guest upper levels again, not EPT walks.
        c.flush_guest();
        let t = w
            .translate(&host, va, Access::user_read(), Some(&mut c))
            .unwrap();
        assert_eq!(t.memory_refs, 4);
        c.flush_ept();
        let t = w
            .translate(&host, va, Access::user_read(), Some(&mut c))
            .unwrap();
        assert_eq!(
            t.memory_refs, 24,
            "INVEPT drops the guest entries read through EPT as well: a cold walk"
        );
        // Writes through cached data still set guest dirty bits (the leaf is always read).
        w.translate(&host, va, Access::user_write(), Some(&mut c))
            .unwrap();
        let fetch = w
            .translate(&host, va, Access::user_fetch(), Some(&mut c))
            .unwrap();
        assert_eq!(fetch.hpa, cold.hpa);
    }

    /// A builder editing `w`'s EPT tables in `host` (new frames from 0xf0_0000).
    fn ept_editor<'h>(
        host: &'h FlatMemory,
        w: &NestedWalker,
    ) -> PageTableBuilder<'h, FlatMemory, BumpAllocator> {
        PageTableBuilder::from_root(
            host,
            PagingFormat::Ept4,
            BumpAllocator::new(GuestAddress(0xf0_0000), GuestAddress(GUEST_OFFSET)),
            GuestAddress(w.ept().config().eptp & !0xfff),
        )
        .unwrap()
    }

    #[test]
    fn fault_attribution() {
        let (host, w, va) = setup(PagingMode::Level4, PagingFormat::Ept4);
        // Guest #PF: unmapped GVA.
        assert!(matches!(
            w.translate(&host, 0x8000_0000, Access::user_read(), None),
            Err(NestedFault::Guest(Fault::PageFault(_)))
        ));
        // EPT violation on the final GPA: make GPA 0x20_0000 read-only... by rebuilding EPT
        // for that page.
        let mut ept = ept_editor(&host, &w);
        ept.protect(0x20_0000, 0x1000, MapFlags::empty()).unwrap();
        let f = w
            .translate(&host, va, Access::user_write(), None)
            .unwrap_err();
        match f {
            NestedFault::EptOnFinal { gva, gpa, fault } => {
                assert_eq!((gva, gpa), (va, 0x20_0000));
                let q = fault.qualification().unwrap();
                assert!(q.contains(
                    ExitQualification::WRITE
                        | ExitQualification::LINEAR_VALID
                        | ExitQualification::FINAL_PAGE
                ));
                // Advanced VM-exit information from the guest walk: a user, writable,
                // executable linear page.
                assert!(
                    q.contains(ExitQualification::USER_LINEAR | ExitQualification::LINEAR_WRITABLE)
                );
                assert!(!q.contains(ExitQualification::LINEAR_NO_EXECUTE));
            }
            other => panic!("{other:?}"),
        }
        assert!(f.to_string().contains("final access"));
        // EPT violation on a guest table: unmap the guest root page from EPT.
        let cr3 = w.guest().root();
        ept.unmap(cr3, 0x1000).unwrap();
        let f = w
            .translate(&host, va, Access::user_read(), None)
            .unwrap_err();
        match f {
            NestedFault::EptOnTable { gpa, fault, .. } => {
                assert_eq!(gpa & !0xfff, cr3);
                let q = fault.qualification().unwrap().bits();
                assert_eq!(q, ExitQualification::READ | ExitQualification::LINEAR_VALID);
            }
            other => panic!("{other:?}"),
        }
        assert!(f.to_string().contains("page-table access"));
        assert!(NestedFault::Guest(Fault::NonCanonical { addr: 1 << 63 })
            .to_string()
            .contains("guest fault"));
    }

    #[test]
    fn guest_accessed_bit_update_needs_ept_write() {
        let (host, w, va) = setup(PagingMode::Level4, PagingFormat::Ept4);
        let mut ept = ept_editor(&host, &w);
        // Guest root table page read-only in EPT: the walk can read it but not set A.
        let cr3 = w.guest().root();
        ept.protect(cr3, 0x1000, MapFlags::empty()).unwrap();
        let f = w
            .translate(&host, va, Access::user_read(), None)
            .unwrap_err();
        let NestedFault::EptOnTable { fault, .. } = f else {
            panic!("{f:?}")
        };
        assert!(fault
            .qualification()
            .unwrap()
            .contains(ExitQualification::WRITE | ExitQualification::READABLE));
    }

    /// Exit-qualification bits 9-11 follow the guest translation in the other polarity too
    /// (a supervisor, read-only, execute-disable guest page), in every guest mode (32-bit
    /// paging has no execute-disable).
    #[test]
    fn advanced_exit_info_for_a_supervisor_read_only_page() {
        for mode in [
            PagingMode::Legacy32,
            PagingMode::Pae,
            PagingMode::Level4,
            PagingMode::Level5,
        ] {
            let (host, w, va) = setup(mode, PagingFormat::Ept4);
            let flags = if mode == PagingMode::Legacy32 {
                MapFlags::empty()
            } else {
                MapFlags::NO_EXECUTE
            };
            let gm = Shifted(&host);
            let mut g = PageTableBuilder::from_root(
                &gm,
                mode.format(),
                BumpAllocator::new(GuestAddress(0x10_0000), GuestAddress(0x20_0000)),
                GuestAddress(w.guest().root()),
            )
            .unwrap();
            g.protect(va, 0x1000, flags).unwrap();
            let mut ept = ept_editor(&host, &w);
            ept.unmap(0x20_0000, 0x1000).unwrap();
            let f = w
                .translate(&host, va, Access::supervisor_read(), None)
                .unwrap_err();
            let NestedFault::EptOnFinal { fault, .. } = f else {
                panic!("{mode:?}: {f:?}")
            };
            let q = fault.qualification().unwrap();
            assert!(
                !q.contains(ExitQualification::USER_LINEAR),
                "{mode:?} {q:?}"
            );
            assert!(
                !q.contains(ExitQualification::LINEAR_WRITABLE),
                "{mode:?} {q:?}"
            );
            assert_eq!(
                q.contains(ExitQualification::LINEAR_NO_EXECUTE),
                mode != PagingMode::Legacy32,
                "{mode:?} {q:?}"
            );
        }
    }
}
