//! The net device state machine, the TX loop and the RX delivery (with mergeable buffers).

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory};

use crate::chain::{Chain, ChainReader, ChainWriter};
use crate::device::{
    notify_on_new_buffers, pop_chain, read_config_bytes, ActivateError, DeviceCore, DeviceError,
    PoppedChain, VirtioDevice,
};
use crate::features::{feature, COMMON_FEATURES, DEVICE_ID_NET};
use crate::interrupt::{Interrupt, InterruptReason};
use crate::net::backend::NetBackend;
use crate::net::header::bits::*;
use crate::net::header::{NetHeader, NET_HDR_LEN};
use crate::rate_limiter::RateLimiter;
use crate::state::{DeviceState, StateError};

/// Largest frame (header + 64 KiB GSO packet + Ethernet header) either direction carries.
pub const MAX_FRAME: usize = NET_HDR_LEN + 65550;
/// Queue size of both queues.
pub const NET_QUEUE_SIZE: u16 = 256;
/// `VIRTIO_NET_S_LINK_UP`.
pub const LINK_UP: u16 = 1;
const RXQ: u16 = 0;
const TXQ: u16 = 1;

/// How to build a [`Net`] device.
#[derive(Debug, Clone, Copy)]
pub struct NetConfig {
    /// MAC address reported in the config space.
    pub mac: [u8; 6],
    /// MTU reported in the config space.
    pub mtu: u16,
    /// Size of each queue.
    pub queue_size: u16,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            mtu: 1500,
            queue_size: NET_QUEUE_SIZE,
        }
    }
}

/// What [`process_tx`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxOutcome {
    /// Chains returned to the driver.
    pub completed: u32,
    /// Frames handed to the backend.
    pub sent: u32,
    /// Chains whose frame was dropped (malformed chain or header).
    pub dropped: u32,
    /// Stopped because the rate limiter refused a frame (it stays queued).
    pub throttled: bool,
}

/// Sends every frame the driver queued on the transmit `queue` to `backend`.
pub fn process_tx<MM: GuestMemory>(
    queue: &mut Queue,
    mem: &MM,
    acked: u64,
    backend: &mut dyn NetBackend,
    buf: &mut Vec<u8>,
    mut limiter: Option<&mut RateLimiter>,
) -> Result<TxOutcome, virtio_queue::Error> {
    let mut out = TxOutcome::default();
    // Notification-suppression loop: see rng::process_queue.
    loop {
        queue.disable_notification(mem)?;
        while let Some(popped) = pop_chain(queue, mem)? {
            let chain = match popped {
                PoppedChain::Valid(c) if c.writable.is_empty() => c,
                PoppedChain::Valid(c) => {
                    log::warn!("virtio-net: TX chain with device-writable buffers");
                    drop_chain(queue, mem, c.head, &mut out)?;
                    continue;
                }
                PoppedChain::Invalid { head, .. } => {
                    drop_chain(queue, mem, head, &mut out)?;
                    continue;
                }
            };
            let len = chain.readable_len();
            if len > MAX_FRAME as u64 || len < NET_HDR_LEN as u64 {
                log::warn!("virtio-net: TX frame of {len} bytes");
                drop_chain(queue, mem, chain.head, &mut out)?;
                continue;
            }
            if let Some(l) = limiter.as_deref_mut() {
                if !l.consume(len - NET_HDR_LEN as u64) {
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    out.throttled = true;
                    return Ok(out);
                }
            }
            // len <= MAX_FRAME, so the cast is lossless.
            buf.resize(len as usize, 0);
            let mut r = ChainReader::new(chain.readable);
            if r.read_exact(mem, buf).is_err() {
                drop_chain(queue, mem, chain.head, &mut out)?;
                continue;
            }
            match NetHeader::check_tx(buf, acked) {
                Ok(_) => {
                    if let Err(e) = backend.send(buf) {
                        log::warn!("virtio-net: backend send failed: {e}");
                        out.dropped += 1;
                    } else {
                        out.sent += 1;
                    }
                }
                Err(e) => {
                    log::warn!("virtio-net: dropping TX frame: {e}");
                    out.dropped += 1;
                }
            }
            queue.add_used(mem, chain.head, 0)?;
            out.completed += 1;
        }
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    Ok(out)
}

fn drop_chain<MM: GuestMemory>(
    queue: &mut Queue,
    mem: &MM,
    head: u16,
    out: &mut TxOutcome,
) -> Result<(), virtio_queue::Error> {
    queue.add_used(mem, head, 0)?;
    out.completed += 1;
    out.dropped += 1;
    Ok(())
}

/// What [`deliver_frame`] did with one received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// The frame is in the guest, spread over this many chains. `force_notify` means several
    /// used entries were published at once and the driver must be interrupted regardless of
    /// event-idx suppression.
    Delivered {
        /// Number of chains (`num_buffers`).
        chains: u16,
        /// Interrupt without consulting event-idx.
        force_notify: bool,
    },
    /// Not enough receive buffers: nothing was consumed, retry when the driver adds some.
    NoBuffers,
    /// The frame was dropped; chains that were taken were returned with length 0.
    Dropped,
}

