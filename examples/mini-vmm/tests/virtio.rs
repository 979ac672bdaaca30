//! mini-vmm's virtio wiring on a real KVM VM (this host's): devices from the command line,
//! slots, the MMIO bus, the irqfd/ioeventfd registrations and the event loop, driven the way a
//! guest driver would (register writes through the dispatcher's bus, a queue notification
//! through the queue eventfd KVM signals on `QueueNotify`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_device::bus::MmioAddress;
use vm_device::device_manager::MmioManager;
use vm_memory::{Bytes, GuestAddress};
use vmkit_vcpu::dispatch::{Dispatcher, UnclaimedPolicy};
use vmkit_vcpu::kvm::KvmHypervisor;
use vmkit_vcpu::{Hypervisor, MemoryFlags, Vm};
use vmkit_virtio::mmio::regs;

use mini_vmm::args::Args;
use mini_vmm::virtio::{devices_from_args, slot, VirtioDevices, VirtioError, GSIS, MMIO_BASE};

fn args(list: &[&str]) -> Args {
    Args::parse(list.iter().map(|s| s.to_string())).unwrap()
}

#[test]
fn slots_use_one_page_and_one_gsi_each_skipping_the_rtc() {
    assert_eq!(slot(0), Some((MMIO_BASE, 5)));
    assert_eq!(slot(3), Some((MMIO_BASE + 0x3000, 9)));
    assert_eq!(slot(GSIS.len() - 1).map(|s| s.1), Some(23));
    assert_eq!(slot(GSIS.len()), None);
    assert!(!GSIS.contains(&8) && !GSIS.contains(&4));
}

#[test]
fn device_errors_name_the_option() {
    let e = devices_from_args(&args(&[
        "--kernel",
        "/k",
        "--disk",
        "path=/nonexistent/disk.img",
    ]))
    .err()
    .unwrap();
    let msg = e.to_string();
    assert!(
        msg.starts_with("`--disk path=/nonexistent/disk.img`: cannot open disk image"),
        "{msg}"
    );
    let e = devices_from_args(&args(&[
        "--kernel",
        "/k",
        "--console",
        "file=/nonexistent/dir/c",
    ]))
    .err()
    .unwrap();
    assert!(
        e.to_string()
            .contains("`--console file=/nonexistent/dir/c`"),
        "{e}"
    );
}

fn w32(d: &Dispatcher, addr: u64, v: u32) {
    d.io()
        .mmio_write(MmioAddress(addr), &v.to_le_bytes())
        .unwrap();
}

fn r32(d: &Dispatcher, addr: u64) -> u32 {
    let mut b = [0u8; 4];
    d.io().mmio_read(MmioAddress(addr), &mut b).unwrap();
    u32::from_le_bytes(b)
}

