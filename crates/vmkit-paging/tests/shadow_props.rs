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
//!
//! Guests run with any CR0.WP, SMEP, SMAP, RFLAGS.AC, CR4.PKE and PKRU (a kernel store that
//! CR0.WP = 0 allows may come back as one the VMM emulates), with protection keys and
//! memory types (PAT/PCD/PWT) in their leaves; the shadow's leaves must carry the guest's
//! memory type.
//!
//! The property runs for 32-bit, PAE, 4- and 5-level guests (the first two are shadowed by
//! PAE-format tables). The window's pages alternate between two 2 MiB regions, so a
//! 32-bit guest's page table is shadowed in both of its halves (quadrants); the large
//! page is 4 MiB for a 32-bit guest (split over two shadow page directory entries). PAE
//! guests also rewrite a PDPTE in memory, which the oracle, like the CPU, sees only from
//! the next CR3 (or CR0/CR4) load.

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
/// The large page (4 MiB aligned, for 32-bit guests' 4 MiB pages).
const LARGE_VA: u64 = 0x80_0000;
const TABLES_VA: u64 = 0x8000_0000;
const PAGES: u64 = 16;
/// Accesses to `PAGES..PAGES + LARGE_PIECES` land in the large page, 1 MiB apart.
const LARGE_PIECES: u64 = 4;

/// Window page `i`: even pages in the first 2 MiB of the window, odd ones in the second.
fn window_va(i: u64) -> u64 {
    WINDOW + (i % 2) * 0x20_0000 + (i / 2) * 0x1000
}

/// Size of the large page for `format`.
fn large_size(format: PagingFormat) -> u64 {
    if format == PagingFormat::Legacy32 {
        4 << 20
    } else {
        2 << 20
    }
}

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
    /// `flags` may hold a protection key and PAT/PCD/PWT (a key is dropped outside
    /// 4-level paging, where those bits are reserved). A guest store is followed by INVLPG
    /// of the page (`invlpg`) or a full flush.
    WritePte {
        page: u64,
        target: u64,
        flags: u64,
        store: bool,
        invlpg: bool,
    },
    /// Rewrite the memory type (PAT bit 12, PCD, PWT) of the large page's leaf in the
    /// current address space (both spaces map the same large frame).
    LargeMemoryType {
        pat: u8,
        store: bool,
    },
    /// Toggle R/W or U/S in the PDE of the window (a non-leaf table write).
    WritePde {
        bit: u64,
        store: bool,
    },
    /// The OS cleans the large page: clears A and D in its leaf (the PDE), as a guest store
    /// or an emulated one.
    CleanLarge {
        store: bool,
    },
    /// PAE: point PDPTE 0 at the other address space's page directory or back.
    WritePdpte,
    SwitchCr3 {
        space: usize,
        pcid: u16,
        no_flush: bool,
    },
    Flush,
    ZapAll,
    /// The guest changes CR0.WP, CR4.SMEP/SMAP/PKE/PKS (`keys`: bit 0 PKE, bit 1 PKS),
    /// RFLAGS.AC and PKRU (IA32_PKRS follows PKRU one key up, so key 0 - the tables the
    /// guest stores to - stays writable for the kernel).
    ControlRegisters {
        wp: bool,
        smep: bool,
        smap: bool,
        keys: u8,
        ac: bool,
        pkru: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (0..PAGES + LARGE_PIECES, 0..0x1000u64, 0..3u8, any::<bool>())
            .prop_map(|(page, offset, kind, user)| Op::Access { page, offset, kind, user }),
        5 => (0..PAGES, 0x100..0x3c0u64, any::<u8>(), any::<bool>(), 0..4u64, 0..8u64, any::<bool>())
            .prop_map(|(page, t, f, store, key, pat, invlpg)| {
            let mut flags = 0;
            if f & 0b111 != 0 { flags |= PRESENT; }
            if f & 8 != 0 { flags |= WRITABLE; }
            if f & 16 != 0 { flags |= USER; }
            if f & 32 != 0 { flags |= NO_EXECUTE; }
            if f & 64 != 0 { flags |= ACCESSED | DIRTY; }
            flags |= key << PKEY_SHIFT;
            flags |= (pat & 3) << 3 | (pat & 4) << 5;
            Op::WritePte { page, target: t, flags, store, invlpg }
        }),
        1 => (0..8u8, any::<bool>()).prop_map(|(pat, store)| Op::LargeMemoryType { pat, store }),
        1 => (prop_oneof![Just(WRITABLE), Just(USER)], any::<bool>())
            .prop_map(|(bit, store)| Op::WritePde { bit, store }),
        2 => (0..2usize, 0..3u16, any::<bool>())
            .prop_map(|(space, pcid, no_flush)| Op::SwitchCr3 { space, pcid, no_flush }),
        1 => any::<bool>().prop_map(|store| Op::CleanLarge { store }),
        1 => Just(Op::WritePdpte),
        1 => Just(Op::Flush),
        1 => Just(Op::ZapAll),
        1 => (
            (any::<bool>(), any::<bool>(), any::<bool>(), 0..4u8, any::<bool>()),
            // Write-disable for key 0 (every builder-made page) or 1, access-disable for 1.
            prop_oneof![Just(0u32), Just(0b10), Just(0b1000), Just(0b0100), Just(0b1100_1010)],
        )
            .prop_map(|((wp, smep, smap, keys, ac), pkru)| {
                Op::ControlRegisters { wp, smep, smap, keys, ac, pkru }
            }),
    ]
}

