//! Property tests: random weights, caps, vCPU counts and task behaviours, run in the
//! deterministic simulator. Case counts are modest; raise them with PROPTEST_CASES.

use proptest::prelude::*;
use vmkit_sched::metrics::FairnessReport;
use vmkit_sched::{Behaviour, CreditConfig, CreditScheduler, Simulation, VmConfig};

const US: u64 = 1_000;
const MS: u64 = 1_000_000;

fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig::with_cases(n)
}

fn behaviour() -> impl Strategy<Value = Behaviour> {
    prop_oneof![
        Just(Behaviour::CpuBound),
        (10u64..5_000, 1u64..10_000).prop_map(|(run, sleep)| Behaviour::Bursty {
            run: run * US,
            sleep: sleep * US
        }),
        (0u64..500).prop_map(|m| Behaviour::YieldBeforeTick {
            tick: 10 * MS,
            margin: m * US
        }),
    ]
}

#[derive(Clone, Debug)]
struct VmSpec {
    weight: u32,
    cap: Option<u32>,
    tasks: Vec<Behaviour>,
}

fn vm_spec(cpus: usize) -> impl Strategy<Value = VmSpec> {
    (
        1u32..=1000,
        proptest::option::of(1u32..=(cpus as u32 * 100)),
        proptest::collection::vec(behaviour(), 1..=4),
    )
        .prop_map(|(weight, cap, tasks)| VmSpec { weight, cap, tasks })
}

fn setup() -> impl Strategy<Value = (usize, Vec<VmSpec>)> {
    (1usize..=6).prop_flat_map(|cpus| (Just(cpus), proptest::collection::vec(vm_spec(cpus), 1..=8)))
}

fn run(cpus: usize, vms: &[VmSpec], until: u64) -> (Simulation<CreditScheduler>, Vec<usize>) {
    let cfg = CreditConfig::with_cpus(cpus);
    let mut s = Simulation::new(CreditScheduler::new(cfg).unwrap(), cfg.period);
    let mut ids = Vec::new();
    for v in vms {
        let mut c = VmConfig::weighted(v.weight);
        if let Some(cap) = v.cap {
            c = c.with_cap(cap);
        }
        let vm = s.add_vm(c).unwrap();
        for &b in &v.tasks {
            s.add_task(vm, b).unwrap();
        }
        ids.push(vm.index());
    }
    s.run_until(until).unwrap();
    (s, ids)
}

proptest! {
    #![proptest_config(cases(48))]

    /// Caps are never exceeded in any period; nobody gets more CPU than exists or than
    /// elapsed; and the same inputs give the same result.
    #[test]
    fn caps_capacity_and_determinism((cpus, vms) in setup()) {
        let until = 400 * MS;
        let (s, ids) = run(cpus, &vms, until);
        let r = s.report();
        for (v, &id) in vms.iter().zip(&ids) {
            if let Some(cap) = v.cap {
                let budget = 10 * MS * u64::from(cap) / 100;
                for (p, &u) in r.vm_period_usage[id].iter().enumerate() {
                    prop_assert!(u <= budget + budget / 100, "cap {}%: period {} used {}", cap, p, u);
                }
            }
        }
        prop_assert!(r.vm_service.iter().sum::<u64>() <= cpus as u64 * until);
        for &t in &r.task_service {
            prop_assert!(t <= until);
        }
        for period in 0..r.vm_period_usage.iter().map(Vec::len).max().unwrap_or(0) {
            let used: u64 = r.vm_period_usage.iter().filter_map(|u| u.get(period)).sum();
            prop_assert!(used <= cpus as u64 * 10 * MS);
        }
        let (again, _) = run(cpus, &vms, until);
        prop_assert_eq!(r, again.report());
    }

    /// With CPU-bound tasks only and enough vCPUs per VM that no VM is limited by its vCPU
    /// count, every VM gets its weighted share, up to 2% plus the slices in flight.
    ///
    /// (Not claimed: the same bound when VMs are limited by caps or vCPU counts on few CPUs.
    /// Proptest found setups on 2 CPUs - e.g. weights 96, 1, 645 capped at 23%, 587, 1 with
    /// one vCPU each - where a vCPU-limited VM gets ~23% less than its max-min share,
    /// because slices are not preempted to rebalance; caps themselves always hold.)
    #[test]
    fn cpu_bound_shares_match_weights(
        cpus in 1usize..=6,
        weights in proptest::collection::vec(1u32..=1000, 1..=8),
    ) {
        let vms: Vec<VmSpec> = weights
            .iter()
            .map(|&weight| VmSpec { weight, cap: None, tasks: vec![Behaviour::CpuBound; cpus] })
            .collect();
        let until = 2_000 * MS;
        let (s, ids) = run(cpus, &vms, until);
        let r = s.report();
        let ent = s.entitlements().unwrap();
        for &id in &ids {
            let want = ent[id] * until as f64;
            let got = r.vm_service[id] as f64;
            let slack = 0.02 * want + (cpus as f64 + 1.0) * 10.0 * MS as f64;
            prop_assert!((got - want).abs() <= slack, "VM {}: got {} want {}", id, got, want);
        }
        // No CPU idles while work is queued.
        prop_assert_eq!(r.vm_service.iter().sum::<u64>(), cpus as u64 * until);
        let service: Vec<f64> = r.vm_service.iter().map(|&x| x as f64).collect();
        // Jain over the VMs owed at least 20 slices (below that, one slice more or less is
        // a large ratio and says nothing about fairness).
        let big: Vec<usize> = ids.iter().copied().filter(|&i| ent[i] * until as f64 >= 200.0 * MS as f64).collect();
        let f = FairnessReport::new(
            &big.iter().map(|&i| service[i]).collect::<Vec<_>>(),
            &big.iter().map(|&i| ent[i]).collect::<Vec<_>>(),
        );
        prop_assert!(f.jain > 0.99, "jain {}", f.jain);
    }

    /// A gaming task (sleeping to be boosted, yielding before ticks) among CPU-bound VMs of
    /// the same weight gets at most 2% more than its share.
    #[test]
    fn gamers_gain_at_most_2_percent(
        cpus in 1usize..=6,
        others in 1usize..=12,
        gamer in behaviour(),
        vcpus in 1usize..=4,
    ) {
        let mut vms = vec![VmSpec { weight: 256, cap: None, tasks: vec![gamer; vcpus] }];
        for _ in 0..others.max(cpus) {
            vms.push(VmSpec { weight: 256, cap: None, tasks: vec![Behaviour::CpuBound] });
        }
        let until = 4_000 * MS;
        let (s, ids) = run(cpus, &vms, until);
        let r = s.report();
        let ent = s.entitlements().unwrap();
        let want = ent[ids[0]] * until as f64;
        let got = r.vm_service[ids[0]] as f64;
        // 2%, plus one slice in flight at the end of the run.
        prop_assert!(got <= want * 1.02 + 10.0 * MS as f64, "gamer {:?}: got {} want {}", gamer, got, want);
    }
}
