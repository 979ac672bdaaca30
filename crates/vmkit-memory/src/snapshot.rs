//! Guest memory snapshots: a versioned, self-describing, checksummed file format; a restore
//! that validates the whole file before touching guest memory; and a lazy restore by private
//! `mmap` of the file.
//!
//! # File format (version 1)
//!
//! All integers are little endian. Offsets are from the start of the file.
//!
//! ```text
//! 0       header (64 bytes)
//!           0  magic        "VMKITMEM"
//!           8  version      u32 = 1
//!          12  kind         u32: 1 = full, 2 = incremental
//!          16  page_size    u32 = 4096
//!          20  region_count u32 (at most MAX_REGIONS)
//!          24  id           u64, non-zero, names this snapshot
//!          32  base_id      u64, the snapshot an incremental one applies on (0 if full)
//!          40  meta_len     u64 = 64 + 64 * region_count
//!          48  file_len     u64, exact length of the file
//!          56  reserved     u32 = 0
//!          60  header_crc   u32, CRC-32 of bytes 0..meta_len with this field zero
//! 64      region table: region_count entries of 64 bytes, sorted by guest address
//!           0  guest_addr   u64        8  size        u64
//!          16  data_offset  u64       24  data_len    u64
//!          32  list_offset  u64       40  page_count  u64
//!          48  data_crc     u32       52  reserved    12 bytes of zero
//! ...     region data, each at a page-aligned offset
//! ```
//!
//! - **Full** snapshots store each region's bytes contiguously (`data_len == size`) at a
//!   page-aligned offset. Zero pages are not written: the writer seeks over them and the file
//!   has holes there (sparse), which read back as zeros. The same layout is what makes the
//!   file mappable for [`restore_mmap`]. `data_crc` is the CRC-32 of the region's bytes.
//! - **Incremental** snapshots store, per region, a sorted list of `page_count` page indices
//!   (`u64` each) at `list_offset`, and the pages themselves back to back at `data_offset`
//!   (`data_len == page_count * 4096`). `data_crc` covers the list bytes followed by the
//!   pages. Only pages dirtied since the base are present; apply them on memory holding the
//!   base (`base_id` names it).
//!
//! # Validation before restore
//!
//! [`restore_copy`] first proves the whole file sound: length, magic, version, kind, page
//! size, header checksum, every region's offsets inside the file and non-overlapping, page
//! lists sorted and in range, the region table equal to the target memory's regions, and every
//! region's checksum. Only then does it write guest memory; on any error guest memory is left
//! exactly as it was and the error says what was wrong. (The file must not change while a
//! restore runs: the data is read twice, once to check and once to copy.)
//!
//! # Lineage: incremental snapshots apply only on their base
//!
//! An incremental snapshot holds only the pages that changed since its base; applied on
//! memory holding anything else, it silently produces a state that never existed. The file
//! records `base_id`, but the memory does not know which snapshot it holds, so the caller has
//! to say it:
//!
//! * [`restore_incremental`] takes the id of the snapshot the memory currently holds and
//!   fails with [`SnapshotError::BaseMismatch`] (memory untouched) unless it is the file's
//!   `base_id`;
//! * [`Lineage`] remembers that id for you: it learns it from every snapshot it writes or
//!   restores, and refuses an incremental restore it cannot prove is on the right base. Use it
//!   unless you track ids yourself.
//!
//! [`restore_copy`] does not check the base (it predates the check and stays as it was): it
//! is the right call for full snapshots and for callers that established the lineage by
//! other means.
//!
//! ```
//! use vm_memory::{Bytes, GuestAddress};
//! use vmkit_memory::{snapshot, Backing, DirtyBitmap, MemoryLayout};
//! use vmkit_memory::snapshot::{Lineage, SnapshotError};
//!
//! let layout = MemoryLayout::x86_pc(4 << 20).unwrap();
//! let mem = Backing::anonymous().build(&layout).unwrap();
//! let mut lineage = Lineage::new();
//!
//! let base = snapshot::in_memory_file().unwrap();
//! let full = lineage.write_full(mem.ram(), &base).unwrap();
//! // The guest changes one page (a DirtyTracker would report it).
//! mem.ram().write_obj(7u32, GuestAddress(0x20_0000)).unwrap();
//! let mut dirty = DirtyBitmap::new(mem.ram());
//! dirty.mark(GuestAddress(0x20_0000), 4).unwrap();
//! let incr = snapshot::in_memory_file().unwrap();
//! lineage.write_incremental(mem.ram(), &dirty, &incr).unwrap();
//!
//! // The memory holds `incr` now; applying `incr` again is on the wrong base.
//! assert!(matches!(
//!     lineage.restore(mem.ram(), &incr),
//!     Err(SnapshotError::BaseMismatch { expected, .. }) if expected == full.id
//! ));
//! lineage.restore(mem.ram(), &base).unwrap(); // back to the full one
//! lineage.restore(mem.ram(), &incr).unwrap(); // now on its base
//! ```
//!
//! # Lazy restore
//!
//! [`restore_mmap`] builds *new* guest memory whose regions are private copy-on-write
//! mappings of the file, as Firecracker restores: pages are read from the page cache when the
//! guest first touches them and copied only when written. Its cost before the guest can run is
//! independent of the memory size. It validates the header and the region table; checking the
//! data checksums would read every byte and is therefore optional
//! ([`MmapRestoreOptions::verify_checksums`]). Such memory is private to this process: do not
//! hand the snapshot file to a vhost-user backend as if it were the guest's RAM.
//!
//! ```
//! use vm_memory::{Bytes, GuestAddress};
//! use vmkit_memory::{snapshot, Backing, MemoryLayout};
//!
//! let layout = MemoryLayout::x86_pc(4 << 20).unwrap();
//! let mem = Backing::anonymous().build(&layout).unwrap();
//! mem.ram().write_obj(0x1234_5678u32, GuestAddress(0x20_0000)).unwrap();
//!
//! let file = tempfile::tempfile().unwrap();
//! snapshot::write_full(mem.ram(), &file).unwrap();
//!
//! mem.ram().write_obj(0u32, GuestAddress(0x20_0000)).unwrap();
//! snapshot::restore_copy(mem.ram(), &file).unwrap();
//! assert_eq!(mem.ram().read_obj::<u32>(GuestAddress(0x20_0000)).unwrap(), 0x1234_5678);
//!
//! let lazy = snapshot::restore_mmap(&file, &Default::default()).unwrap();
//! assert_eq!(lazy.ram().read_obj::<u32>(GuestAddress(0x20_0000)).unwrap(), 0x1234_5678);
//! ```

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile, VolatileSlice,
};

use crate::backing::{assemble, BackingError, OwnedGuestRam, RegionRequest, Source};
use crate::dirty::{DirtyBitmap, DirtyLogError};
use crate::layout::PAGE_SIZE;
use crate::GuestRam;

/// First eight bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"VMKITMEM";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Upper bound on the number of regions a file may declare (bounds the table read).
pub const MAX_REGIONS: u32 = 4096;
const HEADER_LEN: u64 = 64;
const ENTRY_LEN: u64 = 64;
/// Size of the bounce buffer used to check, copy and write data.
const CHUNK: usize = 1 << 20;

