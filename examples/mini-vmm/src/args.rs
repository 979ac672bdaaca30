//! Command-line parsing. Every error names the argument that was wrong.
//!
//! ```text
//! mini-vmm [--guest NAME | --kernel PATH [--initramfs PATH] [--cmdline TEXT]
//!           [--cpus boot=N] [--disk path=PATH[,readonly=on]]... [--net tap=NAME[,mac=MAC]]...
//!           [--rng] [--console [tty|file=PATH]]]
//!          [--serial tty|off|file=PATH] [--memory size=SIZE] [--param N] [--stats]
//!          [--data-log PATH] [--snapshot path=DIR,after=MS]
//! mini-vmm --restore path=DIR[,memory=copy|mmap][,devices=args|snapshot]
//!          [--disk ...]... [--net ...]... [--rng] [--console ...]
//!          [--serial ...] [--data-log PATH] [--snapshot ...] [--stats]
//! ```
//!
//! Device options follow Cloud Hypervisor's `key=value,key=value` style; a wrong key or value
//! is reported with the option it belongs to (`invalid value `x=1` for `--disk`: ...`).

use std::path::PathBuf;

use crate::sched::VcpuThreads;

/// Errors in the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// An argument nobody knows.
    #[error("unknown argument `{0}` (try --help)")]
    Unknown(String),
    /// An option without its value.
    #[error("`{0}` needs a value")]
    MissingValue(String),
    /// A value that does not parse.
    #[error("invalid value `{value}` for `{arg}`: {why}")]
    Invalid {
        /// The option.
        arg: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// Options that exclude each other.
    #[error("`--guest` and `--kernel` cannot be used together")]
    Conflict,
    /// An option that describes the machine, given with `--restore` (the snapshot's
    /// machine description decides it).
    #[error("`{0}` cannot be used with `--restore` (the snapshot describes the machine)")]
    RestoreConflict(String),
    /// An option that only makes sense with `--kernel`.
    #[error("`{0}` needs `--kernel`")]
    NeedsKernel(&'static str),
    /// `--snapshot` of a VM with vhost-user devices: their ring state lives in the backends.
    #[error("`--snapshot` cannot save a VM with `--vhost-user` devices (their ring state lives in the backend process)")]
    SnapshotVhostUser,
    /// More virtio devices than the machine has MMIO slots and interrupt lines for.
    #[error("too many virtio devices ({0}; at most {max})", max = crate::virtio::MAX_DEVICES)]
    TooManyDevices(usize),
}

/// A `--disk` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    /// Image file or block device.
    pub path: PathBuf,
    /// Open without write access; the guest sees a read-only disk.
    pub readonly: bool,
}

/// A `--net` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetArg {
    /// TAP interface to attach to (created if it does not exist).
    pub tap: String,
    /// MAC address the guest sees (default: 52:54:00:12:34:56 plus the device's index).
    pub mac: Option<[u8; 6]>,
}

/// Where the virtio console's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleArg {
    /// mini-vmm's standard output (no input).
    Tty,
    /// Appended to a file.
    File(PathBuf),
}

/// Where COM1's output goes (`--serial`). The binary opens it; library users pass their own
/// writer to [`crate::vmm::Vmm::new`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialArg {
    /// mini-vmm's standard output (the default).
    #[default]
    Tty,
    /// Discarded.
    Off,
    /// Written to a file (created or truncated).
    File(PathBuf),
}

/// A `--snapshot` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotArg {
    /// Directory the snapshot files are written to (created if missing).
    pub dir: PathBuf,
    /// Milliseconds the guest runs before it is paused and saved.
    pub after_ms: u64,
}

