//! The EPT walker: guest-physical to host-physical addresses through Intel extended page
//! tables (SDM vol. 3C, 29.3), with violation/misconfiguration semantics and exit
//! qualifications.
//!
//! # Model
//!
//! The EPT pointer (EPTP) names the root table, the walk length (4 or 5 levels) and
//! whether the CPU maintains EPT Accessed/Dirty flags (bit 6). Each entry grants read (bit
//! 0), write (bit 1) and execute (bit 2) rights; with mode-based execute control (MBEC) bit
//! 2 only covers supervisor-mode linear addresses and bit 10 user-mode ones. Rights are
//! ANDed across levels. A leaf also carries the memory type (bits 5:3) and ignore-PAT
//! (bit 6).
//!
//! Two kinds of failure, told apart exactly as the CPU does:
//! * **EPT misconfiguration** ([`EptFault::Misconfig`]): an entry that cannot be valid -
//!   write-only or write+execute-without-read rights, execute-only rights when the CPU does
//!   not support them, reserved bits (above MAXPHYADDR, bits 7:3 of PML5E/PML4Es, 6:3 of
//!   other non-leaf entries, 29:12 / 20:12 of 1 GiB / 2 MiB leaves, large pages of an
//!   unsupported size), or a leaf memory type of 2, 3 or 7. It is checked on every present
//!   entry as the walk reaches it, so it wins over a violation further down.
//! * **EPT violation** ([`EptFault::Violation`]): a not-present entry or missing rights. Its
//!   exit qualification ([`ExitQualification`]) says what the access was (bits 0-2; an
//!   access to a guest paging structure with EPT A/D on counts as a write and sets both
//!   bits 0 and 1), what the entries allowed (bits 3-6: the AND of R, W, X and, with MBEC,
//!   user-execute over the entries walked, so 0 after a not-present entry), and whether a
//!   guest linear address was involved and whether the access was to the final page or to
//!   a guest paging structure (bits 7-8), and for a final-page access, with advanced
//!   VM-exit information, the linear address's user/supervisor mode and whether it
//!   translates to a read/write and to an execute-disable page (bits 9-11, from the guest
//!   walk's combined rights; the nested walker fills them in).
//!
//! With EPT A/D enabled, a successful walk sets A in every entry used and D in the leaf for
//! writes, with the same compare-exchange/restart discipline as the guest walker.
//!
//! ```
//! use vmkit_paging::builder::{BumpAllocator, MapFlags, PageTableBuilder, PagingFormat};
//! use vmkit_paging::ept::{EptAccess, EptConfig, EptWalker};
//! use vmkit_paging::{FlatMemory, GuestAddress};
//!
//! let host = FlatMemory::new(0, 1 << 20);
//! let mut b = PageTableBuilder::new(&host, PagingFormat::Ept4,
//!     BumpAllocator::new(GuestAddress(0x1000), GuestAddress(0x10000))).unwrap();
//! b.map(0x20_0000, GuestAddress(0x8000), 0x1000, MapFlags::empty()).unwrap(); // read+exec
//! let ept = EptWalker::new(EptConfig::new(b.eptp(false))).unwrap();
//! assert_eq!(ept.translate(&host, 0x20_0042, EptAccess::read()).unwrap().hpa, 0x8042);
//! let v = ept.translate(&host, 0x20_0042, EptAccess::write()).unwrap_err();
//! // A data write (bit 1) to a readable (bit 3), executable (bit 5) page.
//! assert_eq!(v.qualification().unwrap().bits(), 0b10_1010);
//! ```

use crate::builder::PageSize;
use crate::entry::*;
use crate::memory::PhysMemory;
use crate::walk::{AccessKind, MAX_RETRIES};

/// Errors in the EPT configuration itself (caught where VM entry would fail).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EptError {
    /// EPTP bits 5:3 must encode a 4- or 5-level walk (3 or 4).
    #[error("EPTP {eptp:#x} encodes page-walk length {length}, only 4 and 5 levels exist")]
    BadWalkLength {
        /// The EPTP.
        eptp: u64,
        /// Bits 5:3 + 1.
        length: u64,
    },
    /// EPTP bits 2:0 must be UC (0) or WB (6).
    #[error("EPTP {eptp:#x} has paging-structure memory type {memtype}, only 0 (UC) and 6 (WB) are valid")]
    BadMemoryType {
        /// The EPTP.
        eptp: u64,
        /// Bits 2:0.
        memtype: u64,
    },
    /// EPTP bits 11:7 and 63:MAXPHYADDR must be 0. Bit 7 enables supervisor shadow-stack
    /// control on newer CPUs, which [`EptConfig`] does not model, so it counts as reserved.
    #[error("EPTP {eptp:#x} sets reserved bits {reserved:#x} (bits 11:7 and 63:{max_phys_bits} must be 0)")]
    ReservedBits {
        /// The EPTP.
        eptp: u64,
        /// The reserved bits that are set.
        reserved: u64,
        /// The MAXPHYADDR the check used.
        max_phys_bits: u32,
    },
    /// The EPTP asks for a feature the processor's capabilities ([`EptConfig`]) lack: a
    /// 5-level walk or accessed/dirty flags.
    #[error("EPTP {eptp:#x} enables {feature}, which the processor does not support")]
    Unsupported {
        /// The EPTP.
        eptp: u64,
        /// What it asks for.
        feature: &'static str,
    },
}

