//! The exit dispatcher: turns [`VmExit`]s into device accesses, handler calls and
//! [`Action`]s for the run loop's caller.
//!
//! * Port I/O and MMIO go to a rust-vmm `vm-device` [`IoManager`]: devices implement
//!   `DevicePio`/`DeviceMmio` (or `MutDevicePio`/`MutDeviceMmio` behind a `Mutex`), so any
//!   rust-vmm device plugs in unchanged. We use `IoManager` rather than a bus of our own
//!   because its lookup (a `BTreeMap` range search, no allocation) costs tens of nanoseconds
//!   against exits that cost microseconds; the `dispatch` benchmark measures it.
//! * Hypercalls go to a table of [`HypercallHandler`]s keyed by number, MSR accesses to
//!   [`MsrHandler`]s keyed by index.
//! * Halts, shutdowns, system events, kicks, debug events and failures are returned to the
//!   caller as [`Action`]s: the dispatcher never decides the fate of the VM.
//!
//! Accesses nobody claims follow the [`UnclaimedPolicy`]: reads return all ones, writes are
//! dropped, unknown hypercalls return `-ENOSYS` (KVM's -1000), unknown MSRs raise #GP, and each
//! unclaimed address is logged once, up to a fixed number of addresses (a guest cannot flood
//! the log or grow memory). Nothing a guest does makes the dispatcher panic or allocate:
//! per-exit work uses only preallocated state.
//!
//! Every exit is counted per [`ExitKind`] with handling-latency aggregates (count, total,
//! min, max), as Firecracker keeps for its vCPU exits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::exit::{ExitKind, SystemEventKind, VmExit};
use crate::hypervisor::Vcpu;

/// What KVM returns in rax for an unknown hypercall (`-KVM_ENOSYS`).
pub const HYPERCALL_ENOSYS: u64 = (-1000i64) as u64;

/// Errors of the dispatcher.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// A device range overlaps one already registered or is empty.
    #[error("cannot register {bus} range {base:#x}+{len:#x}: {source:?}")]
    Register {
        /// `pio` or `mmio`.
        bus: &'static str,
        /// Range start.
        base: u64,
        /// Range length.
        len: u64,
        /// The bus error.
        source: vm_device::bus::Error,
    },
    /// Running the vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] crate::hypervisor::Error),
}

/// What the run loop's caller must do after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The exit was handled: run the vCPU again.
    Continue,
    /// The guest halted.
    Halt,
    /// The guest shut down (triple fault or power-off request).
    Shutdown,
    /// The guest asked for a reset.
    Reset,
    /// The guest reported a crash.
    Crash,
    /// The vCPU was kicked.
    Interrupted,
    /// A debug event at `pc`.
    Debug {
        /// Instruction pointer.
        pc: u64,
    },
    /// The hardware refused to enter the guest.
    FailEntry {
        /// Raw hardware reason.
        reason: u64,
    },
    /// The backend hit an internal error (e.g. an instruction it cannot emulate).
    InternalError {
        /// Raw sub-error.
        suberror: u32,
    },
    /// An exit the model does not know.
    Unknown {
        /// Raw reason.
        reason: u32,
    },
}

/// Handles one hypercall number.
pub trait HypercallHandler: Send {
    /// Handles the call and returns the value for the guest's rax.
    fn call(&mut self, nr: u64, args: &[u64; 6]) -> u64;
}

impl<F: FnMut(u64, &[u64; 6]) -> u64 + Send> HypercallHandler for F {
    fn call(&mut self, nr: u64, args: &[u64; 6]) -> u64 {
        self(nr, args)
    }
}

/// Guest-memory access for the port hypercall transport (see
/// [`Dispatcher::set_hypercall_port`]). Implemented for every vm-memory address space.
pub trait HypercallMemory: Send {
    /// Reads the 8-word block at `addr`: `[nr, arg0..arg5, ret]`.
    fn read_block(&self, addr: u64) -> Option<[u64; 8]>;
    /// Writes the result word of the block at `addr`.
    fn write_ret(&self, addr: u64, ret: u64) -> Option<()>;
}