/// Command line given to a kernel when `--cmdline` is absent: the console on COM1, reboot
/// through the keyboard controller (which ends the VM) and reboot at once on panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// One of the bundled test guests, by name.
    Guest(String),
    /// A kernel image (ELF, PVH ELF or bzImage).
    Kernel(PathBuf),
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// What to boot.
    pub payload: Payload,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Kernel command line (kernels only).
    pub cmdline: Option<String>,
    /// Initial RAM disk loaded beside the kernel (kernels only).
    pub initramfs: Option<PathBuf>,
    /// Value the guest reads from its parameter port (0x510).
    pub param: u32,
    /// Print usage and exit.
    pub help: bool,
    /// Print exit statistics when the guest stops.
    pub stats: bool,
    /// Number of vCPUs (kernels only).
    pub cpus: u8,
    /// How the vCPUs get host threads (`--cpus host=`).
    pub vcpu_threads: VcpuThreads,
    /// virtio-blk devices, in order.
    pub disks: Vec<DiskArg>,
    /// virtio-net devices, in order.
    pub nets: Vec<NetArg>,
    /// A virtio-rng device.
    pub rng: bool,
    /// A virtio-console device.
    pub console: Option<ConsoleArg>,
    /// Devices served by vhost-user backends (`--vhost-user`), after the in-process ones.
    pub vhost_user: Vec<crate::vhost_user::VhostUserArg>,
    /// COM1's output.
    pub serial: SerialArg,
    /// File the values written to the data port (0x511) are appended to, one a line.
    pub data_log: Option<PathBuf>,
    /// Pause and save the whole VM after a while (`--snapshot`).
    pub snapshot: Option<SnapshotArg>,
    /// Continue a saved VM instead of booting one (`--restore`).
    pub restore: Option<PathBuf>,
    /// Map guest memory lazily from the snapshot (`--restore ...,memory=mmap`) instead of
    /// copying it.
    pub restore_mmap: bool,
    /// Take the device backends from the snapshot's description instead of this command line
    /// (`--restore ...,devices=snapshot`; see [`crate::snapshot`]).
    pub restore_devices_from_snapshot: bool,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            payload: Payload::Guest("hello".into()),
            memory: 64 << 20,
            cmdline: None,
            initramfs: None,
            param: 0,
            help: false,
            stats: false,
            cpus: 1,
            vcpu_threads: VcpuThreads::PerVcpu,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            console: None,
            vhost_user: Vec::new(),
            serial: SerialArg::Tty,
            data_log: None,
            snapshot: None,
            restore: None,
            restore_mmap: false,
            restore_devices_from_snapshot: false,
        }
    }
}

/// Most vCPUs `--cpus boot=` accepts (MADT processor UIDs and APIC IDs are bytes; the
/// in-kernel IOAPIC delivers to 8-bit destinations).
pub const MAX_CPUS: u8 = 32;

/// Usage text.
pub const USAGE: &str = "usage: mini-vmm [--guest NAME | --kernel PATH [--initramfs PATH] \
[--cmdline TEXT] [--cpus boot=N] [--disk path=PATH[,readonly=on]]... [--net tap=NAME[,mac=MAC]]... \
[--rng] [--console [tty|file=PATH]]] [--serial tty|off|file=PATH] [--memory size=SIZE] [--param N] \
[--stats] [--data-log PATH] [--snapshot path=DIR,after=MS]
       mini-vmm --restore path=DIR[,memory=copy|mmap][,devices=args|snapshot] [--disk ...]... \
[--net ...]... [--rng] [--console ...] [--serial ...] [--data-log PATH] [--snapshot ...] [--stats]

With no arguments, boots the bundled `hello` guest on KVM and exits with its status.
  --guest NAME        bundled guest: hello, pio_loop, mmio, paging, exits, counter
  --kernel PATH       kernel image to boot (ELF, PVH ELF or bzImage); a bzImage or a PVH
                      vmlinux gets the Linux machine: KVM's in-kernel IOAPIC/LAPICs and PIT,
                      ACPI tables, COM1 on GSI 4, the CMOS RTC, reboot (i8042) and poweroff
                      (ACPI S5)
  --initramfs PATH    initial RAM disk for the kernel
  --memory size=SIZE  guest RAM, e.g. size=128M (K, M, G suffixes; default 64M)
  --cmdline TEXT      kernel command line (default: console=ttyS0 reboot=k panic=-1)
  --cpus boot=N[,host=M|auto|per-vcpu]
                      vCPUs for the kernel (1-32, default 1), described in the ACPI MADT;
                      host=M runs them on M vmkit-sched worker threads (auto: one per host
                      CPU, at most one per vCPU); default: one thread per vCPU
  --disk path=PATH[,readonly=on]
                      virtio-blk disk over an image file or block device (repeatable)
  --net tap=NAME[,mac=MAC]
                      virtio-net device on TAP interface NAME (repeatable)
  --rng               virtio-rng device (host getrandom)
  --console [tty|file=PATH]
                      virtio-console (hvc0) on stdin/stdout (tty, the default) or writing to
                      a file
  --vhost-user type=console|rng|blk|net,socket=PATH
                      a device served by a vhost-user backend listening on PATH (repeatable;
                      guest RAM becomes memfd-shared; not with --snapshot or --restore)
  --serial tty|off|file=PATH
                      where COM1's output goes (default tty: stdout); with tty, stdin is
                      COM1's input unless --console tty takes it (a terminal is put in raw
                      mode while the guest runs)
  --param N           value the guest reads from port 0x510
  --stats             print per-exit-kind counts and handling latency at the end
  --data-log PATH     append every value the guest writes to port 0x511 to PATH, one a line
  --snapshot path=DIR,after=MS
                      after the guest ran MS milliseconds, pause every vCPU, save the whole VM
                      (memory, vCPUs, KVM platform, devices, machine description) into DIR
                      and exit with status 75
  --restore path=DIR[,memory=copy|mmap][,devices=args|snapshot]
                      continue the VM saved in DIR (no boot); only --serial, --data-log,
                      --snapshot, --stats and the device options may be added. memory=copy
                      (default) checks every checksum and copies RAM in; memory=mmap maps the
                      file copy-on-write (cost independent of RAM size; header and region
                      table checked only). devices=args (default): --disk/--net/--rng/--console
                      name every saved virtio device again, in order (the snapshot's disks,
                      TAPs and console file are not trusted; disks must keep read-only mode and
                      size); devices=snapshot uses the ones the snapshot names
