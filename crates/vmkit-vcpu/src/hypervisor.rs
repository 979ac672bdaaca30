//! The hypervisor-neutral traits: a [`Hypervisor`] creates [`Vm`]s, a [`Vm`] owns guest
//! memory registrations, interrupt lines and [`Vcpu`]s, and a [`Vcpu`] runs guest code until
//! the next [`VmExit`].
//!
//! The traits follow the shape shared by KVM, Hyper-V (WHP), HVF and others, so a VMM written
//! against them can change backends: what is KVM-specific (file descriptors, `kvm_run`) stays
//! inside [`crate::kvm`]. Errors are one neutral [`Error`] type that names the operation and
//! keeps the OS error.
//!
//! A running vCPU blocks its thread. To make it return from another thread (to pause it,
//! snapshot it or deliver work) take a [`VcpuKick`] handle before running it and call
//! [`VcpuKick::kick`]: `run` then returns [`VmExit::Interrupted`] promptly, whether the
//! vCPU was inside the guest or about to enter it.

use std::os::fd::RawFd;

use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::exit::VmExit;
use crate::regs::{
    CpuidEntry, DebugRegs, Fpu, LapicState, MpState, MsrEntry, Regs, SpecialRegs, VcpuEvents, Xcr,
    XsaveArea,
};

/// Errors of the hypervisor interface.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend refused an operation.
    #[error("{op} failed: {source}")]
    Backend {
        /// The operation (e.g. `KVM_SET_SREGS`).
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The backend does not offer a capability the caller needs.
    #[error("the hypervisor does not support {0}")]
    Unsupported(&'static str),
    /// An argument was out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Result type of the hypervisor interface.
pub type Result<T> = std::result::Result<T, Error>;

/// Capabilities a VMM may ask for before relying on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// In-kernel interrupt controller (PIC/IOAPIC/LAPIC).
    IrqChip,
    /// Interrupt injection through event fds.
    Irqfd,
    /// Guest writes signalling event fds without a user-space exit.
    Ioeventfd,
    /// Dirty-page logging of memory slots.
    DirtyLog,
    /// `rdmsr`/`wrmsr` of unknown MSRs forwarded to user space.
    UserMsrExits,
    /// Hypercalls forwarded to user space.
    HypercallExits,
    /// Immediate-exit kick support.
    ImmediateExit,
    /// Read-only memory slots (writes become MMIO exits).
    ReadOnlyMemory,
}

/// Where an ioeventfd listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEventAddress {
    /// A port.
    Pio(u64),
    /// A guest-physical address.
    Mmio(u64),
}

/// Which guest writes an ioeventfd fires on. A value match is exactly as wide as the
/// guest's store: a 32-bit `QueueNotify` write matches only [`DataMatch::U32`] (KVM compares
/// the access length too, so a value of the wrong width silently never fires).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataMatch {
    /// Every write, whatever its value and width.
    Any,
    /// One-byte writes of this value.
    U8(u8),
    /// Two-byte writes of this value.
    U16(u16),
    /// Four-byte writes of this value.
    U32(u32),
    /// Eight-byte writes of this value.
    U64(u64),
}

/// Flags for a guest memory registration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryFlags {
    /// Track written pages (see [`Vm::dirty_log`]).
    pub log_dirty: bool,
    /// Guest writes exit to user space as MMIO writes.
    pub read_only: bool,
}

/// A hypervisor: the entry point of a backend.
pub trait Hypervisor {
    /// The VM type of this backend.
    type Vm: Vm;
    /// Whether the backend offers `cap`.
    fn check_capability(&self, cap: Capability) -> bool;
    /// Creates an empty VM.
    fn create_vm(&self) -> Result<Self::Vm>;
    /// The CPUID leaves this hypervisor can expose to guests (x86).
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
}

/// A virtual machine: memory, interrupt routing and vCPUs.
pub trait Vm: Send + Sync {
    /// The vCPU type of this backend.
    type Vcpu: Vcpu;

    /// Registers every region of `mem` as guest memory, starting at memory slot `first_slot`
    /// (one slot per region, in address order). The VM keeps a clone of `mem`, so the host
    /// mappings stay valid for as long as the VM can touch them.
    fn register_memory<B: Bitmap + Send + Sync + 'static>(
        &self,
        mem: &GuestMemoryMmap<B>,
        first_slot: u32,
        flags: MemoryFlags,
    ) -> Result<()>;
    /// Creates the vCPU with the given id.
    fn create_vcpu(&self, id: u32) -> Result<Self::Vcpu>;
    /// Creates the in-kernel interrupt controller (x86: PIC, IOAPIC, per-vCPU LAPIC). Must
    /// come before creating vCPUs.
    fn create_irq_chip(&self) -> Result<()>;
    /// Drives an interrupt line of the in-kernel irqchip.
    fn set_irq_line(&self, irq: u32, level: bool) -> Result<()>;
    /// Makes a write to `fd` raise `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    /// Undoes [`Vm::register_irqfd`].
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    /// Makes guest writes to `addr` that match `datamatch` signal `fd` instead of exiting.
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: DataMatch,
    ) -> Result<()>;
    /// Undoes [`Vm::register_ioevent`] (same address and match).
    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: DataMatch,
    ) -> Result<()>;
    /// Returns and clears the dirty bitmap of memory slot `slot` of `len` bytes: bit `i` of
    /// word `w` is page `w * 64 + i` of the slot.
    fn dirty_log(&self, slot: u32, len: usize) -> Result<Vec<u64>>;
    /// Forwards `rdmsr`/`wrmsr` of MSRs the hypervisor does not handle to user space as
    /// [`VmExit::MsrRead`]/[`VmExit::MsrWrite`].
    fn enable_user_msr_exits(&self) -> Result<()>;
    /// Forwards the hypercalls whose numbers are set in `mask` to user space as
    /// [`VmExit::Hypercall`] (KVM: only nr 12, `KVM_HC_MAP_GPA_RANGE`).
    fn enable_hypercall_exits(&self, mask: u64) -> Result<()>;
}

