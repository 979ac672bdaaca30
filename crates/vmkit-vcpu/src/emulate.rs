//! An x86 instruction emulator for MMIO accesses (trap-and-emulate).
//!
//! Some backends, and some faults (an EPT violation on a page the VMM chose not to map, a
//! shadow-paging write trap), report only "the guest touched this address" without the
//! decoded access. The VMM then has to emulate the instruction: fetch it at RIP, decode it,
//! perform its memory accesses through the guest's page tables against RAM or devices, update
//! registers and flags, and advance RIP.
//!
//! Decoding is done by `iced-x86`. Execution covers the instructions compilers and drivers
//! use on device memory, in every operand form the decoder can express (register, memory
//! with any base/index/scale/displacement or RIP-relative, `moffs`, immediates, 8-bit high
//! registers, 16/32/64-bit address sizes, segment overrides):
//!
//! * `MOV` (all forms), `MOVZX`, `MOVSX`, `MOVSXD`
//! * `MOVS`, `STOS` and `LODS` (byte/word/dword/qword), with `REP` and the direction flag
//! * `CMPS` and `SCAS`, with `REPE`/`REPNE` ending on the compared condition
//! * `CMP`, `TEST`, `AND`, `OR`, `XOR`, `ADD`, `SUB`, `ADC`, `SBB`, `NEG`, `INC`, `DEC`
//!   with exact arithmetic flags (`INC`/`DEC` keep CF), and `NOT`
//! * `XCHG` (register with memory or register)
//!
//! Cloud Hypervisor's emulator, the reference point, implements seven instruction forms.
//!
//! Memory is reached through the [`EmulatorPlatform`] trait: GVA-to-GPA translation (for
//! example [`crate::Vcpu::translate_gva`] or a `vmkit-paging` walker) and physical reads and
//! writes (RAM through vm-memory, MMIO through the dispatcher's bus). Accesses that cross a
//! page boundary are split and translated per page.
//!
//! Guarantees on guest input: any byte sequence either emulates or returns an
//! [`EmulateError`]; nothing panics, arithmetic wraps as the CPU's does, and a `REP` with a
//! huge count stops after [`MAX_REP_ITERATIONS`] elements leaving RIP on the instruction (the
//! architectural way an interrupted string instruction resumes), so no call runs unbounded.
//! No heap allocation happens per instruction.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

use crate::regs::Regs;

/// Most string-instruction elements one call performs.
pub const MAX_REP_ITERATIONS: u64 = 4096;
/// Longest x86 instruction.
pub const MAX_INSTRUCTION_LEN: usize = 15;

const CF: u64 = 1;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const DF: u64 = 1 << 10;
const OF: u64 = 1 << 11;
const ARITH_FLAGS: u64 = CF | PF | AF | ZF | SF | OF;

/// A segment register, for segment bases outside 64-bit mode or with FS/GS overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum SegmentReg {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
}

/// Why a memory access of the platform failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The guest-virtual address does not translate (the VMM should inject #PF).
    #[error("page fault at {gva:#x} ({})", if *.write { "write" } else { "read" })]
    PageFault {
        /// Faulting address.
        gva: u64,
        /// Whether the access was a write.
        write: bool,
    },
    /// Nothing answers at this guest-physical address.
    #[error("no memory or device at {gpa:#x}")]
    Unmapped {
        /// The address.
        gpa: u64,
    },
}

/// What the emulator needs from the VMM.
pub trait EmulatorPlatform {
    /// Translates a guest-virtual (linear) address for a read or a write.
    fn translate(&mut self, gva: u64, write: bool) -> std::result::Result<u64, AccessError>;
    /// Reads guest-physical memory or a device.
    fn read(&mut self, gpa: u64, data: &mut [u8]) -> std::result::Result<(), AccessError>;
    /// Writes guest-physical memory or a device.
    fn write(&mut self, gpa: u64, data: &[u8]) -> std::result::Result<(), AccessError>;
    /// Base of a segment register (0 for all but FS/GS in 64-bit mode, which is the default).
    fn segment_base(&self, _seg: SegmentReg) -> u64 {
        0
    }
}

/// Errors of emulation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmulateError {
    /// The bytes are not a valid (or complete) instruction.
    #[error("cannot decode an instruction from {len} bytes at {rip:#x}")]
    Decode {
        /// Bytes available.
        len: usize,
        /// Instruction pointer.
        rip: u64,
    },
    /// The instruction is valid but not emulated.
    #[error("instruction {0:?} is not emulated")]
    Unsupported(Mnemonic),
    /// An operand form the emulator does not handle (e.g. a segment register operand).
    #[error("unsupported operand {operand} of {mnemonic:?}")]
    UnsupportedOperand {
        /// The instruction.
        mnemonic: Mnemonic,
        /// Operand index.
        operand: u32,
    },
    /// The mode's bitness is not 16, 32 or 64.
    #[error("invalid execution mode: {0}-bit")]
    InvalidMode(u32),
    /// A memory access failed.
    #[error(transparent)]
    Access(#[from] AccessError),
}

/// Result type of emulation.
pub type Result<T> = std::result::Result<T, EmulateError>;

/// What an emulation step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Emulated {
    /// The instruction's mnemonic.
    pub mnemonic: Mnemonic,
    /// Its length in bytes.
    pub len: usize,
    /// False when a `REP` instruction stopped early (RIP still points at it).
    pub complete: bool,
}

fn mask(size: usize) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

fn sign_bit(size: usize) -> u64 {
    match size {
        1 => 0x80,
        2 => 0x8000,
        4 => 0x8000_0000,
        _ => 1 << 63,
    }
}

fn sign_extend(v: u64, size: usize) -> u64 {
    match size {
        1 => v as u8 as i8 as i64 as u64,
        2 => v as u16 as i16 as i64 as u64,
        4 => v as u32 as i32 as i64 as u64,
        _ => v,
    }
}

fn szp(r: u64, size: usize) -> u64 {
    let mut f = 0;
    if r & mask(size) == 0 {
        f |= ZF;
    }
    if r & sign_bit(size) != 0 {
        f |= SF;
    }
    if (r as u8).count_ones() % 2 == 0 {
        f |= PF;
    }
    f
}

/// Result and flags of `a - b` at `size` bytes (CMP, SUB).
pub fn sub_flags(a: u64, b: u64, size: usize) -> (u64, u64) {
    sbb_flags(a, b, false, size)
}

/// Result and flags of `a + b` at `size` bytes (ADD).
pub fn add_flags(a: u64, b: u64, size: usize) -> (u64, u64) {
    adc_flags(a, b, false, size)
}

/// Result and flags of `a + b + carry` at `size` bytes (ADC).
pub fn adc_flags(a: u64, b: u64, carry: bool, size: usize) -> (u64, u64) {
    let (a, b) = (a & mask(size), b & mask(size));
    let wide = u128::from(a) + u128::from(b) + u128::from(carry);
    let r = wide as u64 & mask(size);
    let mut f = szp(r, size);
    if wide > u128::from(mask(size)) {
        f |= CF;
    }
    if !(a ^ b) & (a ^ r) & sign_bit(size) != 0 {
        f |= OF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= AF;
    }
    (r, f)
}