#[test]
fn devices_are_wired_into_kvm_the_bus_and_the_event_loop() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm"
    );
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let console = dir.path().join("console.out");
    let a = args(&[
        "--kernel",
        "/k",
        "--disk",
        &format!("path={},readonly=on", disk.display()),
        "--rng",
        "--console",
        &format!("file={}", console.display()),
    ]);
    let specs = devices_from_args(&a).unwrap();
    let names: Vec<_> = specs.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        names,
        vec![
            format!("virtio-blk {}", disk.display()),
            "virtio-rng".to_string(),
            "virtio-console".to_string()
        ]
    );

    let hv = KvmHypervisor::new().unwrap();
    let vm = hv.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let mem =
        Arc::new(vmkit_memory::GuestRam::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap());
    vm.register_memory(&mem, 0, MemoryFlags::default()).unwrap();
    // One more device than there are GSIs is refused before anything is wired.
    let too_many: Vec<(String, Box<dyn vmkit_virtio::VirtioDevice<_>>)> = (0..=GSIS.len())
        .map(|_| {
            (
                "rng".to_string(),
                Box::new(vmkit_virtio::rng::Rng::new()) as _,
            )
        })
        .collect();
    let e = VirtioDevices::new(too_many, mem.clone(), &vm).unwrap_err();
    assert_eq!(e.to_string(), "too many virtio devices (19; at most 18)");
    let mut devices = VirtioDevices::new(specs, mem.clone(), &vm).unwrap();
    let info = devices.acpi_info();
    assert_eq!(info.len(), 3);
    for (i, d) in info.iter().enumerate() {
        assert_eq!(
            (d.base, d.size, d.gsi),
            (MMIO_BASE + 0x1000 * i as u64, 0x200, GSIS[i])
        );
    }
    assert!(format!("{:?}", devices.slots()[1]).contains("virtio-rng"));

    let mut d = Dispatcher::new(UnclaimedPolicy::default());
    devices.register(&mut d).unwrap();
    // The same windows on a second dispatcher (another vCPU) share the transports.
    let mut d2 = Dispatcher::new(UnclaimedPolicy::default());
    devices.register(&mut d2).unwrap();
    assert!(matches!(
        devices.register(&mut d2),
        Err(VirtioError::Bus(_))
    ));
    let rng = MMIO_BASE + 0x1000;
    assert_eq!(r32(&d, MMIO_BASE + regs::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r32(&d, MMIO_BASE + regs::DEVICE_ID), 2, "blk");
    assert_eq!(r32(&d2, rng + regs::DEVICE_ID), 4, "rng");
    assert_eq!(r32(&d, MMIO_BASE + 0x2000 + regs::DEVICE_ID), 3, "console");
    // The read-only disk: capacity 2048 sectors in its config space.
    let mut cap = [0u8; 8];
    d.io()
        .mmio_read(MmioAddress(MMIO_BASE + regs::CONFIG), &mut cap)
        .unwrap();
    assert_eq!(u64::from_le_bytes(cap), 2048);

    // A driver brings the rng up with one 16-entry queue and offers one 32-byte buffer.
    let (desc, avail, used, buf) = (0x10000u64, 0x11000u64, 0x12000u64, 0x20000u64);
    mem.write_obj(buf, GuestAddress(desc)).unwrap();
    mem.write_obj(32u32, GuestAddress(desc + 8)).unwrap();
    mem.write_obj(2u16, GuestAddress(desc + 12)).unwrap(); // VRING_DESC_F_WRITE
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap(); // idx 1, ring[0] = 0
    for s in [1, 3] {
        w32(&d, rng + regs::STATUS, s);
    }
    w32(&d, rng + regs::DRIVER_FEATURES_SEL, 1);
    w32(&d, rng + regs::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    w32(&d, rng + regs::STATUS, 0xb);
    assert_eq!(r32(&d, rng + regs::STATUS), 0xb, "FEATURES_OK accepted");
    w32(&d, rng + regs::QUEUE_SEL, 0);
    w32(&d, rng + regs::QUEUE_NUM, 16);
    w32(&d, rng + regs::QUEUE_DESC_LOW, desc as u32);
    w32(&d, rng + regs::QUEUE_DRIVER_LOW, avail as u32);
    w32(&d, rng + regs::QUEUE_DEVICE_LOW, used as u32);
    w32(&d, rng + regs::QUEUE_READY, 1);
    w32(&d, rng + regs::STATUS, 0xf);
    assert!(devices.slots()[1].transport.lock().unwrap().is_running());

    // The event loop serves the notification KVM would signal for the guest's store.
    devices.start().unwrap();
    devices.start().unwrap();
    devices.slots()[1].transport.lock().unwrap().queue_events()[0]
        .write(1)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap() != 1 {
        assert!(
            Instant::now() < deadline,
            "the event loop never served the queue"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(mem.read_obj::<u32>(GuestAddress(used + 8)).unwrap(), 32);
    // The device raised its interrupt (through the irqfd) and flagged a used buffer.
    assert_eq!(r32(&d, rng + regs::INTERRUPT_STATUS), 1);
    devices.stop();
    devices.stop();

    // Snapshot: the transports' states restore into the same devices of a new VM, and each
    // queue is signalled once so a notification in flight is not lost.
    let states = devices.save_states().unwrap();
    assert_eq!(states.len(), 3);
    let vm2 = hv.create_vm().unwrap();
    vm2.create_irq_chip().unwrap();
    vm2.register_memory(&mem, 0, MemoryFlags::default())
        .unwrap();
    let restored = VirtioDevices::new(devices_from_args(&a).unwrap(), mem.clone(), &vm2).unwrap();
    let files: Vec<_> = states
        .iter()
        .enumerate()
        .map(|(i, b)| (b.clone(), dir.path().join(format!("virtio-{i}.bin"))))
        .collect();
    restored.restore_states(&files).unwrap();
    let mut d3 = Dispatcher::new(UnclaimedPolicy::default());
    restored.register(&mut d3).unwrap();
    assert_eq!(r32(&d3, rng + regs::STATUS), 0xf);
    let t = restored.slots()[1].transport.lock().unwrap();
    assert!(t.is_running());
    assert_eq!(t.queue_events()[0].read().unwrap(), 1, "queue signalled");
    drop(t);
    assert_eq!(restored.save_states().unwrap(), states);
    // A corrupt state is an error naming its file.
    let mut bad = files.clone();
    bad[2].0.truncate(5);
    let e = restored.restore_states(&bad).unwrap_err().to_string();
    assert!(
        e.contains("virtio-2.bin") && e.contains("virtio-console"),
        "{e}"
    );
}
