//! The raw image file behind a virtio-blk device.
//!
//! Data moves between the file and guest memory without a bounce buffer: the request's guest
//! segments are resolved to host slices (`GuestMemory::get_slices`, which also handles buffers
//! spanning two memory regions) and handed to one `preadv`/`pwritev` per request. Pages the
//! device writes are marked in the guest memory's dirty bitmap.
//!
//! Discard punches a hole (`FALLOC_FL_PUNCH_HOLE`); write-zeroes uses `FALLOC_FL_ZERO_RANGE`
//! (or a hole when the driver allows unmapping) and falls back to writing zeros on file systems
//! without it. Flush is `fdatasync`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::volatile_memory::{PtrGuard, PtrGuardMut};
use vm_memory::{GuestMemory, Permissions, VolatileSlice};

use crate::block::request::{SectorRange, ID_LEN, SECTOR_SIZE};
use crate::chain::Segment;

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image cannot be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The path.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// The image size cannot be read.
    #[error("cannot read the size of the disk image: {0}")]
    Metadata(io::Error),
}

/// Guest slices per `preadv`/`pwritev` call, held in stack arrays (well under `IOV_MAX`).
/// A 4 KiB request is one or two slices; larger scatter lists take several calls.
const BATCH: usize = 32;

/// A raw disk image file.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    size: u64,
    read_only: bool,
    id: [u8; ID_LEN],
}

