//! vhost-user devices: mini-vmm as the *frontend*, a separate process as the device.
//!
//! # The model
//!
//! A `--vhost-user type=console,socket=PATH` device is a [`VhostUserDevice`]: a
//! [`VirtioDevice`] like the in-process ones, so it sits behind the same virtio-mmio
//! [`MmioTransport`](vmkit_virtio::MmioTransport), gets a slot, a GSI and an ACPI entry, and the
//! guest's `virtio_mmio` driver negotiates with the transport's registers as usual. What
//! differs is what happens at the edges of that negotiation: the data plane (the rings) is
//! handed to the backend process over the vhost-user protocol (rust-vmm's `vhost` crate,
//! [`Frontend`]), and mini-vmm never touches a descriptor.
//!
//! | virtio-mmio event (transport)      | vhost-user message(s) sent                                  |
//! |------------------------------------|-------------------------------------------------------------|
//! | device creation (`--vhost-user`)   | `SET_OWNER`, `GET_FEATURES`, `GET_PROTOCOL_FEATURES`, `SET_PROTOCOL_FEATURES`, `GET_QUEUE_NUM` (with MQ), `SET_MEM_TABLE` (memfd fds + offsets) |
//! | `DeviceFeatures` read              | nothing: the backend's features (read once) within [`OFFERABLE_FEATURES`] |
//! | config space read / write          | `GET_CONFIG` / `SET_CONFIG` (when the backend offers CONFIG; else zeros / ignored) |
//! | `DRIVER_OK` (activation)           | `SET_FEATURES`, then per ready queue `SET_VRING_NUM`, `SET_VRING_ADDR`, `SET_VRING_BASE`, `SET_VRING_CALL`, `SET_VRING_KICK`, `SET_VRING_ENABLE` |
//! | `Status = 0` (reset)               | per started queue `SET_VRING_ENABLE(0)`, `GET_VRING_BASE` (stops the ring) |
//!
//! Addresses in `SET_VRING_ADDR` and `SET_MEM_TABLE` are mini-vmm's host virtual addresses
//! (as QEMU sends them); the backend maps the same memfd pages and translates through the
//! table. Guest RAM must therefore be shareable: with any vhost-user device, mini-vmm backs
//! RAM with memfd ([`vmkit_memory::Backing::memfd`]); a region without a file is refused.
//!
//! **Notifications.** Each queue has a *kick* eventfd, created here, handed to the backend
//! (`SET_VRING_KICK`) and registered by mini-vmm as the KVM ioeventfd on `QueueNotify` with the
//! queue index as datamatch: a guest kick goes from KVM straight to the backend, no exit and no
//! mini-vmm thread on the way. (A `QueueNotify` that does exit, e.g. a narrow store, reaches
//! [`VirtioDevice::queue_notify`], which writes the same eventfd.)
//!
//! **Interrupts.** Linux's virtio-mmio interrupt handler reads `InterruptStatus` and drops the
//! interrupt when no bit is set, so the backend's *call* eventfd cannot be the irqfd itself.
//! Each queue's call eventfd is one of this device's
//! [`backend_fds`](VirtioDevice::backend_fds): mini-vmm's event loop wakes, reads it, and
//! [`Interrupt::trigger`] sets the used-ring bit in `InterruptStatus` and then signals the
//! irqfd.
//!
//! **Failure.** Every exchange runs under a [`Watchdog`]: a backend that does not answer within
//! [`SOCKET_TIMEOUT`] gets its socket shut down, which ends the blocked receive with an error
//! (vhost's endpoint retries a receive that merely timed out, so `SO_RCVTIMEO` alone would
//! not do), so a silent backend costs at most that long and never hangs a vCPU. A protocol
//! error in a step that changes state marks the device failed: activation returns an error
//! (the transport sets `DEVICE_NEEDS_RESET`), config reads return zeros, and no further
//! message is sent. A failed config read (`GET_CONFIG`, which the transport makes through
//! `&self`) only returns zeros and logs; once the watchdog has shut the socket, every later
//! exchange fails at once. The socket itself is watched
//! too: when the backend closes it while the device runs, the next event-loop pass reports a
//! [`DeviceError::Backend`] and the transport sets `DEVICE_NEEDS_RESET`. Nothing panics.
//!
//! **Snapshots.** Not supported: the rings' progress lives in the backend, so
//! [`crate::args`] refuses `--snapshot` and `--restore` with `--vhost-user`.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmkit_virtio::device::{ActivateError, DeviceError};
use vmkit_virtio::interrupt::{Interrupt, InterruptReason};
use vmkit_virtio::state::{DeviceState, StateError};
use vmkit_virtio::VirtioDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::args::ArgsError;
use crate::virtio::Memory;

