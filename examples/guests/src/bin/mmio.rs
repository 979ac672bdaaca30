//! The MMIO guest: writes and reads every access width in the MMIO window at 0xd000_0000 and
//! reads one unclaimed address, reporting what it read on port 0x511.
//!
//! Sequence (the VMM's tests check it):
//! 1. writes: u8 0x11 @+0x0, u16 0x2233 @+0x2, u32 0x44556677 @+0x4, u64 0x8899aabbccddeeff @+0x8
//! 2. reads u8 @+0x10, u16 @+0x12, u32 @+0x14, u64 @+0x18; each value goes to port 0x511
//!    (the u64 as low then high dword)
//! 3. reads u32 at 0xe000_0000 (nothing there) and reports it
//! 4. status 0, halt
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};
use vmkit_guests::{exit, outl, DATA_PORT};

const BASE: usize = 0xd000_0000;
const UNCLAIMED: usize = 0xe000_0000;

fn main() -> ! {
    // SAFETY: the VMM maps nothing at these addresses, so every access traps to it.
    unsafe {
        write_volatile(BASE as *mut u8, 0x11);
        write_volatile((BASE + 0x2) as *mut u16, 0x2233);
        write_volatile((BASE + 0x4) as *mut u32, 0x4455_6677);
        write_volatile((BASE + 0x8) as *mut u64, 0x8899_aabb_ccdd_eeff);
        outl(
            DATA_PORT,
            u32::from(read_volatile((BASE + 0x10) as *const u8)),
        );
        outl(
            DATA_PORT,
            u32::from(read_volatile((BASE + 0x12) as *const u16)),
        );
        outl(DATA_PORT, read_volatile((BASE + 0x14) as *const u32));
        let q = read_volatile((BASE + 0x18) as *const u64);
        outl(DATA_PORT, q as u32);
        outl(DATA_PORT, (q >> 32) as u32);
        outl(DATA_PORT, read_volatile(UNCLAIMED as *const u32));
    }
    exit(0)
}

vmkit_guests::entry!(main);
