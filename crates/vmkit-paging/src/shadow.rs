//! A shadow MMU: host-format page tables (GVA -> host-physical) that mirror a guest's own
//! tables (GVA -> GPA) combined with the VMM's memory map (GPA -> host), for CPUs or
//! software MMUs without EPT/NPT.
//!
//! # Model and invariants (in the spirit of KVM's `mmu.rst`)
//!
//! * **Shadow pages.** Each shadow table page shadows one guest table page in one *role*:
//!   `(guest frame, level, direct, quadrant, access)`. `access` is the AND of the W/U and OR of the NX
//!   rights of the guest entries above it, so two guest paths reaching the same guest table
//!   with different rights get different shadow pages and every shadow leaf can carry the
//!   guest's *effective* rights. A *direct* shadow page has no guest table behind it: it
//!   splits a guest large page into 4 KiB shadow leaves (the host mapping need not be
//!   contiguous). Shadow non-leaf entries are fully permissive; rights live in the leaves.
//! * **Shadow formats.** 4- and 5-level guests get shadow tables of their own format, one
//!   shadow page per guest table (and role). 32-bit and PAE guests get **PAE-format**
//!   shadow tables - the real CPU runs them in PAE paging, so a shadow leaf can carry NX -
//!   with a root PDPT whose 4 entries may hold only P (R/W, U/S and XD are reserved in
//!   PDPTEs): the root is a table of links, not a shadow of guest memory, and is private to
//!   its root-cache entry (and below 4 GiB, as PAE CR3 is 32 bits wide).
//!   - *32-bit guests.* A guest page directory (1024 4-byte entries, 4 MiB each) is
//!     shadowed by up to 4 shadow page directories (512 entries, 2 MiB each), the root's
//!     entry `i` linking to the one of *quadrant* `i` (the guest entries `256 i..256 i +
//!     255`, each becoming 2 shadow entries); a guest page table (4 MiB) by up to 2 shadow
//!     page tables, quadrant 0 or 1 for its lower or upper 512 entries, as KVM's
//!     `role.quadrant`. A 4 MiB page (CR4.PSE, PSE-36 bits included) is split into 4 KiB
//!     leaves by a direct shadow page per 2 MiB half. 32-bit entries have no NX: a shadow
//!     leaf is no-execute only in the WP = 0 kernel-write shape under SMEP (below).
//!   - *PAE guests.* The CPU loads the 4 PDPTEs into registers at a CR3 load (and at CR0/
//!     CR4 writes that change paging) and never reads them again; so does the MMU
//!     ([`ShadowMmu::set_cr3`], [`ShadowMmu::set_paging_config`]), and the root's entries
//!     link to the shadows of the page directories those registers name. A guest write to
//!     its PDPT therefore needs no write protection (the PDPT is 32 bytes at a 32-byte
//!     aligned CR3, usually sharing its page with other data): it takes effect at the next
//!     CR3 load, as on hardware. The root cache is keyed by (CR3, PCID, PDPTEs). Page
//!     directories and tables are shadowed one-to-one as in 4-level paging.
//! * **Lazy fill.** Shadow tables start empty. A shadow fault ([`ShadowMmu::handle_fault`])
//!   walks the guest tables with the exact guest walker ([`Walker`], which also sets the
//!   guest's Accessed/Dirty bits) and answers [`ShadowOutcome::InjectGuestFault`] when the
//!   guest itself would fault, [`ShadowOutcome::Mmio`] when the GPA has no host memory, or
//!   builds the shadow path and answers [`ShadowOutcome::Fixed`].
//! * **Write protection.** Every guest frame that some (synced) shadow page shadows is
//!   mapped read-only in every shadow leaf (a reverse map finds those leaves). So the guest
//!   cannot change a shadowed table behind our back: its write faults, and then either
//!   - the frame is only a last-level table: its shadow pages become **unsync** and the
//!     write proceeds directly; unsync shadow pages are resynchronised (emptied and
//!     write-protected again) when the guest invalidates - all of them on a CR3 load
//!     without no-flush or a full INVPCID ([`ShadowMmu::flush`], O(unsync pages)), only
//!     those of the page table mapping the address on INVLPG ([`ShadowMmu::invlpg`], as
//!     KVM syncs one page) - which is exactly when the architecture requires new entries
//!     to be seen;
//!   - or the shadow pages of the frame are **zapped** (unlinked from their parents).
//! * **Emulated table writes.** A VMM that emulates the guest's store instead reports it
//!   with [`ShadowMmu::guest_table_written`]: the shadow entries derived from the written
//!   guest entries are dropped (refilled lazily; a 4-byte 32-bit entry maps to its
//!   quadrant's shadow page, and a PDE to both of its shadow PDEs), and a shadow page
//!   written 3 times with no fault through it in between is zapped, as KVM does against
//!   write flooding. A guest store to a non-leaf table that translates the store's own
//!   address (a 32-bit guest writing its page directory through a self-map) cannot be let
//!   through by any shadow leaf: the fault answers [`ShadowOutcome::EmulateWrite`] and the
//!   VMM emulates the store, as KVM does.
//! * **Accessed/Dirty emulation.** A shadow leaf is writable only once the guest leaf is
//!   dirty: the first guest write faults, the guest walk sets D, the leaf becomes writable.
//! * **CR0.WP = 0.** The shadow tables are walked with CR0.WP = 1 (on hardware the host
//!   keeps WP set, or write protection of the guest's tables would not hold against its
//!   kernel). A guest with WP = 0 lets its kernel write read-only pages, which no single
//!   shadow leaf expresses together with "user may read, not write". As KVM does, the leaf
//!   takes one of two shapes depending on the fault that built it: a kernel write makes it
//!   writable and supervisor-only (and no-execute when the guest has SMEP, since the page
//!   is a user page the kernel must not execute), any other access makes it user-readable
//!   and read-only. An access the current shape refuses faults and flips it. Where a
//!   supervisor-only shape would be inexact - a user page while the guest has SMAP or, in
//!   4/5-level paging, protection keys (SMAP and PKRU guard user pages from the kernel,
//!   IA32_PKRS supervisor pages) - the leaf keeps the guest's shape and the kernel's store
//!   is answered with [`ShadowOutcome::EmulateWrite`]: exact, at the cost of an exit per
//!   such store, for a state (WP = 0 with SMAP or keys) real kernels hardly use. The same
//!   answer serves a kernel store a key's write-disable bit refuses on the shadow tables
//!   (WD binds supervisor writes only when WP = 1, and PKRU changes without an exit).
//! * **Control registers.** [`ShadowMmu::set_paging_config`] takes the guest's new
//!   CR0/CR4/EFER/RFLAGS state. What shadow leaves were derived from (CR0.WP, SMEP, SMAP,
//!   EFER.NXE, CR4.PSE, the paging mode, protection-key enables, MAXPHYADDR) zaps
//!   everything when it changes, in O(1), and the next fault builds a root in the new
//!   mode's format; RFLAGS.AC, PKRU and IA32_PKRS only act when the tables are walked, so
//!   they take effect without a zap, and CR4.PGE changes nothing (shadow leaves are never
//!   global).
//! * **Roots.** [`ShadowMmu::set_cr3`] keeps a cache of the [`ROOT_CACHE`] most recent
//!   (CR3, PCID) roots, so switching back to a recent address space costs no rebuild.
//!   Without the no-flush bit a CR3 write also resynchronises unsync pages.
//! * **Zap all in O(1).** [`ShadowMmu::zap_all`] bumps a generation number; shadow pages and
//!   roots of older generations are dead from that instant and their frames are reclaimed
//!   incrementally on later faults.
//!
//! * **Memory types.** A shadow leaf carries the guest leaf's PAT, PCD and PWT bits (a
//!   guest large page's PAT bit moves to bit 7 of the 4 KiB shadow leaves), so a VMM that
//!   runs the guest with the guest's IA32_PAT value (VMX's load-IA32_PAT entry control)
//!   gets the memory types the guest asked for.
//!
//! Scope: guests in 32-bit, PAE, 4- and 5-level paging with any CR0.WP, SMEP, SMAP and
//! protection-key state (the shadow leaf carries the guest's effective U/W/NX and, in
//! 4/5-level paging, protection key, and the guest's SMEP/SMAP/PKRU/PKRS apply when the
//! shadow tables are walked). KVM leaves CR0.WP = 0 with SMAP inexact and offers PKU only
//! with two-dimensional paging; here both are exact (above). Refused with
//! [`ShadowError::Unsupported`]: a walker config without Accessed/Dirty updates (the MMU
//! emulates them through the guest walk). A PAE guest's PDPTE with reserved bits is
//! [`ShadowError::ReservedPdpte`] and a PDPT outside guest memory
//! [`ShadowError::PdptOutsideMemory`] (the CPU's #GP on the load), and a PAE-format root
//! frame above 4 GiB is [`ShadowError::RootAbove4G`]: give 32-bit and PAE guests a frame
//! allocator below 4 GiB.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::builder::FrameAllocator;
use crate::entry::*;
use crate::memory::PhysMemory;
use crate::walk::{Access, DirectTables, Fault, PagingConfig, PagingMode, TableAccess, Walker};

/// How many (CR3, PCID) roots the MMU keeps (KVM keeps the current one plus 3).
pub const ROOT_CACHE: usize = 4;
/// Emulated writes to one shadow page, without a fault through it, before it is zapped.
pub const WRITE_FLOOD_LIMIT: u8 = 3;

/// Errors of the shadow MMU (VMM-side problems, not guest events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShadowError {
    /// The guest's paging state cannot be shadowed exactly (see the module docs).
    #[error(
        "guest paging mode {mode:?} with CR0.WP={wp} is not supported by the shadow MMU: {why}"
    )]
    Unsupported {
        /// The guest's paging mode.
        mode: PagingMode,
        /// CR0.WP.
        wp: bool,
        /// What makes it unsupported.
        why: &'static str,
    },
    /// No frame for a shadow table, even after zapping everything.
    #[error("out of frames for shadow page tables")]
    OutOfFrames,
    /// Shadow memory refused a table write.
    #[error("shadow table address {addr:#x} is outside shadow memory")]
    OutsideMemory {
        /// The address.
        addr: u64,
    },
    /// A PAE-format shadow root (32-bit and PAE guests) must lie below 4 GiB, since CR3
    /// holds only 32 bits of it in PAE paging; the frame allocator returned one above.
    #[error("shadow root frame {frame:#x} for a 32-bit or PAE guest is above 4 GiB")]
    RootAbove4G {
        /// The frame the allocator returned.
        frame: u64,
    },
    /// A PAE guest's PDPTE has reserved bits set: the CPU refuses the CR3 (or CR0/CR4)
    /// load with #GP, which the VMM injects; the MMU keeps its previous state.
    #[error(
        "PAE guest PDPTE {index} = {value:#x} has reserved bits set: the load faults with #GP"
    )]
    ReservedPdpte {
        /// Which PDPTE (0-3).
        index: usize,
        /// Its value.
        value: u64,
    },
    /// A PAE guest's PDPT is not in guest memory: the CPU's load of the PDPTE registers
    /// fails (KVM injects #GP, as reads of absent memory return all ones, which are
    /// reserved bits); the MMU keeps its previous state.
    #[error("PAE guest PDPT at {addr:#x} is outside guest memory: the load faults with #GP")]
    PdptOutsideMemory {
        /// The PDPT's guest-physical address (CR3 bits 31:5).
        addr: u64,
    },
}

/// What a shadow fault turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowOutcome {
    /// The shadow tables were fixed: re-execute the access.
    Fixed,
    /// The guest's own tables fault: inject this fault (#PF with its error code, or #GP).
    InjectGuestFault(Fault),
    /// The access targets a GPA without host memory: emulate it as MMIO.
    Mmio(u64),
    /// The guest may write at this GPA (its walk allowed the store and set the A/D bits)
    /// but no shadow leaf can let the store through exactly: the VMM emulates the store
    /// and reports it with [`ShadowMmu::guest_table_written`] (which does nothing unless
    /// the page holds shadowed guest tables). Two causes:
    /// - the store writes a guest page table that is a non-leaf table of its own
    ///   translation, which must stay write-protected. The top-level table is on every
    ///   translation's path, so every store to a guest's PML4 (or PML5), PAE page
    ///   directory or 32-bit page directory ends here, as do stores through a self-map (KVM
    ///   emulates these too);
    /// - under CR0.WP = 0, a kernel store to a read-only user page while SMAP or protection
    ///   keys apply, or a kernel store a key's write-disable bit would refuse under WP = 1
    ///   (module docs).
    EmulateWrite(u64),
}

/// Maps guest-physical pages to host-physical pages (the VMM's memory slots).
pub trait HostMapping {
    /// Host-physical page for the 4 KiB guest page at `gpa_page`, `None` for MMIO/holes.
    fn host_page(&self, gpa_page: u64) -> Option<u64>;
}

impl<F: Fn(u64) -> Option<u64>> HostMapping for F {
    fn host_page(&self, gpa_page: u64) -> Option<u64> {
        self(gpa_page)
    }
}

/// Counters describing what the MMU did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShadowStats {
    /// Faults answered with `Fixed`.
    pub fixed: u64,
    /// Shadow pages created.
    pub pages_created: u64,
    /// Shadow pages zapped individually.
    pub pages_zapped: u64,
    /// Times a shadow page went unsync.
    pub unsyncs: u64,
    /// Resynchronisations of unsync pages.
    pub resyncs: u64,
    /// CR3 switches served from the root cache.
    pub root_hits: u64,
    /// CR3 switches that needed a new root.
    pub root_misses: u64,
    /// zap_all calls.
    pub zap_alls: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Role {
    gfn: u64,
    level: u8,
    direct: bool,
    /// Which part of a 32-bit guest table this page shadows: 0-3 (1 GiB each) of a guest
    /// page directory, 0-1 (2 MiB each) of a guest page table; 0 for every other guest.
    quadrant: u8,
    /// bit 0: writable, bit 1: user, bit 2: executable (each ANDed over the entries above).
    /// For a direct page the large leaf counts too, and W only once that leaf is dirty.
    access: u8,
    /// A direct page's large leaf's protection key (its leaves carry it); 0 otherwise.
    pkey: u8,
    /// A direct page's large leaf was dirty when the page was built (its leaves may then
    /// be writable - also in the CR0.WP = 0 kernel-write shape, which `access` does not
    /// show); false otherwise.
    dirty: bool,
    /// A direct page's large leaf's memory-type selector (its leaves carry it); 0
    /// otherwise.
    pat: u8,
}

