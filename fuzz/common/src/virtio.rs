//! Seeds and input decoding for the vmkit-virtio fuzz targets.
//!
//! The guest is the attacker, so every target hands the fuzzer the guest's side of the
//! protocol:
//!
//! * `virtio_blk`, `virtio_net`, `virtio_console`, `virtio_rng`: the input *is* the first bytes
//!   of a 64 KiB guest memory image. Queues live at fixed addresses inside it ([`QUEUE_A`],
//!   [`QUEUE_B`], size [`QUEUE_SIZE`]), mode bits at [`CONTROL`] and [`NET_FEATURES`], so the fuzzer controls descriptor tables, available
//!   rings, indices and buffer contents, and therefore descriptor loops, nested indirect tables,
//!   out-of-range addresses, runaway indices and malformed requests. Each target runs the
//!   device's transport-independent request loop over that memory and checks the used ring
//!   stays consistent.
//! * `virtio_mmio`: the input is a sequence of 6-byte register accesses ([`MmioOp`]) replayed
//!   against a virtio-mmio transport carrying a block device (first byte even) or an rng.
//!
//! The seeds are well-formed versions of each input, so the fuzzer starts from requests that
//! reach deep into the device.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::block::{self, BlockFeatures, RawDisk};
use vmkit_virtio::mmio::{regs, MmioTransport};
use vmkit_virtio::net::{self, ChannelBackend, NetBackend};
use vmkit_virtio::rng::EntropySource;

/// Target names (and seed sub-directories).
pub const TARGETS: [&str; 5] = [
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "virtio_mmio",
];
/// Size of the fuzzed guest memory.
pub const MEM_SIZE: usize = 0x1_0000;
/// Size of every fuzzed queue.
pub const QUEUE_SIZE: u16 = 8;
/// First queue: descriptor table at +0, available ring at +0x80, used ring at +0x98.
pub const QUEUE_A: u64 = 0x0;
/// Second queue (RX for net/console), same layout.
pub const QUEUE_B: u64 = 0x100;
/// Control byte in the image (bit 0: blk negotiates FLUSH / net uses mergeable buffers).
pub const CONTROL: u64 = 0xf0;
/// Net: acked feature bits (8 bytes, little endian) used for the TX header checks.
pub const NET_FEATURES: u64 = 0xf8;
/// Sectors of the fuzzed disk.
pub const DISK_SECTORS: u64 = 16;

type Mem = GuestMemoryMmap<()>;

/// Builds guest memory holding `image` at address 0 (truncated to [`MEM_SIZE`]).
pub fn memory_from(image: &[u8]) -> Mem {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("64 KiB guest");
    let n = image.len().min(MEM_SIZE);
    m.write_slice(&image[..n], GuestAddress(0))
        .expect("in range");
    m
}

/// A ready split queue at `base` with the fixed layout.
pub fn queue_at(base: u64) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).expect("valid size");
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x80) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x98) as u32), Some(0));
    q.set_ready(true);
    q
}

fn used_idx(m: &Mem, base: u64) -> u16 {
    m.read_obj(GuestAddress(base + 0x98 + 2)).unwrap_or(0)
}

/// Once the device has published used entries, `used.idx` in guest memory must equal its own
/// count (the initial value is the fuzzer's, so nothing is checked before the first entry).
fn check_used(m: &Mem, base: u64, q: &Queue) {
    if q.next_used() != 0 {
        assert_eq!(
            used_idx(m, base),
            q.next_used(),
            "used.idx matches the device's count"
        );
    }
}

thread_local! {
    static DISK_FILE: File = {
        let path = std::env::temp_dir().join(format!("vmkit-fuzz-disk-{}", std::process::id()));
        let f = File::options().read(true).write(true).create(true).truncate(true).open(&path)
            .expect("scratch disk");
        let _ = std::fs::remove_file(&path);
        f.set_len(DISK_SECTORS * 512).expect("size scratch disk");
        f
    };
}

fn disk() -> RawDisk {
    let f = DISK_FILE.with(|f| f.try_clone().expect("dup scratch disk"));
    RawDisk::from_file(f, false).expect("scratch disk metadata")
}

fn control(data: &[u8]) -> u8 {
    data.get(CONTROL as usize).copied().unwrap_or(0)
}

