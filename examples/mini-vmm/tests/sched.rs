//! vCPUs on vmkit-sched (`--cpus host=M`): the `counter` guest (a pseudo-random sequence that
//! depends on its registers and memory) must write exactly what it writes with a thread per
//! vCPU, end with the same status, and pause, save and continue through a snapshot taken
//! while it runs as a scheduler task.
//!
//! Needs /dev/kvm (fails, does not skip, without it). No timing is asserted.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mini-vmm");
const COUNT: &str = "20000";
const SNAPSHOTTED: i32 = mini_vmm::snapshot::SNAPSHOT_EXIT_STATUS as i32;

fn counter(extra: &[&str], log: &Path) -> (Option<i32>, String, String) {
    let _ = std::fs::remove_file(log);
    let out = Command::new(BIN)
        .args([
            "--guest",
            "counter",
            "--param",
            COUNT,
            "--stats",
            "--data-log",
        ])
        .arg(log)
        .args(extra)
        .output()
        .expect("cannot start mini-vmm");
    (
        out.status.code(),
        std::fs::read_to_string(log).unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_counter_guest_on_one_worker_writes_what_it_writes_on_its_own_thread() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    let (status, threaded, _) = counter(&[], &log);
    assert_eq!(status, Some(0));
    assert_eq!(threaded.lines().count(), 20000);
    let (s, scheduled, stderr) = counter(&["--cpus", "host=1"], &log);
    assert_eq!(s, status, "{stderr}");
    assert_eq!(scheduled, threaded);
    assert!(
        stderr.contains("1 vCPUs on vmkit-sched, 1 worker(s)"),
        "--stats names the scheduler: {stderr}"
    );
}

#[test]
fn a_snapshot_pauses_a_scheduled_vcpu_and_a_scheduled_restore_continues_it() {
    let tmp = tempfile::tempdir().unwrap();
    let full_log = tmp.path().join("full");
    let (status, full, _) = counter(&[], &full_log);
    assert_eq!(status, Some(0));
    let dir = tmp.path().join("snap");
    let a_log = tmp.path().join("a");
    let mut before = None;
    for after in [100, 20, 5, 1, 0] {
        let snap = format!("path={},after={after}", dir.display());
        let (s, out, stderr) = counter(&["--cpus", "host=1", "--snapshot", &snap], &a_log);
        match s {
            Some(SNAPSHOTTED) => {
                before = Some(out);
                break;
            }
            Some(0) => continue, // finished before the pause: pause sooner
            other => panic!("snapshot run failed ({other:?}): {stderr}"),
        }
    }
    let before = before.expect("the guest always finished before the snapshot timer");
    assert!(full.starts_with(&before));
    let b_log = tmp.path().join("b");
    let out = Command::new(BIN)
        .args(["--cpus", "host=1", "--restore"])
        .arg(&dir)
        .arg("--data-log")
        .arg(&b_log)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let after = std::fs::read_to_string(&b_log).unwrap_or_default();
    assert_eq!(format!("{before}{after}"), full);
}

#[test]
fn the_host_option_parses_and_its_errors_name_it() {
    use mini_vmm::args::Args;
    use mini_vmm::sched::VcpuThreads;
    let parse = |l: &[&str]| Args::parse(l.iter().map(|s| s.to_string()));
    assert_eq!(parse(&[]).unwrap().vcpu_threads, VcpuThreads::PerVcpu);
    let a = parse(&["--kernel", "/k", "--cpus", "boot=4,host=2"]).unwrap();
    assert_eq!((a.cpus, a.vcpu_threads), (4, VcpuThreads::Scheduler(2)));
    assert_eq!(a.vcpu_threads.workers(4), Some(2));
    let a = parse(&["--cpus", "host=auto"]).unwrap();
    assert_eq!((a.cpus, a.vcpu_threads), (1, VcpuThreads::Auto));
    assert_eq!(a.vcpu_threads.workers(1), Some(1));
    assert_eq!(VcpuThreads::PerVcpu.workers(3), None);
    let a = parse(&["--kernel", "/k", "--cpus", "host=per-vcpu,boot=2"]).unwrap();
    assert_eq!(a.vcpu_threads, VcpuThreads::PerVcpu);
    // host= alone is allowed with --restore (it does not describe the machine); boot= is not.
    assert!(parse(&["--restore", "/s", "--cpus", "host=1"]).is_ok());
    assert!(parse(&["--restore", "/s", "--cpus", "boot=1,host=1"]).is_err());
    for (bad, want) in [
        (
            "host=0",
            "`0` for `--cpus host`: expected 1 to 256, auto or per-vcpu",
        ),
        ("host=many", "`many` for `--cpus host`"),
        ("host=1,host=2", "`host` given twice"),
        ("", "--cpus"),
    ] {
        let e = parse(&["--cpus", bad]).unwrap_err().to_string();
        assert!(e.contains(want), "{bad}: {e}");
    }
}
