//! Our run loop (`Vcpu::run` through the kick handshake + `Dispatcher`) against a raw
//! `kvm-ioctls` `VcpuFd::run()` loop, on the same VM running the same port-I/O loop guest.
//! Each iteration resets the guest to its entry and runs it to its halt: `EXITS` data
//! writes plus the parameter read and the status write.
//!
//! `cargo bench -p vmkit-vcpu --bench run_loop`
// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvm_ioctls::VcpuExit;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmkit_vcpu::boot::{self, KernelFormat};
use vmkit_vcpu::dispatch::{Action, Dispatcher};
use vmkit_vcpu::kvm::KvmHypervisor;
use vmkit_vcpu::{Hypervisor, MemoryFlags, Regs, Vcpu, Vm};

const EXITS: u32 = 2000;

/// The test ports: answers the parameter, swallows data and status.
struct Ports;

impl DevicePio for Ports {
    fn pio_read(&self, _b: PioAddress, _o: PioAddressOffset, data: &mut [u8]) {
        data.copy_from_slice(&EXITS.to_le_bytes()[..data.len().min(4)]);
    }
    fn pio_write(&self, _b: PioAddress, _o: PioAddressOffset, _data: &[u8]) {}
}

fn bench(c: &mut Criterion) {
    let hv = KvmHypervisor::new().expect("/dev/kvm");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let vm = hv.create_vm().unwrap();
    vm.register_memory(&mem, 0, MemoryFlags::default()).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    boot::configure_cpuid(&hv, &vcpu, boot::default_cpuid_policy).unwrap();
    let mut img = std::io::Cursor::new(vmkit_test_guests::PIO_LOOP);
    let k = boot::load_kernel(&mem, &mut img, KernelFormat::PlainElf, None, &[]).unwrap();
    k.setup_vcpu(&mem, &vcpu).unwrap();
    let start: Regs = vcpu.regs().unwrap();
    let mut dispatcher = Dispatcher::default();
    let ports = Arc::new(Ports);
    dispatcher.register_pio(0xf4, 4, ports.clone()).unwrap();
    dispatcher.register_pio(0x510, 0x10, ports).unwrap();

    // This machine is shared and its load drifts by tens of percent within seconds, so the
    // ratio is taken from interleaved runs: raw, ours, raw, ours, ... and their medians.
    let run_raw = |vcpu: &mut vmkit_vcpu::kvm::KvmVcpu| {
        vcpu.set_regs(&start).unwrap();
        let t = std::time::Instant::now();
        let fd = vcpu.fd_mut();
        loop {
            match fd.run().unwrap() {
                VcpuExit::IoIn(_, data) => {
                    data.copy_from_slice(&EXITS.to_le_bytes()[..data.len().min(4)])
                }
                VcpuExit::IoOut(_, _) => {}
                VcpuExit::Hlt => break,
                other => panic!("unexpected exit {other:?}"),
            }
        }
        t.elapsed()
    };
    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..25 {
        raw.push(run_raw(&mut vcpu));
        vcpu.set_regs(&start).unwrap();
        let t = std::time::Instant::now();
        assert_eq!(dispatcher.run(&mut vcpu).unwrap(), Action::Halt);
        ours.push(t.elapsed());
    }
    raw.sort();
    ours.sort();
    let per_exit = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(EXITS + 2);
    let (r, o) = (per_exit(raw[raw.len() / 2]), per_exit(ours[ours.len() / 2]));
    println!(
        "interleaved medians over 25 runs: raw kvm-ioctls {r:.2} us/exit, vmkit run loop + dispatcher {o:.2} us/exit, ratio {:.3}",
        o / r
    );

    let mut g = c.benchmark_group("pio_loop_guest");
    g.throughput(Throughput::Elements(u64::from(EXITS) + 2));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(4));
    g.warm_up_time(Duration::from_secs(1));
    g.bench_function("raw_kvm_ioctls_loop", |b| {
        b.iter(|| {
            vcpu.set_regs(&start).unwrap();
            let fd = vcpu.fd_mut();
            loop {
                match fd.run().unwrap() {
                    VcpuExit::IoIn(_, data) => {
                        data.copy_from_slice(&EXITS.to_le_bytes()[..data.len().min(4)])
                    }
                    VcpuExit::IoOut(_, _) => {}
                    VcpuExit::Hlt => break,
                    other => panic!("unexpected exit {other:?}"),
                }
            }
        })
    });
    g.bench_function("vmkit_run_loop_dispatcher", |b| {
        b.iter(|| {
            vcpu.set_regs(&start).unwrap();
            assert_eq!(dispatcher.run(&mut vcpu).unwrap(), Action::Halt);
        })
    });
    dispatcher.set_timing(false);
    g.bench_function("vmkit_run_loop_dispatcher_no_timing", |b| {
        b.iter(|| {
            vcpu.set_regs(&start).unwrap();
            assert_eq!(dispatcher.run(&mut vcpu).unwrap(), Action::Halt);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