impl Role {
    /// A shadow of the guest table at `gfn` (`quadrant`: which part of a 32-bit table).
    fn table(gfn: u64, level: u8, quadrant: u8, access: u8) -> Self {
        Role {
            gfn,
            level,
            direct: false,
            quadrant,
            access,
            pkey: 0,
            dirty: false,
            pat: 0,
        }
    }

    /// A direct page splitting the part at `gfn` of the guest large page `t` maps: its
    /// leaves take the large leaf's key, dirtiness and memory type (see the fields).
    fn direct(gfn: u64, level: u8, access: u8, t: &crate::walk::Translation) -> Self {
        Role {
            gfn,
            level,
            direct: true,
            quadrant: 0,
            access,
            pkey: t.rights().pkey,
            dirty: t.dirty(),
            pat: t.pat_index(),
        }
    }
}

#[derive(Debug, Clone)]
struct ShadowPage {
    role: Role,
    frame: u64,
    generation: u64,
    serial: u64,
    live: bool,
    unsync: bool,
    writes: u8,
    /// (parent id, parent serial, index) of entries that point at this page.
    parents: Vec<(usize, u64, u16)>,
}

#[derive(Debug, Clone, Copy)]
struct CachedRoot {
    /// The guest's top-level table address (CR3 without flag, PCID and no-flush bits).
    cr3: u64,
    pcid: u16,
    /// PAE guests: the PDPTE registers the root's entries were derived from.
    pdptes: [u64; 4],
    sp: usize,
    serial: u64,
    generation: u64,
}

/// Records the guest entries a walk reads.
struct Recorder<'a, M: PhysMemory + ?Sized> {
    mem: &'a M,
    /// Every (address, value) read, across restarted walks (at most 5 per walk).
    reads: Vec<(u64, u64)>,
}

impl<M: PhysMemory + ?Sized> TableAccess for Recorder<'_, M> {
    fn read_entry(&mut self, addr: u64, _level: u32, wide: bool) -> Option<u64> {
        let v = if wide {
            self.mem.read_u64(addr)?
        } else {
            u64::from(self.mem.read_u32(addr)?)
        };
        self.reads.push((addr, v));
        Some(v)
    }
    fn update_entry(
        &mut self,
        addr: u64,
        wide: bool,
        old: u64,
        new: u64,
    ) -> Option<Result<(), ()>> {
        let ok = if wide {
            self.mem.compare_exchange_u64(addr, old, new)?.is_ok()
        } else {
            // 4-byte entries of a 32-bit guest: the walker only passes 32-bit values.
            let (old, new) = (u32::try_from(old).ok()?, u32::try_from(new).ok()?);
            self.mem.compare_exchange_u32(addr, old, new)?.is_ok()
        };
        // Keep the recorded value current so the shadow sees what the walk produced.
        if ok {
            for e in self.reads.iter_mut() {
                if e.0 == addr {
                    e.1 = new;
                }
            }
        }
        Some(if ok { Ok(()) } else { Err(()) })
    }
}

/// Reads guest tables for [`ShadowMmu::invlpg`]: records the page table (level 1) the walk
/// reaches and refuses every Accessed/Dirty update (as memory that cannot be written).
struct NoUpdates<'a, M: PhysMemory + ?Sized> {
    mem: &'a M,
    /// The guest frame of the level-1 table read, if the walk got there.
    table: Option<u64>,
}

impl<M: PhysMemory + ?Sized> TableAccess for NoUpdates<'_, M> {
    fn read_entry(&mut self, addr: u64, level: u32, wide: bool) -> Option<u64> {
        if level == 1 {
            self.table = Some(addr >> 12);
        }
        DirectTables(self.mem).read_entry(addr, level, wide)
    }
    fn update_entry(&mut self, _: u64, _: bool, _: u64, _: u64) -> Option<Result<(), ()>> {
        None
    }
}

const ACC_W: u8 = 1;
const ACC_U: u8 = 2;
const ACC_X: u8 = 4;
const ACC_ALL: u8 = ACC_W | ACC_U | ACC_X;
/// A shadow non-leaf entry: fully permissive, the rights live in the leaves.
const LINK: u64 = PRESENT | WRITABLE | USER;
/// A shadow PDPTE (PAE-format root): only P may be set, R/W, U/S and XD are reserved.
const LINK_PDPTE: u64 = PRESENT;

/// The shadow MMU for one guest address-space owner (one vCPU's view).
#[derive(Debug)]
pub struct ShadowMmu<
    'a,
    G: PhysMemory + ?Sized,
    S: PhysMemory + ?Sized,
    A: FrameAllocator,
    H: HostMapping,
> {
    guest: &'a G,
    shadow: &'a S,
    alloc: A,
    host: H,
    walker: Walker,
    /// CR3 as the guest wrote it: the walker keeps only the bits its mode uses, and a
    /// switch to PAE paging needs bits 11:5 (the PDPT is 32-byte aligned).
    cr3_written: u64,
    pcid: u16,
    pages: Vec<ShadowPage>,
    free_ids: Vec<usize>,
    free_frames: Vec<u64>,
    by_role: BTreeMap<Role, usize>,
    /// Guest frames shadowed by non-direct pages: the write-protected set.
    by_gfn: BTreeMap<u64, Vec<usize>>,
    /// Guest frame -> shadow leaves mapping it: (page, serial, index).
    rmap: BTreeMap<u64, Vec<(usize, u64, u16)>>,
    /// Pages made unsync since the last full resynchronisation (may hold pages resynced
    /// or zapped since: checked when drained), so a flush costs O(unsync pages).
    unsync_pages: Vec<usize>,
    roots: Vec<CachedRoot>,
    generation: u64,
    serial: u64,
    reclaim_cursor: usize,
    stats: ShadowStats,
}

