//! Running many tasks on few host threads: the [`Executor`].
//!
//! The executor owns one host thread per scheduler CPU (by default as many as the host has,
//! see [`CreditConfig::default`](crate::CreditConfig)). Each thread loops:
//!
//! 1. lock the scheduler, `pick` with the current time, take the chosen task object out of
//!    its slot, unlock;
//! 2. run the task for its [`Slice`], without any lock held;
//! 3. lock, put the task back, `finish` with the time it actually ran, unlock.
//!
//! An idle thread parks until the scheduler's `until` (a cap period ends) or until a
//! [`Waker`] names it. A [`Waker`] is the handle an interrupt controller holds for a halted
//! vCPU: [`Waker::wake`] makes the task runnable and carries out the scheduler's
//! [`WakeAction`]: unpark an idle thread, or cut the slice on a busy one through its
//! [`Preempt`] handle (and the running task's [`Kick`], if it has one).
//!
//! The scheduler is one state machine behind one mutex. A decision takes a few hundred
//! nanoseconds, far below the length of a slice, so the lock is not a bottleneck at the
//! thread counts a host has; in exchange the executor and the simulator share every line of
//! scheduling logic.
//!
//! Time is the wall clock ([`std::time::Instant`], monotonic) in nanoseconds since the
//! executor started. What a task is charged is chosen by [`Accounting`]: by default the
//! wall time between resume and return, so that if the host kernel deschedules the
//! executor's thread mid-slice, that time is charged too; with [`Accounting::ThreadCpu`], the
//! CPU time the host thread actually got during the slice (user + system, which for a KVM
//! vCPU includes guest time), which keeps shares fair on a host that other processes load.
//!
//! A panicking task is treated as exited: its thread keeps scheduling other tasks.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crate::metrics::{entitlements, Demand, FairnessReport, LatencyHistogram};
use crate::scheduler::{
    Decision, Nanos, SchedError, SchedStats, Scheduler, TaskId, VmConfig, VmId, WakeAction,
};
use crate::task::{Kick, Outcome, Preempt, Slice, Task};

/// How long an idle thread with nothing to wait for parks before looking again. Only a
/// safety net: wakes unpark idle threads directly.
const IDLE_PARK: Duration = Duration::from_millis(100);

/// What a task is charged for a slice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Accounting {
    /// Wall time from resume to return.
    #[default]
    Wall,
    /// CPU time of the host thread from resume to return (`CLOCK_THREAD_CPUTIME_ID`).
    ThreadCpu,
}

/// The calling thread's CPU time in nanoseconds, or `None` if the clock is unavailable.
fn thread_cpu_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes one `timespec` through the pointer, which points to a
    // live, properly aligned local; CLOCK_THREAD_CPUTIME_ID needs no other argument.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// Errors of the executor.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The scheduler refused a call.
    #[error("scheduler error: {0}")]
    Sched(#[from] SchedError),
    /// A host thread could not be started.
    #[error("cannot start host thread {cpu}: {source}")]
    Spawn {
        /// The host CPU index whose thread failed.
        cpu: usize,
        /// The OS error.
        source: std::io::Error,
    },
}

struct State<S> {
    sched: S,
    tasks: Vec<Option<Box<dyn Task>>>,
    latency: LatencyHistogram,
    exited: usize,
    panicked: usize,
    errors: Vec<SchedError>,
}

struct Worker {
    preempt: Preempt,
    kick: Mutex<Option<Arc<dyn Kick>>>,
    thread: OnceLock<Thread>,
}

