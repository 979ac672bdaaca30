//! Host input for the guest's consoles: stdin to COM1's receive FIFO, and the terminal mode
//! that makes typing work.
//!
//! # Model
//!
//! One host source (mini-vmm's stdin) feeds one guest console. With `--console tty` the
//! virtio console reads it (its event loop polls the fd); otherwise, with `--serial tty`, a
//! [`pump`] thread moves it into the 16550's 64-byte receive FIFO, raising the receive
//! interrupt as a UART does. When the FIFO is full (the guest has not read it yet) the pump
//! holds the bytes and retries every [`RETRY`]: the guest's driver drains the FIFO from its
//! interrupt handler, so nothing is dropped and the host side never blocks a vCPU. The pump
//! waits for input with `poll` and a [`TICK`] timeout, so it notices the end of the run
//! without needing input; end of file on stdin ends it.
//!
//! [`Terminal::take`] saves stdin's file flags (the virtio console makes the fd non-blocking)
//! and, if stdin is a terminal, switches it to raw mode for the run (keys reach the guest one
//! at a time, unechoed and uninterpreted - Ctrl-C goes to the guest's shell, as on a serial
//! line); dropping it restores both.
//!
//! Bytes read but not yet queued when the run ends (at most one read, 64 bytes) are lost,
//! also across a snapshot; the FIFO's content itself is part of the saved serial state.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::devices::SerialPort;

/// How long the pump waits for input before looking at the stop flag again.
pub const TICK: Duration = Duration::from_millis(50);
/// How long the pump waits for room in a full receive FIFO.
pub const RETRY: Duration = Duration::from_millis(2);

/// Copies `fd`'s bytes into `serial`'s receive FIFO until `stop` is set or `fd` ends.
/// Returns the number of bytes delivered.
pub fn pump<W: io::Write>(
    fd: RawFd,
    serial: &Mutex<SerialPort<W>>,
    stop: &AtomicBool,
) -> io::Result<u64> {
    let mut buf = [0u8; 64];
    let (mut start, mut end) = (0, 0);
    let mut delivered = 0u64;
    while !stop.load(Ordering::SeqCst) {
        if start == end {
            if !readable(fd, TICK)? {
                continue;
            }
            // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes; `read` writes
            // at most that many and the fd is only read.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                0 => break,
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) {
                        continue;
                    }
                    return Err(e);
                }
                // `read` returns at most `buf.len()`.
                n => (start, end) = (0, n as usize),
            }
        }
        let queued = serial
            .lock()
            .map_err(|_| io::Error::other("serial port lock poisoned"))?
            .enqueue_input(&buf[start..end]);
        start += queued;
        delivered += queued as u64;
        if start < end {
            std::thread::sleep(RETRY);
        }
    }
    Ok(delivered)
}

/// Whether `fd` has input (or EOF/an error to report) within `timeout`.
fn readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, and the count says one.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    // POLLHUP/POLLERR: the next read reports EOF or the error.
    Ok(r > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
}

/// Whether `fd` can be watched by epoll (a terminal, pipe or socket: an event loop can wait
/// for its input). Regular files and `/dev/null` cannot.
pub fn pollable(fd: RawFd) -> bool {
    // SAFETY: creates a new epoll fd, closed below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return false;
    }
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 0,
    };
    // SAFETY: a valid epoll fd and event; the kernel only reads `ev`.
    let ok = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } == 0;
    // SAFETY: closes the epoll fd created above (which drops the registration).
    unsafe { libc::close(ep) };
    ok
}

/// An input fd's saved state: its file status flags, and its terminal mode if it is a
/// terminal (then switched to raw). Both are restored on drop.
pub struct Terminal {
    fd: RawFd,
    saved: Option<libc::termios>,
    flags: libc::c_int,
}

impl std::fmt::Debug for Terminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminal")
            .field("fd", &self.fd)
            .field("raw", &self.saved.is_some())
            .finish()
    }
}

