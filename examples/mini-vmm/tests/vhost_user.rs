//! mini-vmm's vhost-user frontend against vmkit-vhost-user's real backends, without a guest:
//! the test writes the virtio-mmio registers as a driver would (through the same
//! [`MmioTransport`] mini-vmm uses), puts buffers in rings in memfd-backed guest memory, kicks
//! through the device's kick eventfd, and checks what the backend did: bytes on the console's
//! host side, entropy in an rng buffer, used-ring entries, `InterruptStatus` after the call
//! eventfd fired. Also: reset stops the rings and a second driver initialisation works; a
//! backend that hangs up, never answers or does not exist gives typed errors, never a panic
//! or a hang.

use std::io::{Read, Write};
use std::os::unix::io::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmkit_memory::{Backing, GuestRam, MemoryLayout};
use vmkit_vhost_user::{console_backend, rng_backend, serve, ServeOptions, Stop};
use vmkit_virtio::console::ConsoleBackend;
use vmkit_virtio::interrupt::INT_USED_RING;
use vmkit_virtio::mmio::regs;
use vmkit_virtio::{CallbackIrq, MmioTransport, VirtioDevice};

use mini_vmm::args::{Args, ArgsError};
use mini_vmm::vhost_user::{
    parse_arg, VhostUserArg, VhostUserDevice, VhostUserError, VhostUserKind,
};

type Mem = Arc<GuestRam>;

const STATUS_ACK: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const QSIZE: u16 = 16;
/// Ring areas of queue q: desc at RING + q*0x1000, avail +0x400, used +0x800.
const RING: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;

fn memfd_mem() -> (Mem, vmkit_memory::OwnedGuestRam) {
    let owned = Backing::memfd()
        .build(&MemoryLayout::x86_pc(16 << 20).unwrap())
        .unwrap();
    (Arc::new(owned.ram().clone()), owned)
}

