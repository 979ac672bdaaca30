//! Seeds and input decoding for the vmkit-vcpu fuzz targets.
//!
//! `vcpu_state`: the fuzzer's bytes are a saved vCPU state (a snapshot file's vCPU part):
//! decoding must succeed or return an error, and a decoded state must re-encode losslessly.
//!
//! `vcpu_emulator`: the fuzzer's bytes are a register file, an instruction and a memory
//! image; the MMIO instruction emulator must decode-or-reject and execute-or-reject without
//! panicking, and when it completes an instruction RIP must move past it.
//!
//! Input layout (little endian):
//! ```text
//! 0        mode (mod 3: 16-, 32-, 64-bit)
//! 1        flags: DF (bit 0), FS base = 0x1000 (bit 1)
//! 2..130   the 16 general registers in encoding order (rax, rcx, rdx, rbx, rsp, rbp, rsi,
//!          rdi, r8..r15)
//! 130..145 instruction bytes (15)
//! 145..    physical memory image at address 0 (at most 64 KiB); addresses above it are a
//!          device whose reads return address-derived bytes; page 0xf000 faults
//! ```

use std::path::Path;

use vmkit_vcpu::emulate::{emulate, AccessError, EmulatorPlatform, SegmentReg};
use vmkit_vcpu::state::VcpuState;
use vmkit_vcpu::{
    DebugRegs, Fpu, LapicState, MpState, MsrEntry, Regs, SpecialRegs, VcpuEvents, Xcr, XsaveArea,
};

/// Name of the emulator fuzz target (and of its seed directory).
pub const VCPU_EMULATOR: &str = "vcpu_emulator";

const HEADER: usize = 145;
const MAX_IMAGE: usize = 64 << 10;

struct FuzzPlatform<'a> {
    image: &'a mut [u8],
    fs_base: u64,
}

impl EmulatorPlatform for FuzzPlatform<'_> {
    fn translate(&mut self, gva: u64, write: bool) -> Result<u64, AccessError> {
        if gva & !0xfff == 0xf000 {
            Err(AccessError::PageFault { gva, write })
        } else {
            Ok(gva)
        }
    }
    fn read(&mut self, gpa: u64, data: &mut [u8]) -> Result<(), AccessError> {
        let start = usize::try_from(gpa).unwrap_or(usize::MAX);
        match start
            .checked_add(data.len())
            .and_then(|end| self.image.get(start..end))
        {
            Some(s) => data.copy_from_slice(s),
            None => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = (gpa as u8).wrapping_add(i as u8);
                }
            }
        }
        Ok(())
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), AccessError> {
        let start = usize::try_from(gpa).unwrap_or(usize::MAX);
        if let Some(s) = start
            .checked_add(data.len())
            .and_then(|end| self.image.get_mut(start..end))
        {
            s.copy_from_slice(data);
        }
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

/// Runs one emulator input (see the module docs). Returns whether the instruction was
/// emulated to completion.
pub fn emulate_bytes(data: &[u8]) -> bool {
    if data.len() < HEADER {
        return false;
    }
    let bitness = [16, 32, 64][usize::from(data[0] % 3)];
    let mut regs = Regs {
        rip: 0x100,
        rflags: 2 | (u64::from(data[1] & 1) << 10),
        ..Default::default()
    };
    for i in 0..16 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[2 + i * 8..10 + i * 8]);
        if let Some(r) = regs.gpr_mut(i) {
            *r = u64::from_le_bytes(b);
        }
    }
    let code = &data[130..HEADER];
    let mut image = data[HEADER..].to_vec();
    image.truncate(MAX_IMAGE);
    let fs_base = if data[1] & 2 != 0 { 0x1000 } else { 0 };
    let mut platform = FuzzPlatform {
        image: &mut image,
        fs_base,
    };
    let rip = regs.rip;
    match emulate(bitness, code, &mut regs, &mut platform) {
        Ok(e) if e.complete => {
            let mask = if bitness == 64 {
                u64::MAX
            } else if bitness == 32 {
                0xffff_ffff
            } else {
                0xffff
            };
            assert_eq!(
                regs.rip,
                rip.wrapping_add(e.len as u64) & mask,
                "RIP must move past the instruction"
            );
            true
        }
        Ok(_) => {
            assert_eq!(
                regs.rip, rip,
                "an unfinished REP leaves RIP on the instruction"
            );
            false
        }
        Err(_) => false,
    }
}

