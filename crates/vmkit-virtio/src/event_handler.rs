//! Wiring an [`MmioTransport`] into an event-manager 0.4 loop.
//!
//! The transport is the subscriber, so a device gets both kinds of wake-ups through the same
//! lock the MMIO bus uses:
//!
//! * each queue's notification [`EventFd`](vmm_sys_util::eventfd::EventFd) (registered with KVM
//!   as an ioeventfd on `QueueNotify`) -> [`MmioTransport::process_queue_event`];
//! * each of the device's [`crate::VirtioDevice::backend_fds`] (TAP, console input, rate
//!   limiter timers) -> [`MmioTransport::process_backend_event`].
//!
//! Backend fds are registered edge-triggered: devices read them until they would block *or*
//! the guest has no buffers left, and resume on the next queue notification, so a full receive
//! queue does not turn a readable fd into a busy loop.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmkit_virtio::{rng::Rng, CallbackIrq, MmioTransport};
//!
//! let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
//! let t = MmioTransport::new(Box::new(Rng::new()), mem, Box::new(CallbackIrq::new(|| Ok(())))).unwrap();
//! let t = Arc::new(Mutex::new(t));
//! let mut ev: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> = EventManager::new().unwrap();
//! ev.add_subscriber(t.clone());
//! // The VMM thread then loops on ev.run().
//! ```

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_memory::GuestAddressSpace;

use crate::mmio::MmioTransport;

/// Event data of backend fd `i` is `BACKEND_EVENT_BASE + i`; queue `i` uses `i`.
pub const BACKEND_EVENT_BASE: u32 = 0x1_0000;

impl<M: GuestAddressSpace> MutEventSubscriber for MmioTransport<M> {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_events().iter().enumerate() {
            // Queue counts are small (u16 range), so `i` fits the u32 data word.
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                log::error!("virtio-mmio: cannot watch queue {i} eventfd: {e}");
            }
        }
        for (i, fd) in self.device().backend_fds().into_iter().enumerate() {
            let data = BACKEND_EVENT_BASE + i as u32;
            if let Err(e) = ops.add(Events::with_data_raw(
                fd,
                data,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            )) {
                log::error!("virtio-mmio: cannot watch backend fd {fd}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        if data >= BACKEND_EVENT_BASE {
            self.process_backend_event((data - BACKEND_EVENT_BASE) as usize);
        } else {
            self.process_queue_event(data as usize);
        }
    }
}
