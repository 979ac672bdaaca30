//! The block device state machine and its request loop.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemory};

use crate::block::backend::RawDisk;
use crate::block::request::*;
use crate::chain::ChainWriter;
use crate::device::{
    pop_chain, read_config_bytes, ActivateError, DeviceCore, DeviceError, PoppedChain, VirtioDevice,
};
use crate::features::{feature, COMMON_FEATURES, DEVICE_ID_BLOCK};
use crate::interrupt::Interrupt;
use crate::rate_limiter::RateLimiter;
use crate::state::{DeviceState, StateError};

/// Feature bits of virtio-blk (5.2.3).
#[allow(missing_docs)]
pub mod bits {
    pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
    pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
    pub const VIRTIO_BLK_F_RO: u32 = 5;
    pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
    pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
    pub const VIRTIO_BLK_F_MQ: u32 = 12;
    pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
    pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
}
use bits::*;

/// Largest single data segment the device accepts (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most sectors per discard / write-zeroes segment.
pub const MAX_DWZ_SECTORS: u32 = 1 << 22;
/// Most segments per discard / write-zeroes request.
pub const MAX_DWZ_SEG: u32 = 16;
/// Size of the configuration space this device exposes.
pub const CONFIG_LEN: usize = 60;

/// The `seg_max` advertised (and enforced) for a queue of `queue_size` entries: every chain
/// also carries a header and a status descriptor.
pub fn seg_max_for(queue_size: u16) -> u32 {
    u32::from(queue_size.max(2) - 2)
}

/// How to build a [`Block`] device.
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    /// Number of request queues (VIRTIO_BLK_F_MQ when > 1).
    pub num_queues: u16,
    /// Maximum size of each queue (a power of two).
    pub queue_size: u16,
    /// Logical block size reported in `blk_size`.
    pub blk_size: u32,
}

impl Default for BlockConfig {
    fn default() -> Self {
        Self {
            num_queues: 1,
            queue_size: 256,
            blk_size: 512,
        }
    }
}

/// The negotiated features that change request handling.
#[derive(Debug, Clone, Copy, Default)]
pub struct BlockFeatures {
    /// FLUSH negotiated (write-back); otherwise writes are synced before completion.
    pub flush: bool,
    /// DISCARD negotiated.
    pub discard: bool,
    /// WRITE_ZEROES negotiated.
    pub write_zeroes: bool,
}

impl BlockFeatures {
    /// Extracts the relevant bits from an acked feature set.
    pub fn from_acked(acked: u64) -> Self {
        Self {
            flush: acked & feature(VIRTIO_BLK_F_FLUSH) != 0,
            discard: acked & feature(VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: acked & feature(VIRTIO_BLK_F_WRITE_ZEROES) != 0,
        }
    }
}

/// What [`process_queue`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueOutcome {
    /// Requests completed (returned in the used ring).
    pub completed: u32,
    /// Processing stopped because the rate limiter refused a request, which stays queued.
    pub throttled: bool,
}

/// Executes `req`; returns `(status, bytes written into device-writable data buffers)`.
fn execute<MM: GuestMemory>(
    mem: &MM,
    disk: &RawDisk,
    f: &BlockFeatures,
    req: &Request,
) -> (u8, u32) {
    let ioerr = |e: std::io::Error| {
        log::warn!("virtio-blk: request type {} failed: {e}", req.request_type);
        (VIRTIO_BLK_S_IOERR, 0)
    };
    match &req.kind {
        RequestKind::Read { sector, data } => {
            // parse() proved sector * 512 + len <= capacity * 512, so no overflow here.
            match disk.read_to_guest(mem, data, sector * SECTOR_SIZE) {
                Ok(()) => {
                    let n: u64 = data.iter().map(|s| u64::from(s.len)).sum();
                    (VIRTIO_BLK_S_OK, u32::try_from(n).unwrap_or(u32::MAX))
                }
                Err(e) => ioerr(e),
            }
        }
        RequestKind::Write { sector, data } => {
            let r = disk
                .write_from_guest(mem, data, sector * SECTOR_SIZE)
                .and_then(|()| {
                    // Write-through unless the driver negotiated FLUSH: the completion promises
                    // durability.
                    if f.flush {
                        Ok(())
                    } else {
                        disk.flush()
                    }
                });
            match r {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => ioerr(e),
            }
        }
        RequestKind::Flush => match disk.flush() {
            Ok(()) => (VIRTIO_BLK_S_OK, 0),
            Err(e) => ioerr(e),
        },
        RequestKind::GetId { data } => {
            let mut w = ChainWriter::new(data.clone());
            let n = (w.remaining() as usize).min(ID_LEN);
            match w.write_all(mem, &disk.id()[..n]) {
                Ok(()) => (VIRTIO_BLK_S_OK, n as u32),
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            }
        }
        RequestKind::Discard(ranges) => {
            for r in ranges {
                if let Err(e) = disk.discard(r) {
                    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                        return (VIRTIO_BLK_S_UNSUPP, 0);
                    }
                    return ioerr(e);
                }
            }
            (VIRTIO_BLK_S_OK, 0)
        }
        RequestKind::WriteZeroes(ranges) => {
            for r in ranges {
                if let Err(e) = disk.write_zeroes(r) {
                    return ioerr(e);
                }
            }
            if !f.flush {
                if let Err(e) = disk.flush() {
                    return ioerr(e);
                }
            }
            (VIRTIO_BLK_S_OK, 0)
        }
    }
}

