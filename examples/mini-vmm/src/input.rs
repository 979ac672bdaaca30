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
//! The virtio console's event loop needs a non-blocking fd, but on a terminal stdin, stdout
//! and stderr share one open file description, so `O_NONBLOCK` on fd 0 would make mini-vmm's
//! own output fail with `EAGAIN` whenever the terminal is slow. [`open_input`] therefore opens
//! stdin again (a new description of the same terminal or pipe) for the console to own.
//!
//! [`Terminal::take`] switches a terminal stdin to raw mode for the run, if mini-vmm is in the
//! terminal's foreground process group (a background `mini-vmm &` leaves the terminal alone):
//! keys reach the guest one at a time, unechoed, while output post-processing and signal keys
//! stay on - Ctrl-C stops mini-vmm, not the guest's program, so a hung guest can always be
//! stopped from the keyboard. The saved mode is restored when the guard drops, and by a
//! handler for SIGINT, SIGTERM, SIGHUP and SIGQUIT before the signal's default action ends the
//! process (SIGKILL cannot be caught: `stty sane` repairs the terminal then).
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

/// Opens stdin again as a new, non-blocking open file description (see the module docs), for
/// an event loop to own.
pub fn open_input() -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open("/proc/self/fd/0")
}

/// The terminal mode to restore from a signal handler: set once, before the handlers are
/// installed, and only read after.
static SAVED_MODE: std::sync::OnceLock<(RawFd, libc::termios)> = std::sync::OnceLock::new();

extern "C" fn restore_and_reraise(sig: libc::c_int) {
    if let Some((fd, mode)) = SAVED_MODE.get() {
        // SAFETY: tcsetattr, signal and raise are async-signal-safe; `mode` is a termios saved
        // before this handler was installed and never written again.
        unsafe {
            libc::tcsetattr(*fd, libc::TCSANOW, mode);
        }
    }
    // SAFETY: as above; the default action then ends the process as the signal would have.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// A terminal switched to raw mode for the run, restored on drop (see the module docs).
pub struct Terminal {
    fd: RawFd,
    saved: libc::termios,
}

impl std::fmt::Debug for Terminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminal").field("fd", &self.fd).finish()
    }
}

impl Terminal {
    /// Switches `fd` to raw mode (with signal keys and output processing kept) if it is a
    /// terminal whose foreground process group is ours; `Ok(None)` if it is not.
    pub fn take(fd: RawFd) -> io::Result<Option<Terminal>> {
        // SAFETY: isatty, tcgetpgrp and getpgrp only inspect the fd and the process.
        let foreground = unsafe { libc::isatty(fd) == 1 && libc::tcgetpgrp(fd) == libc::getpgrp() };
        if !foreground {
            return Ok(None);
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
        raw.c_lflag |= libc::ISIG;
        raw.c_oflag |= libc::OPOST;
        if SAVED_MODE.set((fd, saved)).is_ok() {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                // SAFETY: installs an async-signal-safe handler (see `restore_and_reraise`).
                unsafe {
                    libc::signal(sig, restore_and_reraise as *const () as libc::sighandler_t)
                };
            }
        }
        // SAFETY: `raw` is a valid termios derived from the terminal's own.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(Terminal { fd, saved }))
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // Best effort: there is nobody to report a failure to while exiting.
        // SAFETY: restores the mode saved from this fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
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
    fn a_non_terminal_is_left_alone() {
        let (_tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(Terminal::take(rx.as_raw_fd()).unwrap().is_none());
    }

    #[test]
    fn the_console_input_is_a_new_description_so_stdin_keeps_blocking() {
        // This test process's stdin: whatever the harness gave (a pipe, a terminal, /dev/null).
        // SAFETY: F_GETFL on fd 0 of this process.
        let flags = || unsafe { libc::fcntl(0, libc::F_GETFL) };
        let before = flags();
        if before < 0 {
            return; // no stdin at all: nothing to reopen
        }
        let input = open_input().unwrap();
        // SAFETY: F_GETFL on the fd just opened.
        let theirs = unsafe { libc::fcntl(input.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(
            theirs & libc::O_NONBLOCK,
            0,
            "the console's fd is non-blocking"
        );
        assert_eq!(
            flags(),
            before,
            "fd 0 (shared with stdout on a terminal) is untouched"
        );
    }
}
