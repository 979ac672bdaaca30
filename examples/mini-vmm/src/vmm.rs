//! The `Vmm`: guest memory, one KVM VM with one vCPU, the devices on the dispatcher, and the
//! run loop. Later features (virtio devices, snapshots, more vCPUs) hang off this struct.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vmkit_memory::{GuestRam, MemoryLayout};
use vmkit_vcpu::boot::{self, KernelFormat};
use vmkit_vcpu::dispatch::{Action, DispatchError, Dispatcher, UnclaimedPolicy};
use vmkit_vcpu::kvm::{KvmHypervisor, KvmVcpu, KvmVm};
use vmkit_vcpu::{Hypervisor, MemoryFlags, Vm};

use crate::args::{Args, Payload};
use crate::devices::{Devices, ExitPort, SerialPort, TestPorts};

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// No bundled guest has this name.
    #[error("unknown guest `{0}` (bundled: hello, pio_loop, mmio, paging, exits, counter)")]
    UnknownGuest(String),
    /// The kernel file could not be opened.
    #[error("cannot open kernel `{path}`: {source}")]
    Kernel {
        /// Path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate {0} bytes of guest memory")]
    Memory(u64),
    /// The memory size does not make a valid PC layout.
    #[error("invalid memory layout: {0}")]
    Layout(#[from] vmkit_memory::LayoutError),
    /// The hypervisor failed.
    #[error("hypervisor: {0}")]
    Hypervisor(#[from] vmkit_vcpu::Error),
    /// Boot setup failed.
    #[error("boot setup: {0}")]
    Boot(#[from] boot::BootError),
    /// The dispatcher failed.
    #[error("run loop: {0}")]
    Dispatch(#[from] DispatchError),
    /// The guest stopped in a way that is an error.
    #[error("guest stopped: {0}")]
    Guest(String),
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest halted after reporting this status (or 0 if it reported none).
    Exited(u32),
    /// The guest shut down (triple fault or power-off).
    Shutdown,
}

/// A VM ready to run.
pub struct Vmm<W: Write + Send + 'static> {
    /// The guest-physical layout (RAM, MMIO hole, reserved ranges, E820).
    pub layout: MemoryLayout,
    /// Guest RAM (with vmkit-memory's dirty bitmap).
    pub memory: GuestRam,
    /// The KVM VM.
    pub vm: KvmVm,
    /// Its vCPU.
    pub vcpu: KvmVcpu,
    /// Exit routing and metrics.
    pub dispatcher: Dispatcher,
    /// Device handles.
    pub devices: Devices<W>,
}

impl<W: Write + Send + 'static> Vmm<W> {
    /// Builds a VM for `args`, with serial output going to `out`.
    pub fn new(args: &Args, out: W) -> Result<Self, VmmError> {
        let layout = MemoryLayout::x86_pc(args.memory)?;
        let ranges: Vec<_> = layout
            .ram_regions()
            .iter()
            .map(|r| (r.guest_addr, r.size as usize))
            .collect();
        let memory = GuestRam::from_ranges(&ranges).map_err(|_| VmmError::Memory(args.memory))?;
        let hv = KvmHypervisor::new()?;
        let vm = hv.create_vm()?;
        vm.register_memory(&memory, 0, MemoryFlags::default())?;
        let vcpu = vm.create_vcpu(0)?;
        boot::configure_cpuid(&hv, &vcpu, boot::default_cpuid_policy)?;

        let kernel = match &args.payload {
            Payload::Guest(name) => {
                let elf = vmkit_test_guests::ALL
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, e)| *e)
                    .ok_or_else(|| VmmError::UnknownGuest(name.clone()))?;
                let mut img = std::io::Cursor::new(elf);
                boot::load_kernel(&memory, &mut img, KernelFormat::PlainElf, None, &[])?
            }
            Payload::Kernel(path) => {
                let mut f = std::fs::File::open(path).map_err(|source| VmmError::Kernel {
                    path: path.display().to_string(),
                    source,
                })?;
                let e820 = boot::e820_of_layout(&layout);
                boot::load_kernel(
                    &memory,
                    &mut f,
                    KernelFormat::Auto,
                    args.cmdline.as_deref(),
                    &e820,
                )?
            }
        };
        kernel.setup_vcpu(&memory, &vcpu)?;

        let devices = Devices {
            serial: Arc::new(Mutex::new(SerialPort::new(out))),
            exit: Arc::new(ExitPort::new()),
            test: Arc::new(TestPorts::default()),
        };
        devices
            .test
            .param
            .store(args.param, std::sync::atomic::Ordering::SeqCst);
        let mut dispatcher = Dispatcher::new(UnclaimedPolicy::default());
        dispatcher.register_pio(0x3f8, 8, devices.serial.clone())?;
        dispatcher.register_pio(0xf4, 4, devices.exit.clone())?;
        dispatcher.register_pio(0x510, 0x10, devices.test.clone())?;
        // Hypercalls arrive through the port doorbell (0x500): this host's KVM does not
        // forward `vmcall`. Hypercall 1 ("hello") answers its argument plus one.
        dispatcher.set_hypercall_port(0x500, memory.clone());
        dispatcher.register_hypercall(
            1,
            Box::new(|_nr: u64, args: &[u64; 6]| args[0].wrapping_add(1)),
        );
        Ok(Vmm {
            layout,
            memory,
            vm,
            vcpu,
            dispatcher,
            devices,
        })
    }

    /// Per-exit-kind counts and mean handling latency, one line per kind seen.
    pub fn stats(&self) -> String {
        let m = self.dispatcher.metrics();
        let mut out = String::from("exit kind        count   mean ns   max ns");
        for kind in vmkit_vcpu::ExitKind::ALL {
            let k = m.kind(kind);
            if k.count > 0 {
                out.push_str(&format!(
                    "\n{:<14} {:>7} {:>9} {:>8}",
                    kind.name(),
                    k.count,
                    k.mean_ns(),
                    k.max_ns
                ));
            }
        }
        out
    }

    /// Runs the guest until it halts or shuts down.
    pub fn run(&mut self) -> Result<Outcome, VmmError> {
        loop {
            match self.dispatcher.run(&mut self.vcpu)? {
                Action::Halt => {
                    return Ok(Outcome::Exited(self.devices.exit.status().unwrap_or(0)));
                }
                Action::Shutdown | Action::Reset => return Ok(Outcome::Shutdown),
                Action::Interrupted | Action::Continue | Action::Debug { .. } => continue,
                other => return Err(VmmError::Guest(format!("{other:?}"))),
            }
        }
    }
}
