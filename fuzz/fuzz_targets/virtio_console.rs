//! Fuzzes virtio-console transmit and receive queues over a fuzzed guest memory image. Decoding and invariants live in vmkit_fuzz_common::virtio.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmkit_fuzz_common::virtio::console(data);
});
