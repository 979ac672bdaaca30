//! Running vmkit-vcpu vCPUs as scheduler tasks (feature `vcpu`, on by default).
//!
//! The scheduler core knows nothing about hypervisors; this module is the adapter a VMM
//! needs to hand its vCPUs to an [`Executor`](crate::Executor):
//!
//! - [`VcpuTask`] wraps one [`Vcpu`] and its exit [`Dispatcher`]. Its [`Task::run`] arms
//!   the [`SliceTimer`] for the slice deadline, then runs the vCPU, letting the dispatcher
//!   handle port I/O, MMIO, hypercalls and MSRs, until the slice is over. A guest `HLT` that
//!   reaches user space (no in-kernel irqchip) makes the task [`Outcome::Blocked`]: whoever
//!   raises the guest's interrupt wakes it through its [`Waker`](crate::Waker). A shutdown,
//!   reset, crash or failure ends the task and is recorded as its [`VcpuEnd`].
//! - A vCPU inside `KVM_RUN` cannot poll [`Slice::expired`], so one [`SliceTimer`] thread
//!   kicks every vCPU whose slice deadline has passed, and the executor's own preemption
//!   kicks through [`Task::kick_handle`]. A kick that arrives after the task already left
//!   the guest makes the next entry return at once; the task then sees its slice is not
//!   over, counts the stale kick and re-enters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use vmkit_vcpu::dispatch::{Action, Dispatcher};
use vmkit_vcpu::{Vcpu, VcpuKick};

use crate::task::{Kick, Outcome, Slice, Task};

/// One thread that kicks vCPUs whose slice deadline has passed.
///
/// Tasks arm it before entering the guest and disarm it when they return; one thread
/// serves every task of an executor.
pub struct SliceTimer<K: VcpuKick + 'static> {
    state: Mutex<TimerState<K>>,
    changed: Condvar,
}

struct TimerState<K> {
    armed: HashMap<usize, (Instant, K)>,
    stop: bool,
    fired: u64,
}

impl<K: VcpuKick + 'static> std::fmt::Debug for SliceTimer<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("SliceTimer")
            .field("armed", &st.armed.len())
            .field("fired", &st.fired)
            .field("stop", &st.stop)
            .finish()
    }
}

