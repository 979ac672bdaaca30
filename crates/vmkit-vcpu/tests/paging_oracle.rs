//! Differential test: KVM's MMU as the oracle for `vmkit_paging::walk::Walker`.
//!
//! The paging guest (`examples/guests/src/bin/paging.rs`, whose module doc has the full
//! table) builds its own 4-level tables, GDT and TSS, sets EFER.NXE, CR0.WP, CR4.SMEP and
//! CR4.SMAP and probes, in order:
//!
//! - 0-8, supervisor: not present, read-only, no-execute, a plain write, SMAP with RFLAGS.AC
//!   clear and set, SMEP, a reserved bit in a 2 MiB PDE, a SMAP write;
//! - 9-17, user (CPL3, entered with `iretq`, back through `ud2`): a supervisor page (read and
//!   fetch), a read-only user page (write and read), a no-execute user page, not present, a
//!   writable user page, the reserved bit, a user code page;
//! - 18-21, CR0.WP = 0: supervisor writes to read-only supervisor and user pages (the latter
//!   with AC set, and with AC clear where SMAP still refuses), a user write to a read-only
//!   page (WP does not bind CPL3);
//! - 22-28, only on a CPU with PKU (CR4.PKE = 1, PKRU = 0x24: key 1 access-disabled, key 2
//!   write-disabled): user read/write/read/fetch of keyed user pages, supervisor write and
//!   read of them (AC set), and a supervisor write with CR0.WP = 0. The guest says on port
//!   0x524 whether it ran them; without PKU the test says they were skipped, unless
//!   `VMKIT_PAGING_REQUIRE` contains `pku`, which makes that a failure.
//!
//! Every #PF (CR2 and error code) arrives on ports 0x520..=0x522 and each probe's index on
//! port 0x511. After the guest halts we read the vCPU's CR0/CR3/CR4/EFER/RFLAGS, build a
//! `PagingConfig` from them, and for each probe give it the CR0.WP, RFLAGS.AC, CR4.PKE and
//! PKRU that probe ran under (the guest's state at the end only shows the last of them); the
//! walker then walks the guest's own tables in guest memory for the probe's access and
//! privilege and must reach the hardware's verdict (fault or not, CR2, every error-code
//! bit). The D bits the hardware set prove that the write probes which did not fault really
//! wrote.
//!
//! The walker runs with `set_accessed_dirty = false`, so it does not write to the tables it
//! is judging; the test checks that the table pages are byte-identical before and after.
//!
//! This test needs `/dev/kvm`; it fails (not skips) when it cannot be used.

mod common;

use common::{boot, Watchdog};
use vm_memory::{Bytes, GuestAddress};
use vmkit_paging::builder::PageSize;
use vmkit_paging::walk::{
    Access, AccessKind, Fault, FaultReason, PagingConfig, PagingMode, PfErrorCode, Privilege,
    Translation, Walker,
};
use vmkit_test_guests as guests;
use vmkit_vcpu::{Vcpu, VmExit};
use AccessKind::{Fetch, Read, Write};

/// One probe of the guest and the paging state it ran under (what the guest's module doc
/// table lists): the walker is configured the same way for its verdict.
#[derive(Debug, Clone, Copy)]
struct Probe {
    addr: u64,
    access: Access,
    /// CR0.WP during the probe.
    wp: bool,
    /// RFLAGS.AC during the probe.
    ac: bool,
    /// CR4.PKE set and PKRU = [`PKRU`] during the probe.
    pke: bool,
}

/// PKRU during the protection-key probes: key 1 access-disabled, key 2 write-disabled.
const PKRU: u32 = (1 << 2) | (1 << 5);

const fn probe(addr: u64, kind: AccessKind, privilege: Privilege) -> Probe {
    Probe {
        addr,
        access: Access::new(kind, privilege),
        wp: true,
        ac: false,
        pke: false,
    }
}
const fn sup(kind: AccessKind, addr: u64) -> Probe {
    probe(addr, kind, Privilege::Supervisor)
}
const fn user(kind: AccessKind, addr: u64) -> Probe {
    probe(addr, kind, Privilege::User)
}
const fn ac(p: Probe) -> Probe {
    Probe { ac: true, ..p }
}
const fn wp0(p: Probe) -> Probe {
    Probe { wp: false, ..p }
}
const fn pk(p: Probe) -> Probe {
    Probe { pke: true, ..p }
}

