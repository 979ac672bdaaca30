//! x86 boot setup: put a fresh vCPU into real, protected or long mode, give it CPUID, and load
//! a kernel (ELF, PVH or bzImage through `linux-loader`) with its boot parameters.
//!
//! # Low-memory map used by the setup
//!
//! | range               | content                                                      |
//! |---------------------|--------------------------------------------------------------|
//! | `0x500..0x520`      | GDT: null, 64-bit code (0x08), data (0x10), 32-bit code (0x18)|
//! | `0x6000..0x7000`    | PVH `hvm_start_info` + memory map                            |
//! | `0x7000..0x8000`    | Linux zero page (`boot_params`)                              |
//! | `0x8ff0`            | initial stack pointer for kernels                            |
//! | `0x9000..0x20000`   | page tables built by `vmkit-paging`'s builder                |
//! | `0x20000..0x21000`  | kernel command line                                          |
//! | `0x100000..`        | kernel / guest image                                         |
//!
//! Long mode uses an identity map of the first 4 GiB in 2 MiB pages (the host KVM here has no
//! 1 GiB pages), built with [`vmkit_paging::builder::PageTableBuilder`].

use std::io::{Read, Seek};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};
use vmkit_paging::builder::{BumpAllocator, MapFlags, PageSize, PageTableBuilder, PagingFormat};

use crate::hypervisor::{Hypervisor, Vcpu};
use crate::regs::{CpuidEntry, DescriptorTable, Regs, Segment, SpecialRegs};

/// Where the GDT goes.
pub const GDT_ADDR: u64 = 0x500;
/// Where the PVH start info goes.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// Where the Linux zero page goes.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for kernels.
pub const BOOT_STACK: u64 = 0x8ff0;
/// First byte of the page-table area.
pub const PAGE_TABLES_START: u64 = 0x9000;
/// End (exclusive) of the page-table area.
pub const PAGE_TABLES_END: u64 = 0x2_0000;
/// Where the kernel command line goes.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Maximum command-line length, including the terminating NUL.
pub const CMDLINE_MAX: usize = 4096;
/// Where kernels are loaded (and where the bundled guests are linked).
pub const KERNEL_ADDR: u64 = 0x10_0000;
/// How much of the address space the long-mode identity map covers.
pub const IDENTITY_MAP_BYTES: u64 = 4 << 30;

/// GDT selector of the 64-bit code segment.
pub const CODE64_SELECTOR: u16 = 0x08;
/// GDT selector of the flat data segment.
pub const DATA_SELECTOR: u16 = 0x10;
/// GDT selector of the flat 32-bit code segment.
pub const CODE32_SELECTOR: u16 = 0x18;

const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff, // 64-bit code, present, DPL0, accessed
    0x00cf_9300_0000_ffff, // flat data, 4 GiB, writable, accessed
    0x00cf_9b00_0000_ffff, // flat 32-bit code, 4 GiB
];

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors of boot setup.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Writing a boot structure to guest memory failed.
    #[error("cannot write the {what} at {addr:#x}: {source}")]
    Memory {
        /// Which structure.
        what: &'static str,
        /// Where.
        addr: u64,
        /// The memory error.
        source: vm_memory::GuestMemoryError,
    },
    /// Building the page tables failed.
    #[error("cannot build the boot page tables: {0}")]
    PageTables(#[from] vmkit_paging::builder::BuilderError),
    /// A hypervisor call failed.
    #[error(transparent)]
    Hypervisor(#[from] crate::hypervisor::Error),
    /// The kernel image could not be loaded.
    #[error("cannot load the kernel image: {0}")]
    Kernel(linux_loader::loader::Error),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing boot parameters failed.
    #[error("cannot write the boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
    /// A real-mode entry point does not fit a 20-bit address.
    #[error("real-mode entry {0:#x} is above 1 MiB")]
    RealModeEntry(u64),
}

/// Result type of boot setup.
pub type Result<T> = std::result::Result<T, BootError>;

/// The processor mode a vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// 16-bit real mode; the entry is a physical address below 1 MiB (CS = entry >> 4 &
    /// !0xfff, IP = the rest).
    Real,
    /// 32-bit protected mode, flat segments, paging off.
    Protected,
    /// 64-bit long mode with the identity map of the first 4 GiB.
    Long,
}