impl<K: VcpuKick + 'static> SliceTimer<K> {
    /// Starts the timer thread. Call [`SliceTimer::stop`] and join the handle to end it.
    pub fn start() -> std::io::Result<(Arc<Self>, JoinHandle<()>)> {
        let timer = Arc::new(SliceTimer {
            state: Mutex::new(TimerState {
                armed: HashMap::new(),
                stop: false,
                fired: 0,
            }),
            changed: Condvar::new(),
        });
        let t = Arc::clone(&timer);
        let handle = std::thread::Builder::new()
            .name("vcpu-slice-timer".into())
            .spawn(move || t.run())?;
        Ok((timer, handle))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TimerState<K>> {
        // The state stays consistent across a panic (plain inserts and removes).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&self) {
        let mut st = self.lock();
        loop {
            if st.stop {
                return;
            }
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            let mut fired = 0;
            st.armed.retain(|_, (deadline, kick)| {
                if *deadline <= now {
                    kick.kick();
                    fired += 1;
                    false
                } else {
                    next = Some(next.map_or(*deadline, |n: Instant| n.min(*deadline)));
                    true
                }
            });
            st.fired += fired;
            st = match next {
                None => self
                    .changed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(n) => {
                    self.changed
                        .wait_timeout(st, n.saturating_duration_since(now))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// Kicks `kick` at `deadline` unless [`SliceTimer::disarm`]ed first (`id` names the
    /// task; re-arming replaces its deadline).
    pub fn arm(&self, id: usize, deadline: Instant, kick: K) {
        self.lock().armed.insert(id, (deadline, kick));
        self.changed.notify_one();
    }

    /// Cancels task `id`'s pending kick, if any.
    pub fn disarm(&self, id: usize) {
        self.lock().armed.remove(&id);
    }

    /// Kicks delivered so far.
    pub fn fired(&self) -> u64 {
        self.lock().fired
    }

    /// Ends the timer thread; returns the kicks it delivered.
    pub fn stop(&self) -> u64 {
        let mut st = self.lock();
        st.stop = true;
        self.changed.notify_one();
        st.fired
    }
}

/// Why a [`VcpuTask`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest shut down (power-off or triple fault).
    Shutdown,
    /// The guest asked for a reset.
    Reset,
    /// The guest reported a crash.
    Crash,
    /// Something the run loop cannot continue from: a failed entry, an internal error, an
    /// unknown exit, a debug event nobody asked for, or a backend error.
    Failed(String),
}

/// Counters of one [`VcpuTask`], readable from other threads.
#[derive(Debug, Default)]
pub struct VcpuTaskStats {
    /// Slices that ended because the slice was over.
    pub slices: AtomicU64,
    /// Guest halts that blocked the task.
    pub halts: AtomicU64,
    /// Kicks that arrived when the slice was not over (re-entered at once).
    pub stale_kicks: AtomicU64,
}

/// The executor's kick hook, backed by the vCPU's own kick.
struct VcpuKickHook<K>(K);

impl<K: VcpuKick> Kick for VcpuKickHook<K> {
    fn kick(&self) {
        self.0.kick();
    }
}

/// One vCPU as a scheduler [`Task`] (see the module docs).
pub struct VcpuTask<V: Vcpu>
where
    V::Kick: 'static,
{
    id: usize,
    vcpu: V,
    dispatcher: Dispatcher,
    timer: Arc<SliceTimer<V::Kick>>,
    stats: Arc<VcpuTaskStats>,
    end: Arc<Mutex<Option<VcpuEnd>>>,
}

impl<V: Vcpu> std::fmt::Debug for VcpuTask<V>
where
    V::Kick: 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuTask")
            .field("id", &self.id)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<V: Vcpu> VcpuTask<V>
where
    V::Kick: 'static,
{
    /// A task running `vcpu` with `dispatcher` handling its exits. `id` must be unique
    /// among the tasks sharing `timer`.
    pub fn new(
        id: usize,
        vcpu: V,
        dispatcher: Dispatcher,
        timer: Arc<SliceTimer<V::Kick>>,
    ) -> Self {
        VcpuTask {
            id,
            vcpu,
            dispatcher,
            timer,
            stats: Arc::new(VcpuTaskStats::default()),
            end: Arc::new(Mutex::new(None)),
        }
    }

    /// The task's counters (share the `Arc` before spawning the task).
    pub fn stats(&self) -> Arc<VcpuTaskStats> {
        Arc::clone(&self.stats)
    }

    /// Where the task records why it ended (share the `Arc` before spawning the task).
    pub fn end(&self) -> Arc<Mutex<Option<VcpuEnd>>> {
        Arc::clone(&self.end)
    }

    fn finish(&self, why: VcpuEnd) -> Outcome {
        *self.end.lock().unwrap_or_else(PoisonError::into_inner) = Some(why);
        Outcome::Exited
    }
}

impl<V: Vcpu> Task for VcpuTask<V>
where
    V::Kick: 'static,
{
    fn run(&mut self, slice: &Slice) -> Outcome {
        self.timer
            .arm(self.id, slice.deadline(), self.vcpu.kick_handle());
        let outcome = loop {
            if slice.expired() {
                self.stats.slices.fetch_add(1, Ordering::Relaxed);
                break Outcome::SliceEnd;
            }
            match self.dispatcher.run(&mut self.vcpu) {
                Ok(Action::Continue) | Ok(Action::Interrupted) => {
                    if !slice.expired() {
                        self.stats.stale_kicks.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Action::Halt) => {
                    self.stats.halts.fetch_add(1, Ordering::Relaxed);
                    break Outcome::Blocked;
                }
                Ok(Action::Shutdown) => break self.finish(VcpuEnd::Shutdown),
                Ok(Action::Reset) => break self.finish(VcpuEnd::Reset),
                Ok(Action::Crash) => break self.finish(VcpuEnd::Crash),
                Ok(other) => break self.finish(VcpuEnd::Failed(format!("{other:?}"))),
                Err(e) => break self.finish(VcpuEnd::Failed(e.to_string())),
            }
        };
        self.timer.disarm(self.id);
        outcome
    }

    fn kick_handle(&self) -> Option<Arc<dyn Kick>> {
        Some(Arc::new(VcpuKickHook(self.vcpu.kick_handle())))
    }
}
