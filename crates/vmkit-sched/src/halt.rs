//! vCPUs that halt inside the kernel: detecting them, parking them, waking them.
//!
//! With KVM's in-kernel interrupt controller (LAPIC, IOAPIC, PIT: what Linux guests need) a
//! guest `HLT` does not come back to user space. `KVM_RUN` keeps the vCPU's thread asleep in
//! the kernel until an interrupt arrives, so a halted vCPU would hold its executor worker
//! for as long as it is idle, and a busy vCPU waiting for that worker would starve. This
//! module lets a [`VcpuTask`](crate::vcpu::VcpuTask) give the worker back:
//!
//! 1. **Detect.** KVM publishes per-vCPU statistics through a binary stats file
//!    (`KVM_GET_STATS_FD`, Linux 5.14+); its instantaneous `blocking` stat is 1 exactly
//!    while the vCPU sleeps in `kvm_vcpu_block` (halt polling excluded). A [`HaltProbe`]
//!    reads it with one `pread`, from any thread, without touching the vCPU (vCPU ioctls
//!    from another thread would wait for the vCPU's mutex, which `KVM_RUN` holds). The
//!    [`SliceTimer`](crate::vcpu::SliceTimer) thread reads the probe of every vCPU it has
//!    armed once per [`HALT_TICK`]; after [`HALT_TICKS`] consecutive readings of 1 (so the
//!    vCPU has slept for at least one tick, and short halts are not worth a round trip) it
//!    kicks the vCPU out of `KVM_RUN`.
//! 2. **Confirm.** Back in the task, `KVM_GET_MP_STATE` says whether the vCPU is still
//!    waiting: `HALTED` (or, for an application processor not yet started, `UNINITIALIZED`
//!    / `INIT_RECEIVED`). If an interrupt arrived meanwhile, KVM has already made it
//!    `RUNNABLE` and the task simply re-enters the guest.
//! 3. **Park.** The task arms a wake for itself ([`KernelHalts::park`]) and returns
//!    [`Outcome::Blocked`](crate::Outcome::Blocked); the worker runs someone else.
//! 4. **Wake.** A parked vCPU becomes runnable again through its [`Waker`]:
//!    - the VMM calls [`KernelHalts::wake`] after it signals an interrupt (an irqfd) the
//!      vCPU may be waiting for. Only a vCPU the timer kicked out for a halt is woken
//!      through the scheduler (a running one would only bounce off its next park); an
//!      announcement that found the vCPU in the guest is remembered, and a park after it
//!      is refused, since irqfd injects from a work item that may not have run yet;
//!    - the park armed a wake at the vCPU's LAPIC timer deadline (read from `KVM_GET_LAPIC`'s
//!      timer registers, or the TSC-deadline MSR against the guest TSC), so timer ticks are
//!      not late;
//!    - and in any case no later than the re-poll period after parking. That bound covers
//!      every wake source the VMM does not see: IPIs between vCPUs and INIT/SIPI, which KVM
//!      delivers inside the kernel, and interrupts that irqfd injects asynchronously (from a
//!      kernel work item, after the VMM's `write` returned).
//!
//! # Why no wakeup is lost
//!
//! A wakeup can only be lost while the vCPU is *outside* `KVM_RUN`: inside, KVM itself wakes
//! it. The vCPU is outside from the halt kick until the next entry. Every interrupt that
//! lands in that window is found by the next entry, because KVM evaluates pending
//! interrupts on entry; so it suffices that an entry follows every park. It does: the park
//! arms a timed wake (at most the re-poll period away) *before* the task returns `Blocked`,
//! and a wake that reaches the scheduler while the task is still running is remembered
//! (the scheduler's `wake_pending`), so the task is queued again at once. The timed wake
//! is called outside the timer's lock, so it cannot deadlock against the executor, and
//! nothing cancels it except the task's own next run. The cost of the guarantee is one
//! re-entry per re-poll period for an idle vCPU (a tick or two of a worker's wall time,
//! not CPU time: the vCPU sleeps in the kernel meanwhile).
//!
//! Without a probe (a kernel without the stat, a backend without a stats file) nothing is
//! detected and the vCPU behaves as with one thread per vCPU: correct, but it holds its
//! worker while halted.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vmkit_vcpu::{MpState, Vcpu};

