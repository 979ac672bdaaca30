//! virtio-net: two devices wired back to back through ChannelBackend, each driven through
//! MockSplitQueue, plus a TAP device inside a network namespace the test creates.

mod common;

use std::sync::Arc;

use common::*;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::features::*;
use vmkit_virtio::interrupt::CountingInterrupt;
use vmkit_virtio::net::header::bits::*;
use vmkit_virtio::net::header::{HDR_F_NEEDS_CSUM, NET_HDR_LEN};
use vmkit_virtio::net::{ChannelBackend, Net, NetBackend, NetConfig};
use vmkit_virtio::VirtioDevice;

type Mem = GuestMemoryMmap<()>;
const QS: u16 = 16;
const RXQ_AT: u64 = 0;
const TXQ_AT: u64 = 0x8000;

/// One guest: memory (leaked so the mock rings can borrow it for the whole test), the device
/// and the driver side of its two queues. MockSplitQueue::create resets the rings, so each is
/// created exactly once.
struct Side {
    m: &'static Mem,
    dev: Net<&'static Mem>,
    irq: Arc<CountingInterrupt>,
    rx: MockSplitQueue<'static, Mem>,
    tx: MockSplitQueue<'static, Mem>,
}

impl Side {
    fn new(backend: Box<dyn NetBackend>, features: u64) -> Self {
        let m: &'static Mem = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
        ));
        let mut dev = Net::new(
            backend,
            NetConfig {
                queue_size: QS,
                ..NetConfig::default()
            },
        );
        dev.ack_features(features);
        let irq = Arc::new(CountingInterrupt::default());
        let rx = mock_queue(m, RXQ_AT, QS);
        let tx = mock_queue(m, TXQ_AT, QS);
        dev.activate(
            m,
            vec![device_queue(&rx, QS), device_queue(&tx, QS)],
            irq.clone(),
        )
        .unwrap();
        Self {
            m,
            dev,
            irq,
            rx,
            tx,
        }
    }
    fn rxq(&self) -> &MockSplitQueue<'static, Mem> {
        &self.rx
    }
    fn txq(&self) -> &MockSplitQueue<'static, Mem> {
        &self.tx
    }
}

fn packet(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes header + packet into A's memory at 0x10_0000 and queues it on A's TX queue.
fn send(a: &mut Side, slot: u16, hdr: [u8; NET_HDR_LEN], pkt: &[u8]) {
    a.m.write_slice(&hdr, GuestAddress(0x10_0000)).unwrap();
    a.m.write_slice(pkt, GuestAddress(0x11_0000)).unwrap();
    push_chain(
        a.txq(),
        QS,
        slot,
        &[
            (0x10_0000, NET_HDR_LEN as u32, 0),
            (0x11_0000, pkt.len() as u32, 0),
        ],
    );
    a.dev.queue_notify(1).unwrap();
}

fn base() -> u64 {
    1 << VIRTIO_F_VERSION_1
}

#[test]
fn frames_cross_back_to_back_devices() {
    let (ea, eb) = ChannelBackend::pair().unwrap();
    let mut a = Side::new(Box::new(ea), base());
    let mut b = Side::new(Box::new(eb), base());
    push_chain(b.rxq(), QS, 0, &[(0x20_0000, 2048, F_WRITE)]);
    let pkt = packet(60, 1);
    send(&mut a, 0, [0; NET_HDR_LEN], &pkt);
    assert_eq!(a.txq().used().idx().load(), 1);
    assert_eq!(a.irq.queue_count(), 1);
    b.dev.backend_event(0).unwrap();
    assert_eq!(used_entry(b.rxq(), QS, 0).1, 72);
    let mut got = vec![0u8; 72];
    b.m.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[NET_HDR_LEN..], &pkt[..]);
    assert_eq!(b.irq.queue_count(), 1);
    assert_eq!(a.dev.stats().tx_frames, 1);
    assert_eq!(b.dev.stats().rx_frames, 1);
    // Frame arrives with no buffer posted: it waits, then lands when the driver adds one.
    send(&mut a, 2, [0; NET_HDR_LEN], &packet(100, 2));
    b.dev.backend_event(0).unwrap();
    assert_eq!(b.rxq().used().idx().load(), 1);
    push_chain(b.rxq(), QS, 1, &[(0x20_0000, 2048, F_WRITE)]);
    b.dev.queue_notify(0).unwrap();
    assert_eq!(used_entry(b.rxq(), QS, 1).1, 112);
}

