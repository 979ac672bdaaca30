//! Host memory behind guest RAM: anonymous, shareable memfd, or file-backed mappings, with
//! optional huge pages and guard pages.
//!
//! # Model
//!
//! [`Backing`] says *how* each RAM region of a [`MemoryLayout`] is provided; [`Backing::build`]
//! maps the regions and returns an [`OwnedGuestRam`]: the vm-memory
//! [`GuestRam`] every other crate reads and writes through vm-memory's traits,
//! plus what vm-memory does not keep — per region the host address (for a KVM memory slot),
//! the file descriptor and offset when the memory is shareable (for KVM and for a vhost-user
//! backend that maps the same pages in another process), and which kind of pages the kernel
//! gave.
//!
//! | kind | mapping | shareable fd |
//! |------|---------|--------------|
//! | [`BackingKind::Anonymous`] | `MAP_PRIVATE \| MAP_ANONYMOUS \| MAP_NORESERVE` | no |
//! | [`BackingKind::Memfd`] | one sealed-size memfd per region, `MAP_SHARED` | yes, offset 0 |
//! | [`BackingKind::File`] | one file, regions at consecutive offsets, `MAP_SHARED` | yes |
//!
//! **Huge pages.** When asked, anonymous and memfd regions first try hugetlb pages
//! (`MAP_HUGETLB` / `MFD_HUGETLB`, 2 MiB). Hosts without a hugetlb pool refuse that; the
//! region then falls back to normal pages with `madvise(MADV_HUGEPAGE)` so transparent huge
//! pages can still back it. [`RegionInfo::huge_pages`] reports what happened.
//!
//! **Guard pages.** As Firecracker does, each region can be surrounded by one inaccessible
//! (`PROT_NONE`) page on each side, so a stray host-side access just past a region faults
//! instead of reading a neighbouring mapping. The whole span is first reserved `PROT_NONE`,
//! then the region is mapped over its middle with `MAP_FIXED`.
//!
//! **Lifetime.** The host mappings belong to the [`OwnedGuestRam`]. When it is dropped and no
//! clone of its [`GuestRam`] is alive any more, the mappings are unmapped. If a
//! clone is still alive, the mapping is deliberately leaked instead: unmapping memory someone
//! can still reach would be unsound.
//!
//! ```
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
//! use vmkit_memory::{Backing, MemoryLayout};
//!
//! let layout = MemoryLayout::x86_pc(16 << 20).unwrap();
//! let mem = Backing::memfd().build(&layout).unwrap();
//! mem.ram().write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
//! let info = &mem.regions()[0];
//! assert_eq!(info.slot, 0);
//! assert!(info.file_offset.is_some()); // hand the fd to KVM or a vhost-user backend
//! assert_eq!(mem.ram().num_regions(), 1);
//! ```

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::layout::{MemoryLayout, PAGE_SIZE};
use crate::GuestRam;

/// Granule of vm-memory's dirty bitmap: 4 KiB, the same as a hypervisor's dirty log.
const DIRTY_PAGE_SIZE: std::num::NonZeroUsize =
    match std::num::NonZeroUsize::new(PAGE_SIZE as usize) {
        Some(v) => v,
        None => panic!("page size is not zero"),
    };

/// Size of the huge pages tried when huge pages are requested (x86 2 MiB pages).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    /// A region does not fit the host's address space.
    #[error("region of {size:#x} bytes does not fit the host address space")]
    TooLarge {
        /// Requested size.
        size: u64,
    },
    /// `mmap` refused a region.
    #[error("mmap of {size:#x} bytes failed: {source}")]
    Mmap {
        /// Requested size.
        size: u64,
        /// The OS error.
        source: io::Error,
    },
    /// `memfd_create` failed.
    #[error("memfd_create failed: {0}")]
    Memfd(io::Error),
    /// Opening, sizing or reading the metadata of a backing file failed.
    #[error("backing file {path:?}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Sizing a memfd failed.
    #[error("sizing memfd to {size:#x} bytes failed: {source}")]
    Truncate {
        /// Requested size.
        size: u64,
        /// The OS error.
        source: io::Error,
    },
    /// vm-memory refused the mapping.
    #[error("vm-memory rejected region: {0}")]
    Region(#[from] vm_memory::mmap::MmapRegionError),
    /// vm-memory refused the region collection.
    #[error("vm-memory rejected the region collection: {0}")]
    Collection(#[from] vm_memory::GuestRegionCollectionError),
    /// A region's end overflows the guest address space.
    #[error("region at {addr:#x} overflows the guest address space")]
    InvalidGuestRegion {
        /// Guest address of the region.
        addr: u64,
    },
}

/// Where the bytes of guest RAM live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingKind {
    /// Private anonymous memory: the fastest, not shareable with another process.
    Anonymous,
    /// One memfd per region, mapped shared: KVM and vhost-user backends can map it too.
    Memfd,
    /// One file holding all regions back to back (region `i` at the sum of the sizes of
    /// regions `0..i`), mapped shared. The file is created if missing and grown if short;
    /// existing contents are kept.
    File(PathBuf),
}