impl<'a, G, S, A, H> ShadowMmu<'a, G, S, A, H>
where
    G: PhysMemory + ?Sized,
    S: PhysMemory + ?Sized,
    A: FrameAllocator,
    H: HostMapping,
{
    /// A shadow MMU for a guest with paging state `cfg` (its `cr3` is the initial address
    /// space, PCID 0), guest memory `guest`, shadow tables in `shadow` (frames from
    /// `alloc`), and the VMM's memory map `host`.
    ///
    /// PAE guests: `cfg.pdptes` of `Some` is taken as the PDPTE registers (restored from a
    /// snapshot or a VMCS); `None` loads them from guest memory at `cfg.cr3`, as the CPU
    /// does when it enters PAE paging.
    pub fn new(
        cfg: PagingConfig,
        guest: &'a G,
        shadow: &'a S,
        alloc: A,
        host: H,
    ) -> Result<Self, ShadowError> {
        check_supported(&cfg)?;
        let cr3_written = cfg.cr3;
        let mut cfg = cfg;
        cfg.cr3 = root_address(&cfg, cfg.cr3);
        cfg.pdptes = resolve_pdptes(guest, &cfg, cfg.pdptes)?;
        let mut mmu = ShadowMmu {
            guest,
            shadow,
            alloc,
            host,
            walker: Walker::new(cfg),
            cr3_written,
            pcid: 0,
            pages: Vec::new(),
            free_ids: Vec::new(),
            free_frames: Vec::new(),
            by_role: BTreeMap::new(),
            by_gfn: BTreeMap::new(),
            rmap: BTreeMap::new(),
            unsync_pages: Vec::new(),
            roots: Vec::new(),
            generation: 1,
            serial: 0,
            reclaim_cursor: 0,
            stats: ShadowStats::default(),
        };
        mmu.load_root()?;
        Ok(mmu)
    }

    /// Counters.
    pub fn stats(&self) -> ShadowStats {
        self.stats
    }

    /// The guest walker (guest control registers, CR3 and, for PAE guests, the PDPTE
    /// registers loaded at the last CR3 write).
    pub fn guest_walker(&self) -> &Walker {
        &self.walker
    }

    /// Shadow pages currently alive (all generations).
    pub fn live_pages(&self) -> usize {
        self.pages.iter().filter(|p| p.live).count()
    }

    /// Whether the shadow tables are in PAE format (32-bit and PAE guests).
    fn pae_format(&self) -> bool {
        matches!(
            self.walker.config().mode,
            PagingMode::Legacy32 | PagingMode::Pae
        )
    }

    /// Depth of the shadow tables: 3 in PAE format, else the guest's depth.
    fn levels(&self) -> u32 {
        if self.pae_format() {
            3
        } else {
            self.walker.config().mode.levels()
        }
    }

    /// The current shadow root: the value for the real CR3. `None` after [`zap_all`]
    /// until the next fault or CR3 write builds a new root (the old one is obsolete and
    /// must not be used, as KVM reloads obsolete roots before the next guest entry).
    /// For 32-bit and PAE guests the root is a PAE page-directory-pointer table (below
    /// 4 GiB) and the real CPU runs in PAE paging.
    ///
    /// [`zap_all`]: Self::zap_all
    pub fn shadow_root(&self) -> Option<u64> {
        let r = self.roots.first()?;
        self.root_current(r).then(|| self.pages[r.sp].frame)
    }

    /// Whether `r` is a live root of the current (CR3, PCID, PDPTE registers): a CR3 load
    /// that failed (no frame for its root) leaves the previous root first in the cache,
    /// and that one must not serve the new address space.
    fn root_current(&self, r: &CachedRoot) -> bool {
        let cfg = self.walker.config();
        r.cr3 == cfg.cr3
            && r.pcid == self.pcid
            && r.pdptes == cfg.pdptes.unwrap_or_default()
            && self.root_valid(r)
    }

    fn root_valid(&self, r: &CachedRoot) -> bool {
        r.generation == self.generation
            && self
                .pages
                .get(r.sp)
                .is_some_and(|p| p.live && p.serial == r.serial)
    }

    /// The guest wrote CR3 (`cr3` with PCID `pcid`; `no_flush` is CR3 bit 63 with PCIDE).
    ///
    /// A PAE guest's PDPTEs are loaded from guest memory here, as the CPU loads its PDPTE
    /// registers on a MOV to CR3; later guest writes to its PDPT take effect only at the
    /// next CR3 load, so the PDPT is not write-protected. PDPTEs with reserved bits are
    /// refused with [`ShadowError::ReservedPdpte`], a PDPT outside guest memory with
    /// [`ShadowError::PdptOutsideMemory`] (the VMM injects #GP for both), and nothing
    /// changes.
    pub fn set_cr3(&mut self, cr3: u64, pcid: u16, no_flush: bool) -> Result<(), ShadowError> {
        let mut cfg = *self.walker.config();
        cfg.cr3 = root_address(&cfg, cr3);
        if cfg.mode == PagingMode::Pae {
            cfg.pdptes = resolve_pdptes(self.guest, &cfg, None)?;
            self.walker = Walker::new(cfg);
        } else {
            self.walker.set_cr3(cfg.cr3);
        }
        self.cr3_written = cr3;
        self.pcid = pcid;
        if !no_flush {
            self.resync_all();
        }
        self.load_root()
    }

    /// Makes the root for the current (CR3, PCID, PDPTEs) current: from the cache, or new.
    fn load_root(&mut self) -> Result<(), ShadowError> {
        let cr3 = self.walker.config().cr3;
        let pdptes = self.walker.config().pdptes.unwrap_or_default();
        let pcid = self.pcid;
        let found = self.roots.iter().position(|r| {
            r.cr3 == cr3 && r.pcid == pcid && r.pdptes == pdptes && self.root_valid(r)
        });
        if let Some(i) = found {
            let r = self.roots.remove(i);
            self.roots.insert(0, r);
            self.stats.root_hits += 1;
            return Ok(());
        }
        self.stats.root_misses += 1;
        let sp = match self.new_root() {
            // As a fault does: start over with an empty shadow and a reclaimed pool, so a
            // CR3 load never leaves an older root in charge of the new address space.
            Err(ShadowError::OutOfFrames) => {
                self.zap_all();
                self.reclaim(usize::MAX);
                self.new_root()?
            }
            other => other?,
        };
        let serial = self.pages[sp].serial;
        self.roots.retain(|r| r.generation == self.generation);
        self.roots.insert(
            0,
            CachedRoot {
                cr3,
                pcid,
                pdptes,
                sp,
                serial,
                generation: self.generation,
            },
        );
        while self.roots.len() > ROOT_CACHE {
            let Some(old) = self.roots.pop() else { break };
            // A PAE-format root belongs to its cache entry alone: free it with the entry.
            if self.pae_format() && self.root_valid(&old) {
                self.zap(old.sp);
            }
        }
        Ok(())
    }

    /// A root for the current guest CR3. In 4/5-level paging the root shadows the guest's
    /// top-level table and is shared like any shadow page. In PAE format (32-bit and PAE
    /// guests) it is a PDPT of 4 links, built privately for one cache entry: its entries
    /// come from the PDPTE registers (PAE) or point at the 4 quadrants of the guest page
    /// directory (32-bit), so nothing in it shadows guest memory that could change
    /// behind it.
    fn new_root(&mut self) -> Result<usize, ShadowError> {
        let levels = self.levels() as u8;
        let role = Role {
            // The PAE-format root is private to its cache entry: no guest table behind it.
            direct: self.pae_format(),
            ..Role::table(self.walker.config().cr3 >> 12, levels, 0, ACC_ALL)
        };
        if !self.pae_format() {
            return self.get_or_create(role, None);
        }
        let frame = self.new_low_frame()?;
        Ok(self.insert_page(role, frame))
    }

    /// A zeroed frame below 4 GiB for a PAE-format root (CR3 holds 32 bits in PAE paging):
    /// a recycled one if the pool has one, else fresh ones from the allocator until one is
    /// low (high ones join the pool, for pages that may live anywhere). `RootAbove4G` when
    /// the allocator has only high frames left, as KVM allocates its PAE roots from DMA32.
    fn new_low_frame(&mut self) -> Result<u64, ShadowError> {
        let low = |f: &u64| *f >> 32 == 0;
        let mut high = None;
        let frame = loop {
            if let Some(i) = self.free_frames.iter().rposition(low) {
                break self.free_frames.swap_remove(i);
            }
            match self.alloc.allocate() {
                Some(f) if low(&f.0) => break f.0,
                Some(f) => {
                    high.get_or_insert(f.0);
                    self.free_frames.push(f.0);
                }
                None => {
                    // Last resort: frames of older generations, then give up.
                    let before = self.free_frames.len();
                    self.reclaim(usize::MAX);
                    if let Some(i) = self.free_frames[before..].iter().rposition(low) {
                        break self.free_frames.swap_remove(before + i);
                    }
                    return Err(match high {
                        Some(frame) => ShadowError::RootAbove4G { frame },
                        None => ShadowError::OutOfFrames,
                    });
                }
            }
        };
        self.shadow
            .zero_frame(frame)
            .ok_or(ShadowError::OutsideMemory { addr: frame })?;
        Ok(frame)
    }

    /// The guest changed its paging state (CR0, CR4, EFER, RFLAGS.AC, PKRU, IA32_PKRS).
    ///
    /// `cfg.cr3` is ignored: CR3 writes go through [`set_cr3`](Self::set_cr3), which knows
    /// the PCID and the no-flush bit. When anything a shadow leaf was derived from changed
    /// (the mode, CR0.WP, CR4.SMEP/SMAP/PKE/PKS, EFER.NXE, MAXPHYADDR and the other CPU
    /// features of the config), every shadow page is zapped in O(1), as KVM resets its MMU
    /// context when the role changes, and the next fault builds a root in the new mode's
    /// format; RFLAGS.AC, PKRU and IA32_PKRS are applied when the shadow tables are walked
    /// and, like CR4.PGE (shadow leaves are never global), need nothing. PAE guests: the PDPTE registers are `cfg.pdptes`, or reloaded from
    /// guest memory at the current CR3 when it is `None`. The CPU reloads them on a MOV to
    /// CR0 or CR4 that changes CR0.CD/NW/PG or CR4.PAE/PGE/PSE/SMEP, so pass `None` for
    /// those (a config derived from the current one carries the old registers along); new
    /// PDPTEs select another root. With PAE-format shadow tables the root's four entries
    /// are rewritten in place when the guest's change, and a host CPU caches PDPTEs: a VMM
    /// running the shadow on hardware reloads CR3 (VM entry does) after this call. An
    /// unsupported state or reserved PDPTE bits are refused and the MMU keeps the previous
    /// state.
    ///
    /// Build `cfg` from the current one ([`guest_walker`](Self::guest_walker)`().config()`)
    /// with the changed registers: a config made from scratch (say with
    /// [`PagingConfig::from_registers`]) also resets the CPU features it carries
    /// (MAXPHYADDR, 1 GiB pages, AMD rules), and a difference there zaps everything.
    pub fn set_paging_config(&mut self, cfg: PagingConfig) -> Result<(), ShadowError> {
        check_supported(&cfg)?;
        let old = *self.walker.config();
        let mut new = cfg;
        new.cr3 = root_address(&new, self.cr3_written);
        new.pdptes = resolve_pdptes(self.guest, &new, cfg.pdptes)?;
        let shape = |c: &PagingConfig| {
            let mut c = *c;
            c.alignment_check = false;
            c.pge = false;
            c.pkru = 0;
            c.pkrs = 0;
            if !matches!(c.mode, PagingMode::Level4 | PagingMode::Level5) {
                // Protection keys exist only in IA-32e paging.
                c.pke = false;
                c.pks = false;
            }
            c.pdptes = None;
            c
        };
        let zap = shape(&old) != shape(&new);
        self.walker = Walker::new(new);
        if zap {
            self.zap_all();
        } else if old.pdptes != new.pdptes {
            self.load_root()?;
        }
        Ok(())
    }

    /// A full TLB flush by the guest (INVPCID all-context or single-context, a CR4 write
    /// that flushes): every unsync page is resynchronised. Shadow pages are shared by all
    /// PCIDs, so a single-context flush cannot do less. Costs O(unsync pages).
    pub fn flush(&mut self) {
        self.resync_all();
    }

    /// INVLPG of `gva` (also INVPCID individual-address for the current PCID): only the
    /// unsync shadow pages of the guest page table that maps `gva` now are
    /// resynchronised, as KVM syncs the one page on INVLPG; other unsync pages keep the
    /// entries the architecture lets a TLB keep until their own invalidation. Reads the
    /// guest's tables without setting Accessed bits (INVLPG sets none). A `gva` the
    /// guest's upper levels do not map through a page table (not present, a large page)
    /// needs nothing: only page tables go unsync.
    pub fn invlpg(&mut self, gva: u64) {
        let mut tables = NoUpdates {
            mem: self.guest,
            table: None,
        };
        let _ = self
            .walker
            .translate_with(&mut tables, gva, Access::supervisor_read());
        let Some(gfn) = tables.table else {
            return;
        };
        let Some(sps) = self.by_gfn.get(&gfn).cloned() else {
            return;
        };
        for sp in sps {
            let p = &self.pages[sp];
            if p.live && p.unsync && p.generation == self.generation {
                self.resync(sp);
            }
        }
    }

    /// Zaps every shadow page in O(1): later faults rebuild and reclaim incrementally.
    pub fn zap_all(&mut self) {
        self.generation += 1;
        self.unsync_pages.clear();
        self.by_role = BTreeMap::new();
        self.by_gfn = BTreeMap::new();
        self.rmap = BTreeMap::new();
        self.stats.zap_alls += 1;
    }

    /// Frees up to `budget` frames of shadow pages from older generations.
    fn reclaim(&mut self, mut budget: usize) {
        let n = self.pages.len();
        let mut scanned = 0;
        while budget > 0 && scanned < n {
            let i = self.reclaim_cursor % n;
            self.reclaim_cursor = self.reclaim_cursor.wrapping_add(1);
            scanned += 1;
            let p = &mut self.pages[i];
            if p.live && p.generation != self.generation {
                p.live = false;
                p.parents = Vec::new();
                self.free_frames.push(p.frame);
                self.free_ids.push(i);
                budget -= 1;
            }
        }
    }

    fn new_frame(&mut self) -> Result<u64, ShadowError> {
        let frame = match self.free_frames.pop() {
            Some(f) => f,
            None => match self.alloc.allocate() {
                Some(f) => f.0,
                None => {
                    self.reclaim(usize::MAX);
                    self.free_frames.pop().ok_or(ShadowError::OutOfFrames)?
                }
            },
        };
        self.shadow
            .zero_frame(frame)
            .ok_or(ShadowError::OutsideMemory { addr: frame })?;
        Ok(frame)
    }

    fn get_or_create(
        &mut self,
        role: Role,
        parent: Option<(usize, u16)>,
    ) -> Result<usize, ShadowError> {
        let id = match self.by_role.get(&role) {
            Some(&id) => id,
            None => {
                let frame = self.new_frame()?;
                let id = self.insert_page(role, frame);
                self.by_role.insert(role, id);
                if !role.direct {
                    // A synced shadow of this frame exists from now on: protect it, and
                    // bring its unsync siblings back in sync.
                    let siblings = self.by_gfn.entry(role.gfn).or_default();
                    siblings.push(id);
                    let unsync: Vec<usize> = siblings
                        .iter()
                        .copied()
                        .filter(|&s| self.pages[s].unsync)
                        .collect();
                    for s in unsync {
                        self.resync(s);
                    }
                    self.write_protect(role.gfn);
                }
                id
            }
        };
        if let Some((p, index)) = parent {
            let serial = self.pages[p].serial;
            let parents = &mut self.pages[id].parents;
            if !parents
                .iter()
                .any(|&(q, s, i)| q == p && s == serial && i == index)
            {
                parents.push((p, serial, index));
            }
        }
        Ok(id)
    }

    /// Records a new shadow page of `role` in `frame` (not yet findable by role).
    fn insert_page(&mut self, role: Role, frame: u64) -> usize {
        self.serial += 1;
        self.stats.pages_created += 1;
        let page = ShadowPage {
            role,
            frame,
            generation: self.generation,
            serial: self.serial,
            live: true,
            unsync: false,
            writes: 0,
            parents: Vec::new(),
        };
        match self.free_ids.pop() {
            Some(id) => {
                self.pages[id] = page;
                id
            }
            None => {
                self.pages.push(page);
                self.pages.len() - 1
            }
        }
    }

    fn leaf_valid(&self, sp: usize, serial: u64, index: u16) -> Option<u64> {
        let p = self.pages.get(sp)?;
        if !p.live || p.serial != serial || p.generation != self.generation {
            return None;
        }
        Some(p.frame + u64::from(index) * 8)
    }

    /// Clears W in every shadow leaf that maps guest frame `gfn`.
    fn write_protect(&mut self, gfn: u64) {
        let Some(leaves) = self.rmap.get(&gfn) else {
            return;
        };
        let host = self.host.host_page(gfn << 12);
        let mut keep = Vec::new();
        for &(sp, serial, index) in leaves {
            let Some(addr) = self.leaf_valid(sp, serial, index) else {
                continue;
            };
            let Some(e) = self.shadow.read_u64(addr) else {
                continue;
            };
            if e & PRESENT == 0 || Some(e & ADDR_MASK_52) != host {
                continue;
            }
            let _ = self.shadow.write_u64(addr, e & !WRITABLE);
            keep.push((sp, serial, index));
        }
        self.rmap.insert(gfn, keep);
    }

    fn resync(&mut self, sp: usize) {
        let frame = self.pages[sp].frame;
        for i in 0..512 {
            let _ = self.shadow.write_u64(frame + i * 8, 0);
        }
        self.pages[sp].unsync = false;
        self.stats.resyncs += 1;
        let gfn = self.pages[sp].role.gfn;
        self.write_protect(gfn);
    }

    fn resync_all(&mut self) {
        for sp in core::mem::take(&mut self.unsync_pages) {
            let p = &self.pages[sp];
            if p.live && p.unsync && p.generation == self.generation {
                self.resync(sp);
            }
        }
    }

    /// Whether guest frame `gfn` is shadowed by a synced page (and so must stay read-only).
    fn is_protected(&self, gfn: u64) -> bool {
        self.by_gfn
            .get(&gfn)
            .is_some_and(|v| v.iter().any(|&s| !self.pages[s].unsync))
    }

    /// Unlinks shadow page `sp` from its parents and frees it.
    fn zap(&mut self, sp: usize) {
        let page = &mut self.pages[sp];
        if !page.live {
            return;
        }
        let parents = core::mem::take(&mut page.parents);
        let (frame, role) = (page.frame, page.role);
        page.live = false;
        for (p, serial, index) in parents {
            if let Some(addr) = self.leaf_valid(p, serial, index) {
                if self.shadow.read_u64(addr).map(|e| e & ADDR_MASK_52) == Some(frame) {
                    let _ = self.shadow.write_u64(addr, 0);
                }
            }
        }
        if self.by_role.get(&role) == Some(&sp) {
            self.by_role.remove(&role);
        }
        if let Some(v) = self.by_gfn.get_mut(&role.gfn) {
            v.retain(|&s| s != sp);
            if v.is_empty() {
                self.by_gfn.remove(&role.gfn);
            }
        }
        self.free_frames.push(frame);
        self.free_ids.push(sp);
        self.stats.pages_zapped += 1;
    }

    /// The VMM emulated a guest store of `len` bytes at `gpa` (and wrote guest memory).
    /// Shadow entries derived from the written guest entries are dropped; a shadow page
    /// written [`WRITE_FLOOD_LIMIT`] times with no fault through it is zapped.
    pub fn guest_table_written(&mut self, gpa: u64, len: u64) {
        let gfn = gpa >> 12;
        let Some(sps) = self.by_gfn.get(&gfn).cloned() else {
            return;
        };
        let legacy = self.walker.config().mode == PagingMode::Legacy32;
        let entry_size = if legacy { 4 } else { 8 };
        let offset = gpa & 0xfff;
        // `len` may be anything the VMM was told (a `rep movs` count): saturate, the store
        // is clipped to this page anyway.
        let end = offset.saturating_add(len.max(1) - 1).min(0xfff);
        let (first, last) = (offset / entry_size, end / entry_size);
        for sp in sps {
            let page = &mut self.pages[sp];
            let (frame, role) = (page.frame, page.role);
            // The guest entries this shadow page covers (`span` of them from the quadrant's
            // first) and the shadow entries each one became: a 32-bit guest PDE (4 MiB) is
            // two shadow PDEs (2 MiB each).
            let (span, per) = if legacy && role.level == 2 {
                (256, 2)
            } else {
                (512, 1)
            };
            let base = u64::from(role.quadrant) * span;
            if last < base || first > base + span - 1 {
                // Another quadrant of the guest table: nothing here derives from it, and
                // it does not count towards this page's write flooding.
                continue;
            }
            page.writes = page.writes.saturating_add(1);
            if page.writes >= WRITE_FLOOD_LIMIT {
                self.zap(sp);
                continue;
            }
            for g in first.max(base)..=last.min(base + span - 1) {
                for k in 0..per {
                    let _ = self.shadow.write_u64(frame + ((g - base) * per + k) * 8, 0);
                }
            }
        }
    }

    /// Handles a fault of the shadow tables at `gva` for `access`.
    pub fn handle_fault(&mut self, gva: u64, access: Access) -> Result<ShadowOutcome, ShadowError> {
        self.reclaim(8);
        match self.try_fix(gva, access) {
            Err(ShadowError::OutOfFrames) => {
                // Start over with an empty shadow and a fully reclaimed pool.
                self.zap_all();
                self.reclaim(usize::MAX);
                self.load_root()?;
                self.try_fix(gva, access)
            }
            other => other,
        }
    }

    fn try_fix(&mut self, gva: u64, access: Access) -> Result<ShadowOutcome, ShadowError> {
        if !self.roots.first().is_some_and(|r| self.root_current(r)) {
            // Same CR3 and PDPTE registers: no reload from guest memory.
            self.load_root()?;
        }
        let mut rec = Recorder {
            mem: self.guest,
            reads: Vec::new(),
        };
        let t = match self.walker.translate_with(&mut rec, gva, access) {
            Ok(t) => t,
            Err(f) => return Ok(ShadowOutcome::InjectGuestFault(f)),
        };
        // The recorder may have seen restarted walks: keep the reads of the last one (a PAE
        // guest's PDPTEs come from the registers, not from memory).
        let path_len = usize::from(t.memory_refs());
        let reads = rec.reads.len();
        if reads < path_len {
            return Ok(ShadowOutcome::Fixed);
        }
        let path: Vec<(u64, u64)> = rec.reads[reads - path_len..].to_vec();
        let gpa_page = t.gpa & !0xfff;
        let Some(hpa_page) = self.host.host_page(gpa_page) else {
            return Ok(ShadowOutcome::Mmio(t.gpa));
        };
        let gfn = gpa_page >> 12;
        // CR0.WP = 0: the guest walk allowed a kernel write to a read-only page.
        let kernel_write = access.is_write() && !access.is_user() && !t.rights().writable;
        if kernel_write && t.rights().user && self.user_page_rules_apply_to_kernel() {
            // The kernel-write shape would make a user page supervisor-only, out of reach
            // of SMAP or the user-page key register (and into that of IA32_PKRS): emulate
            // the store, and let the leaf keep the guest's user-readable shape.
            return Ok(ShadowOutcome::EmulateWrite(t.gpa));
        }
        let writable = (t.rights().writable || kernel_write) && t.dirty();
        if let Some(sps) = self.by_gfn.get(&gfn).cloned() {
            if access.is_write() && self.is_protected(gfn) {
                // The guest writes one of its own page tables.
                let leaf_tables_only = sps.iter().all(|&s| self.pages[s].role.level == 1);
                let on_own_path = path.iter().any(|&(addr, _)| addr >> 12 == gfn);
                if !leaf_tables_only && on_own_path {
                    // Zapping would be undone by building this very path: emulate.
                    return Ok(ShadowOutcome::EmulateWrite(t.gpa));
                }
                if leaf_tables_only {
                    for s in sps {
                        if !self.pages[s].unsync {
                            self.pages[s].unsync = true;
                            self.unsync_pages.push(s);
                            self.stats.unsyncs += 1;
                        }
                    }
                    if self.unsync_pages.len() > 2 * self.pages.len() + 64 {
                        // Pages resynced by INVLPG went unsync again without a full flush
                        // in between: keep one entry per page still unsync.
                        let pages = &self.pages;
                        self.unsync_pages
                            .retain(|&sp| pages[sp].live && pages[sp].unsync);
                        self.unsync_pages.sort_unstable();
                        self.unsync_pages.dedup();
                    }
                } else {
                    for s in sps {
                        self.zap(s);
                    }
                }
            }
        }
        self.install(gva, &path, &t, hpa_page, writable, kernel_write)?;
        if access.is_write()
            && !access.is_user()
            && !self.walker.config().write_protect
            && self.translate(gva, access).is_err()
        {
            // A kernel write the guest's CR0.WP = 0 allows but the shadow tables, walked
            // with WP = 1, still refuse: a protection key's write-disable bit, which binds
            // supervisor writes only under WP = 1 and changes without an exit (WRPKRU).
            return Ok(ShadowOutcome::EmulateWrite(t.gpa));
        }
        self.stats.fixed += 1;
        Ok(ShadowOutcome::Fixed)
    }

    /// Whether the guest has rules that bind its kernel's accesses to user pages only
    /// (SMAP; protection keys in 4/5-level paging, where PKRU covers user pages and
    /// IA32_PKRS supervisor pages): then no user page may be shadowed as a supervisor one.
    fn user_page_rules_apply_to_kernel(&self) -> bool {
        let cfg = self.walker.config();
        cfg.smap
            || ((cfg.pke || cfg.pks) && matches!(cfg.mode, PagingMode::Level4 | PagingMode::Level5))
    }

    fn install(
        &mut self,
        gva: u64,
        path: &[(u64, u64)],
        t: &crate::walk::Translation,
        hpa_page: u64,
        writable: bool,
        kernel_write: bool,
    ) -> Result<(), ShadowError> {
        let Some(root) = self.roots.first().copied() else {
            return Ok(());
        };
        let mode = self.walker.config().mode;
        let levels = self.levels();
        let mut sp = root.sp;
        let mut access = ACC_ALL;
        // Base and size of the guest large page being split, once below its level.
        let mut direct: Option<(u64, u64)> = None;
        for level in (1..=levels).rev() {
            self.pages[sp].writes = 0;
            let index = ((gva >> (12 + 9 * (level - 1))) & 0x1ff) as u16;
            let addr = self.pages[sp].frame + u64::from(index) * 8;
            if level == 1 {
                let gfn = t.gpa >> 12;
                // Building the path may have made the target frame a shadowed table.
                let writable = writable && !self.is_protected(gfn);
                let mut leaf = hpa_page | PRESENT | ACCESSED | DIRTY;
                let rights = t.rights();
                // The kernel-write shape of a WP = 0 leaf (module docs): supervisor-only,
                // and a user page the kernel may write but, under SMEP, not execute.
                if rights.user && !kernel_write {
                    leaf |= USER;
                }
                if writable {
                    leaf |= WRITABLE;
                }
                if rights.no_execute || (kernel_write && rights.user && self.walker.config().smep) {
                    leaf |= NO_EXECUTE;
                }
                if !self.pae_format() {
                    leaf |= u64::from(rights.pkey) << PKEY_SHIFT;
                }
                // The guest's memory type, in a 4 KiB leaf's bits (a guest large page's PAT
                // bit moves from bit 12 to bit 7).
                let pat = t.pat_index();
                for (bit, flag) in [(1, WRITE_THROUGH), (2, CACHE_DISABLE), (4, PAGE_SIZE)] {
                    if pat & bit != 0 {
                        leaf |= flag;
                    }
                }
                self.shadow
                    .write_u64(addr, leaf)
                    .ok_or(ShadowError::OutsideMemory { addr })?;
                let serial = self.pages[sp].serial;
                let list = self.rmap.entry(gfn).or_default();
                if !list.contains(&(sp, serial, index)) {
                    list.push((sp, serial, index));
                }
                return Ok(());
            }
            // The child table replaces one entry of this level: it covers `cover` bytes.
            let cover = 1u64 << (12 + 9 * (level - 1));
            let mut link = LINK;
            let role = if let Some((base, size)) = direct {
                let gfn = (base + (gva & (size - 1) & !(cover - 1))) >> 12;
                Role::direct(gfn, (level - 1) as u8, access, t)
            } else if self.pae_format() && level == 3 {
                // The PAE-format root: a PDPTE links to a shadow page directory.
                link = LINK_PDPTE;
                let quarter = ((gva >> 30) & 3) as usize;
                let (gfn, quadrant) = match mode {
                    // A quarter of the guest's page directory.
                    PagingMode::Legacy32 => (root.cr3 >> 12, quarter as u8),
                    // The directory the PDPTE register names (it carries no rights).
                    _ => {
                        let Some(&pdpte) = root.pdptes.get(quarter) else {
                            return Ok(());
                        };
                        ((pdpte & ADDR_MASK_52) >> 12, 0)
                    }
                };
                Role::table(gfn, 2, quadrant, access)
            } else {
                // The guest entry this shadow entry derives from (one-to-one except that a
                // 32-bit PDE spans two shadow PDEs).
                let depth = if self.pae_format() {
                    2 - level
                } else {
                    levels - level
                } as usize;
                let Some(&(_, entry)) = path.get(depth) else {
                    return Ok(());
                };
                access &= rights_of(entry);
                if depth + 1 == path.len() {
                    // A guest large page: split it with direct shadow pages. Their leaves
                    // are shared by every guest mapping of the same role, so the role holds
                    // what those leaves take from the large leaf besides its rights: W only
                    // once it is dirty (a clean mapping must fault on its first write, to
                    // set D in its own entry - as KVM does), and its protection key.
                    if !t.dirty() {
                        access &= !ACC_W;
                    }
                    let (base, size) = (t.page_base(), t.page_size().bytes());
                    direct = Some((base, size));
                    let gfn = (base + (gva & (size - 1) & !(cover - 1))) >> 12;
                    Role::direct(gfn, (level - 1) as u8, access, t)
                } else if mode == PagingMode::Legacy32 {
                    // Half of a 1024-entry guest page table.
                    let quadrant = ((gva >> 21) & 1) as u8;
                    Role::table((entry & 0xffff_f000) >> 12, 1, quadrant, access)
                } else {
                    Role::table((entry & ADDR_MASK_52) >> 12, (level - 1) as u8, 0, access)
                }
            };
            let child = self.get_or_create(role, Some((sp, index)))?;
            let frame = self.pages[child].frame;
            // Creating the child may have zapped or resynced pages on our path.
            if !self.pages[sp].live {
                return Ok(());
            }
            self.shadow
                .write_u64(addr, frame | link)
                .ok_or(ShadowError::OutsideMemory { addr })?;
            sp = child;
        }
        Ok(())
    }

    /// Translates `gva` through the shadow tables as the hardware MMU would (no fix-up):
    /// the host-physical address.
    pub fn translate(&self, gva: u64, access: Access) -> Result<u64, Fault> {
        self.shadow_translation(gva, access).map(|t| t.gpa)
    }

    /// [`translate`](Self::translate) with the whole result of the walk through the
    /// shadow tables: the shadow leaf, its rights and memory type (its `gpa` is the
    /// host-physical address).
    pub fn shadow_translation(
        &self,
        gva: u64,
        access: Access,
    ) -> Result<crate::walk::Translation, Fault> {
        let Some(root) = self.shadow_root() else {
            // No valid root: behaves like an empty top-level table.
            return Err(Fault::PageFault(crate::walk::PageFault {
                addr: gva,
                error_code: crate::walk::PfErrorCode::from_bits(self.walker.access_code(access)),
                reason: crate::walk::FaultReason::NotPresent {
                    level: self.levels(),
                },
            }));
        };
        let mut cfg = *self.walker.config();
        cfg.cr3 = root;
        if self.pae_format() {
            // PAE-format shadow tables; the hardware reads the PDPTEs from the root.
            cfg.mode = PagingMode::Pae;
            cfg.pdptes = None;
        }
        cfg.set_accessed_dirty = false;
        // The host's setting: WP = 0 is emulated by the leaves' shapes.
        cfg.write_protect = true;
        cfg.max_phys_bits = 52;
        cfg.amd = false;
        cfg.nxe = true;
        Walker::new(cfg).translate(self.shadow, gva, access)
    }

    /// Performs an access as a vCPU would: shadow translation, fixing shadow faults.
    /// Returns the host-physical address or the outcome the VMM must handle.
    pub fn access(
        &mut self,
        gva: u64,
        access: Access,
    ) -> Result<Result<u64, ShadowOutcome>, ShadowError> {
        for _ in 0..4 {
            if let Ok(hpa) = self.translate(gva, access) {
                return Ok(Ok(hpa));
            }
            match self.handle_fault(gva, access)? {
                ShadowOutcome::Fixed => continue,
                other => return Ok(Err(other)),
            }
        }
        // A fix that does not stick (e.g. the guest races us): let the vCPU retry.
        Ok(Err(ShadowOutcome::Fixed))
    }
}