/// Result and flags of `a - b - borrow` at `size` bytes (SBB).
pub fn sbb_flags(a: u64, b: u64, borrow: bool, size: usize) -> (u64, u64) {
    let (a, b) = (a & mask(size), b & mask(size));
    let r = a.wrapping_sub(b).wrapping_sub(u64::from(borrow)) & mask(size);
    let mut f = szp(r, size);
    if u128::from(a) < u128::from(b) + u128::from(borrow) {
        f |= CF;
    }
    if (a ^ b) & (a ^ r) & sign_bit(size) != 0 {
        f |= OF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= AF;
    }
    (r, f)
}

/// Flags of a logic result (AND, OR, XOR, TEST): CF = OF = 0, AF cleared (undefined).
pub fn logic_flags(r: u64, size: usize) -> u64 {
    szp(r, size)
}

/// The string instructions the emulator executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StringOp {
    Movs,
    Stos,
    Lods,
    Cmps,
    Scas,
}

struct Ctx<'a, P: EmulatorPlatform + ?Sized> {
    ins: &'a Instruction,
    regs: &'a mut Regs,
    p: &'a mut P,
    bitness: u32,
}

fn gpr_index(reg: Register) -> Option<usize> {
    let full = reg.full_register();
    let base = Register::RAX as usize;
    let idx = (full as usize).checked_sub(base)?;
    (idx < 16).then_some(idx)
}

fn is_high_byte(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    )
}

