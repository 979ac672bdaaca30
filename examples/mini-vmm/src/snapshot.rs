//! Whole-VM snapshots: the files a paused VM is saved to, and their checked decoding.
//!
//! # Model
//!
//! `--snapshot path=DIR,after=MS` lets the guest run `MS` milliseconds, then sets a pause flag
//! and kicks every vCPU out of `KVM_RUN`; each vCPU thread sees the flag and leaves its run
//! loop, and the run ends once all have (the virtio event thread is stopped and joined before
//! anything is saved, so no device touches guest memory meanwhile). The VMM then writes, into
//! `DIR`:
//!
//! | file | content | written by |
//! |---|---|---|
//! | `memory.snap` | guest RAM, sparse, checksummed | `vmkit_memory::snapshot::write_full` |
//! | `vcpu-N.bin` | vCPU N's registers, FPU/XSAVE, MSRs, LAPIC, events, MP state | `VcpuState::to_bytes` |
//! | `platform.bin` | KVM's PICs, IOAPIC, PIT (when present) and clock | `KvmVm::platform_state` |
//! | `devices.bin` | COM1, i8042, CMOS, ACPI sleep and exit-port state | [`DeviceStates::to_bytes`] |
//! | `virtio-N.bin` | virtio-mmio transport N with its queues and device | `MmioTransport::save_state` |
//! | `machine.txt` | what `--restore` rebuilds: memory size, vCPUs, machine kind, devices | [`Machine::to_text`] |
//!
//! `machine.txt` is written last, so a directory without it is an incomplete snapshot.
//! mini-vmm then exits with [`SNAPSHOT_EXIT_STATUS`].
//!
//! `--restore path=DIR` builds the machine `machine.txt` describes (the same KVM devices, vCPUs
//! with the same CPUID, the same virtio devices on the same host files) without loading a
//! kernel or setting up a boot, then restores memory, the platform, the devices and each vCPU,
//! and runs: the guest continues where it stopped. Every file is untrusted input: a missing,
//! truncated, corrupt or mismatched one gives a [`SnapshotError`] naming the file and the
//! problem, before the guest runs; state files are read only up to [`MAX_STATE_FILE`] bytes.
//!
//! # Whose devices
//!
//! `machine.txt` names the host files and TAP interfaces the saved guest had, but a snapshot
//! directory is input, not an authority: it must not decide which host files a restored
//! guest may write. So the host side of every virtio device comes from the `--restore`
//! command line (`--disk`, `--net`, `--rng`, `--console`, in the saved order), checked
//! against the description by [`Machine::with_backends`]: the same devices in the same order,
//! each disk as read-only as before and of the same size, each net with the saved MAC (or
//! none given). A snapshot with no disk, TAP or console file needs no device options; one
//! that has them is refused without them, unless `--restore ...,devices=snapshot` says to
//! trust the description (the operator vouches for the directory).

use std::path::{Path, PathBuf};

use vm_superio::serial::SerialState;

use crate::args::{Args, ConsoleArg, DiskArg, NetArg, Payload};
use crate::devices::{Devices, I8042State};

/// Exit status of mini-vmm after it wrote a snapshot (`EX_TEMPFAIL`: the run is not over,
/// it continues elsewhere).
pub const SNAPSHOT_EXIT_STATUS: u8 = 75;
/// The machine description.
pub const MACHINE_FILE: &str = "machine.txt";
/// Guest memory.
pub const MEMORY_FILE: &str = "memory.snap";
/// KVM's in-kernel platform devices and clock.
pub const PLATFORM_FILE: &str = "platform.bin";
/// mini-vmm's own devices.
pub const DEVICES_FILE: &str = "devices.bin";

/// File of vCPU `id`'s state.
pub fn vcpu_file(id: usize) -> String {
    format!("vcpu-{id}.bin")
}

/// File of virtio transport `index`'s state.
pub fn virtio_file(index: usize) -> String {
    format!("virtio-{index}.bin")
}

/// First line of `machine.txt` (version 2: disk lines carry the disk's size).
const MACHINE_HEADER: &str = "mini-vmm-snapshot 2";
/// First line of a version 1 `machine.txt` (disks without sizes), still read.
const MACHINE_HEADER_V1: &str = "mini-vmm-snapshot 1";
/// Magic and version of `devices.bin`.
const DEVICES_MAGIC: &[u8; 8] = b"MVMMDEV\0";
const DEVICES_VERSION: u32 = 1;