/// Builds one input: 64-bit mode, registers, instruction, a 16 KiB memory image.
pub fn input(bitness_sel: u8, flags: u8, regs: &[(usize, u64)], code: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; HEADER + 0x4000];
    d[0] = bitness_sel;
    d[1] = flags;
    for &(i, v) in regs {
        d[2 + i * 8..10 + i * 8].copy_from_slice(&v.to_le_bytes());
    }
    d[130..130 + code.len()].copy_from_slice(code);
    for (i, b) in d[HEADER..].iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    d
}

/// The seed inputs: one per emulated instruction family and addressing form.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    const RAX: usize = 0;
    const RCX: usize = 1;
    const RBX: usize = 3;
    const RSI: usize = 6;
    const RDI: usize = 7;
    let mmio = 0xd000_0000;
    vec![
        (
            "mov_store",
            input(2, 0, &[(RAX, mmio), (RBX, 0x1234)], &[0x89, 0x18]),
        ),
        (
            "mov_load_r8",
            input(2, 0, &[(RAX, 0x2000)], &[0x4c, 0x8b, 0x00]),
        ),
        (
            "mov_sib",
            input(
                2,
                0,
                &[(RAX, 0x2000), (RCX, 3)],
                &[0x66, 0x89, 0x54, 0x88, 0x08],
            ),
        ),
        (
            "mov_rip_rel",
            input(2, 0, &[], &[0x8b, 0x05, 0x10, 0, 0, 0]),
        ),
        (
            "mov_imm",
            input(
                2,
                0,
                &[(RAX, 0x2000)],
                &[0x48, 0xc7, 0x00, 0xff, 0xff, 0xff, 0xff],
            ),
        ),
        ("mov_fs", input(2, 2, &[(RCX, 0x10)], &[0x64, 0x89, 0x19])),
        ("movzx", input(2, 0, &[(RBX, 0x2000)], &[0x0f, 0xb6, 0x03])),
        (
            "movsxd",
            input(2, 0, &[(RBX, 0x2000)], &[0x48, 0x63, 0x43, 0x01]),
        ),
        (
            "rep_movsb",
            input(2, 0, &[(RSI, 0x2000), (RDI, mmio), (RCX, 8)], &[0xf3, 0xa4]),
        ),
        (
            "movsq_df",
            input(2, 1, &[(RSI, 0x2008), (RDI, 0x3008)], &[0x48, 0xa5]),
        ),
        (
            "rep_stosd",
            input(2, 0, &[(RDI, 0x2000), (RCX, 4), (RAX, 7)], &[0xf3, 0xab]),
        ),
        (
            "cmp",
            input(2, 0, &[(RAX, 0x2000), (RBX, 5)], &[0x39, 0x18]),
        ),
        (
            "and_imm",
            input(2, 0, &[(RAX, 0x2000)], &[0x81, 0x20, 0x04, 0, 0, 0]),
        ),
        (
            "xor",
            input(2, 0, &[(RAX, 0x2000), (RCX, 7)], &[0x31, 0x08]),
        ),
        ("test", input(2, 0, &[(RAX, 0x2000)], &[0xf6, 0x00, 0x01])),
        (
            "xchg",
            input(2, 0, &[(RAX, 0x2000), (RCX, 9)], &[0x87, 0x08]),
        ),
        (
            "page_cross",
            input(2, 0, &[(RAX, 0x2ffe), (RBX, 1)], &[0x48, 0x89, 0x18]),
        ),
        (
            "mode32",
            input(1, 0, &[(RAX, 0x2000), (RBX, 1)], &[0x89, 0x18]),
        ),
        ("mode16", input(0, 0, &[(RBX, 0x2000)], &[0x89, 0x07])),
        (
            "rep_lodsd",
            input(2, 0, &[(RSI, 0x2000), (RCX, 3)], &[0xf3, 0xad]),
        ),
        (
            "repe_cmpsb",
            input(
                2,
                0,
                &[(RSI, 0x2000), (RDI, mmio), (RCX, 16)],
                &[0xf3, 0xa6],
            ),
        ),
        (
            "repne_scasb",
            input(
                2,
                0,
                &[(RDI, 0x2000), (RCX, 64), (RAX, 0x15)],
                &[0xf2, 0xae],
            ),
        ),
        (
            "adc",
            input(2, 0, &[(RAX, 0x2000), (RBX, 3)], &[0x48, 0x11, 0x18]),
        ),
        ("neg", input(2, 0, &[(RAX, 0x2000)], &[0xf7, 0x18])),
        ("dec_byte", input(2, 0, &[(RAX, mmio)], &[0xfe, 0x08])),
    ]
}

