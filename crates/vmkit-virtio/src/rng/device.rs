//! The rng device state machine and its request loop.

use std::io;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddressSpace, GuestMemory};

use crate::device::{pop_chain, ActivateError, DeviceCore, DeviceError, PoppedChain, VirtioDevice};
use crate::features::{COMMON_FEATURES, DEVICE_ID_RNG};
use crate::interrupt::Interrupt;
use crate::state::{DeviceState, StateError};

/// Maximum size of the request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Bytes generated per host call; bounds the stack buffer, not the request size.
const CHUNK: usize = 4096;

/// Where random bytes come from.
pub trait EntropySource: Send {
    /// Fills `buf` completely.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()>;
}

/// The kernel CSPRNG via `getrandom(2)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct GetRandom;

impl EntropySource for GetRandom {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes that outlives the
            // call; getrandom writes at most that many bytes into it.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            done += n as usize;
        }
        Ok(())
    }
}

/// Processes every available request of the rng `queue`. Returns whether any buffer was
/// returned to the driver (the caller then decides whether to interrupt).
///
/// A chain with a device-readable buffer, or one that fails validation, is returned with
/// length 0. An `Err` means the queue itself is broken (device needs reset).
pub fn process_queue<MM: GuestMemory>(
    queue: &mut Queue,
    mem: &MM,
    source: &mut dyn EntropySource,
) -> Result<bool, virtio_queue::Error> {
    let mut used = false;
    let mut buf = [0u8; CHUNK];
    // Drain with driver kicks suppressed, then re-arm them; re-arming reports buffers that
    // raced in, which are drained too (the standard virtio notification-suppression loop).
    loop {
        queue.disable_notification(mem)?;
        while let Some(popped) = pop_chain(queue, mem)? {
            let (head, len) = match popped {
                PoppedChain::Invalid { head, .. } => (head, 0),
                PoppedChain::Valid(chain) if !chain.readable.is_empty() => {
                    log::warn!("virtio-rng: request with a device-readable buffer");
                    (chain.head, 0)
                }
                PoppedChain::Valid(chain) => {
                    let mut written: u32 = 0;
                    'segs: for seg in &chain.writable {
                        let mut off = 0u32;
                        while off < seg.len {
                            let n = (seg.len - off).min(CHUNK as u32) as usize;
                            if let Err(e) = source.fill(&mut buf[..n]) {
                                log::error!("virtio-rng: entropy source failed: {e}");
                                break 'segs;
                            }
                            // `off` lies inside a segment that `parse_chain` proved is in
                            // guest memory, so the sum cannot overflow.
                            let addr = seg.addr.unchecked_add(u64::from(off));
                            if mem.write_slice(&buf[..n], addr).is_err() {
                                break 'segs;
                            }
                            off += n as u32;
                            written = written.saturating_add(n as u32);
                        }
                    }
                    (chain.head, written)
                }
            };
            queue.add_used(mem, head, len)?;
            used = true;
        }
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    Ok(used)
}

/// A virtio-rng device.
pub struct Rng<M: GuestAddressSpace> {
    core: DeviceCore<M>,
    source: Box<dyn EntropySource>,
}

impl<M: GuestAddressSpace> std::fmt::Debug for Rng<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng").field("core", &self.core).finish()
    }
}

impl<M: GuestAddressSpace> Rng<M> {
    /// An rng device fed by `getrandom(2)`.
    pub fn new() -> Self {
        Self::with_source(Box::new(GetRandom))
    }

    /// An rng device fed by `source`.
    pub fn with_source(source: Box<dyn EntropySource>) -> Self {
        Self {
            core: DeviceCore::new(DEVICE_ID_RNG, COMMON_FEATURES, vec![RNG_QUEUE_SIZE]),
            source,
        }
    }
}