/// What kind of pages back a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePages {
    /// Normal pages; huge pages were not requested (or do not apply to file backing).
    No,
    /// hugetlb pages from the host's pool.
    HugeTlb,
    /// hugetlb pages were requested but refused; normal pages with `MADV_HUGEPAGE`.
    TransparentFallback,
}

/// How to provide the RAM regions of a layout; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    kind: BackingKind,
    huge_pages: bool,
    guard_pages: bool,
}

/// What the builder produced for one RAM region.
#[derive(Debug, Clone)]
pub struct RegionInfo {
    /// Hypervisor memory-slot number: the region's index (the crate-wide convention).
    pub slot: u32,
    /// First guest physical address.
    pub guest_addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the first byte (`userspace_addr` of a KVM memory slot).
    pub host_addr: u64,
    /// The shareable file and the offset of the region in it, for memfd and file backing.
    pub file_offset: Option<FileOffset>,
    /// Which pages back the region.
    pub huge_pages: HugePages,
    /// Whether inaccessible guard pages surround the region.
    pub guarded: bool,
}

/// Guest RAM together with the host mappings it lives in; see the [module docs](self).
///
/// Dereferences to [`GuestRam`].
#[derive(Debug)]
pub struct OwnedGuestRam {
    ram: GuestRam,
    regions: Vec<RegionInfo>,
    /// Held only for its `Drop`: unmaps (or leaks) the host mappings after `ram` is gone.
    _mappings: Vec<Mapping>,
}

impl OwnedGuestRam {
    /// The guest memory, to use through vm-memory's traits.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Per-region information, in slot order.
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }
}

impl std::ops::Deref for OwnedGuestRam {
    type Target = GuestRam;
    fn deref(&self) -> &GuestRam {
        &self.ram
    }
}

impl Drop for OwnedGuestRam {
    fn drop(&mut self) {
        // Release our references to the regions first so that `Mapping::drop` can tell
        // whether anybody else still holds one.
        self.ram = GuestMemoryMmap::default();
    }
}

/// A host address range reserved by us with `mmap`, unmapped on drop.
#[derive(Debug)]
struct Reservation {
    base: usize,
    len: usize,
}

impl Reservation {
    fn new(len: usize, prot: i32, flags: i32, fd: i32, offset: u64) -> io::Result<Self> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a non-fixed mapping: the kernel picks an address no other mapping uses, so
        // no existing memory is affected. The result is checked before use.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, off) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Reservation {
            base: p as usize,
            len,
        })
    }

    /// Maps `len` bytes at `offset_in_reservation` over part of this reservation.
    fn map_fixed(
        &self,
        offset_in_reservation: usize,
        len: usize,
        prot: i32,
        flags: i32,
        fd: i32,
        file_offset: u64,
    ) -> io::Result<*mut u8> {
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        let end = offset_in_reservation.checked_add(len).ok_or_else(einval)?;
        if end > self.len {
            return Err(einval());
        }
        let off = libc::off_t::try_from(file_offset).map_err(|_| einval())?;
        let addr = (self.base + offset_in_reservation) as *mut libc::c_void;
        // SAFETY: `addr..addr+len` lies inside the reservation this struct owns (checked
        // above), which nothing else uses: replacing those pages with MAP_FIXED cannot clobber
        // memory owned by anyone else.
        let p = unsafe { libc::mmap(addr, len, prot, flags | libc::MAP_FIXED, fd, off) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(p.cast())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: `base..base+len` was mapped by `Reservation::new` and is owned by us; the
        // owner of this reservation only drops it once no reference into it remains (see
        // `Mapping::drop`).
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.len);
        }
    }
}

