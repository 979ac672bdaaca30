//! What the scheduler schedules: a [`Task`] that runs for at most one [`Slice`].
//!
//! A task is anything that can be resumed, run for a bounded time and stopped again: a KVM
//! vCPU (`KVM_RUN` until the slice ends or the guest halts), an emulated CPU, or a plain
//! CPU-bound closure in a test. The executor hands the task a [`Slice`] and the task returns
//! an [`Outcome`] saying why it stopped.
//!
//! # Preemption
//!
//! The scheduler sometimes has to cut a slice short: a vCPU with unused credit was woken by
//! an interrupt and should run now, not at the end of a 10 ms slice. The executor does that
//! through the slice's [`Preempt`] handle:
//!
//! - tasks that run in small steps (an instruction emulator, the CPU-bound tasks in this
//!   crate's tests) poll [`Slice::expired`] between steps;
//! - tasks that block inside the kernel (a KVM vCPU in `KVM_RUN`) cannot poll, so they give
//!   the executor a [`Kick`] through [`Task::kick_handle`]; the executor calls it when it cuts
//!   the slice (for KVM: set `immediate_exit` and signal the vCPU thread). Such a task must
//!   also arm its own timer for [`Slice::deadline`], because the executor does not run a
//!   timer thread per slice.
//!
//! The time a task is charged is the wall time from the moment the executor resumed it to the
//! moment it returned, measured by the executor, never an estimate: a task cannot make itself
//! cheaper by returning early or by reporting a different outcome.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a task returned from [`Task::run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The task used its slice (or was cut short by preemption) and is still runnable.
    SliceEnd,
    /// The task gave the CPU away voluntarily and is still runnable (a vCPU spinning on a
    /// lock, a PAUSE-loop exit): another vCPU of the same VM should run first.
    Yielded,
    /// The task halted and is not runnable until someone wakes it (a vCPU in `HLT` waiting
    /// for an interrupt). A wake that raced with the halt is not lost: see
    /// [`Scheduler::wake`](crate::Scheduler::wake).
    Blocked,
    /// The task is finished and will never run again.
    Exited,
}

/// Something that can make a running task return from [`Task::run`] promptly.
///
/// A KVM vCPU implements it with `immediate_exit` plus a signal to the thread in `KVM_RUN`.
/// Kicking a task that is not running, or kicking twice, must be harmless.
pub trait Kick: Send + Sync {
    /// Ask the running task to return from [`Task::run`] as soon as it can.
    fn kick(&self);

    /// Ask the task to return at `at` (a cut the scheduler deferred, e.g. by its rate
    /// limit). The executor calls this instead of [`Kick::kick`] when the cut lies in the
    /// future; a task that cannot poll [`Slice::expired`] must arrange to be kicked then (see
    /// `vmkit_sched::vcpu::SliceTimer`). The default does nothing, which leaves the task to
    /// find the cut at its next poll or its own slice deadline.
    fn kick_at(&self, at: Instant) {
        let _ = at;
    }
}

/// A unit of work the scheduler can run for a bounded time: a vCPU.
pub trait Task: Send {
    /// Run for at most `slice` and say why the task stopped.
    ///
    /// The task should return soon after [`Slice::expired`] becomes true; time it spends
    /// past the deadline is still charged to it (and to its VM's cap).
    fn run(&mut self, slice: &Slice) -> Outcome;

    /// A handle the executor calls when it cuts this task's slice short, for tasks that
    /// cannot poll [`Slice::expired`]. The default is `None`: the task polls.
    fn kick_handle(&self) -> Option<Arc<dyn Kick>> {
        None
    }
}

/// Sentinel for "no preemption requested".
const NO_CUT: u64 = u64::MAX;

/// The handle through which the executor cuts the slice of the task running on one host
/// thread. One exists per host thread and is reused for every slice it runs.
#[derive(Debug)]
pub struct Preempt {
    epoch: Instant,
    /// Nanoseconds since `epoch` at which the current slice must stop (`NO_CUT`: never).
    cut_at: AtomicU64,
}

impl Preempt {
    /// A handle whose times are measured from `epoch`.
    pub fn new(epoch: Instant) -> Self {
        Preempt {
            epoch,
            cut_at: AtomicU64::new(NO_CUT),
        }
    }

