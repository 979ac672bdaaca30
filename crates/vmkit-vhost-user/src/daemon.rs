//! Running a backend: the listening socket, one connection at a time, and a clean stop.
//!
//! [`serve`] listens on a Unix socket and serves frontends one after the other (like
//! `qemu-storage-daemon`): each connection gets a fresh `VhostUserDaemon` (fresh vrings and
//! negotiation state) around the same device, so a guest reboot or a QEMU restart simply
//! reconnects. When a connection ends the device is flushed and reset.
//!
//! [`Stop`] is how the process asks the loop to end. [`install_signal_handlers`] makes SIGTERM
//! and SIGINT request a stop: while a frontend is connected, the connection is shut down, the
//! worker threads finish the request they are executing and exit, and the device is flushed
//! before [`serve`] returns. Signals are taken synchronously by a dedicated thread
//! (`sigwait`), so no work happens in an async signal handler.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{QueueHandler, VirtioBackend};

/// Errors of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The socket cannot be created.
    #[error("cannot listen on socket {path}: {source}")]
    Listen {
        /// Socket path.
        path: String,
        /// What vhost reported.
        source: vhost::vhost_user::Error,
    },
    /// Waiting for a connection or a stop request failed.
    #[error("cannot wait for a frontend: {0}")]
    Poll(io::Error),
    /// The vhost-user daemon failed.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// The final flush failed: completed writes may not be durable.
    #[error("cannot flush the device: {0}")]
    Flush(io::Error),
    /// The stop signal could not be set up.
    #[error("cannot set up signal handling: {0}")]
    Signal(io::Error),
}

#[derive(Default)]
struct StopState {
    requested: bool,
    connection: Option<ShutdownHandle>,
}

/// A stop request shared between a signal thread (or a test) and [`serve`].
#[derive(Clone)]
pub struct Stop {
    state: Arc<Mutex<StopState>>,
    wake: Arc<EventFd>,
}

impl std::fmt::Debug for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stop")
            .field("requested", &self.is_requested())
            .finish()
    }
}

impl Stop {
    /// A stop that has not been requested.
    ///
    /// # Errors
    /// The eventfd that wakes [`serve`] cannot be created.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            state: Arc::default(),
            wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StopState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks [`serve`] to finish: the current connection (if any) is shut down.
    pub fn request(&self) {
        let mut s = self.lock();
        s.requested = true;
        if let Some(h) = s.connection.take() {
            h.shutdown();
        }
        // A full counter still wakes the poll; nothing else can fail here.
        let _ = self.wake.write(1);
    }

    /// Whether a stop was requested.
    pub fn is_requested(&self) -> bool {
        self.lock().requested
    }

    fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Remembers the live connection; returns false (and shuts it) if a stop came first.
    fn attach(&self, handle: Option<ShutdownHandle>) -> bool {
        let mut s = self.lock();
        if s.requested {
            if let Some(h) = handle {
                h.shutdown();
            }
            return false;
        }
        s.connection = handle;
        true
    }

    fn detach(&self) {
        self.lock().connection = None;
    }
}