impl<P: EmulatorPlatform + ?Sized> Ctx<'_, P> {
    fn unsupported_operand(&self, operand: u32) -> EmulateError {
        EmulateError::UnsupportedOperand {
            mnemonic: self.ins.mnemonic(),
            operand,
        }
    }

    fn read_reg(&self, reg: Register) -> Option<u64> {
        let v = self.regs.gpr(gpr_index(reg)?)?;
        Some(if is_high_byte(reg) {
            (v >> 8) & 0xff
        } else {
            v & mask(reg.size())
        })
    }

    fn write_reg(&mut self, reg: Register, value: u64) -> Option<()> {
        let size = reg.size();
        let slot = self.regs.gpr_mut(gpr_index(reg)?)?;
        *slot = if is_high_byte(reg) {
            (*slot & !0xff00) | ((value & 0xff) << 8)
        } else if size >= 4 {
            // 32-bit writes zero-extend to 64 bits.
            value & mask(size)
        } else {
            (*slot & !mask(size)) | (value & mask(size))
        };
        Some(())
    }

    fn seg_base(&self, reg: Register) -> Option<u64> {
        let seg = match reg {
            Register::ES => SegmentReg::Es,
            Register::CS => SegmentReg::Cs,
            Register::SS => SegmentReg::Ss,
            Register::DS => SegmentReg::Ds,
            Register::FS => SegmentReg::Fs,
            Register::GS => SegmentReg::Gs,
            _ => return None,
        };
        if self.bitness == 64 && !matches!(seg, SegmentReg::Fs | SegmentReg::Gs) {
            return Some(0);
        }
        Some(self.p.segment_base(seg))
    }

    fn linear(&self, operand: u32) -> Result<u64> {
        let regs = &*self.regs;
        let va = self.ins.virtual_address(operand, 0, |reg, _, _| {
            if reg.is_segment_register() {
                self.seg_base(reg)
            } else if reg == Register::RIP || reg == Register::EIP {
                Some(self.ins.next_ip())
            } else {
                let idx = gpr_index(reg)?;
                let v = regs.gpr(idx)?;
                Some(if is_high_byte(reg) {
                    (v >> 8) & 0xff
                } else {
                    v & mask(reg.size())
                })
            }
        });
        let va = va.ok_or_else(|| self.unsupported_operand(operand))?;
        Ok(if self.bitness == 64 {
            va
        } else {
            va & 0xffff_ffff
        })
    }

    fn access(&mut self, gva: u64, buf: &mut [u8], write: bool) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let va = gva.wrapping_add(done as u64);
            let in_page = (0x1000 - (va & 0xfff)) as usize;
            let chunk = in_page.min(buf.len() - done);
            let gpa = self.p.translate(va, write)?;
            let part = &mut buf[done..done + chunk];
            if write {
                self.p.write(gpa, part)?;
            } else {
                self.p.read(gpa, part)?;
            }
            done += chunk;
        }
        Ok(())
    }

    fn read_mem(&mut self, gva: u64, size: usize) -> Result<u64> {
        let mut b = [0u8; 8];
        let n = size.min(8);
        self.access(gva, &mut b[..n], false)?;
        Ok(u64::from_le_bytes(b))
    }

    fn write_mem(&mut self, gva: u64, size: usize, value: u64) -> Result<()> {
        let mut b = value.to_le_bytes();
        let n = size.min(8);
        self.access(gva, &mut b[..n], true)
    }

    fn is_memory(kind: OpKind) -> bool {
        matches!(
            kind,
            OpKind::Memory
                | OpKind::MemorySegSI
                | OpKind::MemorySegESI
                | OpKind::MemorySegRSI
                | OpKind::MemorySegDI
                | OpKind::MemorySegEDI
                | OpKind::MemorySegRDI
                | OpKind::MemoryESDI
                | OpKind::MemoryESEDI
                | OpKind::MemoryESRDI
        )
    }

    fn op_size(&self, operand: u32) -> Result<usize> {
        let kind = self.ins.op_kind(operand);
        let size = if kind == OpKind::Register {
            self.ins.op_register(operand).size()
        } else if Self::is_memory(kind) {
            self.ins.memory_size().size()
        } else {
            return Err(self.unsupported_operand(operand));
        };
        if matches!(size, 1 | 2 | 4 | 8) {
            Ok(size)
        } else {
            Err(self.unsupported_operand(operand))
        }
    }

    fn read_op(&mut self, operand: u32, size: usize) -> Result<u64> {
        match self.ins.op_kind(operand) {
            OpKind::Register => {
                let reg = self.ins.op_register(operand);
                self.read_reg(reg)
                    .ok_or_else(|| self.unsupported_operand(operand))
            }
            k if Self::is_memory(k) => {
                let va = self.linear(operand)?;
                self.read_mem(va, size)
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => Ok(self.ins.immediate(operand) & mask(size)),
            _ => Err(self.unsupported_operand(operand)),
        }
    }

    fn write_op(&mut self, operand: u32, size: usize, value: u64) -> Result<()> {
        match self.ins.op_kind(operand) {
            OpKind::Register => {
                let reg = self.ins.op_register(operand);
                self.write_reg(reg, value)
                    .ok_or_else(|| self.unsupported_operand(operand))
            }
            k if Self::is_memory(k) => {
                let va = self.linear(operand)?;
                self.write_mem(va, size, value)
            }
            _ => Err(self.unsupported_operand(operand)),
        }
    }

    fn set_flags(&mut self, flags: u64) {
        self.regs.rflags = (self.regs.rflags & !ARITH_FLAGS) | flags;
    }

    /// The address-size register of a string operand: (register, size in bytes).
    fn string_regs(kind: OpKind) -> Option<(Register, Register, Register, usize)> {
        Some(match kind {
            OpKind::MemorySegSI | OpKind::MemorySegDI | OpKind::MemoryESDI => {
                (Register::SI, Register::DI, Register::CX, 2)
            }
            OpKind::MemorySegESI | OpKind::MemorySegEDI | OpKind::MemoryESEDI => {
                (Register::ESI, Register::EDI, Register::ECX, 4)
            }
            OpKind::MemorySegRSI | OpKind::MemorySegRDI | OpKind::MemoryESRDI => {
                (Register::RSI, Register::RDI, Register::RCX, 8)
            }
            _ => return None,
        })
    }

    /// A string instruction. Returns whether it completed (a `REP` may stop early, see
    /// [`MAX_REP_ITERATIONS`]).
    fn string(&mut self, op: StringOp) -> Result<bool> {
        // The string operand that names the address size: the destination of MOVS/STOS/
        // SCAS ([rdi]) and the source of LODS/CMPS ([rsi]) are both found by `string_regs`.
        let mem_operand = match op {
            StringOp::Lods | StringOp::Scas => 1,
            _ => 0,
        };
        let (si, di, cx, _) = Self::string_regs(self.ins.op_kind(mem_operand))
            .ok_or_else(|| self.unsupported_operand(mem_operand))?;
        let size = self.ins.memory_size().size();
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(self.unsupported_operand(mem_operand));
        }
        let repe = self.ins.has_rep_prefix() || self.ins.has_repe_prefix();
        let repne = self.ins.has_repne_prefix();
        // MOVS/STOS/LODS repeat under either prefix; CMPS/SCAS stop on the condition.
        let rep = repe || repne;
        let step = if self.regs.rflags & DF != 0 {
            (size as u64).wrapping_neg()
        } else {
            size as u64
        };
        let value_reg = match size {
            1 => Register::AL,
            2 => Register::AX,
            4 => Register::EAX,
            _ => Register::RAX,
        };
        let (uses_si, uses_di) = match op {
            StringOp::Movs | StringOp::Cmps => (true, true),
            StringOp::Stos | StringOp::Scas => (false, true),
            StringOp::Lods => (true, false),
        };
        let mut done = 0u64;
        loop {
            let count = self.read_reg(cx).unwrap_or(0);
            if rep && count == 0 {
                return Ok(true);
            }
            if rep && done == MAX_REP_ITERATIONS {
                return Ok(false);
            }
            match op {
                StringOp::Movs => {
                    let v = self.read_mem(self.linear(1)?, size)?;
                    self.write_mem(self.linear(0)?, size, v)?;
                }
                StringOp::Stos => {
                    let v = self.read_reg(value_reg).unwrap_or(0);
                    self.write_mem(self.linear(0)?, size, v)?;
                }
                StringOp::Lods => {
                    let v = self.read_mem(self.linear(1)?, size)?;
                    self.write_op(0, size, v)?;
                }
                StringOp::Cmps => {
                    // [rsi] - [es:rdi]: the source is operand 0.
                    let a = self.read_mem(self.linear(0)?, size)?;
                    let b = self.read_mem(self.linear(1)?, size)?;
                    self.set_flags(sub_flags(a, b, size).1);
                }
                StringOp::Scas => {
                    let a = self.read_reg(value_reg).unwrap_or(0);
                    let b = self.read_mem(self.linear(1)?, size)?;
                    self.set_flags(sub_flags(a, b, size).1);
                }
            }
            if uses_di {
                let d = self.read_reg(di).unwrap_or(0).wrapping_add(step);
                self.write_reg(di, d);
            }
            if uses_si {
                let s = self.read_reg(si).unwrap_or(0).wrapping_add(step);
                self.write_reg(si, s);
            }
            done += 1;
            if !rep {
                return Ok(true);
            }
            self.write_reg(cx, count.wrapping_sub(1));
            if matches!(op, StringOp::Cmps | StringOp::Scas) {
                let zf = self.regs.rflags & ZF != 0;
                // REPE continues while equal, REPNE while not equal.
                if (repne && zf) || (!repne && !zf) {
                    return Ok(true);
                }
            }
        }
    }

    fn execute(&mut self) -> Result<bool> {
        use Mnemonic::*;
        let m = self.ins.mnemonic();
        match m {
            Mov => {
                let size = self.op_size(0)?;
                let v = self.read_op(1, size)?;
                self.write_op(0, size, v)?;
            }
            Movzx | Movsx | Movsxd => {
                let (dsize, ssize) = (self.op_size(0)?, self.op_size(1)?);
                let v = self.read_op(1, ssize)?;
                let v = if m == Movzx { v } else { sign_extend(v, ssize) };
                self.write_op(0, dsize, v & mask(dsize))?;
            }
            Cmp | Sub | Add | Adc | Sbb => {
                let size = self.op_size(0)?;
                let a = self.read_op(0, size)?;
                let b = self.read_op(1, size)?;
                // ADC and SBB take CF in; the others behave as if it were clear.
                let carry = matches!(m, Adc | Sbb) && self.regs.rflags & CF != 0;
                let (r, f) = if matches!(m, Add | Adc) {
                    adc_flags(a, b, carry, size)
                } else {
                    sbb_flags(a, b, carry, size)
                };
                if m != Cmp {
                    self.write_op(0, size, r)?;
                }
                self.set_flags(f);
            }
            And | Or | Xor | Test => {
                let size = self.op_size(0)?;
                let a = self.read_op(0, size)?;
                let b = self.read_op(1, size)?;
                let r = match m {
                    Or => a | b,
                    Xor => a ^ b,
                    _ => a & b,
                } & mask(size);
                if m != Test {
                    self.write_op(0, size, r)?;
                }
                self.set_flags(logic_flags(r, size));
            }
            Xchg => {
                let size = self.op_size(0)?;
                let a = self.read_op(0, size)?;
                let b = self.read_op(1, size)?;
                self.write_op(0, size, b)?;
                self.write_op(1, size, a)?;
            }
            Inc | Dec => {
                let size = self.op_size(0)?;
                let a = self.read_op(0, size)?;
                let (r, f) = if m == Inc {
                    add_flags(a, 1, size)
                } else {
                    sub_flags(a, 1, size)
                };
                self.write_op(0, size, r)?;
                // INC and DEC leave CF alone.
                self.set_flags((f & !CF) | (self.regs.rflags & CF));
            }
            Neg => {
                let size = self.op_size(0)?;
                let a = self.read_op(0, size)?;
                let (r, f) = sub_flags(0, a, size);
                self.write_op(0, size, r)?;
                self.set_flags(f);
            }
            Not => {
                let size = self.op_size(0)?;
                let a = self.read_op(0, size)?;
                self.write_op(0, size, !a & mask(size))?;
            }
            Movsb | Movsw | Movsd | Movsq if Self::string_regs(self.ins.op_kind(0)).is_some() => {
                return self.string(StringOp::Movs);
            }
            Cmpsb | Cmpsw | Cmpsd | Cmpsq if Self::string_regs(self.ins.op_kind(0)).is_some() => {
                return self.string(StringOp::Cmps);
            }
            Stosb | Stosw | Stosd | Stosq => return self.string(StringOp::Stos),
            Lodsb | Lodsw | Lodsd | Lodsq => return self.string(StringOp::Lods),
            Scasb | Scasw | Scasd | Scasq => return self.string(StringOp::Scas),
            other => return Err(EmulateError::Unsupported(other)),
        }
        Ok(true)
    }
}