/// `virtio_blk`: runs the block request loop over a fuzzed memory image.
pub fn blk(data: &[u8]) {
    let m = memory_from(data);
    let mut q = queue_at(QUEUE_A);
    let d = disk();
    let features = BlockFeatures {
        flush: control(data) & 1 != 0,
        discard: true,
        write_zeroes: true,
    };
    if let Ok(out) = block::process_queue(&mut q, &m, &d, &features, None) {
        assert!(out.completed <= u32::from(QUEUE_SIZE));
        check_used(&m, QUEUE_A, &q);
    }
}

/// `virtio_net`: transmits what the fuzzed TX queue holds through a back-to-back pair and
/// delivers every frame that crossed into the fuzzed RX queue (mergeable if byte 0 is odd).
pub fn net(data: &[u8]) {
    let m = memory_from(data);
    let mut tx = queue_at(QUEUE_A);
    let mut rx = queue_at(QUEUE_B);
    let (mut a, mut b) = ChannelBackend::pair().expect("eventfds");
    b.set_guest_features(u64::MAX).expect("channel");
    let acked = m.read_obj::<u64>(GuestAddress(NET_FEATURES)).unwrap_or(0);
    let mut buf = Vec::new();
    let Ok(out) = net::process_tx(&mut tx, &m, acked, &mut a, &mut buf, None) else {
        return;
    };
    assert_eq!(out.completed, out.sent + out.dropped);
    check_used(&m, QUEUE_A, &tx);
    let mergeable = control(data) & 1 != 0;
    let mut frame = vec![0u8; net::device::MAX_FRAME];
    while let Ok(Some(n)) = b.recv(&mut frame) {
        match net::deliver_frame(&mut rx, &m, &mut frame[..n], mergeable) {
            Ok(net::RxOutcome::NoBuffers) | Err(_) => break,
            Ok(_) => check_used(&m, QUEUE_B, &rx),
        }
    }
}

/// `virtio_console`: drains the fuzzed transmit queue and fills the fuzzed receive queue with
/// input taken from the end of the image.
pub fn console(data: &[u8]) {
    let m = memory_from(data);
    let mut tx = queue_at(QUEUE_A);
    let mut rx = queue_at(QUEUE_B);
    let mut sink = Vec::new();
    let r = vmkit_virtio::console::process_tx(&mut tx, &m, &mut |d: &[u8]| {
        sink.extend_from_slice(d);
        Ok(())
    });
    if r.is_ok() {
        check_used(&m, QUEUE_A, &tx);
    }
    let tail = data.len().saturating_sub(64);
    let mut pending: std::collections::VecDeque<u8> = data[tail..].iter().copied().collect();
    let before = pending.len();
    if vmkit_virtio::console::process_rx(&mut rx, &m, &mut pending).is_ok() {
        check_used(&m, QUEUE_B, &rx);
        assert!(pending.len() <= before);
    }
}

/// A deterministic entropy source so crashes reproduce.
#[derive(Debug, Default)]
pub struct CountingSource(u8);

impl EntropySource for CountingSource {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        for b in buf {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
        Ok(())
    }
}

/// `virtio_rng`: fills the fuzzed request queue.
pub fn rng(data: &[u8]) {
    let m = memory_from(data);
    let mut q = queue_at(QUEUE_A);
    if vmkit_virtio::rng::process_queue(&mut q, &m, &mut CountingSource::default()).is_ok() {
        check_used(&m, QUEUE_A, &q);
    }
}

/// One register access of the `virtio_mmio` target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioOp {
    /// Write (true) or read.
    pub write: bool,
    /// Offset inside the 0x200 window.
    pub offset: u64,
    /// Access size in bytes (1, 2, 4 or 8).
    pub size: usize,
    /// Value written.
    pub value: u32,
}

impl MmioOp {
    /// Encodes the op as the 6 bytes [`MmioOp::decode_all`] reads.
    pub fn encode(&self) -> [u8; 6] {
        let size_bits = match self.size {
            1 => 0,
            2 => 1,
            8 => 3,
            _ => 2,
        };
        let a = (u8::from(self.write) << 7) | (size_bits << 5);
        let off = (self.offset.min(0x1ff)) as u16;
        let v = self.value.to_le_bytes();
        [a | (off >> 8) as u8, off as u8, v[0], v[1], v[2], v[3]]
    }