/// Errors of saving or restoring a snapshot; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("snapshot file `{}`: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file's content is malformed.
    #[error("snapshot file `{}`: {why}", file.display())]
    Format {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The guest memory file is bad or does not match the machine.
    #[error("snapshot file `{}`: guest memory: {source}", file.display())]
    Memory {
        /// The file.
        file: PathBuf,
        /// What vmkit-memory found.
        source: vmkit_memory::snapshot::SnapshotError,
    },
    /// A vCPU state could not be saved, decoded or restored.
    #[error("snapshot file `{}`: vCPU state: {source}", file.display())]
    Vcpu {
        /// The file.
        file: PathBuf,
        /// What vmkit-vcpu found.
        source: vmkit_vcpu::state::StateError,
    },
    /// The platform state could not be saved, decoded or restored.
    #[error("snapshot file `{}`: platform state: {source}", file.display())]
    Platform {
        /// The file.
        file: PathBuf,
        /// What vmkit-vcpu found.
        source: vmkit_vcpu::Error,
    },
    /// The `--restore` command line's devices do not fit the snapshot's.
    #[error("--restore: {0}")]
    Devices(String),
    /// A virtio transport state could not be restored.
    #[error("snapshot file `{}`: virtio transport: {why}", file.display())]
    Virtio {
        /// The file.
        file: PathBuf,
        /// What vmkit-virtio found.
        why: String,
    },
}

fn format_err(file: &Path, why: impl Into<String>) -> SnapshotError {
    SnapshotError::Format {
        file: file.to_path_buf(),
        why: why.into(),
    }
}

/// Largest state file (everything but guest memory) `--restore` reads: far above any real
/// one (a vCPU's is ~6 KiB), so a snapshot directory cannot make the VMM allocate without
/// bound (a huge file, or a link to `/dev/zero`).
pub const MAX_STATE_FILE: u64 = 16 << 20;

/// Reads a whole snapshot state file (at most [`MAX_STATE_FILE`] bytes), with the error
/// naming it.
pub fn read(file: &Path) -> Result<Vec<u8>, SnapshotError> {
    use std::io::Read;
    let io = |source| SnapshotError::Io {
        file: file.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .map_err(io)?
        .take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(format_err(
            file,
            format!("larger than {MAX_STATE_FILE} bytes: not a mini-vmm state file"),
        ));
    }
    Ok(bytes)
}

/// The size of a disk image or block device in bytes (by seeking to its end, which works for
/// both), or `None` if it cannot be opened.
pub fn disk_size(path: &Path) -> Option<u64> {
    use std::io::Seek;
    std::fs::File::open(path)
        .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
        .ok()
}

/// `aa:bb:cc:dd:ee:ff`.
fn mac_text(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Writes a whole snapshot file, with the error naming it.
pub fn write(file: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    std::fs::write(file, bytes).map_err(|source| SnapshotError::Io {
        file: file.to_path_buf(),
        source,
    })
}

/// What `--restore` needs to rebuild the machine: everything in [`Args`] that shapes the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpus: u8,
    /// The Linux machine (in-kernel irqchip, PIT, ACPI) rather than the bundled-guest one.
    pub linux: bool,
    /// What was booted (informational on restore: nothing is loaded).
    pub payload: Payload,
    /// The parameter port's value.
    pub param: u32,
    /// virtio-blk devices.
    pub disks: Vec<DiskArg>,
    /// Each disk's size in bytes when saved, as the guest saw it (`None`: not recorded, a
    /// version 1 description, or the file could not be measured). Same length as `disks`.
    pub disk_sizes: Vec<Option<u64>>,
    /// virtio-net devices.
    pub nets: Vec<NetArg>,
    /// virtio-rng.
    pub rng: bool,
    /// virtio-console.
    pub console: Option<ConsoleArg>,
}

fn path_text(p: &Path) -> Option<&str> {
    p.to_str()
        .filter(|s| !s.contains(['\n', '\r']) && !s.is_empty())
}

impl Machine {
    /// The machine `args` builds (`linux`: whether the kernel got the Linux machine).
    pub fn from_args(args: &Args, linux: bool) -> Self {
        Machine {
            memory: args.memory,
            cpus: args.cpus,
            linux,
            payload: args.payload.clone(),
            param: args.param,
            disks: args.disks.clone(),
            disk_sizes: args.disks.iter().map(|d| disk_size(&d.path)).collect(),
            nets: args.nets.clone(),
            rng: args.rng,
            console: args.console.clone(),
        }
    }

