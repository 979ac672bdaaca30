//! The guest page-table walker: linear (virtual) address to guest-physical address, with the
//! CPU's exact permission checks and page-fault error codes.
//!
//! # Model
//!
//! A translation is computed the way the SDM (vol. 3A, chapter 4) describes it:
//!
//! 1. **Canonical check** (4/5-level paging): bits 63:48 (63:57 with LA57) must copy bit 47
//!    (56); otherwise the access raises #GP, not #PF ([`Fault::NonCanonical`]). With 32-bit
//!    and PAE paging a linear address is 32 bits wide; wider inputs are refused the same way.
//! 2. **The walk**: from CR3 (or the PAE PDPTE registers) down to a leaf. At each level the
//!    entry is read; a clear P bit stops the walk with a not-present fault, a set reserved
//!    bit with a reserved-bit fault (`P=1, RSVD=1`). Which bits are reserved depends on the
//!    level, on whether the entry maps a page, on MAXPHYADDR, EFER.NXE, 1 GiB page support
//!    and, for PML5Es/PML4Es, the CPU vendor (AMD reserves bit 8). The
//!    rights of the levels are combined: a page is writable only if R/W is set at every
//!    level, user-accessible only if U/S is set at every level, executable only if XD is
//!    clear at every level.
//! 3. **The permission check** on the combined rights (shared with the software TLB through
//!    [`Walker::check_rights`]): U/S, R/W with CR0.WP, XD with EFER.NXE, SMEP, SMAP with
//!    EFLAGS.AC (ignored for implicit supervisor accesses), and protection keys: PKRU for
//!    user pages (CR4.PKE), IA32_PKRS for supervisor pages (CR4.PKS), data accesses only,
//!    4/5-level paging only. A protection-key violation sets the PK bit of the error code
//!    whether or not the ordinary rights also failed, as KVM's `permission_fault` does.
//! 4. **Accessed/Dirty**: only when the access is allowed, A is set in every entry used and
//!    D in the leaf for writes, each with a compare-exchange. If the guest changed an entry
//!    between our read and our update, the whole walk restarts (KVM does the same); after
//!    [`MAX_RETRIES`] lost races the walker gives up with [`Fault::Contended`] instead of
//!    spinning forever against a hostile vCPU.
//!
//! # Fast path
//!
//! Most walks in a running guest succeed and change nothing (the A/D bits are already
//! set). [`Walker::translate`] answers those with a fast 4/5-level walk that reads entries
//! through a [`WordSpan`] (one AND between an entry and the load of the next level's
//! entry; the bounds check runs beside it, see [`WordSpan::load_table_entry`]), ORs the
//! entries to check the bits every level reserves at once, ANDs them for P, R/W, U/S and
//! A, and decides the access with masks precomputed per configuration from the rule table
//! (as KVM's `permissions[]`). Any doubt - a missing entry, a reserved bit, a denied
//! access, an A/D bit to set, protection keys that need the full rule, a table straddling
//! the end of a memory region - sends the walk to the detailed path below, which computes
//! the exact fault or update; `tests/fast_paths.rs` checks the two return the same
//! [`Translation`], field by field, and leave the same memory, on random tables.
//! [`Walker::fast_translate`] is the fast path alone, returning just the address.
//!
//! The error code's I/D bit is set for fetches only when it would be on hardware: with
//! CR4.SMEP, or with PAE/4/5-level paging and EFER.NXE. U is set for user-mode accesses
//! only; an implicit supervisor access (a descriptor-table read from CPL3) reports U=0.
//!
//! # Hostile tables
//!
//! A walk reads at most one entry per level, so it ends after at most five reads whatever
//! the tables contain: loops (a PML4 entry pointing at its own table, the classic recursive
//! mapping) simply resolve to the table pages themselves. Entries pointing outside memory
//! give a not-present fault with [`FaultReason::TableOutsideMemory`]: that is what KVM
//! reports (it has no bus to read all-ones from). Nothing here panics on guest input.
//!
//! ```
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmkit_paging::builder::{BumpAllocator, MapFlags, PageTableBuilder, PagingFormat};
//! use vmkit_paging::walk::{Access, PagingConfig, PagingMode, Walker};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 21)]).unwrap();
//! let alloc = BumpAllocator::new(GuestAddress(0x1000), GuestAddress(0x10000));
//! let mut b = PageTableBuilder::new(&mem, PagingFormat::Level4, alloc).unwrap();
//! b.map(0x40_0000, GuestAddress(0x10_0000), 0x1000, MapFlags::USER).unwrap();
//!
//! let walker = Walker::new(PagingConfig::new(PagingMode::Level4, b.root().0));
//! let t = walker.translate(&mem, 0x40_0123, Access::user_read()).unwrap();
//! assert_eq!(t.gpa, 0x10_0123);
//! // A user write to a read-only page: #PF with P|W|U.
//! let fault = walker.translate(&mem, 0x40_0123, Access::user_write()).unwrap_err();
//! assert_eq!(fault.error_code().map(|e| e.bits()), Some(0b111));
//! ```

use crate::builder::PageSize;
use crate::entry::*;
use crate::memory::{PhysMemory, WordSpan};

/// How many times a walk restarts after losing an A/D-bit race before giving up.
pub const MAX_RETRIES: u32 = 16;

/// The guest's paging mode (CR0.PG, CR4.PAE, EFER.LMA, CR4.LA57).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PagingMode {
    /// 32-bit paging.
    Legacy32,
    /// PAE paging.
    Pae,
    /// 4-level paging.
    Level4,
    /// 5-level paging.
    Level5,
}

impl PagingMode {
    /// Number of table levels walked.
    pub const fn levels(self) -> u32 {
        match self {
            PagingMode::Legacy32 => 2,
            PagingMode::Pae => 3,
            PagingMode::Level4 => 4,
            PagingMode::Level5 => 5,
        }
    }

    /// The table format of this mode.
    pub const fn format(self) -> crate::builder::PagingFormat {
        use crate::builder::PagingFormat;
        match self {
            PagingMode::Legacy32 => PagingFormat::Legacy32,
            PagingMode::Pae => PagingFormat::Pae,
            PagingMode::Level4 => PagingFormat::Level4,
            PagingMode::Level5 => PagingFormat::Level5,
        }
    }
}

/// What an access does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// Data read.
    Read,
    /// Data write.
    Write,
    /// Instruction fetch.
    Fetch,
}

/// Who performs an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Privilege {
    /// CPL 3.
    User,
    /// CPL 0-2, explicit access (subject to EFLAGS.AC for SMAP).
    Supervisor,
    /// An implicit supervisor access (GDT/IDT/TSS read, even from CPL 3): SMAP applies
    /// whatever EFLAGS.AC says, and the error code has U=0.
    ImplicitSupervisor,
}

/// An access to check: kind and privilege.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Access {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// User, supervisor or implicit supervisor.
    pub privilege: Privilege,
}

impl Access {
    /// An access of `kind` at `privilege`.
    pub const fn new(kind: AccessKind, privilege: Privilege) -> Self {
        Access { kind, privilege }
    }
    /// CPL3 data read.
    pub const fn user_read() -> Self {
        Self::new(AccessKind::Read, Privilege::User)
    }
    /// CPL3 data write.
    pub const fn user_write() -> Self {
        Self::new(AccessKind::Write, Privilege::User)
    }
    /// CPL3 instruction fetch.
    pub const fn user_fetch() -> Self {
        Self::new(AccessKind::Fetch, Privilege::User)
    }
    /// Supervisor data read.
    pub const fn supervisor_read() -> Self {
        Self::new(AccessKind::Read, Privilege::Supervisor)
    }
    /// Supervisor data write.
    pub const fn supervisor_write() -> Self {
        Self::new(AccessKind::Write, Privilege::Supervisor)
    }
    /// Supervisor instruction fetch.
    pub const fn supervisor_fetch() -> Self {
        Self::new(AccessKind::Fetch, Privilege::Supervisor)
    }
    /// Whether this is a write.
    pub const fn is_write(self) -> bool {
        matches!(self.kind, AccessKind::Write)
    }
    /// Whether this is an instruction fetch.
    pub const fn is_fetch(self) -> bool {
        matches!(self.kind, AccessKind::Fetch)
    }
    /// Whether this is a user-mode access.
    pub const fn is_user(self) -> bool {
        matches!(self.privilege, Privilege::User)
    }
}

/// A #PF error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PfErrorCode(u32);

impl PfErrorCode {
    /// The fault was a protection violation (0: not present).
    pub const PRESENT: u32 = 1 << 0;
    /// The access was a write.
    pub const WRITE: u32 = 1 << 1;
    /// The access was a user-mode access.
    pub const USER: u32 = 1 << 2;
    /// A reserved bit was set in some paging-structure entry.
    pub const RSVD: u32 = 1 << 3;
    /// The access was an instruction fetch (only with SMEP, or PAE-type paging and NXE).
    pub const FETCH: u32 = 1 << 4;
    /// A protection-key violation.
    pub const PK: u32 = 1 << 5;

    /// From raw bits.
    pub const fn from_bits(bits: u32) -> Self {
        PfErrorCode(bits)
    }
    /// The raw value pushed on the stack.
    pub const fn bits(self) -> u32 {
        self.0
    }
    /// Whether all of `mask` is set.
    pub const fn contains(self, mask: u32) -> bool {
        self.0 & mask == mask
    }
}

impl core::fmt::Display for PfErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:#x} [", self.0)?;
        for (bit, name) in [
            (Self::PRESENT, "P"),
            (Self::WRITE, "W"),
            (Self::USER, "U"),
            (Self::RSVD, "RSVD"),
            (Self::FETCH, "I"),
            (Self::PK, "PK"),
        ] {
            if self.contains(bit) {
                write!(f, " {name}")?;
            }
        }
        f.write_str(" ]")
    }
}

/// Why a page fault happened (for diagnostics; the guest sees only the error code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultReason {
    /// The entry at `level` (5..=1) had P=0.
    NotPresent {
        /// Table level of the entry.
        level: u32,
    },
    /// The table holding the entry for `level` is not in memory (`addr` is the entry's
    /// address). Reported to the guest as not-present, as KVM does.
    TableOutsideMemory {
        /// Table level of the entry.
        level: u32,
        /// Physical address of the entry.
        addr: u64,
    },
    /// The entry at `level` had reserved bits set.
    ReservedBits {
        /// Table level of the entry.
        level: u32,
        /// The entry's value.
        entry: u64,
    },
    /// The access rights (U/S, R/W, XD, SMEP, SMAP) forbid the access.
    Protection,
    /// A protection key forbids the access.
    ProtectionKey {
        /// The page's key.
        pkey: u8,
    },
}

/// A page fault as the CPU would deliver it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting linear address (CR2).
    pub addr: u64,
    /// The error code pushed by #PF.
    pub error_code: PfErrorCode,
    /// What went wrong.
    pub reason: FaultReason,
}

/// Why a translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// A page fault (#PF).
    #[error("#PF at {:#x}, error code {}: {:?}", .0.addr, .0.error_code, .0.reason)]
    PageFault(PageFault),
    /// The address is not canonical (or wider than 32 bits without long mode): #GP/#SS.
    #[error("linear address {addr:#x} is not canonical for this paging mode")]
    NonCanonical {
        /// The address.
        addr: u64,
    },
    /// The guest kept changing the entries while we tried to set Accessed/Dirty bits.
    #[error("gave up on {addr:#x} after {MAX_RETRIES} lost accessed/dirty races")]
    Contended {
        /// The address.
        addr: u64,
    },
}

impl Fault {
    /// The #PF error code, if this is a page fault.
    pub fn error_code(&self) -> Option<PfErrorCode> {
        match self {
            Fault::PageFault(pf) => Some(pf.error_code),
            _ => None,
        }
    }

    /// The page fault, if this is one.
    pub fn page_fault(&self) -> Option<&PageFault> {
        match self {
            Fault::PageFault(pf) => Some(pf),
            _ => None,
        }
    }
}

/// Rights of a translation, combined over all levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rights {
    /// R/W was set at every level.
    pub writable: bool,
    /// U/S was set at every level (a user-mode address).
    pub user: bool,
    /// XD was set at some level (and EFER.NXE is on).
    pub no_execute: bool,
    /// Protection key of the leaf (4/5-level paging; 0 otherwise).
    pub pkey: u8,
}

