//! Devices behind the mmio transport, woken by an event-manager loop through their queue
//! eventfds and backend fds.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmkit_virtio::features::*;
use vmkit_virtio::net::{ChannelBackend, Net, NetBackend, NetConfig};
use vmkit_virtio::rng::Rng;
use vmkit_virtio::{CallbackIrq, MmioTransport};

type Mem = GuestMemoryMmap<()>;
type Sub = Arc<Mutex<dyn MutEventSubscriber + Send>>;

fn leak_mem() -> &'static Mem {
    Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
    ))
}

fn counter() -> (Arc<AtomicU32>, Box<CallbackIrq>) {
    let c = Arc::new(AtomicU32::new(0));
    let c2 = c.clone();
    (
        c,
        Box::new(CallbackIrq::new(move || {
            c2.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })),
    )
}

#[test]
fn ioeventfd_notification_runs_the_queue() {
    let m = leak_mem();
    let (irqs, irq) = counter();
    let t = Arc::new(Mutex::new(
        MmioTransport::new(Box::new(Rng::new()), m, irq).unwrap(),
    ));
    let vq = mock_queue(m, 0, 16);
    {
        let mut g = t.lock().unwrap();
        assert!(negotiate(&mut g, 1 << VIRTIO_F_VERSION_1));
        assert!(setup_queue(
            &mut g,
            0,
            16,
            vq.desc_table_addr(),
            vq.avail_addr(),
            vq.used_addr()
        ));
        driver_ok(&mut g);
    }
    let mut ev: EventManager<Sub> = EventManager::new().unwrap();
    ev.add_subscriber(t.clone());
    push_chain(&vq, 16, 0, &[(0x10_0000, 32, F_WRITE)]);
    // What KVM does on the guest's QueueNotify store when the eventfd is an ioeventfd.
    t.lock().unwrap().queue_events()[0].write(1).unwrap();
    assert_eq!(ev.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(irqs.load(Ordering::SeqCst), 1);
}

#[test]
fn backend_fd_wakes_the_receiving_net_device() {
    let m = leak_mem();
    let (ea, mut eb) = ChannelBackend::pair().unwrap();
    let (irqs, irq) = counter();
    let dev = Net::new(
        Box::new(ea),
        NetConfig {
            queue_size: 16,
            ..NetConfig::default()
        },
    );
    let t = Arc::new(Mutex::new(
        MmioTransport::new(Box::new(dev), m, irq).unwrap(),
    ));
    let rx = mock_queue(m, 0, 16);
    let tx = mock_queue(m, 0x8000, 16);
    {
        let mut g = t.lock().unwrap();
        assert!(negotiate(&mut g, 1 << VIRTIO_F_VERSION_1));
        assert!(setup_queue(
            &mut g,
            0,
            16,
            rx.desc_table_addr(),
            rx.avail_addr(),
            rx.used_addr()
        ));
        assert!(setup_queue(
            &mut g,
            1,
            16,
            tx.desc_table_addr(),
            tx.avail_addr(),
            tx.used_addr()
        ));
        driver_ok(&mut g);
        assert!(g.is_running());
    }
    let mut ev: EventManager<Sub> = EventManager::new().unwrap();
    ev.add_subscriber(t.clone());
    push_chain(&rx, 16, 0, &[(0x20_0000, 2048, F_WRITE)]);
    eb.send(&[0u8; 12 + 60]).unwrap();
    assert_eq!(ev.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(rx.used().idx().load(), 1);
    assert_eq!(used_entry(&rx, 16, 0).1, 72);
    assert_eq!(irqs.load(Ordering::SeqCst), 1);
}

#[test]
fn net_feature_dependencies_are_enforced_at_features_ok() {
    use vmkit_virtio::net::header::bits::*;
    let m = leak_mem();
    let (ea, _eb) = ChannelBackend::pair().unwrap();
    let (_irqs, irq) = counter();
    let dev = Net::new(Box::new(ea), NetConfig::default());
    let mut t = MmioTransport::new(Box::new(dev), m, irq).unwrap();
    let v1 = 1u64 << VIRTIO_F_VERSION_1;
    // TSO4 towards the guest without GUEST_CSUM, and HOST_ECN without HOST_TSO: refused.
    assert!(!negotiate(&mut t, v1 | (1 << VIRTIO_NET_F_GUEST_TSO4)));
    assert!(!negotiate(
        &mut t,
        v1 | (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_ECN)
    ));
    // With their dependencies: accepted.
    assert!(negotiate(
        &mut t,
        v1 | (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4)
    ));
    assert!(negotiate(
        &mut t,
        v1 | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_HOST_TSO6)
            | (1 << VIRTIO_NET_F_HOST_ECN)
    ));
}
