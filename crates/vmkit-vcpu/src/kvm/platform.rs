//! Save and restore of KVM's in-kernel platform devices and clock: the two 8259 PICs, the
//! IOAPIC, the 8254 PIT and the kvmclock reference.
//!
//! A whole-VM snapshot needs these beside each vCPU's [`VcpuState`](crate::state::VcpuState):
//! without the IOAPIC's redirection table a restored guest never sees another device
//! interrupt, without the PIT its timer stops, and without the clock its time jumps.
//!
//! The blob is KVM-specific (other hypervisors have no in-kernel PIT), versioned and checked
//! like the vCPU state: the magic `VKPLAT\0\0`, a `u32` version, a presence byte per device
//! group (irqchip, PIT), then the devices' fields little-endian, then the clock.
//! [`KvmVm::set_platform_state`] refuses a blob naming a device this VM lacks (restore into
//! a VM configured like the saved one), and every decoding problem is a typed error.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_channel_state, kvm_pit_state2, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};

use super::{backend, KvmVm};
use crate::hypervisor::{Error, Result};

const MAGIC: &[u8; 8] = b"VKPLAT\0\0";
/// Version of the platform-state encoding.
pub const PLATFORM_STATE_VERSION: u32 = 1;
/// Bytes of each in-kernel irqchip's state (the `kvm_irqchip` union).
const CHIP_BYTES: usize = 512;
const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

fn bad(what: &str) -> Error {
    Error::InvalidArgument(format!("platform state: {what}"))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(bad(&format!("truncated in {what}")));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    fn flag(&mut self, what: &str) -> Result<bool> {
        match self.take(1, what)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(bad(&format!("{what} is {v}, not 0 or 1"))),
        }
    }
}

fn put_channel(w: &mut Vec<u8>, c: &kvm_pit_channel_state) {
    w.extend_from_slice(&c.count.to_le_bytes());
    w.extend_from_slice(&c.latched_count.to_le_bytes());
    w.extend_from_slice(&[
        c.count_latched,
        c.status_latched,
        c.status,
        c.read_state,
        c.write_state,
        c.write_latch,
        c.rw_mode,
        c.mode,
        c.bcd,
        c.gate,
    ]);
    w.extend_from_slice(&c.count_load_time.to_le_bytes());
}

fn read_channel(r: &mut Reader<'_>) -> Result<kvm_pit_channel_state> {
    let count = u32::from_le_bytes(r.array("PIT channel")?);
    let latched_count = u16::from_le_bytes(r.array("PIT channel")?);
    let b: [u8; 10] = r.array("PIT channel")?;
    let count_load_time = i64::from_le_bytes(r.array("PIT channel")?);
    Ok(kvm_pit_channel_state {
        count,
        latched_count,
        count_latched: b[0],
        status_latched: b[1],
        status: b[2],
        read_state: b[3],
        write_state: b[4],
        write_latch: b[5],
        rw_mode: b[6],
        mode: b[7],
        bcd: b[8],
        gate: b[9],
        count_load_time,
    })
}

impl KvmVm {
    /// Saves the in-kernel PICs and IOAPIC (if the VM has an irqchip), the PIT (if it has
    /// one) and the kvmclock value, as one blob. Pause every vCPU first.
    pub fn platform_state(&self) -> Result<Vec<u8>> {
        let mut w = Vec::with_capacity(2048);
        w.extend_from_slice(MAGIC);
        w.extend_from_slice(&PLATFORM_STATE_VERSION.to_le_bytes());
        // KVM_GET_IRQCHIP fails (ENXIO) when the VM has no in-kernel irqchip.
        let mut chips = Vec::new();
        for id in CHIPS {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            if self.fd.get_irqchip(&mut c).is_err() {
                break;
            }
            // SAFETY: every member of the `kvm_irqchip` union is plain integers, so its
            // 512-byte `dummy` view of what KVM wrote is initialised and valid.
            let raw = unsafe { c.chip.dummy };
            chips.extend(raw.iter().map(|&b| b as u8));
        }
        if chips.len() == CHIPS.len() * CHIP_BYTES {
            w.push(1);
            w.extend_from_slice(&chips);
        } else {
            w.push(0);
        }
        match self.fd.get_pit2() {
            Ok(p) => {
                w.push(1);
                for c in &p.channels {
                    put_channel(&mut w, c);
                }
                w.extend_from_slice(&p.flags.to_le_bytes());
            }
            Err(_) => w.push(0),
        }
        let clock = self.fd.get_clock().map_err(backend("KVM_GET_CLOCK"))?;
        w.extend_from_slice(&clock.clock.to_le_bytes());
        Ok(w)
    }

    /// Restores a blob from [`KvmVm::platform_state`] into this VM, which must have been
    /// created with the same devices (irqchip, PIT). Decoding is checked in full before
    /// anything is written to KVM.
    pub fn set_platform_state(&self, bytes: &[u8]) -> Result<()> {
        let mut r = Reader(bytes);
        if r.take(8, "magic")? != MAGIC {
            return Err(bad("bad magic (not a platform state blob)"));
        }
        let version = u32::from_le_bytes(r.array("version")?);
        if version != PLATFORM_STATE_VERSION {
            return Err(bad(&format!(
                "version {version}, this build reads {PLATFORM_STATE_VERSION}"
            )));
        }
        let mut chips = Vec::new();
        if r.flag("irqchip flag")? {
            for id in CHIPS {
                let raw = r.take(CHIP_BYTES, "irqchip")?;
                let mut c = kvm_irqchip {
                    chip_id: id,
                    ..Default::default()
                };
                let mut dummy = [0 as libc::c_char; CHIP_BYTES];
                for (d, s) in dummy.iter_mut().zip(raw) {
                    *d = *s as libc::c_char;
                }
                c.chip.dummy = dummy;
                chips.push(c);
            }
        }
        let pit = if r.flag("PIT flag")? {
            let mut p = kvm_pit_state2::default();
            for c in p.channels.iter_mut() {
                *c = read_channel(&mut r)?;
            }
            p.flags = u32::from_le_bytes(r.array("PIT flags")?);
            Some(p)
        } else {
            None
        };
        let clock = u64::from_le_bytes(r.array("clock")?);
        if !r.0.is_empty() {
            return Err(bad(&format!("{} unexpected trailing bytes", r.0.len())));
        }
        // Refuse a blob naming a device this VM lacks before writing anything, so a refused
        // blob never leaves the VM half restored.
        if !chips.is_empty() {
            let mut probe = kvm_irqchip {
                chip_id: KVM_IRQCHIP_PIC_MASTER,
                ..Default::default()
            };
            if self.fd.get_irqchip(&mut probe).is_err() {
                return Err(bad("the blob has an irqchip but this VM has none"));
            }
        }
        if pit.is_some() && self.fd.get_pit2().is_err() {
            return Err(bad("the blob has a PIT but this VM has none"));
        }
        for c in &chips {
            self.fd.set_irqchip(c).map_err(backend("KVM_SET_IRQCHIP"))?;
        }
        if let Some(p) = &pit {
            self.fd.set_pit2(p).map_err(backend("KVM_SET_PIT2"))?;
        }
        let c = kvm_clock_data {
            clock,
            ..Default::default()
        };
        self.fd.set_clock(&c).map_err(backend("KVM_SET_CLOCK"))
    }
}