/// The processor's EPT configuration: EPTP plus the VMX capabilities that change the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EptConfig {
    /// The EPT pointer.
    pub eptp: u64,
    /// Mode-based execute control for EPT (secondary processor-based control bit 22).
    pub mbec: bool,
    /// Execute-only translations supported (IA32_VMX_EPT_VPID_CAP bit 0).
    pub execute_only: bool,
    /// 2 MiB EPT pages supported (capability bit 16).
    pub large_2m: bool,
    /// 1 GiB EPT pages supported (capability bit 17).
    pub large_1g: bool,
    /// Host MAXPHYADDR.
    pub max_phys_bits: u8,
    /// Advanced VM-exit information for EPT violations (capability bit 22): exit
    /// qualification bits 9-11 describe the linear address of a final-page access.
    pub advanced_exit_info: bool,
    /// Accessed and dirty flags for EPT supported (capability bit 21): without them EPTP
    /// bit 6 must be 0.
    pub ad_supported: bool,
    /// 5-level EPT supported (capability bit 7): without it the walk length must be 4.
    pub level5_supported: bool,
}

impl EptConfig {
    /// A configuration for `eptp` with the capabilities of current Intel CPUs: execute-only,
    /// 2 MiB and 1 GiB pages, EPT A/D, 5-level EPT, advanced VM-exit information,
    /// MAXPHYADDR 52; MBEC off.
    pub const fn new(eptp: u64) -> Self {
        EptConfig {
            eptp,
            mbec: false,
            execute_only: true,
            large_2m: true,
            large_1g: true,
            max_phys_bits: 52,
            advanced_exit_info: true,
            ad_supported: true,
            level5_supported: true,
        }
    }

    /// Whether the EPTP enables accessed/dirty flags.
    pub const fn accessed_dirty(&self) -> bool {
        self.eptp & (1 << 6) != 0
    }
}

/// Whether (and how) a guest linear address is behind a guest-physical access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearCause {
    /// No linear address (e.g. a PDPTE load at MOV CR3, or a device-style access).
    None,
    /// The access reads or updates a guest paging-structure entry while translating a
    /// linear address.
    PagingStructure,
    /// The access is the final one, to the page a linear address translated to.
    FinalPage,
}

/// A guest-physical access to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EptAccess {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// The linear address is a user-mode address (selects bit 10 for fetches under MBEC;
    /// exit qualification bit 9 for final-page accesses).
    pub user_linear: bool,
    /// Final-page accesses: the linear address translates to a read/write page (exit
    /// qualification bit 10). A guest with paging off reports its addresses as user-mode,
    /// read/write and executable: `user_linear` and this true, `linear_no_execute` false.
    pub linear_writable: bool,
    /// Final-page accesses: the linear address translates to an execute-disable page (exit
    /// qualification bit 11).
    pub linear_no_execute: bool,
    /// How a linear address is involved (exit qualification bits 7-8).
    pub cause: LinearCause,
}

impl EptAccess {
    /// A data read with no linear address.
    pub const fn read() -> Self {
        EptAccess {
            kind: AccessKind::Read,
            user_linear: false,
            linear_writable: false,
            linear_no_execute: false,
            cause: LinearCause::None,
        }
    }
    /// A data write with no linear address.
    pub const fn write() -> Self {
        EptAccess {
            kind: AccessKind::Write,
            user_linear: false,
            linear_writable: false,
            linear_no_execute: false,
            cause: LinearCause::None,
        }
    }
    /// A supervisor-mode instruction fetch with no linear address.
    pub const fn fetch() -> Self {
        EptAccess {
            kind: AccessKind::Fetch,
            user_linear: false,
            linear_writable: false,
            linear_no_execute: false,
            cause: LinearCause::None,
        }
    }
}

/// An EPT-violation exit qualification (SDM vol. 3C, table 28-7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ExitQualification(u64);

impl ExitQualification {
    /// The access was a data read.
    pub const READ: u64 = 1 << 0;
    /// The access was a data write.
    pub const WRITE: u64 = 1 << 1;
    /// The access was an instruction fetch.
    pub const FETCH: u64 = 1 << 2;
    /// The entries allowed reads.
    pub const READABLE: u64 = 1 << 3;
    /// The entries allowed writes.
    pub const WRITABLE: u64 = 1 << 4;
    /// The entries allowed (supervisor-mode, under MBEC) execution.
    pub const EXECUTABLE: u64 = 1 << 5;
    /// MBEC: the entries allowed user-mode execution.
    pub const USER_EXECUTABLE: u64 = 1 << 6;
    /// The guest linear-address field is valid.
    pub const LINEAR_VALID: u64 = 1 << 7;
    /// With LINEAR_VALID: the access was to the translated page (not a paging structure).
    pub const FINAL_PAGE: u64 = 1 << 8;
    /// Advanced VM-exit information, with FINAL_PAGE: the linear address is a user-mode
    /// address.
    pub const USER_LINEAR: u64 = 1 << 9;
    /// Advanced VM-exit information, with FINAL_PAGE: the linear address translates to a
    /// read/write page.
    pub const LINEAR_WRITABLE: u64 = 1 << 10;
    /// Advanced VM-exit information, with FINAL_PAGE: the linear address translates to an
    /// execute-disable page.
    pub const LINEAR_NO_EXECUTE: u64 = 1 << 11;