/// How long one request/reply exchange with a backend may take before the device fails.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`VhostUserDevice::connect`] retries a socket that does not accept yet.
pub const CONNECT_RETRY: Duration = Duration::from_secs(5);
/// Maximum size of every queue offered to the driver (the backends' usual maximum).
pub const QUEUE_SIZE: u16 = 256;
/// Largest configuration space read through `GET_CONFIG` (virtio-blk's is 60 bytes).
pub const MAX_CONFIG: u64 = 256;

/// Which virtio device the backend implements: decides the device ID and the queue count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhostUserKind {
    /// virtio-net (ID 1), one receive and one transmit queue.
    Net,
    /// virtio-blk (ID 2), one request queue.
    Blk,
    /// virtio-console (ID 3), `receiveq0` and `transmitq0` (no MULTIPORT).
    Console,
    /// virtio-rng (ID 4), one request queue.
    Rng,
}

impl VhostUserKind {
    /// The virtio device ID.
    pub fn device_type(self) -> u32 {
        match self {
            Self::Net => 1,
            Self::Blk => 2,
            Self::Console => 3,
            Self::Rng => 4,
        }
    }

    /// Queues the guest gets.
    pub fn queues(self) -> usize {
        match self {
            Self::Net | Self::Console => 2,
            Self::Blk | Self::Rng => 1,
        }
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Net => "net",
            Self::Blk => "blk",
            Self::Console => "console",
            Self::Rng => "rng",
        }
    }

    /// Feature bits the frontend never lets the guest see for this type: virtio-console's
    /// MULTIPORT would need control queues this frontend does not set up.
    fn masked_features(self) -> u64 {
        match self {
            Self::Console => 1 << 1, // VIRTIO_CONSOLE_F_MULTIPORT
            _ => 0,
        }
    }
}

/// The backend feature bits a guest may be offered: the device-specific range (0-23) and the
/// transport features this frontend implements - `INDIRECT_DESC` (28), `EVENT_IDX` (29) and
/// `VERSION_1` (32). Everything else is hidden, whatever the backend offers: packed rings
/// (34) would need wrap counters in `SET/GET_VRING_BASE`, `ACCESS_PLATFORM` (33) an IOMMU,
/// `NOTIFICATION_DATA` (38) a different notify format, and `VHOST_F_LOG_ALL` (26) and
/// `VHOST_USER_F_PROTOCOL_FEATURES` (30) are vhost's own, not the guest's.
pub const OFFERABLE_FEATURES: u64 = 0x00ff_ffff | 1 << 28 | 1 << 29 | 1 << 32;

/// A `--vhost-user` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserArg {
    /// The device type (`type=`).
    pub kind: VhostUserKind,
    /// The backend's listening socket (`socket=`).
    pub socket: PathBuf,
}

fn invalid(value: &str, why: impl Into<String>) -> ArgsError {
    ArgsError::Invalid {
        arg: "--vhost-user".into(),
        value: value.into(),
        why: why.into(),
    }
}

/// Parses `type=console|rng|blk|net,socket=PATH`.
pub fn parse_arg(v: &str) -> Result<VhostUserArg, ArgsError> {
    let (mut kind, mut socket) = (None, None);
    for part in v.split(',') {
        match part.split_once('=') {
            Some(("type", t)) => {
                kind = Some(match t {
                    "console" => VhostUserKind::Console,
                    "rng" => VhostUserKind::Rng,
                    "blk" => VhostUserKind::Blk,
                    "net" => VhostUserKind::Net,
                    _ => {
                        return Err(invalid(
                            v,
                            format!("unknown type `{t}` (console, rng, blk, net)"),
                        ))
                    }
                })
            }
            Some(("socket", "")) => return Err(invalid(v, "empty socket path")),
            Some(("socket", s)) => socket = Some(PathBuf::from(s)),
            _ => {
                return Err(invalid(
                    v,
                    format!("unknown key in `{part}` (type=, socket=)"),
                ))
            }
        }
    }
    Ok(VhostUserArg {
        kind: kind.ok_or_else(|| invalid(v, "type= is required"))?,
        socket: socket.ok_or_else(|| invalid(v, "socket= is required"))?,
    })
}

