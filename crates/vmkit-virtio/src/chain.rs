//! Validated descriptor chains: the one place where guest-supplied descriptors are checked.
//!
//! `virtio_queue::DescriptorChain` walks descriptors but, by design, simply *stops* when it
//! meets something wrong (a `next` index out of the table, a loop that exhausts its budget, an
//! indirect table inside an indirect table, a descriptor table outside guest memory, a chain
//! longer than 4 GiB). A device that trusted the shortened chain could mistake a truncated
//! request for a complete one. [`parse_chain`] therefore collects the whole chain and rejects it
//! unless the walk ended on a descriptor *without* `VIRTQ_DESC_F_NEXT`.
//!
//! It also checks what the walk does not:
//! * every buffer has a non-zero length and lies entirely inside guest memory;
//! * device-readable buffers come before device-writable ones (2.7.4.2);
//! * no two buffers overlap (a request whose data buffer aliases its status byte would let the
//!   guest observe half-written results);
//! * the chain has at most `max_len` descriptors (the queue size, 2.7.5.3.1).
//!
//! The result, [`Chain`], is a plain list of `(address, length)` segments. [`ChainReader`] and
//! [`ChainWriter`] consume them sequentially, so device code never indexes guest memory itself.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// Why a descriptor chain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The walk stopped before a descriptor without `NEXT`: a loop, a `next` index out of the
    /// table, a nested or malformed indirect table, or an unreadable descriptor table.
    #[error("descriptor chain with head {head} is truncated after {walked} descriptors (loop, bad next index, nested indirect table or unreadable table)")]
    Truncated {
        /// Head index of the chain.
        head: u16,
        /// Number of descriptors walked before the walk stopped.
        walked: usize,
    },
    /// The chain has more descriptors than the queue allows.
    #[error("descriptor chain with head {head} has more than {max} descriptors")]
    TooLong {
        /// Head index of the chain.
        head: u16,
        /// The maximum (queue size).
        max: usize,
    },
    /// A descriptor has length zero.
    #[error("descriptor {position} of chain {head} has length 0")]
    ZeroLength {
        /// Head index of the chain.
        head: u16,
        /// Position of the descriptor in the chain.
        position: usize,
    },
    /// A buffer is not entirely inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest physical address of the buffer.
        addr: u64,
        /// Length of the buffer.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error(
        "descriptor {position} of chain {head} is device-readable after a device-writable one"
    )]
    ReadableAfterWritable {
        /// Head index of the chain.
        head: u16,
        /// Position of the offending descriptor.
        position: usize,
    },
    /// Two buffers of the chain overlap.
    #[error("buffers at {first:#x} and {second:#x} overlap")]
    Overlap {
        /// Address of the lower buffer.
        first: u64,
        /// Address of the buffer that starts inside it.
        second: u64,
    },
}

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// A descriptor chain that passed every check of [`parse_chain`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// Head index, to be returned in the used ring.
    pub head: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Segment>,
}