    /// This machine with the device backends of the `--restore` command line in `args`
    /// (see the module docs): every virtio device must be named again, in the saved order,
    /// each disk as read-only as before and of the saved size, each net without a MAC or with
    /// the saved one. With no device options, the description's own devices are taken only
    /// if none of them is a host file or TAP interface, or if `from_snapshot` (the operator
    /// trusts the description).
    pub fn with_backends(
        &self,
        args: &Args,
        from_snapshot: bool,
    ) -> Result<Machine, SnapshotError> {
        let err = SnapshotError::Devices;
        let given = args.virtio_count() > 0;
        if from_snapshot {
            if given {
                return Err(err(
                    "devices=snapshot takes every device from the snapshot; name none on the \
                     command line"
                        .into(),
                ));
            }
            return Ok(self.clone());
        }
        if !given {
            let mut host = Vec::new();
            host.extend(
                self.disks
                    .iter()
                    .map(|d| format!("--disk path={}", d.path.display())),
            );
            host.extend(self.nets.iter().map(|n| format!("--net tap={}", n.tap)));
            if let Some(ConsoleArg::File(p)) = &self.console {
                host.push(format!("--console file={}", p.display()));
            }
            if host.is_empty() {
                return Ok(self.clone());
            }
            return Err(err(format!(
                "the snapshot's devices use host resources ({}): name them on the command line \
                 (every virtio device, in the saved order), or add devices=snapshot to \
                 --restore to trust the snapshot's description",
                host.join(", ")
            )));
        }
        let count = |what: &str, saved: usize, got: usize| {
            if saved == got {
                Ok(())
            } else {
                Err(err(format!(
                    "the snapshot has {saved} {what} device(s), the command line names {got}"
                )))
            }
        };
        count("--disk", self.disks.len(), args.disks.len())?;
        count("--net", self.nets.len(), args.nets.len())?;
        count("--rng", usize::from(self.rng), usize::from(args.rng))?;
        count(
            "--console",
            usize::from(self.console.is_some()),
            usize::from(args.console.is_some()),
        )?;
        for (i, ((d, saved), size)) in args
            .disks
            .iter()
            .zip(&self.disks)
            .zip(&self.disk_sizes)
            .enumerate()
        {
            if d.readonly != saved.readonly {
                return Err(err(format!(
                    "disk {i} (`{}`) was saved {}; give it with readonly={}",
                    d.path.display(),
                    if saved.readonly {
                        "read-only"
                    } else {
                        "read-write"
                    },
                    if saved.readonly { "on" } else { "off" },
                )));
            }
            if let Some(saved) = size {
                match disk_size(&d.path) {
                    Some(now) if now == *saved => {}
                    Some(now) => {
                        return Err(err(format!(
                            "disk {i} (`{}`) has {now} bytes; the guest saw {saved}",
                            d.path.display()
                        )))
                    }
                    None => {
                        return Err(err(format!(
                            "disk {i} (`{}`) cannot be opened to check its size",
                            d.path.display()
                        )))
                    }
                }
            }
        }
        for (i, (n, saved)) in args.nets.iter().zip(&self.nets).enumerate() {
            if n.mac.is_some() && n.mac != saved.mac {
                return Err(err(format!(
                    "net {i} (tap `{}`): the guest's MAC was saved as {}; give the same or none",
                    n.tap,
                    saved.mac.map_or("the default".into(), |m| mac_text(&m))
                )));
            }
        }
        let mut m = self.clone();
        m.disks = args.disks.clone();
        m.nets = args
            .nets
            .iter()
            .zip(&self.nets)
            .map(|(n, saved)| NetArg {
                tap: n.tap.clone(),
                mac: saved.mac,
            })
            .collect();
        m.console = args.console.clone();
        Ok(m)
    }

    /// Arguments that build this machine (with default serial output and no snapshot).
    pub fn to_args(&self) -> Args {
        Args {
            payload: self.payload.clone(),
            memory: self.memory,
            param: self.param,
            cpus: self.cpus,
            disks: self.disks.clone(),
            nets: self.nets.clone(),
            rng: self.rng,
            console: self.console.clone(),
            ..Args::default()
        }
    }

