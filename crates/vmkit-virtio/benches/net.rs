//! virtio-net frames per second through two devices wired back to back (guest A's TX queue
//! -> ChannelBackend -> guest B's RX queue, both through the real device code), against the
//! anchor: the same frame pushed through the bare ChannelBackend pair (send + recv), i.e.
//! the cost of the wire alone.
//!
//! Run: `cargo bench -p vmkit-virtio --bench net`.

#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::interrupt::CountingInterrupt;
use vmkit_virtio::net::header::NET_HDR_LEN;
use vmkit_virtio::net::{ChannelBackend, Net, NetBackend, NetConfig};
use vmkit_virtio::VirtioDevice;

type Mem = GuestMemoryMmap<()>;
const QS: u16 = 256;

fn publish(vq: &MockSplitQueue<'_, Mem>, head: u16) {
    let idx = vq.avail().idx().load();
    vq.avail()
        .ring()
        .ref_at(usize::from(idx % QS))
        .unwrap()
        .store(head);
    vq.avail().idx().store(idx.wrapping_add(1));
}

fn guest(
    backend: ChannelBackend,
) -> (
    &'static Mem,
    Net<&'static Mem>,
    MockSplitQueue<'static, Mem>,
    MockSplitQueue<'static, Mem>,
) {
    let m: &'static Mem = Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
    ));
    let mut dev = Net::new(
        Box::new(backend),
        NetConfig {
            queue_size: QS,
            ..NetConfig::default()
        },
    );
    dev.ack_features(1 << 32);
    let rx = MockSplitQueue::create(m, GuestAddress(0), 2 * QS);
    let tx = MockSplitQueue::create(m, GuestAddress(0x1_0000), 2 * QS);
    dev.activate(
        m,
        vec![device_queue(&rx, QS), device_queue(&tx, QS)],
        Arc::new(CountingInterrupt::default()),
    )
    .unwrap();
    (m, dev, rx, tx)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("net");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    for size in [64usize, 1514] {
        g.throughput(Throughput::Elements(1));
        let (ea, eb) = ChannelBackend::pair().unwrap();
        let (ma, mut a, _arx, atx) = guest(ea);
        let (_mb, mut b, brx, _btx) = guest(eb);
        ma.write_slice(&vec![0u8; NET_HDR_LEN + size], GuestAddress(0x10_0000))
            .unwrap();
        atx.desc_table()
            .store(
                0,
                RawDescriptor::from(Descriptor::new(
                    0x10_0000,
                    (NET_HDR_LEN + size) as u32,
                    0,
                    0,
                )),
            )
            .unwrap();
        brx.desc_table()
            .store(
                0,
                RawDescriptor::from(Descriptor::new(0x20_0000, 2048, 2, 0)),
            )
            .unwrap();
        g.bench_function(BenchmarkId::new("devices", size), |bench| {
            bench.iter(|| {
                publish(&brx, 0);
                publish(&atx, 0);
                a.queue_notify(1).unwrap();
                b.backend_event(0).unwrap();
            })
        });
        assert_eq!(
            a.stats().tx_frames,
            b.stats().rx_frames,
            "every frame crossed"
        );
        let (mut x, mut y) = ChannelBackend::pair().unwrap();
        let frame = vec![0u8; NET_HDR_LEN + size];
        let mut buf = vec![0u8; 2048];
        g.bench_function(BenchmarkId::new("bare-channel", size), |bench| {
            bench.iter(|| {
                x.send(&frame).unwrap();
                y.recv(&mut buf).unwrap().unwrap();
            })
        });
    }
    g.finish();
}

/// virtio-queue 0.18's MockSplitQueue ends each ring at `start + len` entries (not bytes), so
/// its used ring overlaps its available ring unless it is created with twice the queue size;
/// the device gets a `qs`-entry queue over the same addresses.
fn device_queue(vq: &MockSplitQueue<'_, Mem>, qs: u16) -> Queue {
    use virtio_queue::QueueT;
    let mut q = Queue::new(qs).unwrap();
    q.set_size(qs);
    q.try_set_desc_table_address(vq.desc_table_addr()).unwrap();
    q.try_set_avail_ring_address(vq.avail_addr()).unwrap();
    q.try_set_used_ring_address(vq.used_addr()).unwrap();
    q.set_ready(true);
    q
}

criterion_group!(benches, bench);
criterion_main!(benches);
