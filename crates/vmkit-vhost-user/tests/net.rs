//! virtio-net over vhost-user, driven through vhost's frontend API with an in-process channel
//! as the host side: frames cross in both directions, a frame that finds no receive buffer
//! waits for one, and malformed transmit chains are dropped without stopping the queue.

mod common;

use std::sync::Arc;

use common::*;
use vmkit_vhost_user::{net_backend, serve, ServeOptions, Stop};
use vmkit_virtio::net::{ChannelBackend, NetBackend, NetConfig};

const RXQ: usize = 0;
const TXQ: usize = 1;
const HDR: usize = 12;

fn frame(payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; HDR];
    // Ethernet: broadcast destination, a source MAC, an experimental EtherType.
    f.extend([0xff; 6]);
    f.extend([0x02, 0, 0, 0, 0, seed]);
    f.extend([0x88, 0xb5]);
    f.extend((0..payload_len).map(|i| (i as u8) ^ seed));
    f
}

fn wait_recv(peer: &mut ChannelBackend) -> Vec<u8> {
    let mut buf = vec![0u8; 70000];
    // A bound against hangs, not a timing assertion: 60 s for a loaded machine.
    for _ in 0..12_000 {
        if let Some(n) = peer.recv(&mut buf).unwrap() {
            buf.truncate(n);
            return buf;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("no frame from the guest within 60 s");
}

#[test]
fn frames_cross_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let (ours, mut peer) = ChannelBackend::pair().unwrap();
    let backend = Arc::new(net_backend(Box::new(ours), NetConfig::default()));
    // Without protocol features the frontend cannot GET_CONFIG (QEMU keeps net's config space
    // itself), but the device still has one: MAC first.
    use vhost_user_backend::VhostUserBackend;
    assert_eq!(backend.get_config(0, 6), NetConfig::default().mac);
    let stop = Stop::new().unwrap();
    let (s, st) = (sock.clone(), stop.clone());
    let daemon = std::thread::spawn(move || serve(backend, &s, &st, ServeOptions { once: true }));

    let mut t = TestFrontend::connect(&sock, 2, 256, 0);
    // Offered again: serve() puts the early-enable shim in front of net.
    assert_ne!(t.features & (1 << 30), 0, "PROTOCOL_FEATURES not offered");
    assert_ne!(t.features & (1 << 15), 0, "MRG_RXBUF not offered");
    peer.set_guest_features(t.features).unwrap();

    // Guest -> host: a frame split over two descriptors.
    let f = frame(1000, 1);
    t.write(DATA, &f[..100]);
    t.write(DATA + 0x1000, &f[100..]);
    t.submit(
        TXQ,
        &[
            (DATA, 100, false),
            (DATA + 0x1000, (f.len() - 100) as u32, false),
        ],
    );
    assert_eq!(t.wait_used(TXQ).1, 0);
    assert_eq!(wait_recv(&mut peer), f);

    // Host -> guest: the frame arrives before the guest posted buffers; it waits.
    let g = frame(1400, 2);
    peer.send(&g).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(t.used_idx(RXQ), 0);
    t.submit(RXQ, &[(DATA + 0x4000, 2048, true)]);
    let (_, len) = t.wait_used(RXQ);
    assert_eq!(len as usize, g.len());
    let got = t.read(DATA + 0x4000, g.len());
    // num_buffers (header bytes 10..12) is 1 with mergeable buffers; the rest is the frame.
    assert_eq!(&got[10..12], &1u16.to_le_bytes());
    assert_eq!(got[..10], g[..10]);
    assert_eq!(got[HDR..], g[HDR..]);

    // A frame larger than one buffer is merged over several posted buffers.
    t.post(RXQ, &[(DATA + 0x8000, 1024, true)]);
    t.post(RXQ, &[(DATA + 0x9000, 1024, true)]);
    let big = frame(1800, 3);
    peer.send(&big).unwrap();
    let (_, l1) = t.wait_used(RXQ);
    let (_, l2) = t.wait_used(RXQ);
    assert_eq!((l1 + l2) as usize, big.len());
    let mut merged = t.read(DATA + 0x8000, l1 as usize);
    merged.extend(t.read(DATA + 0x9000, l2 as usize));
    assert_eq!(&merged[10..12], &2u16.to_le_bytes());
    assert_eq!(merged[HDR..], big[HDR..]);

    // Buffers posted (and kicked) long before any frame: the idle receive queue must not keep
    // the worker busy, so the frame that comes later is delivered.
    t.submit(RXQ, &[(DATA + 0xa000, 2048, true)]);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let late = frame(100, 5);
    peer.send(&late).unwrap();
    let (_, len) = t.wait_used(RXQ);
    assert_eq!(len as usize, late.len());

    // A transmit chain with a device-writable buffer is dropped; the queue keeps going.
    t.submit(TXQ, &[(DATA, 64, true)]);
    assert_eq!(t.wait_used(TXQ).1, 0);
    let f2 = frame(60, 4);
    t.write(DATA, &f2);
    t.submit(TXQ, &[(DATA, f2.len() as u32, false)]);
    t.wait_used(TXQ);
    assert_eq!(wait_recv(&mut peer), f2);

    drop(t);
    assert_eq!(daemon.join().unwrap().unwrap(), 1);
}

/// A frame larger than the receive buffers posted so far waits; the device must then ask for a
/// kick on the driver's *next* buffer (with event-idx the driver, having published buffers the
/// device did not take, would otherwise not notify), so the frame is delivered as soon as
/// enough buffers exist, without any further traffic.
#[test]
fn a_frame_too_big_for_the_posted_buffers_waits_for_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let (ours, mut peer) = ChannelBackend::pair().unwrap();
    let backend = Arc::new(net_backend(Box::new(ours), NetConfig::default()));
    let stop = Stop::new().unwrap();
    let (s, st) = (sock.clone(), stop.clone());
    let daemon = std::thread::spawn(move || serve(backend, &s, &st, ServeOptions { once: true }));
    let mut t = TestFrontend::connect(&sock, 2, 256, 0);
    assert_ne!(t.features & EVENT_IDX, 0, "EVENT_IDX not offered");
    assert_ne!(t.features & (1 << 15), 0, "MRG_RXBUF not offered");
    peer.set_guest_features(t.features).unwrap();

    // One 1 KiB buffer; the first buffer always kicks (avail_event starts at 0).
    assert!(t.submit_like_driver(RXQ, &[(DATA + 0x8000, 1024, true)]));
    let big = frame(1800, 7);
    peer.send(&big).unwrap();
    // The frame does not fit: the device leaves the buffer and asks for a kick past it.
    let mut waited = 0;
    while t.avail_event(RXQ) != 1 {
        assert!(
            waited < 12_000,
            "device never asked for the next buffer (60 s)"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
        waited += 1;
    }
    assert_eq!(t.used_idx(RXQ), 0);
    // The second buffer kicks, and the frame is merged over both.
    assert!(t.submit_like_driver(RXQ, &[(DATA + 0x9000, 1024, true)]));
    let (_, l1) = t.wait_used(RXQ);
    let (_, l2) = t.wait_used(RXQ);
    assert_eq!((l1 + l2) as usize, big.len());
    let mut merged = t.read(DATA + 0x8000, l1 as usize);
    merged.extend(t.read(DATA + 0x9000, l2 as usize));
    assert_eq!(&merged[10..12], &2u16.to_le_bytes());
    assert_eq!(merged[HDR..], big[HDR..]);

    drop(t);
    assert_eq!(daemon.join().unwrap().unwrap(), 1);
}

/// QEMU 10's order: rings enabled before `SET_FEATURES`, never after. The early-enable shim
/// replays the enables after `SET_FEATURES`, so frames flow both ways.
#[test]
fn rings_enabled_before_set_features_carry_frames() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let (ours, mut peer) = ChannelBackend::pair().unwrap();
    let backend = Arc::new(net_backend(Box::new(ours), NetConfig::default()));
    let stop = Stop::new().unwrap();
    let (s, st) = (sock.clone(), stop.clone());
    let daemon = std::thread::spawn(move || serve(backend, &s, &st, ServeOptions { once: true }));
    let mut t = TestFrontend::connect_like_qemu(&sock, 2, 256, 0);
    assert_ne!(t.features & (1 << 30), 0, "PROTOCOL_FEATURES not offered");
    peer.set_guest_features(t.features).unwrap();

    let f = frame(300, 8);
    t.write(DATA, &f);
    t.submit(TXQ, &[(DATA, f.len() as u32, false)]);
    assert_eq!(t.wait_used(TXQ).1, 0);
    assert_eq!(wait_recv(&mut peer), f);

    t.submit(RXQ, &[(DATA + 0x4000, 2048, true)]);
    let g = frame(500, 9);
    peer.send(&g).unwrap();
    let (_, len) = t.wait_used(RXQ);
    assert_eq!(len as usize, g.len());
    assert_eq!(t.read(DATA + 0x4000, g.len())[HDR..], g[HDR..]);

    drop(t);
    assert_eq!(daemon.join().unwrap().unwrap(), 1);
}

#[test]
fn tap_errors_name_the_interface() {
    let e = vmkit_vhost_user::tap_backend("name-much-too-long-for-ifnamsiz", NetConfig::default())
        .unwrap_err();
    assert!(
        e.to_string().contains("name-much-too-long-for-ifnamsiz"),
        "{e}"
    );
}