Devices (Linux machine only) are virtio-mmio, described to the kernel in the ACPI DSDT.";

fn invalid(arg: &str, value: &str, why: impl Into<String>) -> ArgsError {
    ArgsError::Invalid {
        arg: arg.into(),
        value: value.into(),
        why: why.into(),
    }
}

/// Splits `key=value,key=value` and checks every key is in `allowed`.
fn key_values<'a>(
    arg: &str,
    value: &'a str,
    allowed: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, ArgsError> {
    let mut out = Vec::new();
    for part in value.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| invalid(arg, part, format!("expected {}", allowed.join("=, ") + "=")))?;
        if !allowed.contains(&k) {
            return Err(invalid(
                arg,
                part,
                format!("unknown key `{k}` (expected {})", allowed.join(", ")),
            ));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(invalid(arg, part, format!("`{k}` given twice")));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// Parses `on`/`off` (also `true`/`false`).
fn parse_bool(arg: &str, v: &str) -> Result<bool, ArgsError> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(invalid(arg, v, "expected on or off")),
    }
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(arg: &str, v: &str) -> Result<[u8; 6], ArgsError> {
    let mut mac = [0u8; 6];
    let mut parts = v.split(':');
    for byte in &mut mac {
        let p = parts
            .next()
            .filter(|p| p.len() == 2)
            .ok_or_else(|| invalid(arg, v, "expected six hex bytes like 52:54:00:12:34:56"))?;
        *byte = u8::from_str_radix(p, 16)
            .map_err(|_| invalid(arg, v, format!("`{p}` is not a hex byte")))?;
    }
    if parts.next().is_some() {
        return Err(invalid(arg, v, "more than six bytes"));
    }
    if mac[0] & 1 != 0 {
        return Err(invalid(
            arg,
            v,
            "a multicast address cannot be a NIC's address",
        ));
    }
    Ok(mac)
}

fn parse_disk(v: &str) -> Result<DiskArg, ArgsError> {
    let (mut path, mut readonly) = (None, false);
    for (k, val) in key_values("--disk", v, &["path", "readonly"])? {
        match k {
            "path" if val.is_empty() => return Err(invalid("--disk", v, "empty path")),
            "path" => path = Some(PathBuf::from(val)),
            _ => readonly = parse_bool("--disk readonly", val)?,
        }
    }
    let path = path.ok_or_else(|| invalid("--disk", v, "path= is required"))?;
    Ok(DiskArg { path, readonly })
}

fn parse_net(v: &str) -> Result<NetArg, ArgsError> {
    let (mut tap, mut mac) = (None, None);
    for (k, val) in key_values("--net", v, &["tap", "mac"])? {
        match k {
            "tap" if val.is_empty() || val.len() >= 16 => {
                return Err(invalid(
                    "--net tap",
                    val,
                    "an interface name has 1-15 bytes",
                ))
            }
            "tap" => tap = Some(val.to_string()),
            _ => mac = Some(parse_mac("--net mac", val)?),
        }
    }
    let tap = tap.ok_or_else(|| invalid("--net", v, "tap= is required"))?;
    Ok(NetArg { tap, mac })
}

