//! The paging guest: builds its own 4-level page tables and IDT, then probes accesses that
//! must fault and reports every page fault to the VMM. It is an oracle for page-table
//! walkers: what this CPU (KVM's MMU) reports is what a walker must compute.
//!
//! Address space: 0..4 GiB identity mapped (2 MiB pages), except the first 2 MiB which go
//! through a 4 KiB page table in which three test pages are special:
//!
//! | page       | mapping                          | probe                 | expected error code |
//! |------------|----------------------------------|-----------------------|---------------------|
//! | `0x1ff000` | not present                      | read                  | `0x0`               |
//! | `0x1fe000` | present, read-only (CR0.WP = 1)  | write                 | `0x3` (P, W)        |
//! | `0x1fd000` | present, no-execute (EFER.NXE=1) | call (instr. fetch)   | `0x11` (P, I/D)     |
//! | `0x1fc000` | present, writable                | write (no fault)      | -                   |
//!
//! Protocol, for each probe in the order above: on a page fault the handler writes CR2 bits
//! 31:0 to port 0x520, CR2 bits 63:32 to port 0x521 and the error code to port 0x522, then
//! resumes after the probing instruction; after each probe the guest writes the probe's index
//! (0..3) to port 0x511. Any other exception writes its vector to port 0x523 and ends with
//! status 0xfa17. At the end the guest writes status 0 to port 0xf4 and halts.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::ptr::{addr_of, addr_of_mut};
use vmkit_guests::{exit, outl, rdmsr, wrmsr, DATA_PORT};

#[repr(C, align(4096))]
struct Table([u64; 512]);

static mut PML4: Table = Table([0; 512]);
static mut PDPT: Table = Table([0; 512]);
static mut PDS: [Table; 4] = [const { Table([0; 512]) }; 4];
static mut PT: Table = Table([0; 512]);
static mut IDT: [u64; 64] = [0; 64];

/// Where the page-fault handler resumes; set by each probe.
#[no_mangle]
static mut PF_RECOVER: u64 = 0;

const P: u64 = 1;
const W: u64 = 2;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;

const NOT_PRESENT: u64 = 0x1ff000;
const READ_ONLY: u64 = 0x1fe000;
const NO_EXEC: u64 = 0x1fd000;
const WRITABLE: u64 = 0x1fc000;

global_asm!(
    ".global pf_handler",
    "pf_handler:",
    "push rax",
    "push rdx",
    "mov rax, cr2",
    "mov dx, 0x520",
    "out dx, eax",
    "shr rax, 32",
    "mov dx, 0x521",
    "out dx, eax",
    "mov rax, [rsp + 16]",
    "mov dx, 0x522",
    "out dx, eax",
    "mov rax, [rip + PF_RECOVER]",
    "mov [rsp + 24], rax",
    "pop rdx",
    "pop rax",
    "add rsp, 8",
    "iretq",
    ".global other_handler",
    "other_handler:",
    "mov dx, 0x523",
    "mov eax, 0xff",
    "out dx, eax",
    "mov dx, 0xf4",
    "mov eax, 0xfa17",
    "out dx, eax",
    "3: hlt",
    "jmp 3b",
);

extern "C" {
    fn pf_handler();
    fn other_handler();
}

fn gate(handler: u64, cs: u16) -> (u64, u64) {
    let low = (handler & 0xffff)
        | (u64::from(cs) << 16)
        | (0x8e << 40)
        | (((handler >> 16) & 0xffff) << 48);
    (low, handler >> 32)
}

