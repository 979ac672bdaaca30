//! The generic adapter: one [`VirtioDevice`] plus its request loop, served as a vhost-user
//! backend.
//!
//! # Who owns what
//!
//! In process, a transport (virtio-mmio) owns the registers and hands the device its queues at
//! `DRIVER_OK` through [`VirtioDevice::activate`]. Over vhost-user the split is different: the
//! *frontend* (QEMU, Cloud Hypervisor) owns the transport and the negotiation, and sends the
//! result as messages; [`vhost_user_backend`]'s handler turns those messages into
//! [`VringRwLock`]s that own each [`Queue`] (size, ring addresses, `next_avail`), its kick
//! eventfd and its call eventfd. The queues therefore never move into the device. Instead
//! [`VirtioBackend`] splits a device in two halves:
//!
//! * the **control plane** is the vmkit [`VirtioDevice`] itself, behind a mutex: device type,
//!   offered features, the acked features (`SET_FEATURES`), the configuration space
//!   (`GET_CONFIG`/`SET_CONFIG`) and reset (`RESET_DEVICE`, end of a connection);
//! * the **data plane** is a [`QueueHandler`] that calls the device's own request loop (for
//!   example [`vmkit_virtio::block::process_queue`]) on the queue borrowed from the vring.
//!   This is the same function the in-process device runs on its own queues: no device logic
//!   exists twice.
//!
//! # Memory
//!
//! `SET_MEM_TABLE` / `ADD_MEM_REG` / `REM_MEM_REG` carry memfd/shm file descriptors; the
//! handler maps them into a new `GuestMemoryMmap` and swaps it into the shared
//! [`GuestMemoryAtomic`]. [`VirtioBackend::update_memory`] keeps that atomic, and every queue run
//! takes one snapshot (`memory()`) for its whole duration, so a table update never changes
//! the mapping under a request in flight: the old regions stay mapped until the last snapshot
//! of them is dropped.
//!
//! # Kicks and interrupts
//!
//! * A guest notification (virtio-pci `QueueNotify`) makes the frontend (or KVM, through an
//!   ioeventfd) write the vring's **kick** eventfd. A worker thread of vhost-user-backend waits
//!   on it with epoll and calls [`VhostUserBackend::handle_event`], which runs the queue.
//! * Where the in-process device would call [`vmkit_virtio::Interrupt::trigger`] with
//!   `InterruptReason::Queue(n)`, the adapter writes the vring's **call** eventfd (the
//!   frontend registered it as a KVM irqfd or polls it), after asking the queue whether the
//!   driver wants a notification at all (`VIRTIO_F_EVENT_IDX`, `VRING_AVAIL_F_NO_INTERRUPT`).
//! * While a queue is being drained, notifications are suppressed and re-enabled afterwards;
//!   if buffers arrived in between, the loop runs again, so no kick is lost.
//! * Virtio-net publishes a frame merged over several receive buffers with one used-index
//!   update and must then interrupt regardless of suppression: handlers say so with
//!   [`Notify::Always`].
//! * Host fds (a TAP, console input) join the worker's epoll set under tokens above the queue
//!   tokens; when one becomes readable the handler names the queues to run
//!   ([`QueueHandler::backend_event`]).
//! * A configuration-change interrupt would travel as a `CONFIG_CHANGE_MSG` on the backend
//!   request channel; none of the served devices changes its configuration at run time.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmkit_virtio::features::{DEVICE_ID_NET, DEVICE_ID_RNG};
use vmkit_virtio::VirtioDevice;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Guest memory as the backend sees it: the regions the frontend shared, swappable at run time.
pub type GuestMemoryShared = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The configuration space a frontend may read is at most this long (vhost-user spec, 256).
pub const MAX_CONFIG_LEN: u32 = 256;

/// Errors of the adapter's data plane.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The driver's queue is broken beyond one request; the queue stops until a reset.
    #[error("queue {queue} is broken: {source}")]
    Queue {
        /// Queue index.
        queue: u16,
        /// What virtio-queue reported.
        source: virtio_queue::Error,
    },
    /// Writing the call eventfd failed.
    #[error("cannot signal queue {queue} to the frontend: {source}")]
    Signal {
        /// Queue index.
        queue: u16,
        /// The OS error.
        source: io::Error,
    },
    /// An epoll event that names no queue of this worker thread.
    #[error("event {event} on worker thread {thread} names no queue")]
    UnknownEvent {
        /// The epoll token.
        event: u16,
        /// The worker thread.
        thread: usize,
    },
}

