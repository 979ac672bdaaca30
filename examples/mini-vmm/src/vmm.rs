//! The `Vmm`: guest memory, one KVM VM with its vCPUs, the devices on the dispatchers, and the
//! run loop.
//!
//! Two machine flavours share it:
//! - the bundled guests (and ELF kernels) run on one vCPU without interrupt controllers: they
//!   poll the serial port and end with `hlt`, which exits to the VMM;
//! - a Linux kernel (a bzImage, or a vmlinux through its PVH entry) gets what a stock kernel
//!   needs on a PC without a BIOS: KVM's in-kernel
//!   irqchip (IOAPIC, LAPICs; the 8259 PIC is masked, the platform is ACPI hardware-reduced)
//!   and PIT, COM1 raising GSI 4 through an irqfd, the i8042 reset line, the initramfs at the
//!   top of low RAM, ACPI tables ([`crate::acpi`]) describing the vCPUs, COM1 and the
//!   virtio-mmio devices ([`crate::virtio`]), and the ACPI sleep registers. Linux halts
//!   in-kernel there, so the VM ends on a keyboard-controller reset (`reboot`), an ACPI S5
//!   (`poweroff`), a KVM shutdown (triple fault) or a system event.
//!
//! # vCPUs
//!
//! vCPU 0 (the bootstrap processor) runs on the thread that calls [`Vmm::run`]; each further
//! vCPU (`--cpus boot=N`) runs on its own host thread with its own [`Dispatcher`] over the same
//! devices. KVM keeps those application processors in wait-for-SIPI until Linux starts them
//! with INIT/SIPI through its local APIC. Whichever vCPU ends the VM stops the others with a
//! kick (a signal that makes `KVM_RUN` return), so a reboot issued on any CPU ends the run.
//! With `--cpus ...,host=M` the vCPUs run instead as tasks on M vmkit-sched workers
//! ([`crate::sched`]).
//!
//! # Boot time
//!
//! What decides how fast a stock kernel reaches its init here, measured in the nested L1 of
//! `tests/linux-guest/mini-vmm-bench.sh` (`BENCH_PROFILE=1`; set `MINI_VMM_TRACE_BOOT` to see
//! mini-vmm's own phases, [`trace_boot`]):
//! - **Guest RAM on 2 MiB boundaries with `MADV_HUGEPAGE`** (vmkit-memory's
//!   [`Backing`](vmkit_memory::Backing) with huge pages). KVM maps a guest-physical 2 MiB
//!   page with one nested-page-table entry only when the host address is 2 MiB-aligned in
//!   step with it; otherwise every 4 KiB the kernel first touches (decompression, the memory
//!   map, page allocator) is a separate nested page fault. In one profiling run each,
//!   unaligned, the same kernel took 10.8 s from mini-vmm's start to its init, aligned 6.3 s
//!   (L2's uptime at init 4.9 s -> 3.2 s; the phase before the kernel's clock starts,
//!   decompression included, 4.9 s -> 2.2 s).
//! - The kernel and initramfs are read straight into guest memory (one copy each, no bounce
//!   buffer); a bzImage is entered at its 64-bit entry, so no firmware or real-mode code runs.
//! - The kernel uses kvm-clock (KVM's paravirtual CPUID leaves pass through), so it takes the
//!   TSC frequency from KVM instead of calibrating against the PIT, and exits to mini-vmm
//!   during boot are few (the serial port, the RTC): everything else is in-kernel.
//!
//! mini-vmm's own share is about 0.8 s from `main` to the first `KVM_RUN` (creating the VM
//! 0.15 s, reading the 14 MiB kernel 0.3 s); the rest is the guest's decompression and
//! initcalls, which take about as long as under QEMU once its machine is given an RTC.

use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmkit_memory::{GuestRam, MemoryLayout, OwnedGuestRam};
use vmkit_vcpu::boot::{self, KernelFormat};
use vmkit_vcpu::dispatch::{Action, DispatchError, Dispatcher, UnclaimedPolicy};
use vmkit_vcpu::kvm::{KvmHypervisor, KvmVcpu, KvmVm};
use vmkit_vcpu::{Hypervisor, MemoryFlags, Vcpu, Vm};

use vmkit_vcpu::regs::CpuidEntry;
use vmkit_vcpu::VcpuKick;

use crate::acpi::{self, AcpiTables};
use crate::args::{Args, Payload};
use crate::devices::{AcpiSleep, Cmos, Devices, ExitPort, SerialIrq, SerialPort, TestPorts, I8042};
use crate::snapshot::{
    self, DeviceStates, Machine, SnapshotError, DEVICES_FILE, MACHINE_FILE, MEMORY_FILE,
    PLATFORM_FILE,
};
use crate::virtio::{VirtioDevices, VirtioError};
use vmkit_vcpu::state::VcpuState;

