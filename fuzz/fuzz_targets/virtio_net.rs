//! Fuzzes virtio-net TX and RX (plain and mergeable) over a fuzzed guest memory image, through a back-to-back pair. Decoding and invariants live in vmkit_fuzz_common::virtio.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmkit_fuzz_common::virtio::net(data);
});
