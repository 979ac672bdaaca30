//! The virtio-mmio transport, version 2 ("modern"), virtio 1.2 section 4.2.
//!
//! [`MmioTransport`] is a bus device: the VMM forwards guest loads and stores inside the
//! device's 0x200-byte window to [`MmioTransport::read`] / [`MmioTransport::write`] (or through
//! vm-device's [`MutDeviceMmio`]). It owns the negotiation and hands the result to a
//! [`VirtioDevice`]:
//!
//! * **Identification**: `MagicValue` ("virt"), `Version` 2, `DeviceID`, `VendorID`.
//! * **Features**: 32-bit windows selected by `DeviceFeaturesSel` / `DriverFeaturesSel`. The
//!   driver may write any bits; at `FEATURES_OK` the transport checks them: bits outside the
//!   offer, or a missing `VIRTIO_F_VERSION_1`, and `FEATURES_OK` stays clear (2.2.2, the driver
//!   re-reads the status to find out).
//! * **Status** (2.1): bits are only ever added, in the order ACKNOWLEDGE, DRIVER,
//!   FEATURES_OK, DRIVER_OK; a write that clears a bit or skips a step is ignored; writing 0
//!   resets the device. FAILED may be set at any time and freezes the device until reset.
//!   When the device fails (activation error, broken queue) the transport sets
//!   DEVICE_NEEDS_RESET and raises a configuration interrupt (2.1.2).
//! * **Queues**: `QueueSel` picks a queue; `QueueNumMax` reads 0 for queues that do not exist.
//!   `QueueNum`, the three addresses and `QueueReady` are writable only between FEATURES_OK and
//!   DRIVER_OK and only while the queue is not ready; a size that is zero, not a power of two or
//!   over the maximum is ignored, and `QueueReady = 1` is refused unless size and addresses form
//!   a valid ring inside guest memory.
//! * **Notification**: `QueueNotify` (or the per-queue [`EventFd`] registered as a KVM
//!   ioeventfd on that register, see [`MmioTransport::queue_events`]) runs the device's queue
//!   processing.
//! * **Interrupts**: `InterruptStatus` / `InterruptACK` and `ConfigGeneration` live in
//!   [`MmioInterrupt`]; the line is any [`IrqTrigger`] (a KVM irqfd, a callback).
//! * Shared memory regions: none; `SHMLen` reads all ones as the spec requires for a missing
//!   region. `QueueReset` (VIRTIO_F_RING_RESET) is not offered and reads 0.
//!
//! Register accesses below 0x100 must be aligned 32-bit accesses (4.2.2.2); others read as 0
//! and are ignored on write. The configuration space at 0x100 accepts any width.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::VirtioDevice;
use crate::features::*;
use crate::interrupt::{Interrupt, InterruptReason, IrqTrigger, MmioInterrupt};
use crate::state::{ByteReader, DeviceState, StateError};

/// `MagicValue`: "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// `Version` of the modern virtio-mmio layout.
pub const MMIO_VERSION: u32 = 2;
/// Size of the register window of one device.
pub const MMIO_WINDOW_SIZE: u64 = 0x200;
/// Vendor ID reported by default ("VMKT").
pub const DEFAULT_VENDOR_ID: u32 = 0x544b_4d56;

/// Register offsets (virtio 1.2, 4.2.2).
#[allow(missing_docs)]
pub mod regs {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const QUEUE_RESET: u64 = 0x0c0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue eventfd could not be created.
    #[error("cannot create queue eventfd: {0}")]
    EventFd(std::io::Error),
    /// The device reports a queue maximum size the queue implementation refuses.
    #[error("device queue {index} has invalid maximum size {max}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// The size.
        max: u16,
    },
}

/// A virtio device behind the virtio-mmio register layout.
pub struct MmioTransport<M: GuestAddressSpace> {
    device: Box<dyn VirtioDevice<M>>,
    mem: M,
    vendor_id: u32,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    shm_sel: u32,
    queues: Vec<Queue>,
    /// Raw address registers as the driver wrote them; validated at `QueueReady` so a
    /// misaligned or out-of-memory address refuses the queue instead of leaving a stale one.
    queue_addrs: Vec<[u64; 3]>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<MmioInterrupt>,
}