/// Makes SIGTERM and SIGINT call [`Stop::request`].
///
/// Blocks both signals in the calling thread (and so in every thread it spawns afterwards:
/// call this first in `main`) and starts a thread that waits for them with `sigwait`.
///
/// # Errors
/// [`DaemonError::Signal`] when the mask or the thread cannot be set up.
pub fn install_signal_handlers(stop: Stop) -> Result<(), DaemonError> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; these calls only write into it.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(DaemonError::Signal(io::Error::from_raw_os_error(rc)));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` was initialised above and moved into this thread; `sig` is a valid
            // out-pointer for the duration of the call.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc == 0 {
                log::info!("signal {sig} received: stopping");
                stop.request();
            }
        })
        .map_err(DaemonError::Signal)?;
    Ok(())
}

/// Waits until `listener` has a connection (true) or `stop` was requested (false).
fn wait_for_frontend(listener: &Listener, stop: &Stop) -> Result<bool, DaemonError> {
    loop {
        if stop.is_requested() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.wake_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structures that outlives the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(DaemonError::Poll(e));
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

/// Accepts the frontend on `listener` and connects `daemon` to it through the
/// [`crate::early_enable`] shim (over a private socket next to `socket`, removed at once).
fn start_behind_shim<H: QueueHandler>(
    daemon: &mut VhostUserDaemon<Arc<VirtioBackend<H>>>,
    listener: &Listener,
    socket: &Path,
) -> Result<(), DaemonError> {
    let io = DaemonError::Poll;
    let frontend = loop {
        match listener.accept() {
            Ok(Some(s)) => break s,
            Ok(None) => continue,
            Err(e) => return Err(DaemonError::Daemon(e.to_string())),
        }
    };
    frontend.set_nonblocking(false).map_err(io)?;
    let inner_path = socket.with_extension("shim");
    let mut inner = Listener::new(&inner_path, true).map_err(|source| DaemonError::Listen {
        path: inner_path.display().to_string(),
        source,
    })?;
    let ours = std::os::unix::net::UnixStream::connect(&inner_path).map_err(io)?;
    let started = daemon.start(&mut inner);
    let _ = std::fs::remove_file(&inner_path);
    started.map_err(|e| DaemonError::Daemon(e.to_string()))?;
    crate::early_enable::spawn(frontend, ours).map_err(io)?;
    Ok(())
}

/// How [`serve`] behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeOptions {
    /// Return after the first frontend disconnects instead of waiting for the next one.
    pub once: bool,
}

/// Serves `backend` on the Unix socket `socket` until `stop` is requested (or, with
/// [`ServeOptions::once`], until the first frontend disconnects). Returns the number of
/// connections served. The device is flushed after every connection.
///
/// # Errors
/// [`DaemonError`] when the socket cannot be created, the daemon fails to start, or a flush
/// fails.
pub fn serve<H: QueueHandler>(
    backend: Arc<VirtioBackend<H>>,
    socket: &Path,
    stop: &Stop,
    opts: ServeOptions,
) -> Result<u32, DaemonError> {
    let mut listener = Listener::new(socket, true).map_err(|source| DaemonError::Listen {
        path: socket.display().to_string(),
        source,
    })?;
    log::info!(
        "{}: listening on {} ({} queues of up to {} entries)",
        backend.name(),
        socket.display(),
        vhost_user_backend::VhostUserBackend::num_queues(&*backend),
        vhost_user_backend::VhostUserBackend::max_queue_size(&*backend),
    );
    let mut served = 0u32;
    while wait_for_frontend(&listener, stop)? {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new(backend.name().to_string(), backend.clone(), mem)
            .map_err(|e| DaemonError::Daemon(e.to_string()))?;
        // Host fds (TAP, console input) are watched by the worker that owns every queue.
        for (i, fd) in backend.handler().backend_fds().into_iter().enumerate() {
            let handlers = daemon.get_epoll_handlers();
            let worker = handlers
                .first()
                .ok_or(DaemonError::Daemon("no worker thread".into()))?;
            match worker.register_listener(
                fd,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                backend.backend_token(i),
            ) {
                Ok(()) => {}
                // A regular file cannot be polled; it is always readable, and the handler
                // reads it whenever its queue runs.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    log::info!(
                        "{}: host fd {fd} is not pollable; read on queue runs",
                        backend.name()
                    );
                }
                Err(e) => return Err(DaemonError::Poll(e)),
            }
        }
        if backend.needs_early_enable_shim() {
            start_behind_shim(&mut daemon, &listener, socket)?;
        } else {
            daemon
                .start(&mut listener)
                .map_err(|e| DaemonError::Daemon(e.to_string()))?;
        }
        served += 1;
        log::info!("{}: frontend connected", backend.name());
        let result = if stop.attach(daemon.shutdown_handle()) {
            let r = daemon.wait();
            stop.detach();
            r
        } else {
            daemon.wait()
        };
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => log::info!("{}: frontend disconnected", backend.name()),
            Err(e) => log::warn!("{}: connection ended: {e}", backend.name()),
        }
        // Dropping the daemon stops its worker threads after their current request.
        drop(daemon);
        backend.flush().map_err(DaemonError::Flush)?;
        backend.reset();
        if opts.once {
            break;
        }
    }
    backend.flush().map_err(DaemonError::Flush)?;
    log::info!("{}: stopped after {served} connection(s)", backend.name());
    Ok(served)
}
