//! The paging guest: builds its own 4-level page tables, GDT, TSS and IDT, then probes
//! accesses from ring 0 and ring 3 that must (or must not) fault and reports every page
//! fault to the VMM. It is an oracle for page-table walkers: what this CPU (KVM's MMU)
//! reports is what a walker must compute.
//!
//! Address space: 0..4 GiB identity mapped (2 MiB pages), except the first 2 MiB which go
//! through a 4 KiB page table in which these test pages are special:
//!
//! | page         | mapping                                          |
//! |--------------|--------------------------------------------------|
//! | `0x1ff000`   | not present                                      |
//! | `0x1fe000`   | supervisor, read-only                            |
//! | `0x1fd000`   | supervisor, writable, no-execute (EFER.NXE = 1)  |
//! | `0x1fc000`   | supervisor, writable; `ud2` at +8                |
//! | `0x1fb000`   | user, writable                                   |
//! | `0x1fa000`   | user, writable; `ret` at +0, `ud2` at +1         |
//! | `0x1f7000`   | user, read-only                                  |
//! | `0x1f6000`   | user, writable, no-execute; `ud2` at +0          |
//! | `0x1f5000`   | user, writable: the ring-3 stack                 |
//! | `0x1f4000`   | supervisor, read-only (written with CR0.WP = 0)  |
//! | `0x1f3000`   | user, writable, protection key 1; `ud2` at +0    |
//! | `0x1f2000`   | user, writable, protection key 2                 |
//! | `0x40a00000` | 2 MiB page, reserved bit 13 set in its PDE       |
//!
//! plus the page(s) of the `.text.user` section (the ring-3 probe stubs), which are user
//! pages too. The user pages are user pages because every level above them has U/S set (the
//! permission is the AND over the walk); all other leaves are supervisor-only. The keys in
//! PTE bits 62:59 are ignored unless CR4.PKE is set.
//!
//! # Probes
//!
//! CPL is the privilege of the access; WP is CR0.WP, AC is RFLAGS.AC; CR4.SMEP, CR4.SMAP and
//! EFER.NXE are set for all of them. Error-code bits: P 0x1, W 0x2, U 0x4, RSVD 0x8, I/D
//! 0x10, PK 0x20.
//!
//! | #  | CPL | WP | AC | access | page         | why                                | expected |
//! |----|-----|----|----|--------|--------------|------------------------------------|----------|
//! | 0  | 0   | 1  | 0  | read   | `0x1ff000`   | not present                        | `0x0`    |
//! | 1  | 0   | 1  | 0  | write  | `0x1fe000`   | read-only, WP = 1                  | `0x3`    |
//! | 2  | 0   | 1  | 0  | fetch  | `0x1fd000`   | no-execute                         | `0x11`   |
//! | 3  | 0   | 1  | 0  | write  | `0x1fc000`   | writable                           | -        |
//! | 4  | 0   | 1  | 0  | read   | `0x1fb000`   | user page, SMAP                    | `0x1`    |
//! | 5  | 0   | 1  | 1  | read   | `0x1fb000`   | user page, SMAP, AC = 1            | -        |
//! | 6  | 0   | 1  | 0  | fetch  | `0x1fa000`   | user page, SMEP                    | `0x11`   |
//! | 7  | 0   | 1  | 0  | read   | `0x40a00000` | reserved bit in the PDE            | `0x9`    |
//! | 8  | 0   | 1  | 0  | write  | `0x1fb000`   | user page, SMAP                    | `0x3`    |
//! | 9  | 3   | 1  | 0  | read   | `0x1fc000`   | supervisor page                    | `0x5`    |
//! | 10 | 3   | 1  | 0  | write  | `0x1f7000`   | read-only user page                | `0x7`    |
//! | 11 | 3   | 1  | 0  | fetch  | `0x1f6000`   | no-execute user page               | `0x15`   |
//! | 12 | 3   | 1  | 0  | fetch  | `0x1fc008`   | supervisor page                    | `0x15`   |
//! | 13 | 3   | 1  | 0  | read   | `0x1ff000`   | not present                        | `0x4`    |
//! | 14 | 3   | 1  | 0  | write  | `0x1fb000`   | writable user page                 | -        |
//! | 15 | 3   | 1  | 0  | read   | `0x40a00000` | reserved bit (on a supervisor page)| `0xd`    |
//! | 16 | 3   | 1  | 0  | fetch  | `0x1fa001`   | user code page                     | -        |
//! | 17 | 3   | 1  | 0  | read   | `0x1f7000`   | read-only user page                | -        |
//! | 18 | 0   | 0  | 0  | write  | `0x1f4000`   | read-only, WP = 0                  | -        |
//! | 19 | 0   | 0  | 1  | write  | `0x1f7000`   | read-only user page, WP = 0, AC = 1| -        |
//! | 20 | 0   | 0  | 0  | write  | `0x1f7000`   | user page, SMAP (WP does not help) | `0x3`    |
//! | 21 | 3   | 0  | 0  | write  | `0x1f7000`   | read-only user page (WP is moot)   | `0x7`    |
//!
//! Then, only if CPUID.(EAX=7,ECX=0):ECX.PKU is set, CR4.PKE = 1 and PKRU = `0x24` (key 1:
//! access disable, key 2: write disable):
//!
//! | #  | CPL | WP | AC | access | page       | why                                  | expected |
//! |----|-----|----|----|--------|------------|--------------------------------------|----------|
//! | 22 | 3   | 1  | 0  | read   | `0x1f3000` | key 1 AD                             | `0x25`   |
//! | 23 | 3   | 1  | 0  | write  | `0x1f2000` | key 2 WD                             | `0x27`   |
//! | 24 | 3   | 1  | 0  | read   | `0x1f2000` | key 2 WD (reads allowed)             | -        |
//! | 25 | 3   | 1  | 0  | fetch  | `0x1f3000` | key 1 AD (keys never apply to fetches)| -       |
//! | 26 | 0   | 1  | 1  | write  | `0x1f2000` | supervisor write, key 2 WD, WP = 1   | `0x23`   |
//! | 27 | 0   | 1  | 1  | read   | `0x1f3000` | supervisor read, key 1 AD            | `0x21`   |
//! | 28 | 0   | 0  | 1  | write  | `0x1f2000` | key 2 WD, but WP = 0: WD ignored     | -        |
//!
//! The "expected" column is the architecture's answer (Intel SDM Vol. 3, 4.6 and 4.7); the
//! host test does not hard-code it for the verdict, it compares the walker with what this
//! CPU delivered.
//!
//! # Ring 3
//!
//! The guest loads its own GDT (kernel code 0x08, reloaded into CS with a far return, and
//! data 0x10, user data 0x1b, user code 0x23, a 64-bit TSS at 0x28 whose RSP0 is a kernel
//! stack) with `ltr`. A
//! ring-3 probe is a call to `enter_user(stub, operand, user_stack)`: it saves the kernel
//! stack pointer and `iretq`s to a stub in the user pages (`mov rax, [rsi]`, `mov [rsi], rax`
//! or `jmp rsi`), which ends in `ud2`. A page fault from ring 3 is reported like any other and
//! resumes, still at CPL3, at a `ud2` in the stubs. That `#UD` (vector 6, from CPL3 only)
//! is the way back to ring 0: its handler restores the kernel segments and stack and returns
//! from `enter_user`. `ud2` rather than `int n` or `int3`, which this machine's software KVM
//! cannot emulate, and rather than `syscall`, which would need its MSRs set up for nothing.
//! A fetch probe that must not fault jumps to a `ud2` placed in the target page.
//!
//! # Protocol
//!
//! Probes 0-8 always run. The others run only when the VMM has written 1 to the u32 at
//! physical address `0x1f1000` before starting the guest (crates/vmkit-vcpu/tests/
//! paging_oracle.rs does; a VMM that leaves RAM zeroed gets the nine supervisor probes, which
//! is what the smoke test in kvm_exits.rs expects).
//!
//! For each probe in the order above: on a page fault the handler writes CR2 bits 31:0 to
//! port 0x520, CR2 bits 63:32 to port 0x521 and the error code to port 0x522, then resumes
//! after the probing instruction; after each probe the guest writes the probe's index to port
//! 0x511. Before the protection-key probes the guest writes 1 (they follow) or 0 (no PKU:
//! skipped) to port 0x524. Any other exception writes 0xff to port 0x523 and ends with
//! status 0xfa17. At the end (CR0.WP = 1 again, CR4.PKE left as it was set) the guest writes
//! status 0 to port 0xf4 and halts.
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
/// Null, kernel code, kernel data, user data, user code, TSS (two slots).
static mut GDT: [u64; 7] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08: 64-bit code, DPL 0 (the same descriptor as the VMM's)
    0x00cf_9300_0000_ffff, // 0x10: data, DPL 0
    0x00cf_f300_0000_ffff, // 0x18: data, DPL 3
    0x00af_fb00_0000_ffff, // 0x20: 64-bit code, DPL 3
    0,                     // 0x28: TSS, filled in at run time
    0,
];
/// The 64-bit TSS (104 bytes): only RSP0 (bytes 4..12) and the I/O map base are used.
#[repr(C, align(16))]
struct Tss([u32; 26]);
static mut TSS: Tss = Tss([0; 26]);
/// The stack ring-0 handlers run on when an exception comes from ring 3 (TSS.RSP0).
#[repr(C, align(16))]
struct Stack([u8; 4096]);
static mut RING0_STACK: Stack = Stack([0; 4096]);