/// Writes the boot GDT at [`GDT_ADDR`].
pub fn write_gdt<M: GuestMemoryBackend>(mem: &M) -> Result<()> {
    for (i, d) in GDT.iter().enumerate() {
        let addr = GDT_ADDR + 8 * i as u64;
        mem.write_obj(*d, GuestAddress(addr))
            .map_err(|source| BootError::Memory {
                what: "GDT",
                addr,
                source,
            })?;
    }
    Ok(())
}

/// Builds the long-mode identity map of [`IDENTITY_MAP_BYTES`] in
/// `PAGE_TABLES_START..PAGE_TABLES_END` and returns CR3.
pub fn build_identity_map<M: GuestMemoryBackend>(mem: &M) -> Result<u64> {
    let alloc = BumpAllocator::new(
        GuestAddress(PAGE_TABLES_START),
        GuestAddress(PAGE_TABLES_END),
    );
    let mut b = PageTableBuilder::new(mem, PagingFormat::Level4, alloc)?;
    b.set_max_page_size(PageSize::Size2M);
    b.identity_map(GuestAddress(0), IDENTITY_MAP_BYTES, MapFlags::WRITABLE)?;
    Ok(b.root().0)
}

fn segment_from_descriptor(selector: u16, d: u64) -> Segment {
    let limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    let g = (d >> 55) & 1 == 1;
    Segment {
        base: ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000),
        limit: if g { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        present: (d >> 47) & 1 == 1,
        dpl: ((d >> 45) & 3) as u8,
        db: (d >> 54) & 1 == 1,
        s: (d >> 44) & 1 == 1,
        l: (d >> 53) & 1 == 1,
        g,
        avl: (d >> 52) & 1 == 1,
        unusable: false,
    }
}

/// Computes the special registers for `mode`, starting from the vCPU's current ones (which
/// keep the backend's defaults for TR, LDT, APIC base...). `cr3` is used in long mode.
pub fn mode_sregs(mut s: SpecialRegs, mode: CpuMode, cr3: u64) -> SpecialRegs {
    match mode {
        CpuMode::Real => {
            s.cr0 = CR0_ET | CR0_NE;
            s.cr4 = 0;
            s.efer = 0;
        }
        CpuMode::Protected | CpuMode::Long => {
            s.gdt = DescriptorTable {
                base: GDT_ADDR,
                limit: (GDT.len() * 8 - 1) as u16,
            };
            s.idt = DescriptorTable { base: 0, limit: 0 };
            let data = segment_from_descriptor(DATA_SELECTOR, GDT[2]);
            s.ds = data;
            s.es = data;
            s.fs = data;
            s.gs = data;
            s.ss = data;
            if mode == CpuMode::Long {
                s.cs = segment_from_descriptor(CODE64_SELECTOR, GDT[1]);
                s.cr3 = cr3;
                s.cr4 = CR4_PAE;
                s.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
                s.efer = EFER_LME | EFER_LMA;
            } else {
                s.cs = segment_from_descriptor(CODE32_SELECTOR, GDT[3]);
                s.cr0 = CR0_PE | CR0_ET | CR0_NE;
                s.cr4 = 0;
                s.efer = 0;
            }
        }
    }
    s
}

/// Puts `vcpu` in `mode` at `entry` with stack pointer `stack` and `rsi` (the boot-parameter
/// pointer of the Linux 64-bit protocol; `rbx` gets the same value for PVH). Writes the GDT
/// and, for long mode, the page tables into `mem`.
pub fn setup_vcpu<M: GuestMemoryBackend, V: Vcpu>(
    mem: &M,
    vcpu: &V,
    mode: CpuMode,
    entry: u64,
    stack: u64,
    rsi: u64,
) -> Result<()> {
    let mut sregs = vcpu.sregs()?;
    let mut regs = Regs {
        rflags: 2,
        rsp: stack,
        rsi,
        rbx: rsi,
        ..Default::default()
    };
    match mode {
        CpuMode::Real => {
            if entry >= 0x10_0000 {
                return Err(BootError::RealModeEntry(entry));
            }
            sregs = mode_sregs(sregs, mode, 0);
            let seg = (entry >> 4) & 0xf000;
            for s in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
                s.selector = seg as u16;
                s.base = seg << 4;
            }
            regs.rip = entry - (seg << 4);
        }
        CpuMode::Protected => {
            write_gdt(mem)?;
            sregs = mode_sregs(sregs, mode, 0);
            regs.rip = entry;
        }
        CpuMode::Long => {
            write_gdt(mem)?;
            let cr3 = build_identity_map(mem)?;
            sregs = mode_sregs(sregs, mode, cr3);
            regs.rip = entry;
        }
    }
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&regs)?;
    Ok(())
}