/// Errors of writing, checking and restoring snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An I/O operation on the snapshot file failed.
    #[error("snapshot file {op} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The file is shorter than its header or table says.
    #[error("snapshot file is truncated: needs {need} bytes, has {got}")]
    Truncated {
        /// Bytes needed.
        need: u64,
        /// Bytes present.
        got: u64,
    },
    /// The file does not start with [`MAGIC`].
    #[error("not a vmkit memory snapshot (magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// The file's format version is not [`FORMAT_VERSION`].
    #[error("unsupported snapshot format version {0} (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    /// The kind field is neither full nor incremental.
    #[error("unknown snapshot kind {0}")]
    UnknownKind(u32),
    /// The page size is not 4096.
    #[error("unsupported snapshot page size {0}")]
    PageSize(u32),
    /// More regions than [`MAX_REGIONS`], or none.
    #[error("snapshot declares {0} regions (1..={MAX_REGIONS} allowed)")]
    RegionCount(u32),
    /// A header field that has one valid value for this header has another.
    #[error("snapshot header field {field} is {got:#x}, expected {expected:#x}")]
    HeaderField {
        /// The field.
        field: &'static str,
        /// The value found.
        got: u64,
        /// The value required.
        expected: u64,
    },
    /// The header checksum does not match.
    #[error("snapshot header checksum {stored:#010x} != computed {computed:#010x}")]
    HeaderChecksum {
        /// Checksum in the file.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
    /// A region table entry is inconsistent.
    #[error("snapshot region {index} is invalid: {reason}")]
    BadRegion {
        /// Index in the region table.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A region's data does not match its checksum.
    #[error("snapshot region {index} checksum {stored:#010x} != computed {computed:#010x}")]
    RegionChecksum {
        /// Index in the region table.
        index: usize,
        /// Checksum in the file.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
    /// The snapshot's regions are not the target memory's regions.
    #[error("snapshot regions {snapshot:x?} do not match guest memory regions {memory:x?} (hex address, size)")]
    LayoutMismatch {
        /// (guest address, size) in the snapshot.
        snapshot: Vec<(u64, u64)>,
        /// (guest address, size) of the memory.
        memory: Vec<(u64, u64)>,
    },
    /// An operation needs a full snapshot.
    #[error("operation needs a full snapshot, the file is incremental (base {base_id:#x})")]
    NotFull {
        /// The base the incremental snapshot applies on.
        base_id: u64,
    },
    /// An incremental snapshot was to be applied on memory that does not hold its base.
    #[error("incremental snapshot applies on base {expected:#x}, but the memory holds {found:#x} (0: unknown)")]
    BaseMismatch {
        /// The snapshot's `base_id`: what the memory must hold.
        expected: u64,
        /// What the caller said the memory holds (0 for "unknown").
        found: u64,
    },
    /// The dirty bitmap does not fit the memory.
    #[error(transparent)]
    Dirty(#[from] DirtyLogError),
    /// Mapping the snapshot failed.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// Guest memory could not be accessed.
    #[error("guest memory access failed: {0}")]
    Memory(String),
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { op, source }
}

fn mem_err(e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Memory(e.to_string())
}

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// Every byte of every region.
    Full,
    /// Only pages dirtied since a base snapshot.
    Incremental,
}

/// One entry of the region table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionEntry {
    /// Guest physical address of the region.
    pub guest_addr: u64,
    /// Region size in bytes.
    pub size: u64,
    /// File offset of the region's data (page aligned).
    pub data_offset: u64,
    /// Bytes of data in the file.
    pub data_len: u64,
    /// File offset of the page list (incremental only; 0 for full).
    pub list_offset: u64,
    /// Pages stored (every page for full snapshots).
    pub page_count: u64,
    /// CRC-32 of the region's data (incremental: of the list bytes then the pages).
    pub data_crc: u32,
}

/// The validated header and region table of a snapshot file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Full or incremental.
    pub kind: SnapshotKind,
    /// Non-zero identifier of this snapshot.
    pub id: u64,
    /// For incremental snapshots, the id of the snapshot they apply on; 0 for full ones.
    pub base_id: u64,
    /// Exact file length.
    pub file_len: u64,
    /// Regions, sorted by guest address.
    pub regions: Vec<RegionEntry>,
}

impl SnapshotInfo {
    /// (guest address, size) of every region.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect()
    }
}

/// What a restore did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RestoreStats {
    /// Pages written into guest memory.
    pub pages: u64,
}

/// Options of [`restore_mmap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmapRestoreOptions {
    /// Surround regions with guard pages (default on).
    pub guard_pages: bool,
    /// Read the whole file once to check every region checksum before mapping (default off:
    /// it makes the restore cost proportional to the size again).
    pub verify_checksums: bool,
}

impl Default for MmapRestoreOptions {
    fn default() -> Self {
        MmapRestoreOptions {
            guard_pages: true,
            verify_checksums: false,
        }
    }
}

fn new_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // splitmix64 over time, pid and a counter: distinct ids without a random source.
    let mut z = nanos
        ^ (u64::from(std::process::id()) << 40)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

fn page_align(v: u64) -> Option<u64> {
    Some(v.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1))
}

fn is_zero(b: &[u8]) -> bool {
    // OR-folding fixed-size chunks vectorises well; stop at the first non-zero chunk.
    b.chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

fn encode(
    kind: SnapshotKind,
    id: u64,
    base_id: u64,
    file_len: u64,
    regions: &[RegionEntry],
) -> Vec<u8> {
    let meta_len = HEADER_LEN + ENTRY_LEN * regions.len() as u64;
    let mut b = Vec::with_capacity(meta_len as usize);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    let k: u32 = match kind {
        SnapshotKind::Full => 1,
        SnapshotKind::Incremental => 2,
    };
    b.extend_from_slice(&k.to_le_bytes());
    b.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&base_id.to_le_bytes());
    b.extend_from_slice(&meta_len.to_le_bytes());
    b.extend_from_slice(&file_len.to_le_bytes());
    b.extend_from_slice(&[0; 8]); // reserved + crc placeholder
    for r in regions {
        for v in [
            r.guest_addr,
            r.size,
            r.data_offset,
            r.data_len,
            r.list_offset,
            r.page_count,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&r.data_crc.to_le_bytes());
        b.extend_from_slice(&[0; 12]);
    }
    let crc = crc32fast::hash(&b);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Copies `len` bytes at `offset` of a guest region into `buf` (no dirty marking).
fn read_guest(
    region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), SnapshotError> {
    let s = region.as_volatile_slice().map_err(mem_err)?;
    let s = s.subslice(offset as usize, buf.len()).map_err(mem_err)?;
    s.copy_to(buf);
    Ok(())
}

/// Writes a full snapshot of `mem` to `file` (truncating it); zero pages become holes.
/// `file` must be open for writing, and not in append mode (writes are positional).
///
/// The guest should be paused: pages changing during the write give a snapshot whose
/// checksums still match what was written, but which mixes old and new contents.
pub fn write_full(mem: &GuestRam, file: &File) -> Result<SnapshotInfo, SnapshotError> {
    let n = mem.num_regions() as u64;
    let meta_len = HEADER_LEN + ENTRY_LEN * n;
    let mut offset = page_align(meta_len).unwrap_or(meta_len);
    file.set_len(0).map_err(io_err("truncate"))?;
    let mut buf = vec![0u8; CHUNK];
    let mut entries = Vec::with_capacity(n as usize);
    for region in mem.iter() {
        let size = region.len();
        let mut crc = crc32fast::Hasher::new();
        let mut pos = 0u64;
        while pos < size {
            let len = (size - pos).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..len];
            read_guest(region, pos, chunk)?;
            crc.update(chunk);
            // Write runs of non-zero pages; leave zero pages as holes.
            let mut run_start: Option<usize> = None;
            for (i, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
                let at = i * PAGE_SIZE as usize;
                match (is_zero(page), run_start) {
                    (false, None) => run_start = Some(at),
                    (true, Some(s)) => {
                        file.write_all_at(&chunk[s..at], offset + pos + s as u64)
                            .map_err(io_err("write"))?;
                        run_start = None;
                    }
                    _ => {}
                }
            }
            if let Some(s) = run_start {
                file.write_all_at(&chunk[s..], offset + pos + s as u64)
                    .map_err(io_err("write"))?;
            }
            pos += len as u64;
        }
        entries.push(RegionEntry {
            guest_addr: region.start_addr().0,
            size,
            data_offset: offset,
            data_len: size,
            list_offset: 0,
            page_count: size / PAGE_SIZE,
            data_crc: crc.finalize(),
        });
        offset += size;
    }
    file.set_len(offset).map_err(io_err("set_len"))?;
    let id = new_id();
    let meta = encode(SnapshotKind::Full, id, 0, offset, &entries);
    file.write_all_at(&meta, 0)
        .map_err(io_err("write header"))?;
    Ok(SnapshotInfo {
        kind: SnapshotKind::Full,
        id,
        base_id: 0,
        file_len: offset,
        regions: entries,
    })
}

