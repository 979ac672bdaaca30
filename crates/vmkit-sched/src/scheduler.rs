//! The [`Scheduler`] seam: a pure state machine over a clock it is given.
//!
//! A scheduler never reads a clock, never sleeps and never touches a thread. Every call
//! carries `now` (nanoseconds on some monotonic clock chosen by the caller) and returns a
//! decision the caller carries out:
//!
//! ```text
//!            wake(task, now) ──> WakeAction::{None, Kick(cpu), Preempt{cpu, at}}
//! host cpu:  pick(cpu, now) ──> Decision::Run{task, slice} ── task runs ──> finish(cpu, ran, outcome, now)
//!                         └──> Decision::Idle{until}     ── park until `until` or a Kick
//! ```
//!
//! Because of that, the same scheduler code runs under the real [`Executor`](crate::Executor)
//! (host threads, wall clock) and under the deterministic [`Simulation`](crate::Simulation)
//! (virtual clock, discrete events), and a fairness result seen in the simulator is a
//! property of the code that ships.
//!
//! The protocol, which both drivers follow and the scheduler checks:
//! - a task is created halted by [`Scheduler::add_task`] and becomes runnable with
//!   [`Scheduler::wake`] (like a vCPU waiting for its first INIT/SIPI);
//! - each host CPU alternates `pick` and `finish`; `ran` is the time the task actually ran;
//! - a wake may arrive at any time, also while the task runs or just after it decided to
//!   halt: it is remembered, so halting right after such a wake does not lose it.

use crate::task::Outcome;

/// Nanoseconds on the caller's monotonic clock.
pub type Nanos = u64;

/// The weight a VM gets when none is given (Xen's default credit weight).
pub const DEFAULT_WEIGHT: u32 = 256;

/// The largest weight a VM may have.
pub const MAX_WEIGHT: u32 = 65_535;

/// Identifies a VM (a group of tasks sharing one weight and one cap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmId(pub(crate) u32);

impl VmId {
    /// The VM's index: VMs are numbered 0, 1, 2... in the order they were added.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Identifies a task (a vCPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub(crate) u32);

impl TaskId {
    /// The task's index: tasks are numbered 0, 1, 2... in the order they were added.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// How a VM shares the host: its weight relative to other VMs and an optional cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Relative share when host CPUs are contended, 1..=[`MAX_WEIGHT`]. A VM of weight 512
    /// gets twice the CPU time of a VM of weight 256, whatever its number of vCPUs.
    pub weight: u32,
    /// Upper bound on the VM's CPU use in percent of one host CPU (Xen's convention: 50 is
    /// half a CPU, 200 is two CPUs), enforced in every accounting period even when CPUs are
    /// idle. `None`: uncapped.
    pub cap_percent: Option<u32>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            weight: DEFAULT_WEIGHT,
            cap_percent: None,
        }
    }
}

impl VmConfig {
    /// A VM of the given weight, uncapped.
    pub fn weighted(weight: u32) -> Self {
        VmConfig {
            weight,
            cap_percent: None,
        }
    }

    /// The same VM, capped at `percent` of one host CPU.
    pub fn with_cap(mut self, percent: u32) -> Self {
        self.cap_percent = Some(percent);
        self
    }
}

/// What a host CPU should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run `task` for at most `slice` nanoseconds, then call [`Scheduler::finish`].
    Run {
        /// The task to run.
        task: TaskId,
        /// The longest the task may run before it must return.
        slice: Nanos,
        /// If the task was woken and this is its first run since, how long it waited.
        wake_latency: Option<Nanos>,
    },
    /// Nothing to run: sleep until `until` (a cap period ends and a throttled VM becomes
    /// runnable) or until a [`WakeAction::Kick`] names this CPU. `None`: only a kick.
    Idle {
        /// When to pick again even without a kick.
        until: Option<Nanos>,
    },
}

/// What the caller of [`Scheduler::wake`] must do so the woken task runs soon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeAction {
    /// Nothing: the task is queued (or was already runnable) and will be picked in turn.
    None,
    /// Host CPU `cpu` is idle: wake it so it picks.
    Kick {
        /// The idle host CPU.
        cpu: usize,
    },
    /// Cut the slice running on host CPU `cpu` at time `at` (the rate limit may put `at`
    /// in the future), so it picks the woken task.
    Preempt {
        /// The host CPU whose slice must be cut.
        cpu: usize,
        /// When to cut it (`at <= now`: immediately).
        at: Nanos,
    },
}

/// Counters every scheduler keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStats {
    /// Calls to [`Scheduler::pick`] (scheduling decisions), including idle ones.
    pub decisions: u64,
    /// Picks that took a VM queued on another host CPU.
    pub steals: u64,
    /// Wakes that boosted the woken task.
    pub boosts: u64,
    /// Wakes that asked for a running slice to be cut.
    pub preemptions: u64,
    /// Times a capped VM ran out of budget within a period.
    pub throttles: u64,
}