impl<M: GuestMemory + Send> HypercallMemory for M {
    fn read_block(&self, addr: u64) -> Option<[u64; 8]> {
        self.read_obj(GuestAddress(addr)).ok()
    }
    fn write_ret(&self, addr: u64, ret: u64) -> Option<()> {
        let at = GuestAddress(addr).checked_add(56)?;
        self.write_obj(ret, at).ok()
    }
}

/// Handles accesses to one MSR.
pub trait MsrHandler: Send {
    /// Returns the value, or `None` to raise #GP.
    fn read(&mut self, index: u32) -> Option<u64>;
    /// Applies a write; returns false to raise #GP.
    fn write(&mut self, index: u32, value: u64) -> bool;
}

/// An MSR that holds whatever the guest writes (a scratch register).
#[derive(Debug, Default, Clone, Copy)]
pub struct ScratchMsr {
    /// Current value.
    pub value: u64,
}

impl MsrHandler for ScratchMsr {
    fn read(&mut self, _index: u32) -> Option<u64> {
        Some(self.value)
    }
    fn write(&mut self, _index: u32, value: u64) -> bool {
        self.value = value;
        true
    }
}

/// Aggregates for one exit kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindStats {
    /// Exits seen.
    pub count: u64,
    /// Total handling time, nanoseconds.
    pub total_ns: u64,
    /// Shortest handling time, nanoseconds (`u64::MAX` before the first exit).
    pub min_ns: u64,
    /// Longest handling time, nanoseconds.
    pub max_ns: u64,
}

impl Default for KindStats {
    fn default() -> Self {
        KindStats {
            count: 0,
            total_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }
}

impl KindStats {
    fn record(&mut self, ns: u64) {
        self.count = self.count.saturating_add(1);
        self.total_ns = self.total_ns.saturating_add(ns);
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Mean handling time in nanoseconds (0 before the first exit).
    pub fn mean_ns(&self) -> u64 {
        self.total_ns.checked_div(self.count).unwrap_or(0)
    }
}

/// Per-exit-kind counters and latency aggregates, plus unclaimed-access counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitMetrics {
    /// Indexed by `ExitKind as usize`.
    pub kinds: [KindStats; ExitKind::COUNT],
    /// Port reads nobody claimed.
    pub unclaimed_pio_reads: u64,
    /// Port writes nobody claimed.
    pub unclaimed_pio_writes: u64,
    /// MMIO reads nobody claimed.
    pub unclaimed_mmio_reads: u64,
    /// MMIO writes nobody claimed.
    pub unclaimed_mmio_writes: u64,
    /// Hypercalls with no handler.
    pub unknown_hypercalls: u64,
    /// MSR accesses with no handler.
    pub unknown_msrs: u64,
    /// Hypercalls made through the port transport (also counted as `IoOut` exits).
    pub port_hypercalls: u64,
    /// Port-transport doorbells whose block was not in guest memory.
    pub bad_hypercall_blocks: u64,
}

impl ExitMetrics {
    /// The aggregates of one kind.
    pub fn kind(&self, kind: ExitKind) -> &KindStats {
        // `ExitKind as usize` is always < COUNT (checked by a unit test in `exit`).
        &self.kinds[kind as usize]
    }

    /// Total exits of every kind.
    pub fn total(&self) -> u64 {
        self.kinds.iter().map(|k| k.count).sum()
    }
}

/// How unclaimed accesses are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnclaimedPolicy {
    /// How many distinct addresses are logged (each once); later ones are only counted.
    pub log_limit: usize,
}

impl Default for UnclaimedPolicy {
    fn default() -> Self {
        UnclaimedPolicy { log_limit: 64 }
    }
}

/// Remembers which addresses were already logged, in a fixed preallocated table.
#[derive(Debug)]
struct LogOnce {
    seen: Vec<(u8, u64)>,
    limit: usize,
    suppressed: u64,
}

impl LogOnce {
    fn new(limit: usize) -> Self {
        LogOnce {
            seen: Vec::with_capacity(limit),
            limit,
            suppressed: 0,
        }
    }