/// Makes a running vCPU return from [`Vcpu::run`] from another thread.
pub trait VcpuKick: Send + Sync + Clone {
    /// Requests an exit: the vCPU's current or next `run` returns [`VmExit::Interrupted`].
    fn kick(&self);
}

/// A virtual CPU.
pub trait Vcpu: Send {
    /// The kick handle type.
    type Kick: VcpuKick;

    /// The vCPU id.
    fn id(&self) -> u32;
    /// Runs guest code until the next exit. Data the exit borrows (I/O buffers, MSR and
    /// hypercall answers) is passed to the guest on the next call.
    fn run(&mut self) -> Result<VmExit<'_>>;
    /// A handle that makes `run` return [`VmExit::Interrupted`] from another thread.
    fn kick_handle(&self) -> Self::Kick;

    /// General registers.
    fn regs(&self) -> Result<Regs>;
    /// Sets general registers.
    fn set_regs(&self, regs: &Regs) -> Result<()>;
    /// Segment, table and control registers.
    fn sregs(&self) -> Result<SpecialRegs>;
    /// Sets segment, table and control registers.
    fn set_sregs(&self, sregs: &SpecialRegs) -> Result<()>;
    /// FPU/SSE state.
    fn fpu(&self) -> Result<Fpu>;
    /// Sets FPU/SSE state.
    fn set_fpu(&self, fpu: &Fpu) -> Result<()>;
    /// The XSAVE image (x87, SSE, AVX, ...). Backends without one return
    /// [`Error::Unsupported`]; [`Fpu`] then carries the legacy part.
    fn xsave(&self) -> Result<XsaveArea> {
        Err(Error::Unsupported("XSAVE state"))
    }
    /// Sets the XSAVE image; its length must be the one [`Vcpu::xsave`] returns.
    fn set_xsave(&self, _xsave: &XsaveArea) -> Result<()> {
        Err(Error::Unsupported("XSAVE state"))
    }
    /// Extended control registers (XCR0).
    fn xcrs(&self) -> Result<Vec<Xcr>> {
        Err(Error::Unsupported("extended control registers"))
    }
    /// Sets extended control registers.
    fn set_xcrs(&self, _xcrs: &[Xcr]) -> Result<()> {
        Err(Error::Unsupported("extended control registers"))
    }
    /// Debug registers DR0-3, DR6, DR7.
    fn debug_regs(&self) -> Result<DebugRegs> {
        Err(Error::Unsupported("debug registers"))
    }
    /// Sets debug registers.
    fn set_debug_regs(&self, _regs: &DebugRegs) -> Result<()> {
        Err(Error::Unsupported("debug registers"))
    }
    /// Reads the MSRs named in `indices`; returns those the backend could read.
    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>>;
    /// Writes MSRs; fails if the backend accepted fewer than all.
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()>;
    /// The MSR indices this backend can save and restore for a vCPU.
    fn saveable_msrs(&self) -> Result<Vec<u32>>;
    /// Local APIC state (requires an in-kernel irqchip).
    fn lapic(&self) -> Result<LapicState>;
    /// Sets local APIC state.
    fn set_lapic(&self, lapic: &LapicState) -> Result<()>;
    /// Pending events.
    fn events(&self) -> Result<VcpuEvents>;
    /// Sets pending events.
    fn set_events(&self, events: &VcpuEvents) -> Result<()>;
    /// Multiprocessor state.
    fn mp_state(&self) -> Result<MpState>;
    /// Sets the multiprocessor state.
    fn set_mp_state(&self, state: MpState) -> Result<()>;
    /// Sets the CPUID leaves the guest sees.
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()>;
    /// Translates a guest-virtual address with the vCPU's current paging mode; `None` when
    /// the translation faults.
    fn translate_gva(&self, gva: u64) -> Result<Option<u64>>;
    /// Enables or disables single-stepping (each instruction then ends in a
    /// [`VmExit::Debug`]).
    fn set_single_step(&self, enable: bool) -> Result<()>;
    /// Completes an exit the VMM has answered (e.g. delivers port or MMIO read data into
    /// the guest's registers) without running further guest code, so the state read next
    /// is consistent. Call before saving a vCPU.
    fn complete_pending_exit(&mut self) -> Result<()> {
        Ok(())
    }
    /// The backend's file descriptor for the vCPU, if it has one (for polling).
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}