/// Processes every available request of one block queue.
///
/// Malformed requests are answered with `IOERR`/`UNSUPP` in their status byte; chains that
/// fail validation (or have no writable status byte) are returned with length 0. `Err` means
/// the queue itself is broken and the device needs a reset.
pub fn process_queue<MM: GuestMemory>(
    queue: &mut Queue,
    mem: &MM,
    disk: &RawDisk,
    features: &BlockFeatures,
    mut limiter: Option<&mut RateLimiter>,
) -> Result<QueueOutcome, virtio_queue::Error> {
    let limits = DiskLimits {
        capacity: disk.capacity(),
        read_only: disk.read_only(),
        flush: features.flush,
        discard: features.discard,
        write_zeroes: features.write_zeroes,
        max_dwz_sectors: MAX_DWZ_SECTORS,
        max_dwz_seg: MAX_DWZ_SEG,
    };
    // The same values `Block::new` advertises: `size_max` and `seg_max = queue size - 2` (the
    // queue's maximum size is the one the device was built with).
    let seg_limits = SegmentLimits {
        seg_max: seg_max_for(queue.max_size()),
        size_max: SIZE_MAX,
    };
    let mut out = QueueOutcome::default();
    // Notification-suppression loop: see rng::process_queue.
    loop {
        queue.disable_notification(mem)?;
        while let Some(popped) = pop_chain(queue, mem)? {
            let chain = match popped {
                PoppedChain::Invalid { head, .. } => {
                    queue.add_used(mem, head, 0)?;
                    out.completed += 1;
                    continue;
                }
                PoppedChain::Valid(c) => c,
            };
            let head = chain.head;
            // Transfer size for the rate limiter (header and status byte excluded).
            let bytes = chain.readable_len().saturating_sub(HEADER_LEN)
                + chain.writable_len().saturating_sub(1);
            // The chain's lists move into the request: no copies on the per-request path.
            let Some(split) = split_writable(chain.writable) else {
                log::warn!("virtio-blk: request without a writable status byte");
                queue.add_used(mem, head, 0)?;
                out.completed += 1;
                continue;
            };
            let status_addr = split.status.addr;
            let parsed = match Request::parse_owned(mem, chain.readable, split.data, &limits) {
                Parsed::Request(r) if r.exceeds(&seg_limits) => {
                    log::warn!("virtio-blk: request exceeds seg_max/size_max");
                    Parsed::Reject(VIRTIO_BLK_S_IOERR)
                }
                p => p,
            };
            if let (Some(l), Parsed::Request(_)) = (limiter.as_deref_mut(), &parsed) {
                if !l.consume(bytes) {
                    // Leave the request for the timer to retry.
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    out.throttled = true;
                    // The limiter's timer resumes the queue; driver kicks stay suppressed.
                    return Ok(out);
                }
            }
            let (status, len) = match parsed {
                Parsed::Reject(s) => (s, 0),
                Parsed::Request(req) => execute(mem, disk, features, &req),
            };
            // The status segment passed parse_chain, so this write is inside guest memory.
            if mem.write_obj(status, status_addr).is_err() {
                log::warn!("virtio-blk: cannot write status byte");
            }
            queue.add_used(mem, head, len.saturating_add(1))?;
            out.completed += 1;
        }
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    Ok(out)
}

/// A virtio-blk device.
pub struct Block<M: GuestAddressSpace> {
    core: DeviceCore<M>,
    disk: RawDisk,
    config: [u8; CONFIG_LEN],
    limiter: Option<RateLimiter>,
}

impl<M: GuestAddressSpace> std::fmt::Debug for Block<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("core", &self.core)
            .field("disk", &self.disk)
            .finish()
    }
}