    /// True if `(space, addr)` should be logged now.
    fn first(&mut self, space: u8, addr: u64) -> bool {
        if self.seen.contains(&(space, addr)) {
            return false;
        }
        if self.seen.len() >= self.limit {
            self.suppressed = self.suppressed.saturating_add(1);
            return false;
        }
        // Within the preallocated capacity: no allocation.
        self.seen.push((space, addr));
        true
    }
}

/// Routes exits to devices and handlers (see the module docs).
pub struct Dispatcher {
    io: IoManager,
    hypercalls: BTreeMap<u64, Box<dyn HypercallHandler>>,
    msrs: BTreeMap<u32, Box<dyn MsrHandler>>,
    metrics: ExitMetrics,
    logged: LogOnce,
    timing: bool,
    hypercall_port: Option<(u16, Box<dyn HypercallMemory>)>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("hypercalls", &self.hypercalls.keys().collect::<Vec<_>>())
            .field("msrs", &self.msrs.keys().collect::<Vec<_>>())
            .field("metrics", &self.metrics)
            .finish()
    }
}

impl Default for Dispatcher {
    fn default() -> Self {
        Self::new(UnclaimedPolicy::default())
    }
}

const SPACE_PIO: u8 = 0;
const SPACE_MMIO: u8 = 1;
const SPACE_HYPERCALL: u8 = 2;
const SPACE_MSR: u8 = 3;

impl Dispatcher {
    /// An empty dispatcher with `policy` for unclaimed accesses.
    pub fn new(policy: UnclaimedPolicy) -> Self {
        Dispatcher {
            io: IoManager::new(),
            hypercalls: BTreeMap::new(),
            msrs: BTreeMap::new(),
            metrics: ExitMetrics::default(),
            logged: LogOnce::new(policy.log_limit),
            timing: true,
            hypercall_port: None,
        }
    }

    /// Turns latency measurement on or off (counters stay on).
    pub fn set_timing(&mut self, on: bool) {
        self.timing = on;
    }

    /// The device manager, for direct use.
    pub fn io(&self) -> &IoManager {
        &self.io
    }

    /// Mutable access to the device manager.
    pub fn io_mut(&mut self) -> &mut IoManager {
        &mut self.io
    }

    /// Registers a port-I/O device for ports `base..base + len`.
    pub fn register_pio(
        &mut self,
        base: u16,
        len: u16,
        dev: Arc<dyn DevicePio + Send + Sync>,
    ) -> Result<(), DispatchError> {
        let err = |source| DispatchError::Register {
            bus: "pio",
            base: u64::from(base),
            len: u64::from(len),
            source,
        };
        let range = PioRange::new(PioAddress(base), len).map_err(err)?;
        self.io.register_pio(range, dev).map_err(err)
    }

    /// Registers an MMIO device for `base..base + len`.
    pub fn register_mmio(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<dyn DeviceMmio + Send + Sync>,
    ) -> Result<(), DispatchError> {
        let err = |source| DispatchError::Register {
            bus: "mmio",
            base,
            len,
            source,
        };
        let range = MmioRange::new(MmioAddress(base), len).map_err(err)?;
        self.io.register_mmio(range, dev).map_err(err)
    }

    /// Sets the handler for hypercall `nr` (replacing any previous one).
    pub fn register_hypercall(&mut self, nr: u64, handler: Box<dyn HypercallHandler>) {
        self.hypercalls.insert(nr, handler);
    }

    /// Enables the port hypercall transport: a 32- or 64-bit write to `port` carries the
    /// guest-physical address of a block `[nr, arg0..arg5, ret]` (eight little-endian u64);
    /// the dispatcher calls the handler registered for `nr` (or answers
    /// [`HYPERCALL_ENOSYS`]) and stores the result in `ret`. Backends that do not forward
    /// `vmcall` (such as this project's software KVM) get hypercalls this way.
    pub fn set_hypercall_port(&mut self, port: u16, mem: impl HypercallMemory + 'static) {
        self.hypercall_port = Some((port, Box::new(mem)));
    }

