#![doc = include_str!("../README.md")]
//!
//! # Crate map
//!
//! * [`hypervisor`]: the [`Hypervisor`], [`Vm`], [`Vcpu`] and [`VcpuKick`] traits.
//! * [`exit`]: the [`VmExit`] model.
//! * [`regs`]: neutral register and vCPU state types.
//! * [`kvm`]: the KVM backend.
//! * [`dispatch`]: routes exits to device buses, hypercall and MSR handlers, with counters.
//! * [`boot`]: x86 boot setup (real, protected, long mode; CPUID; kernel loading).
//! * [`state`]: versioned vCPU state save/restore.
//! * [`emulate`]: an x86 instruction emulator for MMIO accesses.

pub mod boot;
pub mod dispatch;
pub mod emulate;
pub mod exit;
pub mod hypervisor;
pub mod kvm;
pub mod regs;
pub mod state;

pub use exit::{ExitKind, Hypercall, MsrRead, MsrWrite, SystemEventKind, VmExit};
pub use hypervisor::{
    Capability, DataMatch, Error, Hypervisor, IoEventAddress, MemoryFlags, Result, Vcpu, VcpuKick,
    Vm,
};
pub use regs::{
    CpuidEntry, DebugRegs, DescriptorTable, Fpu, LapicState, MpState, MsrEntry, Regs, Segment,
    SpecialRegs, VcpuEvents, Xcr, XsaveArea,
};
