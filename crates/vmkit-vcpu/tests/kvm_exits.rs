//! Every exit kind this machine's KVM can produce, driven by a real guest, plus the kick
//! handle, ioeventfd, GVA translation and the dirty log.
//!
//! These tests need `/dev/kvm`; they fail (not skip) when it cannot be used.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use common::{boot, boot_with, Watchdog};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vmkit_test_guests as guests;
use vmkit_vcpu::dispatch::{Action, ScratchMsr};
use vmkit_vcpu::{DataMatch, ExitKind, IoEventAddress, Vcpu, VcpuKick, Vm, VmExit};
use vmm_sys_util::eventfd::EventFd;

const TEST_MSR: u32 = 0x4b56_4d99;

#[test]
fn hello_prints_makes_a_port_hypercall_and_halts() {
    let mut t = boot(guests::HELLO, 0);
    let _w = Watchdog::new(t.vcpu.kick_handle(), 20);
    t.dispatcher.set_hypercall_port(0x500, t.mem.clone());
    t.dispatcher
        .register_hypercall(1, Box::new(|_nr: u64, a: &[u64; 6]| a[0] + 1));
    assert_eq!(t.dispatcher.run(&mut t.vcpu).unwrap(), Action::Halt);
    let serial = String::from_utf8(t.rec.serial.lock().unwrap().clone()).unwrap();
    assert_eq!(
        serial,
        "Hello from a vmkit guest!\nhypercall returned 0x000000000000002a\n"
    );
    assert_eq!(*t.rec.status.lock().unwrap(), Some(0));
    let m = t.dispatcher.metrics();
    assert_eq!(m.port_hypercalls, 1);
    assert_eq!(m.kind(ExitKind::Halt).count, 1);
    assert_eq!(m.kind(ExitKind::IoOut).count as usize, serial.len() + 2);

    // The guest wrote its stack and hypercall block: the dirty log shows pages near 1 MiB.
    let bits = t.vm.dirty_log(0, common::MEM_SIZE).unwrap();
    let dirty: Vec<usize> = (0..bits.len() * 64)
        .filter(|p| bits[p / 64] >> (p % 64) & 1 == 1)
        .collect();
    assert!(
        dirty.iter().any(|&p| (0x100..0x110).contains(&p)),
        "{dirty:?}"
    );
    // Reading the log cleared it.
    let again = t.vm.dirty_log(0, common::MEM_SIZE).unwrap();
    assert!(again.iter().all(|w| *w == 0));
}

#[test]
fn kvm_dirty_log_feeds_vmkit_memory_dirty_tracking() {
    use vmkit_memory::{DirtyTracker, GuestRam};
    use vmkit_vcpu::{Hypervisor, MemoryFlags};
    let hv = vmkit_vcpu::kvm::KvmHypervisor::new().unwrap();
    let ram = GuestRam::from_ranges(&[(vm_memory::GuestAddress(0), 8 << 20)]).unwrap();
    let vm = hv.create_vm().unwrap();
    vm.register_memory(
        &ram,
        0,
        MemoryFlags {
            log_dirty: true,
            read_only: false,
        },
    )
    .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut img = std::io::Cursor::new(guests::HELLO);
    let k = vmkit_vcpu::boot::load_kernel(
        &ram,
        &mut img,
        vmkit_vcpu::boot::KernelFormat::PlainElf,
        None,
        &[],
    )
    .unwrap();
    k.setup_vcpu(&ram, &vcpu).unwrap();
    let mut tracker = DirtyTracker::with_hypervisor(&ram, &vm);
    // Start clean: forget the VMM's own writes (image, tables) and KVM's initial log.
    tracker.sync(&ram).unwrap();
    let _ = tracker.take(&ram).unwrap();
    let _w = Watchdog::new(vcpu.kick_handle(), 20);
    let mut d = vmkit_vcpu::dispatch::Dispatcher::default();
    d.set_hypercall_port(0x500, ram.clone());
    assert_eq!(d.run(&mut vcpu).unwrap(), Action::Halt);
    tracker.sync(&ram).unwrap();
    let dirty = tracker.take(&ram).unwrap();
    // Only the guest wrote since: its stack and hypercall block near 1 MiB, and the CPU's
    // Accessed bits in the boot page tables.
    let pages: Vec<u64> = dirty.iter_addrs().map(|a| a.0).collect();
    let image = 0x10_0000..0x11_0000;
    let tables = vmkit_vcpu::boot::PAGE_TABLES_START..vmkit_vcpu::boot::PAGE_TABLES_END;
    assert!(pages.iter().any(|a| image.contains(a)), "{pages:x?}");
    assert!(
        pages
            .iter()
            .all(|a| image.contains(a) || tables.contains(a)),
        "{pages:x?}"
    );
}

