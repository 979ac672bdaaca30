//! A two-level vCPU scheduler: VMs share host CPUs by weight and cap, vCPUs share their VM.
#![doc = include_str!("../README.md")]

pub mod credit;
pub mod executor;
#[cfg(feature = "vcpu")]
pub mod halt;
pub mod metrics;
pub mod scheduler;
pub mod sim;
pub mod task;
#[cfg(feature = "vcpu")]
pub mod vcpu;

pub use credit::{CreditConfig, CreditScheduler};
pub use executor::{Accounting, Executor, ExecutorError, ExecutorMetrics, Waker};
pub use metrics::{FairnessReport, LatencyHistogram};
pub use scheduler::{
    Decision, Nanos, SchedError, SchedStats, Scheduler, TaskId, VmConfig, VmId, WakeAction,
    DEFAULT_WEIGHT, MAX_WEIGHT,
};
pub use sim::{Behaviour, SimError, SimReport, Simulation};
pub use task::{Kick, Outcome, Preempt, Slice, Task};