fn parse_console(v: &str) -> Result<ConsoleArg, ArgsError> {
    match v {
        "tty" => Ok(ConsoleArg::Tty),
        _ => match v.split_once('=') {
            Some(("file", p)) if !p.is_empty() => Ok(ConsoleArg::File(PathBuf::from(p))),
            _ => Err(invalid("--console", v, "expected tty or file=PATH")),
        },
    }
}

fn parse_serial(v: &str) -> Result<SerialArg, ArgsError> {
    match v {
        "tty" => Ok(SerialArg::Tty),
        "off" => Ok(SerialArg::Off),
        _ => match v.split_once('=') {
            Some(("file", p)) if !p.is_empty() => Ok(SerialArg::File(PathBuf::from(p))),
            _ => Err(invalid("--serial", v, "expected tty, off or file=PATH")),
        },
    }
}

/// Most scheduler workers `--cpus host=` accepts.
pub const MAX_HOST_THREADS: usize = 256;

fn parse_cpus(v: &str) -> Result<(u8, VcpuThreads), ArgsError> {
    let (mut cpus, mut host) = (None, None);
    for (key, val) in key_values("--cpus", v, &["boot", "host"])? {
        if key == "host" {
            host = Some(match val {
                "per-vcpu" => VcpuThreads::PerVcpu,
                "auto" => VcpuThreads::Auto,
                _ => match val.parse::<usize>() {
                    Ok(n) if (1..=MAX_HOST_THREADS).contains(&n) => VcpuThreads::Scheduler(n),
                    _ => {
                        return Err(invalid(
                            "--cpus host",
                            val,
                            format!("expected 1 to {MAX_HOST_THREADS}, auto or per-vcpu"),
                        ))
                    }
                },
            });
            continue;
        }
        let n: u8 = val
            .parse()
            .map_err(|e| invalid("--cpus boot", val, format!("{e}")))?;
        if n == 0 || n > MAX_CPUS {
            return Err(invalid(
                "--cpus boot",
                val,
                format!("expected 1 to {MAX_CPUS}"),
            ));
        }
        cpus = Some(n);
    }
    match (cpus, host) {
        (None, None) => Err(invalid("--cpus", v, "boot= or host= is required")),
        (c, h) => Ok((c.unwrap_or(1), h.unwrap_or_default())),
    }
}

fn parse_snapshot(v: &str) -> Result<SnapshotArg, ArgsError> {
    let (mut dir, mut after) = (None, None);
    for (k, val) in key_values("--snapshot", v, &["path", "after"])? {
        match k {
            "path" if val.is_empty() => return Err(invalid("--snapshot", v, "empty path")),
            "path" => dir = Some(PathBuf::from(val)),
            _ => {
                after = Some(
                    val.parse::<u64>()
                        .map_err(|e| invalid("--snapshot after", val, format!("{e}")))?,
                )
            }
        }
    }
    Ok(SnapshotArg {
        dir: dir.ok_or_else(|| invalid("--snapshot", v, "path= is required"))?,
        after_ms: after.ok_or_else(|| invalid("--snapshot", v, "after= is required"))?,
    })
}

/// `--restore path=DIR[,memory=copy|mmap][,devices=args|snapshot]` (or just
/// `--restore DIR`): the directory, whether memory is mapped lazily from the snapshot file,
/// and whether the device backends come from the snapshot rather than the command line.
fn parse_restore(v: &str) -> Result<(PathBuf, bool, bool), ArgsError> {
    if !v.contains('=') {
        return Ok((PathBuf::from(v), false, false));
    }
    let (mut path, mut mmap, mut from_snapshot) = (None, false, false);
    for (k, val) in key_values("--restore", v, &["path", "memory", "devices"])? {
        match (k, val) {
            ("path", "") => return Err(invalid("--restore", v, "empty path")),
            ("path", p) => path = Some(PathBuf::from(p)),
            ("memory", "copy") => mmap = false,
            ("memory", "mmap") => mmap = true,
            ("memory", other) => {
                return Err(invalid("--restore memory", other, "expected copy or mmap"))
            }
            (_, "args") => from_snapshot = false,
            (_, "snapshot") => from_snapshot = true,
            (_, other) => {
                return Err(invalid(
                    "--restore devices",
                    other,
                    "expected args or snapshot",
                ))
            }
        }
    }
    let path = path.ok_or_else(|| invalid("--restore", v, "path= is required"))?;
    Ok((path, mmap, from_snapshot))
}

/// The value after option `name`.
fn next_value(it: &mut impl Iterator<Item = String>, name: &str) -> Result<String, ArgsError> {
    it.next()
        .ok_or_else(|| ArgsError::MissingValue(name.into()))
}