use crate::executor::Waker;

/// How often the slice timer reads the halt probes of vCPUs inside `KVM_RUN`.
pub const HALT_TICK: Duration = Duration::from_micros(500);

/// Consecutive `blocking` readings after which a vCPU is kicked out to be parked.
pub const HALT_TICKS: u32 = 2;

/// The default re-poll period: a parked vCPU re-enters the guest at least this often.
pub const DEFAULT_REPOLL: Duration = Duration::from_millis(10);

/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xAECE;
/// `KVM_GET_TSC_KHZ`: `_IO(KVMIO, 0xa3)`.
const KVM_GET_TSC_KHZ: libc::c_ulong = 0xAEA3;
/// Bytes of `struct kvm_stats_header` (six `u32`s).
const STATS_HEADER_LEN: usize = 24;
/// Bytes of `struct kvm_stats_desc` before its name.
const STATS_DESC_LEN: usize = 16;
/// The name of KVM's instantaneous "vCPU sleeps in kvm_vcpu_block" stat.
const BLOCKING_STAT: &str = "blocking";

/// LAPIC register offsets in the 1 KiB register page.
const APIC_LVTT: usize = 0x320;
const APIC_TMCCT: usize = 0x390;
const APIC_TDCR: usize = 0x3e0;
/// MSRs read for a TSC-deadline timer.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Nanoseconds per APIC bus cycle in KVM (its default `APIC_BUS_CYCLE_NS`).
const APIC_BUS_CYCLE_NS: u64 = 1;

/// Errors of halt detection.
#[derive(Debug, thiserror::Error)]
pub enum HaltError {
    /// The vCPU backend has no file descriptor to ask for statistics.
    #[error("the vCPU backend has no file descriptor for KVM_GET_STATS_FD")]
    NoFd,
    /// `KVM_GET_STATS_FD` failed (kernels before 5.14 lack it).
    #[error("KVM_GET_STATS_FD on vCPU fd {fd} failed: {source}")]
    StatsFd {
        /// The vCPU fd.
        fd: RawFd,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading the stats file failed.
    #[error("reading {len} bytes at offset {offset} of the KVM stats file failed: {source}")]
    Read {
        /// The file offset.
        offset: u64,
        /// The bytes asked for.
        len: usize,
        /// The OS error (or a short read).
        source: std::io::Error,
    },
    /// The stats file is not laid out as the KVM API describes.
    #[error("malformed KVM stats file: {0}")]
    Format(String),
    /// The kernel's stats have no `blocking` entry (it appeared in Linux 5.16).
    #[error("the KVM stats file has no `{BLOCKING_STAT}` stat")]
    NoBlockingStat,
}

fn pread_exact(fd: RawFd, buf: &mut [u8], offset: u64) -> Result<(), HaltError> {
    let len = buf.len();
    let err = |source| HaltError::Read {
        offset,
        len,
        source,
    };
    let off = libc::off_t::try_from(offset)
        .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
    // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes; pread writes at most that
    // many bytes into it and does not keep the pointer.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), off) };
    if n < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    if n as usize != len {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("short read of {n} bytes"),
        )));
    }
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes(s.try_into().ok()?))
}

