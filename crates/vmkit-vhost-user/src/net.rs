//! virtio-net over vhost-user: [`vmkit_virtio::net::Net`] for the control plane,
//! [`vmkit_virtio::net::process_tx`] and [`vmkit_virtio::net::deliver_frame`] for the data
//! plane, and a [`NetBackend`] (a Linux TAP device, or an in-process channel) for the host
//! side.
//!
//! Queue 0 is `receiveq`, queue 1 `transmitq`; the control queue, if the frontend offers one
//! to the guest, stays in the frontend (QEMU handles it). The backend's fd is watched
//! edge-triggered by the vring worker: a readable TAP runs the receive queue, which reads frames
//! until the TAP is empty or the guest runs out of receive buffers; in the latter case the
//! frame waits (`rx_pending`) until the guest adds buffers and kicks the receive queue. The
//! queue is then [`QueueHandler::starved`]: the adapter asks the driver to kick on its next
//! buffer even when some (too few for the frame) are still posted, so a large frame never
//! waits for unrelated traffic.

use std::os::unix::io::RawFd;
use std::sync::Mutex;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmkit_virtio::features::feature;
use vmkit_virtio::net::device::MAX_FRAME;
use vmkit_virtio::net::header::bits::VIRTIO_NET_F_MRG_RXBUF;
use vmkit_virtio::net::{deliver_frame, process_tx, Net, NetBackend, NetConfig, RxOutcome, Tap};

use crate::backend::{Notify, QueueHandler, Threading, VirtioBackend};

const RXQ: u16 = 0;
const TXQ: u16 = 1;

struct NetState {
    backend: Box<dyn NetBackend>,
    rx_buf: Vec<u8>,
    /// Length of a frame in `rx_buf` that found no receive buffers yet.
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
}

/// The data plane of a net backend: the host-side [`NetBackend`] and the virtio-net loops.
pub struct NetQueues {
    state: Mutex<NetState>,
    fd: RawFd,
}

impl std::fmt::Debug for NetQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetQueues").field("fd", &self.fd).finish()
    }
}

impl NetQueues {
    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rx(
        st: &mut NetState,
        queue: &mut Queue,
        mem: &GuestMemoryMmap<()>,
        acked: u64,
    ) -> Result<Notify, virtio_queue::Error> {
        let mergeable = acked & feature(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mut notify = Notify::Nothing;
        loop {
            let len = match st.rx_pending.take() {
                Some(len) => len,
                None => match st.backend.recv(&mut st.rx_buf) {
                    Ok(Some(len)) => len,
                    Ok(None) => break,
                    Err(e) => {
                        log::warn!("vhost-user-net: backend receive failed: {e}");
                        break;
                    }
                },
            };
            let Some(frame) = st.rx_buf.get_mut(..len) else {
                continue;
            };
            match deliver_frame(queue, mem, frame, mergeable)? {
                RxOutcome::Delivered { force_notify, .. } => {
                    notify = if force_notify {
                        Notify::Always
                    } else if notify == Notify::Always {
                        notify
                    } else {
                        Notify::IfNeeded
                    };
                }
                RxOutcome::NoBuffers => {
                    st.rx_pending = Some(len);
                    break;
                }
                // Dropped chains were returned with length 0: the driver must see them too.
                RxOutcome::Dropped if notify == Notify::Nothing => notify = Notify::IfNeeded,
                RxOutcome::Dropped => {}
            }
        }
        Ok(notify)
    }
}

impl QueueHandler for NetQueues {
    fn process_queue(
        &self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap<()>,
        acked_features: u64,
    ) -> Result<Notify, virtio_queue::Error> {
        let mut st = self.lock();
        match index {
            RXQ => Self::rx(&mut st, queue, mem, acked_features),
            TXQ => {
                let st = &mut *st;
                let out = process_tx(
                    queue,
                    mem,
                    acked_features,
                    st.backend.as_mut(),
                    &mut st.tx_buf,
                    None,
                )?;
                log::trace!("vhost-user-net: TX {out:?}");
                Ok(Notify::used(out.completed > 0))
            }
            _ => Ok(Notify::Nothing),
        }
    }

    fn features_acked(&self, acked: u64) {
        if let Err(e) = self.lock().backend.set_guest_features(acked) {
            log::warn!("vhost-user-net: cannot apply offloads {acked:#x} to the backend: {e}");
        }
    }

    fn starved(&self, index: u16) -> bool {
        index == RXQ && self.lock().rx_pending.is_some()
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.fd]
    }

    fn backend_event(&self, _index: usize) -> Vec<u16> {
        vec![RXQ]
    }
}

/// The host side of the control-plane [`Net`] device: never used, because over vhost-user
/// the device is never activated (its queues live in the vrings and the data plane owns the
/// real backend).
#[derive(Debug)]
struct ControlPlaneOnly;

impl NetBackend for ControlPlaneOnly {
    fn send(&mut self, _frame: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::other(
            "control-plane device has no data path",
        ))
    }
    fn recv(&mut self, _buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        Ok(None)
    }
    fn fd(&self) -> RawFd {
        -1
    }
    fn set_guest_features(&mut self, _acked: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// A vhost-user-net backend.
pub type NetVhostBackend = VirtioBackend<NetQueues>;

/// A net backend over any [`NetBackend`]: a [`Tap`], or one end of
/// [`vmkit_virtio::net::ChannelBackend::pair`] (tests, two guests back to back).
pub fn net_backend(backend: Box<dyn NetBackend>, cfg: NetConfig) -> NetVhostBackend {
    let fd = backend.fd();
    VirtioBackend::new(
        "vhost-user-net",
        Box::new(Net::new(Box::new(ControlPlaneOnly), cfg)),
        NetQueues {
            state: Mutex::new(NetState {
                backend,
                rx_buf: vec![0; MAX_FRAME],
                rx_pending: None,
                tx_buf: Vec::with_capacity(MAX_FRAME),
            }),
            fd,
        },
        Threading::Single,
    )
}

/// Errors building a TAP-backed net backend.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP device cannot be opened.
    #[error("cannot open TAP device {name}: {source}")]
    Tap {
        /// Interface name.
        name: String,
        /// What vmkit-virtio reported.
        source: vmkit_virtio::net::tap::TapError,
    },
}

/// A net backend over the TAP interface `tap` (created if it does not exist; a TAP created
/// here disappears when the daemon exits).
///
/// # Errors
/// [`NetError::Tap`] when `/dev/net/tun` cannot be opened or configured.
pub fn tap_backend(tap: &str, cfg: NetConfig) -> Result<NetVhostBackend, NetError> {
    let dev = Tap::open(tap).map_err(|source| NetError::Tap {
        name: tap.to_string(),
        source,
    })?;
    Ok(net_backend(Box::new(dev), cfg))
}
