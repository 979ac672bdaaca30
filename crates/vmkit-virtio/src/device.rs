//! The [`VirtioDevice`] trait: what every device offers a transport.
//!
//! A virtio device is four things (virtio 1.2, 2): feature bits, a configuration space, a set
//! of virtqueues and a reset. The transport (virtio-mmio in [`crate::mmio`], vhost-user later)
//! owns the *negotiation* — register windows, status state machine, queue addresses — and hands
//! the device its result: the acked features at `FEATURES_OK`, and at `DRIVER_OK` the ready
//! queues, the guest memory and an [`Interrupt`]. From then on the transport only forwards
//! queue notifications.
//!
//! Request processing itself is a free function per device (for example
//! [`crate::block::process_queue`]) taking a `Queue` and a `GuestMemory`, so that a transport
//! which owns its queues differently (vhost-user backends do) can call it directly.
//!
//! [`DeviceCore`] holds the state every device shares (features, queues, memory, interrupt)
//! so each device only adds its own backend.

use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemory};

use crate::chain::{parse_chain, Chain, ChainError};
use crate::features::{feature, VIRTIO_RING_F_EVENT_IDX};
use crate::interrupt::{Interrupt, InterruptReason};
use crate::state::DeviceState;

/// Errors a device returns to its transport. Any of them puts the device in `NEEDS_RESET`.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The driver's queue state is broken beyond one request (e.g. the available index ran more
    /// than a queue size ahead, or the used ring is not writable).
    #[error("queue {queue} is broken: {source}")]
    Queue {
        /// Queue index.
        queue: u16,
        /// What virtio-queue reported.
        source: virtio_queue::Error,
    },
    /// A notification for a queue the device does not have.
    #[error("queue index {0} does not exist")]
    NoSuchQueue(u16),
    /// The device was notified before it was activated.
    #[error("device is not activated")]
    NotActivated,
    /// Raising the interrupt failed.
    #[error("cannot signal the driver: {0}")]
    Interrupt(std::io::Error),
    /// The host-side backend failed in a way that stops the device.
    #[error("backend failure: {0}")]
    Backend(std::io::Error),
}

/// Errors of [`VirtioDevice::activate`].
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up fewer (or more) queues than the device needs.
    #[error("device needs {expected} queues, transport gave {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the transport passed.
        got: usize,
    },
    /// A queue the device cannot work without is not ready.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// The backend could not be started.
    #[error("backend failed to start: {0}")]
    Backend(std::io::Error),
    /// Already active.
    #[error("device is already activated")]
    AlreadyActive,
}

/// Implements the [`VirtioDevice`] methods that every device of this crate answers straight
/// from its [`DeviceCore`] field `core`: queue sizes, feature offer and acknowledgement, and
/// whether it is activated. Devices differ in config space, queue processing and state, not
/// in these.
macro_rules! core_accessors {
    () => {
        fn queue_max_sizes(&self) -> &[u16] {
            &self.core.queue_max_sizes
        }
        fn device_features(&self) -> u64 {
            self.core.avail_features
        }
        fn ack_features(&mut self, features: u64) {
            self.core.acked_features = features & self.core.avail_features;
        }
        fn acked_features(&self) -> u64 {
            self.core.acked_features
        }
        fn is_activated(&self) -> bool {
            self.core.mem.is_some()
        }
    };
}
pub(crate) use core_accessors;