struct Shared<S> {
    epoch: Instant,
    accounting: Accounting,
    state: Mutex<State<S>>,
    workers: Vec<Worker>,
    shutdown: AtomicBool,
    exits: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Tasks run outside the lock and panics inside them are caught, so a poisoned lock can
    // only come from a bug in this module; the state is still the best information we have.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<S: Scheduler> Shared<S> {
    fn now(&self) -> Nanos {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn apply(&self, action: WakeAction) {
        match action {
            WakeAction::None => {}
            WakeAction::Kick { cpu } => {
                if let Some(t) = self.workers.get(cpu).and_then(|w| w.thread.get()) {
                    t.unpark();
                }
            }
            WakeAction::Preempt { cpu, at } => {
                if let Some(w) = self.workers.get(cpu) {
                    w.preempt.cut_at(at);
                    if let Some(k) = lock(&w.kick).as_ref() {
                        if at <= self.now() {
                            k.kick();
                        } else {
                            // A deferred cut: a task that cannot poll must be kicked then.
                            k.kick_at(self.epoch + Duration::from_nanos(at));
                        }
                    }
                }
            }
        }
    }

    fn worker_loop(&self, cpu: usize) {
        let Some(worker) = self.workers.get(cpu) else {
            return;
        };
        let _ = worker.thread.set(std::thread::current());
        while !self.shutdown.load(Ordering::Acquire) {
            let now = self.now();
            let mut st = lock(&self.state);
            let decision = match st.sched.pick(cpu, now) {
                Ok(d) => d,
                Err(e) => {
                    st.errors.push(e);
                    return;
                }
            };
            match decision {
                Decision::Idle { until } => {
                    drop(st);
                    let wait = until.map_or(IDLE_PARK, |u| {
                        Duration::from_nanos(u.saturating_sub(self.now())).min(IDLE_PARK)
                    });
                    std::thread::park_timeout(wait);
                }
                Decision::Run {
                    task,
                    slice,
                    wake_latency,
                } => {
                    if let Some(l) = wake_latency {
                        st.latency.record(l);
                    }
                    // Under the lock, so that a cut requested for this slice after the pick
                    // is not erased.
                    worker.preempt.reset();
                    let obj = st.tasks.get_mut(task.index()).and_then(Option::take);
                    drop(st);
                    self.run_one(cpu, worker, task, slice, obj);
                }
            }
        }
    }

    fn run_one(
        &self,
        cpu: usize,
        worker: &Worker,
        task: TaskId,
        slice: Nanos,
        obj: Option<Box<dyn Task>>,
    ) {
        let start = self.now();
        let cpu_start = match self.accounting {
            Accounting::Wall => None,
            Accounting::ThreadCpu => thread_cpu_ns(),
        };
        let (obj, outcome) = match obj {
            Some(mut t) => {
                *lock(&worker.kick) = t.kick_handle();
                let s = Slice::new(Duration::from_nanos(slice), &worker.preempt);
                let r = catch_unwind(AssertUnwindSafe(|| t.run(&s)));
                *lock(&worker.kick) = None;
                match r {
                    Ok(outcome) => (Some(t), outcome),
                    Err(_) => (None, Outcome::Exited),
                }
            }
            // Cannot happen (a task runs on one thread at a time); retire the id rather
            // than spin on it.
            None => (None, Outcome::Exited),
        };
        let end = self.now();
        let wall = end.saturating_sub(start);
        let ran = match (cpu_start, thread_cpu_ns()) {
            (Some(a), Some(b)) => b.saturating_sub(a).min(wall),
            _ => wall,
        };
        let mut st = lock(&self.state);
        if let Err(e) = st.sched.finish(cpu, ran, outcome, end) {
            st.errors.push(e);
        }
        if outcome == Outcome::Exited {
            st.exited += 1;
            if obj.is_none() {
                st.panicked += 1;
            }
            drop(st);
            self.exits.notify_all();
        } else if let Some(slot) = st.tasks.get_mut(task.index()) {
            *slot = obj;
        }
    }
}

trait WakeTarget: Send + Sync {
    fn wake(&self, task: TaskId) -> Result<(), SchedError>;
}

impl<S: Scheduler> WakeTarget for Shared<S> {
    fn wake(&self, task: TaskId) -> Result<(), SchedError> {
        let action = lock(&self.state).sched.wake(task, self.now())?;
        self.apply(action);
        Ok(())
    }
}

/// The handle that makes one task runnable again: what an interrupt controller calls after
/// injecting an interrupt into a halted vCPU. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct Waker {
    task: TaskId,
    target: Arc<dyn WakeTarget>,
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker").field("task", &self.task).finish()
    }
}

impl Waker {
    /// Make the task runnable (a no-op if it is runnable, and remembered if it is running).
    pub fn wake(&self) -> Result<(), SchedError> {
        self.target.wake(self.task)
    }

