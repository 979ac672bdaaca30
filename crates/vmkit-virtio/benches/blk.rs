//! virtio-blk request throughput through `block::process_queue` on a tmpfs-backed image,
//! against the anchor: plain `pread`/`pwrite` of the same bytes at the same offsets.
//!
//! Run: `cargo bench -p vmkit-virtio --bench blk`. The ratio device/anchor at 64 KiB is the
//! figure of merit (target >= 0.8).

#![allow(missing_docs)]

use std::os::unix::fs::FileExt;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::block::request::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vmkit_virtio::block::{process_queue, BlockFeatures, RawDisk};

type Mem = GuestMemoryMmap<()>;
const QS: u16 = 256;
const DISK: u64 = 64 << 20;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x40_0000;

fn image() -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new()
        .prefix("vmkit-blk-bench")
        .tempfile_in("/dev/shm")
        .or_else(|_| tempfile::NamedTempFile::new())
        .unwrap();
    f.as_file()
        .write_all_at(&vec![0x33u8; DISK as usize], 0)
        .unwrap();
    f
}

fn bench(c: &mut Criterion) {
    let file = image();
    let disk = RawDisk::open(file.path(), false).unwrap();
    let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let vq = MockSplitQueue::new(&m, 2 * QS);
    let mut q = device_queue(&vq, QS);
    let f = BlockFeatures {
        flush: true,
        discard: false,
        write_zeroes: false,
    };
    let mut g = c.benchmark_group("blk");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    for size in [4096u32, 65536] {
        g.throughput(Throughput::Bytes(u64::from(size)));
        for (name, typ) in [("read", VIRTIO_BLK_T_IN), ("write", VIRTIO_BLK_T_OUT)] {
            let dflag = if typ == VIRTIO_BLK_T_IN { 2u16 } else { 0 };
            vq.desc_table()
                .store(0, RawDescriptor::from(Descriptor::new(HDR, 16, 1, 1)))
                .unwrap();
            vq.desc_table()
                .store(
                    1,
                    RawDescriptor::from(Descriptor::new(DATA, size, 1 | dflag, 2)),
                )
                .unwrap();
            vq.desc_table()
                .store(2, RawDescriptor::from(Descriptor::new(STATUS, 1, 2, 0)))
                .unwrap();
            let mut sector = 0u64;
            g.bench_function(BenchmarkId::new(format!("{name}/device"), size), |b| {
                b.iter(|| {
                    let mut h = [0u8; 16];
                    h[0..4].copy_from_slice(&typ.to_le_bytes());
                    h[8..16].copy_from_slice(&sector.to_le_bytes());
                    m.write_slice(&h, GuestAddress(HDR)).unwrap();
                    let idx = vq.avail().idx().load();
                    vq.avail()
                        .ring()
                        .ref_at(usize::from(idx % QS))
                        .unwrap()
                        .store(0);
                    vq.avail().idx().store(idx.wrapping_add(1));
                    let out = process_queue(&mut q, &m, &disk, &f, None).unwrap();
                    assert_eq!(out.completed, 1);
                    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
                    sector = (sector + u64::from(size) / 512) % (DISK / 512);
                })
            });
            let mut buf = vec![0u8; size as usize];
            let mut off = 0u64;
            let raw = file.as_file();
            g.bench_function(
                BenchmarkId::new(format!("{name}/pread-pwrite"), size),
                |b| {
                    b.iter(|| {
                        if typ == VIRTIO_BLK_T_IN {
                            raw.read_exact_at(&mut buf, off).unwrap();
                        } else {
                            raw.write_all_at(&buf, off).unwrap();
                        }
                        off = (off + u64::from(size)) % DISK;
                    })
                },
            );
        }
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
