//! Property test: whatever the guest does to its page tables, CR3 and TLB, a translation
//! through the shadow MMU equals a direct walk of the guest tables followed by the host
//! memory map (same host address, same injected fault with the same error code, same MMIO
//! GPA).
//!
//! Guest table writes happen the two ways a VMM sees them: as guest stores through the
//! shadow MMU (the write-protection fault unsyncs or zaps, then the store lands; the guest
//! then invalidates, as an OS must before relying on the new entry), and as stores the VMM
//! emulated and reports with `guest_table_written` (effective at once). Cases: 256 by
//! default, `PROPTEST_CASES` for more.

use proptest::prelude::*;
use vmkit_paging::builder::{BumpAllocator, MapFlags, PageSize, PageTableBuilder, PagingFormat};
use vmkit_paging::entry::*;
use vmkit_paging::shadow::{ShadowMmu, ShadowOutcome};
use vmkit_paging::walk::{Access, AccessKind, PagingConfig, PagingMode, Privilege, Walker};
use vmkit_paging::{FlatMemory, GuestAddress, PhysMemory};

const GUEST_RAM: u64 = 4 << 20;
const MMIO_START: u64 = 3 << 20;
const HOST_OFFSET: u64 = 0x1000_0000;
const WINDOW: u64 = 0x40_0000;
const TABLES_VA: u64 = 0x8000_0000;
const PAGES: u64 = 16;

fn host(gpa: u64) -> Option<u64> {
    (gpa < MMIO_START).then_some(gpa + HOST_OFFSET)
}

#[derive(Debug, Clone)]
enum Op {
    Access {
        page: u64,
        offset: u64,
        kind: u8,
        user: bool,
    },
    /// Rewrite the PTE of a window page: as a guest store (`store`) or an emulated one.
    WritePte {
        page: u64,
        target: u64,
        flags: u64,
        store: bool,
    },
    /// Toggle R/W or U/S in the PDE of the window (a non-leaf table write).
    WritePde {
        bit: u64,
        store: bool,
    },
    SwitchCr3 {
        space: usize,
        pcid: u16,
        no_flush: bool,
    },
    Flush,
    ZapAll,
    /// The guest changes CR0.WP, CR4.SMEP and RFLAGS.AC (SMAP is dropped while WP is 0:
    /// the shadow MMU refuses that combination).
    ControlRegisters {
        wp: bool,
        smep: bool,
        ac: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (0..PAGES, 0..0x1000u64, 0..3u8, any::<bool>())
            .prop_map(|(page, offset, kind, user)| Op::Access { page, offset, kind, user }),
        5 => (0..PAGES, 0x100..0x3c0u64, any::<u8>(), any::<bool>()).prop_map(|(page, t, f, store)| {
            let mut flags = 0;
            if f & 0b111 != 0 { flags |= PRESENT; }
            if f & 8 != 0 { flags |= WRITABLE; }
            if f & 16 != 0 { flags |= USER; }
            if f & 32 != 0 { flags |= NO_EXECUTE; }
            if f & 64 != 0 { flags |= ACCESSED | DIRTY; }
            Op::WritePte { page, target: t, flags, store }
        }),
        1 => (prop_oneof![Just(WRITABLE), Just(USER)], any::<bool>())
            .prop_map(|(bit, store)| Op::WritePde { bit, store }),
        2 => (0..2usize, 0..3u16, any::<bool>())
            .prop_map(|(space, pcid, no_flush)| Op::SwitchCr3 { space, pcid, no_flush }),
        1 => Just(Op::Flush),
        1 => Just(Op::ZapAll),
        1 => (any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(wp, smep, ac)| Op::ControlRegisters { wp, smep, ac }),
    ]
}

/// Builds two address spaces: the window mapped page by page to `targets`, a 2 MiB page
/// after it, and the table area (GPA 0..1 MiB) at TABLES_VA for the guest's own stores.
fn build(guest: &FlatMemory, targets: &[(u64, u8)]) -> [u64; 2] {
    let mut alloc = BumpAllocator::new(GuestAddress(0x1000), GuestAddress(0x10_0000));
    let mut roots = [0; 2];
    for (space, root) in roots.iter_mut().enumerate() {
        let mut b = PageTableBuilder::new(guest, PagingFormat::Level4, &mut alloc).unwrap();
        for (i, &(target, f)) in targets.iter().enumerate() {
            let mut flags = MapFlags::empty();
            if f & 1 != 0 {
                flags |= MapFlags::WRITABLE;
            }
            if f & 2 != 0 || space == 1 {
                flags |= MapFlags::USER;
            }
            if f & 4 != 0 {
                flags |= MapFlags::NO_EXECUTE;
            }
            if f & 24 == 0 {
                continue; // leave a hole
            }
            b.map(
                WINDOW + i as u64 * 0x1000,
                GuestAddress(target << 12),
                0x1000,
                flags,
            )
            .unwrap();
        }
        b.map(
            WINDOW + (2 << 20),
            GuestAddress(0x20_0000),
            2 << 20,
            MapFlags::WRITABLE | MapFlags::USER,
        )
        .unwrap();
        b.set_max_page_size(PageSize::Size4K);
        b.map(TABLES_VA, GuestAddress(0), 0x10_0000, MapFlags::WRITABLE)
            .unwrap();
        *root = b.root().0;
    }
    roots
}