/// Errors connecting a vhost-user device.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket could not be connected (or configured).
    #[error("cannot connect to vhost-user backend {}: {source}", socket.display())]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A protocol exchange failed.
    #[error("vhost-user backend {}: {what} failed: {source}", socket.display())]
    Protocol {
        /// The socket path.
        socket: PathBuf,
        /// The message, e.g. `GET_FEATURES`.
        what: &'static str,
        /// What vhost reported.
        source: vhost::Error,
    },
    /// The backend does not offer something the device type needs.
    #[error("vhost-user backend {}: {why}", socket.display())]
    Unsupported {
        /// The socket path.
        socket: PathBuf,
        /// What is missing.
        why: String,
    },
    /// Guest RAM that a backend cannot map (no file behind it).
    #[error("guest RAM at {gpa:#x} is not shareable (vhost-user needs memfd-backed memory)")]
    NotShareable {
        /// Start of the region.
        gpa: u64,
    },
    /// An eventfd could not be created.
    #[error("cannot create a vhost-user eventfd: {0}")]
    EventFd(io::Error),
}

#[derive(Debug, Default)]
struct WatchState {
    deadline: Option<std::time::Instant>,
    fired: bool,
    quit: bool,
}

/// Shuts a socket down when an armed exchange outlives its deadline; one thread per device,
/// asleep unless an exchange is in flight.
#[derive(Debug)]
pub struct Watchdog {
    state: Arc<(std::sync::Mutex<WatchState>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Watches `socket` (a handle on the frontend's connection).
    pub fn new(socket: UnixStream) -> io::Result<Self> {
        let state = Arc::new((
            std::sync::Mutex::new(WatchState::default()),
            std::sync::Condvar::new(),
        ));
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-user-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*st;
                let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
                while !g.quit {
                    match g.deadline {
                        None => g = cv.wait(g).unwrap_or_else(|p| p.into_inner()),
                        Some(d) => {
                            let now = std::time::Instant::now();
                            if now >= d {
                                let _ = socket.shutdown(std::net::Shutdown::Both);
                                g.fired = true;
                                g.deadline = None;
                            } else {
                                g = cv
                                    .wait_timeout(g, d - now)
                                    .unwrap_or_else(|p| p.into_inner())
                                    .0;
                            }
                        }
                    }
                }
            })?;
        Ok(Self {
            state,
            thread: Some(thread),
        })
    }

    fn set(&self, deadline: Option<std::time::Instant>) -> bool {
        let (lock, cv) = &*self.state;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        g.deadline = deadline;
        cv.notify_all();
        g.fired
    }

    /// Runs `f` with the deadline armed; `Err(TimedOut)` if the watchdog fired meanwhile.
    pub fn run<T>(&self, timeout: Duration, f: impl FnOnce() -> T) -> io::Result<T> {
        self.set(Some(std::time::Instant::now() + timeout));
        let r = f();
        if self.set(None) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}; connection shut down"),
            ));
        }
        Ok(r)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.state;
            lock.lock().unwrap_or_else(|p| p.into_inner()).quit = true;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One queue as the backend was told about it.
#[derive(Debug, Clone, Copy, Default)]
struct Started {
    running: bool,
}

/// A virtio device whose data plane runs in a vhost-user backend; see the [module docs](self).
pub struct VhostUserDevice {
    kind: VhostUserKind,
    socket: PathBuf,
    fe: Frontend,
    /// A second handle on the socket, only to notice that the backend hung up.
    watch: UnixStream,
    /// Bounds every exchange (see the module docs).
    dog: Watchdog,
    /// Features offered to the guest (backend's, without the vhost-user-only bit).
    avail_features: u64,
    /// Whether the backend offered `VHOST_USER_F_PROTOCOL_FEATURES` (then SET_FEATURES
    /// carries it and rings are enabled with SET_VRING_ENABLE).
    protocol: bool,
    config: bool,
    acked: u64,
    queue_sizes: Vec<u16>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    started: Vec<Started>,
    interrupt: Option<Arc<dyn Interrupt>>,
    failed: bool,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("kind", &self.kind)
            .field("socket", &self.socket)
            .field(
                "avail_features",
                &format_args!("{:#x}", self.avail_features),
            )
            .field("acked", &format_args!("{:#x}", self.acked))
            .field("failed", &self.failed)
            .finish()
    }
}

