//! Kicking a KVM vCPU out of `KVM_RUN` from another thread.
//!
//! The model (the one Firecracker and Cloud Hypervisor follow): a real-time signal is
//! delivered to the vCPU's thread. Its handler runs *on that thread* and sets
//! `kvm_run.immediate_exit`, so:
//!
//! * if the thread is inside `KVM_RUN`, the signal makes the ioctl return `EINTR`;
//! * if the signal lands just before the ioctl, `immediate_exit` makes the ioctl return
//!   `EINTR` at once instead of entering the guest;
//! * if the thread is outside `run` altogether, the kicker only sets the `kicked` flag and the
//!   next `run` returns [`VmExit::Interrupted`](crate::VmExit::Interrupted) without entering.
//!
//! Soundness: the kicker signals a thread only while that thread is registered as running
//! the vCPU, and registration changes under the same mutex the kicker holds while it calls
//! `pthread_kill`, so the target thread exists. Only the vCPU's own thread writes
//! `immediate_exit` (from the handler, through a thread-local pointer that is set only while
//! `run` executes), so no other thread ever touches the `kvm_run` mapping, and the mapping
//! outlives every write because `run` borrows the vCPU.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU this thread is running, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Offset from `SIGRTMIN` of the signal used to kick vCPUs.
pub const KICK_SIGNAL_OFFSET: i32 = 0;

/// The signal number used to kick vCPUs (`SIGRTMIN + KICK_SIGNAL_OFFSET`). A VMM must not
/// block it on vCPU threads or use it for anything else.
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `with` on a const-initialised thread local without destructor is a plain TLS read:
    // async-signal-safe.
    let ptr = IMMEDIATE_EXIT.with(|c| c.get());
    if !ptr.is_null() {
        // SAFETY: the pointer is set by `KickState::enter` on this very thread to the
        // `immediate_exit` byte of a live `kvm_run` mapping and cleared by `leave` before
        // `run` returns; the mapping lives as long as the vCPU which `run` borrows. The kernel
        // reads the byte; an atomic store is the right access for such shared memory.
        unsafe { AtomicU8::from_ptr(ptr).store(1, Ordering::SeqCst) };
    }
}

fn install_handler() -> std::io::Result<()> {
    static RESULT: OnceLock<i32> = OnceLock::new();
    let errno = *RESULT.get_or_init(|| {
        register_signal_handler(kick_signal(), handle_kick)
            .err()
            .map(|e| e.errno())
            .unwrap_or(0)
    });
    if errno == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(errno))
    }
}

#[derive(Debug, Default)]
struct Registration {
    thread: Option<libc::pthread_t>,
}

/// State shared between a vCPU and its kick handles.
#[derive(Debug, Default)]
pub(crate) struct KickState {
    kicked: AtomicBool,
    running: Mutex<Registration>,
}

impl KickState {
    pub(crate) fn new() -> std::io::Result<Arc<Self>> {
        install_handler()?;
        Ok(Arc::new(KickState::default()))
    }

    /// Called by the vCPU thread before `KVM_RUN`. Returns true if a kick is already pending
    /// (then the caller must not enter the guest, and must call `leave`).
    pub(crate) fn enter(&self, immediate_exit: *mut u8) -> bool {
        IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if let Ok(mut reg) = self.running.lock() {
            reg.thread = Some(me);
        }
        self.kicked.swap(false, Ordering::SeqCst)
    }

    /// Called by the vCPU thread after `KVM_RUN`.
    pub(crate) fn leave(&self) {
        if let Ok(mut reg) = self.running.lock() {
            reg.thread = None;
        }
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }

    /// Consumes a pending kick flag (after an `EINTR`).
    pub(crate) fn take_kicked(&self) -> bool {
        self.kicked.swap(false, Ordering::SeqCst)
    }

    fn kick(&self) {
        let reg = match self.running.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.kicked.store(true, Ordering::SeqCst);
        if let Some(thread) = reg.thread {
            // SAFETY: `thread` is registered only between `enter` and `leave`, which both
            // take this lock, so the thread is alive while we hold it. The signal has a
            // handler installed by `install_handler`.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }
}

/// A handle that kicks a [`KvmVcpu`](super::KvmVcpu) out of `run` (see the module docs).
#[derive(Debug, Clone)]
pub struct KvmKick {
    pub(crate) state: Arc<KickState>,
}

impl crate::VcpuKick for KvmKick {
    fn kick(&self) {
        self.state.kick();
    }
}
