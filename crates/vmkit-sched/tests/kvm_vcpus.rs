//! vmkit-sched scheduling real KVM vCPUs: 16 busy guest vCPUs (4 VMs x 4 vCPUs, weights
//! 1:1:2:4) on 2 host threads make progress in weight proportion, both when the guests exit
//! all the time and when they never exit at all.
//!
//! The scheduler knows nothing about KVM: [`VcpuTask`] below is a hand-written adapter (the
//! library's `vmkit_sched::vcpu::VcpuTask` is the general one; this one also checks every
//! value the guest reports). Its `run` arms the library's `SliceTimer` for the slice deadline, then loops on `KVM_RUN`, handling
//! exits itself, until the vCPU comes back with [`VmExit::Interrupted`] after the deadline
//! (or after the executor cut the slice through the task's [`Kick`]), or halts. A vCPU in
//! `KVM_RUN` cannot poll [`Slice::expired`], which is why both the timer and the kick exist.
//!
//! Progress is what the guests say they did, in one of two ways:
//!
//! - [`Guest::PioLoop`]: every vCPU runs the `pio_loop` test guest, which writes 0, 1, 2, ...
//!   to port 0x511, one exit per value. The adapter checks that the values arrive in sequence
//!   (so the count is the guest's own) and counts them per vCPU. The adapter regains control
//!   every ~11 us and often sees the slice expire by itself.
//! - [`Guest::Spin`]: every vCPU runs `inc qword [rbx]; jmp back` on its own counter in guest
//!   memory and never exits; the host reads the counters from guest RAM. Only the deadline
//!   timer's kick ends a slice, so this is the case the `Kick` machinery exists for.
//!
//! These tests need `/dev/kvm`; they fail (not skip) when it cannot be used.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::Bytes;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmkit_sched::vcpu::{SliceTimer, TimerSlot};
use vmkit_sched::{
    Accounting, CreditConfig, CreditScheduler, Executor, Kick, Outcome, Slice, Task, VmConfig,
};
use vmkit_test_guests as guests;
use vmkit_vcpu::boot::{self, CpuMode, KernelFormat};
use vmkit_vcpu::kvm::{KvmHypervisor, KvmKick, KvmVcpu, KvmVm};
use vmkit_vcpu::{Hypervisor, MemoryFlags, Vcpu, VcpuKick, Vm, VmExit};

const MS: u64 = 1_000_000;
/// Guest RAM per VM: the guest image at 1 MiB, its stack and the boot page tables.
const MEM_SIZE: usize = 4 << 20;
/// Guard against hangs (a lost kick or wake): generous, and only ever hit by a bug.
const HANG: Duration = Duration::from_secs(120);

/// The executor's kick hook, backed by the vCPU's KVM kick (signal + `immediate_exit`).
struct KvmSchedKick(KvmKick);

impl Kick for KvmSchedKick {
    fn kick(&self) {
        VcpuKick::kick(&self.0);
    }
}

/// Guest-physical address of the spin guest's code.
const SPIN_CODE: u64 = 0x10_0000;
/// Guest-physical address of the spin guest's counters, one `u64` per vCPU.
const SPIN_COUNTERS: u64 = 0x20_0000;
/// `inc qword [rbx]` then `jmp` back to it: two instructions a loop, no exit ever.
const SPIN_LOOP: [u8; 5] = [0x48, 0xff, 0x03, 0xeb, 0xfb];

/// Which guest the vCPUs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Guest {
    /// The `pio_loop` test guest: one port write (one exit) per unit of work.
    PioLoop,
    /// A loop that increments a counter in guest memory and never exits.
    Spin,
}

/// A KVM VM with its guest RAM, shared by its vCPU tasks (which keep it alive).
struct GuestVm {
    _vm: KvmVm,
    _mem: GuestMemoryMmap,
}

/// What one vCPU did, as the guest reported it.
#[derive(Default)]
struct VcpuProgress {
    /// Values the guest wrote to the data port, in sequence.
    values: AtomicU64,
    /// For the spin guest: where its counter lives in guest memory.
    counter: Option<(GuestMemoryMmap, GuestAddress)>,
    /// Slices that ended by the deadline timer or a cut (an `Interrupted` after expiry).
    slices: AtomicU64,
    /// `Interrupted` exits before the slice expired (a stale kick): re-entered.
    spurious: AtomicU64,
}

