//! Cost of one scheduling decision with 1,024 tasks (256 VMs x 4 vCPUs, 8 host CPUs).
//!
//! One decision = `finish` of the slice a host CPU just ran + `pick` of its next task: the
//! bookkeeping a host thread does between two slices. The anchor, measured in the same run,
//! is the floor any scheduler pays: a `VecDeque` round robin (pop front, push back), which
//! has no weights, no caps and no fairness. Criterion reports means; the p99 (target: under
//! 1 us) comes from timing 200,000 decisions one by one afterwards.

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use vmkit_sched::metrics::LatencyHistogram;
use vmkit_sched::{CreditConfig, CreditScheduler, Decision, Outcome, Scheduler, VmConfig};

const CPUS: usize = 8;
const VMS: usize = 256;
const VCPUS: usize = 4;

/// A scheduler with 1,024 runnable tasks and every host CPU running one of them.
struct Bench {
    sched: CreditScheduler,
    now: u64,
    running: Vec<u64>,
    cpu: usize,
    outcome_cycle: u64,
    running_task: Vec<Decision>,
}

impl Bench {
    fn new(with_blocking: bool) -> Self {
        let mut sched = CreditScheduler::new(CreditConfig::with_cpus(CPUS)).unwrap();
        let mut tasks = Vec::new();
        for i in 0..VMS {
            let mut cfg = VmConfig::weighted(100 * [1, 2, 4][i % 3]);
            if i % 8 == 0 {
                cfg = cfg.with_cap(150);
            }
            let vm = sched.add_vm(cfg).unwrap();
            for _ in 0..VCPUS {
                tasks.push(sched.add_task(vm, 0).unwrap());
            }
        }
        for &t in &tasks {
            sched.wake(t, 0).unwrap();
        }
        let mut running = Vec::new();
        let mut running_task = Vec::new();
        for cpu in 0..CPUS {
            match sched.pick(cpu, 0).unwrap() {
                d @ Decision::Run { slice, .. } => {
                    running.push(slice);
                    running_task.push(d);
                }
                Decision::Idle { .. } => unreachable!("1,024 runnable tasks"),
            }
        }
        Bench {
            sched,
            now: 0,
            running,
            cpu: 0,
            outcome_cycle: if with_blocking { 1 } else { 0 },
            running_task,
        }
    }

    /// Finish the slice on the next CPU and pick again; with blocking enabled, every
    /// fourth slice ends in a halt and the task is woken right away (exercising the wake,
    /// clamp and boost paths too).
    fn decide(&mut self) {
        let cpu = self.cpu;
        self.cpu = (self.cpu + 1) % CPUS;
        let ran = self.running[cpu].min(1_000_000);
        self.now += ran / CPUS as u64 + 1;
        let block = self.outcome_cycle > 0 && {
            self.outcome_cycle += 1;
            self.outcome_cycle % 4 == 0
        };
        let outcome = if block {
            Outcome::Blocked
        } else {
            Outcome::SliceEnd
        };
        let Decision::Run { task, .. } = self.running_task[cpu] else {
            unreachable!()
        };
        self.sched.finish(cpu, ran, outcome, self.now).unwrap();
        if block {
            // The halted vCPU gets its interrupt at once.
            black_box(self.sched.wake(task, self.now).unwrap());
        }
        loop {
            match self.sched.pick(cpu, self.now).unwrap() {
                d @ Decision::Run { slice, .. } => {
                    self.running[cpu] = slice;
                    self.running_task[cpu] = d;
                    break;
                }
                // Only when every runnable VM is throttled: move to the next period.
                Decision::Idle { until } => self.now = until.unwrap_or(self.now + 1),
            }
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision_1024_tasks");
    for blocking in [false, true] {
        let name = if blocking {
            "credit_with_wakes"
        } else {
            "credit"
        };
        let mut b = Bench::new(blocking);
        g.bench_function(BenchmarkId::new(name, 1024), |bench| {
            bench.iter(|| b.decide())
        });
    }
    let mut rr: VecDeque<u32> = (0..(VMS * VCPUS) as u32).collect();
    g.bench_function(
        BenchmarkId::new("vecdeque_round_robin_anchor", 1024),
        |bench| {
            bench.iter(|| {
                let t = rr.pop_front().unwrap_or(0);
                rr.push_back(black_box(t));
            })
        },
    );
    g.finish();
}

fn percentiles() {
    for blocking in [false, true] {
        let mut b = Bench::new(blocking);
        for _ in 0..20_000 {
            b.decide();
        }
        let mut h = LatencyHistogram::new();
        let mut clock = LatencyHistogram::new();
        for _ in 0..200_000 {
            let t0 = Instant::now();
            b.decide();
            h.record(t0.elapsed().as_nanos() as u64);
            let t1 = Instant::now();
            clock.record(t1.elapsed().as_nanos() as u64);
        }
        println!(
            "decision p50/p99/p99.9 ({}): {} / {} / {} ns (timer overhead p50 {} ns); stats {:?}",
            if blocking {
                "with wakes"
            } else {
                "slice ends only"
            },
            h.percentile(0.5),
            h.percentile(0.99),
            h.percentile(0.999),
            clock.percentile(0.5),
            b.sched.stats(),
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
    percentiles();
}