/// A virtio device, independent of the transport that carries it.
///
/// `M` is the guest address space (`&GuestMemoryMmap`, `Arc<GuestMemoryMmap>`,
/// `GuestMemoryAtomic<..>`): any vm-memory implementation works.
pub trait VirtioDevice<M: GuestAddressSpace>: Send {
    /// Device ID (virtio 1.2, 5: 1 = net, 2 = block, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn device_features(&self) -> u64;
    /// Whether the device can work with this feature set (beyond being a subset of the offer),
    /// e.g. virtio-net refuses segmentation offload without checksum offload (5.1.3.1). The
    /// transport leaves FEATURES_OK clear when this returns `false`.
    fn features_acceptable(&self, _features: u64) -> bool {
        true
    }
    /// Records the features the driver accepted; the transport guarantees they are a subset of
    /// [`VirtioDevice::device_features`].
    fn ack_features(&mut self, features: u64);
    /// Features accepted by the driver.
    fn acked_features(&self) -> u64;
    /// Reads the device configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (most fields are read-only and ignore writes).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with its queues (one per [`VirtioDevice::queue_max_sizes`] entry, in
    /// order; queues the driver did not enable have `ready() == false`).
    fn activate(
        &mut self,
        mem: M,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Whether [`VirtioDevice::activate`] succeeded and no reset happened since.
    fn is_activated(&self) -> bool;
    /// The driver notified queue `index`: process what it made available.
    fn queue_notify(&mut self, index: u16) -> Result<(), DeviceError>;
    /// Host file descriptors the event loop should watch for this device (tap, console input).
    fn backend_fds(&self) -> Vec<std::os::unix::io::RawFd> {
        Vec::new()
    }
    /// A backend fd (by position in [`VirtioDevice::backend_fds`]) became ready.
    fn backend_event(&mut self, _index: usize) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Returns the device to its initial state, dropping queues, memory and interrupt.
    fn reset(&mut self);
    /// Saves features, queues and device-specific state.
    fn save_state(&self) -> DeviceState;
    /// Restores a [`VirtioDevice::save_state`] result. If the saved device was active, `mem`
    /// and `interrupt` re-activate it with the saved queues.
    fn restore_state(
        &mut self,
        state: &DeviceState,
        mem: M,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), crate::state::StateError>;
}

/// State shared by every device: features, queues, memory, interrupt.
pub struct DeviceCore<M: GuestAddressSpace> {
    /// Device ID.
    pub device_type: u32,
    /// Offered features.
    pub avail_features: u64,
    /// Accepted features.
    pub acked_features: u64,
    /// Maximum size of each queue.
    pub queue_max_sizes: Vec<u16>,
    /// The queues, once activated.
    pub queues: Vec<Queue>,
    /// Guest memory, once activated.
    pub mem: Option<M>,
    /// Interrupt, once activated.
    pub interrupt: Option<Arc<dyn Interrupt>>,
}

impl<M: GuestAddressSpace> std::fmt::Debug for DeviceCore<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCore")
            .field("device_type", &self.device_type)
            .field("avail_features", &self.avail_features)
            .field("acked_features", &self.acked_features)
            .field("queues", &self.queues)
            .field("activated", &self.mem.is_some())
            .finish()
    }
}

impl<M: GuestAddressSpace> DeviceCore<M> {
    /// A device of type `device_type` offering `avail_features` with these queue sizes.
    pub fn new(device_type: u32, avail_features: u64, queue_max_sizes: Vec<u16>) -> Self {
        Self {
            device_type,
            avail_features,
            acked_features: 0,
            queue_max_sizes,
            queues: Vec::new(),
            mem: None,
            interrupt: None,
        }
    }

    /// Whether the driver accepted feature number `bit`.
    pub fn has_feature(&self, bit: u32) -> bool {
        self.acked_features & feature(bit) != 0
    }