/// The guest's probes, in the order it runs them. The last [`PKU_PROBES`] run only on a CPU
/// with protection keys.
const PROBES: [Probe; 29] = [
    // Supervisor, CR0.WP = 1.
    sup(Read, 0x1ff000),     // 0: not present
    sup(Write, 0x1fe000),    // 1: read-only
    sup(Fetch, 0x1fd000),    // 2: no-execute, EFER.NXE = 1
    sup(Write, 0x1fc000),    // 3: writable: no fault
    sup(Read, 0x1fb000),     // 4: user page, SMAP
    ac(sup(Read, 0x1fb000)), // 5: user page, SMAP, but AC = 1: no fault
    sup(Fetch, 0x1fa000),    // 6: user page, SMEP
    sup(Read, 0x40a0_0000),  // 7: 2 MiB PDE with reserved bit 13
    sup(Write, 0x1fb000),    // 8: user page, SMAP, write
    // User (CPL3), CR0.WP = 1.
    user(Read, 0x1fc000),    // 9: supervisor page
    user(Write, 0x1f7000),   // 10: read-only user page
    user(Fetch, 0x1f6000),   // 11: no-execute user page
    user(Fetch, 0x1fc008),   // 12: supervisor page
    user(Read, 0x1ff000),    // 13: not present
    user(Write, 0x1fb000),   // 14: writable user page: no fault
    user(Read, 0x40a0_0000), // 15: reserved bit (supervisor 2 MiB page)
    user(Fetch, 0x1fa001),   // 16: user code page: no fault
    user(Read, 0x1f7000),    // 17: read-only user page: no fault
    // CR0.WP = 0.
    wp0(sup(Write, 0x1f4000)), // 18: read-only supervisor page: no fault
    wp0(ac(sup(Write, 0x1f7000))), // 19: read-only user page, AC = 1: no fault
    wp0(sup(Write, 0x1f7000)), // 20: user page, SMAP still applies
    wp0(user(Write, 0x1f7000)), // 21: WP does not bind CPL3
    // Protection keys (CR4.PKE = 1, PKRU = 0x24), CR0.WP = 1 unless noted.
    pk(user(Read, 0x1f3000)),          // 22: key 1 AD
    pk(user(Write, 0x1f2000)),         // 23: key 2 WD
    pk(user(Read, 0x1f2000)),          // 24: key 2 WD, read: no fault
    pk(user(Fetch, 0x1f3000)),         // 25: key 1 AD, fetch: keys do not apply
    pk(ac(sup(Write, 0x1f2000))),      // 26: supervisor write, key 2 WD, WP = 1
    pk(ac(sup(Read, 0x1f3000))),       // 27: supervisor read, key 1 AD
    pk(wp0(ac(sup(Write, 0x1f2000)))), // 28: key 2 WD, but WP = 0: no fault
];

/// How many of [`PROBES`] (at the end) need protection keys.
const PKU_PROBES: usize = 7;

/// What the hardware reported for one probe: `Some((cr2, error_code))` or no fault.
type Outcome = Option<(u64, u32)>;

/// What the guest reported: the outcome of each probe, indexed by the probe number the guest
/// reported after it, and whether it ran the protection-key probes.
struct GuestRun {
    outcomes: Vec<Outcome>,
    pku: bool,
}

