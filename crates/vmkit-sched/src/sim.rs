//! A deterministic discrete-event simulator that drives any [`Scheduler`].
//!
//! The simulator replaces the executor's host threads and wall clock by a virtual clock and
//! an event queue, and the tasks by [`Behaviour`] models (CPU-bound, run-then-halt,
//! yield-before-tick, finite work). It calls the scheduler exactly as the
//! [`Executor`](crate::Executor) does (`pick`, `finish` with the time actually run, `wake`,
//! honouring `Kick` and `Preempt`), so it measures the scheduler code that ships, and because
//! nothing in it depends on real time, every run with the same inputs gives the same result
//! to the nanosecond.
//!
//! Tasks stop exactly when their slice ends or is cut, so the simulator shows the scheduler's
//! own accuracy; a real executor adds the time tasks take to notice a preemption.
//!
//! The simulator measures independently of the scheduler's bookkeeping: it adds up the time
//! each task spent on a simulated CPU and splits it over accounting periods itself, so a
//! scheduler that mis-charged time would be caught, not believed.
//!
//! ```
//! use vmkit_sched::{Behaviour, CreditConfig, CreditScheduler, Simulation, VmConfig};
//!
//! let sched = CreditScheduler::new(CreditConfig::with_cpus(2))?;
//! let mut sim = Simulation::new(sched, 10_000_000);
//! let a = sim.add_vm(VmConfig::weighted(100))?;
//! let b = sim.add_vm(VmConfig::weighted(300))?;
//! for vm in [a, b] {
//!     for _ in 0..2 {
//!         sim.add_task(vm, Behaviour::CpuBound)?;
//!     }
//! }
//! sim.run_until(2_000_000_000)?;
//! let r = sim.report();
//! let ratio = r.vm_service[b.index()] as f64 / r.vm_service[a.index()] as f64;
//! assert!((ratio - 3.0).abs() < 0.06, "{ratio}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::metrics::{entitlements, Demand, LatencyHistogram};
use crate::scheduler::{
    Decision, Nanos, SchedError, SchedStats, Scheduler, TaskId, VmConfig, VmId, WakeAction,
};
use crate::task::Outcome;

/// How a simulated task behaves when it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Always runnable: uses every slice to the end.
    CpuBound,
    /// Runs `run` nanoseconds of CPU, then halts for `sleep` nanoseconds of wall time
    /// (a vCPU that handles an interrupt and waits for the next), forever. A task that
    /// sleeps briefly and often is the "sleep to get boosted" gamer.
    Bursty {
        /// CPU time per burst.
        run: Nanos,
        /// Sleep between bursts.
        sleep: Nanos,
    },
    /// Runs until `margin` nanoseconds before the next multiple of `tick`, then yields: the
    /// gamer that defeats tick-sampled accounting.
    YieldBeforeTick {
        /// The tick it tries to dodge.
        tick: Nanos,
        /// How long before the tick it yields.
        margin: Nanos,
    },
    /// Runs `work` nanoseconds of CPU in total, then exits.
    Finite {
        /// Total CPU time.
        work: Nanos,
    },
}

impl Behaviour {
    fn initial_remaining(self) -> Nanos {
        match self {
            Behaviour::Bursty { run, .. } => run,
            Behaviour::Finite { work } => work,
            Behaviour::CpuBound | Behaviour::YieldBeforeTick { .. } => Nanos::MAX,
        }
    }
}

/// Errors of the simulator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SimError {
    /// The scheduler refused a call: a bug in it or an invalid VM/task setup.
    #[error("scheduler error at t={at} ns: {source}")]
    Sched {
        /// Virtual time of the failing call.
        at: Nanos,
        /// What the scheduler said.
        source: SchedError,
    },
    /// A behaviour parameter that would stall the simulation.
    #[error("invalid behaviour {0:?}: run, tick and work must be positive and margin < tick")]
    InvalidBehaviour(Behaviour),
    /// A wake was scheduled in the past.
    #[error("cannot schedule a wake at t={at} ns: the clock is already at {now} ns")]
    WakeInPast {
        /// The requested time.
        at: Nanos,
        /// The current virtual time.
        now: Nanos,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Pick { cpu: usize, gen: u64 },
    SliceEnd { cpu: usize, gen: u64 },
    Wake { task: usize },
}

