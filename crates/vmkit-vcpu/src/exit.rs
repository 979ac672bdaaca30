//! The backend-neutral model of why a vCPU stopped running guest code.
//!
//! [`Vcpu::run`](crate::Vcpu::run) returns a [`VmExit`]. Exits that carry data the VMM must
//! answer (port and MMIO reads, MSR reads, hypercalls) borrow the backend's exit buffer: the
//! VMM fills it in and the answer reaches the guest on the next `run`. Nothing is copied or
//! allocated per exit.
//!
//! Exits that report failures keep the backend's raw reason codes ([`VmExit::FailEntry`],
//! [`VmExit::InternalError`], [`VmExit::Unknown`]) so a VMM can log them without the backend
//! having to guess their meaning.

/// Why the guest asked to stop, for [`VmExit::SystemEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEventKind {
    /// The guest asked to power off.
    Shutdown,
    /// The guest asked to reset.
    Reset,
    /// The guest reported a crash.
    Crash,
    /// Another event, with the backend's raw type code.
    Other(u32),
}

/// A hypercall the backend forwarded to user space.
#[derive(Debug)]
pub struct Hypercall<'a> {
    /// Hypercall number (rax on x86).
    pub nr: u64,
    /// Arguments (rbx, rcx, rdx, rsi, ... on KVM x86).
    pub args: [u64; 6],
    /// The value the guest sees as the result; defaults to 0.
    pub ret: &'a mut u64,
}

/// A `rdmsr` the backend forwarded to user space.
#[derive(Debug)]
pub struct MsrRead<'a> {
    /// MSR index (ecx).
    pub index: u32,
    /// Value to return to the guest (edx:eax).
    pub data: &'a mut u64,
    /// Set to true to inject #GP instead of returning `data`.
    pub fault: &'a mut u8,
}

impl MsrRead<'_> {
    /// Answers the read with `value`.
    pub fn answer(&mut self, value: u64) {
        *self.data = value;
        *self.fault = 0;
    }

    /// Makes the read raise #GP in the guest.
    pub fn reject(&mut self) {
        *self.fault = 1;
    }
}

/// A `wrmsr` the backend forwarded to user space.
#[derive(Debug)]
pub struct MsrWrite<'a> {
    /// MSR index (ecx).
    pub index: u32,
    /// Value the guest wrote (edx:eax).
    pub value: u64,
    /// Set to 1 to inject #GP.
    pub fault: &'a mut u8,
}

impl MsrWrite<'_> {
    /// Accepts the write.
    pub fn accept(&mut self) {
        *self.fault = 0;
    }

    /// Makes the write raise #GP in the guest.
    pub fn reject(&mut self) {
        *self.fault = 1;
    }
}