#[test]
fn mergeable_rx_buffers_span_chains() {
    let (ea, eb) = ChannelBackend::pair().unwrap();
    let mut a = Side::new(Box::new(ea), base());
    let mut b = Side::new(Box::new(eb), base() | (1 << VIRTIO_NET_F_MRG_RXBUF));
    let pkt = packet(250, 3);
    push_chain(b.rxq(), QS, 0, &[(0x20_0000, 100, F_WRITE)]);
    send(&mut a, 0, [0; NET_HDR_LEN], &pkt);
    b.dev.backend_event(0).unwrap();
    // 262 bytes do not fit 100: nothing consumed yet.
    assert_eq!(b.rxq().used().idx().load(), 0);
    push_chain(b.rxq(), QS, 1, &[(0x21_0000, 100, F_WRITE)]);
    push_chain(b.rxq(), QS, 2, &[(0x22_0000, 100, F_WRITE)]);
    b.dev.queue_notify(0).unwrap();
    let rxq = &b.rx;
    assert_eq!(
        rxq.used().idx().load(),
        3,
        "three chains published together"
    );
    let lens: Vec<u32> = (0..3).map(|i| used_entry(rxq, QS, i).1).collect();
    assert_eq!(lens, [100, 100, 62]);
    let mut got = vec![0u8; 262];
    for (i, at) in [0x20_0000u64, 0x21_0000, 0x22_0000].iter().enumerate() {
        let n = lens[i] as usize;
        b.m.read_slice(&mut got[i * 100..i * 100 + n], GuestAddress(*at))
            .unwrap();
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[NET_HDR_LEN..], &pkt[..]);
}

#[test]
fn small_buffer_without_mergeable_drops_the_frame() {
    let (ea, eb) = ChannelBackend::pair().unwrap();
    let mut a = Side::new(Box::new(ea), base());
    let mut b = Side::new(Box::new(eb), base());
    push_chain(b.rxq(), QS, 0, &[(0x20_0000, 50, F_WRITE)]);
    push_chain(b.rxq(), QS, 1, &[(0x21_0000, 50, 0)]);
    send(&mut a, 0, [0; NET_HDR_LEN], &packet(100, 4));
    send(&mut a, 2, [0; NET_HDR_LEN], &packet(10, 4));
    b.dev.backend_event(0).unwrap();
    assert_eq!(used_entry(b.rxq(), QS, 0).1, 0);
    assert_eq!(
        used_entry(b.rxq(), QS, 1).1,
        0,
        "read-only RX buffer refused"
    );
    assert_eq!(b.dev.stats().rx_dropped, 2);
}

#[test]
fn hostile_tx_chains_are_dropped() {
    let (ea, eb) = ChannelBackend::pair().unwrap();
    let mut a = Side::new(Box::new(ea), base());
    let mut b = Side::new(Box::new(eb), base() | (1 << VIRTIO_NET_F_GUEST_CSUM));
    let txq = mock_queue(a.m, TXQ_AT, QS);
    // A second driver-side view of the same (still untouched) TX ring, free of the borrow of `a`.
    // Writable buffer in TX, too short for a header, outside RAM, a loop, a bad GSO type.
    push_chain(&txq, QS, 0, &[(0x10_0000, 64, F_WRITE)]);
    push_chain(&txq, QS, 1, &[(0x10_0000, 4, 0)]);
    push_chain(&txq, QS, 2, &[(0x4000_0000, 64, 0)]);
    store_desc(&txq, 3, 0x10_0000, 64, F_NEXT, 3);
    publish(&txq, QS, 3);
    let mut gso = [0u8; NET_HDR_LEN];
    gso[1] = 1;
    a.m.write_slice(&gso, GuestAddress(0x12_0000)).unwrap();
    push_chain(&txq, QS, 4, &[(0x12_0000, 80, 0)]);
    // NEEDS_CSUM without CSUM negotiated.
    let mut cs = [0u8; NET_HDR_LEN];
    cs[0] = HDR_F_NEEDS_CSUM;
    a.m.write_slice(&cs, GuestAddress(0x13_0000)).unwrap();
    push_chain(&txq, QS, 5, &[(0x13_0000, 80, 0)]);
    a.dev.queue_notify(1).unwrap();
    assert_eq!(txq.used().idx().load(), 6);
    assert_eq!(a.dev.stats().tx_dropped, 6);
    assert_eq!(a.dev.stats().tx_frames, 0);
    push_chain(b.rxq(), QS, 0, &[(0x20_0000, 2048, F_WRITE)]);
    b.dev.backend_event(0).unwrap();
    assert_eq!(b.rxq().used().idx().load(), 0, "nothing crossed the wire");
    // Runaway TX index: the device reports a queue error (transport sets NEEDS_RESET).
    txq.avail().idx().store(500);
    assert!(a.dev.queue_notify(1).is_err());
}

