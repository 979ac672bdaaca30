//! The Linux machine (what a bzImage gets) on this host's KVM, with a stand-in kernel: a
//! minimal bzImage whose 64-bit entry powers the machine off through the ACPI sleep control
//! register. A real kernel cannot boot on this host's software KVM (see
//! tests/linux-guest/mini-vmm-nested.sh for that); this test covers everything around it:
//! in-kernel irqchip and PIT, application processors, virtio devices, ACPI tables and the
//! zero page pointing at them, the multi-vCPU run loop and its ending.

use vm_memory::{Bytes, GuestAddress};

use mini_vmm::acpi::{RSDP_ADDR, SLEEP_CONTROL_PORT};
use mini_vmm::args::Args;
use mini_vmm::vmm::{Outcome, Vmm};

/// A bzImage (boot protocol 2.15, one setup sector, loaded high) whose 64-bit entry point,
/// 0x200 bytes into the protected-mode code, writes S5 | SLP_EN to the sleep control port.
fn power_off_bzimage() -> Vec<u8> {
    let mut img = vec![0u8; 1024];
    img[0x1f1] = 1; // setup_sects
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    let mut code = vec![0xf4u8; 0x200]; // 32-bit entry: hlt (unused)
    let port = SLEEP_CONTROL_PORT.to_le_bytes();
    code.extend_from_slice(&[0x66, 0xba, port[0], port[1]]); // mov dx, port
    code.extend_from_slice(&[0xb0, (5 << 2) | 0x20]); // mov al, SLP_TYP 5 | SLP_EN
    code.extend_from_slice(&[0xee, 0xf4, 0xeb, 0xfd]); // out dx, al; 1: hlt; jmp 1b
    img.extend_from_slice(&code);
    img
}

#[test]
fn a_bzimage_gets_acpi_devices_and_vcpus_and_powers_off() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm"
    );
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("bzImage");
    std::fs::write(&kernel, power_off_bzimage()).unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let console = dir.path().join("console.out");
    let args = Args::parse(
        [
            "--kernel",
            kernel.to_str().unwrap(),
            "--cpus",
            "boot=3",
            "--disk",
            &format!("path={}", disk.display()),
            "--rng",
            "--console",
            &format!("file={}", console.display()),
            // Creating a TAP interface needs root and /dev/net/tun, as the CI has.
            "--net",
            &format!(
                "tap=mvmm{},mac=02:00:00:00:00:01",
                std::process::id() % 100_000
            ),
        ]
        .iter()
        .map(|s| s.to_string()),
    )
    .unwrap();
    let mut vmm = Vmm::new(&args, Vec::new()).unwrap();
    assert_eq!(vmm.aps.len(), 2);
    let names: Vec<_> = vmm
        .virtio
        .as_ref()
        .unwrap()
        .slots()
        .iter()
        .map(|s| s.name.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        ["virtio-blk", "virtio-net", "virtio-rng", "virtio-console"]
    );
    // The tables are in guest memory, and the zero page points at the RSDP.
    let tables = vmm.acpi.clone().unwrap();
    assert_eq!(tables.rsdp_addr, RSDP_ADDR);
    for (addr, bytes) in &tables.tables {
        let mut back = vec![0u8; bytes.len()];
        vmm.memory
            .read_slice(&mut back, GuestAddress(*addr))
            .unwrap();
        assert_eq!(&back, bytes);
    }
    // boot_params.acpi_rsdp_addr lives at offset 0x70 of the zero page.
    let rsdp: u64 = vmm
        .memory
        .read_obj(GuestAddress(vmkit_vcpu::boot::ZERO_PAGE_ADDR + 0x70))
        .unwrap();
    assert_eq!(rsdp, RSDP_ADDR);
    // vCPU 0 powers off while the application processors wait for a SIPI that never comes:
    // they are kicked out of KVM_RUN and the run ends.
    assert_eq!(vmm.run().unwrap(), Outcome::PowerOff);
    assert_eq!(
        vmm.run().unwrap(),
        Outcome::PowerOff,
        "a powered-off machine stays off"
    );
}

#[test]
fn the_binary_reports_a_power_off_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("bzImage");
    std::fs::write(&kernel, power_off_bzimage()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mini-vmm"))
        .args(["--kernel", kernel.to_str().unwrap(), "--rng"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the guest powered off"));
}
