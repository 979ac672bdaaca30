//! A Linux TAP device as a [`NetBackend`].
//!
//! Opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte vnet header
//! (`TUNSETVNETHDRSZ`), so frames cross it in exactly the virtio-net layout. Offloads the guest
//! accepts on receive are passed to the kernel with `TUNSETOFFLOAD`; the kernel then only hands
//! us frames the guest can take (it segments or checksums the rest itself).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use crate::features::feature;
use crate::net::backend::NetBackend;
use crate::net::header::bits::*;
use crate::net::header::NET_HDR_LEN;

/// Errors opening a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name does not fit `IFNAMSIZ`.
    #[error("interface name {0:?} is longer than 15 bytes")]
    Name(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    Open(io::Error),
    /// An ioctl failed.
    #[error("{ioctl} on tap {name} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        ioctl: &'static str,
        /// Interface name.
        name: String,
        /// The OS error.
        source: io::Error,
    },
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Opens (creating if needed) the TAP interface `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.len() >= libc::IFNAMSIZ {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let tap = Self {
            file,
            name: name.to_string(),
        };
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `IfReq` has its layout (16-byte
        // name, flags, padding up to 40 bytes) and lives for the duration of the call.
        let rc = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        tap.check(rc, "TUNSETIFF")?;
        let hdr_len: libc::c_int = NET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid.
        let rc = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        tap.check(rc, "TUNSETVNETHDRSZ")?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn check(&self, rc: libc::c_int, ioctl: &'static str) -> Result<(), TapError> {
        if rc < 0 {
            return Err(TapError::Ioctl {
                ioctl,
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the offloads the kernel may use on frames it hands us, from guest feature bits.
    pub fn set_offload(&self, acked: u64) -> Result<(), TapError> {
        let has = |bit| acked & feature(bit) != 0;
        let mut flags: libc::c_uint = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= libc::TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= libc::TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= libc::TUN_F_TSO6;
            }
            if has(VIRTIO_NET_F_GUEST_ECN) {
                flags |= libc::TUN_F_TSO_ECN;
            }
            if has(VIRTIO_NET_F_GUEST_UFO) {
                flags |= libc::TUN_F_UFO;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        self.check(rc, "TUNSETOFFLOAD")
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.file.write(frame) {
            Ok(_) => Ok(()),
            // A full tap queue drops the frame, like a congested link.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn set_guest_features(&mut self, acked: u64) -> io::Result<()> {
        self.set_offload(acked).map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root and /dev/net/tun (as in CI); fails rather than skips without them.
    #[test]
    fn open_configure_and_poll_a_tap() {
        let name = format!("vku{}", std::process::id() % 100_000);
        let mut tap = Tap::open(&name).expect("creating a TAP device needs root");
        assert_eq!(tap.name(), name);
        tap.set_guest_features(u64::MAX).unwrap();
        tap.set_guest_features(feature(VIRTIO_NET_F_GUEST_CSUM))
            .unwrap();
        tap.set_guest_features(0).unwrap();
        let mut buf = vec![0u8; 2048];
        // The interface is down: nothing to read, and reading does not block.
        assert_eq!(tap.recv(&mut buf).unwrap(), None);
        assert!(tap.fd() >= 0);
        assert!(format!("{tap:?}").contains(&name));
    }

    #[test]
    fn long_names_are_refused() {
        assert!(matches!(
            Tap::open("a-very-long-interface-name"),
            Err(TapError::Name(_))
        ));
    }
}
