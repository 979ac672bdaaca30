//! Runtime shared by the vmkit test guests.
//!
//! Every guest is entered in 64-bit long mode at `_start` (see `link.ld`) with an identity map
//! of low memory, interrupts disabled and any stack pointer: `_start` loads its own stack and
//! calls the guest's `guest_main`. The guests talk to the VMM only through a few ports:
//!
//! | port            | direction | meaning                                                     |
//! |-----------------|-----------|-------------------------------------------------------------|
//! | `0x3f8`         | out (8)   | COM1 transmit register (16550): console text                |
//! | `0xf4`          | out (32)  | exit status; the guest halts right after writing it          |
//! | `0x500`         | out (32)  | hypercall doorbell: physical address of a [`HypercallBlock`] |
//! | `0x510`         | in  (32)  | parameter (e.g. an iteration count) supplied by the VMM     |
//! | `0x511`         | out (32)  | data value reported by the guest (benchmarks, state tests)  |
//! | `0x520..0x523`  | out (32)  | page-fault reports of the paging guest (see `paging.rs`)    |
//! | `0x524`         | out (32)  | paging guest: 1 if its protection-key probes follow, 0 if skipped |
//!
//! The paging guest also reads one switch from memory: its probes after the first nine
//! (user mode, CR0.WP = 0, protection keys) run only when the VMM wrote 1 to the 32-bit word
//! at guest-physical `0x1f1000` before starting it (see `paging.rs`).
//!
//! Everything is integer-only and avoids the instructions this machine's software KVM cannot
//! emulate (`cmpxchg16b`, `xsave`, `int3`).
#![no_std]

use core::arch::asm;
use core::fmt;

/// COM1 base port.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Port the guest writes its exit status to before halting.
pub const EXIT_PORT: u16 = 0xf4;
/// Port the guest reads its parameter from.
pub const PARAM_PORT: u16 = 0x510;
/// Port the guest reports data values on.
pub const DATA_PORT: u16 = 0x511;

/// Defines `_start`: load the stack from the linker script and call `guest_main`.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        core::arch::global_asm!(
            ".section .text.start, \"ax\"",
            ".global _start",
            "_start:",
            "lea rsp, [rip + __stack_top]",
            "xor ebp, ebp",
            "call {main}",
            "2: hlt",
            "jmp 2b",
            main = sym __vmkit_guest_main,
        );
        #[no_mangle]
        extern "C" fn __vmkit_guest_main() -> ! {
            $main()
        }
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            $crate::serial::write_str("guest panic\n");
            $crate::exit(0xdead)
        }
    };
}

/// Writes a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects inside the guest; the VMM handles it.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a dword to an I/O port.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a dword from an I/O port.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Reads a byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Halts the CPU once.
#[inline(always)]
pub fn hlt() {
    // SAFETY: halting has no memory effects.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) }
}

/// Reports `status` to the VMM and halts forever.
pub fn exit(status: u32) -> ! {
    outl(EXIT_PORT, status);
    loop {
        hlt();
    }
}

/// Port of the hypercall doorbell.
pub const HYPERCALL_PORT: u16 = 0x500;

/// The in-memory hypercall block of the port transport: the guest fills `nr` and `args`,
/// writes the block's physical address to port 0x500, and finds the result in `ret`.
/// (This machine's software KVM never forwards `vmcall`, it re-executes it forever, so the
/// guests use this transport; `vmcall` below is kept for hardware KVM.)
#[repr(C, align(64))]
pub struct HypercallBlock {
    /// Hypercall number.
    pub nr: u64,
    /// Arguments.
    pub args: [u64; 6],
    /// Result written by the VMM.
    pub ret: u64,
}

static mut HC_BLOCK: HypercallBlock = HypercallBlock {
    nr: 0,
    args: [0; 6],
    ret: 0,
};

/// Makes hypercall `nr` through the port transport and returns its result.
pub fn hypercall(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> u64 {
    let block = core::ptr::addr_of_mut!(HC_BLOCK);
    // SAFETY: single-threaded guest; the block is a static only this function touches, and
    // volatile accesses keep the compiler from caching it across the port write.
    unsafe {
        core::ptr::write_volatile(
            block,
            HypercallBlock {
                nr,
                args: [a0, a1, a2, a3, 0, 0],
                ret: u64::MAX,
            },
        );
        outl(HYPERCALL_PORT, block as u64 as u32);
        core::ptr::read_volatile(core::ptr::addr_of!((*block).ret))
    }
}

/// Issues a `vmcall` hypercall with KVM's register convention (nr in rax, args in
/// rbx, rcx, rdx, rsi) and returns rax.
#[inline(always)]
pub fn vmcall(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> u64 {
    let ret: u64;
    // SAFETY: vmcall transfers control to the hypervisor; rbx is saved around it because
    // LLVM reserves it.
    unsafe {
        asm!(
            "xchg {a0}, rbx",
            "vmcall",
            "xchg {a0}, rbx",
            a0 = inout(reg) a0 => _,
            inout("rax") nr => ret,
            in("rcx") a1,
            in("rdx") a2,
            in("rsi") a3,
        )
    }
    ret
}

/// Reads a model-specific register.
#[inline(always)]
pub fn rdmsr(index: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdmsr only reads; the VMM or KVM decides the value.
    unsafe { asm!("rdmsr", in("ecx") index, out("eax") lo, out("edx") hi, options(nomem, nostack)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
#[inline(always)]
pub fn wrmsr(index: u32, value: u64) {
    // SAFETY: the MSRs the guests write are handled by the VMM, not real hardware state
    // the guest depends on.
    unsafe {
        asm!("wrmsr", in("ecx") index, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nomem, nostack))
    }
}

/// Console output on COM1.
pub mod serial {
    /// Writes a string byte by byte to the transmit register.
    pub fn write_str(s: &str) {
        for b in s.bytes() {
            super::outb(super::SERIAL_PORT, b);
        }
    }

    /// A `core::fmt::Write` sink for `write!`.
    pub struct Serial;

    impl core::fmt::Write for Serial {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            write_str(s);
            Ok(())
        }
    }
}

/// Writes `value` in hexadecimal to the console (no formatting machinery needed).
pub fn write_hex(value: u64) {
    let mut buf = [0u8; 18];
    buf[0] = b'0';
    buf[1] = b'x';
    for i in 0..16 {
        let nibble = ((value >> ((15 - i) * 4)) & 0xf) as u8;
        buf[2 + i] = if nibble < 10 {
            b'0' + nibble
        } else {
            b'a' + nibble - 10
        };
    }
    for b in buf {
        outb(SERIAL_PORT, b);
    }
}

/// Formats to the console.
pub fn print(args: fmt::Arguments<'_>) {
    let _ = fmt::write(&mut serial::Serial, args);
}