fn setup() {
    let cs: u16;
    // SAFETY: reads the code segment selector the VMM set up.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    // SAFETY: single-threaded guest, interrupts off; the tables are only touched here.
    unsafe {
        let pml4 = &mut *addr_of_mut!(PML4);
        let pdpt = &mut *addr_of_mut!(PDPT);
        let pds = &mut *addr_of_mut!(PDS);
        let pt = &mut *addr_of_mut!(PT);
        pml4.0[0] = addr_of!(PDPT) as u64 | P | W;
        for (i, pd) in pds.iter_mut().enumerate() {
            pdpt.0[i] = pd as *const Table as u64 | P | W;
            for (j, e) in pd.0.iter_mut().enumerate() {
                *e = (((i as u64) << 30) | ((j as u64) << 21)) | P | W | PS;
            }
        }
        pds[0].0[0] = addr_of!(PT) as u64 | P | W;
        for (k, e) in pt.0.iter_mut().enumerate() {
            *e = ((k as u64) << 12) | P | W;
        }
        // A `ret` in the page that becomes no-execute.
        core::ptr::write_volatile(NO_EXEC as *mut u8, 0xc3);
        pt.0[(NOT_PRESENT >> 12) as usize] = 0;
        pt.0[(READ_ONLY >> 12) as usize] = READ_ONLY | P;
        pt.0[(NO_EXEC >> 12) as usize] = NO_EXEC | P | W | NX;

        let idt = &mut *addr_of_mut!(IDT);
        for v in 0..32 {
            let h = if v == 14 { pf_handler as *const () as u64 } else { other_handler as *const () as u64 };
            let (lo, hi) = gate(h, cs);
            idt[v * 2] = lo;
            idt[v * 2 + 1] = hi;
        }
        let idtr: [u16; 5] = {
            let base = addr_of!(IDT) as u64;
            [
                (32 * 16 - 1) as u16,
                base as u16,
                (base >> 16) as u16,
                (base >> 32) as u16,
                (base >> 48) as u16,
            ]
        };
        asm!("lidt [{}]", in(reg) idtr.as_ptr(), options(nostack));
        wrmsr(0xc000_0080, rdmsr(0xc000_0080) | (1 << 11)); // EFER.NXE
        asm!(
            "mov {t}, cr0",
            "or {t}, {wp}",
            "mov cr0, {t}",
            "mov cr3, {root}",
            t = out(reg) _,
            wp = in(reg) 1u64 << 16,
            root = in(reg) addr_of!(PML4) as u64,
            options(nostack),
        );
    }
}

fn probe_read(addr: u64) {
    // SAFETY: the access may fault; the handler resumes at label 2.
    unsafe {
        asm!(
            "lea {t}, [rip + 2f]",
            "mov [rip + PF_RECOVER], {t}",
            "mov {t}, [{a}]",
            "2:",
            a = in(reg) addr,
            t = out(reg) _,
            options(nostack),
        )
    }
}

fn probe_write(addr: u64) {
    // SAFETY: as for probe_read; the written page belongs to no Rust object.
    unsafe {
        asm!(
            "lea {t}, [rip + 2f]",
            "mov [rip + PF_RECOVER], {t}",
            "mov qword ptr [{a}], {t}",
            "2:",
            a = in(reg) addr,
            t = out(reg) _,
            options(nostack),
        )
    }
}

fn probe_exec(addr: u64) {
    // SAFETY: calls a `ret`; when the fetch faults, the pushed return address is discarded by
    // resuming at label 2 with rsp restored from rbp-free bookkeeping in {s}.
    unsafe {
        asm!(
            "mov {s}, rsp",
            "lea {t}, [rip + 2f]",
            "mov [rip + PF_RECOVER], {t}",
            "call {a}",
            "2:",
            "mov rsp, {s}",
            a = in(reg) addr,
            t = out(reg) _,
            s = out(reg) _,
        )
    }
}

fn main() -> ! {
    setup();
    probe_read(NOT_PRESENT);
    outl(DATA_PORT, 0);
    probe_write(READ_ONLY);
    outl(DATA_PORT, 1);
    probe_exec(NO_EXEC);
    outl(DATA_PORT, 2);
    probe_write(WRITABLE);
    outl(DATA_PORT, 3);
    exit(0)
}

vmkit_guests::entry!(main);