struct MmioScratch {
    writes: Vec<(u64, Vec<u8>)>,
}

impl MutDeviceMmio for MmioScratch {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8).wrapping_mul(3);
        }
    }
    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

fn expected_read(offset: u64, len: usize) -> u64 {
    let mut v = 0u64;
    for i in 0..len {
        v |= u64::from((offset as u8).wrapping_add(i as u8).wrapping_mul(3)) << (8 * i);
    }
    v
}

#[test]
fn mmio_guest_reaches_the_device_and_unclaimed_reads_return_all_ones() {
    let mut t = boot(guests::MMIO, 0);
    let _w = Watchdog::new(t.vcpu.kick_handle(), 20);
    let dev = Arc::new(Mutex::new(MmioScratch { writes: Vec::new() }));
    t.dispatcher
        .register_mmio(guests::MMIO_BASE, 0x20, dev.clone())
        .unwrap();
    assert_eq!(t.dispatcher.run(&mut t.vcpu).unwrap(), Action::Halt);
    let writes = dev.lock().unwrap().writes.clone();
    assert_eq!(
        writes,
        vec![
            (0, vec![0x11]),
            (2, 0x2233u16.to_le_bytes().to_vec()),
            (4, 0x4455_6677u32.to_le_bytes().to_vec()),
            (8, 0x8899_aabb_ccdd_eeffu64.to_le_bytes().to_vec()),
        ]
    );
    let q = expected_read(0x18, 8);
    assert_eq!(
        *t.rec.data.lock().unwrap(),
        vec![
            expected_read(0x10, 1) as u32,
            expected_read(0x12, 2) as u32,
            expected_read(0x14, 4) as u32,
            q as u32,
            (q >> 32) as u32,
            0xffff_ffff
        ]
    );
    let m = t.dispatcher.metrics();
    assert_eq!(
        (
            m.kind(ExitKind::MmioWrite).count,
            m.kind(ExitKind::MmioRead).count
        ),
        (4, 5)
    );
    assert_eq!(m.unclaimed_mmio_reads, 1);
}