/// One region's mapping: the vm-memory region that points into a reservation we own.
#[derive(Debug)]
struct Mapping {
    region: Option<Arc<MmapRegion<AtomicBitmap>>>,
    reservation: Option<Reservation>,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let last = self.region.take().map(Arc::into_inner);
        if let Some(None) = last {
            // Someone still holds the region (a clone of the GuestRam outlived its owner):
            // keep the memory mapped forever rather than pull it from under them.
            std::mem::forget(self.reservation.take());
        }
        // Otherwise the region is gone and `reservation` unmaps on drop.
    }
}

/// Where a region's pages come from, for the crate-internal mapper.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// Fresh zeroed anonymous memory.
    Anonymous,
    /// A shared mapping of a file (memfd or regular).
    Shared(FileOffset),
    /// A private copy-on-write mapping of a file (lazy snapshot restore).
    Private(FileOffset),
}

fn to_usize(size: u64) -> Result<usize, BackingError> {
    usize::try_from(size).map_err(|_| BackingError::TooLarge { size })
}

fn page_align_up(v: usize, align: usize) -> Option<usize> {
    Some(v.checked_add(align - 1)? & !(align - 1))
}

/// Maps one region of `size` bytes from `source`; returns the mapping, its host pointer and
/// the page kind used.
fn map_one(
    size: u64,
    source: &Source,
    guard: bool,
    huge: bool,
    hugetlb_fd: bool,
) -> Result<(Reservation, *mut u8, HugePages), BackingError> {
    let len = to_usize(size)?;
    let page = PAGE_SIZE as usize;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let (flags, fd, offset) = match source {
        Source::Anonymous => (
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        ),
        Source::Shared(fo) => (libc::MAP_SHARED, fo.file().as_raw_fd(), fo.start()),
        Source::Private(fo) => (
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            fo.file().as_raw_fd(),
            fo.start(),
        ),
    };
    let mmap_err = |source| BackingError::Mmap { size, source };
    let try_map_with = |flags: i32, align: usize| -> io::Result<(Reservation, *mut u8)> {
        if !guard {
            let r = Reservation::new(len, prot, flags, fd, offset)?;
            let p = r.base as *mut u8;
            return Ok((r, p));
        }
        // Reserve the region plus alignment slack plus one guard page on each side.
        let total = len
            .checked_add(align)
            .and_then(|v| v.checked_add(2 * page))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let r = Reservation::new(
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )?;
        let start = page_align_up(r.base + page, align)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let p = r.map_fixed(start - r.base, len, prot, flags, fd, offset)?;
        Ok((r, p))
    };
    // MAP_HUGETLB only applies to anonymous memory; a memfd is created with MFD_HUGETLB by
    // the caller, which then says so with `hugetlb_fd`.
    if huge && !hugetlb_fd && matches!(source, Source::Anonymous) && size % HUGE_PAGE_SIZE == 0 {
        // Without MAP_NORESERVE the kernel reserves the huge pages now, so an empty pool fails
        // here instead of raising SIGBUS at the first access.
        if let Ok((r, p)) = try_map_with(
            (flags & !libc::MAP_NORESERVE) | libc::MAP_HUGETLB,
            HUGE_PAGE_SIZE as usize,
        ) {
            return Ok((r, p, HugePages::HugeTlb));
        }
    }
    let align = if huge || hugetlb_fd {
        HUGE_PAGE_SIZE as usize
    } else {
        page
    };
    let (r, p) = try_map_with(flags, align).map_err(mmap_err)?;
    let kind = if hugetlb_fd {
        HugePages::HugeTlb
    } else if huge {
        // SAFETY: advisory call on a range we just mapped; it cannot affect other memory.
        unsafe { libc::madvise(p.cast(), len, libc::MADV_HUGEPAGE) };
        HugePages::TransparentFallback
    } else {
        HugePages::No
    };
    Ok((r, p, kind))
}

/// One region to map, for [`assemble`].
pub(crate) struct RegionRequest {
    pub(crate) guest_addr: GuestAddress,
    pub(crate) size: u64,
    pub(crate) source: Source,
    /// File offset to advertise in [`RegionInfo::file_offset`] (shareable memory only).
    pub(crate) advertise: Option<FileOffset>,
    pub(crate) huge: bool,
    /// Report hugetlb as used (memfd created with `MFD_HUGETLB`).
    pub(crate) hugetlb_fd: bool,
}

