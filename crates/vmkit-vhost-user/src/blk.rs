//! virtio-blk over vhost-user: [`vmkit_virtio::block::Block`] for the control plane and
//! [`vmkit_virtio::block::process_queue`] for the data plane.
//!
//! The image file is opened once. The control-plane [`Block`] and the data-plane [`BlkQueues`]
//! each hold a [`RawDisk`] over the same open file description (a `dup`), so configuration
//! reads never wait for I/O and several queues can run their requests in parallel
//! (`preadv`/`pwritev` carry their own offsets).
//!
//! Durability follows the device: without `VIRTIO_BLK_F_FLUSH` every write is synced before it
//! completes; with it the guest's flushes become `fdatasync`. On top of that the daemon
//! flushes the image when a frontend disconnects and before it exits (SIGTERM), so a clean
//! shutdown never loses a completed write.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmkit_virtio::block::{process_queue, Block, BlockConfig, BlockFeatures, DiskError, RawDisk};

use crate::backend::{Notify, QueueHandler, Threading, VirtioBackend};

/// Errors building a block backend.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The image cannot be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The image is smaller than one sector.
    #[error("disk image {path} is {size} bytes, smaller than one 512-byte sector")]
    TooSmall {
        /// The image path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The image cannot be inspected.
    #[error("cannot use disk image {path}: {source}")]
    Disk {
        /// The image path.
        path: PathBuf,
        /// What vmkit-virtio reported.
        source: DiskError,
    },
}

/// How to serve a disk image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkOptions {
    /// The raw image file.
    pub disk: PathBuf,
    /// Export read-only (VIRTIO_BLK_F_RO; the file is opened without write access).
    pub readonly: bool,
    /// Number of request queues (VIRTIO_BLK_F_MQ when > 1).
    pub num_queues: u16,
    /// Maximum size of each queue. Keep it equal to the frontend's queue size: the device
    /// advertises `seg_max = queue_size - 2`.
    pub queue_size: u16,
    /// Serial number returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    pub serial: Option<String>,
    /// Logical block size reported to the driver (`blk_size`).
    pub logical_block_size: u32,
}

impl BlkOptions {
    /// Defaults matching QEMU's `vhost-user-blk-pci` (one queue of 128 entries, 512-byte blocks).
    pub fn new(disk: impl Into<PathBuf>) -> Self {
        Self {
            disk: disk.into(),
            readonly: false,
            num_queues: 1,
            queue_size: 128,
            serial: None,
            logical_block_size: 512,
        }
    }
}

/// The data plane of a block backend: the image and the virtio-blk request loop.
#[derive(Debug)]
pub struct BlkQueues {
    disk: RawDisk,
}

impl BlkQueues {
    /// The image as the data plane sees it.
    pub fn disk(&self) -> &RawDisk {
        &self.disk
    }
}

impl QueueHandler for BlkQueues {
    fn process_queue(
        &self,
        _index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap<()>,
        acked_features: u64,
    ) -> Result<Notify, virtio_queue::Error> {
        let features = BlockFeatures::from_acked(acked_features);
        let out = process_queue(queue, mem, &self.disk, &features, None)?;
        Ok(Notify::used(out.completed > 0))
    }

    fn flush(&self) -> io::Result<()> {
        if self.disk.read_only() {
            return Ok(());
        }
        self.disk.flush()
    }
}

/// A vhost-user-blk backend.
pub type BlkBackend = VirtioBackend<BlkQueues>;

fn open_disk(path: &Path, readonly: bool) -> Result<(RawDisk, RawDisk), BlkError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)
        .map_err(|source| BlkError::Open {
            path: path.to_owned(),
            source,
        })?;
    let dup = file.try_clone().map_err(|source| BlkError::Open {
        path: path.to_owned(),
        source,
    })?;
    let disk = |f| {
        RawDisk::from_file(f, readonly).map_err(|source| BlkError::Disk {
            path: path.to_owned(),
            source,
        })
    };
    Ok((disk(file)?, disk(dup)?))
}

/// Builds a block backend from `opts`.
///
/// # Errors
/// [`BlkError`] when the image cannot be opened or is smaller than a sector.
pub fn blk_backend(opts: &BlkOptions) -> Result<BlkBackend, BlkError> {
    let (mut control, mut data) = open_disk(&opts.disk, opts.readonly)?;
    if control.capacity() == 0 {
        return Err(BlkError::TooSmall {
            path: opts.disk.clone(),
            size: control.size(),
        });
    }
    if let Some(serial) = &opts.serial {
        control = control.with_id(serial);
        data = data.with_id(serial);
    }
    let cfg = BlockConfig {
        num_queues: opts.num_queues,
        queue_size: opts.queue_size,
        blk_size: opts.logical_block_size,
    };
    let threading = if opts.num_queues > 1 {
        Threading::PerQueue
    } else {
        Threading::Single
    };
    Ok(VirtioBackend::new(
        "vhost-user-blk",
        Box::new(Block::new(control, cfg)),
        BlkQueues { disk: data },
        threading,
    ))
}