/// What a queue run asks of the interrupt path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    /// No buffer was returned to the driver.
    Nothing,
    /// Buffers were returned: interrupt if the driver wants it (event-idx, NO_INTERRUPT).
    IfNeeded,
    /// Interrupt regardless of suppression (several used entries were published at once, as
    /// virtio-net does for a frame merged over several buffers).
    Always,
}

impl Notify {
    /// [`Notify::IfNeeded`] if `used`, [`Notify::Nothing`] otherwise.
    pub fn used(used: bool) -> Self {
        if used {
            Self::IfNeeded
        } else {
            Self::Nothing
        }
    }

    fn merge(self, other: Self) -> Self {
        match (self, other) {
            (Self::Always, _) | (_, Self::Always) => Self::Always,
            (Self::IfNeeded, _) | (_, Self::IfNeeded) => Self::IfNeeded,
            _ => Self::Nothing,
        }
    }
}

/// The data-plane half of a device: runs the device's request loop on a queue it does not own.
///
/// Implementations call the device's free request-loop function (the one its
/// [`VirtioDevice::queue_notify`] also calls) with the host-side resources they hold (an image
/// file, an entropy source, a TAP device).
pub trait QueueHandler: Send + Sync + 'static {
    /// Processes every available buffer of queue `index`. `acked_features` are the features
    /// the driver accepted.
    ///
    /// # Errors
    /// A `virtio_queue::Error` when the queue itself is broken (the device would need a reset).
    fn process_queue(
        &self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap<()>,
        acked_features: u64,
    ) -> Result<Notify, virtio_queue::Error>;

    /// The driver accepted `acked` (e.g. a TAP device adjusts its offloads).
    fn features_acked(&self, _acked: u64) {}

    /// Host file descriptors whose readability means work for the device (TAP, console
    /// input). They are watched edge-triggered: after an event the handler must read until
    /// the fd would block or remember that input is left (and consume it on the next run).
    fn backend_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Backend fd number `index` (position in [`QueueHandler::backend_fds`]) became readable.
    /// Returns the queues to run now (e.g. the receive queue).
    fn backend_event(&self, _index: usize) -> Vec<u16> {
        Vec::new()
    }

    /// Queue `index` holds input that found too few buffers (e.g. a received frame larger
    /// than the receive buffers the driver posted). After such a run the adapter asks the
    /// driver to notify on the next buffer it adds, even though buffers are still available.
    fn starved(&self, _index: u16) -> bool {
        false
    }

    /// Makes completed requests durable (a block device flushes its image). Called when a
    /// frontend disconnects and before the daemon exits.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Queues-to-threads layouts of [`VirtioBackend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threading {
    /// One worker thread serves every queue.
    Single,
    /// One worker thread per queue (requests of different queues run in parallel).
    PerQueue,
}

/// A vmkit [`VirtioDevice`] and its [`QueueHandler`], implementing vhost-user-backend's
/// [`VhostUserBackend`]. Share it as `Arc<VirtioBackend<H>>` with a `VhostUserDaemon`.
pub struct VirtioBackend<H: QueueHandler> {
    name: &'static str,
    control: Mutex<Box<dyn VirtioDevice<GuestMemoryShared>>>,
    handler: H,
    num_queues: usize,
    max_queue_size: usize,
    features: u64,
    acked: AtomicU64,
    event_idx: AtomicBool,
    mem: RwLock<Option<GuestMemoryShared>>,
    broken: Vec<AtomicBool>,
    threading: Threading,
    has_config: bool,
    early_enable_shim: bool,
}

impl<H: QueueHandler> std::fmt::Debug for VirtioBackend<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBackend")
            .field("name", &self.name)
            .field("num_queues", &self.num_queues)
            .field("max_queue_size", &self.max_queue_size)
            .field("features", &format_args!("{:#x}", self.features))
            .field("acked", &format_args!("{:#x}", self.acked_features()))
            .finish()
    }
}

impl<H: QueueHandler> VirtioBackend<H> {
    /// Serves `device` (control plane) with `handler` (data plane). `name` appears in logs.
    pub fn new(
        name: &'static str,
        device: Box<dyn VirtioDevice<GuestMemoryShared>>,
        handler: H,
        threading: Threading,
    ) -> Self {
        // virtio-rng has no configuration space, and QEMU's vhost-user netdev keeps net's
        // itself (it warns when a net backend offers CONFIG).
        let has_config = !matches!(device.device_type(), DEVICE_ID_RNG | DEVICE_ID_NET);
        let sizes = device.queue_max_sizes();
        let num_queues = sizes.len();
        let max_queue_size = usize::from(sizes.iter().copied().max().unwrap_or(0));
        // The frontend learns that vhost-user protocol features exist from this bit.
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        // QEMU's vhost-user netdev enables rings before SET_FEATURES; see early_enable.rs.
        let early_enable_shim = device.device_type() == DEVICE_ID_NET;
        let features = device.device_features() | protocol;
        Self {
            name,
            control: Mutex::new(device),
            handler,
            num_queues,
            max_queue_size,
            features,
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            broken: (0..num_queues).map(|_| AtomicBool::new(false)).collect(),
            threading,
            has_config,
            early_enable_shim,
        }
    }

