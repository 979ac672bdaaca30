//! virtio-rng (virtio 1.2, 5.4): an entropy source with one request queue.
//!
//! The driver offers device-writable buffers; the device fills them with random bytes. The
//! host source is a [`EntropySource`]: [`GetRandom`] (the kernel CSPRNG through
//! `getrandom(2)`) by default.

mod device;

pub use device::{process_queue, EntropySource, GetRandom, Rng, RNG_QUEUE_SIZE};
