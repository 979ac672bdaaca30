//! Property tests for the fast paths: they must never change an answer.
//!
//! * The walker's fast 4/5-level walk (`Walker::translate`, and `Walker::fast_translate`
//!   when it answers) against the detailed walk
//!   (`Walker::translate_with` over `DirectTables`), on random, messy tables - entries
//!   missing, pointing outside memory or across two memory regions, large pages, reserved
//!   bits, XD, protection keys, clear Accessed/Dirty bits - under random control registers
//!   and accesses: same result (translation or fault, field for field) and the same memory
//!   afterwards (the A/D updates). Over `FlatMemory` and over a two-region
//!   `GuestMemoryMmap`, so both `WordSpan` implementations and the span switch are covered.
//! * The software TLB (its packed hit path and its slow path) against a direct walk, over
//!   random sequences of accesses from several PCIDs under changing control registers and
//!   every kind of invalidation: the same GPA or the same error code, always.
//!
//! Cases: 256 by default, `PROPTEST_CASES` for more.

use proptest::prelude::*;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmkit_paging::builder::PageSize;
use vmkit_paging::entry::*;
use vmkit_paging::tlb::Tlb;
use vmkit_paging::walk::{
    Access, AccessKind, DirectTables, PagingConfig, PagingMode, Privilege, Walker,
};
use vmkit_paging::{FlatMemory, PhysMemory};

/// Guest RAM: 16 frames. Entries point at frames 0..20, so some point outside memory.
const RAM: u64 = 0x10000;
/// Per-level indices of the walked addresses are below this, and so are the filled entries.
const FANOUT: u64 = 4;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// A deterministic generator, so one proptest seed describes a whole table image.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// True with probability `percent`%.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// A random entry: mostly well-formed, sometimes not.
fn entry(rng: &mut XorShift) -> u64 {
    let mut e = (rng.next() % 20) << 12;
    for (bit, percent) in [
        (PRESENT, 92),
        (WRITABLE, 75),
        (USER, 75),
        (ACCESSED, 70),
        (DIRTY, 60),
        (PAGE_SIZE, 12),
        (GLOBAL, 20),
        (NO_EXECUTE, 15),
    ] {
        if rng.chance(percent) {
            e |= bit;
        }
    }
    if rng.chance(25) {
        e |= (rng.next() % 16) << PKEY_SHIFT;
    }
    if rng.chance(8) {
        // A reserved bit: above MAXPHYADDR, or inside a large page's address field.
        e |= 1 << [13, 20, 29, 40, 51][(rng.next() % 5) as usize];
    }
    e
}

/// Fills entries 0..FANOUT of every frame with random entries.
fn image(seed: u64) -> Vec<(u64, u64)> {
    let mut rng = XorShift(seed | 1);
    let mut out = Vec::new();
    for frame in 0..RAM / 0x1000 {
        for i in 0..FANOUT {
            out.push((frame * 0x1000 + i * 8, entry(&mut rng)));
        }
    }
    out
}

fn address(rng: &mut XorShift, levels: u32) -> u64 {
    let mut va = rng.next() & 0xfff;
    for level in 1..=levels {
        va |= (rng.next() % FANOUT) << (12 + 9 * (level - 1));
    }
    if rng.chance(5) {
        va |= 1 << 47; // non-canonical under 4-level paging, fine under 5-level
    }
    if rng.chance(30) {
        // The upper half: sign-extend.
        let top = 12 + 9 * levels - 1;
        va |= u64::MAX << top;
    }
    va
}

fn access(bits: u8) -> Access {
    let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch][usize::from(bits % 3)];
    let privilege = [
        Privilege::User,
        Privilege::Supervisor,
        Privilege::ImplicitSupervisor,
    ][usize::from((bits / 3) % 3)];
    Access::new(kind, privilege)
}

