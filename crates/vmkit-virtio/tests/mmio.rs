//! virtio-mmio register semantics, driven like a guest driver would, with the rng device
//! behind the transport and virtio-queue's MockSplitQueue as the driver side of the ring.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use common::*;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::features::*;
use vmkit_virtio::interrupt::{INT_CONFIG, INT_USED_RING};
use vmkit_virtio::mmio::{regs, MmioTransport, DEFAULT_VENDOR_ID, MMIO_MAGIC};
use vmkit_virtio::rng::{Rng, RNG_QUEUE_SIZE};
use vmkit_virtio::CallbackIrq;

type Mem = GuestMemoryMmap<()>;
type AMem = Arc<Mem>;

fn mem() -> AMem {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap())
}

fn transport(m: &AMem) -> (MmioTransport<AMem>, Arc<AtomicU32>) {
    let irqs = Arc::new(AtomicU32::new(0));
    let i = irqs.clone();
    let t = MmioTransport::new(
        Box::new(Rng::new()),
        m.clone(),
        Box::new(CallbackIrq::new(move || {
            i.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })),
    )
    .unwrap();
    (t, irqs)
}

const F: u64 = 1 << VIRTIO_F_VERSION_1;

#[test]
fn identification_registers() {
    let m = mem();
    let (mut t, _) = transport(&m);
    assert_eq!(rd(&mut t, regs::MAGIC_VALUE), MMIO_MAGIC);
    assert_eq!(rd(&mut t, regs::VERSION), 2);
    assert_eq!(rd(&mut t, regs::DEVICE_ID), DEVICE_ID_RNG);
    assert_eq!(rd(&mut t, regs::VENDOR_ID), DEFAULT_VENDOR_ID);
    let f = device_features(&mut t);
    assert_ne!(f & F, 0, "VERSION_1 must be offered");
    wr(&mut t, regs::DEVICE_FEATURES_SEL, 7);
    assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), 0);
    wr(&mut t, regs::QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), u32::from(RNG_QUEUE_SIZE));
    wr(&mut t, regs::QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 0, "missing queue reads 0");
    assert_eq!(rd(&mut t, regs::SHM_LEN_LOW), u32::MAX);
    assert_eq!(rd(&mut t, regs::SHM_LEN_HIGH), u32::MAX);
    assert_eq!(rd(&mut t, regs::QUEUE_RESET), 0);
    let t2 = MmioTransport::new(
        Box::new(Rng::new()),
        m.clone(),
        Box::new(CallbackIrq::new(|| Ok(()))),
    )
    .unwrap()
    .with_vendor_id(0x1234);
    let mut t2 = t2;
    assert_eq!(rd(&mut t2, regs::VENDOR_ID), 0x1234);
    assert!(format!("{t2:?}").contains("MmioTransport"));
}