/// Gives `vcpu` the hypervisor's supported CPUID after `policy` edited it. The default policy
/// most VMMs want is [`default_cpuid_policy`].
pub fn configure_cpuid<H: Hypervisor, V: Vcpu>(
    hv: &H,
    vcpu: &V,
    policy: impl FnOnce(u32, &mut Vec<CpuidEntry>),
) -> Result<()> {
    let mut entries = hv.supported_cpuid()?;
    policy(vcpu.id(), &mut entries);
    vcpu.set_cpuid(&entries)?;
    Ok(())
}

/// Sets the initial APIC id (leaf 1 EBX bits 31:24) to the vCPU id and the hypervisor bit.
// A `Vec` (not a slice) so policies share one signature and may add or remove leaves.
#[allow(clippy::ptr_arg)]
pub fn default_cpuid_policy(vcpu_id: u32, entries: &mut Vec<CpuidEntry>) {
    for e in entries.iter_mut() {
        if e.function == 1 {
            e.ebx = (e.ebx & 0x00ff_ffff) | ((vcpu_id & 0xff) << 24);
            e.ecx |= 1 << 31;
        }
    }
}

/// How a loaded kernel must be entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// A plain ELF: enter in long mode at its entry point.
    Elf,
    /// Linux 64-bit boot protocol: long mode, `rsi` = zero page.
    Linux64 {
        /// Zero page address.
        zero_page: u64,
    },
    /// PVH: 32-bit protected mode, `rbx` = start info.
    Pvh {
        /// Start info address.
        start_info: u64,
    },
}

/// A loaded kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Entry point.
    pub entry: u64,
    /// Mode to enter in.
    pub mode: CpuMode,
    /// Boot protocol.
    pub protocol: BootProtocol,
    /// End of the loaded image.
    pub end: u64,
}

impl LoadedKernel {
    /// Sets up `vcpu` to enter this kernel.
    pub fn setup_vcpu<M: GuestMemoryBackend, V: Vcpu>(&self, mem: &M, vcpu: &V) -> Result<()> {
        let params = match self.protocol {
            BootProtocol::Elf => 0,
            BootProtocol::Linux64 { zero_page } => zero_page,
            BootProtocol::Pvh { start_info } => start_info,
        };
        setup_vcpu(mem, vcpu, self.mode, self.entry, BOOT_STACK, params)
    }
}

/// One E820 memory-map entry (address, size, type: 1 = RAM, 2 = reserved).
pub type E820 = (u64, u64, u32);

/// The E820 map of a `vmkit-memory` layout (RAM, reserved ranges such as the EBDA and the
/// legacy video/BIOS hole, ACPI ranges).
pub fn e820_of_layout(layout: &vmkit_memory::MemoryLayout) -> Vec<E820> {
    layout
        .e820()
        .iter()
        .map(|e| (e.addr, e.size, e.kind.as_u32()))
        .collect()
}

/// The E820 map of `mem`: each region as RAM.
pub fn e820_of<M: GuestMemoryBackend>(mem: &M) -> Vec<E820> {
    use vm_memory::GuestMemoryRegion;
    mem.iter().map(|r| (r.start_addr().0, r.len(), 1)).collect()
}

/// What kind of image [`load_kernel`] should expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// Decide from the image: ELF (PVH if it has the note) or bzImage.
    Auto,
    /// A plain ELF entered at its entry point in long mode, without boot parameters (the
    /// bundled test guests).
    PlainElf,
}

