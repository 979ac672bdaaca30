//! A minimal vhost-user *frontend and driver* for tests: it plays QEMU (vhost's `Frontend`
//! over the backend's socket, a memfd as guest RAM) and the guest driver (split rings written
//! by hand, kicks on the kick eventfd, interrupts awaited on the call eventfd).
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest RAM size (one region at GPA 0).
pub const MEM_SIZE: u64 = 0x20_0000;
/// Where buffers live in guest RAM.
pub const DATA: u64 = 0x10_0000;
/// A fake frontend virtual address for GPA 0 (vring addresses are sent as frontend VAs).
pub const VA_BASE: u64 = 0x7f00_0000_0000;
/// Feature bit: event index.
pub const EVENT_IDX: u64 = 1 << 29;

pub fn memfd(size: u64) -> File {
    // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(c"vmkit-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

pub fn region(file: &File, gpa: u64, size: u64) -> GuestRegionMmap<()> {
    let m = MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), size as usize)
        .unwrap();
    GuestRegionMmap::new(m, GuestAddress(gpa)).unwrap()
}

pub struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

pub struct TestFrontend {
    pub fe: Frontend,
    pub mem: GuestMemoryMmap<()>,
    pub file: File,
    pub rings: Vec<Ring>,
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
}

/// Polls `fd` for readability for at most `timeout`.
pub fn readable(fd: &EventFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is a valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    rc == 1
}

impl TestFrontend {
    /// Connects and negotiates like QEMU: features (all offered ones except `drop`), protocol
    /// features, memory table, and `num_queues` rings of `size` entries, enabled.
    pub fn connect(sock: &Path, num_queues: usize, size: u16, drop: u64) -> Self {
        Self::connect_with(sock, num_queues, size, drop, false)
    }

    /// Like [`TestFrontend::connect`], but in the order of QEMU 10's vhost-user netdev: every
    /// ring is enabled *before* `SET_FEATURES` (raw messages, which vhost's `Frontend` refuses
    /// to send) and never again afterwards.
    pub fn connect_like_qemu(sock: &Path, num_queues: usize, size: u16, drop: u64) -> Self {
        Self::connect_with(sock, num_queues, size, drop, true)
    }