/// Runs the paging guest to its halt.
fn run_guest(t: &mut common::TestVm) -> GuestRun {
    let _w = Watchdog::new(t.vcpu.kick_handle(), 20);
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut since_last_probe: Vec<(u64, u32)> = Vec::new();
    let mut pending = [0u32; 2];
    let mut status = None;
    let mut pku = None;
    loop {
        match t.vcpu.run().expect("KVM_RUN failed") {
            VmExit::IoOut { port, data } => {
                let v = u32::from_le_bytes(data.try_into().expect("the guest writes 32 bits"));
                match port {
                    0x520 | 0x521 => pending[usize::from(port - 0x520)] = v,
                    0x522 => {
                        let cr2 = u64::from(pending[0]) | u64::from(pending[1]) << 32;
                        since_last_probe.push((cr2, v));
                    }
                    0x511 => {
                        assert_eq!(v as usize, outcomes.len(), "probes out of order");
                        assert!(
                            since_last_probe.len() <= 1,
                            "probe {v} faulted more than once: {since_last_probe:x?}"
                        );
                        outcomes.push(since_last_probe.pop());
                    }
                    0x524 => {
                        assert_eq!(
                            outcomes.len(),
                            PROBES.len() - PKU_PROBES,
                            "the guest announces the protection-key probes after the others"
                        );
                        assert!(v <= 1, "port 0x524: {v:#x}");
                        pku = Some(v == 1);
                    }
                    0x523 => panic!("the guest took an unexpected exception (port 0x523: {v:#x})"),
                    0xf4 => status = Some(v),
                    other => panic!("unexpected port {other:#x} (value {v:#x})"),
                }
            }
            VmExit::Halt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(status, Some(0), "guest status");
    assert!(
        since_last_probe.is_empty(),
        "faults after the last probe: {since_last_probe:x?}"
    );
    GuestRun {
        outcomes,
        pku: pku.expect("the guest said whether it ran the protection-key probes"),
    }
}

/// The features `VMKIT_PAGING_REQUIRE` (a comma list) demands. A run that exists to cover
/// them (tests/linux-guest/paging-nested.sh) must not pass quietly on a CPU that lost them.
/// This test checks `pku` (the protection-key probes ran); `la57` and `1g` concern
/// crates/vmkit-paging/tests/kvm_translate.rs, which shares the variable.
fn required_features() -> Vec<&'static str> {
    let required = std::env::var("VMKIT_PAGING_REQUIRE").unwrap_or_default();
    required
        .split(',')
        .filter(|n| !n.is_empty())
        .map(|n| match n {
            "pku" => "pku",
            "la57" => "la57",
            "1g" => "1g",
            other => panic!("VMKIT_PAGING_REQUIRE: unknown feature `{other}` (la57, 1g, pku)"),
        })
        .collect()
}

fn supervisor(kind: AccessKind) -> Access {
    Access::new(kind, Privilege::Supervisor)
}

/// Set by tests/linux-guest/paging-nested.sh, which runs this test inside a QEMU TCG VM on its
/// nested KVM: the page faults then come from QEMU's CPU model, which reports a reserved-bit
/// #PF with RSVD alone (its `do_fault_rsvd` path in target/i386/tcg/sysemu/excp_helper.c does
/// not add P). A CPU sets P as well - P is clear only when a not-present entry caused the
/// fault (Intel SDM Vol. 3, 4.7; AMD APM Vol. 2, 8.4.2), which is what KVM's MMU and the
/// walker report - so that one bit is restored, loudly, before comparing. Nothing else is.
const QEMU_TCG_ENV: &str = "VMKIT_PAGING_ORACLE_QEMU_TCG";

/// The hardware's outcomes with QEMU TCG's known reserved-bit deviation undone (only when
/// [`QEMU_TCG_ENV`] is set).
fn undo_qemu_rsvd_deviation(hw: Vec<Outcome>) -> Vec<Outcome> {
    if std::env::var_os(QEMU_TCG_ENV).is_none() {
        return hw;
    }
    let (p, rsvd) = (PfErrorCode::PRESENT, PfErrorCode::RSVD);
    hw.into_iter()
        .enumerate()
        .map(|(i, o)| match o {
            Some((cr2, code)) if code & rsvd != 0 && code & p == 0 => {
                eprintln!(
                    "probe {i}: QEMU TCG reported RSVD without P ({code:#x}); comparing as {:#x}",
                    code | p
                );
                Some((cr2, code | p))
            }
            other => other,
        })
        .collect()
}

/// The walker's verdict in the hardware's terms.
fn verdict(result: &Result<Translation, Fault>) -> Outcome {
    match result {
        Ok(_) => None,
        Err(Fault::PageFault(pf)) => Some((pf.addr, pf.error_code.bits())),
        Err(other) => panic!("the walker did not produce a #PF or a translation: {other}"),
    }
}

fn page(mem: &vm_memory::GuestMemoryMmap, addr: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    mem.read_slice(&mut buf, GuestAddress(addr & !0xfff))
        .expect("table page is in guest memory");
    buf
}

#[test]
fn the_walker_agrees_with_kvm_on_the_paging_guests_own_tables() {
    let mut t = boot(guests::PAGING, 0);
    // Ask for every probe, not just the nine supervisor ones (see the guest's module doc).
    t.mem
        .write_obj(1u32, GuestAddress(0x1f1000))
        .expect("the probe-set word is in guest RAM");
    let run = run_guest(&mut t);
    let hw = undo_qemu_rsvd_deviation(run.outcomes);
    let probes = if run.pku {
        &PROBES[..]
    } else {
        eprintln!(
            "the CPU has no protection keys (CPUID.7.0:ECX.PKU clear): the {PKU_PROBES} \
             protection-key probes were skipped"
        );
        &PROBES[..PROBES.len() - PKU_PROBES]
    };
    assert_eq!(hw.len(), probes.len(), "the guest reported every probe");
    if required_features().contains(&"pku") {
        assert!(
            run.pku,
            "VMKIT_PAGING_REQUIRE asks for pku, but the guest found no PKU and skipped its \
             protection-key probes"
        );
    }

    let sregs = t.vcpu.sregs().expect("KVM_GET_SREGS failed");
    let regs = t.vcpu.regs().expect("KVM_GET_REGS failed");
    let mut cfg =
        PagingConfig::from_registers(sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, regs.rflags)
            .expect("the guest runs with paging on");
    // The tables are the object under test: the walker must not touch them.
    cfg.set_accessed_dirty = false;
    assert_eq!(cfg.mode, PagingMode::Level4);
    assert!(
        cfg.write_protect,
        "the guest set CR0.WP again after its WP = 0 probes"
    );
    assert!(cfg.nxe, "the guest set EFER.NXE");
    assert!(cfg.smep && cfg.smap, "the guest set CR4.SMEP and CR4.SMAP");
    assert_eq!(
        cfg.pke, run.pku,
        "CR4.PKE is set exactly when the PKU probes ran"
    );
    assert!(
        !cfg.alignment_check,
        "the guest cleared RFLAGS.AC after its AC probes"
    );
    // The guest installed its own tables (a static inside its image near 1 MiB), not the
    // boot tables.
    let root = sregs.cr3 & !0xfff;
    assert!(
        (0x10_0000..0x20_0000).contains(&root),
        "CR3 {root:#x} is not the guest's own PML4"
    );
    // The last fault the hardware delivered is still in CR2.
    let last_fault = hw.iter().rev().find_map(|o| o.map(|(cr2, _)| cr2));
    assert_eq!(Some(sregs.cr2), last_fault, "CR2 after the run");

    // The base configuration: the registers at the end, without protection keys. Each probe
    // gets its own CR0.WP, RFLAGS.AC, CR4.PKE and PKRU on top (see `Probe`).
    let base = PagingConfig {
        pke: false,
        pkru: 0,
        ..cfg
    };
    let configured = |p: &Probe| {
        Walker::new(PagingConfig {
            write_protect: p.wp,
            alignment_check: p.ac,
            pke: p.pke,
            pkru: if p.pke { PKRU } else { 0 },
            ..base
        })
    };
    let walker = Walker::new(base);

    // Snapshot the tables the walks go through (PML4, PDPT, PD 0, PD 1, the 4 KiB PT) so we
    // can prove the walker left them alone.
    let pt_entry = walker
        .translate(&t.mem, 0x1fc000, supervisor(AccessKind::Read))
        .expect("0x1fc000 is mapped")
        .leaf_addr;
    let pdpt = t.mem.read_obj::<u64>(GuestAddress(root)).unwrap() & 0x000f_ffff_ffff_f000;
    let pd0 = t.mem.read_obj::<u64>(GuestAddress(pdpt)).unwrap() & 0x000f_ffff_ffff_f000;
    let pd1 = t.mem.read_obj::<u64>(GuestAddress(pdpt + 8)).unwrap() & 0x000f_ffff_ffff_f000;
    let table_pages = [root, pdpt, pd0, pd1, pt_entry & !0xfff];
    let before: Vec<Vec<u8>> = table_pages.iter().map(|&a| page(&t.mem, a)).collect();

    // --- Differential part: the walker's verdict must equal the hardware's. ---
    for (i, (p, hw_outcome)) in probes.iter().zip(&hw).enumerate() {
        let result = configured(p).translate(&t.mem, p.addr, p.access);
        let ours = verdict(&result);
        assert_eq!(
            ours,
            *hw_outcome,
            "probe {i} ({:?} {:?} at {:#x}, CR0.WP={} AC={} PKE={}): walker {} vs KVM {}",
            p.access.privilege,
            p.access.kind,
            p.addr,
            u8::from(p.wp),
            u8::from(p.ac),
            u8::from(p.pke),
            describe(&ours),
            describe(hw_outcome),
        );
        if let Ok(tr) = result {
            assert_eq!(tr.gpa, p.addr, "probe {i}: identity mapping");
        }
        eprintln!(
            "probe {i:2}: {:<10} {:<5} {:#12x} WP={} AC={} PKE={}: {}",
            format!("{:?}", p.access.privilege),
            format!("{:?}", p.access.kind),
            p.addr,
            u8::from(p.wp),
            u8::from(p.ac),
            u8::from(p.pke),
            describe(hw_outcome)
        );
    }
    // What the guest documents, so a silently changed guest cannot make the test vacuous.
    let (pr, w, u, rsvd, i, pkf) = (
        PfErrorCode::PRESENT,
        PfErrorCode::WRITE,
        PfErrorCode::USER,
        PfErrorCode::RSVD,
        PfErrorCode::FETCH,
        PfErrorCode::PK,
    );
    let mut documented = vec![
        Some((0x1ff000, 0)),
        Some((0x1fe000, pr | w)),
        Some((0x1fd000, pr | i)),
        None,
        Some((0x1fb000, pr)),
        None,
        Some((0x1fa000, pr | i)),
        Some((0x40a0_0000, pr | rsvd)),
        Some((0x1fb000, pr | w)),
        Some((0x1fc000, pr | u)),
        Some((0x1f7000, pr | w | u)),
        Some((0x1f6000, pr | u | i)),
        Some((0x1fc008, pr | u | i)),
        Some((0x1ff000, u)),
        None,
        Some((0x40a0_0000, pr | u | rsvd)),
        None,
        None,
        None,
        None,
        Some((0x1f7000, pr | w)),
        Some((0x1f7000, pr | w | u)),
    ];
    if run.pku {
        documented.extend([
            Some((0x1f3000, pr | u | pkf)),
            Some((0x1f2000, pr | w | u | pkf)),
            None,
            None,
            Some((0x1f2000, pr | w | pkf)),
            Some((0x1f3000, pr | pkf)),
            None,
        ]);
    }
    assert_eq!(hw, documented);
    // The hardware's own A/D updates, read back through the walker. The guest wrote its
    // test pages before loading these tables, so every D bit in them comes from a probe: a
    // successful write sets it (which also proves that a "no fault" write probe really wrote,
    // at the privilege and CR0.WP it claims), a refused one does not.
    // (Read with RFLAGS.AC = 1: SMAP would refuse the user pages.)
    let dirty = |addr: u64| {
        configured(&ac(sup(Read, addr)))
            .translate(&t.mem, addr, supervisor(AccessKind::Read))
            .unwrap_or_else(|f| panic!("{addr:#x} is mapped: {f}"))
            .dirty()
    };
    let mut written = vec![
        (0x1fc000, "probe 3, supervisor write"),
        (0x1fb000, "probe 14, user write"),
        (
            0x1f4000,
            "probe 18, supervisor write to a read-only page with CR0.WP = 0",
        ),
        (
            0x1f7000,
            "probe 19, supervisor write to a read-only user page with CR0.WP = 0",
        ),
    ];
    if run.pku {
        written.push((0x1f2000, "probe 28, write-disabled key with CR0.WP = 0"));
    }
    for (addr, by) in written {
        assert!(dirty(addr), "{addr:#x} must be dirty ({by})");
    }
    assert!(
        !dirty(0x1fe000),
        "refused writes must not set D at 0x1fe000"
    );

    // --- Consistency check (no hardware probe): the walker against the guest's documented
    // layout (0..4 GiB identity, 2 MiB pages, 4 KiB pages below 2 MiB). ---
    let ok = |addr: u64, kind: AccessKind, size: PageSize| {
        let tr = walker
            .translate(&t.mem, addr, supervisor(kind))
            .unwrap_or_else(|f| panic!("{kind:?} at {addr:#x} faulted: {f}"));
        assert_eq!(tr.gpa, addr, "{kind:?} at {addr:#x}: identity mapping");
        assert_eq!(tr.page_size(), size, "{kind:?} at {addr:#x}: page size");
        tr
    };
    let fault = |addr: u64, access: Access, code: u32| {
        let f = walker
            .translate(&t.mem, addr, access)
            .expect_err("must fault");
        let pf = f.page_fault().expect("a #PF");
        assert_eq!(pf.addr, addr, "{access:?} at {addr:#x}: CR2");
        assert_eq!(
            pf.error_code.bits(),
            code,
            "{access:?} at {addr:#x}: {}",
            pf.error_code
        );
        pf.reason
    };
    // The writable test page is also executable.
    ok(0x1fc000, AccessKind::Fetch, PageSize::Size4K);
    // The read-only page reads fine; the no-execute page reads and writes fine.
    let ro = ok(0x1fe008, AccessKind::Read, PageSize::Size4K);
    assert!(!ro.rights().writable);
    ok(0x1fd000, AccessKind::Read, PageSize::Size4K);
    let nx = ok(0x1fd000, AccessKind::Write, PageSize::Size4K);
    assert!(nx.rights().no_execute && nx.rights().writable);
    // The not-present page refuses every access, with W / I/D bits per access kind.
    fault(0x1ff000, supervisor(AccessKind::Write), PfErrorCode::WRITE);
    fault(0x1ff000, supervisor(AccessKind::Fetch), PfErrorCode::FETCH);
    // Ordinary 4 KiB pages below 2 MiB and 2 MiB pages up to 4 GiB allow everything.
    for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
        ok(0x1f_8123, kind, PageSize::Size4K);
        ok(0x40_0123, kind, PageSize::Size2M);
        ok(0xffff_fff8, kind, PageSize::Size2M);
    }
    // The two user pages are user pages for user accesses (SMEP/SMAP bind the supervisor
    // only).
    for access in [Access::user_read(), Access::user_write()] {
        let tr = walker
            .translate(&t.mem, 0x1fb010, access)
            .expect("user data page");
        assert!(tr.rights().user);
    }
    walker
        .translate(&t.mem, 0x1fa000, Access::user_fetch())
        .expect("user code page");
    // No other leaf has U/S set: a user read faults as a protection violation.
    fault(
        0x40_0000,
        Access::user_read(),
        PfErrorCode::PRESENT | PfErrorCode::USER,
    );
    // Above 4 GiB the PDPT entry is empty: not present at level 3.
    let reason = fault(1 << 32, supervisor(AccessKind::Read), 0);
    assert_eq!(reason, FaultReason::NotPresent { level: 3 });
    fault(1 << 32, supervisor(AccessKind::Write), PfErrorCode::WRITE);
    fault(1 << 32, supervisor(AccessKind::Fetch), PfErrorCode::FETCH);
    // A non-canonical address is #GP, not #PF.
    assert_eq!(
        walker.translate(&t.mem, 1 << 47, supervisor(AccessKind::Read)),
        Err(Fault::NonCanonical { addr: 1 << 47 })
    );

    // The walker did not write A/D bits (or anything else) into the guest's tables.
    let after: Vec<Vec<u8>> = table_pages.iter().map(|&a| page(&t.mem, a)).collect();
    assert!(before == after, "the walker modified the guest's tables");
}

fn describe(o: &Outcome) -> String {
    match o {
        None => "no fault".to_string(),
        Some((cr2, code)) => format!("#PF at {cr2:#x} code {}", PfErrorCode::from_bits(*code)),
    }
}
