//! The `Vmm`: guest memory, one KVM VM with one vCPU, the devices on the dispatcher, and the
//! run loop. Later features (virtio devices, snapshots, more vCPUs) hang off this struct.
//!
//! Two machine flavours share it:
//! - the bundled guests (and ELF kernels) run without interrupt controllers: they poll the
//!   serial port and end with `hlt`, which exits to the VMM;
//! - a Linux bzImage gets what a stock kernel needs to boot on a PC without firmware tables:
//!   KVM's in-kernel irqchip (PIC, IOAPIC, LAPIC) and PIT, COM1 raising IRQ 4 through an
//!   irqfd, the i8042 reset line, and the initramfs placed at the top of low RAM. Linux halts
//!   in-kernel there, so the VM ends on a keyboard-controller reset, a KVM shutdown (triple
//!   fault) or a system event.

use std::io::{Read, Seek, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use vmkit_memory::{GuestRam, MemoryLayout};
use vmkit_vcpu::boot::{self, KernelFormat};
use vmkit_vcpu::dispatch::{Action, DispatchError, Dispatcher, UnclaimedPolicy};
use vmkit_vcpu::kvm::{KvmHypervisor, KvmVcpu, KvmVm};
use vmkit_vcpu::{Hypervisor, MemoryFlags, Vcpu, Vm};

use crate::args::{Args, Payload};
use crate::devices::{Cmos, Devices, ExitPort, SerialIrq, SerialPort, TestPorts, I8042};

/// GSI of COM1's interrupt.
pub const SERIAL_GSI: u32 = 4;
/// Where KVM puts the three pages it needs for its TSS (Intel; harmless elsewhere): just below
/// the BIOS area at the top of the 32-bit space, like other VMMs.
const KVM_TSS_ADDR: usize = 0xfffb_d000;

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
    /// The initramfs could not be read or does not fit.
    #[error("cannot load initramfs `{path}`: {why}")]
    Initramfs {
        /// Path given.
        path: String,
        /// What went wrong.
        why: String,
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
    /// The guest reset the machine (i8042 reset line, or a reset system event).
    Reset,
}

/// True if `image` is a Linux bzImage (the "HdrS" magic of the setup header at 0x202).
pub fn is_bzimage<F: Read + Seek>(image: &mut F) -> bool {
    let mut magic = [0u8; 4];
    let ok = image.seek(std::io::SeekFrom::Start(0x202)).is_ok()
        && image.read_exact(&mut magic).is_ok()
        && magic == *b"HdrS";
    let _ = image.rewind();
    ok
}

/// Where an initramfs of `size` bytes goes: page-aligned, as high as possible in the RAM
/// below `limit` (the kernel's `initrd_addr_max`), above `kernel_end`.
pub fn initramfs_addr(
    layout: &MemoryLayout,
    size: u64,
    kernel_end: u64,
    limit: u64,
) -> Option<u64> {
    layout
        .ram_regions()
        .iter()
        .filter_map(|r| {
            let end = r
                .guest_addr
                .0
                .saturating_add(r.size)
                .min(limit.saturating_add(1));
            let start = end.checked_sub(size)? & !0xfff;
            (start >= r.guest_addr.0 && start >= kernel_end).then_some(start)
        })
        .max()
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
    /// Set by the i8042 when the guest pulses the reset line.
    reset: Arc<AtomicBool>,
}

fn hv_error(op: &'static str, e: impl Into<std::io::Error>) -> VmmError {
    VmmError::Hypervisor(vmkit_vcpu::Error::Backend {
        op,
        source: e.into(),
    })
}

/// Reads the initramfs at `path` into the top of low RAM and records it in the zero page.
fn load_initramfs(
    memory: &vmkit_memory::GuestRam,
    layout: &MemoryLayout,
    path: &std::path::Path,
    kernel_end: u64,
) -> Result<(), VmmError> {
    let err = |why: String| VmmError::Initramfs {
        path: path.display().to_string(),
        why,
    };
    let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let zero_page = GuestAddress(boot::ZERO_PAGE_ADDR);
    let mut params: boot_params = memory
        .read_obj(zero_page)
        .map_err(|e| err(format!("cannot read the zero page: {e}")))?;
    let limit = match params.hdr.initrd_addr_max {
        0 => 0x37ff_ffff,
        n => u64::from(n),
    };
    let size = data.len() as u64;
    let addr = initramfs_addr(layout, size, kernel_end, limit).ok_or_else(|| {
        err(format!(
            "{size} bytes do not fit in guest RAM below {limit:#x}"
        ))
    })?;
    memory
        .write_slice(&data, GuestAddress(addr))
        .map_err(|e| err(e.to_string()))?;
    params.hdr.ramdisk_image = addr as u32;
    params.hdr.ramdisk_size = size as u32;
    memory
        .write_obj(params, zero_page)
        .map_err(|e| err(format!("cannot write the zero page: {e}")))
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

        let mut linux = false;
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
                linux = is_bzimage(&mut f);
                let e820 = boot::e820_of_layout(&layout);
                let k = boot::load_kernel(
                    &memory,
                    &mut f,
                    KernelFormat::Auto,
                    Some(args.kernel_cmdline()),
                    &e820,
                )?;
                if let Some(initramfs) = &args.initramfs {
                    load_initramfs(&memory, &layout, initramfs, k.end)?;
                }
                k
            }
        };
        let serial_irq = if linux {
            // In-kernel PIC/IOAPIC/LAPIC and PIT; both must exist before the vCPU.
            vm.create_irq_chip()?;
            let pit = kvm_bindings::kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.fd()
                .create_pit2(pit)
                .map_err(|e| hv_error("KVM_CREATE_PIT2", e))?;
            vm.fd()
                .set_tss_address(KVM_TSS_ADDR)
                .map_err(|e| hv_error("KVM_SET_TSS_ADDR", e))?;
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| hv_error("eventfd", e))?;
            vm.register_irqfd(&fd, SERIAL_GSI)?;
            SerialIrq::EventFd(fd)
        } else {
            SerialIrq::None
        };
        let vcpu = vm.create_vcpu(0)?;
        boot::configure_cpuid(&hv, &vcpu, boot::default_cpuid_policy)?;
        kernel.setup_vcpu(&memory, &vcpu)?;

        let devices = Devices {
            serial: Arc::new(Mutex::new(SerialPort::with_irq(out, serial_irq))),
            exit: Arc::new(ExitPort::new()),
            test: Arc::new(TestPorts::default()),
            i8042: Arc::new(Mutex::new(I8042::new())),
            cmos: Arc::new(Mutex::new(Cmos::new())),
        };
        let reset = devices
            .i8042
            .lock()
            .map(|k| k.reset_requested())
            .map_err(|_| VmmError::Guest("i8042 lock poisoned".into()))?;
        devices
            .test
            .param
            .store(args.param, std::sync::atomic::Ordering::SeqCst);
        let mut dispatcher = Dispatcher::new(UnclaimedPolicy::default());
        dispatcher.register_pio(0x3f8, 8, devices.serial.clone())?;
        dispatcher.register_pio(0xf4, 4, devices.exit.clone())?;
        dispatcher.register_pio(0x510, 0x10, devices.test.clone())?;
        dispatcher.register_pio(I8042::DATA_PORT, 1, devices.i8042.clone())?;
        dispatcher.register_pio(I8042::COMMAND_PORT, 1, devices.i8042.clone())?;
        dispatcher.register_pio(Cmos::INDEX_PORT, 2, devices.cmos.clone())?;
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
            reset,
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

    /// Runs the guest until it halts, shuts down or resets.
    pub fn run(&mut self) -> Result<Outcome, VmmError> {
        loop {
            let exit = self.vcpu.run().map_err(DispatchError::from)?;
            let action = self.dispatcher.dispatch(exit);
            if self.reset.load(Ordering::SeqCst) {
                return Ok(Outcome::Reset);
            }
            match action {
                Action::Continue | Action::Interrupted | Action::Debug { .. } => continue,
                Action::Halt => {
                    return Ok(Outcome::Exited(self.devices.exit.status().unwrap_or(0)));
                }
                Action::Shutdown => return Ok(Outcome::Shutdown),
                Action::Reset => return Ok(Outcome::Reset),
                other => {
                    let rip = self.vcpu.regs().map(|r| r.rip).unwrap_or(0);
                    return Err(VmmError::Guest(format!("{other:?} at rip {rip:#x}")));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bzimage_detection_reads_the_setup_header_magic() {
        let mut img = vec![0u8; 0x400];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        let mut c = std::io::Cursor::new(img);
        assert!(is_bzimage(&mut c));
        assert_eq!(c.position(), 0, "rewound for the loader");
        assert!(!is_bzimage(&mut std::io::Cursor::new(
            vmkit_test_guests::HELLO
        )));
        assert!(!is_bzimage(&mut std::io::Cursor::new(vec![0u8; 0x100])));
    }

    #[test]
    fn initramfs_goes_page_aligned_to_the_top_of_low_ram() {
        let layout = MemoryLayout::x86_pc(256 << 20).unwrap();
        let addr = initramfs_addr(&layout, 0x1234, 0x20_0000, 0x37ff_ffff).unwrap();
        assert_eq!(addr, ((256 << 20) - 0x1234) & !0xfff);
        // The kernel's limit wins over the end of RAM.
        assert_eq!(
            initramfs_addr(&layout, 0x1000, 0x20_0000, 0x7f_ffff),
            Some(0x7f_f000)
        );
        // Too big to sit above the kernel: refused.
        assert_eq!(
            initramfs_addr(&layout, 255 << 20, 0x20_0000, u64::MAX),
            None
        );
    }
}
