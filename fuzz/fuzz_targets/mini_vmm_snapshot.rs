//! Decodes arbitrary bytes as mini-vmm's `machine.txt` or `devices.bin` (untrusted snapshot
//! input for `--restore`): no panic, and whatever decodes re-encodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmkit_fuzz_common::mini_vmm::decode(data);
});