/// GSI of COM1's interrupt.
pub const SERIAL_GSI: u32 = 4;
/// GSI of the CMOS RTC (which never raises it, but Linux's driver claims it).
pub const RTC_GSI: u32 = 8;
/// First I/O port of COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
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
    /// A virtio device could not be created or wired.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// The ACPI tables could not be built or written.
    #[error("ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
    /// An option needs the Linux machine (a bzImage or PVH kernel).
    #[error(
        "`{0}` needs a Linux kernel, a bzImage or a PVH vmlinux (the machine with interrupt \
         controllers and ACPI)"
    )]
    NeedsLinux(&'static str),
    /// A snapshot could not be written or restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The `--data-log` file could not be opened or written.
    #[error("`--data-log {path}`: {source}")]
    DataLog {
        /// Path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Where the VMM's own start-up time goes: with the environment variable
/// `MINI_VMM_TRACE_BOOT` set (to anything), each boot phase prints one line
/// `mini-vmm: trace <ms> <phase>` on stderr, `<ms>` counted from the first call (`main`
/// makes it first thing). Off, a call costs one load of a cached flag.
pub fn trace_boot(phase: &str) {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Option<Instant>> = OnceLock::new();
    let start =
        START.get_or_init(|| std::env::var_os("MINI_VMM_TRACE_BOOT").map(|_| Instant::now()));
    if let Some(t0) = start {
        eprintln!(
            "mini-vmm: trace {:.1} {phase}",
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
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
    /// The guest powered the machine off through the ACPI sleep registers (S5).
    PowerOff,
    /// Every vCPU was paused for a snapshot ([`Vmm::snapshot_after`]); the VM can be saved
    /// with [`Vmm::save_snapshot`].
    Paused,
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

/// An application processor: a vCPU beyond the first, with its own exit routing.
pub struct ApVcpu {
    /// The vCPU.
    pub vcpu: KvmVcpu,
    /// Its dispatcher (same devices as vCPU 0's).
    pub dispatcher: Dispatcher,
}

/// A VM ready to run.
pub struct Vmm<W: Write + Send + 'static> {
    /// The guest-physical layout (RAM, MMIO hole, reserved ranges, E820).
    pub layout: MemoryLayout,
    /// Guest RAM (with vmkit-memory's dirty bitmap).
    pub memory: GuestRam,
    /// The KVM VM.
    pub vm: KvmVm,
    /// vCPU 0, the bootstrap processor.
    pub vcpu: KvmVcpu,
    /// vCPU 0's exit routing and metrics.
    pub dispatcher: Dispatcher,
    /// vCPUs 1.., started by the guest through INIT/SIPI.
    pub aps: Vec<ApVcpu>,
    /// Device handles.
    pub devices: Devices<W>,
    /// The virtio-mmio devices and their event loop (Linux machines with devices).
    pub virtio: Option<VirtioDevices>,
    /// The ACPI tables written into guest memory (Linux machines).
    pub acpi: Option<AcpiTables>,
    /// Set by the i8042 when the guest pulses the reset line.
    reset: Arc<AtomicBool>,
    /// Set by the ACPI sleep registers when the guest enters S5.
    power_off: Arc<AtomicBool>,
    /// What a restore needs to rebuild this machine.
    pub machine: Machine,
    /// Pause every vCPU after the guest ran this long ([`Outcome::Paused`]).
    pub snapshot_after: Option<Duration>,
    /// How the vCPUs get host threads (`--cpus ...,host=`; see [`crate::sched`]).
    pub vcpu_threads: crate::sched::VcpuThreads,
    /// Wakes vCPUs parked on the scheduler when a device raises its interrupt.
    irq_wake: Arc<crate::sched::IrqWake>,
    /// Host input for COM1's receive FIFO (see [`crate::input`]), read while the guest runs;
    /// `None` (the default) for none. The caller owns the fd.
    pub serial_input: Option<std::os::unix::io::RawFd>,
    /// Memory mapped from a snapshot file: unmapped on drop, so it is the last field (dropped
    /// after the VM, the vCPUs and the virtio thread that use it).
    _mapped_memory: Option<OwnedGuestRam>,
}

/// The CPUID policy of vCPU `id` in a machine of `cpus` vCPUs: the default policy (APIC ID in
/// leaf 1, hypervisor bit) plus a topology of one core per vCPU, one thread per core, so
/// Linux's topology code (leaves 0xB/0x1F, and AMD's 0x8000001E) sees each vCPU's own APIC ID
/// instead of the host CPU's.
pub fn cpuid_policy(id: u32, cpus: u32, entries: &mut Vec<CpuidEntry>) {
    boot::default_cpuid_policy(id, entries);
    // Bits of the APIC ID that select the core: enough for `cpus`.
    let core_bits = cpus.max(1).next_power_of_two().trailing_zeros();
    for e in entries.iter_mut() {
        match (e.function, e.index) {
            // Extended topology: subleaf 0 is the SMT level, 1 the core level.
            (0xb | 0x1f, 0) => {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 1, 1 << 8, id);
            }
            (0xb | 0x1f, 1) => {
                (e.eax, e.ebx, e.ecx, e.edx) = (core_bits, cpus, (2 << 8) | 1, id);
            }
            (0xb | 0x1f, n) => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, n & 0xff, id),
            // AMD: extended APIC ID, compute unit = core id, one thread per unit.
            (0x8000_001e, _) => {
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        // Logical processors per package: all vCPUs share one package.
        e.ebx = (e.ebx & 0xff00_ffff) | ((cpus.min(255) & 0xff) << 16);
    }
}

/// Masks every line of KVM's in-kernel 8259 pair. The hardware-reduced ACPI platform has no
/// legacy PIC, so Linux never programs it; left at KVM's power-on state (unmasked, vector base
/// 0) a GSI below 16 raised through an irqfd would also reach it and could be delivered as an
/// ExtINT with a meaningless vector. Masked, it never raises its output.
fn mask_pic(vm: &KvmVm) -> Result<(), VmmError> {
    for (chip_id, elcr_mask) in [
        (kvm_bindings::KVM_IRQCHIP_PIC_MASTER, 0xf8),
        (kvm_bindings::KVM_IRQCHIP_PIC_SLAVE, 0xde),
    ] {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        chip.chip.pic = kvm_bindings::kvm_pic_state {
            imr: 0xff,
            elcr_mask,
            ..Default::default()
        };
        vm.fd()
            .set_irqchip(&chip)
            .map_err(|e| hv_error("KVM_SET_IRQCHIP (mask the 8259)", e))?;
    }
    Ok(())
}

/// Builds the exit routing of one vCPU: every port device, the virtio windows, hypercalls.
fn make_dispatcher<W: Write + Send + 'static>(
    devices: &Devices<W>,
    memory: &GuestRam,
    virtio: Option<&VirtioDevices>,
) -> Result<Dispatcher, VmmError> {
    let mut dispatcher = Dispatcher::new(UnclaimedPolicy::default());
    dispatcher.register_pio(SERIAL_PORT, 8, devices.serial.clone())?;
    dispatcher.register_pio(0xf4, 4, devices.exit.clone())?;
    dispatcher.register_pio(0x510, 0x10, devices.test.clone())?;
    dispatcher.register_pio(I8042::DATA_PORT, 1, devices.i8042.clone())?;
    dispatcher.register_pio(I8042::COMMAND_PORT, 1, devices.i8042.clone())?;
    dispatcher.register_pio(Cmos::INDEX_PORT, 2, devices.cmos.clone())?;
    dispatcher.register_pio(acpi::SLEEP_CONTROL_PORT, 2, devices.sleep.clone())?;
    if let Some(v) = virtio {
        v.register(&mut dispatcher)?;
    }
    // Hypercalls arrive through the port doorbell (0x500): this host's KVM does not
    // forward `vmcall`. Hypercall 1 ("hello") answers its argument plus one.
    dispatcher.set_hypercall_port(0x500, memory.clone());
    dispatcher.register_hypercall(
        1,
        Box::new(|_nr: u64, args: &[u64; 6]| args[0].wrapping_add(1)),
    );
    Ok(dispatcher)
}

/// What [`Vmm::restore`] hands the machine builder.
struct Restoring<'a> {
    /// Guest memory already mapped from the snapshot (`memory=mmap`), with its file's name.
    mapped: Option<(OwnedGuestRam, &'a Path)>,
    machine: &'a Machine,
    devices: &'a DeviceStates,
    devices_file: &'a Path,
}

/// The flags that end a run, shared by every vCPU thread.
#[derive(Clone)]
pub(crate) struct EndFlags {
    pub(crate) reset: Arc<AtomicBool>,
    pub(crate) power_off: Arc<AtomicBool>,
    /// Another vCPU ended the VM.
    pub(crate) stop: Arc<AtomicBool>,
    /// Park for a snapshot.
    pub(crate) pause: Arc<AtomicBool>,
    pub(crate) exit: Arc<ExitPort>,
}

/// Runs one vCPU until the VM ends; `Ok(None)` when another vCPU ended it.
fn run_vcpu(
    vcpu: &mut KvmVcpu,
    dispatcher: &mut Dispatcher,
    end: &EndFlags,
) -> Result<Option<Outcome>, VmmError> {
    loop {
        let exit = vcpu.run().map_err(DispatchError::from)?;
        let action = dispatcher.dispatch(exit);
        if end.reset.load(Ordering::SeqCst) {
            return Ok(Some(Outcome::Reset));
        }
        if end.power_off.load(Ordering::SeqCst) {
            return Ok(Some(Outcome::PowerOff));
        }
        match action {
            Action::Interrupted if end.pause.load(Ordering::SeqCst) => {
                return Ok(Some(Outcome::Paused))
            }
            Action::Interrupted if end.stop.load(Ordering::SeqCst) => return Ok(None),
            Action::Continue | Action::Interrupted | Action::Debug { .. } => continue,
            Action::Halt => return Ok(Some(Outcome::Exited(end.exit.status().unwrap_or(0)))),
            Action::Shutdown => return Ok(Some(Outcome::Shutdown)),
            Action::Reset => return Ok(Some(Outcome::Reset)),
            other => {
                let rip = vcpu.regs().map(|r| r.rip).unwrap_or(0);
                return Err(VmmError::Guest(format!(
                    "vCPU {}: {other:?} at rip {rip:#x}",
                    vcpu.id()
                )));
            }
        }
    }
}

fn hv_error(op: &'static str, e: impl Into<std::io::Error>) -> VmmError {
    VmmError::Hypervisor(vmkit_vcpu::Error::Backend {
        op,
        source: e.into(),
    })
}

/// Where the PVH module list (the initramfs) goes: in the PVH page, past the start info and
/// its memory map.
pub const PVH_MODLIST_ADDR: u64 = boot::PVH_INFO_ADDR + 0x800;

/// Reads the initramfs at `path` into the top of low RAM (below `limit`, above `kernel_end`);
/// returns its `(address, size)`.
fn load_initramfs(
    memory: &vmkit_memory::GuestRam,
    layout: &MemoryLayout,
    path: &std::path::Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), VmmError> {
    let err = |why: String| VmmError::Initramfs {
        path: path.display().to_string(),
        why,
    };
    let mut file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    // A pipe or other stream has no size up front: read it whole first (bounded by RAM).
    let buffered = if meta.is_file() {
        None
    } else {
        let mut bytes = Vec::new();
        std::io::Read::by_ref(&mut file)
            .take(memory.last_addr().0.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| err(e.to_string()))?;
        Some(bytes)
    };
    let size = buffered.as_ref().map_or(meta.len(), |b| b.len() as u64);
    if size == 0 {
        return Err(err("empty initramfs".into()));
    }
    let addr = initramfs_addr(layout, size, kernel_end, limit).ok_or_else(|| {
        err(format!(
            "{size} bytes do not fit in guest RAM below {limit:#x}"
        ))
    })?;
    let len = usize::try_from(size).map_err(|_| err(format!("{size} bytes is too big")))?;
    match &buffered {
        Some(bytes) => memory.write_slice(bytes, GuestAddress(addr)),
        // A regular file: straight into guest memory, one copy, no buffer as big as the file.
        None => memory.read_exact_volatile_from(GuestAddress(addr), &mut file, len),
    }
    .map_err(|e| err(e.to_string()))?;
    Ok((addr, size))
}

/// Tells a kernel where its initramfs and the ACPI RSDP are, the way its boot protocol
/// carries them: the zero page (`ramdisk_image`/`ramdisk_size`, `acpi_rsdp_addr`) for the
/// 64-bit Linux protocol, the start info (module 0, `rsdp_paddr`) for PVH.
pub fn record_boot_extras(
    memory: &GuestRam,
    protocol: boot::BootProtocol,
    initramfs: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<(), VmmError> {
    let err = |what: &str, e: vm_memory::GuestMemoryError| {
        VmmError::Guest(format!("cannot update the {what}: {e}"))
    };
    match protocol {
        boot::BootProtocol::Linux64 { zero_page } => {
            let at = GuestAddress(zero_page);
            let mut params: boot_params = memory.read_obj(at).map_err(|e| err("zero page", e))?;
            if let Some((addr, size)) = initramfs {
                // initramfs_addr keeps both below the kernel's 32-bit initrd_addr_max.
                params.hdr.ramdisk_image = addr as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            if let Some(r) = rsdp {
                params.acpi_rsdp_addr = r;
            }
            memory
                .write_obj(params, at)
                .map_err(|e| err("zero page", e))
        }
        boot::BootProtocol::Pvh { start_info } => {
            let at = GuestAddress(start_info);
            let mut info: hvm_start_info =
                memory.read_obj(at).map_err(|e| err("PVH start info", e))?;
            if let Some((paddr, size)) = initramfs {
                let module = hvm_modlist_entry {
                    paddr,
                    size,
                    ..Default::default()
                };
                memory
                    .write_obj(module, GuestAddress(PVH_MODLIST_ADDR))
                    .map_err(|e| err("PVH module list", e))?;
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST_ADDR;
            }
            if let Some(r) = rsdp {
                info.rsdp_paddr = r;
            }
            memory
                .write_obj(info, at)
                .map_err(|e| err("PVH start info", e))
        }
        boot::BootProtocol::Elf => Ok(()),
    }
}

impl<W: Write + Send + 'static> Vmm<W> {
    /// Builds a VM for `args`, with serial output going to `out`.
    pub fn new(args: &Args, out: W) -> Result<Self, VmmError> {
        Self::build(args, out, None)
    }

    /// Builds the VM saved in `dir` (see [`crate::snapshot`]) and restores its state: the next
    /// [`Vmm::run`] continues the guest where it stopped. `args` gives what may differ from the
    /// saved run (`--data-log`; COM1's output is `out`). Every file is checked: a bad one is an
    /// error naming it, before anything runs.
    pub fn restore(dir: &Path, args: &Args, out: W) -> Result<Self, VmmError> {
        let machine_file = dir.join(MACHINE_FILE);
        let text = snapshot::read(&machine_file)?;
        let text = String::from_utf8(text).map_err(|_| SnapshotError::Format {
            file: machine_file.clone(),
            why: "not UTF-8 text".into(),
        })?;
        let machine = Machine::parse(&text, &machine_file)?
            .with_backends(args, args.restore_devices_from_snapshot)?;
        let mut margs = machine.to_args();
        margs.data_log = args.data_log.clone();
        // Decode every small file before building anything.
        let devices_file = dir.join(DEVICES_FILE);
        let device_states =
            DeviceStates::from_bytes(&snapshot::read(&devices_file)?, &devices_file)?;
        let mut vcpu_states = Vec::new();
        for id in 0..usize::from(machine.cpus) {
            let file = dir.join(snapshot::vcpu_file(id));
            let bytes = snapshot::read(&file)?;
            let state = VcpuState::from_bytes(&bytes)
                .map_err(|source| SnapshotError::Vcpu { file, source })?;
            vcpu_states.push(state);
        }
        let platform_file = dir.join(PLATFORM_FILE);
        let platform = snapshot::read(&platform_file)?;
        let mut virtio_states = Vec::new();
        for i in 0..machine.virtio_count() {
            let file = dir.join(snapshot::virtio_file(i));
            virtio_states.push((snapshot::read(&file)?, file));
        }
        let memory_file = dir.join(MEMORY_FILE);
        let mem = std::fs::File::open(&memory_file).map_err(|source| SnapshotError::Io {
            file: memory_file.clone(),
            source,
        })?;

        let mapped = if args.restore_mmap {
            let owned = vmkit_memory::snapshot::restore_mmap(&mem, &Default::default()).map_err(
                |source| SnapshotError::Memory {
                    file: memory_file.clone(),
                    source,
                },
            )?;
            Some((owned, memory_file.as_path()))
        } else {
            None
        };
        let copy = mapped.is_none();
        let mut vmm = Self::build(
            &margs,
            out,
            Some(Restoring {
                mapped,
                machine: &machine,
                devices: &device_states,
                devices_file: &devices_file,
            }),
        )?;
        if copy {
            vmkit_memory::snapshot::restore_copy(&vmm.memory, &mem).map_err(|source| {
                SnapshotError::Memory {
                    file: memory_file.clone(),
                    source,
                }
            })?;
        }
        vmm.vm
            .set_platform_state(&platform)
            .map_err(|source| SnapshotError::Platform {
                file: platform_file,
                source,
            })?;
        let vcpus = std::iter::once(&vmm.vcpu).chain(vmm.aps.iter().map(|a| &a.vcpu));
        for (id, (vcpu, state)) in vcpus.zip(&vcpu_states).enumerate() {
            state.restore(vcpu).map_err(|source| SnapshotError::Vcpu {
                file: dir.join(snapshot::vcpu_file(id)),
                source,
            })?;
        }
        {
            let d = &vmm.devices;
            d.i8042
                .lock()
                .map_err(|_| VmmError::Guest("i8042 lock poisoned".into()))?
                .set_state(&device_states.i8042);
            d.cmos
                .lock()
                .map_err(|_| VmmError::Guest("CMOS lock poisoned".into()))?
                .set_state(device_states.cmos_index, device_states.cmos_nvram);
            d.sleep.set_power_off(device_states.power_off);
            d.exit.set_status(device_states.exit_status);
        }
        if let Some(v) = &vmm.virtio {
            v.restore_states(&virtio_states)?;
        }
        // How to run the vCPUs is this command line's choice, not the snapshot's.
        vmm.vcpu_threads = args.vcpu_threads;
        Ok(vmm)
    }

    /// Saves the paused VM (after [`Vmm::run`] returned [`Outcome::Paused`]) into `dir`,
    /// creating it; see [`crate::snapshot`] for the files.
    pub fn save_snapshot(&mut self, dir: &Path) -> Result<(), VmmError> {
        std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Io {
            file: dir.to_path_buf(),
            source,
        })?;
        let vcpus = std::iter::once(&mut self.vcpu).chain(self.aps.iter_mut().map(|a| &mut a.vcpu));
        for (id, vcpu) in vcpus.enumerate() {
            let file = dir.join(snapshot::vcpu_file(id));
            let state = VcpuState::save(vcpu).map_err(|source| SnapshotError::Vcpu {
                file: file.clone(),
                source,
            })?;
            snapshot::write(&file, &state.to_bytes())?;
        }
        let file = dir.join(PLATFORM_FILE);
        let platform = self
            .vm
            .platform_state()
            .map_err(|source| SnapshotError::Platform {
                file: file.clone(),
                source,
            })?;
        snapshot::write(&file, &platform)?;
        let file = dir.join(DEVICES_FILE);
        let states = DeviceStates::capture(&self.devices).map_err(|why| SnapshotError::Format {
            file: file.clone(),
            why,
        })?;
        snapshot::write(&file, &states.to_bytes())?;
        if let Some(v) = &self.virtio {
            for (i, bytes) in v.save_states()?.into_iter().enumerate() {
                snapshot::write(&dir.join(snapshot::virtio_file(i)), &bytes)?;
            }
        }
        let file = dir.join(MEMORY_FILE);
        let mem = std::fs::File::create(&file).map_err(|source| SnapshotError::Io {
            file: file.clone(),
            source,
        })?;
        vmkit_memory::snapshot::write_full(&self.memory, &mem)
            .map_err(|source| SnapshotError::Memory { file, source })?;
        self.flush_data_log()?;
        // Last: its presence marks a complete snapshot.
        let file = dir.join(MACHINE_FILE);
        let text = self.machine.to_text(&file)?;
        snapshot::write(&file, text.as_bytes())?;
        Ok(())
    }

    /// Writes buffered `--data-log` lines to the file.
    pub fn flush_data_log(&self) -> Result<(), VmmError> {
        self.devices
            .test
            .flush_log()
            .map_err(|source| VmmError::DataLog {
                path: "(flush)".into(),
                source,
            })
    }

    /// Builds a VM for `args`; when `restoring`, without loading a kernel or setting up a
    /// boot (the snapshot's state replaces it).
    fn build(args: &Args, out: W, mut restoring: Option<Restoring<'_>>) -> Result<Self, VmmError> {
        let layout = MemoryLayout::x86_pc(args.memory)?;
        let ranges: Vec<_> = layout
            .ram_regions()
            .iter()
            .map(|r| (r.guest_addr, r.size as usize))
            .collect();
        let (memory, mapped_memory) = match restoring.as_mut().and_then(|r| r.mapped.take()) {
            Some((owned, file)) => {
                // The file's regions must be the machine's, or the guest sees another PC.
                let got: Vec<_> = owned
                    .ram()
                    .iter()
                    .map(|r| (r.start_addr(), r.len() as usize))
                    .collect();
                if got != ranges {
                    return Err(SnapshotError::Format {
                        file: file.to_path_buf(),
                        why: format!(
                            "guest memory regions {got:x?} do not match the machine's \
                             {ranges:x?}"
                        ),
                    }
                    .into());
                }
                (owned.ram().clone(), Some(owned))
            }
            // vhost-user backends map guest RAM themselves: it must be a shareable memfd.
            // Huge pages as for anonymous RAM (shmem THP needs the host's
            // transparent_hugepage/shmem_enabled at `advise` or above).
            None if !args.vhost_user.is_empty() => {
                let owned = vmkit_memory::Backing::memfd()
                    .with_huge_pages(true)
                    .build(&layout)
                    .map_err(|_| VmmError::Memory(args.memory))?;
                (owned.ram().clone(), Some(owned))
            }
            // Anonymous memory on 2 MiB boundaries with MADV_HUGEPAGE, as QEMU maps its RAM:
            // KVM can then back the guest with 2 MiB pages in its nested page tables, so a
            // booting kernel takes one fault per 2 MiB it touches instead of one per 4 KiB
            // (each an exit to the host kernel; see the module docs' boot-time notes).
            None => {
                let owned = vmkit_memory::Backing::anonymous()
                    .with_huge_pages(true)
                    .build(&layout)
                    .map_err(|_| VmmError::Memory(args.memory))?;
                (owned.ram().clone(), Some(owned))
            }
        };
        trace_boot("guest memory mapped");
        let hv = KvmHypervisor::new()?;
        let vm = hv.create_vm()?;
        vm.register_memory(&memory, 0, MemoryFlags::default())?;
        trace_boot("KVM VM created, memory registered");

        let mut linux = false;
        let mut protocol = None;
        let mut initramfs_at = None;
        let kernel = match &args.payload {
            _ if restoring.is_some() => {
                linux = restoring.as_ref().is_some_and(|r| r.machine.linux);
                None
            }
            Payload::Guest(name) => {
                let elf = vmkit_test_guests::ALL
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, e)| *e)
                    .ok_or_else(|| VmmError::UnknownGuest(name.clone()))?;
                let mut img = std::io::Cursor::new(elf);
                Some(boot::load_kernel(
                    &memory,
                    &mut img,
                    KernelFormat::PlainElf,
                    None,
                    &[],
                )?)
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
                // A PVH entry is Linux's too (a vmlinux): it gets the same machine.
                linux |= matches!(k.protocol, boot::BootProtocol::Pvh { .. });
                trace_boot("kernel loaded");
                if let Some(initramfs) = &args.initramfs {
                    let limit = match k.protocol {
                        boot::BootProtocol::Linux64 { zero_page } => {
                            let params: boot_params = memory
                                .read_obj(GuestAddress(zero_page))
                                .map_err(|e| VmmError::Guest(format!("zero page: {e}")))?;
                            params.hdr.initrd_addr_max
                        }
                        _ => 0,
                    };
                    let limit = match limit {
                        0 => 0x37ff_ffff,
                        n => u64::from(n),
                    };
                    initramfs_at = Some(load_initramfs(&memory, &layout, initramfs, k.end, limit)?);
                    trace_boot("initramfs loaded");
                }
                protocol = Some(k.protocol);
                Some(k)
            }
        };
        if !linux {
            for (given, name) in [
                (args.cpus > 1, "--cpus"),
                (!args.disks.is_empty(), "--disk"),
                (!args.nets.is_empty(), "--net"),
                (args.rng, "--rng"),
                (args.console.is_some(), "--console"),
            ] {
                if given {
                    return Err(VmmError::NeedsLinux(name));
                }
            }
        }
        let irq_wake = Arc::new(crate::sched::IrqWake::default());
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
            mask_pic(&vm)?;
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| hv_error("eventfd", e))?;
            vm.register_irqfd(&fd, SERIAL_GSI)?;
            SerialIrq::Waking(crate::sched::WakingIrqFd::new(fd, Arc::clone(&irq_wake)))
        } else {
            SerialIrq::None
        };
        let cpus = u32::from(args.cpus.max(1));
        let vcpu = vm.create_vcpu(0)?;
        boot::configure_cpuid(&hv, &vcpu, |id, e| cpuid_policy(id, cpus, e))?;
        if let Some(kernel) = &kernel {
            kernel.setup_vcpu(&memory, &vcpu)?;
        }
        let mut ap_vcpus = Vec::new();
        for id in 1..cpus {
            // No register setup: KVM holds application processors in wait-for-SIPI.
            let ap = vm.create_vcpu(id)?;
            boot::configure_cpuid(&hv, &ap, |id, e| cpuid_policy(id, cpus, e))?;
            ap_vcpus.push(ap);
        }

        let (virtio, acpi_tables) = if linux {
            let specs = crate::virtio::devices_from_args(args)?;
            let mem = Arc::new(memory.clone());
            let vhost = crate::virtio::vhost_user_devices(args, &mem)?;
            let virtio = if specs.is_empty() && vhost.is_empty() {
                None
            } else {
                Some(VirtioDevices::with_vhost_user(
                    specs,
                    vhost,
                    mem,
                    &vm,
                    Arc::clone(&irq_wake),
                )?)
            };
            let machine = acpi::Machine {
                cpus: cpus as usize,
                serial: Some(acpi::SerialInfo {
                    port: SERIAL_PORT,
                    gsi: SERIAL_GSI,
                }),
                rtc: Some(acpi::RtcInfo {
                    port: Cmos::INDEX_PORT,
                    gsi: RTC_GSI,
                }),
                virtio: virtio.as_ref().map(|v| v.acpi_info()).unwrap_or_default(),
            };
            if restoring.is_some() {
                // The tables are in the restored memory already.
                (virtio, None)
            } else {
                let tables = acpi::build(&machine)?;
                tables.write_to(&memory)?;
                (virtio, Some(tables))
            }
        } else {
            (None, None)
        };
        trace_boot("vCPUs, irqchip, virtio devices and ACPI tables ready");
        if let Some(p) = protocol {
            let rsdp = acpi_tables.as_ref().map(|t| t.rsdp_addr);
            record_boot_extras(&memory, p, initramfs_at, rsdp)?;
        }

        let devices =
            Devices {
                serial: Arc::new(Mutex::new(match &restoring {
                    Some(r) => SerialPort::from_state(&r.devices.serial, out, serial_irq).map_err(
                        |why| SnapshotError::Format {
                            file: r.devices_file.to_path_buf(),
                            why: format!("serial state: {why}"),
                        },
                    )?,
                    None => SerialPort::with_irq(out, serial_irq),
                })),
                exit: Arc::new(ExitPort::new()),
                test: Arc::new(TestPorts::default()),
                i8042: Arc::new(Mutex::new(I8042::new())),
                cmos: Arc::new(Mutex::new(Cmos::new())),
                sleep: Arc::new(AcpiSleep::default()),
            };
        let power_off = devices.sleep.power_off_requested();
        let reset = devices
            .i8042
            .lock()
            .map(|k| k.reset_requested())
            .map_err(|_| VmmError::Guest("i8042 lock poisoned".into()))?;
        devices
            .test
            .param
            .store(args.param, std::sync::atomic::Ordering::SeqCst);
        if let Some(path) = &args.data_log {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmmError::DataLog {
                    path: path.display().to_string(),
                    source,
                })?;
            if let Ok(mut log) = devices.test.log.lock() {
                *log = Some(std::io::BufWriter::new(f));
            }
        }
        let dispatcher = make_dispatcher(&devices, &memory, virtio.as_ref())?;
        let mut aps = Vec::new();
        for vcpu in ap_vcpus {
            let dispatcher = make_dispatcher(&devices, &memory, virtio.as_ref())?;
            aps.push(ApVcpu { vcpu, dispatcher });
        }
        Ok(Vmm {
            layout,
            memory,
            vm,
            vcpu,
            dispatcher,
            aps,
            devices,
            virtio,
            acpi: acpi_tables,
            reset,
            power_off,
            machine: Machine::from_args(args, linux),
            snapshot_after: args
                .snapshot
                .as_ref()
                .map(|s| Duration::from_millis(s.after_ms)),
            vcpu_threads: args.vcpu_threads,
            irq_wake,
            serial_input: None,
            _mapped_memory: mapped_memory,
        })
    }

    /// Per-exit-kind counts and mean handling latency over all vCPUs, one line per kind seen.
    pub fn stats(&self) -> String {
        let dispatchers =
            std::iter::once(&self.dispatcher).chain(self.aps.iter().map(|a| &a.dispatcher));
        let mut out = String::from("exit kind        count   mean ns   max ns");
        for kind in vmkit_vcpu::ExitKind::ALL {
            // Summed over every vCPU's dispatcher.
            let (count, total, max) = dispatchers.clone().fold((0u64, 0u64, 0u64), |acc, d| {
                let k = d.metrics().kind(kind);
                (
                    acc.0.saturating_add(k.count),
                    acc.1.saturating_add(k.total_ns),
                    acc.2.max(k.max_ns),
                )
            });
            if count > 0 {
                out.push_str(&format!(
                    "\n{:<14} {:>7} {:>9} {:>8}",
                    kind.name(),
                    count,
                    total / count,
                    max
                ));
            }
        }
        if let Some(line) = crate::sched::last_run_summary() {
            out.push_str(&format!("\n{line}"));
        }
        out
    }

    /// Runs the guest until it halts, shuts down, resets or powers off. Starts the virtio
    /// event loop first and stops it before returning.
    pub fn run(&mut self) -> Result<Outcome, VmmError> {
        // A machine that was reset or powered off stays so: its vCPUs do not run again.
        if self.reset.load(Ordering::SeqCst) {
            return Ok(Outcome::Reset);
        }
        if self.power_off.load(Ordering::SeqCst) {
            return Ok(Outcome::PowerOff);
        }
        if let Some(v) = &mut self.virtio {
            v.start()?;
        }
        let end = EndFlags {
            reset: self.reset.clone(),
            power_off: self.power_off.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            pause: Arc::new(AtomicBool::new(false)),
            exit: self.devices.exit.clone(),
        };
        let kicks: Vec<_> = std::iter::once(self.vcpu.kick_handle())
            .chain(self.aps.iter().map(|a| a.vcpu.kick_handle()))
            .collect();
        let after = self.snapshot_after;
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let input_stop = AtomicBool::new(false);
        let (serial, input) = (self.devices.serial.clone(), self.serial_input);
        let result = std::thread::scope(|s| {
            if let Some(fd) = input {
                let (serial, stop) = (&serial, &input_stop);
                s.spawn(move || {
                    if let Err(e) = crate::input::pump(fd, serial, stop) {
                        eprintln!("mini-vmm: serial input stopped: {e}");
                    }
                });
            }
            if let Some(after) = after {
                let pause = end.pause.clone();
                // The pause timer: ends early (without pausing) when the run ends first.
                s.spawn(move || {
                    if let Err(RecvTimeoutError::Timeout) = done_rx.recv_timeout(after) {
                        pause.store(true, Ordering::SeqCst);
                        for k in &kicks {
                            k.kick();
                        }
                    }
                });
            }
            trace_boot("entering KVM_RUN");
            let r = self.run_vcpus(&end);
            drop(done_tx);
            input_stop.store(true, Ordering::SeqCst);
            r
        });
        if let Some(v) = &mut self.virtio {
            v.stop();
        }
        result.and_then(|r| r.ok_or_else(|| VmmError::Guest("every vCPU stopped".into())))
    }

    /// Runs every vCPU until one ends the VM (or all are paused).
    fn run_vcpus(&mut self, end: &EndFlags) -> Result<Option<Outcome>, VmmError> {
        let end = end.clone();
        if let Some(workers) = self.vcpu_threads.workers(1 + self.aps.len()) {
            let vcpus = std::iter::once((&mut self.vcpu, &mut self.dispatcher))
                .chain(
                    self.aps
                        .iter_mut()
                        .map(|a| (&mut a.vcpu, &mut a.dispatcher)),
                )
                .collect();
            return crate::sched::run_vcpus(vcpus, &end, workers, &self.irq_wake);
        }
        if self.aps.is_empty() {
            run_vcpu(&mut self.vcpu, &mut self.dispatcher, &end)
        } else {
            let bsp_kick = self.vcpu.kick_handle();
            let ap_kicks: Vec<_> = self.aps.iter().map(|a| a.vcpu.kick_handle()).collect();
            let (bsp, aps) = (&mut self.vcpu, &mut self.aps);
            let bsp_dispatcher = &mut self.dispatcher;
            std::thread::scope(|s| {
                let threads: Vec<_> = aps
                    .iter_mut()
                    .map(|ap| {
                        let (end, bsp_kick) = (end.clone(), bsp_kick.clone());
                        s.spawn(move || {
                            let r = run_vcpu(&mut ap.vcpu, &mut ap.dispatcher, &end);
                            if !matches!(r, Ok(None)) {
                                // This vCPU ended the VM: stop vCPU 0, which stops the rest.
                                end.stop.store(true, Ordering::SeqCst);
                                bsp_kick.kick();
                            }
                            r
                        })
                    })
                    .collect();
                let mut result = run_vcpu(bsp, bsp_dispatcher, &end);
                end.stop.store(true, Ordering::SeqCst);
                for k in &ap_kicks {
                    k.kick();
                }
                for t in threads {
                    let r = t
                        .join()
                        .unwrap_or_else(|_| Err(VmmError::Guest("a vCPU thread panicked".into())));
                    // vCPU 0 stopped (or paused) on another vCPU's account: that vCPU's
                    // result counts, unless it merely paused or stopped too.
                    let weak = |r: &Result<Option<Outcome>, VmmError>| {
                        matches!(r, Ok(None) | Ok(Some(Outcome::Paused)))
                    };
                    if (weak(&result) && !weak(&r)) || (matches!(result, Ok(None)) && r.is_ok()) {
                        result = r;
                    }
                }
                result
            })
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

    fn leaf(function: u32, index: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            flags: 0,
            eax: 0xdead,
            ebx: 0xdead,
            ecx: 0xdead,
            edx: 0xdead,
        }
    }

    #[test]
    fn cpuid_policy_gives_each_vcpu_its_own_apic_id_and_core() {
        let mut e = vec![
            leaf(1, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0xb, 2),
            leaf(0x1f, 1),
            leaf(0x8000_001e, 0),
            leaf(7, 0),
        ];
        cpuid_policy(3, 6, &mut e);
        // Leaf 1: initial APIC ID 3, 6 logical processors, hypervisor bit.
        assert_eq!((e[0].ebx >> 24, (e[0].ebx >> 16) & 0xff), (3, 6));
        assert_ne!(e[0].ecx & (1 << 31), 0);
        // SMT level: 1 thread, x2APIC ID 3; core level: 3 bits (8 >= 6), 6 processors.
        assert_eq!((e[1].eax, e[1].ebx, e[1].ecx, e[1].edx), (0, 1, 0x100, 3));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx, e[2].edx), (3, 6, 0x201, 3));
        assert_eq!(
            (e[3].eax, e[3].ebx, e[3].ecx & 0xff00, e[3].edx),
            (0, 0, 0, 3)
        );
        assert_eq!(e[4].edx, 3);
        assert_eq!((e[5].eax, e[5].ebx, e[5].ecx), (3, 3, 0));
        assert_eq!(e[6].eax, 0xdead, "other leaves untouched");
        let mut one = vec![leaf(0xb, 1)];
        cpuid_policy(0, 1, &mut one);
        assert_eq!((one[0].eax, one[0].ebx), (0, 1));
    }

    #[test]
    fn boot_extras_go_where_each_protocol_looks() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let e820 = [(0, 1 << 20, 1)];
        // 64-bit Linux protocol: the zero page.
        boot::write_zero_page(&mem, None, "", &e820).unwrap();
        let linux = boot::BootProtocol::Linux64 {
            zero_page: boot::ZERO_PAGE_ADDR,
        };
        record_boot_extras(&mem, linux, Some((0x8_0000, 0x1234)), Some(0xe_0000)).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(boot::ZERO_PAGE_ADDR)).unwrap();
        assert_eq!(
            (p.hdr.ramdisk_image, p.hdr.ramdisk_size, p.acpi_rsdp_addr),
            (0x8_0000, 0x1234, 0xe_0000)
        );
        assert_eq!(p.e820_entries, 1, "the rest of the zero page is kept");
        // PVH: module 0 and rsdp_paddr in the start info.
        boot::write_pvh_info(&mem, &e820).unwrap();
        let pvh = boot::BootProtocol::Pvh {
            start_info: boot::PVH_INFO_ADDR,
        };
        record_boot_extras(&mem, pvh, Some((0x9_0000, 0x777)), Some(0xe_0000)).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(boot::PVH_INFO_ADDR)).unwrap();
        assert_eq!(
            (info.nr_modules, info.modlist_paddr, info.rsdp_paddr),
            (1, PVH_MODLIST_ADDR, 0xe_0000)
        );
        assert_eq!((info.magic, info.memmap_entries), (0x336e_c578, 1));
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!((m.paddr, m.size), (0x9_0000, 0x777));
        // The memory map ends before the module list.
        let map_end = info.memmap_paddr + 24 * u64::from(info.memmap_entries);
        assert!(map_end <= PVH_MODLIST_ADDR);
        // Neither: only what was given changes; a plain ELF has nothing to record.
        record_boot_extras(&mem, pvh, None, None).unwrap();
        let again: hvm_start_info = mem.read_obj(GuestAddress(boot::PVH_INFO_ADDR)).unwrap();
        assert_eq!(again.nr_modules, 1);
        record_boot_extras(&mem, boot::BootProtocol::Elf, Some((1, 1)), Some(1)).unwrap();
        // Outside guest memory: an error, not a panic.
        let far = boot::BootProtocol::Pvh {
            start_info: 1 << 30,
        };
        assert!(record_boot_extras(&mem, far, None, None).is_err());
    }

    #[test]
    fn the_initramfs_file_is_read_into_the_top_of_low_ram() {
        let layout = MemoryLayout::x86_pc(16 << 20).unwrap();
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let (addr, size) = load_initramfs(&mem, &layout, &path, 0x20_0000, 0x37ff_ffff).unwrap();
        assert_eq!((addr, size), (((16 << 20) - 10_000) & !0xfff, 10_000));
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, data);
        // No room below the kernel's limit: an error naming the file and the size.
        let e = load_initramfs(&mem, &layout, &path, 0x20_0000, 0xfff).unwrap_err();
        assert!(
            e.to_string().contains("initrd") && e.to_string().contains("10000 bytes"),
            "{e}"
        );
        let missing = dir.path().join("missing");
        let e = load_initramfs(&mem, &layout, &missing, 0, 0x37ff_ffff).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        // A FIFO (`--initramfs <(...)`) has no size up front: it is read whole, not skipped.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (writer_path, writer_data) = (fifo.clone(), data.clone());
        let writer = std::thread::spawn(move || std::fs::write(writer_path, writer_data));
        let (addr, size) = load_initramfs(&mem, &layout, &fifo, 0x20_0000, 0x37ff_ffff).unwrap();
        writer.join().unwrap().unwrap();
        assert_eq!(size, 10_000);
        mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, data);
        // An empty one is an error, not an empty initramfs.
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let e = load_initramfs(&mem, &layout, &empty, 0, 0x37ff_ffff).unwrap_err();
        assert!(e.to_string().contains("empty initramfs"), "{e}");
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