/// Builds two address spaces: the window mapped page by page to `targets`, a large page
/// at LARGE_VA, and the table area (GPA 0..1 MiB) at TABLES_VA for the guest's own stores.
fn build(guest: &FlatMemory, format: PagingFormat, targets: &[(u64, u8)]) -> [u64; 2] {
    let mut alloc = BumpAllocator::new(GuestAddress(0x1000), GuestAddress(0x10_0000));
    let mut roots = [0; 2];
    for (space, root) in roots.iter_mut().enumerate() {
        let mut b = PageTableBuilder::new(guest, format, &mut alloc).unwrap();
        for (i, &(target, f)) in targets.iter().enumerate() {
            let mut flags = MapFlags::empty();
            if f & 1 != 0 {
                flags |= MapFlags::WRITABLE;
            }
            if f & 2 != 0 || space == 1 {
                flags |= MapFlags::USER;
            }
            if f & 4 != 0 && format != PagingFormat::Legacy32 {
                flags |= MapFlags::NO_EXECUTE;
            }
            if f & 24 == 0 {
                continue; // leave a hole
            }
            b.map(
                window_va(i as u64),
                GuestAddress(target << 12),
                0x1000,
                flags,
            )
            .unwrap();
        }
        let size = large_size(format);
        b.map(
            LARGE_VA,
            GuestAddress(GUEST_RAM - size),
            size,
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

fn read_entry(guest: &FlatMemory, format: PagingFormat, addr: u64) -> Option<u64> {
    if format == PagingFormat::Legacy32 {
        guest.read_u32(addr).map(u64::from)
    } else {
        guest.read_u64(addr)
    }
}

fn write_entry(guest: &FlatMemory, format: PagingFormat, addr: u64, value: u64) {
    if format == PagingFormat::Legacy32 {
        guest.write_u32(addr, value as u32).unwrap();
    } else {
        guest.write_u64(addr, value).unwrap();
    }
}

/// GPA of the level-`level` entry for `va` (None when an upper level is missing/large).
/// Reads the tables in memory, including a PAE guest's PDPT.
fn entry_gpa(
    guest: &FlatMemory,
    format: PagingFormat,
    cr3: u64,
    va: u64,
    level: u32,
) -> Option<u64> {
    let mut table = cr3;
    for l in (level..=format.levels()).rev() {
        let addr = format.entry_addr(table, l, va);
        if l == level {
            return Some(addr);
        }
        let e = read_entry(guest, format, addr)?;
        let pdpte = format == PagingFormat::Pae && l == 3;
        if e & PRESENT == 0 || (e & PAGE_SIZE != 0 && !pdpte) {
            return None;
        }
        table = if format == PagingFormat::Legacy32 {
            e & 0xffff_f000
        } else {
            e & ADDR_MASK_52
        };
    }
    None
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

type Mmu<'a> = ShadowMmu<'a, FlatMemory, FlatMemory, BumpAllocator, fn(u64) -> Option<u64>>;

/// A guest store to its own table entry at `gpa` through the shadow MMU: the write goes
/// through the MMU (a write-protection fault unsyncs or zaps), lands, and the guest
/// invalidates - INVLPG of `invlpg` (the address whose entry it wrote), or a full flush.
/// A store to a table on its own translation path is emulated by the VMM.
fn guest_store(
    mmu: &mut Mmu<'_>,
    guest: &FlatMemory,
    format: PagingFormat,
    gpa: u64,
    value: u64,
    invlpg: Option<u64>,
) -> Result<(), TestCaseError> {
    match mmu
        .access(TABLES_VA + gpa, Access::supervisor_write())
        .unwrap()
    {
        Ok(hpa) => {
            prop_assert_eq!(hpa, gpa + HOST_OFFSET);
            write_entry(guest, format, gpa, value);
        }
        Err(ShadowOutcome::EmulateWrite(at)) => {
            prop_assert_eq!(at, gpa);
            write_entry(guest, format, gpa, value);
            mmu.guest_table_written(gpa, format.entry_size());
        }
        other => prop_assert!(false, "store to {:#x}: {:?}", gpa, other),
    }
    match invlpg {
        Some(va) => mmu.invlpg(va),
        None => mmu.flush(),
    }
    Ok(())
}

/// A write of `value` to the guest table entry at `gpa`: a guest store through the MMU
/// ([`guest_store`], then INVLPG of `invlpg` or a flush) or one the VMM emulated and reports.
fn table_write(
    mmu: &mut Mmu<'_>,
    guest: &FlatMemory,
    format: PagingFormat,
    gpa: u64,
    value: u64,
    store: bool,
    invlpg: Option<u64>,
) -> Result<(), TestCaseError> {
    if store {
        return guest_store(mmu, guest, format, gpa, value, invlpg);
    }
    write_entry(guest, format, gpa, value);
    mmu.guest_table_written(gpa, format.entry_size());
    Ok(())
}

/// The large page's leaf in the address space at `cr3`: (its GPA, its value), if the
/// entry there still maps a large page.
fn large_leaf(guest: &FlatMemory, format: PagingFormat, cr3: u64) -> Option<(u64, u64)> {
    let pde = entry_gpa(guest, format, cr3, LARGE_VA, 2)?;
    let old = read_entry(guest, format, pde)?;
    (old & PAGE_SIZE != 0).then_some((pde, old))
}

/// The PDPTE registers a CR3 load gives a PAE guest.
fn load_pdptes(guest: &FlatMemory, mode: PagingMode, cr3: u64) -> Option<[u64; 4]> {
    (mode == PagingMode::Pae)
        .then(|| core::array::from_fn(|i| guest.read_u64(cr3 + i as u64 * 8).unwrap()))
}

#[allow(clippy::too_many_arguments)]
fn run(
    mode: PagingMode,
    targets: Vec<(u64, u8)>,
    smep: bool,
    smap: bool,
    pke: bool,
    wp: bool,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let format = mode.format();
    let guest = FlatMemory::new(0, GUEST_RAM as usize);
    let roots = build(&guest, format, &targets);
    let shadow = FlatMemory::new(0x4000_0000, 2 << 20);
    let mut cfg = PagingConfig::new(mode, roots[0]);
    cfg.smep = smep;
    cfg.smap = smap;
    cfg.pke = pke;
    cfg.pks = pke;
    cfg.write_protect = wp;
    let mut mmu: Mmu<'_> = ShadowMmu::new(
        cfg,
        &guest,
        &shadow,
        BumpAllocator::new(GuestAddress(0x4000_0000), GuestAddress(0x4020_0000)),
        host as fn(u64) -> Option<u64>,
    )
    .unwrap();
    let mut cr3 = roots[0];
    // The oracle's PDPTE registers (PAE): loaded at CR3 and CR0/CR4 writes only.
    let mut pdptes = load_pdptes(&guest, mode, cr3);
    for (step, op) in ops.into_iter().enumerate() {
        // Between events, whatever the shadow tables hold must be what the guest's own
        // tables allow now - not only at the address the last event touched: a stale
        // entry elsewhere (a table write dropped at the wrong index, say) is caught here.
        let mut now = cfg;
        now.cr3 = cr3;
        now.pdptes = pdptes;
        no_stale_entries(&mmu, &guest, now, format, step)?;
        match op {
            Op::Access {
                page,
                offset,
                kind,
                user,
            } => {
                let va = if page < PAGES {
                    window_va(page)
                } else {
                    LARGE_VA + ((page - PAGES) << 20) % large_size(format)
                } + (offset & !7);
                let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch][kind as usize];
                let privilege = if user {
                    Privilege::User
                } else {
                    Privilege::Supervisor
                };
                let access = Access::new(kind, privilege);
                let got = mmu.access(va, access).unwrap();
                let mut c = cfg;
                c.cr3 = cr3;
                c.pdptes = pdptes;
                // An access the shadow let through must have left the guest's own A (and,
                // for a write, D) set in its leaf: checked with a walk that sets nothing,
                // before the reference walk below (which would set them itself).
                if got.is_ok() {
                    let mut quiet = c;
                    quiet.set_accessed_dirty = false;
                    if let Ok(t) = Walker::new(quiet).translate(&guest, va, access) {
                        prop_assert!(
                            t.leaf_entry & ACCESSED != 0,
                            "A missing in the leaf of {:#x} after {:?}",
                            va,
                            access
                        );
                        prop_assert!(
                            !access.is_write() || t.dirty(),
                            "D missing in the leaf of {:#x} after a write",
                            va
                        );
                    }
                }
                let expected = match Walker::new(c).translate(&guest, va, access) {
                    Ok(t) => match host(t.gpa) {
                        // Under CR0.WP = 0 a kernel store the guest allows is emulated
                        // exactly where the shadow MMU's docs say: a read-only user page
                        // under SMAP or keys, a key's write-disable bit, or a store to the
                        // guest's own tables (GPA < 1 MiB here).
                        Some(_)
                            if got == Err(ShadowOutcome::EmulateWrite(t.gpa))
                                && !c.write_protect
                                && access == Access::supervisor_write() =>
                        {
                            let r = t.rights();
                            let ia32e = matches!(mode, PagingMode::Level4 | PagingMode::Level5);
                            let keys = if r.user {
                                c.pke.then_some(c.pkru)
                            } else {
                                c.pks.then_some(c.pkrs)
                            };
                            let wd = ia32e
                                && keys.is_some_and(|k| (k >> (2 * u32::from(r.pkey))) & 2 != 0);
                            let shape =
                                r.user && !r.writable && (c.smap || (ia32e && (c.pke || c.pks)));
                            let table = t.gpa < 0x10_0000;
                            prop_assert!(
                                wd || shape || table,
                                "unjustified EmulateWrite of {:#x}: {:?} under {:?}",
                                va,
                                r,
                                c
                            );
                            got
                        }
                        Some(h) => Ok(h),
                        None => Err(ShadowOutcome::Mmio(t.gpa)),
                    },
                    Err(f) => Err(ShadowOutcome::InjectGuestFault(f)),
                };
                prop_assert_eq!(got, expected, "va {:#x} {:?}", va, access);
            }
            Op::WritePte {
                page,
                target,
                flags,
                store,
                invlpg,
            } => {
                let va = window_va(page);
                let Some(pte) = entry_gpa(&guest, format, cr3, va, 1) else {
                    continue;
                };
                let flags = match format {
                    PagingFormat::Level4 | PagingFormat::Level5 => flags,
                    // No keys outside IA-32e paging; no NX in 32-bit entries.
                    PagingFormat::Pae => flags & !(15 << PKEY_SHIFT),
                    _ => flags & !(15 << PKEY_SHIFT) & !NO_EXECUTE,
                };
                let value = (target << 12) | flags;
                table_write(
                    &mut mmu,
                    &guest,
                    format,
                    pte,
                    value,
                    store,
                    invlpg.then_some(va),
                )?;
            }
            Op::WritePde { bit, store } => {
                let Some(pde) = entry_gpa(&guest, format, cr3, WINDOW, 2) else {
                    continue;
                };
                let value = read_entry(&guest, format, pde).unwrap() ^ bit;
                table_write(&mut mmu, &guest, format, pde, value, store, None)?;
            }
            Op::CleanLarge { store } => {
                let Some((pde, old)) = large_leaf(&guest, format, cr3) else {
                    continue;
                };
                let value = old & !(ACCESSED | DIRTY);
                table_write(&mut mmu, &guest, format, pde, value, store, None)?;
            }
            Op::LargeMemoryType { pat, store } => {
                let Some((pde, old)) = large_leaf(&guest, format, cr3) else {
                    continue;
                };
                let bits = WRITE_THROUGH | CACHE_DISABLE | LARGE_PAT;
                let pat = u64::from(pat);
                let value = old & !bits | (pat & 3) << 3 | (pat & 4) << 10;
                table_write(&mut mmu, &guest, format, pde, value, store, None)?;
            }
            Op::WritePdpte => {
                if mode != PagingMode::Pae {
                    continue;
                }
                // A guest store (the PDPT is not write-protected), then a flush: neither
                // reloads the PDPTE registers.
                let own = guest.read_u64(roots[0]).unwrap();
                let other = guest.read_u64(roots[1]).unwrap();
                let now = guest.read_u64(cr3).unwrap();
                let value = if now == own { other } else { own };
                let hpa = mmu
                    .access(TABLES_VA + cr3, Access::supervisor_write())
                    .unwrap();
                prop_assert_eq!(hpa, Ok(cr3 + HOST_OFFSET));
                guest.write_u64(cr3, value).unwrap();
                mmu.flush();
            }
            Op::SwitchCr3 {
                space,
                pcid,
                no_flush,
            } => {
                cr3 = roots[space];
                mmu.set_cr3(cr3, pcid, no_flush).unwrap();
                pdptes = load_pdptes(&guest, mode, cr3);
            }
            Op::Flush => mmu.flush(),
            Op::ZapAll => mmu.zap_all(),
            Op::ControlRegisters {
                wp,
                smep,
                smap,
                keys,
                ac,
                pkru,
            } => {
                cfg.write_protect = wp;
                cfg.smep = smep;
                cfg.smap = smap;
                cfg.pke = keys & 1 != 0;
                cfg.pks = keys & 2 != 0;
                cfg.alignment_check = ac;
                cfg.pkru = pkru;
                cfg.pkrs = pkru << 2;
                mmu.set_paging_config(cfg).unwrap();
                pdptes = load_pdptes(&guest, mode, cr3);
            }
        }
    }
    Ok(())
}

/// Every window page and large-page piece, for one access kind (which rotates with `step`,
/// to keep the test fast): a translation the shadow tables give must be one the guest's
/// tables give now (same host address), with A set in the guest's leaf, and D for a write
/// (checked with a walk that sets nothing).
fn no_stale_entries(
    mmu: &Mmu<'_>,
    guest: &FlatMemory,
    cfg: PagingConfig,
    format: PagingFormat,
    step: usize,
) -> Result<(), TestCaseError> {
    const ACCESSES: [Access; 6] = [
        Access::supervisor_read(),
        Access::user_write(),
        Access::user_fetch(),
        Access::supervisor_write(),
        Access::user_read(),
        Access::supervisor_fetch(),
    ];
    let access = ACCESSES[step % ACCESSES.len()];
    let mut quiet = cfg;
    quiet.set_accessed_dirty = false;
    let walker = Walker::new(quiet);
    let large = (0..LARGE_PIECES).map(|i| LARGE_VA + (i << 20) % large_size(format));
    for va in (0..PAGES).map(window_va).chain(large) {
        let Ok(shadow) = mmu.shadow_translation(va, access) else {
            continue;
        };
        let hpa = shadow.gpa;
        let t = walker.translate(guest, va, access);
        let ok = t
            .as_ref()
            .is_ok_and(|t| host(t.gpa) == Some(hpa) && t.pat_index() == shadow.pat_index());
        prop_assert!(
            ok,
            "shadow gives {:#x} for {:#x} {:?}; the guest: {:?}",
            hpa,
            va,
            access,
            t
        );
        if let Ok(t) = t {
            prop_assert!(t.leaf_entry & ACCESSED != 0, "A missing for {:#x}", va);
            prop_assert!(!access.is_write() || t.dirty(), "D missing for {:#x}", va);
        }
    }
    Ok(())
}

fn targets() -> impl Strategy<Value = Vec<(u64, u8)>> {
    prop::collection::vec((0x100..0x3c0u64, any::<u8>()), PAGES as usize)
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 20..120)
}

/// One property test per paging mode, each with its own case count.
macro_rules! per_mode {
    ($($name:ident: $mode:expr;)*) => {
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(cases()))]
            $(
                #[test]
                fn $name(
                    targets in targets(),
                    smep in any::<bool>(),
                    smap in any::<bool>(),
                    pke in any::<bool>(),
                    wp in any::<bool>(),
                    ops in ops(),
                ) {
                    run($mode, targets, smep, smap, pke, wp, ops)?;
                }
            )*
        }
    };
}

per_mode! {
    shadow_equals_guest_walk_then_host_map: PagingMode::Level4;
    shadow_equals_guest_walk_then_host_map_5level: PagingMode::Level5;
    shadow_equals_guest_walk_then_host_map_pae: PagingMode::Pae;
    shadow_equals_guest_walk_then_host_map_32bit: PagingMode::Legacy32;
}
