//! Guest physical address space layout: RAM regions, MMIO holes, reserved ranges and the
//! E820 map handed to the guest.
//!
//! # Model
//!
//! A guest's physical address space is described by three kinds of ranges:
//!
//! - **RAM regions** are backed by host memory. Each becomes one region of the
//!   [`GuestRam`](crate::GuestRam) and, by the crate-wide convention, one hypervisor memory
//!   slot whose number is the region's index (see [`crate::dirty`]). RAM regions must be
//!   page aligned (4 KiB), non-empty, and must not overlap each other or an MMIO hole.
//! - **MMIO holes** are address ranges where no RAM is mapped because devices decode them
//!   (the PCI hole below 4 GiB, the IOAPIC and local APIC pages). Accesses there exit to the
//!   VMM. Holes are not listed in the E820 map: a gap in the map is how a PC tells the OS
//!   "not RAM".
//! - **Reserved ranges** are byte-granular ranges the guest OS must not use as RAM. They may
//!   lie inside a RAM region (the legacy VGA window and BIOS area of a PC are backed by RAM
//!   but reserved) or outside all RAM (firmware tables, MMCONFIG). Each carries an
//!   [`E820Type`]. Reserved ranges must not overlap each other.
//!
//! [`MemoryLayout::e820`] turns this into a sorted, non-overlapping E820 map: the RAM regions
//! minus the reserved ranges, plus the reserved ranges with their own type.
//!
//! # The x86 PC layout
//!
//! [`MemoryLayout::x86_pc`] builds the layout most x86 VMMs use (Firecracker, Cloud
//! Hypervisor, QEMU's `pc`/`q35` machines differ only in details):
//!
//! ```text
//! 0x0000_0000 .. 0x0009_fc00   RAM (conventional memory)                  E820 RAM
//! 0x0009_fc00 .. 0x000a_0000   EBDA (extended BIOS data area)            E820 reserved
//! 0x000a_0000 .. 0x0010_0000   VGA window, option ROMs, BIOS ROM         E820 reserved
//! 0x0010_0000 .. min(ram, 3 GiB)   RAM                                   E820 RAM
//! 0xc000_0000 .. 0x1_0000_0000 32-bit MMIO hole (PCI BARs, IOAPIC, LAPIC) not in E820
//! 0x1_0000_0000 .. 4 GiB + (ram - 3 GiB)   RAM above 4 GiB (if ram > 3 GiB) E820 RAM
//! ```
//!
//! The low region starts at 0 and is one RAM region (one hypervisor slot) even though the
//! E820 map reserves the legacy window inside it: real-mode code and the boot protocol
//! expect memory there.
//!
//! ```
//! use vmkit_memory::{E820Type, MemoryLayout};
//!
//! let layout = MemoryLayout::x86_pc(4 << 30).unwrap();
//! // 3 GiB below the hole, 1 GiB above 4 GiB.
//! assert_eq!(layout.ram_regions().len(), 2);
//! assert_eq!(layout.ram_regions()[1].guest_addr.0, 1 << 32);
//! let e820 = layout.e820();
//! assert_eq!(e820[0].addr, 0);
//! assert_eq!(e820[0].size, 0x9fc00);
//! assert_eq!(e820[0].kind, E820Type::Ram);
//! assert_eq!(layout.ram_bytes(), 4 << 30);
//! ```

use vm_memory::GuestAddress;

/// Page size every RAM region is aligned to: the 4 KiB x86 base page, which is also the
/// granule of dirty logging.
pub const PAGE_SIZE: u64 = 4096;

/// Start of the 32-bit MMIO hole in [`MemoryLayout::x86_pc`]: 3 GiB.
pub const X86_MMIO_HOLE_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO hole in [`MemoryLayout::x86_pc`]: 4 GiB.
pub const X86_MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Start of the extended BIOS data area, the end of conventional low RAM in the E820 map.
pub const X86_EBDA_START: u64 = 0x9_fc00;
/// Start of the legacy VGA window (0xa0000), reserved up to [`X86_HIGH_MEMORY_START`].
pub const X86_VGA_START: u64 = 0xa_0000;
/// Start of memory above the legacy 1 MiB area, where kernels are usually loaded.
pub const X86_HIGH_MEMORY_START: u64 = 0x10_0000;