/// A successful translation: 32 bytes, built from bits the walk already holds.
///
/// Everything a caller needs to use or cache the translation is here: the address, the
/// page size (hence the page base, [`page_base`](Self::page_base)), the rights combined
/// over all levels, G and D of the leaf, the leaf entry and where it lives (for tools that
/// edit or write-protect the guest's tables), and the number of entries read.
///
/// The address and the leaf are fields; the rest is read through methods, because it is
/// stored the way the walk produces it: G, D and the protection key are bits of
/// `leaf_entry`, and the combined rights, the page size and the reference count share one
/// word whose R/W, U/S and XD bits sit where a paging entry has them (so a walk stores the
/// AND and OR of its entries masked, instead of unpacking them into separate fields - a
/// third of the cost of a 4-level walk was building the result).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address.
    pub gpa: u64,
    /// The leaf entry's value after the walk (with the Accessed/Dirty bits it set).
    pub leaf_entry: u64,
    /// Physical address of the leaf entry.
    pub leaf_addr: u64,
    /// R/W (bit 1) and U/S (bit 2) combined over all levels, XD (bit 63, only with
    /// EFER.NXE), the page size (bits 9:8, [`Translation::SIZE_SHIFT`]) and the number of
    /// entries read (bits 15:12).
    info: u64,
}

const _: () = assert!(core::mem::size_of::<Translation>() == 32);

/// Page sizes by their code in [`Translation`]'s info word.
const SIZE_CODES: [PageSize; 4] = [
    PageSize::Size4K,
    PageSize::Size2M,
    PageSize::Size4M,
    PageSize::Size1G,
];

impl Translation {
    const SIZE_SHIFT: u32 = 8;
    const REFS_SHIFT: u32 = 12;
    /// The rights bits of the info word, in their paging-entry positions.
    const RIGHTS: u64 = WRITABLE | USER | NO_EXECUTE;

    /// The info word's page-size and reference-count bits.
    #[inline(always)]
    const fn shape(size: PageSize, memory_refs: u32) -> u64 {
        let code = match size {
            PageSize::Size4K => 0,
            PageSize::Size2M => 1,
            PageSize::Size4M => 2,
            PageSize::Size1G => 3,
        };
        (code << Self::SIZE_SHIFT) | ((memory_refs as u64) << Self::REFS_SHIFT)
    }

    /// A translation from its parts: `rights_bits` holds R/W, U/S and XD in their
    /// paging-entry positions (other bits are ignored), `shape` comes from
    /// [`shape`](Self::shape).
    #[inline(always)]
    const fn from_parts(
        gpa: u64,
        leaf_entry: u64,
        leaf_addr: u64,
        rights_bits: u64,
        shape: u64,
    ) -> Self {
        Translation {
            gpa,
            leaf_entry,
            leaf_addr,
            info: (rights_bits & Self::RIGHTS) | shape,
        }
    }

    /// Guest-physical base of the page.
    #[inline]
    pub const fn page_base(&self) -> u64 {
        self.gpa & !(self.page_size().bytes() - 1)
    }

    /// Size of the page.
    #[inline]
    pub const fn page_size(&self) -> PageSize {
        SIZE_CODES[((self.info >> Self::SIZE_SHIFT) & 3) as usize]
    }

    /// Rights combined over all levels, and the leaf's protection key (4/5-level paging;
    /// the bits are reserved, hence 0, in the other modes).
    #[inline]
    pub const fn rights(&self) -> Rights {
        Rights {
            writable: self.info & WRITABLE != 0,
            user: self.info & USER != 0,
            no_execute: self.info & NO_EXECUTE != 0,
            pkey: ((self.leaf_entry >> PKEY_SHIFT) & 15) as u8,
        }
    }

    /// The leaf has G set.
    #[inline]
    pub const fn global(&self) -> bool {
        self.leaf_entry & GLOBAL != 0
    }

    /// The leaf's D bit after the walk (a TLB may cache a write only when set).
    #[inline]
    pub const fn dirty(&self) -> bool {
        self.leaf_entry & DIRTY != 0
    }

    /// Number of paging-structure entries read (memory references of the walk, 1..=5).
    #[inline]
    pub const fn memory_refs(&self) -> u8 {
        ((self.info >> Self::REFS_SHIFT) & 15) as u8
    }

    /// The leaf's memory-type selector: the index (0-7) into the IA32_PAT MSR formed by its
    /// PAT (bit 2 of the index), PCD (bit 1) and PWT (bit 0) bits (SDM vol. 3A, 11.12.3).
    /// The PAT bit is bit 7 of a 4 KiB leaf and bit 12 of a large one.
    #[inline]
    pub const fn pat_index(&self) -> u8 {
        let pat = match self.page_size() {
            PageSize::Size4K => PAGE_SIZE,
            _ => LARGE_PAT,
        };
        (self.leaf_entry & WRITE_THROUGH != 0) as u8
            | ((self.leaf_entry & CACHE_DISABLE != 0) as u8) << 1
            | ((self.leaf_entry & pat != 0) as u8) << 2
    }
}

impl core::fmt::Debug for Translation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Translation")
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("leaf_entry", &format_args!("{:#x}", self.leaf_entry))
            .field("leaf_addr", &format_args!("{:#x}", self.leaf_addr))
            .field("page_size", &self.page_size())
            .field("rights", &self.rights())
            .field("global", &self.global())
            .field("dirty", &self.dirty())
            .field("memory_refs", &self.memory_refs())
            .finish()
    }
}

/// The guest's paging-related state: what the walker needs to know about the vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingConfig {
    /// Paging mode.
    pub mode: PagingMode,
    /// CR3 (PCID bits and bit 63 are ignored).
    pub cr3: u64,
    /// CR0.WP.
    pub write_protect: bool,
    /// CR4.PSE (32-bit paging only: enables 4 MiB pages).
    pub pse: bool,
    /// CR4.PGE: the G bit of a leaf makes a global translation only when set (a TLB keeps
    /// global translations across CR3 writes; the walk itself does not depend on it).
    pub pge: bool,
    /// EFER.NXE.
    pub nxe: bool,
    /// CR4.SMEP.
    pub smep: bool,
    /// CR4.SMAP.
    pub smap: bool,
    /// CR4.PKE (protection keys for user pages).
    pub pke: bool,
    /// CR4.PKS (protection keys for supervisor pages).
    pub pks: bool,
    /// PKRU.
    pub pkru: u32,
    /// IA32_PKRS.
    pub pkrs: u32,
    /// EFLAGS.AC.
    pub alignment_check: bool,
    /// MAXPHYADDR (CPUID.80000008H:EAX bits 7:0), 32..=52.
    pub max_phys_bits: u8,
    /// 1 GiB pages supported (CPUID.80000001H:EDX.Page1GB).
    pub gbpages: bool,
    /// PSE-36 supported (CPUID.01H:EDX.PSE36).
    pub pse36: bool,
    /// AMD rules: bit 8 of PML5Es and PML4Es is reserved.
    pub amd: bool,
    /// PAE only: the PDPTE registers loaded at the last CR3 write. `None`: read them from
    /// memory at each walk (what KVM_TRANSLATE does with a fresh CR3). Registers are taken
    /// as given: the CPU refuses a load with reserved bits in a present PDPTE (#GP at the
    /// CR3 write), which is the VMM's check to make (the shadow MMU makes it); a walk
    /// through such a register reports a reserved-bit page fault.
    pub pdptes: Option<[u64; 4]>,
    /// Set Accessed/Dirty bits in guest memory on successful walks.
    pub set_accessed_dirty: bool,
}

impl PagingConfig {
    /// A configuration for `mode` with the usual OS settings: CR0.WP, CR4.PSE, CR4.PGE, EFER.NXE,
    /// MAXPHYADDR 52, 1 GiB pages and PSE-36 supported, A/D updates on; SMEP, SMAP,
    /// protection keys and EFLAGS.AC off.
    pub const fn new(mode: PagingMode, cr3: u64) -> Self {
        PagingConfig {
            mode,
            cr3,
            write_protect: true,
            pse: true,
            pge: true,
            nxe: true,
            smep: false,
            smap: false,
            pke: false,
            pks: false,
            pkru: 0,
            pkrs: 0,
            alignment_check: false,
            max_phys_bits: 52,
            gbpages: true,
            pse36: true,
            amd: false,
            pdptes: None,
            set_accessed_dirty: true,
        }
    }

    /// Derives the configuration from control registers; `None` when CR0.PG is clear.
    /// CPU capabilities (MAXPHYADDR, 1 GiB pages, vendor) keep the defaults of [`new`](Self::new).
    pub fn from_registers(cr0: u64, cr3: u64, cr4: u64, efer: u64, rflags: u64) -> Option<Self> {
        if cr0 & (1 << 31) == 0 {
            return None;
        }
        let mode = match (
            cr4 & (1 << 5) != 0,
            efer & (1 << 10) != 0,
            cr4 & (1 << 12) != 0,
        ) {
            (false, _, _) => PagingMode::Legacy32,
            (true, false, _) => PagingMode::Pae,
            (true, true, false) => PagingMode::Level4,
            (true, true, true) => PagingMode::Level5,
        };
        let mut cfg = PagingConfig::new(mode, cr3);
        cfg.write_protect = cr0 & (1 << 16) != 0;
        cfg.pse = cr4 & (1 << 4) != 0;
        cfg.pge = cr4 & (1 << 7) != 0;
        cfg.nxe = efer & (1 << 11) != 0;
        cfg.smep = cr4 & (1 << 20) != 0;
        cfg.smap = cr4 & (1 << 21) != 0;
        cfg.pke = cr4 & (1 << 22) != 0;
        cfg.pks = cr4 & (1 << 24) != 0;
        cfg.alignment_check = rflags & (1 << 18) != 0;
        Some(cfg)
    }
}

/// Where the walker reads and updates paging-structure entries.
///
/// [`Walker::translate`] uses guest memory directly; the nested walker supplies an
/// implementation that first translates each table address through EPT.
pub trait TableAccess {
    /// Reads the 4- or 8-byte entry at `addr` (`wide`: 8 bytes), which the walk uses as an
    /// entry of paging level `level` (1 for a page table ... 5 for a PML5 table; the same
    /// address may be read at several levels through a self-map). `None` stops the walk.
    fn read_entry(&mut self, addr: u64, level: u32, wide: bool) -> Option<u64>;
    /// Compare-exchanges the entry at `addr`; `None` if it cannot be written.
    fn update_entry(&mut self, addr: u64, wide: bool, old: u64, new: u64)
        -> Option<Result<(), ()>>;
}

/// [`TableAccess`] straight to a [`PhysMemory`].
#[derive(Debug)]
pub struct DirectTables<'a, M: PhysMemory + ?Sized>(pub &'a M);

impl<M: PhysMemory + ?Sized> TableAccess for DirectTables<'_, M> {
    #[inline(always)]
    fn read_entry(&mut self, addr: u64, _level: u32, wide: bool) -> Option<u64> {
        if wide {
            self.0.read_u64(addr)
        } else {
            self.0.read_u32(addr).map(u64::from)
        }
    }

    #[inline]
    fn update_entry(
        &mut self,
        addr: u64,
        wide: bool,
        old: u64,
        new: u64,
    ) -> Option<Result<(), ()>> {
        if wide {
            Some(
                self.0
                    .compare_exchange_u64(addr, old, new)?
                    .map(|_| ())
                    .map_err(|_| ()),
            )
        } else {
            Some(
                self.0
                    .compare_exchange_u32(addr, old as u32, new as u32)?
                    .map(|_| ())
                    .map_err(|_| ()),
            )
        }
    }
}

/// A configured guest page-table walker (reserved-bit masks precomputed).
#[derive(Debug, Clone)]
pub struct Walker {
    cfg: PagingConfig,
    /// Reserved bits per level (index level-1), for non-leaf/4 KiB entries.
    rsvd_table: [u64; 5],
    /// Reserved bits per level for large-page leaves.
    rsvd_large: [u64; 5],
    root: u64,
    /// Precomputed U/S, R/W, XD, SMEP, SMAP rules (as KVM's `permissions[]`): for access
    /// index `kind * 3 + privilege`, bit `rights_index(rights)` is set when denied.
    denied: [u8; 9],
    /// The software TLB's hit verdicts, by access index: bit `r` is set when an access
    /// with rights `r` (bit 0 R/W, bit 1 U/S, bit 2 XD - [`rights_index`] - and bit 3 "the
    /// leaf is dirty") is allowed, needs no Dirty-bit update and no protection-key check.
    /// A clear bit only means "ask the full rules".
    fast_allowed: [u16; 9],
    /// Protection keys can apply (4/5-level paging with CR4.PKE or CR4.PKS).
    pk_active: bool,
    /// `PRESENT`, plus `ACCESSED` when A/D updates are on: bits every entry of a walk must
    /// have for the fast path to leave memory untouched.
    fast_need: u64,
    /// `NO_EXECUTE` with EFER.NXE, else 0.
    nx_bit: u64,
    /// The fast walk's verdict as bit masks, by access index (see [`FastMasks`]).
    fast_masks: [FastMasks; 9],
}