/// Maps every requested region and assembles the guest memory.
pub(crate) fn assemble(
    requests: Vec<RegionRequest>,
    guard: bool,
) -> Result<OwnedGuestRam, BackingError> {
    let mut mappings = Vec::with_capacity(requests.len());
    let mut regions = Vec::with_capacity(requests.len());
    let mut infos = Vec::with_capacity(requests.len());
    for (slot, req) in requests.into_iter().enumerate() {
        let (reservation, ptr, huge) =
            map_one(req.size, &req.source, guard, req.huge, req.hugetlb_fd)?;
        let len = to_usize(req.size)?;
        let mut builder =
            MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::new(len, DIRTY_PAGE_SIZE))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_hugetlbfs(huge == HugePages::HugeTlb);
        if let Some(fo) = &req.advertise {
            builder = builder.with_file_offset(fo.clone());
        }
        // SAFETY: `ptr..ptr+len` is a live read/write mapping owned by `reservation`, which is
        // stored next to the region in `Mapping` and only unmapped once the region's last
        // reference is gone.
        let region = unsafe { builder.with_raw_mmap_pointer(ptr) }.build()?;
        let region = Arc::new(region);
        mappings.push(Mapping {
            region: Some(Arc::clone(&region)),
            reservation: Some(reservation),
        });
        let guest = GuestRegionMmap::with_arc(region, req.guest_addr).ok_or(
            BackingError::InvalidGuestRegion {
                addr: req.guest_addr.0,
            },
        )?;
        regions.push(guest);
        infos.push(RegionInfo {
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            guest_addr: req.guest_addr,
            size: req.size,
            host_addr: ptr as u64,
            file_offset: req.advertise,
            huge_pages: huge,
            guarded: guard,
        });
    }
    let ram = GuestMemoryMmap::from_regions(regions)?;
    Ok(OwnedGuestRam {
        ram,
        regions: infos,
        _mappings: mappings,
    })
}