#[derive(Clone, Copy, Debug)]
struct SimRun {
    task: usize,
    start: Nanos,
    end: Nanos,
    natural_end: Nanos,
    natural_outcome: Outcome,
}

#[derive(Clone, Copy, Debug, Default)]
struct SimCpu {
    gen: u64,
    running: Option<SimRun>,
}

#[derive(Clone, Debug)]
struct SimTask {
    id: TaskId,
    vm: usize,
    behaviour: Behaviour,
    remaining: Nanos,
    service: Nanos,
}

/// What a simulation measured.
#[derive(Clone, Debug, PartialEq)]
pub struct SimReport {
    /// Virtual time reached.
    pub now: Nanos,
    /// CPU time each VM got (including slices still running), by VM index.
    pub vm_service: Vec<Nanos>,
    /// CPU time each task got (including slices still running), by task index.
    pub task_service: Vec<Nanos>,
    /// CPU time each VM got in each accounting period (completed slices only), by VM index
    /// then period index.
    pub vm_period_usage: Vec<Vec<Nanos>>,
    /// Wake-to-run latency of every wake, all VMs together.
    pub latency: LatencyHistogram,
    /// Wake-to-run latency per VM.
    pub vm_latency: Vec<LatencyHistogram>,
    /// The scheduler's counters.
    pub stats: SchedStats,
}

/// A discrete-event simulation of `S` on its host CPUs. See the [module docs](self).
#[derive(Debug)]
pub struct Simulation<S: Scheduler> {
    sched: S,
    now: Nanos,
    seq: u64,
    events: BinaryHeap<Reverse<(Nanos, u64, Event)>>,
    cpus: Vec<SimCpu>,
    tasks: Vec<SimTask>,
    period: Nanos,
    vm_period_usage: Vec<Vec<Nanos>>,
    latency: LatencyHistogram,
    vm_latency: Vec<LatencyHistogram>,
}

impl<S: Scheduler> Simulation<S> {
    /// A simulation of `sched` at virtual time 0. `period` is the length of the periods over
    /// which [`SimReport::vm_period_usage`] is measured (use the scheduler's cap period).
    pub fn new(sched: S, period: Nanos) -> Self {
        let cpus = vec![SimCpu::default(); sched.cpus()];
        let mut sim = Simulation {
            sched,
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            cpus,
            tasks: Vec::new(),
            period: period.max(1),
            vm_period_usage: Vec::new(),
            latency: LatencyHistogram::new(),
            vm_latency: Vec::new(),
        };
        for cpu in 0..sim.cpus.len() {
            sim.push(0, Event::Pick { cpu, gen: 0 });
        }
        sim
    }

    /// The scheduler under test.
    pub fn scheduler(&self) -> &S {
        &self.sched
    }

    /// The current virtual time.
    pub fn now(&self) -> Nanos {
        self.now
    }