    fn call_hypercall(&mut self, nr: u64, args: &[u64; 6]) -> u64 {
        match self.hypercalls.get_mut(&nr) {
            Some(handler) => handler.call(nr, args),
            None => {
                self.metrics.unknown_hypercalls += 1;
                self.unclaimed(SPACE_HYPERCALL, nr, "hypercall", 0);
                HYPERCALL_ENOSYS
            }
        }
    }

    fn port_hypercall(&mut self, data: &[u8]) {
        let mut raw = [0u8; 8];
        for (d, s) in raw.iter_mut().zip(data) {
            *d = *s;
        }
        let addr = u64::from_le_bytes(raw);
        let block = self
            .hypercall_port
            .as_ref()
            .and_then(|(_, m)| m.read_block(addr));
        let Some(block) = block else {
            self.metrics.bad_hypercall_blocks += 1;
            self.unclaimed(SPACE_HYPERCALL, addr, "hypercall block", 64);
            return;
        };
        self.metrics.port_hypercalls += 1;
        let [nr, a0, a1, a2, a3, a4, a5, _] = block;
        let ret = self.call_hypercall(nr, &[a0, a1, a2, a3, a4, a5]);
        if let Some((_, m)) = self.hypercall_port.as_ref() {
            if m.write_ret(addr, ret).is_none() {
                self.metrics.bad_hypercall_blocks += 1;
            }
        }
    }

    /// Sets the handler for MSR `index` (replacing any previous one).
    pub fn register_msr(&mut self, index: u32, handler: Box<dyn MsrHandler>) {
        self.msrs.insert(index, handler);
    }

    /// The counters so far.
    pub fn metrics(&self) -> &ExitMetrics {
        &self.metrics
    }

    /// Unclaimed accesses that were not logged because the log limit was reached.
    pub fn suppressed_logs(&self) -> u64 {
        self.logged.suppressed
    }

    fn unclaimed(&mut self, space: u8, addr: u64, what: &str, len: usize) {
        if self.logged.first(space, addr) {
            log::warn!("unclaimed {what} of {len} bytes at {addr:#x} (further ones not logged)");
        }
    }

    /// Handles one exit.
    pub fn dispatch(&mut self, exit: VmExit<'_>) -> Action {
        let start = if self.timing {
            Some(Instant::now())
        } else {
            None
        };
        let kind = exit.kind();
        let action = self.handle(exit);
        let ns = start
            .map(|s| s.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64)
            .unwrap_or(0);
        if let Some(stats) = self.metrics.kinds.get_mut(kind as usize) {
            stats.record(ns);
        }
        action
    }