    /// Whether [`crate::daemon::serve`] puts the [`crate::early_enable`] shim between the
    /// frontend and the request handler (virtio-net, for QEMU's netdev).
    pub fn needs_early_enable_shim(&self) -> bool {
        self.early_enable_shim
    }

    /// The data-plane half.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// The device name used in logs.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Features the driver accepted (without the vhost-user transport bit).
    pub fn acked_features(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// Runs `f` on the control-plane device.
    pub fn with_device<R>(
        &self,
        f: impl FnOnce(&mut dyn VirtioDevice<GuestMemoryShared>) -> R,
    ) -> R {
        let mut guard = self.control.lock().unwrap_or_else(|p| p.into_inner());
        f(guard.as_mut())
    }

    /// Returns the device to its initial state (a frontend disconnected or reset it).
    pub fn reset(&self) {
        self.with_device(|d| d.reset());
        self.acked.store(0, Ordering::Release);
        self.event_idx.store(false, Ordering::Release);
        for b in &self.broken {
            b.store(false, Ordering::Release);
        }
    }

    /// Flushes the data plane (see [`QueueHandler::flush`]).
    pub fn flush(&self) -> io::Result<()> {
        self.handler.flush()
    }

    /// Queue index (device-wide) of the `local`-th queue served by worker `thread`.
    fn global_queue(&self, thread: usize, local: u16) -> Option<u16> {
        let mask = *self.queues_per_thread().get(thread)?;
        (0..self.num_queues)
            .filter(|q| (mask >> q) & 1 == 1)
            .nth(usize::from(local))
            .and_then(|q| u16::try_from(q).ok())
    }

    /// Position of device queue `queue` among the queues of worker `thread`.
    fn local_queue(&self, thread: usize, queue: u16) -> Option<usize> {
        let mask = *self.queues_per_thread().get(thread)?;
        if (mask >> queue) & 1 == 0 {
            return None;
        }
        Some(
            (0..usize::from(queue))
                .filter(|q| (mask >> q) & 1 == 1)
                .count(),
        )
    }

    /// The epoll token under which backend fd `index` is registered.
    pub fn backend_token(&self, index: usize) -> u64 {
        (self.num_queues + 1 + index) as u64
    }

    /// Drains queue `index` through the handler, then signals the driver if it asked for it.
    fn run_queue(
        &self,
        index: u16,
        vring: &VringRwLock<GuestMemoryShared>,
    ) -> Result<(), BackendError> {
        let Some(broken) = self.broken.get(usize::from(index)) else {
            return Ok(());
        };
        if broken.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(atomic) = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone() else {
            // No memory table yet: nothing can be read from the rings.
            return Ok(());
        };
        // A snapshot per pass (below): a concurrent table update cannot unmap what a pass
        // is using, and buffers the driver publishes after an update (memory hot-plug) are
        // read with the new table by the next pass rather than a stale one.
        let mut mem = atomic.memory();
        let acked = self.acked_features();
        let mut state = vring.get_mut();
        if !state.is_enabled() {
            // Backend events (TAP input) may arrive while the frontend has the ring disabled.
            return Ok(());
        }
        let queue = state.get_queue_mut();
        if !queue.ready() {
            return Ok(());
        }
        let qerr = |source| BackendError::Queue {
            queue: index,
            source,
        };
        let result = (|| {
            let mut notify = Notify::Nothing;
            loop {
                mem = atomic.memory();
                queue.disable_notification(&*mem).map_err(qerr)?;
                let before = queue.next_avail();
                let n = self.handler.process_queue(index, queue, &mem, acked);
                notify = notify.merge(n.map_err(qerr)?);
                // Re-arm notifications; if the driver added buffers meanwhile, go again. A
                // run that took nothing (a receive queue with buffers but no input) must not
                // spin on the buffers it left: the next input event runs it again.
                let progressed = queue.next_avail() != before;
                if queue.enable_notification(&*mem).map_err(qerr)? && progressed {
                    continue;
                }
                // Input left over for lack of buffers: the buffers the driver already posted
                // are not enough, so make its *next* buffer kick us (with event-idx, the
                // re-armed notification above only fires for buffers past `next_avail`,
                // which the driver has already published).
                let starved = self.handler.starved(index);
                if starved && kick_on_next_buffer(queue, &mem).map_err(qerr)? {
                    continue;
                }
                break;
            }
            match notify {
                Notify::Nothing => Ok(false),
                // Still consulted, so the queue's event-idx bookkeeping stays in step.
                Notify::Always => queue.needs_notification(&*mem).map(|_| true).map_err(qerr),
                Notify::IfNeeded => queue.needs_notification(&*mem).map_err(qerr),
            }
        })();
        match result {
            Ok(true) => state
                .signal_used_queue()
                .map_err(|source| BackendError::Signal {
                    queue: index,
                    source,
                }),
            Ok(false) => Ok(()),
            Err(e) => {
                // Stop this queue (the in-process transport would set DEVICE_NEEDS_RESET);
                // other queues and the connection keep working.
                broken.store(true, Ordering::Release);
                Err(e)
            }
        }
    }
}

/// Asks the driver to notify the device when it publishes its next available buffer, whatever
/// the device has consumed: with `VIRTIO_F_EVENT_IDX` the available-event index becomes the
/// driver's current available index (without it, notifications are simply enabled). Returns
/// whether the driver published buffers meanwhile (then it may not notify: run the queue again).
fn kick_on_next_buffer(
    queue: &mut Queue,
    mem: &GuestMemoryMmap<()>,
) -> Result<bool, virtio_queue::Error> {
    let consumed = queue.next_avail();
    let published = queue.avail_idx(mem, Ordering::Acquire)?.0;
    // `enable_notification` publishes `next_avail` as the available event and re-reads the
    // available index after a full fence: borrow it with the driver's index.
    queue.set_next_avail(published);
    let more = queue.enable_notification(mem);
    queue.set_next_avail(consumed);
    more
}

impl<H: QueueHandler> VhostUserBackend for VirtioBackend<H> {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMemoryShared>;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        let device = features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.with_device(|d| d.ack_features(device));
        let acked = self.with_device(|d| d.acked_features());
        log::info!("{}: driver accepted features {acked:#x}", self.name);
        self.acked.store(acked, Ordering::Release);
        self.handler.features_acked(acked);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let base = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if self.has_config {
            base | VhostUserProtocolFeatures::CONFIG
        } else {
            base
        }
    }

