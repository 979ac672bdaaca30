//! The `vmkit-vhost-user` binary: argument errors, and a clean stop on SIGTERM that leaves the
//! image consistent.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_vmkit-vhost-user");

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn bad_arguments_exit_2_naming_the_argument() {
    let (rc, text) = run(&[
        "blk",
        "--socket",
        "/tmp/x.sock",
        "--disk",
        "d",
        "--queue-size",
        "100",
    ]);
    assert_eq!(rc, 2);
    assert!(
        text.contains("--queue-size: expected a power of two from 2 to 32768, got '100'"),
        "{text}"
    );
    assert!(text.contains("usage:"));
    let (rc, text) = run(&["tap"]);
    assert_eq!(rc, 2);
    assert!(text.contains("unknown device 'tap'"), "{text}");
    let (rc, text) = run(&["--help"]);
    assert_eq!(rc, 0);
    assert!(text.contains("--num-queues"));
}

#[test]
fn missing_image_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let (rc, text) = run(&[
        "blk",
        "--socket",
        sock.to_str().unwrap(),
        "--disk",
        "/nonexistent/vmkit.img",
    ]);
    assert_eq!(rc, 1);
    assert!(
        text.contains("--disk: cannot open disk image /nonexistent/vmkit.img"),
        "{text}"
    );
}

fn sigterm(child: &std::process::Child) {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
}

fn wait_exit(child: &mut std::process::Child) -> i32 {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "daemon did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_while_idle_and_while_serving_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("blk.sock");
    let spawn = || {
        Command::new(BIN)
            .args([
                "blk",
                "--socket",
                sock.to_str().unwrap(),
                "--disk",
                img.to_str().unwrap(),
            ])
            .args(["--serial", "bin-test", "--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Idle: nobody ever connects.
    let mut child = spawn();
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    sigterm(&child);
    assert_eq!(wait_exit(&mut child), 0);

    // Serving: a frontend wrote data (without a guest flush) and is still connected.
    let _ = std::fs::remove_file(&sock);
    let mut child = spawn();
    let mut t = TestFrontend::connect(&sock, 1, 128, 0);
    t.write(DATA + 0x1000, &[0x5a; 4096]);
    assert_eq!(
        blk_request(&mut t, 0, 1, 0, Some((DATA + 0x1000, 4096, false))).0,
        0
    );
    sigterm(&child);
    assert_eq!(wait_exit(&mut child), 0);
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(log.contains("signal 15 received"), "{log}");
    assert!(log.contains("stopped after 1 connection"), "{log}");
    drop(t);
    assert!(std::fs::read(&img).unwrap()[..4096]
        .iter()
        .all(|&b| b == 0x5a));
}

#[test]
fn rng_once_exits_after_the_frontend_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("rng.sock");
    let mut child = Command::new(BIN)
        .args([
            "rng",
            "--socket",
            sock.to_str().unwrap(),
            "--once",
            "--log-level=warn",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut t = TestFrontend::connect(&sock, 1, 64, 0);
    t.submit(0, &[(DATA, 64, true)]);
    assert_eq!(t.wait_used(0).1, 64);
    drop(t);
    assert_eq!(wait_exit(&mut child), 0);
}

#[test]
fn console_writes_guest_output_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("con.sock");
    let out = dir.path().join("console.txt");
    let input = dir.path().join("input.txt");
    std::fs::write(&input, b"typed\n").unwrap();
    let mut child = Command::new(BIN)
        .args(["console", "--socket", sock.to_str().unwrap()])
        .args([
            "--output",
            out.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ])
        .args(["--once", "--log-level", "warn"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut t = TestFrontend::connect(&sock, 2, 64, 0);
    // The input file is read into the guest's receive buffer.
    t.submit(0, &[(DATA + 0x2000, 64, true)]);
    let (_, n) = t.wait_used(0);
    assert_eq!(t.read(DATA + 0x2000, n as usize), b"typed\n");
    t.write(DATA, b"guest says hi\n");
    t.submit(1, &[(DATA, 14, false)]);
    t.wait_used(1);
    drop(t);
    assert_eq!(wait_exit(&mut child), 0);
    assert_eq!(std::fs::read(&out).unwrap(), b"guest says hi\n");
}

#[test]
fn net_and_console_open_errors_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let (rc, text) = run(&[
        "net",
        "--socket",
        sock.to_str().unwrap(),
        "--tap",
        "x",
        "--mtu",
        "9",
    ]);
    assert_eq!(rc, 2, "{text}");
    let (rc, text) = run(&[
        "console",
        "--socket",
        sock.to_str().unwrap(),
        "--connect",
        "/nonexistent/console.sock",
    ]);
    assert_eq!(rc, 1);
    assert!(text.contains("console: cannot open"), "{text}");
}