/// One access's rules as masks over the entries of a walk: the walk may be answered by the
/// fast path only if `(AND & check_and) | (leaf & need_leaf) == expect` and `OR & forbid_or`
/// is zero, AND/OR being over all entries (`check_and` never contains D, so the two parts of
/// the comparison cannot mix). Derived in [`Walker::new`] from the `denied` table, so the
/// rules are still written only once.
#[derive(Debug, Clone, Copy, Default)]
struct FastMasks {
    /// The bits of the AND the access looks at: P, A (with A/D updates), R/W and U/S where
    /// the access needs them at every level, and U/S where a user page is denied (SMEP,
    /// SMAP).
    check_and: u64,
    /// Bits reserved at every level, and XD for fetches (with EFER.NXE).
    forbid_or: u64,
    /// D for writes with A/D updates (else the detailed walk must set it).
    need_leaf: u64,
    /// What the masked AND and leaf must come to: the needed bits of the AND (P, A, R/W
    /// and U/S where needed; not U/S where a user page is denied) plus `need_leaf`.
    expect: u64,
}

impl FastMasks {
    /// The fast path's whole verdict from the AND and OR of a walk's entries and its leaf.
    #[inline(always)]
    fn allows(&self, and_bits: u64, or_bits: u64, leaf: u64) -> bool {
        (and_bits & self.check_and) | (leaf & self.need_leaf) == self.expect
            && or_bits & self.forbid_or == 0
    }
}

/// What a successful fast walk learned (the rest of a [`Translation`] follows from it).
#[derive(Clone, Copy)]
struct FastWalk {
    /// The leaf entry.
    leaf: u64,
    /// AND and OR of all entries of the walk.
    and_bits: u64,
    or_bits: u64,
    /// The guest-physical address, and the address of the leaf entry.
    gpa: u64,
    leaf_addr: u64,
    /// The page size and reference count of the walk ([`Translation::shape`]).
    shape: u64,
}

/// Reads entry `offset` (bytes) of the 4 KiB table at `table` through `span`, fetching a
/// new span from `mem` when the table lies outside the current one. `None` also when the
/// table straddles the end of a span: the detailed walk reads such entries one by one.
#[inline(always)]
fn read_span<'a, M: PhysMemory + ?Sized>(
    mem: &'a M,
    span: &mut WordSpan<'a>,
    table: u64,
    offset: u64,
) -> Option<u64> {
    match span.load_table_entry(table, offset) {
        Some(word) => Some(word),
        None => {
            *span = mem.word_span(table)?;
            span.load_table_entry(table, offset)
        }
    }
}

const KINDS: [AccessKind; 3] = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch];
const PRIVILEGES: [Privilege; 3] = [
    Privilege::User,
    Privilege::Supervisor,
    Privilege::ImplicitSupervisor,
];

#[inline(always)]
fn access_index(access: Access) -> usize {
    let k = match access.kind {
        AccessKind::Read => 0,
        AccessKind::Write => 1,
        AccessKind::Fetch => 2,
    };
    let p = match access.privilege {
        Privilege::User => 0,
        Privilege::Supervisor => 1,
        Privilege::ImplicitSupervisor => 2,
    };
    k * 3 + p
}

#[inline(always)]
fn rights_index(rights: Rights) -> u32 {
    u32::from(rights.writable) | u32::from(rights.user) << 1 | u32::from(rights.no_execute) << 2
}

impl Walker {
    /// Precomputes masks for `cfg`.
    pub fn new(cfg: PagingConfig) -> Self {
        let m = u32::from(cfg.max_phys_bits.clamp(32, 52));
        let nx = if cfg.nxe { 0 } else { NO_EXECUTE };
        let hi51 = if m < 52 { bits(51, m) } else { 0 };
        let bit8 = if cfg.amd { 1 << 8 } else { 0 };
        let mut t = [0u64; 5];
        let mut l = [0u64; 5];
        match cfg.mode {
            PagingMode::Legacy32 => {
                // 4 MiB pages: bit 21 always, and PA bits 39:32 (entry bits 20:13) above
                // min(MAXPHYADDR, 40) or all of them without PSE-36.
                let m36 = m.min(40);
                l[1] = if cfg.pse36 {
                    bits(21, 21)
                        | if m36 < 40 {
                            bits(20, 13 + (m36 - 32))
                        } else {
                            0
                        }
                } else {
                    bits(21, 13)
                };
            }
            PagingMode::Pae => {
                let hi62 = bits(62, m);
                t[0] = hi62 | nx;
                t[1] = hi62 | nx;
                l[1] = hi62 | nx | bits(20, 13);
                t[2] = bits(63, m) | bits(8, 5) | bits(2, 1);
            }
            PagingMode::Level4 | PagingMode::Level5 => {
                t[0] = hi51 | nx;
                t[1] = hi51 | nx;
                l[1] = hi51 | nx | bits(20, 13);
                // AMD reserves bit 8 in non-leaf PML5Es/PML4Es only (KVM agrees; PDPTEs
                // ignore it).
                t[2] = hi51 | nx;
                l[2] = hi51 | nx | bits(29, 13) | if cfg.gbpages { 0 } else { PAGE_SIZE };
                t[3] = hi51 | nx | bit8 | PAGE_SIZE;
                t[4] = hi51 | nx | bit8 | PAGE_SIZE;
            }
        }
        // Level-4/5 "large" entries do not exist: PS is reserved there, use the same mask.
        l[3] = t[3];
        l[4] = t[4];
        // The fast 4/5-level walk checks `t[0]` on the OR of all entries: it must be what
        // every level reserves, the other masks adding to it.
        debug_assert!(
            !matches!(cfg.mode, PagingMode::Level4 | PagingMode::Level5)
                || (t[1] == t[0]
                    && t[2] == t[0]
                    && [t[3], t[4], l[1], l[2]].iter().all(|m| m & t[0] == t[0]))
        );
        let mut w = Walker {
            cfg,
            rsvd_table: t,
            rsvd_large: l,
            root: Self::root_of(&cfg),
            denied: [0; 9],
            fast_allowed: [0; 9],
            pk_active: matches!(cfg.mode, PagingMode::Level4 | PagingMode::Level5)
                && (cfg.pke || cfg.pks),
            fast_need: if cfg.set_accessed_dirty {
                PRESENT | ACCESSED
            } else {
                PRESENT
            },
            nx_bit: if cfg.nxe { NO_EXECUTE } else { 0 },
            fast_masks: [FastMasks::default(); 9],
        };
        for kind in KINDS {
            for privilege in PRIVILEGES {
                let access = Access::new(kind, privilege);
                let mut bitmap = 0u8;
                for r in 0..8u32 {
                    let rights = Rights {
                        writable: r & 1 != 0,
                        user: r & 2 != 0,
                        no_execute: r & 4 != 0,
                        pkey: 0,
                    };
                    if w.denied_by_rights(rights, access) {
                        bitmap |= 1 << r;
                    }
                }
                w.denied[access_index(access)] = bitmap;
                let mut fast = 0u16;
                for r in 0..16u32 {
                    let pk_applies = w.pk_active && !access.is_fetch();
                    let dirty_ok = !access.is_write() || r & 8 != 0;
                    if bitmap >> (r & 7) & 1 == 0 && dirty_ok && !pk_applies {
                        fast |= 1 << r;
                    }
                }
                w.fast_allowed[access_index(access)] = fast;
                w.fast_masks[access_index(access)] = w.fast_masks_for(access, bitmap);
            }
        }
        w
    }

    /// Expresses the `denied` bitmap of `access` as masks: the one combination of "needs
    /// R/W", "needs U/S", "forbids U/S" and "forbids XD" that reproduces it for all eight
    /// rights. (Every x86 rule has that shape; were one not to, the masks would send every
    /// walk of that access to the detailed path, never give a wrong answer.)
    fn fast_masks_for(&self, access: Access, denied: u8) -> FastMasks {
        let cfg = &self.cfg;
        let fits = |c: u32| {
            (0..8u32).all(|r| {
                let (w, u, nx) = (r & 1 != 0, r & 2 != 0, r & 4 != 0);
                let deny = (c & 1 != 0 && !w)
                    || (c & 2 != 0 && !u)
                    || (c & 4 != 0 && u)
                    || (c & 8 != 0 && nx);
                deny == (denied >> r & 1 != 0)
            })
        };
        let found = (0..16u32).find(|&c| fits(c));
        debug_assert!(
            found.is_some(),
            "{access:?}: no mask form for {denied:#010b}"
        );
        let Some(c) = found else {
            // PRESENT is in every entry of a successful walk: always "walk in detail".
            return FastMasks {
                forbid_or: PRESENT,
                ..FastMasks::default()
            };
        };
        let pick = |bit: u32, mask: u64| if c & bit != 0 { mask } else { 0 };
        let need_and = self.fast_need | pick(1, WRITABLE) | pick(2, USER);
        let forbid_and = pick(4, USER);
        let need_leaf = if access.is_write() && cfg.set_accessed_dirty {
            DIRTY
        } else {
            0
        };
        debug_assert_eq!((need_and | forbid_and) & need_leaf, 0);
        FastMasks {
            check_and: need_and | forbid_and,
            // "Needs U/S" and "forbids U/S" together deny everything (no x86 rule does):
            // PRESENT in the OR sends every walk to the detailed path.
            forbid_or: self.rsvd_table[0]
                | (pick(8, NO_EXECUTE) & self.nx_bit)
                | if need_and & forbid_and != 0 {
                    PRESENT
                } else {
                    0
                },
            need_leaf,
            expect: need_and | need_leaf,
        }
    }

    /// The U/S, R/W + WP, XD, SMEP and SMAP rules (SDM 4.6.1), spelled out; evaluated once
    /// per configuration to fill the `denied` table.
    fn denied_by_rights(&self, rights: Rights, access: Access) -> bool {
        let cfg = &self.cfg;
        let user_page = rights.user;
        match (access.privilege, access.kind) {
            (Privilege::User, AccessKind::Read) => !user_page,
            (Privilege::User, AccessKind::Write) => !user_page || !rights.writable,
            (Privilege::User, AccessKind::Fetch) => !user_page || rights.no_execute,
            (_, AccessKind::Fetch) => rights.no_execute || (user_page && cfg.smep),
            (privilege, kind) => {
                let smap = user_page
                    && cfg.smap
                    && !(privilege == Privilege::Supervisor && cfg.alignment_check);
                smap || (kind == AccessKind::Write && !rights.writable && cfg.write_protect)
            }
        }
    }

    /// The configuration.
    pub fn config(&self) -> &PagingConfig {
        &self.cfg
    }

    /// The physical address of the top-level table.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// A guest write to CR3: only the root changes, so nothing else is recomputed (a
    /// [`Walker::new`] per CR3 switch would rebuild every mask).
    ///
    /// PAE paging: the CPU loads its PDPTE registers from the new CR3, and this walker has
    /// no memory to load them from, so PDPTE registers held in the config are dropped and
    /// later walks read the PDPTEs from memory at the new CR3; call
    /// [`set_pdptes`](Self::set_pdptes) afterwards to model the registers loaded at the
    /// write (later guest writes to the PDPT then take effect only at the next CR3 load).
    pub fn set_cr3(&mut self, cr3: u64) {
        self.cfg.cr3 = cr3;
        self.cfg.pdptes = None;
        self.root = Self::root_of(&self.cfg);
    }

    /// PAE paging: the PDPTE registers (`None`: read the PDPTEs from memory at each walk),
    /// taken as given (see [`PagingConfig::pdptes`]). Ignored in the other modes.
    pub fn set_pdptes(&mut self, pdptes: Option<[u64; 4]>) {
        if self.cfg.mode == PagingMode::Pae {
            self.cfg.pdptes = pdptes;
        }
    }

    /// The top-level table's address in CR3: bits 31:12 (32-bit paging), 31:5 (PAE) or
    /// MAXPHYADDR-1:12; PCID and flag bits are ignored.
    fn root_of(cfg: &PagingConfig) -> u64 {
        match cfg.mode {
            PagingMode::Legacy32 => cfg.cr3 & 0xffff_f000,
            PagingMode::Pae => cfg.cr3 & 0xffff_ffe0,
            PagingMode::Level4 | PagingMode::Level5 => {
                cfg.cr3 & bits(u32::from(cfg.max_phys_bits.clamp(32, 52)) - 1, 12)
            }
        }
    }

    /// The error-code bits every fault of `access` carries (W, U, I).
    #[inline]
    pub fn access_code(&self, access: Access) -> u32 {
        let mut code = 0;
        if access.is_write() {
            code |= PfErrorCode::WRITE;
        }
        if access.is_user() {
            code |= PfErrorCode::USER;
        }
        if access.is_fetch()
            && (self.cfg.smep || (self.cfg.nxe && self.cfg.mode != PagingMode::Legacy32))
        {
            code |= PfErrorCode::FETCH;
        }
        code
    }