/// Creates a memfd of `size` bytes; with `huge`, tries `MFD_HUGETLB` first. Returns the file
/// and whether it is hugetlb-backed.
fn create_memfd(size: u64, huge: bool) -> Result<(File, bool), BackingError> {
    const NAME: &CStr = c"vmkit-guest-ram";
    let create = |flags: u32| -> io::Result<File> {
        // SAFETY: NAME is a valid NUL-terminated string; the call has no memory effects.
        let fd = unsafe { libc::memfd_create(NAME.as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    };
    if huge && size % HUGE_PAGE_SIZE == 0 {
        if let Ok(f) = create(libc::MFD_CLOEXEC | libc::MFD_HUGETLB) {
            // A hugetlb memfd accepts ftruncate even with an empty pool; probe a mapping to
            // know whether pages can really be had.
            if f.set_len(size).is_ok() && probe_hugetlb(&f) {
                return Ok((f, true));
            }
        }
    }
    let f = create(libc::MFD_CLOEXEC).map_err(BackingError::Memfd)?;
    f.set_len(size)
        .map_err(|source| BackingError::Truncate { size, source })?;
    Ok((f, false))
}

/// Can the first huge page of hugetlb file `f` be faulted in?
fn probe_hugetlb(f: &File) -> bool {
    let len = HUGE_PAGE_SIZE as usize;
    // MAP_POPULATE makes the kernel allocate the page now, so an empty pool fails here
    // instead of raising SIGBUS at the first guest access.
    match Reservation::new(
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED | libc::MAP_POPULATE,
        f.as_raw_fd(),
        0,
    ) {
        Ok(r) => {
            let mut vec = [0u8; 1];
            // SAFETY: mincore only writes one byte per page of the queried range into `vec`
            // (one page here, so one byte); it does not touch the mapping.
            let rc = unsafe {
                libc::mincore(
                    r.base as *mut libc::c_void,
                    PAGE_SIZE as usize,
                    vec.as_mut_ptr(),
                )
            };
            rc == 0 && vec[0] & 1 == 1
        }
        Err(_) => false,
    }
}

impl Backing {
    /// Private anonymous memory, guard pages on, no huge pages.
    pub fn anonymous() -> Self {
        Self::new(BackingKind::Anonymous)
    }

    /// Shareable memfd memory, guard pages on, no huge pages.
    pub fn memfd() -> Self {
        Self::new(BackingKind::Memfd)
    }

    /// Memory backed by the file at `path`, guard pages on.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self::new(BackingKind::File(path.into()))
    }

    /// Backing of the given kind, guard pages on, no huge pages.
    pub fn new(kind: BackingKind) -> Self {
        Backing {
            kind,
            huge_pages: false,
            guard_pages: true,
        }
    }

    /// Asks for 2 MiB huge pages (with the fallback described in the [module docs](self)).
    pub fn with_huge_pages(mut self, on: bool) -> Self {
        self.huge_pages = on;
        self
    }

    /// Turns guard pages around each region on or off (on by default).
    pub fn with_guard_pages(mut self, on: bool) -> Self {
        self.guard_pages = on;
        self
    }

    /// The backing kind.
    pub fn kind(&self) -> &BackingKind {
        &self.kind
    }

    /// Maps every RAM region of `layout` and returns the guest memory.
    pub fn build(&self, layout: &MemoryLayout) -> Result<OwnedGuestRam, BackingError> {
        let mut requests = Vec::with_capacity(layout.ram_regions().len());
        let file = match &self.kind {
            BackingKind::File(path) => {
                let err = |source| BackingError::File {
                    path: path.clone(),
                    source,
                };
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .map_err(err)?;
                let need = layout.ram_bytes();
                if f.metadata().map_err(err)?.len() < need {
                    f.set_len(need).map_err(err)?;
                }
                Some(Arc::new(f))
            }
            _ => None,
        };
        let mut file_pos = 0u64;
        for r in layout.ram_regions() {
            let (source, advertise, hugetlb_fd) = match &self.kind {
                BackingKind::Anonymous => (Source::Anonymous, None, false),
                BackingKind::Memfd => {
                    let (f, huge) = create_memfd(r.size, self.huge_pages)?;
                    let fo = FileOffset::new(f, 0);
                    (Source::Shared(fo.clone()), Some(fo), huge)
                }
                BackingKind::File(path) => {
                    // `file` was opened above for exactly this kind.
                    let f = file
                        .as_ref()
                        .map(Arc::clone)
                        .ok_or_else(|| BackingError::File {
                            path: path.clone(),
                            source: io::Error::from_raw_os_error(libc::EBADF),
                        })?;
                    let fo = FileOffset::from_arc(f, file_pos);
                    file_pos += r.size;
                    (Source::Shared(fo.clone()), Some(fo), false)
                }
            };
            let huge = self.huge_pages && !matches!(self.kind, BackingKind::File(_));
            requests.push(RegionRequest {
                guest_addr: r.guest_addr,
                size: r.size,
                source,
                advertise,
                huge,
                hugetlb_fd,
            });
        }
        assemble(requests, self.guard_pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    fn small_layout() -> MemoryLayout {
        MemoryLayout::new(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x10_0000), HUGE_PAGE_SIZE),
        ])
        .unwrap()
    }

    fn check_rw(mem: &OwnedGuestRam) {
        for r in mem.regions() {
            let last = GuestAddress(r.guest_addr.0 + r.size - 8);
            mem.ram().write_obj(0x1122_3344_5566_7788u64, last).unwrap();
            assert_eq!(
                mem.ram().read_obj::<u64>(last).unwrap(),
                0x1122_3344_5566_7788
            );
        }
        assert!(mem.ram().write_obj(1u8, GuestAddress(0x4000)).is_err());
    }

    #[test]
    fn anonymous_with_and_without_guards() {
        for guard in [true, false] {
            let mem = Backing::anonymous()
                .with_guard_pages(guard)
                .build(&small_layout())
                .unwrap();
            assert_eq!(mem.regions().len(), 2);
            assert!(mem.regions().iter().all(|r| r.file_offset.is_none()));
            assert!(mem.regions().iter().all(|r| r.guarded == guard));
            assert_eq!(mem.regions()[1].slot, 1);
            check_rw(&mem);
            assert_eq!(Backing::anonymous().kind(), &BackingKind::Anonymous);
        }
    }

    #[test]
    fn guard_pages_are_inaccessible() {
        let mem = Backing::anonymous().build(&small_layout()).unwrap();
        for r in mem.regions() {
            let before = (r.host_addr - PAGE_SIZE) as *mut libc::c_void;
            let after = (r.host_addr + r.size) as *mut libc::c_void;
            for addr in [before, after] {
                let mut vec = [0u8; 1];
                // SAFETY: mincore only queries residency; a mapped (even PROT_NONE) page
                // returns 0, an unmapped one ENOMEM.
                let rc = unsafe { libc::mincore(addr, PAGE_SIZE as usize, vec.as_mut_ptr()) };
                assert_eq!(rc, 0, "guard page should be mapped (PROT_NONE)");
            }
            // The kernel's view: /proc/self/maps lists the guard pages with ---p.
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            // (Neighbouring PROT_NONE areas may merge, so match only the inner boundary.)
            let below = format!("-{:x} ---p", r.host_addr);
            let above = format!("{:x}-", after as usize);
            assert!(maps.contains(&below), "no guard below {:x}", r.host_addr);
            assert!(
                maps.lines()
                    .any(|l| l.starts_with(&above) && l.contains(" ---p")),
                "no guard above {above}"
            );
        }
    }

    #[test]
    fn memfd_is_shared_through_the_fd() {
        let mem = Backing::memfd().build(&small_layout()).unwrap();
        mem.ram()
            .write_obj(0xabu8, GuestAddress(0x10_0010))
            .unwrap();
        let fo = mem.regions()[1].file_offset.as_ref().unwrap();
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 1];
        fo.file().read_exact_at(&mut b, fo.start() + 0x10).unwrap();
        assert_eq!(b[0], 0xab);
        // vm-memory sees the same fd.
        let region = mem.ram().find_region(GuestAddress(0x10_0000)).unwrap();
        assert!(region.file_offset().is_some());
        check_rw(&mem);
    }

    #[test]
    fn file_backing_places_regions_back_to_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let layout = small_layout();
        let mem = Backing::file(&path).build(&layout).unwrap();
        mem.ram()
            .write_obj(0x5au8, GuestAddress(0x10_0001))
            .unwrap();
        assert_eq!(
            mem.regions()[1].file_offset.as_ref().unwrap().start(),
            0x4000
        );
        drop(mem);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, layout.ram_bytes());
        assert_eq!(bytes[0x4001], 0x5a);
        // Contents survive a rebuild.
        let mem = Backing::file(&path).build(&layout).unwrap();
        assert_eq!(
            mem.ram().read_obj::<u8>(GuestAddress(0x10_0001)).unwrap(),
            0x5a
        );
    }

    #[test]
    fn file_backing_reports_bad_path() {
        let err = Backing::file("/nonexistent-dir/x")
            .build(&small_layout())
            .unwrap_err();
        assert!(matches!(err, BackingError::File { .. }), "{err}");
        assert!(err.to_string().contains("nonexistent"));
    }

    #[test]
    fn huge_pages_fall_back_or_succeed() {
        for backing in [Backing::anonymous(), Backing::memfd()] {
            let mem = backing
                .with_huge_pages(true)
                .build(&small_layout())
                .unwrap();
            let r = &mem.regions()[1];
            assert_ne!(r.huge_pages, HugePages::No);
            // The 16 KiB region cannot take 2 MiB pages.
            assert_ne!(mem.regions()[0].huge_pages, HugePages::HugeTlb);
            check_rw(&mem);
        }
    }

    #[test]
    fn clone_outliving_owner_keeps_memory_valid() {
        let mem = Backing::anonymous().build(&small_layout()).unwrap();
        let clone = mem.ram().clone();
        drop(mem);
        clone.write_obj(7u32, GuestAddress(0x100)).unwrap();
        assert_eq!(clone.read_obj::<u32>(GuestAddress(0x100)).unwrap(), 7);
        assert_eq!(clone.num_regions(), 2);
    }

    #[test]
    fn dropping_owner_unmaps() {
        let mem = Backing::anonymous().build(&small_layout()).unwrap();
        let addr = mem.regions()[0].host_addr;
        assert_eq!(mem.ram().iter().count(), 2);
        // Tests run in parallel and may map memory at the freed address right after the
        // drop, so what must be gone is this mapping's content, not the address.
        let marker = 0x6d61_726b_6572_0000_u64 ^ addr;
        mem.ram()
            .write_obj(marker, mem.regions()[0].guest_addr)
            .unwrap();
        drop(mem);
        let mut buf = 0u64;
        let local = libc::iovec {
            iov_base: (&mut buf as *mut u64).cast(),
            iov_len: 8,
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: 8,
        };
        // SAFETY: process_vm_readv on this process copies 8 bytes into `buf` (a live local)
        // and reports EFAULT instead of faulting when `addr` is no longer mapped.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        assert!(
            n != 8 || buf != marker,
            "the dropped region is still mapped"
        );
    }

    #[test]
    fn too_large_region_is_refused() {
        let layout = MemoryLayout::new(&[(GuestAddress(0), 1 << 47)]).unwrap();
        let err = Backing::memfd().build(&layout).unwrap_err();
        assert!(
            matches!(
                err,
                BackingError::Truncate { .. } | BackingError::Mmap { .. }
            ),
            "{err}"
        );
    }
}
