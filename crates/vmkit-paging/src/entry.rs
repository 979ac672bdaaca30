//! Bit layout of x86 paging-structure entries (Intel SDM vol. 3A, 4.3-4.5) and of EPT
//! entries (SDM vol. 3C, 29.3.2).
//!
//! Guest formats share the low flag bits; what differs between 32-bit, PAE and 4/5-level
//! paging is the entry width, the address field and which bits are reserved, and those rules
//! live with the walker. These constants are the vocabulary both the walker
//! and the builder use.

/// Present.
pub const PRESENT: u64 = 1 << 0;
/// Read/write: writes allowed (subject to CR0.WP for supervisor accesses).
pub const WRITABLE: u64 = 1 << 1;
/// User/supervisor: user-mode accesses allowed.
pub const USER: u64 = 1 << 2;
/// Page-level write-through.
pub const WRITE_THROUGH: u64 = 1 << 3;
/// Page-level cache disable.
pub const CACHE_DISABLE: u64 = 1 << 4;
/// Accessed: set by the processor whenever the entry is used for a translation.
pub const ACCESSED: u64 = 1 << 5;
/// Dirty: set by the processor on a write through a leaf entry.
pub const DIRTY: u64 = 1 << 6;
/// Page size (in a PDE or PDPTE: the entry maps a large page). PAT in a PTE.
pub const PAGE_SIZE: u64 = 1 << 7;
/// Global translation (leaf only, with CR4.PGE).
pub const GLOBAL: u64 = 1 << 8;
/// PAT bit of a large-page leaf.
pub const LARGE_PAT: u64 = 1 << 12;
/// Execute-disable (PAE and 4/5-level paging, with EFER.NXE).
pub const NO_EXECUTE: u64 = 1 << 63;
/// Bits 51:12 of a 64-bit entry: the widest address field the architecture defines.
pub const ADDR_MASK_52: u64 = 0x000f_ffff_ffff_f000;
/// Protection-key field of a 4/5-level leaf (bits 62:59).
pub const PKEY_SHIFT: u32 = 59;

/// EPT: read access.
pub const EPT_READ: u64 = 1 << 0;
/// EPT: write access.
pub const EPT_WRITE: u64 = 1 << 1;
/// EPT: execute access (supervisor-mode linear addresses when MBEC is on).
pub const EPT_EXEC: u64 = 1 << 2;
/// EPT: memory type field of a leaf (bits 5:3).
pub const EPT_MEMTYPE_SHIFT: u32 = 3;
/// EPT: ignore-PAT (leaf).
pub const EPT_IGNORE_PAT: u64 = 1 << 6;
/// EPT: the entry maps a large page.
pub const EPT_LARGE: u64 = 1 << 7;
/// EPT: accessed (when A/D is enabled in the EPTP).
pub const EPT_ACCESSED: u64 = 1 << 8;
/// EPT: dirty (leaf, when A/D is enabled in the EPTP).
pub const EPT_DIRTY: u64 = 1 << 9;
/// EPT: execute access for user-mode linear addresses (mode-based execute control).
pub const EPT_USER_EXEC: u64 = 1 << 10;
/// EPT: sub-page write permissions for the page (4 KiB leaf; ignored in a large leaf).
pub const EPT_SUB_PAGE_WRITE: u64 = 1 << 61;
/// EPT: suppress #VE.
pub const EPT_SUPPRESS_VE: u64 = 1 << 63;

/// Bits `hi..=lo` set (`hi >= lo`, both < 64).
#[inline]
pub const fn bits(hi: u32, lo: u32) -> u64 {
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_ranges() {
        assert_eq!(bits(0, 0), 1);
        assert_eq!(bits(63, 0), u64::MAX);
        assert_eq!(bits(51, 12), ADDR_MASK_52);
        assert_eq!(bits(20, 13), 0x1f_e000);
    }
}