    /// Common part of [`VirtioDevice::activate`]: checks the queue count and the first
    /// `required` queues, enables event-idx if negotiated, stores everything.
    pub fn activate(
        &mut self,
        mem: M,
        mut queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
        required: usize,
    ) -> Result<(), ActivateError> {
        if self.mem.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != self.queue_max_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_max_sizes.len(),
                got: queues.len(),
            });
        }
        if let Some(i) = queues.iter().take(required).position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(i));
        }
        let event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX);
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
        self.queues = queues;
        self.mem = Some(mem);
        self.interrupt = Some(interrupt);
        Ok(())
    }

    /// Common part of [`VirtioDevice::reset`].
    pub fn reset(&mut self) {
        self.acked_features = 0;
        self.queues.clear();
        self.mem = None;
        self.interrupt = None;
    }

    /// Signals the used ring of `queue` if the driver wants a notification.
    pub fn signal_used(&mut self, queue: u16) -> Result<(), DeviceError> {
        let (Some(mem), Some(irq)) = (self.mem.as_ref(), self.interrupt.as_ref()) else {
            return Err(DeviceError::NotActivated);
        };
        let q = self
            .queues
            .get_mut(usize::from(queue))
            .ok_or(DeviceError::NoSuchQueue(queue))?;
        let m = mem.memory();
        let needed = q
            .needs_notification(&*m)
            .map_err(|source| DeviceError::Queue { queue, source })?;
        if needed {
            irq.trigger(InterruptReason::Queue(queue))
                .map_err(DeviceError::Interrupt)?;
        }
        Ok(())
    }

    /// Saves the shared part of the device state.
    pub fn save(&self, device: Vec<u8>) -> DeviceState {
        DeviceState {
            device_type: self.device_type,
            acked_features: self.acked_features,
            activated: self.mem.is_some(),
            queues: self.queues.iter().map(Queue::state).collect(),
            device,
        }
    }

    /// Restores the shared part; returns the queues to activate with if the device was active.
    pub fn restore(
        &mut self,
        state: &DeviceState,
    ) -> Result<Option<Vec<Queue>>, crate::state::StateError> {
        use crate::state::StateError;
        if state.device_type != self.device_type {
            return Err(StateError::DeviceType {
                expected: self.device_type,
                found: state.device_type,
            });
        }
        if state.acked_features & !self.avail_features != 0 {
            return Err(StateError::Features(state.acked_features));
        }
        self.reset();
        self.acked_features = state.acked_features;
        if !state.activated {
            return Ok(None);
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(i, s)| {
                // A queue may be smaller than the device allows, never larger.
                if self
                    .queue_max_sizes
                    .get(i)
                    .is_none_or(|&max| s.max_size > max)
                {
                    return Err(StateError::QueueMaxSize(i, s.max_size));
                }
                Queue::try_from(*s).map_err(|e| StateError::Queue(i, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(queues))
    }
}

/// What happened to one chain taken from a queue.
#[derive(Debug)]
pub enum PoppedChain {
    /// A chain that passed [`parse_chain`].
    Valid(Chain),
    /// A chain that failed validation; its head must still be returned in the used ring.
    Invalid {
        /// Head index of the rejected chain.
        head: u16,
        /// Why it was rejected.
        error: ChainError,
    },
}

/// Takes the next available chain of `queue`, validated.
///
/// Returns `Ok(None)` when the queue is empty and `Err` when the queue itself is broken (the
/// available index ran away), which the caller turns into `NEEDS_RESET`.
pub fn pop_chain<MM: GuestMemory>(
    queue: &mut Queue,
    mem: &MM,
) -> Result<Option<PoppedChain>, virtio_queue::Error> {
    let max = usize::from(queue.size());
    let Some(chain) = queue.iter(mem)?.next() else {
        return Ok(None);
    };
    let head = chain.head_index();
    Ok(Some(match parse_chain(chain, max) {
        Ok(c) => PoppedChain::Valid(c),
        Err(error) => {
            log::warn!("rejecting descriptor chain: {error}");
            PoppedChain::Invalid { head, error }
        }
    }))
}

/// Asks the driver to notify once it adds buffers beyond those available *now*, for a device
/// that is waiting for more room (net RX holding a frame that did not fit).
///
/// `Queue::enable_notification` would set `avail_event` to the device's `next_avail`, which
/// for a device that put chains back lies *behind* the driver's index, so the driver would
/// never kick. Returns `true` if buffers arrived while arming (the caller retries).
pub fn notify_on_new_buffers<MM: GuestMemory>(
    queue: &mut Queue,
    mem: &MM,
) -> Result<bool, virtio_queue::Error> {
    use std::sync::atomic::{fence, Ordering};
    use vm_memory::{Address, Bytes, GuestAddress};
    if !queue.event_idx_enabled() {
        // Without event-idx the driver kicks on every addition unless NO_NOTIFY is set.
        queue.enable_notification(mem)?;
        return Ok(false);
    }
    let idx = queue.avail_idx(mem, Ordering::Acquire)?;
    // avail_event sits after the used ring's flags, idx and `size` 8-byte elements.
    let addr = GuestAddress(queue.used_ring())
        .checked_add(4 + 8 * u64::from(queue.size()))
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    mem.store(u16::to_le(idx.0), addr, Ordering::Relaxed)
        .map_err(virtio_queue::Error::GuestMemory)?;
    fence(Ordering::SeqCst);
    Ok(queue.avail_idx(mem, Ordering::Acquire)? != idx)
}

/// Reads `data.len()` bytes of a config space image at `offset`; bytes outside read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}
