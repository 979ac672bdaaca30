//! Shared helpers for the KVM integration tests: a VM with guest RAM and one vCPU that runs
//! a bundled guest.
#![allow(dead_code, missing_docs)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmkit_vcpu::boot::{self, KernelFormat};
use vmkit_vcpu::dispatch::Dispatcher;
use vmkit_vcpu::kvm::{KvmHypervisor, KvmVcpu, KvmVm};
use vmkit_vcpu::{Hypervisor, MemoryFlags, Vm};

pub const MEM_SIZE: usize = 8 << 20;

/// Records port writes and answers parameter reads (the guests' test ports).
#[derive(Default)]
pub struct Recorder {
    pub param: AtomicU32,
    pub data: Mutex<Vec<u32>>,
    pub serial: Mutex<Vec<u8>>,
    pub status: Mutex<Option<u32>>,
}

fn word(data: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    for (d, s) in v.iter_mut().zip(data) {
        *d = *s;
    }
    u32::from_le_bytes(v)
}

impl DevicePio for Recorder {
    fn pio_read(&self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let v = if base.0 + offset == 0x510 {
            self.param.load(Ordering::SeqCst)
        } else {
            0
        };
        for (d, s) in data.iter_mut().zip(v.to_le_bytes()) {
            *d = s;
        }
    }
    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        match base.0 + offset {
            0x3f8 => self.serial.lock().unwrap().extend_from_slice(&data[..1]),
            0xf4 => *self.status.lock().unwrap() = Some(word(data)),
            0x511 => self.data.lock().unwrap().push(word(data)),
            _ => {}
        }
    }
}

pub struct TestVm {
    pub hv: KvmHypervisor,
    pub mem: GuestMemoryMmap,
    pub vm: KvmVm,
    pub vcpu: KvmVcpu,
    pub rec: Arc<Recorder>,
    pub dispatcher: Dispatcher,
}

/// Opens KVM (failing loudly if /dev/kvm exists but cannot be used), loads `elf` and enters it
/// in long mode.
pub fn boot(elf: &[u8], param: u32) -> TestVm {
    boot_with(elf, param, |_, _| {})
}

pub fn boot_with(
    elf: &[u8],
    param: u32,
    before_vcpu: impl FnOnce(&KvmHypervisor, &KvmVm),
) -> TestVm {
    let hv = KvmHypervisor::new().expect("/dev/kvm must be usable for these tests");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let vm = hv.create_vm().unwrap();
    vm.register_memory(
        &mem,
        0,
        MemoryFlags {
            log_dirty: true,
            read_only: false,
        },
    )
    .unwrap();
    before_vcpu(&hv, &vm);
    let vcpu = vm.create_vcpu(0).unwrap();
    boot::configure_cpuid(&hv, &vcpu, boot::default_cpuid_policy).unwrap();
    let k = boot::load_kernel(
        &mem,
        &mut std::io::Cursor::new(elf),
        KernelFormat::PlainElf,
        None,
        &[],
    )
    .unwrap();
    k.setup_vcpu(&mem, &vcpu).unwrap();
    let rec = Arc::new(Recorder::default());
    rec.param.store(param, Ordering::SeqCst);
    let mut dispatcher = Dispatcher::default();
    dispatcher.register_pio(0x3f8, 1, rec.clone()).unwrap();
    dispatcher.register_pio(0xf4, 4, rec.clone()).unwrap();
    dispatcher.register_pio(0x510, 0x10, rec.clone()).unwrap();
    TestVm {
        hv,
        mem,
        vm,
        vcpu,
        rec,
        dispatcher,
    }
}

/// Kicks the vCPU if the test has not finished within `secs` seconds, so a misbehaving guest
/// fails the test (an unexpected `Interrupted`) instead of hanging it.
pub struct Watchdog {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn new<K: vmkit_vcpu::VcpuKick + 'static>(kick: K, secs: u64) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let limit = std::time::Duration::from_secs(secs);
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                // Keep kicking until the test ends.
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    rx.recv_timeout(std::time::Duration::from_millis(100))
                {
                    kick.kick();
                }
            }
        });
        Watchdog {
            done: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
