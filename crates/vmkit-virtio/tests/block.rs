//! virtio-blk driven through virtio-queue's MockSplitQueue: data round trips checked on the
//! host file, and hostile descriptor chains.

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use common::*;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::block::device::bits::*;
use vmkit_virtio::block::request::*;
use vmkit_virtio::block::{process_queue, Block, BlockConfig, BlockFeatures, RawDisk};
use vmkit_virtio::features::*;
use vmkit_virtio::interrupt::CountingInterrupt;
use vmkit_virtio::VirtioDevice;

type Mem = GuestMemoryMmap<()>;
const QS: u16 = 16;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

fn disk(sectors: u64) -> (tempfile::NamedTempFile, RawDisk) {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(sectors * 512).unwrap();
    let d = RawDisk::open(f.path(), false).unwrap();
    (f, d)
}

fn header(m: &Mem, at: u64, typ: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&typ.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(at)).unwrap();
}

fn status(m: &Mem) -> u8 {
    m.read_obj(GuestAddress(STATUS)).unwrap()
}

struct Rig<'a> {
    m: &'a Mem,
    vq: MockSplitQueue<'a, Mem>,
    q: Queue,
    disk: RawDisk,
    f: BlockFeatures,
    next_desc: u16,
}

impl<'a> Rig<'a> {
    fn new(m: &'a Mem, disk: RawDisk) -> Self {
        let vq = mock_queue(m, 0, QS);
        let q = device_queue(&vq, QS);
        Self {
            m,
            vq,
            q,
            disk,
            f: BlockFeatures {
                flush: true,
                discard: true,
                write_zeroes: true,
            },
            next_desc: 0,
        }
    }

    /// Submits one chain and processes the queue; returns the used length.
    fn submit(&mut self, descs: &[(u64, u32, u16)]) -> u32 {
        self.m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let first = self.next_desc;
        self.next_desc = (self.next_desc + descs.len() as u16) % (QS - 4);
        push_chain(&self.vq, QS, first, descs);
        self.run()
    }

    fn run(&mut self) -> u32 {
        let before = self.vq.used().idx().load();
        let out = process_queue(&mut self.q, self.m, &self.disk, &self.f, None).unwrap();
        assert_eq!(out.completed, 1);
        assert!(!out.throttled);
        let after = self.vq.used().idx().load();
        assert_eq!(after, before.wrapping_add(1));
        used_entry(&self.vq, QS, before).1
    }

    fn rw(&mut self, typ: u32, sector: u64, len: u32) -> (u32, u8) {
        header(self.m, HDR, typ, sector);
        let dflag = if typ == VIRTIO_BLK_T_IN { F_WRITE } else { 0 };
        let n = self.submit(&[(HDR, 16, 0), (DATA, len, dflag), (STATUS, 1, F_WRITE)]);
        (n, status(self.m))
    }
}

