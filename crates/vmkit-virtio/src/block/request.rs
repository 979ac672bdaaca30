//! Parsing a virtio-blk request out of a validated descriptor chain (virtio 1.2, 5.2.6).
//!
//! A request is `struct virtio_blk_req`: a 16-byte device-readable header (`type`, `ioprio`,
//! `sector`), then data (device-readable for writes, device-writable for reads), then one
//! device-writable status byte. [`Request::parse`] checks everything the guest controls before
//! the disk is touched:
//!
//! * the header is complete and readable, the status byte exists and is writable;
//! * the data direction matches the type (no write data on a read and vice versa);
//! * data lengths are multiples of 512 and `sector + len / 512` stays inside the disk,
//!   computed without overflow;
//! * discard / write-zeroes segment lists have a whole number of 16-byte entries, at most
//!   `max_*_seg` of them, each inside the disk and within `max_*_sectors`, with no unknown flags.
//!
//! * read, write and get-ID data honour the advertised `seg_max` and `size_max` (5.2.4): at
//!   most `seg_max` data segments, none longer than `size_max` bytes ([`SegmentLimits`],
//!   checked by [`Request::exceeds`]). Data segments are the buffers between the header and
//!   the status byte *as the device sees them*: a descriptor holding both the header and the
//!   start of the data contributes one data segment, as does one holding data and status.
//!
//! What fails is answered with a status instead of an error: `IOERR` for malformed or
//! out-of-range requests, `UNSUPP` for unknown types and features the driver did not negotiate.

use vm_memory::GuestMemory;

use crate::chain::{Chain, ChainReader, Segment};

/// `VIRTIO_BLK_T_IN`: read sectors.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`: write sectors.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`: make written data durable.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`: read the 20-byte device ID string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// `VIRTIO_BLK_T_DISCARD`: deallocate sector ranges.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// `VIRTIO_BLK_T_WRITE_ZEROES`: zero sector ranges.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error (also malformed requests).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Sector size of the virtio-blk protocol, whatever the device's `blk_size`.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the device ID returned by GET_ID.
pub const ID_LEN: usize = 20;
/// Size of the request header.
pub const HEADER_LEN: u64 = 16;
/// Size of one discard / write-zeroes segment.
pub const DWZ_SEGMENT_LEN: u64 = 16;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// A range of sectors named by a discard or write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Unmap allowed (write-zeroes only).
    pub unmap: bool,
}

/// What the request asks the disk to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read into `data` (device-writable segments) from `sector`.
    Read {
        /// First sector.
        sector: u64,
        /// Guest buffers to fill.
        data: Vec<Segment>,
    },
    /// Write `data` (device-readable segments) at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// Guest buffers to write.
        data: Vec<Segment>,
    },
    /// Flush.
    Flush,
    /// Return the ID into `data`.
    GetId {
        /// Guest buffers for the ID string.
        data: Vec<Segment>,
    },
    /// Discard ranges.
    Discard(Vec<SectorRange>),
    /// Zero ranges.
    WriteZeroes(Vec<SectorRange>),
}

/// What the device knows when it parses a request.
#[derive(Debug, Clone, Copy)]
pub struct DiskLimits {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// The disk is read-only (VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// FLUSH negotiated.
    pub flush: bool,
    /// DISCARD negotiated.
    pub discard: bool,
    /// WRITE_ZEROES negotiated.
    pub write_zeroes: bool,
    /// `max_discard_sectors` / `max_write_zeroes_sectors`.
    pub max_dwz_sectors: u32,
    /// `max_discard_seg` / `max_write_zeroes_seg`.
    pub max_dwz_seg: u32,
}

/// The data-segment limits the device advertises in its configuration space (5.2.4): a driver
/// must not send more than `seg_max` data segments, nor one segment longer than `size_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentLimits {
    /// Most data segments per request (`seg_max`).
    pub seg_max: u32,
    /// Longest single data segment in bytes (`size_max`).
    pub size_max: u32,
}

/// A request ready to execute, with where to put its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Request type field as the guest wrote it.
    pub request_type: u32,
    /// The parsed operation.
    pub kind: RequestKind,
}

/// The outcome of parsing: a request, or the status to answer right away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Execute this.
    Request(Request),
    /// Answer with this status without touching the disk.
    Reject(u8),
}

/// The status byte's location and the data part of the writable buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritableSplit {
    /// Writable data segments (everything but the last byte).
    pub data: Vec<Segment>,
    /// Address of the status byte.
    pub status: Segment,
}

/// Splits the writable buffers into data and the final status byte; `None` if there is no
/// writable byte at all (nothing can be reported to the guest then).
pub fn split_status(chain: &Chain) -> Option<WritableSplit> {
    split_writable(chain.writable.clone())
}