    /// The task this waker wakes.
    pub fn task(&self) -> TaskId {
        self.task
    }
}

/// What an executor measured.
#[derive(Clone, Debug)]
pub struct ExecutorMetrics {
    /// Wall time since the executor started.
    pub elapsed: Duration,
    /// CPU time charged to each VM, by VM index.
    pub vm_service: Vec<Nanos>,
    /// Each VM's weighted max-min fair share in CPUs, assuming its live tasks are CPU-bound.
    pub entitlement: Vec<f64>,
    /// Shares vs entitlements and the weighted Jain index.
    pub fairness: FairnessReport,
    /// Wake-to-run latency (from [`Waker::wake`] to the pick that runs the task).
    pub latency: LatencyHistogram,
    /// Scheduling decisions per second of wall time.
    pub decisions_per_sec: f64,
    /// Tasks that exited (including ones that panicked).
    pub exited: usize,
    /// Tasks whose `run` panicked.
    pub panicked: usize,
    /// The scheduler's counters.
    pub stats: SchedStats,
    /// Scheduler errors the host threads met (empty unless there is a bug).
    pub errors: Vec<SchedError>,
}

/// Runs tasks on host threads under a [`Scheduler`]. See the [module docs](self).
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use vmkit_sched::{CreditConfig, CreditScheduler, Executor, Outcome, Slice, Task, VmConfig};
///
/// struct Countdown(Arc<AtomicU64>);
/// impl Task for Countdown {
///     fn run(&mut self, slice: &Slice) -> Outcome {
///         while !slice.expired() {
///             if self.0.fetch_sub(1, Ordering::Relaxed) == 1 {
///                 return Outcome::Exited;
///             }
///         }
///         Outcome::SliceEnd
///     }
/// }
///
/// let ex = Executor::new(CreditScheduler::new(CreditConfig::with_cpus(2))?)?;
/// let vm = ex.add_vm(VmConfig::default())?;
/// for _ in 0..4 {
///     ex.spawn(vm, Countdown(Arc::new(AtomicU64::new(10_000))))?;
/// }
/// ex.wait_exited(4);
/// let m = ex.shutdown();
/// assert_eq!(m.exited, 4);
/// # Ok::<(), vmkit_sched::ExecutorError>(())
/// ```
pub struct Executor<S: Scheduler + 'static> {
    shared: Arc<Shared<S>>,
    threads: Vec<JoinHandle<()>>,
}

impl<S: Scheduler + 'static> std::fmt::Debug for Executor<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl<S: Scheduler + 'static> Executor<S> {
    /// Start one host thread per CPU of `sched`, charging wall time. They idle until tasks
    /// are spawned.
    pub fn new(sched: S) -> Result<Self, ExecutorError> {
        Self::with_accounting(sched, Accounting::Wall)
    }

    /// Start one host thread per CPU of `sched`, charging tasks as `accounting` says.
    pub fn with_accounting(sched: S, accounting: Accounting) -> Result<Self, ExecutorError> {
        let epoch = Instant::now();
        let cpus = sched.cpus();
        let shared = Arc::new(Shared {
            epoch,
            accounting,
            state: Mutex::new(State {
                sched,
                tasks: Vec::new(),
                latency: LatencyHistogram::new(),
                exited: 0,
                panicked: 0,
                errors: Vec::new(),
            }),
            workers: (0..cpus)
                .map(|_| Worker {
                    preempt: Preempt::new(epoch),
                    kick: Mutex::new(None),
                    thread: OnceLock::new(),
                })
                .collect(),
            shutdown: AtomicBool::new(false),
            exits: Condvar::new(),
        });
        let mut ex = Executor {
            shared,
            threads: Vec::with_capacity(cpus),
        };
        for cpu in 0..cpus {
            let shared = Arc::clone(&ex.shared);
            let handle = std::thread::Builder::new()
                .name(format!("vmkit-sched-{cpu}"))
                .spawn(move || shared.worker_loop(cpu))
                .map_err(|source| ExecutorError::Spawn { cpu, source })?;
            ex.threads.push(handle);
        }
        Ok(ex)
    }