#[test]
fn exits_guest_produces_each_exit_kind_in_order() {
    let mut t = boot_with(guests::EXITS, 0, |_, vm| {
        vm.enable_user_msr_exits().unwrap()
    });
    let _w = Watchdog::new(t.vcpu.kick_handle(), 20);
    let mut msr = 0x1234u64;
    let mut seen = Vec::new();
    loop {
        let exit = t.vcpu.run().unwrap();
        seen.push(exit.kind());
        match exit {
            VmExit::IoIn { port: 0x510, data } => data.fill(0),
            VmExit::IoOut { port: 0x511, data } => t
                .rec
                .data
                .lock()
                .unwrap()
                .push(u32::from_le_bytes(data.try_into().unwrap())),
            VmExit::IoOut { port: 0x500, data } => {
                // Port hypercall: answer in the block the guest pointed at.
                let addr = u64::from(u32::from_le_bytes(data.try_into().unwrap()));
                use vm_memory::Bytes;
                let nr: u64 = t.mem.read_obj(vm_memory::GuestAddress(addr)).unwrap();
                t.mem
                    .write_obj(nr + 100, vm_memory::GuestAddress(addr + 56))
                    .unwrap();
            }
            VmExit::MmioWrite { addr, data } => {
                assert_eq!(
                    (addr, data),
                    (guests::MMIO_BASE, &0xa1u32.to_le_bytes()[..])
                )
            }
            VmExit::MmioRead { addr, data } => {
                assert_eq!((addr, data.len()), (guests::MMIO_BASE + 4, 4));
                data.copy_from_slice(&0x77u32.to_le_bytes());
            }
            VmExit::MsrRead(mut m) => {
                assert_eq!(m.index, TEST_MSR);
                m.answer(msr);
            }
            VmExit::MsrWrite(mut m) => {
                assert_eq!(m.index, TEST_MSR);
                msr = m.value;
                m.accept();
            }
            VmExit::Halt => {}
            VmExit::Shutdown => break,
            other => panic!("unexpected exit {other:?} after {seen:?}"),
        }
    }
    use ExitKind::*;
    assert_eq!(
        seen,
        vec![
            IoIn, IoOut, MmioWrite, MmioRead, IoOut, MsrRead, MsrWrite, IoOut, IoOut, Halt, IoOut,
            Shutdown
        ]
    );
    assert_eq!(msr, 0x1235);
    assert_eq!(*t.rec.data.lock().unwrap(), vec![0xa0, 0x77, 112, 0xa2]);
}

#[test]
fn unknown_msrs_raise_gp_through_the_dispatcher_and_known_ones_reach_their_handler() {
    let mut t = boot_with(guests::EXITS, 0, |_, vm| {
        vm.enable_user_msr_exits().unwrap()
    });
    let _w = Watchdog::new(t.vcpu.kick_handle(), 20);
    t.dispatcher
        .register_msr(TEST_MSR, Box::new(ScratchMsr { value: 41 }));
    t.dispatcher.set_hypercall_port(0x500, t.mem.clone());
    // Halt, then the triple fault at the end.
    assert_eq!(t.dispatcher.run(&mut t.vcpu).unwrap(), Action::Halt);
    assert_eq!(t.dispatcher.run(&mut t.vcpu).unwrap(), Action::Shutdown);
    let m = t.dispatcher.metrics();
    assert_eq!(
        (
            m.kind(ExitKind::MsrRead).count,
            m.kind(ExitKind::MsrWrite).count
        ),
        (1, 1)
    );
    assert_eq!(m.unknown_msrs, 0);
    // No MMIO device: the guest's read got all ones; hypercall 12 has no handler: -ENOSYS.
    assert_eq!(
        *t.rec.data.lock().unwrap(),
        vec![
            0xa0,
            0xffff_ffff,
            vmkit_vcpu::dispatch::HYPERCALL_ENOSYS as u32,
            0xa2
        ]
    );

    // Without a handler the rdmsr raises #GP; with no IDT that ends in a shutdown before the
    // guest reaches the rest of its sequence.
    let mut t = boot_with(guests::EXITS, 0, |_, vm| {
        vm.enable_user_msr_exits().unwrap()
    });
    let _w = Watchdog::new(t.vcpu.kick_handle(), 20);
    assert_eq!(t.dispatcher.run(&mut t.vcpu).unwrap(), Action::Shutdown);
    assert_eq!(t.dispatcher.metrics().unknown_msrs, 1);
    assert_eq!(*t.rec.data.lock().unwrap(), vec![0xa0, 0xffff_ffff]);
}