    /// Cut the current slice at `at` nanoseconds after the epoch (now, if `at` has passed).
    /// An earlier pending cut is kept: cuts only ever move the end of a slice forward in time.
    pub fn cut_at(&self, at: u64) {
        self.cut_at.fetch_min(at, Ordering::AcqRel);
    }

    /// Cut the current slice now.
    pub fn cut_now(&self) {
        self.cut_at(0);
    }

    /// Forget any pending cut; called by the executor before it starts a new slice.
    pub fn reset(&self) {
        self.cut_at.store(NO_CUT, Ordering::Release);
    }

    /// The pending cut, in nanoseconds after the epoch, if any.
    pub fn pending(&self) -> Option<u64> {
        match self.cut_at.load(Ordering::Acquire) {
            NO_CUT => None,
            at => Some(at),
        }
    }

    /// Nanoseconds elapsed since the epoch (saturating at `u64::MAX`, i.e. after 584 years).
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// One grant of CPU time: run until [`Slice::expired`].
#[derive(Debug)]
pub struct Slice<'a> {
    len: Duration,
    /// Nanoseconds after the preempt handle's epoch at which the slice ends by itself.
    end_ns: u64,
    preempt: &'a Preempt,
}

impl<'a> Slice<'a> {
    /// A slice of `len` that starts now on the host thread owning `preempt`.
    pub fn new(len: Duration, preempt: &'a Preempt) -> Self {
        let len_ns = u64::try_from(len.as_nanos()).unwrap_or(u64::MAX);
        Slice {
            len,
            end_ns: preempt.now_ns().saturating_add(len_ns),
            preempt,
        }
    }

    /// The length the scheduler granted.
    pub fn len(&self) -> Duration {
        self.len
    }

    /// Whether the granted length is zero (never the case for slices the executor hands out).
    pub fn is_empty(&self) -> bool {
        self.len.is_zero()
    }

    /// The instant at which the slice ends unless it is cut earlier; a task that cannot poll
    /// arms its own timer for it.
    pub fn deadline(&self) -> Instant {
        self.preempt.epoch + Duration::from_nanos(self.end_ns)
    }

    /// The instant the slice ends as things stand: its deadline, or an earlier cut the
    /// scheduler has already asked for.
    pub fn end(&self) -> Instant {
        let limit = self.end_ns.min(self.preempt.cut_at.load(Ordering::Acquire));
        self.preempt.epoch + Duration::from_nanos(limit)
    }

    /// True once the slice is used up or the scheduler has cut it. Costs one clock read.
    pub fn expired(&self) -> bool {
        let limit = self.end_ns.min(self.preempt.cut_at.load(Ordering::Acquire));
        self.preempt.now_ns() >= limit
    }

    /// True if the scheduler asked for the slice to be cut (as opposed to it running out).
    pub fn cut_requested(&self) -> bool {
        self.preempt
            .pending()
            .is_some_and(|at| at <= self.preempt.now_ns())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_expires_when_cut() {
        let p = Preempt::new(Instant::now());
        let s = Slice::new(Duration::from_secs(3600), &p);
        assert!(!s.expired());
        assert!(!s.cut_requested());
        assert!(!s.is_empty());
        assert_eq!(s.len(), Duration::from_secs(3600));
        p.cut_now();
        assert!(s.expired());
        assert!(s.cut_requested());
        p.reset();
        assert!(!s.expired());
        assert_eq!(p.pending(), None);
    }

    #[test]
    fn later_cut_does_not_override_earlier() {
        let p = Preempt::new(Instant::now());
        p.cut_at(1_000);
        p.cut_at(5_000);
        assert_eq!(p.pending(), Some(1_000));
    }

    #[test]
    fn slice_expires_at_deadline() {
        let p = Preempt::new(Instant::now());
        let s = Slice::new(Duration::from_micros(50), &p);
        assert!(s.deadline() > p.epoch);
        while !s.expired() {
            std::hint::spin_loop();
        }
        assert!(Instant::now() >= s.deadline());
        assert!(!s.cut_requested());
    }
}
