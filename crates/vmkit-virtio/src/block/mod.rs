//! virtio-blk (virtio 1.2, 5.2) over a raw image file.
//!
//! * [`request`] turns a validated descriptor chain into a [`request::Request`] or an
//!   immediate status (all guest-input checks live there);
//! * [`backend`] moves bytes between guest memory and the image ([`RawDisk`]);
//! * [`device`] is the [`crate::VirtioDevice`] state machine ([`Block`]) and
//!   [`process_queue`], the request loop any transport can call.
//!
//! Offered features: RO (for read-only images), FLUSH, BLK_SIZE, SEG_MAX, SIZE_MAX, DISCARD,
//! WRITE_ZEROES, MQ, plus indirect descriptors and event-idx. Without FLUSH negotiated the
//! device is write-through: every write is `fdatasync`ed before it is acknowledged.

pub mod backend;
pub mod device;
pub mod request;

pub use backend::{DiskError, RawDisk};
pub use device::{process_queue, Block, BlockConfig, BlockFeatures, QueueOutcome};
