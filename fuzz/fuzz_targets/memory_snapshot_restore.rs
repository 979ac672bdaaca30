//! Feeds arbitrary bytes as a snapshot file to vmkit-memory's validating restore: it must give
//! a typed error or succeed, never panic, and never touch guest memory on error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmkit_fuzz_common::memory::snapshot_restore(data);
});
