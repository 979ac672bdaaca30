//! The hello guest: greets on the serial console, makes one hypercall (nr 1 with argument
//! 41, through the port doorbell), prints the result, reports status 0 and halts. `mini-vmm` boots it when started without arguments.
#![no_std]
#![no_main]

use vmkit_guests::{exit, hypercall, serial, write_hex};

/// Hypercall number: "hello", answered by mini-vmm with the first argument plus one.
const HC_NR: u64 = 1;

fn main() -> ! {
    serial::write_str("Hello from a vmkit guest!\n");
    let ret = hypercall(HC_NR, 41, 0, 0, 0);
    serial::write_str("hypercall returned ");
    write_hex(ret);
    serial::write_str("\n");
    exit(0)
}

vmkit_guests::entry!(main);
