//! vCPUs with KVM's in-kernel irqchip, whose `HLT` sleeps inside `KVM_RUN`, on executor
//! workers: the halt is detected, the vCPU parked, and woken by its LAPIC timer, by the VMM
//! after an interrupt, or by the re-poll period; a busy vCPU gets the worker meanwhile.
//!
//! The halting guest is 16-bit real-mode code written here byte by byte: it programs its
//! LAPIC through x2APIC MSRs (no MMIO needed in real mode), then loops: read a period from
//! port 0x510 (0: stop; u32::MAX: halt without arming the timer), arm a one-shot timer for
//! that many APIC bus cycles (1 ns each in KVM, divide-by-1), `sti; hlt`, and report each
//! wake-up on port 0x511. Its interrupt handler only writes EOI.
//!
//! These tests need `/dev/kvm`; they fail (not skip) when it cannot be used.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_msi;
use vm_device::bus::PioAddress;
use vm_device::DevicePio;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_sched::halt::KernelHalts;
use vmkit_sched::vcpu::{SliceTimer, VcpuTask};
use vmkit_sched::{Accounting, CreditConfig, CreditScheduler, Executor, VmConfig};
use vmkit_vcpu::boot;
use vmkit_vcpu::dispatch::{Dispatcher, UnclaimedPolicy};
use vmkit_vcpu::kvm::{KvmHypervisor, KvmKick, KvmVcpu, KvmVm};
use vmkit_vcpu::{Hypervisor, MemoryFlags, MsrEntry, Vcpu, Vm};

const HANG: Duration = Duration::from_secs(120);
const CODE: u64 = 0x1000;
const HANDLER: u64 = 0x1100;
const IRET: u64 = 0x1200;
const COUNTER: u64 = 0x500;
const VECTOR: u8 = 0x40;
const PARAM_PORT: u16 = 0x510;
const WAKE_PORT: u16 = 0x511;

#[rustfmt::skip]
const HALTER: &[u8] = &[
    0x66, 0xB9, 0x0F, 0x08, 0x00, 0x00, // mov ecx, 0x80f (SVR)
    0x66, 0xB8, 0xFF, 0x01, 0x00, 0x00, // mov eax, 0x1ff (enabled, spurious 0xff)
    0x66, 0x31, 0xD2,                   // xor edx, edx
    0x0F, 0x30,                         // wrmsr
    0x66, 0xB9, 0x32, 0x08, 0x00, 0x00, // mov ecx, 0x832 (LVT timer)
    0x66, 0xB8, VECTOR, 0x00, 0x00, 0x00, // mov eax, VECTOR (one-shot)
    0x0F, 0x30,                         // wrmsr
    0x66, 0xB9, 0x3E, 0x08, 0x00, 0x00, // mov ecx, 0x83e (divide config)
    0x66, 0xB8, 0x0B, 0x00, 0x00, 0x00, // mov eax, 0xb (divide by 1)
    0x0F, 0x30,                         // wrmsr
    // loop:
    0xBA, 0x10, 0x05,                   // mov dx, 0x510
    0x66, 0xED,                         // in eax, dx
    0x66, 0x85, 0xC0,                   // test eax, eax
    0x74, 0x1A,                         // jz done
    0x66, 0x83, 0xF8, 0xFF,             // cmp eax, -1
    0x74, 0x0B,                         // je idle (no timer)
    0x66, 0xB9, 0x38, 0x08, 0x00, 0x00, // mov ecx, 0x838 (initial count)
    0x66, 0x31, 0xD2,                   // xor edx, edx
    0x0F, 0x30,                         // wrmsr
    // idle:
    0xFB,                               // sti
    0xF4,                               // hlt
    0xFA,                               // cli
    0xBA, 0x11, 0x05,                   // mov dx, 0x511
    0xEE,                               // out dx, al
    0xEB, 0xDC,                         // jmp loop
    // done:
    0xFA, 0xF4, 0xEB, 0xFC,             // cli; hlt; jmp done
];

