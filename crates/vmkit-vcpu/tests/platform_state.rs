//! KVM's in-kernel PICs, IOAPIC, PIT and clock survive a save into a blob and a restore
//! into a fresh VM; broken blobs are refused before KVM is touched.

use kvm_bindings::{kvm_irqchip, kvm_pit_config, KVM_IRQCHIP_IOAPIC, KVM_PIT_SPEAKER_DUMMY};
use vmkit_vcpu::kvm::{KvmHypervisor, KvmVm};
use vmkit_vcpu::{Hypervisor, Vm};

fn vm(devices: bool) -> KvmVm {
    let hv = KvmHypervisor::new().expect("/dev/kvm must be usable for this test");
    let vm = hv.create_vm().unwrap();
    if devices {
        vm.create_irq_chip().unwrap();
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.fd().create_pit2(pit).unwrap();
    }
    vm
}

fn ioapic(vm: &KvmVm) -> kvm_irqchip {
    let mut c = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.fd().get_irqchip(&mut c).unwrap();
    c
}

fn redirection(c: &kvm_irqchip, pin: usize) -> u64 {
    // SAFETY: the IOAPIC view of the union is what KVM filled for KVM_IRQCHIP_IOAPIC; its
    // redirection entries are plain 64-bit integers.
    unsafe { c.chip.ioapic.redirtbl[pin].bits }
}

#[test]
fn irqchip_pit_and_clock_carry_over_to_a_fresh_vm() {
    let a = vm(true);
    // Program what a guest would have: IOAPIC pin 5 routed to vector 0x35, unmasked; PIT
    // channel 0 counting with a distinctive reload; the clock well past zero.
    let mut c = ioapic(&a);
    // SAFETY: as in `redirection`; writing an integer into the IOAPIC view.
    unsafe { c.chip.ioapic.redirtbl[5].bits = 0x35 };
    a.fd().set_irqchip(&c).unwrap();
    let mut pit = a.fd().get_pit2().unwrap();
    pit.channels[0].count = 0x1234;
    pit.channels[0].mode = 2;
    a.fd().set_pit2(&pit).unwrap();
    let ten_s = kvm_bindings::kvm_clock_data {
        clock: 10_000_000_000,
        ..Default::default()
    };
    a.fd().set_clock(&ten_s).unwrap();

    let blob = a.platform_state().unwrap();
    let b = vm(true);
    assert_ne!(redirection(&ioapic(&b), 5), 0x35);
    b.set_platform_state(&blob).unwrap();
    assert_eq!(redirection(&ioapic(&b), 5), 0x35);
    let pit_b = b.fd().get_pit2().unwrap();
    assert_eq!(pit_b.channels[0].count, 0x1234);
    assert_eq!(pit_b.channels[0].mode, 2);
    let clock = b.fd().get_clock().unwrap().clock;
    assert!(
        (10_000_000_000..20_000_000_000).contains(&clock),
        "restored clock {clock} ns"
    );
    // A VM without the devices cannot take the blob: the error names what is missing.
    let e = vm(false).set_platform_state(&blob).unwrap_err();
    assert!(e.to_string().contains("irqchip"), "{e}");
    // One with an irqchip but no PIT refuses too, and keeps its own IOAPIC untouched
    // (nothing is written before every device is known to exist).
    let no_pit = {
        let hv = KvmHypervisor::new().unwrap();
        let v = hv.create_vm().unwrap();
        v.create_irq_chip().unwrap();
        v
    };
    let before = redirection(&ioapic(&no_pit), 5);
    let e = no_pit.set_platform_state(&blob).unwrap_err();
    assert!(e.to_string().contains("PIT"), "{e}");
    assert_eq!(redirection(&ioapic(&no_pit), 5), before);
}

#[test]
fn a_vm_without_platform_devices_saves_only_its_clock() {
    let a = vm(false);
    let blob = a.platform_state().unwrap();
    // magic, version, two absent-device flags, the clock.
    assert_eq!(blob.len(), 8 + 4 + 1 + 1 + 8);
    vm(false).set_platform_state(&blob).unwrap();
}

#[test]
fn broken_blobs_are_refused_with_a_reason() {
    let a = vm(true);
    let good = a.platform_state().unwrap();
    let target = vm(true);
    let before = redirection(&ioapic(&target), 5);
    for cut in 0..good.len() {
        let e = target.set_platform_state(&good[..cut]).unwrap_err();
        assert!(e.to_string().contains("platform state"), "cut {cut}: {e}");
    }
    let mut b = good.clone();
    b[0] = b'X';
    assert!(target
        .set_platform_state(&b)
        .unwrap_err()
        .to_string()
        .contains("magic"));
    let mut b = good.clone();
    b[8] = 7;
    assert!(target
        .set_platform_state(&b)
        .unwrap_err()
        .to_string()
        .contains("version 7"));
    let mut b = good.clone();
    b[12] = 2;
    assert!(target
        .set_platform_state(&b)
        .unwrap_err()
        .to_string()
        .contains("irqchip flag is 2"));
    let mut b = good.clone();
    b.push(0);
    assert!(target
        .set_platform_state(&b)
        .unwrap_err()
        .to_string()
        .contains("1 unexpected trailing"));
    // Nothing was written by any refused blob.
    assert_eq!(redirection(&ioapic(&target), 5), before);
}