/// Loads a kernel image: an ELF with a PVH note boots through PVH, another ELF as a plain
/// ELF in long mode (with a zero page if `cmdline` is given), a bzImage through the Linux
/// 64-bit protocol. `e820` describes memory for the kernel.
pub fn load_kernel<M, F>(
    mem: &M,
    image: &mut F,
    format: KernelFormat,
    cmdline: Option<&str>,
    e820: &[E820],
) -> Result<LoadedKernel>
where
    M: GuestMemoryBackend,
    F: Read + Seek + ReadVolatile,
{
    let mut magic = [0u8; 4];
    image.rewind().map_err(|_| {
        BootError::Kernel(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::SeekElfStart,
        ))
    })?;
    let is_elf = image.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let _ = image.rewind();
    if is_elf {
        let r = Elf::load(mem, None, image, Some(GuestAddress(KERNEL_ADDR)))
            .map_err(BootError::Kernel)?;
        if format == KernelFormat::PlainElf {
            return Ok(LoadedKernel {
                entry: r.kernel_load.0,
                mode: CpuMode::Long,
                protocol: BootProtocol::Elf,
                end: r.kernel_end,
            });
        }
        if let PvhBootCapability::PvhEntryPresent(entry) = r.pvh_boot_cap {
            write_cmdline(mem, cmdline.unwrap_or(""))?;
            write_pvh_info(mem, e820)?;
            return Ok(LoadedKernel {
                entry: entry.0,
                mode: CpuMode::Protected,
                protocol: BootProtocol::Pvh {
                    start_info: PVH_INFO_ADDR,
                },
                end: r.kernel_end,
            });
        }
        write_cmdline(mem, cmdline.unwrap_or(""))?;
        write_zero_page(mem, None, cmdline.unwrap_or(""), e820)?;
        return Ok(LoadedKernel {
            entry: r.kernel_load.0,
            mode: CpuMode::Long,
            protocol: BootProtocol::Linux64 {
                zero_page: ZERO_PAGE_ADDR,
            },
            end: r.kernel_end,
        });
    }
    let r = BzImage::load(mem, None, image, Some(GuestAddress(KERNEL_ADDR)))
        .map_err(BootError::Kernel)?;
    write_cmdline(mem, cmdline.unwrap_or(""))?;
    write_zero_page(mem, r.setup_header, cmdline.unwrap_or(""), e820)?;
    Ok(LoadedKernel {
        // The 64-bit entry of a bzImage is 0x200 past the protected-mode code.
        entry: r.kernel_load.0 + 0x200,
        mode: CpuMode::Long,
        protocol: BootProtocol::Linux64 {
            zero_page: ZERO_PAGE_ADDR,
        },
        end: r.kernel_end,
    })
}

/// Writes `cmdline` (NUL-terminated) at [`CMDLINE_ADDR`].
pub fn write_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &str) -> Result<()> {
    let cl = Cmdline::try_from(cmdline, CMDLINE_MAX).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(BootError::Kernel)
}

/// Writes a Linux zero page at [`ZERO_PAGE_ADDR`].
pub fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    header: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline: &str,
    e820: &[E820],
) -> Result<()> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    params.hdr.type_of_loader = 0xff;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = 0x100_0000;
    let n = e820.len().min(params.e820_table.len());
    for (dst, (addr, size, type_)) in params.e820_table.iter_mut().zip(e820.iter()) {
        dst.addr = *addr;
        dst.size = *size;
        dst.r#type = *type_;
    }
    params.e820_entries = n as u8;
    LinuxBootConfigurator::write_bootparams::<M>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(BootError::BootParams)
}