/// Publishes several used entries with a single `used.idx` update, so a driver never sees
/// the first buffer of a merged frame before the others.
fn add_used_batch<MM: GuestMemory>(
    queue: &mut Queue,
    mem: &MM,
    used: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let Some((&(last_head, last_len), rest)) = used.split_last() else {
        return Ok(());
    };
    let size = queue.size();
    let mut idx = queue.next_used();
    for &(head, len) in rest {
        if head >= size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        // Used ring layout: flags (2), idx (2), then 8-byte {id: u32, len: u32} elements.
        let off = 4 + u64::from(idx % size) * 8;
        let addr = GuestAddress(queue.used_ring())
            .checked_add(off)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr)
            .map_err(virtio_queue::Error::GuestMemory)?;
        idx = idx.wrapping_add(1);
    }
    queue.set_next_used(idx);
    queue.add_used(mem, last_head, last_len)
}

/// Copies one received `frame` (header + packet) into the receive `queue`.
///
/// Without mergeable buffers the frame must fit one chain; with them it may span several and
/// `num_buffers` in the header says how many. `frame`'s `num_buffers` field is overwritten.
pub fn deliver_frame<MM: GuestMemory>(
    queue: &mut Queue,
    mem: &MM,
    frame: &mut [u8],
    mergeable: bool,
) -> Result<RxOutcome, virtio_queue::Error> {
    if frame.len() < NET_HDR_LEN {
        return Ok(RxOutcome::Dropped);
    }
    let mut chains: Vec<Chain> = Vec::new();
    let mut room = 0u64;
    let mut bad: Option<u16> = None;
    while room < frame.len() as u64 {
        match pop_chain(queue, mem)? {
            None => {
                // Put back what we took: the frame waits for more buffers.
                let n = chains.len() as u16;
                queue.set_next_avail(queue.next_avail().wrapping_sub(n));
                return Ok(RxOutcome::NoBuffers);
            }
            Some(PoppedChain::Valid(c)) if c.readable.is_empty() => {
                room += c.writable_len();
                chains.push(c);
            }
            Some(PoppedChain::Valid(c)) => {
                bad = Some(c.head);
                break;
            }
            Some(PoppedChain::Invalid { head, .. }) => {
                bad = Some(head);
                break;
            }
        }
        if !mergeable {
            break;
        }
    }
    if bad.is_some() || room < frame.len() as u64 {
        log::warn!(
            "virtio-net: dropping RX frame of {} bytes (bad or too small buffers)",
            frame.len()
        );
        let used: Vec<(u16, u32)> = chains
            .iter()
            .map(|c| c.head)
            .chain(bad)
            .map(|h| (h, 0))
            .collect();
        add_used_batch(queue, mem, &used)?;
        return Ok(RxOutcome::Dropped);
    }
    // chains.len() <= queue size <= 32768.
    let n = chains.len() as u16;
    frame[10..12].copy_from_slice(&n.to_le_bytes());
    let mut used = Vec::with_capacity(chains.len());
    let mut done = 0usize;
    for c in chains {
        let mut w = ChainWriter::new(c.writable);
        let take = (w.remaining() as usize).min(frame.len() - done);
        if w.write_all(mem, &frame[done..done + take]).is_err() {
            // parse_chain proved the buffers are in guest memory; treat a failure as a drop.
            used.push((c.head, 0));
            continue;
        }
        done += take;
        used.push((c.head, take as u32));
    }
    add_used_batch(queue, mem, &used)?;
    Ok(RxOutcome::Delivered {
        chains: n,
        force_notify: n > 1,
    })
}

/// The feature dependencies of virtio 1.2, 5.1.3.1: segmentation offload needs checksum
/// offload in the same direction, and ECN needs TSO.
pub fn net_features_consistent(f: u64) -> bool {
    let has = |bit| f & feature(bit) != 0;
    let needs = |bit, dep: &[u32]| !has(bit) || dep.iter().any(|&d| has(d));
    needs(VIRTIO_NET_F_GUEST_TSO4, &[VIRTIO_NET_F_GUEST_CSUM])
        && needs(VIRTIO_NET_F_GUEST_TSO6, &[VIRTIO_NET_F_GUEST_CSUM])
        && needs(VIRTIO_NET_F_GUEST_UFO, &[VIRTIO_NET_F_GUEST_CSUM])
        && needs(
            VIRTIO_NET_F_GUEST_ECN,
            &[VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6],
        )
        && needs(VIRTIO_NET_F_HOST_TSO4, &[VIRTIO_NET_F_CSUM])
        && needs(VIRTIO_NET_F_HOST_TSO6, &[VIRTIO_NET_F_CSUM])
        && needs(VIRTIO_NET_F_HOST_UFO, &[VIRTIO_NET_F_CSUM])
        && needs(
            VIRTIO_NET_F_HOST_ECN,
            &[VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6],
        )
}

