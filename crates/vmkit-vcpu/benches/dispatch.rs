//! The dispatcher alone on synthetic exits: time per exit, and proof of zero heap
//! allocations per exit (a counting global allocator wraps the system one).
//!
//! `cargo bench -p vmkit-vcpu --bench dispatch`
// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{MutDeviceMmio, MutDevicePio};
use vmkit_vcpu::dispatch::{Dispatcher, ScratchMsr};
use vmkit_vcpu::{Hypercall, MsrRead, VmExit};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Dev(u64);

impl MutDevicePio for Dev {
    fn pio_read(&mut self, _b: PioAddress, _o: PioAddressOffset, data: &mut [u8]) {
        data.fill(self.0 as u8);
    }
    fn pio_write(&mut self, _b: PioAddress, _o: PioAddressOffset, data: &[u8]) {
        self.0 = self.0.wrapping_add(u64::from(data[0]));
    }
}

impl MutDeviceMmio for Dev {
    fn mmio_read(&mut self, _b: MmioAddress, _o: MmioAddressOffset, data: &mut [u8]) {
        data.fill(self.0 as u8);
    }
    fn mmio_write(&mut self, _b: MmioAddress, _o: MmioAddressOffset, data: &[u8]) {
        self.0 = self.0.wrapping_add(u64::from(data[0]));
    }
}

fn dispatcher() -> Dispatcher {
    let mut d = Dispatcher::default();
    let dev = Arc::new(Mutex::new(Dev(0)));
    // A realistic bus: several devices on each.
    for i in 0..8u16 {
        d.register_pio(0x3f8 - i * 0x10, 8, dev.clone()).unwrap();
        d.register_mmio(0xd000_0000 + u64::from(i) * 0x1000, 0x1000, dev.clone())
            .unwrap();
    }
    d.register_msr(0x4b56_4d99, Box::new(ScratchMsr::default()));
    d.register_hypercall(1, Box::new(|_nr: u64, a: &[u64; 6]| a[0]));
    d
}

/// One of each kind of synthetic exit.
fn one_round(d: &mut Dispatcher) {
    let mut buf4 = [0u8; 4];
    d.dispatch(VmExit::IoOut {
        port: 0x3f8,
        data: b"x",
    });
    d.dispatch(VmExit::IoIn {
        port: 0x3fd,
        data: &mut buf4[..1],
    });
    d.dispatch(VmExit::MmioWrite {
        addr: 0xd000_3004,
        data: &[1, 2, 3, 4],
    });
    d.dispatch(VmExit::MmioRead {
        addr: 0xd000_5008,
        data: &mut buf4,
    });
    d.dispatch(VmExit::IoOut {
        port: 0x80,
        data: &[0],
    }); // unclaimed
    let (mut data, mut fault, mut ret) = (0u64, 0u8, 0u64);
    d.dispatch(VmExit::MsrRead(MsrRead {
        index: 0x4b56_4d99,
        data: &mut data,
        fault: &mut fault,
    }));
    d.dispatch(VmExit::Hypercall(Hypercall {
        nr: 1,
        args: [5; 6],
        ret: &mut ret,
    }));
    black_box((buf4, data, ret));
}

fn bench(c: &mut Criterion) {
    // Zero allocations per exit, measured outside criterion (which allocates itself).
    let mut d = dispatcher();
    one_round(&mut d); // the first unclaimed port is remembered (preallocated table)
    let before = ALLOCS.load(Ordering::SeqCst);
    for _ in 0..100_000 {
        one_round(&mut d);
    }
    let allocs = ALLOCS.load(Ordering::SeqCst) - before;
    println!("dispatcher: {allocs} heap allocations in 700000 synthetic exits");
    assert_eq!(allocs, 0, "the dispatcher must not allocate per exit");

    let mut g = c.benchmark_group("dispatch");
    g.throughput(Throughput::Elements(7));
    g.bench_function("seven_exit_kinds_with_timing", |b| {
        b.iter(|| one_round(&mut d))
    });
    d.set_timing(false);
    g.bench_function("seven_exit_kinds_no_timing", |b| {
        b.iter(|| one_round(&mut d))
    });
    let mut d = dispatcher();
    g.throughput(Throughput::Elements(1));
    g.bench_function("pio_out_to_device", |b| {
        b.iter(|| {
            d.dispatch(VmExit::IoOut {
                port: 0x3f8,
                data: black_box(&[1]),
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