/// Name of the vCPU-state decoding fuzz target (and of its seed directory).
pub const VCPU_STATE: &str = "vcpu_state";

/// Decodes `data` as a saved vCPU state (an untrusted snapshot file). It must decode or be
/// refused with an error, never panic; what decodes must re-encode to a blob that decodes
/// to the same state. Returns whether `data` decoded.
pub fn decode_state(data: &[u8]) -> bool {
    match VcpuState::from_bytes(data) {
        Ok(state) => {
            let again =
                VcpuState::from_bytes(&state.to_bytes()).expect("a re-encoded state must decode");
            assert_eq!(again, state, "re-encoding changed the state");
            true
        }
        Err(_) => false,
    }
}

/// Seeds for `vcpu_state`: a minimal state, one with every optional part, and the same as
/// a version-1 blob.
pub fn state_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let minimal = VcpuState {
        regs: Regs::default(),
        sregs: SpecialRegs::default(),
        fpu: Fpu::default(),
        msrs: Vec::new(),
        lapic: None,
        events: VcpuEvents::default(),
        mp_state: MpState::Runnable,
        xsave: None,
        xcrs: Vec::new(),
        debug_regs: None,
    };
    let mut full = minimal.clone();
    full.regs.rip = 0x10_0000;
    full.msrs = vec![MsrEntry {
        index: 0xc000_0080,
        data: 0x500,
    }];
    full.lapic = Some(LapicState::default());
    full.mp_state = MpState::Halted;
    full.xsave = Some(XsaveArea {
        bytes: vec![0; 4096],
    });
    full.xcrs = vec![Xcr { index: 0, value: 7 }];
    full.debug_regs = Some(DebugRegs {
        db: [1, 2, 3, 4],
        dr6: 0xffff_0ff0,
        dr7: 0x400,
    });
    let mut v1 = minimal.to_bytes();
    // Version 1 has no XSAVE/XCR/debug tail (1 + 4 + 1 bytes when all are absent).
    v1.truncate(v1.len() - 6);
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    vec![
        ("minimal", minimal.to_bytes()),
        ("full", full.to_bytes()),
        ("version1", v1),
    ]
}

/// Writes the seed corpora of the vmkit-vcpu fuzz targets under `dir`.
pub fn write_seeds(dir: &Path) -> std::io::Result<()> {
    crate::write_corpus(dir, VCPU_EMULATOR, seeds())?;
    crate::write_corpus(dir, VCPU_STATE, state_seeds())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_emulates_to_completion() {
        for (name, bytes) in seeds() {
            assert!(emulate_bytes(&bytes), "seed {name} did not emulate");
        }
    }

    #[test]
    fn short_and_odd_inputs_are_rejected_quietly() {
        assert!(!emulate_bytes(&[]));
        // All zeros: `add [bx+si], al` in 16-bit mode is emulated (an ADD to memory).
        assert!(emulate_bytes(&[0; HEADER]));
        // A REP with a huge count stops early: RIP stays.
        let d = input(2, 0, &[(1, u64::MAX), (7, 0x2000)], &[0xf3, 0xaa]);
        assert!(!emulate_bytes(&d));
    }

    #[test]
    fn seeds_are_written_one_file_each() {
        let dir = tempfile::tempdir().unwrap();
        write_seeds(dir.path()).unwrap();
        let n = std::fs::read_dir(dir.path().join(VCPU_EMULATOR))
            .unwrap()
            .count();
        assert_eq!(n, seeds().len());
        let n = std::fs::read_dir(dir.path().join(VCPU_STATE))
            .unwrap()
            .count();
        assert_eq!(n, state_seeds().len());
    }

    #[test]
    fn state_seeds_decode_and_garbage_is_refused() {
        for (name, bytes) in state_seeds() {
            assert!(decode_state(&bytes), "seed {name} did not decode");
        }
        assert!(!decode_state(&[]));
        assert!(!decode_state(b"VKVCPU\0\0\x09\0\0\0"));
    }
}