/// Errors found while building a [`MemoryLayout`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A RAM region has zero size.
    #[error("RAM region at {addr:#x} has zero size")]
    EmptyRegion {
        /// Guest address of the region.
        addr: u64,
    },
    /// A RAM region's start or size is not a multiple of [`PAGE_SIZE`].
    #[error("RAM region {addr:#x}+{size:#x} is not aligned to the {PAGE_SIZE:#x}-byte page")]
    Unaligned {
        /// Guest address of the region.
        addr: u64,
        /// Size of the region in bytes.
        size: u64,
    },
    /// A range's end lies beyond the 64-bit address space.
    #[error("range {addr:#x}+{size:#x} overflows the 64-bit guest address space")]
    Overflow {
        /// Start of the range.
        addr: u64,
        /// Size of the range in bytes.
        size: u64,
    },
    /// Two ranges that must be disjoint overlap.
    #[error("{what} {a_addr:#x}+{a_size:#x} overlaps {b_addr:#x}+{b_size:#x}")]
    Overlap {
        /// Which kinds of ranges collided (e.g. "RAM region", "MMIO hole").
        what: &'static str,
        /// Start of the first range.
        a_addr: u64,
        /// Size of the first range.
        a_size: u64,
        /// Start of the second range.
        b_addr: u64,
        /// Size of the second range.
        b_size: u64,
    },
    /// A reserved range has zero size.
    #[error("reserved range at {addr:#x} has zero size")]
    EmptyReserved {
        /// Start of the range.
        addr: u64,
    },
    /// A reserved range was given the RAM type.
    #[error("reserved range {addr:#x}+{size:#x} cannot have the E820 RAM type")]
    ReservedAsRam {
        /// Start of the range.
        addr: u64,
        /// Size of the range.
        size: u64,
    },
    /// The layout has no RAM region at all.
    #[error("a memory layout needs at least one RAM region")]
    NoRam,
    /// [`MemoryLayout::x86_pc`] was asked for less RAM than the legacy 1 MiB area needs.
    #[error("x86 PC layout needs at least {min:#x} bytes of RAM, got {got:#x}")]
    TooLittleRam {
        /// Minimum accepted.
        min: u64,
        /// Amount requested.
        got: u64,
    },
}

/// The memory type of an E820 entry, with the values of the BIOS E820 interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM (1).
    Ram = 1,
    /// Reserved, not usable by the OS (2).
    Reserved = 2,
    /// ACPI tables, reclaimable once read (3).
    Acpi = 3,
    /// ACPI non-volatile storage, preserved across sleep (4).
    Nvs = 4,
}

impl E820Type {
    /// The numeric value written into `boot_params.e820_table[i].type`.
    pub fn as_u32(self) -> u32 {
        self as u32
    }
}

/// One entry of an E820 memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest physical address of the range.
    pub addr: u64,
    /// Size of the range in bytes.
    pub size: u64,
    /// What the guest may do with the range.
    pub kind: E820Type,
}

/// A RAM region of a layout: guest-physical start and size, both page aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// First guest physical address.
    pub guest_addr: GuestAddress,
    /// Size in bytes (a non-zero multiple of [`PAGE_SIZE`]).
    pub size: u64,
}

impl RamRegion {
    /// One past the last address of the region.
    pub fn end(&self) -> u64 {
        // Cannot overflow: checked when the layout was built.
        self.guest_addr.0 + self.size
    }
}

/// A byte range with an E820 type other than RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservedRange {
    /// First guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// The E820 type reported to the guest.
    pub kind: E820Type,
}

/// A guest physical range decoded by devices, where no RAM may be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioHole {
    /// First guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A validated description of guest physical memory; see the [module docs](self).
///
/// Invariants (checked by every constructor and mutator): RAM regions are sorted,
/// non-empty, page aligned and pairwise disjoint; MMIO holes are disjoint from each other and
/// from RAM; reserved ranges are non-empty, non-RAM typed and disjoint from each other; no
/// range overflows `u64`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLayout {
    ram: Vec<RamRegion>,
    holes: Vec<MmioHole>,
    reserved: Vec<ReservedRange>,
}

fn end_of(addr: u64, size: u64) -> Result<u64, LayoutError> {
    addr.checked_add(size)
        .ok_or(LayoutError::Overflow { addr, size })
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    // Both ranges are known not to overflow.
    a < b + b_len && b < a + a_len
}

