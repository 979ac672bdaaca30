//! How a device tells the driver that something happened.
//!
//! Two layers meet here:
//!
//! * [`Interrupt`] is what a *device* sees: "I put buffers in the used ring of queue N" or "my
//!   configuration space changed". Device code never knows whether that becomes an MSI, a
//!   level-triggered line, or a vhost-user call eventfd.
//! * [`IrqTrigger`] is what a *transport* sees: a way to raise the one interrupt line it owns.
//!   An [`EventFd`] registered as a KVM irqfd implements it, and so does [`CallbackIrq`] for
//!   VMMs that inject interrupts themselves (and for tests).
//!
//! The virtio-mmio transport combines both: its `InterruptStatus` register records the reason
//! (bit 0: used buffer, bit 1: configuration change) and then the line is raised.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Why a device interrupts the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptReason {
    /// The device placed buffers in the used ring of the queue with this index.
    Queue(u16),
    /// The device configuration space changed (or the device needs a reset).
    Config,
}

/// The device-facing interrupt interface.
pub trait Interrupt: Send + Sync {
    /// Notifies the driver for `reason`.
    fn trigger(&self, reason: InterruptReason) -> io::Result<()>;
}

/// A raw interrupt line owned by a transport.
pub trait IrqTrigger: Send + Sync {
    /// Raises the line once (edge semantics: one call, one interrupt).
    fn trigger(&self) -> io::Result<()>;
}

impl IrqTrigger for EventFd {
    /// Writing 1 to an eventfd registered with `KVM_IRQFD` injects the interrupt without a
    /// round trip through the VMM.
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}

/// An [`IrqTrigger`] that calls a closure (a VMM's own injection path, or a test probe).
pub struct CallbackIrq(Box<dyn Fn() -> io::Result<()> + Send + Sync>);

impl CallbackIrq {
    /// Wraps `f`; it runs every time the line is raised.
    pub fn new(f: impl Fn() -> io::Result<()> + Send + Sync + 'static) -> Self {
        Self(Box::new(f))
    }
}

impl std::fmt::Debug for CallbackIrq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallbackIrq")
    }
}

impl IrqTrigger for CallbackIrq {
    fn trigger(&self) -> io::Result<()> {
        (self.0)()
    }
}

/// An [`Interrupt`] that only counts, for tests and for devices driven without a transport.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    queue: AtomicU64,
    config: AtomicU64,
}

impl CountingInterrupt {
    /// Number of used-buffer notifications so far.
    pub fn queue_count(&self) -> u64 {
        self.queue.load(Ordering::SeqCst)
    }

    /// Number of configuration-change notifications so far.
    pub fn config_count(&self) -> u64 {
        self.config.load(Ordering::SeqCst)
    }
}

impl Interrupt for CountingInterrupt {
    fn trigger(&self, reason: InterruptReason) -> io::Result<()> {
        match reason {
            InterruptReason::Queue(_) => self.queue.fetch_add(1, Ordering::SeqCst),
            InterruptReason::Config => self.config.fetch_add(1, Ordering::SeqCst),
        };
        Ok(())
    }
}

/// `InterruptStatus` bit: used buffer notification.
pub const INT_USED_RING: u32 = 1;
/// `InterruptStatus` bit: configuration change notification.
pub const INT_CONFIG: u32 = 2;

/// The interrupt state of a virtio-mmio device: `InterruptStatus`, `ConfigGeneration` and the
/// line to raise.
pub struct MmioInterrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    line: Box<dyn IrqTrigger>,
}

impl std::fmt::Debug for MmioInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioInterrupt")
            .field("status", &self.status())
            .field("config_generation", &self.config_generation())
            .finish()
    }
}

impl MmioInterrupt {
    /// Creates the state around `line`.
    pub fn new(line: Box<dyn IrqTrigger>) -> Self {
        Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            line,
        }
    }

    /// Current `InterruptStatus` register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the bits the driver acknowledged through `InterruptACK`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears every pending reason (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Current `ConfigGeneration` register value.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// Restores the registers from a snapshot.
    pub fn restore(&self, status: u32, config_generation: u32) {
        self.status.store(status, Ordering::SeqCst);
        self.config_generation
            .store(config_generation, Ordering::SeqCst);
    }
}

impl Interrupt for MmioInterrupt {
    fn trigger(&self, reason: InterruptReason) -> io::Result<()> {
        let bit = match reason {
            InterruptReason::Queue(_) => INT_USED_RING,
            InterruptReason::Config => {
                // A config interrupt means the config space (or status) changed: the driver
                // re-reads it and uses the generation counter to detect torn reads.
                self.config_generation.fetch_add(1, Ordering::SeqCst);
                INT_CONFIG
            }
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.line.trigger()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn mmio_interrupt_sets_bits_and_raises_line() {
        let raised = Arc::new(AtomicU32::new(0));
        let r = raised.clone();
        let irq = MmioInterrupt::new(Box::new(CallbackIrq::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })));
        irq.trigger(InterruptReason::Queue(0)).unwrap();
        assert_eq!(irq.status(), INT_USED_RING);
        irq.trigger(InterruptReason::Config).unwrap();
        assert_eq!(irq.status(), INT_USED_RING | INT_CONFIG);
        assert_eq!(irq.config_generation(), 1);
        assert_eq!(raised.load(Ordering::SeqCst), 2);
        irq.ack(INT_USED_RING);
        assert_eq!(irq.status(), INT_CONFIG);
        irq.clear();
        assert_eq!(irq.status(), 0);
        assert!(format!("{irq:?}").contains("MmioInterrupt"));
    }

    #[test]
    fn eventfd_is_an_irq_line() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        IrqTrigger::trigger(&evt).unwrap();
        IrqTrigger::trigger(&evt).unwrap();
        assert_eq!(evt.read().unwrap(), 2);
    }

    #[test]
    fn counting_interrupt_counts() {
        let c = CountingInterrupt::default();
        c.trigger(InterruptReason::Queue(3)).unwrap();
        c.trigger(InterruptReason::Config).unwrap();
        assert_eq!((c.queue_count(), c.config_count()), (1, 1));
        assert_eq!(format!("{:?}", CallbackIrq::new(|| Ok(()))), "CallbackIrq");
    }
}
