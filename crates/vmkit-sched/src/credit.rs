//! The credit scheduler: weighted, capped, two-level fair sharing with a wake-up boost.
//!
//! # Model
//!
//! The anchors are Xen's credit and credit2 schedulers. Like them, each VM has a **weight**
//! and an optional **cap**, vCPUs inside a VM share the VM's time, slices have a minimum
//! length (the **rate limit**) and a vCPU woken by an interrupt is **boosted** so that it runs
//! soon. Unlike credit1, credit is not handed out and sampled at 10 ms ticks; it is kept as
//! *virtual time*, which is what credit2 converges to and what makes the accounting exact.
//!
//! **Credits as virtual time.** Every VM has a virtual time `vtime`. When one of its tasks
//! runs for `ran` nanoseconds, the VM's `vtime` advances by `ran * 256 / weight`: a VM of
//! weight 512 ages half as fast as one of weight 256. The scheduler always prefers the VM
//! with the smallest `vtime`, so over any busy interval all runnable VMs' virtual times stay
//! within a small bound of each other and their CPU times stay proportional to their
//! weights. A VM's *credit* is how far it is behind: `sys_vtime - vtime`, converted back to
//! nanoseconds with its weight ([`CreditScheduler::vm_credit`]). Positive credit means "has
//! used less than its share".
//!
//! **Two levels.** The same rule applies inside a VM: every task (vCPU) has its own virtual
//! time (in plain nanoseconds, since vCPUs of one VM are equal) and the VM runs its task
//! with the least. A VM with four runnable vCPUs does not get more than a VM with one; it
//! spreads the same share over four.
//!
//! **Charging.** When a slice is handed out, the VM and the task are charged the whole slice
//! in advance (so that other host CPUs picking at the same moment see the VM as served and
//! pick someone else). When the slice ends, the charge is corrected to the time the task
//! *actually ran*, measured by the driver from resume to return. There is no sampling: a task
//! that yields just before a tick is charged exactly what it ran, and one that overruns its
//! slice is charged the overrun.
//!
//! **Sleepers.** A VM or task that sleeps does not bank credit without limit: when it becomes
//! runnable again its virtual time is raised to at least `sys_vtime - sleep_credit` (where
//! `sys_vtime` is the system's "now" in virtual time: the largest virtual time the scheduler
//! has picked, or the progress of a slice still running if that is further). It may therefore be ahead of the others by at most `sleep_credit`
//! nanoseconds of service, however long it slept. The same clamp applies to tasks inside a
//! VM.
//!
//! **Wake-up boost (and why it cannot be gamed).** A woken task whose VM has positive credit
//! is put on a boost queue that every host CPU serves before its run queue, and if no host
//! CPU is idle, the slice of the CPU running the most-served VM is cut (no earlier than the
//! rate limit allows). That is the latency path. It is not a share path:
//! - the boost only changes *when* the task runs, never what it is charged: boosted time is
//!   charged like any other, at the actual length, so a task that sleeps and wakes often only
//!   spends its credit sooner;
//! - a boost needs positive credit *after* the sleeper clamp, so the most any sequence of
//!   sleeps and wakes can gain is the `sleep_credit` bound above, once, not per wake;
//! - yielding or halting before a tick gains nothing because there are no ticks: charges are
//!   the measured run time.
//!
//! The simulator tests in `tests/` check these claims numerically (gamers get at most 2%
//! more than their entitlement).
//!
//! **Caps.** A cap of `c` percent gives the VM a budget of `c/100 * period` nanoseconds per
//! **accounting period** (periods are aligned on multiples of `period` on the caller's
//! clock). A slice given to a capped VM is never longer than the unreserved budget nor than
//! the time to the end of the period, and slices granted on other CPUs reserve budget, so a
//! driver that stops tasks on time (the simulator) never exceeds the cap in any period. Time
//! a task runs past its slice (a real task that was slow to stop) is debt that the next
//! period's budget pays. A VM without budget leaves the run queues until the next period,
//! even if CPUs are idle: a cap is an upper bound, not a share.
//!
//! **Rate limit.** A slice is never shorter than `ratelimit` (unless the cap budget is
//! shorter), and a boost never cuts a slice that has run less than `ratelimit`: Xen's
//! `ratelimit_us`, which bounds the context-switch rate under wake storms.
//!
//! **Host CPUs and work stealing.** Each host CPU has its own run queue of VMs, ordered by
//! virtual time, and each VM has a home CPU (assigned to balance the number of VMs). A host
//! CPU runs its own best VM unless another CPU's best VM is more than `steal_margin` behind
//! it, or its own queue is empty: then it *steals* that VM, and takes the VM home if the
//! victim's queue was longer than its own. Keeping VMs on their home CPU keeps their state
//! warm in that CPU's caches; the margin bounds the unfairness this affinity may cost.
//! All queues live in this one state machine, so stealing needs no extra locking: the
//! executor serialises calls with one lock (a decision costs well under a microsecond).

use std::collections::{BTreeSet, VecDeque};

use crate::scheduler::{
    Decision, Nanos, SchedError, SchedStats, Scheduler, TaskId, VmConfig, VmId, WakeAction,
    DEFAULT_WEIGHT, MAX_WEIGHT,
};
use crate::task::Outcome;

