//! vmkit-virtio's devices on virtio-mmio: creation from the command line, KVM wiring and the
//! event loop that runs them.
//!
//! # The model
//!
//! Every device is an [`MmioTransport`] around a vmkit-virtio device (blk, net, rng, console)
//! and gets a *slot*: a 4 KiB-aligned MMIO window from [`MMIO_BASE`] (in the 32-bit MMIO hole)
//! and its own IOAPIC GSI ([`GSIS`]). The ACPI DSDT describes each slot (see
//! [`crate::acpi`]), so the guest's `virtio_mmio` driver finds the devices at boot.
//!
//! Three paths connect a device to the guest, and only the first one exits to user space on
//! the vCPU thread:
//!
//! - **registers**: guest loads and stores in the window exit as MMIO and reach the transport
//!   through the dispatcher's MMIO bus (the transport sits behind a `Mutex`);
//! - **notifications**: each queue's eventfd is a KVM *ioeventfd* on `QueueNotify` with the
//!   queue index as 32-bit datamatch, so a kick is a KVM-internal eventfd signal, no exit to
//!   the VMM;
//! - **interrupts**: the transport's line is an eventfd registered as a KVM *irqfd* on the
//!   device's GSI (edge: each write is one interrupt).
//!
//! Device work runs on one event-loop thread (event-manager 0.4): the transports are its
//! subscribers, woken by the queue eventfds and by their backends' fds (TAP, console input).
//! The vCPU thread and the event loop share each transport through its mutex.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use vmkit_memory::GuestRam;
use vmkit_vcpu::dispatch::{DispatchError, Dispatcher};
use vmkit_vcpu::kvm::KvmVm;
use vmkit_vcpu::{DataMatch, IoEventAddress, Vm};
use vmkit_virtio::block::{Block, BlockConfig, RawDisk};
use vmkit_virtio::console::{Console, ConsoleBackend};
use vmkit_virtio::mmio::{regs, MMIO_WINDOW_SIZE};
use vmkit_virtio::net::{Net, NetConfig, Tap};
use vmkit_virtio::rng::Rng;
use vmkit_virtio::{MmioTransport, VirtioDevice};

use crate::acpi::VirtioMmioInfo;
use crate::args::{Args, ConsoleArg};

/// Base of the first device's MMIO window (inside the 32-bit MMIO hole, clear of the IOAPIC,
/// LAPIC and BIOS ranges at its top).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Distance between two devices' windows (one page each, so windows never share a page).
pub const MMIO_STRIDE: u64 = 0x1000;
/// The GSIs devices get, in slot order: IOAPIC pins 5-23 except 8, which Linux's CMOS RTC
/// driver claims exclusively (COM1 has 4; 0-2 are the PIT's and the cascade's).
pub const GSIS: [u32; 18] = [
    5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
];
/// How many virtio devices a machine can have (one GSI each).
pub const MAX_DEVICES: usize = GSIS.len();
/// Default MAC of the first `--net` device; the last byte grows with the device index.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The guest memory handle devices use.
pub type Memory = Arc<GuestRam>;
/// A device behind its transport, shared by the MMIO bus and the event loop.
pub type SharedTransport = Arc<Mutex<MmioTransport<Memory>>>;

/// Errors creating or wiring devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// A device could not be created from its option.
    #[error("`{arg}`: {why}")]
    Device {
        /// The option, e.g. `--disk path=/dev/vda`.
        arg: String,
        /// What went wrong.
        why: String,
    },
    /// More devices than slots.
    #[error("too many virtio devices ({0}; at most {MAX_DEVICES})")]
    TooMany(usize),
    /// A KVM call failed.
    #[error("cannot wire virtio device at {base:#x} into KVM ({what}): {why}")]
    Kvm {
        /// Window base.
        base: u64,
        /// Which registration.
        what: &'static str,
        /// The error.
        why: String,
    },
    /// The MMIO bus refused a window.
    #[error("cannot put virtio device on the MMIO bus: {0}")]
    Bus(#[from] DispatchError),
    /// The event loop could not start.
    #[error("virtio event loop: {0}")]
    EventLoop(String),
}

/// Where slot `index` lives: `(window base, GSI)`, or `None` past [`MAX_DEVICES`].
pub fn slot(index: usize) -> Option<(u64, u32)> {
    let gsi = *GSIS.get(index)?;
    Some((MMIO_BASE + MMIO_STRIDE * index as u64, gsi))
}

/// One device, placed.
pub struct VirtioSlot {
    /// What the device is, for messages (`virtio-blk /dev/vda`).
    pub name: String,
    /// MMIO window base.
    pub base: u64,
    /// GSI.
    pub gsi: u32,
    /// The transport.
    pub transport: SharedTransport,
}

impl std::fmt::Debug for VirtioSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioSlot")
            .field("name", &self.name)
            .field("base", &format_args!("{:#x}", self.base))
            .field("gsi", &self.gsi)
            .finish()
    }
}

/// A device to create, from the command line.
type Spec = (String, Box<dyn VirtioDevice<Memory>>);