#[test]
fn an_instruction_kvm_cannot_emulate_is_an_internal_error() {
    let mut t = boot(guests::EXITS, 1);
    let _w = Watchdog::new(t.vcpu.kick_handle(), 20);
    match t.dispatcher.run(&mut t.vcpu).unwrap() {
        Action::InternalError { suberror } => assert_eq!(suberror, 1, "emulation failure"),
        other => panic!("expected an internal error, got {other:?}"),
    }
}

#[test]
fn kick_interrupts_a_spinning_guest_and_a_pending_kick_stops_the_next_run() {
    let mut t = boot(guests::EXITS, 2);
    let kick = t.vcpu.kick_handle();
    let k2 = kick.clone();
    let kicker = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        k2.kick();
    });
    // The first exit is the parameter read; after it the guest spins with no exits.
    assert_eq!(t.dispatcher.run(&mut t.vcpu).unwrap(), Action::Interrupted);
    kicker.join().unwrap();
    let rip = t.vcpu.regs().unwrap().rip;
    assert!((0x10_0000..0x10_1000).contains(&rip), "{rip:#x}");
    // A kick while not running makes the next run return at once.
    kick.kick();
    assert!(matches!(t.vcpu.run().unwrap(), VmExit::Interrupted));
    // ...and only that one: the guest runs again until kicked again.
    let k3 = kick.clone();
    let kicker = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        k3.kick();
    });
    assert!(matches!(t.vcpu.run().unwrap(), VmExit::Interrupted));
    kicker.join().unwrap();
    assert!(t.vcpu.regs().unwrap().rip >= 0x10_0000);
}

#[test]
fn single_stepping_produces_debug_exits() {
    let mut t = boot(guests::EXITS, 3);
    let _w = Watchdog::new(t.vcpu.kick_handle(), 20);
    // Run up to the parameter read, then step.
    match t.vcpu.run().unwrap() {
        VmExit::IoIn { port: 0x510, data } => data.copy_from_slice(&3u32.to_le_bytes()),
        other => panic!("expected the parameter read, got {other:?}"),
    }
    t.vcpu.set_single_step(true).unwrap();
    // Step through the guest's short loop until it writes its status.
    let mut pcs = Vec::new();
    let status = loop {
        match t.vcpu.run().unwrap() {
            VmExit::Debug { pc, exception } => {
                assert_eq!(exception, 1);
                pcs.push(pc);
                assert!(pcs.len() < 500, "the guest never reached its status write");
            }
            VmExit::IoOut { port: 0xf4, data } => {
                break u32::from_le_bytes(data.try_into().unwrap())
            }
            other => panic!("expected a debug exit, got {other:?}"),
        }
    };
    assert_eq!(status, 0);
    assert!(pcs.len() > 10, "{pcs:x?}");
    assert!(pcs.windows(2).all(|w| w[0] != w[1]), "{pcs:x?}");
    assert!(
        pcs.iter().all(|pc| (0x10_0000..0x10_1000).contains(pc)),
        "{pcs:x?}"
    );
}

#[test]
fn ioeventfd_absorbs_port_writes_without_exits() {
    let efd = EventFd::new(0).unwrap();
    let mut t = boot(guests::PIO_LOOP, 5);
    let _w = Watchdog::new(t.vcpu.kick_handle(), 20);
    t.vm.register_ioevent(&efd, IoEventAddress::Pio(0x511), DataMatch::Any)
        .unwrap();
    assert_eq!(t.dispatcher.run(&mut t.vcpu).unwrap(), Action::Halt);
    assert_eq!(efd.read().unwrap(), 5);
    assert!(t.rec.data.lock().unwrap().is_empty());
    t.vm.unregister_ioevent(&efd, IoEventAddress::Pio(0x511), DataMatch::Any)
        .unwrap();
    // Only the parameter read and the status write exited.
    let m = t.dispatcher.metrics();
    assert_eq!(
        (m.kind(ExitKind::IoIn).count, m.kind(ExitKind::IoOut).count),
        (1, 1)
    );
}