    /// Checks `access` against combined `rights` under the current control registers.
    ///
    /// Returns the error code of the resulting #PF when the access is not allowed. This is
    /// the single place where the permission rules live; the TLB calls it on hits.
    #[inline(always)]
    pub fn check_rights(&self, rights: Rights, access: Access) -> Result<(), PfErrorCode> {
        let cfg = &self.cfg;
        let write = access.is_write();
        let user_page = rights.user;
        let denied = (self.denied[access_index(access)] >> rights_index(rights)) & 1 != 0;
        let mut pk = false;
        if self.pk_active && !access.is_fetch() {
            let keys = if user_page && cfg.pke {
                Some(cfg.pkru)
            } else if !user_page && cfg.pks && !access.is_user() {
                Some(cfg.pkrs)
            } else {
                None
            };
            if let Some(keys) = keys {
                let k = (keys >> (2 * u32::from(rights.pkey & 15))) & 3;
                let access_disabled = k & 1 != 0;
                let write_disabled = k & 2 != 0;
                pk = access_disabled
                    || (write && write_disabled && (access.is_user() || cfg.write_protect));
            }
        }
        if denied || pk {
            let mut code = self.access_code(access) | PfErrorCode::PRESENT;
            if pk {
                code |= PfErrorCode::PK;
            }
            return Err(PfErrorCode(code));
        }
        Ok(())
    }

    fn canonical(&self, addr: u64) -> bool {
        match self.cfg.mode {
            PagingMode::Legacy32 | PagingMode::Pae => addr >> 32 == 0,
            PagingMode::Level4 => ((addr << 16) as i64 >> 16) as u64 == addr,
            PagingMode::Level5 => ((addr << 7) as i64 >> 7) as u64 == addr,
        }
    }

    /// Whether an access with the raw rights bits of a cached translation (`bits & 15`:
    /// R/W, U/S, XD, dirty, as the software TLB stores them) is allowed without a Dirty-bit
    /// update and without a protection-key check. `false` means "apply the full rules"
    /// ([`check_rights`](Self::check_rights)), not necessarily a fault.
    #[inline(always)]
    pub(crate) fn fast_allowed(&self, access: Access, bits: u64) -> bool {
        (self.fast_allowed[access_index(access)] >> (bits & 15)) & 1 != 0
    }