/// Writes an incremental snapshot holding the pages of `mem` marked in `dirty`, to apply on
/// the snapshot `base_id` (typically the [`SnapshotInfo::id`] of the previous snapshot, and
/// `dirty` what a [`DirtyTracker::take`](crate::DirtyTracker::take) returned since it).
pub fn write_incremental(
    mem: &GuestRam,
    dirty: &DirtyBitmap,
    base_id: u64,
    file: &File,
) -> Result<SnapshotInfo, SnapshotError> {
    dirty.check_shape(mem)?;
    let n = mem.num_regions();
    let mut lists: Vec<Vec<u64>> = vec![Vec::new(); n];
    for (r, page) in dirty.iter_pages() {
        if let Some(l) = lists.get_mut(r) {
            l.push(page);
        }
    }
    let meta_len = HEADER_LEN + ENTRY_LEN * n as u64;
    let mut offset = meta_len;
    file.set_len(0).map_err(io_err("truncate"))?;
    let mut entries = Vec::with_capacity(n);
    let mut page_buf = vec![0u8; PAGE_SIZE as usize];
    for (region, list) in mem.iter().zip(&lists) {
        let list_bytes: Vec<u8> = list.iter().flat_map(|p| p.to_le_bytes()).collect();
        let list_offset = offset;
        file.write_all_at(&list_bytes, list_offset)
            .map_err(io_err("write page list"))?;
        let data_offset = page_align(list_offset + list_bytes.len() as u64).unwrap_or(u64::MAX);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&list_bytes);
        for (i, &page) in list.iter().enumerate() {
            read_guest(region, page * PAGE_SIZE, &mut page_buf)?;
            crc.update(&page_buf);
            file.write_all_at(&page_buf, data_offset + i as u64 * PAGE_SIZE)
                .map_err(io_err("write"))?;
        }
        let data_len = list.len() as u64 * PAGE_SIZE;
        entries.push(RegionEntry {
            guest_addr: region.start_addr().0,
            size: region.len(),
            data_offset,
            data_len,
            list_offset,
            page_count: list.len() as u64,
            data_crc: crc.finalize(),
        });
        offset = data_offset + data_len;
    }
    file.set_len(offset).map_err(io_err("set_len"))?;
    let id = new_id();
    let meta = encode(SnapshotKind::Incremental, id, base_id, offset, &entries);
    file.write_all_at(&meta, 0)
        .map_err(io_err("write header"))?;
    Ok(SnapshotInfo {
        kind: SnapshotKind::Incremental,
        id,
        base_id,
        file_len: offset,
        regions: entries,
    })
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// Reads and validates the header and region table of a snapshot file: everything except
/// the data checksums. Never touches guest memory.
pub fn read_info(file: &File) -> Result<SnapshotInfo, SnapshotError> {
    let actual = file.metadata().map_err(io_err("stat"))?.len();
    if actual < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            need: HEADER_LEN,
            got: actual,
        });
    }
    let mut h = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut h, 0)
        .map_err(io_err("read header"))?;
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&h[..8]);
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic(magic));
    }
    let version = le_u32(&h, 8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::UnsupportedVersion(version));
    }
    let kind = match le_u32(&h, 12) {
        1 => SnapshotKind::Full,
        2 => SnapshotKind::Incremental,
        k => return Err(SnapshotError::UnknownKind(k)),
    };
    let page_size = le_u32(&h, 16);
    if u64::from(page_size) != PAGE_SIZE {
        return Err(SnapshotError::PageSize(page_size));
    }
    let count = le_u32(&h, 20);
    if count == 0 || count > MAX_REGIONS {
        return Err(SnapshotError::RegionCount(count));
    }
    let meta_len = HEADER_LEN + ENTRY_LEN * u64::from(count);
    let field = |field, got: u64, expected: u64| {
        if got == expected {
            Ok(())
        } else {
            Err(SnapshotError::HeaderField {
                field,
                got,
                expected,
            })
        }
    };
    field("meta_len", le_u64(&h, 40), meta_len)?;
    if actual < meta_len {
        return Err(SnapshotError::Truncated {
            need: meta_len,
            got: actual,
        });
    }
    // meta_len <= 64 + 64 * MAX_REGIONS, a small bounded allocation.
    let mut meta = vec![0u8; meta_len as usize];
    file.read_exact_at(&mut meta, 0)
        .map_err(io_err("read region table"))?;
    let stored = le_u32(&meta, 60);
    meta[60..64].fill(0);
    let computed = crc32fast::hash(&meta);
    if stored != computed {
        return Err(SnapshotError::HeaderChecksum { stored, computed });
    }
    field("reserved", u64::from(le_u32(&meta, 56)), 0)?;
    let id = le_u64(&meta, 24);
    let base_id = le_u64(&meta, 32);
    if id == 0 {
        return Err(SnapshotError::HeaderField {
            field: "id",
            got: 0,
            expected: 1,
        });
    }
    if kind == SnapshotKind::Full {
        field("base_id", base_id, 0)?;
    }
    let file_len = le_u64(&meta, 48);
    if actual < file_len {
        return Err(SnapshotError::Truncated {
            need: file_len,
            got: actual,
        });
    }
    field("file_len", actual, file_len)?;

    let mut regions = Vec::with_capacity(count as usize);
    // File extents in use, to check that none overlap: (start, end, region).
    let mut extents: Vec<(u64, u64, usize)> = Vec::new();
    for index in 0..count as usize {
        let e = &meta[(HEADER_LEN as usize + index * ENTRY_LEN as usize)..][..ENTRY_LEN as usize];
        let bad = |reason| SnapshotError::BadRegion { index, reason };
        let r = RegionEntry {
            guest_addr: le_u64(e, 0),
            size: le_u64(e, 8),
            data_offset: le_u64(e, 16),
            data_len: le_u64(e, 24),
            list_offset: le_u64(e, 32),
            page_count: le_u64(e, 40),
            data_crc: le_u32(e, 48),
        };
        if e[52..64].iter().any(|&b| b != 0) {
            return Err(bad("reserved bytes are not zero"));
        }
        if r.size == 0 || r.size % PAGE_SIZE != 0 || r.guest_addr % PAGE_SIZE != 0 {
            return Err(bad(
                "guest address or size is not a non-zero multiple of the page size",
            ));
        }
        r.guest_addr
            .checked_add(r.size)
            .ok_or(bad("guest range overflows"))?;
        // Earlier entries passed the overflow check, so their end is representable.
        if let Some(prev) = regions.last().map(|p: &RegionEntry| p.guest_addr + p.size) {
            if r.guest_addr < prev {
                return Err(bad("guest ranges are unsorted or overlap"));
            }
        }
        if r.data_offset % PAGE_SIZE != 0 || r.data_offset < meta_len {
            return Err(bad("data offset is unaligned or inside the header"));
        }
        let data_end = r
            .data_offset
            .checked_add(r.data_len)
            .ok_or(bad("data range overflows"))?;
        if data_end > file_len {
            return Err(bad("data extends past the end of the file"));
        }
        match kind {
            SnapshotKind::Full => {
                if r.data_len != r.size || r.page_count != r.size / PAGE_SIZE || r.list_offset != 0
                {
                    return Err(bad("full region must store every page"));
                }
            }
            SnapshotKind::Incremental => {
                if r.page_count > r.size / PAGE_SIZE
                    || r.page_count.checked_mul(PAGE_SIZE) != Some(r.data_len)
                {
                    return Err(bad("page count does not match region size or data length"));
                }
                let list_end = r
                    .page_count
                    .checked_mul(8)
                    .and_then(|l| r.list_offset.checked_add(l))
                    .ok_or(bad("page list overflows"))?;
                if r.list_offset < meta_len || list_end > file_len {
                    return Err(bad("page list lies outside the file body"));
                }
                extents.push((r.list_offset, list_end, index));
            }
        }
        extents.push((r.data_offset, data_end, index));
        regions.push(r);
    }
    extents.retain(|e| e.1 > e.0);
    extents.sort_unstable();
    for w in extents.windows(2) {
        if let [a, b] = w {
            if a.1 > b.0 {
                return Err(SnapshotError::BadRegion {
                    index: b.2,
                    reason: "file extents of regions overlap",
                });
            }
        }
    }
    Ok(SnapshotInfo {
        kind,
        id,
        base_id,
        file_len,
        regions,
    })
}

