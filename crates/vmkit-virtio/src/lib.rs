#![doc = include_str!("../README.md")]

pub mod block;
pub mod chain;
pub mod console;
pub mod device;
pub mod event_handler;
pub mod features;
pub mod interrupt;
pub mod mmio;
pub mod net;
pub mod rate_limiter;
pub mod rng;
pub mod state;

pub use device::{ActivateError, DeviceCore, DeviceError, VirtioDevice};
pub use interrupt::{CallbackIrq, Interrupt, InterruptReason, IrqTrigger, MmioInterrupt};
pub use mmio::MmioTransport;
pub use state::{DeviceState, StateError};