#[test]
fn checksum_offload_follows_negotiation() {
    let (ea, eb) = ChannelBackend::pair().unwrap();
    let mut a = Side::new(Box::new(ea), base() | (1 << VIRTIO_NET_F_CSUM));
    // B did not negotiate GUEST_CSUM: a partially checksummed frame cannot be delivered.
    let mut b = Side::new(Box::new(eb), base());
    let mut hdr = [0u8; NET_HDR_LEN];
    hdr[0] = HDR_F_NEEDS_CSUM;
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
    push_chain(b.rxq(), QS, 0, &[(0x20_0000, 2048, F_WRITE)]);
    send(&mut a, 0, hdr, &packet(60, 5));
    assert_eq!(a.dev.stats().tx_frames, 1);
    b.dev.backend_event(0).unwrap();
    assert_eq!(b.rxq().used().idx().load(), 0);
    // Once B offers GUEST_CSUM, the same frame goes through with its header intact.
    let (ea, eb) = ChannelBackend::pair().unwrap();
    let mut a = Side::new(Box::new(ea), base() | (1 << VIRTIO_NET_F_CSUM));
    let mut b = Side::new(Box::new(eb), base() | (1 << VIRTIO_NET_F_GUEST_CSUM));
    push_chain(b.rxq(), QS, 0, &[(0x20_0000, 2048, F_WRITE)]);
    send(&mut a, 0, hdr, &packet(60, 5));
    b.dev.backend_event(0).unwrap();
    let mut got = [0u8; NET_HDR_LEN];
    b.m.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(got[0], HDR_F_NEEDS_CSUM);
    assert_eq!(u16::from_le_bytes([got[6], got[7]]), 34);
}

#[test]
fn config_space_link_and_state() {
    let (ea, eb) = ChannelBackend::pair().unwrap();
    let mut a = Side::new(Box::new(ea), base());
    let mut cfg = [0u8; 12];
    a.dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &NetConfig::default().mac);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500);
    let f = a.dev.device_features();
    for bit in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
    ] {
        assert_ne!(f & (1 << bit), 0);
    }
    a.dev.write_config(0, &[0xff]);
    a.dev.set_link_up(false).unwrap();
    a.dev.read_config(6, &mut cfg[..2]);
    assert_eq!(&cfg[..2], &[0, 0]);
    assert_eq!(a.irq.config_count(), 1);
    assert!(a.dev.queue_notify(7).is_err());
    // A frame held for lack of buffers survives save/restore.
    let (ec, _ed) = ChannelBackend::pair().unwrap();
    let mut peer = eb;
    peer.send(&[0u8; NET_HDR_LEN + 20]).unwrap();
    a.dev.backend_event(0).unwrap();
    let st = a.dev.save_state();
    assert_eq!(st.device.len(), NET_HDR_LEN + 20);
    let mut c = Side::new(Box::new(ec), base());
    c.dev.restore_state(&st, a.m, c.irq.clone()).unwrap();
    push_chain(a.rxq(), QS, 0, &[(0x20_0000, 2048, F_WRITE)]);
    c.dev.queue_notify(0).unwrap();
    assert_eq!(used_entry(a.rxq(), QS, 0).1, 32);
    let mut bad = st.clone();
    bad.device = vec![0; 3];
    assert!(c.dev.restore_state(&bad, a.m, c.irq.clone()).is_err());
    c.dev.reset();
    assert!(!c.dev.is_activated());
    assert!(format!("{:?}", c.dev).contains("Net"));
}

mod tap {
    //! TAP inside a fresh network namespace. Requires root and /dev/net/tun; it fails (not
    //! skips) when they are missing.
    use super::*;
    use std::process::Command;
    use vmkit_virtio::net::Tap;

    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    struct Netns(String);
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    fn arp_request(src_mac: [u8; 6], src_ip: [u8; 4], dst_ip: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&src_ip);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&dst_ip);
        f.resize(60, 0);
        f
    }

    #[test]
    fn arp_through_a_tap_in_a_netns() {
        let pid = std::process::id();
        let ns = Netns(format!("vmkit-vt{pid}"));
        let name = format!("vkt{}", pid % 100_000);
        ip(&["netns", "add", &ns.0]);
        let tap = Tap::open(&name).expect("creating a TAP device needs root and /dev/net/tun");
        ip(&["link", "set", &name, "netns", &ns.0]);
        ip(&["-n", &ns.0, "addr", "add", "10.77.0.1/24", "dev", &name]);
        ip(&["-n", &ns.0, "link", "set", &name, "up"]);
        let mut g = Side::new(Box::new(tap), base() | (1 << VIRTIO_NET_F_MRG_RXBUF));
        for i in 0..8u16 {
            push_chain(
                g.rxq(),
                QS,
                i,
                &[(0x20_0000 + u64::from(i) * 0x1000, 2048, F_WRITE)],
            );
        }
        let mac = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];
        let req = arp_request(mac, [10, 77, 0, 2], [10, 77, 0, 1]);
        send(&mut g, 0, [0; NET_HDR_LEN], &req);
        assert_eq!(g.dev.stats().tx_frames, 1);
        // Wait (bounded) for the namespace's kernel to answer; look for the ARP reply.
        let fd = g.dev.backend_fds()[0];
        let mut seen = 0u16;
        let mut found = false;
        for _ in 0..50 {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on the stack.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            g.dev.backend_event(0).unwrap();
            let rxq = &g.rx;
            while seen < rxq.used().idx().load() {
                let (id, len) = used_entry(rxq, QS, seen);
                let mut buf = vec![0u8; len as usize];
                g.m.read_slice(&mut buf, GuestAddress(0x20_0000 + u64::from(id) * 0x1000))
                    .unwrap();
                let eth = &buf[NET_HDR_LEN..];
                if eth.len() >= 42 && eth[12..14] == [0x08, 0x06] && eth[20..22] == [0, 2] {
                    assert_eq!(&eth[0..6], &mac, "reply addressed to the guest");
                    assert_eq!(&eth[28..32], &[10, 77, 0, 1], "sender is the namespace");
                    found = true;
                }
                seen += 1;
            }
            if found {
                break;
            }
        }
        assert!(found, "no ARP reply came back through the TAP");
        assert!(g.dev.stats().rx_frames >= 1);
    }
}