    /// The raw value.
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// Whether all of `mask` is set.
    pub const fn contains(self, mask: u64) -> bool {
        self.0 & mask == mask
    }
}

/// Why an EPT walk failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EptFault {
    /// An EPT violation (VM exit reason 48).
    #[error("EPT violation at GPA {gpa:#x} (level {level}), exit qualification {:#x}", .qualification.bits())]
    Violation {
        /// The guest-physical address.
        gpa: u64,
        /// Level of the entry that denied the access.
        level: u32,
        /// Exit qualification.
        qualification: ExitQualification,
    },
    /// An EPT misconfiguration (VM exit reason 49).
    #[error("EPT misconfiguration at GPA {gpa:#x}: level {level} entry {entry:#x}")]
    Misconfig {
        /// The guest-physical address.
        gpa: u64,
        /// Level of the bad entry.
        level: u32,
        /// Its value.
        entry: u64,
    },
    /// An EPT table lies outside host memory: a VMM bug, not a guest event.
    #[error("EPT table entry at host address {addr:#x} (level {level}) is outside memory, translating GPA {gpa:#x}")]
    TableOutsideMemory {
        /// The guest-physical address.
        gpa: u64,
        /// Level of the entry.
        level: u32,
        /// Host address of the entry.
        addr: u64,
    },
    /// The EPT entries kept changing while A/D flags were being set.
    #[error("gave up on GPA {gpa:#x} after {MAX_RETRIES} lost EPT accessed/dirty races")]
    Contended {
        /// The guest-physical address.
        gpa: u64,
    },
}

impl EptFault {
    /// The exit qualification, for violations.
    pub fn qualification(&self) -> Option<ExitQualification> {
        match self {
            EptFault::Violation { qualification, .. } => Some(*qualification),
            _ => None,
        }
    }
}

/// A successful EPT translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EptTranslation {
    /// Host-physical address.
    pub hpa: u64,
    /// Host-physical base of the page.
    pub page_base: u64,
    /// Page size.
    pub page_size: PageSize,
    /// EPT memory type of the leaf (bits 5:3).
    pub memory_type: u8,
    /// Ignore-PAT bit of the leaf.
    pub ignore_pat: bool,
    /// Rights ANDed over all levels: bit 0 R, 1 W, 2 X (supervisor), 10 user X (MBEC).
    pub rights: u64,
    /// Number of EPT entries read.
    pub memory_refs: u32,
}

/// A configured EPT walker.
#[derive(Debug, Clone)]
pub struct EptWalker {
    cfg: EptConfig,
    levels: u32,
    root: u64,
    /// Reserved bits per level (index level-1) for non-leaf / 4 KiB entries.
    rsvd_table: [u64; 5],
    /// Reserved bits per level for large leaves.
    rsvd_large: [u64; 5],
}