impl<M: GuestAddressSpace> std::fmt::Debug for MmioTransport<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("queues", &self.queues)
            .finish()
    }
}

impl<M: GuestAddressSpace> MmioTransport<M> {
    /// Wraps `device`; `irq` is the device's interrupt line (an irqfd `EventFd`, a callback).
    pub fn new(
        device: Box<dyn VirtioDevice<M>>,
        mem: M,
        irq: Box<dyn IrqTrigger>,
    ) -> Result<Self, MmioError> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for (index, &max) in device.queue_max_sizes().iter().enumerate() {
            queues.push(Queue::new(max).map_err(|_| MmioError::QueueMaxSize { index, max })?);
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(Self {
            device,
            mem,
            vendor_id: DEFAULT_VENDOR_ID,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            shm_sel: 0,
            queue_addrs: vec![[0; 3]; queues.len()],
            queues,
            queue_evts,
            interrupt: Arc::new(MmioInterrupt::new(irq)),
        })
    }

    /// Replaces the `VendorID` value.
    pub fn with_vendor_id(mut self, vendor_id: u32) -> Self {
        self.vendor_id = vendor_id;
        self
    }

    /// One eventfd per queue. Register queue `i`'s with KVM as an ioeventfd on
    /// `base + 0x50` with datamatch `i` (32 bits) so notifications skip the VMM exit path;
    /// the event loop (see [`crate::event_handler`]) then calls
    /// [`MmioTransport::process_queue_event`].
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt state (`InterruptStatus`, `ConfigGeneration`).
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The wrapped device.
    pub fn device(&self) -> &dyn VirtioDevice<M> {
        self.device.as_ref()
    }