/// Finds the file offset of the value of stat `name` in a stats file whose header is
/// `header` and whose descriptor table is `descs`. `None` if absent; an error if the layout
/// is inconsistent.
fn find_stat(header: &[u8], descs: &[u8], name: &str) -> Result<Option<u64>, HaltError> {
    let bad = |what: &str| HaltError::Format(what.to_string());
    let name_size = u32_at(header, 4).ok_or_else(|| bad("short header"))? as usize;
    let num_desc = u32_at(header, 8).ok_or_else(|| bad("short header"))? as usize;
    let data_offset = u32_at(header, 20).ok_or_else(|| bad("short header"))?;
    let stride = STATS_DESC_LEN
        .checked_add(name_size)
        .ok_or_else(|| bad("name size overflows"))?;
    for i in 0..num_desc {
        let at = i
            .checked_mul(stride)
            .ok_or_else(|| bad("too many descriptors"))?;
        let d = descs
            .get(at..at + stride)
            .ok_or_else(|| bad("descriptor table shorter than num_desc says"))?;
        let raw_name = &d[STATS_DESC_LEN..];
        let len = raw_name
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(raw_name.len());
        if &raw_name[..len] != name.as_bytes() {
            continue;
        }
        let size = u16_at(d, 6).ok_or_else(|| bad("short descriptor"))?;
        if size != 1 {
            return Err(HaltError::Format(format!(
                "stat `{name}` has {size} values, expected 1"
            )));
        }
        let offset = u32_at(d, 8).ok_or_else(|| bad("short descriptor"))?;
        return Ok(Some(u64::from(data_offset) + u64::from(offset)));
    }
    Ok(None)
}

/// Reads whether a vCPU is asleep inside `KVM_RUN` (KVM's `blocking` stat), from any
/// thread. See the [module docs](self).
#[derive(Debug)]
pub struct HaltProbe {
    file: OwnedFd,
    offset: u64,
    /// Set by the slice timer just before it kicks the vCPU out for a halt; cleared when
    /// the vCPU is about to enter the guest again. While it is clear the vCPU is in the
    /// guest (where KVM delivers interrupts itself) or on its way in (where KVM finds them
    /// at entry), so [`KernelHalts::wake`] need not go through the scheduler.
    kicked: AtomicBool,
    /// Interrupts the VMM announced ([`KernelHalts::wake`] calls), and their number when
    /// the vCPU last entered the guest: a park is refused when they differ (an
    /// announcement that found the flag above clear may not have reached the vCPU yet).
    raised: AtomicU64,
    raised_at_entry: AtomicU64,
}

