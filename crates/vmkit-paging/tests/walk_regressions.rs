//! Regression tests for review 5's findings in the walker, the nested walk and the TLB
//! (each failed before its fix): a nested page-walk cache serving a self-map's leaf and
//! livelocking writes, INVEPT leaving cached guest entries, A/D bits set below an EPT fault,
//! global TLB entries without CR4.PGE, and PAE PDPTE registers surviving a CR3 write.

use vmkit_paging::builder::{BumpAllocator, MapFlags, PageSize, PageTableBuilder, PagingFormat};
use vmkit_paging::entry::*;
use vmkit_paging::ept::{EptConfig, EptWalker};
use vmkit_paging::nested::{NestedCaches, NestedFault, NestedWalker};
use vmkit_paging::tlb::Tlb;
use vmkit_paging::walk::{Access, PagingConfig, PagingMode, Walker};
use vmkit_paging::{FlatMemory, GuestAddress, PhysMemory};

const OFF: u64 = 0x100_0000; // GPA g lives at HPA g + 16 MiB

struct Shifted<'a>(&'a FlatMemory);
impl PhysMemory for Shifted<'_> {
    fn read_u64(&self, addr: u64) -> Option<u64> {
        self.0.read_u64(addr + OFF)
    }
    fn write_u64(&self, addr: u64, value: u64) -> Option<()> {
        self.0.write_u64(addr + OFF, value)
    }
    fn compare_exchange_u64(&self, addr: u64, c: u64, n: u64) -> Option<Result<u64, u64>> {
        self.0.compare_exchange_u64(addr + OFF, c, n)
    }
}

/// Host memory with 4 KiB EPT (RWX) mapping GPA 0..16M -> HPA 16M.., and 4-level guest
/// tables at GPA 0x1000.. mapping GVA 0x40_0000 -> GPA 0x20_0000 (user, writable).
/// Returns (host, walker, guest root GPA, EPT root HPA).
fn nested_setup() -> (FlatMemory, NestedWalker, u64, u64) {
    let host = FlatMemory::new(0, 32 << 20);
    let mut ept = PageTableBuilder::new(
        &host,
        PagingFormat::Ept4,
        BumpAllocator::new(GuestAddress(0x1000), GuestAddress(OFF)),
    )
    .unwrap();
    ept.set_max_page_size(PageSize::Size4K);
    ept.map(
        0,
        GuestAddress(OFF),
        16 << 20,
        MapFlags::WRITABLE | MapFlags::USER,
    )
    .unwrap();
    let eptp = ept.eptp(false);
    let gmem = Shifted(&host);
    let mut g = PageTableBuilder::new(
        &gmem,
        PagingFormat::Level4,
        BumpAllocator::new(GuestAddress(0x1000), GuestAddress(0x10_0000)),
    )
    .unwrap();
    g.set_max_page_size(PageSize::Size4K);
    g.map(
        0x40_0000,
        GuestAddress(0x20_0000),
        0x1000,
        MapFlags::WRITABLE | MapFlags::USER,
    )
    .unwrap();
    let root = g.root().0;
    let w = NestedWalker::new(
        Walker::new(PagingConfig::new(PagingMode::Level4, root)),
        EptWalker::new(EptConfig::new(eptp)).unwrap(),
    );
    (host, w, root, eptp & !0xfff)
}

/// [`nested_setup`] with PML4E[1] pointing at the PML4 itself, so GVA (1,1,1,0) (returned)
/// translates through PML4E[0] used as a leaf, and caches warmed by a walk of 0x40_0000
/// that holds PML4E[0] as a level-4 entry.
fn self_mapped() -> (FlatMemory, NestedWalker, u64, u64, NestedCaches) {
    let (host, w, root, _) = nested_setup();
    Shifted(&host)
        .write_u64(root + 8, root | PRESENT | WRITABLE | USER)
        .unwrap();
    let self_map = (1u64 << 39) | (1 << 30) | (1 << 21); // indices 1,1,1,0
    let mut c = NestedCaches::new(64);
    w.translate(&host, 0x40_0000, Access::user_read(), Some(&mut c))
        .unwrap();
    (host, w, root, self_map, c)
}

