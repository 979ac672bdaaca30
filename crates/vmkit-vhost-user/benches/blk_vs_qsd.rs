//! Per-request cost of our vhost-user-blk backend against qemu-storage-daemon's
//! `vhost-user-blk` export (the anchor), both driven by the same minimal frontend (vhost's
//! `Frontend` over the Unix socket, a memfd as guest RAM, hand-written split rings) with no
//! guest and no QEMU in between, so only the backends differ.
//!
//! Each iteration submits one request at queue depth 1 (write or read, 4 KiB or 64 KiB,
//! sequential offsets over a 64 MiB image on tmpfs) and waits for its completion interrupt.
//! Needs `qemu-storage-daemon` (Debian package qemu-system-common).

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vmkit_vhost_user::{blk_backend, serve, BlkOptions, ServeOptions, Stop};

const IMAGE: u64 = 64 << 20;
/// Feature bits both backends may negotiate here: blk SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH,
/// TOPOLOGY, CONFIG_WCE, DISCARD, WRITE_ZEROES; INDIRECT_DESC, EVENT_IDX, VERSION_1,
/// PROTOCOL_FEATURES. Anything else offered (e.g. packed rings) is declined.
const KEEP: u64 = (1 << 1)
    | (1 << 2)
    | (1 << 6)
    | (1 << 9)
    | (1 << 10)
    | (1 << 11)
    | (1 << 13)
    | (1 << 14)
    | (1 << 28)
    | (1 << 29)
    | (1 << 30)
    | (1 << 32);

fn image(dir: &Path) -> PathBuf {
    let p = dir.join("bench.img");
    std::fs::write(&p, vec![0u8; IMAGE as usize]).unwrap();
    p
}

fn qsd(img: &Path, sock: &Path) -> Child {
    let mut child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=disk,filename={}", img.display()))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues=1",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-storage-daemon (package qemu-system-common) is needed for the anchor");
    for _ in 0..500 {
        if sock.exists() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("qemu-storage-daemon did not create {}", sock.display());
}

fn bench_one(c: &mut Criterion, who: &str, t: &mut TestFrontend) {
    let buf = DATA + 0x1_0000;
    t.write(buf, &[0x5a; 65536]);
    for (kind, name) in [(1u32, "write"), (0u32, "read")] {
        for bs in [4096u32, 65536] {
            let mut g = c.benchmark_group(format!("vhost-user-blk/{name}-{}k", bs / 1024));
            g.throughput(Throughput::Bytes(u64::from(bs)));
            let sectors = IMAGE / 512;
            let mut sector = 0u64;
            g.bench_function(who, |b| {
                b.iter(|| {
                    let write = kind == 0;
                    let (st, _) = blk_request(t, 0, kind, sector, Some((buf, bs, write)));
                    assert_eq!(st, 0);
                    sector = (sector + u64::from(bs) / 512) % sectors;
                })
            });
            g.finish();
        }
    }
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let img = image(dir.path());

    // Ours, in this process (its worker threads are the backend).
    let sock = dir.path().join("ours.sock");
    let backend = Arc::new(blk_backend(&BlkOptions::new(&img)).unwrap());
    let stop = Stop::new().unwrap();
    let (s, st) = (sock.clone(), stop.clone());
    let daemon = std::thread::spawn(move || serve(backend, &s, &st, ServeOptions { once: true }));
    let mut t = TestFrontend::connect(&sock, 1, 128, !KEEP);
    bench_one(c, "vmkit", &mut t);
    drop(t);
    daemon.join().unwrap().unwrap();

    // The anchor, as its own process.
    let sock = dir.path().join("qsd.sock");
    let mut child = qsd(&img, &sock);
    let mut t = TestFrontend::connect(&sock, 1, 128, !KEEP);
    bench_one(c, "qemu-storage-daemon", &mut t);
    drop(t);
    let _ = child.kill();
    let _ = child.wait();
}

criterion_group! {
    name = group;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(group);