/// Refuses paging states the shadow MMU cannot shadow exactly (module docs).
fn check_supported(cfg: &PagingConfig) -> Result<(), ShadowError> {
    let why = if !cfg.set_accessed_dirty {
        // A shadow leaf becomes writable once the guest walk has set D: without A/D
        // updates every guest write would fault forever.
        Some("the shadow MMU emulates Accessed/Dirty through the guest walk: set_accessed_dirty must be on")
    } else {
        None
    };
    match why {
        Some(why) => Err(ShadowError::Unsupported {
            mode: cfg.mode,
            wp: cfg.write_protect,
            why,
        }),
        None => Ok(()),
    }
}

/// The guest's top-level table address in `cr3` (the bits the walker uses for `cfg.mode`).
fn root_address(cfg: &PagingConfig, cr3: u64) -> u64 {
    match cfg.mode {
        PagingMode::Legacy32 => cr3 & 0xffff_f000,
        PagingMode::Pae => cr3 & 0xffff_ffe0,
        PagingMode::Level4 | PagingMode::Level5 => {
            cr3 & bits(u32::from(cfg.max_phys_bits.clamp(32, 52)) - 1, 12)
        }
    }
}

/// The PDPTE registers of a PAE guest: `given`, or loaded from guest memory at `cfg.cr3`.
/// A PDPT outside guest memory and reserved bits in a present PDPTE are the #GP the CPU
/// raises on the load. `None` for the other modes.
fn resolve_pdptes<G: PhysMemory + ?Sized>(
    guest: &G,
    cfg: &PagingConfig,
    given: Option<[u64; 4]>,
) -> Result<Option<[u64; 4]>, ShadowError> {
    if cfg.mode != PagingMode::Pae {
        return Ok(None);
    }
    let mut pdptes = [0u64; 4];
    for (i, p) in pdptes.iter_mut().enumerate() {
        *p = match given {
            Some(regs) => regs[i],
            None => guest
                .read_u64(cfg.cr3 + i as u64 * 8)
                .ok_or(ShadowError::PdptOutsideMemory { addr: cfg.cr3 })?,
        };
    }
    // Bits 63:MAXPHYADDR, 8:5 and 2:1 are reserved in a present PDPTE.
    let reserved = bits(63, u32::from(cfg.max_phys_bits.clamp(32, 52))) | bits(8, 5) | bits(2, 1);
    for (index, &value) in pdptes.iter().enumerate() {
        if value & PRESENT != 0 && value & reserved != 0 {
            return Err(ShadowError::ReservedPdpte { index, value });
        }
    }
    Ok(Some(pdptes))
}

