//! Fairness, caps, boost latency and anti-gaming properties of the credit scheduler,
//! checked exactly in the deterministic simulator.

use vmkit_sched::metrics::FairnessReport;
use vmkit_sched::{Behaviour, CreditConfig, CreditScheduler, SimReport, Simulation, VmConfig};

const US: u64 = 1_000;
const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;

fn sim_with(cfg: CreditConfig) -> Simulation<CreditScheduler> {
    let period = cfg.period;
    Simulation::new(CreditScheduler::new(cfg).unwrap(), period)
}

fn sim(cpus: usize) -> Simulation<CreditScheduler> {
    sim_with(CreditConfig::with_cpus(cpus))
}

/// Service of `vm` divided by what it would be entitled to if all tasks were CPU-bound.
fn ratio(s: &Simulation<CreditScheduler>, r: &SimReport, vm: usize) -> f64 {
    let ent = s.entitlements().unwrap();
    r.vm_service[vm] as f64 / (ent[vm] * r.now as f64)
}

#[test]
fn weights_1_2_4_over_64_vms_on_8_cpus() {
    let mut s = sim(8);
    for i in 0..64 {
        let vm = s
            .add_vm(VmConfig::weighted(100 * [1, 2, 4][i % 3]))
            .unwrap();
        for _ in 0..4 {
            s.add_task(vm, Behaviour::CpuBound).unwrap();
        }
    }
    s.run_until(30 * SEC).unwrap();
    let r = s.report();
    let ent = s.entitlements().unwrap();
    let service: Vec<f64> = r.vm_service.iter().map(|&x| x as f64).collect();
    let f = FairnessReport::new(&service, &ent);
    assert_eq!(
        r.vm_service.iter().sum::<u64>(),
        8 * 30 * SEC,
        "work conserving"
    );
    for (i, v) in f.vms.iter().enumerate() {
        assert!((v.ratio - 1.0).abs() <= 0.02, "VM {i}: ratio {}", v.ratio);
        // Entitlement in absolute terms too (all CPUs busy, so shares are CPU-seconds).
        assert!((ratio(&s, &r, i) - 1.0).abs() <= 0.02);
    }
    assert!(f.jain > 0.999, "jain {}", f.jain);
    // vCPUs of one VM share it equally.
    for vm in 0..64 {
        let t = &r.task_service[vm * 4..vm * 4 + 4];
        let mean = t.iter().sum::<u64>() as f64 / 4.0;
        for &x in t {
            assert!((x as f64 / mean - 1.0).abs() <= 0.05, "VM {vm} tasks {t:?}");
        }
    }
    assert!(r.stats.steals > 0, "host CPUs balance by stealing");
}

#[test]
fn caps_hold_in_every_period_even_with_idle_cpus() {
    let mut s = sim(4);
    // 325% of 400%: every cap is reachable.
    let caps = [25u32, 50, 100, 150];
    let mut capped = Vec::new();
    for &cap in &caps {
        let vm = s.add_vm(VmConfig::weighted(1000).with_cap(cap)).unwrap();
        for _ in 0..4 {
            s.add_task(vm, Behaviour::CpuBound).unwrap();
        }
        capped.push((vm, cap));
    }
    // A lone light VM: CPUs stay partly idle, and caps must hold anyway.
    let other = s.add_vm(VmConfig::weighted(1)).unwrap();
    s.add_task(
        other,
        Behaviour::Bursty {
            run: 300 * US,
            sleep: 700 * US,
        },
    )
    .unwrap();
    s.run_until(2 * SEC).unwrap();
    let r = s.report();
    let period = 10 * MS;
    for (vm, cap) in capped {
        let budget = period * u64::from(cap) / 100;
        let usage = &r.vm_period_usage[vm.index()];
        assert_eq!(usage.len(), 200);
        for (p, &u) in usage.iter().enumerate() {
            assert!(
                u <= budget + budget / 100,
                "VM cap {cap}%: period {p} used {u} > {budget}"
            );
        }
        // Caps are bounds, and here nothing else wants the CPUs: each VM reaches its cap.
        for &u in &usage[1..] {
            assert!(
                u * 100 >= budget * 99,
                "VM cap {cap}% only used {u} of {budget}"
            );
        }
    }
    assert!(r.stats.throttles > 0);
}

