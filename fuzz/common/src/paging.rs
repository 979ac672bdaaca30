//! Seeds and input decoding for the vmkit-paging fuzz targets.
//!
//! `paging_walk`: the fuzzer's bytes are a vCPU paging state plus a physical memory image
//! that is walked as page tables - guest tables in every mode, EPT tables, and the nested
//! walk over both - through the walker, the software TLB and the page-walk caches. Nothing
//! may panic, every walk must stay bounded (at most 5 guest references; 35 nested per
//! attempt, with at most `MAX_RETRIES` restarts), and the TLB must agree with a direct walk.
//!
//! Input layout (little endian):
//! ```text
//! 0      mode (low 2 bits: 32-bit, PAE, 4-level, 5-level), EPT levels (bit 2: 5-level)
//! 1      flags: WP NXE SMEP SMAP PKE PKS AC AMD (bit 0..7)
//! 2      MAXPHYADDR - 32 (mod 21)
//! 3      access: kind (mod 3), privilege (bits 2..3, mod 3), EPT A/D (bit 4), MBEC (bit 5)
//! 4..8   PKRU
//! 8..12  IA32_PKRS
//! 12..20 linear address
//! 20..28 CR3
//! 28..36 EPTP root (low 12 bits ignored)
//! 36..   physical memory image at address 0 (at most 64 KiB)
//! ```

use std::path::Path;

use vmkit_paging::shadow::{ShadowMmu, ShadowOutcome};

use vmkit_paging::builder::{BumpAllocator, MapFlags, PageSize, PageTableBuilder, PagingFormat};
use vmkit_paging::ept::{EptConfig, EptWalker};
use vmkit_paging::nested::{NestedCaches, NestedWalker};
use vmkit_paging::tlb::Tlb;
use vmkit_paging::walk::{Access, AccessKind, PagingConfig, PagingMode, Privilege, Walker};
use vmkit_paging::{FlatMemory, GuestAddress, PhysMemory};

/// Name of the page-walk fuzz target (and of its seed directory).
pub const PAGING_WALK: &str = "paging_walk";

/// Name of the shadow-MMU fuzz target (and of its seed directory).
pub const PAGING_SHADOW: &str = "paging_shadow";

const HEADER: usize = 36;
const MAX_IMAGE: usize = 64 << 10;

