//! A pass-through between a frontend and the vhost-user request handler that holds back
//! `SET_VRING_ENABLE` messages sent before `SET_FEATURES` and replays them after it.
//!
//! QEMU's vhost-user netdev treats `VHOST_USER_F_PROTOCOL_FEATURES` as negotiated as soon as
//! the backend *offers* it, so it enables its rings before sending any `SET_FEATURES`: at device
//! realize, and (QEMU 10) again when the driver starts the device, just before the
//! `SET_FEATURES`/`SET_MEM_TABLE`/`SET_VRING_*` sequence. vhost's request handler only accepts
//! `SET_VRING_ENABLE` once the feature was acked by `SET_FEATURES` and drops the connection
//! otherwise. Simply discarding the early messages is not enough: with the feature acked, the
//! rings start *disabled* and QEMU 10 sends no further enable, so the backend would never
//! watch the kick eventfds and no buffer would ever move.
//!
//! The shim therefore answers an early enable itself (an ack if one is requested), remembers
//! the last state asked for each ring, and right after forwarding the `SET_FEATURES` that
//! acks `VHOST_USER_F_PROTOCOL_FEATURES` sends the handler one `SET_VRING_ENABLE` per
//! remembered ring (without a reply request, so the frontend sees no extra reply). The handler
//! accepts enabling a ring before its kick fd arrives: it starts watching the kick as soon as
//! the ring is both started and enabled. Everything else is forwarded unchanged, fds included.
//!
//! Frontend -> backend messages are parsed (12-byte header: request, flags, size; payload;
//! fds in the header's ancillary data); backend -> frontend traffic is copied as bytes. Only
//! one reply is ever outstanding (frontends wait for each reply), so an ack written by the shim
//! never interleaves with a reply of the backend.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// `VHOST_USER_F_PROTOCOL_FEATURES` in the `SET_FEATURES` payload.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Largest payload a vhost-user message may carry (the memory table with 8 regions is 328).
const MAX_PAYLOAD: u32 = 4096;
/// Most fds one message carries.
const MAX_FDS: usize = 32;

/// Reads one message header (and its fds) from `s`; `None` at end of stream.
fn recv_header(s: &UnixStream) -> io::Result<Option<([u8; 12], Vec<File>)>> {
    let mut hdr = [0u8; 12];
    let mut fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    }];
    // SAFETY: `iov` describes `hdr`, which outlives the call; `fds` has room for MAX_FDS.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let files = fds[..nfds]
        .iter()
        // SAFETY: recvmsg just installed these fds in this process; nothing else owns them.
        .map(|&fd| unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    if n < hdr.len() {
        // A stream may split the header; the rest carries no fds.
        let mut r = s;
        r.read_exact(&mut hdr[n..])?;
    }
    Ok(Some((hdr, files)))
}

fn word(hdr: &[u8; 12], i: usize) -> u32 {
    u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]])
}

