//! Differential test: our 4-level walker against KVM's own MMU (`KVM_TRANSLATE`) on
//! randomised, deliberately messy page tables.
//!
//! Each round writes a fresh random table forest into guest memory (shared table frames,
//! loops back to the root, entries pointing outside RAM or above MAXPHYADDR, reserved bits,
//! large pages where they are and are not allowed, ignored bits) and random control-register
//! settings (CR0.WP, CR4.SMEP/SMAP, EFER.NXE, EFLAGS.AC), then translates ~1000 addresses
//! that mostly follow populated entries. KVM_TRANSLATE performs a supervisor read at the
//! vCPU's CPL (0 here), so that is the access we check; it reports address and validity.
//!
//! Where the CPU offers 5-level paging (CPUID.7.ECX.LA57: not on the CI host's software KVM,
//! but in the nested L1 of tests/linux-guest/paging-nested.sh), every other round runs with
//! CR4.LA57 and 57-bit addresses instead.
//!
//! Run length: `VMKIT_PAGING_KVM_CASES` (default 100,000) - set it to millions for a long
//! run. The test fails (it does not skip) when /dev/kvm exists but cannot be used.

use std::path::Path;

use kvm_bindings::{kvm_sregs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmkit_paging::walk::{Access, PagingConfig, PagingMode, Walker};
use vmkit_paging::PhysMemory;

const RAM: u64 = 32 << 20;
const POOL_FRAMES: u64 = 48;
const ROOT: u64 = 0x1000;
const ADDRS_PER_ROUND: usize = 1000;

/// xorshift64*: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

struct CpuCaps {
    max_phys_bits: u8,
    amd: bool,
    gbpages: bool,
    nx: bool,
    smep: bool,
    smap: bool,
    la57: bool,
}

fn setup_cpuid(kvm: &Kvm, vcpu: &VcpuFd) -> CpuCaps {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");
    // This KVM's MMU enforces SMEP and SMAP even where its supported CPUID does not list
    // them (see shared/MACHINE.md); advertise them so CR4 accepts the bits.
    for e in cpuid.as_mut_slice() {
        if e.function == 7 && e.index == 0 {
            e.ebx |= 1 << 7 | 1 << 20;
        }
    }
    vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
    let find = |leaf: u32| {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == leaf && e.index == 0)
            .copied()
    };
    let vendor = find(0).map(|e| e.ebx).unwrap_or(0);
    let ext1 = find(0x8000_0001).map(|e| e.edx).unwrap_or(0);
    let leaf7 = find(7).map(|e| e.ebx).unwrap_or(0);
    let leaf7_ecx = find(7).map(|e| e.ecx).unwrap_or(0);
    CpuCaps {
        max_phys_bits: find(0x8000_0008).map_or(36, |e| (e.eax & 0xff) as u8),
        amd: vendor == u32::from_le_bytes(*b"Auth") || vendor == u32::from_le_bytes(*b"Hygo"),
        gbpages: ext1 & (1 << 26) != 0,
        nx: ext1 & (1 << 20) != 0,
        smep: leaf7 & (1 << 7) != 0,
        smap: leaf7 & (1 << 20) != 0,
        la57: leaf7_ecx & (1 << 16) != 0,
    }
}

fn long_mode_sregs(
    mut s: kvm_sregs,
    wp: bool,
    nxe: bool,
    smep: bool,
    smap: bool,
    la57: bool,
) -> kvm_sregs {
    s.cr3 = ROOT;
    s.cr4 = 1 << 5
        | if smep { 1 << 20 } else { 0 }
        | if smap { 1 << 21 } else { 0 }
        | if la57 { 1 << 12 } else { 0 };
    s.cr0 = 1 | 1 << 4 | 1 << 31 | if wp { 1 << 16 } else { 0 };
    s.efer = 1 << 8 | 1 << 10 | if nxe { 1 << 11 } else { 0 };
    s.cs.base = 0;
    s.cs.limit = 0xffff_ffff;
    s.cs.selector = 8;
    s.cs.type_ = 0xb;
    s.cs.present = 1;
    s.cs.dpl = 0;
    s.cs.db = 0;
    s.cs.s = 1;
    s.cs.l = 1;
    s.cs.g = 1;
    for seg in [&mut s.ds, &mut s.es, &mut s.ss, &mut s.fs, &mut s.gs] {
        seg.base = 0;
        seg.limit = 0xffff_ffff;
        seg.selector = 16;
        seg.type_ = 3;
        seg.present = 1;
        seg.dpl = 0;
        seg.db = 1;
        seg.s = 1;
        seg.g = 1;
    }
    s
}