/// Parses a size like `512M`, `2G`, `65536`.
pub fn parse_size(arg: &str, s: &str) -> Result<u64, ArgsError> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|e| invalid(arg, s, format!("{e}")))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| invalid(arg, s, "too large"))
}

impl Args {
    /// Parses arguments (without the program name).
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Args, ArgsError> {
        let mut out = Args::default();
        let (mut guest, mut kernel) = (None, None);
        let mut it = args.into_iter().peekable();
        // Options that describe the machine, which `--restore` takes from the snapshot (the
        // device options give a restored machine's device backends).
        let mut machine_opts: Vec<String> = Vec::new();
        while let Some(arg) = it.next() {
            if !matches!(
                arg.as_str(),
                "-h" | "--help"
                    | "--stats"
                    | "--serial"
                    | "--data-log"
                    | "--snapshot"
                    | "--restore"
                    | "--disk"
                    | "--net"
                    | "--rng"
                    | "--console"
            ) {
                machine_opts.push(arg.clone());
            }
            match arg.as_str() {
                "--data-log" => {
                    out.data_log = Some(PathBuf::from(next_value(&mut it, "--data-log")?))
                }
                "--snapshot" => {
                    out.snapshot = Some(parse_snapshot(&next_value(&mut it, "--snapshot")?)?)
                }
                "--restore" => {
                    let (dir, mmap, from_snapshot) =
                        parse_restore(&next_value(&mut it, "--restore")?)?;
                    out.restore = Some(dir);
                    out.restore_mmap = mmap;
                    out.restore_devices_from_snapshot = from_snapshot;
                }
                "-h" | "--help" => out.help = true,
                "--stats" => out.stats = true,
                "--guest" => guest = Some(next_value(&mut it, "--guest")?),
                "--kernel" => kernel = Some(PathBuf::from(next_value(&mut it, "--kernel")?)),
                "--cmdline" => out.cmdline = Some(next_value(&mut it, "--cmdline")?),
                "--initramfs" => {
                    out.initramfs = Some(PathBuf::from(next_value(&mut it, "--initramfs")?))
                }
                "--param" => {
                    let v = next_value(&mut it, "--param")?;
                    out.param = v
                        .parse()
                        .map_err(|e| invalid("--param", &v, format!("{e}")))?;
                }
                "--cpus" => {
                    let v = next_value(&mut it, "--cpus")?;
                    (out.cpus, out.vcpu_threads) = parse_cpus(&v)?;
                    if !v.split(',').any(|kv| kv.starts_with("boot=")) {
                        // `host=` alone says how to run the vCPUs, not what the machine is.
                        machine_opts.pop();
                    }
                }
                "--disk" => out.disks.push(parse_disk(&next_value(&mut it, "--disk")?)?),
                "--net" => out.nets.push(parse_net(&next_value(&mut it, "--net")?)?),
                "--rng" => out.rng = true,
                "--vhost-user" => out
                    .vhost_user
                    .push(crate::vhost_user::parse_arg(&next_value(
                        &mut it,
                        "--vhost-user",
                    )?)?),
                "--serial" => out.serial = parse_serial(&next_value(&mut it, "--serial")?)?,
                "--console" => {
                    // The value is optional: `--console` alone means the terminal.
                    let v = match it.peek() {
                        Some(next) if !next.starts_with("--") => it.next(),
                        _ => None,
                    };
                    out.console = Some(v.as_deref().map_or(Ok(ConsoleArg::Tty), parse_console)?);
                }
                "--memory" => {
                    let v = next_value(&mut it, "--memory")?;
                    for part in v.split(',') {
                        match part.split_once('=') {
                            Some(("size", s)) => out.memory = parse_size("--memory size", s)?,
                            _ => return Err(invalid("--memory", part, "expected size=SIZE")),
                        }
                    }
                    if out.memory < (4 << 20) {
                        return Err(invalid("--memory", &v, "at least 4M is needed"));
                    }
                    if out.memory > (3 << 30) {
                        return Err(invalid("--memory", &v, "at most 3G (below the MMIO hole)"));
                    }
                }
                _ => return Err(ArgsError::Unknown(arg)),
            }
        }
        if out.restore.is_some() {
            if let Some(first) = machine_opts.into_iter().next() {
                return Err(ArgsError::RestoreConflict(first));
            }
        }
        if kernel.is_none() && out.restore.is_none() {
            if out.initramfs.is_some() {
                return Err(ArgsError::NeedsKernel("--initramfs"));
            }
            if out.cmdline.is_some() {
                return Err(ArgsError::NeedsKernel("--cmdline"));
            }
            for (given, name) in [
                (out.cpus != 1, "--cpus"),
                (!out.disks.is_empty(), "--disk"),
                (!out.nets.is_empty(), "--net"),
                (out.rng, "--rng"),
                (out.console.is_some(), "--console"),
                (!out.vhost_user.is_empty(), "--vhost-user"),
            ] {
                if given {
                    return Err(ArgsError::NeedsKernel(name));
                }
            }
        }
        if out.snapshot.is_some() && !out.vhost_user.is_empty() {
            return Err(ArgsError::SnapshotVhostUser);
        }
        let devices = out.virtio_count();
        if devices > crate::virtio::MAX_DEVICES {
            return Err(ArgsError::TooManyDevices(devices));
        }
        out.payload = match (guest, kernel) {
            (Some(_), Some(_)) => return Err(ArgsError::Conflict),
            (Some(g), None) => Payload::Guest(g),
            (None, Some(k)) => Payload::Kernel(k),
            (None, None) => Payload::Guest("hello".into()),
        };
        Ok(out)
    }

