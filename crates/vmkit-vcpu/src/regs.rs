//! Backend-neutral x86-64 vCPU state: general registers, segment and control registers, FPU,
//! the XSAVE area and extended control registers, debug registers, MSRs, local APIC, pending
//! events and the multiprocessor state.
//!
//! These mirror what every x86 hypervisor interface exposes (KVM, Hyper-V/WHP, HVF all have
//! the same architectural fields) without tying callers to one backend's structs. A backend
//! converts at its boundary; [`crate::state`] saves and restores them as one versioned blob.

/// General-purpose registers, instruction pointer and flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)] // the field names are the architectural register names
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

impl Regs {
    /// The 16 general-purpose registers in encoding order (rax=0 ... r15=15).
    pub fn gpr(&self, index: usize) -> Option<u64> {
        Some(match index {
            0 => self.rax,
            1 => self.rcx,
            2 => self.rdx,
            3 => self.rbx,
            4 => self.rsp,
            5 => self.rbp,
            6 => self.rsi,
            7 => self.rdi,
            8 => self.r8,
            9 => self.r9,
            10 => self.r10,
            11 => self.r11,
            12 => self.r12,
            13 => self.r13,
            14 => self.r14,
            15 => self.r15,
            _ => return None,
        })
    }

    /// Mutable access to a general-purpose register by encoding number.
    pub fn gpr_mut(&mut self, index: usize) -> Option<&mut u64> {
        Some(match index {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            4 => &mut self.rsp,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            15 => &mut self.r15,
            _ => return None,
        })
    }
}

/// A segment register with its hidden descriptor cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type (4 bits).
    pub type_: u8,
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operand size (D/B).
    pub db: bool,
    /// Descriptor type flag (1 = code/data).
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity (limit in 4 KiB units).
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

/// A descriptor-table register (GDTR/IDTR).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, descriptor-table and control registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct SpecialRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    /// Bitmap of pending external interrupts (256 bits), as KVM reports it.
    pub interrupt_bitmap: [u64; 4],
}

/// x87/SSE state (the legacy FXSAVE area's fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Fpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl Default for Fpu {
    fn default() -> Self {
        Fpu {
            fpr: [[0; 16]; 8],
            fcw: 0x37f,
            fsw: 0,
            ftwx: 0,
            last_opcode: 0,
            last_ip: 0,
            last_dp: 0,
            xmm: [[0; 16]; 16],
            mxcsr: 0x1f80,
        }
    }
}

/// One model-specific register.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsrEntry {
    /// MSR index.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// The local APIC's 1 KiB register page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LapicState {
    /// Register page bytes, in the APIC's MMIO layout.
    pub regs: [u8; 1024],
}

impl Default for LapicState {
    fn default() -> Self {
        LapicState { regs: [0; 1024] }
    }
}

/// Pending and in-service events: exceptions, interrupts, NMIs, SMIs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct VcpuEvents {
    pub exception_injected: bool,
    pub exception_nr: u8,
    pub exception_has_error_code: bool,
    pub exception_pending: bool,
    pub exception_error_code: u32,
    pub interrupt_injected: bool,
    pub interrupt_nr: u8,
    pub interrupt_soft: bool,
    pub interrupt_shadow: u8,
    pub nmi_injected: bool,
    pub nmi_pending: bool,
    pub nmi_masked: bool,
    pub sipi_vector: u32,
    pub flags: u32,
    pub smi_smm: bool,
    pub smi_pending: bool,
    pub smi_inside_nmi: bool,
    pub smi_latched_init: u8,
    pub triple_fault_pending: bool,
    pub exception_has_payload: bool,
    pub exception_payload: u64,
}

/// Multiprocessor state of a vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MpState {
    /// Running or ready to run.
    #[default]
    Runnable,
    /// An application processor waiting for INIT.
    Uninitialized,
    /// INIT received, waiting for SIPI.
    InitReceived,
    /// Halted, waiting for an interrupt.
    Halted,
    /// SIPI received.
    SipiReceived,
    /// Another state, by the backend's raw code.
    Other(u32),
}

/// One CPUID leaf as the hypervisor reports or accepts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// Backend flags (KVM: 1 = the index is significant).
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// The processor's XSAVE-managed state (x87, SSE, AVX and whatever else XCR0 enables) as an
/// XSAVE image in the standard (non-compacted) format: the 512-byte legacy region, the
/// 64-byte XSAVE header, then each enabled component at its CPUID-given offset.
///
/// [`Fpu`] holds only the legacy part; a VMM that restores `Fpu` alone loses a guest's
/// upper YMM halves. The length is the backend's (4096 bytes for KVM without dynamically
/// enabled components such as AMX tiles).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XsaveArea {
    /// The image, little-endian as the processor writes it.
    pub bytes: Vec<u8>,
}

impl XsaveArea {
    /// Size of the legacy (FXSAVE) region at the start of the image.
    pub const LEGACY_SIZE: usize = 512;
    /// Size of the XSAVE header that follows the legacy region.
    pub const HEADER_SIZE: usize = 64;

    /// The XSTATE_BV field of the header: which components the image holds (bit 0 x87,
    /// bit 1 SSE, bit 2 AVX, ...), or `None` if the image is shorter than its header.
    pub fn xstate_bv(&self) -> Option<u64> {
        let at = Self::LEGACY_SIZE;
        let b = self.bytes.get(at..at + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
}

/// One extended control register (XCR0 is the only one x86 defines today: the XSAVE
/// feature mask the guest enabled with XSETBV).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Xcr {
    /// Register number (0 for XCR0).
    pub index: u32,
    /// Its value.
    pub value: u64,
}

/// Debug registers: the four breakpoint addresses, the status (DR6) and control (DR7).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DebugRegs {
    /// DR0-DR3: breakpoint linear addresses.
    pub db: [u64; 4],
    /// DR6: debug status.
    pub dr6: u64,
    /// DR7: debug control.
    pub dr7: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpr_encoding_order() {
        let mut r = Regs::default();
        for i in 0..16 {
            *r.gpr_mut(i).unwrap() = i as u64 + 100;
        }
        assert_eq!(r.rax, 100);
        assert_eq!(r.rcx, 101);
        assert_eq!(r.rsp, 104);
        assert_eq!(r.rdi, 107);
        assert_eq!(r.r15, 115);
        for i in 0..16 {
            assert_eq!(r.gpr(i), Some(i as u64 + 100));
        }
        assert_eq!(r.gpr(16), None);
        assert!(r.gpr_mut(16).is_none());
        assert_eq!(Fpu::default().mxcsr, 0x1f80);
        assert_eq!(LapicState::default().regs.len(), 1024);
    }

    #[test]
    fn xstate_bv_reads_the_header_or_reports_a_short_image() {
        let mut x = XsaveArea {
            bytes: vec![0; 4096],
        };
        x.bytes[512..520].copy_from_slice(&7u64.to_le_bytes());
        assert_eq!(x.xstate_bv(), Some(7));
        x.bytes.truncate(519);
        assert_eq!(x.xstate_bv(), None);
    }
}
