//! Shadow MMU scenarios found by review, each on hand-written guest tables: every one
//! failed before its fix (named in the test's doc comment).

use vm_memory::GuestMemoryMmap;
use vmkit_paging::builder::{BumpAllocator, FrameAllocator};
use vmkit_paging::entry::*;
use vmkit_paging::shadow::{ShadowMmu, ShadowOutcome};
use vmkit_paging::walk::{Access, PagingConfig, PagingMode};
use vmkit_paging::{FlatMemory, GuestAddress, PhysMemory};

const HOST_OFFSET: u64 = 0x1000_0000;
/// Links and leaves: present, writable, user, accessed.
const PA: u64 = PRESENT | WRITABLE | USER | ACCESSED;

fn host(gpa: u64) -> Option<u64> {
    (gpa < (4 << 20)).then_some(gpa + HOST_OFFSET)
}

fn host_all(gpa: u64) -> Option<u64> {
    Some(gpa + HOST_OFFSET)
}

type Mmu<'a> = ShadowMmu<'a, FlatMemory, FlatMemory, BumpAllocator, fn(u64) -> Option<u64>>;

fn mmu<'a>(
    cfg: PagingConfig,
    guest: &'a FlatMemory,
    shadow: &'a FlatMemory,
    frames: u64,
    host: fn(u64) -> Option<u64>,
) -> Mmu<'a> {
    let alloc = BumpAllocator::new(
        GuestAddress(0x4000_0000),
        GuestAddress(0x4000_0000 + frames * 0x1000),
    );
    ShadowMmu::new(cfg, guest, shadow, alloc, host).unwrap()
}

/// CR0.WP = 0, a read-only 2 MiB page mapped twice - A dirty, B clean: a kernel write
/// through B must set B's D. (Direct pages splitting a large page were keyed by the
/// large leaf's rights only, and a read-only page has no W to drop while clean, so B
/// shared A's kernel-writable leaves.)
#[test]
fn wp0_kernel_write_through_a_clean_alias_of_a_read_only_large_page_sets_its_dirty_bit() {
    let g = FlatMemory::new(0, 4 << 20);
    g.write_u64(0x1000, 0x2000 | PA).unwrap();
    g.write_u64(0x2000, 0x3000 | PA).unwrap();
    let a = 0x3000 + 8; // VA 0x20_0000
    let b = 0x3000 + 16; // VA 0x40_0000
    g.write_u64(a, 0x20_0000 | PRESENT | ACCESSED | DIRTY | PAGE_SIZE)
        .unwrap();
    g.write_u64(b, 0x20_0000 | PRESENT | ACCESSED | PAGE_SIZE)
        .unwrap();
    let s = FlatMemory::new(0x4000_0000, 1 << 20);
    let mut cfg = PagingConfig::new(PagingMode::Level4, 0x1000);
    cfg.write_protect = false;
    let mut m = mmu(cfg, &g, &s, 256, host);
    m.access(0x40_1000, Access::supervisor_read())
        .unwrap()
        .unwrap();
    m.access(0x20_1000, Access::supervisor_write())
        .unwrap()
        .unwrap();
    assert_eq!(g.read_u64(b).unwrap() & DIRTY, 0);
    m.access(0x40_1000, Access::supervisor_write())
        .unwrap()
        .unwrap();
    assert_ne!(g.read_u64(b).unwrap() & DIRTY, 0, "B's D was never set");
}

/// A 32-bit guest with CR3 bits 11:5 set switches to PAE paging: the PDPTEs come from
/// CR3 & 0xffff_ffe0. (The MMU kept only the 32-bit mode's CR3 bits and read them from
/// the page start.)
#[test]
fn switching_from_32_bit_to_pae_paging_keeps_cr3_bits_11_5() {
    let g = FlatMemory::new(0, 4 << 20);
    g.write_u64(0x5020, 0x6000 | PRESENT).unwrap();
    let s = FlatMemory::new(0x4000_0000, 1 << 20);
    let mut m = mmu(
        PagingConfig::new(PagingMode::Legacy32, 0x5020),
        &g,
        &s,
        256,
        host,
    );
    let mut c = *m.guest_walker().config();
    c.mode = PagingMode::Pae;
    c.pdptes = None;
    m.set_paging_config(c).unwrap();
    assert_eq!(
        m.guest_walker().config().pdptes.map(|p| p[0]),
        Some(0x6000 | PRESENT)
    );
}

/// A CR3 load that finds no free frame for its root zaps and retries, and a root of the
/// previous address space never serves the new one. (The failed load left the old root
/// first in the cache, and the next fault filled it with the new space's entries.)
#[test]
fn a_cr3_load_short_of_frames_never_mixes_address_spaces() {
    let g = FlatMemory::new(0, 4 << 20);
    // Space 0: PML4 0x1000 [0] -> PDPT 0x3000; space 1: PML4 0x2000 [1] -> the same PDPT.
    g.write_u64(0x1000, 0x3000 | PA).unwrap();
    g.write_u64(0x2000 + 8, 0x3000 | PA).unwrap();
    g.write_u64(0x3000, 0x4000 | PA).unwrap();
    g.write_u64(0x4000, 0x5000 | PA).unwrap();
    g.write_u64(0x5008, 0x10_0000 | PA).unwrap();
    let s = FlatMemory::new(0x4000_0000, 1 << 20);
    // Four frames: exactly one 4-level path.
    let mut m = mmu(
        PagingConfig::new(PagingMode::Level4, 0x1000),
        &g,
        &s,
        4,
        host,
    );
    m.access(0x1000, Access::user_read()).unwrap().unwrap();
    m.set_cr3(0x2000, 0, false).unwrap();
    assert_eq!(
        m.access(0x80_0000_1000, Access::user_read()),
        Ok(Ok(0x10_0000 + HOST_OFFSET))
    );
    m.set_cr3(0x1000, 0, false).unwrap();
    let got = m.access(0x80_0000_1000, Access::user_read());
    assert!(
        matches!(got, Ok(Err(ShadowOutcome::InjectGuestFault(_)))),
        "space 0 translates an address its tables do not map: {got:?}"
    );
    assert_eq!(
        m.access(0x1000, Access::user_read()),
        Ok(Ok(0x10_0000 + HOST_OFFSET))
    );
}