    /// How many virtio devices the options ask for.
    pub fn virtio_count(&self) -> usize {
        self.disks.len()
            + self.nets.len()
            + usize::from(self.rng)
            + usize::from(self.console.is_some())
            + self.vhost_user.len()
    }

    /// The command line a kernel gets: `--cmdline`, or [`DEFAULT_CMDLINE`].
    pub fn kernel_cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn p(args: &[&str]) -> Result<Args, ArgsError> {
        Args::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults_boot_hello_with_64m() {
        assert_eq!(p(&[]).unwrap(), Args::default());
    }

    #[test]
    fn options_parse_and_errors_name_the_argument() {
        let a = p(&[
            "--memory",
            "size=128M",
            "--guest",
            "pio_loop",
            "--param",
            "5",
        ])
        .unwrap();
        assert_eq!((a.memory, a.param), (128 << 20, 5));
        assert_eq!(a.payload, Payload::Guest("pio_loop".into()));
        let a = p(&[
            "--kernel",
            "/k",
            "--cmdline",
            "console=ttyS0",
            "-h",
            "--stats",
        ])
        .unwrap();
        assert!(a.stats);
        assert_eq!(a.payload, Payload::Kernel("/k".into()));
        assert!(a.help && a.cmdline.is_some());
        assert_eq!(
            p(&["--bogus"]).unwrap_err().to_string(),
            "unknown argument `--bogus` (try --help)"
        );
        assert_eq!(
            p(&["--guest"]).unwrap_err(),
            ArgsError::MissingValue("--guest".into())
        );
        let e = p(&["--memory", "size=12Q"]).unwrap_err().to_string();
        assert!(e.contains("--memory size") && e.contains("12Q"), "{e}");
        assert!(p(&["--memory", "12M"])
            .unwrap_err()
            .to_string()
            .contains("size=SIZE"));
        assert!(p(&["--memory", "size=1M"]).is_err());
        assert!(p(&["--memory", "size=8G"]).is_err());
        assert!(p(&["--param", "x"])
            .unwrap_err()
            .to_string()
            .contains("--param"));
        assert_eq!(
            p(&["--guest", "a", "--kernel", "b"]).unwrap_err(),
            ArgsError::Conflict
        );
        assert_eq!(parse_size("x", "4k").unwrap(), 4096);
        assert_eq!(
            p(&["--memory", "size=64M,shared=on"]).unwrap_err(),
            ArgsError::Invalid {
                arg: "--memory".into(),
                value: "shared=on".into(),
                why: "expected size=SIZE".into()
            }
        );
        assert_eq!(parse_size("x", "1g").unwrap(), 1 << 30);
        assert!(parse_size("x", "99999999999999G").is_err());
    }

    #[test]
    fn linux_options_need_a_kernel_and_default_the_cmdline() {
        let a = p(&[
            "--kernel",
            "/vmlinuz",
            "--initramfs",
            "/l2.cpio.gz",
            "--memory",
            "size=256M",
        ])
        .unwrap();
        assert_eq!(a.payload, Payload::Kernel("/vmlinuz".into()));
        assert_eq!(
            a.initramfs.as_deref(),
            Some(std::path::Path::new("/l2.cpio.gz"))
        );
        assert_eq!(a.memory, 256 << 20);
        assert_eq!(a.kernel_cmdline(), DEFAULT_CMDLINE);
        let a = p(&["--kernel", "/k", "--cmdline", "console=ttyS0 quiet"]).unwrap();
        assert_eq!(a.kernel_cmdline(), "console=ttyS0 quiet");
        let e = p(&["--initramfs", "/i"]).unwrap_err();
        assert_eq!(e.to_string(), "`--initramfs` needs `--kernel`");
        assert_eq!(
            p(&["--guest", "hello", "--cmdline", "x"]).unwrap_err(),
            ArgsError::NeedsKernel("--cmdline")
        );
        assert_eq!(
            p(&["--kernel", "/k", "--initramfs"]).unwrap_err(),
            ArgsError::MissingValue("--initramfs".into())
        );
    }

    #[test]
    fn device_options_parse_like_cloud_hypervisor() {
        let a = p(&[
            "--kernel",
            "/k",
            "--disk",
            "path=/dev/vda",
            "--disk",
            "readonly=on,path=/img",
            "--net",
            "tap=tap0",
            "--net",
            "tap=tap1,mac=02:00:00:aa:bb:0c",
            "--rng",
            "--console",
            "--cpus",
            "boot=4",
        ])
        .unwrap();
        assert_eq!(
            a.disks,
            vec![
                DiskArg {
                    path: "/dev/vda".into(),
                    readonly: false
                },
                DiskArg {
                    path: "/img".into(),
                    readonly: true
                }
            ]
        );
        assert_eq!(
            a.nets[0],
            NetArg {
                tap: "tap0".into(),
                mac: None
            }
        );
        assert_eq!(a.nets[1].mac, Some([2, 0, 0, 0xaa, 0xbb, 0x0c]));
        assert!(a.rng);
        assert_eq!((&a.console, a.cpus), (&Some(ConsoleArg::Tty), 4));
        assert_eq!(a.virtio_count(), 6);
        // `--console` takes an optional value: tty, file=PATH, or nothing before the next option.
        let a = p(&["--kernel", "/k", "--console", "file=/tmp/c", "--rng"]).unwrap();
        assert_eq!(a.console, Some(ConsoleArg::File("/tmp/c".into())));
        assert!(a.rng);
        let a = p(&["--kernel", "/k", "--console", "tty"]).unwrap();
        assert_eq!(a.console, Some(ConsoleArg::Tty));
        let a = p(&["--kernel", "/k", "--disk", "path=/d,readonly=off"]).unwrap();
        assert!(!a.disks[0].readonly);
        // --serial works for every payload.
        assert_eq!(p(&[]).unwrap().serial, SerialArg::Tty);
        for (v, want) in [
            ("off", SerialArg::Off),
            ("tty", SerialArg::Tty),
            ("file=/tmp/s", SerialArg::File("/tmp/s".into())),
        ] {
            assert_eq!(p(&["--serial", v]).unwrap().serial, want);
        }
    }

    #[test]
    fn bad_device_options_name_the_option_and_value() {
        let e = |args: &[&str]| {
            let mut v = vec!["--kernel", "/k"];
            v.extend_from_slice(args);
            p(&v).unwrap_err().to_string()
        };
        for (args, want) in [
            (
                &["--disk", "readonly=on"][..],
                "`--disk`: path= is required",
            ),
            (&["--disk", "path="], "empty path"),
            (
                &["--disk", "path=/d,size=1G"],
                "unknown key `size` (expected path, readonly)",
            ),
            (
                &["--disk", "path=/d,readonly=maybe"],
                "`maybe` for `--disk readonly`: expected on or off",
            ),
            (&["--disk", "path=/d,path=/e"], "`path` given twice"),
            (&["--disk", "/dev/vda"], "expected path=, readonly="),
            (
                &["--net", "mac=52:54:00:00:00:01"],
                "`--net`: tap= is required",
            ),
            (
                &["--net", "tap=a-name-far-too-long"],
                "`--net tap`: an interface name has 1-15 bytes",
            ),
            (
                &["--net", "tap=t,mac=52:54:00:00:00"],
                "expected six hex bytes",
            ),
            (
                &["--net", "tap=t,mac=52:54:00:00:00:01:02"],
                "more than six bytes",
            ),
            (
                &["--net", "tap=t,mac=52:54:zz:00:00:01"],
                "`zz` is not a hex byte",
            ),
            (&["--net", "tap=t,mac=01:00:5e:00:00:01"], "multicast"),
            (
                &["--console", "pty"],
                "`pty` for `--console`: expected tty or file=PATH",
            ),
            (&["--console", "file="], "expected tty or file=PATH"),
            (
                &["--serial", "pty"],
                "`pty` for `--serial`: expected tty, off or file=PATH",
            ),
            (&["--serial", "file="], "expected tty, off or file=PATH"),
            (
                &["--cpus", "boot=0"],
                "`0` for `--cpus boot`: expected 1 to 32",
            ),
            (&["--cpus", "boot=33"], "expected 1 to 32"),
            (&["--cpus", "boot=two"], "`two` for `--cpus boot`"),
            (&["--cpus", "max=2"], "unknown key `max`"),
            (&["--disk"], "`--disk` needs a value"),
        ] {
            let got = e(args);
            assert!(got.contains(want), "{args:?}: {got}");
        }
        let many: Vec<String> = ["--kernel", "/k"]
            .iter()
            .map(|s| s.to_string())
            .chain(
                (0..=crate::virtio::MAX_DEVICES)
                    .flat_map(|i| ["--disk".to_string(), format!("path=/d{i}")]),
            )
            .collect();
        assert_eq!(
            Args::parse(many).unwrap_err(),
            ArgsError::TooManyDevices(crate::virtio::MAX_DEVICES + 1)
        );
        // Devices and vCPUs belong to a kernel's machine.
        for (args, name) in [
            (&["--rng"][..], "--rng"),
            (&["--console"], "--console"),
            (&["--disk", "path=/d"], "--disk"),
            (&["--net", "tap=t"], "--net"),
            (&["--cpus", "boot=2"], "--cpus"),
        ] {
            assert_eq!(p(args).unwrap_err(), ArgsError::NeedsKernel(name));
        }
    }

    #[test]
    fn snapshot_and_restore_options_parse() {
        let a = p(&["--guest", "counter", "--snapshot", "path=/s,after=250"]).unwrap();
        assert_eq!(
            a.snapshot,
            Some(SnapshotArg {
                dir: "/s".into(),
                after_ms: 250
            })
        );
        let a = p(&[
            "--restore",
            "path=/s",
            "--data-log",
            "/l",
            "--serial",
            "off",
        ])
        .unwrap();
        assert_eq!(
            (a.restore.as_deref(), a.data_log.as_deref()),
            (Some(Path::new("/s")), Some(Path::new("/l")))
        );
        assert_eq!(p(&["--restore", "/d"]).unwrap().restore, Some("/d".into()));
        let a = p(&["--restore", "path=/d,memory=mmap"]).unwrap();
        assert!(a.restore_mmap);
        assert!(
            !p(&["--restore", "path=/d,memory=copy"])
                .unwrap()
                .restore_mmap
        );
        // Device options give a restored machine its backends; devices=snapshot trusts the
        // snapshot's own.
        let a = p(&["--restore", "path=/d", "--disk", "path=/x", "--rng"]).unwrap();
        assert_eq!(
            (a.disks.len(), a.rng, a.restore_devices_from_snapshot),
            (1, true, false)
        );
        let a = p(&["--restore", "path=/d,devices=snapshot,memory=mmap"]).unwrap();
        assert!(a.restore_devices_from_snapshot && a.restore_mmap);
        assert!(
            !p(&["--restore", "path=/d,devices=args"])
                .unwrap()
                .restore_devices_from_snapshot
        );
        for (args, what) in [
            (&["--restore", "path=/s,devices=x"][..], "args or snapshot"),
            (
                &["--restore", "/s", "--cpus", "boot=2"][..],
                "`--cpus` cannot be used",
            ),
            (&["--snapshot", "after=1"][..], "path= is required"),
            (&["--snapshot", "path=/s,after=x"][..], "invalid digit"),
            (&["--snapshot", "path=,after=1"][..], "empty path"),
            (&["--restore", "dir=/s"][..], "unknown key `dir`"),
            (&["--restore", "memory=mmap"][..], "path= is required"),
            (&["--restore", "path=/s,memory=x"][..], "copy or mmap"),
            (&["--restore", "path="][..], "empty path"),
            (
                &["--restore", "/s", "--guest", "hello"][..],
                "`--guest` cannot be used",
            ),
        ] {
            let e = p(args).unwrap_err().to_string();
            assert!(e.contains(what), "{args:?}: {e}");
        }
    }
}
