#![doc = include_str!("../README.md")]
//!
//! # How vhost-user maps onto the [`vmkit_virtio::VirtioDevice`] model
//!
//! | virtio concept            | in process (virtio-mmio)            | over vhost-user (this crate)                          |
//! |---------------------------|-------------------------------------|-------------------------------------------------------|
//! | feature negotiation       | transport registers -> `ack_features` | `GET_FEATURES`/`SET_FEATURES` -> `ack_features`     |
//! | configuration space       | MMIO window -> `read_config`        | `GET_CONFIG`/`SET_CONFIG` -> `read_config`/`write_config` |
//! | queues                    | moved into the device at `activate` | owned by vhost-user-backend's vrings, lent per run   |
//! | guest memory              | the VMM's `GuestMemory`             | memfd regions from `SET_MEM_TABLE`, swapped atomically |
//! | driver -> device notify   | `QueueNotify` write -> `queue_notify` | kick eventfd -> epoll worker -> request loop        |
//! | device -> driver interrupt | `Interrupt::trigger` -> irqfd       | call eventfd (after event-idx suppression check)     |
//! | host input (TAP, console) | `backend_fds` -> `backend_event`    | fds in the vring worker's epoll (edge-triggered) -> receive queue run |
//! | reset                     | status 0 -> `reset`                 | `RESET_DEVICE` / disconnect -> flush + `reset`        |
//!
//! [`backend`] explains the split in detail: the [`vmkit_virtio::VirtioDevice`] stays the
//! control plane, and the device's own request loop (`process_queue`) is the data plane.

pub mod backend;
pub mod blk;
pub mod cli;
pub mod console;
pub mod daemon;
pub mod early_enable;
pub mod logger;
pub mod net;
pub mod rng;

pub use backend::{
    BackendError, GuestMemoryShared, Notify, QueueHandler, Threading, VirtioBackend,
};
pub use blk::{blk_backend, BlkBackend, BlkError, BlkOptions, BlkQueues};
pub use console::{console_backend, ConsoleQueues, ConsoleVhostBackend};
pub use daemon::{install_signal_handlers, serve, DaemonError, ServeOptions, Stop};
pub use net::{net_backend, tap_backend, NetError, NetQueues, NetVhostBackend};
pub use rng::{rng_backend, rng_backend_with_source, RngBackend, RngQueues};