/// Tunables of the [`CreditScheduler`]. All times are in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditConfig {
    /// Number of host CPUs to schedule on.
    pub cpus: usize,
    /// Length of a full slice.
    pub timeslice: Nanos,
    /// Minimum slice: a boost never cuts a slice shorter than this (Xen: 1 ms).
    pub ratelimit: Nanos,
    /// Accounting period over which caps are enforced.
    pub period: Nanos,
    /// The most credit (in nanoseconds of CPU time) a sleeping VM or task keeps.
    pub sleep_credit: Nanos,
    /// How far behind (in nanoseconds of CPU time at the default weight) another CPU's best
    /// VM must be before a CPU steals it instead of running its own.
    pub steal_margin: Nanos,
    /// Whether woken tasks with credit are boosted (and may preempt).
    pub boost: bool,
}

impl Default for CreditConfig {
    fn default() -> Self {
        CreditConfig {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            timeslice: 10_000_000,
            ratelimit: 1_000_000,
            period: 10_000_000,
            sleep_credit: 5_000_000,
            steal_margin: 1_000_000,
            boost: true,
        }
    }
}

impl CreditConfig {
    /// The defaults for `cpus` host CPUs.
    pub fn with_cpus(cpus: usize) -> Self {
        CreditConfig {
            cpus,
            ..CreditConfig::default()
        }
    }

    fn validate(&self) -> Result<(), SchedError> {
        let bad = |name, value, why| Err(SchedError::InvalidParameter { name, value, why });
        if self.cpus == 0 {
            return Err(SchedError::NoCpus);
        }
        if self.timeslice == 0 {
            return bad("timeslice", 0, "must be positive");
        }
        if self.ratelimit == 0 || self.ratelimit > self.timeslice {
            return bad("ratelimit", self.ratelimit, "must be in 1..=timeslice");
        }
        if self.period == 0 {
            return bad("period", 0, "must be positive");
        }
        Ok(())
    }
}

/// Virtual time: nanoseconds of service scaled by `DEFAULT_WEIGHT / weight`. `u128` so that
/// a weight-1 VM cannot overflow it in any realistic lifetime.
type VTime = u128;