fn device_error(arg: String, why: impl std::fmt::Display) -> VirtioError {
    VirtioError::Device {
        arg,
        why: why.to_string(),
    }
}

/// Creates the devices `args` asks for, in slot order: disks, nets, rng, console.
pub fn devices_from_args(args: &Args) -> Result<Vec<Spec>, VirtioError> {
    let mut out: Vec<Spec> = Vec::new();
    for d in &args.disks {
        let arg = format!("--disk path={}", d.path.display());
        let disk = RawDisk::open(&d.path, d.readonly).map_err(|e| device_error(arg.clone(), e))?;
        out.push((
            format!("virtio-blk {}", d.path.display()),
            Box::new(Block::new(disk, BlockConfig::default())),
        ));
    }
    for (i, n) in args.nets.iter().enumerate() {
        let arg = format!("--net tap={}", n.tap);
        let tap = Tap::open(&n.tap).map_err(|e| device_error(arg, e))?;
        let mut mac = DEFAULT_MAC;
        mac[5] = mac[5].wrapping_add(i as u8);
        let cfg = NetConfig {
            mac: n.mac.unwrap_or(mac),
            ..NetConfig::default()
        };
        out.push((
            format!("virtio-net tap {}", n.tap),
            Box::new(Net::new(Box::new(tap), cfg)),
        ));
    }
    if args.rng {
        out.push(("virtio-rng".into(), Box::new(Rng::new())));
    }
    if let Some(c) = &args.console {
        let backend = match c {
            // stdin is hvc0's input when an event loop can watch it, through a description
            // of its own (see `crate::input`).
            ConsoleArg::Tty if crate::input::pollable(0) => ConsoleBackend::new(
                Some(Box::new(crate::input::open_input().map_err(|e| {
                    device_error("--console tty (reopening stdin)".into(), e)
                })?)),
                Box::new(std::io::stdout()),
            ),
            ConsoleArg::Tty => ConsoleBackend::new(None, Box::new(std::io::stdout())),
            ConsoleArg::File(p) => ConsoleBackend::file(p, None)
                .map_err(|e| device_error(format!("--console file={}", p.display()), e))?,
        };
        out.push(("virtio-console".into(), Box::new(Console::new(backend))));
    }
    Ok(out)
}

/// Connects the `--vhost-user` devices of `args` (in order) to their backends, sharing `mem`
/// (which must be memfd-backed, see [`crate::vhost_user`]).
pub fn vhost_user_devices(
    args: &Args,
    mem: &Memory,
) -> Result<Vec<crate::vhost_user::VhostUserDevice>, VirtioError> {
    args.vhost_user
        .iter()
        .map(|a| {
            crate::vhost_user::VhostUserDevice::connect(a, mem).map_err(|e| {
                let arg = format!(
                    "--vhost-user type={},socket={}",
                    a.kind.name(),
                    a.socket.display()
                );
                device_error(arg, e)
            })
        })
        .collect()
}

/// Stops the event loop: its eventfd wakes the loop, which then sees the flag.
struct StopSignal {
    evt: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopSignal {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("virtio event loop: cannot watch the stop eventfd: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The machine's virtio devices and their event loop.
pub struct VirtioDevices {
    slots: Vec<VirtioSlot>,
    stop_evt: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VirtioDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioDevices")
            .field("slots", &self.slots)
            .finish()
    }
}

impl VirtioDevices {
    /// Wraps each device in a transport, gives it a slot and wires its interrupt (irqfd) and
    /// queue notifications (ioeventfds) into `vm`. The event loop starts with
    /// [`VirtioDevices::start`].
    pub fn new(specs: Vec<Spec>, mem: Memory, vm: &KvmVm) -> Result<Self, VirtioError> {
        Self::with_vhost_user(specs, Vec::new(), mem, vm, Arc::default())
    }

    /// [`VirtioDevices::new`] plus vhost-user devices in the slots after `specs`. Their
    /// queue notifications go to the backend directly: each queue's ioeventfd is the device's
    /// kick eventfd, not the transport's. Every transport's interrupt also wakes the vCPUs
    /// parked on the scheduler through `irq_wake`.
    pub fn with_vhost_user(
        specs: Vec<Spec>,
        vhost: Vec<crate::vhost_user::VhostUserDevice>,
        mem: Memory,
        vm: &KvmVm,
        irq_wake: Arc<crate::sched::IrqWake>,
    ) -> Result<Self, VirtioError> {
        let total = specs.len() + vhost.len();
        if total > MAX_DEVICES {
            return Err(VirtioError::TooMany(total));
        }
        // Each device with, for vhost-user ones, the eventfds KVM signals on QueueNotify.
        type Placed = (String, Box<dyn VirtioDevice<Memory>>, Option<Vec<EventFd>>);
        let mut all: Vec<Placed> = specs.into_iter().map(|(n, d)| (n, d, None)).collect();
        for v in vhost {
            let name = format!("vhost-user-{}", v.kind().name());
            let kicks = v.kick_events().map_err(|e| device_error(name.clone(), e))?;
            all.push((name, Box::new(v), Some(kicks)));
        }
        let mut slots = Vec::new();
        for (index, (name, device, kicks)) in all.into_iter().enumerate() {
            let (base, gsi) = slot(index).ok_or(VirtioError::TooMany(index + 1))?;
            let kvm = |what, e: &dyn std::fmt::Display| VirtioError::Kvm {
                base,
                what,
                why: e.to_string(),
            };
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| kvm("irq eventfd", &e))?;
            vm.register_irqfd(&irq, gsi)
                .map_err(|e| kvm("KVM_IRQFD", &e))?;
            let irq = crate::sched::WakingIrqFd::new(irq, Arc::clone(&irq_wake));
            let transport = MmioTransport::new(device, mem.clone(), Box::new(irq))
                .map_err(|e| device_error(name.clone(), e))?;
            let notify = IoEventAddress::Mmio(base + regs::QUEUE_NOTIFY);
            let evts = kicks.as_deref().unwrap_or(transport.queue_events());
            for (q, evt) in evts.iter().enumerate() {
                // The guest writes QueueNotify as a 32-bit value: the datamatch must be 4
                // bytes wide too, or KVM never matches the write.
                vm.register_ioevent(evt, notify, DataMatch::U32(q as u32))
                    .map_err(|e| kvm("KVM_IOEVENTFD", &e))?;
            }
            slots.push(VirtioSlot {
                name,
                base,
                gsi,
                transport: Arc::new(Mutex::new(transport)),
            });
        }
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VirtioError::EventLoop(format!("stop eventfd: {e}")))?;
        Ok(Self {
            slots,
            stop_evt,
            thread: None,
        })
    }