fn u32_at(d: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&d[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(d: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Runs one fuzz input (see the module docs for the layout). Panics only on a bug.
pub fn walk_bytes(data: &[u8]) {
    if data.len() < HEADER {
        return;
    }
    let image = &data[HEADER..data.len().min(HEADER + MAX_IMAGE)];
    let mem = FlatMemory::from_bytes(0, image);
    let mode = [
        PagingMode::Legacy32,
        PagingMode::Pae,
        PagingMode::Level4,
        PagingMode::Level5,
    ][usize::from(data[0] & 3)];
    let flags = data[1];
    let mut cfg = PagingConfig::new(mode, u64_at(data, 20));
    cfg.write_protect = flags & 1 != 0;
    cfg.nxe = flags & 2 != 0;
    cfg.smep = flags & 4 != 0;
    cfg.smap = flags & 8 != 0;
    cfg.pke = flags & 16 != 0;
    cfg.pks = flags & 32 != 0;
    cfg.alignment_check = flags & 64 != 0;
    cfg.amd = flags & 128 != 0;
    cfg.max_phys_bits = 32 + data[2] % 21;
    cfg.pkru = u32_at(data, 4);
    cfg.pkrs = u32_at(data, 8);
    let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch][usize::from(data[3] % 3)];
    let privilege = [
        Privilege::User,
        Privilege::Supervisor,
        Privilege::ImplicitSupervisor,
    ][usize::from((data[3] >> 2) % 3)];
    let access = Access::new(kind, privilege);
    let va = u64_at(data, 12);

    let walker = Walker::new(cfg);
    let direct = walker.translate(&mem, va, access);
    if let Ok(t) = &direct {
        assert!(t.memory_refs() <= 5, "unbounded guest walk: {t:?}");
        assert_eq!(
            t.gpa & (t.page_size().bytes() - 1),
            va & (t.page_size().bytes() - 1)
        );
    }
    // The TLB: a miss then a hit must agree with a direct walk. Without A/D updates the
    // memory cannot change between them (with them, an A bit set through one alias can turn
    // into a reserved bit of another - a PAE PDPTE - which is real hardware behaviour).
    let mut quiet = cfg;
    quiet.set_accessed_dirty = false;
    let quiet = Walker::new(quiet);
    let reference = quiet.translate(&mem, va, access);
    let mut tlb = Tlb::new(16);
    for _ in 0..2 {
        let cached = tlb.translate(&quiet, &mem, 0, va, access);
        match (&reference, &cached) {
            (Ok(d), Ok(c)) => assert_eq!(d.gpa, c.gpa, "TLB disagrees with the walk"),
            (Err(d), Err(c)) => assert_eq!(d.error_code(), c.error_code()),
            _ => panic!("TLB {cached:?} vs walk {reference:?}"),
        }
    }
    tlb.invlpg(0, va);

    // EPT over the same image, then the 2-D walk with and without caches.
    let ept_levels: u64 = if data[0] & 4 != 0 { 4 } else { 3 };
    // The root below MAXPHYADDR, except in a quarter of the inputs, which keep whatever
    // address bits they have (EptWalker::new must refuse the reserved ones).
    let root_mask = if data[3] & 0xc0 == 0xc0 {
        0x000f_ffff_ffff_f000
    } else {
        vmkit_paging::entry::bits(u32::from(cfg.max_phys_bits.clamp(32, 52)) - 1, 12)
    };
    let mut eptp = (u64_at(data, 28) & root_mask) | 6 | ept_levels << 3;
    if data[3] & 16 != 0 {
        eptp |= 1 << 6;
    }
    let mut ecfg = EptConfig::new(eptp);
    ecfg.mbec = data[3] & 32 != 0;
    ecfg.max_phys_bits = cfg.max_phys_bits;
    let Ok(ept) = EptWalker::new(ecfg) else {
        return;
    };
    if let Ok(t) = ept.translate(&mem, va, vmkit_paging::ept::EptAccess::read()) {
        assert!(t.memory_refs <= 5);
    }
    let nested = NestedWalker::new(walker, ept);
    let mut caches = NestedCaches::new(8);
    for c in [None, Some(&mut caches)] {
        if let Ok(t) = nested.translate(&mem, va, access, c) {
            // 35 per attempt (5x5); a walk restarts at most MAX_RETRIES times when its own
            // A-bit updates change aliased entries under it.
            let bound = 35 * (vmkit_paging::walk::MAX_RETRIES + 1);
            assert!(t.memory_refs <= bound, "unbounded nested walk: {t:?}");
        }
    }
}

fn header(mode: u8, flags: u8, access: u8, va: u64, cr3: u64, eptp: u64) -> Vec<u8> {
    let mut h = vec![mode, flags, 20, access];
    h.extend(0u32.to_le_bytes());
    h.extend(0u32.to_le_bytes());
    h.extend(va.to_le_bytes());
    h.extend(cr3.to_le_bytes());
    h.extend(eptp.to_le_bytes());
    h
}

fn image(mem: &FlatMemory, len: u64) -> Vec<u8> {
    (0..len)
        .step_by(8)
        .flat_map(|a| mem.read_u64(a).unwrap_or(0).to_le_bytes())
        .collect()
}

/// The seed inputs: (file name, bytes). Valid tables for every mode, EPT, and a
/// recursive mapping, built with the vmkit-paging builder.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let formats = [
        (0u8, PagingFormat::Legacy32),
        (1, PagingFormat::Pae),
        (2, PagingFormat::Level4),
        (3 | 4, PagingFormat::Level5),
    ];
    for (mode, format) in formats {
        let mem = FlatMemory::new(0, 0x10000);
        let mut alloc = BumpAllocator::new(GuestAddress(0x1000), GuestAddress(0xc000));
        let mut b = PageTableBuilder::new(&mem, format, &mut alloc).expect("frames");
        b.set_max_page_size(PageSize::Size4K);
        b.map(
            0x40_0000,
            GuestAddress(0xc000),
            0x2000,
            MapFlags::WRITABLE | MapFlags::USER,
        )
        .expect("map");
        b.set_max_page_size(PageSize::Size2M);
        b.map(0x80_0000, GuestAddress(0x40_0000), 4 << 20, MapFlags::USER)
            .expect("large map");
        let root = b.root().0;
        // EPT for the same image: identity for the first 64 KiB.
        let ept_format = if mode & 4 != 0 {
            PagingFormat::Ept5
        } else {
            PagingFormat::Ept4
        };
        let mut e = PageTableBuilder::new(&mem, ept_format, &mut alloc).expect("frames");
        e.set_max_page_size(PageSize::Size4K);
        e.map(0, GuestAddress(0), 0x10000, MapFlags::WRITABLE)
            .expect("ept map");
        let eptp = e.root().0;
        for (i, access) in [0x00u8, 0x01, 0x06, 0x12].into_iter().enumerate() {
            let mut input = header(mode, 0x03, access, 0x40_1234, root, eptp);
            input.extend(image(&mem, 0x10000));
            out.push((format!("{format:?}-{i}").to_lowercase(), input));
        }
    }
    // A recursive 4-level mapping: PML4[511] points at the PML4.
    let mem = FlatMemory::new(0, 0x2000);
    mem.write_u64(0x1000 + 511 * 8, 0x1000 | 3)
        .expect("in range");
    let mut input = header(2, 0x03, 0x04, 0xffff_ffff_ffff_f000, 0x1000, 0x1000);
    input.extend(image(&mem, 0x2000));
    out.push(("recursive-pml4".into(), input));
    out
}

