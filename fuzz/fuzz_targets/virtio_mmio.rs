//! Fuzzes sequences of virtio-mmio register reads and writes against a blk or rng device. Decoding and invariants live in vmkit_fuzz_common::virtio.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmkit_fuzz_common::virtio::mmio(data);
});
