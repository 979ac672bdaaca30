//! virtio-net (virtio 1.2, 5.1): one receive and one transmit queue.
//!
//! * [`header`] decodes and checks the virtio-net header against negotiated offloads;
//! * [`backend`] defines [`NetBackend`] and the in-process [`ChannelBackend`] pair (two devices
//!   wired back to back, for tests and benchmarks);
//! * [`tap`] is the Linux TAP backend (`IFF_VNET_HDR`, offloads via `TUNSETOFFLOAD`);
//! * [`device`] is the [`Net`] state machine, [`process_tx`] and [`deliver_frame`].
//!
//! Offered: MAC, STATUS (link up), MTU, CSUM/GUEST_CSUM, TSO4/TSO6/ECN/UFO in both directions,
//! MRG_RXBUF. Frames spread over several receive chains are published with a single used-index
//! update so the driver never sees half of a merged frame.

pub mod backend;
pub mod device;
pub mod header;
pub mod tap;

pub use backend::{ChannelBackend, NetBackend};
pub use device::{
    deliver_frame, net_features_consistent, process_tx, Net, NetConfig, NetStats, RxOutcome,
    TxOutcome,
};
pub use tap::Tap;
