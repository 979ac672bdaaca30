//! Versioned save and restore of a vCPU's complete architectural state.
//!
//! [`VcpuState::save`] collects general and special registers, FPU/SSE state, the XSAVE
//! image and XCR0, the debug registers, every MSR the backend can save, the local APIC (when
//! there is an in-kernel irqchip), pending events and the MP state. [`VcpuState::restore`]
//! writes them into a *fresh* vCPU (whose CPUID the VMM has already set), in the order KVM
//! needs: MP state, special registers, general registers, FPU, XCRs, XSAVE (after the FPU, so
//! that its AVX state is not clobbered; after XCR0, which it must agree with), debug
//! registers, LAPIC, MSRs, events. A restored vCPU continues exactly where the saved one
//! stopped.
//!
//! What belongs to the VM rather than a vCPU (KVM's in-kernel PICs, IOAPIC, PIT and clock)
//! is saved by [`KvmVm::platform_state`](crate::kvm::KvmVm::platform_state); a whole-VM
//! snapshot is guest memory, that blob, each vCPU's state and the VMM's device states.
//!
//! State a backend does not offer ([`Error::Unsupported`](crate::hypervisor::Error)) is
//! saved as absent and skipped on restore; any other failure is an error.
//!
//! Before saving, the vCPU's in-flight exit is completed ([`Vcpu::complete_pending_exit`]):
//! a port or MMIO read whose data the VMM filled in is only delivered to the guest
//! registers by the next entry.
//!
//! # Encoding
//!
//! [`VcpuState::to_bytes`] produces a little-endian blob: the magic `VKVCPU\0\0`, a `u32`
//! format version ([`STATE_VERSION`]), then the fields in a fixed order; the MSR list is
//! prefixed with its count, the LAPIC with a presence byte; version 2 appends the XSAVE image
//! (presence byte, `u32` length, bytes), the XCRs (`u32` count, then index and value each)
//! and the debug registers (presence byte, six `u64`). Version 1 blobs still decode (without
//! those three). [`VcpuState::from_bytes`]
//! checks magic, version, lengths and enum codes and returns a [`StateError`] naming the
//! problem instead of panicking: snapshot files are untrusted input.

use crate::hypervisor::{Error as HvError, Vcpu};
use crate::regs::{
    DebugRegs, DescriptorTable, Fpu, LapicState, MpState, MsrEntry, Regs, Segment, SpecialRegs,
    VcpuEvents, Xcr, XsaveArea,
};

/// Current encoding version.
pub const STATE_VERSION: u32 = 2;
/// Upper bound on a saved XSAVE image, to bound allocations when decoding (AMX tile data
/// makes today's largest images ~11 KiB).
pub const MAX_XSAVE_BYTES: usize = 64 * 1024;
/// Upper bound on saved extended control registers.
pub const MAX_XCRS: usize = 16;
const MAGIC: &[u8; 8] = b"VKVCPU\0\0";
/// Upper bound on saved MSRs, to bound allocations when decoding.
pub const MAX_MSRS: usize = 4096;