impl<M: GuestAddressSpace> Default for Rng<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: GuestAddressSpace + Send> VirtioDevice<M> for Rng<M> {
    fn device_type(&self) -> u32 {
        DEVICE_ID_RNG
    }
    crate::device::core_accessors!();
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        mem: M,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        self.core.activate(mem, queues, interrupt, 1)
    }
    fn queue_notify(&mut self, index: u16) -> Result<(), DeviceError> {
        if index != 0 {
            return Err(DeviceError::NoSuchQueue(index));
        }
        let mem = self
            .core
            .mem
            .as_ref()
            .ok_or(DeviceError::NotActivated)?
            .memory();
        let q = self
            .core
            .queues
            .get_mut(0)
            .ok_or(DeviceError::NotActivated)?;
        let used = process_queue(q, &*mem, self.source.as_mut())
            .map_err(|source| DeviceError::Queue { queue: 0, source })?;
        if used {
            self.core.signal_used(0)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingInterrupt;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    struct Failing;
    impl EntropySource for Failing {
        fn fill(&mut self, _buf: &mut [u8]) -> io::Result<()> {
            Err(io::Error::other("no entropy"))
        }
    }

    /// A mock driver ring over `2 * qs` entries and a device queue of `qs` over it; see
    /// `tests/common::mock_queue` for why (virtio-queue 0.18's mock overlaps its rings).
    fn rings<M: GuestMemory>(m: &M, qs: u16) -> (MockSplitQueue<'_, M>, Queue) {
        let vq = MockSplitQueue::new(m, 2 * qs);
        let mut q = Queue::new(qs).unwrap();
        q.set_size(qs);
        q.try_set_desc_table_address(vq.desc_table_addr()).unwrap();
        q.try_set_avail_ring_address(vq.avail_addr()).unwrap();
        q.try_set_used_ring_address(vq.used_addr()).unwrap();
        q.set_ready(true);
        (vq, q)
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    #[test]
    fn readable_buffers_and_source_failures_return_nothing() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (vq, mut q) = rings(&m, 16);
        // A device-readable buffer where the device must write; a chain spanning 2 buffers
        // bigger than one chunk; an invalid chain (outside memory).
        vq.add_desc_chains(
            &[
                desc(0x1000, 8, 0, 0),
                desc(0x2000, 5000, 2 | 1, 2),
                desc(0x4000, 10, 2, 0),
                desc(0x1_0000_0000, 8, 2, 0),
            ],
            0,
        )
        .unwrap();
        assert!(process_queue(&mut q, &m, &mut GetRandom).unwrap());
        let lens: Vec<u32> = (0..3)
            .map(|i| vq.used().ring().ref_at(i).unwrap().load().len())
            .collect();
        assert_eq!(lens, [0, 5010, 0]);
        vq.add_desc_chains(&[desc(0x1000, 8, 2, 0)], 4).unwrap();
        assert!(process_queue(&mut q, &m, &mut Failing).unwrap());
        assert_eq!(vq.used().ring().ref_at(3).unwrap().load().len(), 0);
        assert!(
            !process_queue(&mut q, &m, &mut GetRandom).unwrap(),
            "empty queue"
        );
    }

    #[test]
    fn device_surface() {
        let m = std::sync::Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
        );
        let mut dev: Rng<std::sync::Arc<GuestMemoryMmap<()>>> = Rng::default();
        assert!(dev.queue_notify(0).is_err(), "not activated");
        dev.ack_features(u64::MAX);
        assert_eq!(dev.acked_features(), dev.device_features());
        let (vq, q) = rings(&*m, 16);
        let irq = std::sync::Arc::new(CountingInterrupt::default());
        dev.activate(m.clone(), vec![q], irq.clone()).unwrap();
        let q2 = rings(&*m, 16).1;
        drop(vq);
        assert!(matches!(
            dev.activate(m.clone(), vec![q2], irq.clone()),
            Err(ActivateError::AlreadyActive)
        ));
        assert!(dev.queue_notify(1).is_err());
        let s = dev.save_state();
        let mut other: Rng<std::sync::Arc<GuestMemoryMmap<()>>> = Rng::new();
        other.restore_state(&s, m.clone(), irq.clone()).unwrap();
        assert!(other.is_activated());
        let mut wrong = s.clone();
        wrong.acked_features |= 1 << 50;
        assert!(other.restore_state(&wrong, m.clone(), irq.clone()).is_err());
        let mut wrong = s;
        wrong.queues[0].max_size = 1024;
        assert!(other.restore_state(&wrong, m, irq).is_err());
        assert!(format!("{dev:?}").contains("Rng"));
        let mut cfg = [1u8; 4];
        dev.read_config(0, &mut cfg);
        assert_eq!(cfg, [0; 4]);
        dev.write_config(0, &cfg);
        dev.reset();
        assert!(!dev.is_activated());
    }
}
