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
//! | `0x1fb000` | user, writable (CR4.SMAP = 1)    | read, RFLAGS.AC = 0   | `0x1` (P)           |
//! | `0x1fb000` | same                             | read, RFLAGS.AC = 1   | -                   |
//! | `0x1fa000` | user, executable (CR4.SMEP = 1)  | call (instr. fetch)   | `0x11` (P, I/D)     |
//! | `0x40a00000` | 2 MiB page, reserved bit 13 set | read                 | `0x9` (P, RSVD)     |
//! | `0x1fb000` | user, writable (CR4.SMAP = 1)    | write, RFLAGS.AC = 0  | `0x3` (P, W)        |
//!
//! The user pages are user pages because every level above them has U/S set too (the
//! permission is the AND over the walk); all other leaves are supervisor-only. CR4.SMEP and
//! CR4.SMAP are enabled after the tables are live (the guest needs both in CPUID; without
//! them the `mov cr4` raises #GP and the guest ends with status 0xfa17).
//!
//! Protocol, for each probe in the order above: on a page fault the handler writes CR2 bits
//! 31:0 to port 0x520, CR2 bits 63:32 to port 0x521 and the error code to port 0x522, then
//! resumes after the probing instruction; after each probe the guest writes the probe's index
//! (0..8) to port 0x511. Any other exception writes its vector to port 0x523 and ends with
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
const U: u64 = 4;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;

const NOT_PRESENT: u64 = 0x1ff000;
const READ_ONLY: u64 = 0x1fe000;
const NO_EXEC: u64 = 0x1fd000;
const WRITABLE: u64 = 0x1fc000;
const USER_DATA: u64 = 0x1fb000;
const USER_CODE: u64 = 0x1fa000;
/// A 2 MiB page whose PDE has bit 13 set: reserved in a 2 MiB PDE whatever MAXPHYADDR is.
const RESERVED_2M: u64 = 0x40a0_0000;
const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;

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
        // U/S on the upper levels: only the leaves decide who may access what below.
        pml4.0[0] = addr_of!(PDPT) as u64 | P | W | U;
        for (i, pd) in pds.iter_mut().enumerate() {
            pdpt.0[i] = pd as *const Table as u64 | P | W | U;
            for (j, e) in pd.0.iter_mut().enumerate() {
                *e = (((i as u64) << 30) | ((j as u64) << 21)) | P | W | PS;
            }
        }
        pds[0].0[0] = addr_of!(PT) as u64 | P | W | U;
        pds[(RESERVED_2M >> 30) as usize].0[((RESERVED_2M >> 21) & 511) as usize] |= 1 << 13;
        for (k, e) in pt.0.iter_mut().enumerate() {
            *e = ((k as u64) << 12) | P | W;
        }
        // A `ret` in the page that becomes no-execute.
        core::ptr::write_volatile(NO_EXEC as *mut u8, 0xc3);
        // And one in the user page the supervisor must not execute under SMEP.
        core::ptr::write_volatile(USER_CODE as *mut u8, 0xc3);
        pt.0[(NOT_PRESENT >> 12) as usize] = 0;
        pt.0[(READ_ONLY >> 12) as usize] = READ_ONLY | P;
        pt.0[(NO_EXEC >> 12) as usize] = NO_EXEC | P | W | NX;
        pt.0[(USER_DATA >> 12) as usize] = USER_DATA | P | W | U;
        pt.0[(USER_CODE >> 12) as usize] = USER_CODE | P | W | U;

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
        asm!(
            "mov {t}, cr4",
            "or {t}, {bits}",
            "mov cr4, {t}",
            t = out(reg) _,
            bits = in(reg) CR4_SMEP | CR4_SMAP,
            options(nostack),
        );
    }
}

/// A read with RFLAGS.AC set, which SMAP exempts; AC is cleared again after. (`popfq`
/// rather than `stac`/`clac`: this host's software KVM cannot emulate those.)
fn probe_read_with_ac(addr: u64) {
    // SAFETY: as for probe_read; AC is cleared on both the normal and the fault path, and
    // the pushes and pops balance.
    unsafe {
        asm!(
            "pushfq",
            "or qword ptr [rsp], {ac}",
            "popfq",
            "lea {t}, [rip + 2f]",
            "mov [rip + PF_RECOVER], {t}",
            "mov {t}, [{a}]",
            "2:",
            "pushfq",
            "and qword ptr [rsp], {not_ac}",
            "popfq",
            a = in(reg) addr,
            t = out(reg) _,
            ac = in(reg) 1u64 << 18,
            not_ac = in(reg) !(1u64 << 18),
        )
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
    probe_read(USER_DATA);
    outl(DATA_PORT, 4);
    probe_read_with_ac(USER_DATA);
    outl(DATA_PORT, 5);
    probe_exec(USER_CODE);
    outl(DATA_PORT, 6);
    probe_read(RESERVED_2M);
    outl(DATA_PORT, 7);
    probe_write(USER_DATA);
    outl(DATA_PORT, 8);
    exit(0)
}

vmkit_guests::entry!(main);