/// Fills the table pool with random entries at the round's hot indices.
fn random_tables(mem: &GuestMemoryMmap, rng: &mut Rng, hot: &[u64], caps: &CpuCaps) {
    for frame in 1..=POOL_FRAMES {
        mem.zero_frame(frame * 0x1000).unwrap();
    }
    for frame in 1..=POOL_FRAMES {
        for &index in hot {
            if rng.chance(5) {
                continue;
            }
            let entry = random_entry(rng, caps);
            mem.write_u64(frame * 0x1000 + index * 8, entry).unwrap();
        }
    }
}

fn random_entry(rng: &mut Rng, caps: &CpuCaps) -> u64 {
    let mut e = match rng.below(100) {
        // Another table of the pool (the root included: loops and sharing).
        0..=87 => (1 + rng.below(POOL_FRAMES)) * 0x1000,
        // A 2 MiB / 1 GiB aligned frame inside RAM (for large pages).
        88..=94 => rng.below(RAM >> 21) << 21,
        // Beyond RAM but below MAXPHYADDR.
        95..=97 => (RAM + rng.below(1 << 20) * 0x1000) & ((1 << caps.max_phys_bits) - 1),
        // Anywhere in the 52-bit address field (often above MAXPHYADDR: reserved).
        _ => rng.next() & 0x000f_ffff_ffff_f000,
    };
    if rng.chance(96) {
        e |= 1; // P
    }
    if rng.chance(75) {
        e |= 1 << 1; // R/W
    }
    if rng.chance(75) {
        e |= 1 << 2; // U/S
    }
    e |= rng.next() & 0x78; // PWT, PCD, A, D
    if rng.chance(15) {
        e |= 1 << 7; // PS: large page where allowed, reserved elsewhere
    }
    if rng.chance(8) {
        e |= 1 << 8; // G: reserved in AMD non-leaf PML4Es/PDPTEs
    }
    e |= rng.next() & 0xe00; // available bits 11:9
    if rng.chance(20) {
        e |= 1 << 63; // XD
    }
    if rng.chance(10) {
        e |= rng.next() & (0x7ff << 52); // ignored bits 62:52 / protection key
    }
    if rng.chance(3) {
        e |= 1 << (12 + rng.below(18)); // bits 29:12: reserved in some large pages
    }
    e
}

fn random_address(rng: &mut Rng, hot: &[u64], levels: u32) -> u64 {
    let mut va = 0u64;
    for level in (1..=levels).rev() {
        let index = loop {
            let i = if rng.chance(95) {
                hot[rng.below(hot.len() as u64) as usize]
            } else {
                rng.below(512)
            };
            // PML4 slot 256 is PVM's reserved range: keep out of it.
            if !(level == 4 && i == 256) {
                break i;
            }
        };
        va |= index << (12 + 9 * (level - 1));
    }
    va |= rng.below(0x1000) & !7;
    // Sign-extend the top bit (47, or 56 with LA57): canonical addresses only
    // (KVM_TRANSLATE ignores the bits above).
    let unused = 64 - (12 + 9 * levels);
    ((va << unused) as i64 >> unused) as u64
}

