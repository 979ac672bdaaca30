//! Running vmkit-vcpu vCPUs as scheduler tasks (feature `vcpu`, on by default).
//!
//! The scheduler core knows nothing about hypervisors; this module is the adapter a VMM
//! needs to hand its vCPUs to an [`Executor`](crate::Executor):
//!
//! - [`VcpuTask`] wraps one [`Vcpu`] and its exit [`Dispatcher`]. Its [`Task::run`] arms
//!   the [`SliceTimer`] for the slice deadline, then runs the vCPU, letting the dispatcher
//!   handle port I/O, MMIO, hypercalls and MSRs, until the slice is over. A guest `HLT` that
//!   reaches user space (no in-kernel irqchip) makes the task [`Outcome::Blocked`]: whoever
//!   raises the guest's interrupt wakes it through its [`Waker`]. A shutdown,
//!   reset, crash or failure ends the task and is recorded as its [`VcpuEnd`].
//! - A vCPU inside `KVM_RUN` cannot poll [`Slice::expired`], so one [`SliceTimer`] thread
//!   kicks every vCPU whose slice deadline has passed, and the executor's own preemption
//!   kicks through [`Task::kick_handle`]. A kick that arrives after the task already left
//!   the guest makes the next entry return at once; the task then sees its slice is not
//!   over, counts the stale kick and re-enters.
//! - With KVM's in-kernel irqchip a guest `HLT` sleeps inside `KVM_RUN` instead of
//!   exiting; [`VcpuTask::with_kernel_halts`] makes the slice timer watch the vCPU's
//!   `blocking` stat, kick it out once it sleeps, and park it until an interrupt, its LAPIC
//!   timer or a bounded re-poll wakes it. The model and why no wakeup is lost are in
//!   [`crate::halt`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use vmkit_vcpu::dispatch::{Action, Dispatcher};
use vmkit_vcpu::{Vcpu, VcpuKick};

use crate::executor::Waker;
use crate::halt::{HaltProbe, KernelHalts, HALT_TICK, HALT_TICKS};
use crate::task::{Kick, Outcome, Slice, Task};

/// One thread that kicks vCPUs whose slice deadline has passed.
///
/// Tasks arm it before entering the guest and disarm it when they return; one thread
/// serves every task of an executor.
pub struct SliceTimer<K: VcpuKick + 'static> {
    state: Mutex<TimerState<K>>,
    changed: Condvar,
}

/// One armed slot: the slice deadline, the kick, and the halt probe the thread reads while
/// the vCPU is in the guest (with how many consecutive ticks it read "blocking").
struct Armed<K> {
    deadline: Instant,
    kick: K,
    probe: Option<Arc<HaltProbe>>,
    blocking_ticks: u32,
}

struct TimerState<K> {
    armed: HashMap<usize, Armed<K>>,
    /// Slots whose vCPU was kicked because its probe saw it halted in the kernel; taken by
    /// the task ([`SliceTimer::take_halt_kick`]).
    halt_kicked: HashSet<usize>,
    /// Timed wakes of parked vCPUs: slot -> (when, waker).
    wakes: HashMap<usize, (Instant, Waker)>,
    /// Earlier deadlines asked for while a slot was not armed (a deferred cut racing the
    /// task's own arm): the next `arm` of the slot honours them.
    pending: HashMap<usize, Instant>,
    next_slot: usize,
    stop: bool,
    fired: u64,
}

/// What [`SliceTimer::park_if_halted`] found after a vCPU left the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaltCheck {
    /// Not kicked for a halt: handle the exit as usual.
    NotHalted,
    /// Parked, its timed wake armed: the task returns [`Outcome::Blocked`].
    Parked,
    /// Kicked for a halt but runnable after all: watched again, re-enter the guest.
    Runnable,
}