/// GPA of the level-`level` entry for `va` (None when an upper level is missing/large).
fn entry_gpa(guest: &FlatMemory, cr3: u64, va: u64, level: u32) -> Option<u64> {
    let mut table = cr3;
    for l in (level..=4).rev() {
        let addr = table + ((va >> (12 + 9 * (l - 1))) & 0x1ff) * 8;
        if l == level {
            return Some(addr);
        }
        let e = guest.read_u64(addr)?;
        if e & PRESENT == 0 || e & PAGE_SIZE != 0 {
            return None;
        }
        table = e & ADDR_MASK_52;
    }
    None
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn shadow_equals_guest_walk_then_host_map(
        targets in prop::collection::vec((0x100..0x3c0u64, any::<u8>()), PAGES as usize),
        smep in any::<bool>(),
        smap in any::<bool>(),
        wp in any::<bool>(),
        ops in prop::collection::vec(op(), 20..120),
    ) {
        let guest = FlatMemory::new(0, GUEST_RAM as usize);
        let roots = build(&guest, &targets);
        let shadow = FlatMemory::new(0x4000_0000, 2 << 20);
        let mut cfg = PagingConfig::new(PagingMode::Level4, roots[0]);
        cfg.smep = smep;
        cfg.smap = smap && wp;
        cfg.write_protect = wp;
        let mut mmu = ShadowMmu::new(
            cfg,
            &guest,
            &shadow,
            BumpAllocator::new(GuestAddress(0x4000_0000), GuestAddress(0x4020_0000)),
            host as fn(u64) -> Option<u64>,
        )
        .unwrap();
        let mut cr3 = roots[0];
        for op in ops {
            match op {
                Op::Access { page, offset, kind, user } => {
                    let va = WINDOW + page * 0x1000 + (offset & !7);
                    let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch][kind as usize];
                    let privilege = if user { Privilege::User } else { Privilege::Supervisor };
                    let access = Access::new(kind, privilege);
                    let got = mmu.access(va, access).unwrap();
                    let mut c = cfg;
                    c.cr3 = cr3;
                    let expected = match Walker::new(c).translate(&guest, va, access) {
                        Ok(t) => match host(t.gpa) {
                            Some(h) => Ok(h),
                            None => Err(ShadowOutcome::Mmio(t.gpa)),
                        },
                        Err(f) => Err(ShadowOutcome::InjectGuestFault(f)),
                    };
                    prop_assert_eq!(got, expected, "va {:#x} {:?}", va, access);
                }
                Op::WritePte { page, target, flags, store } => {
                    let va = WINDOW + page * 0x1000;
                    let Some(pte) = entry_gpa(&guest, cr3, va, 1) else { continue };
                    let value = (target << 12) | flags;
                    if store {
                        let hpa = mmu.access(TABLES_VA + pte, Access::supervisor_write()).unwrap();
                        prop_assert_eq!(hpa, Ok(pte + HOST_OFFSET));
                        guest.write_u64(pte, value).unwrap();
                        mmu.flush();
                    } else {
                        guest.write_u64(pte, value).unwrap();
                        mmu.guest_table_written(pte, 8);
                    }
                }
                Op::WritePde { bit, store } => {
                    let Some(pde) = entry_gpa(&guest, cr3, WINDOW, 2) else { continue };
                    let value = guest.read_u64(pde).unwrap() ^ bit;
                    if store {
                        let hpa = mmu.access(TABLES_VA + pde, Access::supervisor_write()).unwrap();
                        prop_assert_eq!(hpa, Ok(pde + HOST_OFFSET));
                        guest.write_u64(pde, value).unwrap();
                        mmu.flush();
                    } else {
                        guest.write_u64(pde, value).unwrap();
                        mmu.guest_table_written(pde, 8);
                    }
                }
                Op::SwitchCr3 { space, pcid, no_flush } => {
                    cr3 = roots[space];
                    mmu.set_cr3(cr3, pcid, no_flush).unwrap();
                }
                Op::Flush => mmu.flush(),
                Op::ZapAll => mmu.zap_all(),
                Op::ControlRegisters { wp, smep, ac } => {
                    cfg.write_protect = wp;
                    cfg.smep = smep;
                    cfg.smap = smap && wp;
                    cfg.alignment_check = ac;
                    mmu.set_paging_config(cfg).unwrap();
                }
            }
        }

    }
}