#[test]
fn walker_matches_kvm_translate() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("/dev/kvm does not exist: skipping the KVM differential test");
        return;
    }
    let cases: u64 = std::env::var("VMKIT_PAGING_KVM_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let seed: u64 = std::env::var("VMKIT_PAGING_KVM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_1234_abcd_0001);

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let kvm = Kvm::new().expect("/dev/kvm exists but cannot be opened");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: RAM,
        userspace_addr: host as u64,
    };
    // SAFETY: `host` is the start of a live RAM-sized mapping owned by `mem`, which is declared
    // before `vm` and therefore outlives it; KVM only reads/writes inside that mapping.
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let caps = setup_cpuid(&kvm, &vcpu);
    // A run that exists to cover these (tests/linux-guest/paging-nested.sh) must not pass
    // quietly on a CPU that lost them: VMKIT_PAGING_REQUIRE=la57,1g. `pku` is checked by
    // crates/vmkit-vcpu/tests/paging_oracle.rs (its guest's protection-key probes), which
    // shares the variable; this test draws no keys, so it only accepts the name.
    let required = std::env::var("VMKIT_PAGING_REQUIRE").unwrap_or_default();
    for need in required.split(',').filter(|n| !n.is_empty()) {
        let have = match need {
            "la57" => caps.la57,
            "1g" => caps.gbpages,
            "pku" => continue,
            other => panic!("VMKIT_PAGING_REQUIRE: unknown feature `{other}` (la57, 1g, pku)"),
        };
        assert!(
            have,
            "VMKIT_PAGING_REQUIRE asks for {need}, which this KVM does not offer"
        );
    }
    let base_sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");

    let mut rng = Rng(seed);
    let mut done = 0u64;
    let mut valid = 0u64;
    let mut mismatches = Vec::new();
    let mut round = 0u64;
    let mut la57_done = 0u64;
    while done < cases {
        round += 1;
        let mut hot: Vec<u64> = (0..12).map(|_| rng.below(512)).collect();
        hot.extend([0, 1, 511]);
        random_tables(&mem, &mut rng, &hot, &caps);

        let wp = rng.chance(50);
        let nxe = caps.nx && rng.chance(70);
        let smep = caps.smep && rng.chance(50);
        let smap = caps.smap && rng.chance(50);
        let ac = rng.chance(50);
        let la57 = caps.la57 && round % 2 == 0;
        vcpu.set_sregs(&long_mode_sregs(base_sregs, wp, nxe, smep, smap, la57))
            .expect("KVM_SET_SREGS (long mode)");
        let mut regs = vcpu.get_regs().expect("KVM_GET_REGS");
        regs.rflags = 2 | if ac { 1 << 18 } else { 0 };
        vcpu.set_regs(&regs).expect("KVM_SET_REGS");

        let mode = if la57 {
            PagingMode::Level5
        } else {
            PagingMode::Level4
        };
        let mut cfg = PagingConfig::new(mode, ROOT);
        cfg.write_protect = wp;
        cfg.nxe = nxe;
        cfg.smep = smep;
        cfg.smap = smap;
        cfg.alignment_check = ac;
        cfg.max_phys_bits = caps.max_phys_bits;
        cfg.gbpages = caps.gbpages;
        cfg.amd = caps.amd;
        let walker = Walker::new(cfg);

        for _ in 0..ADDRS_PER_ROUND {
            let va = random_address(&mut rng, &hot, if la57 { 5 } else { 4 });
            la57_done += u64::from(la57);
            let kvm_result = vcpu.translate_gva(va).expect("KVM_TRANSLATE");
            let ours = walker.translate(&mem, va, Access::supervisor_read());
            let theirs = (kvm_result.valid != 0).then_some(kvm_result.physical_address);
            let mine = ours.as_ref().ok().map(|t| t.gpa);
            if theirs.is_some() {
                valid += 1;
            }
            if mine != theirs && mismatches.len() < 20 {
                mismatches.push(format!(
                    "round {round} va {va:#x} la57={la57} wp={wp} nxe={nxe} smep={smep} smap={smap} ac={ac}: \
                     kvm {theirs:x?}, ours {ours:x?}"
                ));
            } else if mine != theirs {
                mismatches.push(String::new());
            }
            done += 1;
        }
    }
    eprintln!(
        "{done} translations ({la57_done} with 5-level paging) in {round} random table sets, \
         {valid} valid, {} mismatches (MAXPHYADDR {}, amd {}, 1G {}, nx {}, smep {}, smap {})",
        mismatches.len(),
        caps.max_phys_bits,
        caps.amd,
        caps.gbpages,
        caps.nx,
        caps.smep,
        caps.smap
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches, first ones:\n{}",
        mismatches.len(),
        mismatches
            .iter()
            .filter(|m| !m.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The generator must exercise both outcomes in bulk, or the comparison proves little.
    assert!(
        valid > done / 10,
        "too few valid translations: {valid}/{done}"
    );
    assert!(valid < done * 9 / 10, "too few faults: {valid}/{done}");
}