/// Decodes the instruction at the start of `code` (fetched at `regs.rip`) and executes it in
/// a `bitness`-bit code segment (16, 32 or 64), updating `regs` (RIP included) and memory.
pub fn emulate<P: EmulatorPlatform + ?Sized>(
    bitness: u32,
    code: &[u8],
    regs: &mut Regs,
    platform: &mut P,
) -> Result<Emulated> {
    if !matches!(bitness, 16 | 32 | 64) {
        return Err(EmulateError::InvalidMode(bitness));
    }
    let code = code.get(..MAX_INSTRUCTION_LEN).unwrap_or(code);
    let mut decoder = Decoder::with_ip(bitness, code, regs.rip, DecoderOptions::NONE);
    let ins = decoder.decode();
    if ins.is_invalid() {
        return Err(EmulateError::Decode {
            len: code.len(),
            rip: regs.rip,
        });
    }
    let mut cx = Ctx {
        ins: &ins,
        regs,
        p: platform,
        bitness,
    };
    let complete = cx.execute()?;
    if complete {
        regs.rip = match bitness {
            64 => ins.next_ip(),
            32 => ins.next_ip() & 0xffff_ffff,
            _ => ins.next_ip() & 0xffff,
        };
    }
    Ok(Emulated {
        mnemonic: ins.mnemonic(),
        len: ins.len(),
        complete,
    })
}

