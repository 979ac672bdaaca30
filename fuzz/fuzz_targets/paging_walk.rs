//! Walks arbitrary bytes as page tables - guest tables in every paging mode, EPT, and the
//! nested walk - through the walker, software TLB and page-walk caches: no panic, bounded
//! walks, TLB consistent with the direct walk.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmkit_fuzz_common::paging::walk_bytes(data);
});