#[test]
fn caps_hold_under_contention_with_mixed_behaviours() {
    let mut s = sim(8);
    let mut capped = Vec::new();
    for i in 0..24 {
        let cap = if i % 3 == 0 {
            Some(40 + 30 * (i as u32 % 5))
        } else {
            None
        };
        let mut cfg = VmConfig::weighted(100 + 50 * (i as u32 % 4));
        if let Some(c) = cap {
            cfg = cfg.with_cap(c);
        }
        let vm = s.add_vm(cfg).unwrap();
        for j in 0..3 {
            let b = match (i + j) % 3 {
                0 => Behaviour::CpuBound,
                1 => Behaviour::Bursty {
                    run: 700 * US,
                    sleep: 90 * US,
                },
                _ => Behaviour::YieldBeforeTick {
                    tick: 10 * MS,
                    margin: 30 * US,
                },
            };
            s.add_task(vm, b).unwrap();
        }
        if let Some(c) = cap {
            capped.push((vm, c));
        }
    }
    s.run_until(3 * SEC).unwrap();
    let r = s.report();
    for (vm, cap) in capped {
        let budget = 10 * MS * u64::from(cap) / 100;
        for (p, &u) in r.vm_period_usage[vm.index()].iter().enumerate() {
            assert!(
                u <= budget + budget / 100,
                "cap {cap}%: period {p} used {u}"
            );
        }
    }
}

/// Everyone else is CPU-bound with equal weight; the gamer's entitlement is what it would
/// get if it were CPU-bound too, and it must not beat that by more than 2%.
fn gamer_ratio(cpus: usize, gamer_vcpus: usize, gamer: Behaviour, boost: bool) -> (f64, SimReport) {
    let mut cfg = CreditConfig::with_cpus(cpus);
    cfg.boost = boost;
    let mut s = sim_with(cfg);
    let g = s.add_vm(VmConfig::default()).unwrap();
    for _ in 0..gamer_vcpus {
        s.add_task(g, gamer).unwrap();
    }
    for _ in 0..2 * cpus {
        let vm = s.add_vm(VmConfig::default()).unwrap();
        s.add_task(vm, Behaviour::CpuBound).unwrap();
    }
    s.run_until(20 * SEC).unwrap();
    let r = s.report();
    (ratio(&s, &r, g.index()), r)
}

#[test]
fn sleeping_to_get_boosted_gains_at_most_2_percent() {
    for (run, sleep) in [
        (300 * US, 20 * US),
        (50 * US, 5 * US),
        (2 * MS, 100 * US),
        (900 * US, MS),
    ] {
        for vcpus in [1, 4] {
            let (g, r) = gamer_ratio(8, vcpus, Behaviour::Bursty { run, sleep }, true);
            assert!(
                g <= 1.02,
                "run {run} sleep {sleep} vcpus {vcpus}: ratio {g}"
            );
            assert!(r.stats.decisions > 0);
        }
    }
}

#[test]
fn yielding_before_the_tick_gains_at_most_2_percent() {
    for margin in [US, 50 * US, 500 * US] {
        for vcpus in [1, 4] {
            let (g, _) = gamer_ratio(
                8,
                vcpus,
                Behaviour::YieldBeforeTick {
                    tick: 10 * MS,
                    margin,
                },
                true,
            );
            assert!(g <= 1.02, "margin {margin} vcpus {vcpus}: ratio {g}");
            // Charged for what it ran, it still gets its share: yielding costs nothing.
            assert!(g >= 0.98, "margin {margin} vcpus {vcpus}: ratio {g}");
        }
    }
}