/// Fetches the instruction at RIP through the platform (code-segment base `cs_base`, which
/// is 0 in 64-bit mode) and emulates it.
pub fn emulate_at_rip<P: EmulatorPlatform + ?Sized>(
    bitness: u32,
    cs_base: u64,
    regs: &mut Regs,
    platform: &mut P,
) -> Result<Emulated> {
    let mut code = [0u8; MAX_INSTRUCTION_LEN];
    let start = cs_base.wrapping_add(regs.rip);
    let first = ((0x1000 - (start & 0xfff)) as usize).min(MAX_INSTRUCTION_LEN);
    let gpa = platform.translate(start, false)?;
    platform.read(gpa, &mut code[..first])?;
    let mut len = first;
    if first < MAX_INSTRUCTION_LEN {
        // The rest may be on an unmapped page; a short instruction does not need it.
        let next = start.wrapping_add(first as u64);
        if let Ok(gpa) = platform.translate(next, false) {
            if platform.read(gpa, &mut code[first..]).is_ok() {
                len = MAX_INSTRUCTION_LEN;
            }
        }
    }
    emulate(bitness, &code[..len], regs, platform)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RAM: usize = 0x10000;
    const MMIO: u64 = 0xd000_0000;

    /// RAM at 0..64 KiB, a device at MMIO (reads return address-derived bytes, writes are
    /// logged), identity translation except page 0x5000 -> 0x9000 and a faulting page 0x7000.
    struct Mock {
        ram: Vec<u8>,
        writes: Vec<(u64, Vec<u8>)>,
        fs_base: u64,
    }

    impl Mock {
        fn new() -> Self {
            Mock {
                ram: vec![0; RAM],
                writes: Vec::new(),
                fs_base: 0,
            }
        }
        fn put(&mut self, gpa: u64, bytes: &[u8]) {
            self.ram[gpa as usize..gpa as usize + bytes.len()].copy_from_slice(bytes);
        }
        fn get(&self, gpa: u64, n: usize) -> &[u8] {
            &self.ram[gpa as usize..gpa as usize + n]
        }
    }

    impl EmulatorPlatform for Mock {
        fn translate(&mut self, gva: u64, write: bool) -> std::result::Result<u64, AccessError> {
            match gva & !0xfff {
                0x7000 => Err(AccessError::PageFault { gva, write }),
                0x5000 => Ok(0x9000 | (gva & 0xfff)),
                p if p >= 1 << 40 => Err(AccessError::PageFault { gva, write }),
                _ => Ok(gva),
            }
        }
        fn read(&mut self, gpa: u64, data: &mut [u8]) -> std::result::Result<(), AccessError> {
            if gpa >= MMIO {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = (gpa as u8).wrapping_add(i as u8) ^ 0x5a;
                }
                return Ok(());
            }
            let s = self
                .ram
                .get(gpa as usize..gpa as usize + data.len())
                .ok_or(AccessError::Unmapped { gpa })?;
            data.copy_from_slice(s);
            Ok(())
        }
        fn write(&mut self, gpa: u64, data: &[u8]) -> std::result::Result<(), AccessError> {
            if gpa >= MMIO {
                self.writes.push((gpa, data.to_vec()));
                return Ok(());
            }
            let s = self
                .ram
                .get_mut(gpa as usize..gpa as usize + data.len())
                .ok_or(AccessError::Unmapped { gpa })?;
            s.copy_from_slice(data);
            Ok(())
        }
        fn segment_base(&self, seg: SegmentReg) -> u64 {
            if seg == SegmentReg::Fs {
                self.fs_base
            } else {
                0
            }
        }
    }

    fn mmio_byte(gpa: u64, i: usize) -> u8 {
        (gpa as u8).wrapping_add(i as u8) ^ 0x5a
    }

    fn mmio_val(gpa: u64, size: usize) -> u64 {
        (0..size).fold(0, |v, i| v | u64::from(mmio_byte(gpa, i)) << (8 * i))
    }

    fn regs() -> Regs {
        Regs {
            rip: 0x1000,
            rflags: 2,
            rax: MMIO,
            rbx: 0x1122_3344_5566_7788,
            ..Default::default()
        }
    }

    fn run(code: &[u8], r: &mut Regs, m: &mut Mock) -> Emulated {
        let e = emulate(64, code, r, m).unwrap();
        assert_eq!(e.len, code.len(), "{code:x?}");
        e
    }

    #[test]
    fn mov_to_and_from_mmio_in_every_width() {
        let (mut r, mut m) = (regs(), Mock::new());
        run(&[0x89, 0x18], &mut r, &mut m); // mov [rax], ebx
        run(&[0x48, 0x89, 0x18], &mut r, &mut m); // mov [rax], rbx
        run(&[0x66, 0x89, 0x18], &mut r, &mut m); // mov [rax], bx
        run(&[0x88, 0x38], &mut r, &mut m); // mov [rax], bh
        run(&[0x40, 0x88, 0x20], &mut r, &mut m); // mov [rax], spl (REX)
        assert_eq!(
            m.writes,
            vec![
                (MMIO, vec![0x88, 0x77, 0x66, 0x55]),
                (MMIO, 0x1122_3344_5566_7788u64.to_le_bytes().to_vec()),
                (MMIO, vec![0x88, 0x77]),
                (MMIO, vec![0x77]),
                (MMIO, vec![0]),
            ]
        );
        assert_eq!(r.rip, 0x1000 + 2 + 3 + 3 + 2 + 3);
        r.rcx = u64::MAX;
        run(&[0x8b, 0x08], &mut r, &mut m); // mov ecx, [rax] (zero-extends)
        assert_eq!(r.rcx, mmio_val(MMIO, 4));
        r.rcx = u64::MAX;
        run(&[0x66, 0x8b, 0x08], &mut r, &mut m); // mov cx, [rax] (merges)
        assert_eq!(r.rcx, 0xffff_ffff_ffff_0000 | mmio_val(MMIO, 2));
        run(&[0x8a, 0x20], &mut r, &mut m); // mov ah, [rax]
        assert_eq!((r.rax >> 8) & 0xff, mmio_val(MMIO, 1));
        let mut r = regs();
        run(&[0x4c, 0x8b, 0x00], &mut r, &mut m); // mov r8, [rax]
        assert_eq!(r.r8, mmio_val(MMIO, 8));
    }

    #[test]
    fn mov_addressing_forms() {
        let (mut r, mut m) = (regs(), Mock::new());
        r.rcx = 2;
        r.rdx = 0xbeef;
        run(&[0x66, 0x89, 0x54, 0x88, 0x08], &mut r, &mut m); // mov [rax+rcx*4+8], dx
        assert_eq!(m.writes.pop(), Some((MMIO + 16, vec![0xef, 0xbe])));
        // mov eax, [rip+0x10]: RIP-relative, relative to the next instruction.
        m.put(0x101b, &0xcafe_f00du32.to_le_bytes()); // rip 0x1005 + 6 + 0x10
        run(&[0x8b, 0x05, 0x10, 0, 0, 0], &mut r, &mut m);
        assert_eq!(r.rax, 0xcafe_f00d);
        // mov al, [moffs64]; mov [moffs64], rax
        let mut code = vec![0xa0];
        code.extend_from_slice(&(MMIO + 3).to_le_bytes());
        run(&code, &mut r, &mut m);
        assert_eq!(r.rax & 0xff, mmio_val(MMIO + 3, 1));
        let mut code = vec![0x48, 0xa3];
        code.extend_from_slice(&(MMIO + 8).to_le_bytes());
        run(&code, &mut r, &mut m);
        assert_eq!(
            m.writes.pop(),
            Some((MMIO + 8, r.rax.to_le_bytes().to_vec()))
        );
        // mov byte [rax], imm8; mov qword [rax], imm32 (sign-extended)
        r.rax = MMIO;
        run(&[0xc6, 0x00, 0x12], &mut r, &mut m);
        run(&[0x48, 0xc7, 0x00, 0xff, 0xff, 0xff, 0xff], &mut r, &mut m);
        assert_eq!(m.writes, vec![(MMIO, vec![0x12]), (MMIO, vec![0xff; 8])]);
        // mov register, register and register, immediate (no memory at all)
        run(&[0x48, 0x89, 0xd9], &mut r, &mut m); // mov rcx, rbx
        assert_eq!(r.rcx, r.rbx);
        run(&[0xb9, 0x78, 0x56, 0x34, 0x12], &mut r, &mut m); // mov ecx, 0x12345678
        assert_eq!(r.rcx, 0x1234_5678);
        // FS override uses the platform's FS base.
        m.fs_base = 0x2000;
        r.rcx = 0x10;
        run(&[0x64, 0x89, 0x19], &mut r, &mut m); // mov fs:[rcx], ebx
        assert_eq!(m.get(0x2010, 4), &0x5566_7788u32.to_le_bytes());
    }

    #[test]
    fn movzx_movsx_movsxd() {
        let (mut r, mut m) = (regs(), Mock::new());
        m.put(0x3000, &[0x80, 0xff, 0xfe, 0xff, 0xff, 0x80]);
        r.rbx = 0x3000;
        r.rax = u64::MAX;
        run(&[0x0f, 0xb6, 0x03], &mut r, &mut m); // movzx eax, byte [rbx]
        assert_eq!(r.rax, 0x80);
        run(&[0x0f, 0xb7, 0x0b], &mut r, &mut m); // movzx ecx, word [rbx]
        assert_eq!(r.rcx, 0xff80);
        run(&[0x48, 0x0f, 0xbe, 0x03], &mut r, &mut m); // movsx rax, byte [rbx]
        assert_eq!(r.rax, 0xffff_ffff_ffff_ff80);
        run(&[0x66, 0x0f, 0xbe, 0x03], &mut r, &mut m); // movsx ax, byte [rbx]
        assert_eq!(r.rax & 0xffff, 0xff80);
        run(&[0x48, 0x63, 0x43, 0x01], &mut r, &mut m); // movsxd rax, dword [rbx+1]
        assert_eq!(r.rax, 0xffff_ffff_ffff_feff);
        run(&[0x48, 0x0f, 0xbf, 0x43, 0x04], &mut r, &mut m); // movsx rax, word [rbx+4]
        assert_eq!(r.rax, 0xffff_ffff_ffff_80ff);
    }

    #[test]
    fn movs_and_stos_with_rep_and_direction() {
        let (mut r, mut m) = (regs(), Mock::new());
        m.put(0x3000, b"abcdefgh");
        r.rsi = 0x3000;
        r.rdi = MMIO;
        r.rcx = 4;
        run(&[0xf3, 0xa4], &mut r, &mut m); // rep movsb
        assert_eq!(m.writes.len(), 4);
        assert_eq!(m.writes[3], (MMIO + 3, vec![b'd']));
        assert_eq!((r.rcx, r.rsi, r.rdi), (0, 0x3004, MMIO + 4));
        // MMIO to RAM, backwards, qwords.
        r.rflags |= DF;
        r.rsi = MMIO + 8;
        r.rdi = 0x4008;
        run(&[0x48, 0xa5], &mut r, &mut m); // movsq
        assert_eq!(m.get(0x4008, 8), &mmio_val(MMIO + 8, 8).to_le_bytes());
        assert_eq!((r.rsi, r.rdi), (MMIO, 0x4000));
        r.rflags &= !DF;
        r.rax = 0xdead_beef;
        r.rdi = 0x4100;
        r.rcx = 3;
        run(&[0xf3, 0xab], &mut r, &mut m); // rep stosd
        assert_eq!(m.get(0x4100, 12), &[0xef, 0xbe, 0xad, 0xde].repeat(3)[..]);
        run(&[0xaa], &mut r, &mut m); // stosb, no rep
        assert_eq!(m.get(0x410c, 1), &[0xef]);
        run(&[0x66, 0xab], &mut r, &mut m); // stosw
        run(&[0x48, 0xab], &mut r, &mut m); // stosq
        assert_eq!(r.rdi, 0x410c + 1 + 2 + 8);
        // rep with rcx = 0 does nothing but advance.
        r.rcx = 0;
        let rip = r.rip;
        run(&[0xf3, 0xa4], &mut r, &mut m);
        assert_eq!(r.rip, rip + 2);
        // 32-bit address size: esi/edi/ecx.
        r.rsi = 0xffff_ffff_0000_3000;
        r.rdi = 0xffff_ffff_0000_4200;
        r.rcx = 0xffff_ffff_0000_0002;
        run(&[0x67, 0xf3, 0xa4], &mut r, &mut m);
        assert_eq!(m.get(0x4200, 2), b"ab");
        assert_eq!(r.rcx & 0xffff_ffff, 0);
    }

    #[test]
    fn huge_rep_counts_stop_and_resume() {
        let (mut r, mut m) = (regs(), Mock::new());
        r.rdi = 0x2000;
        r.rcx = u64::MAX;
        let rip = r.rip;
        let e = emulate(64, &[0xf3, 0xaa], &mut r, &mut m).unwrap();
        assert!(!e.complete);
        assert_eq!(r.rip, rip, "RIP stays on an unfinished string instruction");
        assert_eq!(r.rcx, u64::MAX - MAX_REP_ITERATIONS);
        assert_eq!(r.rdi, 0x2000 + MAX_REP_ITERATIONS);
    }

    #[test]
    fn cmp_test_logic_and_arithmetic_update_flags_and_memory() {
        let (mut r, mut m) = (regs(), Mock::new());
        m.put(0x3000, &5u32.to_le_bytes());
        r.rax = 0x3000;
        r.rbx = 5;
        run(&[0x39, 0x18], &mut r, &mut m); // cmp [rax], ebx
        assert_eq!(r.rflags & (ZF | CF), ZF);
        r.rbx = 6;
        run(&[0x39, 0x18], &mut r, &mut m);
        assert_eq!(r.rflags & (ZF | CF | SF), CF | SF);
        run(&[0x83, 0x38, 0x05], &mut r, &mut m); // cmp dword [rax], 5
        assert_ne!(r.rflags & ZF, 0);
        run(&[0x81, 0x20, 0x04, 0, 0, 0], &mut r, &mut m); // and dword [rax], 4
        assert_eq!(m.get(0x3000, 4), &4u32.to_le_bytes());
        run(&[0x83, 0x08, 0x03], &mut r, &mut m); // or dword [rax], 3
        assert_eq!(m.get(0x3000, 4), &7u32.to_le_bytes());
        r.rcx = 7;
        run(&[0x31, 0x08], &mut r, &mut m); // xor [rax], ecx
        assert_eq!(m.get(0x3000, 4), &0u32.to_le_bytes());
        assert_ne!(r.rflags & ZF, 0);
        run(&[0xf6, 0x00, 0x01], &mut r, &mut m); // test byte [rax], 1
        assert_ne!(r.rflags & ZF, 0);
        run(&[0x01, 0x18], &mut r, &mut m); // add [rax], ebx
        run(&[0x29, 0x18], &mut r, &mut m); // sub [rax], ebx
        assert_eq!(m.get(0x3000, 4), &0u32.to_le_bytes());
        run(&[0x85, 0xdb], &mut r, &mut m); // test ebx, ebx
        assert_eq!(r.rflags & ZF, 0);
        // Reading a register operand after the memory one: cmp ebx, [rax]
        run(&[0x3b, 0x18], &mut r, &mut m);
        assert_eq!(r.rflags & (ZF | CF), 0);
        // MMIO operand: and eax, [mmio] reads the device.
        r.rax = u64::MAX;
        r.rdx = MMIO;
        run(&[0x23, 0x02], &mut r, &mut m);
        assert_eq!(r.rax, mmio_val(MMIO, 4));
    }

    #[test]
    fn lods_cmps_and_scas_with_rep_conditions() {
        let (mut r, mut m) = (regs(), Mock::new());
        // lodsb from a device, then rep lodsd leaves the last dword in eax.
        r.rsi = MMIO;
        r.rax = u64::MAX;
        run(&[0xac], &mut r, &mut m); // lodsb
        assert_eq!(r.rax, !0xff | u64::from(mmio_byte(MMIO, 0)));
        assert_eq!(r.rsi, MMIO + 1);
        m.put(0x3000, &[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]);
        r.rsi = 0x3000;
        r.rcx = 3;
        run(&[0xf3, 0xad], &mut r, &mut m); // rep lodsd
        assert_eq!(
            (r.rax, r.rcx, r.rsi),
            (3, 0, 0x300c),
            "32-bit load zero-extends"
        );
        // repe cmpsb stops at the first difference, after comparing it.
        m.put(0x4000, b"abcXefgh");
        m.put(0x6000, b"abcdefgh");
        r.rsi = 0x4000;
        r.rdi = 0x6000;
        r.rcx = 8;
        run(&[0xf3, 0xa6], &mut r, &mut m);
        assert_eq!((r.rcx, r.rsi, r.rdi), (4, 0x4004, 0x6004));
        assert_eq!(r.rflags & ZF, 0);
        assert_ne!(
            r.rflags & CF,
            0,
            "the flags are those of 'X' - 'd', which borrows"
        );
        // Equal buffers run to the count with ZF set.
        r.rsi = 0x6000;
        r.rdi = 0x6000;
        r.rcx = 8;
        run(&[0xf3, 0x48, 0xa7], &mut r, &mut m); // repe cmpsq
        assert_eq!((r.rcx, r.rsi), (0, 0x6000 + 64));
        assert_ne!(r.rflags & ZF, 0);
        // repne scasb finds a byte: stops on it with ZF set.
        r.rax = u64::from(b'e');
        r.rdi = 0x6000;
        r.rcx = 100;
        run(&[0xf2, 0xae], &mut r, &mut m);
        assert_eq!((r.rcx, r.rdi), (95, 0x6005));
        assert_ne!(r.rflags & ZF, 0);
        // Not found: runs out the count with ZF clear.
        r.rax = u64::from(b'z');
        r.rdi = 0x6000;
        r.rcx = 8;
        run(&[0xf2, 0xae], &mut r, &mut m);
        assert_eq!((r.rcx, r.rdi), (0, 0x6008));
        assert_eq!(r.rflags & ZF, 0);
        // scasw backwards, no prefix: one compare.
        r.rflags |= DF;
        r.rax = u64::from(u16::from_le_bytes(*b"gh"));
        r.rdi = 0x6006;
        run(&[0x66, 0xaf], &mut r, &mut m);
        assert_ne!(r.rflags & ZF, 0);
        assert_eq!(r.rdi, 0x6004);
        // A huge repe count on equal data stops at the iteration bound, RIP unmoved.
        r.rflags &= !DF;
        r.rsi = 0x6000;
        r.rdi = 0x6000;
        r.rcx = u64::MAX;
        let rip = r.rip;
        let e = emulate(64, &[0xf3, 0xa6], &mut r, &mut m).unwrap();
        assert!(!e.complete);
        assert_eq!((r.rip, r.rcx), (rip, u64::MAX - MAX_REP_ITERATIONS));
    }

    #[test]
    fn adc_sbb_neg_not_inc_dec_on_memory() {
        let (mut r, mut m) = (regs(), Mock::new());
        m.put(0x3000, &u32::MAX.to_le_bytes());
        r.rax = 0x3000;
        r.rbx = 0;
        r.rflags |= CF;
        run(&[0x11, 0x18], &mut r, &mut m); // adc [rax], ebx: 0xffffffff + 0 + 1
        assert_eq!(m.get(0x3000, 4), &0u32.to_le_bytes());
        assert_eq!(r.rflags & (CF | ZF), CF | ZF);
        run(&[0x19, 0x18], &mut r, &mut m); // sbb [rax], ebx: 0 - 0 - 1
        assert_eq!(m.get(0x3000, 4), &u32::MAX.to_le_bytes());
        assert_eq!(r.rflags & (CF | SF), CF | SF);
        run(&[0xf7, 0x10], &mut r, &mut m); // not dword [rax]
        assert_eq!(m.get(0x3000, 4), &0u32.to_le_bytes());
        assert_ne!(r.rflags & CF, 0, "NOT leaves flags alone");
        run(&[0xf7, 0x18], &mut r, &mut m); // neg dword [rax]: neg 0 clears CF
        assert_eq!(r.rflags & (CF | ZF), ZF);
        m.put(0x3000, &5u32.to_le_bytes());
        run(&[0xf7, 0x18], &mut r, &mut m);
        assert_eq!(m.get(0x3000, 4), &(-5i32).to_le_bytes());
        assert_eq!(r.rflags & (CF | SF), CF | SF);
        // inc/dec keep CF.
        r.rflags &= !CF;
        m.put(0x3000, &[0xff]);
        run(&[0xfe, 0x00], &mut r, &mut m); // inc byte [rax]
        assert_eq!(m.get(0x3000, 1), &[0]);
        assert_eq!(r.rflags & (CF | ZF), ZF, "INC wraps without setting CF");
        r.rflags |= CF;
        run(&[0xfe, 0x08], &mut r, &mut m); // dec byte [rax]
        assert_eq!(m.get(0x3000, 1), &[0xff]);
        assert_eq!(r.rflags & (CF | SF | ZF), CF | SF);
    }

    #[test]
    fn xchg_swaps_register_and_memory() {
        let (mut r, mut m) = (regs(), Mock::new());
        m.put(0x3000, &0x1111_2222u32.to_le_bytes());
        r.rax = 0x3000;
        r.rcx = 0xaaaa_bbbb;
        run(&[0x87, 0x08], &mut r, &mut m); // xchg [rax], ecx
        assert_eq!(
            (r.rcx, m.get(0x3000, 4)),
            (0x1111_2222, &0xaaaa_bbbbu32.to_le_bytes()[..])
        );
        run(&[0x48, 0x87, 0xc1], &mut r, &mut m); // xchg rcx, rax
        assert_eq!((r.rax, r.rcx), (0x1111_2222, 0x3000));
    }

    #[test]
    fn page_crossing_accesses_translate_each_page() {
        let (mut r, mut m) = (regs(), Mock::new());
        // 0x4ffe..0x5002 crosses into page 0x5000, which maps to 0x9000.
        r.rax = 0x4ffe;
        r.rbx = 0x4433_2211;
        run(&[0x89, 0x18], &mut r, &mut m);
        assert_eq!(m.get(0x4ffe, 2), &[0x11, 0x22]);
        assert_eq!(m.get(0x9000, 2), &[0x33, 0x44]);
        // A fault on the second page is reported with its address.
        r.rax = 0x6ffc;
        let e = emulate(64, &[0x48, 0x89, 0x18], &mut r, &mut m).unwrap_err();
        assert_eq!(
            e,
            EmulateError::Access(AccessError::PageFault {
                gva: 0x7000,
                write: true
            })
        );
    }

    #[test]
    fn legacy_modes_use_their_address_sizes_and_segment_bases() {
        let (mut r, mut m) = (regs(), Mock::new());
        r.rax = 0xffff_ffff_0000_3000; // only EAX counts in 32-bit mode
        r.rbx = 0x1234_5678;
        emulate(32, &[0x89, 0x18], &mut r, &mut m).unwrap(); // mov [eax], ebx
        assert_eq!(m.get(0x3000, 4), &0x1234_5678u32.to_le_bytes());
        r.rbx = 0x3100;
        r.rax = 0xabcd;
        r.rip = 0xfffe;
        emulate(16, &[0x89, 0x07], &mut r, &mut m).unwrap(); // mov [bx], ax
        assert_eq!(m.get(0x3100, 2), &[0xcd, 0xab]);
        assert_eq!(r.rip, 0, "IP wraps at 64 KiB");
        assert_eq!(
            emulate(8, &[0x90], &mut r, &mut m),
            Err(EmulateError::InvalidMode(8))
        );
    }

    #[test]
    fn undecodable_and_unsupported_instructions_are_errors() {
        let (mut r, mut m) = (regs(), Mock::new());
        assert!(matches!(
            emulate(64, &[], &mut r, &mut m),
            Err(EmulateError::Decode { .. })
        ));
        assert!(matches!(
            emulate(64, &[0x48, 0x89], &mut r, &mut m),
            Err(EmulateError::Decode { .. })
        ));
        assert_eq!(
            emulate(64, &[0x50], &mut r, &mut m),
            Err(EmulateError::Unsupported(Mnemonic::Push))
        );
        assert_eq!(
            emulate(64, &[0x0f, 0x0b], &mut r, &mut m),
            Err(EmulateError::Unsupported(Mnemonic::Ud2))
        );
        // mov [rax], es: a segment-register operand.
        assert!(matches!(
            emulate(64, &[0x8c, 0x00], &mut r, &mut m),
            Err(EmulateError::UnsupportedOperand { .. })
        ));
        // SSE movsd shares the mnemonic with the string instruction but is not emulated.
        assert!(emulate(64, &[0xf2, 0x0f, 0x10, 0x00], &mut r, &mut m).is_err());
        // Unmapped physical memory.
        r.rax = 0x2_0000;
        assert_eq!(
            emulate(64, &[0x89, 0x18], &mut r, &mut m),
            Err(EmulateError::Access(AccessError::Unmapped {
                gpa: 0x2_0000
            }))
        );
        assert!(EmulateError::Unsupported(Mnemonic::Push)
            .to_string()
            .contains("Push"));
    }

    #[test]
    fn fetching_at_rip_reads_through_translation() {
        let (mut r, mut m) = (regs(), Mock::new());
        m.put(0x1000, &[0x89, 0x18]);
        r.rbx = 7;
        let e = emulate_at_rip(64, 0, &mut r, &mut m).unwrap();
        assert_eq!((e.mnemonic, e.len, r.rip), (Mnemonic::Mov, 2, 0x1002));
        // An instruction at the end of a page before a faulting page still runs.
        m.put(0x6ffe, &[0x89, 0x18]);
        r.rip = 0x6ffe;
        r.rax = 0x3000;
        emulate_at_rip(64, 0, &mut r, &mut m).unwrap();
        assert_eq!(r.rip, 0x7000);
        r.rip = 0x7000;
        assert!(emulate_at_rip(64, 0, &mut r, &mut m).is_err());
    }

    macro_rules! host_flags {
        ($op:literal, $a:expr, $b:expr, $mod:literal, $class:ident) => {{
            let f: u64;
            // SAFETY: a flag-setting ALU instruction on registers, then pushfq/pop.
            unsafe {
                core::arch::asm!(
                    concat!($op, " {a", $mod, "}, {b", $mod, "}"),
                    "pushfq",
                    "pop {f}",
                    a = inout($class) $a => _,
                    b = in($class) $b,
                    f = out(reg) f,
                )
            }
            f
        }};
    }

    /// Like `host_flags!`, with CF set to `$c` first (for ADC/SBB/INC/DEC) and a unary form.
    macro_rules! host_flags_cf {
        ($op:literal, $a:expr, $b:expr, $c:expr, $mod:literal, $class:ident) => {{
            let f: u64;
            // SAFETY: `bt` copies bit 0 of `c` into CF, then one flag-setting ALU
            // instruction on registers, then pushfq/pop.
            unsafe {
                core::arch::asm!(
                    "bt {c}, 0",
                    concat!($op, " {a", $mod, "}, {b", $mod, "}"),
                    "pushfq",
                    "pop {f}",
                    c = in(reg) u64::from($c),
                    a = inout($class) $a => _,
                    b = in($class) $b,
                    f = out(reg) f,
                )
            }
            f
        }};
        ($op:literal, $a:expr, $c:expr, $mod:literal, $class:ident) => {{
            let f: u64;
            // SAFETY: as above, with a one-operand instruction.
            unsafe {
                core::arch::asm!(
                    "bt {c}, 0",
                    concat!($op, " {a", $mod, "}"),
                    "pushfq",
                    "pop {f}",
                    c = in(reg) u64::from($c),
                    a = inout($class) $a => _,
                    f = out(reg) f,
                )
            }
            f
        }};
    }

    fn host_cf(op: &str, a: u64, b: u64, carry: bool, size: usize) -> u64 {
        macro_rules! all_sizes {
            ($op:literal) => {
                match size {
                    1 => host_flags_cf!($op, a as u8, b as u8, carry, "", reg_byte),
                    2 => host_flags_cf!($op, a as u16, b as u16, carry, ":x", reg),
                    4 => host_flags_cf!($op, a as u32, b as u32, carry, ":e", reg),
                    _ => host_flags_cf!($op, a, b, carry, ":r", reg),
                }
            };
            ($op:literal, unary) => {
                match size {
                    1 => host_flags_cf!($op, a as u8, carry, "", reg_byte),
                    2 => host_flags_cf!($op, a as u16, carry, ":x", reg),
                    4 => host_flags_cf!($op, a as u32, carry, ":e", reg),
                    _ => host_flags_cf!($op, a, carry, ":r", reg),
                }
            };
        }
        match op {
            "adc" => all_sizes!("adc"),
            "sbb" => all_sizes!("sbb"),
            "neg" => all_sizes!("neg", unary),
            "inc" => all_sizes!("inc", unary),
            _ => all_sizes!("dec", unary),
        }
    }

    fn host(op: &str, a: u64, b: u64, size: usize) -> u64 {
        macro_rules! all_sizes {
            ($op:literal) => {
                match size {
                    1 => host_flags!($op, a as u8, b as u8, "", reg_byte),
                    2 => host_flags!($op, a as u16, b as u16, ":x", reg),
                    4 => host_flags!($op, a as u32, b as u32, ":e", reg),
                    _ => host_flags!($op, a, b, ":r", reg),
                }
            };
        }
        match op {
            "cmp" => all_sizes!("cmp"),
            "add" => all_sizes!("add"),
            "and" => all_sizes!("and"),
            "or" => all_sizes!("or"),
            _ => all_sizes!("xor"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The emulator's flags equal the host CPU's for the same operation.
        #[test]
        fn flags_match_the_host_cpu(a in any::<u64>(), b in any::<u64>(), size_idx in 0usize..4, op in 0usize..5) {
            let size = [1, 2, 4, 8][size_idx];
            let name = ["cmp", "add", "and", "or", "xor"][op];
            let (mut r, mut m) = (regs(), Mock::new());
            m.put(0x3000, &a.to_le_bytes());
            r.rax = 0x3000;
            r.rbx = b;
            // <op> [rax], bl/bx/ebx/rbx
            let opcode: u8 = match name { "cmp" => 0x38, "add" => 0x00, "and" => 0x20, "or" => 0x08, _ => 0x30 };
            let mut code = Vec::new();
            match size {
                1 => code.extend_from_slice(&[opcode, 0x18]),
                2 => code.extend_from_slice(&[0x66, opcode + 1, 0x18]),
                4 => code.extend_from_slice(&[opcode + 1, 0x18]),
                _ => code.extend_from_slice(&[0x48, opcode + 1, 0x18]),
            }
            emulate(64, &code, &mut r, &mut m).unwrap();
            let relevant = if matches!(name, "cmp" | "add") { ARITH_FLAGS } else { ARITH_FLAGS & !AF };
            prop_assert_eq!(r.rflags & relevant, host(name, a, b, size) & relevant, "{} size {}", name, size);
        }

        /// ADC, SBB (with either carry in) and NEG, INC, DEC (which must keep CF) set the
        /// flags the host CPU sets.
        #[test]
        fn carry_and_unary_flags_match_the_host_cpu(a in any::<u64>(), b in any::<u64>(), carry in any::<bool>(), size_idx in 0usize..4, op in 0usize..5) {
            let size = [1, 2, 4, 8][size_idx];
            let name = ["adc", "sbb", "neg", "inc", "dec"][op];
            let (mut r, mut m) = (regs(), Mock::new());
            m.put(0x3000, &a.to_le_bytes());
            r.rax = 0x3000;
            r.rbx = b;
            if carry {
                r.rflags |= CF;
            }
            // adc/sbb [rax], bl..rbx (0x10/0x18); neg/inc/dec [rax] (f6/f7 /3, fe/ff /0, /1)
            let (opcode, modrm) = match name {
                "adc" => (0x10, 0x18),
                "sbb" => (0x18, 0x18),
                "neg" => (0xf6, 0x18),
                "inc" => (0xfe, 0x00),
                _ => (0xfe, 0x08),
            };
            let mut code = Vec::new();
            match size {
                1 => code.extend_from_slice(&[opcode, modrm]),
                2 => code.extend_from_slice(&[0x66, opcode + 1, modrm]),
                4 => code.extend_from_slice(&[opcode + 1, modrm]),
                _ => code.extend_from_slice(&[0x48, opcode + 1, modrm]),
            }
            emulate(64, &code, &mut r, &mut m).unwrap();
            prop_assert_eq!(
                r.rflags & ARITH_FLAGS,
                host_cf(name, a, b, carry, size) & ARITH_FLAGS,
                "{} size {} carry {}", name, size, carry
            );
        }

        /// Random bytes never panic, in any mode.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..16), bitness_idx in 0usize..3, rax in any::<u64>(), rcx in any::<u64>()) {
            let (mut r, mut m) = (regs(), Mock::new());
            r.rax = rax;
            r.rcx = rcx;
            r.rsi = rax.rotate_left(7);
            r.rdi = rcx.rotate_left(13);
            let _ = emulate([16, 32, 64][bitness_idx], &bytes, &mut r, &mut m);
        }
    }
}
