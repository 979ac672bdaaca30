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

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemory;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// Writes `descs` (addr, len, flags) as one chain starting at table index `first`, linking
/// them with NEXT, and publishes the head in the available ring (modulo the queue size).
pub fn push_chain<M: GuestMemory>(
    vq: &MockSplitQueue<'_, M>,
    qsize: u16,
    first: u16,
    descs: &[(u64, u32, u16)],
) {
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let idx = first + i as u16;
        let last = i + 1 == descs.len();
        let flags = if last {
            flags & !F_NEXT
        } else {
            flags | F_NEXT
        };
        let next = if last { 0 } else { idx + 1 };
        vq.desc_table()
            .store(
                idx,
                RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
            )
            .unwrap();
    }
    publish(vq, qsize, first);
}

/// Makes `head` available.
pub fn publish<M: GuestMemory>(vq: &MockSplitQueue<'_, M>, qsize: u16, head: u16) {
    let idx = vq.avail().idx().load();
    vq.avail()
        .ring()
        .ref_at(usize::from(idx % qsize))
        .unwrap()
        .store(head);
    vq.avail().idx().store(idx.wrapping_add(1));
}

/// Stores one raw descriptor.
pub fn store_desc<M: GuestMemory>(
    vq: &MockSplitQueue<'_, M>,
    idx: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    vq.desc_table()
        .store(
            idx,
            RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
        )
        .unwrap();
}

/// The `(id, len)` of used ring entry `i`.
pub fn used_entry<M: GuestMemory>(vq: &MockSplitQueue<'_, M>, qsize: u16, i: u16) -> (u32, u32) {
    let e = vq
        .used()
        .ring()
        .ref_at(usize::from(i % qsize))
        .unwrap()
        .load();
    (e.id(), e.len())
}

/// The driver side of a queue of `qs` entries at `start`.
///
/// virtio-queue 0.18's `MockSplitQueue` places each ring's end at `start + len` (entries, not
/// bytes), so with `len == qs` its used ring overlaps the upper half of its available ring:
/// the device's used-flags and used-element writes then clobber available entries (we found
/// this when notification suppression started writing `used.flags`). Creating the mock with
/// `2 * qs` entries puts its used ring right after the real `qs`-entry available ring; the
/// device is given a `qs`-entry queue over the same addresses by [`device_queue`].
pub fn mock_queue<M: GuestMemory>(mem: &M, start: u64, qs: u16) -> MockSplitQueue<'_, M> {
    MockSplitQueue::create(mem, GuestAddress(start), 2 * qs)
}

/// The device-side `Queue` (size `qs`, ready) for a [`mock_queue`].
pub fn device_queue<M: GuestMemory>(vq: &MockSplitQueue<'_, M>, qs: u16) -> virtio_queue::Queue {
    use virtio_queue::QueueT;
    let mut q = virtio_queue::Queue::new(qs).unwrap();
    q.set_size(qs);
    q.try_set_desc_table_address(vq.desc_table_addr()).unwrap();
    q.try_set_avail_ring_address(vq.avail_addr()).unwrap();
    q.try_set_used_ring_address(vq.used_addr()).unwrap();
    q.set_ready(true);
    q
}