#[test]
fn write_then_read_back_checked_on_host_file() {
    let m = mem();
    let (file, d) = disk(64);
    let mut rig = Rig::new(&m, d);
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    m.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(rig.rw(VIRTIO_BLK_T_OUT, 8, 4096), (1, VIRTIO_BLK_S_OK));
    // The host file holds the bytes at sector 8.
    let mut host = vec![0u8; 4096];
    file.as_file().read_exact_at(&mut host, 8 * 512).unwrap();
    assert_eq!(host, pattern);
    // Read back into cleared guest memory.
    m.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(rig.rw(VIRTIO_BLK_T_IN, 8, 4096), (4097, VIRTIO_BLK_S_OK));
    let mut got = vec![0u8; 4096];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, pattern);
    // Data split over several descriptors, status in the same buffer as the last data.
    header(&m, HDR, VIRTIO_BLK_T_IN, 8);
    let n = rig.submit(&[
        (HDR, 16, 0),
        (DATA + 0x1_0000, 1000, F_WRITE),
        (DATA + 0x2_0000, 3096, F_WRITE),
        (DATA + 0x3_0000, 1, F_WRITE),
    ]);
    let st: u8 = m.read_obj(GuestAddress(DATA + 0x3_0000)).unwrap();
    assert_eq!((n, st), (4097, VIRTIO_BLK_S_OK));
    let mut a = vec![0u8; 1000];
    m.read_slice(&mut a, GuestAddress(DATA + 0x1_0000)).unwrap();
    assert_eq!(a, pattern[..1000]);
    // Flush and write-through (no FLUSH negotiated) both succeed.
    header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.submit(&[(HDR, 16, 0), (STATUS, 1, F_WRITE)]), 1);
    assert_eq!(status(&m), VIRTIO_BLK_S_OK);
    rig.f.flush = false;
    assert_eq!(rig.rw(VIRTIO_BLK_T_OUT, 0, 512), (1, VIRTIO_BLK_S_OK));
    header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
    rig.submit(&[(HDR, 16, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!(status(&m), VIRTIO_BLK_S_UNSUPP);
}

#[test]
fn get_id_discard_and_write_zeroes() {
    let m = mem();
    let (file, d) = disk(64);
    let mut rig = Rig::new(&m, d.with_id("serial-123"));
    header(&m, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let n = rig.submit(&[(HDR, 16, 0), (DATA, 20, F_WRITE), (STATUS, 1, F_WRITE)]);
    assert_eq!((n, status(&m)), (21, VIRTIO_BLK_S_OK));
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..10], b"serial-123");
    // Fill the disk, then discard sectors 0..8 and zero 8..16.
    file.as_file().write_all_at(&[0x5a; 64 * 512], 0).unwrap();
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&n.to_le_bytes());
        raw[12..16].copy_from_slice(&flags.to_le_bytes());
        raw
    };
    m.write_slice(&seg(0, 8, 0), GuestAddress(DATA)).unwrap();
    header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        rig.submit(&[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, F_WRITE)]),
        1
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_OK);
    m.write_slice(&seg(8, 8, 0), GuestAddress(DATA)).unwrap();
    m.write_slice(
        &seg(16, 8, WRITE_ZEROES_FLAG_UNMAP),
        GuestAddress(DATA + 16),
    )
    .unwrap();
    header(&m, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        rig.submit(&[(HDR, 16, 0), (DATA, 32, 0), (STATUS, 1, F_WRITE)]),
        1
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_OK);
    let mut host = vec![0u8; 64 * 512];
    let mut f = std::fs::File::open(file.path()).unwrap();
    f.read_exact(&mut host).unwrap();
    assert!(host[..24 * 512].iter().all(|&b| b == 0));
    assert!(host[24 * 512..].iter().all(|&b| b == 0x5a));
}

