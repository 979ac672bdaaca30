//! virtio-rng over vhost-user: [`vmkit_virtio::rng::Rng`] for the control plane and
//! [`vmkit_virtio::rng::process_queue`] for the data plane.
//!
//! The entropy source belongs to the data plane ([`RngQueues`]); by default it is the kernel
//! CSPRNG (`getrandom(2)`), the same source the in-process device uses.

use std::sync::Mutex;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmkit_virtio::rng::{process_queue, EntropySource, GetRandom, Rng};

use crate::backend::{Notify, QueueHandler, Threading, VirtioBackend};

/// The data plane of an rng backend: an entropy source and the virtio-rng request loop.
pub struct RngQueues {
    source: Mutex<Box<dyn EntropySource>>,
}

impl std::fmt::Debug for RngQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RngQueues")
    }
}

impl QueueHandler for RngQueues {
    fn process_queue(
        &self,
        _index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap<()>,
        _acked_features: u64,
    ) -> Result<Notify, virtio_queue::Error> {
        let mut source = self.source.lock().unwrap_or_else(|p| p.into_inner());
        process_queue(queue, mem, source.as_mut()).map(Notify::used)
    }
}

/// A vhost-user-rng backend.
pub type RngBackend = VirtioBackend<RngQueues>;

/// An rng backend fed by `getrandom(2)`.
pub fn rng_backend() -> RngBackend {
    rng_backend_with_source(Box::new(GetRandom))
}

/// An rng backend fed by `source` (a hardware RNG device, or a fixed stream in tests).
pub fn rng_backend_with_source(source: Box<dyn EntropySource>) -> RngBackend {
    VirtioBackend::new(
        "vhost-user-rng",
        Box::new(Rng::new()),
        RngQueues {
            source: Mutex::new(source),
        },
        Threading::Single,
    )
}
