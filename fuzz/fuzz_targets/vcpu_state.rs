//! Decodes arbitrary bytes as a saved vCPU state (untrusted snapshot input): no panic, and
//! whatever decodes re-encodes to the same state.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmkit_fuzz_common::vcpu::decode_state(data);
});