    fn reset_device(&self) {
        log::info!("{}: device reset by the frontend", self.name);
        if let Err(e) = self.flush() {
            log::error!("{}: flush at reset failed: {e}", self.name);
        }
        self.reset();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut buf = vec![0u8; size.min(MAX_CONFIG_LEN) as usize];
        self.with_device(|d| d.read_config(u64::from(offset), &mut buf));
        buf
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.with_device(|d| d.write_config(u64::from(offset), buf));
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryShared) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let all = if self.num_queues >= 64 {
            u64::MAX
        } else {
            (1u64 << self.num_queues) - 1
        };
        match self.threading {
            Threading::Single => vec![all],
            Threading::PerQueue => (0..self.num_queues.min(64)).map(|q| 1u64 << q).collect(),
        }
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                log::error!("{}: cannot create an exit eventfd: {e}", self.name);
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        log::trace!("{}: event {device_event} on worker {thread_id}", self.name);
        if !evset.contains(EventSet::IN) {
            log::warn!("{}: unexpected event set {evset:?}", self.name);
        }
        // Tokens above the queues (and the library's own exit/enable token) are backend fds.
        if let Some(fd_index) = usize::from(device_event).checked_sub(self.num_queues + 1) {
            for q in self.handler.backend_event(fd_index) {
                let Some(vring) = self.local_queue(thread_id, q).and_then(|l| vrings.get(l)) else {
                    continue;
                };
                if let Err(e) = self.run_queue(q, vring) {
                    log::error!("{}: {e}", self.name);
                }
            }
            return Ok(());
        }
        let (Some(vring), Some(index)) = (
            vrings.get(usize::from(device_event)),
            self.global_queue(thread_id, device_event),
        ) else {
            let e = BackendError::UnknownEvent {
                event: device_event,
                thread: thread_id,
            };
            log::warn!("{}: {e}", self.name);
            return Ok(());
        };
        if let Err(e) = self.run_queue(index, vring) {
            // A broken queue is the driver's fault; the daemon keeps serving.
            log::error!("{}: {e}", self.name);
        }
        Ok(())
    }
}