/// Writes one whole message (header + payload) and its fds to `backend`.
fn send_message(backend: &UnixStream, msg: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let sent = backend
        .send_with_fds(&[msg], fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if let Some(rest) = msg.get(sent..).filter(|r| !r.is_empty()) {
        // The fds travelled with the first bytes; the rest is plain data.
        let mut w = backend;
        w.write_all(rest)?;
    }
    Ok(())
}

/// Most rings whose early enable state is remembered (every vmkit device has far fewer:
/// the command line caps queues at 64).
const MAX_EARLY_RINGS: usize = 1024;

/// A `SET_VRING_ENABLE` message for ring `index` (`enable` 0 or 1), with `flags` besides the
/// version.
fn enable_message(index: u32, enable: u32, flags: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(20);
    m.extend(SET_VRING_ENABLE.to_le_bytes());
    m.extend((FLAG_VERSION | flags).to_le_bytes());
    m.extend(8u32.to_le_bytes());
    m.extend(index.to_le_bytes());
    m.extend(enable.to_le_bytes());
    m
}

/// Frontend -> backend direction.
fn forward_requests(
    frontend: &UnixStream,
    backend: &UnixStream,
    reply: &Mutex<UnixStream>,
) -> io::Result<()> {
    let mut features_set = false;
    // Last state asked for each ring before SET_FEATURES, indexed by ring (bounded by
    // MAX_EARLY_RINGS, so a frontend cannot grow it or make each update a long search).
    let mut early: Vec<Option<u32>> = Vec::new();
    let mut payload = Vec::new();
    while let Some((hdr, files)) = recv_header(frontend)? {
        let (request, flags, size) = (word(&hdr, 0), word(&hdr, 4), word(&hdr, 8));
        if size > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("vhost-user message {request} with a {size}-byte payload"),
            ));
        }
        payload.resize(size as usize, 0);
        let mut r = frontend;
        r.read_exact(&mut payload)?;
        log::trace!(
            "frontend request {request} flags {flags:#x} size {size} fds {}",
            files.len()
        );
        if request == SET_VRING_ENABLE && !features_set {
            let (Some(index), Some(enable)) =
                (payload_word(&payload, 0), payload_word(&payload, 4))
            else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("SET_VRING_ENABLE with a {size}-byte payload"),
                ));
            };
            log::debug!(
                "holding back SET_VRING_ENABLE({index}, {enable}) sent before SET_FEATURES"
            );
            let Some(slot) = usize::try_from(index).ok().filter(|&i| i < MAX_EARLY_RINGS) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "SET_VRING_ENABLE for ring {index} (our devices have at most \
                         {MAX_EARLY_RINGS} rings)"
                    ),
                ));
            };
            if early.len() <= slot {
                early.resize(slot + 1, None);
            }
            early[slot] = Some(enable);
            if flags & FLAG_NEED_REPLY != 0 {
                let mut ack = Vec::with_capacity(20);
                ack.extend(request.to_le_bytes());
                ack.extend((FLAG_VERSION | FLAG_REPLY).to_le_bytes());
                ack.extend(8u32.to_le_bytes());
                ack.extend(0u64.to_le_bytes());
                reply
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write_all(&ack)?;
            }
            continue;
        }
        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        let mut msg = hdr.to_vec();
        msg.extend_from_slice(&payload);
        send_message(backend, &msg, &fds)?;
        // `files` drop here: the backend received its own duplicates.
        if request == SET_FEATURES && !features_set {
            features_set = true;
            let acked = payload_word(&payload, 0)
                .zip(payload_word(&payload, 4))
                .map_or(0, |(lo, hi)| u64::from(lo) | (u64::from(hi) << 32));
            // Without the protocol feature the handler enables every ring by itself (and
            // would refuse SET_VRING_ENABLE).
            if acked & PROTOCOL_FEATURES != 0 {
                for (index, enable) in early.drain(..).enumerate() {
                    let Some(enable) = enable else { continue };
                    // `index` < MAX_EARLY_RINGS, which fits in a u32.
                    let index = index as u32;
                    log::debug!("replaying SET_VRING_ENABLE({index}, {enable})");
                    send_message(backend, &enable_message(index, enable, 0), &[])?;
                }
            }
            early.clear();
        }
    }
    Ok(())
}

/// The little-endian `u32` at `offset` of a payload, if it is long enough.
fn payload_word(payload: &[u8], offset: usize) -> Option<u32> {
    let b = payload.get(offset..offset.checked_add(4)?)?;
    b.try_into().ok().map(u32::from_le_bytes)
}

/// Backend -> frontend direction: plain bytes.
fn forward_replies(backend: &UnixStream, reply: &Mutex<UnixStream>) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut r = backend;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        reply
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&buf[..n])?;
    }
}