/// Why a vCPU returned from [`Vcpu::run`](crate::Vcpu::run).
#[derive(Debug)]
pub enum VmExit<'a> {
    /// `in` from `port`: fill `data` (its length is the access size times the repeat count).
    IoIn {
        /// Port number.
        port: u16,
        /// Buffer to fill with the value read.
        data: &'a mut [u8],
    },
    /// `out` to `port` with `data`.
    IoOut {
        /// Port number.
        port: u16,
        /// Bytes written.
        data: &'a [u8],
    },
    /// A read from guest-physical `addr` that no memory backs: fill `data`.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Buffer to fill with the value read.
        data: &'a mut [u8],
    },
    /// A write to guest-physical `addr` that no memory backs.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Bytes written.
        data: &'a [u8],
    },
    /// The guest executed `hlt` with nothing to wake it (no in-kernel irqchip).
    Halt,
    /// The guest hit a triple fault (or another architectural shutdown).
    Shutdown,
    /// The guest asked the platform to shut down, reset or reports a crash.
    SystemEvent {
        /// What it asked for.
        kind: SystemEventKind,
    },
    /// A hypercall forwarded to user space.
    Hypercall(Hypercall<'a>),
    /// An MSR read forwarded to user space.
    MsrRead(MsrRead<'a>),
    /// An MSR write forwarded to user space.
    MsrWrite(MsrWrite<'a>),
    /// A debug event (single step, breakpoint) requested through guest debugging.
    Debug {
        /// Instruction pointer at the event.
        pc: u64,
        /// Exception vector (1 = #DB, 3 = #BP).
        exception: u32,
    },
    /// The vCPU was kicked (see [`VcpuKick`](crate::VcpuKick)) or interrupted by a signal.
    Interrupted,
    /// The hardware refused to enter the guest; `reason` is the raw hardware reason.
    FailEntry {
        /// Hardware entry failure reason (VMX exit qualification, SVM exit code...).
        reason: u64,
        /// Host CPU on which it failed.
        cpu: u32,
    },
    /// The backend hit an internal error, typically an instruction it could not emulate.
    InternalError {
        /// Backend sub-error (KVM: 1 = emulation failure, 2 = simultaneous exceptions...).
        suberror: u32,
        /// Up to four words of backend-specific detail.
        data: [u64; 4],
        /// How many words of `data` are valid.
        ndata: u32,
    },
    /// An exit this model has no variant for, with the backend's raw reason.
    Unknown {
        /// Raw exit reason.
        reason: u32,
    },
}

/// The kind of a [`VmExit`] without its data, for counters and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum ExitKind {
    /// [`VmExit::IoIn`]
    IoIn,
    /// [`VmExit::IoOut`]
    IoOut,
    /// [`VmExit::MmioRead`]
    MmioRead,
    /// [`VmExit::MmioWrite`]
    MmioWrite,
    /// [`VmExit::Halt`]
    Halt,
    /// [`VmExit::Shutdown`]
    Shutdown,
    /// [`VmExit::SystemEvent`]
    SystemEvent,
    /// [`VmExit::Hypercall`]
    Hypercall,
    /// [`VmExit::MsrRead`]
    MsrRead,
    /// [`VmExit::MsrWrite`]
    MsrWrite,
    /// [`VmExit::Debug`]
    Debug,
    /// [`VmExit::Interrupted`]
    Interrupted,
    /// [`VmExit::FailEntry`]
    FailEntry,
    /// [`VmExit::InternalError`]
    InternalError,
    /// [`VmExit::Unknown`]
    Unknown,
}

impl ExitKind {
    /// Number of kinds (for counter arrays).
    pub const COUNT: usize = 15;

    /// Every kind, in declaration order.
    pub const ALL: [ExitKind; Self::COUNT] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Halt,
        ExitKind::Shutdown,
        ExitKind::SystemEvent,
        ExitKind::Hypercall,
        ExitKind::MsrRead,
        ExitKind::MsrWrite,
        ExitKind::Debug,
        ExitKind::Interrupted,
        ExitKind::FailEntry,
        ExitKind::InternalError,
        ExitKind::Unknown,
    ];

    /// A short stable name (for metrics output).
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io_in",
            ExitKind::IoOut => "io_out",
            ExitKind::MmioRead => "mmio_read",
            ExitKind::MmioWrite => "mmio_write",
            ExitKind::Halt => "halt",
            ExitKind::Shutdown => "shutdown",
            ExitKind::SystemEvent => "system_event",
            ExitKind::Hypercall => "hypercall",
            ExitKind::MsrRead => "msr_read",
            ExitKind::MsrWrite => "msr_write",
            ExitKind::Debug => "debug",
            ExitKind::Interrupted => "interrupted",
            ExitKind::FailEntry => "fail_entry",
            ExitKind::InternalError => "internal_error",
            ExitKind::Unknown => "unknown",
        }
    }
}

impl VmExit<'_> {
    /// The kind of this exit.
    pub fn kind(&self) -> ExitKind {
        match self {
            VmExit::IoIn { .. } => ExitKind::IoIn,
            VmExit::IoOut { .. } => ExitKind::IoOut,
            VmExit::MmioRead { .. } => ExitKind::MmioRead,
            VmExit::MmioWrite { .. } => ExitKind::MmioWrite,
            VmExit::Halt => ExitKind::Halt,
            VmExit::Shutdown => ExitKind::Shutdown,
            VmExit::SystemEvent { .. } => ExitKind::SystemEvent,
            VmExit::Hypercall(_) => ExitKind::Hypercall,
            VmExit::MsrRead(_) => ExitKind::MsrRead,
            VmExit::MsrWrite(_) => ExitKind::MsrWrite,
            VmExit::Debug { .. } => ExitKind::Debug,
            VmExit::Interrupted => ExitKind::Interrupted,
            VmExit::FailEntry { .. } => ExitKind::FailEntry,
            VmExit::InternalError { .. } => ExitKind::InternalError,
            VmExit::Unknown { .. } => ExitKind::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_indexed_in_declaration_order_with_unique_names() {
        for (i, k) in ExitKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
        let mut names: Vec<_> = ExitKind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ExitKind::COUNT);
    }

    #[test]
    fn msr_exits_record_answers() {
        let (mut data, mut fault) = (0u64, 0u8);
        let mut r = MsrRead {
            index: 1,
            data: &mut data,
            fault: &mut fault,
        };
        r.answer(7);
        r.reject();
        assert_eq!((data, fault), (7, 1));
        let mut fault = 1u8;
        let mut w = MsrWrite {
            index: 1,
            value: 2,
            fault: &mut fault,
        };
        w.accept();
        assert_eq!(*w.fault, 0);
        w.reject();
        assert_eq!(fault, 1);
        let mut ret = 0;
        let e = VmExit::Hypercall(Hypercall {
            nr: 1,
            args: [0; 6],
            ret: &mut ret,
        });
        assert_eq!(e.kind(), ExitKind::Hypercall);
        assert_eq!(VmExit::Halt.kind().name(), "halt");
    }
}