/// 32-bit guests: PSE-36 high address bits, MAXPHYADDR 32 making them reserved, CR4.PSE
/// off (PS ignored: the PDE links a page table), and an emulated write to a PDE in the
/// second quadrant of the page directory. (Passed when written; kept as a regression.)
#[test]
fn legacy32_pse36_pse_off_and_a_second_quadrant_pde_write() {
    let g = FlatMemory::new(0, 4 << 20);
    let pd = 0x1000u64;
    // PDE 0: a 4 MiB page at 0x3_0040_0000 (address bits 33:32 in entry bits 14:13).
    g.write_u32(
        pd,
        (0x40_0000 | (3 << 13) | PRESENT | WRITABLE | USER | PAGE_SIZE) as u32,
    )
    .unwrap();
    // PDE 300 (VA 0x4b00_0000, quadrant 1): PS set, address 0x2000.
    g.write_u32(
        pd + 300 * 4,
        (0x2000 | PRESENT | WRITABLE | USER | PAGE_SIZE) as u32,
    )
    .unwrap();
    g.write_u32(0x2000 + 5 * 4, (0x9000 | PRESENT | WRITABLE | USER) as u32)
        .unwrap();
    let s = FlatMemory::new(0x4000_0000, 1 << 20);
    let mut cfg = PagingConfig::new(PagingMode::Legacy32, pd);
    let mut m = mmu(cfg, &g, &s, 256, host_all);
    assert_eq!(
        m.access(0x23_4567, Access::user_read()).unwrap(),
        Ok(0x3_0063_4567 + HOST_OFFSET)
    );
    // MAXPHYADDR 32: the PSE-36 bits are reserved, a guest #PF with RSVD.
    cfg.max_phys_bits = 32;
    m.set_paging_config(cfg).unwrap();
    let r = m.access(0x23_4567, Access::user_read()).unwrap();
    assert!(
        matches!(r, Err(ShadowOutcome::InjectGuestFault(f))
            if f.error_code().is_some_and(|c| c.bits() & 0x8 != 0)),
        "{r:x?}"
    );
    // CR4.PSE off: PS is ignored and PDE 300 links the page table at 0x2000.
    cfg.max_phys_bits = 52;
    cfg.pse = false;
    m.set_paging_config(cfg).unwrap();
    assert_eq!(
        m.access(0x4b00_5000, Access::user_read()).unwrap(),
        Ok(0x9000 + HOST_OFFSET)
    );
    // The guest clears PDE 300 and the VMM reports it: the shadow entry goes too.
    g.write_u32(pd + 300 * 4, 0).unwrap();
    m.guest_table_written(pd + 300 * 4, 4);
    let r = m.access(0x4b00_5000, Access::user_read()).unwrap();
    assert!(
        matches!(r, Err(ShadowOutcome::InjectGuestFault(_))),
        "{r:x?}"
    );
}

/// A PAE-format root needs a frame below 4 GiB: the MMU takes the allocator's next low
/// frame and keeps the high ones for other shadow pages. (It used to fail the CR3 load on
/// the first high frame, and to find that same frame first in its pool every time after.)
#[test]
fn a_pae_root_skips_frames_above_4g_and_leaves_them_to_other_pages() {
    /// Hands out 4 high frames, then low ones.
    struct Mixed {
        high: u64,
        low: u64,
    }
    impl FrameAllocator for Mixed {
        fn allocate(&mut self) -> Option<GuestAddress> {
            let at = if self.high < (1 << 32) + 4 * 0x1000 {
                &mut self.high
            } else {
                &mut self.low
            };
            let f = *at;
            *at += 0x1000;
            Some(GuestAddress(f))
        }
    }
    let g = FlatMemory::new(0, 4 << 20);
    // PAE: PDPTE 0 -> PD 0x2000 -> PT 0x3000 -> page 0x10_0000 (VA 0x1000).
    g.write_u64(0x1000, 0x2000 | PRESENT).unwrap();
    g.write_u64(0x2000, 0x3000 | PA).unwrap();
    g.write_u64(0x3008, 0x10_0000 | PA).unwrap();
    let shadow = GuestMemoryMmap::<()>::from_ranges(&[
        (vm_memory::GuestAddress(0x4000_0000), 1 << 20),
        (vm_memory::GuestAddress(1 << 32), 1 << 20),
    ])
    .unwrap();
    let alloc = Mixed {
        high: 1 << 32,
        low: 0x4000_0000,
    };
    let mut m = ShadowMmu::new(
        PagingConfig::new(PagingMode::Pae, 0x1000),
        &g,
        &shadow,
        alloc,
        host as fn(u64) -> Option<u64>,
    )
    .unwrap();
    assert!(m.shadow_root().is_some_and(|r| r < (1 << 32)));
    assert_eq!(
        m.access(0x1000, Access::user_read()),
        Ok(Ok(0x10_0000 + HOST_OFFSET))
    );
    // The page directory and table of the shadow came from the high frames.
    assert!(m.live_pages() >= 3);
}