/// Runs the shim between `frontend` and `backend` until either side closes. Returns the two
/// forwarding threads.
pub fn spawn(frontend: UnixStream, backend: UnixStream) -> io::Result<[JoinHandle<()>; 2]> {
    let reply = Arc::new(Mutex::new(frontend.try_clone()?));
    let (f2, b2) = (frontend.try_clone()?, backend.try_clone()?);
    let r2 = reply.clone();
    let up = std::thread::Builder::new()
        .name("vu-shim-req".into())
        .spawn(move || {
            if let Err(e) = forward_requests(&frontend, &backend, &reply) {
                log::warn!("vhost-user shim: {e}");
            }
            let _ = backend.shutdown(Shutdown::Both);
            let _ = frontend.shutdown(Shutdown::Both);
        })?;
    let down = std::thread::Builder::new()
        .name("vu-shim-reply".into())
        .spawn(move || {
            if let Err(e) = forward_replies(&b2, &r2) {
                log::warn!("vhost-user shim: {e}");
            }
            let _ = b2.shutdown(Shutdown::Both);
            let _ = f2.shutdown(Shutdown::Both);
        })?;
    Ok([up, down])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn msg(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(request.to_le_bytes());
        m.extend((FLAG_VERSION | flags).to_le_bytes());
        m.extend((payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
        // A bound against hangs, not a timing assertion: generous for a loaded machine.
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut v = vec![0u8; n];
        s.read_exact(&mut v).unwrap();
        v
    }

    #[test]
    fn holds_early_enables_replays_them_and_forwards_the_rest() {
        let (mut qemu, front) = UnixStream::pair().unwrap();
        let (back, mut handler) = UnixStream::pair().unwrap();
        let threads = spawn(front, back).unwrap();
        let enable = [0u8, 0, 0, 0, 1, 0, 0, 0]; // vring 0, enable 1
        let disable1 = [1u8, 0, 0, 0, 0, 0, 0, 0]; // vring 1, enable 0
        let enable1 = [1u8, 0, 0, 0, 1, 0, 0, 0]; // vring 1, enable 1

        // Before SET_FEATURES: held back; acked only when an ack is requested.
        qemu.write_all(&msg(SET_VRING_ENABLE, 0, &enable)).unwrap();
        qemu.write_all(&msg(SET_VRING_ENABLE, 0, &disable1))
            .unwrap();
        qemu.write_all(&msg(SET_VRING_ENABLE, FLAG_NEED_REPLY, &enable1))
            .unwrap();
        let ack = read_n(&mut qemu, 20);
        assert_eq!(word(ack[..12].try_into().unwrap(), 0), SET_VRING_ENABLE);
        assert_eq!(
            word(ack[..12].try_into().unwrap(), 4),
            FLAG_VERSION | FLAG_REPLY
        );
        assert_eq!(&ack[12..], &[0u8; 8]);

        // A message with an fd reaches the handler with a working duplicate of the fd (and is
        // the first thing the handler sees: the enables were held back).
        let (mut r, w) = std::io::pipe().unwrap();
        let m = msg(5, 0, &[1, 2, 3, 4]);
        qemu.send_with_fds(&[&m[..]], &[w.as_raw_fd()]).unwrap();
        drop(w);
        let (hdr, files) = recv_header(&handler).unwrap().unwrap();
        assert_eq!(word(&hdr, 0), 5);
        assert_eq!(files.len(), 1);
        assert_eq!(read_n(&mut handler, 4), [1, 2, 3, 4]);
        let mut wf = &files[0];
        wf.write_all(b"x").unwrap();
        drop(files);
        let mut got = [0u8; 1];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");

        // SET_FEATURES with the protocol feature is forwarded, then the last state of each
        // ring is replayed, in ring order, without a reply request.
        let f = msg(
            SET_FEATURES,
            FLAG_NEED_REPLY,
            &PROTOCOL_FEATURES.to_le_bytes(),
        );
        qemu.write_all(&f).unwrap();
        assert_eq!(read_n(&mut handler, f.len()), f);
        assert_eq!(read_n(&mut handler, 20), msg(SET_VRING_ENABLE, 0, &enable));
        assert_eq!(read_n(&mut handler, 20), msg(SET_VRING_ENABLE, 0, &enable1));

        // After SET_FEATURES, enables pass through.
        let e = msg(SET_VRING_ENABLE, 0, &disable1);
        qemu.write_all(&e).unwrap();
        assert_eq!(read_n(&mut handler, e.len()), e);

        // Replies flow back as bytes.
        handler.write_all(b"reply").unwrap();
        assert_eq!(read_n(&mut qemu, 5), b"reply");

        // An absurd payload size ends the session; both sides see the end.
        qemu.write_all(&msg(1, 0, &[])[..8]).unwrap();
        qemu.write_all(&(MAX_PAYLOAD + 1).to_le_bytes()).unwrap();
        for t in threads {
            t.join().unwrap();
        }
        let mut rest = Vec::new();
        handler.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn nothing_is_replayed_without_the_protocol_feature() {
        let (mut qemu, front) = UnixStream::pair().unwrap();
        let (back, mut handler) = UnixStream::pair().unwrap();
        let threads = spawn(front, back).unwrap();
        qemu.write_all(&msg(SET_VRING_ENABLE, 0, &[0, 0, 0, 0, 1, 0, 0, 0]))
            .unwrap();
        let f = msg(SET_FEATURES, 0, &0u64.to_le_bytes());
        qemu.write_all(&f).unwrap();
        drop(qemu);
        for t in threads {
            t.join().unwrap();
        }
        let mut rest = Vec::new();
        handler.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, f);
    }

    #[test]
    fn an_early_enable_for_an_absurd_ring_ends_the_session() {
        let (mut qemu, front) = UnixStream::pair().unwrap();
        let (back, mut handler) = UnixStream::pair().unwrap();
        let threads = spawn(front, back).unwrap();
        let ring = (MAX_EARLY_RINGS as u32).to_le_bytes();
        let payload = [ring[0], ring[1], ring[2], ring[3], 1, 0, 0, 0];
        qemu.write_all(&msg(SET_VRING_ENABLE, 0, &payload)).unwrap();
        for t in threads {
            t.join().unwrap();
        }
        let mut rest = Vec::new();
        handler.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn a_short_early_enable_ends_the_session() {
        let (mut qemu, front) = UnixStream::pair().unwrap();
        let (back, mut handler) = UnixStream::pair().unwrap();
        let threads = spawn(front, back).unwrap();
        qemu.write_all(&msg(SET_VRING_ENABLE, 0, &[0, 0, 0, 0]))
            .unwrap();
        for t in threads {
            t.join().unwrap();
        }
        let mut rest = Vec::new();
        handler.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}