impl MemoryLayout {
    /// Builds a layout from RAM regions given as `(guest address, size)` pairs, in any order.
    ///
    /// Fails if a region is empty, unaligned, overflows, or overlaps another.
    pub fn new(ram: &[(GuestAddress, u64)]) -> Result<Self, LayoutError> {
        if ram.is_empty() {
            return Err(LayoutError::NoRam);
        }
        let mut regions = Vec::with_capacity(ram.len());
        for &(addr, size) in ram {
            if size == 0 {
                return Err(LayoutError::EmptyRegion { addr: addr.0 });
            }
            if addr.0 % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 {
                return Err(LayoutError::Unaligned { addr: addr.0, size });
            }
            end_of(addr.0, size)?;
            regions.push(RamRegion {
                guest_addr: addr,
                size,
            });
        }
        regions.sort_by_key(|r| r.guest_addr);
        for pair in regions.windows(2) {
            if let [a, b] = pair {
                if a.end() > b.guest_addr.0 {
                    return Err(LayoutError::Overlap {
                        what: "RAM region",
                        a_addr: a.guest_addr.0,
                        a_size: a.size,
                        b_addr: b.guest_addr.0,
                        b_size: b.size,
                    });
                }
            }
        }
        Ok(MemoryLayout {
            ram: regions,
            holes: Vec::new(),
            reserved: Vec::new(),
        })
    }

    /// The standard x86 PC layout for `ram_bytes` of RAM; see the [module docs](self).
    ///
    /// `ram_bytes` must be page aligned and at least 2 MiB (the legacy first megabyte plus
    /// room for a kernel).
    pub fn x86_pc(ram_bytes: u64) -> Result<Self, LayoutError> {
        const MIN: u64 = 2 << 20;
        if ram_bytes < MIN {
            return Err(LayoutError::TooLittleRam {
                min: MIN,
                got: ram_bytes,
            });
        }
        if ram_bytes % PAGE_SIZE != 0 {
            return Err(LayoutError::Unaligned {
                addr: 0,
                size: ram_bytes,
            });
        }
        let low = ram_bytes.min(X86_MMIO_HOLE_START);
        let mut ranges = vec![(GuestAddress(0), low)];
        if ram_bytes > low {
            ranges.push((GuestAddress(X86_MMIO_HOLE_END), ram_bytes - low));
        }
        let mut layout = Self::new(&ranges)?;
        layout.add_mmio_hole(X86_MMIO_HOLE_START, X86_MMIO_HOLE_END - X86_MMIO_HOLE_START)?;
        layout.add_reserved(
            X86_EBDA_START,
            X86_VGA_START - X86_EBDA_START,
            E820Type::Reserved,
        )?;
        layout.add_reserved(
            X86_VGA_START,
            X86_HIGH_MEMORY_START - X86_VGA_START,
            E820Type::Reserved,
        )?;
        Ok(layout)
    }

    /// Declares an MMIO hole. It must not overlap RAM or another hole.
    pub fn add_mmio_hole(&mut self, addr: u64, size: u64) -> Result<&mut Self, LayoutError> {
        end_of(addr, size)?;
        for r in &self.ram {
            if overlaps(addr, size, r.guest_addr.0, r.size) {
                return Err(LayoutError::Overlap {
                    what: "MMIO hole and RAM region",
                    a_addr: addr,
                    a_size: size,
                    b_addr: r.guest_addr.0,
                    b_size: r.size,
                });
            }
        }
        for h in &self.holes {
            if overlaps(addr, size, h.addr, h.size) {
                return Err(LayoutError::Overlap {
                    what: "MMIO hole",
                    a_addr: addr,
                    a_size: size,
                    b_addr: h.addr,
                    b_size: h.size,
                });
            }
        }
        self.holes.push(MmioHole { addr, size });
        self.holes.sort_by_key(|h| h.addr);
        Ok(self)
    }

    /// Declares a reserved range of type `kind` (not [`E820Type::Ram`]). It may lie inside
    /// or outside RAM but must not overlap another reserved range.
    pub fn add_reserved(
        &mut self,
        addr: u64,
        size: u64,
        kind: E820Type,
    ) -> Result<&mut Self, LayoutError> {
        if size == 0 {
            return Err(LayoutError::EmptyReserved { addr });
        }
        if kind == E820Type::Ram {
            return Err(LayoutError::ReservedAsRam { addr, size });
        }
        end_of(addr, size)?;
        for r in &self.reserved {
            if overlaps(addr, size, r.addr, r.size) {
                return Err(LayoutError::Overlap {
                    what: "reserved range",
                    a_addr: addr,
                    a_size: size,
                    b_addr: r.addr,
                    b_size: r.size,
                });
            }
        }
        self.reserved.push(ReservedRange { addr, size, kind });
        self.reserved.sort_by_key(|r| r.addr);
        Ok(self)
    }

    /// RAM regions sorted by address. Index `i` is hypervisor slot `i` by convention.
    pub fn ram_regions(&self) -> &[RamRegion] {
        &self.ram
    }

    /// MMIO holes sorted by address.
    pub fn mmio_holes(&self) -> &[MmioHole] {
        &self.holes
    }