    /// Decodes consecutive 6-byte ops (a trailing partial op is ignored).
    pub fn decode_all(data: &[u8]) -> Vec<MmioOp> {
        data.chunks_exact(6)
            .map(|c| MmioOp {
                write: c[0] & 0x80 != 0,
                size: 1 << ((c[0] >> 5) & 3),
                offset: (u64::from(c[0] & 1) << 8) | u64::from(c[1]),
                value: u32::from_le_bytes([c[2], c[3], c[4], c[5]]),
            })
            .collect()
    }
}

/// `virtio_mmio`: replays register accesses; byte 0 picks the device (even: blk, odd: rng).
pub fn mmio(data: &[u8]) {
    let Some((&pick, ops)) = data.split_first() else {
        return;
    };
    let m = Arc::new(memory_from(&[]));
    let dev: Box<dyn vmkit_virtio::VirtioDevice<Arc<Mem>>> = if pick % 2 == 0 {
        Box::new(block::Block::new(
            disk(),
            block::BlockConfig {
                num_queues: 2,
                queue_size: QUEUE_SIZE,
                blk_size: 512,
            },
        ))
    } else {
        Box::new(vmkit_virtio::rng::Rng::with_source(Box::new(
            CountingSource::default(),
        )))
    };
    let mut t = MmioTransport::new(dev, m, Box::new(vmkit_virtio::CallbackIrq::new(|| Ok(()))))
        .expect("transport");
    let mut buf = [0u8; 8];
    for op in MmioOp::decode_all(ops) {
        let b = &mut buf[..op.size];
        if op.write {
            let v = u64::from(op.value).to_le_bytes();
            b.copy_from_slice(&v[..op.size]);
            t.write(op.offset, b);
        } else {
            t.read(op.offset, b);
        }
        let status = t.status();
        // DRIVER_OK is never set without FEATURES_OK, nor FEATURES_OK without DRIVER.
        assert!(status & 4 == 0 || status & 8 != 0, "status {status:#x}");
        assert!(status & 8 == 0 || status & 2 != 0, "status {status:#x}");
    }
}

/// Builds memory images for the seeds.
#[derive(Debug, Default)]
pub struct Image(Vec<u8>);