/// Writes the seed corpora of the vmkit-paging fuzz targets under `dir`.
pub fn write_seeds(dir: &Path) -> std::io::Result<()> {
    crate::write_corpus(dir, PAGING_WALK, seeds())?;
    crate::write_corpus(dir, PAGING_SHADOW, shadow_seeds())
}

// --- paging_shadow ---------------------------------------------------------------------
//
// The fuzzer's bytes are a guest paging state, a sequence of guest events and a guest
// memory image (its page tables, hostile or not); the events drive a `ShadowMmu`. Nothing
// may panic or hang, and whatever the tables say, every host address the shadow hands out
// - through `access` or by walking the shadow tables - lies in guest RAM (the image) at the
// page offset of the linear address: a hostile guest must not reach other host memory.
//
// Layout (little endian):
//   0        mode (low 2 bits: 32-bit, PAE, 4-level, 5-level)
//   1        flags: WP NXE SMEP SMAP PKE AC (bits 0..5)
//   2        number of events (at most SHADOW_EVENTS)
//   3..8     unused
//   8..16    CR3
//   16..     SHADOW_EVENTS events of 24 bytes: kind, access (kind mod 3, bit 2: user),
//            flag, 5 unused, arg1 (u64), arg2 (u64)
//   then     guest memory image at GPA 0 (at most 64 KiB)
//
// Events (kind mod 7): 0 access arg1; 1 the VMM emulated a guest store of arg2 to the
// table entry at arg1 (within the image) and reports it; 2 CR3 := arg1 (PCID arg2 & 0xfff,
// no-flush flag bit 0); 3 flush; 4 zap all; 5 new control registers (flag bits as in the
// header byte 1; mode arg1 & 3); 6 a guest store at arg1 through the MMU (a page-table
// write fault), then the store and a flush.

const SHADOW_HEADER: usize = 16;
const SHADOW_EVENT: usize = 24;
/// Events per input.
pub const SHADOW_EVENTS: usize = 24;
const SHADOW_IMAGE_AT: usize = SHADOW_HEADER + SHADOW_EVENTS * SHADOW_EVENT;
/// Where guest RAM is in "host-physical" space (the shadow's leaves point there).
const SHADOW_HOST_OFFSET: u64 = 0x1_0000_0000;
/// Shadow tables live in their own memory, below 4 GiB (PAE-format roots need it).
const SHADOW_MEM: u64 = 0x4000_0000;
const SHADOW_MEM_LEN: usize = 256 << 10;