/// Errors of save, restore and decoding.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The hypervisor refused a get or set.
    #[error(transparent)]
    Hypervisor(#[from] crate::hypervisor::Error),
    /// The blob does not start with the magic.
    #[error("not a vCPU state blob (bad magic)")]
    BadMagic,
    /// The blob has a version this code does not read.
    #[error("unsupported vCPU state version {0} (this build reads 1 to {STATE_VERSION})")]
    Version(u32),
    /// The blob ended early.
    #[error("vCPU state truncated while reading {0}")]
    Truncated(&'static str),
    /// A field holds an impossible value.
    #[error("invalid {field} in vCPU state: {value}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// Bytes follow the last field.
    #[error("{0} unexpected bytes after the vCPU state")]
    Trailing(usize),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, StateError>;

/// Everything needed to continue a vCPU elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuState {
    /// General registers.
    pub regs: Regs,
    /// Special registers.
    pub sregs: SpecialRegs,
    /// FPU/SSE state.
    pub fpu: Fpu,
    /// Saved MSRs.
    pub msrs: Vec<MsrEntry>,
    /// Local APIC, if the VM has an in-kernel irqchip.
    pub lapic: Option<LapicState>,
    /// Pending events.
    pub events: VcpuEvents,
    /// MP state.
    pub mp_state: MpState,
    /// The XSAVE image, if the backend has one (it supersedes `fpu` on restore).
    pub xsave: Option<XsaveArea>,
    /// Extended control registers (XCR0); empty if the backend has none.
    pub xcrs: Vec<Xcr>,
    /// Debug registers, if the backend offers them.
    pub debug_regs: Option<DebugRegs>,
}

/// `Ok(Some)` on success, `Ok(None)` when the backend does not offer the state at all.
fn optional<T>(r: crate::hypervisor::Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(HvError::Unsupported(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn read_msrs<V: Vcpu>(vcpu: &V, indices: &[u32]) -> Result<Vec<MsrEntry>> {
    // KVM_GET_MSRS stops at the first MSR it cannot read: skip that one and go on.
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let got = vcpu.msrs(rest)?;
        let n = got.len();
        out.extend(got);
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

impl VcpuState {
    /// Saves the state of `vcpu`.
    pub fn save<V: Vcpu>(vcpu: &mut V) -> Result<VcpuState> {
        vcpu.complete_pending_exit()?;
        let indices = vcpu.saveable_msrs()?;
        Ok(VcpuState {
            regs: vcpu.regs()?,
            sregs: vcpu.sregs()?,
            fpu: vcpu.fpu()?,
            msrs: read_msrs(vcpu, &indices)?,
            lapic: vcpu.lapic().ok(),
            events: vcpu.events()?,
            mp_state: vcpu.mp_state()?,
            xsave: optional(vcpu.xsave())?,
            xcrs: optional(vcpu.xcrs())?.unwrap_or_default(),
            debug_regs: optional(vcpu.debug_regs())?,
        })
    }

    /// Restores into `vcpu`. MSRs the target refuses are skipped and returned (a VMM may
    /// log them; KVM refuses a few read-only or feature MSRs it listed as saveable).
    pub fn restore<V: Vcpu>(&self, vcpu: &V) -> Result<Vec<u32>> {
        vcpu.set_mp_state(self.mp_state)?;
        vcpu.set_sregs(&self.sregs)?;
        vcpu.set_regs(&self.regs)?;
        vcpu.set_fpu(&self.fpu)?;
        if !self.xcrs.is_empty() {
            vcpu.set_xcrs(&self.xcrs)?;
        }
        if let Some(x) = &self.xsave {
            vcpu.set_xsave(x)?;
        }
        if let Some(d) = &self.debug_regs {
            vcpu.set_debug_regs(d)?;
        }
        if let Some(lapic) = &self.lapic {
            vcpu.set_lapic(lapic)?;
        }
        let mut refused = Vec::new();
        if vcpu.set_msrs(&self.msrs).is_err() {
            for m in &self.msrs {
                if vcpu.set_msrs(std::slice::from_ref(m)).is_err() {
                    refused.push(m.index);
                }
            }
        }
        vcpu.set_events(&self.events)?;
        Ok(refused)
    }

    /// Encodes the state (see the module docs).
    ///
    /// [`VcpuState::from_bytes`] bounds what it accepts ([`MAX_MSRS`], [`MAX_XSAVE_BYTES`],
    /// [`MAX_XCRS`]); a state from [`VcpuState::save`] is always within them, but one built
    /// by hand beyond them encodes to a blob that decoding refuses with a typed error.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(4096);
        w.extend_from_slice(MAGIC);
        put32(&mut w, STATE_VERSION);
        let r = &self.regs;
        for v in [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags,
        ] {
            put64(&mut w, v);
        }
        let s = &self.sregs;
        for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
            put_segment(&mut w, seg);
        }
        for t in [&s.gdt, &s.idt] {
            put64(&mut w, t.base);
            w.extend_from_slice(&t.limit.to_le_bytes());
        }
        for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
            put64(&mut w, v);
        }
        for v in s.interrupt_bitmap {
            put64(&mut w, v);
        }
        let f = &self.fpu;
        for r in &f.fpr {
            w.extend_from_slice(r);
        }
        w.extend_from_slice(&f.fcw.to_le_bytes());
        w.extend_from_slice(&f.fsw.to_le_bytes());
        w.push(f.ftwx);
        w.extend_from_slice(&f.last_opcode.to_le_bytes());
        put64(&mut w, f.last_ip);
        put64(&mut w, f.last_dp);
        for r in &f.xmm {
            w.extend_from_slice(r);
        }
        put32(&mut w, f.mxcsr);
        put32(&mut w, self.msrs.len() as u32);
        for m in &self.msrs {
            put32(&mut w, m.index);
            put64(&mut w, m.data);
        }
        match &self.lapic {
            Some(l) => {
                w.push(1);
                w.extend_from_slice(&l.regs);
            }
            None => w.push(0),
        }
        let e = &self.events;
        for b in [
            e.exception_injected,
            e.exception_has_error_code,
            e.exception_pending,
            e.interrupt_injected,
            e.interrupt_soft,
            e.nmi_injected,
            e.nmi_pending,
            e.nmi_masked,
            e.smi_smm,
            e.smi_pending,
            e.smi_inside_nmi,
            e.triple_fault_pending,
            e.exception_has_payload,
        ] {
            w.push(u8::from(b));
        }
        w.extend_from_slice(&[
            e.exception_nr,
            e.interrupt_nr,
            e.interrupt_shadow,
            e.smi_latched_init,
        ]);
        put32(&mut w, e.exception_error_code);
        put32(&mut w, e.sipi_vector);
        put32(&mut w, e.flags);
        put64(&mut w, e.exception_payload);
        let (code, other) = match self.mp_state {
            MpState::Runnable => (0, 0),
            MpState::Uninitialized => (1, 0),
            MpState::InitReceived => (2, 0),
            MpState::Halted => (3, 0),
            MpState::SipiReceived => (4, 0),
            MpState::Other(o) => (5, o),
        };
        w.push(code);
        put32(&mut w, other);
        match &self.xsave {
            Some(x) => {
                w.push(1);
                put32(&mut w, x.bytes.len() as u32);
                w.extend_from_slice(&x.bytes);
            }
            None => w.push(0),
        }
        put32(&mut w, self.xcrs.len() as u32);
        for x in &self.xcrs {
            put32(&mut w, x.index);
            put64(&mut w, x.value);
        }
        match &self.debug_regs {
            Some(d) => {
                w.push(1);
                for v in [d.db[0], d.db[1], d.db[2], d.db[3], d.dr6, d.dr7] {
                    put64(&mut w, v);
                }
            }
            None => w.push(0),
        }
        w
    }

    /// Decodes a blob made by [`VcpuState::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<VcpuState> {
        let mut r = Reader { buf: bytes };
        if r.take(8, "magic")? != MAGIC {
            return Err(StateError::BadMagic);
        }
        let version = r.u32("version")?;
        if !(1..=STATE_VERSION).contains(&version) {
            return Err(StateError::Version(version));
        }
        let mut g = [0u64; 18];
        for v in g.iter_mut() {
            *v = r.u64("registers")?;
        }
        let regs = Regs {
            rax: g[0],
            rbx: g[1],
            rcx: g[2],
            rdx: g[3],
            rsi: g[4],
            rdi: g[5],
            rsp: g[6],
            rbp: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: g[16],
            rflags: g[17],
        };
        let mut segs = [Segment::default(); 8];
        for s in segs.iter_mut() {
            *s = r.segment()?;
        }
        let mut tables = [DescriptorTable::default(); 2];
        for t in tables.iter_mut() {
            t.base = r.u64("descriptor table")?;
            t.limit = r.u16("descriptor table")?;
        }
        let mut c = [0u64; 7];
        for v in c.iter_mut() {
            *v = r.u64("control registers")?;
        }
        let mut interrupt_bitmap = [0u64; 4];
        for v in interrupt_bitmap.iter_mut() {
            *v = r.u64("interrupt bitmap")?;
        }
        let [cs, ds, es, fs, gs, ss, tr, ldt] = segs;
        let sregs = SpecialRegs {
            cs,
            ds,
            es,
            fs,
            gs,
            ss,
            tr,
            ldt,
            gdt: tables[0],
            idt: tables[1],
            cr0: c[0],
            cr2: c[1],
            cr3: c[2],
            cr4: c[3],
            cr8: c[4],
            efer: c[5],
            apic_base: c[6],
            interrupt_bitmap,
        };
        let mut fpu = Fpu::default();
        for reg in fpu.fpr.iter_mut() {
            reg.copy_from_slice(r.take(16, "fpu")?);
        }
        fpu.fcw = r.u16("fpu")?;
        fpu.fsw = r.u16("fpu")?;
        fpu.ftwx = r.u8("fpu")?;
        fpu.last_opcode = r.u16("fpu")?;
        fpu.last_ip = r.u64("fpu")?;
        fpu.last_dp = r.u64("fpu")?;
        for reg in fpu.xmm.iter_mut() {
            reg.copy_from_slice(r.take(16, "xmm")?);
        }
        fpu.mxcsr = r.u32("fpu")?;
        let n = r.u32("msr count")? as usize;
        if n > MAX_MSRS {
            return Err(StateError::Invalid {
                field: "msr count",
                value: n as u64,
            });
        }
        let mut msrs = Vec::with_capacity(n);
        for _ in 0..n {
            msrs.push(MsrEntry {
                index: r.u32("msr")?,
                data: r.u64("msr")?,
            });
        }
        let lapic = match r.u8("lapic flag")? {
            0 => None,
            1 => {
                let mut l = LapicState::default();
                l.regs.copy_from_slice(r.take(1024, "lapic")?);
                Some(l)
            }
            other => {
                return Err(StateError::Invalid {
                    field: "lapic flag",
                    value: other.into(),
                })
            }
        };
        let mut flags = [false; 13];
        for f in flags.iter_mut() {
            *f = match r.u8("event flags")? {
                0 => false,
                1 => true,
                other => {
                    return Err(StateError::Invalid {
                        field: "event flag",
                        value: other.into(),
                    })
                }
            };
        }
        let bytes4 = r.take(4, "events")?;
        let events = VcpuEvents {
            exception_injected: flags[0],
            exception_has_error_code: flags[1],
            exception_pending: flags[2],
            interrupt_injected: flags[3],
            interrupt_soft: flags[4],
            nmi_injected: flags[5],
            nmi_pending: flags[6],
            nmi_masked: flags[7],
            smi_smm: flags[8],
            smi_pending: flags[9],
            smi_inside_nmi: flags[10],
            triple_fault_pending: flags[11],
            exception_has_payload: flags[12],
            exception_nr: bytes4[0],
            interrupt_nr: bytes4[1],
            interrupt_shadow: bytes4[2],
            smi_latched_init: bytes4[3],
            exception_error_code: r.u32("events")?,
            sipi_vector: r.u32("events")?,
            flags: r.u32("events")?,
            exception_payload: r.u64("events")?,
        };
        let code = r.u8("mp state")?;
        let other = r.u32("mp state")?;
        let mp_state = match code {
            0 => MpState::Runnable,
            1 => MpState::Uninitialized,
            2 => MpState::InitReceived,
            3 => MpState::Halted,
            4 => MpState::SipiReceived,
            5 => MpState::Other(other),
            c => {
                return Err(StateError::Invalid {
                    field: "mp state",
                    value: c.into(),
                })
            }
        };
        let (mut xsave, mut xcrs, mut debug_regs) = (None, Vec::new(), None);
        if version >= 2 {
            if r.flag("xsave flag")? {
                let n = r.u32("xsave length")? as usize;
                if n > MAX_XSAVE_BYTES {
                    return Err(StateError::Invalid {
                        field: "xsave length",
                        value: n as u64,
                    });
                }
                xsave = Some(XsaveArea {
                    bytes: r.take(n, "xsave")?.to_vec(),
                });
            }
            let n = r.u32("xcr count")? as usize;
            if n > MAX_XCRS {
                return Err(StateError::Invalid {
                    field: "xcr count",
                    value: n as u64,
                });
            }
            for _ in 0..n {
                xcrs.push(Xcr {
                    index: r.u32("xcr")?,
                    value: r.u64("xcr")?,
                });
            }
            if r.flag("debug registers flag")? {
                let mut v = [0u64; 6];
                for x in v.iter_mut() {
                    *x = r.u64("debug registers")?;
                }
                debug_regs = Some(DebugRegs {
                    db: [v[0], v[1], v[2], v[3]],
                    dr6: v[4],
                    dr7: v[5],
                });
            }
        }
        if !r.buf.is_empty() {
            return Err(StateError::Trailing(r.buf.len()));
        }
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            msrs,
            lapic,
            events,
            mp_state,
            xsave,
            xcrs,
            debug_regs,
        })
    }
}

