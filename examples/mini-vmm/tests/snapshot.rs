//! Whole-VM snapshot and restore, across processes: the `counter` guest (a pseudo-random
//! sequence that depends on its registers and on a table in its memory) is paused and saved
//! mid-run by one mini-vmm process and continued by another; what both wrote to the data port
//! must be exactly what an uninterrupted run writes, and the exit status the same. Bad snapshot
//! files must give errors naming the file.
//!
//! Needs /dev/kvm (fails, does not skip, without it). No timing is asserted: when the guest
//! ends before the pause timer fires, the run is retried with a shorter delay.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_mini-vmm");
/// Values the counter guest writes: long enough to be paused mid-run on any KVM here.
const COUNT: &str = "40000";
/// Exit status after a snapshot (`mini_vmm::snapshot::SNAPSHOT_EXIT_STATUS`).
const SNAPSHOTTED: i32 = mini_vmm::snapshot::SNAPSHOT_EXIT_STATUS as i32;

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("cannot start mini-vmm")
}

fn log_args(log: &Path) -> [String; 2] {
    ["--data-log".into(), log.display().to_string()]
}

fn read_log(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Runs `base` with `--snapshot` into `dir`, retrying with shorter delays until the guest is
/// paused before it ends. Returns the data log of the paused run.
fn snapshot(base: &[&str], dir: &Path, log: &Path) -> String {
    for after in [200, 40, 5, 1, 0] {
        let _ = std::fs::remove_file(log);
        let snap = format!("path={},after={after}", dir.display());
        let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        args.extend(log_args(log));
        args.extend(["--snapshot".into(), snap]);
        let out = Command::new(BIN).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(SNAPSHOTTED) => {
                assert!(stderr.contains("snapshot written"), "{stderr}");
                assert!(dir.join("machine.txt").exists());
                return read_log(log);
            }
            Some(0) => continue, // the guest finished first: pause sooner
            other => panic!("snapshot run failed ({other:?}): {stderr}"),
        }
    }
    panic!("the guest always finished before the snapshot timer");
}

#[test]
fn a_restored_guest_continues_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let full_log = tmp.path().join("full.log");
    let base = ["--guest", "counter", "--param", COUNT];
    let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    args.extend(log_args(&full_log));
    let full = Command::new(BIN).args(&args).output().unwrap();
    assert_eq!(full.status.code(), Some(0), "{full:?}");
    let full_log = read_log(&full_log);
    assert_eq!(full_log.lines().count(), 40000);

    // First process: run, pause, save.
    let dir = tmp.path().join("snap");
    let a_log = tmp.path().join("a.log");
    let before = snapshot(&base, &dir, &a_log);
    assert!(before.lines().count() < 40000);
    assert!(full_log.starts_with(&before));

    // Second process: restore and, in turn, snapshot again (a restored VM can be saved).
    let dir2 = tmp.path().join("snap2");
    let b_log = tmp.path().join("b.log");
    let restore = format!("path={}", dir.display());
    let middle = snapshot(&["--restore", &restore], &dir2, &b_log);

    // Third process: restore the second snapshot and run to the end.
    let c_log = tmp.path().join("c.log");
    let mut args = vec!["--restore".to_string(), dir2.display().to_string()];
    args.extend(log_args(&c_log));
    let last = Command::new(BIN).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&last.stderr);
    assert_eq!(last.status.code(), full.status.code(), "{stderr}");
    assert!(stderr.contains("restored"), "{stderr}");
    let after = read_log(&c_log);
    assert_eq!(
        format!("{before}{middle}{after}"),
        full_log,
        "the output before the snapshots plus after the restores is the uninterrupted run's"
    );
    // The first snapshot is still whole: restoring it again, with memory mapped lazily from
    // the file this time, gives the same rest.
    let d_log = tmp.path().join("d.log");
    let mut args = vec!["--restore".to_string(), format!("{restore},memory=mmap")];
    args.extend(log_args(&d_log));
    let again = Command::new(BIN).args(&args).output().unwrap();
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    assert_eq!(format!("{before}{}", read_log(&d_log)), full_log);
}

/// A small snapshot for the error tests.
fn small_snapshot(dir: &Path) -> PathBuf {
    let log = dir.join("x.log");
    let snap = dir.join("snap");
    snapshot(
        &[
            "--guest", "counter", "--param", "4000000", "--memory", "size=8M",
        ],
        &snap,
        &log,
    );
    snap
}