fn to_vtime(ns: Nanos, weight: u32) -> VTime {
    // weight >= 1 is validated when the VM is added.
    VTime::from(ns) * VTime::from(DEFAULT_WEIGHT) / VTime::from(weight.max(1))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TaskState {
    Queued,
    Running,
    Blocked,
    Exited,
}

#[derive(Debug)]
struct TaskEntry {
    vm: u32,
    vtime: Nanos,
    state: TaskState,
    service: Nanos,
    /// When the task was last woken, until it first runs after that.
    woken_at: Option<Nanos>,
    /// A wake arrived while the task was running.
    wake_pending: bool,
    /// The task sits on the boost queue.
    boosted: bool,
}

#[derive(Debug)]
struct VmEntry {
    config: VmConfig,
    vtime: VTime,
    home: usize,
    /// Runnable, not running tasks, by (task vtime, task index).
    queued: BTreeSet<(Nanos, u32)>,
    /// The key under which the VM sits in its home queue, if it does.
    queue_key: Option<VTime>,
    /// Largest task vtime picked in this VM: the VM's own "now" for the task-level clamp.
    task_floor: Nanos,
    running: u32,
    live_tasks: u32,
    service: Nanos,
    /// Cap budget per period, if capped.
    budget: Option<Nanos>,
    /// Budget used in the current period (can exceed `budget` by overrun debt).
    used: Nanos,
    /// Budget promised to slices running in the current period.
    reserved: Nanos,
    /// The cap held the VM back in the current period.
    throttled: bool,
    /// Counted in `CreditScheduler::waiting_cap_percent`: runnable but out of budget.
    waiting: bool,
}

impl VmEntry {
    fn available(&self) -> Option<Nanos> {
        self.budget
            .map(|b| b.saturating_sub(self.used.saturating_add(self.reserved)))
    }

    fn eligible(&self) -> bool {
        !self.queued.is_empty() && self.available() != Some(0)
    }
}

#[derive(Clone, Copy, Debug)]
struct Running {
    task: u32,
    start: Nanos,
    slice: Nanos,
    period: u64,
    /// The VM's virtual time when the slice began, before the advance charge.
    vm_vtime: VTime,
    weight: u32,
}

impl Running {
    /// The VM's virtual time as if charged for what this slice has run so far.
    fn progress(&self, now: Nanos) -> VTime {
        self.vm_vtime
            .saturating_add(to_vtime(now.saturating_sub(self.start), self.weight))
    }
}

#[derive(Debug, Default)]
struct CpuEntry {
    running: Option<Running>,
    idle: bool,
    cut_at: Option<Nanos>,
    homed_vms: usize,
}

/// A weighted, capped, two-level credit scheduler. See the [module docs](self).
///
/// ```
/// use vmkit_sched::{CreditConfig, CreditScheduler, Decision, Outcome, Scheduler, VmConfig};
///
/// let mut s = CreditScheduler::new(CreditConfig::with_cpus(1))?;
/// let heavy = s.add_vm(VmConfig::weighted(512))?;
/// let light = s.add_vm(VmConfig::weighted(256))?;
/// for vm in [heavy, light] {
///     let t = s.add_task(vm, 0)?;
///     s.wake(t, 0)?;
/// }
/// let mut now = 0;
/// for _ in 0..300 {
///     let Decision::Run { slice, .. } = s.pick(0, now)? else { unreachable!() };
///     now += slice;
///     s.finish(0, slice, Outcome::SliceEnd, now)?;
/// }
/// let (h, l) = (s.vm_service(heavy)?, s.vm_service(light)?);
/// assert!((h as f64 / l as f64 - 2.0).abs() < 0.05);
/// # Ok::<(), vmkit_sched::SchedError>(())
/// ```
#[derive(Debug)]
pub struct CreditScheduler {
    config: CreditConfig,
    vms: Vec<VmEntry>,
    tasks: Vec<TaskEntry>,
    /// Per host CPU: eligible VMs homed there, by (vtime, vm index).
    queues: Vec<BTreeSet<(VTime, u32)>>,
    boost_queue: VecDeque<u32>,
    cpus: Vec<CpuEntry>,
    sys_vtime: VTime,
    period_idx: u64,
    capped: Vec<u32>,
    /// Sum of the caps (percent) of capped VMs that are runnable but out of budget, kept
    /// up to date by `requeue` so that `pick` need not scan the capped VMs.
    waiting_cap_percent: u64,
    stats: SchedStats,
}

impl CreditScheduler {
    /// A scheduler with the given tunables.
    pub fn new(config: CreditConfig) -> Result<Self, SchedError> {
        config.validate()?;
        Ok(CreditScheduler {
            config,
            vms: Vec::new(),
            tasks: Vec::new(),
            queues: (0..config.cpus).map(|_| BTreeSet::new()).collect(),
            boost_queue: VecDeque::new(),
            cpus: (0..config.cpus).map(|_| CpuEntry::default()).collect(),
            sys_vtime: 0,
            period_idx: 0,
            capped: Vec::new(),
            waiting_cap_percent: 0,
            stats: SchedStats::default(),
        })
    }

    /// The tunables.
    pub fn config(&self) -> &CreditConfig {
        &self.config
    }

    /// A VM's credit: how many nanoseconds of CPU time it is behind the system (positive:
    /// it has used less than its share so far; negative: more).
    pub fn vm_credit(&self, vm: VmId) -> Result<i128, SchedError> {
        let v = self.vm(vm.0)?;
        let behind = self.sys_vtime as i128 - v.vtime as i128;
        Ok(behind * i128::from(v.config.weight) / i128::from(DEFAULT_WEIGHT))
    }

    /// The host CPU whose run queue holds `vm`.
    pub fn vm_home(&self, vm: VmId) -> Result<usize, SchedError> {
        Ok(self.vm(vm.0)?.home)
    }

    fn vm(&self, vm: u32) -> Result<&VmEntry, SchedError> {
        self.vms
            .get(vm as usize)
            .ok_or(SchedError::UnknownVm(vm as usize))
    }

    fn task(&self, task: u32) -> Result<&TaskEntry, SchedError> {
        self.tasks
            .get(task as usize)
            .ok_or(SchedError::UnknownTask(task as usize))
    }

    fn check_cpu(&self, cpu: usize) -> Result<(), SchedError> {
        if cpu < self.cpus.len() {
            Ok(())
        } else {
            Err(SchedError::CpuOutOfRange {
                cpu,
                cpus: self.cpus.len(),
            })
        }
    }

    fn period_end(&self) -> Nanos {
        self.period_idx
            .saturating_add(1)
            .saturating_mul(self.config.period)
    }

    /// Put `vm` in (or take it out of) its home queue according to its eligibility and
    /// current virtual time.
    fn requeue(&mut self, vm: u32) {
        let Some(v) = self.vms.get_mut(vm as usize) else {
            return;
        };
        let Some(queue) = self.queues.get_mut(v.home) else {
            return;
        };
        if let Some(key) = v.queue_key.take() {
            queue.remove(&(key, vm));
        }
        if v.eligible() {
            queue.insert((v.vtime, vm));
            v.queue_key = Some(v.vtime);
        }
        let waiting = v.budget.is_some() && !v.queued.is_empty() && !v.eligible();
        if waiting != v.waiting {
            v.waiting = waiting;
            let cap = u64::from(v.config.cap_percent.unwrap_or(0));
            self.waiting_cap_percent = if waiting {
                self.waiting_cap_percent.saturating_add(cap)
            } else {
                self.waiting_cap_percent.saturating_sub(cap)
            };
        }
    }

    /// Start a new accounting period if `now` is past the current one: capped VMs get their
    /// budget back (minus any overrun debt) and rejoin the queues.
    fn roll_period(&mut self, now: Nanos) {
        let idx = now / self.config.period;
        if idx <= self.period_idx {
            return;
        }
        let elapsed = idx - self.period_idx;
        self.period_idx = idx;
        let sys = self.sys_vtime;
        for i in 0..self.capped.len() {
            let vm = self.capped[i];
            let Some(v) = self.vms.get_mut(vm as usize) else {
                continue;
            };
            let refill = v.budget.unwrap_or(0).saturating_mul(elapsed);
            v.used = v.used.saturating_sub(refill);
            v.reserved = 0;
            let before = v.vtime;
            if std::mem::take(&mut v.throttled) {
                // Credit the cap kept it from using is not banked: like a sleeper, a
                // throttled VM keeps at most `sleep_credit`, or it would take priority
                // over VMs that are owed time at the start of every period.
                let floor = sys.saturating_sub(to_vtime(self.config.sleep_credit, v.config.weight));
                v.vtime = v.vtime.max(floor);
            }
            // Only VMs whose queue position or eligibility can have changed need the
            // (tree-updating) requeue: this runs once per period for every capped VM.
            if v.vtime != before || v.waiting || (v.queue_key.is_none() && !v.queued.is_empty()) {
                self.requeue(vm);
            }
        }
    }

    /// How many host CPUs the capped VMs that have runnable tasks but no budget left in
    /// this period will want when the period ends (the sum of their caps, rounded up).
    fn throttled_demand(&self) -> usize {
        // Debug builds (all tests) check the running sum against a full scan.
        debug_assert_eq!(
            self.waiting_cap_percent,
            self.capped
                .iter()
                .filter_map(|&vm| self.vms.get(vm as usize))
                .filter(|v| !v.queued.is_empty() && !v.eligible())
                .map(|v| u64::from(v.config.cap_percent.unwrap_or(0)))
                .sum::<u64>()
        );
        usize::try_from(self.waiting_cap_percent.div_ceil(100)).unwrap_or(usize::MAX)
    }

    /// How many host CPUs will be free when the period ends: idle ones, and ones whose slice
    /// ends exactly then.
    fn free_at_period_end(&self) -> usize {
        let end = self.period_end();
        self.cpus
            .iter()
            .filter(|c| {
                c.idle
                    || c.running
                        .is_some_and(|r| r.start.saturating_add(r.slice) == end)
            })
            .count()
    }

    /// The VM to run on `cpu`, from the boost queue or the run queues.
    fn choose(&mut self, cpu: usize) -> Option<(u32, u32)> {
        while let Some(t) = self.boost_queue.pop_front() {
            let Some(task) = self.tasks.get_mut(t as usize) else {
                continue;
            };
            if !task.boosted {
                continue;
            }
            task.boosted = false;
            if task.state != TaskState::Queued {
                continue;
            }
            let vm = task.vm;
            if self.vms.get(vm as usize).is_some_and(VmEntry::eligible) {
                return Some((vm, t));
            }
        }
        let local = self.queues.get(cpu).and_then(|q| q.first().copied());
        let mut remote: Option<(VTime, u32, usize)> = None;
        for (j, q) in self.queues.iter().enumerate() {
            if j == cpu {
                continue;
            }
            if let Some(&(vt, vm)) = q.first() {
                if remote.is_none_or(|(best, _, _)| vt < best) {
                    remote = Some((vt, vm, j));
                }
            }
        }
        let margin = VTime::from(self.config.steal_margin);
        let vm = match (local, remote) {
            (Some((lv, _)), Some((rv, rvm, victim))) if rv.saturating_add(margin) < lv => {
                self.steal(cpu, rvm, victim);
                rvm
            }
            (Some((_, lvm)), _) => lvm,
            (None, Some((_, rvm, victim))) => {
                self.steal(cpu, rvm, victim);
                rvm
            }
            (None, None) => return None,
        };
        let task = self.vms.get(vm as usize)?.queued.first()?.1;
        Some((vm, task))
    }

    fn steal(&mut self, cpu: usize, vm: u32, victim: usize) {
        self.stats.steals += 1;
        let victim_len = self.queues.get(victim).map_or(0, BTreeSet::len);
        let own_len = self.queues.get(cpu).map_or(0, BTreeSet::len);
        if victim_len > own_len + 1 {
            // Take the VM home: remove it from the victim's queue under its old home, then
            // requeue it under the new one.
            if let Some(v) = self.vms.get_mut(vm as usize) {
                if let Some(key) = v.queue_key.take() {
                    if let Some(q) = self.queues.get_mut(v.home) {
                        q.remove(&(key, vm));
                    }
                }
                if let Some(c) = self.cpus.get_mut(v.home) {
                    c.homed_vms = c.homed_vms.saturating_sub(1);
                }
                v.home = cpu;
                if let Some(c) = self.cpus.get_mut(cpu) {
                    c.homed_vms += 1;
                }
            }
            self.requeue(vm);
        }
    }

    /// The system's virtual time at `now`: the largest virtual time picked so far, or the
    /// progress of a slice still running if that is further (a long slice moves the
    /// system's time even though nobody picks).
    fn sys_vtime_at(&self, now: Nanos) -> VTime {
        self.cpus
            .iter()
            .filter_map(|c| c.running.map(|r| r.progress(now)))
            .fold(self.sys_vtime, VTime::max)
    }

    /// The host CPU a boosted wake should cut: one whose slice may be cut soonest under the
    /// rate limit, running a VM that has progressed further than the woken one.
    fn preempt_target(&self, woken_vtime: VTime, now: Nanos) -> Option<(usize, Nanos)> {
        let mut best: Option<(Nanos, VTime, usize)> = None;
        for (i, c) in self.cpus.iter().enumerate() {
            let Some(r) = c.running else { continue };
            if c.cut_at.is_some() {
                continue;
            }
            let progress = r.progress(now);
            if progress <= woken_vtime {
                continue;
            }
            let at = now.max(r.start.saturating_add(self.config.ratelimit));
            let better = match best {
                None => true,
                Some((bat, bvt, _)) => at < bat || (at == bat && progress > bvt),
            };
            if better {
                best = Some((at, progress, i));
            }
        }
        best.map(|(at, _, cpu)| (cpu, at))
    }

    fn enqueue_task(&mut self, t: u32) {
        let Some(task) = self.tasks.get_mut(t as usize) else {
            return;
        };
        task.state = TaskState::Queued;
        let key = (task.vtime, t);
        if let Some(v) = self.vms.get_mut(task.vm as usize) {
            v.queued.insert(key);
        }
    }
}

impl Scheduler for CreditScheduler {
    fn cpus(&self) -> usize {
        self.cpus.len()
    }

    fn add_vm(&mut self, config: VmConfig) -> Result<VmId, SchedError> {
        if config.weight == 0 || config.weight > MAX_WEIGHT {
            return Err(SchedError::InvalidWeight(config.weight));
        }
        let max_cap = u32::try_from(self.cpus.len())
            .unwrap_or(u32::MAX)
            .saturating_mul(100);
        let budget = match config.cap_percent {
            None => None,
            Some(cap) if cap == 0 || cap > max_cap => {
                return Err(SchedError::InvalidCap { cap, max: max_cap })
            }
            Some(cap) => Some(self.config.period.saturating_mul(u64::from(cap)) / 100),
        };
        let id = u32::try_from(self.vms.len()).map_err(|_| SchedError::TooMany("VMs"))?;
        let home = (0..self.cpus.len())
            .min_by_key(|&c| self.cpus.get(c).map_or(usize::MAX, |e| e.homed_vms))
            .unwrap_or(0);
        if let Some(c) = self.cpus.get_mut(home) {
            c.homed_vms += 1;
        }
        if budget.is_some() {
            self.capped.push(id);
        }
        self.vms.push(VmEntry {
            config,
            vtime: self.sys_vtime,
            home,
            queued: BTreeSet::new(),
            queue_key: None,
            task_floor: 0,
            running: 0,
            live_tasks: 0,
            service: 0,
            budget,
            used: 0,
            reserved: 0,
            throttled: false,
            waiting: false,
        });
        Ok(VmId(id))
    }

    fn add_task(&mut self, vm: VmId, _now: Nanos) -> Result<TaskId, SchedError> {
        let id = u32::try_from(self.tasks.len()).map_err(|_| SchedError::TooMany("tasks"))?;
        let v = self
            .vms
            .get_mut(vm.index())
            .ok_or(SchedError::UnknownVm(vm.index()))?;
        v.live_tasks += 1;
        let vtime = v.task_floor;
        self.tasks.push(TaskEntry {
            vm: vm.0,
            vtime,
            state: TaskState::Blocked,
            service: 0,
            woken_at: None,
            wake_pending: false,
            boosted: false,
        });
        Ok(TaskId(id))
    }

    fn pick(&mut self, cpu: usize, now: Nanos) -> Result<Decision, SchedError> {
        self.check_cpu(cpu)?;
        if let Some(r) = self.cpus.get(cpu).and_then(|c| c.running) {
            return Err(SchedError::CpuBusy {
                cpu,
                task: r.task as usize,
            });
        }
        self.roll_period(now);
        self.stats.decisions += 1;
        let demand = self.throttled_demand();
        let Some((vm, t)) = self.choose(cpu) else {
            let until = (demand > 0).then(|| self.period_end());
            if let Some(c) = self.cpus.get_mut(cpu) {
                c.idle = true;
                c.cut_at = None;
            }
            return Ok(Decision::Idle { until });
        };
        let period_end = self.period_end();
        let timeslice = self.config.timeslice;
        let ratelimit = self.config.ratelimit;
        let period = self.config.period;
        let align = demand > 0 && demand > self.free_at_period_end();
        let v = self
            .vms
            .get_mut(vm as usize)
            .ok_or(SchedError::UnknownVm(vm as usize))?;
        let task = self
            .tasks
            .get_mut(t as usize)
            .ok_or(SchedError::UnknownTask(t as usize))?;
        v.queued.remove(&(task.vtime, t));
        task.state = TaskState::Running;
        task.boosted = false;
        v.running += 1;
        let mut slice = timeslice;
        if align {
            // Capped VMs wait for the next period and fewer CPUs than they need will be free
            // then: end this slice at the boundary, so that their budget can be used
            // (otherwise they start only when some slice happens to end, possibly too late
            // in the period).
            let to_end = period_end.saturating_sub(now);
            let to_end = if to_end >= ratelimit {
                to_end
            } else {
                to_end.saturating_add(period)
            };
            slice = slice.min(to_end);
        }
        if let Some(avail) = v.available() {
            slice = slice.min(avail).min(period_end.saturating_sub(now)).max(1);
            v.reserved = v.reserved.saturating_add(slice);
        }
        self.sys_vtime = self.sys_vtime.max(v.vtime);
        let vm_vtime = v.vtime;
        let weight = v.config.weight;
        v.task_floor = v.task_floor.max(task.vtime);
        v.vtime = v.vtime.saturating_add(to_vtime(slice, v.config.weight));
        task.vtime = task.vtime.saturating_add(slice);
        let wake_latency = task.woken_at.take().map(|w| now.saturating_sub(w));
        self.requeue(vm);
        let period = self.period_idx;
        if let Some(c) = self.cpus.get_mut(cpu) {
            c.running = Some(Running {
                task: t,
                start: now,
                slice,
                period,
                vm_vtime,
                weight,
            });
            c.idle = false;
            c.cut_at = None;
        }
        Ok(Decision::Run {
            task: TaskId(t),
            slice,
            wake_latency,
        })
    }

    fn finish(
        &mut self,
        cpu: usize,
        ran: Nanos,
        outcome: Outcome,
        now: Nanos,
    ) -> Result<(), SchedError> {
        self.check_cpu(cpu)?;
        let r = self
            .cpus
            .get_mut(cpu)
            .and_then(|c| {
                c.cut_at = None;
                c.running.take()
            })
            .ok_or(SchedError::CpuNotRunning { cpu })?;
        self.roll_period(now);
        let period_idx = self.period_idx;
        let period = self.config.period;
        let task = self
            .tasks
            .get_mut(r.task as usize)
            .ok_or(SchedError::UnknownTask(r.task as usize))?;
        let vm = task.vm;
        let v = self
            .vms
            .get_mut(vm as usize)
            .ok_or(SchedError::UnknownVm(vm as usize))?;
        // Replace the advance charge by the actual run time.
        v.vtime = v
            .vtime
            .saturating_sub(to_vtime(r.slice, v.config.weight))
            .saturating_add(to_vtime(ran, v.config.weight));
        task.vtime = task.vtime.saturating_sub(r.slice).saturating_add(ran);
        task.service = task.service.saturating_add(ran);
        v.service = v.service.saturating_add(ran);
        v.running = v.running.saturating_sub(1);
        if v.budget.is_some() {
            if r.period == period_idx {
                v.reserved = v.reserved.saturating_sub(r.slice);
                v.used = v.used.saturating_add(ran);
            } else {
                // The slice began in an earlier period whose budget was already refilled:
                // only the part that ran into this period is charged here.
                let boundary = period_idx.saturating_mul(period);
                let end = r.start.saturating_add(ran);
                v.used = v.used.saturating_add(end.saturating_sub(boundary));
            }
        }
        if outcome != Outcome::Blocked {
            // A wake that arrived while the task ran was answered by that run.
            task.wake_pending = false;
            task.woken_at = None;
        }
        let runnable = match outcome {
            Outcome::SliceEnd => true,
            Outcome::Yielded => {
                // Go behind the VM's other runnable vCPUs: the point of a yield is to let a
                // sibling (the lock holder) run. This never lowers the yielder's charge.
                if let Some(&(last, _)) = v.queued.last() {
                    task.vtime = task.vtime.max(last);
                }
                true
            }
            Outcome::Blocked => {
                let pending = std::mem::take(&mut task.wake_pending);
                if !pending {
                    task.woken_at = None;
                }
                pending
            }
            Outcome::Exited => {
                task.state = TaskState::Exited;
                task.wake_pending = false;
                v.live_tasks = v.live_tasks.saturating_sub(1);
                false
            }
        };
        if runnable {
            self.enqueue_task(r.task);
        } else if let Some(task) = self.tasks.get_mut(r.task as usize) {
            if task.state != TaskState::Exited {
                task.state = TaskState::Blocked;
            }
        }
        if let Some(v) = self.vms.get_mut(vm as usize) {
            if v.available() == Some(0) && !v.queued.is_empty() && !v.throttled {
                self.stats.throttles += 1;
                v.throttled = true;
            }
        }
        self.requeue(vm);
        Ok(())
    }

    fn wake(&mut self, task: TaskId, now: Nanos) -> Result<WakeAction, SchedError> {
        self.roll_period(now);
        let t = task.0;
        let entry = self
            .tasks
            .get_mut(task.index())
            .ok_or(SchedError::UnknownTask(task.index()))?;
        match entry.state {
            TaskState::Queued | TaskState::Exited => return Ok(WakeAction::None),
            TaskState::Running => {
                entry.wake_pending = true;
                entry.woken_at.get_or_insert(now);
                return Ok(WakeAction::None);
            }
            TaskState::Blocked => {}
        }
        let vm = entry.vm;
        let sys_now = self.sys_vtime_at(now);
        let sys_vtime = self.sys_vtime;
        let entry = self
            .tasks
            .get_mut(task.index())
            .ok_or(SchedError::UnknownTask(task.index()))?;
        let v = self
            .vms
            .get_mut(vm as usize)
            .ok_or(SchedError::UnknownVm(vm as usize))?;
        // Sleeper clamps: a VM that was not competing for more CPU (no task queued: all
        // asleep, or all running) and a sleeping task keep at most `sleep_credit` of the
        // credit they did not use.
        if v.queued.is_empty() {
            // The floor uses picked virtual time only, not the progress of running slices:
            // that progress is estimated from wall time, while what slices are finally
            // charged may be less (CPU-time accounting), and a floor above the other VMs'
            // real virtual time would make the sleeper wait instead of run.
            let floor =
                sys_vtime.saturating_sub(to_vtime(self.config.sleep_credit, v.config.weight));
            v.vtime = v.vtime.max(floor);
        }
        entry.vtime = entry
            .vtime
            .max(v.task_floor.saturating_sub(self.config.sleep_credit));
        entry.woken_at = Some(now);
        let vtime = v.vtime;
        let home = v.home;
        self.enqueue_task(t);
        self.requeue(vm);
        // A VM throttled by its cap runs when the next period starts; an idle CPU is still
        // kicked so that it learns when that is.
        let eligible = self.vms.get(vm as usize).is_some_and(VmEntry::eligible);
        let under = eligible && vtime < sys_now;
        if self.config.boost && under {
            if let Some(e) = self.tasks.get_mut(task.index()) {
                if !e.boosted {
                    e.boosted = true;
                    self.boost_queue.push_back(t);
                }
            }
            self.stats.boosts += 1;
        }
        let idle = if self.cpus.get(home).is_some_and(|c| c.idle) {
            Some(home)
        } else {
            self.cpus.iter().position(|c| c.idle)
        };
        if let Some(cpu) = idle {
            if let Some(c) = self.cpus.get_mut(cpu) {
                c.idle = false;
            }
            return Ok(WakeAction::Kick { cpu });
        }
        if self.config.boost && under {
            if let Some((cpu, at)) = self.preempt_target(vtime, now) {
                if let Some(c) = self.cpus.get_mut(cpu) {
                    c.cut_at = Some(at);
                }
                self.stats.preemptions += 1;
                return Ok(WakeAction::Preempt { cpu, at });
            }
        }
        Ok(WakeAction::None)
    }

    fn vm_of(&self, task: TaskId) -> Result<VmId, SchedError> {
        Ok(VmId(self.task(task.0)?.vm))
    }

    fn vm_config(&self, vm: VmId) -> Result<VmConfig, SchedError> {
        Ok(self.vm(vm.0)?.config)
    }

    fn vm_service(&self, vm: VmId) -> Result<Nanos, SchedError> {
        Ok(self.vm(vm.0)?.service)
    }

    fn task_service(&self, task: TaskId) -> Result<Nanos, SchedError> {
        Ok(self.task(task.0)?.service)
    }

    fn vm_count(&self) -> usize {
        self.vms.len()
    }

    fn task_count(&self) -> usize {
        self.tasks.len()
    }

    fn live_tasks(&self, vm: VmId) -> Result<usize, SchedError> {
        Ok(self.vm(vm.0)?.live_tasks as usize)
    }

    fn stats(&self) -> SchedStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(cpus: usize) -> CreditScheduler {
        CreditScheduler::new(CreditConfig::with_cpus(cpus)).unwrap()
    }

    fn run(s: &mut CreditScheduler, cpu: usize, now: Nanos) -> (TaskId, Nanos) {
        match s.pick(cpu, now).unwrap() {
            Decision::Run { task, slice, .. } => (task, slice),
            Decision::Idle { .. } => panic!("idle"),
        }
    }

    #[test]
    fn config_and_vm_validation() {
        let bad = |f: fn(&mut CreditConfig)| {
            let mut c = CreditConfig::with_cpus(2);
            f(&mut c);
            CreditScheduler::new(c).unwrap_err()
        };
        assert_eq!(bad(|c| c.cpus = 0), SchedError::NoCpus);
        assert!(matches!(
            bad(|c| c.timeslice = 0),
            SchedError::InvalidParameter {
                name: "timeslice",
                ..
            }
        ));
        assert!(matches!(
            bad(|c| c.ratelimit = c.timeslice + 1),
            SchedError::InvalidParameter {
                name: "ratelimit",
                ..
            }
        ));
        assert!(matches!(
            bad(|c| c.period = 0),
            SchedError::InvalidParameter { name: "period", .. }
        ));
        let mut s = sched(2);
        assert_eq!(
            s.add_vm(VmConfig::weighted(0)),
            Err(SchedError::InvalidWeight(0))
        );
        assert_eq!(
            s.add_vm(VmConfig::weighted(70_000)),
            Err(SchedError::InvalidWeight(70_000))
        );
        assert_eq!(
            s.add_vm(VmConfig::default().with_cap(201)),
            Err(SchedError::InvalidCap { cap: 201, max: 200 })
        );
        assert_eq!(
            s.add_vm(VmConfig::default().with_cap(0)),
            Err(SchedError::InvalidCap { cap: 0, max: 200 })
        );
        assert_eq!(s.add_task(VmId(5), 0), Err(SchedError::UnknownVm(5)));
        assert_eq!(s.wake(TaskId(9), 0), Err(SchedError::UnknownTask(9)));
        assert_eq!(s.vm_of(TaskId(9)), Err(SchedError::UnknownTask(9)));
        assert_eq!(s.vm_service(VmId(1)), Err(SchedError::UnknownVm(1)));
        assert_eq!(s.task_service(TaskId(1)), Err(SchedError::UnknownTask(1)));
        assert_eq!(s.vm_config(VmId(1)), Err(SchedError::UnknownVm(1)));
        assert_eq!(s.live_tasks(VmId(1)), Err(SchedError::UnknownVm(1)));
        assert_eq!(s.vm_credit(VmId(1)), Err(SchedError::UnknownVm(1)));
    }

    #[test]
    fn protocol_errors() {
        let mut s = sched(2);
        let vm = s.add_vm(VmConfig::default()).unwrap();
        let t = s.add_task(vm, 0).unwrap();
        assert_eq!(
            s.pick(2, 0),
            Err(SchedError::CpuOutOfRange { cpu: 2, cpus: 2 })
        );
        assert_eq!(
            s.finish(0, 1, Outcome::SliceEnd, 0),
            Err(SchedError::CpuNotRunning { cpu: 0 })
        );
        // Halted until woken.
        assert_eq!(s.pick(0, 0), Ok(Decision::Idle { until: None }));
        assert_eq!(s.wake(t, 0), Ok(WakeAction::Kick { cpu: 0 }));
        let (task, _) = run(&mut s, 0, 0);
        assert_eq!(task, t);
        assert_eq!(s.pick(0, 1), Err(SchedError::CpuBusy { cpu: 0, task: 0 }));
        s.finish(0, 100, Outcome::Exited, 100).unwrap();
        assert_eq!(s.live_tasks(vm), Ok(0));
        assert_eq!(s.wake(t, 200), Ok(WakeAction::None));
        assert_eq!(s.task_service(t), Ok(100));
        assert_eq!(s.vm_of(t), Ok(vm));
        assert_eq!((s.vm_count(), s.task_count(), s.cpus()), (1, 1, 2));
        assert!(s.vm_home(vm).unwrap() < 2);
    }

    #[test]
    fn wake_while_running_is_not_lost() {
        let mut s = sched(1);
        let vm = s.add_vm(VmConfig::default()).unwrap();
        let t = s.add_task(vm, 0).unwrap();
        s.wake(t, 0).unwrap();
        run(&mut s, 0, 0);
        assert_eq!(s.wake(t, 50), Ok(WakeAction::None));
        s.finish(0, 100, Outcome::Blocked, 100).unwrap();
        let Decision::Run {
            task, wake_latency, ..
        } = s.pick(0, 100).unwrap()
        else {
            panic!("the wake was lost")
        };
        assert_eq!((task, wake_latency), (t, Some(50)));
        // Without a wake, a halt sticks.
        s.finish(0, 10, Outcome::Blocked, 110).unwrap();
        assert_eq!(s.pick(0, 110), Ok(Decision::Idle { until: None }));
    }

    #[test]
    fn yield_lets_a_sibling_run_and_costs_what_ran() {
        let mut s = sched(1);
        let vm = s.add_vm(VmConfig::default()).unwrap();
        let a = s.add_task(vm, 0).unwrap();
        let b = s.add_task(vm, 0).unwrap();
        s.wake(a, 0).unwrap();
        s.wake(b, 0).unwrap();
        let (first, _) = run(&mut s, 0, 0);
        s.finish(0, 10, Outcome::Yielded, 10).unwrap();
        let (second, _) = run(&mut s, 0, 10);
        assert_ne!(first, second);
        assert_eq!(s.task_service(first), Ok(10));
    }

    #[test]
    fn credit_is_positive_for_a_vm_that_waited() {
        let mut s = sched(1);
        let a = s.add_vm(VmConfig::default()).unwrap();
        let b = s.add_vm(VmConfig::default()).unwrap();
        let t = s.add_task(a, 0).unwrap();
        s.add_task(b, 0).unwrap();
        s.wake(t, 0).unwrap();
        let mut now = 0;
        for _ in 0..3 {
            let (_, slice) = run(&mut s, 0, now);
            now += slice;
            s.finish(0, slice, Outcome::SliceEnd, now).unwrap();
        }
        // B never ran: it is owed two slices' worth; A is one slice ahead.
        assert_eq!(s.vm_credit(b), Ok(2 * 10_000_000));
        assert_eq!(s.vm_credit(a), Ok(-10_000_000));
        assert_eq!(s.stats().decisions, 3);
        assert_eq!(s.config().cpus, 1);
    }

    #[test]
    fn overrun_becomes_cap_debt() {
        let mut c = CreditConfig::with_cpus(1);
        c.period = 1_000;
        c.timeslice = 1_000;
        c.ratelimit = 1;
        let mut s = CreditScheduler::new(c).unwrap();
        let vm = s.add_vm(VmConfig::default().with_cap(50)).unwrap();
        let t = s.add_task(vm, 0).unwrap();
        s.wake(t, 0).unwrap();
        let (_, slice) = run(&mut s, 0, 0);
        assert_eq!(slice, 500);
        // The task overran into the next period: 700 of debt against a 500 budget.
        s.finish(0, 1_700, Outcome::SliceEnd, 1_700).unwrap();
        assert_eq!(s.pick(0, 1_700), Ok(Decision::Idle { until: Some(2_000) }));
        // Next period: 700 - 500 = 200 of debt left, 300 to use.
        let (_, slice) = run(&mut s, 0, 2_000);
        assert_eq!(slice, 300);
        assert!(s.stats().throttles >= 1);
    }
}
