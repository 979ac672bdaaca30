#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - [`layout`]: guest physical address space, MMIO holes, reserved ranges, E820 map.
//! - [`backing`]: host memory behind guest RAM (anonymous, memfd, file; huge and guard pages).
//! - [`dirty`]: merged dirty-page tracking (vm-memory's bitmap + a hypervisor's log).
//! - [`snapshot`]: versioned, checksummed snapshot files; validating copy restore and lazy
//!   mmap restore.
//! - [`reset`]: fast reset of a running guest to a baseline.

pub mod backing;
pub mod dirty;
pub mod layout;
pub mod reset;
pub mod snapshot;

pub use backing::{Backing, BackingError, BackingKind, HugePages, OwnedGuestRam, RegionInfo};
pub use dirty::{
    DirtyBitmap, DirtyLogError, DirtyTracker, HypervisorDirtyLog, NoHypervisorLog,
    RecordingDirtyLog, RecordingDirtyLogError,
};
pub use layout::{
    E820Entry, E820Type, LayoutError, MemoryLayout, MmioHole, RamRegion, ReservedRange, PAGE_SIZE,
};
pub use reset::{FastReset, ResetError, ResetStats};
pub use snapshot::{
    Lineage, MmapRestoreOptions, RegionEntry, RestoreStats, SnapshotError, SnapshotInfo,
    SnapshotKind,
};

/// Guest memory as every vmkit crate sees it: vm-memory's mmap backend with its atomic dirty
/// bitmap (one bit per 4 KiB page).
pub type GuestRam = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
