//! virtio-console through MockSplitQueue with a Unix socket backend.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use common::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::console::{Console, ConsoleBackend, MAX_PENDING};
use vmkit_virtio::features::*;
use vmkit_virtio::interrupt::CountingInterrupt;
use vmkit_virtio::VirtioDevice;

type Mem = GuestMemoryMmap<()>;
const QS: u16 = 16;

fn setup() -> (
    Arc<Mem>,
    Console<Arc<Mem>>,
    UnixStream,
    Arc<CountingInterrupt>,
) {
    let m = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap());
    let (a, b) = UnixStream::pair().unwrap();
    let dev = Console::new(ConsoleBackend::unix_stream(a).unwrap());
    (m, dev, b, Arc::new(CountingInterrupt::default()))
}

#[test]
fn transmit_and_receive() {
    let (m, mut dev, mut peer, irq) = setup();
    let rxq = mock_queue(&*m, 0, QS);
    let txq = mock_queue(&*m, 0x8000, QS);
    dev.ack_features(dev.device_features());
    dev.activate(
        m.clone(),
        vec![device_queue(&rxq, QS), device_queue(&txq, QS)],
        irq.clone(),
    )
    .unwrap();
    // Guest output in two buffers.
    m.write_slice(b"hello ", GuestAddress(0x10_0000)).unwrap();
    m.write_slice(b"world", GuestAddress(0x11_0000)).unwrap();
    push_chain(&txq, QS, 0, &[(0x10_0000, 6, 0), (0x11_0000, 5, 0)]);
    dev.queue_notify(1).unwrap();
    let mut got = [0u8; 11];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello world");
    assert_eq!(txq.used().idx().load(), 1);
    assert_eq!(irq.queue_count(), 1);
    // Host input arrives before the guest offers buffers: it waits.
    peer.write_all(b"typed").unwrap();
    dev.backend_event(0).unwrap();
    assert_eq!(dev.pending_input(), 5);
    push_chain(&rxq, QS, 0, &[(0x20_0000, 3, F_WRITE)]);
    push_chain(&rxq, QS, 1, &[(0x21_0000, 64, F_WRITE)]);
    dev.queue_notify(0).unwrap();
    assert_eq!(dev.pending_input(), 0);
    assert_eq!(used_entry(&rxq, QS, 0).1, 3);
    assert_eq!(used_entry(&rxq, QS, 1).1, 2);
    let mut a = [0u8; 3];
    m.read_slice(&mut a, GuestAddress(0x20_0000)).unwrap();
    let mut b = [0u8; 2];
    m.read_slice(&mut b, GuestAddress(0x21_0000)).unwrap();
    assert_eq!((&a, &b), (b"typ", b"ed"));
    // Emergency write goes straight to the output.
    dev.write_config(8, b"!");
    let mut e = [0u8; 1];
    peer.read_exact(&mut e).unwrap();
    assert_eq!(&e, b"!");
    let mut cfg = [0xffu8; 4];
    dev.read_config(0, &mut cfg);
    assert_eq!(cfg, [0; 4]);
    assert_eq!(dev.device_type(), DEVICE_ID_CONSOLE);
    assert_eq!(dev.backend_fds().len(), 1);
    assert!(dev.queue_notify(2).is_err());
}

#[test]
fn hostile_console_chains() {
    let (m, mut dev, mut peer, irq) = setup();
    let rxq = mock_queue(&*m, 0, QS);
    let txq = mock_queue(&*m, 0x8000, QS);
    dev.activate(
        m.clone(),
        vec![device_queue(&rxq, QS), device_queue(&txq, QS)],
        irq,
    )
    .unwrap();
    // TX with a writable buffer, TX outside RAM, TX loop: all returned, nothing written.
    push_chain(&txq, QS, 0, &[(0x10_0000, 6, F_WRITE)]);
    push_chain(&txq, QS, 1, &[(0x2_0000_0000, 6, 0)]);
    store_desc(&txq, 2, 0x10_0000, 4, F_NEXT, 2);
    publish(&txq, QS, 2);
    dev.queue_notify(1).unwrap();
    assert_eq!(txq.used().idx().load(), 3);
    peer.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 16];
    assert!(peer.read(&mut buf).is_err(), "nothing was output");
    // RX with a read-only buffer: returned with 0, input stays pending.
    dev.push_input(b"abc").unwrap();
    push_chain(&rxq, QS, 0, &[(0x20_0000, 8, 0)]);
    dev.queue_notify(0).unwrap();
    assert_eq!(used_entry(&rxq, QS, 0).1, 0);
    assert_eq!(dev.pending_input(), 3);
    // Input beyond the cap is dropped rather than growing without bound.
    dev.push_input(&vec![b'x'; MAX_PENDING * 2]).unwrap();
    assert_eq!(dev.pending_input(), MAX_PENDING);
    // Runaway available index: queue error.
    txq.avail().idx().store(1000);
    assert!(dev.queue_notify(1).is_err());
}

#[test]
fn console_state_keeps_pending_input() {
    let (m, mut dev, _peer, irq) = setup();
    let rxq = mock_queue(&*m, 0, QS);
    let txq = mock_queue(&*m, 0x8000, QS);
    dev.activate(
        m.clone(),
        vec![device_queue(&rxq, QS), device_queue(&txq, QS)],
        irq.clone(),
    )
    .unwrap();
    dev.push_input(b"later").unwrap();
    let s = dev.save_state();
    let (_m2, mut dev2, _p2, _) = setup();
    dev2.restore_state(&s, m.clone(), irq.clone()).unwrap();
    assert_eq!(dev2.pending_input(), 5);
    push_chain(&rxq, QS, 0, &[(0x20_0000, 8, F_WRITE)]);
    dev2.queue_notify(0).unwrap();
    assert_eq!(used_entry(&rxq, QS, 0).1, 5);
    let mut bad = s.clone();
    bad.device = vec![0; MAX_PENDING + 1];
    assert!(dev2.restore_state(&bad, m, irq).is_err());
    assert!(format!("{dev2:?}").contains("Console"));
}