const MODES: [PagingMode; 4] = [
    PagingMode::Legacy32,
    PagingMode::Pae,
    PagingMode::Level4,
    PagingMode::Level5,
];

fn apply_flags(cfg: &mut PagingConfig, flags: u8) {
    cfg.write_protect = flags & 1 != 0;
    cfg.nxe = flags & 2 != 0;
    cfg.smep = flags & 4 != 0;
    cfg.smap = flags & 8 != 0;
    cfg.pke = flags & 16 != 0;
    cfg.alignment_check = flags & 32 != 0;
    cfg.pks = flags & 64 != 0;
    // Write-disable (and, for odd keys, access-disable) for keys 1-15 in both registers.
    let keys = if flags & 128 != 0 { 0xbbbb_bbb8 } else { 0 };
    cfg.pkru = keys;
    cfg.pkrs = keys;
}

fn shadow_access(byte: u8) -> Access {
    let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch][usize::from(byte % 3)];
    let privilege = if byte & 4 != 0 {
        Privilege::User
    } else {
        Privilege::Supervisor
    };
    Access::new(kind, privilege)
}

/// Runs one `paging_shadow` input (layout in the comment above). Panics only on a bug.
pub fn shadow_bytes(data: &[u8]) {
    if data.len() < SHADOW_IMAGE_AT + 8 {
        return;
    }
    let image = &data[SHADOW_IMAGE_AT..data.len().min(SHADOW_IMAGE_AT + MAX_IMAGE)];
    let ram = (image.len() & !7) as u64;
    let guest = FlatMemory::from_bytes(0, &image[..ram as usize]);
    let shadow = FlatMemory::new(SHADOW_MEM, SHADOW_MEM_LEN);
    // Guest RAM is the image's whole pages (the host map is page-granular).
    let ram_end = ram & !0xfff;
    let host = move |gpa: u64| (gpa < ram_end).then_some(gpa + SHADOW_HOST_OFFSET);
    let mut cfg = PagingConfig::new(MODES[usize::from(data[0] & 3)], u64_at(data, 8));
    apply_flags(&mut cfg, data[1]);
    let alloc = BumpAllocator::new(
        GuestAddress(SHADOW_MEM),
        GuestAddress(SHADOW_MEM + SHADOW_MEM_LEN as u64),
    );
    let Ok(mut mmu) = ShadowMmu::new(cfg, &guest, &shadow, alloc, host) else {
        return;
    };
    // Every host address handed out must be guest RAM at the linear address's page offset.
    let in_ram = |va: u64, hpa: u64| {
        assert!(
            hpa >= SHADOW_HOST_OFFSET && hpa - SHADOW_HOST_OFFSET < ram_end,
            "host address {hpa:#x} for {va:#x} is outside guest RAM"
        );
        assert_eq!(hpa & 0xfff, va & 0xfff, "page offset of {va:#x}");
    };
    let entry_len = if cfg.mode == PagingMode::Legacy32 {
        4
    } else {
        8
    };
    let events = usize::from(data[2]).min(SHADOW_EVENTS);
    for e in data[SHADOW_HEADER..SHADOW_HEADER + events * SHADOW_EVENT].chunks_exact(SHADOW_EVENT) {
        let (kind, access, flag) = (e[0] % 7, shadow_access(e[1]), e[2]);
        let (arg1, arg2) = (u64_at(e, 8), u64_at(e, 16));
        match kind {
            0 => {
                if let Ok(Ok(hpa)) = mmu.access(arg1, access) {
                    in_ram(arg1, hpa);
                }
                if let Ok(hpa) = mmu.translate(arg1, access) {
                    in_ram(arg1, hpa);
                }
            }
            1 | 6 if ram >= entry_len => {
                let at = (arg1 % ram) & !(entry_len - 1);
                if kind == 6 {
                    // The store goes through the shadow: it may fault on a write-protected
                    // table (unsync or zap), need emulation, or be the guest's own fault.
                    let _ = mmu.access(arg1, Access::supervisor_write());
                }
                if entry_len == 4 {
                    let _ = guest.write_u32(at, arg2 as u32);
                } else {
                    let _ = guest.write_u64(at, arg2);
                }
                mmu.guest_table_written(at, entry_len);
                if kind == 6 {
                    mmu.flush();
                }
            }
            2 => {
                let _ = mmu.set_cr3(arg1, (arg2 & 0xfff) as u16, flag & 1 != 0);
            }
            3 if flag & 2 != 0 => mmu.invlpg(arg1),
            3 => mmu.flush(),
            4 => mmu.zap_all(),
            5 => {
                let mut c = *mmu.guest_walker().config();
                c.mode = MODES[(arg1 & 3) as usize];
                apply_flags(&mut c, flag);
                let _ = mmu.set_paging_config(c);
            }
            _ => {}
        }
        // An access after every event, through the shadow tables alone: whatever they let
        // through, the guest's own tables (walked without touching A/D, with the MMU's
        // control registers and PDPTE registers) must allow, to the same page.
        if let Ok(hpa) = mmu.translate(arg1, access) {
            in_ram(arg1, hpa);
            let mut quiet = *mmu.guest_walker().config();
            quiet.set_accessed_dirty = false;
            match Walker::new(quiet).translate(&guest, arg1, access) {
                Ok(t) => assert_eq!(
                    host(t.gpa & !0xfff),
                    Some(hpa & !0xfff),
                    "shadow and guest map {arg1:#x} differently"
                ),
                Err(f) => panic!("shadow lets {access:?} of {arg1:#x} through; the guest: {f:?}"),
            }
        }
    }
    // Outcomes are well formed: an MMIO GPA is outside RAM, an emulated store inside it.
    for va in [0x40_1234u64, 0x80_0000, 0] {
        match mmu.access(va, Access::supervisor_read()) {
            Ok(Err(ShadowOutcome::Mmio(gpa))) => {
                assert!(gpa >= ram_end, "MMIO at RAM {gpa:#x}")
            }
            Ok(Ok(hpa)) => in_ram(va, hpa),
            _ => {}
        }
        if let Ok(Err(ShadowOutcome::EmulateWrite(gpa))) =
            mmu.access(va, Access::supervisor_write())
        {
            assert!(gpa < ram_end, "emulated store outside RAM {gpa:#x}");
        }
    }
}