#[rustfmt::skip]
const EOI_HANDLER: &[u8] = &[
    0x66, 0xB9, 0x0B, 0x08, 0x00, 0x00, // mov ecx, 0x80b (EOI)
    0x66, 0x31, 0xC0,                   // xor eax, eax
    0x66, 0x31, 0xD2,                   // xor edx, edx
    0x0F, 0x30,                         // wrmsr
    0xCF,                               // iret
];

/// `inc dword [0x500]; jmp $-5`: busy forever, progress readable in memory.
const SPINNER: &[u8] = &[0x66, 0xFF, 0x06, 0x00, 0x05, 0xEB, 0xF9];

/// The halter's ports: the period it reads until `rounds` wakes were reported, and the wakes.
struct Ports {
    period: u32,
    rounds: u64,
    wakes: AtomicU64,
    reads: AtomicU32,
}

impl DevicePio for Ports {
    fn pio_read(&self, base: PioAddress, offset: u16, data: &mut [u8]) {
        if base.0 + offset == PARAM_PORT {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let v = if self.wakes.load(Ordering::Relaxed) < self.rounds {
                self.period
            } else {
                0
            };
            for (d, s) in data.iter_mut().zip(v.to_le_bytes()) {
                *d = s;
            }
        }
    }
    fn pio_write(&self, base: PioAddress, offset: u16, _data: &[u8]) {
        if base.0 + offset == WAKE_PORT {
            self.wakes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Guest {
    vm: KvmVm,
    mem: GuestMemoryMmap,
    vcpu: KvmVcpu,
}

/// A one-vCPU real-mode VM running `code` at 0x1000; with `irqchip`, an in-kernel irqchip,
/// x2APIC on, and an IVT whose vector 0x40 runs the EOI handler.
fn guest(hv: &KvmHypervisor, code: &[u8], irqchip: bool) -> Guest {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let vm = hv
        .create_vm()
        .expect("/dev/kvm must be usable for this test");
    vm.register_memory(&mem, 0, MemoryFlags::default()).unwrap();
    if irqchip {
        vm.fd().create_irq_chip().unwrap();
    }
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    mem.write_slice(EOI_HANDLER, GuestAddress(HANDLER)).unwrap();
    mem.write_slice(&[0xCF], GuestAddress(IRET)).unwrap();
    for v in 0..256u64 {
        let off = if v == u64::from(VECTOR) {
            HANDLER
        } else {
            IRET
        };
        mem.write_obj(off as u16, GuestAddress(v * 4)).unwrap();
        mem.write_obj(0u16, GuestAddress(v * 4 + 2)).unwrap();
    }
    let vcpu = vm.create_vcpu(0).unwrap();
    boot::configure_cpuid(hv, &vcpu, boot::default_cpuid_policy).unwrap();
    let mut sregs = vcpu.sregs().unwrap();
    for s in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
        s.base = 0;
        s.selector = 0;
    }
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.regs().unwrap();
    regs.rip = CODE;
    regs.rsp = 0x8000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    if irqchip {
        // APIC base 0xfee00000, enabled, x2APIC mode, BSP.
        vcpu.set_msrs(&[MsrEntry {
            index: 0x1b,
            data: 0xfee0_0000 | (1 << 11) | (1 << 10) | (1 << 8),
        }])
        .unwrap();
    }
    Guest { vm, mem, vcpu }
}

fn halter(hv: &KvmHypervisor, period: u32, rounds: u64) -> (Guest, Dispatcher, Arc<Ports>) {
    let g = guest(hv, HALTER, true);
    let ports = Arc::new(Ports {
        period,
        rounds,
        wakes: AtomicU64::new(0),
        reads: AtomicU32::new(0),
    });
    let mut d = Dispatcher::new(UnclaimedPolicy::default());
    d.register_pio(PARAM_PORT, 8, ports.clone()).unwrap();
    (g, d, ports)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < HANG, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn executor(cpus: usize) -> Executor<CreditScheduler> {
    let mut config = CreditConfig::with_cpus(cpus);
    config.timeslice = 5_000_000;
    Executor::with_accounting(CreditScheduler::new(config).unwrap(), Accounting::ThreadCpu).unwrap()
}

fn msi(vm: &KvmVm) {
    let m = kvm_msi {
        address_lo: 0xfee0_0000,
        data: u32::from(VECTOR),
        ..Default::default()
    };
    assert!(vm.fd().signal_msi(m).unwrap() >= 0);
}

#[test]
fn a_halted_vcpu_gives_its_worker_to_a_busy_one_and_wakes_on_its_lapic_timer() {
    let hv = KvmHypervisor::new().expect("/dev/kvm must be usable for this test");
    let ex = executor(1);
    let (timer, timer_thread) = SliceTimer::<KvmKick>::start().unwrap();
    let idle_vm = ex.add_vm(VmConfig::default()).unwrap();
    let busy_vm = ex.add_vm(VmConfig::default()).unwrap();

    // 2 ms timer, 40 rounds; a re-poll period long enough that the timer deadline, not the
    // re-poll, must be what wakes it in time (a late wake only slows the test down).
    const ROUNDS: u64 = 40;
    const PERIOD_NS: u32 = 2_000_000;
    let (h, d, ports) = halter(&hv, PERIOD_NS, ROUNDS);
    let halts = KernelHalts::new(&h.vcpu, Duration::from_millis(500))
        .expect("this kernel must publish the `blocking` vCPU stat");
    let task = VcpuTask::new(h.vcpu, d, timer.clone()).with_kernel_halts(halts.clone());
    let task_stats = task.stats();

    let spinner = guest(&hv, SPINNER, false);
    let busy = VcpuTask::new(
        spinner.vcpu,
        Dispatcher::new(UnclaimedPolicy::default()),
        timer.clone(),
    );
    let busy_mem = spinner.mem.clone();
    let progress = move || busy_mem.read_obj::<u32>(GuestAddress(COUNTER)).unwrap();

    let (_, waker) = ex.spawn(idle_vm, task).unwrap();
    assert!(halts.set_waker(waker.clone()));
    assert!(!halts.set_waker(waker), "a second waker is refused");
    ex.spawn(busy_vm, busy).unwrap();
    // Measured from the first round on (the first entries of fresh vCPUs are slow here).
    wait_until("the first round", || {
        ports.wakes.load(Ordering::Relaxed) >= 1
    });
    let start = Instant::now();
    wait_until("the halting guest's rounds", || {
        ports.wakes.load(Ordering::Relaxed) >= ROUNDS
    });
    let elapsed = start.elapsed();
    let spins = progress();
    let idle_service = ex.vm_service(idle_vm).unwrap();
    let busy_service = ex.vm_service(busy_vm).unwrap();
    let m = ex.shutdown();
    timer.stop();
    timer_thread.join().unwrap();
    assert!(m.errors.is_empty(), "{:?}", m.errors);

    let s = halts.stats();
    let (parks, timer_wakes) = (
        s.parks.load(Ordering::Relaxed),
        s.timer_wakes.load(Ordering::Relaxed),
    );
    let per_round = elapsed.as_secs_f64() * 1e3 / (ROUNDS - 1) as f64;
    eprintln!(
        "{} rounds of a {:.1} ms timer in {:.0} ms ({per_round:.2} ms each); parks {parks}, \
         timer wakes {timer_wakes}, false alarms {}; CPU charged: halting {:.1} ms, busy {:.1} ms; \
         busy guest iterations {spins}; wake-to-run p50 {} us p99 {} us",
        ROUNDS - 1,
        f64::from(PERIOD_NS) / 1e6,
        elapsed.as_secs_f64() * 1e3,
        s.false_alarms.load(Ordering::Relaxed),
        idle_service as f64 / 1e6,
        busy_service as f64 / 1e6,
        m.latency.percentile(0.5) / 1000,
        m.latency.percentile(0.99) / 1000,
    );
    // Most halts were parked (not held in KVM_RUN) and woken by the timer deadline.
    assert!(parks >= ROUNDS / 2, "only {parks} parks in {ROUNDS} rounds");
    assert!(
        timer_wakes >= parks / 2,
        "{timer_wakes} of {parks} parks woke at the LAPIC deadline"
    );
    assert_eq!(task_stats.halts.load(Ordering::Relaxed), parks);
    // While the halter was parked the busy guest had the only worker: it ran, and it was
    // charged far more than the halter, whose sleep in the kernel is not CPU time.
    assert!(spins > 0, "the busy guest never ran");
    assert!(
        busy_service > 2 * idle_service,
        "busy {busy_service} ns vs halting {idle_service} ns"
    );
}

#[test]
fn a_parked_vcpu_waits_for_the_vmm_wake_after_an_interrupt() {
    let hv = KvmHypervisor::new().expect("/dev/kvm must be usable for this test");
    let ex = executor(1);
    let (timer, timer_thread) = SliceTimer::<KvmKick>::start().unwrap();
    let vm_id = ex.add_vm(VmConfig::default()).unwrap();
    // No timer (u32::MAX) and a re-poll period far beyond the test: only the MSI plus the
    // VMM's wake can bring it back.
    let (h, d, ports) = halter(&hv, u32::MAX, 1);
    let halts = KernelHalts::new(&h.vcpu, Duration::from_secs(3600)).unwrap();
    let task = VcpuTask::new(h.vcpu, d, timer.clone()).with_kernel_halts(halts.clone());
    let (_, waker) = ex.spawn(vm_id, task).unwrap();
    halts.set_waker(waker);
    let s = halts.stats();
    wait_until("the park", || s.parks.load(Ordering::Relaxed) == 1);
    // Parked, not in KVM_RUN: an interrupt alone does not run it.
    msi(&h.vm);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ports.wakes.load(Ordering::Relaxed), 0);
    halts.wake();
    wait_until("the wake-up", || ports.wakes.load(Ordering::Relaxed) == 1);
    // Then it halts for good (cli; hlt) and is parked again.
    wait_until("the second park", || s.parks.load(Ordering::Relaxed) == 2);
    let m = ex.shutdown();
    timer.stop();
    timer_thread.join().unwrap();
    eprintln!("wake-to-run p99 {} us", m.latency.percentile(0.99) / 1000);
    assert_eq!(s.external_wakes.load(Ordering::Relaxed), 1);
    assert_eq!(s.timer_wakes.load(Ordering::Relaxed), 0);
}

#[test]
fn the_repoll_period_catches_an_interrupt_nobody_announced() {
    let hv = KvmHypervisor::new().expect("/dev/kvm must be usable for this test");
    let ex = executor(1);
    let (timer, timer_thread) = SliceTimer::<KvmKick>::start().unwrap();
    let vm_id = ex.add_vm(VmConfig::default()).unwrap();
    let (h, d, ports) = halter(&hv, u32::MAX, 1);
    let halts = KernelHalts::new(&h.vcpu, Duration::from_millis(20)).unwrap();
    let task = VcpuTask::new(h.vcpu, d, timer.clone()).with_kernel_halts(halts.clone());
    let (_, waker) = ex.spawn(vm_id, task).unwrap();
    halts.set_waker(waker);
    let s = halts.stats();
    wait_until("the park", || s.parks.load(Ordering::Relaxed) >= 1);
    // Like an IPI from another vCPU or an irqfd injected later: no wake from the VMM.
    msi(&h.vm);
    wait_until("the re-polled wake-up", || {
        ports.wakes.load(Ordering::Relaxed) == 1
    });
    let m = ex.shutdown();
    timer.stop();
    timer_thread.join().unwrap();
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    assert_eq!(s.external_wakes.load(Ordering::Relaxed), 0);
    assert!(ports.reads.load(Ordering::Relaxed) >= 2);
}
