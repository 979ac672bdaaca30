//! Running the vCPUs on vmkit-sched: N vCPUs on M host threads.
//!
//! With `--cpus boot=N,host=M` (or `host=auto`: one worker per host CPU, at most one per
//! vCPU) mini-vmm runs its vCPUs as tasks of a vmkit-sched [`Executor`] with M workers;
//! without `host=` (or with `host=per-vcpu`) each vCPU has its own thread, as before. All
//! vCPUs belong to one scheduler VM; the credit scheduler shares the workers between them
//! (10 ms slices, 2 ms when there are fewer workers than vCPUs) and charges each the CPU
//! time its worker actually spent ([`Accounting::ThreadCpu`]), so time a vCPU sleeps in the
//! kernel is not billed.
//!
//! Why it is not the default: a stock Linux guest on fewer workers than vCPUs spends long
//! stretches with one vCPU spinning on another (IPIs it waits for, TSC synchronisation,
//! stop_machine), and a userspace scheduler neither sees the IPI that should wake the
//! parked target (it re-polls) nor the spin (KVM handles PAUSE exits in the kernel). Measured
//! in the nested L1 of `tests/linux-guest/mini-vmm-nested.sh`, 2 vCPUs: mini-vmm start to L2's
//! init took ~170 s on 1 worker with 10 ms slices, 72-99 s on 1 worker with the 2 ms slices
//! used now when workers are fewer than vCPUs, and 27-42 s on 2 workers, against 22-77 s
//! with a thread per vCPU in runs under very different host load (the CI proof uses 2
//! workers). The guest is correct in every case; it is just slow on 1 worker.
//!
//! Linux machines use KVM's in-kernel irqchip, where a halted vCPU sleeps inside `KVM_RUN`.
//! Each task therefore carries [`KernelHalts`]: the slice timer notices the sleep through
//! KVM's `blocking` stat, the task parks the vCPU and gives its worker away, and the vCPU
//! re-enters the guest at its LAPIC timer deadline, when one of mini-vmm's own devices
//! raises its interrupt ([`IrqWake`]: COM1 and every virtio-mmio transport signal their
//! irqfd and then wake the parked vCPUs), or at the latest after [`REPOLL`], which is what
//! brings in interrupts that KVM delivers behind the VMM's back (IPIs, INIT/SIPI). See
//! [`vmkit_sched::halt`] for the model and why no wakeup is lost.
//!
//! A vCPU task does what the thread-per-vCPU loop does at each exit: it checks the reset and
//! power-off flags, a kick with the pause flag set parks it for a snapshot, and whichever
//! vCPU ends the VM sets the stop flag, kicks the running vCPUs and wakes the parked ones, so
//! every task ends. A task also looks at the flags *before* entering the guest, because a
//! parked vCPU never sees the kick that asked it to pause or stop; the re-poll bound makes it
//! run (and see them) soon.
//!
//! The vCPUs and dispatchers stay fields of the [`Vmm`](crate::vmm::Vmm) (a snapshot needs
//! them afterwards); the tasks borrow them for the length of `run_vcpus`, which shuts the
//! executor down, joining its workers, before it returns.

use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use vmkit_sched::halt::KernelHalts;
use vmkit_sched::vcpu::{HaltCheck, SliceTimer, TimerSlot};
use vmkit_sched::{
    Accounting, CreditConfig, CreditScheduler, Executor, Kick, Outcome as TaskOutcome, Slice, Task,
    VmConfig,
};
use vmkit_vcpu::dispatch::{Action, DispatchError, Dispatcher};
use vmkit_vcpu::kvm::{KvmKick, KvmVcpu};
use vmkit_vcpu::{Vcpu, VcpuKick};

use vmkit_virtio::interrupt::IrqTrigger;
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::{EndFlags, Outcome, VmmError};