    /// The wrapped device, mutably (backend events from the event loop).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice<M> {
        self.device.as_mut()
    }

    /// Whether the device is live: DRIVER_OK set, neither FAILED nor NEEDS_RESET.
    pub fn is_running(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
            && self.status & (STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET) == 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK (4.2.3.2).
    fn queue_setup_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0
            && self.status & (STATUS_DRIVER_OK | STATUS_FAILED) == 0
    }

    /// Puts the device in NEEDS_RESET and tells the driver through a config interrupt.
    pub fn set_needs_reset(&mut self) {
        if self.status & STATUS_DEVICE_NEEDS_RESET != 0 {
            return;
        }
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        if self.status & STATUS_DRIVER_OK != 0 {
            if let Err(e) = self.interrupt.trigger(InterruptReason::Config) {
                log::error!("cannot signal NEEDS_RESET: {e}");
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.shm_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        for a in &mut self.queue_addrs {
            *a = [0; 3];
        }
        self.interrupt.clear();
    }

    /// The driver wrote `value` to `Status`.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if self.status & STATUS_FAILED != 0 {
            return;
        }
        if value & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
            return;
        }
        // NEEDS_RESET is the device's bit: the driver echoing it back is not a change.
        let current = self.status & !STATUS_DEVICE_NEEDS_RESET;
        let value = value & !STATUS_DEVICE_NEEDS_RESET;
        if value & current != current {
            log::warn!(
                "virtio-mmio: driver tried to clear status bits ({current:#x} -> {value:#x})"
            );
            return;
        }
        let new = value & !current;
        for (bit, needs) in [
            (STATUS_ACKNOWLEDGE, 0),
            (STATUS_DRIVER, STATUS_ACKNOWLEDGE),
            (STATUS_FEATURES_OK, STATUS_DRIVER),
            (STATUS_DRIVER_OK, STATUS_FEATURES_OK),
        ] {
            if new & bit == 0 {
                continue;
            }
            if self.status & needs != needs {
                log::warn!("virtio-mmio: status bit {bit:#x} set out of order");
                return;
            }
            match bit {
                STATUS_FEATURES_OK => {
                    if !self.features_acceptable() {
                        return;
                    }
                    self.device.ack_features(self.driver_features);
                }
                STATUS_DRIVER_OK => {
                    self.status |= bit;
                    self.activate();
                    continue;
                }
                _ => {}
            }
            self.status |= bit;
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.device_features() | feature(VIRTIO_F_VERSION_1);
        if self.driver_features & !offered != 0 {
            log::warn!(
                "virtio-mmio: driver acked features {:#x} outside the offer {offered:#x}",
                self.driver_features
            );
            return false;
        }
        // A version 2 transport only carries modern devices (4.2.4).
        self.driver_features & feature(VIRTIO_F_VERSION_1) != 0
            && self.device.features_acceptable(self.driver_features)
    }

    fn activate(&mut self) {
        // Queue is not Clone; its state round-trip is the supported way to copy it.
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let queues = match queues {
            Ok(q) => q,
            Err(e) => {
                log::error!("virtio-mmio: cannot hand queues to the device: {e}");
                self.set_needs_reset();
                return;
            }
        };
        let irq: Arc<dyn Interrupt> = self.interrupt.clone();
        if let Err(e) = self.device.activate(self.mem.clone(), queues, irq) {
            log::error!("virtio-mmio: activation failed: {e}");
            self.set_needs_reset();
        }
    }

    /// Runs the device's processing for queue `index` (a `QueueNotify` write or an ioeventfd).
    /// Notifications for missing or not-ready queues, or while the device is not running, are
    /// ignored; a device error sets NEEDS_RESET.
    pub fn notify_queue(&mut self, index: u32) {
        if !self.is_running() {
            return;
        }
        let ready = self.queues.get(index as usize).is_some_and(|q| q.ready());
        if !ready {
            return;
        }
        // index < queues.len() <= u16::MAX + 1 queues is not possible: queue counts are small.
        if let Err(e) = self.device.queue_notify(index as u16) {
            log::error!("virtio-mmio: device failed: {e}");
            self.set_needs_reset();
        }
    }

    /// Drains queue `index`'s eventfd and processes the queue (the ioeventfd path).
    pub fn process_queue_event(&mut self, index: usize) {
        if let Some(evt) = self.queue_evts.get(index) {
            let _ = evt.read();
            self.notify_queue(index as u32);
        }
    }

    /// A backend file descriptor of the device became readable/writable.
    pub fn process_backend_event(&mut self, index: usize) {
        if !self.is_running() {
            return;
        }
        if let Err(e) = self.device.backend_event(index) {
            log::error!("virtio-mmio: device backend failed: {e}");
            self.set_needs_reset();
        }
    }

    /// Which address (0 desc, 1 driver, 2 device) and half (false low, true high) `offset` is.
    fn addr_reg(offset: u64) -> Option<(usize, bool)> {
        match offset {
            regs::QUEUE_DESC_LOW => Some((0, false)),
            regs::QUEUE_DESC_HIGH => Some((0, true)),
            regs::QUEUE_DRIVER_LOW => Some((1, false)),
            regs::QUEUE_DRIVER_HIGH => Some((1, true)),
            regs::QUEUE_DEVICE_LOW => Some((2, false)),
            regs::QUEUE_DEVICE_HIGH => Some((2, true)),
            _ => None,
        }
    }

    fn read_queue_addr(&self, offset: u64) -> u32 {
        let Some((which, high)) = Self::addr_reg(offset) else {
            return 0;
        };
        let Some(a) = self.queue_addrs.get(self.queue_sel as usize) else {
            return 0;
        };
        if high {
            (a[which] >> 32) as u32
        } else {
            a[which] as u32
        }
    }

    /// Validates and applies the address registers of the selected queue, then readies it.
    fn ready_selected_queue(&mut self) -> bool {
        let sel = self.queue_sel as usize;
        let (Some(q), Some(a)) = (self.queues.get_mut(sel), self.queue_addrs.get(sel)) else {
            return false;
        };
        let ok = q.try_set_desc_table_address(GuestAddress(a[0])).is_ok()
            && q.try_set_avail_ring_address(GuestAddress(a[1])).is_ok()
            && q.try_set_used_ring_address(GuestAddress(a[2])).is_ok();
        if !ok {
            return false;
        }
        q.set_ready(true);
        // is_valid checks size and alignment and that all three rings are inside guest memory.
        if !q.is_valid(&*self.mem.memory()) {
            q.set_ready(false);
            return false;
        }
        true
    }

    /// Handles a guest load at `offset` inside the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            self.device.read_config(offset - regs::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            log::warn!(
                "virtio-mmio: bad register read at {offset:#x} size {}",
                data.len()
            );
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            regs::MAGIC_VALUE => MMIO_MAGIC,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.device.device_type(),
            regs::VENDOR_ID => self.vendor_id,
            regs::DEVICE_FEATURES => {
                let f = self.device.device_features() | feature(VIRTIO_F_VERSION_1);
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            regs::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            regs::QUEUE_NUM => self.selected_queue().map_or(0, |q| u32::from(q.size())),
            regs::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => self.status,
            regs::QUEUE_DESC_LOW..=regs::QUEUE_DEVICE_HIGH => self.read_queue_addr(offset),
            // No shared memory regions: length all ones means "does not exist" (4.2.2).
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH => u32::MAX,
            regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => u32::MAX,
            regs::SHM_SEL => self.shm_sel,
            regs::QUEUE_RESET => 0,
            regs::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                log::warn!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Handles a guest store at `offset` inside the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            // The config space is writable only once the driver knows the device.
            if self.status & STATUS_DRIVER != 0 && self.status & STATUS_FAILED == 0 {
                self.device.write_config(offset - regs::CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::warn!(
                "virtio-mmio: bad register write at {offset:#x} size {}",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            log::warn!("virtio-mmio: unaligned register write at {offset:#x}");
            return;
        }
        let v = u32::from_le_bytes(bytes);
        let setup = self.queue_setup_allowed();
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES => {
                if self.status & STATUS_DRIVER != 0
                    && self.status & (STATUS_FEATURES_OK | STATUS_FAILED) == 0
                {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        // Bits beyond 63 do not exist: a set bit there is outside the offer
                        // and poisons FEATURES_OK.
                        _ if v != 0 => self.driver_features |= feature(63) | feature(62),
                        _ => {}
                    }
                } else {
                    log::warn!(
                        "virtio-mmio: DriverFeatures written in status {:#x}",
                        self.status
                    );
                }
            }
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_NUM
            | regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_DRIVER_LOW
            | regs::QUEUE_DRIVER_HIGH
            | regs::QUEUE_DEVICE_LOW
            | regs::QUEUE_DEVICE_HIGH => {
                if !setup {
                    log::warn!(
                        "virtio-mmio: queue register {offset:#x} written in status {:#x}",
                        self.status
                    );
                    return;
                }
                let sel = self.queue_sel as usize;
                let Some(q) = self.queues.get_mut(sel) else {
                    return;
                };
                if q.ready() {
                    log::warn!("virtio-mmio: queue register {offset:#x} written while ready");
                    return;
                }
                if offset == regs::QUEUE_NUM {
                    // try_set_size refuses 0, non powers of two and sizes over the maximum.
                    let ok = u16::try_from(v).is_ok_and(|size| q.try_set_size(size).is_ok());
                    if !ok {
                        log::warn!("virtio-mmio: refused queue size {v}");
                    }
                } else if let (Some((which, high)), Some(a)) =
                    (Self::addr_reg(offset), self.queue_addrs.get_mut(sel))
                {
                    a[which] = if high {
                        (a[which] & 0xffff_ffff) | (u64::from(v) << 32)
                    } else {
                        (a[which] & !0xffff_ffff) | u64::from(v)
                    };
                }
            }
            regs::QUEUE_READY => {
                if !setup {
                    log::warn!(
                        "virtio-mmio: QueueReady written in status {:#x}",
                        self.status
                    );
                    return;
                }
                match v {
                    0 => {
                        if let Some(q) = self.selected_queue() {
                            q.set_ready(false);
                        }
                    }
                    1 => {
                        if !self.ready_selected_queue() {
                            log::warn!("virtio-mmio: refused QueueReady for an invalid queue");
                        }
                    }
                    _ => log::warn!("virtio-mmio: QueueReady value {v} ignored"),
                }
            }
            regs::QUEUE_NOTIFY => self.notify_queue(v),
            regs::INTERRUPT_ACK => self.interrupt.ack(v),
            regs::STATUS => self.write_status(v),
            regs::SHM_SEL => self.shm_sel = v,
            _ => log::warn!("virtio-mmio: write to read-only or unknown register {offset:#x}"),
        }
    }
}