#[test]
fn malformed_requests_get_a_status_not_a_panic() {
    let m = mem();
    let (_f, d) = disk(64);
    let mut rig = Rig::new(&m, d);
    // Out of range, partial sector, unknown type.
    assert_eq!(rig.rw(VIRTIO_BLK_T_IN, 64, 512), (1, VIRTIO_BLK_S_IOERR));
    assert_eq!(rig.rw(VIRTIO_BLK_T_OUT, 63, 1024), (1, VIRTIO_BLK_S_IOERR));
    assert_eq!(
        rig.rw(VIRTIO_BLK_T_IN, u64::MAX, 512),
        (1, VIRTIO_BLK_S_IOERR)
    );
    assert_eq!(rig.rw(VIRTIO_BLK_T_IN, 0, 100), (1, VIRTIO_BLK_S_IOERR));
    assert_eq!(rig.rw(77, 0, 512), (1, VIRTIO_BLK_S_UNSUPP));
    // A read whose data buffer is device-readable: the device must write there, so IOERR.
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let n = rig.submit(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!((n, status(&m)), (1, VIRTIO_BLK_S_IOERR));
    // Header too short.
    let n = rig.submit(&[(HDR, 8, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!((n, status(&m)), (1, VIRTIO_BLK_S_IOERR));
    // No writable status at all: returned with length 0, nothing written.
    let n = rig.submit(&[(HDR, 16, 0), (DATA, 512, 0)]);
    assert_eq!((n, status(&m)), (0, 0xff));
    // Read-only disk refuses writes.
    let (_f2, d2) = disk(8);
    drop(d2);
    let ro = RawDisk::open(_f2.path(), true).unwrap();
    let mut rig2 = Rig::new(&m, ro);
    assert_eq!(rig2.rw(VIRTIO_BLK_T_OUT, 0, 512), (1, VIRTIO_BLK_S_IOERR));
    assert_eq!(rig2.rw(VIRTIO_BLK_T_IN, 0, 512), (513, VIRTIO_BLK_S_OK));
}

#[test]
fn hostile_chains_are_returned_empty() {
    let m = mem();
    let (_f, d) = disk(64);
    let mut rig = Rig::new(&m, d);
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    // Buffer outside guest RAM.
    let n = rig.submit(&[
        (HDR, 16, 0),
        (0x1_0000_0000, 512, F_WRITE),
        (STATUS, 1, F_WRITE),
    ]);
    assert_eq!((n, status(&m)), (0, 0xff));
    // Buffer straddling the end of guest RAM.
    let n = rig.submit(&[
        (HDR, 16, 0),
        (0xff_ff00, 512, F_WRITE),
        (STATUS, 1, F_WRITE),
    ]);
    assert_eq!(n, 0);
    // Zero-length buffer.
    let n = rig.submit(&[(HDR, 16, 0), (DATA, 0, F_WRITE), (STATUS, 1, F_WRITE)]);
    assert_eq!(n, 0);
    // Data buffer overlapping the status byte.
    let n = rig.submit(&[
        (HDR, 16, 0),
        (STATUS - 511, 512, F_WRITE),
        (STATUS, 1, F_WRITE),
    ]);
    assert_eq!(n, 0);
    // Readable after writable.
    let n = rig.submit(&[(HDR, 16, 0), (STATUS, 1, F_WRITE), (DATA, 512, 0)]);
    assert_eq!(n, 0);
    assert_eq!(status(&m), 0xff);
}

#[test]
fn descriptor_loops_and_bad_indirect_tables() {
    let m = mem();
    let (_f, d) = disk(64);
    let mut rig = Rig::new(&m, d);
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 loop.
    store_desc(&rig.vq, 0, HDR, 16, F_NEXT, 1);
    store_desc(&rig.vq, 1, DATA, 512, F_NEXT | F_WRITE, 0);
    publish(&rig.vq, QS, 0);
    assert_eq!(rig.run(), 0);
    // next index beyond the table.
    store_desc(&rig.vq, 2, HDR, 16, F_NEXT, 200);
    publish(&rig.vq, QS, 2);
    assert_eq!(rig.run(), 0);
    // Indirect table inside an indirect table.
    let table = 0x40_0000u64;
    let inner = 0x41_0000u64;
    let put = |at: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        m.write_slice(&raw, GuestAddress(at + 16 * i)).unwrap();
    };
    put(table, 0, HDR, 16, F_NEXT, 1);
    put(table, 1, inner, 32, F_INDIRECT, 0);
    put(inner, 0, DATA, 512, F_NEXT | F_WRITE, 1);
    put(inner, 1, STATUS, 1, F_WRITE, 0);
    store_desc(&rig.vq, 3, table, 32, F_INDIRECT, 0);
    publish(&rig.vq, QS, 3);
    assert_eq!(rig.run(), 0);
    // An indirect table longer than the queue (32 entries in a 16-entry queue).
    for i in 0..32u64 {
        put(
            table,
            i,
            DATA + 512 * i,
            512,
            F_NEXT | F_WRITE,
            (i + 1) as u16,
        );
    }
    put(table, 0, HDR, 16, F_NEXT, 1);
    put(table, 31, STATUS, 1, F_WRITE, 0);
    store_desc(&rig.vq, 4, table, 32 * 16, F_INDIRECT, 0);
    publish(&rig.vq, QS, 4);
    assert_eq!(rig.run(), 0);
    // A well-formed indirect request works.
    put(table, 0, HDR, 16, F_NEXT, 1);
    put(table, 1, DATA, 512, F_NEXT | F_WRITE, 2);
    put(table, 2, STATUS, 1, F_WRITE, 0);
    store_desc(&rig.vq, 5, table, 48, F_INDIRECT, 0);
    publish(&rig.vq, QS, 5);
    assert_eq!(rig.run(), 513);
    assert_eq!(status(&m), VIRTIO_BLK_S_OK);
    // An indirect table outside guest memory.
    store_desc(&rig.vq, 6, 0x2_0000_0000, 48, F_INDIRECT, 0);
    publish(&rig.vq, QS, 6);
    assert_eq!(rig.run(), 0);
}

#[test]
fn runaway_index_and_bad_head_are_queue_errors() {
    let m = mem();
    let (_f, d) = disk(8);
    let mut rig = Rig::new(&m, d);
    rig.vq.avail().idx().store(QS + 1);
    assert!(process_queue(&mut rig.q, &m, &rig.disk, &rig.f, None).is_err());
    // A head index outside the queue cannot be returned in the used ring.
    let mut rig = Rig::new(&m, RawDisk::open(_f.path(), false).unwrap());
    publish(&rig.vq, QS, 500);
    assert!(process_queue(&mut rig.q, &m, &rig.disk, &rig.f, None).is_err());
}

#[test]
fn device_config_features_and_notify() {
    let m = Arc::new(mem());
    let (_f, d) = disk(64);
    let mut dev: Block<Arc<Mem>> = Block::new(
        d,
        BlockConfig {
            num_queues: 2,
            queue_size: QS,
            blk_size: 4096,
        },
    );
    let f = dev.device_features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
        VIRTIO_F_VERSION_1,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64);
    let mut w = [0u8; 4];
    dev.read_config(20, &mut w);
    assert_eq!(u32::from_le_bytes(w), 4096);
    dev.read_config(12, &mut w);
    assert_eq!(u32::from_le_bytes(w), u32::from(QS) - 2);
    let mut nq = [0u8; 2];
    dev.read_config(34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 2);
    dev.read_config(200, &mut w);
    assert_eq!(w, [0; 4]);
    dev.write_config(0, &[1]);
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64, "config is read-only");
    dev.ack_features(f);
    assert_eq!(dev.acked_features(), f);

    let vq0 = mock_queue(&*m, 0, QS);
    let vq1 = mock_queue(&*m, 0x8000, QS);
    let irq = Arc::new(CountingInterrupt::default());
    assert!(dev.queue_notify(0).is_err(), "not activated");
    dev.activate(
        m.clone(),
        vec![device_queue(&vq0, QS), device_queue(&vq1, QS)],
        irq.clone(),
    )
    .unwrap();
    assert!(dev.is_activated());
    header(&m, HDR, VIRTIO_BLK_T_IN, 1);
    push_chain(
        &vq1,
        QS,
        0,
        &[(HDR, 16, 0), (DATA, 512, F_WRITE), (STATUS, 1, F_WRITE)],
    );
    dev.queue_notify(1).unwrap();
    assert_eq!(vq1.used().idx().load(), 1);
    assert_eq!(irq.queue_count(), 1);
    assert!(dev.queue_notify(2).is_err());
    // Save and restore into a fresh device keeps the queue position.
    let state = dev.save_state();
    assert_eq!(state.queues[1].next_avail, 1);
    let mut dev2: Block<Arc<Mem>> = Block::new(
        RawDisk::open(_f.path(), false).unwrap(),
        BlockConfig {
            num_queues: 2,
            queue_size: QS,
            blk_size: 4096,
        },
    );
    let bytes = state.to_bytes();
    let decoded = vmkit_virtio::DeviceState::from_bytes(&bytes).unwrap();
    dev2.restore_state(&decoded, m.clone(), irq.clone())
        .unwrap();
    assert!(dev2.is_activated());
    push_chain(
        &vq1,
        QS,
        3,
        &[(HDR, 16, 0), (DATA, 512, F_WRITE), (STATUS, 1, F_WRITE)],
    );
    dev2.queue_notify(1).unwrap();
    assert_eq!(
        vq1.used().idx().load(),
        2,
        "restored device continues at next_avail"
    );
    dev2.reset();
    assert!(!dev2.is_activated());
    // Restoring a blk state into an rng device is refused.
    let mut rng: vmkit_virtio::rng::Rng<Arc<Mem>> = vmkit_virtio::rng::Rng::new();
    assert!(rng.restore_state(&decoded, m.clone(), irq).is_err());
    assert!(format!("{dev:?}").contains("Block"));
}

#[test]
fn read_only_device_offers_ro() {
    let (f, _d) = disk(8);
    let dev: Block<Arc<Mem>> = Block::new(
        RawDisk::open(f.path(), true).unwrap(),
        BlockConfig::default(),
    );
    let feats = dev.device_features();
    assert_ne!(feats & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(feats & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(feats & (1 << VIRTIO_BLK_F_MQ), 0);
    assert_eq!(dev.queue_max_sizes(), &[256]);
}

#[test]
fn rate_limiter_holds_requests_until_its_timer_fires() {
    use std::time::Duration;
    use vmkit_virtio::rate_limiter::{RateLimiter, TokenBucket};
    let m = Arc::new(mem());
    let (_f, d) = disk(64);
    // One request per 400 ms: long enough that the two notifications below cannot straddle
    // a refill even if the host stalls this thread (20 ms could, under coverage on a busy
    // 2-core machine), short enough that waiting for the timer costs little.
    let ops = TokenBucket::new(1, Duration::from_millis(400), 0).unwrap();
    let mut dev: Block<Arc<Mem>> = Block::new(
        d,
        BlockConfig {
            num_queues: 1,
            queue_size: QS,
            blk_size: 512,
        },
    )
    .with_rate_limiter(RateLimiter::new(None, Some(ops)).unwrap());
    let vq = mock_queue(&*m, 0, QS);
    let irq = Arc::new(CountingInterrupt::default());
    dev.activate(m.clone(), vec![device_queue(&vq, QS)], irq)
        .unwrap();
    assert_eq!(dev.backend_fds().len(), 1, "the limiter's timer");
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    push_chain(
        &vq,
        QS,
        0,
        &[(HDR, 16, 0), (DATA, 512, F_WRITE), (STATUS, 1, F_WRITE)],
    );
    push_chain(
        &vq,
        QS,
        3,
        &[(HDR, 16, 0), (DATA, 512, F_WRITE), (STATUS, 1, F_WRITE)],
    );
    dev.queue_notify(0).unwrap();
    assert_eq!(
        vq.used().idx().load(),
        1,
        "second request throttled, still queued"
    );
    dev.queue_notify(0).unwrap();
    assert_eq!(
        vq.used().idx().load(),
        1,
        "notifications while blocked wait for the timer"
    );
    // Wait (bounded) for the timer fd, as the event loop would.
    let fd = dev.backend_fds()[0];
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    assert_eq!(n, 1, "limiter timer never fired");
    dev.backend_event(0).unwrap();
    assert_eq!(vq.used().idx().load(), 2);
}

#[test]
fn ring_indices_wrap_over_many_requests() {
    let m = mem();
    let (_f, d) = disk(64);
    let mut rig = Rig::new(&m, d);
    // Several laps of the 16-entry rings: every request completes with OK and its own head.
    for i in 0..(3 * u64::from(QS) + 5) {
        assert_eq!(
            rig.rw(VIRTIO_BLK_T_IN, i % 64, 512),
            (513, VIRTIO_BLK_S_OK),
            "request {i}"
        );
    }
}

#[test]
fn seg_max_and_size_max_are_enforced_with_ioerr() {
    use vmkit_virtio::block::device::{seg_max_for, SIZE_MAX};
    let m = mem();
    // 4 MiB disk: room for a SIZE_MAX transfer.
    let (file, d) = disk(8192);
    let mut rig = Rig::new(&m, d);
    let seg_max = seg_max_for(QS);
    assert_eq!(seg_max, u32::from(QS) - 2);
    let pattern: Vec<u8> = (0..512 * (seg_max + 1))
        .map(|i| (i * 13 + 5) as u8)
        .collect();
    m.write_slice(&pattern, GuestAddress(DATA)).unwrap();

    // Exactly seg_max separate data descriptors (header + seg_max + status == QS): accepted.
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    let mut descs = vec![(HDR, 16, 0)];
    descs.extend((0..u64::from(seg_max)).map(|i| (DATA + 512 * i, 512u32, 0u16)));
    descs.push((STATUS, 1, F_WRITE));
    rig.next_desc = 0;
    push_chain(&rig.vq, QS, 0, &descs);
    assert_eq!(rig.run(), 1);
    assert_eq!(status(&m), VIRTIO_BLK_S_OK);
    let mut host = vec![0u8; 512 * seg_max as usize];
    file.as_file().read_exact_at(&mut host, 0).unwrap();
    assert_eq!(host, pattern[..host.len()]);

    // seg_max + 1 data segments in QS descriptors: the header descriptor also carries the
    // first data sector. IOERR, and the disk is untouched.
    let hdr_and_data = 0x50_0000u64;
    header(&m, hdr_and_data, VIRTIO_BLK_T_OUT, 100);
    m.write_slice(&pattern[..512], GuestAddress(hdr_and_data + 16))
        .unwrap();
    let mut descs = vec![(hdr_and_data, 16 + 512, 0)];
    descs.extend((0..u64::from(seg_max)).map(|i| (DATA + 512 * i, 512u32, 0u16)));
    descs.push((STATUS, 1, F_WRITE));
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    push_chain(&rig.vq, QS, 0, &descs);
    assert_eq!(rig.run(), 1);
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR);
    let mut host = vec![0u8; 512 * (seg_max as usize + 1)];
    file.as_file().read_exact_at(&mut host, 100 * 512).unwrap();
    assert!(host.iter().all(|&b| b == 0));

    // A read whose last data descriptor also holds the status byte: seg_max + 1 data
    // segments, IOERR, and no data lands in guest memory.
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let rd_at = 0x60_0000u64;
    m.write_slice(&vec![0xaau8; 512 * 16], GuestAddress(rd_at))
        .unwrap();
    let mut descs = vec![(HDR, 16, 0)];
    descs.extend((0..u64::from(seg_max)).map(|i| (rd_at + 512 * i, 512u32, F_WRITE)));
    let last = rd_at + 512 * u64::from(seg_max);
    descs.push((last, 513, F_WRITE));
    push_chain(&rig.vq, QS, 0, &descs);
    assert_eq!(rig.run(), 1);
    let st: u8 = m.read_obj(GuestAddress(last + 512)).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    let mut got = vec![0u8; 512 * 15];
    m.read_slice(&mut got, GuestAddress(rd_at)).unwrap();
    assert!(got.iter().all(|&b| b == 0xaa));

    // size_max: one segment of exactly SIZE_MAX works, one sector more is IOERR.
    let big = 0x80_0000u64;
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    rig.next_desc = 0;
    let n = rig.submit(&[(HDR, 16, 0), (big, SIZE_MAX, F_WRITE), (STATUS, 1, F_WRITE)]);
    assert_eq!((n, status(&m)), (SIZE_MAX + 1, VIRTIO_BLK_S_OK));
    let mut got = vec![0u8; 512 * seg_max as usize];
    m.read_slice(&mut got, GuestAddress(big)).unwrap();
    assert_eq!(got, pattern[..got.len()]);
    let n = rig.submit(&[
        (HDR, 16, 0),
        (big, SIZE_MAX + 512, F_WRITE),
        (STATUS, 1, F_WRITE),
    ]);
    assert_eq!((n, status(&m)), (1, VIRTIO_BLK_S_IOERR));
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    let n = rig.submit(&[(HDR, 16, 0), (big, SIZE_MAX + 512, 0), (STATUS, 1, F_WRITE)]);
    assert_eq!((n, status(&m)), (1, VIRTIO_BLK_S_IOERR));
    // The same bytes split into two segments within size_max are fine.
    let n = rig.submit(&[
        (HDR, 16, 0),
        (big, SIZE_MAX, 0),
        (big + u64::from(SIZE_MAX), 512, 0),
        (STATUS, 1, F_WRITE),
    ]);
    assert_eq!((n, status(&m)), (1, VIRTIO_BLK_S_OK));
}
