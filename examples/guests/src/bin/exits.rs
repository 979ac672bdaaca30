//! The exits guest: produces the exits a VMM can observe, one after the other, so tests can
//! check each `VmExit` kind. The mode comes from port 0x510 (itself an "in" exit):
//!
//! * mode 0: `out` 0x511 <- 0xa0; MMIO write u32 0xa1 @0xd000_0000; MMIO read u32
//!   @0xd000_0004 (reported on 0x511); `rdmsr`/`wrmsr` 0x4b56_4d99 (an MSR KVM does not know;
//!   the value read is written back plus one); hypercall nr 12 (result on 0x511); `hlt`;
//!   then a triple fault (IDT limit 0 + `ud2`) -> shutdown.
//! * mode 1: executes `xsave`, which this machine's KVM cannot emulate -> internal error.
//! * mode 2: spins forever without exits, until the VMM kicks the vCPU.
//! * mode 3: a tight loop for single-stepping (debug exits), then status 0.
#![no_std]
#![no_main]

use core::arch::asm;
use core::ptr::{read_volatile, write_volatile};
use vmkit_guests::{exit, hlt, hypercall, inl, outl, rdmsr, vmcall, wrmsr, DATA_PORT, PARAM_PORT};

const MMIO: usize = 0xd000_0000;
const TEST_MSR: u32 = 0x4b56_4d99;

fn main() -> ! {
    let param = inl(PARAM_PORT);
    match param & 0xff {
        0 => {
            outl(DATA_PORT, 0xa0);
            // SAFETY: nothing is mapped at MMIO, every access traps to the VMM.
            unsafe {
                write_volatile(MMIO as *mut u32, 0xa1);
                outl(DATA_PORT, read_volatile((MMIO + 4) as *const u32));
            }
            let v = rdmsr(TEST_MSR);
            wrmsr(TEST_MSR, v.wrapping_add(1));
            if param & 0x100 != 0 {
                outl(DATA_PORT, vmcall(12, 0x20_0000, 1, 0, 0) as u32);
            }
            outl(DATA_PORT, hypercall(12, 0x20_0000, 1, 0, 0) as u32);
            hlt();
            outl(DATA_PORT, 0xa2);
            let idt = [0u16; 5];
            // SAFETY: deliberately makes every exception unrecoverable: #UD with an empty IDT
            // becomes #DF, then a triple fault, which ends the VM (a shutdown exit).
            unsafe { asm!("lidt [{}]", "ud2", in(reg) idt.as_ptr(), options(noreturn)) }
        }
        1 => {
            let mut area = [0u64; 128];
            // SAFETY: xsave writes into `area`; on this machine KVM fails to emulate it first.
            unsafe { asm!("xsave64 [{}]", in(reg) area.as_mut_ptr(), in("eax") 0, in("edx") 0) };
            exit(area[0] as u32)
        }
        2 => loop {
            // SAFETY: a no-op; keeps the loop from being optimised into something else.
            unsafe { asm!("nop", options(nomem, nostack)) }
        },
        _ => {
            let mut acc = 0u32;
            for i in 0..4u32 {
                acc = acc.wrapping_add(i);
            }
            exit(acc.wrapping_sub(6))
        }
    }
}

vmkit_guests::entry!(main);