/// Where the page-fault handler resumes; set by each probe.
#[no_mangle]
static mut PF_RECOVER: u64 = 0;
/// The kernel stack pointer `enter_user` returns on.
#[no_mangle]
static mut KERNEL_RSP: u64 = 0;

const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;
const fn pkey(k: u64) -> u64 {
    k << 59
}

const NOT_PRESENT: u64 = 0x1ff000;
const READ_ONLY: u64 = 0x1fe000;
const NO_EXEC: u64 = 0x1fd000;
const WRITABLE: u64 = 0x1fc000;
const USER_DATA: u64 = 0x1fb000;
const USER_CODE: u64 = 0x1fa000;
const USER_RO: u64 = 0x1f7000;
const USER_NX: u64 = 0x1f6000;
const USER_STACK: u64 = 0x1f5000;
const READ_ONLY_WP0: u64 = 0x1f4000;
/// The target of the user fetch from a supervisor page: past the qword probe 3 writes.
const USER_FETCH_SUPERVISOR: u64 = WRITABLE + 8;
const PK_AD: u64 = 0x1f3000;
const PK_WD: u64 = 0x1f2000;
/// A 2 MiB page whose PDE has bit 13 set: reserved in a 2 MiB PDE whatever MAXPHYADDR is.
const RESERVED_2M: u64 = 0x40a0_0000;
const CR0_WP: u64 = 1 << 16;
const RFLAGS_AC: u64 = 1 << 18;
const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;
const CR4_PKE: u64 = 1 << 22;
/// Key 1: access disable (bit 2); key 2: write disable (bit 5).
const PKRU: u32 = (1 << 2) | (1 << 5);
/// Kernel code in the guest's own GDT (CS is reloaded with it after `lgdt`).
const KERNEL_CS: u16 = 0x08;
const USER_CS: u64 = 0x23;
const USER_SS: u64 = 0x1b;
const TSS_SELECTOR: u16 = 0x28;
/// `ud2`.
const UD2: [u8; 2] = [0x0f, 0x0b];
/// Where the VMM asks for the probes after the nine supervisor ones: the u32 there is
/// [`FULL_PROBE_SET`] for all of them, anything else (RAM starts zeroed) for the nine only.
const PROBE_SET: u64 = 0x1f1000;
/// The value at [`PROBE_SET`] that asks for every probe.
const FULL_PROBE_SET: u32 = 1;
/// Port on which the guest says whether the protection-key probes follow.
const PKU_PORT: u16 = 0x524;

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
    // #UD: from ring 3 it ends a user probe; from ring 0 it is a bug.
    ".global ud_handler",
    "ud_handler:",
    "test qword ptr [rsp + 8], 3",
    "jz other_handler",
    "jmp user_return",
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
    // enter_user(rip = rdi, operand = rsi, rsp = rdx): run a stub at CPL3 with the operand
    // in rsi; returns when the stub's `ud2` reaches ud_handler.
    ".global enter_user",
    "enter_user:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rip + KERNEL_RSP], rsp",
    "mov eax, {user_ss}",
    "mov ds, ax",
    "mov es, ax",
    "push rax",
    "push rdx",
    "pushfq",
    "and qword ptr [rsp], {not_ac}",
    "push {user_cs}",
    "push rdi",
    "iretq",
    "user_return:",
    "mov eax, 0x10",
    "mov ss, ax",
    "mov ds, ax",
    "mov es, ax",
    "mov rsp, [rip + KERNEL_RSP]",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
    // The ring-3 stubs, alone in their page(s), which are user pages.
    ".pushsection .text.user, \"ax\"",
    ".balign 4096",
    ".global user_text_start",
    "user_text_start:",
    ".global user_read",
    "user_read:",
    "mov rax, [rsi]",
    "ud2",
    ".global user_write",
    "user_write:",
    "mov qword ptr [rsi], rax",
    "ud2",
    ".global user_fetch",
    "user_fetch:",
    "jmp rsi",
    ".global user_resume",
    "user_resume:",
    "ud2",
    ".balign 4096",
    ".global user_text_end",
    "user_text_end:",
    ".popsection",
    user_ss = const USER_SS,
    user_cs = const USER_CS,
    not_ac = const !(1i32 << 18),
);