impl Image {
    fn put(&mut self, at: u64, bytes: &[u8]) {
        let at = at as usize;
        if self.0.len() < at + bytes.len() {
            self.0.resize(at + bytes.len(), 0);
        }
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Stores descriptor `i` of the queue at `base`.
    pub fn desc(&mut self, base: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.put(base + 16 * u64::from(i), &d);
    }

    /// Publishes `heads` in the available ring of the queue at `base`.
    pub fn avail(&mut self, base: u64, heads: &[u16]) {
        for (i, h) in heads.iter().enumerate() {
            self.put(base + 0x84 + 2 * i as u64, &h.to_le_bytes());
        }
        self.put(base + 0x82, &(heads.len() as u16).to_le_bytes());
    }

    /// Writes raw bytes.
    pub fn bytes(&mut self, at: u64, b: &[u8]) {
        self.put(at, b);
    }

    /// The image.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

fn blk_header(typ: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&typ.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Seeds of `virtio_blk`: a write then a read of sector 1, a flush, a GET_ID, a discard.
pub fn blk_seeds() -> Vec<Vec<u8>> {
    use block::request::*;
    let mut out = Vec::new();
    for (typ, data_flags, len) in [
        (VIRTIO_BLK_T_OUT, 0u16, 512u32),
        (VIRTIO_BLK_T_IN, 2, 1024),
        (VIRTIO_BLK_T_GET_ID, 2, 20),
    ] {
        let mut img = Image::default();
        img.bytes(0x1000, &blk_header(typ, 1));
        img.desc(QUEUE_A, 0, 0x1000, 16, 1, 1);
        img.desc(QUEUE_A, 1, 0x2000, len, 1 | data_flags, 2);
        img.desc(QUEUE_A, 2, 0x3000, 1, 2, 0);
        img.avail(QUEUE_A, &[0]);
        out.push(img.into_bytes());
    }
    let mut img = Image::default();
    img.bytes(0x1000, &blk_header(VIRTIO_BLK_T_FLUSH, 0));
    img.desc(QUEUE_A, 0, 0x1000, 16, 1, 1);
    img.desc(QUEUE_A, 1, 0x3000, 1, 2, 0);
    img.avail(QUEUE_A, &[0]);
    img.bytes(CONTROL, &[1]);
    out.push(img.into_bytes());
    // Discard through an indirect table.
    let mut img = Image::default();
    img.bytes(0x1000, &blk_header(VIRTIO_BLK_T_DISCARD, 0));
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&4u32.to_le_bytes());
    img.bytes(0x2000, &seg);
    img.desc(0x4000, 0, 0x1000, 16, 1, 1);
    img.desc(0x4000, 1, 0x2000, 16, 1, 2);
    img.desc(0x4000, 2, 0x3000, 1, 2, 0);
    img.desc(QUEUE_A, 0, 0x4000, 48, 4, 0);
    img.avail(QUEUE_A, &[0]);
    out.push(img.into_bytes());
    out
}

/// Seeds of `virtio_net`: one 60-byte frame on TX and a 2 KiB RX buffer, plain and mergeable.
pub fn net_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for mergeable in [false, true] {
        let mut img = Image::default();
        let mut frame = vec![0u8; 12 + 60];
        frame[12..18].copy_from_slice(&[0xff; 6]);
        img.bytes(0x1000, &frame);
        img.desc(QUEUE_A, 0, 0x1000, 12, 1, 1);
        img.desc(QUEUE_A, 1, 0x100c, 60, 0, 0);
        img.avail(QUEUE_A, &[0]);
        if mergeable {
            img.desc(QUEUE_B, 0, 0x2000, 40, 2, 0);
            img.desc(QUEUE_B, 1, 0x3000, 40, 2, 0);
            img.avail(QUEUE_B, &[0, 1]);
        } else {
            img.desc(QUEUE_B, 0, 0x2000, 2048, 2, 0);
            img.avail(QUEUE_B, &[0]);
        }
        img.bytes(CONTROL, &[u8::from(mergeable)]);
        img.bytes(NET_FEATURES, &0u64.to_le_bytes());
        out.push(img.into_bytes());
    }
    out
}

/// Seeds of `virtio_console`: "hello" on TX, a receive buffer, and input at the end.
pub fn console_seeds() -> Vec<Vec<u8>> {
    let mut img = Image::default();
    img.bytes(0x1000, b"hello");
    img.desc(QUEUE_A, 0, 0x1000, 5, 0, 0);
    img.avail(QUEUE_A, &[0]);
    img.desc(QUEUE_B, 0, 0x2000, 64, 2, 0);
    img.avail(QUEUE_B, &[0]);
    img.bytes(0x3000, b"typed input");
    vec![img.into_bytes()]
}

/// Seeds of `virtio_rng`: two requests, one split over two buffers.
pub fn rng_seeds() -> Vec<Vec<u8>> {
    let mut img = Image::default();
    img.desc(QUEUE_A, 0, 0x1000, 64, 2, 0);
    img.desc(QUEUE_A, 1, 0x2000, 16, 3, 2);
    img.desc(QUEUE_A, 2, 0x3000, 16, 2, 0);
    img.avail(QUEUE_A, &[0, 1]);
    vec![img.into_bytes()]
}

/// Seeds of `virtio_mmio`: a full driver bring-up of queue 0 followed by a notify, for both
/// devices.
pub fn mmio_seeds() -> Vec<Vec<u8>> {
    let w = |offset: u64, value: u32| MmioOp {
        write: true,
        offset,
        size: 4,
        value,
    };
    let r = |offset: u64| MmioOp {
        write: false,
        offset,
        size: 4,
        value: 0,
    };
    let ops = [
        r(regs::MAGIC_VALUE),
        w(regs::STATUS, 1),
        w(regs::STATUS, 3),
        w(regs::DEVICE_FEATURES_SEL, 1),
        r(regs::DEVICE_FEATURES),
        w(regs::DRIVER_FEATURES_SEL, 1),
        w(regs::DRIVER_FEATURES, 1),
        w(regs::STATUS, 11),
        w(regs::QUEUE_SEL, 0),
        w(regs::QUEUE_NUM, u32::from(QUEUE_SIZE)),
        w(regs::QUEUE_DESC_LOW, 0x1000),
        w(regs::QUEUE_DRIVER_LOW, 0x1080),
        w(regs::QUEUE_DEVICE_LOW, 0x10a0),
        w(regs::QUEUE_READY, 1),
        w(regs::STATUS, 15),
        w(regs::QUEUE_NOTIFY, 0),
        r(regs::INTERRUPT_STATUS),
        w(regs::INTERRUPT_ACK, 1),
        r(regs::CONFIG_GENERATION),
        MmioOp {
            write: false,
            offset: regs::CONFIG,
            size: 8,
            value: 0,
        },
        w(regs::STATUS, 0),
    ];
    [0u8, 1]
        .iter()
        .map(|&pick| {
            let mut v = vec![pick];
            for op in &ops {
                v.extend_from_slice(&op.encode());
            }
            v
        })
        .collect()
}

/// Writes the seed corpora of the vmkit-virtio fuzz targets under `dir`.
pub fn write_seeds(dir: &Path) -> std::io::Result<()> {
    let sets = [
        blk_seeds(),
        net_seeds(),
        console_seeds(),
        rng_seeds(),
        mmio_seeds(),
    ];
    for (name, seeds) in TARGETS.iter().zip(sets) {
        let d = dir.join(name);
        std::fs::create_dir_all(&d)?;
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i}")), s)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blk_seeds_complete_with_ok_status() {
        for (i, s) in blk_seeds().iter().enumerate() {
            let m = memory_from(s);
            let mut q = queue_at(QUEUE_A);
            let out = block::process_queue(
                &mut q,
                &m,
                &disk(),
                &BlockFeatures {
                    flush: true,
                    discard: true,
                    write_zeroes: true,
                },
                None,
            )
            .unwrap();
            assert_eq!(out.completed, 1, "seed {i}");
            assert_eq!(
                m.read_obj::<u8>(GuestAddress(0x3000)).unwrap(),
                0,
                "seed {i} status"
            );
            blk(s);
        }
    }

