//! The library's vCPU adapter (`vmkit_sched::vcpu`) running real KVM vCPUs: exits handled by
//! each vCPU's dispatcher, slices ended by the slice timer, weights honoured, halts blocking
//! the task until a wake.
//!
//! These tests need `/dev/kvm`; they fail (not skip) when it cannot be used.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_device::bus::PioAddress;
use vm_device::DevicePio;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmkit_sched::vcpu::{SliceTimer, VcpuEnd, VcpuTask};
use vmkit_sched::{CreditConfig, CreditScheduler, Executor, VmConfig};
use vmkit_test_guests as guests;
use vmkit_vcpu::boot::{self, KernelFormat};
use vmkit_vcpu::dispatch::{Dispatcher, UnclaimedPolicy};
use vmkit_vcpu::kvm::{KvmHypervisor, KvmKick, KvmVcpu, KvmVm};
use vmkit_vcpu::{Hypervisor, MemoryFlags, Vm};

const MS: u64 = 1_000_000;
const HANG: Duration = Duration::from_secs(120);

/// The pio_loop guest's ports: the count it reads, the values it writes, its exit status.
struct Ports {
    count: u32,
    values: AtomicU64,
    status: AtomicU32,
}

impl DevicePio for Ports {
    fn pio_read(&self, _base: PioAddress, offset: u16, data: &mut [u8]) {
        if offset == 0 {
            let n = self.count.to_le_bytes();
            for (d, s) in data.iter_mut().zip(n) {
                *d = s;
            }
        }
    }
    fn pio_write(&self, base: PioAddress, offset: u16, _data: &[u8]) {
        if base.0 + offset == guests::DATA_PORT {
            self.values.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct ExitPort(Arc<Ports>);

impl DevicePio for ExitPort {
    fn pio_read(&self, _base: PioAddress, _offset: u16, _data: &mut [u8]) {}
    fn pio_write(&self, _base: PioAddress, _offset: u16, data: &[u8]) {
        let mut b = [0u8; 4];
        for (d, s) in b.iter_mut().zip(data) {
            *d = *s;
        }
        self.0
            .status
            .store(u32::from_le_bytes(b), Ordering::Relaxed);
    }
}

/// A VM running `vcpus` pio_loop vCPUs that each write `count` values; one `Ports` per VM.
fn vm(
    hv: &KvmHypervisor,
    vcpus: u32,
    count: u32,
) -> (
    KvmVm,
    GuestMemoryMmap,
    Vec<(KvmVcpu, Dispatcher)>,
    Arc<Ports>,
) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let vm = hv
        .create_vm()
        .expect("/dev/kvm must be usable for this test");
    vm.register_memory(&mem, 0, MemoryFlags::default()).unwrap();
    let kernel = boot::load_kernel(
        &mem,
        &mut std::io::Cursor::new(guests::PIO_LOOP),
        KernelFormat::PlainElf,
        None,
        &[],
    )
    .unwrap();
    let ports = Arc::new(Ports {
        count,
        values: AtomicU64::new(0),
        status: AtomicU32::new(u32::MAX),
    });
    let mut cpus = Vec::new();
    for id in 0..vcpus {
        let vcpu = vm.create_vcpu(id).unwrap();
        boot::configure_cpuid(hv, &vcpu, boot::default_cpuid_policy).unwrap();
        kernel.setup_vcpu(&mem, &vcpu).unwrap();
        let mut d = Dispatcher::new(UnclaimedPolicy::default());
        // 0x510..0x518: both 4-byte ports whole (an access past a range end is unclaimed).
        d.register_pio(guests::PARAM_PORT, 8, ports.clone())
            .unwrap();
        d.register_pio(guests::EXIT_PORT, 4, Arc::new(ExitPort(ports.clone())))
            .unwrap();
        cpus.push((vcpu, d));
    }
    (vm, mem, cpus, ports)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < HANG, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn vcpu_tasks_share_host_threads_by_weight() {
    let hv = KvmHypervisor::new().expect("/dev/kvm must be usable for this test");
    let mut config = CreditConfig::with_cpus(2);
    config.timeslice = 5 * MS;
    let ex = Executor::new(CreditScheduler::new(config).unwrap()).unwrap();
    let (timer, timer_thread) = SliceTimer::<KvmKick>::start().unwrap();
    let weights = [100u32, 300];
    let mut keep = Vec::new();
    let mut ports = Vec::new();
    let mut ends = Vec::new();
    let mut stats = Vec::new();
    for &w in &weights {
        let vm_id = ex.add_vm(VmConfig::weighted(w)).unwrap();
        // u32::MAX values: the guests count for far longer than the test runs.
        let (vm, mem, cpus, p) = vm(&hv, 2, u32::MAX);
        for (vcpu, d) in cpus {
            let task = VcpuTask::new(vcpu, d, timer.clone());
            ends.push(task.end());
            stats.push(task.stats());
            ex.spawn(vm_id, task).unwrap();
        }
        keep.push((vm, mem));
        ports.push(p);
    }
    let total = || -> u64 { ports.iter().map(|p| p.values.load(Ordering::Relaxed)).sum() };
    // Skip the start-up (the first VM ran alone for a moment), then measure.
    wait_until("warm-up", || total() >= 2_000);
    let base: Vec<u64> = ports
        .iter()
        .map(|p| p.values.load(Ordering::Relaxed))
        .collect();
    wait_until("guest progress", || total() >= 2_000 + 40_000);
    let done: Vec<u64> = ports
        .iter()
        .zip(&base)
        .map(|(p, b)| p.values.load(Ordering::Relaxed) - b)
        .collect();
    let end = ex.shutdown();
    timer.stop();
    timer_thread.join().unwrap();
    assert!(end.errors.is_empty(), "{:?}", end.errors);
    for e in &ends {
        assert_eq!(*e.lock().unwrap(), None, "a vCPU task ended early");
    }
    // Weight 3:1. How much guest work a CPU-second buys is the host's business (see
    // kvm_vcpus.rs), so the band is wide; a weight-blind scheduler gives 1:1 and fails it.
    let ratio = done[1] as f64 / done[0] as f64;
    eprintln!("guest values per VM {done:?}: ratio {ratio:.3} (weights 1:3)");
    assert!(
        (2.0..4.5).contains(&ratio),
        "work {done:?}: ratio {ratio:.2}, want ~3"
    );
    let slices: u64 = stats.iter().map(|s| s.slices.load(Ordering::Relaxed)).sum();
    assert!(
        slices > 4,
        "slices ended by the slice timer or expiry: {slices}"
    );
}

#[test]
fn a_halted_vcpu_blocks_until_woken() {
    let hv = KvmHypervisor::new().expect("/dev/kvm must be usable for this test");
    let ex = Executor::new(CreditScheduler::new(CreditConfig::with_cpus(1)).unwrap()).unwrap();
    let (timer, timer_thread) = SliceTimer::<KvmKick>::start().unwrap();
    let vm_id = ex.add_vm(VmConfig::default()).unwrap();
    // 100 values, the exit status, then `hlt` in a loop.
    let (_vm, _mem, mut cpus, ports) = vm(&hv, 1, 100);
    let (vcpu, d) = cpus.pop().unwrap();
    let task = VcpuTask::new(vcpu, d, timer.clone());
    let (stats, end) = (task.stats(), task.end());
    let (_, waker) = ex.spawn(vm_id, task).unwrap();
    wait_until("the first halt", || {
        stats.halts.load(Ordering::Relaxed) == 1
    });
    assert_eq!(ports.values.load(Ordering::Relaxed), 100);
    assert_eq!(ports.status.load(Ordering::Relaxed), 0);
    // Blocked: nothing runs it again until a wake (give it a chance to misbehave).
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(stats.halts.load(Ordering::Relaxed), 1);
    waker.wake().unwrap();
    wait_until("the second halt", || {
        stats.halts.load(Ordering::Relaxed) == 2
    });
    let m = ex.shutdown();
    timer.stop();
    timer_thread.join().unwrap();
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    assert_eq!(*end.lock().unwrap(), None::<VcpuEnd>);
    assert!(format!("{timer:?}").contains("SliceTimer"));
}

/// `out 0x80, al; jmp $`: one exit to say it runs, then never another, so only a kick ends
/// its slice.
const SPIN_FOREVER: [u8; 4] = [0xe6, 0x80, 0xeb, 0xfe];

/// Port 0x80: set when the spinning guest has started.
struct Started(std::sync::atomic::AtomicBool);

impl DevicePio for Started {
    fn pio_read(&self, _base: PioAddress, _offset: u16, _data: &mut [u8]) {}
    fn pio_write(&self, _base: PioAddress, _offset: u16, _data: &[u8]) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_deferred_boost_cut_reaches_a_vcpu_that_never_exits() {
    // One host thread, an hour-long timeslice and a 300 ms rate limit: a vCPU woken right
    // after the hog started gets a boost cut deferred to 300 ms into the hog's slice. The
    // hog never exits, so only the slice timer re-armed through `Kick::kick_at` can end its
    // slice; without that the woken vCPU would wait the whole hour (and this test would hit
    // its hang bound). (If a loaded host delays the wake past 300 ms, the cut is immediate
    // and the test still passes, through the plain kick.)
    let hv = KvmHypervisor::new().expect("/dev/kvm must be usable for this test");
    let mut config = CreditConfig::with_cpus(1);
    config.timeslice = 3_600_000 * MS;
    config.ratelimit = 300 * MS;
    let ex = Executor::new(CreditScheduler::new(config).unwrap()).unwrap();
    let (timer, timer_thread) = SliceTimer::<KvmKick>::start().unwrap();

    // The I/O VM: writes 10 values, its status, then halts (Blocked until woken).
    let io_vm = ex.add_vm(VmConfig::default()).unwrap();
    let (_vm_a, _mem_a, mut cpus, ports) = vm(&hv, 1, 10);
    let (vcpu, d) = cpus.pop().unwrap();
    let io = VcpuTask::new(vcpu, d, timer.clone());
    let io_stats = io.stats();
    let (_, waker) = ex.spawn(io_vm, io).unwrap();
    wait_until("the I/O vCPU's first halt", || {
        io_stats.halts.load(Ordering::Relaxed) == 1
    });

    // The hog: a vCPU spinning on `jmp $` in long mode.
    let hog_vm = ex.add_vm(VmConfig::default()).unwrap();
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let vm_b = hv.create_vm().unwrap();
    vm_b.register_memory(&mem, 0, MemoryFlags::default())
        .unwrap();
    vm_memory::Bytes::write_slice(&mem, &SPIN_FOREVER, GuestAddress(0x10_0000)).unwrap();
    let hog_vcpu = vm_b.create_vcpu(0).unwrap();
    boot::configure_cpuid(&hv, &hog_vcpu, boot::default_cpuid_policy).unwrap();
    boot::setup_vcpu(
        &mem,
        &hog_vcpu,
        boot::CpuMode::Long,
        0x10_0000,
        boot::BOOT_STACK,
        0,
    )
    .unwrap();
    let started = Arc::new(Started(std::sync::atomic::AtomicBool::new(false)));
    let mut hog_dispatcher = Dispatcher::new(UnclaimedPolicy::default());
    hog_dispatcher
        .register_pio(0x80, 1, started.clone())
        .unwrap();
    let hog = VcpuTask::new(hog_vcpu, hog_dispatcher, timer.clone());
    let hog_stats = hog.stats();
    ex.spawn(hog_vm, hog).unwrap();
    // The hog is inside its hour-long slice once it said so; then wake the I/O vCPU.
    wait_until("the hog to start", || started.0.load(Ordering::SeqCst));
    waker.wake().unwrap();
    wait_until("the woken vCPU to run (boost cut of the hog)", || {
        io_stats.halts.load(Ordering::Relaxed) == 2
    });
    assert_eq!(ports.values.load(Ordering::Relaxed), 10);
    assert!(
        hog_stats.slices.load(Ordering::Relaxed) >= 1,
        "the hog's slice was cut"
    );
    let m = ex.shutdown();
    timer.stop();
    timer_thread.join().unwrap();
    assert!(m.errors.is_empty(), "{:?}", m.errors);
}