impl RawDisk {
    /// Opens `path`; `read_only` opens it without write access and makes the device RO.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Self::from_file(file, read_only)
    }

    /// Uses an already open file.
    pub fn from_file(file: File, read_only: bool) -> Result<Self, DiskError> {
        let meta = file.metadata().map_err(DiskError::Metadata)?;
        // A block device's metadata length is 0: its size is where a seek to the end lands
        // (for a regular file that is the same as the metadata length).
        let size = {
            use std::io::Seek;
            (&file)
                .seek(io::SeekFrom::End(0))
                .map_err(DiskError::Metadata)?
        };
        // Default ID: device and inode numbers, stable for the same file.
        use std::os::unix::fs::MetadataExt;
        let text = format!("vmkit{:x}.{:x}", meta.dev(), meta.ino());
        let mut id = [0u8; ID_LEN];
        let n = text.len().min(ID_LEN);
        id[..n].copy_from_slice(&text.as_bytes()[..n]);
        Ok(Self {
            file,
            size,
            read_only,
            id,
        })
    }

    /// Replaces the ID string returned by GET_ID (truncated to 20 bytes).
    pub fn with_id(mut self, id: &str) -> Self {
        self.id = [0; ID_LEN];
        let n = id.len().min(ID_LEN);
        self.id[..n].copy_from_slice(&id.as_bytes()[..n]);
        self
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Size in 512-byte sectors (a trailing partial sector is not exposed).
    pub fn capacity(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The 20-byte ID.
    pub fn id(&self) -> &[u8; ID_LEN] {
        &self.id
    }

    /// Reads from the file at `offset` into the guest buffers `segs`.
    pub fn read_to_guest<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        segs: &[Segment],
        offset: u64,
    ) -> io::Result<()> {
        self.vectored(mem, segs, offset, false)
    }

    /// Writes the guest buffers `segs` to the file at `offset`.
    pub fn write_from_guest<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        segs: &[Segment],
        offset: u64,
    ) -> io::Result<()> {
        self.vectored(mem, segs, offset, true)
    }

    /// Gathers the guest slices of `segs` into batches of at most [`BATCH`] and hands each
    /// batch to one `preadv`/`pwritev` loop. The batch lives on the stack: a request costs no
    /// heap allocation here (per-request allocations were most of the device's fixed cost at
    /// 4 KiB).
    fn vectored<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        segs: &[Segment],
        offset: u64,
        to_file: bool,
    ) -> io::Result<()> {
        let to_io = |e: vm_memory::GuestMemoryError| io::Error::new(io::ErrorKind::InvalidInput, e);
        let perm = if to_file {
            Permissions::Read
        } else {
            Permissions::Write
        };
        let mut batch: [Option<_>; BATCH] = Default::default();
        let mut n = 0usize;
        let mut off = offset;
        for s in segs {
            for slice in mem
                .get_slices(s.addr, s.len as usize, perm)
                .map_err(to_io)?
            {
                let slice = slice.map_err(to_io)?;
                if n == BATCH {
                    off = self.transfer(&batch, off, to_file)?;
                    n = 0;
                }
                if let Some(entry) = batch.get_mut(n) {
                    *entry = Some(slice);
                    n += 1;
                }
            }
        }
        if let Some(rest) = batch.get(..n).filter(|r| !r.is_empty()) {
            self.transfer(rest, off, to_file)?;
        }
        Ok(())
    }

    /// Transfers `slices` (at most [`BATCH`], `None` entries are skipped) from or to the file
    /// at `offset`, retrying short transfers; returns the offset after them.
    fn transfer<B: BitmapSlice>(
        &self,
        slices: &[Option<VolatileSlice<'_, B>>],
        offset: u64,
        to_file: bool,
    ) -> io::Result<u64> {
        const EMPTY: libc::iovec = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut iovs = [EMPTY; BATCH];
        let mut read_guards: [Option<PtrGuard>; BATCH] = Default::default();
        let mut write_guards: [Option<PtrGuardMut>; BATCH] = Default::default();
        let mut count = 0usize;
        for (i, ((s, iov), (rg, wg))) in slices
            .iter()
            .flatten()
            .zip(iovs.iter_mut())
            .zip(read_guards.iter_mut().zip(write_guards.iter_mut()))
            .enumerate()
        {
            let base = if to_file {
                let g = s.ptr_guard();
                let p = g.as_ptr() as *mut libc::c_void;
                *rg = Some(g);
                p
            } else {
                let g = s.ptr_guard_mut();
                let p = g.as_ptr() as *mut libc::c_void;
                *wg = Some(g);
                p
            };
            *iov = libc::iovec {
                iov_base: base,
                iov_len: s.len(),
            };
            count = i + 1;
        }
        let mut idx = 0usize;
        let mut off = offset;
        while idx < count {
            let cnt = count - idx;
            let file_off = libc::off_t::try_from(off)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
            let rest = iovs.get(idx..count).unwrap_or_default();
            let n = if to_file {
                // SAFETY: `rest` (`cnt` entries) describes guest memory slices that stay mapped
                // while `slices` and `read_guards` live (until the end of this function); the
                // kernel only reads from them.
                unsafe {
                    libc::pwritev(
                        self.file.as_raw_fd(),
                        rest.as_ptr(),
                        cnt as libc::c_int,
                        file_off,
                    )
                }
            } else {
                // SAFETY: as above (`write_guards`); these slices were obtained with write
                // permission and the kernel writes at most `iov_len` bytes into each.
                unsafe {
                    libc::preadv(
                        self.file.as_raw_fd(),
                        rest.as_ptr(),
                        cnt as libc::c_int,
                        file_off,
                    )
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            let mut n = n as usize;
            off += n as u64;
            while n > 0 {
                let Some(iov) = iovs.get_mut(idx) else {
                    break;
                };
                if n >= iov.iov_len {
                    n -= iov.iov_len;
                    idx += 1;
                } else {
                    // SAFETY: `n < iov_len`, so the advanced pointer stays inside the slice.
                    iov.iov_base = unsafe { (iov.iov_base as *mut u8).add(n) }.cast();
                    iov.iov_len -= n;
                    n = 0;
                }
            }
        }
        if !to_file {
            for s in slices.iter().flatten() {
                s.bitmap().mark_dirty(0, s.len());
            }
        }
        Ok(off)
    }

    /// Makes written data durable.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn fallocate(&self, mode: libc::c_int, r: &SectorRange) -> io::Result<()> {
        let off = r.sector * SECTOR_SIZE;
        let len = u64::from(r.num_sectors) * SECTOR_SIZE;
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate only operates on the file descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Deallocates `r` (reads return zeros afterwards).
    pub fn discard(&self, r: &SectorRange) -> io::Result<()> {
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, r)
    }

    /// Zeroes `r`, deallocating if `r.unmap` allows it.
    pub fn write_zeroes(&self, r: &SectorRange) -> io::Result<()> {
        let mode = if r.unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, r) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.write_zeroes_slow(r),
            other => other,
        }
    }

    /// Writes explicit zeros, for file systems without `FALLOC_FL_ZERO_RANGE`.
    pub fn write_zeroes_slow(&self, r: &SectorRange) -> io::Result<()> {
        let zeros = vec![0u8; 64 * 1024];
        let mut off = r.sector * SECTOR_SIZE;
        let mut left = u64::from(r.num_sectors) * SECTOR_SIZE;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], off)?;
            off += n as u64;
            left -= n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    #[test]
    fn scatter_lists_longer_than_one_batch() {
        // 3 * BATCH + 5 segments of 100 bytes, every other one 100 bytes apart: several
        // preadv/pwritev calls, the last batch partial, order preserved across calls.
        let n = 3 * BATCH + 5;
        let f = tempfile::tempfile().unwrap();
        f.set_len(64 * 1024).unwrap();
        let disk = RawDisk::from_file(f, false).unwrap();
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let segs: Vec<Segment> = (0..n as u64)
            .map(|i| Segment {
                addr: GuestAddress(200 * i),
                len: 100,
            })
            .collect();
        let pattern: Vec<u8> = (0..n * 100).map(|i| (i * 31 + 7) as u8).collect();
        for (s, chunk) in segs.iter().zip(pattern.chunks(100)) {
            m.write_slice(chunk, s.addr).unwrap();
        }
        disk.write_from_guest(&m, &segs, 1024).unwrap();
        let mut host = vec![0u8; n * 100];
        disk.file.read_exact_at(&mut host, 1024).unwrap();
        assert_eq!(host, pattern);
        // Read back into the gaps.
        let gaps: Vec<Segment> = segs
            .iter()
            .map(|s| Segment {
                addr: GuestAddress(s.addr.0 + 100),
                len: 100,
            })
            .collect();
        disk.read_to_guest(&m, &gaps, 1024).unwrap();
        for (s, chunk) in gaps.iter().zip(pattern.chunks(100)) {
            let mut got = [0u8; 100];
            m.read_slice(&mut got, s.addr).unwrap();
            assert_eq!(&got[..], chunk);
        }
        // A bad segment after the first batch fails the request.
        let mut bad = segs.clone();
        bad.push(Segment {
            addr: GuestAddress(0x20000),
            len: 1,
        });
        assert!(disk.write_from_guest(&m, &bad, 0).is_err());
    }

    #[test]
    fn reads_and_writes_across_regions() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&(0..8192u32).map(|i| i as u8).collect::<Vec<_>>())
            .unwrap();
        let disk = RawDisk::from_file(f, false).unwrap().with_id("disk-0");
        assert_eq!(disk.capacity(), 16);
        assert_eq!(&disk.id()[..6], b"disk-0");
        assert!(!disk.read_only());
        // Two adjacent regions: a buffer spanning both is split into two iovecs.
        let m = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let seg = Segment {
            addr: GuestAddress(0xe00),
            len: 1024,
        };
        disk.read_to_guest(&m, &[seg], 512).unwrap();
        let mut got = [0u8; 1024];
        m.read_slice(&mut got, GuestAddress(0xe00)).unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| b == (i + 512) as u8));
        m.write_slice(&[0xaa; 1024], GuestAddress(0xe00)).unwrap();
        disk.write_from_guest(&m, &[seg], 0).unwrap();
        let mut back = [0u8; 1024];
        disk.file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, [0xaa; 1024]);
        // Reading past the end of the file is an error, not a partial success.
        assert!(disk.read_to_guest(&m, &[seg], 8192 - 512).is_err());
        // Outside guest memory.
        let bad = Segment {
            addr: GuestAddress(0x5000),
            len: 16,
        };
        assert!(disk.read_to_guest(&m, &[bad], 0).is_err());
        let r = SectorRange {
            sector: 0,
            num_sectors: 2,
            unmap: false,
        };
        disk.write_zeroes_slow(&r).unwrap();
        disk.file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, [0; 1024]);
        disk.flush().unwrap();
    }

    #[test]
    fn reads_into_guest_mark_pages_dirty() {
        use vm_memory::bitmap::AtomicBitmap;
        let f = tempfile::tempfile().unwrap();
        f.set_len(8192).unwrap();
        let disk = RawDisk::from_file(f, false).unwrap();
        let m =
            GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let seg = Segment {
            addr: GuestAddress(0x3000),
            len: 0x1800,
        };
        disk.read_to_guest(&m, &[seg], 0).unwrap();
        let r = m.find_region(GuestAddress(0)).unwrap();
        use vm_memory::GuestMemoryRegion;
        let dirty = |a: usize| r.bitmap().dirty_at(a);
        assert!(!dirty(0x2000));
        assert!(
            dirty(0x3000) && dirty(0x4000),
            "pages the device wrote are dirty"
        );
        assert!(!dirty(0x5000));
        // Writing guest data to the file only reads guest memory: nothing new is dirty.
        let seg2 = Segment {
            addr: GuestAddress(0x8000),
            len: 512,
        };
        disk.write_from_guest(&m, &[seg2], 0).unwrap();
        assert!(!dirty(0x8000));
    }

    #[test]
    fn open_errors() {
        let e = RawDisk::open(Path::new("/nonexistent/vmkit.img"), true).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmkit.img"));
    }
}
