//! A tiny virtio-mmio "driver" for the integration tests.
#![allow(dead_code)]

use vm_memory::{GuestAddress, GuestAddressSpace};
use vmkit_virtio::features::*;
use vmkit_virtio::mmio::{regs, MmioTransport};

pub fn rd<M: GuestAddressSpace>(t: &mut MmioTransport<M>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

pub fn wr<M: GuestAddressSpace>(t: &mut MmioTransport<M>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

pub fn device_features<M: GuestAddressSpace>(t: &mut MmioTransport<M>) -> u64 {
    wr(t, regs::DEVICE_FEATURES_SEL, 0);
    let lo = rd(t, regs::DEVICE_FEATURES);
    wr(t, regs::DEVICE_FEATURES_SEL, 1);
    let hi = rd(t, regs::DEVICE_FEATURES);
    u64::from(lo) | (u64::from(hi) << 32)
}

pub fn write_driver_features<M: GuestAddressSpace>(t: &mut MmioTransport<M>, f: u64) {
    wr(t, regs::DRIVER_FEATURES_SEL, 0);
    wr(t, regs::DRIVER_FEATURES, f as u32);
    wr(t, regs::DRIVER_FEATURES_SEL, 1);
    wr(t, regs::DRIVER_FEATURES, (f >> 32) as u32);
}

/// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns whether FEATURES_OK stuck.
pub fn negotiate<M: GuestAddressSpace>(t: &mut MmioTransport<M>, f: u64) -> bool {
    wr(t, regs::STATUS, 0);
    wr(t, regs::STATUS, STATUS_ACKNOWLEDGE);
    wr(t, regs::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    write_driver_features(t, f);
    wr(
        t,
        regs::STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    rd(t, regs::STATUS) & STATUS_FEATURES_OK != 0
}

pub fn setup_queue<M: GuestAddressSpace>(
    t: &mut MmioTransport<M>,
    index: u32,
    size: u32,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
) -> bool {
    wr(t, regs::QUEUE_SEL, index);
    wr(t, regs::QUEUE_NUM, size);
    wr(t, regs::QUEUE_DESC_LOW, desc.0 as u32);
    wr(t, regs::QUEUE_DESC_HIGH, (desc.0 >> 32) as u32);
    wr(t, regs::QUEUE_DRIVER_LOW, avail.0 as u32);
    wr(t, regs::QUEUE_DRIVER_HIGH, (avail.0 >> 32) as u32);
    wr(t, regs::QUEUE_DEVICE_LOW, used.0 as u32);
    wr(t, regs::QUEUE_DEVICE_HIGH, (used.0 >> 32) as u32);
    wr(t, regs::QUEUE_READY, 1);
    rd(t, regs::QUEUE_READY) == 1
}

pub fn driver_ok<M: GuestAddressSpace>(t: &mut MmioTransport<M>) {
    wr(
        t,
        regs::STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
}