#[test]
fn a_value_matched_ioeventfd_fires_only_on_writes_of_its_width_and_value() {
    // The guest writes 0..5 to port 0x511 as 32-bit stores. Matching the value 3 as a
    // 32-bit write absorbs exactly that store; the same value as a 64-bit match (the width
    // a plain `u64` datamatch would give) never fires.
    let hit = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let wrong_width = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = boot(guests::PIO_LOOP, 5);
    let _w = Watchdog::new(t.vcpu.kick_handle(), 20);
    t.vm.register_ioevent(&hit, IoEventAddress::Pio(0x511), DataMatch::U32(3))
        .unwrap();
    t.vm.register_ioevent(&wrong_width, IoEventAddress::Pio(0x511), DataMatch::U64(1))
        .unwrap();
    assert_eq!(t.dispatcher.run(&mut t.vcpu).unwrap(), Action::Halt);
    assert_eq!(hit.read().unwrap(), 1);
    assert!(
        wrong_width.read().is_err(),
        "a 64-bit match fired on 32-bit stores"
    );
    assert_eq!(*t.rec.data.lock().unwrap(), vec![0, 1, 2, 4]);
    t.vm.unregister_ioevent(&hit, IoEventAddress::Pio(0x511), DataMatch::U32(3))
        .unwrap();
    t.vm.unregister_ioevent(&wrong_width, IoEventAddress::Pio(0x511), DataMatch::U64(1))
        .unwrap();
}

#[test]
fn irqchip_and_irqfd_can_be_set_up() {
    let t = boot_with(guests::HELLO, 0, |_, vm| vm.create_irq_chip().unwrap());
    let efd = EventFd::new(0).unwrap();
    t.vm.register_irqfd(&efd, 4).unwrap();
    t.vm.set_irq_line(4, true).unwrap();
    t.vm.set_irq_line(4, false).unwrap();
    t.vm.unregister_irqfd(&efd, 4).unwrap();
    // With an in-kernel irqchip the LAPIC state is readable.
    let lapic = t.vcpu.lapic().unwrap();
    t.vcpu.set_lapic(&lapic).unwrap();
}

#[test]
fn gva_translation_follows_the_boot_identity_map() {
    let t = boot(guests::HELLO, 0);
    assert_eq!(t.vcpu.translate_gva(0x10_0123).unwrap(), Some(0x10_0123));
    assert_eq!(
        t.vcpu.translate_gva(0xd000_0000).unwrap(),
        Some(0xd000_0000)
    );
    assert_eq!(t.vcpu.translate_gva(1 << 40).unwrap(), None);
}

#[test]
fn the_paging_guest_reports_its_page_faults() {
    let mut t = boot(guests::PAGING, 0);
    let _w = Watchdog::new(t.vcpu.kick_handle(), 20);
    let mut faults = Vec::new();
    let mut probes = Vec::new();
    let mut pending = [0u32; 3];
    loop {
        match t.vcpu.run().unwrap() {
            VmExit::IoOut { port, data } => {
                let v = u32::from_le_bytes(data.try_into().unwrap());
                match port {
                    0x520..=0x522 => {
                        pending[usize::from(port - 0x520)] = v;
                        if port == 0x522 {
                            faults.push((u64::from(pending[0]) | u64::from(pending[1]) << 32, v));
                        }
                    }
                    0x511 => probes.push(v),
                    0xf4 => assert_eq!(v, 0, "guest status"),
                    other => panic!("unexpected port {other:#x}"),
                }
            }
            VmExit::Halt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    assert_eq!(probes, (0..9).collect::<Vec<u32>>());
    assert_eq!(
        faults,
        vec![
            (0x1ff000, 0),
            (0x1fe000, 3),
            (0x1fd000, 0x11),
            (0x1fb000, 1),
            (0x1fa000, 0x11),
            (0x40a0_0000, 9),
            (0x1fb000, 3)
        ]
    );
    let _ = Ordering::SeqCst;
}