    /// Translates `addr` for `access`, reading tables from `mem`.
    ///
    /// 4/5-level walks first try a fast path that handles the common case - every entry
    /// present, no reserved bit, the access allowed, no Accessed/Dirty bit to set - with
    /// the whole verdict computed from bits gathered across the levels, reading entries
    /// through a [`WordSpan`] when `mem` offers one. Anything else
    /// is walked again by the detailed path ([`translate_with`](Self::translate_with) over
    /// [`DirectTables`]), which builds the exact fault or performs the A/D updates; the two
    /// agree on every input (`tests/fast_paths.rs` checks it on random tables).
    #[inline]
    pub fn translate<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        addr: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        // 4-level paging, by far the most common mode, is inlined into the caller; the rest
        // stays out of line so that the inlined code is small.
        if self.cfg.mode == PagingMode::Level4 {
            return self.walk_fast::<4, M>(mem, addr, access, || {
                self.translate_out_of_line(mem, addr, access)
            });
        }
        self.translate_out_of_line(mem, addr, access)
    }

    /// [`translate`](Self::translate) past the inlined 4-level fast path: the 5-level fast
    /// path, then the detailed walk (every mode, exact faults, A/D updates).
    #[inline(never)]
    fn translate_out_of_line<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        addr: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        let detailed = || self.translate_with(&mut DirectTables(mem), addr, access);
        if self.cfg.mode == PagingMode::Level5 {
            return self.walk_fast::<5, M>(mem, addr, access, detailed);
        }
        detailed()
    }

    /// The fast 4/5-level walk: `Some` only for a successful translation that changes
    /// nothing in memory, `None` for "walk again in detail".
    ///
    /// Entries are read through a [`WordSpan`](crate::memory::WordSpan) (one bounds check
    /// per level, off the chain of dependent loads; a new span only when a table lies in
    /// another region). The checks are folded into masks: the entries are ANDed (P, R/W,
    /// U/S, A must be set at every level) and ORed (common reserved bits, XD at any level),
    /// and one expression over the access's [`FastMasks`] decides; only the reserved bits
    /// specific to a PML5E/PML4E or a large-page leaf are tested where the entry is read
    /// (one predictable branch, one register fewer through the walk). A non-present entry
    /// is only noticed at the end (its "next table" is still read, from guest RAM or not
    /// at all, which has no side effect).
    #[inline(always)]
    fn fast_walk<const LEVELS: u32, M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        addr: u64,
        access: Access,
    ) -> Option<FastWalk> {
        const NEXT: u64 = bits(51, 12);
        let unused = 64 - (12 + 9 * LEVELS);
        if ((addr << unused) as i64 >> unused) as u64 != addr {
            return None;
        }
        let mut span = mem.word_span(self.root)?;
        let mut read = |table: u64, offset: u64| read_span(mem, &mut span, table, offset);
        // Entries are read as (table, byte offset) so that the host address of the next
        // entry is one AND away from the current entry (see `load_table_entry`). Bits
        // reserved in every entry of the walk (above MAXPHYADDR, XD without NXE) are
        // checked once on the OR of all entries; each level only adds what is specific to
        // it.
        let mut table = self.root;
        let mut and_bits = u64::MAX;
        let mut or_bits = 0u64;
        if LEVELS == 5 {
            let e = read(table, (addr >> 45) & 0xff8)?;
            if e & self.rsvd_table[4] != 0 {
                return None;
            }
            and_bits = e;
            or_bits = e;
            table = e & NEXT;
        }
        let e = read(table, (addr >> 36) & 0xff8)?;
        if e & self.rsvd_table[3] != 0 {
            return None;
        }
        and_bits &= e;
        or_bits |= e;
        table = e & NEXT;
        let offset = (addr >> 27) & 0xff8;
        let e = read(table, offset)?;
        and_bits &= e;
        or_bits |= e;
        // Each branch knows its page size: the GPA and the result's shape word are built
        // there from constants (a common tail would look the size up in a table).
        const fn gpa_of(leaf: u64, addr: u64, size: PageSize) -> u64 {
            let offset = size.bytes() - 1;
            (leaf & NEXT & !offset) | (addr & offset)
        }
        let refs = |level: u32| LEVELS + 1 - level;
        let (leaf, leaf_addr, gpa, shape) = if e & PAGE_SIZE != 0 {
            if e & self.rsvd_large[2] != 0 {
                return None;
            }
            (
                e,
                table + offset,
                gpa_of(e, addr, PageSize::Size1G),
                Translation::shape(PageSize::Size1G, refs(3)),
            )
        } else {
            table = e & NEXT;
            let offset = (addr >> 18) & 0xff8;
            let e = read(table, offset)?;
            and_bits &= e;
            or_bits |= e;
            if e & PAGE_SIZE != 0 {
                if e & self.rsvd_large[1] != 0 {
                    return None;
                }
                (
                    e,
                    table + offset,
                    gpa_of(e, addr, PageSize::Size2M),
                    Translation::shape(PageSize::Size2M, refs(2)),
                )
            } else {
                table = e & NEXT;
                let offset = (addr >> 9) & 0xff8;
                let e = read(table, offset)?;
                and_bits &= e;
                or_bits |= e;
                (
                    e,
                    table + offset,
                    gpa_of(e, addr, PageSize::Size4K),
                    Translation::shape(PageSize::Size4K, refs(1)),
                )
            }
        };
        // Presence, reserved bits, rights, A and D in one expression (see `FastMasks`).
        let m = &self.fast_masks[access_index(access)];
        if !m.allows(and_bits, or_bits, leaf) {
            return None;
        }
        // Protection keys depend on the key's PKRU/PKRS bits: the full rule decides.
        if self.pk_active
            && !access.is_fetch()
            && self
                .check_rights(
                    Self::fast_rights(and_bits, or_bits & self.nx_bit, leaf),
                    access,
                )
                .is_err()
        {
            return None;
        }
        Some(FastWalk {
            leaf,
            and_bits,
            or_bits,
            gpa,
            leaf_addr,
            shape,
        })
    }

    /// The combined rights of a walk from the AND and OR of its entries (`nx`: the OR's
    /// XD bit, already masked with EFER.NXE) and its leaf.
    #[inline(always)]
    fn fast_rights(and_bits: u64, nx: u64, leaf: u64) -> Rights {
        Rights {
            writable: and_bits & WRITABLE != 0,
            user: and_bits & USER != 0,
            no_execute: nx != 0,
            pkey: ((leaf >> PKEY_SHIFT) & 15) as u8,
        }
    }

    /// [`fast_walk`](Self::fast_walk) building the full [`Translation`], or handing over
    /// to `detailed` (called in tail position so that both paths return into the same
    /// place).
    #[inline(always)]
    fn walk_fast<const LEVELS: u32, M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        addr: u64,
        access: Access,
        detailed: impl FnOnce() -> Result<Translation, Fault>,
    ) -> Result<Translation, Fault> {
        let Some(w) = self.fast_walk::<LEVELS, M>(mem, addr, access) else {
            return detailed();
        };
        Ok(Translation::from_parts(
            w.gpa,
            w.leaf,
            w.leaf_addr,
            (w.and_bits & (WRITABLE | USER)) | (w.or_bits & self.nx_bit),
            w.shape,
        ))
    }

    /// The guest-physical address of `addr` when the common case applies, `None` otherwise.
    ///
    /// This is the fast path of [`translate`](Self::translate) on its own, for callers
    /// that only need the address (an emulator's memory access): 4/5-level paging, every
    /// check done (canonical address, P, reserved bits, U/S, R/W with CR0.WP, NX, SMEP,
    /// SMAP, protection keys), and the access needing no Accessed/Dirty update. `Some`
    /// is exactly the `gpa` that [`translate`](Self::translate) would return; `None` means
    /// "call [`translate`](Self::translate)", which then reports the fault, sets the A/D
    /// bits or walks another paging mode. The answer comes back in registers.
    #[inline]
    pub fn fast_translate<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        addr: u64,
        access: Access,
    ) -> Option<u64> {
        // As in `translate`: the 4-level walk inline, the 5-level one out of line.
        if self.cfg.mode == PagingMode::Level4 {
            return Some(self.fast_walk::<4, M>(mem, addr, access)?.gpa);
        }
        self.fast_translate_level5(mem, addr, access)
    }

    /// [`fast_translate`](Self::fast_translate) for the other modes.
    #[inline(never)]
    fn fast_translate_level5<M: PhysMemory + ?Sized>(
        &self,
        mem: &M,
        addr: u64,
        access: Access,
    ) -> Option<u64> {
        if self.cfg.mode != PagingMode::Level5 {
            return None;
        }
        Some(self.fast_walk::<5, M>(mem, addr, access)?.gpa)
    }

    /// Translates `addr` for `access`, reading tables through `tables`.
    #[inline]
    pub fn translate_with<T: TableAccess + ?Sized>(
        &self,
        tables: &mut T,
        addr: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        if !self.canonical(addr) {
            return Err(Fault::NonCanonical { addr });
        }
        // No closures here: the walk is inlined so the translation is built in place. The
        // 4/5-level walks report a lost accessed/dirty race as `Contended` and are retried.
        match self.cfg.mode {
            PagingMode::Level4 => {
                for _ in 0..MAX_RETRIES + 1 {
                    match self.walk_long::<4, T>(tables, addr, access) {
                        Err(Fault::Contended { .. }) => continue,
                        result => return result,
                    }
                }
            }
            PagingMode::Level5 => {
                for _ in 0..MAX_RETRIES + 1 {
                    match self.walk_long::<5, T>(tables, addr, access) {
                        Err(Fault::Contended { .. }) => continue,
                        result => return result,
                    }
                }
            }
            _ => {
                for _ in 0..=MAX_RETRIES {
                    if let Some(result) = self.walk_once(tables, addr, access) {
                        return result;
                    }
                }
            }
        }
        Err(Fault::Contended { addr })
    }

    /// Builds the #PF of a failed table step out of line, so the hot walk only carries a
    /// branch per check; `extra` are the error-code bits beyond the access's own.
    #[cold]
    #[inline(never)]
    fn step_fault(&self, addr: u64, access: Access, extra: u32, reason: FaultReason) -> Fault {
        Fault::PageFault(PageFault {
            addr,
            error_code: PfErrorCode(self.access_code(access) | extra),
            reason,
        })
    }

    /// Builds a protection #PF (the code from [`check_rights`](Self::check_rights)) out of
    /// line.
    #[cold]
    #[inline(never)]
    fn rights_fault(addr: u64, error_code: PfErrorCode, reason: FaultReason) -> Fault {
        Fault::PageFault(PageFault {
            addr,
            error_code,
            reason,
        })
    }

    /// One level of the 4/5-level walk: reads the entry for `LEVEL` in `table` and checks
    /// P and the reserved bits (large-page masks at levels 2 and 3 when PS is set). The
    /// level is a constant, so the mask lookups and the PS test fold away.
    #[inline(always)]
    fn step<const LEVEL: u32, T: TableAccess + ?Sized>(
        &self,
        tables: &mut T,
        addr: u64,
        table: u64,
        access: Access,
    ) -> Result<u64, Fault> {
        let entry_addr = table + ((addr >> (9 * LEVEL)) & 0xff8);
        let Some(entry) = tables.read_entry(entry_addr, LEVEL, true) else {
            return Err(self.step_fault(
                addr,
                access,
                0,
                FaultReason::TableOutsideMemory {
                    level: LEVEL,
                    addr: entry_addr,
                },
            ));
        };
        if entry & PRESENT == 0 {
            return Err(self.step_fault(addr, access, 0, FaultReason::NotPresent { level: LEVEL }));
        }
        let slot = LEVEL as usize - 1;
        let rsvd = if (LEVEL == 2 || LEVEL == 3) && entry & PAGE_SIZE != 0 {
            self.rsvd_large.get(slot).copied().unwrap_or(0)
        } else {
            self.rsvd_table.get(slot).copied().unwrap_or(0)
        };
        if entry & rsvd != 0 {
            return Err(self.step_fault(
                addr,
                access,
                PfErrorCode::PRESENT | PfErrorCode::RSVD,
                FaultReason::ReservedBits {
                    level: LEVEL,
                    entry,
                },
            ));
        }
        Ok(entry)
    }

    /// The 4/5-level walk, specialised and unrolled: 8-byte entries, 9 index bits per
    /// level, large pages at levels 2 and 3 only. Same semantics as
    /// [`walk_once`](Self::walk_once), which the unit tests and the KVM differential test
    /// exercise through this path. A lost accessed/dirty race returns `Contended`, which
    /// [`translate_with`](Self::translate_with) retries.
    #[inline(always)]
    fn walk_long<const LEVELS: u32, T: TableAccess + ?Sized>(
        &self,
        tables: &mut T,
        addr: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        const NEXT: u64 = bits(51, 12);
        // Entries by level (index level-1), kept for the rare A/D update path, which
        // recomputes their addresses.
        let mut path = [0u64; 5];
        let mut table = self.root;
        let mut and_bits = u64::MAX;
        let mut or_bits = 0u64;
        if LEVELS == 5 {
            let e = self.step::<5, T>(tables, addr, table, access)?;
            path[4] = e;
            and_bits = e;
            or_bits = e;
            table = e & NEXT;
        }
        let e = self.step::<4, T>(tables, addr, table, access)?;
        path[3] = e;
        and_bits &= e;
        or_bits |= e;
        table = e & NEXT;
        let e = self.step::<3, T>(tables, addr, table, access)?;
        path[2] = e;
        and_bits &= e;
        or_bits |= e;
        let (leaf, level, size) = if e & PAGE_SIZE != 0 {
            (e, 3, PageSize::Size1G)
        } else {
            table = e & NEXT;
            let e = self.step::<2, T>(tables, addr, table, access)?;
            path[1] = e;
            and_bits &= e;
            or_bits |= e;
            if e & PAGE_SIZE != 0 {
                (e, 2, PageSize::Size2M)
            } else {
                table = e & NEXT;
                let e = self.step::<1, T>(tables, addr, table, access)?;
                path[0] = e;
                and_bits &= e;
                or_bits |= e;
                (e, 1, PageSize::Size4K)
            }
        };
        let leaf_addr = table + ((addr >> (9 * level)) & 0xff8);
        let pkey = ((leaf >> PKEY_SHIFT) & 15) as u8;
        let rights = Rights {
            writable: and_bits & WRITABLE != 0,
            user: and_bits & USER != 0,
            no_execute: self.cfg.nxe && or_bits & NO_EXECUTE != 0,
            pkey,
        };
        if let Err(code) = self.check_rights(rights, access) {
            let reason = if code.contains(PfErrorCode::PK) {
                FaultReason::ProtectionKey { pkey }
            } else {
                FaultReason::Protection
            };
            return Err(Self::rights_fault(addr, code, reason));
        }
        let mut leaf_now = leaf;
        let need_dirty = access.is_write() && leaf & DIRTY == 0;
        if self.cfg.set_accessed_dirty && (and_bits & ACCESSED == 0 || need_dirty) {
            let mut table = self.root;
            for lvl in (level..=LEVELS).rev() {
                let entry = path.get((lvl - 1) as usize).copied().unwrap_or_default();
                let entry_addr = table + ((addr >> (9 * lvl)) & 0xff8);
                table = entry & NEXT;
                let mut want = ACCESSED;
                if lvl == level && access.is_write() {
                    want |= DIRTY;
                }
                if entry & want != want {
                    // `None`: memory that cannot be written (ROM): nothing to record.
                    if let Some(Err(())) =
                        tables.update_entry(entry_addr, true, entry, entry | want)
                    {
                        return Err(Fault::Contended { addr });
                    }
                    if lvl == level {
                        leaf_now = entry | want;
                    }
                }
            }
        }
        let offset = size.bytes() - 1;
        Ok(Translation::from_parts(
            (leaf & NEXT & !offset) | (addr & offset),
            leaf_now,
            leaf_addr,
            (and_bits & (WRITABLE | USER)) | (or_bits & self.nx_bit),
            Translation::shape(size, LEVELS + 1 - level),
        ))
    }

    /// One walk; `None` when an A/D update lost a race and the walk must restart.
    #[inline(never)]
    fn walk_once<T: TableAccess + ?Sized>(
        &self,
        tables: &mut T,
        addr: u64,
        access: Access,
    ) -> Option<Result<Translation, Fault>> {
        let cfg = &self.cfg;
        let mode = cfg.mode;
        let wide = mode != PagingMode::Legacy32;
        let pf = |code: u32, reason| {
            Some(Err(Fault::PageFault(PageFault {
                addr,
                error_code: PfErrorCode(code),
                reason,
            })))
        };
        let mut path = [(0u64, 0u64); 5];
        let mut refs = 0u8;
        let mut writable = true;
        let mut user = true;
        let mut no_execute = false;
        let mut table = self.root;
        let mut level = mode.levels();
        let (leaf, size) = loop {
            let shift = if wide {
                12 + 9 * (level - 1)
            } else {
                12 + 10 * (level - 1)
            };
            let (entry_addr, entry) = if mode == PagingMode::Pae && level == 3 {
                let index = (addr >> 30) & 3;
                let entry_addr = table + index * 8;
                match cfg.pdptes {
                    Some(regs) => (entry_addr, regs[index as usize]),
                    None => {
                        refs += 1;
                        match tables.read_entry(entry_addr, level, true) {
                            Some(e) => (entry_addr, e),
                            None => {
                                return pf(
                                    self.access_code(access),
                                    FaultReason::TableOutsideMemory {
                                        level,
                                        addr: entry_addr,
                                    },
                                )
                            }
                        }
                    }
                }
            } else {
                let index_mask = if wide { 0x1ff } else { 0x3ff };
                let entry_addr = table + ((addr >> shift) & index_mask) * if wide { 8 } else { 4 };
                refs += 1;
                match tables.read_entry(entry_addr, level, wide) {
                    Some(e) => (entry_addr, e),
                    None => {
                        return pf(
                            self.access_code(access),
                            FaultReason::TableOutsideMemory {
                                level,
                                addr: entry_addr,
                            },
                        )
                    }
                }
            };
            path[(level - 1) as usize] = (entry_addr, entry);
            if entry & PRESENT == 0 {
                return pf(self.access_code(access), FaultReason::NotPresent { level });
            }
            let large = level > 1
                && entry & PAGE_SIZE != 0
                && (level < 3 || mode != PagingMode::Pae)
                && (mode != PagingMode::Legacy32 || cfg.pse);
            let idx = (level - 1) as usize;
            let rsvd = if large {
                self.rsvd_large[idx]
            } else {
                self.rsvd_table[idx]
            };
            if entry & rsvd != 0 {
                return pf(
                    self.access_code(access) | PfErrorCode::PRESENT | PfErrorCode::RSVD,
                    FaultReason::ReservedBits { level, entry },
                );
            }
            if !(mode == PagingMode::Pae && level == 3) {
                writable &= entry & WRITABLE != 0;
                user &= entry & USER != 0;
                no_execute |= cfg.nxe && entry & NO_EXECUTE != 0;
            }
            if level == 1 || large {
                let size = match (level, wide) {
                    (1, _) => PageSize::Size4K,
                    (2, false) => PageSize::Size4M,
                    (2, true) => PageSize::Size2M,
                    _ => PageSize::Size1G,
                };
                break (entry, size);
            }
            table = if wide {
                entry & bits(51, 12)
            } else {
                entry & 0xffff_f000
            };
            level -= 1;
        };
        let pkey = if matches!(mode, PagingMode::Level4 | PagingMode::Level5) {
            ((leaf >> PKEY_SHIFT) & 15) as u8
        } else {
            0
        };
        let rights = Rights {
            writable,
            user,
            no_execute,
            pkey,
        };
        if let Err(code) = self.check_rights(rights, access) {
            let reason = if code.contains(PfErrorCode::PK) {
                FaultReason::ProtectionKey { pkey }
            } else {
                FaultReason::Protection
            };
            return pf(code.bits(), reason);
        }
        let page_base = match size {
            PageSize::Size4M => (leaf & 0xffc0_0000) | (((leaf >> 13) & 0xff) << 32),
            PageSize::Size4K if !wide => leaf & 0xffff_f000,
            _ => leaf & bits(51, 12) & !(size.bytes() - 1),
        };
        let leaf_level = level;
        let mut leaf_now = leaf;
        if cfg.set_accessed_dirty {
            for lvl in (leaf_level..=mode.levels()).rev() {
                if mode == PagingMode::Pae && lvl == 3 {
                    continue;
                }
                let (entry_addr, entry) = path[(lvl - 1) as usize];
                let mut want = ACCESSED;
                if lvl == leaf_level && access.is_write() {
                    want |= DIRTY;
                }
                if entry & want != want {
                    match tables.update_entry(entry_addr, wide, entry, entry | want) {
                        Some(Ok(())) => {}
                        // The guest changed the entry: restart from the top.
                        Some(Err(())) => return None,
                        // Memory that cannot be written (ROM): nothing to record.
                        None => {}
                    }
                    if lvl == leaf_level {
                        leaf_now = entry | want;
                    }
                }
            }
        }
        let rights_bits = (u64::from(rights.writable) * WRITABLE)
            | (u64::from(rights.user) * USER)
            | (u64::from(rights.no_execute) * NO_EXECUTE);
        Some(Ok(Translation::from_parts(
            page_base | (addr & (size.bytes() - 1)),
            leaf_now,
            path[(leaf_level - 1) as usize].0,
            rights_bits,
            Translation::shape(size, u32::from(refs)),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::FlatMemory;

    const P: u64 = PRESENT;
    const W: u64 = WRITABLE;
    const U: u64 = USER;
    const PWU: u64 = P | W | U;
    const VA: u64 = 0x40_5123;

    /// 4-level tables mapping VA 0x405000 -> 0x7000 with the given flags per level
    /// (PML4E, PDPTE, PDE, PTE).
    fn l4(flags: [u64; 4]) -> FlatMemory {
        let mem = FlatMemory::new(0, 0x10000);
        mem.write_u64(0x1000, 0x2000 | flags[0]).unwrap();
        mem.write_u64(0x2000, 0x3000 | flags[1]).unwrap();
        mem.write_u64(0x3010, 0x4000 | flags[2]).unwrap();
        mem.write_u64(0x4028, 0x7000 | flags[3]).unwrap();
        mem
    }

    fn cfg4() -> PagingConfig {
        PagingConfig::new(PagingMode::Level4, 0x1000)
    }

    fn code(r: Result<Translation, Fault>) -> Option<u32> {
        r.err().and_then(|f| f.error_code()).map(|c| c.bits())
    }

    const PF_P: u32 = PfErrorCode::PRESENT;
    const PF_W: u32 = PfErrorCode::WRITE;
    const PF_U: u32 = PfErrorCode::USER;
    const PF_R: u32 = PfErrorCode::RSVD;
    const PF_I: u32 = PfErrorCode::FETCH;
    const PF_K: u32 = PfErrorCode::PK;

    #[test]
    fn level4_4k_walk_sets_accessed_and_dirty_on_success_only() {
        let mem = l4([PWU, PWU, PWU, PWU]);
        let w = Walker::new(cfg4());
        let t = w.translate(&mem, VA, Access::user_read()).unwrap();
        assert_eq!(t.gpa, 0x7123);
        assert_eq!(t.page_base(), 0x7000);
        assert_eq!(t.page_size(), PageSize::Size4K);
        assert_eq!(t.memory_refs(), 4);
        assert!(!t.dirty());
        for a in [0x1000, 0x2000, 0x3010, 0x4028] {
            assert_eq!(
                mem.read_u64(a).unwrap() & (ACCESSED | DIRTY),
                ACCESSED,
                "{a:#x}"
            );
        }
        let t = w.translate(&mem, VA, Access::user_write()).unwrap();
        assert!(t.dirty());
        assert_eq!(mem.read_u64(0x4028).unwrap() & DIRTY, DIRTY);
        assert_eq!(mem.read_u64(0x3010).unwrap() & DIRTY, 0);
        // The leaf is reported with the bits the walk set.
        assert_eq!(
            (t.leaf_addr, t.leaf_entry),
            (0x4028, 0x7000 | PWU | ACCESSED | DIRTY)
        );
        assert_eq!(t.pat_index(), 0);
        // A 4 KiB leaf's PAT bit is bit 7: the index is PAT:PCD:PWT.
        mem.write_u64(0x4028, 0x7000 | PWU | PAGE_SIZE | WRITE_THROUGH)
            .unwrap();
        let t = w.translate(&mem, VA, Access::user_read()).unwrap();
        assert_eq!((t.pat_index(), t.page_size()), (5, PageSize::Size4K));

        // A faulting walk touches nothing.
        let mem = l4([PWU, PWU, PWU, P | U]);
        assert_eq!(
            code(w.translate(&mem, VA, Access::user_write())),
            Some(PF_P | PF_W | PF_U)
        );
        for a in [0x1000, 0x2000, 0x3010, 0x4028] {
            assert_eq!(mem.read_u64(a).unwrap() & ACCESSED, 0);
        }
        // Without A/D updates memory is left alone even on success.
        let mut cfg = cfg4();
        cfg.set_accessed_dirty = false;
        Walker::new(cfg)
            .translate(&mem, VA, Access::user_read())
            .unwrap();
        assert_eq!(mem.read_u64(0x1000).unwrap() & ACCESSED, 0);
    }

    #[test]
    fn large_pages_level4() {
        let mem = FlatMemory::new(0, 0x10000);
        // PML4[0] -> PDPT 0x2000; PDPT[1] = 1 GiB page at 0x8000_0000; PDPT[0] -> PD 0x3000;
        // PD[3] = 2 MiB page at 0x60_0000 with PAT bit 12 set.
        mem.write_u64(0x1000, 0x2000 | PWU).unwrap();
        mem.write_u64(0x2008, 0x8000_0000 | PWU | PAGE_SIZE)
            .unwrap();
        mem.write_u64(0x2000, 0x3000 | PWU).unwrap();
        mem.write_u64(0x3018, 0x60_0000 | PWU | PAGE_SIZE | LARGE_PAT)
            .unwrap();
        let w = Walker::new(cfg4());
        let t = w
            .translate(&mem, 0x4123_4567, Access::supervisor_read())
            .unwrap();
        assert_eq!(
            (t.gpa, t.page_size(), t.memory_refs()),
            (0x8123_4567, PageSize::Size1G, 2)
        );
        let t = w
            .translate(&mem, 0x67_89ab, Access::supervisor_write())
            .unwrap();
        assert_eq!(
            (t.gpa, t.page_size(), t.memory_refs()),
            (0x67_89ab, PageSize::Size2M, 3)
        );
        assert!(t.dirty() && mem.read_u64(0x3018).unwrap() & DIRTY != 0);
        // A large leaf's PAT bit is bit 12 (bit 7 is PS there).
        assert_eq!(t.pat_index(), 4);
        mem.write_u64(0x3018, 0x60_0000 | PWU | PAGE_SIZE | CACHE_DISABLE)
            .unwrap();
        let t = w.translate(&mem, 0x60_0000, Access::supervisor_read());
        assert_eq!(t.unwrap().pat_index(), 2);

        // Without 1 GiB pages PS in a PDPTE is reserved.
        let mut cfg = cfg4();
        cfg.gbpages = false;
        assert_eq!(
            code(Walker::new(cfg).translate(&mem, 0x4000_0000, Access::supervisor_read())),
            Some(PF_P | PF_R)
        );
        // Reserved bits 20:13 of a 2 MiB PDE and 29:13 of a 1 GiB PDPTE.
        mem.write_u64(0x3018, 0x60_0000 | PWU | PAGE_SIZE | (1 << 13))
            .unwrap();
        let f = w
            .translate(&mem, 0x60_0000, Access::supervisor_read())
            .unwrap_err();
        assert_eq!(
            f.page_fault().unwrap().reason,
            FaultReason::ReservedBits {
                level: 2,
                entry: 0x60_0000 | PWU | PAGE_SIZE | (1 << 13)
            }
        );
        mem.write_u64(0x2008, 0x8000_0000 | PWU | PAGE_SIZE | (1 << 29))
            .unwrap();
        assert_eq!(
            code(w.translate(&mem, 0x4000_0000, Access::user_fetch())),
            Some(PF_P | PF_R | PF_U | PF_I)
        );
    }

    /// (PTE flags, config tweak, access, expected error code or None for success).
    type Case = (u64, fn(&mut PagingConfig), Access, Option<u32>);

    fn none(_: &mut PagingConfig) {}
    fn no_wp(c: &mut PagingConfig) {
        c.write_protect = false;
    }
    fn smep(c: &mut PagingConfig) {
        c.smep = true;
    }
    fn smap(c: &mut PagingConfig) {
        c.smap = true;
    }
    fn smap_ac(c: &mut PagingConfig) {
        c.smap = true;
        c.alignment_check = true;
    }
    fn smap_ac_no_wp(c: &mut PagingConfig) {
        smap_ac(c);
        c.write_protect = false;
    }
    fn no_nxe(c: &mut PagingConfig) {
        c.nxe = false;
    }
    fn no_nxe_smep(c: &mut PagingConfig) {
        c.nxe = false;
        c.smep = true;
    }

    #[test]
    fn permission_rules_level4() {
        let implicit_read = Access::new(AccessKind::Read, Privilege::ImplicitSupervisor);
        let implicit_write = Access::new(AccessKind::Write, Privilege::ImplicitSupervisor);
        let cases: &[Case] = &[
            // U/S: user accesses need U at every level.
            (P | W, none, Access::user_read(), Some(PF_P | PF_U)),
            (P | W, none, Access::user_write(), Some(PF_P | PF_W | PF_U)),
            (P | W, none, Access::user_fetch(), Some(PF_P | PF_U | PF_I)),
            (PWU, none, Access::user_read(), None),
            (PWU, none, Access::user_write(), None),
            (PWU, none, Access::user_fetch(), None),
            // R/W: users never write read-only pages, CR0.WP decides for the supervisor.
            (P | U, none, Access::user_write(), Some(PF_P | PF_W | PF_U)),
            (P | U, no_wp, Access::user_write(), Some(PF_P | PF_W | PF_U)),
            (P, none, Access::supervisor_write(), Some(PF_P | PF_W)),
            (P, no_wp, Access::supervisor_write(), None),
            (P | U, no_wp, Access::supervisor_write(), None),
            (P | U, none, Access::supervisor_write(), Some(PF_P | PF_W)),
            // NX with EFER.NXE: I bit set.
            (
                PWU | NO_EXECUTE,
                none,
                Access::user_fetch(),
                Some(PF_P | PF_U | PF_I),
            ),
            (
                P | NO_EXECUTE,
                none,
                Access::supervisor_fetch(),
                Some(PF_P | PF_I),
            ),
            (PWU | NO_EXECUTE, none, Access::user_read(), None),
            // Without NXE bit 63 is reserved; fetches carry no I bit.
            (
                PWU | NO_EXECUTE,
                no_nxe,
                Access::user_read(),
                Some(PF_P | PF_R | PF_U),
            ),
            (P | W, no_nxe, Access::user_fetch(), Some(PF_P | PF_U)),
            // ... unless SMEP is on.
            (
                P | W,
                no_nxe_smep,
                Access::user_fetch(),
                Some(PF_P | PF_U | PF_I),
            ),
            // SMEP: no supervisor fetch from user pages.
            (PWU, smep, Access::supervisor_fetch(), Some(PF_P | PF_I)),
            (P | W, smep, Access::supervisor_fetch(), None),
            (PWU, smep, Access::supervisor_read(), None),
            // SMAP: no supervisor data access to user pages unless EFLAGS.AC.
            (PWU, smap, Access::supervisor_read(), Some(PF_P)),
            (PWU, smap, Access::supervisor_write(), Some(PF_P | PF_W)),
            (PWU, smap, Access::supervisor_fetch(), None),
            (PWU, smap_ac, Access::supervisor_read(), None),
            (PWU, smap_ac, Access::supervisor_write(), None),
            (
                P | U,
                smap_ac,
                Access::supervisor_write(),
                Some(PF_P | PF_W),
            ),
            (P | U, smap_ac_no_wp, Access::supervisor_write(), None),
            // Implicit supervisor accesses ignore AC and report U=0.
            (PWU, smap_ac, implicit_read, Some(PF_P)),
            (PWU, smap_ac, implicit_write, Some(PF_P | PF_W)),
            (P | W, smap_ac, implicit_read, None),
            (PWU, none, implicit_read, None),
            (P, none, implicit_write, Some(PF_P | PF_W)),
            (P | W, smap, Access::user_read(), Some(PF_P | PF_U)),
        ];
        for (i, (pte, tweak, access, expect)) in cases.iter().enumerate() {
            let mem = l4([PWU, PWU, PWU, *pte]);
            let mut cfg = cfg4();
            tweak(&mut cfg);
            let got = Walker::new(cfg).translate(&mem, VA, *access);
            assert_eq!(
                code(got),
                *expect,
                "case {i}: pte {pte:#x} {access:?} {cfg:?}"
            );
            if expect.is_none() {
                assert_eq!(got.unwrap().gpa, 0x7123);
            }
        }
    }

    #[test]
    fn rights_combine_across_levels() {
        // R/W clear only in the PDPTE, U clear only in the PML4E, XD only in the PDE.
        let mem = l4([P | W, P | U, PWU | NO_EXECUTE, PWU]);
        let w = Walker::new(cfg4());
        let t = w.translate(&mem, VA, Access::supervisor_read()).unwrap();
        assert_eq!(
            t.rights(),
            Rights {
                writable: false,
                user: false,
                no_execute: true,
                pkey: 0
            }
        );
        assert_eq!(
            code(w.translate(&mem, VA, Access::user_read())),
            Some(PF_P | PF_U)
        );
        assert_eq!(
            code(w.translate(&mem, VA, Access::supervisor_write())),
            Some(PF_P | PF_W)
        );
        assert_eq!(
            code(w.translate(&mem, VA, Access::supervisor_fetch())),
            Some(PF_P | PF_I)
        );
    }

    #[test]
    fn not_present_at_each_level() {
        for level in 1..=4u32 {
            let mut flags = [PWU; 4];
            flags[(4 - level) as usize] = W | U | (1 << 40); // P clear: other bits are ignored
            let mem = l4(flags);
            let f = Walker::new(cfg4())
                .translate(&mem, VA, Access::user_write())
                .unwrap_err();
            let pf = f.page_fault().unwrap();
            assert_eq!(pf.reason, FaultReason::NotPresent { level });
            assert_eq!(pf.error_code.bits(), PF_W | PF_U);
            assert_eq!(pf.addr, VA);
        }
    }

    #[test]
    fn reserved_bits_level4() {
        let mut cfg = cfg4();
        cfg.max_phys_bits = 40;
        let w = Walker::new(cfg);
        // Address bits above MAXPHYADDR, at every level.
        for level in 1..=4u32 {
            let mut flags = [PWU; 4];
            flags[(4 - level) as usize] |= 1 << 45;
            let f = w
                .translate(&l4(flags), VA, Access::user_read())
                .unwrap_err();
            assert_eq!(
                f.error_code().unwrap().bits(),
                PF_P | PF_R | PF_U,
                "level {level}"
            );
            assert!(matches!(
                f.page_fault().unwrap().reason,
                FaultReason::ReservedBits { level: l, .. } if l == level
            ));
        }
        // Bits 62:52 are ignored (available to software), bit 51 is reserved below 52 bits.
        let t = w.translate(
            &l4([PWU, PWU, PWU, PWU | (0x3f << 52)]),
            VA,
            Access::user_read(),
        );
        assert!(t.is_ok());
        assert_eq!(
            code(w.translate(
                &l4([PWU, PWU, PWU, PWU | (1 << 51)]),
                VA,
                Access::user_read()
            )),
            Some(PF_P | PF_R | PF_U)
        );
        // PS in a PML4E is reserved; bit 8 of non-leaf entries only on AMD.
        assert_eq!(
            code(w.translate(
                &l4([PWU | PAGE_SIZE, PWU, PWU, PWU]),
                VA,
                Access::user_read()
            )),
            Some(PF_P | PF_R | PF_U)
        );
        let bit8 = l4([PWU | GLOBAL, PWU | GLOBAL, PWU | GLOBAL, PWU | GLOBAL]);
        assert!(w
            .translate(&bit8, VA, Access::user_read())
            .unwrap()
            .global());
        let mut amd = cfg;
        amd.amd = true;
        let f = Walker::new(amd)
            .translate(&bit8, VA, Access::user_read())
            .unwrap_err();
        assert!(matches!(
            f.page_fault().unwrap().reason,
            FaultReason::ReservedBits { level: 4, .. }
        ));
        // A reserved-bit fault beats a later not-present entry, and a write still reports W.
        assert_eq!(
            code(w.translate(
                &l4([PWU | (1 << 45), PWU, 0, 0]),
                VA,
                Access::supervisor_write()
            )),
            Some(PF_P | PF_R | PF_W)
        );
        // The walker clamps absurd MAXPHYADDR values instead of overflowing.
        let mut odd = cfg4();
        odd.max_phys_bits = 200;
        assert!(Walker::new(odd)
            .translate(&l4([PWU; 4]), VA, Access::user_read())
            .is_ok());
        odd.max_phys_bits = 0;
        assert!(Walker::new(odd)
            .translate(&l4([PWU; 4]), VA, Access::user_read())
            .is_ok());
    }

    fn pk(c: &mut PagingConfig) {
        c.pke = true;
        c.pkru = 0b01 << 6 | 0b10 << 8; // key 3: access disabled; key 4: write disabled
    }
    fn pk_no_wp(c: &mut PagingConfig) {
        pk(c);
        c.write_protect = false;
    }
    fn pks(c: &mut PagingConfig) {
        c.pks = true;
        c.pkrs = 0b01 << 6 | 0b10 << 8;
    }

    #[test]
    fn protection_keys() {
        let key = |k: u64| k << PKEY_SHIFT;
        let cases: &[Case] = &[
            (
                PWU | key(3),
                pk,
                Access::user_read(),
                Some(PF_P | PF_U | PF_K),
            ),
            (
                PWU | key(3),
                pk,
                Access::user_write(),
                Some(PF_P | PF_W | PF_U | PF_K),
            ),
            (PWU | key(3), pk, Access::user_fetch(), None),
            (PWU | key(4), pk, Access::user_read(), None),
            (
                PWU | key(4),
                pk,
                Access::user_write(),
                Some(PF_P | PF_W | PF_U | PF_K),
            ),
            (
                PWU | key(4),
                pk,
                Access::supervisor_write(),
                Some(PF_P | PF_W | PF_K),
            ),
            (PWU | key(4), pk_no_wp, Access::supervisor_write(), None),
            (
                PWU | key(3),
                pk,
                Access::supervisor_read(),
                Some(PF_P | PF_K),
            ),
            // PK and an ordinary violation together: both reported.
            (
                P | U | key(3),
                pk,
                Access::user_write(),
                Some(PF_P | PF_W | PF_U | PF_K),
            ),
            // PKRU does not apply to supervisor pages, nor without CR4.PKE.
            (P | W | key(3), pk, Access::supervisor_read(), None),
            (PWU | key(3), none, Access::user_read(), None),
            // PKRS governs supervisor pages, for supervisor accesses.
            (
                P | W | key(3),
                pks,
                Access::supervisor_read(),
                Some(PF_P | PF_K),
            ),
            (
                P | W | key(4),
                pks,
                Access::supervisor_write(),
                Some(PF_P | PF_W | PF_K),
            ),
            (P | W | key(4), pks, Access::supervisor_read(), None),
            (P | W | key(3), pks, Access::supervisor_fetch(), None),
            (P | W | key(3), pks, Access::user_read(), Some(PF_P | PF_U)),
            (PWU | key(3), pks, Access::user_read(), None),
        ];
        for (i, (pte, tweak, access, expect)) in cases.iter().enumerate() {
            let mut cfg = cfg4();
            tweak(&mut cfg);
            let got = Walker::new(cfg).translate(&l4([PWU, PWU, PWU, *pte]), VA, *access);
            assert_eq!(code(got), *expect, "case {i}");
            if let Some(c) = expect {
                let reason = got.unwrap_err().page_fault().unwrap().reason;
                assert_eq!(
                    c & PF_K != 0,
                    reason
                        == FaultReason::ProtectionKey {
                            pkey: (pte >> 59) as u8
                        }
                );
            } else {
                assert_eq!(got.unwrap().rights().pkey, ((pte >> 59) & 15) as u8);
            }
        }
    }

    #[test]
    fn canonical_and_width_checks() {
        let mem = l4([PWU; 4]);
        let w = Walker::new(cfg4());
        assert_eq!(
            w.translate(&mem, 0x0000_8000_0000_0000, Access::user_read()),
            Err(Fault::NonCanonical {
                addr: 0x0000_8000_0000_0000
            })
        );
        assert!(matches!(
            w.translate(&mem, 0xffff_8000_0000_0000, Access::user_read()),
            Err(Fault::PageFault(_))
        ));
        let w5 = Walker::new(PagingConfig::new(PagingMode::Level5, 0x1000));
        assert!(matches!(
            w5.translate(&mem, 0x0100_0000_0000_0000, Access::user_read()),
            Err(Fault::NonCanonical { .. })
        ));
        let w32 = Walker::new(PagingConfig::new(PagingMode::Legacy32, 0x1000));
        let f = w32
            .translate(&mem, 1 << 32, Access::user_read())
            .unwrap_err();
        assert!(f.to_string().contains("not canonical"), "{f}");
        assert_eq!(f.error_code(), None);
        assert!(f.page_fault().is_none());
    }

    #[test]
    fn hostile_tables() {
        // Tables outside memory: not-present fault naming the entry address.
        let mem = l4([PWU, PWU, PWU, PWU]);
        mem.write_u64(0x2000, 0x7_0000_0000 | PWU).unwrap();
        let f = Walker::new(cfg4())
            .translate(&mem, VA, Access::supervisor_write())
            .unwrap_err();
        assert_eq!(
            *f.page_fault().unwrap(),
            PageFault {
                addr: VA,
                error_code: PfErrorCode(PF_W),
                reason: FaultReason::TableOutsideMemory {
                    level: 2,
                    addr: 0x7_0000_0010
                }
            }
        );
        // CR3 outside memory.
        let w = Walker::new(PagingConfig::new(PagingMode::Level4, 0x100_0000));
        assert!(matches!(
            w.translate(&mem, VA, Access::user_read())
                .unwrap_err()
                .page_fault()
                .unwrap()
                .reason,
            FaultReason::TableOutsideMemory { level: 4, .. }
        ));
        // Recursive mapping: PML4[511] points at the PML4 itself.
        mem.write_u64(0x2000, 0x3000 | PWU).unwrap();
        mem.write_u64(0x1000 + 511 * 8, 0x1000 | P | W).unwrap();
        let w = Walker::new(cfg4());
        // 511/511/511/511 -> the PML4 page itself.
        let t = w
            .translate(&mem, 0xffff_ffff_ffff_f008, Access::supervisor_read())
            .unwrap();
        assert_eq!(t.gpa, 0x1008);
        // 511/511/511/0 -> the PDPT referenced by PML4[0].
        let t = w
            .translate(&mem, 0xffff_ffff_ffe0_0000, Access::supervisor_read())
            .unwrap();
        assert_eq!(t.gpa, 0x2000);
        // 511/0/0/2 -> PT of VA: the PTE for VA is readable through the recursive slot.
        let t = w
            .translate(&mem, 0xffff_ff80_0000_2028, Access::supervisor_read())
            .unwrap();
        assert_eq!(t.gpa, 0x4028);
        assert_eq!(t.memory_refs(), 4);
        // All-ones memory: every entry present with every reserved bit set.
        let ones = FlatMemory::new(0, 0x2000);
        for a in (0..0x2000).step_by(8) {
            ones.write_u64(a, u64::MAX).unwrap();
        }
        for mode in [
            PagingMode::Legacy32,
            PagingMode::Pae,
            PagingMode::Level4,
            PagingMode::Level5,
        ] {
            let mut cfg = PagingConfig::new(mode, 0x1000);
            cfg.max_phys_bits = 36;
            let r = Walker::new(cfg).translate(&ones, 0x1234, Access::user_read());
            assert!(
                r.is_err() || mode == PagingMode::Legacy32,
                "{mode:?}: {r:?}"
            );
        }
    }

    struct Racy<'a> {
        mem: &'a FlatMemory,
        races: u32,
    }

    impl TableAccess for Racy<'_> {
        fn read_entry(&mut self, addr: u64, level: u32, wide: bool) -> Option<u64> {
            DirectTables(self.mem).read_entry(addr, level, wide)
        }
        fn update_entry(
            &mut self,
            addr: u64,
            wide: bool,
            old: u64,
            new: u64,
        ) -> Option<Result<(), ()>> {
            if self.races > 0 {
                self.races -= 1;
                // Another vCPU flips an ignored bit of the entry before our compare-exchange.
                let cur = self.mem.read_u64(addr).unwrap();
                self.mem.write_u64(addr, cur ^ (1 << 52)).unwrap();
            }
            DirectTables(self.mem).update_entry(addr, wide, old, new)
        }
    }

    #[test]
    fn accessed_dirty_races_restart_the_walk() {
        let mem = l4([PWU; 4]);
        let w = Walker::new(cfg4());
        let mut racy = Racy {
            mem: &mem,
            races: 3,
        };
        let t = w
            .translate_with(&mut racy, VA, Access::user_write())
            .unwrap();
        assert!(t.dirty());
        assert_eq!(racy.races, 0);
        for a in [0x1000, 0x2000, 0x3010] {
            assert_eq!(mem.read_u64(a).unwrap() & ACCESSED, ACCESSED);
        }
        let mem = l4([PWU; 4]);
        let mut hostile = Racy {
            mem: &mem,
            races: u32::MAX,
        };
        assert_eq!(
            w.translate_with(&mut hostile, VA, Access::user_read()),
            Err(Fault::Contended { addr: VA })
        );
        assert!(Fault::Contended { addr: VA }.to_string().contains("lost"));
    }

    #[test]
    fn pae_paging() {
        let mem = FlatMemory::new(0, 0x10000);
        // CR3 = 0x1020 (32-byte aligned PDPT); PDPTE[2] -> PD 0x3000; PD[1] -> PT 0x4000;
        // PT[5] -> 0x7000; PD[2] = 2 MiB page at 0x2_0000_0000 with XD.
        mem.write_u64(0x1020 + 16, 0x3000 | P).unwrap();
        mem.write_u64(0x3008, 0x4000 | PWU).unwrap();
        mem.write_u64(0x4028, 0x7000 | PWU).unwrap();
        mem.write_u64(0x3010, 0x2_0000_0000 | PWU | PAGE_SIZE | NO_EXECUTE)
            .unwrap();
        let va = 0x8020_5123;
        let w = Walker::new(PagingConfig::new(PagingMode::Pae, 0x1020));
        let t = w.translate(&mem, va, Access::user_write()).unwrap();
        assert_eq!((t.gpa, t.memory_refs()), (0x7123, 3));
        // The PDPTE has no A bit; the others got it.
        assert_eq!(mem.read_u64(0x1030).unwrap(), 0x3000 | P);
        assert_eq!(mem.read_u64(0x3008).unwrap() & ACCESSED, ACCESSED);
        let t = w.translate(&mem, 0x8040_0042, Access::user_read()).unwrap();
        assert_eq!((t.gpa, t.page_size()), (0x2_0000_0042, PageSize::Size2M));
        assert_eq!(
            code(w.translate(&mem, 0x8040_0042, Access::user_fetch())),
            Some(PF_P | PF_U | PF_I)
        );
        // PDPTE reserved bits: R/W (bit 1) is reserved there.
        mem.write_u64(0x1030, 0x3000 | P | W).unwrap();
        assert_eq!(
            code(w.translate(&mem, va, Access::user_read())),
            Some(PF_P | PF_R | PF_U)
        );
        // PDPTE registers take precedence over memory.
        let mut cfg = PagingConfig::new(PagingMode::Pae, 0x1020);
        cfg.pdptes = Some([0, 0, 0x3000 | P, 0]);
        let wr = Walker::new(cfg);
        let t = wr.translate(&mem, va, Access::user_read()).unwrap();
        assert_eq!((t.gpa, t.memory_refs()), (0x7123, 2));
        assert_eq!(
            wr.translate(&mem, 0x1000, Access::user_read())
                .unwrap_err()
                .page_fault()
                .unwrap()
                .reason,
            FaultReason::NotPresent { level: 3 }
        );
        // Bits 62:M are reserved in PAE entries (not ignored as in 4-level paging).
        mem.write_u64(0x4028, 0x7000 | PWU | (1 << 60)).unwrap();
        assert_eq!(
            code(wr.translate(&mem, va, Access::user_read())),
            Some(PF_P | PF_R | PF_U)
        );
        // Without NXE, XD is reserved and fetch faults have no I bit.
        cfg.nxe = false;
        mem.write_u64(0x4028, 0x7000 | P).unwrap();
        assert_eq!(
            code(Walker::new(cfg).translate(&mem, va, Access::user_fetch())),
            Some(PF_P | PF_U)
        );
        // Root outside memory.
        let far = Walker::new(PagingConfig::new(PagingMode::Pae, 0xffff_ffe0));
        assert!(matches!(
            far.translate(&mem, va, Access::user_read())
                .unwrap_err()
                .page_fault()
                .unwrap()
                .reason,
            FaultReason::TableOutsideMemory { level: 3, .. }
        ));
    }

    #[test]
    fn legacy32_paging() {
        let mem = FlatMemory::new(0, 0x10000);
        // PD at 0x1000: PD[1] -> PT 0x2000 (4-byte entries); PT[5] -> 0x7000.
        // PD[2] = 4 MiB page at 0x12_0080_0000 (PSE-36: bits 39:32 = 0x12 in entry bits 20:13).
        mem.write_u32(0x1004, 0x2000 | PWU as u32).unwrap();
        mem.write_u32(0x2014, 0x7000 | PWU as u32).unwrap();
        mem.write_u32(
            0x1008,
            0x0080_0000 | (0x12 << 13) | (PWU | PAGE_SIZE) as u32,
        )
        .unwrap();
        let mut cfg = PagingConfig::new(PagingMode::Legacy32, 0x1000);
        cfg.max_phys_bits = 40;
        let w = Walker::new(cfg);
        let t = w.translate(&mem, 0x40_5123, Access::user_write()).unwrap();
        assert_eq!(
            (t.gpa, t.memory_refs(), t.page_size()),
            (0x7123, 2, PageSize::Size4K)
        );
        assert_eq!(
            mem.read_u32(0x2014).unwrap() & (ACCESSED | DIRTY) as u32,
            (ACCESSED | DIRTY) as u32
        );
        assert_eq!(mem.read_u32(0x1004).unwrap() & DIRTY as u32, 0);
        let t = w.translate(&mem, 0x80_1234, Access::user_read()).unwrap();
        assert_eq!((t.gpa, t.page_size()), (0x12_0080_1234, PageSize::Size4M));
        // No XD in 32-bit paging: fetches allowed; with SMEP a supervisor fetch from a user
        // page faults with I set, even though NXE is on and meaningless here.
        assert!(w.translate(&mem, 0x40_5000, Access::user_fetch()).is_ok());
        let mut s = cfg;
        s.smep = true;
        assert_eq!(
            code(Walker::new(s).translate(&mem, 0x40_5000, Access::supervisor_fetch())),
            Some(PF_P | PF_I)
        );
        let mut ro = cfg;
        ro.write_protect = true;
        mem.write_u32(0x2014, 0x7000 | (P | U) as u32).unwrap();
        assert_eq!(
            code(Walker::new(ro).translate(&mem, 0x40_5000, Access::user_fetch())),
            None
        );
        assert_eq!(
            code(Walker::new(ro).translate(&mem, 0x40_5000, Access::user_write())),
            Some(PF_P | PF_W | PF_U)
        );
        // PSE-36 reserved bits: above MAXPHYADDR 36 the high address bits are reserved.
        let mut m36 = cfg;
        m36.max_phys_bits = 36;
        assert_eq!(
            code(Walker::new(m36).translate(&mem, 0x80_0000, Access::user_read())),
            Some(PF_P | PF_R | PF_U)
        );
        // Bit 21 is always reserved; without PSE-36 bits 21:13 all are.
        mem.write_u32(0x1008, 0x0080_0000 | (1 << 21) | (PWU | PAGE_SIZE) as u32)
            .unwrap();
        assert_eq!(
            code(w.translate(&mem, 0x80_0000, Access::user_read())),
            Some(PF_P | PF_R | PF_U)
        );
        mem.write_u32(0x1008, 0x0080_0000 | (1 << 13) | (PWU | PAGE_SIZE) as u32)
            .unwrap();
        let mut no36 = cfg;
        no36.pse36 = false;
        assert_eq!(
            code(Walker::new(no36).translate(&mem, 0x80_0000, Access::user_read())),
            Some(PF_P | PF_R | PF_U)
        );
        // Without CR4.PSE, PS is ignored: the PDE points at a page table (0x80_0000 here,
        // outside memory).
        let mut nopse = cfg;
        nopse.pse = false;
        assert!(matches!(
            Walker::new(nopse)
                .translate(&mem, 0x80_0000, Access::user_read())
                .unwrap_err()
                .page_fault()
                .unwrap()
                .reason,
            FaultReason::TableOutsideMemory { level: 1, .. }
        ));
        // Protection keys do not exist in 32-bit paging.
        let mut pkc = cfg;
        pkc.pke = true;
        pkc.pkru = u32::MAX;
        assert!(Walker::new(pkc)
            .translate(&mem, 0x40_5000, Access::user_read())
            .is_ok());
    }

    #[test]
    fn level5_paging() {
        let mem = FlatMemory::new(0, 0x10000);
        // PML5[0x1ff] -> PML4 0x2000; PML4[0] -> PDPT 0x3000; PDPT[0] -> PD 0x4000;
        // PD[0] -> PT 0x5000; PT[1] -> 0x9000.
        mem.write_u64(0x1000 + 0x1ff * 8, 0x2000 | PWU).unwrap();
        mem.write_u64(0x2000, 0x3000 | PWU).unwrap();
        mem.write_u64(0x3000, 0x4000 | PWU).unwrap();
        mem.write_u64(0x4000, 0x5000 | PWU).unwrap();
        mem.write_u64(0x5008, 0x9000 | PWU).unwrap();
        let va = 0xffff_0000_0000_1abc;
        let w = Walker::new(PagingConfig::new(PagingMode::Level5, 0x1000));
        let t = w.translate(&mem, va, Access::user_read()).unwrap();
        assert_eq!((t.gpa, t.memory_refs()), (0x9abc, 5));
        mem.write_u64(0x1000 + 0x1ff * 8, 0x2000 | PWU | PAGE_SIZE)
            .unwrap();
        assert_eq!(
            code(w.translate(&mem, va, Access::user_read())),
            Some(PF_P | PF_R | PF_U)
        );
        // The same tables seen as 4-level (CR3 = PML4) use bits 47:0 only.
        let w4 = Walker::new(PagingConfig::new(PagingMode::Level4, 0x2000));
        assert_eq!(
            w4.translate(&mem, 0x1abc, Access::user_read()).unwrap().gpa,
            0x9abc
        );
    }

    /// The fast walk's masks (derived from the `denied` table) give exactly the verdict of
    /// the full rules plus "no Dirty bit to set", for every configuration, access and
    /// rights combination.
    #[test]
    fn fast_masks_match_the_rules_for_every_configuration() {
        for bits in 0..64u32 {
            let mut cfg = cfg4();
            cfg.write_protect = bits & 1 != 0;
            cfg.smep = bits & 2 != 0;
            cfg.smap = bits & 4 != 0;
            cfg.alignment_check = bits & 8 != 0;
            cfg.nxe = bits & 16 != 0;
            cfg.set_accessed_dirty = bits & 32 != 0;
            let w = Walker::new(cfg);
            for kind in KINDS {
                for privilege in PRIVILEGES {
                    let access = Access::new(kind, privilege);
                    let m = w.fast_masks[access_index(access)];
                    for r in 0..16u32 {
                        let (writable, user) = (r & 1 != 0, r & 2 != 0);
                        let no_execute = r & 4 != 0 && cfg.nxe;
                        let dirty = r & 8 != 0;
                        let mut and = PRESENT | ACCESSED;
                        if writable {
                            and |= WRITABLE;
                        }
                        if user {
                            and |= USER;
                        }
                        let or = and | if no_execute { NO_EXECUTE } else { 0 };
                        let leaf = and | if dirty { DIRTY } else { 0 };
                        let fast_ok = m.allows(and, or, leaf);
                        let rights = Rights {
                            writable,
                            user,
                            no_execute,
                            pkey: 0,
                        };
                        let needs_dirty = access.is_write() && cfg.set_accessed_dirty && !dirty;
                        let expected = w.check_rights(rights, access).is_ok() && !needs_dirty;
                        assert_eq!(fast_ok, expected, "{cfg:?} {access:?} rights {r:#06b}");
                    }
                }
            }
        }
    }

    #[test]
    fn set_cr3_moves_only_the_root() {
        for mode in [
            PagingMode::Legacy32,
            PagingMode::Pae,
            PagingMode::Level4,
            PagingMode::Level5,
        ] {
            let mut cfg = PagingConfig::new(mode, 0x1000);
            cfg.max_phys_bits = 40;
            let mut w = Walker::new(cfg);
            // Flag and PCID bits and address bits above MAXPHYADDR are not part of the root.
            let cr3 = 0xff00_0000_1234_5fff;
            w.set_cr3(cr3);
            cfg.cr3 = cr3;
            let fresh = Walker::new(cfg);
            assert_eq!(
                (w.root(), w.config()),
                (fresh.root(), fresh.config()),
                "{mode:?}"
            );
        }
        let mem = l4([PWU; 4]);
        let mut w = Walker::new(PagingConfig::new(PagingMode::Level4, 0x8000));
        assert!(w.translate(&mem, VA, Access::user_read()).is_err());
        w.set_cr3(0x1000);
        assert_eq!(
            w.translate(&mem, VA, Access::user_read()).unwrap().gpa,
            0x7123
        );
    }

    #[test]
    fn config_from_registers_and_displays() {
        assert_eq!(PagingConfig::from_registers(0, 0, 0, 0, 0), None);
        let pg = 1 << 31;
        let c = PagingConfig::from_registers(pg, 0x1000, 0, 0, 0).unwrap();
        assert_eq!(
            (c.mode, c.write_protect, c.pse, c.nxe),
            (PagingMode::Legacy32, false, false, false)
        );
        let c = PagingConfig::from_registers(pg, 0, 1 << 5, 0, 0).unwrap();
        assert_eq!(c.mode, PagingMode::Pae);
        let c = PagingConfig::from_registers(
            pg | 1 << 16,
            0,
            1 << 5 | 1 << 4 | 1 << 20 | 1 << 21 | 1 << 22 | 1 << 24,
            1 << 10 | 1 << 11,
            1 << 18,
        )
        .unwrap();
        assert_eq!(c.mode, PagingMode::Level4);
        assert!(
            c.write_protect
                && c.pse
                && c.nxe
                && c.smep
                && c.smap
                && c.pke
                && c.pks
                && c.alignment_check
        );
        let c = PagingConfig::from_registers(pg, 0, 1 << 5 | 1 << 12, 1 << 10, 0).unwrap();
        assert_eq!(c.mode, PagingMode::Level5);
        assert_eq!(
            PagingMode::Level5.format(),
            crate::builder::PagingFormat::Level5
        );
        assert_eq!(PagingMode::Pae.format(), crate::builder::PagingFormat::Pae);
        assert_eq!(
            PagingMode::Legacy32.format(),
            crate::builder::PagingFormat::Legacy32
        );
        let code = PfErrorCode::from_bits(0x3f);
        assert_eq!(code.to_string(), "0x3f [ P W U RSVD I PK ]");
        let w = Walker::new(c);
        assert_eq!(w.config().mode, PagingMode::Level5);
        assert_eq!(w.root(), 0);
        let f = Fault::PageFault(PageFault {
            addr: 0x1000,
            error_code: PfErrorCode(2),
            reason: FaultReason::Protection,
        });
        assert!(f.to_string().contains("#PF at 0x1000"));
    }
}