/// Self-mapped (recursive) guest page tables, as Windows uses: PML4E[1] points at the PML4
/// itself, so GVA (1,1,1,0) translates through PML4E[0] used as a *leaf*. The guest
/// paging-structure cache holds PML4E[0] as a level-4 entry of an earlier walk; it used to
/// serve it as the leaf too, and after the first write set D in memory the cached copy no
/// longer matched memory: every later write lost its compare-exchange 17 times and failed
/// with `Contended`. Entries are now served only at the level they were cached at.
#[test]
fn nested_cache_does_not_serve_a_self_map_leaf_and_writes_through_it_succeed() {
    let (host, w, root, self_map, mut c) = self_mapped();
    let gmem = Shifted(&host);
    let first = w.translate(&host, self_map, Access::user_write(), Some(&mut c));
    assert!(first.is_ok(), "{first:?}");
    let second = w.translate(&host, self_map, Access::user_write(), Some(&mut c));
    assert!(
        second.is_ok(),
        "second write through the self-map: {second:?}"
    );
    // Without caches the same walk succeeds too.
    assert!(w
        .translate(&host, self_map, Access::user_write(), None)
        .is_ok());
    // The leaf came from memory: it shows the D bit the first write set.
    assert_ne!(gmem.read_u64(root).unwrap() & DIRTY, 0);
    // The cache still serves the ordinary walk's upper levels.
    let cold = w
        .translate(&host, 0x40_0000, Access::user_read(), None)
        .unwrap();
    let warm = w
        .translate(&host, 0x40_0000, Access::user_read(), Some(&mut c))
        .unwrap();
    assert!(warm.memory_refs < cold.memory_refs, "{warm:?} vs {cold:?}");
}

/// The guest paging-structure cache is physically tagged but holds entries per level: a
/// linear address never translated before gets its leaf from memory, even when the same
/// entry is cached as an upper-level entry of another address. Here the guest makes its
/// PML4E[0] supervisor-only without invalidating; a first user read through the self-map
/// (where PML4E[0] is the leaf) must see that, while the ordinary address may still use the
/// cached (stale) upper entry, as a CPU's paging-structure cache may.
#[test]
fn nested_cache_never_supplies_a_leaf() {
    let (host, w, root, self_map, mut c) = self_mapped();
    let gmem = Shifted(&host);
    let pml4e = gmem.read_u64(root).unwrap();
    gmem.write_u64(root, pml4e & !USER).unwrap();
    let r = w.translate(&host, self_map, Access::user_read(), Some(&mut c));
    assert!(
        matches!(r, Err(NestedFault::Guest(f)) if f.error_code().map(|c| c.bits()) == Some(0x5)),
        "{r:?}"
    );
    // The ordinary address may use the stale cached PML4E[0] until the guest flushes.
    assert!(w
        .translate(&host, 0x40_0000, Access::user_read(), Some(&mut c))
        .is_ok());
    c.flush_guest();
    assert!(w
        .translate(&host, 0x40_0000, Access::user_read(), Some(&mut c))
        .is_err());
}

/// INVEPT also drops combined (GVA) paging-structure-cache entries (SDM vol. 3C 29.4.3):
/// after the VMM unmaps the guest's PML4 page in EPT and runs INVEPT (`flush_ept`), the
/// next walk must reach EPT for the PML4 and exit. The cached guest entries used to let it
/// complete.
#[test]
fn flush_ept_drops_cached_guest_entries_too() {
    let (host, w, root, ept_root) = nested_setup();
    let mut c = NestedCaches::new(64);
    w.translate(&host, 0x40_0000, Access::user_read(), Some(&mut c))
        .unwrap();
    let mut ept = PageTableBuilder::from_root(
        &host,
        PagingFormat::Ept4,
        BumpAllocator::new(GuestAddress(0xf0_0000), GuestAddress(OFF)),
        GuestAddress(ept_root),
    )
    .unwrap();
    ept.unmap(root, 0x1000).unwrap();
    c.flush_ept(); // INVEPT
    let r = w.translate(&host, 0x40_0000, Access::user_read(), Some(&mut c));
    assert!(
        matches!(r, Err(NestedFault::EptOnTable { gpa, .. }) if gpa & !0xfff == root),
        "after INVEPT the walk still used cached guest entries: {r:?}"
    );
}

/// When the EPT refuses the guest A-bit write on an upper level, the walk must stop there:
/// the CPU never gets to the leaf, so it must not set the leaf's Dirty bit for a write that
/// did not happen (SDM 4.8: D is set on a write through the leaf).
#[test]
fn ept_fault_on_an_accessed_bit_update_stops_the_walk() {
    let (host, w, root, ept_root) = nested_setup();
    let mut ept = PageTableBuilder::from_root(
        &host,
        PagingFormat::Ept4,
        BumpAllocator::new(GuestAddress(0xf0_0000), GuestAddress(OFF)),
        GuestAddress(ept_root),
    )
    .unwrap();
    // The guest PML4 page read-only in EPT: the PML4E's A bit cannot be set.
    ept.protect(root, 0x1000, MapFlags::empty()).unwrap();
    let r = w.translate(&host, 0x40_0000, Access::user_write(), None);
    assert!(matches!(r, Err(NestedFault::EptOnTable { .. })), "{r:?}");
    // Find the guest PTE of 0x40_0000 and check its D bit.
    let gmem = Shifted(&host);
    let pml4e = gmem.read_u64(root).unwrap();
    let pdpte = gmem.read_u64(pml4e & ADDR_MASK_52).unwrap();
    let pde = gmem.read_u64((pdpte & ADDR_MASK_52) + 2 * 8).unwrap();
    let pte = gmem.read_u64(pde & ADDR_MASK_52).unwrap();
    assert_eq!(pml4e & ACCESSED, 0, "PML4E A could not be set");
    assert_eq!(
        pte & (ACCESSED | DIRTY),
        0,
        "leaf A/D set by a walk that VM-exited: PTE {pte:#x}"
    );
}

