//! ACPI tables: how a stock Linux kernel learns about this machine's CPUs, interrupt
//! controllers and devices, built with rust-vmm's `acpi_tables` crate.
//!
//! # Why ACPI
//!
//! Debian's cloud kernel has neither MP-table parsing (`CONFIG_X86_MPPARSE`) nor command-line
//! virtio-mmio devices (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`): without firmware tables it sees
//! one CPU, no IOAPIC and no virtio devices. ACPI is the one description it reads, as in
//! Firecracker and Cloud Hypervisor.
//!
//! # The machine described
//!
//! A *hardware-reduced* ACPI platform (FADT flag `HW_REDUCED_ACPI`): no PM timer, no fixed
//! event blocks, no SCI, no legacy 8259 PIC (Linux then routes every interrupt through the
//! IOAPIC). What it has:
//!
//! - **MADT**: the local APIC page, one enabled local APIC per vCPU (APIC ID = processor UID
//!   = vCPU index) and the IOAPIC at 0xFEC00000 with GSIs 0-23. KVM's in-kernel IOAPIC routes
//!   GSI *n* to pin *n*, so no interrupt source overrides are needed: the PIT on GSI 0 is not
//!   used (hardware-reduced Linux skips the legacy timer setup) and every other device here
//!   uses its own GSI as its pin.
//! - **DSDT** (AML): `\_SB.COM1` (PNP0501, ports 0x3F8-0x3FF, GSI 4, edge, active high),
//!   `\_SB.RTC_` (PNP0B00, ports 0x70-0x71, GSI 8: without a firmware-described RTC, Linux's
//!   `rtc_cmos` asks for legacy IRQ 8, which a PIC-less platform never maps), one
//!   `\_SB.Vnnn` per virtio-mmio device (`_HID "LNRO0005"`, a `Memory32Fixed` window and an
//!   edge-triggered, active-high, exclusive interrupt: the device raises it through a KVM
//!   irqfd), and `\_S5_` so `poweroff` works through the FADT sleep registers.
//! - **FADT**: points at the DSDT (64-bit `X_DSDT`), declares no VGA, no MSI, no ASPM, no
//!   i8042 in the boot architecture flags (Linux then skips the keyboard probe; `reboot=k`
//!   still pulses the reset line through port 0x64), and the sleep control/status registers
//!   at ports [`SLEEP_CONTROL_PORT`] / [`SLEEP_STATUS_PORT`] (see
//!   [`crate::devices::AcpiSleep`]).
//! - **XSDT** listing FADT and MADT, and the **RSDP** pointing at the XSDT.
//!
//! # Where the tables go
//!
//! From [`RSDP_ADDR`] (0xE0000) up, inside the BIOS area the E820 map already reserves: the
//! kernel finds the RSDP there by its legacy scan, and mini-vmm also writes the address into
//! the zero page (`acpi_rsdp_addr`, boot protocol 2.14) and the PVH start info
//! (`rsdp_paddr`). Every table starts on a 16-byte boundary.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Where the RSDP goes (the start of the legacy BIOS scan area); the other tables follow.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// End (exclusive) of the area the tables may use: the start of high memory.
pub const TABLES_END: u64 = 0x10_0000;
/// Guest-physical address of the local APIC page.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Guest-physical address of the IOAPIC (KVM's in-kernel one).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Number of IOAPIC pins (KVM's IOAPIC has 24).
pub const IOAPIC_PINS: u32 = 24;
/// I/O port of the FADT sleep control register (write `SLP_TYP << 2 | SLP_EN`).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// I/O port of the FADT sleep status register.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// The `SLP_TYP` value `\_S5_` declares: written with `SLP_EN`, it powers the machine off.
pub const S5_SLEEP_TYPE: u8 = 5;

/// OEM ID in every table header.
const OEM_ID: [u8; 6] = *b"VMKIT ";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;
/// Table revision of the DSDT: 2 means 64-bit AML integers.
const DSDT_REVISION: u8 = 2;
/// Size of the standard table header.
const HEADER_LEN: usize = 36;
/// IA-PC boot architecture flags: VGA not present (bit 2), MSI not supported (bit 3), PCIe
/// ASPM controls absent (bit 4). Bit 1 (8042 present) is clear on purpose.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 4);