/// Connects to `socket`, retrying for [`CONNECT_RETRY`] while it does not exist or refuses.
fn connect_socket(socket: &Path) -> io::Result<UnixStream> {
    let start = std::time::Instant::now();
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && start.elapsed() < CONNECT_RETRY =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Flattens a watchdog-bounded exchange: a timeout becomes a broken-socket protocol error.
fn timed<T>(r: io::Result<vhost::Result<T>>) -> vhost::Result<T> {
    r.unwrap_or_else(|e| {
        Err(vhost::Error::VhostUserProtocol(
            vhost::vhost_user::Error::SocketBroken(e),
        ))
    })
}

/// The `SET_MEM_TABLE` entries for `mem`: every region must have a file behind it.
pub fn memory_table(
    mem: &crate::virtio::Memory,
) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserError> {
    mem.iter()
        .map(|r| {
            VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| {
                VhostUserError::NotShareable {
                    gpa: r.start_addr().0,
                }
            })
        })
        .collect()
}

impl VhostUserDevice {
    /// Connects to the backend of `arg`, negotiates the protocol and sends the memory table.
    pub fn connect(arg: &VhostUserArg, mem: &Memory) -> Result<Self, VhostUserError> {
        let socket = arg.socket.clone();
        let table = memory_table(mem)?;
        let connect_err = |source| VhostUserError::Connect {
            socket: socket.clone(),
            source,
        };
        let stream = connect_socket(&socket).map_err(connect_err)?;
        stream
            .set_write_timeout(Some(SOCKET_TIMEOUT))
            .map_err(connect_err)?;
        let watch = stream.try_clone().map_err(connect_err)?;
        let dog = Watchdog::new(stream.try_clone().map_err(connect_err)?).map_err(connect_err)?;
        let queues = arg.kind.queues();
        let mut fe = Frontend::from_stream(stream, queues as u64);
        let proto = |what| {
            let socket = socket.clone();
            move |source| VhostUserError::Protocol {
                socket,
                what,
                source,
            }
        };

        timed(dog.run(SOCKET_TIMEOUT, || fe.set_owner())).map_err(proto("SET_OWNER"))?;
        let features =
            timed(dog.run(SOCKET_TIMEOUT, || fe.get_features())).map_err(proto("GET_FEATURES"))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let protocol = features & protocol_bit != 0;
        let mut config = false;
        if protocol {
            let offered = timed(dog.run(SOCKET_TIMEOUT, || fe.get_protocol_features()))
                .map_err(proto("GET_PROTOCOL_FEATURES"))?;
            let wanted = offered
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK);
            timed(dog.run(SOCKET_TIMEOUT, || fe.set_protocol_features(wanted)))
                .map_err(proto("SET_PROTOCOL_FEATURES"))?;
            if wanted.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every later request is acknowledged: errors surface where they happen.
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            config = wanted.contains(VhostUserProtocolFeatures::CONFIG);
            if wanted.contains(VhostUserProtocolFeatures::MQ) {
                let n = timed(dog.run(SOCKET_TIMEOUT, || fe.get_queue_num()))
                    .map_err(proto("GET_QUEUE_NUM"))?;
                if n < queues as u64 {
                    return Err(VhostUserError::Unsupported {
                        socket,
                        why: format!(
                            "offers {n} queues, a {} device needs {queues}",
                            arg.kind.name()
                        ),
                    });
                }
            }
        }
        timed(dog.run(SOCKET_TIMEOUT, || fe.set_mem_table(&table)))
            .map_err(proto("SET_MEM_TABLE"))?;
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(VhostUserError::EventFd);
        let kicks = (0..queues).map(|_| evt()).collect::<Result<Vec<_>, _>>()?;
        let calls = (0..queues).map(|_| evt()).collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            kind: arg.kind,
            socket,
            fe,
            watch,
            dog,
            avail_features: features & OFFERABLE_FEATURES & !arg.kind.masked_features(),
            protocol,
            config,
            acked: 0,
            queue_sizes: vec![QUEUE_SIZE; queues],
            kicks,
            calls,
            started: vec![Started::default(); queues],
            interrupt: None,
            failed: false,
        })
    }

    /// The queues' kick eventfds (clones), to register as KVM ioeventfds on `QueueNotify`.
    pub fn kick_events(&self) -> io::Result<Vec<EventFd>> {
        self.kicks.iter().map(EventFd::try_clone).collect()
    }

    /// Whether a protocol error or a hang-up stopped the device.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// The device type.
    pub fn kind(&self) -> VhostUserKind {
        self.kind
    }

    /// Runs one protocol step; an error marks the device failed and is returned as io::Error.
    fn step<T>(
        &mut self,
        what: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> io::Result<T> {
        if self.failed {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!(
                    "vhost-user backend {} failed earlier",
                    self.socket.display()
                ),
            ));
        }
        let fe = &mut self.fe;
        let r = match self.dog.run(SOCKET_TIMEOUT, || f(fe)) {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        self.failed = true;
        Err(io::Error::other(format!(
            "vhost-user backend {}: {what} failed: {r}",
            self.socket.display()
        )))
    }

    /// Hands ready queue `i` to the backend.
    fn start_queue(&mut self, mem: &Memory, i: usize, q: &Queue) -> io::Result<()> {
        let hva = |gpa: u64| -> io::Result<u64> {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|e| io::Error::other(format!("queue {i} address {gpa:#x}: {e}")))
        };
        let cfg = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: q.size(),
            flags: 0,
            desc_table_addr: hva(q.desc_table())?,
            used_ring_addr: hva(q.used_ring())?,
            avail_ring_addr: hva(q.avail_ring())?,
            log_addr: None,
        };
        let base = q.next_avail();
        let (Some(call), Some(kick)) = (self.calls.get(i), self.kicks.get(i)) else {
            return Err(io::Error::other(format!("queue {i} does not exist")));
        };
        let (call, kick) = (call.try_clone()?, kick.try_clone()?);
        self.step("SET_VRING_NUM", |fe| fe.set_vring_num(i, cfg.queue_size))?;
        self.step("SET_VRING_ADDR", |fe| fe.set_vring_addr(i, &cfg))?;
        self.step("SET_VRING_BASE", |fe| fe.set_vring_base(i, base))?;
        self.step("SET_VRING_CALL", |fe| fe.set_vring_call(i, &call))?;
        self.step("SET_VRING_KICK", |fe| fe.set_vring_kick(i, &kick))?;
        if self.protocol {
            self.step("SET_VRING_ENABLE", |fe| fe.set_vring_enable(i, true))?;
        }
        if let Some(s) = self.started.get_mut(i) {
            s.running = true;
        }
        Ok(())
    }

    /// Stops every started ring (`GET_VRING_BASE`), as at a reset.
    fn stop_queues(&mut self) {
        for i in 0..self.started.len() {
            if !self.started.get(i).is_some_and(|s| s.running) {
                continue;
            }
            if let Some(s) = self.started.get_mut(i) {
                s.running = false;
            }
            if self.protocol {
                if let Err(e) = self.step("SET_VRING_ENABLE", |fe| fe.set_vring_enable(i, false)) {
                    log::warn!("{e}");
                }
            }
            match self.step("GET_VRING_BASE", |fe| fe.get_vring_base(i)) {
                Ok(base) => log::debug!("vhost-user queue {i} stopped at {base}"),
                Err(e) => log::warn!("{e}"),
            }
        }
    }

    /// Whether the backend closed the socket (a non-blocking peek reads end-of-file).
    fn hung_up(&self) -> bool {
        let mut b = 0u8;
        // SAFETY: `b` is a valid, writable one-byte buffer for the duration of the call and
        // the fd is our own open socket; MSG_PEEK leaves the data for the frontend and
        // MSG_DONTWAIT keeps the call from blocking.
        let n = unsafe {
            libc::recv(
                self.watch.as_raw_fd(),
                (&mut b as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 0
    }
}

impl VirtioDevice<Memory> for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.avail_features;
    }

    fn acked_features(&self) -> u64 {
        self.acked
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let in_range = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= MAX_CONFIG);
        if !self.config || self.failed || !in_range || data.is_empty() {
            return;
        }
        // Frontend is a handle on shared state; a clone talks over the same socket.
        let mut fe = self.fe.clone();
        let zeros = vec![0u8; data.len()];
        let r = self.dog.run(SOCKET_TIMEOUT, || {
            fe.get_config(
                offset as u32,
                data.len() as u32,
                VhostUserConfigFlags::empty(),
                &zeros,
            )
        });
        match timed(r) {
            Ok((_, payload)) => {
                let n = payload.len().min(data.len());
                data[..n].copy_from_slice(&payload[..n]);
            }
            Err(e) => log::warn!(
                "vhost-user backend {}: GET_CONFIG at {offset:#x} failed: {e}",
                self.socket.display()
            ),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let in_range = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= MAX_CONFIG);
        if !self.config || !in_range || data.is_empty() {
            return;
        }
        if let Err(e) = self.step("SET_CONFIG", |fe| {
            fe.set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
        }) {
            log::warn!("{e}");
        }
    }

    fn activate(
        &mut self,
        mem: Memory,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        if self.interrupt.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got: queues.len(),
            });
        }
        let mut features = self.acked;
        if self.protocol {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.step("SET_FEATURES", |fe| fe.set_features(features))
            .map_err(ActivateError::Backend)?;
        self.interrupt = Some(interrupt);
        for (i, q) in queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if let Err(e) = self.start_queue(&mem, i, q) {
                self.interrupt = None;
                return Err(ActivateError::Backend(e));
            }
        }
        log::info!(
            "vhost-user {} ({}): features {:#x}, rings started",
            self.kind.name(),
            self.socket.display(),
            self.acked
        );
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.interrupt.is_some()
    }

    fn queue_notify(&mut self, index: u16) -> Result<(), DeviceError> {
        // A QueueNotify that exited instead of hitting the ioeventfd: forward it.
        self.kicks
            .get(usize::from(index))
            .ok_or(DeviceError::NoSuchQueue(index))?
            .write(1)
            .map_err(DeviceError::Backend)
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.calls.iter().map(|c| c.as_raw_fd()).collect();
        fds.push(self.watch.as_raw_fd());
        fds
    }

    fn backend_event(&mut self, index: usize) -> Result<(), DeviceError> {
        if let Some(call) = self.calls.get(index) {
            // Drain the counter; several calls since the last pass are one interrupt.
            if call.read().is_err() {
                return Ok(());
            }
            let Some(irq) = self.interrupt.as_ref() else {
                return Ok(());
            };
            // index < queue count, which is at most 2.
            return irq
                .trigger(InterruptReason::Queue(index as u16))
                .map_err(DeviceError::Interrupt);
        }
        // The socket: readable outside a request means a hang-up (or a stray message).
        if self.hung_up() {
            self.failed = true;
            return Err(DeviceError::Backend(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!(
                    "vhost-user backend {} closed the connection",
                    self.socket.display()
                ),
            )));
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_queues();
        for c in &self.calls {
            let _ = c.read();
        }
        self.acked = 0;
        self.interrupt = None;
    }

    fn save_state(&self) -> DeviceState {
        // Only reached if a caller bypasses the command-line check: the ring progress lives
        // in the backend, so this state cannot resume the device; restore refuses it.
        DeviceState {
            device_type: self.kind.device_type(),
            acked_features: self.acked,
            activated: false,
            queues: Vec::new(),
            device: Vec::new(),
        }
    }

    fn restore_state(
        &mut self,
        _state: &DeviceState,
        _mem: Memory,
        _interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), StateError> {
        Err(StateError::Device(
            "a vhost-user device cannot be restored: its ring state lives in its backend".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_implemented_transport_features_reach_the_guest() {
        use super::OFFERABLE_FEATURES as F;
        for (bit, offered) in [
            (0, true),   // device-specific
            (23, true),  // device-specific
            (26, false), // VHOST_F_LOG_ALL
            (28, true),  // INDIRECT_DESC
            (29, true),  // EVENT_IDX
            (30, false), // VHOST_USER_F_PROTOCOL_FEATURES
            (32, true),  // VERSION_1
            (33, false), // ACCESS_PLATFORM
            (34, false), // RING_PACKED
            (38, false), // NOTIFICATION_DATA
        ] {
            assert_eq!(F & (1u64 << bit) != 0, offered, "bit {bit}");
        }
    }
}