/// With CR4.PGE = 0 the G bit is ignored (SDM 4.10.2.4): MOV to CR3 must flush the entry.
/// The TLB had no way to know PGE and kept it as a global entry across the CR3 switch,
/// serving the old address space's translation; `PagingConfig::pge` now says.
#[test]
fn tlb_entries_are_not_global_without_cr4_pge() {
    let mem = FlatMemory::new(0, 1 << 20);
    // Two address spaces mapping 0x40_0000 with G set, to 0x8000 and 0x9000.
    let space = |frames: u64, phys: u64| {
        let mut b = PageTableBuilder::new(
            &mem,
            PagingFormat::Level4,
            BumpAllocator::new(GuestAddress(frames), GuestAddress(frames + 0xf000)),
        )
        .unwrap();
        b.map(0x40_0000, GuestAddress(phys), 0x1000, MapFlags::GLOBAL)
            .unwrap();
        b.root().0
    };
    let (a, b) = (space(0x1000, 0x8000), space(0x10000, 0x9000));
    // CR0.PG|WP, CR4.PAE (PGE = bit 7 as given), EFER.LME|LMA: what the TLB serves for
    // 0x40_0000 after filling it in space `a` and a MOV to CR3 of space `b`.
    let after_cr3_write = |cr4: u64| {
        let (cr0, efer) = ((1 << 31) | (1 << 16) | 1, (1 << 8) | (1 << 10));
        let mut walker = Walker::new(PagingConfig::from_registers(cr0, a, cr4, efer, 0).unwrap());
        let mut tlb = Tlb::new(64);
        let r = Access::supervisor_read();
        assert_eq!(
            tlb.translate(&walker, &mem, 0, 0x40_0000, r).unwrap().gpa,
            0x8000
        );
        walker.set_cr3(b);
        tlb.mov_cr3(0, false);
        tlb.translate(&walker, &mem, 0, 0x40_0000, r).unwrap().gpa
    };
    assert_eq!(
        after_cr3_write(1 << 5),
        0x9000,
        "stale translation of the previous CR3 served although CR4.PGE = 0"
    );
    // With CR4.PGE the same leaf is global and survives the CR3 write, as on hardware.
    assert_eq!(after_cr3_write(1 << 5 | 1 << 7), 0x8000);
}

/// PAE: MOV to CR3 loads the four PDPTE registers from the new CR3 (SDM 4.4.1).
/// `Walker::set_cr3` used to keep the old registers, translating through the previous
/// address space; it now drops them (the walk reads the new PDPT) and `set_pdptes` models
/// the registers loaded at the write.
#[test]
fn pae_set_cr3_drops_the_old_pdpte_registers() {
    let mem = FlatMemory::new(0, 1 << 20);
    let mk = |lo: u64, hi: u64, phys: u64| {
        let mut b = PageTableBuilder::new(
            &mem,
            PagingFormat::Pae,
            BumpAllocator::new(GuestAddress(lo), GuestAddress(hi)),
        )
        .unwrap();
        b.map(0x40_0000, GuestAddress(phys), 0x1000, MapFlags::WRITABLE)
            .unwrap();
        b.root().0
    };
    let (a, b) = (mk(0x1000, 0x10000, 0x8000), mk(0x10000, 0x20000, 0x9000));
    let regs = |root: u64| std::array::from_fn(|i| mem.read_u64(root + 8 * i as u64).unwrap());
    let mut cfg = PagingConfig::new(PagingMode::Pae, a);
    cfg.pdptes = Some(regs(a));
    let mut w = Walker::new(cfg);
    let r = Access::supervisor_read();
    assert_eq!(w.translate(&mem, 0x40_0000, r).unwrap().gpa, 0x8000);
    w.set_cr3(b);
    assert_eq!(
        w.translate(&mem, 0x40_0000, r).unwrap().gpa,
        0x9000,
        "after set_cr3 the walk still used the old PDPTE registers"
    );
    // Registers loaded at the write: a later store to the PDPT is not seen until the next
    // CR3 write.
    w.set_pdptes(Some(regs(b)));
    mem.write_u64(b, mem.read_u64(a).unwrap()).unwrap();
    assert_eq!(w.translate(&mem, 0x40_0000, r).unwrap().gpa, 0x9000);
    w.set_cr3(b);
    assert_eq!(w.translate(&mem, 0x40_0000, r).unwrap().gpa, 0x8000);
}
