#![doc = include_str!("../README.md")]

pub mod acpi;
pub mod args;
pub mod devices;
pub mod input;
pub mod sched;
pub mod snapshot;
pub mod vhost_user;
pub mod virtio;
pub mod vmm;