/// CRC-32 of `len` bytes of `file` at `offset`, read through `buf`.
fn crc_range(
    file: &File,
    offset: u64,
    len: u64,
    buf: &mut [u8],
    crc: &mut crc32fast::Hasher,
) -> Result<(), SnapshotError> {
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        let chunk = &mut buf[..n];
        file.read_exact_at(chunk, offset + pos)
            .map_err(io_err("read data"))?;
        crc.update(chunk);
        pos += n as u64;
    }
    Ok(())
}

/// Reads an incremental region's page list, checking it is sorted and in range.
fn read_page_list(
    file: &File,
    index: usize,
    r: &RegionEntry,
) -> Result<(Vec<u8>, Vec<u64>), SnapshotError> {
    // Bounded by the file length, which `read_info` checked.
    let mut bytes = vec![0u8; (r.page_count * 8) as usize];
    file.read_exact_at(&mut bytes, r.list_offset)
        .map_err(io_err("read page list"))?;
    let pages: Vec<u64> = bytes.chunks_exact(8).map(|c| le_u64(c, 0)).collect();
    let max = r.size / PAGE_SIZE;
    let sorted = pages.windows(2).all(|w| w[0] < w[1]);
    if !sorted || pages.last().is_some_and(|&p| p >= max) {
        return Err(SnapshotError::BadRegion {
            index,
            reason: "page list is unsorted or names a page outside the region",
        });
    }
    Ok((bytes, pages))
}

/// Checks every region's data checksum (and incremental page lists) of a file whose header
/// `read_info` accepted. Never touches guest memory.
pub fn verify(file: &File, info: &SnapshotInfo) -> Result<(), SnapshotError> {
    // `info`'s fields are public: one not from `read_info` (or from another file) must not
    // size an allocation or overflow an offset. Bound every range by the real file length.
    let actual = file.metadata().map_err(io_err("stat"))?.len();
    let within = |offset: u64, len: Option<u64>| {
        len.and_then(|l| offset.checked_add(l))
            .is_some_and(|end| end <= actual)
    };
    let mut buf = vec![0u8; CHUNK];
    for (index, r) in info.regions.iter().enumerate() {
        let list = if info.kind == SnapshotKind::Incremental {
            r.page_count.checked_mul(8)
        } else {
            Some(0)
        };
        if !within(r.data_offset, Some(r.data_len)) || !within(r.list_offset, list) {
            return Err(SnapshotError::BadRegion {
                index,
                reason: "data or page list extends past the end of the file",
            });
        }
        let mut crc = crc32fast::Hasher::new();
        if info.kind == SnapshotKind::Incremental {
            let (bytes, _) = read_page_list(file, index, r)?;
            crc.update(&bytes);
        }
        crc_range(file, r.data_offset, r.data_len, &mut buf, &mut crc)?;
        let computed = crc.finalize();
        if computed != r.data_crc {
            return Err(SnapshotError::RegionChecksum {
                index,
                stored: r.data_crc,
                computed,
            });
        }
    }
    Ok(())
}

fn memory_layout(mem: &GuestRam) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// Reads `len` bytes at `offset` of `file` straight into guest region memory at `dst`.
fn read_into(
    mut file: &File,
    offset: u64,
    dst: &mut VolatileSlice<'_, impl vm_memory::bitmap::BitmapSlice>,
) -> Result<(), SnapshotError> {
    file.seek(SeekFrom::Start(offset)).map_err(io_err("seek"))?;
    file.read_exact_volatile(dst)
        .map_err(|e| SnapshotError::Memory(e.to_string()))
}

/// Restores `mem` from a full or incremental snapshot by copying, after validating the whole
/// file (see the [module docs](self)). On error, guest memory is unchanged.
///
/// The data is read with `read(2)` after seeking, so the file's position moves; do not share
/// the file description with a concurrent reader.
///
/// Restored pages are marked dirty in vm-memory's bitmap (they did change); clear a
/// [`DirtyTracker`](crate::DirtyTracker) afterwards if the restored state is its new base.
/// An incremental snapshot must be applied on memory holding its base, which this function
/// does **not** check: use [`restore_incremental`] or [`Lineage`] for incremental snapshots.
pub fn restore_copy(mem: &GuestRam, file: &File) -> Result<RestoreStats, SnapshotError> {
    restore_checked(mem, file, |_| Ok(())).map(|(stats, _)| stats)
}

