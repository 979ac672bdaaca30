//! Boot setup enters each processor mode correctly: tiny hand-assembled programs run in
//! real, protected and long mode on KVM and report over port 0x3f8.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_vcpu::boot::{self, BootError, CpuMode};
use vmkit_vcpu::kvm::{KvmHypervisor, KvmVcpu};
use vmkit_vcpu::{Hypervisor, MemoryFlags, Vcpu, Vm, VmExit};

fn vm_with(
    code: &[u8],
    at: u64,
    mode: CpuMode,
) -> (KvmVcpu, GuestMemoryMmap, vmkit_vcpu::kvm::KvmVm) {
    let hv = KvmHypervisor::new().expect("/dev/kvm must be usable for these tests");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let vm = hv.create_vm().unwrap();
    vm.register_memory(&mem, 0, MemoryFlags::default()).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    boot::configure_cpuid(&hv, &vcpu, boot::default_cpuid_policy).unwrap();
    mem.write_slice(code, GuestAddress(at)).unwrap();
    boot::setup_vcpu(&mem, &vcpu, mode, at, 0x8000, 0).unwrap();
    (vcpu, mem, vm)
}

/// Runs to the halt and returns the bytes written to COM1.
fn serial_until_halt(vcpu: &mut KvmVcpu) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..100 {
        match vcpu.run().unwrap() {
            VmExit::IoOut { port: 0x3f8, data } => out.extend_from_slice(data),
            VmExit::Halt => return out,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("no halt");
}

#[test]
fn real_mode_entry_runs_16_bit_code() {
    // mov al, 'R'; mov dx, 0x3f8; out dx, al; hlt
    let code = [0xb0, b'R', 0xba, 0xf8, 0x03, 0xee, 0xf4];
    let (mut vcpu, _mem, _vm) = vm_with(&code, 0x1_7c00, CpuMode::Real);
    let s = vcpu.sregs().unwrap();
    assert_eq!((s.cs.selector, s.cs.base, s.cr0 & 1), (0x1000, 0x1_0000, 0));
    assert_eq!(vcpu.regs().unwrap().rip, 0x7c00);
    assert_eq!(serial_until_halt(&mut vcpu), b"R");
}

#[test]
fn protected_mode_entry_runs_32_bit_code() {
    // mov eax, 'P'; mov edx, 0x3f8; out dx, al; hlt  (32-bit immediates: no prefixes)
    let code = [0xb8, b'P', 0, 0, 0, 0xba, 0xf8, 0x03, 0, 0, 0xee, 0xf4];
    let (mut vcpu, _mem, _vm) = vm_with(&code, 0x10_0000, CpuMode::Protected);
    let s = vcpu.sregs().unwrap();
    assert!(s.cs.db && !s.cs.l);
    assert_eq!(s.cr0 & 0x8000_0001, 1, "PE without PG");
    assert_eq!(serial_until_halt(&mut vcpu), b"P");
}

#[test]
fn long_mode_entry_runs_64_bit_code_above_4gib_addresses() {
    // mov rax, 0x4c (a 64-bit immediate); mov dx, 0x3f8; out dx, al; hlt
    let code = [
        0x48, 0xb8, b'L', 0, 0, 0, 0, 0, 0, 0, 0x66, 0xba, 0xf8, 0x03, 0xee, 0xf4,
    ];
    let (mut vcpu, _mem, _vm) = vm_with(&code, 0x10_0000, CpuMode::Long);
    let s = vcpu.sregs().unwrap();
    assert!(s.cs.l);
    assert_eq!(s.efer & 0x500, 0x500, "LME and LMA");
    assert_eq!(s.cr3, boot::PAGE_TABLES_START);
    assert_eq!(serial_until_halt(&mut vcpu), b"L");
}

#[test]
fn real_mode_entries_above_one_mib_are_refused() {
    let hv = KvmHypervisor::new().unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let vm = hv.create_vm().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let e = boot::setup_vcpu(&mem, &vcpu, CpuMode::Real, 0x10_0000, 0, 0).unwrap_err();
    assert!(matches!(e, BootError::RealModeEntry(0x10_0000)));
    assert!(e.to_string().contains("0x100000"));
}

#[test]
fn state_getters_and_setters_round_trip_on_kvm() {
    let (vcpu, _mem, _vm) = vm_with(&[0xf4], 0x10_0000, CpuMode::Long);
    let fpu = vcpu.fpu().unwrap();
    vcpu.set_fpu(&fpu).unwrap();
    assert_eq!(vcpu.fpu().unwrap(), fpu);
    let ev = vcpu.events().unwrap();
    vcpu.set_events(&ev).unwrap();
    vcpu.set_mp_state(vmkit_vcpu::MpState::Runnable).unwrap();
    assert_eq!(vcpu.mp_state().unwrap(), vmkit_vcpu::MpState::Runnable);
    let efer = vcpu.msrs(&[0xc000_0080]).unwrap();
    assert_eq!(efer.len(), 1);
    vcpu.set_msrs(&efer).unwrap();
    // An MSR KVM does not know is refused and named.
    let e = vcpu
        .set_msrs(&[vmkit_vcpu::MsrEntry {
            index: 0x4b56_4d99,
            data: 1,
        }])
        .unwrap_err();
    assert!(e.to_string().contains("0x4b564d99"), "{e}");
    // EFER travels in the special registers; STAR is a typical saveable MSR.
    assert!(vcpu.saveable_msrs().unwrap().contains(&0xc000_0081));
    assert!(vcpu.raw_fd().is_some());
    assert_eq!(vcpu.id(), 0);
    // No irqchip: there is no LAPIC to read.
    assert!(vcpu.lapic().is_err());
}

#[test]
fn capabilities_and_cpuid_are_reported() {
    use vmkit_vcpu::Capability::*;
    let hv = KvmHypervisor::new().unwrap();
    for cap in [
        IrqChip,
        Irqfd,
        Ioeventfd,
        DirtyLog,
        UserMsrExits,
        HypercallExits,
        ImmediateExit,
        ReadOnlyMemory,
    ] {
        // This host's KVM offers every one of them (see MACHINE.md).
        assert!(hv.check_capability(cap), "{cap:?}");
    }
    let cpuid = hv.supported_cpuid().unwrap();
    let leaf1 = cpuid.iter().find(|e| e.function == 1).expect("leaf 1");
    let mut edited = cpuid.clone();
    boot::default_cpuid_policy(3, &mut edited);
    let new1 = edited.iter().find(|e| e.function == 1).unwrap();
    assert_eq!(new1.ebx >> 24, 3);
    assert_ne!(new1.ecx & (1 << 31), 0);
    assert_eq!(new1.eax, leaf1.eax);
    assert!(hv.kvm().get_api_version() >= 12);
    let vm = hv.create_vm().unwrap();
    assert!(format!("{vm:?}").contains("KvmVm"));
    vm.enable_hypercall_exits(1 << 12).unwrap();
    let _ = vm.fd();
}