impl Terminal {
    /// Saves `fd`'s flags and, if it is a terminal, switches it to raw mode.
    pub fn take(fd: RawFd) -> io::Result<Terminal> {
        // SAFETY: F_GETFL on an fd we were given; no memory is passed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(Terminal {
                fd,
                saved: None,
                flags,
            });
        }
        // SAFETY: termios is plain data; tcgetattr fills it completely on success.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the termios we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios derived from the terminal's own.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Terminal {
            fd,
            saved: Some(saved),
            flags,
        })
    }

    /// Whether the fd is a terminal now in raw mode.
    pub fn is_raw(&self) -> bool {
        self.saved.is_some()
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // Best effort: there is nobody to report a failure to while exiting.
        if let Some(saved) = &self.saved {
            // SAFETY: restores the mode saved from this fd.
            unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, saved) };
        }
        // SAFETY: F_SETFL with the flags read from this fd (the virtio console may have
        // made it non-blocking).
        unsafe { libc::fcntl(self.fd, libc::F_SETFL, self.flags) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::SerialIrq;
    use std::os::unix::io::AsRawFd;
    use std::sync::Arc;
    use vm_device::bus::{PioAddress, PioAddressOffset};
    use vm_device::MutDevicePio;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn reg_read<W: io::Write>(s: &Mutex<SerialPort<W>>, off: PioAddressOffset) -> u8 {
        let mut b = [0u8];
        s.lock().unwrap().pio_read(PioAddress(0x3f8), off, &mut b);
        b[0]
    }

    #[test]
    fn pump_delivers_every_byte_through_a_full_fifo_and_raises_the_interrupt() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialPort::with_irq(
            Vec::new(),
            SerialIrq::EventFd(irq.try_clone().unwrap()),
        )));
        // The driver enables the receive-data interrupt (IER bit 0).
        serial.lock().unwrap().pio_write(PioAddress(0x3f8), 1, &[1]);
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        // Three times the FIFO: the pump must hold and retry, not drop.
        let input: Vec<u8> = (0..192u32).map(|i| b'a' + (i % 26) as u8).collect();
        io::Write::write_all(&mut tx, &input).unwrap();
        drop(tx); // EOF after the input ends the pump
        let stop = AtomicBool::new(false);
        let got = std::thread::scope(|s| {
            let pumping = s.spawn(|| pump(rx.as_raw_fd(), &serial, &stop));
            let mut got = Vec::new();
            // The guest's side: read RBR while LSR says data ready, until all arrived.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while got.len() < input.len() && std::time::Instant::now() < deadline {
                if reg_read(&serial, 5) & 1 != 0 {
                    got.push(reg_read(&serial, 0));
                } else {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            let delivered = pumping.join().unwrap().unwrap();
            assert_eq!(delivered, input.len() as u64);
            got
        });
        assert_eq!(got, input, "every byte, in order");
        assert!(irq.read().unwrap() >= 1, "the receive interrupt was raised");
    }

    #[test]
    fn pump_ends_on_stop_without_input() {
        let serial = Mutex::new(SerialPort::new(Vec::new()));
        let (_tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let pumping = s.spawn(|| pump(rx.as_raw_fd(), &serial, &stop));
            std::thread::sleep(TICK);
            stop.store(true, Ordering::SeqCst);
            // Bounded by one TICK; a hang here fails the test by its harness timeout.
            assert_eq!(pumping.join().unwrap().unwrap(), 0);
        });
    }

    #[test]
    fn pipes_are_pollable_and_dev_null_is_not() {
        let (_tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(pollable(rx.as_raw_fd()));
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(!pollable(null.as_raw_fd()));
        assert!(!pollable(-1));
    }

    #[test]
    fn a_non_terminal_keeps_its_mode_and_gets_its_flags_back() {
        let (_tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = rx.as_raw_fd();
        // SAFETY: F_GETFL on a live fd.
        let flags = || unsafe { libc::fcntl(fd, libc::F_GETFL) };
        let before = flags();
        let t = Terminal::take(fd).unwrap();
        assert!(!t.is_raw());
        rx.set_nonblocking(true).unwrap();
        assert_ne!(flags(), before);
        drop(t);
        assert_eq!(flags(), before, "the flags are restored");
    }
}