impl VcpuProgress {
    /// Work done so far: values reported on the port, or the counter in guest memory.
    fn work(&self) -> u64 {
        match &self.counter {
            None => self.values.load(Ordering::Relaxed),
            Some((mem, addr)) => mem.read_obj::<u64>(*addr).expect("counter in guest RAM"),
        }
    }
}

/// The adapter: one KVM vCPU as a [`Task`].
struct VcpuTask {
    index: usize,
    vcpu: KvmVcpu,
    _vm: Arc<GuestVm>,
    timer: Arc<SliceTimer<KvmKick>>,
    slot: TimerSlot,
    progress: Arc<VcpuProgress>,
    errors: Arc<Mutex<Vec<String>>>,
    /// The next value the guest must write.
    next: u32,
}

impl VcpuTask {
    fn fail(&self, what: String) -> Outcome {
        self.errors
            .lock()
            .unwrap()
            .push(format!("vCPU task {}: {what}", self.index));
        Outcome::Exited
    }
}

impl Task for VcpuTask {
    fn run(&mut self, slice: &Slice) -> Outcome {
        self.timer
            .arm(&self.slot, slice.deadline(), self.vcpu.kick_handle());
        let outcome = loop {
            if slice.expired() {
                self.progress.slices.fetch_add(1, Ordering::Relaxed);
                break Outcome::SliceEnd;
            }
            let result = match self.vcpu.run() {
                Ok(VmExit::IoOut { port, data }) if port == guests::DATA_PORT => {
                    match <[u8; 4]>::try_from(data) {
                        Ok(bytes) => Ok(Some(u32::from_le_bytes(bytes))),
                        Err(_) => Err(format!("{}-byte write to the data port", data.len())),
                    }
                }
                Ok(VmExit::IoIn { port, data }) if port == guests::PARAM_PORT => {
                    // Count forever (4 billion exits: far more than any run takes).
                    data.fill(0xff);
                    Ok(None)
                }
                Ok(VmExit::Interrupted) => {
                    if !slice.expired() {
                        self.progress.spurious.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None)
                }
                Ok(VmExit::Halt) => Err("the guest halted: it never should".to_string()),
                Ok(other) => Err(format!("unexpected exit {other:?}")),
                Err(e) => Err(format!("KVM_RUN failed: {e}")),
            };
            match result {
                Ok(Some(v)) if v == self.next => {
                    self.next = self.next.wrapping_add(1);
                    self.progress.values.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(v)) => {
                    let expected = self.next;
                    break self.fail(format!("guest wrote {v}, expected {expected}"));
                }
                Ok(None) => {}
                Err(e) => break self.fail(e),
            }
        };
        self.timer.disarm(&self.slot);
        outcome
    }

    fn kick_handle(&self) -> Option<Arc<dyn Kick>> {
        Some(Arc::new(KvmSchedKick(self.vcpu.kick_handle())))
    }
}

/// Creates a KVM VM running `guest` on `vcpus` vCPUs, with each vCPU's progress record.
///
/// `pio_loop` vCPUs are all entered at the guest's entry point; the guest keeps its counter
/// in registers, so they do not disturb each other (the adapter's sequence check would see
/// it). Spin vCPUs each get their own counter through `rbx`.
fn boot_vm(
    hv: &KvmHypervisor,
    vcpus: u32,
    guest: Guest,
) -> (Arc<GuestVm>, Vec<(KvmVcpu, Arc<VcpuProgress>)>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let vm = hv.create_vm().expect("KVM_CREATE_VM");
    vm.register_memory(&mem, 0, MemoryFlags::default())
        .expect("register guest RAM");
    let kernel = match guest {
        Guest::PioLoop => Some(
            boot::load_kernel(
                &mem,
                &mut std::io::Cursor::new(guests::PIO_LOOP),
                KernelFormat::PlainElf,
                None,
                &[],
            )
            .expect("load pio_loop"),
        ),
        Guest::Spin => {
            mem.write_slice(&SPIN_LOOP, GuestAddress(SPIN_CODE))
                .expect("write the spin loop");
            None
        }
    };
    let mut cpus = Vec::new();
    for id in 0..vcpus {
        let vcpu = vm.create_vcpu(id).expect("KVM_CREATE_VCPU");
        boot::configure_cpuid(hv, &vcpu, boot::default_cpuid_policy).expect("CPUID");
        let counter = match &kernel {
            Some(k) => {
                k.setup_vcpu(&mem, &vcpu).expect("vCPU setup");
                None
            }
            None => {
                boot::setup_vcpu(&mem, &vcpu, CpuMode::Long, SPIN_CODE, boot::BOOT_STACK, 0)
                    .expect("vCPU setup");
                let addr = GuestAddress(SPIN_COUNTERS + 8 * u64::from(id));
                let mut regs = vcpu.regs().expect("get regs");
                regs.rbx = addr.0;
                vcpu.set_regs(&regs).expect("set regs");
                Some((mem.clone(), addr))
            }
        };
        let progress = Arc::new(VcpuProgress {
            counter,
            ..VcpuProgress::default()
        });
        cpus.push((vcpu, progress));
    }
    (Arc::new(GuestVm { _vm: vm, _mem: mem }), cpus)
}

