//! Where console bytes go to and come from.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// A console's host side.
pub struct ConsoleBackend {
    input: Option<Box<dyn ReadFd>>,
    output: Box<dyn Write + Send>,
}

/// A readable source that exposes its fd for polling.
pub trait ReadFd: Read + Send {
    /// The fd the event loop watches.
    fn fd(&self) -> RawFd;
}

impl<T: Read + AsRawFd + Send> ReadFd for T {
    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

impl std::fmt::Debug for ConsoleBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleBackend")
            .field("input_fd", &self.input_fd())
            .finish()
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a valid fd we hold; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl ConsoleBackend {
    /// Any reader/writer pair (the reader should be non-blocking).
    pub fn new(input: Option<Box<dyn ReadFd>>, output: Box<dyn Write + Send>) -> Self {
        Self { input, output }
    }

    /// The VMM's stdin and stdout. Stdin is switched to non-blocking mode.
    pub fn stdio() -> io::Result<Self> {
        let stdin = io::stdin();
        set_nonblocking(stdin.as_raw_fd())?;
        Ok(Self::new(Some(Box::new(stdin)), Box::new(io::stdout())))
    }

    /// Output appended to `output`; input (if any) read from `input`.
    pub fn file(output: &Path, input: Option<&Path>) -> io::Result<Self> {
        let out = OpenOptions::new().create(true).append(true).open(output)?;
        let inp: Option<Box<dyn ReadFd>> = match input {
            Some(p) => {
                let f = File::open(p)?;
                set_nonblocking(f.as_raw_fd())?;
                Some(Box::new(f))
            }
            None => None,
        };
        Ok(Self::new(inp, Box::new(out)))
    }

    /// Both directions over a connected Unix stream socket.
    pub fn unix_stream(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        let out = stream.try_clone()?;
        // Output writes must not drop bytes: the writer half stays blocking-tolerant through
        // write_all's retry on WouldBlock below.
        Ok(Self::new(
            Some(Box::new(stream)),
            Box::new(RetryWriter(out)),
        ))
    }

    /// Connects to the Unix socket at `path`.
    pub fn unix_socket(path: &Path) -> io::Result<Self> {
        Self::unix_stream(UnixStream::connect(path)?)
    }

    /// The input fd to poll, if there is input.
    pub fn input_fd(&self) -> Option<RawFd> {
        self.input.as_ref().map(|i| i.fd())
    }

    /// Reads what is available without blocking; `Ok(0)` when nothing is (or at EOF).
    pub fn read_input(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(i) = self.input.as_mut() else {
            return Ok(0);
        };
        match i.read(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Writes all of `data` and flushes.
    pub fn write_output(&mut self, data: &[u8]) -> io::Result<()> {
        self.output.write_all(data)?;
        self.output.flush()
    }
}

/// A writer over a non-blocking socket that waits (poll) instead of failing on WouldBlock.
struct RetryWriter(UnixStream);

impl Write for RetryWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd {
                        fd: self.0.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: `pfd` is a valid pollfd array of length 1 living on our stack.
                    unsafe { libc::poll(&mut pfd, 1, 1000) };
                }
                other => return other,
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_stream_both_ways() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut be = ConsoleBackend::unix_stream(a).unwrap();
        assert!(be.input_fd().is_some());
        let mut buf = [0u8; 8];
        assert_eq!(be.read_input(&mut buf).unwrap(), 0, "nothing yet, no block");
        b.write_all(b"hi").unwrap();
        assert_eq!(be.read_input(&mut buf).unwrap(), 2);
        be.write_output(b"out").unwrap();
        let mut got = [0u8; 3];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"out");
        assert!(format!("{be:?}").contains("input_fd"));
    }

    #[test]
    fn file_backend() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let inp = dir.path().join("in");
        std::fs::write(&inp, b"abc").unwrap();
        let mut be = ConsoleBackend::file(&out, Some(&inp)).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(be.read_input(&mut buf).unwrap(), 3);
        be.write_output(b"xyz").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"xyz");
        let mut none = ConsoleBackend::file(&out, None).unwrap();
        assert_eq!(none.input_fd(), None);
        assert_eq!(none.read_input(&mut buf).unwrap(), 0);
        assert!(ConsoleBackend::unix_socket(&dir.path().join("nope")).is_err());
    }
}
