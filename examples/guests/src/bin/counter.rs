//! The counter guest for save/restore tests: reads N from port 0x510 and writes N values of a
//! pseudo-random sequence to port 0x511. Each value depends on registers and on a table in
//! guest memory, so a restored vCPU only reproduces the sequence if its registers and the
//! memory came back exactly.
#![no_std]
#![no_main]

use vmkit_guests::{exit, inl, outl, DATA_PORT, PARAM_PORT};

static mut RING: [u32; 16] = [0; 16];

fn main() -> ! {
    let n = inl(PARAM_PORT);
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut i: u32 = 0;
    while i < n {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let slot = (i as usize * 7) & 15;
        // SAFETY: single-threaded guest; the index is masked into range.
        let old = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(RING[slot])) };
        let v = ((x >> 32) as u32) ^ old;
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!(RING[slot]), v) };
        outl(DATA_PORT, v);
        i += 1;
    }
    exit(0)
}

vmkit_guests::entry!(main);
