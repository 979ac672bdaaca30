//! Feature bits, status bits and device IDs from the virtio 1.2 specification.
//!
//! They are spelled out here (rather than re-exported from `virtio-bindings`) so that every
//! constant the devices negotiate is documented in one place, next to the spec section that
//! defines it.

/// Device ID of a network card (virtio 1.2, 5).
pub const DEVICE_ID_NET: u32 = 1;
/// Device ID of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;
/// Device ID of a console.
pub const DEVICE_ID_CONSOLE: u32 = 3;
/// Device ID of an entropy source.
pub const DEVICE_ID_RNG: u32 = 4;

/// The device accepts indirect descriptor tables (2.7.5.3).
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Used/available event index notification suppression (2.7.7).
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// The device complies with virtio 1.x ("modern"); mandatory for virtio-mmio version 2.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status: the guest noticed the device (2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// Device status: the guest knows how to drive the device.
pub const STATUS_DRIVER: u32 = 2;
/// Device status: the driver is set up and ready to drive the device.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Device status: the driver has acknowledged the features it understands.
pub const STATUS_FEATURES_OK: u32 = 8;
/// Device status: the device hit an error it cannot recover from without a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 64;
/// Device status: the guest gave up on the device.
pub const STATUS_FAILED: u32 = 128;

/// Returns the bit mask of feature number `bit`.
pub const fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// Features every device in this crate offers: modern device, indirect descriptors, event idx.
pub const COMMON_FEATURES: u64 = feature(VIRTIO_F_VERSION_1)
    | feature(VIRTIO_RING_F_INDIRECT_DESC)
    | feature(VIRTIO_RING_F_EVENT_IDX);