#[test]
fn kvm_exiting_guests_on_two_host_threads_progress_in_weight_proportion() {
    // ~11.5 us per value (an exit plus a few emulated instructions): ~4.6 s of CPU time.
    weighted_progress(Guest::PioLoop, 400_000);
}

#[test]
fn kvm_guests_that_never_exit_are_time_sliced_by_the_kick_in_weight_proportion() {
    // ~2.7 us per loop (two emulated instructions plus the host's share of the slice
    // switches): ~5.4 s of CPU time.
    weighted_progress(Guest::Spin, 2_000_000);
}

/// 4 VMs x 4 vCPUs of `guest`, weights 1:1:2:4, on 2 host threads, until the guests report
/// `work` units of progress past a warm-up; asserts guest-reported shares and the
/// scheduler's charges against the weights.
fn weighted_progress(guest: Guest, work: u64) {
    const WEIGHTS: [u32; 4] = [100, 100, 200, 400];
    const VCPUS: u32 = 4;
    let hv = KvmHypervisor::new().expect("/dev/kvm must be usable for this test");

    let mut config = CreditConfig::with_cpus(2);
    config.timeslice = 5 * MS;
    let ex =
        Executor::with_accounting(CreditScheduler::new(config).unwrap(), Accounting::ThreadCpu)
            .unwrap();
    // The library's slice timer; this test keeps its own task (not `vmkit_sched::vcpu::
    // VcpuTask`) because it checks every value the guest reports.
    let (timer, timer_thread) = SliceTimer::<KvmKick>::start().unwrap();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let mut progress: Vec<Vec<Arc<VcpuProgress>>> = Vec::new();
    let mut index = 0;
    for &w in &WEIGHTS {
        let vm = ex.add_vm(VmConfig::weighted(w)).unwrap();
        let (vm_guest, vcpus) = boot_vm(&hv, VCPUS, guest);
        let mut vm_progress = Vec::new();
        for (vcpu, p) in vcpus {
            ex.spawn(
                vm,
                VcpuTask {
                    index,
                    vcpu,
                    _vm: vm_guest.clone(),
                    timer: timer.clone(),
                    slot: timer.register(),
                    progress: p.clone(),
                    errors: errors.clone(),
                    next: 0,
                },
            )
            .unwrap();
            index += 1;
            vm_progress.push(p);
        }
        progress.push(vm_progress);
    }
    let vm_values = |progress: &[Vec<Arc<VcpuProgress>>]| -> Vec<u64> {
        progress
            .iter()
            .map(|v| v.iter().map(|p| p.work()).sum())
            .collect()
    };

    // Run until the guests have done enough work, however long that takes on a busy host.
    // Measure from a warm-up point so that the spawn order (the first VM started alone)
    // does not count.
    let wait_for = |total: u64| {
        let start = Instant::now();
        loop {
            let done: u64 = vm_values(&progress).iter().sum();
            if done >= total {
                break;
            }
            assert!(start.elapsed() < HANG, "guests stalled at {done} values");
            assert!(errors.lock().unwrap().is_empty(), "{:?}", errors.lock());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let warmup = work / 40;
    let t0 = Instant::now();
    wait_for(warmup);
    let (service0, values0) = (ex.metrics().vm_service, vm_values(&progress));
    wait_for(warmup + work);
    let (m, values1) = (ex.metrics(), vm_values(&progress));
    let elapsed = t0.elapsed();
    let end = ex.shutdown();
    let kicks = timer.stop();
    timer_thread.join().unwrap();

    assert!(errors.lock().unwrap().is_empty(), "{:?}", errors.lock());
    assert!(end.errors.is_empty(), "{:?}", end.errors);
    assert_eq!(end.panicked, 0);

    let done: Vec<f64> = values1
        .iter()
        .zip(&values0)
        .map(|(a, b)| (a - b) as f64)
        .collect();
    let service: Vec<f64> = m
        .vm_service
        .iter()
        .zip(&service0)
        .map(|(a, b)| a.saturating_sub(*b) as f64)
        .collect();
    let total_work: f64 = done.iter().sum();
    let total_service: f64 = service.iter().sum();
    let total_weight: f64 = WEIGHTS.iter().map(|&w| f64::from(w)).sum();
    let slices: u64 = progress
        .iter()
        .flatten()
        .map(|p| p.slices.load(Ordering::Relaxed))
        .sum();
    let spurious: u64 = progress
        .iter()
        .flatten()
        .map(|p| p.spurious.load(Ordering::Relaxed))
        .sum();
    eprintln!(
        "{guest:?}: {} units of guest work in {elapsed:?}: {slices} slices, {kicks} deadline kicks, \
         {spurious} stale kicks, scheduler charged {:.3} s",
        total_work,
        total_service / 1e9
    );
    for (i, &w) in WEIGHTS.iter().enumerate() {
        eprintln!(
            "VM {i} weight {w}: weight share {:.3}, guest work share {:.3}, charged share {:.3}, \
             values per charged us {:.4}",
            f64::from(w) / total_weight,
            done[i] / total_work,
            service[i] / total_service,
            done[i] / (service[i] / 1e3),
        );
    }

    // Every vCPU of every VM ran (the local level shares a VM among its vCPUs).
    for (i, vm) in progress.iter().enumerate() {
        let per_vcpu: Vec<u64> = vm.iter().map(|p| p.work()).collect();
        eprintln!("VM {i} values per vCPU (whole run): {per_vcpu:?}");
        let mean = per_vcpu.iter().sum::<u64>() as f64 / per_vcpu.len() as f64;
        for (j, v) in per_vcpu.iter().enumerate() {
            // Observed within 10% of the VM's mean; half leaves room for a noisy host.
            assert!(
                (*v as f64 / mean - 1.0).abs() < 0.5,
                "VM {i} vCPU {j}: {v} values, VM mean {mean:.0}: {per_vcpu:?}"
            );
        }
    }
    // The scheduler's own charges (thread CPU time per slice) follow the weights: this is
    // the part the scheduler controls.
    for (i, &w) in WEIGHTS.iter().enumerate() {
        let want = f64::from(w) / total_weight;
        let got = service[i] / total_service;
        assert!(
            (got / want - 1.0).abs() < 0.10,
            "VM {i} (weight {w}): charged share {got:.3}, weight share {want:.3}; \
             charged ns {service:?}"
        );
    }
    // Guest-reported work in weight proportion. The runs are ~4-5 s of guest CPU time,
    // ~900 slices of 5 ms, so the weight-1 VMs get ~110 slices each and one slice more or
    // less moves a share by ~1%. Observed within 1% in most runs, but how much guest work a
    // CPU-second buys is the host's business, not the scheduler's: 8% off was seen while
    // the 2-core host ran other load, and the executor test saw one VM's work rate 29% low
    // with its CPU share right. So this checks only that work follows the weights at all:
    // equal shares (a scheduler that ignores weights) put the weight-4 VM at -50% and the
    // weight-1 VMs at +100%; 35% fails that.
    for (i, &w) in WEIGHTS.iter().enumerate() {
        let want = f64::from(w) / total_weight;
        let got = done[i] / total_work;
        assert!(
            (got / want - 1.0).abs() < 0.35,
            "VM {i} (weight {w}): guest work share {got:.3}, weight share {want:.3}; \
             work {done:?}"
        );
    }
    // The scheduler's books agree with the guests: work per charged nanosecond is about the
    // same for every VM (same loose tolerance, same reasons).
    let rate: Vec<f64> = done.iter().zip(&service).map(|(w, s)| w / s).collect();
    let mean_rate = total_work / total_service;
    for (i, r) in rate.iter().enumerate() {
        assert!(
            (r / mean_rate - 1.0).abs() < 0.35,
            "VM {i}: guest work per charged ns {r:e} vs mean {mean_rate:e}; rates {rate:?}"
        );
    }
    assert!(slices > 0 && kicks > 0, "slices {slices}, kicks {kicks}");
    if guest == Guest::Spin {
        // A guest that never exits leaves KVM_RUN only when kicked, and nothing here wakes a
        // task (so the executor never cuts a slice): the deadline timer ended the slices.
        assert!(
            kicks * 10 >= slices * 9,
            "slices {slices}, deadline kicks {kicks}"
        );
    }
}