impl HaltProbe {
    /// Opens the probe of `vcpu` (through `KVM_GET_STATS_FD` on its fd).
    pub fn open<V: Vcpu>(vcpu: &V) -> Result<Self, HaltError> {
        let fd = vcpu.raw_fd().ok_or(HaltError::NoFd)?;
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new file descriptor (or
        // -1); it reads or writes no user memory. `fd` is the vCPU's open fd.
        let stats = unsafe { libc::ioctl(fd, KVM_GET_STATS_FD as _) };
        if stats < 0 {
            return Err(HaltError::StatsFd {
                fd,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `stats` is a file descriptor the kernel just created for us and nobody
        // else owns.
        let file = unsafe { OwnedFd::from_raw_fd(stats) };
        Self::from_stats_file(file)
    }

    /// A probe over an already open KVM stats file.
    pub fn from_stats_file(file: OwnedFd) -> Result<Self, HaltError> {
        let fd = file.as_raw_fd();
        let mut header = [0u8; STATS_HEADER_LEN];
        pread_exact(fd, &mut header, 0)?;
        let bad = |what: &str| HaltError::Format(what.to_string());
        let name_size = u32_at(&header, 4).ok_or_else(|| bad("short header"))? as usize;
        let num_desc = u32_at(&header, 8).ok_or_else(|| bad("short header"))? as usize;
        let desc_offset = u32_at(&header, 16).ok_or_else(|| bad("short header"))?;
        // A sanity bound: KVM has a few dozen stats with names of at most 48 bytes.
        if num_desc > 4096 || name_size > 4096 {
            return Err(HaltError::Format(format!(
                "{num_desc} descriptors with {name_size}-byte names"
            )));
        }
        let mut descs = vec![0u8; num_desc * (STATS_DESC_LEN + name_size)];
        pread_exact(fd, &mut descs, u64::from(desc_offset))?;
        let offset = find_stat(&header, &descs, BLOCKING_STAT)?.ok_or(HaltError::NoBlockingStat)?;
        let probe = HaltProbe {
            file,
            offset,
            kicked: AtomicBool::new(false),
            raised: AtomicU64::new(0),
            raised_at_entry: AtomicU64::new(0),
        };
        probe.read()?;
        Ok(probe)
    }

    fn read(&self) -> Result<u64, HaltError> {
        let mut v = [0u8; 8];
        pread_exact(self.file.as_raw_fd(), &mut v, self.offset)?;
        Ok(u64::from_ne_bytes(v))
    }

    /// True while the vCPU sleeps in the kernel waiting for an event; false on any error.
    pub fn blocking(&self) -> bool {
        self.read().is_ok_and(|v| v != 0)
    }

    /// The slice timer is about to kick the vCPU out of the guest because it halted.
    pub(crate) fn note_halt_kick(&self) {
        self.kicked.store(true, Ordering::SeqCst);
    }

    /// The vCPU is about to enter the guest.
    pub(crate) fn note_entry(&self) {
        self.kicked.store(false, Ordering::SeqCst);
        self.raised_at_entry
            .store(self.raised.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// The VMM announces an interrupt; true if the vCPU may be out of the guest because
    /// of a halt kick (then it must be woken through the scheduler).
    fn note_raised(&self) -> bool {
        self.raised.fetch_add(1, Ordering::SeqCst);
        self.kicked.load(Ordering::SeqCst)
    }

    /// Whether the VMM announced an interrupt since the vCPU last entered the guest.
    fn raised_since_entry(&self) -> bool {
        self.raised.load(Ordering::SeqCst) != self.raised_at_entry.load(Ordering::SeqCst)
    }
}

/// How long until the LAPIC timer of `vcpu` fires, if it is armed and readable.
///
/// One-shot and periodic modes: the current count (which `KVM_GET_LAPIC` computes) times
/// the divider, in APIC bus cycles of 1 ns. TSC-deadline mode: the deadline MSR minus the
/// guest TSC, at the guest TSC frequency (`tsc_khz`). Anything unreadable gives `None`, and
/// the caller falls back to its re-poll period.
pub fn lapic_timer_remaining<V: Vcpu>(vcpu: &V, tsc_khz: Option<u32>) -> Option<Duration> {
    let lapic = vcpu.lapic().ok()?;
    let lvtt = u32_at(&lapic.regs, APIC_LVTT)?;
    if lvtt & (1 << 16) != 0 {
        return None; // masked
    }
    match (lvtt >> 17) & 3 {
        0 | 1 => {
            let count = u64::from(u32_at(&lapic.regs, APIC_TMCCT)?);
            if count == 0 {
                return None;
            }
            let tdcr = u32_at(&lapic.regs, APIC_TDCR)?;
            let code = (tdcr & 3) | ((tdcr & 8) >> 1);
            let divide: u64 = if code == 7 { 1 } else { 2 << code };
            Some(Duration::from_nanos(
                count
                    .saturating_mul(divide)
                    .saturating_mul(APIC_BUS_CYCLE_NS),
            ))
        }
        2 => {
            let khz = u64::from(tsc_khz.filter(|&k| k > 0)?);
            let msrs = vcpu.msrs(&[MSR_IA32_TSC_DEADLINE, MSR_IA32_TSC]).ok()?;
            let get = |i: u32| msrs.iter().find(|m| m.index == i).map(|m| m.data);
            let deadline = get(MSR_IA32_TSC_DEADLINE)?;
            if deadline == 0 {
                return None; // disarmed
            }
            let cycles = deadline.saturating_sub(get(MSR_IA32_TSC)?);
            // cycles / (khz * 1000) seconds, in ns: cycles * 1_000_000 / khz.
            let ns = u128::from(cycles) * 1_000_000 / u128::from(khz);
            Some(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
        }
        _ => None,
    }
}

/// The guest TSC frequency of a KVM vCPU in kHz (`KVM_GET_TSC_KHZ`), if available.
pub fn tsc_khz<V: Vcpu>(vcpu: &V) -> Option<u32> {
    let fd = vcpu.raw_fd()?;
    // SAFETY: KVM_GET_TSC_KHZ takes no argument and returns the frequency (or -1); it reads
    // or writes no user memory.
    let r = unsafe { libc::ioctl(fd, KVM_GET_TSC_KHZ as _) };
    u32::try_from(r).ok().filter(|&k| k > 0)
}

/// Counters of a vCPU's in-kernel halts.
#[derive(Debug, Default)]
pub struct HaltStats {
    /// Times the vCPU was found halted in the kernel and parked.
    pub parks: AtomicU64,
    /// Halt kicks after which the vCPU turned out runnable (an interrupt raced the kick).
    pub false_alarms: AtomicU64,
    /// Parks whose timed wake came from the LAPIC timer deadline rather than the re-poll
    /// period.
    pub timer_wakes: AtomicU64,
    /// Wakes asked for through [`KernelHalts::wake`].
    pub external_wakes: AtomicU64,
}

struct Inner {
    probe: Option<Arc<HaltProbe>>,
    repoll: Duration,
    tsc_khz: Option<u32>,
    waker: OnceLock<Waker>,
    stats: HaltStats,
}

/// In-kernel halt handling for one vCPU (see the [module docs](self)): its probe, its
/// re-poll period and its own [`Waker`]. Cheap to clone; the VMM keeps a clone to hand the
/// waker in after spawning the task and to call [`KernelHalts::wake`].
#[derive(Clone)]
pub struct KernelHalts {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KernelHalts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelHalts")
            .field("probe", &self.inner.probe.is_some())
            .field("repoll", &self.inner.repoll)
            .field("stats", &self.inner.stats)
            .finish()
    }
}

impl KernelHalts {
    /// Halt handling for `vcpu`, re-entering a parked vCPU at least every `repoll`. Fails if
    /// the kernel offers no `blocking` stat for it; see [`KernelHalts::without_probe`].
    pub fn new<V: Vcpu>(vcpu: &V, repoll: Duration) -> Result<Self, HaltError> {
        let probe = HaltProbe::open(vcpu)?;
        Ok(Self::build(Some(Arc::new(probe)), repoll, tsc_khz(vcpu)))
    }

    /// Halt handling that never detects a halt: the vCPU keeps its worker while halted,
    /// as with one thread per vCPU. For kernels without the `blocking` stat.
    pub fn without_probe() -> Self {
        Self::build(None, DEFAULT_REPOLL, None)
    }

    fn build(probe: Option<Arc<HaltProbe>>, repoll: Duration, tsc_khz: Option<u32>) -> Self {
        KernelHalts {
            inner: Arc::new(Inner {
                probe,
                repoll,
                tsc_khz,
                waker: OnceLock::new(),
                stats: HaltStats::default(),
            }),
        }
    }

    /// Hands in the task's waker (from [`Executor::spawn`](crate::Executor::spawn)). Until
    /// then the vCPU is never parked. Returns false if a waker was already set.
    pub fn set_waker(&self, waker: Waker) -> bool {
        self.inner.waker.set(waker).is_ok()
    }

    /// Makes the vCPU runnable if it is parked: call it after raising an interrupt it may
    /// be waiting for (after signalling the irqfd). Cheap when it runs: with a probe, only
    /// a vCPU the slice timer kicked out for a halt (parked, or on its way to parking) is
    /// woken through the scheduler; one in the guest or entering it gets the interrupt
    /// from KVM, and a park that an announcement may have raced is refused
    /// ([`park`](Self::park)). Without a probe nothing parks and the waker is called as is.
    pub fn wake(&self) {
        if let Some(p) = &self.inner.probe {
            if !p.note_raised() {
                return;
            }
        }
        if let Some(w) = self.inner.waker.get() {
            self.inner
                .stats
                .external_wakes
                .fetch_add(1, Ordering::Relaxed);
            // The only error is an unknown task, which an executor's own waker is not.
            let _ = w.wake();
        }
    }

    /// The probe the slice timer watches, if there is one.
    pub fn probe(&self) -> Option<Arc<HaltProbe>> {
        self.inner.probe.clone()
    }

    /// The re-poll period.
    pub fn repoll(&self) -> Duration {
        self.inner.repoll
    }

    /// The counters.
    pub fn stats(&self) -> &HaltStats {
        &self.inner.stats
    }

    /// After a halt kick: if `vcpu` still waits for an event, returns when its timed wake
    /// is due (the LAPIC timer deadline or the re-poll period, whichever is first) and the
    /// waker to call then. `None` if it is runnable (or has no waker yet): re-enter it.
    pub fn park<V: Vcpu>(&self, vcpu: &V) -> Option<(Instant, Waker)> {
        let waker = self.inner.waker.get()?;
        let waiting = matches!(
            vcpu.mp_state(),
            Ok(MpState::Halted | MpState::Uninitialized | MpState::InitReceived)
        );
        // An interrupt the VMM announced while the vCPU was in the guest may be in flight
        // (irqfd injects from a kernel work item): re-enter rather than park on it.
        let raced = self
            .inner
            .probe
            .as_ref()
            .is_some_and(|p| p.raised_since_entry());
        if !waiting || raced {
            self.inner
                .stats
                .false_alarms
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut wait = self.inner.repoll;
        if let Some(t) = lapic_timer_remaining(vcpu, self.inner.tsc_khz) {
            if t < wait {
                wait = t;
                self.inner.stats.timer_wakes.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.inner.stats.parks.fetch_add(1, Ordering::Relaxed);
        Some((Instant::now() + wait, waker.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(name: &str, name_size: usize, size: u16, offset: u32) -> Vec<u8> {
        let mut d = vec![0u8; STATS_DESC_LEN + name_size];
        d[6..8].copy_from_slice(&size.to_le_bytes());
        d[8..12].copy_from_slice(&offset.to_le_bytes());
        d[STATS_DESC_LEN..STATS_DESC_LEN + name.len()].copy_from_slice(name.as_bytes());
        d
    }

    fn header(name_size: u32, num_desc: u32, data_offset: u32) -> [u8; STATS_HEADER_LEN] {
        let mut h = [0u8; STATS_HEADER_LEN];
        h[4..8].copy_from_slice(&name_size.to_le_bytes());
        h[8..12].copy_from_slice(&num_desc.to_le_bytes());
        h[20..24].copy_from_slice(&data_offset.to_le_bytes());
        h
    }

    #[test]
    fn finds_the_blocking_stat_among_others() {
        let mut descs = desc("halt_wakeup", 48, 1, 0);
        descs.extend(desc("blocking", 48, 1, 16));
        let h = header(48, 2, 1000);
        assert_eq!(find_stat(&h, &descs, "blocking").unwrap(), Some(1016));
        assert_eq!(find_stat(&h, &descs, "halt_wakeup").unwrap(), Some(1000));
        assert_eq!(find_stat(&h, &descs, "nope").unwrap(), None);
        // A prefix is not a match.
        assert_eq!(find_stat(&h, &descs, "block").unwrap(), None);
    }

    #[test]
    fn inconsistent_tables_are_errors_not_panics() {
        let descs = desc("blocking", 48, 1, 0);
        // num_desc says 3, the table holds 1.
        assert!(matches!(
            find_stat(&header(48, 3, 0), &descs, "missing"),
            Err(HaltError::Format(_))
        ));
        // A histogram is not a boolean.
        let hist = desc("blocking", 48, 32, 0);
        assert!(find_stat(&header(48, 1, 0), &hist, "blocking").is_err());
        assert!(find_stat(&[0u8; 4], &descs, "blocking").is_err());
        let huge = header(u32::MAX, 2, 0);
        assert!(find_stat(&huge, &descs, "blocking").is_err());
    }

    /// A stats file laid out like KVM's (header, descriptors, data) with one 8-byte stat.
    fn stats_file(name: &str, value: u64) -> OwnedFd {
        let mut f = Vec::new();
        let mut h = header(16, 1, 24 + 32);
        h[16..20].copy_from_slice(&24u32.to_le_bytes());
        f.extend(h);
        f.extend(desc(name, 16, 1, 0));
        f.extend(value.to_ne_bytes());
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &f).unwrap();
        OwnedFd::from(file)
    }

    #[test]
    fn a_probe_reads_a_stats_file() {
        let probe = HaltProbe::from_stats_file(stats_file("blocking", 1)).unwrap();
        assert!(probe.blocking());
        // Without the stat: refused.
        assert!(matches!(
            HaltProbe::from_stats_file(stats_file("other", 0)),
            Err(HaltError::NoBlockingStat)
        ));
        // An empty file: a short read.
        let file = tempfile::tempfile().unwrap();
        let e = HaltProbe::from_stats_file(OwnedFd::from(file)).unwrap_err();
        assert!(e.to_string().contains("offset 0"), "{e}");
    }

    /// A probe over a stats file laid out like KVM's, whose `blocking` stat is 1.
    fn fake_probe() -> HaltProbe {
        HaltProbe::from_stats_file(stats_file("blocking", 1)).unwrap()
    }

    #[test]
    fn a_wake_goes_through_the_scheduler_only_after_a_halt_kick() {
        use crate::{CreditConfig, CreditScheduler, Executor, Outcome, Slice, Task, VmConfig};
        use std::sync::atomic::AtomicU32;

        /// Blocks once (a parked vCPU), exits when run again.
        struct Sleeper(Arc<AtomicU32>);
        impl Task for Sleeper {
            fn run(&mut self, _slice: &Slice) -> Outcome {
                if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                    Outcome::Blocked
                } else {
                    Outcome::Exited
                }
            }
        }
        let wait = |what: &str, cond: &dyn Fn() -> bool| {
            let end = Instant::now() + Duration::from_secs(10);
            while !cond() {
                assert!(Instant::now() < end, "timed out waiting for {what}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let ex = Executor::new(CreditScheduler::new(CreditConfig::with_cpus(1)).unwrap()).unwrap();
        let vm = ex.add_vm(VmConfig::default()).unwrap();
        let runs = Arc::new(AtomicU32::new(0));
        let (_, waker) = ex.spawn(vm, Sleeper(Arc::clone(&runs))).unwrap();
        let probe = Arc::new(fake_probe());
        let h = KernelHalts::build(Some(Arc::clone(&probe)), DEFAULT_REPOLL, None);
        assert!(h.set_waker(waker));
        wait("the task to block", &|| runs.load(Ordering::SeqCst) == 1);

        // In the guest (or entering it): KVM delivers the interrupt, nothing is woken, but
        // the announcement is remembered so that a park right after it is refused.
        probe.note_entry();
        assert!(!probe.raised_since_entry());
        h.wake();
        assert!(probe.raised_since_entry());
        assert_eq!(h.stats().external_wakes.load(Ordering::SeqCst), 0);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "not woken through the scheduler"
        );

        // Kicked out for a halt (parked, or on its way): woken through the scheduler.
        probe.note_halt_kick();
        h.wake();
        wait("the wake", &|| runs.load(Ordering::SeqCst) == 2);
        assert_eq!(h.stats().external_wakes.load(Ordering::SeqCst), 1);
        ex.wait_exited(1);
        assert_eq!(ex.shutdown().exited, 1);
    }

    #[test]
    fn without_a_probe_nothing_parks() {
        let h = KernelHalts::without_probe();
        assert!(h.probe().is_none());
        assert_eq!(h.repoll(), DEFAULT_REPOLL);
        h.wake(); // no waker: nothing to do
        assert_eq!(h.stats().external_wakes.load(Ordering::Relaxed), 0);
        assert!(format!("{h:?}").contains("probe: false"));
    }
}
