//! mini-vmm: a minimal VMM built from the vmkit crates.

fn main() {}