/// The halt handles of the vCPUs while they run on the scheduler, for the VMM's interrupt
/// sources: after a device signals its irqfd it calls [`IrqWake::wake`], so a vCPU parked
/// in a halt re-enters the guest at once instead of at its next re-poll (up to [`REPOLL`]
/// later). Which vCPU the interrupt is routed to is the guest's choice (IOAPIC
/// redirection), so every vCPU's handle is told; [`KernelHalts::wake`] goes through the
/// scheduler only for a vCPU the slice timer kicked out for a halt, so running vCPUs cost
/// two atomic operations each. Empty outside a run of the vCPUs on the scheduler, and with
/// a thread per vCPU, where KVM wakes the halted thread itself.
#[derive(Debug, Default)]
pub struct IrqWake(RwLock<Vec<KernelHalts>>);

impl IrqWake {
    /// Wakes every parked vCPU.
    pub fn wake(&self) {
        for h in self.0.read().unwrap_or_else(PoisonError::into_inner).iter() {
            h.wake();
        }
    }

    fn install(&self, halts: Vec<KernelHalts>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = halts;
    }
}

/// An interrupt line that is a KVM irqfd and also wakes the vCPUs parked on the scheduler
/// ([`IrqWake`]). The irqfd is signalled first. KVM routes an IOAPIC line to its vCPU from
/// a work item, so the interrupt may land an instant after the vCPU re-entered `KVM_RUN`;
/// it is not lost either way: a vCPU inside `KVM_RUN` is woken by KVM itself, and one that
/// parked again before the interrupt landed re-enters at its next re-poll.
#[derive(Debug)]
pub struct WakingIrqFd {
    fd: EventFd,
    wake: Arc<IrqWake>,
}

impl WakingIrqFd {
    /// `fd` (registered with `KVM_IRQFD`) waking through `wake`.
    pub fn new(fd: EventFd, wake: Arc<IrqWake>) -> Self {
        Self { fd, wake }
    }
}

impl IrqTrigger for WakingIrqFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.fd.write(1)?;
        self.wake.wake();
        Ok(())
    }
}

/// The longest a parked vCPU waits before it re-enters the guest to look for interrupts
/// that arrived without a wake.
pub const REPOLL: Duration = Duration::from_millis(4);

/// How the vCPUs get host threads (`--cpus ...,host=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VcpuThreads {
    /// One host thread per vCPU, no scheduler (the default).
    #[default]
    PerVcpu,
    /// vmkit-sched with one worker per host CPU, at most one per vCPU (`host=auto`).
    Auto,
    /// vmkit-sched with this many workers (`host=M`).
    Scheduler(usize),
}

impl VcpuThreads {
    /// The scheduler workers for `vcpus` vCPUs, or `None` for one thread per vCPU.
    pub fn workers(self, vcpus: usize) -> Option<usize> {
        match self {
            VcpuThreads::Auto => {
                let host = std::thread::available_parallelism().map_or(1, |n| n.get());
                Some(host.min(vcpus).max(1))
            }
            VcpuThreads::Scheduler(n) => Some(n.max(1)),
            VcpuThreads::PerVcpu => None,
        }
    }
}

type VcpuResult = Result<Option<Outcome>, VmmError>;

/// What the last scheduler run measured, for `--stats`.
static LAST_RUN: Mutex<Option<String>> = Mutex::new(None);