fn put32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_segment(w: &mut Vec<u8>, s: &Segment) {
    put64(w, s.base);
    put32(w, s.limit);
    w.extend_from_slice(&s.selector.to_le_bytes());
    w.extend_from_slice(&[s.type_, s.dpl]);
    let flags = u8::from(s.present)
        | u8::from(s.db) << 1
        | u8::from(s.s) << 2
        | u8::from(s.l) << 3
        | u8::from(s.g) << 4
        | u8::from(s.avl) << 5
        | u8::from(s.unusable) << 6;
    w.push(flags);
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(StateError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn flag(&mut self, what: &'static str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(StateError::Invalid {
                field: what,
                value: other.into(),
            }),
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(a))
    }
    fn segment(&mut self) -> Result<Segment> {
        let base = self.u64("segment")?;
        let limit = self.u32("segment")?;
        let selector = self.u16("segment")?;
        let type_ = self.u8("segment")?;
        let dpl = self.u8("segment")?;
        let f = self.u8("segment")?;
        if f & 0x80 != 0 || type_ > 15 || dpl > 3 {
            return Err(StateError::Invalid {
                field: "segment attributes",
                value: f.into(),
            });
        }
        Ok(Segment {
            base,
            limit,
            selector,
            type_,
            dpl,
            present: f & 1 != 0,
            db: f & 2 != 0,
            s: f & 4 != 0,
            l: f & 8 != 0,
            g: f & 16 != 0,
            avl: f & 32 != 0,
            unusable: f & 64 != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(seed: u64) -> VcpuState {
        let mut s = VcpuState {
            regs: Regs {
                rax: seed,
                rip: seed ^ 0x1234,
                rflags: 2,
                r15: !seed,
                ..Default::default()
            },
            sregs: SpecialRegs::default(),
            fpu: Fpu::default(),
            msrs: (0..(seed % 7) as u32)
                .map(|i| MsrEntry {
                    index: i,
                    data: seed << i,
                })
                .collect(),
            lapic: (seed % 2 == 0).then(|| {
                let mut l = LapicState::default();
                l.regs[0x20] = seed as u8;
                l
            }),
            events: VcpuEvents {
                nmi_masked: seed % 3 == 0,
                exception_payload: seed,
                ..Default::default()
            },
            mp_state: [MpState::Runnable, MpState::Halted, MpState::Other(9)][(seed % 3) as usize],
            xsave: (seed % 4 == 1).then(|| XsaveArea {
                bytes: (0..4096u32).map(|i| (i as u64 ^ seed) as u8).collect(),
            }),
            xcrs: if seed % 3 == 1 {
                vec![Xcr {
                    index: 0,
                    value: 7 | (seed & 0xe0),
                }]
            } else {
                Vec::new()
            },
            debug_regs: (seed % 5 == 1).then_some(DebugRegs {
                db: [seed, 1, 2, 3],
                dr6: 0xffff_0ff0,
                dr7: 0x400 | (seed & 0xff),
            }),
        };
        s.sregs.cs = Segment {
            base: seed,
            limit: 0xffff,
            selector: 8,
            type_: 11,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: false,
            unusable: false,
        };
        s.sregs.tr.unusable = true;
        s.sregs.gdt = DescriptorTable {
            base: 0x500,
            limit: 31,
        };
        s.sregs.cr3 = seed & !0xfff;
        s.sregs.interrupt_bitmap[3] = seed;
        s.fpu.xmm[15][3] = seed as u8;
        s.fpu.fpr[7][9] = 1;
        s
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn encoding_round_trips(seed in any::<u64>()) {
            let s = sample(seed);
            prop_assert_eq!(VcpuState::from_bytes(&s.to_bytes()).unwrap(), s);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = VcpuState::from_bytes(&bytes);
        }

        #[test]
        fn every_truncation_is_an_error(seed in any::<u64>(), cut in 0usize..8000) {
            let b = sample(seed).to_bytes();
            let cut = cut % b.len();
            prop_assert!(VcpuState::from_bytes(&b[..cut]).is_err());
        }
    }

    #[test]
    fn version_1_blobs_decode_without_the_extended_state() {
        let s = sample(2);
        let mut b = s.to_bytes();
        // Version 1 ends at the MP state: drop the empty version-2 tail.
        b.truncate(b.len() - 6);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        let d = VcpuState::from_bytes(&b).unwrap();
        assert_eq!(d, s);
        // ...but a version-1 blob with anything after the MP state is refused.
        b.push(0);
        assert!(matches!(
            VcpuState::from_bytes(&b),
            Err(StateError::Trailing(1))
        ));
    }

    #[test]
    fn extended_state_fields_are_bounded_and_checked() {
        let s = sample(1); // XSAVE image, one XCR and debug registers
        assert!(s.xsave.is_some() && s.xcrs.len() == 1 && s.debug_regs.is_some());
        let good = s.to_bytes();
        assert_eq!(VcpuState::from_bytes(&good).unwrap(), s);
        // Tail layout: xsave flag, u32 length, 4096 bytes, u32 count, 12 bytes, flag, 48 bytes.
        let xsave_at = good.len() - (1 + 4 + 4096 + 4 + 12 + 1 + 48);
        let mut b = good.clone();
        b[xsave_at] = 2;
        let e = VcpuState::from_bytes(&b).unwrap_err();
        assert!(e.to_string().contains("xsave flag"), "{e}");
        let mut b = good.clone();
        b[xsave_at + 1..xsave_at + 5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            VcpuState::from_bytes(&b),
            Err(StateError::Invalid {
                field: "xsave length",
                ..
            })
        ));
        let xcr_at = xsave_at + 1 + 4 + 4096;
        let mut b = good.clone();
        b[xcr_at..xcr_at + 4].copy_from_slice(&17u32.to_le_bytes());
        assert!(matches!(
            VcpuState::from_bytes(&b),
            Err(StateError::Invalid {
                field: "xcr count",
                value: 17
            })
        ));
        let dbg_at = xcr_at + 4 + 12;
        let mut b = good.clone();
        b[dbg_at] = 7;
        assert!(VcpuState::from_bytes(&b)
            .unwrap_err()
            .to_string()
            .contains("debug registers flag"));
    }

    #[test]
    fn corrupt_blobs_are_rejected_with_a_reason() {
        let good = sample(2).to_bytes();
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(
            VcpuState::from_bytes(&b),
            Err(StateError::BadMagic)
        ));
        let mut b = good.clone();
        b[8] = 9;
        assert!(matches!(
            VcpuState::from_bytes(&b),
            Err(StateError::Version(9))
        ));
        let mut b = good.clone();
        b.push(0);
        assert!(matches!(
            VcpuState::from_bytes(&b),
            Err(StateError::Trailing(1))
        ));
        // sample(2) has no XSAVE image, XCRs or debug registers: the version-2 tail is
        // 1 + 4 + 1 bytes, and the MP state code sits 5 bytes before it.
        let mut b = good.clone();
        let last = b.len() - 6 - 5;
        b[last] = 6;
        let e = VcpuState::from_bytes(&b).unwrap_err();
        assert!(e.to_string().contains("mp state"), "{e}");
        // The MSR count sits right after the FPU; an absurd count is refused before allocating.
        let msr_at =
            12 + 18 * 8 + 8 * 17 + 2 * 10 + 11 * 8 + 8 * 16 + 2 + 2 + 1 + 2 + 16 + 16 * 16 + 4;
        let mut b = good.clone();
        b[msr_at..msr_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            VcpuState::from_bytes(&b),
            Err(StateError::Invalid {
                field: "msr count",
                ..
            })
        ));
        let mut b = good;
        b[12 + 18 * 8 + 16] = 0x80; // cs attribute flags
        assert!(matches!(
            VcpuState::from_bytes(&b),
            Err(StateError::Invalid { .. })
        ));
    }
}
