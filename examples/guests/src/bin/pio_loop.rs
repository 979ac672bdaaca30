//! The port-I/O loop guest used by benchmarks: reads a count N from port 0x510, writes
//! 0, 1, ..., N-1 to port 0x511 (one exit per write), reports status 0 and halts.
#![no_std]
#![no_main]

use vmkit_guests::{exit, inl, outl, DATA_PORT, PARAM_PORT};

fn main() -> ! {
    let n = inl(PARAM_PORT);
    let mut i = 0;
    while i < n {
        outl(DATA_PORT, i);
        i += 1;
    }
    exit(0)
}

vmkit_guests::entry!(main);
