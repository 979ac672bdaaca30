//! Feeds arbitrary instruction bytes, registers and memory to vmkit-vcpu's MMIO instruction
//! emulator: it must never panic, and RIP must move past every completed instruction.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmkit_fuzz_common::vcpu::emulate_bytes(data);
});