extern "C" {
    fn pf_handler();
    fn ud_handler();
    fn other_handler();
    fn enter_user(rip: u64, operand: u64, rsp: u64);
    fn user_read();
    fn user_write();
    fn user_fetch();
    fn user_resume();
    static user_text_start: u8;
    static user_text_end: u8;
}

fn gate(handler: u64, cs: u16) -> (u64, u64) {
    let low = (handler & 0xffff)
        | (u64::from(cs) << 16)
        | (0x8e << 40)
        | (((handler >> 16) & 0xffff) << 48);
    (low, handler >> 32)
}

/// A pointer to a descriptor table for `lgdt`/`lidt`: limit, then the 64-bit base.
fn pseudo_descriptor(base: u64, limit: u16) -> [u16; 5] {
    [
        limit,
        base as u16,
        (base >> 16) as u16,
        (base >> 32) as u16,
        (base >> 48) as u16,
    ]
}

/// Loads the guest's GDT, reloads CS with its kernel code selector 0x08 (whatever selector
/// the VMM booted the guest with: the IDT gates and the return from ring 3 name 0x08), the
/// TSS with RSP0, and the data segment registers.
fn setup_segments() {
    // SAFETY: single-threaded guest with interrupts off; the far return reloads CS from
    // the new GDT before anything depends on it, and the other segment registers are
    // reloaded right after; the pushes and the `retfq` balance.
    unsafe {
        let tss = addr_of!(TSS) as u64;
        let tss_mut = &mut *addr_of_mut!(TSS);
        let rsp0 = addr_of!(RING0_STACK) as u64 + 4096;
        tss_mut.0[1] = rsp0 as u32;
        tss_mut.0[2] = (rsp0 >> 32) as u32;
        tss_mut.0[25] = 104 << 16; // I/O map base past the limit: no I/O bitmap
        let gdt = &mut *addr_of_mut!(GDT);
        gdt[5] = 103
            | ((tss & 0xff_ffff) << 16)
            | (0x89 << 40) // present, 64-bit TSS (available)
            | (((tss >> 24) & 0xff) << 56);
        gdt[6] = tss >> 32;
        let gdtr = pseudo_descriptor(addr_of!(GDT) as u64, (7 * 8 - 1) as u16);
        asm!("lgdt [{}]", in(reg) gdtr.as_ptr(), options(nostack));
        asm!(
            "push {cs}",
            "lea {t}, [rip + 2f]",
            "push {t}",
            "retfq",
            "2:",
            cs = in(reg) u64::from(KERNEL_CS),
            t = out(reg) _,
        );
        asm!(
            "mov ss, {d:x}",
            "mov ds, {d:x}",
            "mov es, {d:x}",
            "ltr {t:x}",
            d = in(reg) 0x10u32,
            t = in(reg) u32::from(TSS_SELECTOR),
            options(nostack),
        );
    }
}