    /// The text of `machine.txt`: a header line, then one `key value` line each. Fails (naming
    /// `file`) on a path that is not UTF-8 or holds a newline.
    pub fn to_text(&self, file: &Path) -> Result<String, SnapshotError> {
        fn path<'p>(p: &'p Path, file: &Path) -> Result<&'p str, SnapshotError> {
            path_text(p).ok_or_else(|| {
                format_err(
                    file,
                    format!("path `{}` is not UTF-8 text on one line", p.display()),
                )
            })
        }
        let mut t = format!(
            "{MACHINE_HEADER}\nmemory {}\ncpus {}\nlinux {}\nparam {}\n",
            self.memory,
            self.cpus,
            u8::from(self.linux),
            self.param
        );
        match &self.payload {
            Payload::Guest(g) => t.push_str(&format!("guest {g}\n")),
            Payload::Kernel(k) => t.push_str(&format!("kernel {}\n", path(k, file)?)),
        }
        if self.disk_sizes.len() != self.disks.len() {
            return Err(format_err(
                file,
                format!(
                    "{} disks but {} disk sizes: an inconsistent machine",
                    self.disks.len(),
                    self.disk_sizes.len()
                ),
            ));
        }
        for (d, size) in self.disks.iter().zip(&self.disk_sizes) {
            let ro = if d.readonly { "ro" } else { "rw" };
            // `-` when the size is unknown.
            let size = size.map_or("-".into(), |s| s.to_string());
            t.push_str(&format!("disk {ro} {size} {}\n", path(&d.path, file)?));
        }
        for n in &self.nets {
            t.push_str(&format!("net {}", n.tap));
            if let Some(m) = n.mac {
                t.push_str(&format!(" {}", mac_text(&m)));
            }
            t.push('\n');
        }
        if self.rng {
            t.push_str("rng\n");
        }
        match &self.console {
            Some(ConsoleArg::Tty) => t.push_str("console tty\n"),
            Some(ConsoleArg::File(p)) => t.push_str(&format!("console file {}\n", path(p, file)?)),
            None => {}
        }
        Ok(t)
    }

    /// Parses `machine.txt` (read from `file`, named in errors with the line).
    pub fn parse(text: &str, file: &Path) -> Result<Self, SnapshotError> {
        // mini-vmm never writes one, and `lines()` would drop some but not others.
        if text.contains('\r') {
            return Err(format_err(
                file,
                "carriage return in the machine description",
            ));
        }
        let mut lines = text.lines().enumerate();
        let v1 = match lines.next() {
            Some((_, MACHINE_HEADER)) => false,
            Some((_, MACHINE_HEADER_V1)) => true,
            Some((_, other)) => {
                return Err(format_err(
                    file,
                    format!("first line is `{other}`, expected `{MACHINE_HEADER}`"),
                ))
            }
            None => return Err(format_err(file, "empty machine description")),
        };
        let mut m = Machine {
            memory: 0,
            cpus: 0,
            linux: false,
            payload: Payload::Guest(String::new()),
            param: 0,
            disks: Vec::new(),
            disk_sizes: Vec::new(),
            nets: Vec::new(),
            rng: false,
            console: None,
        };
        let (mut seen_payload, mut seen_linux) = (false, false);
        for (n, line) in lines {
            let bad = |why: &str| format_err(file, format!("line {}: `{line}`: {why}", n + 1));
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            let num = |v: &str| v.parse::<u64>().map_err(|e| bad(&e.to_string()));
            match key {
                "memory" => {
                    // The same bounds as `--memory size=`.
                    m.memory = Some(num(value)?)
                        .filter(|b| ((4 << 20)..=(3 << 30)).contains(b))
                        .ok_or_else(|| bad("memory size out of range (4 MiB to 3 GiB)"))?
                }
                "cpus" => {
                    m.cpus = u8::try_from(num(value)?)
                        .ok()
                        .filter(|c| (1..=crate::args::MAX_CPUS).contains(c))
                        .ok_or_else(|| bad("vCPU count out of range"))?
                }
                "linux" => {
                    m.linux = match value {
                        "0" => false,
                        "1" => true,
                        _ => return Err(bad("expected 0 or 1")),
                    };
                    seen_linux = true;
                }
                "param" => {
                    m.param = u32::try_from(num(value)?).map_err(|_| bad("above 32 bits"))?
                }
                "guest" if !value.is_empty() => {
                    m.payload = Payload::Guest(value.into());
                    seen_payload = true;
                }
                "kernel" if !value.is_empty() => {
                    m.payload = Payload::Kernel(value.into());
                    seen_payload = true;
                }
                "disk" => {
                    let (mode, rest) = value.split_once(' ').ok_or_else(|| bad("no path"))?;
                    let readonly = match mode {
                        "ro" => true,
                        "rw" => false,
                        _ => return Err(bad("expected ro or rw")),
                    };
                    let (size, path) = if v1 {
                        (None, rest)
                    } else {
                        let (size, path) = rest.split_once(' ').ok_or_else(|| bad("no path"))?;
                        (if size == "-" { None } else { Some(num(size)?) }, path)
                    };
                    if path.is_empty() {
                        return Err(bad("no path"));
                    }
                    m.disk_sizes.push(size);
                    m.disks.push(DiskArg {
                        path: path.into(),
                        readonly,
                    });
                }
                "net" => {
                    let (tap, mac) = match value.split_once(' ') {
                        Some((t, mac)) => (
                            t,
                            Some(
                                crate::args::parse_mac("net", mac)
                                    .map_err(|e| bad(&e.to_string()))?,
                            ),
                        ),
                        None => (value, None),
                    };
                    if tap.is_empty() || tap.len() >= 16 {
                        return Err(bad("an interface name has 1-15 bytes"));
                    }
                    m.nets.push(NetArg {
                        tap: tap.into(),
                        mac,
                    });
                }
                "rng" => m.rng = true,
                "console" => {
                    m.console = Some(match value.split_once(' ') {
                        None if value == "tty" => ConsoleArg::Tty,
                        Some(("file", p)) if !p.is_empty() => ConsoleArg::File(p.into()),
                        _ => return Err(bad("expected tty or file PATH")),
                    })
                }
                _ => return Err(bad("unknown or incomplete line")),
            }
        }
        if m.memory == 0 || m.cpus == 0 || !seen_payload || !seen_linux {
            return Err(format_err(
                file,
                "incomplete machine description (memory, cpus, linux and guest/kernel are required)",
            ));
        }
        if !m.linux && (m.cpus > 1 || m.virtio_count() > 0) {
            return Err(format_err(
                file,
                "several vCPUs or virtio devices need the Linux machine (linux 1)",
            ));
        }
        if m.virtio_count() > crate::virtio::MAX_DEVICES {
            return Err(format_err(file, "too many virtio devices"));
        }
        Ok(m)
    }

    /// How many virtio devices the machine has.
    pub fn virtio_count(&self) -> usize {
        self.disks.len()
            + self.nets.len()
            + usize::from(self.rng)
            + usize::from(self.console.is_some())
    }
}