/// Errors of the [`Scheduler`] protocol and of configuration.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchedError {
    /// The scheduler was configured with no host CPUs.
    #[error("a scheduler needs at least one host CPU, got 0")]
    NoCpus,
    /// A host CPU index is out of range.
    #[error("host CPU {cpu} does not exist (the scheduler has {cpus})")]
    CpuOutOfRange {
        /// The index given.
        cpu: usize,
        /// The number of host CPUs.
        cpus: usize,
    },
    /// `pick` was called for a CPU that has not finished its previous task.
    #[error("host CPU {cpu} is still running task {task}: call finish before pick")]
    CpuBusy {
        /// The CPU.
        cpu: usize,
        /// The task it runs.
        task: usize,
    },
    /// `finish` was called for a CPU that runs nothing.
    #[error("host CPU {cpu} is not running a task: finish without pick")]
    CpuNotRunning {
        /// The CPU.
        cpu: usize,
    },
    /// A VM id that this scheduler never handed out.
    #[error("unknown VM {0}")]
    UnknownVm(usize),
    /// A task id that this scheduler never handed out.
    #[error("unknown task {0}")]
    UnknownTask(usize),
    /// A weight outside 1..=MAX_WEIGHT.
    #[error("VM weight {0} is outside 1..=65535")]
    InvalidWeight(u32),
    /// A cap of zero or above what the host CPUs can give.
    #[error("VM cap {cap}% is outside 1..={max}% (100% per host CPU)")]
    InvalidCap {
        /// The cap given.
        cap: u32,
        /// The largest valid cap.
        max: u32,
    },
    /// A nonsensical timing parameter.
    #[error("invalid scheduler parameter {name} = {value} ns: {why}")]
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// Its value.
        value: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// More VMs or tasks than ids can number.
    #[error("too many {0}: ids are 32-bit")]
    TooMany(&'static str),
}

/// A scheduler of tasks grouped in VMs over a fixed set of host CPUs.
///
/// Implementations are pure state machines: see the [module docs](self) for the protocol.
pub trait Scheduler: Send {
    /// The number of host CPUs (numbered `0..cpus()`).
    fn cpus(&self) -> usize;

    /// Add a VM.
    fn add_vm(&mut self, config: VmConfig) -> Result<VmId, SchedError>;

    /// Add a task to `vm`. It starts halted: call [`Scheduler::wake`] to make it runnable.
    fn add_task(&mut self, vm: VmId, now: Nanos) -> Result<TaskId, SchedError>;

    /// Decide what host CPU `cpu` runs next. The CPU must not be running a task.
    fn pick(&mut self, cpu: usize, now: Nanos) -> Result<Decision, SchedError>;

    /// Host CPU `cpu` stopped its task after it ran `ran` nanoseconds, for `outcome`.
    fn finish(
        &mut self,
        cpu: usize,
        ran: Nanos,
        outcome: Outcome,
        now: Nanos,
    ) -> Result<(), SchedError>;

    /// Make `task` runnable (an interrupt was injected into a halted vCPU). Waking a task
    /// that is runnable or running is not an error: a running task that then reports
    /// [`Outcome::Blocked`] stays runnable, so the wake is not lost. Waking an exited task
    /// does nothing.
    fn wake(&mut self, task: TaskId, now: Nanos) -> Result<WakeAction, SchedError>;

    /// The VM a task belongs to.
    fn vm_of(&self, task: TaskId) -> Result<VmId, SchedError>;

    /// The configuration a VM was added with.
    fn vm_config(&self, vm: VmId) -> Result<VmConfig, SchedError>;

    /// Nanoseconds of CPU time charged to `vm` so far (the sum of `ran` of its tasks).
    fn vm_service(&self, vm: VmId) -> Result<Nanos, SchedError>;

    /// Nanoseconds of CPU time charged to `task` so far.
    fn task_service(&self, task: TaskId) -> Result<Nanos, SchedError>;

    /// How many VMs were added.
    fn vm_count(&self) -> usize;

    /// How many tasks were added (including exited ones).
    fn task_count(&self) -> usize;

    /// How many tasks of `vm` have not exited.
    fn live_tasks(&self, vm: VmId) -> Result<usize, SchedError>;

    /// The scheduler's counters.
    fn stats(&self) -> SchedStats;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_config_builders() {
        assert_eq!(VmConfig::default().weight, DEFAULT_WEIGHT);
        let c = VmConfig::weighted(512).with_cap(150);
        assert_eq!(c.weight, 512);
        assert_eq!(c.cap_percent, Some(150));
        assert_eq!(VmId(3).index(), 3);
        assert_eq!(TaskId(7).index(), 7);
    }

    #[test]
    fn errors_name_the_value() {
        let e = SchedError::InvalidCap { cap: 900, max: 800 };
        assert_eq!(
            e.to_string(),
            "VM cap 900% is outside 1..=800% (100% per host CPU)"
        );
        assert!(SchedError::CpuOutOfRange { cpu: 9, cpus: 8 }
            .to_string()
            .contains('9'));
    }
}
