//! Versioned device state for snapshot and live migration.
//!
//! [`DeviceState`] is what [`crate::VirtioDevice::save_state`] returns: negotiated features,
//! every queue's `QueueState` (addresses, size, ready, `next_avail`/`next_used`, event-idx)
//! and an opaque device-specific blob. [`DeviceState::to_bytes`] encodes it as a small
//! little-endian format that starts with a magic and a version number, so a future layout can
//! still read old snapshots; [`DeviceState::from_bytes`] checks every length against the input
//! (snapshot files are untrusted input too).

use virtio_queue::QueueState;

/// Magic at the start of an encoded [`DeviceState`].
pub const STATE_MAGIC: [u8; 4] = *b"VKDS";
/// The current encoding version.
pub const STATE_VERSION: u32 = 1;
/// Upper bound on the number of queues in a snapshot (guards allocation on hostile input).
const MAX_QUEUES: usize = 1024;

/// Errors while decoding or applying device state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The input does not start with [`STATE_MAGIC`].
    #[error("not a device state: magic {0:?}")]
    Magic([u8; 4]),
    /// The input has a version this crate cannot read.
    #[error("unsupported device state version {0} (this build reads {STATE_VERSION})")]
    Version(u32),
    /// The input ends early.
    #[error("device state truncated at byte {0}")]
    Truncated(usize),
    /// Bytes follow the encoded state.
    #[error("{0} trailing bytes after device state")]
    Trailing(usize),
    /// More queues than any device has.
    #[error("device state lists {0} queues")]
    TooManyQueues(usize),
    /// The state belongs to another device type.
    #[error("device state is for device type {found}, this device is type {expected}")]
    DeviceType {
        /// This device's type.
        expected: u32,
        /// The snapshot's type.
        found: u32,
    },
    /// The state acks features this device does not offer.
    #[error("device state acks features {0:#x} outside the offer")]
    Features(u64),
    /// A queue's maximum size differs from this device's.
    #[error("queue {0} has maximum size {1} in the snapshot, more than this device allows (or the queue does not exist)")]
    QueueMaxSize(usize, u16),
    /// A queue state is invalid.
    #[error("queue {0} state is invalid: {1}")]
    Queue(usize, virtio_queue::Error),
    /// The device-specific blob is malformed.
    #[error("device-specific state is malformed: {0}")]
    Device(String),
    /// The snapshot's queue count differs from the device's.
    #[error("snapshot has {found} queues, the device has {expected}")]
    QueueCount {
        /// Queues of this device.
        expected: usize,
        /// Queues in the snapshot.
        found: usize,
    },
    /// Re-activating the restored device failed.
    #[error("cannot re-activate restored device: {0}")]
    Activate(#[from] crate::device::ActivateError),
}

/// The saved state of one device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceState {
    /// Device ID.
    pub device_type: u32,
    /// Accepted features.
    pub acked_features: u64,
    /// Whether the device was running.
    pub activated: bool,
    /// Queue states (empty if not activated).
    pub queues: Vec<QueueState>,
    /// Device-specific bytes.
    pub device: Vec<u8>,
}

impl DeviceState {
    /// Encodes the state (magic, version, fields, little endian).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.queues.len() * 40 + self.device.len());
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&self.device_type.to_le_bytes());
        out.extend_from_slice(&self.acked_features.to_le_bytes());
        out.push(u8::from(self.activated));
        out.extend_from_slice(&(self.queues.len() as u32).to_le_bytes());
        for q in &self.queues {
            put_queue(&mut out, q);
        }
        out.extend_from_slice(&(self.device.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.device);
        out
    }

    /// Decodes [`DeviceState::to_bytes`] output, rejecting anything malformed.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = ByteReader { bytes, pos: 0 };
        let magic: [u8; 4] = r.array()?;
        if magic != STATE_MAGIC {
            return Err(StateError::Magic(magic));
        }
        let version = r.u32()?;
        if version != STATE_VERSION {
            return Err(StateError::Version(version));
        }
        let device_type = r.u32()?;
        let acked_features = r.u64()?;
        let activated = r.u8()? != 0;
        let nq = r.u32()? as usize;
        if nq > MAX_QUEUES {
            return Err(StateError::TooManyQueues(nq));
        }
        let mut queues = Vec::with_capacity(nq);
        for _ in 0..nq {
            queues.push(read_queue(&mut r)?);
        }
        let dlen = r.u32()? as usize;
        let device = r.take(dlen)?.to_vec();
        if r.pos != bytes.len() {
            return Err(StateError::Trailing(bytes.len() - r.pos));
        }
        Ok(Self {
            device_type,
            acked_features,
            activated,
            queues,
            device,
        })
    }
}

/// Appends one queue state.
pub(crate) fn put_queue(out: &mut Vec<u8>, q: &QueueState) {
    out.extend_from_slice(&q.max_size.to_le_bytes());
    out.extend_from_slice(&q.next_avail.to_le_bytes());
    out.extend_from_slice(&q.next_used.to_le_bytes());
    out.push(u8::from(q.event_idx_enabled));
    out.extend_from_slice(&q.size.to_le_bytes());
    out.push(u8::from(q.ready));
    out.extend_from_slice(&q.desc_table.to_le_bytes());
    out.extend_from_slice(&q.avail_ring.to_le_bytes());
    out.extend_from_slice(&q.used_ring.to_le_bytes());
}

/// Reads one queue state written by [`put_queue`].
pub(crate) fn read_queue(r: &mut ByteReader<'_>) -> Result<QueueState, StateError> {
    Ok(QueueState {
        max_size: r.u16()?,
        next_avail: r.u16()?,
        next_used: r.u16()?,
        event_idx_enabled: r.u8()? != 0,
        size: r.u16()?,
        ready: r.u8()? != 0,
        desc_table: r.u64()?,
        avail_ring: r.u64()?,
        used_ring: r.u64()?,
    })
}

/// Bounds-checked little-endian reader.
pub(crate) struct ByteReader<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> ByteReader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(StateError::Truncated(self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> DeviceState {
        DeviceState {
            device_type: 2,
            acked_features: 1 << 32,
            activated: true,
            queues: vec![QueueState {
                max_size: 256,
                next_avail: 7,
                next_used: 5,
                event_idx_enabled: true,
                size: 128,
                ready: true,
                desc_table: 0x1000,
                avail_ring: 0x2000,
                used_ring: 0x3000,
            }],
            device: vec![1, 2, 3],
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(DeviceState::from_bytes(&s.to_bytes()).unwrap(), s);
    }

    #[test]
    fn rejects_bad_input() {
        let b = sample().to_bytes();
        assert!(matches!(
            DeviceState::from_bytes(b"XXXX"),
            Err(StateError::Magic(_))
        ));
        let mut v = b.clone();
        v[4] = 9;
        assert!(matches!(
            DeviceState::from_bytes(&v),
            Err(StateError::Version(9))
        ));
        for cut in 0..b.len() {
            assert!(DeviceState::from_bytes(&b[..cut]).is_err(), "cut {cut}");
        }
        let mut v = b.clone();
        v.push(0);
        assert!(matches!(
            DeviceState::from_bytes(&v),
            Err(StateError::Trailing(1))
        ));
        let mut v = b;
        v[21..25].copy_from_slice(&5000u32.to_le_bytes());
        assert!(matches!(
            DeviceState::from_bytes(&v),
            Err(StateError::TooManyQueues(5000))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = DeviceState::from_bytes(&bytes);
        }
    }
}