    #[test]
    fn net_seeds_cross_the_wire() {
        for s in net_seeds() {
            net(&s);
            // Re-run by hand to look at the result.
            let m = memory_from(&s);
            let mut tx = queue_at(QUEUE_A);
            let (mut a, mut b) = ChannelBackend::pair().unwrap();
            b.set_guest_features(u64::MAX).unwrap();
            let out = net::process_tx(&mut tx, &m, 0, &mut a, &mut Vec::new(), None).unwrap();
            assert_eq!(out.sent, 1, "{out:?}");
            let mut rx = queue_at(QUEUE_B);
            let mut f = vec![0u8; 4096];
            let n = b.recv(&mut f).unwrap().unwrap();
            let r = net::deliver_frame(&mut rx, &m, &mut f[..n], control(&s) & 1 != 0).unwrap();
            assert!(matches!(r, net::RxOutcome::Delivered { .. }), "{r:?}");
        }
    }

    #[test]
    fn console_and_rng_seeds_are_served() {
        let s = &console_seeds()[0];
        console(s);
        let m = memory_from(s);
        let mut tx = queue_at(QUEUE_A);
        let mut out = Vec::new();
        vmkit_virtio::console::process_tx(&mut tx, &m, &mut |d: &[u8]| {
            out.extend_from_slice(d);
            Ok(())
        })
        .unwrap();
        assert_eq!(out, b"hello");
        let s = &rng_seeds()[0];
        rng(s);
        let m = memory_from(s);
        let mut q = queue_at(QUEUE_A);
        assert!(
            vmkit_virtio::rng::process_queue(&mut q, &m, &mut CountingSource::default()).unwrap()
        );
        assert_eq!(q.next_used(), 2);
    }

    #[test]
    fn mmio_ops_round_trip_and_seeds_run() {
        let op = MmioOp {
            write: true,
            offset: 0x1fc,
            size: 2,
            value: 0xdead_beef,
        };
        assert_eq!(MmioOp::decode_all(&op.encode()), vec![op]);
        assert!(MmioOp::decode_all(&[1, 2, 3]).is_empty());
        for s in mmio_seeds() {
            mmio(&s);
        }
        mmio(&[]);
    }

    #[test]
    fn garbage_does_not_panic() {
        let mut x = 0x1234_5678u32;
        for len in [0usize, 1, 7, 200, 600, 5000] {
            let v: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            blk(&v);
            net(&v);
            console(&v);
            rng(&v);
            mmio(&v);
        }
    }

    #[test]
    fn seeds_are_written_per_target() {
        let d = tempfile::tempdir().unwrap();
        write_seeds(d.path()).unwrap();
        for t in TARGETS {
            assert!(d.path().join(t).join("seed-0").exists(), "{t}");
        }
    }
}