impl Chain {
    /// Total length of the device-readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total length of the device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// Chains up to this many descriptors are checked without a heap allocation.
const SMALL_CHAIN: usize = 16;

/// Walks `chain` completely and validates it (see the module documentation).
pub fn parse_chain<M>(mut chain: DescriptorChain<M>, max_len: usize) -> Result<Chain, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let mut out = Chain {
        head,
        ..Chain::default()
    };
    let mut walked = 0usize;
    let mut ended = false;
    for desc in chain.by_ref() {
        if walked >= max_len {
            return Err(ChainError::TooLong { head, max: max_len });
        }
        let position = walked;
        walked += 1;
        ended = !desc.has_next();
        if desc.len() == 0 {
            return Err(ChainError::ZeroLength { head, position });
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.is_write_only() {
            out.writable.push(seg);
        } else if out.writable.is_empty() {
            out.readable.push(seg);
        } else {
            return Err(ChainError::ReadableAfterWritable { head, position });
        }
    }
    if !ended {
        return Err(ChainError::Truncated { head, walked });
    }
    let mem = chain.memory();
    // Most chains are a handful of descriptors: check them in a stack array rather than a
    // heap list (this runs for every request).
    let mut small = [Segment {
        addr: GuestAddress(0),
        len: 0,
    }; SMALL_CHAIN];
    let mut large = Vec::new();
    let total = out.readable.len() + out.writable.len();
    let all: &mut [Segment] = if total <= SMALL_CHAIN {
        for (dst, src) in small
            .iter_mut()
            .zip(out.readable.iter().chain(out.writable.iter()))
        {
            *dst = *src;
        }
        small.get_mut(..total).unwrap_or_default()
    } else {
        large.extend(out.readable.iter().chain(out.writable.iter()).copied());
        &mut large
    };
    for seg in all.iter() {
        // `len` is a u32, so the cast to usize is lossless on every supported host.
        if !mem.check_range(seg.addr, seg.len as usize, Permissions::Read) {
            return Err(ChainError::OutsideMemory {
                addr: seg.addr.0,
                len: seg.len,
            });
        }
    }
    all.sort_unstable_by_key(|s| s.addr.0);
    for pair in all.windows(2) {
        // check_range above guarantees `addr + len` does not overflow.
        if pair[0].addr.0.saturating_add(u64::from(pair[0].len)) > pair[1].addr.0 {
            return Err(ChainError::Overlap {
                first: pair[0].addr.0,
                second: pair[1].addr.0,
            });
        }
    }
    Ok(out)
}

/// Errors of [`ChainReader`] and [`ChainWriter`].
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The request wants more bytes than the buffers hold.
    #[error("buffers hold {available} bytes, {wanted} needed")]
    TooShort {
        /// Bytes left in the buffers.
        available: u64,
        /// Bytes asked for.
        wanted: u64,
    },
    /// Guest memory refused the access (should not happen after [`parse_chain`]).
    #[error("guest memory access failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// A cursor over a list of segments: which segment, and how far into it.
#[derive(Debug, Clone)]
struct Cursor {
    segments: Vec<Segment>,
    index: usize,
    offset: u32,
}

impl Cursor {
    fn new(segments: Vec<Segment>) -> Self {
        Self {
            segments,
            index: 0,
            offset: 0,
        }
    }

    fn remaining(&self) -> u64 {
        let total: u64 = self
            .segments
            .iter()
            .skip(self.index)
            .map(|s| u64::from(s.len))
            .sum();
        total - u64::from(self.offset)
    }

    /// Takes the next contiguous piece of at most `max` bytes.
    fn take(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        let seg = *self.segments.get(self.index)?;
        let left = (seg.len - self.offset) as usize;
        let n = left.min(max);
        let addr = GuestAddress(seg.addr.0 + u64::from(self.offset));
        // n <= left <= u32::MAX, so the cast back is lossless.
        self.offset += n as u32;
        if self.offset == seg.len {
            self.index += 1;
            self.offset = 0;
        }
        Some((addr, n))
    }

    /// Splits off the next `n` bytes as their own segment list.
    fn split(&mut self, mut n: u64) -> Result<Vec<Segment>, IoError> {
        let available = self.remaining();
        if n > available {
            return Err(IoError::TooShort {
                available,
                wanted: n,
            });
        }
        let mut out = Vec::new();
        while n > 0 {
            let max = usize::try_from(n).unwrap_or(usize::MAX);
            match self.take(max) {
                Some((addr, len)) => {
                    out.push(Segment {
                        addr,
                        len: len as u32,
                    });
                    n -= len as u64;
                }
                None => break,
            }
        }
        Ok(out)
    }
}

/// Reads the device-readable part of a chain front to back.
#[derive(Debug, Clone)]
pub struct ChainReader {
    cursor: Cursor,
}

impl ChainReader {
    /// Starts at the first byte of `segments`.
    pub fn new(segments: Vec<Segment>) -> Self {
        Self {
            cursor: Cursor::new(segments),
        }
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> u64 {
        self.cursor.remaining()
    }

    /// Fills `buf` completely or fails without consuming a partial read.
    pub fn read_exact<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &mut [u8],
    ) -> Result<(), IoError> {
        let available = self.cursor.remaining();
        let wanted = buf.len() as u64;
        if wanted > available {
            return Err(IoError::TooShort { available, wanted });
        }
        // Piece by piece straight from the cursor: no segment list is built (this runs for
        // every request header).
        let mut rest = buf;
        while !rest.is_empty() {
            let Some((addr, n)) = self.cursor.take(rest.len()) else {
                break;
            };
            let (now, later) = rest.split_at_mut(n);
            mem.read_slice(now, addr)?;
            rest = later;
        }
        Ok(())
    }

