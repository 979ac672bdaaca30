//! Drives the shadow MMU with a guest's tables, hostile or not, and a sequence of guest
//! events (accesses, table writes reported or stored through the MMU, CR3 loads, flushes,
//! zaps, control-register changes) in every paging mode: no panic, no hang, and every host
//! address the shadow hands out lies in guest RAM.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmkit_fuzz_common::paging::shadow_bytes(data);
});
