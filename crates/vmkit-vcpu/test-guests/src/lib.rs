//! The vmkit test guests as ELF images, built from `examples/guests` by this crate's build
//! script (nothing to build by hand).
//!
//! Each guest is a static `x86_64-unknown-none` ELF linked at 1 MiB and entered in 64-bit
//! mode at its ELF entry point; the port protocol they share is documented in
//! `examples/guests/src/lib.rs`.

/// Greets on COM1, makes one hypercall (nr 12), writes status 0 to port 0xf4 and halts.
pub const HELLO: &[u8] = include_bytes!(env!("VMKIT_GUEST_HELLO"));
/// Reads a count N from port 0x510, then writes 0..N to port 0x511 (one exit each).
pub const PIO_LOOP: &[u8] = include_bytes!(env!("VMKIT_GUEST_PIO_LOOP"));
/// Exercises MMIO reads and writes of every width at [`MMIO_BASE`].
pub const MMIO: &[u8] = include_bytes!(env!("VMKIT_GUEST_MMIO"));
/// Builds its own page tables and IDT and reports page faults (see the guest's docs).
pub const PAGING: &[u8] = include_bytes!(env!("VMKIT_GUEST_PAGING"));
/// Produces one exit of each kind the VMM can observe, in a fixed order.
pub const EXITS: &[u8] = include_bytes!(env!("VMKIT_GUEST_EXITS"));
/// Writes a pseudo-random sequence to port 0x511; used for save/restore tests.
pub const COUNTER: &[u8] = include_bytes!(env!("VMKIT_GUEST_COUNTER"));

/// Guest-physical address of the MMIO window the MMIO guest uses.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// COM1 base port.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Port a guest writes its exit status (32 bits) to before halting.
pub const EXIT_PORT: u16 = 0xf4;
/// Port a guest reads its parameter (32 bits) from.
pub const PARAM_PORT: u16 = 0x510;
/// Port a guest reports data values (32 bits) on.
pub const DATA_PORT: u16 = 0x511;

/// Every guest by name, for tools that pick one at run time.
pub const ALL: &[(&str, &[u8])] = &[
    ("hello", HELLO),
    ("pio_loop", PIO_LOOP),
    ("mmio", MMIO),
    ("paging", PAGING),
    ("exits", EXITS),
    ("counter", COUNTER),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_an_x86_64_executable_linked_at_1mib() {
        for (name, elf) in ALL {
            assert_eq!(&elf[..4], b"\x7fELF", "{name} is not an ELF file");
            assert_eq!(elf[4], 2, "{name} is not ELF64");
            // e_machine (offset 18) = EM_X86_64 (62)
            assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62, "{name}");
            let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
            assert_eq!(entry, 0x10_0000, "{name} entry");
        }
    }
}