    /// The segments not yet consumed, reusing this reader's list (no allocation): what
    /// follows a request header, for zero-copy I/O.
    pub fn into_remaining(self) -> Vec<Segment> {
        let Cursor {
            mut segments,
            index,
            offset,
        } = self.cursor;
        segments.drain(..index.min(segments.len()));
        if let Some(first) = segments.first_mut() {
            // The cursor keeps `offset < len` of its current segment.
            first.addr = GuestAddress(first.addr.0 + u64::from(offset));
            first.len -= offset;
        }
        segments
    }

    /// Consumes the next `n` bytes and returns them as segments (for zero-copy I/O).
    pub fn split(&mut self, n: u64) -> Result<Vec<Segment>, IoError> {
        self.cursor.split(n)
    }
}

/// Writes the device-writable part of a chain front to back.
#[derive(Debug, Clone)]
pub struct ChainWriter {
    cursor: Cursor,
    written: u64,
}

impl ChainWriter {
    /// Starts at the first byte of `segments`.
    pub fn new(segments: Vec<Segment>) -> Self {
        Self {
            cursor: Cursor::new(segments),
            written: 0,
        }
    }

    /// Bytes still writable.
    pub fn remaining(&self) -> u64 {
        self.cursor.remaining()
    }

    /// Bytes written so far (the `len` reported in the used ring).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Writes all of `buf` or fails without writing anything.
    pub fn write_all<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &[u8],
    ) -> Result<(), IoError> {
        let segs = self.cursor.split(buf.len() as u64)?;
        let mut done = 0usize;
        for s in segs {
            let n = s.len as usize;
            mem.write_slice(&buf[done..done + n], s.addr)?;
            done += n;
        }
        self.written += buf.len() as u64;
        Ok(())
    }

    /// Consumes the next `n` bytes as segments the caller fills itself (zero-copy I/O); they
    /// count as written.
    pub fn split(&mut self, n: u64) -> Result<Vec<Segment>, IoError> {
        let segs = self.cursor.split(n)?;
        self.written += n;
        Ok(segs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 0x1_0000;
    const QS: u16 = 8;

    fn setup(descs: &[(u64, u32, u16, u16)], head: u16) -> (GuestMemoryMmap<()>, Queue) {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            m.write_slice(&d, GuestAddress(16 * i as u64)).unwrap();
        }
        m.write_obj(head, GuestAddress(0x84)).unwrap();
        m.write_obj(1u16, GuestAddress(0x82)).unwrap();
        let mut q = Queue::new(QS).unwrap();
        q.set_size(QS);
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(0x80), Some(0));
        q.set_used_ring_address(Some(0xa0), Some(0));
        q.set_ready(true);
        (m, q)
    }

    fn parse(descs: &[(u64, u32, u16, u16)], head: u16) -> Result<Chain, ChainError> {
        let (m, mut q) = setup(descs, head);
        let c = q.iter(&m).unwrap().next().unwrap();
        parse_chain(c, usize::from(QS))
    }