    /// The placed devices.
    pub fn slots(&self) -> &[VirtioSlot] {
        &self.slots
    }

    /// What the ACPI DSDT must describe.
    pub fn acpi_info(&self) -> Vec<VirtioMmioInfo> {
        self.slots
            .iter()
            .map(|s| VirtioMmioInfo {
                base: s.base,
                size: MMIO_WINDOW_SIZE,
                gsi: s.gsi,
            })
            .collect()
    }

    /// Puts every window on `dispatcher`'s MMIO bus (each vCPU's dispatcher needs them).
    pub fn register(&self, dispatcher: &mut Dispatcher) -> Result<(), VirtioError> {
        for s in &self.slots {
            dispatcher.register_mmio(s.base, MMIO_WINDOW_SIZE, s.transport.clone())?;
        }
        Ok(())
    }

    /// Saves every transport's state, in slot order. Stop the event loop and pause the
    /// vCPUs first.
    pub fn save_states(&self) -> Result<Vec<Vec<u8>>, VirtioError> {
        self.slots
            .iter()
            .map(|s| {
                s.transport
                    .lock()
                    .map(|t| t.save_state())
                    .map_err(|_| VirtioError::EventLoop(format!("{}: lock poisoned", s.name)))
            })
            .collect()
    }

    /// Restores each transport from `(bytes, file)` (slot order), then signals every queue
    /// once: a notification the saved VM had not processed yet is not lost (a spurious one is
    /// harmless).
    pub fn restore_states(
        &self,
        states: &[(Vec<u8>, std::path::PathBuf)],
    ) -> Result<(), crate::snapshot::SnapshotError> {
        for (slot, (bytes, file)) in self.slots.iter().zip(states) {
            let err = |why: String| crate::snapshot::SnapshotError::Virtio {
                file: file.clone(),
                why,
            };
            let mut t = slot
                .transport
                .lock()
                .map_err(|_| err(format!("{}: lock poisoned", slot.name)))?;
            t.restore_state(bytes)
                .map_err(|e| err(format!("{}: {e}", slot.name)))?;
            for evt in t.queue_events() {
                evt.write(1)
                    .map_err(|e| err(format!("{}: queue eventfd: {e}", slot.name)))?;
            }
        }
        Ok(())
    }

    /// Starts the event loop thread (once; later calls do nothing).
    pub fn start(&mut self) -> Result<(), VirtioError> {
        if self.thread.is_some() {
            return Ok(());
        }
        let err = |e: &dyn std::fmt::Display| VirtioError::EventLoop(e.to_string());
        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(|e| err(&e))?;
        for s in &self.slots {
            em.add_subscriber(s.transport.clone());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let evt = self.stop_evt.try_clone().map_err(|e| err(&e))?;
        em.add_subscriber(Arc::new(Mutex::new(StopSignal {
            evt,
            stop: stop.clone(),
        })));
        let thread = std::thread::Builder::new()
            .name("virtio".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Err(e) = em.run() {
                        log::error!("virtio event loop failed: {e}");
                        break;
                    }
                }
            })
            .map_err(|e| err(&e))?;
        self.thread = Some(thread);
        Ok(())
    }

    /// Stops and joins the event loop (also done on drop).
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop_evt.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for VirtioDevices {
    fn drop(&mut self) {
        self.stop();
    }
}