#[test]
fn boost_bounds_wake_latency_by_the_rate_limit() {
    let run = |boost: bool| {
        let mut cfg = CreditConfig::with_cpus(4);
        cfg.boost = boost;
        let ratelimit = cfg.ratelimit;
        let mut s = sim_with(cfg);
        // Every wake competes with 16 CPU hogs on 4 CPUs.
        let io = s.add_vm(VmConfig::default()).unwrap();
        s.add_task(
            io,
            Behaviour::Bursty {
                run: 100 * US,
                sleep: 5 * MS,
            },
        )
        .unwrap();
        for _ in 0..16 {
            let vm = s.add_vm(VmConfig::default()).unwrap();
            s.add_task(vm, Behaviour::CpuBound).unwrap();
        }
        // Warm-up: until every hog has run once, the I/O VM (which has) is not owed
        // anything and rightly waits.
        s.run_until(100 * MS).unwrap();
        s.clear_latency();
        s.run_until(5 * SEC).unwrap();
        (s.report().vm_latency[io.index()].clone(), ratelimit)
    };
    let (with, ratelimit) = run(true);
    let (without, _) = run(false);
    assert!(with.count() > 900, "{}", with.count());
    assert!(
        with.max() <= ratelimit,
        "max wake latency {} > rate limit {ratelimit}",
        with.max()
    );
    // Without the boost the woken vCPU waits for slices to end by themselves.
    assert!(
        without.percentile(0.99) > 4 * ratelimit,
        "{}",
        without.percentile(0.99)
    );
}

#[test]
fn simulation_is_deterministic() {
    let build = || {
        let mut s = sim(3);
        for i in 0..7u32 {
            let vm = s
                .add_vm(VmConfig::weighted(50 + 70 * i).with_cap(20 + 40 * i))
                .unwrap();
            s.add_task(
                vm,
                Behaviour::Bursty {
                    run: (100 + 37 * u64::from(i)) * US,
                    sleep: 333 * US,
                },
            )
            .unwrap();
            s.add_task(vm, Behaviour::CpuBound).unwrap();
        }
        s.run_until(500 * MS).unwrap();
        s.report()
    };
    assert_eq!(build(), build());
}

#[test]
fn finite_tasks_exit_and_free_their_share() {
    let mut s = sim(2);
    let a = s.add_vm(VmConfig::default()).unwrap();
    let b = s.add_vm(VmConfig::default()).unwrap();
    s.add_task(a, Behaviour::Finite { work: 100 * MS }).unwrap();
    s.add_task(b, Behaviour::CpuBound).unwrap();
    s.add_task(b, Behaviour::CpuBound).unwrap();
    s.run_until(SEC).unwrap();
    let r = s.report();
    assert_eq!(r.vm_service[a.index()], 100 * MS);
    assert_eq!(r.vm_service[b.index()], 2 * SEC - 100 * MS);
    assert_eq!(s.scheduler().config().cpus, 2);
}

#[test]
fn simulator_rejects_bad_input_and_takes_external_wakes() {
    use vmkit_sched::{SchedError, SimError};
    let mut s = sim(1);
    let vm = s.add_vm(VmConfig::default()).unwrap();
    let bad = Behaviour::YieldBeforeTick {
        tick: 10,
        margin: 10,
    };
    assert_eq!(s.add_task(vm, bad), Err(SimError::InvalidBehaviour(bad)));
    assert!(matches!(
        s.add_vm(VmConfig::weighted(0)),
        Err(SimError::Sched {
            source: SchedError::InvalidWeight(0),
            ..
        })
    ));
    // Runs 1 ms, then halts "forever" (an hour); an interrupt at 5 ms brings it back.
    let t = s
        .add_task(
            vm,
            Behaviour::Bursty {
                run: MS,
                sleep: 3_600 * SEC,
            },
        )
        .unwrap();
    s.run_until(4 * MS).unwrap();
    assert_eq!(s.report().task_service[t.index()], MS);
    s.schedule_wake(t, 5 * MS).unwrap();
    assert!(matches!(
        s.schedule_wake(t, MS),
        Err(SimError::WakeInPast { .. })
    ));
    s.run_until(10 * MS).unwrap();
    let r = s.report();
    assert_eq!(r.task_service[t.index()], 2 * MS);
    assert_eq!(r.vm_latency[vm.index()].max(), 0);
    assert_eq!(s.now(), 10 * MS);
}