    fn handle(&mut self, exit: VmExit<'_>) -> Action {
        match exit {
            VmExit::IoIn { port, data } => {
                if self.io.pio_read(PioAddress(port), data).is_err() {
                    data.fill(0xff);
                    self.metrics.unclaimed_pio_reads += 1;
                    self.unclaimed(SPACE_PIO, u64::from(port), "port read", data.len());
                }
                Action::Continue
            }
            VmExit::IoOut { port, data } => {
                if matches!(self.hypercall_port, Some((p, _)) if p == port) {
                    self.port_hypercall(data);
                } else if self.io.pio_write(PioAddress(port), data).is_err() {
                    self.metrics.unclaimed_pio_writes += 1;
                    self.unclaimed(SPACE_PIO, u64::from(port), "port write", data.len());
                }
                Action::Continue
            }
            VmExit::MmioRead { addr, data } => {
                if self.io.mmio_read(MmioAddress(addr), data).is_err() {
                    data.fill(0xff);
                    self.metrics.unclaimed_mmio_reads += 1;
                    self.unclaimed(SPACE_MMIO, addr, "MMIO read", data.len());
                }
                Action::Continue
            }
            VmExit::MmioWrite { addr, data } => {
                if self.io.mmio_write(MmioAddress(addr), data).is_err() {
                    self.metrics.unclaimed_mmio_writes += 1;
                    self.unclaimed(SPACE_MMIO, addr, "MMIO write", data.len());
                }
                Action::Continue
            }
            VmExit::Hypercall(h) => {
                *h.ret = self.call_hypercall(h.nr, &h.args);
                Action::Continue
            }
            VmExit::MsrRead(mut m) => {
                match self.msrs.get_mut(&m.index).and_then(|h| h.read(m.index)) {
                    Some(v) => m.answer(v),
                    None => {
                        m.reject();
                        self.metrics.unknown_msrs += 1;
                        self.unclaimed(SPACE_MSR, u64::from(m.index), "MSR read", 8);
                    }
                }
                Action::Continue
            }
            VmExit::MsrWrite(mut m) => {
                let ok = match self.msrs.get_mut(&m.index) {
                    Some(h) => h.write(m.index, m.value),
                    None => false,
                };
                if ok {
                    m.accept();
                } else {
                    m.reject();
                    self.metrics.unknown_msrs += 1;
                    self.unclaimed(SPACE_MSR, u64::from(m.index), "MSR write", 8);
                }
                Action::Continue
            }
            VmExit::Halt => Action::Halt,
            VmExit::Shutdown => Action::Shutdown,
            VmExit::SystemEvent { kind } => match kind {
                SystemEventKind::Reset => Action::Reset,
                SystemEventKind::Crash => Action::Crash,
                SystemEventKind::Shutdown | SystemEventKind::Other(_) => Action::Shutdown,
            },
            VmExit::Debug { pc, .. } => Action::Debug { pc },
            VmExit::Interrupted => Action::Interrupted,
            VmExit::FailEntry { reason, .. } => Action::FailEntry { reason },
            VmExit::InternalError { suberror, .. } => Action::InternalError { suberror },
            VmExit::Unknown { reason } => Action::Unknown { reason },
        }
    }