fn rights_of(entry: u64) -> u8 {
    let mut a = 0;
    if entry & WRITABLE != 0 {
        a |= ACC_W;
    }
    if entry & USER != 0 {
        a |= ACC_U;
    }
    if entry & NO_EXECUTE == 0 {
        a |= ACC_X;
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{BumpAllocator, MapFlags, PageSize, PageTableBuilder, PagingFormat};
    use crate::memory::{FlatMemory, GuestAddress};
    use crate::walk::PfErrorCode;

    const HOST_OFFSET: u64 = 0x1000_0000;
    const MMIO_START: u64 = 0x40_0000;
    const TABLES_VA: u64 = 0x8000_0000;

    fn host(gpa: u64) -> Option<u64> {
        (gpa < MMIO_START).then_some(gpa + HOST_OFFSET)
    }

    struct Env {
        guest: FlatMemory,
        shadow: FlatMemory,
        cr3: [u64; 2],
    }

    /// Two guest address spaces. Both map VA 0x40_0000.. (4 KiB pages) to GPA 0x10_0000..,
    /// a 2 MiB page at VA 0x60_0000 -> GPA 0x20_0000, VA 0x90_0000 -> MMIO, and the page
    /// tables themselves (GPA 0..0x10_0000) at TABLES_VA.
    fn env() -> Env {
        let guest = FlatMemory::new(0, 4 << 20);
        let mut alloc = BumpAllocator::new(GuestAddress(0x1000), GuestAddress(0x10_0000));
        let mut cr3 = [0; 2];
        for (i, c) in cr3.iter_mut().enumerate() {
            let mut b = PageTableBuilder::new(&guest, PagingFormat::Level4, &mut alloc).unwrap();
            b.map(
                0x40_0000,
                GuestAddress(0x10_0000 + i as u64 * 0x8000),
                0x8000,
                MapFlags::WRITABLE | MapFlags::USER,
            )
            .unwrap();
            b.map(
                0x60_0000,
                GuestAddress(0x20_0000),
                1 << 21,
                MapFlags::WRITABLE | MapFlags::USER,
            )
            .unwrap();
            b.map(
                0x90_0000,
                GuestAddress(MMIO_START),
                0x1000,
                MapFlags::WRITABLE,
            )
            .unwrap();
            b.set_max_page_size(PageSize::Size4K);
            b.map(TABLES_VA, GuestAddress(0), 0x10_0000, MapFlags::WRITABLE)
                .unwrap();
            *c = b.root().0;
        }
        Env {
            guest,
            shadow: FlatMemory::new(0x4000_0000, 1 << 20),
            cr3,
        }
    }

    type Mmu<'a> = ShadowMmu<'a, FlatMemory, FlatMemory, BumpAllocator, fn(u64) -> Option<u64>>;

    /// A shadow MMU over `e` for `cfg`, with `frames` shadow frames from 0x4000_0000.
    fn try_mmu(e: &Env, cfg: PagingConfig, frames: u64) -> Result<Mmu<'_>, ShadowError> {
        let alloc = BumpAllocator::new(
            GuestAddress(0x4000_0000),
            GuestAddress(0x4000_0000 + frames * 0x1000),
        );
        ShadowMmu::new(
            cfg,
            &e.guest,
            &e.shadow,
            alloc,
            host as fn(u64) -> Option<u64>,
        )
    }

    fn mmu(e: &Env) -> Mmu<'_> {
        try_mmu(e, PagingConfig::new(PagingMode::Level4, e.cr3[0]), 256).unwrap()
    }

    #[test]
    fn lazy_fill_and_outcomes() {
        let e = env();
        let mut m = mmu(&e);
        assert!(
            m.translate(0x40_0010, Access::user_read()).is_err(),
            "starts empty"
        );
        assert_eq!(
            m.handle_fault(0x40_0010, Access::user_read()),
            Ok(ShadowOutcome::Fixed)
        );
        assert_eq!(
            m.translate(0x40_0010, Access::user_read()),
            Ok(0x10_0010 + HOST_OFFSET)
        );
        // Large guest page split into direct 4 KiB shadow leaves.
        assert_eq!(
            m.access(0x7f_f008, Access::user_read()),
            Ok(Ok(0x3f_f008 + HOST_OFFSET))
        );
        assert_eq!(
            m.access(0x60_0000, Access::user_fetch()),
            Ok(Ok(0x20_0000 + HOST_OFFSET))
        );
        // Guest fault: not mapped, error code for a user write.
        let Ok(Err(ShadowOutcome::InjectGuestFault(f))) = m.access(0x50_0000, Access::user_write())
        else {
            panic!()
        };
        assert_eq!(
            f.error_code(),
            Some(PfErrorCode::from_bits(
                PfErrorCode::WRITE | PfErrorCode::USER
            ))
        );
        // Supervisor-only page accessed from user mode: protection fault from the guest tables.
        let Ok(Err(ShadowOutcome::InjectGuestFault(f))) = m.access(0x90_0000, Access::user_read())
        else {
            panic!()
        };
        assert_eq!(
            f.error_code().unwrap().bits(),
            PfErrorCode::PRESENT | PfErrorCode::USER
        );
        assert_eq!(
            m.access(0x90_0123, Access::supervisor_read()),
            Ok(Err(ShadowOutcome::Mmio(MMIO_START + 0x123)))
        );
        assert!(m.stats().fixed >= 3);
        assert!(m.live_pages() >= 5);
        assert_eq!(m.guest_walker().config().cr3, e.cr3[0]);
    }

    #[test]
    fn accessed_dirty_emulation() {
        let e = env();
        let mut m = mmu(&e);
        let pte = crate::walk::Walker::new(PagingConfig::new(PagingMode::Level4, e.cr3[0]))
            .translate(&e.guest, 0x40_1000, Access::supervisor_read())
            .unwrap()
            .leaf_addr;
        e.guest
            .write_u64(pte, e.guest.read_u64(pte).unwrap() & !(ACCESSED | DIRTY))
            .unwrap();
        m.access(0x40_1000, Access::user_read()).unwrap().unwrap();
        let g = e.guest.read_u64(pte).unwrap();
        assert_eq!(g & (ACCESSED | DIRTY), ACCESSED, "read sets A only");
        // Mapped read-only until the first write.
        assert!(m.translate(0x40_1000, Access::user_write()).is_err());
        m.access(0x40_1000, Access::user_write()).unwrap().unwrap();
        assert_ne!(e.guest.read_u64(pte).unwrap() & DIRTY, 0);
        assert!(m.translate(0x40_1000, Access::user_write()).is_ok());
    }

    /// Guest store through the shadow MMU, as the vCPU would perform it.
    /// Guest-physical address of the leaf entry of `va` in the 4-level space at `cr3`.
    fn guest_leaf_in(e: &Env, cr3: u64, va: u64) -> u64 {
        let mut cfg = PagingConfig::new(PagingMode::Level4, cr3);
        cfg.set_accessed_dirty = false;
        crate::walk::Walker::new(cfg)
            .translate(&e.guest, va, Access::supervisor_read())
            .unwrap()
            .leaf_addr
    }

    fn guest_store(m: &mut Mmu<'_>, e: &Env, gpa: u64, value: u64) {
        let hpa = m
            .access(TABLES_VA + gpa, Access::supervisor_write())
            .unwrap()
            .unwrap();
        e.guest.write_u64(hpa - HOST_OFFSET, value).unwrap();
    }

    #[test]
    fn page_tables_are_write_protected_then_unsynced_or_zapped() {
        let e = env();
        let mut m = mmu(&e);
        m.access(0x40_2000, Access::user_read()).unwrap().unwrap();
        let walker = crate::walk::Walker::new(PagingConfig::new(PagingMode::Level4, e.cr3[0]));
        let pte = walker
            .translate(&e.guest, 0x40_2000, Access::supervisor_read())
            .unwrap()
            .leaf_addr;
        // The guest's mapping of its own PT is read-only in the shadow once it is shadowed.
        m.access(TABLES_VA + pte, Access::supervisor_read())
            .unwrap()
            .unwrap();
        assert!(m
            .translate(TABLES_VA + pte, Access::supervisor_write())
            .is_err());
        // A store to a last-level table: unsync, the write proceeds.
        let new = 0x18_0000 | PRESENT | WRITABLE | USER;
        guest_store(&mut m, &e, pte, new);
        assert_eq!(m.stats().unsyncs, 1);
        // Until the guest flushes, the old translation may be used (TLB semantics).
        assert_eq!(
            m.translate(0x40_2000, Access::user_read()),
            Ok(0x10_2000 + HOST_OFFSET)
        );
        m.flush();
        assert_eq!(m.stats().resyncs, 1);
        assert_eq!(
            m.access(0x40_2000, Access::user_read()),
            Ok(Ok(0x18_0000 + HOST_OFFSET))
        );
        // Resync write-protected the PT again.
        assert!(m
            .translate(TABLES_VA + pte, Access::supervisor_write())
            .is_err());

        // A store to a non-leaf table (the PD): its shadow pages are zapped.
        let pd_entry = {
            let l4 = e.guest.read_u64(e.cr3[0]).unwrap() & ADDR_MASK_52;
            let l3 = e.guest.read_u64(l4).unwrap() & ADDR_MASK_52;
            l3 + 2 * 8 // PD index of 0x40_0000
        };
        let old = e.guest.read_u64(pd_entry).unwrap();
        let zapped = m.stats().pages_zapped;
        guest_store(&mut m, &e, pd_entry, old);
        assert!(m.stats().pages_zapped > zapped);
        assert_eq!(
            m.access(0x40_2000, Access::user_read()),
            Ok(Ok(0x18_0000 + HOST_OFFSET))
        );
    }

    #[test]
    fn invlpg_resyncs_only_the_page_table_of_its_address() {
        let e = env();
        let mut m = mmu(&e);
        let pte = |space: usize| guest_leaf_in(&e, e.cr3[space], 0x40_1000);
        // Both address spaces' page tables for 0x40_1000 shadowed, then written by the
        // guest (unsync), each switch keeping the TLB (PCIDs, no-flush).
        m.access(0x40_1000, Access::user_read()).unwrap().unwrap();
        m.set_cr3(e.cr3[1], 1, true).unwrap();
        m.access(0x40_1000, Access::user_read()).unwrap().unwrap();
        guest_store(&mut m, &e, pte(1), 0x18_1000 | PRESENT | USER);
        m.set_cr3(e.cr3[0], 0, true).unwrap();
        guest_store(&mut m, &e, pte(0), 0x18_0000 | PRESENT | USER);
        assert_eq!(m.stats().unsyncs, 2);
        // INVLPG in space 0 brings its page table back in sync, and only that one.
        let resyncs = m.stats().resyncs;
        assert_eq!(
            m.translate(0x40_1000, Access::user_read()),
            Ok(0x10_1000 + HOST_OFFSET)
        );
        m.invlpg(0x40_1000);
        assert_eq!(m.stats().resyncs, resyncs + 1);
        assert_eq!(
            m.access(0x40_1000, Access::user_read()),
            Ok(Ok(0x18_0000 + HOST_OFFSET))
        );
        // Space 1 still sees its old translation (PCID 1 was not invalidated) ...
        m.set_cr3(e.cr3[1], 1, true).unwrap();
        assert_eq!(
            m.translate(0x40_1000, Access::user_read()),
            Ok(0x10_9000 + HOST_OFFSET)
        );
        // ... until its own INVLPG. INVLPG sets no Accessed bit in the guest's tables.
        let before = e.guest.read_u64(pte(1)).unwrap();
        m.invlpg(0x40_1000);
        assert_eq!(e.guest.read_u64(pte(1)).unwrap(), before);
        assert_eq!(m.stats().resyncs, resyncs + 2);
        assert_eq!(
            m.access(0x40_1000, Access::user_read()),
            Ok(Ok(0x18_1000 + HOST_OFFSET))
        );
        // An address no page table maps (a 2 MiB page, an unmapped region) needs nothing.
        m.invlpg(0x60_0000);
        m.invlpg(0x7000_0000);
        assert_eq!(m.stats().resyncs, resyncs + 2);
    }

    #[test]
    fn emulated_writes_and_write_flooding() {
        let e = env();
        let mut m = mmu(&e);
        m.access(0x40_3000, Access::user_read()).unwrap().unwrap();
        let walker = crate::walk::Walker::new(PagingConfig::new(PagingMode::Level4, e.cr3[0]));
        let pte = walker
            .translate(&e.guest, 0x40_3000, Access::supervisor_read())
            .unwrap()
            .leaf_addr;
        // Emulated store: effective immediately, no flush needed.
        e.guest.write_u64(pte, 0x19_0000 | PRESENT | USER).unwrap();
        m.guest_table_written(pte, 8);
        assert_eq!(
            m.access(0x40_3000, Access::user_read()),
            Ok(Ok(0x19_0000 + HOST_OFFSET))
        );
        // Three writes with no fault in between zap the shadow page.
        let before = m.stats().pages_zapped;
        for _ in 0..WRITE_FLOOD_LIMIT {
            m.guest_table_written(pte, 8);
        }
        assert_eq!(m.stats().pages_zapped, before + 1);
        assert_eq!(
            m.access(0x40_3000, Access::user_read()),
            Ok(Ok(0x19_0000 + HOST_OFFSET))
        );
        // Writes to frames that are not tables are ignored.
        m.guest_table_written(0x10_0000, 8);
    }

    #[test]
    fn emulated_write_of_huge_length_is_clipped_to_the_page() {
        let e = env();
        let mut m = mmu(&e);
        m.access(0x40_3000, Access::user_read()).unwrap().unwrap();
        let walker = crate::walk::Walker::new(PagingConfig::new(PagingMode::Level4, e.cr3[0]));
        let pte = walker
            .translate(&e.guest, 0x40_3000, Access::supervisor_read())
            .unwrap()
            .leaf_addr;
        e.guest.write_u64(pte, 0x19_0000 | PRESENT | USER).unwrap();
        // Used to overflow `(gpa & 0xfff) + len - 1`.
        m.guest_table_written(pte, u64::MAX);
        assert_eq!(
            m.access(0x40_3000, Access::user_read()),
            Ok(Ok(0x19_0000 + HOST_OFFSET))
        );
    }

    #[test]
    fn cr3_root_cache() {
        let e = env();
        let mut m = mmu(&e);
        m.access(0x40_0000, Access::user_read()).unwrap().unwrap();
        let root_a = m.shadow_root().unwrap();
        m.set_cr3(e.cr3[1], 1, false).unwrap();
        assert_eq!(
            m.access(0x40_0000, Access::user_read()),
            Ok(Ok(0x10_8000 + HOST_OFFSET))
        );
        let fixed = m.stats().fixed;
        m.set_cr3(e.cr3[0], 0, true).unwrap();
        assert_eq!(m.shadow_root(), Some(root_a));
        assert_eq!(
            m.translate(0x40_0000, Access::user_read()),
            Ok(0x10_0000 + HOST_OFFSET)
        );
        assert_eq!(m.stats().fixed, fixed, "no refill after a cached switch");
        assert_eq!(m.stats().root_hits, 1);
        // The cache holds ROOT_CACHE roots: five distinct (CR3, PCID) pairs evict the oldest.
        for pcid in 1..=ROOT_CACHE as u16 {
            m.set_cr3(e.cr3[1], pcid + 10, true).unwrap();
        }
        let misses = m.stats().root_misses;
        m.set_cr3(e.cr3[0], 0, true).unwrap();
        assert_eq!(m.stats().root_misses, misses + 1);
    }

    #[test]
    fn zap_all_and_reclaim() {
        let e = env();
        let mut m = mmu(&e);
        for p in 0..8 {
            m.access(0x40_0000 + p * 0x1000, Access::user_read())
                .unwrap()
                .unwrap();
        }
        let live = m.live_pages();
        m.zap_all();
        assert_eq!(m.shadow_root(), None, "the old root is obsolete at once");
        assert!(m.translate(0x40_0000, Access::user_read()).is_err());
        assert_eq!(
            m.access(0x40_5000, Access::user_read()),
            Ok(Ok(0x10_5000 + HOST_OFFSET))
        );
        assert_eq!(m.stats().zap_alls, 1);
        for _ in 0..live {
            m.handle_fault(0x40_0000, Access::user_read()).unwrap();
        }
        assert!(m.live_pages() <= live);
    }

    #[test]
    fn out_of_frames_recovers_by_zapping() {
        let e = env();
        let cfg = PagingConfig::new(PagingMode::Level4, e.cr3[0]);
        // Root + 3 levels for one path + a little.
        let mut m = try_mmu(&e, cfg, 5).unwrap();
        m.access(0x40_0000, Access::user_read()).unwrap().unwrap();
        // A distant VA needs new tables: the pool is exhausted, zap_all makes room.
        assert_eq!(
            m.access(TABLES_VA, Access::supervisor_read()),
            Ok(Ok(HOST_OFFSET))
        );
        assert!(m.stats().zap_alls >= 1);
        // Not even one path fits: a typed error.
        let tiny = try_mmu(&e, cfg, 1);
        let mut tiny = tiny.unwrap();
        assert_eq!(
            tiny.access(0x40_0000, Access::user_read()),
            Err(ShadowError::OutOfFrames)
        );
        assert!(ShadowError::OutOfFrames
            .to_string()
            .contains("out of frames"));
    }

    /// The PDE of the 2 MiB guest page at VA 0x60_0000 (GPA 0x20_0000) in `env`'s space 0.
    fn large_pde(e: &Env) -> u64 {
        crate::walk::Walker::new(PagingConfig::new(PagingMode::Level4, e.cr3[0]))
            .translate(&e.guest, 0x60_0000, Access::supervisor_read())
            .unwrap()
            .leaf_addr
    }

    #[test]
    fn split_large_page_does_not_keep_write_access_past_a_cleared_dirty_bit() {
        let e = env();
        let mut m = mmu(&e);
        let pde = large_pde(&e);
        m.access(0x60_1000, Access::supervisor_write())
            .unwrap()
            .unwrap();
        assert_ne!(e.guest.read_u64(pde).unwrap() & DIRTY, 0);
        // The OS cleans the page (clears D), says so, flushes; a read relinks the split.
        let clean = e.guest.read_u64(pde).unwrap() & !DIRTY;
        e.guest.write_u64(pde, clean).unwrap();
        m.guest_table_written(pde, 8);
        m.flush();
        m.access(0x60_2000, Access::supervisor_read())
            .unwrap()
            .unwrap();
        // The next write must fault and set D again, not slip through an old leaf.
        m.access(0x60_1000, Access::supervisor_write())
            .unwrap()
            .unwrap();
        assert_ne!(e.guest.read_u64(pde).unwrap() & DIRTY, 0, "D lost");
    }

    #[test]
    fn two_mappings_of_one_large_page_keep_their_own_dirty_bits_and_keys() {
        let e = env();
        let pde = large_pde(&e);
        // A second mapping of the same 2 MiB at VA 0xa0_0000 (the next PDEs), clean.
        let alias = pde + ((0xa0_0000 - 0x60_0000) >> 21) * 8;
        let value = e.guest.read_u64(pde).unwrap() & !(ACCESSED | DIRTY);
        e.guest.write_u64(alias, value).unwrap();
        let mut m = mmu(&e);
        // The clean alias reads the page, then a write through the dirty mapping makes the
        // page's leaf writable.
        m.access(0xa0_1000, Access::user_read()).unwrap().unwrap();
        m.access(0x60_1000, Access::user_write()).unwrap().unwrap();
        // A write through the clean alias must still set D in the alias's own entry.
        assert_eq!(e.guest.read_u64(alias).unwrap() & DIRTY, 0);
        m.access(0xa0_1000, Access::user_write()).unwrap().unwrap();
        assert_ne!(e.guest.read_u64(alias).unwrap() & DIRTY, 0, "alias D lost");

        // Protection keys: the alias gets key 2, which PKRU forbids user data accesses.
        let e = env();
        let key2 = (e.guest.read_u64(pde).unwrap() & !(ACCESSED | DIRTY)) | (2 << PKEY_SHIFT);
        e.guest.write_u64(alias, key2).unwrap();
        let mut cfg = PagingConfig::new(PagingMode::Level4, e.cr3[0]);
        cfg.pke = true;
        cfg.pkru = 0b01 << 4; // key 2: access disabled
        let mut m = try_mmu(&e, cfg, 256).unwrap();
        // The key-0 mapping fills the leaf of page 2; a fetch through the alias (keys do
        // not govern fetches) links the alias to the split and fills page 1.
        m.access(0x60_2000, Access::user_read()).unwrap().unwrap();
        m.access(0xa0_1000, Access::user_fetch()).unwrap().unwrap();
        // A data read of page 2 through the alias is the guest's PK fault (P, U, PK).
        assert_eq!(injected(m.access(0xa0_2000, Access::user_read())), 0x25);
    }

    /// A user page the guest maps read-only, in a WP = 0 guest (with or without SMEP).
    fn wp0(e: &Env, smep: bool) -> (Mmu<'_>, u64) {
        let walker = crate::walk::Walker::new(PagingConfig::new(PagingMode::Level4, e.cr3[0]));
        let pte = walker
            .translate(&e.guest, 0x40_3000, Access::supervisor_read())
            .unwrap()
            .leaf_addr;
        let old = e.guest.read_u64(pte).unwrap();
        e.guest.write_u64(pte, old & !WRITABLE).unwrap();
        let mut m = mmu(e);
        let mut cfg = *m.guest_walker().config();
        cfg.write_protect = false;
        cfg.smep = smep;
        m.set_paging_config(cfg).unwrap();
        (m, 0x10_3000 + HOST_OFFSET)
    }

    fn injected(r: Result<Result<u64, ShadowOutcome>, ShadowError>) -> u32 {
        match r {
            Ok(Err(ShadowOutcome::InjectGuestFault(f))) => f.error_code().unwrap().bits(),
            other => panic!("expected a guest fault, got {other:?}"),
        }
    }

    #[test]
    fn cr0_wp_clear_flips_the_leaf_between_kernel_write_and_user_read() {
        let e = env();
        let (mut m, hpa) = wp0(&e, true);
        // The kernel writes the read-only user page: allowed with WP = 0.
        assert_eq!(
            m.access(0x40_3008, Access::supervisor_write()),
            Ok(Ok(hpa + 8))
        );
        // That leaf is now supervisor-only: a user read faults in the shadow, is fixed by
        // flipping the leaf, and succeeds; the kernel write then flips it back.
        assert!(m.translate(0x40_3000, Access::user_read()).is_err());
        assert_eq!(m.access(0x40_3000, Access::user_read()), Ok(Ok(hpa)));
        assert!(m.translate(0x40_3000, Access::supervisor_write()).is_err());
        assert_eq!(
            m.access(0x40_3010, Access::supervisor_write()),
            Ok(Ok(hpa + 0x10))
        );
        // A user write stays a guest fault whatever the shape (P, W, U).
        assert_eq!(injected(m.access(0x40_3000, Access::user_write())), 0x7);
        // In the kernel-write shape the page is no-execute for the kernel (SMEP): the fetch
        // faults in the shadow and the guest's own rules say SMEP violation (P, I/D).
        m.access(0x40_3000, Access::supervisor_write())
            .unwrap()
            .unwrap();
        assert_eq!(
            injected(m.access(0x40_3000, Access::supervisor_fetch())),
            0x11
        );
        // A user fetch is fine (the guest page is executable) and flips the leaf again.
        assert_eq!(m.access(0x40_3000, Access::user_fetch()), Ok(Ok(hpa)));
    }

    #[test]
    fn cr0_wp_clear_without_smep_lets_the_kernel_execute_the_written_page() {
        let e = env();
        let (mut m, hpa) = wp0(&e, false);
        m.access(0x40_3000, Access::supervisor_write())
            .unwrap()
            .unwrap();
        assert_eq!(m.translate(0x40_3000, Access::supervisor_fetch()), Ok(hpa));
        // Supervisor pages the guest maps read-only are kernel-writable too.
        let ro = m.access(TABLES_VA + 0x5_0000, Access::supervisor_write());
        assert_eq!(ro, Ok(Ok(0x5_0000 + HOST_OFFSET)));
    }

    #[test]
    fn control_register_changes_zap_only_when_leaves_depend_on_them() {
        let e = env();
        let (mut m, hpa) = wp0(&e, false);
        let zaps = m.stats().zap_alls;
        assert_eq!(m.access(0x40_3000, Access::supervisor_write()), Ok(Ok(hpa)));
        // RFLAGS.AC and PKRU act at walk time: no zap, the leaf stays.
        let mut cfg = *m.guest_walker().config();
        cfg.alignment_check = true;
        cfg.pkru = 0xc;
        cfg.cr3 = 0xdead_0000; // ignored: CR3 goes through set_cr3
        m.set_paging_config(cfg).unwrap();
        assert_eq!(m.stats().zap_alls, zaps);
        assert_eq!(m.guest_walker().config().cr3, e.cr3[0]);
        assert_eq!(m.translate(0x40_3000, Access::supervisor_write()), Ok(hpa));
        // CR0.WP back to 1: the kernel-writable leaf must go, and the write is now the
        // guest's fault (P, W).
        cfg.write_protect = true;
        m.set_paging_config(cfg).unwrap();
        assert_eq!(m.stats().zap_alls, zaps + 1);
        assert!(m.translate(0x40_3000, Access::supervisor_write()).is_err());
        assert_eq!(
            injected(m.access(0x40_3000, Access::supervisor_write())),
            0x3
        );
        // 5-level paging: a new root of the new depth is built on the next fault.
        cfg.mode = PagingMode::Level5;
        m.set_paging_config(cfg).unwrap();
        assert_eq!(m.stats().zap_alls, zaps + 2);
    }

    #[test]
    fn unsupported_guests() {
        let e = env();
        let mut no_ad = PagingConfig::new(PagingMode::Level4, e.cr3[0]);
        no_ad.set_accessed_dirty = false;
        let err = try_mmu(&e, no_ad, 256).unwrap_err();
        assert!(
            matches!(
                err,
                ShadowError::Unsupported {
                    mode: PagingMode::Level4,
                    wp: true,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("not supported"), "{err}");
        assert!(err.to_string().contains("Accessed/Dirty"), "{err}");
        // The same state refused when the guest switches to it later; the MMU keeps
        // working with the state it had.
        let mut m = mmu(&e);
        let mut cfg = *m.guest_walker().config();
        cfg.write_protect = false;
        cfg.set_accessed_dirty = false;
        assert!(matches!(
            m.set_paging_config(cfg),
            Err(ShadowError::Unsupported { wp: false, .. })
        ));
        assert!(m.guest_walker().config().write_protect);
        assert_eq!(
            m.access(0x40_0000, Access::user_write()),
            Ok(Ok(0x10_0000 + HOST_OFFSET))
        );
        let outside = ShadowMmu::new(
            PagingConfig::new(PagingMode::Level4, e.cr3[0]),
            &e.guest,
            &e.shadow,
            BumpAllocator::new(GuestAddress(0x9000_0000), GuestAddress(0x9010_0000)),
            host as fn(u64) -> Option<u64>,
        );
        assert!(matches!(outside, Err(ShadowError::OutsideMemory { .. })));
    }

    fn emulated(r: Result<Result<u64, ShadowOutcome>, ShadowError>) -> u64 {
        match r {
            Ok(Err(ShadowOutcome::EmulateWrite(gpa))) => gpa,
            other => panic!("expected an emulated store, got {other:?}"),
        }
    }

    /// A PAE guest whose user page 0x40_1000 (GPA 0x10_1000) is read-only, and its config
    /// with CR0.WP = 0.
    fn pae_wp0_read_only_user_page() -> (Env, PagingConfig) {
        let e = env_for(PagingFormat::Pae);
        let pte = guest_leaf(&e, PagingMode::Pae, 0x40_1000);
        let old = e.guest.read_u64(pte).unwrap();
        e.guest.write_u64(pte, old & !WRITABLE).unwrap();
        let mut cfg = PagingConfig::new(PagingMode::Pae, e.cr3[0]);
        cfg.write_protect = false;
        (e, cfg)
    }

    #[test]
    fn cr0_wp_clear_with_smap_emulates_kernel_stores_to_read_only_user_pages() {
        let e = env();
        let (mut m, hpa) = wp0(&e, false);
        let mut cfg = *m.guest_walker().config();
        cfg.smap = true;
        m.set_paging_config(cfg).unwrap();
        // RFLAGS.AC clear: SMAP refuses the kernel's store (P, W) and its read (P).
        assert_eq!(
            injected(m.access(0x40_3008, Access::supervisor_write())),
            0x3
        );
        assert_eq!(
            injected(m.access(0x40_3008, Access::supervisor_read())),
            0x1
        );
        // AC set: the guest allows the store to the read-only user page. A supervisor-only
        // writable leaf would let later AC-clear reads through, so the VMM emulates it.
        cfg.alignment_check = true;
        m.set_paging_config(cfg).unwrap();
        assert_eq!(
            emulated(m.access(0x40_3008, Access::supervisor_write())),
            0x10_3008
        );
        let pte = guest_leaf(&e, PagingMode::Level4, 0x40_3000);
        assert_ne!(
            e.guest.read_u64(pte).unwrap() & DIRTY,
            0,
            "the guest walk set D"
        );
        // The leaf keeps the guest's shape: user-readable, read-only.
        assert_eq!(m.access(0x40_3000, Access::supervisor_read()), Ok(Ok(hpa)));
        assert_eq!(m.translate(0x40_3000, Access::user_read()), Ok(hpa));
        assert!(m.translate(0x40_3000, Access::supervisor_write()).is_err());
        // ... so SMAP still sees a user page once AC is clear again.
        cfg.alignment_check = false;
        m.set_paging_config(cfg).unwrap();
        assert!(m.translate(0x40_3000, Access::supervisor_read()).is_err());
        assert_eq!(
            injected(m.access(0x40_3000, Access::supervisor_read())),
            0x1
        );
        // A read-only supervisor page is exact in the kernel-write shape: no exit per store.
        let table = guest_leaf(&e, PagingMode::Level4, TABLES_VA + 0xf_f000);
        let old = e.guest.read_u64(table).unwrap();
        e.guest.write_u64(table, old & !WRITABLE).unwrap();
        m.flush();
        assert_eq!(
            m.access(TABLES_VA + 0xf_f000, Access::supervisor_write()),
            Ok(Ok(0xf_f000 + HOST_OFFSET))
        );
        // A PAE guest has SMAP too.
        let (e, mut cfg) = pae_wp0_read_only_user_page();
        cfg.smap = true;
        cfg.alignment_check = true;
        let mut m = try_mmu(&e, cfg, 256).unwrap();
        assert_eq!(
            emulated(m.access(0x40_1000, Access::supervisor_write())),
            0x10_1000
        );
    }

    #[test]
    fn enabling_smap_or_keys_drops_the_kernel_write_shape() {
        // The supervisor-only writable shape of a user page is exact only while neither
        // SMAP nor user-page keys apply: turning either on (no other event needed) must
        // drop it, or the kernel would read a user page SMAP or PKRU refuses.
        for what in ["smap", "pke", "pks"] {
            let e = env();
            let (mut m, hpa) = wp0(&e, false);
            assert_eq!(m.access(0x40_3000, Access::supervisor_write()), Ok(Ok(hpa)));
            let mut cfg = *m.guest_walker().config();
            match what {
                "smap" => cfg.smap = true,
                "pke" => {
                    cfg.pke = true;
                    cfg.pkru = 1; // key 0: access-disable
                }
                _ => {
                    cfg.pks = true;
                    cfg.pkrs = 1; // supervisor pages' key 0: access-disable
                }
            }
            m.set_paging_config(cfg).unwrap();
            if what == "pks" {
                // IA32_PKRS does not govern user pages: the guest allows the read, and
                // the shadow must not apply PKRS to the page it shaped as supervisor.
                assert_eq!(m.access(0x40_3000, Access::supervisor_read()), Ok(Ok(hpa)));
            } else {
                assert!(
                    m.translate(0x40_3000, Access::supervisor_read()).is_err(),
                    "{what}"
                );
                assert!(
                    matches!(
                        m.access(0x40_3000, Access::supervisor_read()),
                        Ok(Err(ShadowOutcome::InjectGuestFault(_)))
                    ),
                    "{what}"
                );
            }
        }
        // Keys do not exist in PAE paging: toggling CR4.PKE there zaps nothing.
        let e = env_for(PagingFormat::Pae);
        let mut m = mmu_for(&e, PagingMode::Pae);
        let zaps = m.stats().zap_alls;
        let mut cfg = *m.guest_walker().config();
        cfg.pke = true;
        cfg.pks = true;
        m.set_paging_config(cfg).unwrap();
        assert_eq!(m.stats().zap_alls, zaps);
    }

    #[test]
    fn cr0_wp_clear_with_protection_keys_emulates_what_the_keys_would_refuse() {
        let e = env();
        let (mut m, hpa) = wp0(&e, false);
        // Key 1 on the writable user page 0x40_4000, key 2 on a supervisor page.
        let key = |va: u64, k: u64| {
            let leaf = guest_leaf(&e, PagingMode::Level4, va);
            let old = e.guest.read_u64(leaf).unwrap();
            e.guest.write_u64(leaf, old | (k << PKEY_SHIFT)).unwrap();
        };
        key(0x40_4000, 1);
        key(TABLES_VA + 0xf_e000, 2);
        let mut cfg = *m.guest_walker().config();
        cfg.pke = true;
        cfg.pks = true;
        cfg.pkru = 0b1000; // key 1: write-disable
        cfg.pkrs = 0b10_0000; // key 2: write-disable
        m.set_paging_config(cfg).unwrap();
        // WD binds supervisor writes only under CR0.WP = 1: the guest allows these
        // stores, the shadow tables (walked with WP = 1) refuse them.
        assert_eq!(
            emulated(m.access(0x40_4010, Access::supervisor_write())),
            0x10_4010
        );
        assert_eq!(
            emulated(m.access(TABLES_VA + 0xf_e000, Access::supervisor_write())),
            0xf_e000
        );
        // Reads are not emulated, and a user store is the guest's key fault (P, W, U, PK).
        assert_eq!(
            m.access(0x40_4010, Access::supervisor_read()),
            Ok(Ok(0x10_4010 + HOST_OFFSET))
        );
        assert_eq!(injected(m.access(0x40_4010, Access::user_write())), 0x27);
        // Once PKRU allows it (WRPKRU: no exit, no zap), the same leaf lets the store through.
        cfg.pkru = 0;
        m.set_paging_config(cfg).unwrap();
        assert_eq!(
            m.access(0x40_4010, Access::supervisor_write()),
            Ok(Ok(0x10_4010 + HOST_OFFSET))
        );
        // A read-only user page (key 0): the supervisor-only shape would take it from PKRU
        // to IA32_PKRS, so its kernel stores are emulated too.
        assert_eq!(
            emulated(m.access(0x40_3000, Access::supervisor_write())),
            0x10_3000
        );
        assert_eq!(m.access(0x40_3000, Access::user_read()), Ok(Ok(hpa)));
        // Protection keys do nothing outside IA-32e paging: a PAE guest with CR0.WP = 0 and
        // CR4.PKE gets the kernel-write shape.
        let (e, mut cfg) = pae_wp0_read_only_user_page();
        cfg.pke = true;
        let mut m = try_mmu(&e, cfg, 256).unwrap();
        assert_eq!(
            m.access(0x40_1000, Access::supervisor_write()),
            Ok(Ok(0x10_1000 + HOST_OFFSET))
        );
    }

    #[test]
    fn shadow_leaves_carry_the_guest_memory_type() {
        let e = env();
        let set = |cr3: u64, va: u64, bits: u64| {
            let leaf = crate::walk::Walker::new(PagingConfig::new(PagingMode::Level4, cr3))
                .translate(&e.guest, va, Access::supervisor_read())
                .unwrap()
                .leaf_addr;
            let old = e.guest.read_u64(leaf).unwrap();
            e.guest.write_u64(leaf, old | bits).unwrap();
        };
        set(e.cr3[0], 0x40_1000, CACHE_DISABLE | WRITE_THROUGH);
        set(e.cr3[0], 0x40_2000, PAGE_SIZE); // PAT, in a 4 KiB leaf
                                             // Both address spaces map the same 2 MiB page, with different memory types.
        set(e.cr3[0], 0x60_0000, LARGE_PAT | WRITE_THROUGH);
        set(e.cr3[1], 0x60_0000, CACHE_DISABLE);
        let mut m = mmu(&e);
        let pat = |m: &mut Mmu<'_>, va: u64| {
            m.access(va, Access::user_read()).unwrap().unwrap();
            let t = m.shadow_translation(va, Access::user_read()).unwrap();
            assert_eq!(t.page_size(), PageSize::Size4K);
            t.pat_index()
        };
        assert_eq!(pat(&mut m, 0x40_0000), 0);
        assert_eq!(pat(&mut m, 0x40_1000), 3);
        assert_eq!(pat(&mut m, 0x40_2000), 4);
        assert_eq!(pat(&mut m, 0x61_2000), 5);
        // The other space's mapping of the large page gets shadow leaves of its own.
        m.set_cr3(e.cr3[1], 0, false).unwrap();
        assert_eq!(pat(&mut m, 0x61_2000), 2);
        m.set_cr3(e.cr3[0], 0, false).unwrap();
        assert_eq!(pat(&mut m, 0x61_2000), 5);
    }

    #[test]
    fn pae_pdpt_outside_guest_memory_is_refused() {
        let e = env_for(PagingFormat::Pae);
        let mut m = mmu_for(&e, PagingMode::Pae);
        let err = m.set_cr3(0x50_0020, 0, false).unwrap_err();
        assert_eq!(err, ShadowError::PdptOutsideMemory { addr: 0x50_0020 });
        assert!(err.to_string().contains("0x500020"), "{err}");
        // Nothing changed: the old address space still works.
        assert_eq!(m.guest_walker().config().cr3, e.cr3[0]);
        assert_eq!(
            m.access(0x40_0000, Access::user_read()),
            Ok(Ok(0x10_0000 + HOST_OFFSET))
        );
        let mut cfg = PagingConfig::new(PagingMode::Pae, 0x50_0000);
        cfg.pdptes = None;
        assert_eq!(
            try_mmu(&e, cfg, 256).unwrap_err(),
            ShadowError::PdptOutsideMemory { addr: 0x50_0000 }
        );
    }

    /// A 32-bit or PAE guest: VA 0x40_0000.. (8 pages) -> GPA 0x10_0000.. in the first
    /// half of one guest page table, VA 0x60_0000.. (8 pages) -> GPA 0x18_0000.. in its
    /// second half (32-bit), a large page at 0x80_0000 (4 MiB -> GPA 0 for 32-bit, 2 MiB
    /// -> GPA 0x20_0000 for PAE), and the tables (GPA 0..1 MiB) at TABLES_VA.
    fn env_for(format: PagingFormat) -> Env {
        let guest = FlatMemory::new(0, 4 << 20);
        let mut alloc = BumpAllocator::new(GuestAddress(0x1000), GuestAddress(0x10_0000));
        let mut cr3 = [0; 2];
        for (i, c) in cr3.iter_mut().enumerate() {
            let mut b = PageTableBuilder::new(&guest, format, &mut alloc).unwrap();
            let rw = MapFlags::WRITABLE | MapFlags::USER;
            let off = i as u64 * 0x1_0000;
            b.map(0x40_0000, GuestAddress(0x10_0000 + off), 0x8000, rw)
                .unwrap();
            b.map(0x60_0000, GuestAddress(0x18_0000 + off), 0x8000, rw)
                .unwrap();
            let (gpa, size) = match format {
                PagingFormat::Legacy32 => (0, 4 << 20),
                _ => (0x20_0000, 2 << 20),
            };
            b.map(0x80_0000, GuestAddress(gpa), size, rw).unwrap();
            b.set_max_page_size(PageSize::Size4K);
            b.map(TABLES_VA, GuestAddress(0), 0x10_0000, MapFlags::WRITABLE)
                .unwrap();
            *c = b.root().0;
        }
        Env {
            guest,
            shadow: FlatMemory::new(0x4000_0000, 1 << 20),
            cr3,
        }
    }

    fn mmu_for(e: &Env, mode: PagingMode) -> Mmu<'_> {
        try_mmu(e, PagingConfig::new(mode, e.cr3[0]), 256).unwrap()
    }

    fn guest_leaf(e: &Env, mode: PagingMode, va: u64) -> u64 {
        crate::walk::Walker::new(PagingConfig::new(mode, e.cr3[0]))
            .translate(&e.guest, va, Access::supervisor_read())
            .unwrap()
            .leaf_addr
    }

    #[test]
    fn legacy32_lazy_fill_quadrants_and_4m_split() {
        let e = env_for(PagingFormat::Legacy32);
        let mut m = mmu_for(&e, PagingMode::Legacy32);
        assert!(m.translate(0x40_1008, Access::user_read()).is_err());
        assert_eq!(
            m.handle_fault(0x40_1008, Access::user_read()),
            Ok(ShadowOutcome::Fixed)
        );
        // The shadow is PAE-format: root PDPT (P only), PD, PT.
        let root = m.shadow_root().unwrap();
        let pdpte = e.shadow.read_u64(root).unwrap();
        assert_eq!(pdpte & 0xfff, PRESENT);
        assert_eq!(
            m.translate(0x40_1008, Access::user_read()),
            Ok(0x10_1008 + HOST_OFFSET)
        );
        // Both halves of one guest page table: two shadow page tables (quadrants 0, 1).
        let created = m.stats().pages_created;
        assert_eq!(
            m.access(0x60_2010, Access::user_write()),
            Ok(Ok(0x18_2010 + HOST_OFFSET))
        );
        assert_eq!(m.stats().pages_created, created + 1);
        assert_eq!(
            m.translate(0x40_1008, Access::user_read()),
            Ok(0x10_1008 + HOST_OFFSET),
            "the first quadrant is untouched"
        );
        // A 4 MiB page split into 4 KiB leaves in both of its 2 MiB halves.
        for va in [0x80_0000u64, 0x83_4568, 0xa0_1000, 0xbf_f000] {
            assert_eq!(
                m.access(va, Access::user_read()),
                Ok(Ok(va - 0x80_0000 + HOST_OFFSET)),
                "{va:#x}"
            );
        }
        // The guest walk set A (and D on the write) in the 4-byte entries.
        let pte = guest_leaf(&e, PagingMode::Legacy32, 0x60_2000);
        let v = u64::from(e.guest.read_u32(pte).unwrap());
        assert_eq!(v & (ACCESSED | DIRTY), ACCESSED | DIRTY);
        // The guest's faults keep the guest's error codes (no I/D bit without NX or SMEP).
        assert_eq!(injected(m.access(0x50_0000, Access::user_fetch())), 0x4);
        // PDPTE slot 2 (TABLES_VA) is another quadrant of the same guest directory.
        assert_eq!(
            m.access(TABLES_VA + 0x5000, Access::supervisor_read()),
            Ok(Ok(0x5000 + HOST_OFFSET))
        );
        assert_ne!(e.shadow.read_u64(root + 16).unwrap() & PRESENT, 0);
    }

    #[test]
    fn legacy32_writes_to_one_quadrant_do_not_flood_another() {
        let e = env_for(PagingFormat::Legacy32);
        let mut m = mmu_for(&e, PagingMode::Legacy32);
        // VA 0x40_0000 lies in the first quarter of the page directory (shadow quadrant 0).
        m.access(0x40_0000, Access::user_read()).unwrap().unwrap();
        let zapped = m.stats().pages_zapped;
        // PDE 300 (VA 0x4b00_0000) is in the second quarter: three reported writes there
        // must neither zap nor touch the quadrant-0 shadow page.
        let pde = e.cr3[0] + 300 * 4;
        for v in [0u32, 0x2000 | 1, 0] {
            e.guest.write_u32(pde, v).unwrap();
            m.guest_table_written(pde, 4);
        }
        assert_eq!(m.stats().pages_zapped, zapped);
        assert!(m.translate(0x40_0000, Access::user_read()).is_ok());
    }

    #[test]
    fn legacy32_table_writes_protect_unsync_and_emulated_4_byte_entries() {
        let e = env_for(PagingFormat::Legacy32);
        let mut m = mmu_for(&e, PagingMode::Legacy32);
        for va in [0x60_1000u64, 0x60_2000, 0x40_1000, 0x80_0000, 0xa0_0000] {
            m.access(va, Access::user_read()).unwrap().unwrap();
        }
        // The PTE of 0x60_1000 is entry 513 of the guest table: second quadrant, index 1.
        let pte = guest_leaf(&e, PagingMode::Legacy32, 0x60_1000);
        assert_eq!(pte & 0xfff, 513 * 4);
        // The guest's own mapping of its table is read-only in the shadow.
        m.access(TABLES_VA + pte, Access::supervisor_read())
            .unwrap()
            .unwrap();
        assert!(m
            .translate(TABLES_VA + pte, Access::supervisor_write())
            .is_err());
        // A store: both shadow pages of the table go unsync, the store lands.
        let hpa = m
            .access(TABLES_VA + pte, Access::supervisor_write())
            .unwrap()
            .unwrap();
        assert_eq!(hpa, pte + HOST_OFFSET);
        assert_eq!(m.stats().unsyncs, 2);
        e.guest
            .write_u32(pte, 0x1c_0000 | (PRESENT | WRITABLE | USER) as u32)
            .unwrap();
        assert_eq!(
            m.translate(0x60_1000, Access::user_read()),
            Ok(0x18_1000 + HOST_OFFSET),
            "stale until the guest flushes"
        );
        m.flush();
        assert_eq!(
            m.access(0x60_1000, Access::user_read()),
            Ok(Ok(0x1c_0000 + HOST_OFFSET))
        );
        // An emulated 4-byte write drops exactly the shadow entry derived from it.
        m.access(0x60_2000, Access::user_read()).unwrap().unwrap();
        e.guest
            .write_u32(pte, 0x1d_0000 | (PRESENT | USER) as u32)
            .unwrap();
        m.guest_table_written(pte, 4);
        assert!(m.translate(0x60_1000, Access::user_read()).is_err());
        assert_eq!(
            m.translate(0x60_2000, Access::user_read()),
            Ok(0x18_2000 + HOST_OFFSET)
        );
        assert_eq!(
            m.access(0x60_1000, Access::user_read()),
            Ok(Ok(0x1d_0000 + HOST_OFFSET))
        );
        // A guest PDE (4 MiB) is two shadow PDEs: an emulated write to the 4 MiB page's
        // PDE drops both halves and leaves the other directory entries alone.
        let pde = e.cr3[0] + 2 * 4;
        for va in [0x80_0000u64, 0xa0_0000, 0x40_1000] {
            m.access(va, Access::user_read()).unwrap().unwrap();
        }
        m.guest_table_written(pde, 4);
        assert!(m.translate(0x80_0000, Access::user_read()).is_err());
        assert!(m.translate(0xa0_0000, Access::user_read()).is_err());
        assert_eq!(
            m.translate(0x40_1000, Access::user_read()),
            Ok(0x10_1000 + HOST_OFFSET)
        );
        // A store to the guest directory through a mapping it translates itself: the
        // VMM emulates it.
        assert_eq!(
            m.access(TABLES_VA + pde, Access::supervisor_write()),
            Ok(Err(ShadowOutcome::EmulateWrite(pde)))
        );
    }

    #[test]
    fn pae_pdptes_are_loaded_at_cr3_writes_only() {
        let e = env_for(PagingFormat::Pae);
        let mut m = mmu_for(&e, PagingMode::Pae);
        assert_eq!(
            m.access(0x40_1000, Access::user_write()),
            Ok(Ok(0x10_1000 + HOST_OFFSET))
        );
        assert_eq!(
            m.access(0x80_1000, Access::user_read()),
            Ok(Ok(0x20_1000 + HOST_OFFSET))
        );
        let root = m.shadow_root().unwrap();
        assert_eq!(e.shadow.read_u64(root).unwrap() & 0xfff, PRESENT);
        assert_eq!(
            m.guest_walker().config().pdptes.map(|p| p[0]),
            e.guest.read_u64(e.cr3[0])
        );
        // The guest clears PDPTE 0 in memory (the PDPT is not write-protected): nothing
        // changes until the next CR3 load, not even after a flush or a zap.
        let pdpte0 = e.guest.read_u64(e.cr3[0]).unwrap();
        assert_eq!(
            m.access(TABLES_VA + e.cr3[0], Access::supervisor_write()),
            Ok(Ok(e.cr3[0] + HOST_OFFSET))
        );
        e.guest.write_u64(e.cr3[0], 0).unwrap();
        m.guest_table_written(e.cr3[0], 8);
        m.flush();
        m.zap_all();
        assert_eq!(
            m.access(0x40_1000, Access::user_read()),
            Ok(Ok(0x10_1000 + HOST_OFFSET))
        );
        m.set_cr3(e.cr3[0], 0, true).unwrap();
        assert_eq!(injected(m.access(0x40_1000, Access::user_read())), 0x4);
        // Another address space, and back once PDPTE 0 is restored: the cache is keyed by
        // the PDPTEs too, so the root built from the original ones comes back.
        m.set_cr3(e.cr3[1], 0, false).unwrap();
        assert_eq!(
            m.access(0x40_1000, Access::user_read()),
            Ok(Ok(0x11_1000 + HOST_OFFSET))
        );
        e.guest.write_u64(e.cr3[0], pdpte0).unwrap();
        let hits = m.stats().root_hits;
        m.set_cr3(e.cr3[0], 0, false).unwrap();
        assert_eq!(m.stats().root_hits, hits + 1);
        assert_eq!(
            m.access(0x40_1000, Access::user_read()),
            Ok(Ok(0x10_1000 + HOST_OFFSET))
        );
        // Reserved PDPTE bits: #GP for the guest, the MMU keeps its state.
        e.guest
            .write_u64(e.cr3[1] + 8, 0x5000 | PRESENT | WRITABLE)
            .unwrap();
        assert_eq!(
            m.set_cr3(e.cr3[1], 0, false),
            Err(ShadowError::ReservedPdpte {
                index: 1,
                value: 0x5000 | PRESENT | WRITABLE
            })
        );
        assert_eq!(m.guest_walker().config().cr3, e.cr3[0]);
        assert_eq!(
            m.translate(0x40_1000, Access::user_read()),
            Ok(0x10_1000 + HOST_OFFSET)
        );
        // PDPTE registers supplied by the VMM (e.g. from a snapshot) are used as given,
        // and a CR0/CR4 write without them reloads them from memory.
        let mut cfg = *m.guest_walker().config();
        cfg.pdptes = Some([0; 4]);
        m.set_paging_config(cfg).unwrap();
        assert_eq!(injected(m.access(0x40_1000, Access::user_read())), 0x4);
        cfg.pdptes = None;
        m.set_paging_config(cfg).unwrap();
        assert_eq!(
            m.access(0x40_1000, Access::user_read()),
            Ok(Ok(0x10_1000 + HOST_OFFSET))
        );
        // The page directories are write-protected and shadowed one-to-one.
        let pte = guest_leaf(&e, PagingMode::Pae, 0x40_3000);
        m.access(0x40_3000, Access::user_read()).unwrap().unwrap();
        e.guest.write_u64(pte, 0x1e_0000 | PRESENT | USER).unwrap();
        m.guest_table_written(pte, 8);
        assert_eq!(
            m.access(0x40_3000, Access::user_read()),
            Ok(Ok(0x1e_0000 + HOST_OFFSET))
        );
    }

    #[test]
    fn pae_error_messages_name_the_values() {
        let a = ShadowError::RootAbove4G { frame: 1 << 32 }.to_string();
        assert!(a.contains("0x100000000") && a.contains("4 GiB"), "{a}");
        let b = ShadowError::ReservedPdpte {
            index: 2,
            value: 0x7,
        }
        .to_string();
        assert!(b.contains("PDPTE 2") && b.contains("0x7"), "{b}");
    }

    #[test]
    fn pae_format_roots_must_be_below_4g() {
        let e = env_for(PagingFormat::Pae);
        let high = FlatMemory::new(1 << 32, 1 << 20);
        let r = ShadowMmu::new(
            PagingConfig::new(PagingMode::Pae, e.cr3[0]),
            &e.guest,
            &high,
            BumpAllocator::new(GuestAddress(1 << 32), GuestAddress((1 << 32) + (1 << 20))),
            host as fn(u64) -> Option<u64>,
        );
        assert!(matches!(r, Err(ShadowError::RootAbove4G { frame }) if frame == 1 << 32));
    }

    #[test]
    fn mode_changes_rebuild_the_root_in_the_new_format() {
        let e4 = env();
        let e32 = env_for(PagingFormat::Legacy32);
        // CR4.PSE is a 32-bit leaf input: changing it zaps.
        let mut m = mmu_for(&e32, PagingMode::Legacy32);
        m.access(0x40_1000, Access::user_read()).unwrap().unwrap();
        let zaps = m.stats().zap_alls;
        let mut cfg = *m.guest_walker().config();
        cfg.pse = false;
        m.set_paging_config(cfg).unwrap();
        assert_eq!(m.stats().zap_alls, zaps + 1);
        // Without CR4.PSE the 4 MiB PDE is a table pointer: the guest walk decides.
        assert_eq!(
            m.access(0x40_1000, Access::user_read()),
            Ok(Ok(0x10_1000 + HOST_OFFSET))
        );
        cfg.pse = true;
        cfg.mode = PagingMode::Level4;
        m.set_paging_config(cfg).unwrap();
        assert_eq!(m.stats().zap_alls, zaps + 2);
        assert_eq!(m.shadow_root(), None);
        drop(m);
        // A 4-level guest switched to 32-bit paging gets a PAE-format root.
        let mut m = mmu(&e4);
        m.access(0x40_0000, Access::user_read()).unwrap().unwrap();
        let mut cfg = *m.guest_walker().config();
        cfg.mode = PagingMode::Legacy32;
        m.set_paging_config(cfg).unwrap();
        assert!(m.translate(0x40_0000, Access::user_read()).is_err());
    }
}