/// The state of mini-vmm's own devices (`devices.bin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialState,
    /// The keyboard controller.
    pub i8042: I8042State,
    /// CMOS index register.
    pub cmos_index: u8,
    /// CMOS NVRAM.
    pub cmos_nvram: [u8; 128],
    /// The guest entered S5.
    pub power_off: bool,
    /// Status written to the exit port, if any.
    pub exit_status: Option<u32>,
}

/// The 16550's FIFO size: a longer saved receive buffer is corrupt.
const SERIAL_FIFO: usize = 64;

fn put_opt(w: &mut Vec<u8>, v: Option<u8>) {
    w.extend_from_slice(&[u8::from(v.is_some()), v.unwrap_or(0)]);
}

/// A bounds-checked cursor over a file's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    file: &'a Path,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], SnapshotError> {
        if self.buf.len() < n {
            return Err(format_err(
                self.file,
                format!("truncated while reading {what}"),
            ));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, SnapshotError> {
        Ok(self.take(1, what)?[0])
    }

    fn flag(&mut self, what: &str) -> Result<bool, SnapshotError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(format_err(
                self.file,
                format!("{what} flag is {v}, expected 0 or 1"),
            )),
        }
    }

    fn opt(&mut self, what: &str) -> Result<Option<u8>, SnapshotError> {
        let present = self.flag(what)?;
        let v = self.u8(what)?;
        Ok(present.then_some(v))
    }
}