/// Errors building or placing the tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// The MADT cannot describe this many vCPUs.
    #[error("{0} vCPUs cannot be described (1 to 255)")]
    Cpus(usize),
    /// A device's MMIO window must lie below 4 GiB (`Memory32Fixed`).
    #[error("MMIO window {base:#x}+{size:#x} is not below 4 GiB")]
    WindowAbove4G {
        /// Base address.
        base: u64,
        /// Size.
        size: u64,
    },
    /// A device interrupt is not an IOAPIC pin.
    #[error("GSI {0} is not an IOAPIC pin (0 to 23)")]
    Gsi(u32),
    /// The tables do not fit between [`RSDP_ADDR`] and [`TABLES_END`].
    #[error("the ACPI tables need {need} bytes, only {room} fit below 1 MiB")]
    TooLarge {
        /// Bytes needed.
        need: u64,
        /// Bytes available.
        room: u64,
    },
    /// Writing to guest memory failed.
    #[error("cannot write the {table} table at {addr:#x}: {why}")]
    Memory {
        /// Table signature.
        table: String,
        /// Address.
        addr: u64,
        /// The memory error.
        why: String,
    },
}

/// A 16550 UART in the DSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialInfo {
    /// First I/O port (8 ports).
    pub port: u16,
    /// Its GSI.
    pub gsi: u32,
}

/// The CMOS RTC in the DSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtcInfo {
    /// Index port (the data port follows it).
    pub port: u16,
    /// Its GSI.
    pub gsi: u32,
}

/// A virtio-mmio device in the DSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioInfo {
    /// Base of the register window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// Its GSI (edge-triggered, active high).
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Number of vCPUs (local APIC IDs 0..cpus).
    pub cpus: usize,
    /// The serial port, if any.
    pub serial: Option<SerialInfo>,
    /// The CMOS RTC, if any.
    pub rtc: Option<RtcInfo>,
    /// The virtio-mmio devices, in `_UID` order.
    pub virtio: Vec<VirtioMmioInfo>,
}

/// Tables placed at their guest-physical addresses, ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// Address of the RSDP (what the kernel is told).
    pub rsdp_addr: u64,
    /// `(address, bytes)` of every table, RSDP first.
    pub tables: Vec<(u64, Vec<u8>)>,
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// The DSDT's AML body (without the table header): `\_SB` with the devices, and `\_S5_`.
pub fn dsdt_aml(machine: &Machine) -> Result<Vec<u8>, AcpiError> {
    let mut sb = Vec::new();
    if let Some(s) = machine.serial {
        if s.gsi >= IOAPIC_PINS {
            return Err(AcpiError::Gsi(s.gsi));
        }
        let io = aml::IO::new(s.port, s.port, 1, 8);
        let irq = aml::Interrupt::new(true, true, false, false, s.gsi);
        let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
        let hid = aml::EISAName::new("PNP0501");
        // One statement, so the temporaries the device borrows live long enough.
        aml::Device::new(
            "COM1".into(),
            vec![
                &aml::Name::new("_HID".into(), &hid),
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut sb);
    }
    if let Some(r) = machine.rtc {
        if r.gsi >= IOAPIC_PINS {
            return Err(AcpiError::Gsi(r.gsi));
        }
        let io = aml::IO::new(r.port, r.port, 1, 2);
        let irq = aml::Interrupt::new(true, true, false, false, r.gsi);
        let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
        let hid = aml::EISAName::new("PNP0B00");
        aml::Device::new(
            "RTC_".into(),
            vec![
                &aml::Name::new("_HID".into(), &hid),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut sb);
    }
    for (i, d) in machine.virtio.iter().enumerate() {
        let (base, len) = match (u32::try_from(d.base), u32::try_from(d.size)) {
            (Ok(b), Ok(l)) if d.base.checked_add(d.size).is_some_and(|e| e <= 1 << 32) => (b, l),
            _ => {
                return Err(AcpiError::WindowAbove4G {
                    base: d.base,
                    size: d.size,
                })
            }
        };
        if d.gsi >= IOAPIC_PINS {
            return Err(AcpiError::Gsi(d.gsi));
        }
        let mem = aml::Memory32Fixed::new(true, base, len);
        let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        // Three hex digits keep the name at four characters for up to 4096 devices.
        let name = format!("V{:03X}", i & 0xfff);
        let uid = i as u64;
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                // Cache-coherent DMA: the device sees guest RAM as the CPU does.
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut sb);
    }
    let mut out = aml::Scope::raw("\\_SB_".into(), sb);
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut out);
    Ok(out)
}