#[test]
fn bad_access_widths_are_ignored() {
    let m = mem();
    let (mut t, _) = transport(&m);
    let mut b = [0xffu8; 2];
    t.read(regs::MAGIC_VALUE, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    t.read(regs::MAGIC_VALUE + 1, &mut b);
    assert_eq!(b, [0; 4]);
    t.write(regs::STATUS, &[1]);
    assert_eq!(rd(&mut t, regs::STATUS), 0);
    t.write(regs::STATUS + 2, &[1, 0, 0, 0]);
    assert_eq!(rd(&mut t, regs::STATUS), 0);
    assert_eq!(rd(&mut t, 0x0e0), 0, "unknown register reads 0");
    wr(&mut t, regs::MAGIC_VALUE, 5);
    assert_eq!(rd(&mut t, regs::MAGIC_VALUE), MMIO_MAGIC);
    // rng has no config space: reads are zero, writes are ignored.
    let mut c = [0xffu8; 8];
    t.read(regs::CONFIG, &mut c);
    assert_eq!(c, [0; 8]);
    t.write(regs::CONFIG, &[1, 2]);
}

#[test]
fn status_state_machine() {
    let m = mem();
    let (mut t, _) = transport(&m);
    // DRIVER before ACKNOWLEDGE is refused.
    wr(&mut t, regs::STATUS, STATUS_DRIVER);
    assert_eq!(rd(&mut t, regs::STATUS), 0);
    wr(&mut t, regs::STATUS, STATUS_ACKNOWLEDGE);
    // Skipping DRIVER to FEATURES_OK is refused.
    wr(
        &mut t,
        regs::STATUS,
        STATUS_ACKNOWLEDGE | STATUS_FEATURES_OK,
    );
    assert_eq!(rd(&mut t, regs::STATUS), STATUS_ACKNOWLEDGE);
    // Setting two steps at once in order is fine.
    wr(&mut t, regs::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    assert_eq!(rd(&mut t, regs::STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // Clearing a bit is refused.
    wr(&mut t, regs::STATUS, STATUS_DRIVER);
    assert_eq!(rd(&mut t, regs::STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    // DRIVER_OK without FEATURES_OK is refused.
    wr(
        &mut t,
        regs::STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
    );
    assert_eq!(rd(&mut t, regs::STATUS) & STATUS_DRIVER_OK, 0);
    // FAILED freezes everything until reset.
    wr(
        &mut t,
        regs::STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FAILED,
    );
    assert_ne!(rd(&mut t, regs::STATUS) & STATUS_FAILED, 0);
    write_driver_features(&mut t, F);
    wr(&mut t, regs::STATUS, 0xff);
    assert_eq!(rd(&mut t, regs::STATUS) & STATUS_FEATURES_OK, 0);
    wr(&mut t, regs::STATUS, 0);
    assert_eq!(rd(&mut t, regs::STATUS), 0);
    assert!(negotiate(&mut t, F));
}

#[test]
fn feature_negotiation_refuses_what_was_not_offered() {
    let m = mem();
    let (mut t, _) = transport(&m);
    let offered = device_features(&mut t);
    // A bit outside the offer: FEATURES_OK does not stick.
    assert!(!negotiate(&mut t, offered | (1 << 60)));
    // Without VERSION_1 a modern transport refuses.
    assert!(!negotiate(&mut t, offered & !F));
    // Selector beyond 1 with a set bit is outside any offer.
    wr(&mut t, regs::STATUS, 0);
    wr(&mut t, regs::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write_driver_features(&mut t, F);
    wr(&mut t, regs::DRIVER_FEATURES_SEL, 2);
    wr(&mut t, regs::DRIVER_FEATURES, 1);
    wr(
        &mut t,
        regs::STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_eq!(rd(&mut t, regs::STATUS) & STATUS_FEATURES_OK, 0);
    // The exact offer is accepted and reaches the device.
    assert!(negotiate(&mut t, offered));
    assert_eq!(t.device().acked_features(), offered);
    // Features are frozen after FEATURES_OK.
    write_driver_features(&mut t, F);
    wr(&mut t, regs::STATUS, 0);
    assert_eq!(t.device().acked_features(), 0, "reset clears the device");
    // Writing features before DRIVER is ignored.
    wr(&mut t, regs::DRIVER_FEATURES_SEL, 0);
    wr(&mut t, regs::DRIVER_FEATURES, 0xffff_ffff);
    wr(
        &mut t,
        regs::STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_eq!(rd(&mut t, regs::STATUS) & STATUS_FEATURES_OK, 0);
}

#[test]
fn queue_setup_rules() {
    let m = mem();
    let (mut t, _) = transport(&m);
    let vq = mock_queue(&*m, 0, 16);
    // Before FEATURES_OK queue registers are ignored.
    wr(&mut t, regs::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    wr(&mut t, regs::QUEUE_SEL, 0);
    wr(&mut t, regs::QUEUE_NUM, 16);
    assert_eq!(rd(&mut t, regs::QUEUE_NUM), u32::from(RNG_QUEUE_SIZE));
    assert!(negotiate(&mut t, F));
    // Sizes: not a power of two, zero, over the maximum: refused.
    for bad in [0u32, 3, 512, 0x1_0000] {
        wr(&mut t, regs::QUEUE_NUM, bad);
        assert_eq!(
            rd(&mut t, regs::QUEUE_NUM),
            u32::from(RNG_QUEUE_SIZE),
            "size {bad}"
        );
    }
    // Misaligned descriptor table: QueueReady refused.
    assert!(!setup_queue(
        &mut t,
        0,
        16,
        GuestAddress(0x1008),
        vq.avail_addr(),
        vq.used_addr()
    ));
    // Ring outside guest memory: refused.
    assert!(!setup_queue(
        &mut t,
        0,
        16,
        GuestAddress(0x1_0000_0000),
        vq.avail_addr(),
        vq.used_addr()
    ));
    assert!(setup_queue(
        &mut t,
        0,
        16,
        vq.desc_table_addr(),
        vq.avail_addr(),
        vq.used_addr()
    ));
    assert_eq!(
        rd(&mut t, regs::QUEUE_DESC_LOW),
        vq.desc_table_addr().0 as u32
    );
    assert_eq!(rd(&mut t, regs::QUEUE_DRIVER_LOW), vq.avail_addr().0 as u32);
    assert_eq!(rd(&mut t, regs::QUEUE_DEVICE_LOW), vq.used_addr().0 as u32);
    assert_eq!(rd(&mut t, regs::QUEUE_DESC_HIGH), 0);
    assert_eq!(rd(&mut t, regs::QUEUE_DRIVER_HIGH), 0);
    assert_eq!(rd(&mut t, regs::QUEUE_DEVICE_HIGH), 0);
    // While ready the queue cannot change.
    wr(&mut t, regs::QUEUE_NUM, 8);
    assert_eq!(rd(&mut t, regs::QUEUE_NUM), 16);
    // QueueReady values other than 0/1 are ignored; 0 un-readies.
    wr(&mut t, regs::QUEUE_READY, 2);
    assert_eq!(rd(&mut t, regs::QUEUE_READY), 1);
    wr(&mut t, regs::QUEUE_READY, 0);
    assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
    assert!(setup_queue(
        &mut t,
        0,
        16,
        vq.desc_table_addr(),
        vq.avail_addr(),
        vq.used_addr()
    ));
    // A missing queue ignores everything.
    assert!(!setup_queue(
        &mut t,
        5,
        16,
        vq.desc_table_addr(),
        vq.avail_addr(),
        vq.used_addr()
    ));
    driver_ok(&mut t);
    assert!(t.is_running());
    assert!(t.device().is_activated());
    // After DRIVER_OK queue setup is refused.
    wr(&mut t, regs::QUEUE_SEL, 0);
    wr(&mut t, regs::QUEUE_READY, 0);
    assert_eq!(rd(&mut t, regs::QUEUE_READY), 1);
    wr(&mut t, regs::QUEUE_DESC_LOW, 0x4000);
    assert_eq!(
        rd(&mut t, regs::QUEUE_DESC_LOW),
        vq.desc_table_addr().0 as u32
    );
}

fn running(m: &AMem) -> (MmioTransport<AMem>, Arc<AtomicU32>, MockSplitQueue<'_, Mem>) {
    let (mut t, irqs) = transport(m);
    let vq = mock_queue(&**m, 0, 16);
    assert!(negotiate(&mut t, F));
    assert!(setup_queue(
        &mut t,
        0,
        16,
        vq.desc_table_addr(),
        vq.avail_addr(),
        vq.used_addr()
    ));
    driver_ok(&mut t);
    (t, irqs, vq)
}

#[test]
fn notify_fills_buffers_and_interrupts() {
    let m = mem();
    let (mut t, irqs, vq) = running(&m);
    let d = RawDescriptor::from(Descriptor::new(0x10_0000, 64, VRING_DESC_F_WRITE, 0));
    vq.add_desc_chains(&[d], 0).unwrap();
    wr(&mut t, regs::QUEUE_NOTIFY, 0);
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 64);
    let mut got = [0u8; 64];
    m.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
    assert_ne!(got, [0u8; 64], "64 random bytes are not all zero");
    assert_eq!(irqs.load(Ordering::SeqCst), 1);
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), INT_USED_RING);
    wr(&mut t, regs::INTERRUPT_ACK, INT_USED_RING);
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
    // Notifying a queue that does not exist is harmless.
    wr(&mut t, regs::QUEUE_NOTIFY, 9);
    assert!(t.is_running());
    // The ioeventfd path does the same work.
    let d = RawDescriptor::from(Descriptor::new(0x10_1000, 32, VRING_DESC_F_WRITE, 0));
    vq.add_desc_chains(&[d], 1).unwrap();
    t.queue_events()[0].write(1).unwrap();
    t.process_queue_event(0);
    assert_eq!(vq.used().idx().load(), 2);
}

const VRING_DESC_F_WRITE: u16 = 2;

#[test]
fn runaway_avail_index_sets_needs_reset() {
    let m = mem();
    let (mut t, irqs, vq) = running(&m);
    // The driver claims 1000 new buffers in a 16-entry queue.
    vq.avail().idx().store(1000);
    wr(&mut t, regs::QUEUE_NOTIFY, 0);
    let status = rd(&mut t, regs::STATUS);
    assert_ne!(status & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
    assert_eq!(rd(&mut t, regs::CONFIG_GENERATION), 1);
    assert_eq!(irqs.load(Ordering::SeqCst), 1);
    assert!(!t.is_running());
    // Further notifications are ignored; the driver echoing NEEDS_RESET back changes nothing.
    wr(&mut t, regs::QUEUE_NOTIFY, 0);
    wr(&mut t, regs::STATUS, status);
    assert_eq!(rd(&mut t, regs::STATUS), status);
    // Reset recovers the device.
    wr(&mut t, regs::STATUS, 0);
    assert_eq!(rd(&mut t, regs::STATUS), 0);
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
    assert!(!t.device().is_activated());
}

#[test]
fn activation_failure_sets_needs_reset() {
    let m = mem();
    let (mut t, _) = transport(&m);
    assert!(negotiate(&mut t, F));
    // No queue made ready: rng needs its queue.
    driver_ok(&mut t);
    assert_ne!(rd(&mut t, regs::STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert!(!t.device().is_activated());
}

#[test]
fn mut_device_mmio_forwards() {
    use vm_device::bus::MmioAddress;
    use vm_device::MutDeviceMmio;
    let m = mem();
    let (mut t, _) = transport(&m);
    let mut b = [0u8; 4];
    t.mmio_read(MmioAddress(0xd000_0000), regs::MAGIC_VALUE, &mut b);
    assert_eq!(u32::from_le_bytes(b), MMIO_MAGIC);
    t.mmio_write(MmioAddress(0xd000_0000), regs::STATUS, &1u32.to_le_bytes());
    assert_eq!(rd(&mut t, regs::STATUS), 1);
}

#[test]
fn transport_state_round_trip_continues_the_ring() {
    let m = mem();
    let (mut t, _, vq) = running(&m);
    let d = RawDescriptor::from(Descriptor::new(0x10_0000, 16, VRING_DESC_F_WRITE, 0));
    vq.add_desc_chains(&[d], 0).unwrap();
    wr(&mut t, regs::QUEUE_NOTIFY, 0);
    let snap = t.save_state();
    // A fresh transport (the "destination VMM") picks up where the source left off.
    let (mut t2, irqs2) = transport(&m);
    t2.restore_state(&snap).unwrap();
    assert!(t2.is_running());
    assert_eq!(rd(&mut t2, regs::STATUS), rd(&mut t, regs::STATUS));
    assert_eq!(rd(&mut t2, regs::INTERRUPT_STATUS), INT_USED_RING);
    wr(&mut t2, regs::QUEUE_SEL, 0);
    assert_eq!(
        rd(&mut t2, regs::QUEUE_DESC_LOW),
        vq.desc_table_addr().0 as u32
    );
    let d = RawDescriptor::from(Descriptor::new(0x10_1000, 16, VRING_DESC_F_WRITE, 0));
    vq.add_desc_chains(&[d], 1).unwrap();
    wr(&mut t2, regs::QUEUE_NOTIFY, 0);
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(irqs2.load(Ordering::SeqCst), 1);
    // Corrupt snapshots are refused and leave the transport reset.
    for cut in [0, 4, 20, snap.len() - 1] {
        assert!(t2.restore_state(&snap[..cut]).is_err(), "cut {cut}");
        assert_eq!(rd(&mut t2, regs::STATUS), 0);
    }
    let mut bad = snap.clone();
    bad[0] = b'X';
    assert!(t2.restore_state(&bad).is_err());
    let mut bad = snap.clone();
    bad[4] = 7;
    assert!(t2.restore_state(&bad).is_err());
    let mut long = snap.clone();
    long.push(0);
    assert!(t2.restore_state(&long).is_err());
}

#[test]
fn event_idx_rearms_driver_notifications() {
    let m = mem();
    let (mut t, _) = transport(&m);
    let vq = mock_queue(&*m, 0, 16);
    assert!(negotiate(&mut t, F | (1 << VIRTIO_RING_F_EVENT_IDX)));
    assert!(setup_queue(
        &mut t,
        0,
        16,
        vq.desc_table_addr(),
        vq.avail_addr(),
        vq.used_addr()
    ));
    driver_ok(&mut t);
    for i in 0..3u16 {
        let d = RawDescriptor::from(Descriptor::new(
            0x10_0000 + 0x100 * u64::from(i),
            16,
            VRING_DESC_F_WRITE,
            0,
        ));
        vq.add_desc_chains(&[d], i).unwrap();
    }
    wr(&mut t, regs::QUEUE_NOTIFY, 0);
    assert_eq!(vq.used().idx().load(), 3);
    // The device wrote avail_event = 3: the driver kicks again when it publishes entry 3.
    let avail_event: u16 = m
        .read_obj(GuestAddress(vq.used_addr().0 + 4 + 8 * 16))
        .unwrap();
    assert_eq!(avail_event, 3);
}

#[test]
fn multiqueue_block_with_one_queue_left_disabled() {
    use vmkit_virtio::block::{Block, BlockConfig, RawDisk};
    let m = mem();
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(64 * 512).unwrap();
    let dev = Block::new(
        RawDisk::open(f.path(), false).unwrap(),
        BlockConfig {
            num_queues: 2,
            queue_size: 16,
            blk_size: 512,
        },
    );
    let mut t = MmioTransport::new(
        Box::new(dev),
        m.clone(),
        Box::new(CallbackIrq::new(|| Ok(()))),
    )
    .unwrap();
    wr(&mut t, regs::QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 16);
    let vq = mock_queue(&*m, 0x8000, 16);
    assert!(negotiate(&mut t, F));
    // Only queue 1 is set up; queue 0 stays disabled — but blk needs queue 0.
    assert!(setup_queue(
        &mut t,
        1,
        16,
        vq.desc_table_addr(),
        vq.avail_addr(),
        vq.used_addr()
    ));
    driver_ok(&mut t);
    assert_ne!(rd(&mut t, regs::STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    // Start over: queue 0 ready, queue 1 disabled. Requests on queue 0 work, kicks on the
    // disabled queue 1 are ignored.
    let vq0 = mock_queue(&*m, 0, 16);
    assert!(negotiate(&mut t, F));
    assert!(setup_queue(
        &mut t,
        0,
        16,
        vq0.desc_table_addr(),
        vq0.avail_addr(),
        vq0.used_addr()
    ));
    driver_ok(&mut t);
    assert!(t.is_running());
    let mut h = [0u8; 16];
    h[8..16].copy_from_slice(&3u64.to_le_bytes());
    m.write_slice(&h, GuestAddress(0x10_0000)).unwrap();
    push_chain(
        &vq0,
        16,
        0,
        &[
            (0x10_0000, 16, 0),
            (0x20_0000, 512, F_WRITE),
            (0x30_0000, 1, F_WRITE),
        ],
    );
    wr(&mut t, regs::QUEUE_NOTIFY, 1);
    assert_eq!(vq0.used().idx().load(), 0);
    wr(&mut t, regs::QUEUE_NOTIFY, 0);
    assert_eq!(vq0.used().idx().load(), 1);
    assert_eq!(m.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), 0);
    // Config space through the transport: capacity 64 sectors, num_queues 2.
    let mut cap = [0u8; 8];
    t.read(regs::CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64);
    let mut nq = [0u8; 2];
    t.read(regs::CONFIG + 34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 2);
}