impl DeviceStates {
    /// Captures the devices' state (the vCPUs must be paused).
    pub fn capture<W: std::io::Write + Send + 'static>(
        devices: &Devices<W>,
    ) -> Result<Self, String> {
        let serial = devices
            .serial
            .lock()
            .map_err(|_| "serial lock poisoned")?
            .state();
        let i8042 = devices
            .i8042
            .lock()
            .map_err(|_| "i8042 lock poisoned")?
            .state();
        let (cmos_index, cmos_nvram) = devices
            .cmos
            .lock()
            .map_err(|_| "CMOS lock poisoned")?
            .state();
        Ok(DeviceStates {
            serial,
            i8042,
            cmos_index,
            cmos_nvram,
            power_off: devices
                .sleep
                .power_off_requested()
                .load(std::sync::atomic::Ordering::SeqCst),
            exit_status: devices.exit.status(),
        })
    }

    /// Encodes the states: magic, `u32` version, then the fields in declaration order.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(256);
        w.extend_from_slice(DEVICES_MAGIC);
        w.extend_from_slice(&DEVICES_VERSION.to_le_bytes());
        let s = &self.serial;
        w.extend_from_slice(&[
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ]);
        let fifo = &s.in_buffer[..s.in_buffer.len().min(SERIAL_FIFO)];
        w.push(fifo.len() as u8);
        w.extend_from_slice(fifo);
        w.push(self.i8042.config);
        put_opt(&mut w, self.i8042.output);
        put_opt(&mut w, self.i8042.pending);
        w.push(u8::from(self.i8042.reset));
        w.push(self.cmos_index);
        w.extend_from_slice(&self.cmos_nvram);
        w.push(u8::from(self.power_off));
        w.push(u8::from(self.exit_status.is_some()));
        w.extend_from_slice(&self.exit_status.unwrap_or(0).to_le_bytes());
        w
    }

    /// Decodes [`DeviceStates::to_bytes`] output read from `file`, checking every length and
    /// flag.
    pub fn from_bytes(bytes: &[u8], file: &Path) -> Result<Self, SnapshotError> {
        let mut r = Reader { buf: bytes, file };
        if r.take(8, "magic")? != DEVICES_MAGIC {
            return Err(format_err(
                file,
                "bad magic (not a mini-vmm device state file)",
            ));
        }
        let mut v = [0u8; 4];
        v.copy_from_slice(r.take(4, "version")?);
        let version = u32::from_le_bytes(v);
        if version != DEVICES_VERSION {
            return Err(format_err(
                file,
                format!("version {version}, this build reads {DEVICES_VERSION}"),
            ));
        }
        let regs = r.take(9, "serial registers")?;
        let mut serial = SerialState {
            baud_divisor_low: regs[0],
            baud_divisor_high: regs[1],
            interrupt_enable: regs[2],
            interrupt_identification: regs[3],
            line_control: regs[4],
            line_status: regs[5],
            modem_control: regs[6],
            modem_status: regs[7],
            scratch: regs[8],
            in_buffer: Vec::new(),
        };
        let len = usize::from(r.u8("serial FIFO length")?);
        if len > SERIAL_FIFO {
            return Err(format_err(
                file,
                format!("serial FIFO holds {len} bytes, at most {SERIAL_FIFO}"),
            ));
        }
        serial.in_buffer = r.take(len, "serial FIFO")?.to_vec();
        let i8042 = I8042State {
            config: r.u8("i8042 config")?,
            output: r.opt("i8042 output")?,
            pending: r.opt("i8042 pending command")?,
            reset: r.flag("i8042 reset")?,
        };
        let cmos_index = r.u8("CMOS index")?;
        let mut cmos_nvram = [0u8; 128];
        cmos_nvram.copy_from_slice(r.take(128, "CMOS NVRAM")?);
        let power_off = r.flag("power-off")?;
        let has_status = r.flag("exit status")?;
        let mut st = [0u8; 4];
        st.copy_from_slice(r.take(4, "exit status")?);
        if !r.buf.is_empty() {
            return Err(format_err(
                file,
                format!("{} unexpected bytes after the device states", r.buf.len()),
            ));
        }
        Ok(DeviceStates {
            serial,
            i8042,
            cmos_index,
            cmos_nvram,
            power_off,
            exit_status: has_status.then_some(u32::from_le_bytes(st)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            memory: 256 << 20,
            cpus: 2,
            linux: true,
            payload: Payload::Kernel("/boot/vmlinuz".into()),
            param: 7,
            disks: vec![DiskArg {
                path: "/tmp/disk with space.img".into(),
                readonly: true,
            }],
            disk_sizes: vec![Some(1 << 20)],
            nets: vec![NetArg {
                tap: "tap0".into(),
                mac: Some([0x52, 0x54, 0, 1, 2, 3]),
            }],
            rng: true,
            console: Some(ConsoleArg::File("/tmp/c.log".into())),
        }
    }

    #[test]
    fn machine_description_round_trips_and_rejects_bad_lines() {
        let f = Path::new("machine.txt");
        let m = machine();
        let text = m.to_text(f).unwrap();
        assert_eq!(Machine::parse(&text, f).unwrap(), m);
        let g = Machine::from_args(&Args::default(), false);
        assert_eq!(Machine::parse(&g.to_text(f).unwrap(), f).unwrap(), g);
        assert_eq!(g.to_args(), Args::default());
        for (bad, why) in [
            ("", "empty"),
            ("other 1\n", "first line"),
            ("mini-vmm-snapshot 1\nmemory x\n", "line 2"),
            ("mini-vmm-snapshot 1\ncpus 0\n", "out of range"),
            ("mini-vmm-snapshot 1\nwhat 1\n", "unknown"),
            ("mini-vmm-snapshot 1\nmemory 4096\n", "out of range"),
            ("mini-vmm-snapshot 1\nmemory 4194304\n", "incomplete"),
            ("mini-vmm-snapshot 1\nmemory 99999999999\n", "out of range"),
            ("mini-vmm-snapshot 1\nlinux 2\n", "0 or 1"),
            ("mini-vmm-snapshot 1\ndisk xx /a\n", "ro or rw"),
            ("mini-vmm-snapshot 2\ndisk ro 12\n", "no path"),
            ("mini-vmm-snapshot 2\ndisk ro x /a\n", "invalid digit"),
            ("mini-vmm-snapshot 2\ndisk rw\n", "no path"),
            ("mini-vmm-snapshot 2\r\nmemory 4194304\n", "carriage return"),
            ("mini-vmm-snapshot 1\nnet tap0 zz\n", "hex"),
            ("mini-vmm-snapshot 1\nconsole pipe\n", "tty or file"),
            (
                "mini-vmm-snapshot 1\nmemory 4194304\ncpus 2\nlinux 0\nguest hello\n",
                "Linux machine",
            ),
        ] {
            let e = Machine::parse(bad, f).unwrap_err().to_string();
            assert!(e.contains("machine.txt") && e.contains(why), "{bad:?}: {e}");
        }
        let mut short = machine();
        short.disk_sizes.clear();
        assert!(short
            .to_text(f)
            .unwrap_err()
            .to_string()
            .contains("1 disks but 0"));
        let mut nl = machine();
        nl.disks[0].path = "/a\nb".into();
        assert!(nl.to_text(f).unwrap_err().to_string().contains("one line"));
        // A version 1 description (disks without sizes) still reads; an unknown size is `-`.
        let v1 = "mini-vmm-snapshot 1\nmemory 4194304\ncpus 1\nlinux 1\nkernel /k\n\
                  disk rw /a b\n";
        let m1 = Machine::parse(v1, f).unwrap();
        assert_eq!(
            (m1.disks[0].path.to_str(), m1.disk_sizes[0]),
            (Some("/a b"), None)
        );
        let text = m1.to_text(f).unwrap();
        assert!(text.contains("disk rw - /a b\n"), "{text}");
        assert_eq!(Machine::parse(&text, f).unwrap(), m1);
    }

    /// A saved machine with one disk of `size` bytes at `disk`, a net and a file console.
    fn saved(disk: &Path, size: u64) -> Machine {
        Machine {
            disks: vec![DiskArg {
                path: disk.into(),
                readonly: false,
            }],
            disk_sizes: vec![Some(size)],
            rng: false,
            ..machine()
        }
    }

    fn restore_args(words: &[&str]) -> Args {
        let mut all = vec!["--restore".to_string(), "/snap".to_string()];
        all.extend(words.iter().map(|w| w.to_string()));
        Args::parse(all).unwrap()
    }

    #[test]
    fn restore_takes_device_backends_from_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new, small) = (
            dir.path().join("old.img"),
            dir.path().join("new.img"),
            dir.path().join("small.img"),
        );
        for (p, len) in [(&old, 1 << 20), (&new, 1 << 20), (&small, 4096)] {
            std::fs::File::create(p).unwrap().set_len(len).unwrap();
        }
        let m = saved(&old, 1 << 20);
        let disk = |p: &Path, extra: &str| format!("path={}{extra}", p.display());
        // The backends named now replace the saved ones; the MAC stays the guest's.
        let args = restore_args(&[
            "--disk",
            &disk(&new, ""),
            "--net",
            "tap=tap9",
            "--console",
            "tty",
        ]);
        let r = m.with_backends(&args, false).unwrap();
        assert_eq!(r.disks[0].path, new);
        assert_eq!(
            (r.nets[0].tap.as_str(), r.nets[0].mac),
            ("tap9", m.nets[0].mac)
        );
        assert_eq!(r.console, Some(ConsoleArg::Tty));
        assert_eq!(
            (r.memory, r.cpus, &r.payload),
            (m.memory, m.cpus, &m.payload)
        );

        let fails = |words: &[&str], why: &str| {
            let e = m
                .with_backends(&restore_args(words), false)
                .unwrap_err()
                .to_string();
            assert!(e.contains("--restore") && e.contains(why), "{words:?}: {e}");
        };
        // Nothing named: the snapshot's host resources are not taken on trust.
        fails(&[], "host resources");
        fails(&[], "old.img");
        let (d_new, d_small, d_ro) = (disk(&new, ""), disk(&small, ""), disk(&new, ",readonly=on"));
        let missing = disk(&dir.path().join("gone.img"), "");
        for (words, why) in [
            (
                &["--net", "tap=t", "--console", "tty"][..],
                "1 --disk device(s), the command line names 0",
            ),
            (&["--disk", &d_new, "--console", "tty"][..], "1 --net"),
            (&["--disk", &d_new, "--net", "tap=t"][..], "1 --console"),
            (
                &[
                    "--disk",
                    &d_new,
                    "--net",
                    "tap=t",
                    "--console",
                    "tty",
                    "--rng",
                ][..],
                "0 --rng",
            ),
            (
                &["--disk", &d_small, "--net", "tap=t", "--console", "tty"][..],
                "has 4096 bytes",
            ),
            (
                &["--disk", &d_ro, "--net", "tap=t", "--console", "tty"][..],
                "readonly=off",
            ),
            (
                &["--disk", &missing, "--net", "tap=t", "--console", "tty"][..],
                "cannot be opened",
            ),
            (
                &[
                    "--disk",
                    &d_new,
                    "--net",
                    "tap=t,mac=02:00:00:00:00:01",
                    "--console",
                    "tty",
                ][..],
                "MAC was saved as 52:54:00:01:02:03",
            ),
        ] {
            fails(words, why);
        }
        // The same MAC is fine.
        let same = restore_args(&[
            "--disk",
            &d_new,
            "--net",
            "tap=t,mac=52:54:00:01:02:03",
            "--console",
            "tty",
        ]);
        assert!(m.with_backends(&same, false).is_ok());

        // devices=snapshot: the description's devices, and no device options with it.
        assert_eq!(m.with_backends(&restore_args(&[]), true).unwrap(), m);
        let e = m.with_backends(&same, true).unwrap_err().to_string();
        assert!(e.contains("devices=snapshot"), "{e}");

        // A snapshot without host resources needs no device options.
        let plain = Machine {
            disks: Vec::new(),
            disk_sizes: Vec::new(),
            nets: Vec::new(),
            console: Some(ConsoleArg::Tty),
            ..machine()
        };
        assert_eq!(
            plain.with_backends(&restore_args(&[]), false).unwrap(),
            plain
        );
        // A size not recorded (version 1) is not checked.
        let unsized_disk = Machine {
            disk_sizes: vec![None],
            ..m.clone()
        };
        let args = restore_args(&["--disk", &d_small, "--net", "tap=t", "--console", "tty"]);
        assert!(unsized_disk.with_backends(&args, false).is_ok());
    }

    #[test]
    fn state_files_beyond_the_size_cap_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.bin");
        std::fs::write(&small, [1, 2, 3]).unwrap();
        assert_eq!(read(&small).unwrap(), [1, 2, 3]);
        let big = dir.path().join("big.bin");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_STATE_FILE + 1).unwrap(); // sparse: no real disk use
        let e = read(&big).unwrap_err().to_string();
        assert!(e.contains("big.bin") && e.contains("larger than"), "{e}");
    }

    #[test]
    fn device_states_round_trip_and_reject_corruption() {
        let f = Path::new("devices.bin");
        let mut s = DeviceStates {
            serial: SerialState::default(),
            i8042: I8042State {
                config: 0x47,
                output: Some(0x55),
                pending: None,
                reset: false,
            },
            cmos_index: 0x0b,
            cmos_nvram: [3; 128],
            power_off: false,
            exit_status: Some(9),
        };
        s.serial.in_buffer = vec![1, 2, 3];
        let b = s.to_bytes();
        assert_eq!(DeviceStates::from_bytes(&b, f).unwrap(), s);
        for n in 0..b.len() {
            let e = DeviceStates::from_bytes(&b[..n], f)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("devices.bin") && e.contains("truncated"),
                "{n}: {e}"
            );
        }
        let mut long = b.clone();
        long.push(0);
        assert!(DeviceStates::from_bytes(&long, f).is_err());
        let mut magic = b.clone();
        magic[0] ^= 1;
        assert!(DeviceStates::from_bytes(&magic, f)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let mut version = b.clone();
        version[8] = 9;
        assert!(DeviceStates::from_bytes(&version, f)
            .unwrap_err()
            .to_string()
            .contains("version 9"));
        let mut fifo = b.clone();
        fifo[12 + 9] = 200;
        assert!(DeviceStates::from_bytes(&fifo, f)
            .unwrap_err()
            .to_string()
            .contains("FIFO"));
        let mut flag = b;
        let reset_at = 12 + 9 + 1 + 3 + 1 + 2 + 2;
        flag[reset_at] = 5;
        assert!(DeviceStates::from_bytes(&flag, f)
            .unwrap_err()
            .to_string()
            .contains("i8042 reset flag is 5"));
    }
}
