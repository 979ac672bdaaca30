//! Fuzzes virtio-blk request processing over a guest memory image the fuzzer controls (descriptors, rings, requests). Decoding and invariants live in vmkit_fuzz_common::virtio.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmkit_fuzz_common::virtio::blk(data);
});
