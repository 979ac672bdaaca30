//! virtio-console over vhost-user: [`vmkit_virtio::console::Console`] for the control plane,
//! [`vmkit_virtio::console::process_rx`] / [`vmkit_virtio::console::process_tx`] for the data
//! plane, and a [`ConsoleBackend`] (stdio, files, a Unix socket) for the host side.
//!
//! Queue 0 is `receiveq0` (host input to the guest), queue 1 `transmitq0`. The input fd is
//! watched edge-triggered: input is read into a bounded buffer ([`MAX_PENDING`] bytes) and
//! copied into receive buffers; when the guest has none, reading stops and resumes when it
//! posts buffers (a receive-queue kick). An emergency write (config offset 8, through
//! `SET_CONFIG`) reaches the same output as the transmit queue.
//!
//! QEMU (10.0 included) has no user-creatable vhost-user frontend for virtio-console (its
//! generic `vhost-user-device-pci` is not user-creatable), so a real guest drives this backend
//! through vmkit's own VMM instead: `tests/linux-guest/mini-vmm-nested.sh` runs
//! `vmkit-vhost-user console` as a process beside `mini-vmm --vhost-user type=console,...`,
//! and Debian's stock `virtio_console` driver (L2 on nested KVM) writes a token to the port
//! and reads a host-supplied line back through it. The tests here drive it through vhost's
//! frontend API.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmkit_virtio::console::{process_rx, process_tx, Console, ConsoleBackend, MAX_PENDING};

use crate::backend::{Notify, QueueHandler, Threading, VirtioBackend};

const RXQ: u16 = 0;
const TXQ: u16 = 1;
/// Input read per `read` call.
const CHUNK: usize = 4096;

struct ConsoleState {
    backend: ConsoleBackend,
    pending: VecDeque<u8>,
    /// The last read found nothing more (or EOF): wait for the next edge.
    input_drained: bool,
}

impl ConsoleState {
    /// Reads input until the buffer is full or the source has nothing more.
    fn fill(&mut self) {
        let mut buf = [0u8; CHUNK];
        while !self.input_drained && self.pending.len() < MAX_PENDING {
            let room = (MAX_PENDING - self.pending.len()).min(CHUNK);
            match self.backend.read_input(&mut buf[..room]) {
                Ok(0) => self.input_drained = true,
                Ok(n) => self.pending.extend(&buf[..n]),
                Err(e) => {
                    log::warn!("vhost-user-console: input failed: {e}");
                    self.input_drained = true;
                }
            }
        }
    }
}

/// The data plane of a console backend.
pub struct ConsoleQueues {
    state: Arc<Mutex<ConsoleState>>,
    fd: Option<RawFd>,
}

impl std::fmt::Debug for ConsoleQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleQueues")
            .field("fd", &self.fd)
            .finish()
    }
}

fn lock(state: &Mutex<ConsoleState>) -> std::sync::MutexGuard<'_, ConsoleState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl QueueHandler for ConsoleQueues {
    fn process_queue(
        &self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap<()>,
        _acked_features: u64,
    ) -> Result<Notify, virtio_queue::Error> {
        let mut st = lock(&self.state);
        let st = &mut *st;
        match index {
            RXQ => {
                let mut used = false;
                loop {
                    st.fill();
                    let before = st.pending.len();
                    used |= process_rx(queue, mem, &mut st.pending)?;
                    // Stop when the guest has no buffers left or there is no more input.
                    if st.pending.len() == before || st.pending.is_empty() && st.input_drained {
                        break;
                    }
                }
                Ok(Notify::used(used))
            }
            TXQ => {
                let backend = &mut st.backend;
                let used = process_tx(queue, mem, &mut |d| backend.write_output(d))?;
                Ok(Notify::used(used))
            }
            _ => Ok(Notify::Nothing),
        }
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        self.fd.into_iter().collect()
    }

    fn backend_event(&self, _index: usize) -> Vec<u16> {
        // A new edge: there may be input again.
        lock(&self.state).input_drained = false;
        vec![RXQ]
    }
}

/// Emergency writes of the control-plane device go to the data plane's output.
struct SharedOutput(Arc<Mutex<ConsoleState>>);

impl Write for SharedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).backend.write_output(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A vhost-user-console backend.
pub type ConsoleVhostBackend = VirtioBackend<ConsoleQueues>;

/// A console backend over `backend`.
pub fn console_backend(backend: ConsoleBackend) -> ConsoleVhostBackend {
    let fd = backend.input_fd();
    let state = Arc::new(Mutex::new(ConsoleState {
        backend,
        pending: VecDeque::new(),
        input_drained: false,
    }));
    let control = ConsoleBackend::new(None, Box::new(SharedOutput(state.clone())));
    VirtioBackend::new(
        "vhost-user-console",
        Box::new(Console::new(control)),
        ConsoleQueues { state, fd },
        Threading::Single,
    )
}