impl EptWalker {
    /// Validates the EPTP as VM entry does (SDM vol. 3C, 27.2.1.1, checks on VM-execution
    /// control fields) and precomputes the reserved-bit masks.
    ///
    /// Refused: a paging-structure memory type other than UC or WB (bits 2:0), a walk
    /// length other than 4 or 5 (bits 5:3), and any of bits 11:7 or 63:MAXPHYADDR
    /// ([`EptConfig::max_phys_bits`], clamped to 32..=52). A root above MAXPHYADDR or a
    /// stray value ORed into the low bits is a VMM bug that must not silently walk some
    /// other table. A 5-level walk or bit 6 (EPT A/D) without the capability
    /// ([`EptConfig::level5_supported`], [`EptConfig::ad_supported`]) is
    /// [`EptError::Unsupported`].
    pub fn new(cfg: EptConfig) -> Result<Self, EptError> {
        let eptp = cfg.eptp;
        let length = ((eptp >> 3) & 7) + 1;
        if length != 4 && length != 5 {
            return Err(EptError::BadWalkLength { eptp, length });
        }
        let memtype = eptp & 7;
        if memtype != 0 && memtype != 6 {
            return Err(EptError::BadMemoryType { eptp, memtype });
        }
        for (asked, supported, feature) in [
            (length == 5, cfg.level5_supported, "a 5-level walk"),
            (
                cfg.accessed_dirty(),
                cfg.ad_supported,
                "accessed/dirty flags",
            ),
        ] {
            if asked && !supported {
                return Err(EptError::Unsupported { eptp, feature });
            }
        }
        let m = u32::from(cfg.max_phys_bits.clamp(32, 52));
        let reserved = eptp & (bits(11, 7) | bits(63, m));
        if reserved != 0 {
            return Err(EptError::ReservedBits {
                eptp,
                reserved,
                max_phys_bits: m,
            });
        }
        let hi = if m < 52 { bits(51, m) } else { 0 };
        let mut t = [hi; 5];
        let mut l = [hi; 5];
        t[4] |= bits(7, 3);
        t[3] |= bits(7, 3);
        t[2] |= bits(6, 3);
        t[1] |= bits(6, 3);
        l[4] = t[4];
        l[3] = t[3];
        l[2] |= bits(29, 12) | if cfg.large_1g { 0 } else { EPT_LARGE };
        l[1] |= bits(20, 12) | if cfg.large_2m { 0 } else { EPT_LARGE };
        Ok(EptWalker {
            cfg,
            levels: length as u32,
            root: eptp & bits(m - 1, 12),
            rsvd_table: t,
            rsvd_large: l,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EptConfig {
        &self.cfg
    }

    /// Number of levels walked.
    pub fn levels(&self) -> u32 {
        self.levels
    }

    fn present(&self, entry: u64) -> bool {
        entry & 7 != 0 || (self.cfg.mbec && entry & EPT_USER_EXEC != 0)
    }

    fn misconfigured(&self, level: u32, entry: u64, large: bool, leaf: bool) -> bool {
        let xwr = entry & 7;
        if xwr == 0b010 || xwr == 0b110 {
            return true;
        }
        let exec_any = entry & EPT_EXEC != 0 || (self.cfg.mbec && entry & EPT_USER_EXEC != 0);
        if !self.cfg.execute_only && entry & EPT_READ == 0 && exec_any {
            return true;
        }
        let idx = (level - 1) as usize;
        let rsvd = if large {
            self.rsvd_large[idx]
        } else {
            self.rsvd_table[idx]
        };
        if entry & rsvd != 0 {
            return true;
        }
        leaf && matches!((entry >> EPT_MEMTYPE_SHIFT) & 7, 2 | 3 | 7)
    }

    fn qualification(&self, access: EptAccess, rights: u64) -> ExitQualification {
        let mut q = match access.kind {
            AccessKind::Read => ExitQualification::READ,
            AccessKind::Write => ExitQualification::WRITE,
            AccessKind::Fetch => ExitQualification::FETCH,
        };
        if access.cause == LinearCause::PagingStructure && self.cfg.accessed_dirty() {
            // Guest paging-structure accesses are writes when EPT A/D is on: bits 0 and 1.
            q |= ExitQualification::READ | ExitQualification::WRITE;
        }
        q |= (rights & 7) << 3;
        if self.cfg.mbec && rights & EPT_USER_EXEC != 0 {
            q |= ExitQualification::USER_EXECUTABLE;
        }
        match access.cause {
            LinearCause::None => {}
            LinearCause::PagingStructure => q |= ExitQualification::LINEAR_VALID,
            LinearCause::FinalPage => {
                q |= ExitQualification::LINEAR_VALID | ExitQualification::FINAL_PAGE;
                if self.cfg.advanced_exit_info {
                    for (on, bit) in [
                        (access.user_linear, ExitQualification::USER_LINEAR),
                        (access.linear_writable, ExitQualification::LINEAR_WRITABLE),
                        (
                            access.linear_no_execute,
                            ExitQualification::LINEAR_NO_EXECUTE,
                        ),
                    ] {
                        if on {
                            q |= bit;
                        }
                    }
                }
            }
        }
        ExitQualification(q)
    }

    /// Translates `gpa` for `access`, reading the EPT tables from host memory `host`.
    pub fn translate<M: PhysMemory + ?Sized>(
        &self,
        host: &M,
        gpa: u64,
        access: EptAccess,
    ) -> Result<EptTranslation, EptFault> {
        for _ in 0..=MAX_RETRIES {
            if let Some(result) = self.walk_once(host, gpa, access) {
                return result;
            }
        }
        Err(EptFault::Contended { gpa })
    }

    fn walk_once<M: PhysMemory + ?Sized>(
        &self,
        host: &M,
        gpa: u64,
        access: EptAccess,
    ) -> Option<Result<EptTranslation, EptFault>> {
        let mut path = [(0u64, 0u64); 5];
        let mut rights = EPT_READ | EPT_WRITE | EPT_EXEC | EPT_USER_EXEC;
        let mut table = self.root;
        let mut level = self.levels;
        let mut refs = 0;
        let write = access.kind == AccessKind::Write
            || (access.cause == LinearCause::PagingStructure && self.cfg.accessed_dirty());
        let violation = |level, rights| {
            Some(Err(EptFault::Violation {
                gpa,
                level,
                qualification: self.qualification(access, rights),
            }))
        };
        let (leaf, size) = loop {
            let addr = table + ((gpa >> (12 + 9 * (level - 1))) & 0x1ff) * 8;
            refs += 1;
            let Some(entry) = host.read_u64(addr) else {
                return Some(Err(EptFault::TableOutsideMemory { gpa, level, addr }));
            };
            path[(level - 1) as usize] = (addr, entry);
            if !self.present(entry) {
                return violation(level, 0);
            }
            let large = level > 1 && entry & EPT_LARGE != 0;
            let leaf = level == 1 || large;
            if self.misconfigured(level, entry, large, leaf) {
                return Some(Err(EptFault::Misconfig { gpa, level, entry }));
            }
            rights &= entry | !(EPT_READ | EPT_WRITE | EPT_EXEC | EPT_USER_EXEC);
            if leaf {
                let size = match level {
                    1 => PageSize::Size4K,
                    2 => PageSize::Size2M,
                    _ => PageSize::Size1G,
                };
                break (entry, size);
            }
            table = entry & bits(51, 12);
            level -= 1;
        };
        if !self.cfg.mbec {
            // Without MBEC bit 10 is ignored and bit 2 covers every fetch.
            rights &= !EPT_USER_EXEC;
        }
        let allowed = match access.kind {
            AccessKind::Read => rights & EPT_READ != 0,
            AccessKind::Write => rights & EPT_WRITE != 0,
            AccessKind::Fetch if self.cfg.mbec && access.user_linear => rights & EPT_USER_EXEC != 0,
            AccessKind::Fetch => rights & EPT_EXEC != 0,
        } && (!write || rights & EPT_WRITE != 0);
        if !allowed {
            return violation(level, rights);
        }
        if self.cfg.accessed_dirty() {
            for lvl in (level..=self.levels).rev() {
                let (addr, entry) = path[(lvl - 1) as usize];
                let mut want = EPT_ACCESSED;
                if lvl == level && write {
                    want |= EPT_DIRTY;
                }
                if entry & want != want {
                    match host.compare_exchange_u64(addr, entry, entry | want) {
                        Some(Ok(_)) | None => {}
                        Some(Err(_)) => return None,
                    }
                }
            }
        }
        let page_base = leaf & bits(51, 12) & !(size.bytes() - 1);
        Some(Ok(EptTranslation {
            hpa: page_base | (gpa & (size.bytes() - 1)),
            page_base,
            page_size: size,
            memory_type: ((leaf >> EPT_MEMTYPE_SHIFT) & 7) as u8,
            ignore_pat: leaf & EPT_IGNORE_PAT != 0,
            rights,
            memory_refs: refs,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::FlatMemory;

    const R: u64 = EPT_READ;
    const W: u64 = EPT_WRITE;
    const X: u64 = EPT_EXEC;
    const RWX: u64 = R | W | X;
    const WB: u64 = 6 << 3;
    const GPA: u64 = 0x40_5123;

    /// 4-level EPT at 0x1000 mapping GPA 0x405000 -> 0x7000 with `flags` per level.
    fn ept(flags: [u64; 4]) -> FlatMemory {
        let mem = FlatMemory::new(0, 0x10000);
        mem.write_u64(0x1000, 0x2000 | flags[0]).unwrap();
        mem.write_u64(0x2000, 0x3000 | flags[1]).unwrap();
        mem.write_u64(0x3010, 0x4000 | flags[2]).unwrap();
        mem.write_u64(0x4028, 0x7000 | flags[3]).unwrap();
        mem
    }

    fn eptp(ad: bool) -> u64 {
        0x1000 | 6 | 3 << 3 | if ad { 1 << 6 } else { 0 }
    }

    fn walker(ad: bool) -> EptWalker {
        EptWalker::new(EptConfig::new(eptp(ad))).unwrap()
    }

    fn q(r: Result<EptTranslation, EptFault>) -> u64 {
        r.unwrap_err().qualification().unwrap().bits()
    }

    #[test]
    fn translate_and_memory_type() {
        let mem = ept([RWX, RWX, RWX, RWX | WB | EPT_IGNORE_PAT]);
        let t = walker(false)
            .translate(&mem, GPA, EptAccess::write())
            .unwrap();
        assert_eq!(t.hpa, 0x7123);
        assert_eq!((t.memory_type, t.ignore_pat, t.memory_refs), (6, true, 4));
        assert_eq!(t.page_size, PageSize::Size4K);
        // No A/D without EPTP bit 6.
        assert_eq!(
            mem.read_u64(0x4028).unwrap() & (EPT_ACCESSED | EPT_DIRTY),
            0
        );
    }

    #[test]
    fn accessed_dirty_when_enabled() {
        let mem = ept([RWX, RWX, RWX, RWX | WB]);
        let w = walker(true);
        assert!(w.config().accessed_dirty());
        w.translate(&mem, GPA, EptAccess::read()).unwrap();
        for a in [0x1000, 0x2000, 0x3010, 0x4028] {
            assert_eq!(
                mem.read_u64(a).unwrap() & (EPT_ACCESSED | EPT_DIRTY),
                EPT_ACCESSED
            );
        }
        w.translate(&mem, GPA, EptAccess::write()).unwrap();
        assert_ne!(mem.read_u64(0x4028).unwrap() & EPT_DIRTY, 0);
        // A guest paging-structure read counts as a write: sets D, needs W.
        let mem = ept([RWX, RWX, RWX, R | X | WB]);
        let table_read = EptAccess {
            kind: AccessKind::Read,
            user_linear: false,
            linear_writable: false,
            linear_no_execute: false,
            cause: LinearCause::PagingStructure,
        };
        assert_eq!(
            q(w.translate(&mem, GPA, table_read)),
            ExitQualification::READ
                | ExitQualification::WRITE
                | ExitQualification::READABLE
                | ExitQualification::EXECUTABLE
                | ExitQualification::LINEAR_VALID
        );
        // Same access without A/D: a plain read, allowed.
        assert!(walker(false).translate(&mem, GPA, table_read).is_ok());
    }

    #[test]
    fn violations_and_qualifications() {
        let w = walker(false);
        // Not present at level 2: all rights bits 0.
        let f = w
            .translate(&ept([RWX, RWX, 0, RWX | WB]), GPA, EptAccess::read())
            .unwrap_err();
        assert!(matches!(f, EptFault::Violation { level: 2, .. }));
        assert_eq!(f.qualification().unwrap().bits(), ExitQualification::READ);
        // Rights are ANDed across levels.
        let mem = ept([R | X, RWX, RWX, RWX | WB]);
        assert_eq!(q(w.translate(&mem, GPA, EptAccess::write())), 0b10_1010);
        let mem = ept([RWX, R | W, RWX, RWX | WB]);
        assert_eq!(q(w.translate(&mem, GPA, EptAccess::fetch())), 0b01_1100);
        // Linear-address bits.
        let final_fetch = EptAccess {
            kind: AccessKind::Fetch,
            user_linear: true,
            linear_writable: false,
            linear_no_execute: false,
            cause: LinearCause::FinalPage,
        };
        assert_eq!(q(w.translate(&mem, GPA, final_fetch)), 0b11_1001_1100);
        // Advanced VM-exit information: the linear page's R/W and XD (bits 10-11), only
        // for final-page accesses and only when the CPU reports them.
        let final_write = EptAccess {
            kind: AccessKind::Write,
            user_linear: false,
            linear_writable: true,
            linear_no_execute: true,
            cause: LinearCause::FinalPage,
        };
        let mem = ept([RWX, R | X, RWX, RWX | WB]);
        assert_eq!(
            q(w.translate(&mem, GPA, final_write)),
            ExitQualification::WRITE
                | ExitQualification::READABLE
                | ExitQualification::EXECUTABLE
                | ExitQualification::LINEAR_VALID
                | ExitQualification::FINAL_PAGE
                | ExitQualification::LINEAR_WRITABLE
                | ExitQualification::LINEAR_NO_EXECUTE
        );
        let table_write = EptAccess {
            cause: LinearCause::PagingStructure,
            ..final_write
        };
        assert_eq!(q(w.translate(&mem, GPA, table_write)), 0b1010_1010);
        let mut basic = EptConfig::new(eptp(false));
        basic.advanced_exit_info = false;
        let basic = EptWalker::new(basic).unwrap();
        assert_eq!(q(basic.translate(&mem, GPA, final_write)), 0b1_1010_1010);
        assert!(f.to_string().contains("EPT violation"));
    }

    #[test]
    fn mode_based_execute_control() {
        let mut cfg = EptConfig::new(eptp(false));
        cfg.mbec = true;
        let w = EptWalker::new(cfg).unwrap();
        let user_fetch = EptAccess {
            kind: AccessKind::Fetch,
            user_linear: true,
            linear_writable: false,
            linear_no_execute: false,
            cause: LinearCause::FinalPage,
        };
        // Supervisor-executable only.
        let mem = ept([
            RWX | EPT_USER_EXEC,
            RWX | EPT_USER_EXEC,
            RWX | EPT_USER_EXEC,
            R | X | WB,
        ]);
        assert!(w.translate(&mem, GPA, EptAccess::fetch()).is_ok());
        assert_eq!(
            q(w.translate(&mem, GPA, user_fetch)),
            ExitQualification::FETCH
                | ExitQualification::READABLE
                | ExitQualification::EXECUTABLE
                | ExitQualification::LINEAR_VALID
                | ExitQualification::FINAL_PAGE
                | ExitQualification::USER_LINEAR
        );
        // User-executable only (bit 10), with R: present and fine.
        let mem = ept([
            RWX | EPT_USER_EXEC,
            RWX | EPT_USER_EXEC,
            RWX | EPT_USER_EXEC,
            R | EPT_USER_EXEC | WB,
        ]);
        assert!(w.translate(&mem, GPA, user_fetch).is_ok());
        assert!(w.translate(&mem, GPA, EptAccess::fetch()).is_err());
        assert_eq!(
            w.translate(&mem, GPA, EptAccess::read()).unwrap().rights & EPT_USER_EXEC,
            EPT_USER_EXEC
        );
        // Only bit 10 set: present under MBEC (then a violation for reads, not "not present").
        let mem = ept([
            RWX | EPT_USER_EXEC,
            RWX | EPT_USER_EXEC,
            RWX | EPT_USER_EXEC,
            EPT_USER_EXEC | WB,
        ]);
        assert_eq!(
            q(w.translate(&mem, GPA, EptAccess::read())),
            ExitQualification::READ | ExitQualification::USER_EXECUTABLE
        );
        // Without MBEC bit 10 is ignored: that entry is not present.
        assert_eq!(
            q(walker(false).translate(&mem, GPA, EptAccess::read())),
            ExitQualification::READ
        );
    }

    #[test]
    fn misconfigurations() {
        let w = walker(false);
        let mis = |mem: &FlatMemory, w: &EptWalker| {
            matches!(
                w.translate(mem, GPA, EptAccess::read()),
                Err(EptFault::Misconfig { .. })
            )
        };
        // Write-only and write+execute at any level.
        assert!(mis(&ept([W, RWX, RWX, RWX | WB]), &w));
        assert!(mis(&ept([RWX, RWX, RWX, W | X | WB]), &w));
        // Execute-only: fine when supported, misconfig otherwise.
        assert!(!mis(&ept([RWX, RWX, RWX, X | WB]), &w));
        let mut cfg = EptConfig::new(eptp(false));
        cfg.execute_only = false;
        assert!(mis(
            &ept([RWX, RWX, RWX, X | WB]),
            &EptWalker::new(cfg).unwrap()
        ));
        // Leaf memory types 2, 3, 7; non-leaf bits 7:3 / 6:3.
        for mt in [2u64, 3, 7] {
            assert!(
                mis(&ept([RWX, RWX, RWX, RWX | mt << 3]), &w),
                "memtype {mt}"
            );
        }
        assert!(!mis(&ept([RWX, RWX, RWX, RWX]), &w)); // UC leaf
        assert!(mis(&ept([RWX | 1 << 3, RWX, RWX, RWX | WB]), &w));
        assert!(mis(&ept([RWX | EPT_LARGE, RWX, RWX, RWX | WB]), &w));
        assert!(mis(&ept([RWX, RWX, RWX | 1 << 6, RWX | WB]), &w));
        // Above MAXPHYADDR.
        let mut cfg = EptConfig::new(eptp(false));
        cfg.max_phys_bits = 39;
        assert!(mis(
            &ept([RWX, RWX, RWX, RWX | WB | 1 << 40]),
            &EptWalker::new(cfg).unwrap()
        ));
        // Misconfiguration beats a later violation / not-present.
        let f = w
            .translate(&ept([RWX | 1 << 4, 0, 0, 0]), GPA, EptAccess::write())
            .unwrap_err();
        assert_eq!(
            f,
            EptFault::Misconfig {
                gpa: GPA,
                level: 4,
                entry: 0x2000 | RWX | 1 << 4
            }
        );
        assert!(f.to_string().contains("misconfiguration"));
        assert_eq!(f.qualification(), None);
    }

    #[test]
    fn large_pages() {
        let mem = FlatMemory::new(0, 0x10000);
        mem.write_u64(0x1000, 0x2000 | RWX).unwrap();
        mem.write_u64(0x2008, 0x8000_0000 | RWX | WB | EPT_LARGE)
            .unwrap();
        mem.write_u64(0x2000, 0x3000 | RWX).unwrap();
        mem.write_u64(0x3008, 0x60_0000 | RWX | WB | EPT_LARGE)
            .unwrap();
        let w = walker(false);
        let t = w.translate(&mem, 0x4012_3456, EptAccess::read()).unwrap();
        assert_eq!(
            (t.hpa, t.page_size, t.memory_refs),
            (0x8012_3456, PageSize::Size1G, 2)
        );
        let t = w.translate(&mem, 0x2f_ffff, EptAccess::read()).unwrap();
        assert_eq!((t.hpa, t.page_size), (0x6f_ffff, PageSize::Size2M));
        let mut cfg = EptConfig::new(eptp(false));
        cfg.large_1g = false;
        cfg.large_2m = false;
        let small = EptWalker::new(cfg).unwrap();
        assert!(matches!(
            small.translate(&mem, 0x4000_0000, EptAccess::read()),
            Err(EptFault::Misconfig { level: 3, .. })
        ));
        assert!(matches!(
            small.translate(&mem, 0x20_0000, EptAccess::read()),
            Err(EptFault::Misconfig { level: 2, .. })
        ));
        // Bits 20:12 of a 2 MiB leaf are reserved.
        mem.write_u64(0x3008, 0x60_1000 | RWX | WB | EPT_LARGE)
            .unwrap();
        assert!(matches!(
            w.translate(&mem, 0x20_0000, EptAccess::read()),
            Err(EptFault::Misconfig { .. })
        ));
    }

    #[test]
    fn eptp_validation_and_level5() {
        assert_eq!(
            EptWalker::new(EptConfig::new(0x1000 | 6 | 2 << 3)).unwrap_err(),
            EptError::BadWalkLength {
                eptp: 0x1000 | 6 | 2 << 3,
                length: 3
            }
        );
        let e = EptWalker::new(EptConfig::new(0x1000 | 1 | 3 << 3)).unwrap_err();
        assert!(e.to_string().contains("memory type 1"));
        // Reserved bits 11:7 (bit 7, supervisor shadow-stack control, is not modelled) and
        // 63:MAXPHYADDR are refused, as VM entry refuses them; bit 6 (A/D) is accepted
        // when the capabilities have it (below).
        for bit in 7..=11 {
            let eptp = eptp(false) | 1 << bit;
            assert_eq!(
                EptWalker::new(EptConfig::new(eptp)).unwrap_err(),
                EptError::ReservedBits {
                    eptp,
                    reserved: 1 << bit,
                    max_phys_bits: 52
                }
            );
        }
        assert!(EptWalker::new(EptConfig::new(eptp(false) | 1 << 52)).is_err());
        assert!(EptWalker::new(EptConfig::new(eptp(false) | 1 << 63)).is_err());
        let mut cfg = EptConfig::new(eptp(false) | 1 << 40 | 1 << 38);
        cfg.max_phys_bits = 39;
        let e = EptWalker::new(cfg).unwrap_err();
        assert_eq!(
            e,
            EptError::ReservedBits {
                eptp: cfg.eptp,
                reserved: 1 << 40,
                max_phys_bits: 39
            }
        );
        assert!(e.to_string().contains("reserved bits 0x10000000000"), "{e}");
        cfg.eptp &= !(1 << 40);
        assert_eq!(EptWalker::new(cfg).unwrap().root, 1 << 38 | 0x1000);
        assert!(EptWalker::new(EptConfig::new(eptp(true))).is_ok());
        // A/D and 5-level walks only where the capabilities have them.
        let mut cfg = EptConfig::new(eptp(true));
        cfg.ad_supported = false;
        let e = EptWalker::new(cfg).unwrap_err();
        assert_eq!(
            e,
            EptError::Unsupported {
                eptp: eptp(true),
                feature: "accessed/dirty flags"
            }
        );
        assert!(e.to_string().contains("does not support"), "{e}");
        cfg.eptp = eptp(false);
        assert!(EptWalker::new(cfg).is_ok());
        cfg.eptp = 0x1000 | 6 | 4 << 3;
        cfg.level5_supported = false;
        assert!(matches!(
            EptWalker::new(cfg),
            Err(EptError::Unsupported {
                feature: "a 5-level walk",
                ..
            })
        ));
        assert!(EptWalker::new(EptConfig::new(((1 << 52) - 0x1000) | 6 | 3 << 3)).is_ok());
        let mem = FlatMemory::new(0, 0x10000);
        mem.write_u64(0x1000 + 8, 0x2000 | RWX).unwrap();
        mem.write_u64(0x2000, 0x3000 | RWX).unwrap();
        mem.write_u64(0x3000, 0x4000 | RWX).unwrap();
        mem.write_u64(0x4000, 0x5000 | RWX).unwrap();
        mem.write_u64(0x5000, 0x9000 | RWX | WB).unwrap();
        let w = EptWalker::new(EptConfig::new(0x1000 | 6 | 4 << 3)).unwrap();
        assert_eq!(w.levels(), 5);
        let t = w
            .translate(&mem, 1 << 48 | 0x10, EptAccess::read())
            .unwrap();
        assert_eq!((t.hpa, t.memory_refs), (0x9010, 5));
        // Tables outside host memory are a VMM error, not a guest event.
        mem.write_u64(0x5000, 0).unwrap();
        mem.write_u64(0x4000, 0x10_0000 | RWX).unwrap();
        let f = w.translate(&mem, 1 << 48, EptAccess::read()).unwrap_err();
        assert_eq!(
            f,
            EptFault::TableOutsideMemory {
                gpa: 1 << 48,
                level: 1,
                addr: 0x10_0000
            }
        );
        assert!(f.to_string().contains("outside memory"));
    }

    #[test]
    fn accessed_dirty_race_restarts() {
        struct Racy(FlatMemory, core::cell::Cell<u32>);
        impl PhysMemory for Racy {
            fn read_u64(&self, addr: u64) -> Option<u64> {
                self.0.read_u64(addr)
            }
            fn write_u64(&self, addr: u64, value: u64) -> Option<()> {
                self.0.write_u64(addr, value)
            }
            fn compare_exchange_u64(
                &self,
                addr: u64,
                current: u64,
                new: u64,
            ) -> Option<Result<u64, u64>> {
                if self.1.get() > 0 {
                    self.1.set(self.1.get() - 1);
                    let v = self.0.read_u64(addr)?;
                    self.0.write_u64(addr, v ^ 1 << 11)?;
                }
                self.0.compare_exchange_u64(addr, current, new)
            }
        }
        let racy = Racy(ept([RWX, RWX, RWX, RWX | WB]), core::cell::Cell::new(2));
        assert!(walker(true)
            .translate(&racy, GPA, EptAccess::write())
            .is_ok());
        let hostile = Racy(
            ept([RWX, RWX, RWX, RWX | WB]),
            core::cell::Cell::new(u32::MAX),
        );
        let f = walker(true)
            .translate(&hostile, GPA, EptAccess::write())
            .unwrap_err();
        assert_eq!(f, EptFault::Contended { gpa: GPA });
        assert!(f.to_string().contains("races"));
    }
}