/// One line on the last run of vCPUs on the scheduler (halts parked, wake latency), if any.
pub fn last_run_summary() -> Option<String> {
    LAST_RUN
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// What every task can reach: the others' kicks and halt handles, to end the run.
struct Peers {
    kicks: Vec<KvmKick>,
    halts: OnceLock<Vec<KernelHalts>>,
}

impl Peers {
    /// Stops every vCPU: running ones through their kick, parked ones through a wake.
    fn stop_all(&self, end: &EndFlags) {
        end.stop.store(true, Ordering::SeqCst);
        for k in &self.kicks {
            k.kick();
        }
        for h in self.halts.get().into_iter().flatten() {
            h.wake();
        }
    }
}

/// One vCPU of the VM as a scheduler task.
struct VcpuRun {
    vcpu: NonNull<KvmVcpu>,
    dispatcher: NonNull<Dispatcher>,
    kick: KvmKick,
    end: EndFlags,
    timer: Arc<SliceTimer<KvmKick>>,
    slot: Arc<TimerSlot>,
    halts: KernelHalts,
    peers: Arc<Peers>,
    result: Arc<Mutex<Option<VcpuResult>>>,
}

// SAFETY: the pointers are the only access to their vCPU and dispatcher while the task
// exists (`run_vcpus` holds the `&mut` borrows they came from and touches neither until the
// executor is shut down), and a task runs on one worker at a time, so moving the task to
// another thread moves that exclusive access with it. KvmVcpu and Dispatcher are Send.
unsafe impl Send for VcpuRun {}

impl VcpuRun {
    fn finish(&self, r: VcpuResult) -> TaskOutcome {
        // Paused or stopped by another vCPU: the others are already told.
        let ends_vm = !matches!(r, Ok(None) | Ok(Some(Outcome::Paused)));
        *self.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
        if ends_vm {
            self.peers.stop_all(&self.end);
        }
        TaskOutcome::Exited
    }

    /// The flags a vCPU must obey before running guest code again.
    fn flagged(&self) -> Option<VcpuResult> {
        let e = &self.end;
        if e.reset.load(Ordering::SeqCst) {
            Some(Ok(Some(Outcome::Reset)))
        } else if e.power_off.load(Ordering::SeqCst) {
            Some(Ok(Some(Outcome::PowerOff)))
        } else if e.pause.load(Ordering::SeqCst) {
            Some(Ok(Some(Outcome::Paused)))
        } else if e.stop.load(Ordering::SeqCst) {
            Some(Ok(None))
        } else {
            None
        }
    }
}

impl Task for VcpuRun {
    fn run(&mut self, slice: &Slice) -> TaskOutcome {
        if let Some(r) = self.flagged() {
            return self.finish(r);
        }
        // SAFETY: see `unsafe impl Send for VcpuRun`: the borrows behind the pointers
        // outlive every task run, and nothing else uses them meanwhile.
        let (vcpu, dispatcher) = unsafe { (self.vcpu.as_mut(), self.dispatcher.as_mut()) };
        let probe = self.halts.probe();
        self.timer.cancel_wake(&self.slot);
        self.timer
            .arm_watching(&self.slot, slice.end(), self.kick.clone(), probe);
        let outcome = loop {
            if slice.expired() {
                break TaskOutcome::SliceEnd;
            }
            let action = match vcpu.run() {
                Ok(exit) => dispatcher.dispatch(exit),
                Err(e) => break self.finish(Err(DispatchError::from(e).into())),
            };
            if self.end.reset.load(Ordering::SeqCst) {
                break self.finish(Ok(Some(Outcome::Reset)));
            }
            if self.end.power_off.load(Ordering::SeqCst) {
                break self.finish(Ok(Some(Outcome::PowerOff)));
            }
            match action {
                Action::Interrupted if self.end.pause.load(Ordering::SeqCst) => {
                    break self.finish(Ok(Some(Outcome::Paused)))
                }
                Action::Interrupted if self.end.stop.load(Ordering::SeqCst) => {
                    break self.finish(Ok(None))
                }
                Action::Continue | Action::Interrupted | Action::Debug { .. } => {
                    let check =
                        self.timer
                            .park_if_halted(&self.slot, &self.halts, &*vcpu, slice.end());
                    if check == HaltCheck::Parked {
                        break TaskOutcome::Blocked;
                    }
                }
                Action::Halt => {
                    break self.finish(Ok(Some(Outcome::Exited(
                        self.end.exit.status().unwrap_or(0),
                    ))))
                }
                Action::Shutdown => break self.finish(Ok(Some(Outcome::Shutdown))),
                Action::Reset => break self.finish(Ok(Some(Outcome::Reset))),
                other => {
                    let rip = vcpu.regs().map(|r| r.rip).unwrap_or(0);
                    let id = vcpu.id();
                    break self.finish(Err(VmmError::Guest(format!(
                        "vCPU {id}: {other:?} at rip {rip:#x}"
                    ))));
                }
            }
        };
        self.timer.disarm(&self.slot);
        outcome
    }

    fn kick_handle(&self) -> Option<Arc<dyn Kick>> {
        Some(self.timer.kick_hook(&self.slot, self.kick.clone()))
    }
}

/// Runs `vcpus` (vCPU 0 first) on `workers` scheduler threads until one ends the VM or all
/// pause; the result is the one the thread-per-vCPU loop would give.
pub(crate) fn run_vcpus(
    vcpus: Vec<(&mut KvmVcpu, &mut Dispatcher)>,
    end: &EndFlags,
    workers: usize,
    irq_wake: &IrqWake,
) -> VcpuResult {
    let sched_err = |e: vmkit_sched::ExecutorError| VmmError::Guest(format!("vCPU scheduler: {e}"));
    let mut config = CreditConfig::with_cpus(workers);
    // Overcommitted, a vCPU spinning on another (an IPI it waits for, a lock the other
    // holds) keeps its worker until its slice ends: keep slices short then.
    config.timeslice = if workers < vcpus.len() {
        2_000_000
    } else {
        10_000_000
    };
    let sched = CreditScheduler::new(config)
        .map_err(|e| VmmError::Guest(format!("vCPU scheduler: {e}")))?;
    let (timer, timer_thread) = SliceTimer::<KvmKick>::start()
        .map_err(|e| VmmError::Guest(format!("vCPU slice timer: {e}")))?;
    let peers = Arc::new(Peers {
        kicks: vcpus.iter().map(|(v, _)| v.kick_handle()).collect(),
        halts: OnceLock::new(),
    });
    let mut results = Vec::with_capacity(vcpus.len());
    let mut tasks = Vec::with_capacity(vcpus.len());
    let mut warned = false;
    for (vcpu, dispatcher) in vcpus {
        let halts = KernelHalts::new(&*vcpu, REPOLL).unwrap_or_else(|e| {
            if !warned {
                eprintln!("mini-vmm: halted vCPUs will hold their host thread: {e}");
                warned = true;
            }
            KernelHalts::without_probe()
        });
        let result = Arc::new(Mutex::new(None));
        results.push(Arc::clone(&result));
        tasks.push(VcpuRun {
            kick: vcpu.kick_handle(),
            vcpu: NonNull::from(vcpu),
            dispatcher: NonNull::from(dispatcher),
            end: end.clone(),
            slot: Arc::new(timer.register()),
            timer: Arc::clone(&timer),
            halts,
            peers: Arc::clone(&peers),
            result,
        });
    }
    let count = tasks.len();
    let all_halts: Vec<KernelHalts> = tasks.iter().map(|t| t.halts.clone()).collect();
    // Installed before the first task can run (a wake does nothing until the task's waker
    // is set) and removed however this function ends.
    struct Installed<'a>(&'a IrqWake);
    impl Drop for Installed<'_> {
        fn drop(&mut self) {
            self.0.install(Vec::new());
        }
    }
    irq_wake.install(all_halts.clone());
    let _installed = Installed(irq_wake);
    let outcome = (|| {
        let ex = Executor::with_accounting(sched, Accounting::ThreadCpu).map_err(sched_err)?;
        let vm = ex.add_vm(VmConfig::default()).map_err(sched_err)?;
        let mut halts = Vec::with_capacity(count);
        for task in tasks {
            let h = task.halts.clone();
            let (_, waker) = ex.spawn(vm, task).map_err(sched_err)?;
            h.set_waker(waker);
            halts.push(h);
        }
        let _ = peers.halts.set(halts);
        ex.wait_exited(count);
        let m = ex.shutdown();
        if let Some(e) = m.errors.first() {
            return Err(VmmError::Guest(format!("vCPU scheduler: {e}")));
        }
        if m.panicked > 0 {
            return Err(VmmError::Guest("a vCPU task panicked".into()));
        }
        let sum = |f: fn(&vmkit_sched::halt::HaltStats) -> &std::sync::atomic::AtomicU64| {
            all_halts
                .iter()
                .map(|h| f(h.stats()).load(Ordering::Relaxed))
                .sum::<u64>()
        };
        let summary = format!(
            "{count} vCPUs on vmkit-sched, {workers} worker(s): {} in-kernel halts parked \
             ({} woken at the LAPIC timer deadline, {} false alarms), {} wakes asked \
             for by devices and the end of the run, wake-to-run p50 {} us p99 {} us, {} decisions",
            sum(|s| &s.parks),
            sum(|s| &s.timer_wakes),
            sum(|s| &s.false_alarms),
            sum(|s| &s.external_wakes),
            m.latency.percentile(0.5) / 1000,
            m.latency.percentile(0.99) / 1000,
            m.stats.decisions,
        );
        *LAST_RUN.lock().unwrap_or_else(PoisonError::into_inner) = Some(summary);
        Ok(())
    })();
    timer.stop();
    let _ = timer_thread.join();
    outcome?;
    let mut results = results.into_iter().map(|r| {
        r.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or(Ok(None))
    });
    let mut result = results.next().unwrap_or(Ok(None));
    // vCPU 0's result, unless it merely paused or stopped on another vCPU's account.
    let weak = |r: &VcpuResult| matches!(r, Ok(None) | Ok(Some(Outcome::Paused)));
    for r in results {
        if (weak(&result) && !weak(&r)) || (matches!(result, Ok(None)) && r.is_ok()) {
            result = r;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::time::Instant;
    use vmkit_sched::{Outcome as TaskOutcome, Slice, Task};

    /// Halts once (as a vCPU parked in `HLT`), then exits when run again.
    struct Sleeper(Arc<AtomicU32>);

    impl Task for Sleeper {
        fn run(&mut self, _slice: &Slice) -> TaskOutcome {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                TaskOutcome::Blocked
            } else {
                TaskOutcome::Exited
            }
        }
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_device_interrupt_signals_its_irqfd_then_wakes_the_parked_vcpus() {
        let ex = Executor::new(CreditScheduler::new(CreditConfig::with_cpus(1)).unwrap()).unwrap();
        let vm = ex.add_vm(VmConfig::default()).unwrap();
        let runs = Arc::new(AtomicU32::new(0));
        let (_, waker) = ex.spawn(vm, Sleeper(Arc::clone(&runs))).unwrap();
        let halts = KernelHalts::without_probe();
        assert!(halts.set_waker(waker));
        let wake = Arc::new(IrqWake::default());
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = WakingIrqFd::new(fd.try_clone().unwrap(), Arc::clone(&wake));
        wait_for("the task to block", || runs.load(Ordering::SeqCst) == 1);

        // Outside a scheduler run nothing is installed: only the irqfd is signalled.
        irq.trigger().unwrap();
        assert_eq!(fd.read().unwrap(), 1);
        assert_eq!(halts.stats().external_wakes.load(Ordering::SeqCst), 0);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(runs.load(Ordering::SeqCst), 1, "blocked until woken");

        // Installed (as `run_vcpus` does): the trigger wakes the parked task.
        wake.install(vec![halts.clone()]);
        irq.trigger().unwrap();
        assert_eq!(fd.read().unwrap(), 1, "the irqfd is still signalled once");
        wait_for("the woken task to run", || runs.load(Ordering::SeqCst) == 2);
        assert_eq!(halts.stats().external_wakes.load(Ordering::SeqCst), 1);
        ex.wait_exited(1);
        assert_eq!(ex.shutdown().exited, 1);
    }
}
