//! vCPU state save/restore on KVM: a guest stopped mid-run, saved, and restored into a fresh
//! VM and vCPU produces exactly the output an uninterrupted run produces.

mod common;

use common::{boot_with, TestVm, Watchdog, MEM_SIZE};
use vm_memory::{Bytes, GuestAddress};
use vmkit_test_guests as guests;
use vmkit_vcpu::state::VcpuState;
use vmkit_vcpu::{MpState, Vcpu, Vm};

const N: u32 = 300;

/// Runs until the guest has reported `outputs` values (or its status, if `outputs` is None).
fn run_until(t: &mut TestVm, outputs: Option<usize>) {
    let _w = Watchdog::new(t.vcpu.kick_handle(), 30);
    loop {
        let exit = t.vcpu.run().unwrap();
        let action = t.dispatcher.dispatch(exit);
        assert_eq!(
            action,
            vmkit_vcpu::dispatch::Action::Continue,
            "unexpected stop"
        );
        let done = match outputs {
            Some(n) => t.rec.data.lock().unwrap().len() >= n,
            None => t.rec.status.lock().unwrap().is_some(),
        };
        if done {
            return;
        }
    }
}

fn fresh(irqchip: bool) -> TestVm {
    boot_with(guests::COUNTER, N, |_, vm| {
        if irqchip {
            vm.create_irq_chip().unwrap();
        }
    })
}

/// Saves `t` (registers + RAM), restores into a new VM, runs that to the end and returns its
/// outputs.
fn migrate_and_finish(t: &mut TestVm, irqchip: bool) -> (Vec<u32>, VcpuState) {
    let state = VcpuState::save(&mut t.vcpu).unwrap();
    let blob = state.to_bytes();
    let mut ram = vec![0u8; MEM_SIZE];
    t.mem.read_slice(&mut ram, GuestAddress(0)).unwrap();

    // The target: a new VM whose memory gets the saved RAM and whose vCPU starts from
    // nothing but the decoded blob (boot_with's boot setup is overwritten by the restore).
    let mut target = fresh(irqchip);
    target.mem.write_slice(&ram, GuestAddress(0)).unwrap();
    let restored = VcpuState::from_bytes(&blob).unwrap();
    assert_eq!(restored, state);
    let refused = restored.restore(&target.vcpu).unwrap();
    assert!(refused.len() < 8, "too many MSRs refused: {refused:x?}");
    assert_eq!(target.vcpu.regs().unwrap(), state.regs);
    run_until(&mut target, None);
    assert_eq!(*target.rec.status.lock().unwrap(), Some(0));
    let out = target.rec.data.lock().unwrap().clone();
    (out, state)
}

fn reference(irqchip: bool) -> Vec<u32> {
    let mut t = fresh(irqchip);
    run_until(&mut t, None);
    let out = t.rec.data.lock().unwrap().clone();
    assert_eq!(out.len(), N as usize);
    out
}

#[test]
fn restored_vcpu_continues_mid_run_with_identical_output() {
    let expected = reference(false);
    let mut t = fresh(false);
    run_until(&mut t, Some(100));
    let before = t.rec.data.lock().unwrap().clone();
    let (after, state) = migrate_and_finish(&mut t, false);
    assert!(!state.msrs.is_empty());
    assert!(state.lapic.is_none(), "no irqchip, no LAPIC");
    assert_eq!([before, after].concat(), expected);
}

#[test]
fn restore_with_an_irqchip_carries_the_lapic_too() {
    let expected = reference(true);
    let mut t = fresh(true);
    run_until(&mut t, Some(7));
    let before = t.rec.data.lock().unwrap().clone();
    let (after, state) = migrate_and_finish(&mut t, true);
    let lapic = state.lapic.expect("irqchip VMs have a LAPIC");
    assert!(lapic.regs.iter().any(|b| *b != 0));
    assert_eq!(state.mp_state, MpState::Runnable);
    assert_eq!([before, after].concat(), expected);
}

#[test]
fn a_pending_port_read_is_completed_before_saving() {
    let expected = reference(false);
    let mut t = fresh(false);
    // The first exit is the guest's `in` of its parameter: answer it, then save at once. The
    // answer is only in the guest's rax once the exit is completed.
    match t.vcpu.run().unwrap() {
        vmkit_vcpu::VmExit::IoIn { port: 0x510, data } => data.copy_from_slice(&N.to_le_bytes()),
        other => panic!("expected the parameter read, got {other:?}"),
    }
    let (after, state) = migrate_and_finish(&mut t, false);
    assert_eq!(state.regs.rax & 0xffff_ffff, u64::from(N));
    assert_eq!(after, expected);
}

#[test]
fn xsave_image_xcr0_and_debug_registers_survive_a_restore() {
    use vmkit_vcpu::regs::{DebugRegs, Xcr};
    let mut t = fresh(false);
    // Guest-visible values a VMM must carry: XCR0 with SSE enabled, an XMM register that
    // only the XSAVE image holds once restored after the FPU, and armed breakpoints.
    t.vcpu.set_xcrs(&[Xcr { index: 0, value: 3 }]).unwrap();
    let mut x = t.vcpu.xsave().unwrap();
    assert_eq!(x.bytes.len(), 4096);
    const XMM7: std::ops::Range<usize> = 160 + 7 * 16..160 + 8 * 16;
    x.bytes[XMM7].fill(0x5a);
    x.bytes[512] |= 2; // XSTATE_BV: the SSE component is in the image
    t.vcpu.set_xsave(&x).unwrap();
    t.vcpu
        .set_debug_regs(&DebugRegs {
            db: [0x1000, 0x2000, 0x3000, 0x4000],
            dr6: 0xffff_0ff0,
            dr7: 0x455,
        })
        .unwrap();
    let dbg = t.vcpu.debug_regs().unwrap();
    assert_eq!(dbg.db, [0x1000, 0x2000, 0x3000, 0x4000]);

    let state = VcpuState::save(&mut t.vcpu).unwrap();
    assert_eq!(state.xcrs, vec![Xcr { index: 0, value: 3 }]);
    assert_eq!(state.xsave.as_ref().unwrap().bytes[XMM7], [0x5a; 16]);
    assert!(state.xsave.as_ref().unwrap().xstate_bv().unwrap() & 2 != 0);

    let target = fresh(false);
    assert_ne!(target.vcpu.debug_regs().unwrap(), dbg);
    let restored = VcpuState::from_bytes(&state.to_bytes()).unwrap();
    restored.restore(&target.vcpu).unwrap();
    assert_eq!(target.vcpu.xcrs().unwrap(), state.xcrs);
    assert_eq!(target.vcpu.debug_regs().unwrap(), dbg);
    // The XSAVE image went in after the FPU, so its XMM7 is what the vCPU holds.
    assert_eq!(target.vcpu.fpu().unwrap().xmm[7], [0x5a; 16]);
    assert_eq!(target.vcpu.xsave().unwrap().bytes[XMM7], [0x5a; 16]);
    // A wrong-sized image is refused with the sizes named, before KVM sees it.
    let short = vmkit_vcpu::regs::XsaveArea {
        bytes: vec![0; 100],
    };
    let e = target.vcpu.set_xsave(&short).unwrap_err();
    assert!(e.to_string().contains("100 bytes"), "{e}");
}