impl<M: GuestAddressSpace> Block<M> {
    /// A block device over `disk`.
    pub fn new(disk: RawDisk, cfg: BlockConfig) -> Self {
        let num_queues = cfg.num_queues.max(1);
        let queue_size = cfg.queue_size.max(2);
        let mut features = COMMON_FEATURES
            | feature(VIRTIO_BLK_F_FLUSH)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_SIZE_MAX)
            | feature(VIRTIO_BLK_F_DISCARD)
            | feature(VIRTIO_BLK_F_WRITE_ZEROES);
        if disk.read_only() {
            features |= feature(VIRTIO_BLK_F_RO);
            features &= !(feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES));
        }
        if num_queues > 1 {
            features |= feature(VIRTIO_BLK_F_MQ);
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&disk.capacity().to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        // Two descriptors of every chain are header and status.
        config[12..16].copy_from_slice(&seg_max_for(queue_size).to_le_bytes());
        config[20..24].copy_from_slice(&cfg.blk_size.to_le_bytes());
        config[34..36].copy_from_slice(&num_queues.to_le_bytes());
        config[36..40].copy_from_slice(&MAX_DWZ_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_DWZ_SEG.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes());
        config[48..52].copy_from_slice(&MAX_DWZ_SECTORS.to_le_bytes());
        config[52..56].copy_from_slice(&MAX_DWZ_SEG.to_le_bytes());
        config[56] = 1;
        Self {
            core: DeviceCore::new(
                DEVICE_ID_BLOCK,
                features,
                vec![queue_size; usize::from(num_queues)],
            ),
            disk,
            config,
            limiter: None,
        }
    }

    /// Limits the device's throughput (bytes and requests).
    pub fn with_rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.limiter = Some(limiter);
        self
    }

    /// The image.
    pub fn disk(&self) -> &RawDisk {
        &self.disk
    }

    fn run_queue(&mut self, index: u16) -> Result<QueueOutcome, DeviceError> {
        let mem = self
            .core
            .mem
            .as_ref()
            .ok_or(DeviceError::NotActivated)?
            .memory();
        let features = BlockFeatures::from_acked(self.core.acked_features);
        let q = self
            .core
            .queues
            .get_mut(usize::from(index))
            .ok_or(DeviceError::NoSuchQueue(index))?;
        if !q.ready() {
            return Ok(QueueOutcome::default());
        }
        let out = process_queue(q, &*mem, &self.disk, &features, self.limiter.as_mut()).map_err(
            |source| DeviceError::Queue {
                queue: index,
                source,
            },
        )?;
        if out.completed > 0 {
            self.core.signal_used(index)?;
        }
        Ok(out)
    }
}

impl<M: GuestAddressSpace + Send> VirtioDevice<M> for Block<M> {
    fn device_type(&self) -> u32 {
        DEVICE_ID_BLOCK
    }
    crate::device::core_accessors!();
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // `writeback` is only writable with CONFIG_WCE, which is not offered.
        log::warn!("virtio-blk: write to read-only config offset {offset:#x}");
    }
    fn activate(
        &mut self,
        mem: M,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        self.core.activate(mem, queues, interrupt, 1)
    }
    fn queue_notify(&mut self, index: u16) -> Result<(), DeviceError> {
        if self.limiter.as_ref().is_some_and(RateLimiter::is_blocked) {
            // The timer will run the queues.
            return Ok(());
        }
        self.run_queue(index).map(|_| ())
    }
    fn backend_fds(&self) -> Vec<std::os::unix::io::RawFd> {
        self.limiter.iter().map(RateLimiter::timer_fd).collect()
    }
    fn backend_event(&mut self, index: usize) -> Result<(), DeviceError> {
        if index != 0 {
            return Ok(());
        }
        if let Some(l) = self.limiter.as_mut() {
            l.timer_event();
        }
        for q in 0..self.core.queues.len() {
            // Queue counts come from u16 sizes, so the index fits.
            if self.run_queue(q as u16)?.throttled {
                break;
            }
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.core.reset();
    }
    fn save_state(&self) -> DeviceState {
        self.core.save(Vec::new())
    }
    fn restore_state(
        &mut self,
        state: &DeviceState,
        mem: M,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), StateError> {
        if let Some(queues) = self.core.restore(state)? {
            self.core.activate(mem, queues, interrupt, 1)?;
        }
        Ok(())
    }
}