/// Restores `snap` (memory copied, then mapped); expects status 1 and a message containing
/// every one of `words`.
fn restore_fails(snap: &Path, words: &[&str]) {
    restore_fails_with(snap, "copy", words);
    if words[0] != "memory.snap" {
        restore_fails_with(snap, "mmap", words);
    }
}

fn restore_fails_with(snap: &Path, memory: &str, words: &[&str]) {
    let out = run(&[
        "--restore",
        &format!("path={},memory={memory}", snap.display()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for w in words {
        assert!(stderr.contains(w), "`{w}` missing from: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn corrupt(file: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(file).unwrap();
    f(&mut b);
    std::fs::write(file, b).unwrap();
}

#[test]
fn bad_snapshots_give_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    // Missing directory.
    restore_fails(
        &tmp.path().join("none"),
        &["none/machine.txt", "No such file"],
    );
    let snap = small_snapshot(tmp.path());
    let fresh = || {
        let copy = tmp.path().join("copy");
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir(&copy).unwrap();
        for e in std::fs::read_dir(&snap).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
        }
        copy
    };
    // The intact snapshot restores (and the guest runs on: stop it with a new snapshot).
    let s = fresh();
    let out = run(&[
        "--restore",
        &s.display().to_string(),
        "--snapshot",
        &format!("path={},after=0", tmp.path().join("again").display()),
    ]);
    assert!(
        matches!(out.status.code(), Some(0) | Some(SNAPSHOTTED)),
        "{out:?}"
    );

    // Truncated memory file.
    let s = fresh();
    let mem = s.join("memory.snap");
    let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    f.set_len(4096).unwrap();
    restore_fails(&s, &["memory.snap", "guest memory"]);
    restore_fails_with(&s, "mmap", &["memory.snap", "guest memory"]);
    // Corrupt memory data (a checksum mismatch) and a corrupt header.
    let s = fresh();
    corrupt(&s.join("memory.snap"), |b| {
        let at = 0x10_0000 + 100; // inside the guest image at 1 MiB
        b[at] ^= 0xff;
    });
    restore_fails(&s, &["memory.snap"]);
    let s = fresh();
    corrupt(&s.join("memory.snap"), |b| b[0] = b'X');
    restore_fails(&s, &["memory.snap"]);
    restore_fails_with(&s, "mmap", &["memory.snap"]);
    // Memory size that does not match the file.
    let s = fresh();
    corrupt(&s.join("machine.txt"), |b| {
        let t = String::from_utf8(b.clone()).unwrap();
        *b = t
            .replace(
                &format!("memory {}", 8 << 20),
                &format!("memory {}", 16 << 20),
            )
            .into_bytes();
    });
    restore_fails(&s, &["memory.snap", "guest memory"]);
    restore_fails_with(&s, "mmap", &["memory.snap", "do not match"]);
    // vCPU, device and machine files.
    let s = fresh();
    corrupt(&s.join("vcpu-0.bin"), |b| b.truncate(b.len() / 2));
    restore_fails(&s, &["vcpu-0.bin", "truncated"]);
    let s = fresh();
    corrupt(&s.join("vcpu-0.bin"), |b| b[0] ^= 1);
    restore_fails(&s, &["vcpu-0.bin", "magic"]);
    let s = fresh();
    corrupt(&s.join("devices.bin"), |b| b.push(0));
    restore_fails(&s, &["devices.bin", "unexpected bytes"]);
    let s = fresh();
    corrupt(&s.join("platform.bin"), |b| b[0] ^= 1);
    restore_fails(&s, &["platform.bin", "magic"]);
    let s = fresh();
    corrupt(&s.join("machine.txt"), |b| b.extend_from_slice(b"cpus 2\n"));
    restore_fails(&s, &["machine.txt", "Linux machine"]);
    let s = fresh();
    corrupt(&s.join("machine.txt"), |b| b[0] = 0xff);
    restore_fails(&s, &["machine.txt"]);
    let s = fresh();
    std::fs::remove_file(s.join("devices.bin")).unwrap();
    restore_fails(&s, &["devices.bin", "No such file"]);
}

#[test]
fn restore_refuses_options_that_describe_the_machine() {
    let out = run(&["--restore", "path=/nonexistent", "--memory", "size=64M"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--memory") && stderr.contains("--restore"),
        "{stderr}"
    );
    let out = run(&["--snapshot", "path=/tmp/x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("after= is required"));
}
