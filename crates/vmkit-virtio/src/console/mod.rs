//! virtio-console (virtio 1.2, 5.3), single port: `receiveq0` carries host input to the guest,
//! `transmitq0` carries guest output to the host.
//!
//! The host side is a [`ConsoleBackend`]: standard input/output, a file (output, optionally
//! input), or a Unix stream socket. Input is read when the backend fd is readable (the event
//! loop watches [`crate::VirtioDevice::backend_fds`]), buffered up to [`MAX_PENDING`] bytes, and
//! copied into receive buffers as the guest provides them. `VIRTIO_CONSOLE_F_EMERG_WRITE` is
//! offered: a byte written to config offset 8 goes straight to the output.

mod backend;
mod device;

pub use backend::ConsoleBackend;
pub use device::{process_rx, process_tx, Console, MAX_PENDING};