    /// Add a VM.
    pub fn add_vm(&self, config: VmConfig) -> Result<VmId, ExecutorError> {
        Ok(lock(&self.shared.state).sched.add_vm(config)?)
    }

    /// Add `task` to `vm` and make it runnable. Returns its id and the [`Waker`] to use
    /// when it halts.
    pub fn spawn(
        &self,
        vm: VmId,
        task: impl Task + 'static,
    ) -> Result<(TaskId, Waker), ExecutorError> {
        let now = self.shared.now();
        let id = {
            let mut st = lock(&self.shared.state);
            let id = st.sched.add_task(vm, now)?;
            if st.tasks.len() <= id.index() {
                st.tasks.resize_with(id.index() + 1, || None);
            }
            if let Some(slot) = st.tasks.get_mut(id.index()) {
                *slot = Some(Box::new(task));
            }
            id
        };
        let waker = self.waker(id);
        waker.wake()?;
        Ok((id, waker))
    }

    /// A waker for `task`.
    pub fn waker(&self, task: TaskId) -> Waker {
        let target: Arc<dyn WakeTarget> = self.shared.clone();
        Waker { task, target }
    }

    /// Block until at least `count` tasks have exited.
    pub fn wait_exited(&self, count: usize) {
        let mut st = lock(&self.shared.state);
        while st.exited < count {
            st = self
                .shared
                .exits
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Nanoseconds of CPU time charged to `vm` so far.
    pub fn vm_service(&self, vm: VmId) -> Result<Nanos, ExecutorError> {
        Ok(lock(&self.shared.state).sched.vm_service(vm)?)
    }

    /// A snapshot of what the executor has measured so far.
    pub fn metrics(&self) -> ExecutorMetrics {
        let elapsed = self.shared.epoch.elapsed();
        let st = lock(&self.shared.state);
        let cpus = st.sched.cpus();
        let mut vm_service = Vec::with_capacity(st.sched.vm_count());
        let mut demands = Vec::with_capacity(st.sched.vm_count());
        for i in 0..st.sched.vm_count() {
            let vm = VmId(u32::try_from(i).unwrap_or(u32::MAX));
            vm_service.push(st.sched.vm_service(vm).unwrap_or(0));
            let (weight, cap) = st.sched.vm_config(vm).map_or((0.0, 0.0), |c| {
                (
                    f64::from(c.weight),
                    c.cap_percent
                        .map_or(f64::INFINITY, |p| f64::from(p) / 100.0),
                )
            });
            let live = st.sched.live_tasks(vm).unwrap_or(0) as f64;
            demands.push(Demand {
                weight,
                limit: live.min(cap),
            });
        }
        let entitlement = entitlements(cpus as f64, &demands);
        let service: Vec<f64> = vm_service.iter().map(|&s| s as f64).collect();
        let stats = st.sched.stats();
        let secs = elapsed.as_secs_f64();
        ExecutorMetrics {
            elapsed,
            fairness: FairnessReport::new(&service, &entitlement),
            vm_service,
            entitlement,
            latency: st.latency.clone(),
            decisions_per_sec: if secs > 0.0 {
                stats.decisions as f64 / secs
            } else {
                0.0
            },
            exited: st.exited,
            panicked: st.panicked,
            stats,
            errors: st.errors.clone(),
        }
    }

    /// Stop all host threads (cutting running slices) and return the final metrics. Tasks
    /// that have not exited are dropped.
    pub fn shutdown(mut self) -> ExecutorMetrics {
        self.stop();
        self.metrics()
    }

    fn stop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        for w in &self.shared.workers {
            w.preempt.cut_now();
            if let Some(k) = lock(&w.kick).as_ref() {
                k.kick();
            }
            if let Some(t) = w.thread.get() {
                t.unpark();
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Drop the tasks that never exited now (outside the lock: a task's drop may take
        // locks of its own), not when the last `Waker` goes: a task that holds its own
        // waker would otherwise keep itself alive.
        let tasks = std::mem::take(&mut lock(&self.shared.state).tasks);
        drop(tasks);
    }
}

impl<S: Scheduler + 'static> Drop for Executor<S> {
    fn drop(&mut self) {
        self.stop();
    }
}