    fn push(&mut self, at: Nanos, event: Event) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, event)));
    }

    fn sched_err(&self, source: SchedError) -> SimError {
        SimError::Sched {
            at: self.now,
            source,
        }
    }

    /// Add a VM.
    pub fn add_vm(&mut self, config: VmConfig) -> Result<VmId, SimError> {
        let vm = self.sched.add_vm(config).map_err(|e| self.sched_err(e))?;
        self.vm_period_usage.push(Vec::new());
        self.vm_latency.push(LatencyHistogram::new());
        Ok(vm)
    }

    /// Add a task to `vm`, runnable from now on.
    pub fn add_task(&mut self, vm: VmId, behaviour: Behaviour) -> Result<TaskId, SimError> {
        let valid = match behaviour {
            Behaviour::CpuBound => true,
            Behaviour::Bursty { run, .. } => run > 0,
            Behaviour::YieldBeforeTick { tick, margin } => tick > 0 && margin < tick,
            Behaviour::Finite { work } => work > 0,
        };
        if !valid {
            return Err(SimError::InvalidBehaviour(behaviour));
        }
        let id = self
            .sched
            .add_task(vm, self.now)
            .map_err(|e| self.sched_err(e))?;
        self.tasks.push(SimTask {
            id,
            vm: vm.index(),
            behaviour,
            remaining: behaviour.initial_remaining(),
            service: 0,
        });
        self.push(self.now, Event::Wake { task: id.index() });
        Ok(id)
    }

    /// Wake `task` at virtual time `at` (an interrupt injected from outside).
    pub fn schedule_wake(&mut self, task: TaskId, at: Nanos) -> Result<(), SimError> {
        if at < self.now {
            return Err(SimError::WakeInPast { at, now: self.now });
        }
        if task.index() >= self.tasks.len() {
            return Err(self.sched_err(SchedError::UnknownTask(task.index())));
        }
        self.push(at, Event::Wake { task: task.index() });
        Ok(())
    }

    /// Process every event up to and including virtual time `until`.
    pub fn run_until(&mut self, until: Nanos) -> Result<(), SimError> {
        while let Some(&Reverse((at, _, event))) = self.events.peek() {
            if at > until {
                break;
            }
            self.events.pop();
            self.now = at;
            self.handle(event)?;
        }
        self.now = self.now.max(until);
        Ok(())
    }

    fn handle(&mut self, event: Event) -> Result<(), SimError> {
        match event {
            Event::Pick { cpu, gen } => {
                let Some(c) = self.cpus.get(cpu) else {
                    return Ok(());
                };
                if c.gen != gen || c.running.is_some() {
                    return Ok(());
                }
                self.pick(cpu)
            }
            Event::SliceEnd { cpu, gen } => {
                let Some(c) = self.cpus.get(cpu) else {
                    return Ok(());
                };
                if c.gen != gen {
                    return Ok(());
                }
                self.slice_end(cpu)
            }
            Event::Wake { task } => self.wake(task),
        }
    }

    fn pick(&mut self, cpu: usize) -> Result<(), SimError> {
        let now = self.now;
        match self.sched.pick(cpu, now).map_err(|e| self.sched_err(e))? {
            Decision::Idle { until } => {
                if let Some(u) = until {
                    let gen = self.cpus.get(cpu).map_or(0, |c| c.gen);
                    self.push(u.max(now.saturating_add(1)), Event::Pick { cpu, gen });
                }
            }
            Decision::Run {
                task,
                slice,
                wake_latency,
            } => {
                let t = self
                    .tasks
                    .get(task.index())
                    .ok_or_else(|| self.sched_err(SchedError::UnknownTask(task.index())))?;
                if let Some(l) = wake_latency {
                    self.latency.record(l);
                    if let Some(h) = self.vm_latency.get_mut(t.vm) {
                        h.record(l);
                    }
                }
                let (natural_len, natural_outcome) = match t.behaviour {
                    Behaviour::CpuBound => (Nanos::MAX, Outcome::SliceEnd),
                    Behaviour::Bursty { .. } => (t.remaining.max(1), Outcome::Blocked),
                    Behaviour::Finite { .. } => (t.remaining.max(1), Outcome::Exited),
                    Behaviour::YieldBeforeTick { tick, margin } => {
                        let mut next = (now / tick + 1) * tick - margin;
                        if next <= now {
                            next += tick;
                        }
                        (next - now, Outcome::Yielded)
                    }
                };
                let natural_end = now.saturating_add(natural_len);
                let end = natural_end.min(now.saturating_add(slice.max(1)));
                if let Some(c) = self.cpus.get_mut(cpu) {
                    c.gen += 1;
                    c.running = Some(SimRun {
                        task: task.index(),
                        start: now,
                        end,
                        natural_end,
                        natural_outcome,
                    });
                    let gen = c.gen;
                    self.push(end, Event::SliceEnd { cpu, gen });
                }
            }
        }
        Ok(())
    }

    fn record_usage(&mut self, vm: usize, start: Nanos, end: Nanos) {
        let period = self.period;
        let Some(usage) = self.vm_period_usage.get_mut(vm) else {
            return;
        };
        let mut t = start;
        while t < end {
            let idx = (t / period) as usize;
            let boundary = (t / period + 1).saturating_mul(period);
            let chunk_end = end.min(boundary);
            if usage.len() <= idx {
                usage.resize(idx + 1, 0);
            }
            if let Some(u) = usage.get_mut(idx) {
                *u += chunk_end - t;
            }
            t = chunk_end;
        }
    }

    fn slice_end(&mut self, cpu: usize) -> Result<(), SimError> {
        let now = self.now;
        let Some(run) = self.cpus.get_mut(cpu).and_then(|c| c.running.take()) else {
            return Ok(());
        };
        let ran = now - run.start;
        let outcome = if now >= run.natural_end {
            run.natural_outcome
        } else {
            Outcome::SliceEnd
        };
        let Some(task) = self.tasks.get_mut(run.task) else {
            return Ok(());
        };
        task.service += ran;
        if task.remaining != Nanos::MAX {
            task.remaining = task.remaining.saturating_sub(ran);
        }
        let mut wake_at = None;
        if let (Outcome::Blocked, Behaviour::Bursty { run: burst, sleep }) =
            (outcome, task.behaviour)
        {
            task.remaining = burst;
            wake_at = Some(now.saturating_add(sleep));
        }
        let vm = task.vm;
        let task_index = task.id.index();
        self.record_usage(vm, run.start, now);
        self.sched
            .finish(cpu, ran, outcome, now)
            .map_err(|e| self.sched_err(e))?;
        if let Some(at) = wake_at {
            self.push(at, Event::Wake { task: task_index });
        }
        let gen = self.cpus.get(cpu).map_or(0, |c| c.gen);
        self.push(now, Event::Pick { cpu, gen });
        Ok(())
    }

    fn wake(&mut self, task: usize) -> Result<(), SimError> {
        let now = self.now;
        let Some(id) = self.tasks.get(task).map(|t| t.id) else {
            return Ok(());
        };
        match self.sched.wake(id, now).map_err(|e| self.sched_err(e))? {
            WakeAction::None => {}
            WakeAction::Kick { cpu } => {
                if let Some(c) = self.cpus.get_mut(cpu) {
                    if c.running.is_none() {
                        c.gen += 1;
                        let gen = c.gen;
                        self.push(now, Event::Pick { cpu, gen });
                    }
                }
            }
            WakeAction::Preempt { cpu, at } => {
                if let Some(c) = self.cpus.get_mut(cpu) {
                    if let Some(run) = c.running.as_mut() {
                        let at = at.max(now);
                        if at < run.end {
                            run.end = at;
                            c.gen += 1;
                            let gen = c.gen;
                            self.push(at, Event::SliceEnd { cpu, gen });
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// What each VM is entitled to (in CPUs) if all its tasks were CPU-bound: weighted
    /// max-min fair shares limited by caps and vCPU counts.
    pub fn entitlements(&self) -> Result<Vec<f64>, SimError> {
        let mut demands = Vec::with_capacity(self.vm_period_usage.len());
        for vm in 0..self.vm_period_usage.len() {
            let id = VmId(u32::try_from(vm).unwrap_or(u32::MAX));
            let cfg = self.sched.vm_config(id).map_err(|e| self.sched_err(e))?;
            let vcpus = self.tasks.iter().filter(|t| t.vm == vm).count() as f64;
            let cap = cfg
                .cap_percent
                .map_or(f64::INFINITY, |c| f64::from(c) / 100.0);
            demands.push(Demand {
                weight: f64::from(cfg.weight),
                limit: vcpus.min(cap),
            });
        }
        Ok(entitlements(self.cpus.len() as f64, &demands))
    }

    /// Forget the wake latencies recorded so far, e.g. at the end of a warm-up in which
    /// VMs that have not run yet legitimately go first.
    pub fn clear_latency(&mut self) {
        self.latency = LatencyHistogram::new();
        for h in &mut self.vm_latency {
            *h = LatencyHistogram::new();
        }
    }

    /// What has been measured so far.
    pub fn report(&self) -> SimReport {
        let mut task_service: Vec<Nanos> = self.tasks.iter().map(|t| t.service).collect();
        for c in &self.cpus {
            if let Some(run) = c.running {
                if let Some(s) = task_service.get_mut(run.task) {
                    *s += self.now.saturating_sub(run.start).min(run.end - run.start);
                }
            }
        }
        let mut vm_service = vec![0; self.vm_period_usage.len()];
        for (t, s) in self.tasks.iter().zip(&task_service) {
            if let Some(v) = vm_service.get_mut(t.vm) {
                *v += s;
            }
        }
        SimReport {
            now: self.now,
            vm_service,
            task_service,
            vm_period_usage: self.vm_period_usage.clone(),
            latency: self.latency.clone(),
            vm_latency: self.vm_latency.clone(),
            stats: self.sched.stats(),
        }
    }
}