    fn connect_with(
        sock: &Path,
        num_queues: usize,
        size: u16,
        drop: u64,
        early_enable: bool,
    ) -> Self {
        let mut stream = None;
        // Bounds against hangs, not timing assertions: 60 s for a loaded 2-core machine.
        for _ in 0..6000 {
            if let Ok(s) = std::os::unix::net::UnixStream::connect(sock) {
                stream = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut stream = stream.expect("backend socket never accepted");
        if early_enable {
            use std::io::Write;
            for q in 0..num_queues as u32 {
                // SET_VRING_ENABLE (18), version 1, 8-byte payload: ring q, enable 1.
                let mut m = Vec::new();
                for w in [18u32, 1, 8, q, 1] {
                    m.extend(w.to_le_bytes());
                }
                stream.write_all(&m).unwrap();
            }
        }
        let mut fe = Frontend::from_stream(stream, num_queues as u64);
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        // Net does not offer VHOST_USER_F_PROTOCOL_FEATURES (see the backend module docs).
        let has_protocol = offered & (1 << 30) != 0;
        let protocol = if has_protocol {
            // Only what a plain frontend needs (other backends may offer more, e.g. inflight
            // tracking, which would oblige us to send more messages).
            let p = fe.get_protocol_features().unwrap()
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
            fe.set_protocol_features(p).unwrap();
            p
        } else {
            VhostUserProtocolFeatures::empty()
        };
        let features = offered & !drop;
        fe.set_features(features).unwrap();
        let file = memfd(MEM_SIZE);
        let mem = GuestMemoryMmap::from_regions(vec![region(&file, 0, MEM_SIZE)]).unwrap();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE,
            userspace_addr: VA_BASE,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }])
        .unwrap();
        let mut rings = Vec::new();
        for q in 0..num_queues {
            let base = 0x1_0000 * q as u64;
            let ring = Ring {
                size,
                desc: base,
                avail: base + 0x4000,
                used: base + 0x8000,
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
                kick: EventFd::new(EFD_NONBLOCK).unwrap(),
                call: EventFd::new(EFD_NONBLOCK).unwrap(),
            };
            fe.set_vring_num(q, size).unwrap();
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: size,
                    queue_size: size,
                    flags: 0,
                    desc_table_addr: VA_BASE + ring.desc,
                    used_ring_addr: VA_BASE + ring.used,
                    avail_ring_addr: VA_BASE + ring.avail,
                    log_addr: None,
                },
            )
            .unwrap();
            fe.set_vring_base(q, 0).unwrap();
            fe.set_vring_call(q, &ring.call).unwrap();
            fe.set_vring_kick(q, &ring.kick).unwrap();
            if has_protocol && !early_enable {
                fe.set_vring_enable(q, true).unwrap();
            }
            rings.push(ring);
        }
        Self {
            fe,
            mem,
            file,
            rings,
            features,
            protocol,
        }
    }

    /// Places a chain without kicking (the driver fills a receive queue ahead of time).
    pub fn post(&mut self, q: usize, bufs: &[(u64, u32, bool)]) {
        self.place(q, bufs);
    }

    /// Places a chain of `(gpa, len, device_writable)` buffers on queue `q` and kicks.
    pub fn submit(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.place(q, bufs);
        self.rings[q].kick.write(1).unwrap();
        head
    }

    /// Places a chain of `(gpa, len, device_writable)` buffers on queue `q` without kicking.
    pub fn place(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let r = &mut self.rings[q];
        let head = r.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % r.size;
            let last = i + 1 == bufs.len();
            let flags: u16 = if last { 0 } else { 1 } | if write { 2 } else { 0 };
            let next = (idx + 1) % r.size;
            let d = r.desc + 16 * u64::from(idx);
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }
        r.next_desc = (head + bufs.len() as u16) % r.size;
        let slot = r.avail + 4 + 2 * u64::from(r.avail_idx % r.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        // used_event: interrupt me as soon as anything past what I consumed is used.
        let used_event = r.avail + 4 + 2 * u64::from(r.size);
        self.mem
            .write_obj(r.last_used, GuestAddress(used_event))
            .unwrap();
        r.avail_idx = r.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(r.avail_idx, GuestAddress(r.avail + 2))
            .unwrap();
        head
    }

    /// Places a chain like a real driver: writes the avail ring but kicks only if the device
    /// asked for it (`avail_event` with event-idx, `VRING_USED_F_NO_NOTIFY` otherwise). Returns
    /// whether it kicked.
    pub fn submit_like_driver(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> bool {
        let old = self.rings[q].avail_idx;
        self.place(q, bufs);
        let r = &self.rings[q];
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let kick = if self.features & EVENT_IDX != 0 {
            let event = self.avail_event(q);
            // vring_need_event(event, new, old)
            r.avail_idx.wrapping_sub(event).wrapping_sub(1) < r.avail_idx.wrapping_sub(old)
        } else {
            let flags: u16 = self.mem.read_obj(GuestAddress(r.used)).unwrap();
            flags & 1 == 0
        };
        if kick {
            r.kick.write(1).unwrap();
        }
        kick
    }

    /// The device's `avail_event` for queue `q` (the avail index past which it wants a kick).
    pub fn avail_event(&self, q: usize) -> u16 {
        let r = &self.rings[q];
        self.mem
            .read_obj(GuestAddress(r.used + 4 + 8 * u64::from(r.size)))
            .unwrap()
    }

    /// Waits for the call eventfd of queue `q`, then returns the next used element.
    pub fn wait_used(&mut self, q: usize) -> (u16, u32) {
        let r = &mut self.rings[q];
        loop {
            let idx: u16 = self.mem.read_obj(GuestAddress(r.used + 2)).unwrap();
            if idx != r.last_used {
                let e = r.used + 4 + 8 * u64::from(r.last_used % r.size);
                let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
                r.last_used = r.last_used.wrapping_add(1);
                return (id as u16, len);
            }
            assert!(
                readable(&r.call, Duration::from_secs(60)),
                "no interrupt on queue {q} within 60 s"
            );
            let _ = r.call.read();
        }
    }

    /// Number of used elements the backend has published on queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.rings[q].used + 2))
            .unwrap()
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(gpa)).unwrap();
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    /// Reads `len` bytes of the device configuration space.
    pub fn config(&mut self, offset: u32, len: u32) -> Vec<u8> {
        let buf = vec![0u8; len as usize];
        let (_, data) = self
            .fe
            .get_config(
                offset,
                len,
                vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
                &buf,
            )
            .unwrap();
        data
    }
}

/// A block request: header at `hdr`, data buffer at `data`, status byte at `status`.
pub fn blk_request(
    t: &mut TestFrontend,
    q: usize,
    kind: u32,
    sector: u64,
    data: Option<(u64, u32, bool)>,
) -> (u8, u32) {
    let hdr = DATA;
    let status = DATA + 0x100;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    t.write(hdr, &h);
    t.write(status, &[0xff]);
    let mut bufs = vec![(hdr, 16, false)];
    bufs.extend(data);
    bufs.push((status, 1, true));
    t.submit(q, &bufs);
    let (_, len) = t.wait_used(q);
    (t.read(status, 1)[0], len)
}