/// Counters of a [`Net`] device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames sent to the backend.
    pub tx_frames: u64,
    /// TX chains dropped.
    pub tx_dropped: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Received frames dropped.
    pub rx_dropped: u64,
}

/// A virtio-net device.
pub struct Net<M: GuestAddressSpace> {
    core: DeviceCore<M>,
    backend: Box<dyn NetBackend>,
    config: [u8; 12],
    rx_buf: Vec<u8>,
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    stats: NetStats,
}

impl<M: GuestAddressSpace> std::fmt::Debug for Net<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("core", &self.core)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<M: GuestAddressSpace> Net<M> {
    /// A net device over `backend`.
    pub fn new(backend: Box<dyn NetBackend>, cfg: NetConfig) -> Self {
        let features = COMMON_FEATURES
            | [
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_MTU,
                VIRTIO_NET_F_MAC,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN,
                VIRTIO_NET_F_GUEST_UFO,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_HOST_ECN,
                VIRTIO_NET_F_HOST_UFO,
                VIRTIO_NET_F_MRG_RXBUF,
                VIRTIO_NET_F_STATUS,
            ]
            .iter()
            .fold(0, |acc, &b| acc | feature(b));
        let mut config = [0u8; 12];
        config[0..6].copy_from_slice(&cfg.mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&cfg.mtu.to_le_bytes());
        Self {
            core: DeviceCore::new(DEVICE_ID_NET, features, vec![cfg.queue_size; 2]),
            backend,
            config,
            rx_buf: vec![0; MAX_FRAME],
            rx_pending: None,
            tx_buf: Vec::with_capacity(MAX_FRAME),
            rx_limiter: None,
            tx_limiter: None,
            stats: NetStats::default(),
        }
    }

    /// Limits receive and/or transmit bandwidth.
    pub fn with_rate_limiters(mut self, rx: Option<RateLimiter>, tx: Option<RateLimiter>) -> Self {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
        self
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Sets the link state (`VIRTIO_NET_S_LINK_UP`) and tells the driver.
    pub fn set_link_up(&mut self, up: bool) -> Result<(), DeviceError> {
        self.config[6..8].copy_from_slice(&u16::from(up).to_le_bytes());
        if let Some(irq) = self.core.interrupt.as_ref() {
            irq.trigger(InterruptReason::Config)
                .map_err(DeviceError::Interrupt)?;
        }
        Ok(())
    }

    /// Moves frames from the backend to the guest until either runs dry.
    fn rx(&mut self) -> Result<(), DeviceError> {
        let Some(mem) = self.core.mem.as_ref().map(|m| m.memory()) else {
            return Ok(());
        };
        let mergeable = self.core.has_feature(VIRTIO_NET_F_MRG_RXBUF);
        let mut notify = false;
        let mut force = false;
        loop {
            let q = self
                .core
                .queues
                .get_mut(usize::from(RXQ))
                .ok_or(DeviceError::NotActivated)?;
            if !q.ready() {
                break;
            }
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(Some(len)) => len,
                    Ok(None) => break,
                    Err(e) => {
                        log::warn!("virtio-net: backend receive failed: {e}");
                        self.stats.rx_dropped += 1;
                        continue;
                    }
                },
            };
            self.rx_pending = Some(len);
            if let Some(l) = self.rx_limiter.as_mut() {
                if !l.consume(len.saturating_sub(NET_HDR_LEN) as u64) {
                    break;
                }
            }
            let frame = &mut self.rx_buf[..len.min(MAX_FRAME)];
            match deliver_frame(q, &*mem, frame, mergeable)
                .map_err(|source| DeviceError::Queue { queue: RXQ, source })?
            {
                RxOutcome::NoBuffers => {
                    if notify_on_new_buffers(q, &*mem)
                        .map_err(|source| DeviceError::Queue { queue: RXQ, source })?
                    {
                        continue;
                    }
                    break;
                }
                RxOutcome::Delivered { force_notify, .. } => {
                    self.stats.rx_frames += 1;
                    notify = true;
                    force |= force_notify;
                }
                RxOutcome::Dropped => {
                    self.stats.rx_dropped += 1;
                    notify = true;
                }
            }
            self.rx_pending = None;
        }
        if force {
            if let Some(irq) = self.core.interrupt.as_ref() {
                irq.trigger(InterruptReason::Queue(RXQ))
                    .map_err(DeviceError::Interrupt)?;
            }
        } else if notify {
            self.core.signal_used(RXQ)?;
        }
        Ok(())
    }

    fn tx(&mut self) -> Result<(), DeviceError> {
        let mem = self
            .core
            .mem
            .as_ref()
            .ok_or(DeviceError::NotActivated)?
            .memory();
        let acked = self.core.acked_features;
        let q = self
            .core
            .queues
            .get_mut(usize::from(TXQ))
            .ok_or(DeviceError::NotActivated)?;
        if !q.ready() {
            return Ok(());
        }
        let out = process_tx(
            q,
            &*mem,
            acked,
            self.backend.as_mut(),
            &mut self.tx_buf,
            self.tx_limiter.as_mut(),
        )
        .map_err(|source| DeviceError::Queue { queue: TXQ, source })?;
        self.stats.tx_frames += u64::from(out.sent);
        self.stats.tx_dropped += u64::from(out.dropped);
        if out.completed > 0 {
            self.core.signal_used(TXQ)?;
        }
        Ok(())
    }
}