    #[test]
    fn reader_remaining_after_a_header_reuses_the_list() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        m.write_slice(&(0..64u8).collect::<Vec<_>>(), GuestAddress(0x100))
            .unwrap();
        let seg = |a: u64, l: u32| Segment {
            addr: GuestAddress(a),
            len: l,
        };
        // Header spans the first segment and 6 bytes of the second.
        let mut r = ChainReader::new(vec![seg(0x100, 10), seg(0x110, 20), seg(0x130, 8)]);
        let mut h = [0u8; 16];
        r.read_exact(&m, &mut h).unwrap();
        assert_eq!(&h[..10], &(0..10).collect::<Vec<u8>>()[..]);
        assert_eq!(&h[10..], &[16, 17, 18, 19, 20, 21]);
        assert_eq!(r.remaining(), 22);
        let mut too_long = [0u8; 23];
        assert!(matches!(
            r.read_exact(&m, &mut too_long),
            Err(IoError::TooShort {
                available: 22,
                wanted: 23
            })
        ));
        assert_eq!(r.into_remaining(), vec![seg(0x116, 14), seg(0x130, 8)]);
        // Consumed exactly to a segment boundary, and completely.
        let mut r = ChainReader::new(vec![seg(0x100, 16), seg(0x110, 4)]);
        r.read_exact(&m, &mut h).unwrap();
        assert_eq!(r.into_remaining(), vec![seg(0x110, 4)]);
        let mut r = ChainReader::new(vec![seg(0x100, 16)]);
        r.read_exact(&m, &mut h).unwrap();
        assert!(r.into_remaining().is_empty());
    }

    #[test]
    fn long_chains_are_checked_like_short_ones() {
        // More descriptors than the stack array holds: the heap path finds overlaps and
        // out-of-memory buffers too.
        let n = SMALL_CHAIN + 4;
        let (m, mut q) = setup(&[], 0);
        let table = 0x4000u64;
        let put = |i: u64, addr: u64, last: bool| {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&16u32.to_le_bytes());
            let flags: u16 = if last { 0 } else { 1 };
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&((i + 1) as u16).to_le_bytes());
            m.write_slice(&d, GuestAddress(table + 16 * i)).unwrap();
        };
        let run = |q: &mut Queue| {
            let c = q.iter(&m).unwrap().next().unwrap();
            parse_chain(c, 64)
        };
        // Head 0 is an indirect descriptor pointing at `table`.
        let indirect = |q: &mut Queue, m: &GuestMemoryMmap<()>| {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&table.to_le_bytes());
            d[8..12].copy_from_slice(&((16 * n) as u32).to_le_bytes());
            d[12..14].copy_from_slice(&4u16.to_le_bytes());
            m.write_slice(&d, GuestAddress(0)).unwrap();
            q.set_next_avail(0);
        };
        for i in 0..n as u64 {
            put(i, 0x8000 + 32 * i, i + 1 == n as u64);
        }
        indirect(&mut q, &m);
        let c = run(&mut q).unwrap();
        assert_eq!(c.readable.len(), n);
        put(3, 0x8000 + 32 * 2 + 8, false);
        indirect(&mut q, &m);
        assert_eq!(
            run(&mut q),
            Err(ChainError::Overlap {
                first: 0x8040,
                second: 0x8048
            })
        );
        put(3, MEM - 8, false);
        indirect(&mut q, &m);
        assert_eq!(
            run(&mut q),
            Err(ChainError::OutsideMemory {
                addr: MEM - 8,
                len: 16
            })
        );
    }

    #[test]
    fn each_rejection() {
        assert!(parse(&[(0x1000, 16, 0, 0)], 0).is_ok());
        assert!(matches!(
            parse(&[(0x1000, 16, 1, 0)], 0),
            Err(ChainError::Truncated { .. })
        ));
        assert!(matches!(
            parse(&[(0x1000, 0, 0, 0)], 0),
            Err(ChainError::ZeroLength { .. })
        ));
        assert!(matches!(
            parse(&[(MEM - 8, 16, 0, 0)], 0),
            Err(ChainError::OutsideMemory { .. })
        ));
        assert!(matches!(
            parse(&[(0x1000, 16, 3, 1), (0x2000, 16, 0, 0)], 0),
            Err(ChainError::ReadableAfterWritable { .. })
        ));
        assert!(matches!(
            parse(&[(0x1000, 16, 1, 1), (0x100f, 16, 2, 0)], 0),
            Err(ChainError::Overlap { .. })
        ));
        assert!(matches!(
            parse(&[(0x1000, 16, 0, 0)], 9),
            Err(ChainError::Truncated { .. })
        ));
        // Indirect table of 9 entries in an 8-entry queue.
        let mut descs = vec![(0x4000u64, 9 * 16, 4u16, 0u16)];
        descs.resize(8, (0, 0, 0, 0));
        let (m, mut q) = setup(&descs, 0);
        for i in 0..9u64 {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&(0x5000 + 0x100 * i).to_le_bytes());
            d[8..12].copy_from_slice(&16u32.to_le_bytes());
            let (flags, next) = if i < 8 { (1u16, i as u16 + 1) } else { (0, 0) };
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            m.write_slice(&d, GuestAddress(0x4000 + 16 * i)).unwrap();
        }
        let c = q.iter(&m).unwrap().next().unwrap();
        assert!(matches!(parse_chain(c, 8), Err(ChainError::TooLong { .. })));
        let e = ChainError::OutsideMemory { addr: 0x10, len: 4 };
        assert!(e.to_string().contains("0x10"));
    }

    #[test]
    fn reader_and_writer_cross_segments() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let segs = vec![
            Segment {
                addr: GuestAddress(0x100),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x200),
                len: 5,
            },
        ];
        let mut w = ChainWriter::new(segs.clone());
        w.write_all(&m, b"abcd").unwrap();
        assert_eq!(w.remaining(), 4);
        assert!(
            w.write_all(&m, b"12345").is_err(),
            "too long, nothing written"
        );
        w.write_all(&m, b"efgh").unwrap();
        assert_eq!(w.written(), 8);
        let mut r = ChainReader::new(segs);
        let mut buf = [0u8; 6];
        r.read_exact(&m, &mut buf).unwrap();
        assert_eq!(&buf, b"abcdef");
        assert_eq!(
            r.split(2).unwrap(),
            vec![Segment {
                addr: GuestAddress(0x203),
                len: 2
            }]
        );
        assert!(r.read_exact(&m, &mut [0u8; 1]).is_err());
        let mut w = ChainWriter::new(vec![Segment {
            addr: GuestAddress(0x300),
            len: 4,
        }]);
        assert_eq!(w.split(3).unwrap().len(), 1);
        assert_eq!(w.written(), 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
        ))]
        /// Whatever the guest writes into the descriptor table, parsing terminates without
        /// panicking, and an accepted chain only names in-memory, non-overlapping, non-empty
        /// buffers, readable before writable, at most a queue size of them.
        #[test]
        fn accepted_chains_are_sane(
            descs in proptest::collection::vec(
                (0u64..MEM + 0x100, 0u32..0x3000, 0u16..8, 0u16..10), 8),
            head in 0u16..10,
        ) {
            let descs: Vec<_> = descs.into_iter().map(|(a, l, f, n)| (a + 0x200, l, f, n)).collect();
            if let Ok(c) = parse(&descs, head) {
                let all: Vec<_> = c.readable.iter().chain(&c.writable).collect();
                prop_assert!(!all.is_empty() && all.len() <= usize::from(QS));
                for s in &all {
                    prop_assert!(s.len > 0 && s.addr.0 + u64::from(s.len) <= MEM);
                }
                for (i, a) in all.iter().enumerate() {
                    for b in &all[i + 1..] {
                        let disjoint = a.addr.0 + u64::from(a.len) <= b.addr.0
                            || b.addr.0 + u64::from(b.len) <= a.addr.0;
                        prop_assert!(disjoint);
                    }
                }
            }
        }
    }
}