/// The restore behind [`restore_copy`] and [`restore_incremental`]: `check` sees the validated
/// header before anything else is read or written. Returns the stats and the restored id.
fn restore_checked(
    mem: &GuestRam,
    file: &File,
    check: impl FnOnce(&SnapshotInfo) -> Result<(), SnapshotError>,
) -> Result<(RestoreStats, u64), SnapshotError> {
    let info = read_info(file)?;
    check(&info)?;
    let memory = memory_layout(mem);
    if info.layout() != memory {
        return Err(SnapshotError::LayoutMismatch {
            snapshot: info.layout(),
            memory,
        });
    }
    verify(file, &info)?;
    // Everything is proven sound: now, and only now, write guest memory.
    let mut stats = RestoreStats::default();
    for ((index, r), region) in info.regions.iter().enumerate().zip(mem.iter()) {
        let whole = region.as_volatile_slice().map_err(mem_err)?;
        match info.kind {
            SnapshotKind::Full => {
                let mut dst = whole.subslice(0, r.size as usize).map_err(mem_err)?;
                read_into(file, r.data_offset, &mut dst)?;
                stats.pages += r.page_count;
            }
            SnapshotKind::Incremental => {
                let (_, pages) = read_page_list(file, index, r)?;
                let mut i = 0usize;
                while let Some(&first) = pages.get(i) {
                    let mut n = 1usize;
                    while pages.get(i + n) == Some(&(first + n as u64)) {
                        n += 1;
                    }
                    let mut dst = whole
                        .subslice((first * PAGE_SIZE) as usize, n * PAGE_SIZE as usize)
                        .map_err(mem_err)?;
                    read_into(file, r.data_offset + i as u64 * PAGE_SIZE, &mut dst)?;
                    i += n;
                }
                stats.pages += r.page_count;
            }
        }
    }
    Ok((stats, info.id))
}

/// Restores `mem` from `file` like [`restore_copy`], but first proves the lineage: an
/// incremental snapshot is applied only if `held_id` (the id of the snapshot `mem` holds now)
/// is its `base_id`; otherwise [`SnapshotError::BaseMismatch`] and memory is untouched. A full
/// snapshot needs no base and is restored whatever `held_id` is. Pass 0 when the memory's
/// state is unknown: every incremental snapshot is then refused.
pub fn restore_incremental(
    mem: &GuestRam,
    file: &File,
    held_id: u64,
) -> Result<RestoreStats, SnapshotError> {
    restore_checked(mem, file, |info| check_base(info, held_id)).map(|(stats, _)| stats)
}

fn check_base(info: &SnapshotInfo, held_id: u64) -> Result<(), SnapshotError> {
    match info.kind {
        SnapshotKind::Full => Ok(()),
        SnapshotKind::Incremental if held_id != 0 && held_id == info.base_id => Ok(()),
        SnapshotKind::Incremental => Err(SnapshotError::BaseMismatch {
            expected: info.base_id,
            found: held_id,
        }),
    }
}

/// Which snapshot guest memory holds, so incremental snapshots are written against and
/// restored onto the right base (see [Lineage](self#lineage-incremental-snapshots-apply-only-on-their-base)).
///
/// It starts "unknown": the first restore must be a full snapshot (or call
/// [`Lineage::assume`]). Writing or restoring through it updates the id; a failed restore
/// leaves memory and the id unchanged. Changing memory behind its back (a [`FastReset`](crate::FastReset)
/// to another baseline, a restore with [`restore_copy`]) makes the id stale: call
/// [`Lineage::assume`] or [`Lineage::forget`] then.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lineage {
    held: u64,
}

impl Lineage {
    /// Memory in an unknown state.
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of the snapshot the memory holds (0: unknown).
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Declares that the memory holds snapshot `id` (0: unknown).
    pub fn assume(&mut self, id: u64) {
        self.held = id;
    }

    /// Declares the memory's state unknown (e.g. after the guest ran without dirty tracking).
    pub fn forget(&mut self) {
        self.held = 0;
    }

    /// [`write_full`], then the memory holds the new snapshot.
    pub fn write_full(
        &mut self,
        mem: &GuestRam,
        file: &File,
    ) -> Result<SnapshotInfo, SnapshotError> {
        let info = write_full(mem, file)?;
        self.held = info.id;
        Ok(info)
    }

    /// [`write_incremental`] on the snapshot the memory held, then the memory holds the new
    /// one. `dirty` must cover every page changed since that snapshot. Refused with
    /// [`SnapshotError::BaseMismatch`] when the held snapshot is unknown.
    pub fn write_incremental(
        &mut self,
        mem: &GuestRam,
        dirty: &DirtyBitmap,
        file: &File,
    ) -> Result<SnapshotInfo, SnapshotError> {
        if self.held == 0 {
            return Err(SnapshotError::BaseMismatch {
                expected: 0,
                found: 0,
            });
        }
        let info = write_incremental(mem, dirty, self.held, file)?;
        self.held = info.id;
        Ok(info)
    }

    /// [`restore_incremental`] with the held id; on success the memory holds `file`'s snapshot.
    pub fn restore(&mut self, mem: &GuestRam, file: &File) -> Result<RestoreStats, SnapshotError> {
        let (stats, id) = restore_checked(mem, file, |info| check_base(info, self.held))?;
        self.held = id;
        Ok(stats)
    }
}

/// Creates an anonymous in-memory file (a memfd) to hold a snapshot without touching a
/// filesystem: fuzzing loops keep their baseline in RAM this way, and tests use it.
pub fn in_memory_file() -> io::Result<File> {
    // SAFETY: the name is a valid NUL-terminated string; the call has no memory effects.
    let fd = unsafe { libc::memfd_create(c"vmkit-snapshot".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) })
}

