//! `struct virtio_net_hdr_v1` (virtio 1.2, 5.1.6): the 12-byte header in front of every frame.
//!
//! The header describes checksum and segmentation offload. A guest may only use an offload it
//! negotiated; [`NetHeader::check_tx`] refuses frames that use one it did not (the frame is
//! dropped, as a NIC would drop a malformed descriptor), or whose checksum position lies
//! outside the frame.

use crate::features::feature;

/// Size of the header with `num_buffers` (always used with VIRTIO_F_VERSION_1).
pub const NET_HDR_LEN: usize = 12;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`.
pub const HDR_F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP`.
pub const GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN`.
pub const GSO_ECN: u8 = 0x80;

/// Feature bits of virtio-net (5.1.3).
#[allow(missing_docs)]
pub mod bits {
    pub const VIRTIO_NET_F_CSUM: u32 = 0;
    pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
    pub const VIRTIO_NET_F_MTU: u32 = 3;
    pub const VIRTIO_NET_F_MAC: u32 = 5;
    pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
    pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
    pub const VIRTIO_NET_F_GUEST_ECN: u32 = 9;
    pub const VIRTIO_NET_F_GUEST_UFO: u32 = 10;
    pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
    pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
    pub const VIRTIO_NET_F_HOST_ECN: u32 = 13;
    pub const VIRTIO_NET_F_HOST_UFO: u32 = 14;
    pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
    pub const VIRTIO_NET_F_STATUS: u32 = 16;
}
use bits::*;

/// Why a transmitted frame was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Shorter than the header.
    #[error("frame of {0} bytes is shorter than the {NET_HDR_LEN}-byte header")]
    Short(usize),
    /// NEEDS_CSUM without VIRTIO_NET_F_CSUM.
    #[error("checksum offload requested but VIRTIO_NET_F_CSUM was not negotiated")]
    CsumNotNegotiated,
    /// The checksum field lies outside the packet.
    #[error("checksum at {start}+{offset} lies outside the {len}-byte packet")]
    CsumOutside {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// Packet length.
        len: usize,
    },
    /// A GSO type the driver did not negotiate (or that does not exist).
    #[error("GSO type {0:#x} not negotiated")]
    Gso(u8),
}

/// A decoded header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetHeader {
    /// `flags`.
    pub flags: u8,
    /// `gso_type`.
    pub gso_type: u8,
    /// `hdr_len`.
    pub hdr_len: u16,
    /// `gso_size`.
    pub gso_size: u16,
    /// `csum_start`.
    pub csum_start: u16,
    /// `csum_offset`.
    pub csum_offset: u16,
    /// `num_buffers`.
    pub num_buffers: u16,
}

impl NetHeader {
    /// Decodes the first 12 bytes of `frame`.
    pub fn parse(frame: &[u8]) -> Result<Self, HeaderError> {
        let h = frame
            .get(..NET_HDR_LEN)
            .ok_or(HeaderError::Short(frame.len()))?;
        let u = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        Ok(Self {
            flags: h[0],
            gso_type: h[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: u(10),
        })
    }

    /// Checks a guest-transmitted frame (header + packet) against the acked features.
    pub fn check_tx(frame: &[u8], acked: u64) -> Result<Self, HeaderError> {
        let h = Self::parse(frame)?;
        let has = |bit| acked & feature(bit) != 0;
        let pkt_len = frame.len() - NET_HDR_LEN;
        if h.flags & HDR_F_NEEDS_CSUM != 0 {
            if !has(VIRTIO_NET_F_CSUM) {
                return Err(HeaderError::CsumNotNegotiated);
            }
            let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
            if end > pkt_len {
                return Err(HeaderError::CsumOutside {
                    start: h.csum_start,
                    offset: h.csum_offset,
                    len: pkt_len,
                });
            }
        }
        let ok = match h.gso_type & !GSO_ECN {
            GSO_NONE => h.gso_type & GSO_ECN == 0,
            GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4),
            GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6),
            GSO_UDP => has(VIRTIO_NET_F_HOST_UFO),
            _ => false,
        } && (h.gso_type & GSO_ECN == 0 || has(VIRTIO_NET_F_HOST_ECN));
        if !ok {
            return Err(HeaderError::Gso(h.gso_type));
        }
        Ok(h)
    }

    /// Whether a frame with this header may be delivered to a guest that acked `acked`
    /// (the guest must have negotiated every offload the frame relies on).
    pub fn deliverable_to(&self, acked: u64) -> bool {
        let has = |bit| acked & feature(bit) != 0;
        if self.flags & HDR_F_NEEDS_CSUM != 0 && !has(VIRTIO_NET_F_GUEST_CSUM) {
            return false;
        }
        (match self.gso_type & !GSO_ECN {
            GSO_NONE => true,
            GSO_TCPV4 => has(VIRTIO_NET_F_GUEST_TSO4),
            GSO_TCPV6 => has(VIRTIO_NET_F_GUEST_TSO6),
            GSO_UDP => has(VIRTIO_NET_F_GUEST_UFO),
            _ => false,
        }) && (self.gso_type & GSO_ECN == 0 || has(VIRTIO_NET_F_GUEST_ECN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(flags: u8, gso: u8, cs: u16, co: u16, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; NET_HDR_LEN + len];
        f[0] = flags;
        f[1] = gso;
        f[6..8].copy_from_slice(&cs.to_le_bytes());
        f[8..10].copy_from_slice(&co.to_le_bytes());
        f
    }

    #[test]
    fn tx_checks() {
        let all = u64::MAX;
        assert!(NetHeader::check_tx(&frame(0, 0, 0, 0, 60), 0).is_ok());
        assert_eq!(
            NetHeader::check_tx(&[0u8; 5], all),
            Err(HeaderError::Short(5))
        );
        assert_eq!(
            NetHeader::check_tx(&frame(HDR_F_NEEDS_CSUM, 0, 34, 16, 60), 0),
            Err(HeaderError::CsumNotNegotiated)
        );
        assert!(NetHeader::check_tx(&frame(HDR_F_NEEDS_CSUM, 0, 34, 16, 60), all).is_ok());
        assert!(matches!(
            NetHeader::check_tx(&frame(HDR_F_NEEDS_CSUM, 0, 58, 16, 60), all),
            Err(HeaderError::CsumOutside { .. })
        ));
        for g in [GSO_TCPV4, GSO_TCPV6, GSO_UDP, GSO_TCPV4 | GSO_ECN] {
            assert_eq!(
                NetHeader::check_tx(&frame(0, g, 0, 0, 60), 0),
                Err(HeaderError::Gso(g))
            );
            assert!(NetHeader::check_tx(&frame(0, g, 0, 0, 60), all).is_ok());
        }
        assert!(NetHeader::check_tx(&frame(0, 9, 0, 0, 60), all).is_err());
        assert!(NetHeader::check_tx(&frame(0, GSO_ECN, 0, 0, 60), all).is_err());
    }

    #[test]
    fn rx_deliverability() {
        let h = NetHeader::parse(&frame(HDR_F_NEEDS_CSUM, GSO_TCPV4, 0, 0, 1)).unwrap();
        assert!(!h.deliverable_to(0));
        assert!(!h.deliverable_to(feature(VIRTIO_NET_F_GUEST_CSUM)));
        assert!(
            h.deliverable_to(feature(VIRTIO_NET_F_GUEST_CSUM) | feature(VIRTIO_NET_F_GUEST_TSO4))
        );
        assert!(NetHeader::default().deliverable_to(0));
        let e = NetHeader::parse(&frame(0, GSO_TCPV6 | GSO_ECN, 0, 0, 1)).unwrap();
        assert!(!e.deliverable_to(feature(VIRTIO_NET_F_GUEST_TSO6)));
        let u = NetHeader::parse(&frame(0, GSO_UDP, 0, 0, 1)).unwrap();
        assert!(u.deliverable_to(feature(VIRTIO_NET_F_GUEST_UFO)));
        assert!(!NetHeader::parse(&frame(0, 7, 0, 0, 1))
            .unwrap()
            .deliverable_to(u64::MAX));
    }
}