/// Magic at the start of an encoded transport state.
pub const MMIO_STATE_MAGIC: [u8; 4] = *b"VKMM";
/// Version of the transport state encoding.
pub const MMIO_STATE_VERSION: u32 = 1;

impl<M: GuestAddressSpace> MmioTransport<M> {
    /// Saves the registers, every queue's configuration and the device's own state, as a
    /// versioned byte string ([`MmioTransport::restore_state`] reads it back).
    pub fn save_state(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MMIO_STATE_MAGIC);
        out.extend_from_slice(&MMIO_STATE_VERSION.to_le_bytes());
        for v in [
            self.status,
            self.device_features_sel,
            self.driver_features_sel,
            self.queue_sel,
            self.shm_sel,
            self.interrupt.status(),
            self.interrupt.config_generation(),
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.driver_features.to_le_bytes());
        out.extend_from_slice(&(self.queues.len() as u32).to_le_bytes());
        for (q, a) in self.queues.iter().zip(&self.queue_addrs) {
            crate::state::put_queue(&mut out, &q.state());
            for x in a {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        let dev = self.device.save_state().to_bytes();
        out.extend_from_slice(&(dev.len() as u32).to_le_bytes());
        out.extend_from_slice(&dev);
        out
    }

    /// Restores [`MmioTransport::save_state`] output into this transport (same device type
    /// and queue layout). On error the transport is left reset.
    pub fn restore_state(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let r = self.restore_inner(bytes);
        if r.is_err() {
            self.reset();
        }
        r
    }

    fn restore_inner(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let mut r = ByteReader { bytes, pos: 0 };
        let magic: [u8; 4] = r.array()?;
        if magic != MMIO_STATE_MAGIC {
            return Err(StateError::Magic(magic));
        }
        let version = r.u32()?;
        if version != MMIO_STATE_VERSION {
            return Err(StateError::Version(version));
        }
        let mut regs32 = [0u32; 7];
        for v in &mut regs32 {
            *v = r.u32()?;
        }
        let driver_features = r.u64()?;
        let nq = r.u32()? as usize;
        if nq != self.queues.len() {
            return Err(StateError::QueueCount {
                expected: self.queues.len(),
                found: nq,
            });
        }
        let mut queues = Vec::with_capacity(nq);
        let mut addrs = Vec::with_capacity(nq);
        for i in 0..nq {
            let qs = crate::state::read_queue(&mut r)?;
            if qs.max_size != self.queues[i].max_size() {
                return Err(StateError::QueueMaxSize(i, qs.max_size));
            }
            queues.push(Queue::try_from(qs).map_err(|e| StateError::Queue(i, e))?);
            addrs.push([r.u64()?, r.u64()?, r.u64()?]);
        }
        let dlen = r.u32()? as usize;
        let device = DeviceState::from_bytes(r.take(dlen)?)?;
        if r.pos != bytes.len() {
            return Err(StateError::Trailing(bytes.len() - r.pos));
        }
        if device.acked_features & !self.device.device_features() != 0 {
            return Err(StateError::Features(device.acked_features));
        }
        self.reset();
        let irq: Arc<dyn Interrupt> = self.interrupt.clone();
        self.device.restore_state(&device, self.mem.clone(), irq)?;
        let [status, dsel, drsel, qsel, shm, istatus, cgen] = regs32;
        self.status = status;
        self.device_features_sel = dsel;
        self.driver_features_sel = drsel;
        self.queue_sel = qsel;
        self.shm_sel = shm;
        self.driver_features = driver_features;
        self.queues = queues;
        self.queue_addrs = addrs;
        self.interrupt.restore(istatus, cgen);
        Ok(())
    }
}

impl<M: GuestAddressSpace> MutDeviceMmio for MmioTransport<M> {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.read(offset, data);
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.write(offset, data);
    }
}
