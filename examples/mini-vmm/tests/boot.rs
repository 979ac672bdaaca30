//! End-to-end: the mini-vmm binary boots the bundled guests on KVM.

use std::process::Command;

fn mini_vmm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mini-vmm"))
        .args(args)
        .output()
        .expect("run mini-vmm")
}

#[test]
fn no_arguments_boots_hello_and_exits_with_its_status() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm"
    );
    let out = mini_vmm(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        "Hello from a vmkit guest!\nhypercall returned 0x000000000000002a\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn stats_list_the_exit_kinds() {
    let out = mini_vmm(&["--guest", "pio_loop", "--param", "50", "--stats"]);
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("io_out"))
        .expect(&stderr);
    // 50 data writes + the exit-status write.
    assert_eq!(line.split_whitespace().nth(1), Some("51"), "{stderr}");
}

#[test]
fn bad_arguments_are_named_and_fail_with_status_2() {
    let out = mini_vmm(&["--memory", "size=lots"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--memory size") && stderr.contains("lots"),
        "{stderr}"
    );
    let out = mini_vmm(&["--guest", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown guest `nope`"));
    let out = mini_vmm(&["--kernel", "/nonexistent/vmlinuz"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/vmlinuz"));
    let out = mini_vmm(&["--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("usage: mini-vmm"));
}

#[test]
fn a_triple_fault_is_a_shutdown() {
    // The exits guest in mode 0 reads an MSR KVM does not know; without user-space MSR exits
    // KVM raises #GP, and with no IDT that becomes a triple fault: a shutdown.
    let out = mini_vmm(&["--guest", "exits", "--param", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("shut down"), "{stderr}");
}

#[test]
fn kernel_option_boots_an_elf_with_boot_params_and_the_e820_map() {
    let path = std::env::temp_dir().join(format!("mini-vmm-kernel-{}", std::process::id()));
    std::fs::write(&path, vmkit_test_guests::HELLO).unwrap();
    let out = mini_vmm(&[
        "--kernel",
        path.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0",
        "--memory",
        "size=32M",
    ]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Hello from a vmkit guest!"));
}

#[test]
fn the_library_vmm_reports_layout_and_stats() {
    use mini_vmm::args::Args;
    use mini_vmm::vmm::{Outcome, Vmm};
    let args = Args::parse(["--guest".to_string(), "mmio".to_string()]).unwrap();
    let mut vmm = Vmm::new(&args, Vec::new()).unwrap();
    assert_eq!(vmm.run().unwrap(), Outcome::Exited(0));
    assert_eq!(vmm.layout.ram_bytes(), 64 << 20);
    let stats = vmm.stats();
    assert!(
        stats.contains("mmio_write") && stats.contains("mmio_read"),
        "{stats}"
    );
    // The bundled guests' machine has no MMIO devices: every MMIO access was unclaimed.
    assert_eq!(vmm.dispatcher.metrics().unclaimed_mmio_writes, 4);
    assert_eq!(
        vmm.devices.test.data.lock().unwrap().last(),
        Some(&0xffff_ffff)
    );
}

#[test]
fn a_missing_initramfs_is_named() {
    let path = std::env::temp_dir().join(format!("mini-vmm-initrd-{}", std::process::id()));
    std::fs::write(&path, vmkit_test_guests::HELLO).unwrap();
    let out = mini_vmm(&[
        "--kernel",
        path.to_str().unwrap(),
        "--initramfs",
        "/nonexistent/initrd.gz",
    ]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/initrd.gz"), "{stderr}");
}

#[test]
fn devices_need_the_linux_machine() {
    // An ELF kernel runs on the polling machine without interrupt controllers or ACPI: virtio
    // devices and extra vCPUs are refused by name instead of being silently dropped.
    let path = std::env::temp_dir().join(format!("mini-vmm-elf-{}", std::process::id()));
    std::fs::write(&path, vmkit_test_guests::HELLO).unwrap();
    for (opts, name) in [(&["--rng"][..], "--rng"), (&["--cpus", "boot=2"], "--cpus")] {
        let mut args = vec!["--kernel", path.to_str().unwrap()];
        args.extend_from_slice(opts);
        let out = mini_vmm(&args);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "`{name}` needs a Linux kernel, a bzImage or a PVH vmlinux"
            )),
            "{stderr}"
        );
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn serial_output_goes_where_serial_says() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("serial.out");
    let out = mini_vmm(&["--serial", &format!("file={}", file.display())]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("Hello from a vmkit guest!"), "{text}");
    let out = mini_vmm(&["--serial", "off"]);
    assert_eq!((out.status.code(), out.stdout.len()), (Some(0), 0));
    let out = mini_vmm(&["--serial", "file=/nonexistent/dir/serial.out"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`--serial file=/nonexistent/dir/serial.out`"),
        "{stderr}"
    );
}

#[test]
fn trace_boot_stamps_the_start_up_phases_in_order() {
    let run = |trace: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mini-vmm"));
        cmd.env_remove("MINI_VMM_TRACE_BOOT");
        if trace {
            cmd.env("MINI_VMM_TRACE_BOOT", "1");
        }
        let out = cmd.output().expect("run mini-vmm");
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = run(true);
    let stamps: Vec<(f64, &str)> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("mini-vmm: trace "))
        .map(|l| {
            let (ms, phase) = l.split_once(' ').expect(l);
            (ms.parse().expect(l), phase)
        })
        .collect();
    let phases: Vec<_> = stamps.iter().map(|s| s.1).collect();
    // The bundled guest loads no kernel file and no initramfs: those phases are absent.
    assert_eq!(
        phases,
        [
            "main",
            "guest memory mapped",
            "KVM VM created, memory registered",
            "vCPUs, irqchip, virtio devices and ACPI tables ready",
            "entering KVM_RUN"
        ],
        "{stderr}"
    );
    assert!(stamps.windows(2).all(|w| w[0].0 <= w[1].0), "{stderr}");
    assert!(!run(false).contains("mini-vmm: trace"));
}

#[test]
fn guest_ram_is_mapped_on_2mib_boundaries_for_huge_pages() {
    use mini_vmm::args::Args;
    use mini_vmm::vmm::Vmm;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let args = Args::parse(["--memory".to_string(), "size=64M".to_string()]).unwrap();
    let vmm = Vmm::new(&args, Vec::new()).unwrap();
    let huge = 2usize << 20;
    let mut regions = 0;
    for r in vmm.memory.iter() {
        // Guest-physical and host addresses agree modulo 2 MiB, so KVM may map 2 MiB pages.
        let host = r.as_ptr() as usize;
        assert_eq!(host % huge, r.start_addr().0 as usize % huge, "{host:#x}");
        regions += 1;
    }
    assert!(regions > 0);
}