struct Backend {
    sock: PathBuf,
    stop: Stop,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Backend {
    fn console() -> (Self, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        let b = Arc::new(console_backend(ConsoleBackend::unix_stream(ours).unwrap()));
        (
            Self::start(move |s, st| serve(b, s, st, ServeOptions { once: true })),
            host,
        )
    }

    fn rng() -> Self {
        let b = Arc::new(rng_backend());
        Self::start(move |s, st| serve(b, s, st, ServeOptions { once: true }))
    }

    fn start<R>(f: impl FnOnce(&Path, &Stop) -> R + Send + 'static) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vu.sock");
        let stop = Stop::new().unwrap();
        let (s, st) = (sock.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let _ = f(&s, &st);
        });
        Self {
            sock,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn arg(&self, kind: VhostUserKind) -> VhostUserArg {
        VhostUserArg {
            kind,
            socket: self.sock.clone(),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.request();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The transport with the device in it, driven as a guest driver would.
struct Driver {
    t: MmioTransport<Mem>,
    mem: Mem,
    irqs: Arc<AtomicU32>,
    calls: Vec<RawFd>,
    next: Vec<u16>,
}

impl Driver {
    fn new(dev: VhostUserDevice, mem: Mem) -> Self {
        let calls = dev.backend_fds();
        let irqs = Arc::new(AtomicU32::new(0));
        let i = irqs.clone();
        let irq = CallbackIrq::new(move || {
            i.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        let t = MmioTransport::new(Box::new(dev), mem.clone(), Box::new(irq)).unwrap();
        Self {
            t,
            mem,
            irqs,
            calls,
            next: Vec::new(),
        }
    }

    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    /// Full initialisation: features (VERSION_1 + what `accept` keeps), `queues` rings.
    fn init(&mut self, queues: u32, accept: u64) {
        self.w(regs::STATUS, 0);
        self.w(regs::STATUS, STATUS_ACK | STATUS_DRIVER);
        self.w(regs::DEVICE_FEATURES_SEL, 0);
        let lo = self.r(regs::DEVICE_FEATURES) as u64;
        self.w(regs::DEVICE_FEATURES_SEL, 1);
        let hi = self.r(regs::DEVICE_FEATURES) as u64;
        let offered = lo | hi << 32;
        assert_ne!(offered & (1 << 32), 0, "VERSION_1 offered");
        assert_eq!(
            offered & (1 << 30),
            0,
            "the vhost-user-only bit is hidden from the guest"
        );
        let acked = offered & (accept | 1 << 32);
        self.w(regs::DRIVER_FEATURES_SEL, 0);
        self.w(regs::DRIVER_FEATURES, acked as u32);
        self.w(regs::DRIVER_FEATURES_SEL, 1);
        self.w(regs::DRIVER_FEATURES, (acked >> 32) as u32);
        self.w(
            regs::STATUS,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(self.r(regs::STATUS) & STATUS_FEATURES_OK, 0);
        self.next = vec![0; queues as usize];
        for q in 0..queues {
            let base = RING + u64::from(q) * 0x1000;
            // Fresh rings: zero the indexes.
            self.mem
                .write_slice(&[0u8; 0x1000], GuestAddress(base))
                .unwrap();
            self.w(regs::QUEUE_SEL, q);
            assert!(self.r(regs::QUEUE_NUM_MAX) >= u32::from(QSIZE));
            self.w(regs::QUEUE_NUM, u32::from(QSIZE));
            for (reg, addr) in [
                (regs::QUEUE_DESC_LOW, base),
                (regs::QUEUE_DRIVER_LOW, base + 0x400),
                (regs::QUEUE_DEVICE_LOW, base + 0x800),
            ] {
                self.w(reg, addr as u32);
                self.w(reg + 4, 0);
            }
            self.w(regs::QUEUE_READY, 1);
            assert_eq!(self.r(regs::QUEUE_READY), 1);
        }
        self.w(
            regs::STATUS,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(
            self.r(regs::STATUS) & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET),
            STATUS_DRIVER_OK,
            "activation reached the backend"
        );
    }

    /// Puts one buffer on queue `q` and notifies through `QueueNotify`.
    fn submit(&mut self, q: u16, addr: u64, len: u32, writable: bool) {
        let base = RING + u64::from(q) * 0x1000;
        let slot = self.next[q as usize];
        let d = base + 16 * u64::from(slot % QSIZE);
        self.mem.write_obj(addr, GuestAddress(d)).unwrap();
        self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        self.mem
            .write_obj(if writable { 2u16 } else { 0u16 }, GuestAddress(d + 12))
            .unwrap();
        self.mem.write_obj(0u16, GuestAddress(d + 14)).unwrap();
        self.mem
            .write_obj(
                slot % QSIZE,
                GuestAddress(base + 0x400 + 4 + 2 * u64::from(slot % QSIZE)),
            )
            .unwrap();
        self.next[q as usize] = slot.wrapping_add(1);
        self.mem
            .write_obj(slot.wrapping_add(1), GuestAddress(base + 0x400 + 2))
            .unwrap();
        self.w(regs::QUEUE_NOTIFY, u32::from(q));
    }

    fn used_idx(&self, q: u16) -> u16 {
        self.mem
            .read_obj(GuestAddress(RING + u64::from(q) * 0x1000 + 0x800 + 2))
            .unwrap()
    }

    /// Waits (bounded) until the used index of `q` reaches `idx`; returns the last entry's
    /// length.
    fn wait_used(&self, q: u16, idx: u16) -> u32 {
        let end = Instant::now() + Duration::from_secs(10);
        while self.used_idx(q) != idx {
            assert!(
                Instant::now() < end,
                "queue {q}: used index stuck at {}",
                self.used_idx(q)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let e = RING + u64::from(q) * 0x1000 + 0x800 + 4 + 8 * u64::from((idx - 1) % QSIZE);
        self.mem.read_obj(GuestAddress(e + 4)).unwrap()
    }

    /// What mini-vmm's event loop does: wait for queue `q`'s call eventfd, then let the
    /// transport turn it into `InterruptStatus` + the line.
    fn deliver_call(&mut self, q: usize) {
        let mut p = libc::pollfd {
            fd: self.calls[q],
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, 10_000) };
        assert_eq!(
            n, 1,
            "queue {q}: the backend never signalled its call eventfd"
        );
        self.t.process_backend_event(q);
    }
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

#[test]
fn console_round_trip_interrupts_config_reset_and_restart() {
    let (backend, mut host) = Backend::console();
    let (mem, _owned) = memfd_mem();
    let dev = VhostUserDevice::connect(&backend.arg(VhostUserKind::Console), &mem).unwrap();
    assert_eq!(dev.device_type(), 3);
    assert_eq!(dev.queue_max_sizes(), &[256, 256]);
    let mut d = Driver::new(dev, mem.clone());
    assert_eq!(d.r(regs::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(d.r(regs::DEVICE_ID), 3);
    d.init(2, u64::MAX);

    // Guest -> host: a transmit buffer reaches the backend's output.
    let line = b"token from the guest\n";
    mem.write_slice(line, GuestAddress(DATA)).unwrap();
    d.submit(1, DATA, line.len() as u32, false);
    d.wait_used(1, 1);
    assert_eq!(read_exactly(&mut host, line.len()), line);
    // The call eventfd becomes InterruptStatus bit 0 and one interrupt.
    let before = d.irqs.load(Ordering::SeqCst);
    d.deliver_call(1);
    assert_eq!(d.r(regs::INTERRUPT_STATUS) & INT_USED_RING, INT_USED_RING);
    assert_eq!(d.irqs.load(Ordering::SeqCst), before + 1);
    d.w(regs::INTERRUPT_ACK, INT_USED_RING);
    assert_eq!(d.r(regs::INTERRUPT_STATUS), 0);

    // Host -> guest: input fills a receive buffer.
    host.write_all(b"line from the host\n").unwrap();
    d.submit(0, DATA + 0x1000, 64, true);
    let n = d.wait_used(0, 1);
    assert_eq!(n, 19);
    let mut got = vec![0u8; n as usize];
    mem.read_slice(&mut got, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(got, b"line from the host\n");

    // Config space through GET_CONFIG / SET_CONFIG: emergency write reaches the output.
    let mut cfg = [0xffu8; 4];
    d.t.read(regs::CONFIG + 4, &mut cfg);
    assert_eq!(cfg, [0, 0, 0, 0], "max_nr_ports reads 0 without MULTIPORT");
    d.t.write(regs::CONFIG + 8, &[b'!', 0, 0, 0]);
    assert_eq!(read_exactly(&mut host, 1), b"!");

    // Reset stops the rings (GET_VRING_BASE); a second initialisation starts them again.
    d.w(regs::STATUS, 0);
    assert_eq!(d.r(regs::STATUS), 0);
    d.init(2, u64::MAX);
    mem.write_slice(b"again\n", GuestAddress(DATA)).unwrap();
    d.submit(1, DATA, 6, false);
    d.wait_used(1, 1);
    assert_eq!(read_exactly(&mut host, 6), b"again\n");
}

#[test]
fn rng_fills_a_buffer_and_the_backend_hanging_up_fails_the_device() {
    let backend = Backend::rng();
    let (mem, _owned) = memfd_mem();
    let dev = VhostUserDevice::connect(&backend.arg(VhostUserKind::Rng), &mem).unwrap();
    assert_eq!(dev.device_type(), 4);
    let sock_index = dev.backend_fds().len() - 1;
    let mut d = Driver::new(dev, mem.clone());
    d.init(1, u64::MAX);
    mem.write_slice(&[0u8; 64], GuestAddress(DATA)).unwrap();
    d.submit(0, DATA, 64, true);
    assert_eq!(d.wait_used(0, 1), 64);
    let mut got = [0u8; 64];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_ne!(got, [0u8; 64], "entropy arrived");

    // The backend goes away: the socket reads end-of-file, the device needs a reset.
    drop(backend);
    d.t.process_backend_event(sock_index);
    assert_ne!(d.r(regs::STATUS) & STATUS_NEEDS_RESET, 0);
    // Reset and re-initialisation do not hang or panic; activation now fails cleanly.
    d.w(regs::STATUS, 0);
    d.w(regs::STATUS, STATUS_ACK | STATUS_DRIVER);
    d.w(regs::DRIVER_FEATURES_SEL, 1);
    d.w(regs::DRIVER_FEATURES, 1);
    d.w(
        regs::STATUS,
        STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    d.w(
        regs::STATUS,
        STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    assert_ne!(d.r(regs::STATUS) & STATUS_NEEDS_RESET, 0);
}

#[test]
fn connect_errors_are_typed() {
    let (mem, _owned) = memfd_mem();
    let dir = tempfile::tempdir().unwrap();

    // Nobody listens (the socket file is not there): Connect, after the retry window.
    let arg = VhostUserArg {
        kind: VhostUserKind::Console,
        socket: dir.path().join("missing.sock"),
    };
    let e = VhostUserDevice::connect(&arg, &mem).unwrap_err();
    assert!(matches!(e, VhostUserError::Connect { .. }), "{e}");
    assert!(e.to_string().contains("missing.sock"), "{e}");

    // A peer that accepts and hangs up at once: a protocol error naming the message.
    let sock = dir.path().join("hangup.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || drop(l.accept()));
    let arg = VhostUserArg {
        kind: VhostUserKind::Console,
        socket: sock,
    };
    let e = VhostUserDevice::connect(&arg, &mem).unwrap_err();
    t.join().unwrap();
    assert!(matches!(e, VhostUserError::Protocol { .. }), "{e}");

    // A peer that never answers: the socket timeout turns it into an error, not a hang.
    let sock = dir.path().join("silent.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let arg = VhostUserArg {
        kind: VhostUserKind::Console,
        socket: sock,
    };
    let e = VhostUserDevice::connect(&arg, &mem).unwrap_err();
    assert!(
        matches!(
            e,
            VhostUserError::Protocol {
                what: "GET_FEATURES",
                ..
            }
        ),
        "{e}"
    );
    t.join().unwrap();

    // Anonymous guest RAM cannot be shared with a backend.
    let anon = Arc::new(GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let (backend, _host) = Backend::console();
    let e = VhostUserDevice::connect(&backend.arg(VhostUserKind::Console), &anon).unwrap_err();
    assert!(matches!(e, VhostUserError::NotShareable { gpa: 0 }), "{e}");
}

fn parse(list: &[&str]) -> Result<Args, ArgsError> {
    Args::parse(list.iter().map(|s| s.to_string()))
}

#[test]
fn the_option_parses_and_its_errors_name_it() {
    assert_eq!(
        parse_arg("type=console,socket=/run/c.sock").unwrap(),
        VhostUserArg {
            kind: VhostUserKind::Console,
            socket: "/run/c.sock".into()
        }
    );
    for (kind, name) in [
        (VhostUserKind::Rng, "rng"),
        (VhostUserKind::Blk, "blk"),
        (VhostUserKind::Net, "net"),
    ] {
        let a = parse_arg(&format!("socket=s,type={name}")).unwrap();
        assert_eq!(a.kind, kind);
        assert_eq!(kind.name(), name);
    }
    assert_eq!(VhostUserKind::Blk.queues(), 1);
    assert_eq!(VhostUserKind::Net.device_type(), 1);
    for bad in [
        "type=gpu,socket=s",
        "type=console",
        "socket=s",
        "type=rng,socket=",
        "x=1",
    ] {
        let e = parse_arg(bad).unwrap_err();
        assert!(e.to_string().contains("--vhost-user"), "{e}");
    }
    let a = parse(&[
        "--kernel",
        "/k",
        "--vhost-user",
        "type=console,socket=/c",
        "--vhost-user",
        "type=rng,socket=/r",
    ])
    .unwrap();
    assert_eq!(a.vhost_user.len(), 2);
    assert_eq!(a.virtio_count(), 2);
    assert_eq!(
        parse(&["--vhost-user", "type=rng,socket=/r"]).unwrap_err(),
        ArgsError::NeedsKernel("--vhost-user")
    );
    assert_eq!(
        parse(&[
            "--kernel",
            "/k",
            "--vhost-user",
            "type=rng,socket=/r",
            "--snapshot",
            "path=/s,after=10"
        ])
        .unwrap_err(),
        ArgsError::SnapshotVhostUser
    );
    assert!(matches!(
        parse(&["--restore", "/s", "--vhost-user", "type=rng,socket=/r"]).unwrap_err(),
        ArgsError::RestoreConflict(a) if a == "--vhost-user"
    ));
    assert!(matches!(
        parse(&["--kernel", "/k", "--vhost-user"]).unwrap_err(),
        ArgsError::MissingValue(_)
    ));
}