/// The DSDT table.
pub fn dsdt(machine: &Machine) -> Result<Vec<u8>, AcpiError> {
    let mut t = Sdt::new(
        *b"DSDT",
        HEADER_LEN as u32,
        DSDT_REVISION,
        OEM_ID,
        *b"VMKTDSDT",
        OEM_REVISION,
    );
    t.append_slice(&dsdt_aml(machine)?);
    Ok(t.as_slice().to_vec())
}

/// The MADT: local APIC address, one enabled local APIC per vCPU, the IOAPIC.
pub fn madt(cpus: usize) -> Result<Vec<u8>, AcpiError> {
    let n = u8::try_from(cpus)
        .ok()
        .filter(|&n| n > 0 && n < 0xff)
        .ok_or(AcpiError::Cpus(cpus))?;
    let mut m = MADT::new(
        OEM_ID,
        *b"VMKTMADT",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..n {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    Ok(bytes_of(&m))
}

/// The FADT of a hardware-reduced platform whose DSDT is at `dsdt_addr`.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, *b"VMKTFADT", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    // The CMOS keeps the century in register 0x32 (see `crate::devices::Cmos`).
    f.century = 0x32;
    f.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_CONTROL_PORT),
    );
    f.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_STATUS_PORT),
    );
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"VMKITVMM").into();
    bytes_of(&f.finalize())
}