    /// Runs `vcpu` and dispatches its exits until one needs the caller (anything but
    /// [`Action::Continue`]).
    pub fn run<V: Vcpu>(&mut self, vcpu: &mut V) -> Result<Action, DispatchError> {
        loop {
            let exit = vcpu.run()?;
            let action = self.dispatch(exit);
            if action != Action::Continue {
                return Ok(action);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{Hypercall, MsrRead, MsrWrite};
    use std::sync::Mutex;
    use vm_device::bus::{MmioAddressOffset, PioAddressOffset};
    use vm_device::{MutDeviceMmio, MutDevicePio};

    #[derive(Default)]
    struct Reg {
        last: Vec<u8>,
    }
    impl MutDevicePio for Reg {
        fn pio_read(&mut self, _b: PioAddress, off: PioAddressOffset, data: &mut [u8]) {
            data.fill(off as u8 + 1);
        }
        fn pio_write(&mut self, _b: PioAddress, _off: PioAddressOffset, data: &[u8]) {
            self.last = data.to_vec();
        }
    }
    impl MutDeviceMmio for Reg {
        fn mmio_read(&mut self, _b: MmioAddress, off: MmioAddressOffset, data: &mut [u8]) {
            data.fill(off as u8 + 0x10);
        }
        fn mmio_write(&mut self, _b: MmioAddress, _off: MmioAddressOffset, data: &[u8]) {
            self.last = data.to_vec();
        }
    }

    #[test]
    fn routes_claimed_accesses_and_applies_the_unclaimed_policy() {
        let dev = Arc::new(Mutex::new(Reg::default()));
        let mut d = Dispatcher::new(UnclaimedPolicy { log_limit: 2 });
        d.register_pio(0x100, 4, dev.clone()).unwrap();
        d.register_mmio(0x1000, 0x100, dev.clone()).unwrap();
        assert!(matches!(
            d.register_pio(0x102, 4, dev.clone()),
            Err(DispatchError::Register { .. })
        ));
        assert!(d.register_mmio(0x5000, 0, dev.clone()).is_err());

        let mut buf = [0u8; 2];
        assert_eq!(
            d.dispatch(VmExit::IoIn {
                port: 0x102,
                data: &mut buf
            }),
            Action::Continue
        );
        assert_eq!(buf, [3, 3]);
        assert_eq!(
            d.dispatch(VmExit::IoOut {
                port: 0x100,
                data: &[9]
            }),
            Action::Continue
        );
        assert_eq!(dev.lock().unwrap().last, vec![9]);
        let mut buf = [0u8; 4];
        d.dispatch(VmExit::MmioRead {
            addr: 0x1008,
            data: &mut buf,
        });
        assert_eq!(buf, [0x18; 4]);
        d.dispatch(VmExit::MmioWrite {
            addr: 0x1000,
            data: &[1, 2],
        });
        assert_eq!(dev.lock().unwrap().last, vec![1, 2]);

        // Unclaimed: reads are all ones, writes dropped, nothing panics.
        let mut buf = [0u8; 4];
        d.dispatch(VmExit::IoIn {
            port: 0x200,
            data: &mut buf,
        });
        assert_eq!(buf, [0xff; 4]);
        let mut buf = [0u8; 8];
        d.dispatch(VmExit::MmioRead {
            addr: 0xdead_0000,
            data: &mut buf,
        });
        assert_eq!(buf, [0xff; 8]);
        d.dispatch(VmExit::MmioWrite {
            addr: 0xdead_0000,
            data: &[1],
        });
        d.dispatch(VmExit::IoOut {
            port: 0x200,
            data: &[1],
        });
        // An access straddling the end of a device is unclaimed too.
        let mut buf = [0u8; 4];
        d.dispatch(VmExit::IoIn {
            port: 0x103,
            data: &mut buf,
        });
        assert_eq!(buf, [0xff; 4]);
        for port in 0..100u16 {
            d.dispatch(VmExit::IoOut {
                port: 0x8000 + port,
                data: &[0],
            });
        }
        let m = d.metrics();
        assert_eq!((m.unclaimed_pio_reads, m.unclaimed_pio_writes), (2, 101));
        assert_eq!((m.unclaimed_mmio_reads, m.unclaimed_mmio_writes), (1, 1));
        assert_eq!(m.kind(ExitKind::IoOut).count, 102);
        assert!(d.suppressed_logs() >= 100);
        assert_eq!(d.logged.seen.capacity(), 2);
    }

    #[test]
    fn hypercalls_and_msrs_go_to_their_handlers() {
        let mut d = Dispatcher::default();
        d.register_hypercall(12, Box::new(|nr: u64, args: &[u64; 6]| nr + args[0]));
        d.register_msr(0x4b56_4d99, Box::new(ScratchMsr { value: 5 }));
        let mut ret = 0;
        let call = Hypercall {
            nr: 12,
            args: [30, 0, 0, 0, 0, 0],
            ret: &mut ret,
        };
        assert_eq!(d.dispatch(VmExit::Hypercall(call)), Action::Continue);
        assert_eq!(ret, 42);
        let call = Hypercall {
            nr: 99,
            args: [0; 6],
            ret: &mut ret,
        };
        d.dispatch(VmExit::Hypercall(call));
        assert_eq!(ret, HYPERCALL_ENOSYS);

        let (mut data, mut fault) = (0, 0);
        d.dispatch(VmExit::MsrRead(MsrRead {
            index: 0x4b56_4d99,
            data: &mut data,
            fault: &mut fault,
        }));
        assert_eq!((data, fault), (5, 0));
        d.dispatch(VmExit::MsrWrite(MsrWrite {
            index: 0x4b56_4d99,
            value: 6,
            fault: &mut fault,
        }));
        d.dispatch(VmExit::MsrRead(MsrRead {
            index: 0x4b56_4d99,
            data: &mut data,
            fault: &mut fault,
        }));
        assert_eq!((data, fault), (6, 0));
        d.dispatch(VmExit::MsrRead(MsrRead {
            index: 1,
            data: &mut data,
            fault: &mut fault,
        }));
        assert_eq!(fault, 1);
        let mut fault = 0;
        d.dispatch(VmExit::MsrWrite(MsrWrite {
            index: 1,
            value: 0,
            fault: &mut fault,
        }));
        assert_eq!(fault, 1);
        assert_eq!(
            (d.metrics().unknown_hypercalls, d.metrics().unknown_msrs),
            (1, 2)
        );
    }

    #[test]
    fn port_hypercalls_read_the_block_from_guest_memory() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut d = Dispatcher::default();
        d.set_hypercall_port(0x500, mem.clone());
        d.register_hypercall(1, Box::new(|_nr: u64, a: &[u64; 6]| a[0] + a[5]));
        let block: [u64; 8] = [1, 40, 0, 0, 0, 0, 2, 0];
        mem.write_obj(block, GuestAddress(0x1000)).unwrap();
        d.dispatch(VmExit::IoOut {
            port: 0x500,
            data: &0x1000u32.to_le_bytes(),
        });
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1038)).unwrap(), 42);
        mem.write_obj([7u64, 0, 0, 0, 0, 0, 0, 0], GuestAddress(0x2000))
            .unwrap();
        d.dispatch(VmExit::IoOut {
            port: 0x500,
            data: &0x2000u64.to_le_bytes(),
        });
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x2038)).unwrap(),
            HYPERCALL_ENOSYS
        );
        // A block outside guest memory (or straddling its end) is counted, not followed.
        d.dispatch(VmExit::IoOut {
            port: 0x500,
            data: &0xfff0u32.to_le_bytes(),
        });
        d.dispatch(VmExit::IoOut {
            port: 0x500,
            data: &u64::MAX.to_le_bytes(),
        });
        let m = d.metrics();
        assert_eq!(
            (
                m.port_hypercalls,
                m.bad_hypercall_blocks,
                m.unknown_hypercalls
            ),
            (2, 2, 1)
        );
        assert_eq!(m.unclaimed_pio_writes, 0);
    }

    #[test]
    fn terminal_exits_become_actions_with_latency_aggregates() {
        let mut d = Dispatcher::default();
        assert_eq!(d.dispatch(VmExit::Halt), Action::Halt);
        assert_eq!(d.dispatch(VmExit::Shutdown), Action::Shutdown);
        assert_eq!(
            d.dispatch(VmExit::SystemEvent {
                kind: SystemEventKind::Reset
            }),
            Action::Reset
        );
        assert_eq!(
            d.dispatch(VmExit::SystemEvent {
                kind: SystemEventKind::Crash
            }),
            Action::Crash
        );
        assert_eq!(
            d.dispatch(VmExit::SystemEvent {
                kind: SystemEventKind::Other(9)
            }),
            Action::Shutdown
        );
        assert_eq!(
            d.dispatch(VmExit::Debug {
                pc: 7,
                exception: 1
            }),
            Action::Debug { pc: 7 }
        );
        assert_eq!(d.dispatch(VmExit::Interrupted), Action::Interrupted);
        assert_eq!(
            d.dispatch(VmExit::FailEntry { reason: 3, cpu: 0 }),
            Action::FailEntry { reason: 3 }
        );
        assert_eq!(
            d.dispatch(VmExit::InternalError {
                suberror: 1,
                data: [0; 4],
                ndata: 0
            }),
            Action::InternalError { suberror: 1 }
        );
        assert_eq!(
            d.dispatch(VmExit::Unknown { reason: 77 }),
            Action::Unknown { reason: 77 }
        );
        let m = d.metrics();
        assert_eq!(m.total(), 10);
        let halt = m.kind(ExitKind::Halt);
        assert_eq!(halt.count, 1);
        assert!(halt.min_ns <= halt.max_ns && halt.mean_ns() <= halt.max_ns);
        assert_eq!(KindStats::default().mean_ns(), 0);
        d.set_timing(false);
        d.dispatch(VmExit::Halt);
        assert_eq!(d.metrics().kind(ExitKind::Halt).count, 2);
        assert!(format!("{d:?}").contains("Dispatcher"));
        assert!(d.io().pio_device(PioAddress(0)).is_none());
        assert!(d.io_mut().mmio_device(MmioAddress(0)).is_none());
    }
}
