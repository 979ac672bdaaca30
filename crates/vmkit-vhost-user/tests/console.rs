//! virtio-console over vhost-user, driven through vhost's frontend API with a Unix socket pair
//! as the host side: a line round-trips host -> guest -> host, input waits for receive
//! buffers, and an emergency write reaches the same output.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vmkit_vhost_user::{console_backend, serve, ServeOptions, Stop};
use vmkit_virtio::console::ConsoleBackend;

const RXQ: usize = 0;
const TXQ: usize = 1;

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

#[test]
fn a_line_round_trips_and_emergency_write_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("con.sock");
    let (ours, mut host) = UnixStream::pair().unwrap();
    let backend = Arc::new(console_backend(ConsoleBackend::unix_stream(ours).unwrap()));
    let stop = Stop::new().unwrap();
    let (s, st) = (sock.clone(), stop.clone());
    let daemon = std::thread::spawn(move || serve(backend, &s, &st, ServeOptions { once: true }));
    let mut t = TestFrontend::connect(&sock, 2, 64, 0);

    // Host input before the guest has receive buffers: it waits in the device.
    host.write_all(b"hello from the host\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(t.used_idx(RXQ), 0);
    // Two small buffers: the line is split over them.
    t.submit(RXQ, &[(DATA, 8, true)]);
    assert_eq!(t.wait_used(RXQ).1, 8);
    t.submit(RXQ, &[(DATA + 0x100, 64, true)]);
    assert_eq!(t.wait_used(RXQ).1, 12);
    let mut line = t.read(DATA, 8);
    line.extend(t.read(DATA + 0x100, 12));
    assert_eq!(line, b"hello from the host\n");

    // The guest echoes it back on the transmit queue.
    t.write(DATA + 0x1000, &line);
    t.submit(TXQ, &[(DATA + 0x1000, line.len() as u32, false)]);
    t.wait_used(TXQ);
    assert_eq!(read_exactly(&mut host, line.len()), line);

    // Input that arrives while buffers are posted goes straight in.
    t.post(RXQ, &[(DATA + 0x200, 64, true)]);
    host.write_all(b"again").unwrap();
    let (_, n) = t.wait_used(RXQ);
    assert_eq!(t.read(DATA + 0x200, n as usize), b"again");

    // Emergency write: config offset 8, one byte, same output.
    t.fe.set_config(8, VhostUserConfigFlags::WRITABLE, b"!")
        .unwrap();
    assert_eq!(read_exactly(&mut host, 1), b"!");

    drop(t);
    assert_eq!(daemon.join().unwrap().unwrap(), 1);
}