/// [`split_status`] on the writable segments themselves, reusing their list for the data part
/// (no allocation).
pub fn split_writable(mut data: Vec<Segment>) -> Option<WritableSplit> {
    let last = data.pop()?;
    // parse_chain guarantees len >= 1 and that the segment lies in guest memory.
    let status = Segment {
        addr: vm_memory::GuestAddress(last.addr.0 + u64::from(last.len) - 1),
        len: 1,
    };
    if last.len > 1 {
        data.push(Segment {
            addr: last.addr,
            len: last.len - 1,
        });
    }
    Some(WritableSplit { data, status })
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Checks that `len` bytes at `sector` are whole sectors inside the disk.
fn in_disk(sector: u64, len: u64, capacity: u64) -> bool {
    len % SECTOR_SIZE == 0
        && sector
            .checked_add(len / SECTOR_SIZE)
            .is_some_and(|end| end <= capacity)
}

impl Request {
    /// The guest data buffers of a read, write or get-ID request (empty for the others, whose
    /// payload is a header or a segment list with limits of its own).
    pub fn data_segments(&self) -> &[Segment] {
        match &self.kind {
            RequestKind::Read { data, .. }
            | RequestKind::Write { data, .. }
            | RequestKind::GetId { data } => data,
            RequestKind::Flush | RequestKind::Discard(_) | RequestKind::WriteZeroes(_) => &[],
        }
    }

    /// Whether the request breaks the advertised `seg_max` / `size_max`; the device answers
    /// such a request with `IOERR` (the driver violated a MUST NOT of 5.2.6.1).
    pub fn exceeds(&self, limits: &SegmentLimits) -> bool {
        let data = self.data_segments();
        !u32::try_from(data.len()).is_ok_and(|n| n <= limits.seg_max)
            || data.iter().any(|s| s.len > limits.size_max)
    }

    /// Parses `chain`, whose writable part was already split by [`split_status`].
    pub fn parse<M: GuestMemory + ?Sized>(
        mem: &M,
        chain: &Chain,
        writable: &WritableSplit,
        limits: &DiskLimits,
    ) -> Parsed {
        Self::parse_owned(mem, chain.readable.clone(), writable.data.clone(), limits)
    }

    /// [`Request::parse`] taking the readable segments and the writable data segments (what
    /// [`split_status`] left besides the status byte) by value: the request's data list *is*
    /// one of them, so parsing allocates nothing for reads, writes and flushes.
    pub fn parse_owned<M: GuestMemory + ?Sized>(
        mem: &M,
        readable: Vec<Segment>,
        writable_data_segments: Vec<Segment>,
        limits: &DiskLimits,
    ) -> Parsed {
        let mut reader = ChainReader::new(readable);
        let mut header = [0u8; HEADER_LEN as usize];
        if reader.read_exact(mem, &mut header).is_err() {
            return Parsed::Reject(VIRTIO_BLK_S_IOERR);
        }
        let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let readable_data = reader.remaining();
        let writable_data = total(&writable_data_segments);
        let reject = Parsed::Reject(VIRTIO_BLK_S_IOERR);
        let kind = match request_type {
            VIRTIO_BLK_T_IN => {
                if readable_data != 0 || !in_disk(sector, writable_data, limits.capacity) {
                    return reject;
                }
                RequestKind::Read {
                    sector,
                    data: writable_data_segments,
                }
            }
            VIRTIO_BLK_T_OUT => {
                if limits.read_only {
                    return reject;
                }
                if writable_data != 0 || !in_disk(sector, readable_data, limits.capacity) {
                    return reject;
                }
                RequestKind::Write {
                    sector,
                    data: reader.into_remaining(),
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if !limits.flush {
                    return Parsed::Reject(VIRTIO_BLK_S_UNSUPP);
                }
                if readable_data != 0 || writable_data != 0 {
                    return reject;
                }
                RequestKind::Flush
            }
            VIRTIO_BLK_T_GET_ID => {
                if readable_data != 0 || writable_data == 0 {
                    return reject;
                }
                RequestKind::GetId {
                    data: writable_data_segments,
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let is_discard = request_type == VIRTIO_BLK_T_DISCARD;
                let negotiated = if is_discard {
                    limits.discard
                } else {
                    limits.write_zeroes
                };
                if !negotiated {
                    return Parsed::Reject(VIRTIO_BLK_S_UNSUPP);
                }
                if limits.read_only {
                    return reject;
                }
                if writable_data != 0
                    || readable_data == 0
                    || readable_data % DWZ_SEGMENT_LEN != 0
                    || readable_data / DWZ_SEGMENT_LEN > u64::from(limits.max_dwz_seg)
                {
                    return reject;
                }
                let mut ranges = Vec::new();
                for _ in 0..readable_data / DWZ_SEGMENT_LEN {
                    let mut raw = [0u8; DWZ_SEGMENT_LEN as usize];
                    if reader.read_exact(mem, &mut raw).is_err() {
                        return reject;
                    }
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&raw[0..8]);
                    let sector = u64::from_le_bytes(s);
                    let num_sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
                    let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
                    let allowed = if is_discard {
                        0
                    } else {
                        WRITE_ZEROES_FLAG_UNMAP
                    };
                    if flags & !allowed != 0 {
                        return Parsed::Reject(VIRTIO_BLK_S_UNSUPP);
                    }
                    if num_sectors > limits.max_dwz_sectors
                        || !in_disk(
                            sector,
                            u64::from(num_sectors) * SECTOR_SIZE,
                            limits.capacity,
                        )
                    {
                        return reject;
                    }
                    ranges.push(SectorRange {
                        sector,
                        num_sectors,
                        unmap: flags & WRITE_ZEROES_FLAG_UNMAP != 0,
                    });
                }
                if is_discard {
                    RequestKind::Discard(ranges)
                } else {
                    RequestKind::WriteZeroes(ranges)
                }
            }
            _ => return Parsed::Reject(VIRTIO_BLK_S_UNSUPP),
        };
        Parsed::Request(Request { request_type, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    const LIMITS: DiskLimits = DiskLimits {
        capacity: 16,
        read_only: false,
        flush: true,
        discard: true,
        write_zeroes: true,
        max_dwz_sectors: 8,
        max_dwz_seg: 2,
    };

    fn parse_with(
        mem: &GuestMemoryMmap<()>,
        typ: u32,
        sector: u64,
        readable_extra: &[Segment],
        writable: &[Segment],
        limits: &DiskLimits,
    ) -> Parsed {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&typ.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(0x100)).unwrap();
        let mut readable = vec![seg(0x100, 16)];
        readable.extend_from_slice(readable_extra);
        let chain = Chain {
            head: 0,
            readable,
            writable: writable.to_vec(),
        };
        let w = split_status(&chain).unwrap();
        Request::parse(mem, &chain, &w, limits)
    }

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn read_and_write_ranges() {
        let m = mem();
        let p = parse_with(&m, VIRTIO_BLK_T_IN, 0, &[], &[seg(0x1000, 513)], &LIMITS);
        assert!(matches!(
            p,
            Parsed::Request(Request {
                kind: RequestKind::Read { .. },
                ..
            })
        ));
        // Last sector exactly.
        let p = parse_with(&m, VIRTIO_BLK_T_IN, 15, &[], &[seg(0x1000, 513)], &LIMITS);
        assert!(matches!(p, Parsed::Request(_)));
        // Past the end, overflowing sector, partial sector.
        for (sector, len) in [(16u64, 513u32), (u64::MAX, 513), (0, 100)] {
            let p = parse_with(
                &m,
                VIRTIO_BLK_T_IN,
                sector,
                &[],
                &[seg(0x1000, len)],
                &LIMITS,
            );
            assert_eq!(p, Parsed::Reject(VIRTIO_BLK_S_IOERR), "{sector} {len}");
        }
        // Read with write data.
        let p = parse_with(
            &m,
            VIRTIO_BLK_T_IN,
            0,
            &[seg(0x2000, 512)],
            &[seg(0x1000, 513)],
            &LIMITS,
        );
        assert_eq!(p, Parsed::Reject(VIRTIO_BLK_S_IOERR));
        let p = parse_with(
            &m,
            VIRTIO_BLK_T_OUT,
            1,
            &[seg(0x2000, 512)],
            &[seg(0x1000, 1)],
            &LIMITS,
        );
        assert!(matches!(
            p,
            Parsed::Request(Request {
                kind: RequestKind::Write { sector: 1, .. },
                ..
            })
        ));
        // Write with read data.
        let p = parse_with(
            &m,
            VIRTIO_BLK_T_OUT,
            1,
            &[seg(0x2000, 512)],
            &[seg(0x1000, 2)],
            &LIMITS,
        );
        assert_eq!(p, Parsed::Reject(VIRTIO_BLK_S_IOERR));
        let ro = DiskLimits {
            read_only: true,
            ..LIMITS
        };
        let p = parse_with(
            &m,
            VIRTIO_BLK_T_OUT,
            1,
            &[seg(0x2000, 512)],
            &[seg(0x1000, 1)],
            &ro,
        );
        assert_eq!(p, Parsed::Reject(VIRTIO_BLK_S_IOERR));
    }

    #[test]
    fn other_types() {
        let m = mem();
        let p = parse_with(&m, VIRTIO_BLK_T_FLUSH, 0, &[], &[seg(0x1000, 1)], &LIMITS);
        assert!(matches!(
            p,
            Parsed::Request(Request {
                kind: RequestKind::Flush,
                ..
            })
        ));
        let noflush = DiskLimits {
            flush: false,
            ..LIMITS
        };
        let p = parse_with(&m, VIRTIO_BLK_T_FLUSH, 0, &[], &[seg(0x1000, 1)], &noflush);
        assert_eq!(p, Parsed::Reject(VIRTIO_BLK_S_UNSUPP));
        let p = parse_with(&m, VIRTIO_BLK_T_FLUSH, 0, &[], &[seg(0x1000, 2)], &LIMITS);
        assert_eq!(p, Parsed::Reject(VIRTIO_BLK_S_IOERR));
        let p = parse_with(&m, VIRTIO_BLK_T_GET_ID, 0, &[], &[seg(0x1000, 21)], &LIMITS);
        assert!(matches!(
            p,
            Parsed::Request(Request {
                kind: RequestKind::GetId { .. },
                ..
            })
        ));
        let p = parse_with(&m, VIRTIO_BLK_T_GET_ID, 0, &[], &[seg(0x1000, 1)], &LIMITS);
        assert_eq!(p, Parsed::Reject(VIRTIO_BLK_S_IOERR));
        let p = parse_with(&m, 99, 0, &[], &[seg(0x1000, 1)], &LIMITS);
        assert_eq!(p, Parsed::Reject(VIRTIO_BLK_S_UNSUPP));
    }

    fn dwz(m: &GuestMemoryMmap<()>, at: u64, sector: u64, n: u32, flags: u32) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&n.to_le_bytes());
        raw[12..16].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&raw, GuestAddress(at)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = mem();
        dwz(&m, 0x2000, 2, 4, 0);
        dwz(&m, 0x2010, 8, 8, WRITE_ZEROES_FLAG_UNMAP);
        let st = [seg(0x1000, 1)];
        let p = parse_with(
            &m,
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[seg(0x2000, 32)],
            &st,
            &LIMITS,
        );
        match p {
            Parsed::Request(Request {
                kind: RequestKind::WriteZeroes(r),
                ..
            }) => {
                assert_eq!(r.len(), 2);
                assert!(r[1].unmap);
            }
            other => panic!("{other:?}"),
        }
        // UNMAP flag is not valid on discard.
        let p = parse_with(
            &m,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[seg(0x2000, 32)],
            &st,
            &LIMITS,
        );
        assert_eq!(p, Parsed::Reject(VIRTIO_BLK_S_UNSUPP));
        let p = parse_with(
            &m,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[seg(0x2000, 16)],
            &st,
            &LIMITS,
        );
        assert!(matches!(
            p,
            Parsed::Request(Request {
                kind: RequestKind::Discard(_),
                ..
            })
        ));
        // Partial segment, too many segments, too many sectors, outside the disk.
        let p = parse_with(
            &m,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[seg(0x2000, 15)],
            &st,
            &LIMITS,
        );
        assert_eq!(p, Parsed::Reject(VIRTIO_BLK_S_IOERR));
        let p = parse_with(
            &m,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[seg(0x2000, 48)],
            &st,
            &LIMITS,
        );
        assert_eq!(p, Parsed::Reject(VIRTIO_BLK_S_IOERR));
        dwz(&m, 0x3000, 0, 9, 0);
        let p = parse_with(
            &m,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[seg(0x3000, 16)],
            &st,
            &LIMITS,
        );
        assert_eq!(p, Parsed::Reject(VIRTIO_BLK_S_IOERR));
        dwz(&m, 0x3000, 12, 8, 0);
        let p = parse_with(
            &m,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[seg(0x3000, 16)],
            &st,
            &LIMITS,
        );
        assert_eq!(p, Parsed::Reject(VIRTIO_BLK_S_IOERR));
        // Not negotiated.
        let off = DiskLimits {
            discard: false,
            write_zeroes: false,
            ..LIMITS
        };
        let p = parse_with(&m, VIRTIO_BLK_T_DISCARD, 0, &[seg(0x2000, 16)], &st, &off);
        assert_eq!(p, Parsed::Reject(VIRTIO_BLK_S_UNSUPP));
        let ro = DiskLimits {
            read_only: true,
            ..LIMITS
        };
        let p = parse_with(
            &m,
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[seg(0x2000, 16)],
            &st,
            &ro,
        );
        assert_eq!(p, Parsed::Reject(VIRTIO_BLK_S_IOERR));
    }

    #[test]
    fn short_header_is_ioerr() {
        let m = mem();
        let chain = Chain {
            head: 0,
            readable: vec![seg(0x100, 8)],
            writable: vec![seg(0x1000, 1)],
        };
        let w = split_status(&chain).unwrap();
        assert_eq!(w.status, seg(0x1000, 1));
        assert!(w.data.is_empty());
        assert_eq!(
            Request::parse(&m, &chain, &w, &LIMITS),
            Parsed::Reject(VIRTIO_BLK_S_IOERR)
        );
        assert!(split_status(&Chain::default()).is_none());
    }
}