/// Builds every table for `machine` and assigns their addresses from [`RSDP_ADDR`].
pub fn build(machine: &Machine) -> Result<AcpiTables, AcpiError> {
    let rsdp_len = Rsdp::len() as u64;
    let dsdt = dsdt(machine)?;
    let madt = madt(machine.cpus)?;
    let dsdt_addr = align16(RSDP_ADDR + rsdp_len);
    let fadt_addr = align16(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align16(fadt_addr + fadt.len() as u64);
    let xsdt_addr = align16(madt_addr + madt.len() as u64);
    let mut x = XSDT::new(OEM_ID, *b"VMKTXSDT", OEM_REVISION);
    x.add_entry(fadt_addr);
    x.add_entry(madt_addr);
    let xsdt = bytes_of(&x);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > TABLES_END {
        return Err(AcpiError::TooLarge {
            need: end - RSDP_ADDR,
            room: TABLES_END - RSDP_ADDR,
        });
    }
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(AcpiTables {
        rsdp_addr: RSDP_ADDR,
        tables: vec![
            (RSDP_ADDR, rsdp),
            (dsdt_addr, dsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (xsdt_addr, xsdt),
        ],
    })
}

impl AcpiTables {
    /// Writes every table into guest memory.
    pub fn write_to<M: GuestMemory>(&self, mem: &M) -> Result<(), AcpiError> {
        for (addr, bytes) in &self.tables {
            mem.write_slice(bytes, GuestAddress(*addr))
                .map_err(|e| AcpiError::Memory {
                    table: String::from_utf8_lossy(&bytes[..4.min(bytes.len())]).into_owned(),
                    addr: *addr,
                    why: e.to_string(),
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn machine(cpus: usize, n: usize) -> Machine {
        Machine {
            cpus,
            serial: Some(SerialInfo {
                port: 0x3f8,
                gsi: 4,
            }),
            rtc: Some(RtcInfo { port: 0x70, gsi: 8 }),
            virtio: (0..n)
                .map(|i| VirtioMmioInfo {
                    base: 0xd000_0000 + 0x1000 * i as u64,
                    size: 0x200,
                    gsi: 5 + i as u32,
                })
                .collect(),
        }
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Reads a table from guest memory by its header length, checking signature and checksum.
    fn table(mem: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let mut hdr = [0u8; HEADER_LEN];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        assert_eq!(&hdr[..4], sig, "signature at {addr:#x}");
        let len = u32_at(&hdr, 4) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    /// MADT entries as (type, bytes).
    fn madt_entries(t: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = HEADER_LEN + 8;
        while off < t.len() {
            let (ty, len) = (t[off], t[off + 1] as usize);
            assert!(len >= 2 && off + len <= t.len(), "entry at {off} overruns");
            out.push((ty, t[off..off + len].to_vec()));
            off += len;
        }
        out
    }

    /// `Memory32Fixed` windows (base, len) and extended IRQs (flags, gsi) found in AML.
    type Resources = (Vec<(u32, u32)>, Vec<(u8, u32)>);

    /// Every `Memory32Fixed` and extended-IRQ descriptor in AML.
    fn resources(aml: &[u8]) -> Resources {
        let (mut mem, mut irq) = (Vec::new(), Vec::new());
        for i in 0..aml.len() {
            let w = &aml[i..];
            if w.len() >= 12 && w[0] == 0x86 && w[1] == 9 && w[2] == 0 {
                mem.push((u32_at(w, 4), u32_at(w, 8)));
            }
            if w.len() >= 9 && w[0] == 0x89 && w[1] == 6 && w[2] == 0 && w[4] == 1 {
                irq.push((w[3], u32_at(w, 5)));
            }
        }
        (mem, irq)
    }

    fn count(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    #[test]
    fn tables_chain_from_the_rsdp_and_check_out() {
        let m = machine(2, 3);
        let t = build(&m).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        t.write_to(&mem).unwrap();
        for (addr, bytes) in &t.tables {
            assert_eq!(addr % 16, 0, "16-byte aligned");
            assert!(addr + bytes.len() as u64 <= TABLES_END);
        }
        // RSDP: both checksums, revision 2, XSDT pointer.
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(t.rsdp_addr))
            .unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!((rsdp[15], u32_at(&rsdp, 20)), (2, 36));
        let xsdt = table(&mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), HEADER_LEN + 16);
        let fadt = table(&mem, u64_at(&xsdt, 36), b"FACP");
        let madt = table(&mem, u64_at(&xsdt, 44), b"APIC");
        // FADT: hardware reduced, X_DSDT, boot flags, sleep registers in I/O space.
        assert_eq!(fadt.len(), 276);
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), IAPC_BOOT_ARCH);
        assert_eq!(u32_at(&fadt, 40), 0, "no 32-bit DSDT pointer");
        let dsdt = table(&mem, u64_at(&fadt, 140), b"DSDT");
        assert_eq!(dsdt[8], DSDT_REVISION);
        for (off, port) in [(244, SLEEP_CONTROL_PORT), (256, SLEEP_STATUS_PORT)] {
            assert_eq!(fadt[off], 1, "system I/O space");
            assert_eq!(u64_at(&fadt, off + 4), u64::from(port));
        }
        // MADT: LAPIC address, one LAPIC per vCPU, then the IOAPIC.
        assert_eq!(u32_at(&madt, 36), LAPIC_ADDR);
        let e = madt_entries(&madt);
        assert_eq!(e.len(), 3);
        for (id, (ty, b)) in e[..2].iter().enumerate() {
            assert_eq!((*ty, b.len(), b[2], b[3]), (0, 8, id as u8, id as u8));
            assert_eq!(u32_at(b, 4), 1, "enabled");
        }
        assert_eq!((e[2].0, e[2].1.len()), (1, 12));
        assert_eq!((u32_at(&e[2].1, 4), u32_at(&e[2].1, 8)), (IOAPIC_ADDR, 0));
        // DSDT: the devices and their resources.
        assert_eq!(count(&dsdt, b"LNRO0005\0"), 3);
        assert_eq!(count(&dsdt, b"_SB_"), 1);
        for name in [&b"COM1"[..], b"V000", b"V001", b"V002", b"_S5_"] {
            assert_eq!(count(&dsdt, name), 1, "{}", String::from_utf8_lossy(name));
        }
        let (mems, irqs) = resources(&dsdt);
        let want: Vec<_> = m.virtio.iter().map(|d| (d.base as u32, 0x200)).collect();
        assert_eq!(mems, want);
        // Consumer + edge, active high, exclusive: flags 0b0011.
        assert_eq!(irqs, vec![(3, 4), (3, 8), (3, 5), (3, 6), (3, 7)]);
        assert_eq!(count(&dsdt, b"RTC_"), 1);
        // The RTC's ports: 0x70..0x70, 2 ports.
        assert_eq!(count(&dsdt, &[0x47, 1, 0x70, 0, 0x70, 0, 1, 2]), 1);
        // The serial port's I/O descriptor: decode16, 0x3f8..0x3f8, 8 ports.
        assert_eq!(count(&dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]), 1);
    }

    #[test]
    fn dsdt_without_devices_still_has_s5() {
        let m = Machine {
            cpus: 1,
            serial: None,
            rtc: None,
            virtio: vec![],
        };
        let d = dsdt(&m).unwrap();
        assert_eq!(sum(&d), 0);
        assert_eq!(u32_at(&d, 4) as usize, d.len());
        assert_eq!(count(&d, b"_S5_"), 1);
        assert_eq!(resources(&d), (vec![], vec![]));
        // \_S5_ = Package(4) { 5, 0, 0, 0 }: PackageOp, length, 4 elements, BytePrefix 5.
        assert_eq!(count(&d, &[0x12, 0x07, 0x04, 0x0a, 0x05, 0, 0, 0]), 1);
    }

    #[test]
    fn bad_machines_are_refused_with_the_value() {
        assert_eq!(madt(0), Err(AcpiError::Cpus(0)));
        assert_eq!(madt(300), Err(AcpiError::Cpus(300)));
        let mut m = machine(1, 1);
        m.virtio[0].base = 0xffff_ff00;
        assert_eq!(
            build(&m),
            Err(AcpiError::WindowAbove4G {
                base: 0xffff_ff00,
                size: 0x200
            })
        );
        let mut m = machine(1, 1);
        m.virtio[0].gsi = 24;
        assert_eq!(build(&m), Err(AcpiError::Gsi(24)));
        let mut m = machine(1, 0);
        m.rtc = Some(RtcInfo {
            port: 0x70,
            gsi: 24,
        });
        assert_eq!(build(&m), Err(AcpiError::Gsi(24)));
        m.rtc = None;
        m.serial = Some(SerialInfo {
            port: 0x3f8,
            gsi: 99,
        });
        assert_eq!(
            build(&m).unwrap_err().to_string(),
            "GSI 99 is not an IOAPIC pin (0 to 23)"
        );
        // So many vCPUs that the MADT spills past 1 MiB.
        let big = Machine {
            cpus: 200,
            serial: None,
            rtc: None,
            virtio: vec![],
        };
        assert!(build(&big).is_ok());
        let huge = Machine {
            cpus: 1,
            serial: None,
            rtc: None,
            virtio: vec![machine(1, 1).virtio[0]; 2000],
        };
        assert!(matches!(
            build(&huge),
            Err(AcpiError::TooLarge { room: 0x2_0000, .. })
        ));
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0xe_0000)]).unwrap();
        let e = build(&big).unwrap().write_to(&small).unwrap_err();
        assert!(
            matches!(
                e,
                AcpiError::Memory {
                    addr: RSDP_ADDR,
                    ..
                }
            ),
            "{e}"
        );
    }
}
