//! Where frames go: the [`NetBackend`] trait and the in-process back-to-back backend.
//!
//! Frames crossing a backend always carry the 12-byte virtio-net header in front, the same
//! layout a TAP device with `IFF_VNET_HDR` uses, so the device never translates headers.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::net::header::NetHeader;

/// A host-side network endpoint.
pub trait NetBackend: Send {
    /// Sends one frame (header + packet). Dropping it (full queue) is allowed, as on a wire.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Receives one frame into `buf`; `Ok(None)` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// The fd that becomes readable when frames arrive.
    fn fd(&self) -> RawFd;
    /// Tells the backend which offloads the guest accepts on receive (acked feature bits), so
    /// it only hands over frames the guest can take.
    fn set_guest_features(&mut self, acked: u64) -> io::Result<()>;
}

/// Frames waiting in one direction of a [`ChannelBackend`] pair.
#[derive(Debug)]
struct Channel {
    frames: Mutex<VecDeque<Vec<u8>>>,
    ready: EventFd,
    /// Acked features of the device reading this channel.
    reader_features: AtomicU64,
    dropped: AtomicU64,
}

/// Most frames queued per direction before new ones are dropped.
pub const CHANNEL_CAPACITY: usize = 1024;

impl Channel {
    fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            frames: Mutex::new(VecDeque::new()),
            ready: EventFd::new(EFD_NONBLOCK)?,
            reader_features: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }))
    }
}

/// One end of an in-process wire: what one device sends, the other receives.
#[derive(Debug)]
pub struct ChannelBackend {
    inbox: Arc<Channel>,
    outbox: Arc<Channel>,
}

impl ChannelBackend {
    /// Two connected ends.
    pub fn pair() -> io::Result<(Self, Self)> {
        let a = Channel::new()?;
        let b = Channel::new()?;
        Ok((
            Self {
                inbox: a.clone(),
                outbox: b.clone(),
            },
            Self {
                inbox: b,
                outbox: a,
            },
        ))
    }

    /// Frames this end sent that the peer could not take (queue full, or an offload the
    /// peer's guest did not negotiate).
    pub fn dropped(&self) -> u64 {
        self.outbox.dropped.load(Ordering::Relaxed)
    }
}

impl NetBackend for ChannelBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let peer = self.outbox.reader_features.load(Ordering::Relaxed);
        let ok = NetHeader::parse(frame).is_ok_and(|h| h.deliverable_to(peer));
        let mut q = self
            .outbox
            .frames
            .lock()
            .map_err(|_| io::Error::other("channel lock poisoned"))?;
        if !ok || q.len() >= CHANNEL_CAPACITY {
            self.outbox.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        q.push_back(frame.to_vec());
        drop(q);
        self.outbox.ready.write(1)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut q = self
            .inbox
            .frames
            .lock()
            .map_err(|_| io::Error::other("channel lock poisoned"))?;
        let Some(f) = q.pop_front() else {
            // Re-arm: the eventfd becomes readable again only on the next send.
            let _ = self.inbox.ready.read();
            return Ok(None);
        };
        if f.len() > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("frame of {} bytes does not fit {}", f.len(), buf.len()),
            ));
        }
        buf[..f.len()].copy_from_slice(&f);
        Ok(Some(f.len()))
    }

    fn fd(&self) -> RawFd {
        self.inbox.ready.as_raw_fd()
    }

    fn set_guest_features(&mut self, acked: u64) -> io::Result<()> {
        self.inbox.reader_features.store(acked, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::header::NET_HDR_LEN;

    #[test]
    fn pair_carries_frames_both_ways() {
        let (mut a, mut b) = ChannelBackend::pair().unwrap();
        let f = vec![0u8; NET_HDR_LEN + 60];
        a.send(&f).unwrap();
        let mut buf = vec![0u8; 2048];
        assert_eq!(b.recv(&mut buf).unwrap(), Some(72));
        assert_eq!(b.recv(&mut buf).unwrap(), None);
        b.send(&f).unwrap();
        assert_eq!(a.recv(&mut buf).unwrap(), Some(72));
        // Offloaded frame to a peer that did not negotiate GUEST_CSUM: dropped.
        let mut c = f.clone();
        c[0] = 1;
        a.send(&c).unwrap();
        assert_eq!(a.dropped(), 1);
        b.set_guest_features(u64::MAX).unwrap();
        a.send(&c).unwrap();
        assert_eq!(b.recv(&mut buf).unwrap(), Some(72));
        // Too small a receive buffer is an error, not a truncation.
        a.send(&f).unwrap();
        assert!(b.recv(&mut [0u8; 8]).is_err());
        for _ in 0..CHANNEL_CAPACITY + 1 {
            a.send(&f).unwrap();
        }
        assert_eq!(a.dropped(), 2);
        assert!(a.fd() >= 0);
    }
}