    /// Reserved ranges sorted by address.
    pub fn reserved(&self) -> &[ReservedRange] {
        &self.reserved
    }

    /// Total bytes of RAM over all regions.
    pub fn ram_bytes(&self) -> u64 {
        self.ram.iter().map(|r| r.size).sum()
    }

    /// Is `addr` inside an MMIO hole?
    pub fn is_mmio(&self, addr: u64) -> bool {
        self.holes
            .iter()
            .any(|h| addr >= h.addr && addr - h.addr < h.size)
    }

    /// The E820 map: RAM minus reserved ranges (type RAM), plus every reserved range with its
    /// type. Sorted by address, non-overlapping, adjacent RAM pieces not merged across
    /// regions (each entry stays inside one RAM region).
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut out = Vec::new();
        for r in &self.ram {
            let mut cursor = r.guest_addr.0;
            let end = r.end();
            for res in &self.reserved {
                let res_end = res.addr + res.size;
                if res_end <= cursor || res.addr >= end {
                    continue;
                }
                if res.addr > cursor {
                    out.push(E820Entry {
                        addr: cursor,
                        size: res.addr - cursor,
                        kind: E820Type::Ram,
                    });
                }
                cursor = cursor.max(res_end.min(end));
            }
            if cursor < end {
                out.push(E820Entry {
                    addr: cursor,
                    size: end - cursor,
                    kind: E820Type::Ram,
                });
            }
        }
        out.extend(self.reserved.iter().map(|r| E820Entry {
            addr: r.addr,
            size: r.size,
            kind: r.kind,
        }));
        out.sort_by_key(|e| e.addr);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn x86_pc_small_has_one_region_and_legacy_holes() {
        let l = MemoryLayout::x86_pc(256 << 20).unwrap();
        assert_eq!(l.ram_regions().len(), 1);
        assert_eq!(l.ram_bytes(), 256 << 20);
        let e = l.e820();
        assert_eq!(
            e,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820Type::Ram
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x400,
                    kind: E820Type::Reserved
                },
                E820Entry {
                    addr: 0xa0000,
                    size: 0x60000,
                    kind: E820Type::Reserved
                },
                E820Entry {
                    addr: 0x100000,
                    size: (256 << 20) - 0x100000,
                    kind: E820Type::Ram
                },
            ]
        );
        assert!(!l.is_mmio(0x1000));
        assert!(l.is_mmio(0xfee0_0000));
    }

    #[test]
    fn x86_pc_large_splits_around_hole() {
        let l = MemoryLayout::x86_pc(5 << 30).unwrap();
        let r = l.ram_regions();
        assert_eq!(r[0].size, 3 << 30);
        assert_eq!(r[1].guest_addr.0, 4 << 30);
        assert_eq!(r[1].size, 2 << 30);
        let e = l.e820();
        assert_eq!(e.last().unwrap().addr, 4 << 30);
        assert_eq!(l.mmio_holes().len(), 1);
        assert_eq!(E820Type::Nvs.as_u32(), 4);
        assert_eq!(E820Type::Acpi.as_u32(), 3);
    }

    #[test]
    fn x86_pc_rejects_bad_sizes() {
        assert_eq!(
            MemoryLayout::x86_pc(1 << 20),
            Err(LayoutError::TooLittleRam {
                min: 2 << 20,
                got: 1 << 20
            })
        );
        assert!(matches!(
            MemoryLayout::x86_pc((4 << 20) + 1),
            Err(LayoutError::Unaligned { .. })
        ));
    }

    #[test]
    fn rejects_invalid_regions() {
        assert_eq!(MemoryLayout::new(&[]), Err(LayoutError::NoRam));
        assert_eq!(
            MemoryLayout::new(&[(GuestAddress(0), 0)]),
            Err(LayoutError::EmptyRegion { addr: 0 })
        );
        assert!(matches!(
            MemoryLayout::new(&[(GuestAddress(0x800), 0x1000)]),
            Err(LayoutError::Unaligned { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(&[(GuestAddress(u64::MAX - 0xfff), 0x2000)]),
            Err(LayoutError::Overflow { .. })
        ));
        let err = MemoryLayout::new(&[(GuestAddress(0x2000), 0x2000), (GuestAddress(0), 0x3000)])
            .unwrap_err();
        assert!(matches!(err, LayoutError::Overlap { .. }));
        assert!(err.to_string().contains("0x2000"), "{err}");
    }

    #[test]
    fn rejects_bad_holes_and_reserved() {
        let mut l = MemoryLayout::new(&[(GuestAddress(0), 0x10000)]).unwrap();
        assert!(matches!(
            l.add_mmio_hole(0x8000, 0x10000),
            Err(LayoutError::Overlap { .. })
        ));
        l.add_mmio_hole(0x20000, 0x1000).unwrap();
        assert!(matches!(
            l.add_mmio_hole(0x20800, 0x1000),
            Err(LayoutError::Overlap { .. })
        ));
        assert!(matches!(
            l.add_mmio_hole(u64::MAX, 2),
            Err(LayoutError::Overflow { .. })
        ));
        assert_eq!(
            l.add_reserved(0x100, 0, E820Type::Reserved).unwrap_err(),
            LayoutError::EmptyReserved { addr: 0x100 }
        );
        assert_eq!(
            l.add_reserved(0x100, 1, E820Type::Ram).unwrap_err(),
            LayoutError::ReservedAsRam {
                addr: 0x100,
                size: 1
            }
        );
        l.add_reserved(0x100, 0x100, E820Type::Acpi).unwrap();
        assert!(matches!(
            l.add_reserved(0x180, 0x100, E820Type::Nvs),
            Err(LayoutError::Overlap { .. })
        ));
        assert!(matches!(
            l.add_reserved(u64::MAX, 2, E820Type::Nvs),
            Err(LayoutError::Overflow { .. })
        ));
        // A reserved range outside RAM appears as its own entry.
        l.add_reserved(0x30000, 0x1000, E820Type::Nvs).unwrap();
        let e = l.e820();
        assert_eq!(e.len(), 4);
        assert_eq!(e[3].kind, E820Type::Nvs);
        assert_eq!(l.reserved().len(), 2);
    }

    #[test]
    fn reserved_covering_whole_region_leaves_no_ram() {
        let mut l = MemoryLayout::new(&[(GuestAddress(0x1000), 0x1000)]).unwrap();
        l.add_reserved(0, 0x4000, E820Type::Reserved).unwrap();
        assert_eq!(
            l.e820(),
            vec![E820Entry {
                addr: 0,
                size: 0x4000,
                kind: E820Type::Reserved
            }]
        );
    }

    fn arb_regions() -> impl Strategy<Value = Vec<(GuestAddress, u64)>> {
        prop::collection::vec((0u64..64, 1u64..8), 1..8).prop_map(|v| {
            v.into_iter()
                .map(|(p, n)| (GuestAddress(p * PAGE_SIZE), n * PAGE_SIZE))
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(128)))]

        /// A layout is accepted exactly when its regions are pairwise disjoint, and then
        /// its regions are sorted and cover the requested bytes.
        #[test]
        fn accepts_iff_disjoint(regions in arb_regions()) {
            let disjoint = regions.iter().enumerate().all(|(i, a)| {
                regions.iter().skip(i + 1).all(|b| !overlaps(a.0 .0, a.1, b.0 .0, b.1))
            });
            match MemoryLayout::new(&regions) {
                Ok(l) => {
                    prop_assert!(disjoint);
                    prop_assert!(l.ram_regions().windows(2).all(|w| w[0].end() <= w[1].guest_addr.0));
                    prop_assert_eq!(l.ram_bytes(), regions.iter().map(|r| r.1).sum::<u64>());
                }
                Err(e) => {
                    prop_assert!(!disjoint);
                    prop_assert!(
                        matches!(e, LayoutError::Overlap { .. }),
                        "unexpected error {:?}", e
                    );
                }
            }
        }

        /// The E820 map is sorted and non-overlapping, and every RAM byte that is not
        /// reserved is reported as RAM exactly once.
        #[test]
        fn e820_is_sorted_disjoint_and_complete(
            regions in arb_regions(),
            reserved in prop::collection::vec((0u64..300_000, 1u64..20_000), 0..5),
        ) {
            let Ok(mut l) = MemoryLayout::new(&regions) else { return Ok(()); };
            for (a, s) in reserved {
                let _ = l.add_reserved(a, s, E820Type::Reserved);
            }
            let e = l.e820();
            prop_assert!(e.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr));
            let ram_in_map: u64 = e.iter().filter(|x| x.kind == E820Type::Ram).map(|x| x.size).sum();
            // RAM bytes not covered by any reserved range.
            let mut expected = 0u64;
            for r in l.ram_regions() {
                let mut covered = 0u64;
                for res in l.reserved() {
                    let lo = res.addr.max(r.guest_addr.0);
                    let hi = (res.addr + res.size).min(r.end());
                    if hi > lo { covered += hi - lo; }
                }
                expected += r.size - covered;
            }
            prop_assert_eq!(ram_in_map, expected);
        }
    }
}