/// Writes a PVH start info and memory map at [`PVH_INFO_ADDR`].
pub fn write_pvh_info<M: GuestMemoryBackend>(mem: &M, e820: &[E820]) -> Result<()> {
    let map: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        })
        .collect();
    let map_addr = PVH_INFO_ADDR + std::mem::size_of::<hvm_start_info>() as u64;
    let info = hvm_start_info {
        magic: 0x336e_c578,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: map_addr,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    params.set_sections(&map, GuestAddress(map_addr));
    PvhBootConfigurator::write_bootparams::<M>(&params, mem).map_err(BootError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn descriptors_decode_to_flat_segments() {
        let cs = segment_from_descriptor(CODE64_SELECTOR, GDT[1]);
        assert!(cs.l && cs.present && cs.s && cs.g);
        assert_eq!((cs.type_, cs.limit, cs.base), (0xb, 0xffff_ffff, 0));
        let ds = segment_from_descriptor(DATA_SELECTOR, GDT[2]);
        assert!(ds.db && !ds.l);
        assert_eq!(ds.type_, 3);
        let s = mode_sregs(SpecialRegs::default(), CpuMode::Long, 0x9000);
        assert_eq!(
            (s.cr3, s.efer & EFER_LMA, s.cr0 & CR0_PG),
            (0x9000, EFER_LMA, CR0_PG)
        );
        let s = mode_sregs(SpecialRegs::default(), CpuMode::Protected, 0);
        assert_eq!((s.cr0 & CR0_PG, s.cs.selector), (0, CODE32_SELECTOR));
    }

    #[test]
    fn identity_map_translates_low_and_high_addresses() {
        let m = mem();
        let cr3 = build_identity_map(&m).unwrap();
        assert_eq!(cr3, PAGE_TABLES_START);
        let t = vmkit_paging::builder::PageTableBuilder::from_root(
            &m,
            PagingFormat::Level4,
            BumpAllocator::new(GuestAddress(0), GuestAddress(0)),
            GuestAddress(cr3),
        )
        .unwrap();
        for addr in [0x1234u64, 0x10_0000, 0xd000_1234, 0xffff_f000] {
            let hit = t.lookup(addr).unwrap();
            assert_eq!(hit.phys.0, addr, "{addr:#x}");
            assert!(hit.flags.contains(MapFlags::WRITABLE));
        }
        assert!(t.lookup(1 << 32).is_none());
    }

    #[test]
    fn zero_page_and_pvh_info_carry_the_e820_map() {
        let m = mem();
        let e820 = [(0, 0x9fc00, 1), (0x100000, 0x300000, 1)];
        write_cmdline(&m, "console=ttyS0").unwrap();
        write_zero_page(&m, None, "console=ttyS0", &e820).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!(p.e820_entries, 2);
        assert_eq!({ p.e820_table[1].addr }, 0x100000);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        let mut cl = [0u8; 14];
        m.read_slice(&mut cl, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cl, b"console=ttyS0\0");
        write_pvh_info(&m, &e820).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!((info.magic, info.memmap_entries), (0x336e_c578, 2));
        let first: hvm_memmap_table_entry = m.read_obj(GuestAddress(info.memmap_paddr)).unwrap();
        assert_eq!(first.size, 0x9fc00);
        assert!(matches!(
            write_cmdline(&m, &"x".repeat(5000)),
            Err(BootError::Cmdline(_))
        ));
    }

    #[test]
    fn layout_e820_marks_the_legacy_holes_reserved() {
        let layout = vmkit_memory::MemoryLayout::x86_pc(64 << 20).unwrap();
        let e820 = e820_of_layout(&layout);
        assert!(e820.contains(&(0xa_0000, 0x6_0000, 2)), "{e820:x?}");
        assert!(e820
            .iter()
            .any(|&(a, s, t)| t == 1 && a <= 0x10_0000 && a + s >= 64 << 20));
    }

    #[test]
    fn plain_elf_guests_load_at_one_mib() {
        let m = mem();
        let mut img = std::io::Cursor::new(vmkit_test_guests::HELLO);
        let k = load_kernel(&m, &mut img, KernelFormat::PlainElf, None, &[]).unwrap();
        assert_eq!(
            (k.entry, k.mode, k.protocol),
            (KERNEL_ADDR, CpuMode::Long, BootProtocol::Elf)
        );
        let first: u8 = m.read_obj(GuestAddress(KERNEL_ADDR)).unwrap();
        assert_eq!(first, vmkit_test_guests::HELLO[0x1000]);
        let mut img = std::io::Cursor::new(vmkit_test_guests::HELLO);
        let k = load_kernel(
            &m,
            &mut img,
            KernelFormat::Auto,
            Some("quiet"),
            &e820_of(&m),
        )
        .unwrap();
        assert_eq!(
            k.protocol,
            BootProtocol::Linux64 {
                zero_page: ZERO_PAGE_ADDR
            }
        );
        let mut junk = std::io::Cursor::new(vec![0u8; 4096]);
        assert!(load_kernel(&m, &mut junk, KernelFormat::Auto, None, &[]).is_err());
    }
}