fn config(level5: bool, root_frame: u64, flags: u16, pkru: u32, maxphy: u8) -> PagingConfig {
    let mode = if level5 {
        PagingMode::Level5
    } else {
        PagingMode::Level4
    };
    let mut cfg = PagingConfig::new(mode, root_frame << 12);
    cfg.write_protect = flags & 1 != 0;
    cfg.nxe = flags & 2 != 0;
    cfg.smep = flags & 4 != 0;
    cfg.smap = flags & 8 != 0;
    cfg.pke = flags & 16 != 0;
    cfg.pks = flags & 32 != 0;
    cfg.alignment_check = flags & 64 != 0;
    cfg.amd = flags & 128 != 0;
    cfg.gbpages = flags & 256 != 0;
    cfg.set_accessed_dirty = flags & 512 != 0;
    cfg.pkru = pkru;
    cfg.pkrs = pkru.rotate_left(7);
    cfg.max_phys_bits = maxphy;
    cfg
}

fn two_region_mmap() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), (RAM / 2) as usize),
        (GuestAddress(RAM / 2), (RAM / 2) as usize),
    ])
    .unwrap()
}

/// Runs every (address, access) through the fast and the detailed walk over two copies of
/// the same memory and compares results and memory.
fn fast_equals_detailed<M: PhysMemory>(
    make: impl Fn() -> M,
    seed: u64,
    cfg: PagingConfig,
    walks: &[(u64, u8)],
) -> Result<(), TestCaseError> {
    let fast_mem = make();
    let slow_mem = make();
    for (addr, value) in image(seed) {
        fast_mem.write_u64(addr, value).unwrap();
        slow_mem.write_u64(addr, value).unwrap();
    }
    let walker = Walker::new(cfg);
    let levels = cfg.mode.levels();
    for &(addr_seed, access_bits) in walks {
        let va = address(&mut XorShift(addr_seed | 1), levels);
        let a = access(access_bits);
        // The GPA-only fast path (it reads, never writes): when it answers, it answers
        // what the full walk does.
        let gpa_only = walker.fast_translate(&fast_mem, va, a);
        // `translate` (fast path first) and the detailed walk: the whole result, field by
        // field, and (below) the memory they leave behind.
        let fast = walker.translate(&fast_mem, va, a);
        let slow = walker.translate_with(&mut DirectTables(&slow_mem), va, a);
        prop_assert_eq!(fast, slow, "va {:#x} {:?}", va, a);
        if let Some(gpa) = gpa_only {
            prop_assert_eq!(Ok(gpa), slow.map(|t| t.gpa), "va {:#x} {:?}", va, a);
        }
    }
    for addr in (0..RAM).step_by(8) {
        prop_assert_eq!(
            fast_mem.read_u64(addr),
            slow_mem.read_u64(addr),
            "{:#x}",
            addr
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn fast_walk_equals_detailed_walk(
        seed in any::<u64>(),
        level5 in any::<bool>(),
        root_frame in 0..18u64,
        flags in any::<u16>(),
        pkru in any::<u32>(),
        maxphy in prop::sample::select(vec![36u8, 40, 46, 52]),
        walks in prop::collection::vec((any::<u64>(), any::<u8>()), 1..48),
    ) {
        let cfg = config(level5, root_frame, flags, pkru, maxphy);
        fast_equals_detailed(|| FlatMemory::new(0, RAM as usize), seed, cfg, &walks)?;
        fast_equals_detailed(two_region_mmap, seed, cfg, &walks)?;
    }

    #[test]
    fn tlb_equals_direct_walk(
        seed in any::<u64>(),
        level5 in any::<bool>(),
        root_frame in 0..4u64,
        separate_roots in any::<bool>(),
        structural in any::<u16>(),
        configs in prop::collection::vec((any::<u16>(), any::<u32>()), 1..4),
        ops in prop::collection::vec((any::<u64>(), any::<u8>(), 0..4u16, 0..16u8), 1..120),
    ) {
        let mem = FlatMemory::new(0, RAM as usize);
        for (addr, value) in image(seed) {
            // With one address space per PCID, global entries (which the architecture
            // lets every PCID use) would legitimately differ from the walk: leave them out.
            let value = if separate_roots { value & !GLOBAL } else { value };
            mem.write_u64(addr, value).unwrap();
        }
        // No A/D updates: the tables stay as they are, so every answer must equal a walk
        // under the control registers of the moment, whatever the TLB holds. Only what a
        // hit re-checks changes between accesses (WP, SMEP, SMAP, AC, PKE, PKS, PKRU,
        // PKRS); NXE, the vendor and 1 GiB page support decide how entries are read.
        let rechecked = 1 | 4 | 8 | 16 | 32 | 64;
        // Either one address space shared by all PCIDs, or one per PCID (its own CR3).
        let walkers: Vec<Vec<Walker>> = (0..4u64)
            .map(|pcid| {
                let root = if separate_roots { root_frame + 4 * pcid } else { root_frame };
                configs
                    .iter()
                    .map(|&(flags, pkru)| {
                        let flags = (flags & rechecked) | (structural & (2 | 128 | 256));
                        Walker::new(config(level5, root, flags, pkru, 52))
                    })
                    .collect()
            })
            .collect();
        let levels = if level5 { 5 } else { 4 };
        let mut tlb = Tlb::new(16);
        let mut last_va = 0;
        for (i, &(addr_seed, access_bits, pcid, op)) in ops.iter().enumerate() {
            // A small pool of addresses, so pages come back under other PCIDs and configs.
            let va = address(&mut XorShift(seed ^ (addr_seed % 8) | 1), levels);
            match op {
                0 => {
                    tlb.invlpg(pcid, last_va);
                    prop_assert_eq!(tlb.lookup(pcid, last_va), None);
                    let walker = &walkers[usize::from(pcid)][0];
                    let r = tlb.translate(walker, &mem, pcid, last_va, Access::supervisor_read());
                    prop_assert!(r.map_or(true, |t| !t.hit), "hit after INVLPG");
                }
                1 => tlb.invpcid_address(pcid, last_va),
                2 => tlb.invpcid_single(pcid),
                3 => tlb.flush_non_global(),
                4 => {
                    tlb.flush_all();
                    prop_assert_eq!(tlb.lookup(pcid, last_va), None);
                }
                5 => tlb.mov_cr3(pcid, access_bits & 1 != 0),
                _ => {
                    let walker = &walkers[usize::from(pcid)][i % configs.len()];
                    let a = access(access_bits);
                    let before = tlb.stats();
                    // Half the time through the GPA-only hot path first.
                    let fast = if i % 2 == 0 {
                        tlb.fast_translate(walker, pcid, va, a)
                    } else {
                        None
                    };
                    let cached = match fast {
                        Some(gpa) => Ok(vmkit_paging::tlb::TlbTranslation {
                            gpa,
                            page_size: PageSize::Size4K,
                            hit: true,
                        }),
                        None => tlb.translate(walker, &mem, pcid, va, a),
                    };
                    let direct = walker.translate(&mem, va, a);
                    match (&cached, &direct) {
                        (Ok(c), Ok(d)) => {
                            prop_assert_eq!(c.gpa, d.gpa);
                            prop_assert_eq!(c.page_size, d.page_size());
                        }
                        (Err(c), Err(d)) => prop_assert_eq!(c.error_code(), d.error_code()),
                        _ => prop_assert!(false, "TLB {:?} vs walk {:?}", cached, direct),
                    }
                    let after = tlb.stats();
                    prop_assert_eq!(after.hits + after.misses, before.hits + before.misses + 1);
                    if let Ok(c) = &cached {
                        prop_assert_eq!(c.hit, after.hits == before.hits + 1);
                    }
                    if let Some((gpa, size, _)) = tlb.lookup(pcid, va) {
                        // Whatever is cached for `va` now must be what a walk says.
                        let d = walker.translate(&mem, va, Access::new(AccessKind::Read, Privilege::Supervisor));
                        if let Ok(d) = d {
                            prop_assert_eq!((gpa, size), (d.gpa, d.page_size()));
                        }
                    }
                    last_va = va;
                }
            }
        }
    }
}
