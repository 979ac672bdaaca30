//! The console device state machine and its two queue loops.

use std::collections::VecDeque;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemory};

use crate::chain::{ChainReader, ChainWriter};
use crate::console::backend::ConsoleBackend;
use crate::device::{
    pop_chain, read_config_bytes, ActivateError, DeviceCore, DeviceError, PoppedChain, VirtioDevice,
};
use crate::features::{feature, COMMON_FEATURES, DEVICE_ID_CONSOLE};
use crate::interrupt::Interrupt;
use crate::state::{DeviceState, StateError};

/// `VIRTIO_CONSOLE_F_EMERG_WRITE`.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u32 = 2;
/// Most input bytes held while the guest provides no receive buffers.
pub const MAX_PENDING: usize = 64 * 1024;
/// Queue size of both queues.
pub const CONSOLE_QUEUE_SIZE: u16 = 256;
const RX: u16 = 0;
const TX: u16 = 1;
/// Copy granularity; bounds the stack buffer, not the request size.
const CHUNK: usize = 4096;

/// Copies guest output from `queue` (transmitq) to `out`. Returns whether buffers were used.
/// Chains with device-writable buffers or failing validation are returned unread.
pub fn process_tx<MM: GuestMemory>(
    queue: &mut Queue,
    mem: &MM,
    out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<bool, virtio_queue::Error> {
    let mut used = false;
    let mut buf = [0u8; CHUNK];
    // Notification-suppression loop: see rng::process_queue.
    loop {
        queue.disable_notification(mem)?;
        while let Some(popped) = pop_chain(queue, mem)? {
            let head = match popped {
                PoppedChain::Invalid { head, .. } => head,
                PoppedChain::Valid(chain) if !chain.writable.is_empty() => chain.head,
                PoppedChain::Valid(chain) => {
                    let mut r = ChainReader::new(chain.readable);
                    while r.remaining() > 0 {
                        let n = (r.remaining() as usize).min(CHUNK);
                        if r.read_exact(mem, &mut buf[..n]).is_err() {
                            break;
                        }
                        if let Err(e) = out(&buf[..n]) {
                            log::warn!("virtio-console: output failed: {e}");
                            break;
                        }
                    }
                    chain.head
                }
            };
            queue.add_used(mem, head, 0)?;
            used = true;
        }
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    Ok(used)
}

/// Moves `pending` input into the receive buffers of `queue` (receiveq) until either runs out.
pub fn process_rx<MM: GuestMemory>(
    queue: &mut Queue,
    mem: &MM,
    pending: &mut VecDeque<u8>,
) -> Result<bool, virtio_queue::Error> {
    let mut used = false;
    while !pending.is_empty() {
        let Some(popped) = pop_chain(queue, mem)? else {
            // Out of buffers with input left: ask for a kick when the driver adds some.
            if queue.enable_notification(mem)? {
                continue;
            }
            break;
        };
        let (head, len) = match popped {
            PoppedChain::Invalid { head, .. } => (head, 0),
            PoppedChain::Valid(chain) if !chain.readable.is_empty() => (chain.head, 0),
            PoppedChain::Valid(chain) => {
                let mut w = ChainWriter::new(chain.writable);
                let n = (w.remaining() as usize).min(pending.len());
                let (a, b) = pending.as_slices();
                let first = n.min(a.len());
                let ok = w.write_all(mem, &a[..first]).is_ok()
                    && w.write_all(mem, &b[..n - first]).is_ok();
                if ok {
                    pending.drain(..n);
                }
                (chain.head, u32::try_from(w.written()).unwrap_or(u32::MAX))
            }
        };
        queue.add_used(mem, head, len)?;
        used = true;
    }
    Ok(used)
}

/// A single-port virtio console.
pub struct Console<M: GuestAddressSpace> {
    core: DeviceCore<M>,
    backend: ConsoleBackend,
    pending: VecDeque<u8>,
}

impl<M: GuestAddressSpace> std::fmt::Debug for Console<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("core", &self.core)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl<M: GuestAddressSpace> Console<M> {
    /// A console over `backend`.
    pub fn new(backend: ConsoleBackend) -> Self {
        Self {
            core: DeviceCore::new(
                DEVICE_ID_CONSOLE,
                COMMON_FEATURES | feature(VIRTIO_CONSOLE_F_EMERG_WRITE),
                vec![CONSOLE_QUEUE_SIZE; 2],
            ),
            backend,
            pending: VecDeque::new(),
        }
    }

    /// Queues host input for the guest (what the backend fd handler does).
    pub fn push_input(&mut self, data: &[u8]) -> Result<(), DeviceError> {
        let room = MAX_PENDING.saturating_sub(self.pending.len());
        self.pending.extend(&data[..data.len().min(room)]);
        self.flush_rx()
    }

    /// Input bytes waiting for receive buffers.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    fn flush_rx(&mut self) -> Result<(), DeviceError> {
        let Some(mem) = self.core.mem.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        let Some(q) = self.core.queues.get_mut(usize::from(RX)) else {
            return Ok(());
        };
        if !q.ready() {
            return Ok(());
        }
        if process_rx(q, &*mem, &mut self.pending)
            .map_err(|source| DeviceError::Queue { queue: RX, source })?
        {
            self.core.signal_used(RX)?;
        }
        Ok(())
    }
}

impl<M: GuestAddressSpace + Send> VirtioDevice<M> for Console<M> {
    fn device_type(&self) -> u32 {
        DEVICE_ID_CONSOLE
    }
    crate::device::core_accessors!();
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows (0: unknown), max_nr_ports (unused without MULTIPORT), emerg_wr.
        read_config_bytes(&[0u8; 12], offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 8 && !data.is_empty() && self.core.has_feature(VIRTIO_CONSOLE_F_EMERG_WRITE) {
            if let Err(e) = self.backend.write_output(&data[..1]) {
                log::warn!("virtio-console: emergency write failed: {e}");
            }
        }
    }
    fn activate(
        &mut self,
        mem: M,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        self.core.activate(mem, queues, interrupt, 2)
    }
    fn queue_notify(&mut self, index: u16) -> Result<(), DeviceError> {
        match index {
            // New receive buffers: deliver what is pending and resume reading the backend
            // (its fd is watched edge-triggered, so reading stopped when buffers ran out).
            RX => self.backend_event(0),
            TX => {
                let mem = self
                    .core
                    .mem
                    .as_ref()
                    .ok_or(DeviceError::NotActivated)?
                    .memory();
                let q = self
                    .core
                    .queues
                    .get_mut(usize::from(TX))
                    .ok_or(DeviceError::NotActivated)?;
                let backend = &mut self.backend;
                let used = process_tx(q, &*mem, &mut |d| backend.write_output(d))
                    .map_err(|source| DeviceError::Queue { queue: TX, source })?;
                if used {
                    self.core.signal_used(TX)?;
                }
                Ok(())
            }
            _ => Err(DeviceError::NoSuchQueue(index)),
        }
    }
    fn backend_fds(&self) -> Vec<std::os::unix::io::RawFd> {
        self.backend.input_fd().into_iter().collect()
    }
    fn backend_event(&mut self, _index: usize) -> Result<(), DeviceError> {
        let mut buf = [0u8; CHUNK];
        while self.pending.len() < MAX_PENDING {
            let n = self
                .backend
                .read_input(&mut buf)
                .map_err(DeviceError::Backend)?;
            if n == 0 {
                break;
            }
            self.pending.extend(&buf[..n]);
        }
        self.flush_rx()
    }
    fn reset(&mut self) {
        self.core.reset();
    }
    fn save_state(&self) -> DeviceState {
        self.core.save(self.pending.iter().copied().collect())
    }
    fn restore_state(
        &mut self,
        state: &DeviceState,
        mem: M,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), StateError> {
        if state.device.len() > MAX_PENDING {
            return Err(StateError::Device(format!(
                "{} pending console bytes, at most {MAX_PENDING}",
                state.device.len()
            )));
        }
        if let Some(queues) = self.core.restore(state)? {
            self.core.activate(mem, queues, interrupt, 2)?;
        }
        self.pending = state.device.iter().copied().collect();
        Ok(())
    }
}