/// A task's place in a [`SliceTimer`], handed out by [`SliceTimer::register`] so that no two
/// tasks share one (they would disarm each other's kicks).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TimerSlot(usize);

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
                halt_kicked: HashSet::new(),
                wakes: HashMap::new(),
                pending: HashMap::new(),
                next_slot: 0,
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
        // Halt probes are read once per HALT_TICK, however often arms and wakes rouse this
        // thread: `blocking_ticks` counts ticks, so a halt is parked only after it lasted them.
        let mut next_probe = Instant::now();
        loop {
            if st.stop {
                return;
            }
            let now = Instant::now();
            let probe_now = now >= next_probe;
            if probe_now {
                next_probe = now + HALT_TICK;
            }
            let mut next: Option<Instant> = None;
            let mut earliest = |at: Instant| next = Some(next.map_or(at, |n: Instant| n.min(at)));
            let mut fired = 0;
            let mut halted = Vec::new();
            st.armed.retain(|slot, a| {
                if a.deadline <= now {
                    a.kick.kick();
                    fired += 1;
                    return false;
                }
                earliest(a.deadline);
                if let Some(p) = &a.probe {
                    if !probe_now {
                        earliest(next_probe);
                        return true;
                    }
                    if p.blocking() {
                        a.blocking_ticks += 1;
                        if a.blocking_ticks >= HALT_TICKS {
                            // Kicked once; the probe is not read again until re-armed.
                            p.note_halt_kick();
                            a.kick.kick();
                            a.probe = None;
                            halted.push(*slot);
                            return true;
                        }
                    } else {
                        a.blocking_ticks = 0;
                    }
                    earliest(now + HALT_TICK);
                }
                true
            });
            st.fired += fired;
            st.halt_kicked.extend(halted);
            let mut due = Vec::new();
            st.wakes.retain(|_, (at, waker)| {
                if *at <= now {
                    due.push(waker.clone());
                    false
                } else {
                    earliest(*at);
                    true
                }
            });
            if !due.is_empty() {
                // Outside the lock: a wake takes the executor's lock, and the executor calls
                // back into this timer (`kick_at`) under its own locks.
                drop(st);
                for w in due {
                    // The only error is an unknown task, which an executor's waker is not.
                    let _ = w.wake();
                }
                st = self.lock();
                continue;
            }
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

    /// A new slot for one task.
    pub fn register(&self) -> TimerSlot {
        let mut st = self.lock();
        let slot = st.next_slot;
        st.next_slot = st.next_slot.wrapping_add(1);
        TimerSlot(slot)
    }

    /// Kicks `kick` at `deadline` (or at an earlier deadline [`SliceTimer::arm_earlier`]
    /// recorded for the slot) unless [`SliceTimer::disarm`]ed first; re-arming replaces the
    /// slot's deadline.
    pub fn arm(&self, slot: &TimerSlot, deadline: Instant, kick: K) {
        self.arm_watching(slot, deadline, kick, None);
    }

    /// Like [`SliceTimer::arm`], and while armed, reads `probe` every [`HALT_TICK`]: a vCPU
    /// found asleep in the kernel for [`HALT_TICKS`] ticks in a row is kicked and the slot
    /// marked for [`SliceTimer::take_halt_kick`]. The slice deadline stays armed. Call it
    /// right before the vCPU enters the guest: it also tells `probe` that the vCPU is back
    /// in the guest, where [`KernelHalts::wake`](crate::halt::KernelHalts::wake) need not
    /// reach it through the scheduler.
    pub fn arm_watching(
        &self,
        slot: &TimerSlot,
        deadline: Instant,
        kick: K,
        probe: Option<Arc<HaltProbe>>,
    ) {
        if let Some(p) = &probe {
            p.note_entry();
        }
        let mut st = self.lock();
        let deadline = match st.pending.remove(&slot.0) {
            Some(earlier) => deadline.min(earlier),
            None => deadline,
        };
        st.halt_kicked.remove(&slot.0);
        st.armed.insert(
            slot.0,
            Armed {
                deadline,
                kick,
                probe,
                blocking_ticks: 0,
            },
        );
        drop(st);
        self.changed.notify_one();
    }

    /// The executor's kick hook for the task that owns `slot` (its
    /// [`Task::kick_handle`]): `kick` now, or this timer for a deferred cut at the slice
    /// end the scheduler asks for.
    pub fn kick_hook(self: &Arc<Self>, slot: &Arc<TimerSlot>, kick: K) -> Arc<dyn Kick> {
        Arc::new(VcpuKickHook {
            kick,
            timer: Arc::clone(self),
            slot: Arc::clone(slot),
        })
    }

    /// Whether the slot's vCPU was kicked because it was halted in the kernel (clears the
    /// mark).
    pub fn take_halt_kick(&self, slot: &TimerSlot) -> bool {
        self.lock().halt_kicked.remove(&slot.0)
    }

    /// Calls `waker` at `at` (replacing the slot's earlier timed wake) unless
    /// [`SliceTimer::cancel_wake`] comes first: how a parked vCPU is re-polled.
    pub fn wake_at(&self, slot: &TimerSlot, at: Instant, waker: Waker) {
        self.lock().wakes.insert(slot.0, (at, waker));
        self.changed.notify_one();
    }

    /// The park sequence after a vCPU watched with `halts` left the guest (see "Why no wakeup
    /// is lost" in [`crate::halt`]): if the timer kicked it for an in-kernel halt and the vCPU
    /// is still waiting, arm its timed wake and report [`HaltCheck::Parked`] (the task must
    /// return [`Outcome::Blocked`]); if it turned runnable, watch it again until `deadline`.
    pub fn park_if_halted<V: Vcpu<Kick = K>>(
        &self,
        slot: &TimerSlot,
        halts: &KernelHalts,
        vcpu: &V,
        deadline: Instant,
    ) -> HaltCheck {
        if !self.take_halt_kick(slot) {
            return HaltCheck::NotHalted;
        }
        if let Some((at, waker)) = halts.park(vcpu) {
            // Armed before the task returns Blocked.
            self.wake_at(slot, at, waker);
            return HaltCheck::Parked;
        }
        self.arm_watching(slot, deadline, vcpu.kick_handle(), halts.probe());
        HaltCheck::Runnable
    }

    /// Cancels the slot's timed wake, if any.
    pub fn cancel_wake(&self, slot: &TimerSlot) {
        self.lock().wakes.remove(&slot.0);
    }

    /// Moves the slot's kick earlier, to `at`, if that is earlier than what it is armed for;
    /// if the slot is not armed right now, its next [`SliceTimer::arm`] honours `at`.
    pub fn arm_earlier(&self, slot: &TimerSlot, at: Instant) {
        let mut st = self.lock();
        match st.armed.get_mut(&slot.0) {
            Some(a) => a.deadline = a.deadline.min(at),
            None => {
                let p = st.pending.entry(slot.0).or_insert(at);
                *p = (*p).min(at);
            }
        }
        drop(st);
        self.changed.notify_one();
    }

    /// Cancels the slot's pending kick and halt watch, if any.
    pub fn disarm(&self, slot: &TimerSlot) {
        let mut st = self.lock();
        st.armed.remove(&slot.0);
        st.pending.remove(&slot.0);
        st.halt_kicked.remove(&slot.0);
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
    /// Guest halts that blocked the task (user-space `HLT` exits, and in-kernel halts
    /// parked through [`VcpuTask::with_kernel_halts`]).
    pub halts: AtomicU64,
    /// Kicks that arrived when the slice was not over (re-entered at once).
    pub stale_kicks: AtomicU64,
}

/// The executor's kick hook: the vCPU's own kick now, or the slice timer for a deferred cut.
struct VcpuKickHook<K: VcpuKick + 'static> {
    kick: K,
    timer: Arc<SliceTimer<K>>,
    slot: Arc<TimerSlot>,
}