/// Seeds for `paging_shadow`: builder-made tables for each mode (the same as
/// `paging_walk`'s) with events that fill, write, switch, flush and zap.
pub fn shadow_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let event = |kind: u8, access: u8, flag: u8, arg1: u64, arg2: u64| {
        let mut e = vec![kind, access, flag, 0, 0, 0, 0, 0];
        e.extend(arg1.to_le_bytes());
        e.extend(arg2.to_le_bytes());
        e
    };
    for (name, walk) in seeds() {
        if name.starts_with("recursive") || !name.ends_with("-0") {
            continue;
        }
        let (mode, cr3) = (walk[0] & 3, u64_at(&walk, 20));
        let pte_area = 0x1000u64; // the first table frame the builder allocated
        let events = [
            event(0, 0, 0, 0x40_1234, 0),       // supervisor read: fill
            event(0, 1 | 4, 0, 0x40_1238, 0),   // user write: A/D, writable leaf
            event(0, 2 | 4, 0, 0x80_0000, 0),   // user fetch in the large page
            event(6, 0, 0, pte_area, 0x3_0007), // a guest store to a table page
            event(0, 0, 0, 0x40_1234, 0),
            event(1, 0, 0, pte_area + 8, 0xc067), // an emulated table write
            event(2, 0, 0, cr3, 1),               // CR3 reload with PCID 1
            event(5, 0, 0x02, u64::from(mode), 0), // CR0.WP = 0
            event(0, 1, 0, 0x40_1234, 0),         // kernel write, WP = 0
            event(0, 4, 0, 0x40_1234, 0),         // user read flips the leaf
            event(3, 0, 0, 0, 0),
            event(4, 0, 0, 0, 0),
            event(0, 0, 0, 0x40_1234, 0),
        ];
        let mut input = vec![mode, 0x03, events.len() as u8, 0, 0, 0, 0, 0];
        input.extend(cr3.to_le_bytes());
        for i in 0..SHADOW_EVENTS {
            match events.get(i) {
                Some(e) => input.extend(e),
                None => input.extend([0u8; SHADOW_EVENT]),
            }
        }
        input.extend(&walk[HEADER..]);
        out.push((format!("shadow-{name}"), input));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_seeds_run_clean_and_map_the_page() {
        let seeds = shadow_seeds();
        assert_eq!(seeds.len(), 4);
        for (name, bytes) in &seeds {
            shadow_bytes(bytes);
            // The seed's first access really goes through the shadow to the mapped page.
            let image = &bytes[SHADOW_IMAGE_AT..];
            let guest = FlatMemory::from_bytes(0, image);
            let shadow = FlatMemory::new(SHADOW_MEM, SHADOW_MEM_LEN);
            let ram = image.len() as u64;
            let cfg = PagingConfig::new(MODES[usize::from(bytes[0] & 3)], u64_at(bytes, 8));
            let mut mmu = ShadowMmu::new(
                cfg,
                &guest,
                &shadow,
                BumpAllocator::new(
                    GuestAddress(SHADOW_MEM),
                    GuestAddress(SHADOW_MEM + SHADOW_MEM_LEN as u64),
                ),
                move |gpa: u64| (gpa < ram).then_some(gpa + SHADOW_HOST_OFFSET),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            let hpa = mmu.access(0x40_1234, Access::supervisor_read());
            assert_eq!(hpa, Ok(Ok(SHADOW_HOST_OFFSET + 0xd234)), "{name}");
        }
        // Short or empty inputs are ignored.
        shadow_bytes(&[]);
        shadow_bytes(&[0; SHADOW_IMAGE_AT]);
    }

    #[test]
    fn seeds_translate_and_run_clean() {
        let seeds = seeds();
        assert_eq!(seeds.len(), 17);
        for (name, bytes) in &seeds {
            walk_bytes(bytes);
            // The seeds are meaningful: the mapped address translates in its mode.
            let mode = [
                PagingMode::Legacy32,
                PagingMode::Pae,
                PagingMode::Level4,
                PagingMode::Level5,
            ][usize::from(bytes[0] & 3)];
            if name.starts_with("recursive") {
                continue;
            }
            let mem = FlatMemory::from_bytes(0, &bytes[HEADER..]);
            let cfg = PagingConfig::new(mode, u64_at(bytes, 20));
            let t = Walker::new(cfg)
                .translate(&mem, 0x40_1234, Access::supervisor_read())
                .unwrap_or_else(|f| panic!("{name}: {f}"));
            assert_eq!(t.gpa, 0xd234, "{name}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        write_seeds(dir.path()).expect("write");
        assert_eq!(
            std::fs::read_dir(dir.path().join(PAGING_WALK))
                .unwrap()
                .count(),
            17
        );
    }

    #[test]
    fn pae_pdpte_aliased_by_a_pte_is_harmless() {
        // Found by the fuzzer: a PAE PTE that is also the PDPTE; setting its A bit sets a
        // reserved PDPTE bit, so the next walk legitimately faults.
        walk_bytes(&[
            0x01, 0x02, 0x00, 0x2d, 0x00, 0x00, 0x00, 0xf8, 0xff, 0xff, 0x06, 0x00, 0x00, 0x00,
            0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf6, 0x08, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x79,
        ]);
    }

    #[test]
    fn self_aliasing_nested_tables_restart_boundedly() {
        // Found by the fuzzer: guest entries alias each other, so setting one A bit changes
        // the next entry and the walk restarts (more than 24 references in total).
        walk_bytes(&[
            0x02, 0x3e, 0x00, 0x22, 0x00, 0x01, 0x20, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x10,
            0x20, 0x40, 0x80, 0x00, 0x00, 0x00, 0x00, 0x1c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x2a, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0xf2, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
        ]);
    }

    #[test]
    fn garbage_is_harmless() {
        walk_bytes(&[]);
        walk_bytes(&[0xff; 35]);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in [36usize, 64, 4096, 70_000] {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            walk_bytes(&bytes);
            let ones = vec![0xffu8; len];
            walk_bytes(&ones);
        }
    }
}