fn setup() {
    setup_segments();
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
        // And one in the user page the supervisor must not execute under SMEP, followed by
        // the `ud2` a user fetch ends on.
        core::ptr::write_volatile(USER_CODE as *mut u8, 0xc3);
        core::ptr::write_volatile((USER_CODE + 1) as *mut [u8; 2], UD2);
        // User fetches end on a `ud2` where they must not fault, and where they must (so that
        // a wrong "no fault" comes back instead of running into garbage).
        for target in [PK_AD, USER_NX, USER_FETCH_SUPERVISOR] {
            core::ptr::write_volatile(target as *mut [u8; 2], UD2);
        }
        pt.0[(NOT_PRESENT >> 12) as usize] = 0;
        pt.0[(READ_ONLY >> 12) as usize] = READ_ONLY | P;
        pt.0[(NO_EXEC >> 12) as usize] = NO_EXEC | P | W | NX;
        pt.0[(USER_DATA >> 12) as usize] = USER_DATA | P | W | U;
        pt.0[(USER_CODE >> 12) as usize] = USER_CODE | P | W | U;
        pt.0[(USER_RO >> 12) as usize] = USER_RO | P | U;
        pt.0[(USER_NX >> 12) as usize] = USER_NX | P | W | U | NX;
        pt.0[(USER_STACK >> 12) as usize] = USER_STACK | P | W | U;
        pt.0[(READ_ONLY_WP0 >> 12) as usize] = READ_ONLY_WP0 | P;
        pt.0[(PK_AD >> 12) as usize] = PK_AD | P | W | U | pkey(1);
        pt.0[(PK_WD >> 12) as usize] = PK_WD | P | W | U | pkey(2);
        let (first, last) = (
            addr_of!(user_text_start) as u64,
            addr_of!(user_text_end) as u64,
        );
        for page in (first..last).step_by(4096) {
            pt.0[(page >> 12) as usize] |= U;
        }

        let idt = &mut *addr_of_mut!(IDT);
        for v in 0..32 {
            let h = match v {
                6 => ud_handler as *const () as u64,
                14 => pf_handler as *const () as u64,
                _ => other_handler as *const () as u64,
            };
            let (lo, hi) = gate(h, KERNEL_CS);
            idt[v * 2] = lo;
            idt[v * 2 + 1] = hi;
        }
        let idtr = pseudo_descriptor(addr_of!(IDT) as u64, (32 * 16 - 1) as u16);
        asm!("lidt [{}]", in(reg) idtr.as_ptr(), options(nostack));
        wrmsr(0xc000_0080, rdmsr(0xc000_0080) | (1 << 11)); // EFER.NXE
        asm!(
            "mov {t}, cr0",
            "or {t}, {wp}",
            "mov cr0, {t}",
            "mov cr3, {root}",
            t = out(reg) _,
            wp = in(reg) CR0_WP,
            root = in(reg) addr_of!(PML4) as u64,
            options(nostack),
        );
        set_cr4(CR4_SMEP | CR4_SMAP);
    }
}