/// Builds new guest memory lazily backed by a full snapshot file: each region is a private,
/// copy-on-write mapping of its data in the file (see the [module docs](self)).
pub fn restore_mmap(
    file: &File,
    options: &MmapRestoreOptions,
) -> Result<OwnedGuestRam, SnapshotError> {
    let info = read_info(file)?;
    if info.kind != SnapshotKind::Full {
        return Err(SnapshotError::NotFull {
            base_id: info.base_id,
        });
    }
    if options.verify_checksums {
        verify(file, &info)?;
    }
    let shared = Arc::new(file.try_clone().map_err(io_err("dup"))?);
    let requests = info
        .regions
        .iter()
        .map(|r| RegionRequest {
            guest_addr: GuestAddress(r.guest_addr),
            size: r.size,
            source: Source::Private(FileOffset::from_arc(Arc::clone(&shared), r.data_offset)),
            advertise: None,
            huge: false,
            hugetlb_fd: false,
        })
        .collect();
    Ok(assemble(requests, options.guard_pages)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backing, DirtyTracker, MemoryLayout, OwnedGuestRam};
    use proptest::prelude::*;
    use vm_memory::Bytes;

    fn layout() -> MemoryLayout {
        MemoryLayout::new(&[
            (GuestAddress(0), 0x20_000),
            (GuestAddress(0x100_000), 0x8_000),
        ])
        .unwrap()
    }

    fn mem() -> OwnedGuestRam {
        Backing::anonymous().build(&layout()).unwrap()
    }

    fn contents(m: &GuestRam) -> Vec<u8> {
        let mut out = Vec::new();
        for r in m.iter() {
            let mut v = vec![0u8; r.len() as usize];
            m.read_slice(&mut v, r.start_addr()).unwrap();
            out.extend(v);
        }
        out
    }

    fn fill(m: &GuestRam) {
        // Non-zero pages separated by zero pages, in both regions.
        for (i, addr) in [0x0u64, 0x2000, 0x3000, 0x1f_000, 0x100_000, 0x107_ff0]
            .into_iter()
            .enumerate()
        {
            m.write_slice(&[i as u8 + 1; 16], GuestAddress(addr))
                .unwrap();
        }
    }

    fn file_bytes(f: &File) -> Vec<u8> {
        let mut v = vec![0u8; f.metadata().unwrap().len() as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    fn file_from(bytes: &[u8]) -> File {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f
    }

    #[test]
    fn verify_bounds_a_hand_made_info_by_the_file() {
        let m = mem();
        let f = tempfile::tempfile().unwrap();
        let info = write_full(m.ram(), &f).unwrap();
        verify(&f, &info).unwrap();
        let bad = |info: &SnapshotInfo, region: usize| {
            assert!(matches!(
                verify(&f, info),
                Err(SnapshotError::BadRegion { index, .. }) if index == region
            ));
        };
        // Used to overflow `offset + pos` while checksumming.
        let mut i = info.clone();
        i.regions[1].data_offset = u64::MAX - 0xfff;
        bad(&i, 1);
        i.regions[1] = info.regions[1];
        i.regions[1].data_len = info.file_len;
        bad(&i, 1);
        // Used to overflow `page_count * 8`, or allocate page_count * 8 bytes before reading.
        i.regions[1] = info.regions[1];
        i.kind = SnapshotKind::Incremental;
        i.regions[0].page_count = u64::MAX / 4;
        bad(&i, 0);
        i.regions[0].page_count = 1 << 40;
        bad(&i, 0);
    }

    #[test]
    fn full_round_trip_and_sparse_file() {
        let m = mem();
        fill(m.ram());
        let before = contents(m.ram());
        let f = tempfile::tempfile().unwrap();
        let info = write_full(m.ram(), &f).unwrap();
        assert_eq!(info.kind, SnapshotKind::Full);
        assert_eq!(read_info(&f).unwrap(), info);
        assert_eq!(info.layout(), vec![(0, 0x20_000), (0x100_000, 0x8_000)]);
        assert!(info.regions.iter().all(|r| r.data_offset % PAGE_SIZE == 0));
        // Zero pages were not written: the file occupies far fewer blocks than its length.
        use std::os::unix::fs::MetadataExt;
        let md = f.metadata().unwrap();
        assert!(
            md.blocks() * 512 < md.len() / 2,
            "{} blocks for {} bytes",
            md.blocks(),
            md.len()
        );
        m.write_slice(&[0xee; 0x5000], GuestAddress(0x1000))
            .unwrap();
        let stats = restore_copy(m.ram(), &f).unwrap();
        assert_eq!(stats.pages, 0x28);
        assert_eq!(contents(m.ram()), before);
    }

    #[test]
    fn mmap_restore_is_lazy_private_and_equal() {
        let m = mem();
        fill(m.ram());
        let f = tempfile::tempfile().unwrap();
        write_full(m.ram(), &f).unwrap();
        let snap = file_bytes(&f);
        for verify_checksums in [false, true] {
            let opts = MmapRestoreOptions {
                guard_pages: !verify_checksums,
                verify_checksums,
            };
            let lazy = restore_mmap(&f, &opts).unwrap();
            assert_eq!(contents(lazy.ram()), contents(m.ram()));
            assert!(lazy.regions().iter().all(|r| r.file_offset.is_none()));
            // Copy-on-write: writing the restored guest never changes the file.
            lazy.write_slice(&[0x55; 64], GuestAddress(0x2000)).unwrap();
            assert_eq!(file_bytes(&f), snap);
        }
        // A corrupted file is caught when asked to verify.
        let mut bad = snap.clone();
        let off = read_info(&f).unwrap().regions[1].data_offset as usize + 0x7ff0;
        bad[off] ^= 1;
        let bf = file_from(&bad);
        assert!(restore_mmap(&bf, &MmapRestoreOptions::default()).is_ok());
        let err = restore_mmap(
            &bf,
            &MmapRestoreOptions {
                verify_checksums: true,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(err, SnapshotError::RegionChecksum { index: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn incremental_holds_only_dirty_pages() {
        let m = mem();
        fill(m.ram());
        let full = tempfile::tempfile().unwrap();
        let mut tracker = DirtyTracker::new(m.ram());
        let base = write_full(m.ram(), &full).unwrap();
        tracker.clear(m.ram()).unwrap();
        m.write_slice(&[0xaa; 0x1001], GuestAddress(0x5000))
            .unwrap(); // pages 5, 6
        m.write_slice(&[0; 16], GuestAddress(0x100_000)).unwrap(); // page zeroed
        let after = contents(m.ram());
        let dirty = tracker.take(m.ram()).unwrap();
        let inc = tempfile::tempfile().unwrap();
        let info = write_incremental(m.ram(), &dirty, base.id, &inc).unwrap();
        assert_eq!(info.base_id, base.id);
        assert_eq!(info.regions[0].page_count, 2);
        assert_eq!(info.regions[1].page_count, 1);
        assert_eq!(inc.metadata().unwrap().len(), 5 * PAGE_SIZE);
        assert_eq!(read_info(&inc).unwrap(), info);
        // Base then increment == state at the time of the increment.
        let other = mem();
        restore_copy(other.ram(), &full).unwrap();
        assert_ne!(contents(other.ram()), after);
        assert_eq!(restore_copy(other.ram(), &inc).unwrap().pages, 3);
        assert_eq!(contents(other.ram()), after);
        // An increment cannot be mapped on its own.
        assert!(matches!(
            restore_mmap(&inc, &MmapRestoreOptions::default()),
            Err(SnapshotError::NotFull { .. })
        ));
    }

    #[test]
    fn incremental_on_the_wrong_base_is_refused_and_memory_untouched() {
        let m = mem();
        fill(m.ram());
        let full = tempfile::tempfile().unwrap();
        let mut tracker = DirtyTracker::new(m.ram());
        let base = write_full(m.ram(), &full).unwrap();
        tracker.clear(m.ram()).unwrap();
        m.write_slice(&[0xbb; 0x2000], GuestAddress(0x8000))
            .unwrap();
        let after = contents(m.ram());
        let inc = tempfile::tempfile().unwrap();
        let info =
            write_incremental(m.ram(), &tracker.take(m.ram()).unwrap(), base.id, &inc).unwrap();

        // Memory holding something else (here: unknown, then another id) is refused.
        let other = mem();
        other
            .write_slice(&[0x11; 64], GuestAddress(0x1000))
            .unwrap();
        let before = contents(other.ram());
        for held in [0, base.id ^ 2, info.id] {
            match restore_incremental(other.ram(), &inc, held) {
                Err(SnapshotError::BaseMismatch { expected, found }) => {
                    assert_eq!((expected, found), (base.id, held));
                }
                r => panic!("held {held:#x}: {r:?}"),
            }
            assert_eq!(contents(other.ram()), before);
        }
        let msg = restore_incremental(other.ram(), &inc, 7)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(&format!("{:#x}", base.id)) && msg.contains("0x7"),
            "{msg}"
        );
        // A full snapshot needs no base; then the increment applies.
        restore_incremental(other.ram(), &full, 0).unwrap();
        assert_eq!(
            restore_incremental(other.ram(), &inc, base.id)
                .unwrap()
                .pages,
            2
        );
        assert_eq!(contents(other.ram()), after);
    }

    #[test]
    fn lineage_tracks_the_held_snapshot() {
        let m = mem();
        fill(m.ram());
        let mut lineage = Lineage::new();
        assert_eq!(lineage.held(), 0);
        let (full, i1, i2) = (
            tempfile::tempfile().unwrap(),
            tempfile::tempfile().unwrap(),
            tempfile::tempfile().unwrap(),
        );
        let mut tracker = DirtyTracker::new(m.ram());
        // No base known: an incremental write is refused.
        assert!(matches!(
            lineage.write_incremental(m.ram(), &DirtyBitmap::new(m.ram()), &i1),
            Err(SnapshotError::BaseMismatch {
                expected: 0,
                found: 0
            })
        ));
        let b = lineage.write_full(m.ram(), &full).unwrap();
        assert_eq!(lineage.held(), b.id);
        tracker.clear(m.ram()).unwrap();
        m.write_obj(1u64, GuestAddress(0x4000)).unwrap();
        let s1 = contents(m.ram());
        let x1 = lineage
            .write_incremental(m.ram(), &tracker.take(m.ram()).unwrap(), &i1)
            .unwrap();
        assert_eq!((x1.base_id, lineage.held()), (b.id, x1.id));
        m.write_obj(2u64, GuestAddress(0x100_000)).unwrap();
        let s2 = contents(m.ram());
        let x2 = lineage
            .write_incremental(m.ram(), &tracker.take(m.ram()).unwrap(), &i2)
            .unwrap();
        assert_eq!(x2.base_id, x1.id);

        // Fresh memory: only full first, then the chain in order.
        let other = mem();
        let mut l2 = Lineage::new();
        let before = contents(other.ram());
        for f in [&i1, &i2] {
            assert!(matches!(
                l2.restore(other.ram(), f),
                Err(SnapshotError::BaseMismatch { .. })
            ));
        }
        assert_eq!(contents(other.ram()), before);
        l2.restore(other.ram(), &full).unwrap();
        // Skipping i1 is refused, and leaves memory at the full snapshot.
        let at_full = contents(other.ram());
        assert!(matches!(
            l2.restore(other.ram(), &i2),
            Err(SnapshotError::BaseMismatch { expected, found }) if expected == x1.id && found == b.id
        ));
        assert_eq!(contents(other.ram()), at_full);
        l2.restore(other.ram(), &i1).unwrap();
        assert_eq!(contents(other.ram()), s1);
        l2.restore(other.ram(), &i2).unwrap();
        assert_eq!((contents(other.ram()), l2.held()), (s2.clone(), x2.id));
        // assume / forget.
        l2.forget();
        assert!(l2.restore(other.ram(), &i2).is_err());
        l2.assume(x1.id);
        l2.restore(other.ram(), &i2).unwrap();
        assert_eq!(contents(other.ram()), s2);
    }

    #[test]
    fn layout_mismatch_is_rejected() {
        let m = mem();
        let f = tempfile::tempfile().unwrap();
        write_full(m.ram(), &f).unwrap();
        let other = Backing::anonymous()
            .build(&MemoryLayout::new(&[(GuestAddress(0), 0x20_000)]).unwrap())
            .unwrap();
        other.write_obj(9u8, GuestAddress(0)).unwrap();
        let err = restore_copy(other.ram(), &f).unwrap_err();
        assert!(matches!(err, SnapshotError::LayoutMismatch { .. }), "{err}");
        assert_eq!(other.read_obj::<u8>(GuestAddress(0)).unwrap(), 9);
        let wrong = DirtyBitmap::new(other.ram());
        assert!(matches!(
            write_incremental(m.ram(), &wrong, 1, &f),
            Err(SnapshotError::Dirty(_))
        ));
    }

    /// Rewrites the header checksum so a field change reaches the field's own check.
    fn reseal(b: &mut [u8]) {
        let meta_len = le_u64(b, 40).min(b.len() as u64) as usize;
        b[60..64].fill(0);
        let crc = crc32fast::hash(&b[..meta_len]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
    }

    fn expect_err(m: &GuestRam, bytes: &[u8]) -> SnapshotError {
        let before = contents(m);
        let f = file_from(bytes);
        let err = restore_copy(m, &f).unwrap_err();
        assert_eq!(contents(m), before, "memory changed on error {err}");
        err
    }

    #[test]
    fn corrupt_files_give_typed_errors_and_untouched_memory() {
        let m = mem();
        fill(m.ram());
        let f = tempfile::tempfile().unwrap();
        let info = write_full(m.ram(), &f).unwrap();
        let good = file_bytes(&f);
        m.write_slice(&[0x77; 0x100], GuestAddress(0x10)).unwrap();

        use SnapshotError as E;
        let e = expect_err(m.ram(), &good[..10]);
        assert!(matches!(e, E::Truncated { need: 64, got: 10 }), "{e}");
        let e = expect_err(m.ram(), &good[..good.len() - 1]);
        assert!(matches!(e, E::Truncated { .. }), "{e}");
        let e = expect_err(m.ram(), &good[..100]);
        assert!(
            matches!(
                e,
                E::Truncated {
                    need: 192,
                    got: 100
                }
            ),
            "{e}"
        );
        let mut longer = good.clone();
        longer.push(0);
        let e = expect_err(m.ram(), &longer);
        assert!(
            matches!(
                e,
                E::HeaderField {
                    field: "file_len",
                    ..
                }
            ),
            "{e}"
        );

        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(expect_err(m.ram(), &b), E::BadMagic(_)));
        let mut b = good.clone();
        b[8] = 2;
        assert!(matches!(expect_err(m.ram(), &b), E::UnsupportedVersion(2)));
        let mut b = good.clone();
        b[12] = 9;
        assert!(matches!(expect_err(m.ram(), &b), E::UnknownKind(9)));
        let mut b = good.clone();
        b[17] = 0x20;
        assert!(matches!(expect_err(m.ram(), &b), E::PageSize(0x2000)));
        let mut b = good.clone();
        b[20..24].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(expect_err(m.ram(), &b), E::RegionCount(0)));
        let mut b = good.clone();
        b[20..24].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            expect_err(m.ram(), &b),
            E::HeaderField {
                field: "meta_len",
                ..
            }
        ));
        // Any flipped bit in the header or table is caught by the header checksum.
        for i in (24..192).step_by(7) {
            let mut b = good.clone();
            b[i] ^= 0x10;
            let e = expect_err(m.ram(), &b);
            assert!(
                matches!(
                    e,
                    E::HeaderChecksum { .. } | E::HeaderField { .. } | E::Truncated { .. }
                ),
                "byte {i}: {e}"
            );
        }
        // Flipped data bytes are caught by the region checksums, in either region.
        for r in &info.regions {
            for off in [0, 0x2001, r.size - 1] {
                let mut b = good.clone();
                b[(r.data_offset + off) as usize] ^= 0x80;
                assert!(matches!(expect_err(m.ram(), &b), E::RegionChecksum { .. }));
            }
        }
        // Semantically wrong tables, correctly sealed.
        let entry = |i: usize, field: usize| 64 + 64 * i + field;
        let cases: Vec<(usize, u64, &str)> = vec![
            (entry(0, 8), 0, "multiple"),        // size 0
            (entry(0, 0), 0x800, "multiple"),    // unaligned guest address
            (entry(1, 0), 0x1000, "unsorted"),   // overlaps region 0
            (entry(0, 16), 0x1800, "unaligned"), // data offset
            (entry(0, 16), 0, "unaligned"),      // data inside header
            (entry(1, 16), 1 << 40, "past the end"),
            (entry(1, 16), !0xfff_u64, "overflows"),
            (entry(0, 24), 0x1000, "every page"),
            (entry(1, 16), 0x2000, "overlap"), // region 1 data on top of region 0's
            (entry(1, 0), !0xfff_u64, "overflows"),
        ];
        for (at, v, reason) in cases {
            let mut b = good.clone();
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            reseal(&mut b);
            let e = expect_err(m.ram(), &b);
            assert!(matches!(e, E::BadRegion { .. }), "{at}: {e}");
            assert!(e.to_string().contains(reason), "{at}: {e}");
        }
        let mut b = good.clone();
        b[entry(0, 60)] = 1;
        reseal(&mut b);
        assert!(expect_err(m.ram(), &b).to_string().contains("reserved"));
        let mut b = good.clone();
        b[56] = 1;
        reseal(&mut b);
        assert!(matches!(
            expect_err(m.ram(), &b),
            E::HeaderField {
                field: "reserved",
                ..
            }
        ));
        let mut b = good.clone();
        b[24..32].fill(0);
        reseal(&mut b);
        assert!(matches!(
            expect_err(m.ram(), &b),
            E::HeaderField { field: "id", .. }
        ));
        let mut b = good.clone();
        b[32] = 1;
        reseal(&mut b);
        assert!(matches!(
            expect_err(m.ram(), &b),
            E::HeaderField {
                field: "base_id",
                ..
            }
        ));

        // The intact file still restores.
        restore_copy(m.ram(), &f).unwrap();
    }

    #[test]
    fn corrupt_incremental_page_lists_are_rejected() {
        let m = mem();
        let mut d = DirtyBitmap::new(m.ram());
        d.mark(GuestAddress(0x1000), 1).unwrap();
        d.mark(GuestAddress(0x3000), 1).unwrap();
        m.write_slice(&[1; 8], GuestAddress(0x3000)).unwrap();
        let f = tempfile::tempfile().unwrap();
        let info = write_incremental(m.ram(), &d, 5, &f).unwrap();
        let good = file_bytes(&f);
        let list = info.regions[0].list_offset as usize;
        for (first, second) in [(3u64, 1u64), (1, 1), (1, 0x20)] {
            let mut b = good.clone();
            b[list..list + 8].copy_from_slice(&first.to_le_bytes());
            b[list + 8..list + 16].copy_from_slice(&second.to_le_bytes());
            let e = expect_err(m.ram(), &b);
            assert!(e.to_string().contains("page list"), "{e}");
        }
        let mut b = good.clone();
        let data = info.regions[0].data_offset as usize;
        b[data + 5] ^= 1;
        assert!(matches!(
            expect_err(m.ram(), &b),
            SnapshotError::RegionChecksum { index: 0, .. }
        ));
        // Page count larger than the region.
        let mut b = good.clone();
        b[64 + 40..64 + 48].copy_from_slice(&0x21u64.to_le_bytes());
        reseal(&mut b);
        assert!(expect_err(m.ram(), &b).to_string().contains("page count"));
        // Page list outside the body.
        let mut b = good.clone();
        b[64 + 32..64 + 40].copy_from_slice(&8u64.to_le_bytes());
        reseal(&mut b);
        assert!(expect_err(m.ram(), &b)
            .to_string()
            .contains("page list lies"));
        restore_copy(m.ram(), &f).unwrap();
    }

    #[test]
    fn in_memory_file_holds_a_snapshot() {
        let m = mem();
        fill(m.ram());
        let f = in_memory_file().unwrap();
        write_full(m.ram(), &f).unwrap();
        let lazy = restore_mmap(&f, &MmapRestoreOptions::default()).unwrap();
        assert_eq!(contents(lazy.ram()), contents(m.ram()));
    }

    #[test]
    fn io_errors_are_typed() {
        let m = mem();
        let dir = tempfile::tempdir().unwrap();
        let ro = File::open(dir.path()).unwrap(); // a directory: writes fail
        let e = write_full(m.ram(), &ro).unwrap_err();
        assert!(matches!(e, SnapshotError::Io { .. }), "{e}");
        assert!(e.to_string().contains("failed"));
        let d = DirtyBitmap::new(m.ram());
        assert!(matches!(
            write_incremental(m.ram(), &d, 1, &ro),
            Err(SnapshotError::Io { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(32)))]

        /// snapshot -> mutate -> restore gives back the original, through a full snapshot,
        /// a full plus an incremental one, and a lazy mmap restore.
        #[test]
        fn snapshot_mutate_restore_is_identity(
            before in prop::collection::vec((0u64..0x28_000, any::<u8>(), 1usize..300), 0..20),
            between in prop::collection::vec((0u64..0x28_000, any::<u8>(), 1usize..300), 0..20),
            after in prop::collection::vec((0u64..0x28_000, any::<u8>(), 1usize..5000), 1..20),
        ) {
            let m = mem();
            let write = |ops: &[(u64, u8, usize)]| {
                for &(off, val, len) in ops {
                    // Offsets span both regions; clip writes to the region they start in.
                    let (addr, room) = if off < 0x20_000 {
                        (off, 0x20_000 - off)
                    } else {
                        (0x100_000 + off - 0x20_000, 0x28_000 - off)
                    };
                    let len = len.min(room as usize);
                    m.write_slice(&vec![val; len], GuestAddress(addr)).unwrap();
                }
            };
            write(&before);
            let mut tracker = DirtyTracker::new(m.ram());
            let full = tempfile::tempfile().unwrap();
            let base = write_full(m.ram(), &full).unwrap();
            tracker.clear(m.ram()).unwrap();
            write(&between);
            let original = contents(m.ram());
            let inc = tempfile::tempfile().unwrap();
            write_incremental(m.ram(), &tracker.take(m.ram()).unwrap(), base.id, &inc).unwrap();

            write(&after);
            restore_copy(m.ram(), &full).unwrap();
            restore_copy(m.ram(), &inc).unwrap();
            prop_assert_eq!(contents(m.ram()), original.clone());

            let f2 = tempfile::tempfile().unwrap();
            write_full(m.ram(), &f2).unwrap();
            let lazy = restore_mmap(&f2, &MmapRestoreOptions::default()).unwrap();
            prop_assert_eq!(contents(lazy.ram()), original);
        }
    }
}
