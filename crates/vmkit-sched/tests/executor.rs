//! The executor on real host threads: weighted shares, wakes, preemption, kicks, panics.
//!
//! The machine running these tests is shared and noisy, so nothing here asserts on elapsed
//! time: runs end when enough work is done, and shares are compared with a tolerance that
//! absorbs the host kernel taking CPUs away from our threads.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmkit_sched::{
    Accounting, CreditConfig, CreditScheduler, Executor, Kick, Outcome, Slice, Task, VmConfig,
    Waker,
};

const MS: u64 = 1_000_000;

/// Guard against hangs (a lost wake): generous, and only ever hit by a bug.
const HANG: Duration = Duration::from_secs(120);

struct Spin {
    work: Arc<AtomicU64>,
    /// CPU time this task's runs took, read by the task itself (not the executor's books).
    cpu: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec; CLOCK_THREAD_CPUTIME_ID needs nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Task for Spin {
    fn run(&mut self, slice: &Slice) -> Outcome {
        let cpu_start = thread_cpu_ns();
        // Count locally and publish once per slice: vCPUs of one VM running at the same time
        // on two threads must not slow each other down through a shared cache line.
        let mut local = 0u64;
        let outcome = loop {
            if self.stop.load(Ordering::Relaxed) {
                break Outcome::Exited;
            }
            for _ in 0..64 {
                local = std::hint::black_box(local + 1);
            }
            if slice.expired() {
                break Outcome::SliceEnd;
            }
        };
        self.work.fetch_add(local, Ordering::Relaxed);
        self.cpu
            .fetch_add(thread_cpu_ns() - cpu_start, Ordering::Relaxed);
        outcome
    }
}

/// Each test here runs its own executor threads; run concurrently (cargo's default) they
/// compete for the same two cores and skew one another's shares, so they take turns.
static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    // A test that failed while holding the lock poisons it; the next one may still run.
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn config(cpus: usize) -> CreditConfig {
    let mut c = CreditConfig::with_cpus(cpus);
    c.timeslice = 2 * MS;
    c.ratelimit = 500_000;
    c
}

#[test]
fn cpu_bound_tasks_share_in_weight_proportion() {
    let _serial = one_at_a_time();
    let ex = Executor::with_accounting(
        CreditScheduler::new(config(2)).unwrap(),
        Accounting::ThreadCpu,
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let weights = [100u32, 200, 400];
    let mut work = Vec::new();
    let mut cpu = Vec::new();
    for &w in &weights {
        let vm = ex.add_vm(VmConfig::weighted(w)).unwrap();
        let counter = Arc::new(AtomicU64::new(0));
        let cpu_ns = Arc::new(AtomicU64::new(0));
        for _ in 0..2 {
            ex.spawn(
                vm,
                Spin {
                    work: counter.clone(),
                    cpu: cpu_ns.clone(),
                    stop: stop.clone(),
                },
            )
            .unwrap();
        }
        work.push(counter);
        cpu.push(cpu_ns);
    }
    // Run until 1.4 s of CPU time has been handed out (about 700 slices), however long
    // that takes on a busy machine.
    let start = Instant::now();
    while ex.metrics().vm_service.iter().sum::<u64>() < 1_400 * MS {
        assert!(start.elapsed() < HANG, "executor made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = ex.metrics();
    stop.store(true, Ordering::Relaxed);
    ex.wait_exited(6);
    let end = ex.shutdown();
    assert!(end.errors.is_empty(), "{:?}", end.errors);
    assert_eq!(end.exited, 6);
    // The scheduler's own accounting (thread CPU time per slice). Observed within 1-2% on a
    // 2-core machine with a load average of 4-5; 5% leaves room for worse neighbours.
    for (i, v) in m.fairness.vms.iter().enumerate() {
        assert!(
            (v.ratio - 1.0).abs() < 0.05,
            "VM {i} (weight {}): {v:?}",
            weights[i]
        );
    }
    // CPU time the tasks measured themselves, independent of the executor's books: this is
    // what the scheduler controls, so it must follow the weights closely.
    let per_weight = |v: &[Arc<AtomicU64>]| -> Vec<f64> {
        v.iter()
            .zip(&weights)
            .map(|(x, &w)| x.load(Ordering::Relaxed) as f64 / f64::from(w))
            .collect()
    };
    let cpu_per_weight = per_weight(&cpu);
    let mean = cpu_per_weight.iter().sum::<f64>() / 3.0;
    for (i, p) in cpu_per_weight.iter().enumerate() {
        assert!(
            (p / mean - 1.0).abs() < 0.10,
            "VM {i}: task-measured CPU ns per weight {cpu_per_weight:?}"
        );
    }
    // Work actually done, counted by the tasks. Work per CPU-nanosecond is not ours to
    // control: on a shared 2-core host (SMT siblings, other processes, coverage
    // instrumentation) one VM's rate was seen 29% below the others' while the CPU shares
    // above were within 5%. So this only checks the work follows the weights at all: a
    // weight-blind scheduler puts the weight-1 VM at +71% and the weight-4 VM at -57% of
    // the mean work per weight; 40% fails it and survives the host's noise.
    let work_per_weight = per_weight(&work);
    let mean = work_per_weight.iter().sum::<f64>() / 3.0;
    for (i, p) in work_per_weight.iter().enumerate() {
        assert!(
            (p / mean - 1.0).abs() < 0.40,
            "VM {i}: work per weight {work_per_weight:?}"
        );
    }
    assert!(m.fairness.jain > 0.99, "jain {}", m.fairness.jain);
    assert!(m.decisions_per_sec > 0.0);
}

/// Halts after every run; counts its runs and reports each on a channel.
struct Halter {
    runs: Arc<AtomicUsize>,
    limit: usize,
    ran: mpsc::Sender<()>,
}

impl Task for Halter {
    fn run(&mut self, _slice: &Slice) -> Outcome {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.ran.send(());
        if n >= self.limit {
            Outcome::Exited
        } else {
            Outcome::Blocked
        }
    }
}

#[test]
fn halted_task_runs_once_per_wake_and_wakes_are_not_lost() {
    let _serial = one_at_a_time();
    let ex = Executor::new(CreditScheduler::new(config(2)).unwrap()).unwrap();
    let vm = ex.add_vm(VmConfig::default()).unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let (_, waker) = ex
        .spawn(
            vm,
            Halter {
                runs: runs.clone(),
                limit: 200,
                ran: tx,
            },
        )
        .unwrap();
    // First run is from spawn; each later run needs a wake. Wake right after each run (the
    // task may still be "running" in the scheduler's eyes: the wake must be remembered).
    for _ in 0..199 {
        rx.recv_timeout(HANG)
            .expect("task did not run after a wake");
        waker.wake().unwrap();
    }
    rx.recv_timeout(HANG).expect("last run");
    ex.wait_exited(1);
    // Extra wakes of an exited task are harmless.
    waker.wake().unwrap();
    let m = ex.shutdown();
    assert_eq!(runs.load(Ordering::SeqCst), 200);
    assert!(m.latency.count() >= 199, "{}", m.latency.count());
    assert!(m.errors.is_empty());
}

#[test]
fn wake_preempts_a_hog_with_a_long_slice() {
    let _serial = one_at_a_time();
    // One host thread, a 1-hour slice: only a boost preemption lets the woken task run.
    let mut c = config(1);
    c.timeslice = 3_600_000 * MS;
    c.ratelimit = 1;
    c.sleep_credit = 3_600_000 * MS;
    let ex = Executor::new(CreditScheduler::new(c).unwrap()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let hog_vm = ex.add_vm(VmConfig::default()).unwrap();
    let io_vm = ex.add_vm(VmConfig::default()).unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let (_, waker) = ex
        .spawn(
            io_vm,
            Halter {
                runs: runs.clone(),
                limit: 20,
                ran: tx,
            },
        )
        .unwrap();
    rx.recv_timeout(HANG).expect("first run");
    let work = Arc::new(AtomicU64::new(0));
    ex.spawn(
        hog_vm,
        Spin {
            work: work.clone(),
            cpu: Arc::new(AtomicU64::new(0)),
            stop: stop.clone(),
        },
    )
    .unwrap();
    for _ in 1..20 {
        // Let the hog run a little, so that the I/O VM is owed credit. (Any length works;
        // this is not a timing assertion.)
        std::thread::sleep(Duration::from_millis(2));
        waker.wake().unwrap();
        rx.recv_timeout(HANG)
            .expect("woken task never ran: no preemption");
    }
    ex.wait_exited(1);
    stop.store(true, Ordering::Relaxed);
    ex.wait_exited(2);
    let m = ex.shutdown();
    assert_eq!(runs.load(Ordering::SeqCst), 20);
    // Usually 19; fewer when the host kernel delayed our thread between the task's
    // report and its halt, so that the wake found it still running (it then runs again
    // without a preemption). At least once the hog was cut, or the test would never end.
    assert!(m.stats.preemptions >= 1, "{:?}", m.stats);
}

struct FlagKick(Arc<AtomicBool>);

impl Kick for FlagKick {
    fn kick(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Ignores `Slice::expired` (like a vCPU inside KVM_RUN) and stops only when kicked.
struct KickOnly {
    kicked: Arc<AtomicBool>,
    kicks: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Task for KickOnly {
    fn run(&mut self, _slice: &Slice) -> Outcome {
        while !self.kicked.swap(false, Ordering::SeqCst) {
            if self.stop.load(Ordering::Relaxed) {
                return Outcome::Exited;
            }
            std::hint::spin_loop();
        }
        self.kicks.fetch_add(1, Ordering::SeqCst);
        Outcome::SliceEnd
    }

    fn kick_handle(&self) -> Option<Arc<dyn Kick>> {
        Some(Arc::new(FlagKick(self.kicked.clone())))
    }
}

#[test]
fn preemption_kicks_tasks_that_cannot_poll() {
    let _serial = one_at_a_time();
    let mut c = config(1);
    c.ratelimit = 1;
    c.sleep_credit = 3_600_000 * MS;
    let ex = Executor::new(CreditScheduler::new(c).unwrap()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let kicks = Arc::new(AtomicUsize::new(0));
    let io_vm = ex.add_vm(VmConfig::default()).unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let (_, waker): (_, Waker) = ex
        .spawn(
            io_vm,
            Halter {
                runs: runs.clone(),
                limit: 5,
                ran: tx,
            },
        )
        .unwrap();
    rx.recv_timeout(HANG).expect("first run");
    let vm = ex.add_vm(VmConfig::default()).unwrap();
    ex.spawn(
        vm,
        KickOnly {
            kicked: Arc::new(AtomicBool::new(false)),
            kicks: kicks.clone(),
            stop: stop.clone(),
        },
    )
    .unwrap();
    for _ in 1..5 {
        std::thread::sleep(Duration::from_millis(5));
        waker.wake().unwrap();
        rx.recv_timeout(HANG)
            .expect("kick-only task was never kicked");
    }
    ex.wait_exited(1);
    stop.store(true, Ordering::Relaxed);
    ex.wait_exited(2);
    ex.shutdown();
    assert!(kicks.load(Ordering::SeqCst) >= 4);
    assert_eq!(task_name(&waker), format!("{:?}", waker.task()));
}

fn task_name(w: &Waker) -> String {
    format!("{:?}", w.task())
}

struct Panics;

impl Task for Panics {
    fn run(&mut self, _slice: &Slice) -> Outcome {
        panic!("task bug");
    }
}

#[test]
fn a_panicking_task_exits_and_the_rest_keep_running() {
    let _serial = one_at_a_time();
    let ex = Executor::new(CreditScheduler::new(config(1)).unwrap()).unwrap();
    let vm = ex.add_vm(VmConfig::default()).unwrap();
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    ex.spawn(vm, Panics).unwrap();
    ex.wait_exited(1);
    std::panic::set_hook(prev);
    let runs = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    ex.spawn(
        vm,
        Halter {
            runs,
            limit: 1,
            ran: tx,
        },
    )
    .unwrap();
    rx.recv_timeout(HANG)
        .expect("executor stopped after a panic");
    ex.wait_exited(2);
    let m = ex.shutdown();
    assert_eq!((m.exited, m.panicked), (2, 1));
    assert!(format!("{:?}", m).contains("panicked"));
}