impl<M: GuestAddressSpace + Send> VirtioDevice<M> for Net<M> {
    fn device_type(&self) -> u32 {
        DEVICE_ID_NET
    }
    crate::device::core_accessors!();
    fn features_acceptable(&self, f: u64) -> bool {
        net_features_consistent(f)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR (legacy), not offered.
        log::warn!("virtio-net: write to read-only config offset {offset:#x}");
    }
    fn activate(
        &mut self,
        mem: M,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), ActivateError> {
        self.backend
            .set_guest_features(self.core.acked_features)
            .map_err(ActivateError::Backend)?;
        self.core.activate(mem, queues, interrupt, 2)
    }
    fn queue_notify(&mut self, index: u16) -> Result<(), DeviceError> {
        match index {
            RXQ => {
                if self
                    .rx_limiter
                    .as_ref()
                    .is_some_and(RateLimiter::is_blocked)
                {
                    return Ok(());
                }
                self.rx()
            }
            TXQ => {
                if self
                    .tx_limiter
                    .as_ref()
                    .is_some_and(RateLimiter::is_blocked)
                {
                    return Ok(());
                }
                self.tx()
            }
            _ => Err(DeviceError::NoSuchQueue(index)),
        }
    }
    fn backend_fds(&self) -> Vec<std::os::unix::io::RawFd> {
        let mut fds = vec![self.backend.fd()];
        fds.extend(self.rx_limiter.iter().map(RateLimiter::timer_fd));
        fds.extend(self.tx_limiter.iter().map(RateLimiter::timer_fd));
        fds
    }
    fn backend_event(&mut self, index: usize) -> Result<(), DeviceError> {
        let rx_timer = self.rx_limiter.is_some().then_some(1);
        let tx_timer = self
            .tx_limiter
            .is_some()
            .then_some(1 + usize::from(rx_timer.is_some()));
        if index == 0 {
            if self
                .rx_limiter
                .as_ref()
                .is_some_and(RateLimiter::is_blocked)
            {
                return Ok(());
            }
            return self.rx();
        }
        if Some(index) == rx_timer {
            if let Some(l) = self.rx_limiter.as_mut() {
                l.timer_event();
            }
            return self.rx();
        }
        if Some(index) == tx_timer {
            if let Some(l) = self.tx_limiter.as_mut() {
                l.timer_event();
            }
            return self.tx();
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.core.reset();
        self.rx_pending = None;
    }
    fn save_state(&self) -> DeviceState {
        // A frame held for lack of buffers is saved so it is not lost.
        let pending = self
            .rx_pending
            .map_or(Vec::new(), |l| self.rx_buf[..l].to_vec());
        self.core.save(pending)
    }
    fn restore_state(
        &mut self,
        state: &DeviceState,
        mem: M,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), StateError> {
        if state.device.len() > MAX_FRAME
            || (!state.device.is_empty() && state.device.len() < NET_HDR_LEN)
        {
            return Err(StateError::Device(format!(
                "pending frame of {} bytes",
                state.device.len()
            )));
        }
        if let Some(queues) = self.core.restore(state)? {
            self.backend
                .set_guest_features(self.core.acked_features)
                .map_err(ActivateError::Backend)?;
            self.core.activate(mem, queues, interrupt, 2)?;
        }
        self.rx_pending = None;
        if !state.device.is_empty() {
            self.rx_buf[..state.device.len()].copy_from_slice(&state.device);
            self.rx_pending = Some(state.device.len());
        }
        Ok(())
    }
}