/// Sets bits in CR4.
fn set_cr4(bits: u64) {
    // SAFETY: the bits are features the guest checked (or #GP ends it through other_handler).
    unsafe {
        asm!(
            "mov {t}, cr4",
            "or {t}, {bits}",
            "mov cr4, {t}",
            t = out(reg) _,
            bits = in(reg) bits,
            options(nostack),
        )
    }
}

/// Sets or clears CR0.WP.
fn set_wp(on: bool) {
    // SAFETY: CR0.WP only changes how supervisor writes to read-only pages are checked.
    unsafe {
        asm!(
            "mov {t}, cr0",
            "and {t}, {not_wp}",
            "or {t}, {wp}",
            "mov cr0, {t}",
            t = out(reg) _,
            not_wp = in(reg) !CR0_WP,
            wp = in(reg) if on { CR0_WP } else { 0 },
            options(nostack),
        )
    }
}

/// Sets or clears RFLAGS.AC, which exempts supervisor data accesses from SMAP. (`popfq`
/// rather than `stac`/`clac`: this host's software KVM cannot emulate those.)
fn set_ac(on: bool) {
    // SAFETY: only RFLAGS.AC changes; the push and the pop balance.
    unsafe {
        asm!(
            "pushfq",
            "and qword ptr [rsp], {not_ac}",
            "or qword ptr [rsp], {ac}",
            "popfq",
            not_ac = in(reg) !RFLAGS_AC,
            ac = in(reg) if on { RFLAGS_AC } else { 0 },
        )
    }
}

/// A read with RFLAGS.AC set; AC is cleared again after, on the fault path too (the page
/// fault handler resumes inside `probe_read`, which then returns here).
fn probe_read_with_ac(addr: u64) {
    set_ac(true);
    probe_read(addr);
    set_ac(false);
}