impl<K: VcpuKick + 'static> Kick for VcpuKickHook<K> {
    fn kick(&self) {
        self.kick.kick();
    }

    fn kick_at(&self, at: Instant) {
        self.timer.arm_earlier(&self.slot, at);
    }
}

/// One vCPU as a scheduler [`Task`] (see the module docs).
pub struct VcpuTask<V: Vcpu>
where
    V::Kick: 'static,
{
    slot: Arc<TimerSlot>,
    vcpu: V,
    dispatcher: Dispatcher,
    timer: Arc<SliceTimer<V::Kick>>,
    stats: Arc<VcpuTaskStats>,
    end: Arc<Mutex<Option<VcpuEnd>>>,
    halts: Option<KernelHalts>,
}

impl<V: Vcpu> std::fmt::Debug for VcpuTask<V>
where
    V::Kick: 'static,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuTask")
            .field("slot", &self.slot)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<V: Vcpu> VcpuTask<V>
where
    V::Kick: 'static,
{
    /// A task running `vcpu` with `dispatcher` handling its exits, kicked by `timer` at the
    /// end of each slice (or at a cut the scheduler deferred).
    pub fn new(vcpu: V, dispatcher: Dispatcher, timer: Arc<SliceTimer<V::Kick>>) -> Self {
        VcpuTask {
            slot: Arc::new(timer.register()),
            vcpu,
            dispatcher,
            timer,
            stats: Arc::new(VcpuTaskStats::default()),
            end: Arc::new(Mutex::new(None)),
            halts: None,
        }
    }

    /// Parks the vCPU when it halts inside the kernel (in-kernel irqchip), as
    /// [`crate::halt`] describes, instead of letting it hold its worker. Keep a clone of
    /// `halts` to hand it the task's waker after spawning.
    pub fn with_kernel_halts(mut self, halts: KernelHalts) -> Self {
        self.halts = Some(halts);
        self
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
        let probe = self.halts.as_ref().and_then(KernelHalts::probe);
        if self.halts.is_some() {
            // Running now: an earlier park's timed wake has done its job.
            self.timer.cancel_wake(&self.slot);
        }
        // `end` includes a cut already asked for; a later deferred cut comes through
        // `kick_at` (arm_earlier), before or after this arm.
        self.timer
            .arm_watching(&self.slot, slice.end(), self.vcpu.kick_handle(), probe);
        let outcome = loop {
            if slice.expired() {
                self.stats.slices.fetch_add(1, Ordering::Relaxed);
                break Outcome::SliceEnd;
            }
            match self.dispatcher.run(&mut self.vcpu) {
                Ok(Action::Continue) | Ok(Action::Interrupted) => {
                    if let Some(h) = &self.halts {
                        match self
                            .timer
                            .park_if_halted(&self.slot, h, &self.vcpu, slice.end())
                        {
                            HaltCheck::Parked => {
                                self.stats.halts.fetch_add(1, Ordering::Relaxed);
                                break Outcome::Blocked;
                            }
                            HaltCheck::Runnable => continue,
                            HaltCheck::NotHalted => {}
                        }
                    }
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
        self.timer.disarm(&self.slot);
        outcome
    }

    fn kick_handle(&self) -> Option<Arc<dyn Kick>> {
        Some(self.timer.kick_hook(&self.slot, self.vcpu.kick_handle()))
    }
}