#[test]
fn event_idx_asks_for_a_kick_when_rx_buffers_run_out() {
    let (ea, eb) = ChannelBackend::pair().unwrap();
    let mut a = Side::new(Box::new(ea), base());
    let f = base() | (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_RING_F_EVENT_IDX);
    let mut b = Side::new(Box::new(eb), f);
    push_chain(b.rxq(), QS, 0, &[(0x20_0000, 100, F_WRITE)]);
    send(&mut a, 0, [0; NET_HDR_LEN], &packet(250, 6));
    b.dev.backend_event(0).unwrap();
    assert_eq!(
        b.rxq().used().idx().load(),
        0,
        "frame held: 100 bytes are not enough"
    );
    // avail_event (after the used ring) must name the driver's *current* index (1), so its
    // next addition triggers a kick; the device's next_avail (0, after putting the chain
    // back) would suppress every future kick.
    let avail_event_addr = b.rxq().used_addr().0 + 4 + 8 * u64::from(QS);
    let avail_event: u16 = b.m.read_obj(GuestAddress(avail_event_addr)).unwrap();
    assert_eq!(avail_event, 1);
    push_chain(b.rxq(), QS, 1, &[(0x21_0000, 200, F_WRITE)]);
    b.dev.queue_notify(0).unwrap();
    assert_eq!(b.rxq().used().idx().load(), 2);
    assert_eq!(b.irq.queue_count(), 1);
}

#[test]
fn tx_rate_limiter_defers_frames_to_its_timer() {
    use std::time::Duration;
    use vmkit_virtio::rate_limiter::{RateLimiter, TokenBucket};
    let (ea, eb) = ChannelBackend::pair().unwrap();
    let m: &'static Mem = Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
    ));
    // One frame per 400 ms: the checks below must not straddle a refill on a stalled host.
    let ops = TokenBucket::new(1, Duration::from_millis(400), 0).unwrap();
    let mut dev = Net::new(
        Box::new(ea),
        NetConfig {
            queue_size: QS,
            ..NetConfig::default()
        },
    )
    .with_rate_limiters(None, Some(RateLimiter::new(None, Some(ops)).unwrap()));
    let rx = mock_queue(m, RXQ_AT, QS);
    let tx = mock_queue(m, TXQ_AT, QS);
    dev.ack_features(base());
    dev.activate(
        m,
        vec![device_queue(&rx, QS), device_queue(&tx, QS)],
        Arc::new(CountingInterrupt::default()),
    )
    .unwrap();
    let fds = dev.backend_fds();
    assert_eq!(fds.len(), 2, "backend fd + tx limiter timer");
    m.write_slice(&[0u8; NET_HDR_LEN + 60], GuestAddress(0x10_0000))
        .unwrap();
    push_chain(&tx, QS, 0, &[(0x10_0000, (NET_HDR_LEN + 60) as u32, 0)]);
    push_chain(&tx, QS, 1, &[(0x10_0000, (NET_HDR_LEN + 60) as u32, 0)]);
    dev.queue_notify(1).unwrap();
    assert_eq!(tx.used().idx().load(), 1, "second frame waits for tokens");
    dev.queue_notify(1).unwrap();
    assert_eq!(tx.used().idx().load(), 1);
    let mut pfd = libc::pollfd {
        fd: fds[1],
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack.
    let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(ready, 1, "limiter timer never fired");
    dev.backend_event(1).unwrap();
    assert_eq!(tx.used().idx().load(), 2);
    assert_eq!(dev.stats().tx_frames, 2);
    drop(eb);
}