/// A write with RFLAGS.AC set (see [`probe_read_with_ac`]).
fn probe_write_with_ac(addr: u64) {
    set_ac(true);
    probe_write(addr);
    set_ac(false);
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

/// The access a ring-3 probe makes.
#[derive(Clone, Copy)]
enum UserAccess {
    Read,
    Write,
    Fetch,
}

/// Runs one access at CPL3: a page fault resumes at `user_resume` (still CPL3), whose `ud2`
/// comes back here, as does the stub's own `ud2` when nothing faults.
fn probe_user(access: UserAccess, addr: u64) {
    let stub = match access {
        UserAccess::Read => user_read as *const () as u64,
        UserAccess::Write => user_write as *const () as u64,
        UserAccess::Fetch => user_fetch as *const () as u64,
    };
    // SAFETY: single-threaded guest; the stubs live in user pages, touch only the probed
    // address and end in `ud2`, whose handler restores the kernel stack and the callee-saved
    // registers `enter_user` pushed. The user stack page belongs to no Rust object.
    unsafe {
        *addr_of_mut!(PF_RECOVER) = user_resume as *const () as u64;
        enter_user(stub, addr, USER_STACK + 4096);
    }
}

/// Whether CPUID.(EAX=7,ECX=0):ECX.PKU (bit 3) is set.
fn has_pku() -> bool {
    // Leaf 7 is only read when the maximum basic leaf allows it.
    core::arch::x86_64::__cpuid(0).eax >= 7
        && core::arch::x86_64::__cpuid_count(7, 0).ecx & (1 << 3) != 0
}

fn main() -> ! {
    setup();
    let mut n = 0u32;
    let mut done = || {
        outl(DATA_PORT, n);
        n += 1;
    };
    // Supervisor, CR0.WP = 1.
    probe_read(NOT_PRESENT);
    done();
    probe_write(READ_ONLY);
    done();
    probe_exec(NO_EXEC);
    done();
    probe_write(WRITABLE);
    done();
    probe_read(USER_DATA);
    done();
    probe_read_with_ac(USER_DATA);
    done();
    probe_exec(USER_CODE);
    done();
    probe_read(RESERVED_2M);
    done();
    probe_write(USER_DATA);
    done();
    // SAFETY: PROBE_SET is identity mapped RAM outside the image, written only by the VMM.
    if unsafe { core::ptr::read_volatile(PROBE_SET as *const u32) } != FULL_PROBE_SET {
        exit(0)
    }
    // User (CPL3), CR0.WP = 1.
    probe_user(UserAccess::Read, WRITABLE);
    done();
    probe_user(UserAccess::Write, USER_RO);
    done();
    probe_user(UserAccess::Fetch, USER_NX);
    done();
    probe_user(UserAccess::Fetch, USER_FETCH_SUPERVISOR);
    done();
    probe_user(UserAccess::Read, NOT_PRESENT);
    done();
    probe_user(UserAccess::Write, USER_DATA);
    done();
    probe_user(UserAccess::Read, RESERVED_2M);
    done();
    probe_user(UserAccess::Fetch, USER_CODE + 1);
    done();
    probe_user(UserAccess::Read, USER_RO);
    done();
    // CR0.WP = 0.
    set_wp(false);
    probe_write(READ_ONLY_WP0);
    done();
    probe_write_with_ac(USER_RO);
    done();
    probe_write(USER_RO);
    done();
    probe_user(UserAccess::Write, USER_RO);
    done();
    set_wp(true);
    // Protection keys.
    if has_pku() {
        outl(PKU_PORT, 1);
        set_cr4(CR4_PKE);
        // SAFETY: CR4.PKE is set; wrpkru only changes PKRU (ECX = EDX = 0 as required).
        unsafe { asm!("wrpkru", in("eax") PKRU, in("ecx") 0, in("edx") 0, options(nostack)) };
        probe_user(UserAccess::Read, PK_AD);
        done();
        probe_user(UserAccess::Write, PK_WD);
        done();
        probe_user(UserAccess::Read, PK_WD);
        done();
        probe_user(UserAccess::Fetch, PK_AD);
        done();
        probe_write_with_ac(PK_WD);
        done();
        probe_read_with_ac(PK_AD);
        done();
        set_wp(false);
        probe_write_with_ac(PK_WD);
        done();
        set_wp(true);
    } else {
        outl(PKU_PORT, 0);
    }
    exit(0)
}

vmkit_guests::entry!(main);
