//! Command-line parsing for the `vmkit-vhost-user` binary.
//!
//! ```text
//! vmkit-vhost-user blk --socket PATH --disk PATH [--readonly] [--num-queues N]
//!                      [--queue-size N] [--serial ID] [--logical-block-size 512|4096]
//!                      [--once] [--log-level LEVEL]
//! vmkit-vhost-user rng --socket PATH [--once] [--log-level LEVEL]
//! vmkit-vhost-user console --socket PATH [--output FILE [--input FILE] | --connect PATH]
//!                      [--once] [--log-level LEVEL]
//! vmkit-vhost-user net --socket PATH --tap NAME [--mac MAC] [--mtu N] [--queue-size N]
//!                      [--once] [--log-level LEVEL]
//! ```
//!
//! Flag names follow qemu-storage-daemon's and Cloud Hypervisor's vhost-user backends
//! (`num-queues`, `queue-size`, `serial`/`id`, `readonly`, `logical-block-size`); both
//! `--flag value` and `--flag=value` are accepted. Every error names the argument at fault.

use std::path::PathBuf;

use crate::blk::BlkOptions;

/// Usage text printed by `--help` and after argument errors.
pub const USAGE: &str = "\
usage: vmkit-vhost-user <device> [options]

devices:
  blk       virtio-blk over a raw image file
  rng       virtio-rng fed by getrandom(2)
  net       virtio-net attached to a Linux TAP interface
  console   virtio-console on stdio, files or a Unix socket

common options:
  --socket PATH            Unix socket to listen on (required); the frontend connects to it
  --once                   exit after the first frontend disconnects
  --log-level LEVEL        error, warn, info (default), debug or trace
  -h, --help               this text

blk options:
  --disk PATH              raw image file (required; alias --path)
  --readonly               export read-only (alias --read-only)
  --num-queues N           request queues, 1-64 (default 1)
  --queue-size N           entries per queue, a power of two 2-32768 (default 128;
                           keep it equal to the frontend's queue-size)
  --serial ID              serial returned by GET_ID, at most 20 bytes (alias --id)
  --logical-block-size N   512 or 4096 (default 512)

net options:
  --tap NAME               TAP interface, created if absent (required; alias --ifname)
  --mac MAC                MAC address shown to the guest (default 52:54:00:12:34:56;
                           QEMU's virtio-net-pci mac= is what the guest actually uses)
  --mtu N                  MTU shown to the guest (default 1500)
  --queue-size N           entries per queue (default 256)

console options (default: the daemon's stdin and stdout):
  --output FILE            append guest output to FILE
  --input FILE             read guest input from FILE (with --output)
  --connect PATH           both directions over the Unix socket PATH

SIGTERM or SIGINT stops the daemon cleanly: in-flight requests complete and the image is
flushed before it exits.";

/// Errors in the command line. Each names the argument at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// No device subcommand.
    #[error("missing device: expected 'blk', 'console', 'net' or 'rng'")]
    MissingDevice,
    /// An unknown device subcommand.
    #[error("unknown device '{0}': expected 'blk', 'console', 'net' or 'rng'")]
    UnknownDevice(String),
    /// An argument the device does not take.
    #[error("unknown argument '{arg}' for '{device}'")]
    UnknownArgument {
        /// The device.
        device: &'static str,
        /// The argument.
        arg: String,
    },
    /// A flag that needs a value came last.
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    /// A flag that takes no value was given one.
    #[error("{0} takes no value")]
    UnexpectedValue(&'static str),
    /// A required flag is absent.
    #[error("missing required argument {0}")]
    Required(&'static str),
    /// A value is out of range or malformed.
    #[error("{flag}: {problem}, got '{value}'")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What was expected.
        problem: &'static str,
    },
    /// A flag given twice.
    #[error("{0} given more than once")]
    Duplicate(&'static str),
}

/// What the binary should run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Print [`USAGE`].
    Help,
    /// Serve a block device.
    Blk(BlkOptions, Common),
    /// Serve an entropy device.
    Rng(Common),
    /// Serve a network card.
    Net(NetOptions, Common),
    /// Serve a console.
    Console(ConsoleOptions, Common),
}

/// Where a console's bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOptions {
    /// The daemon's stdin and stdout.
    Stdio,
    /// Output appended to a file, input (optional) read from another.
    File {
        /// Output file.
        output: PathBuf,
        /// Input file.
        input: Option<PathBuf>,
    },
    /// Both directions over a Unix stream socket the daemon connects to.
    Unix(PathBuf),
}

/// Options of the `net` device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOptions {
    /// TAP interface to attach (created if absent).
    pub tap: String,
    /// MAC address reported to the guest.
    pub mac: [u8; 6],
    /// MTU reported to the guest.
    pub mtu: u16,
    /// Size of each queue.
    pub queue_size: u16,
}

/// Options every device takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Common {
    /// The Unix socket to listen on.
    pub socket: PathBuf,
    /// Exit after the first connection.
    pub once: bool,
    /// Log level.
    pub log_level: log::LevelFilter,
}

/// Flags, canonical name first, then aliases; `true` when the flag takes a value.
const BLK_FLAGS: &[(&[&str], bool)] = &[
    (&["--disk", "--path"], true),
    (&["--readonly", "--read-only"], false),
    (&["--num-queues"], true),
    (&["--queue-size"], true),
    (&["--serial", "--id"], true),
    (&["--logical-block-size"], true),
];
const NET_FLAGS: &[(&[&str], bool)] = &[
    (&["--tap", "--ifname"], true),
    (&["--mac"], true),
    (&["--mtu"], true),
    (&["--queue-size"], true),
];
const CONSOLE_FLAGS: &[(&[&str], bool)] = &[
    (&["--output"], true),
    (&["--input"], true),
    (&["--connect"], true),
];
const COMMON_FLAGS: &[(&[&str], bool)] = &[
    (&["--socket"], true),
    (&["--once"], false),
    (&["--log-level"], true),
];

/// Splits `args` into (canonical flag, value) pairs, checking names, values and duplicates.
fn split_flags(
    device: &'static str,
    args: &[String],
    flags: &[&[(&'static [&'static str], bool)]],
) -> Result<Vec<(&'static str, Option<String>)>, CliError> {
    let mut out: Vec<(&'static str, Option<String>)> = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let Some(&(names, takes_value)) = flags
            .iter()
            .flat_map(|f| f.iter())
            .find(|(names, _)| names.contains(&name))
        else {
            return Err(CliError::UnknownArgument {
                device,
                arg: arg.clone(),
            });
        };
        let canonical = names[0];
        let value = match (takes_value, inline) {
            (true, Some(v)) => Some(v),
            (true, None) => Some(
                it.next()
                    .cloned()
                    .ok_or(CliError::MissingValue(canonical))?,
            ),
            (false, Some(_)) => return Err(CliError::UnexpectedValue(canonical)),
            (false, None) => None,
        };
        if out.iter().any(|(n, _)| *n == canonical) {
            return Err(CliError::Duplicate(canonical));
        }
        out.push((canonical, value));
    }
    Ok(out)
}

fn value<'a>(flags: &'a [(&'static str, Option<String>)], name: &str) -> Option<&'a str> {
    flags
        .iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.as_deref())
}

fn present(flags: &[(&'static str, Option<String>)], name: &str) -> bool {
    flags.iter().any(|(n, _)| *n == name)
}

fn parse_u32(
    flag: &'static str,
    v: &str,
    ok: impl Fn(u32) -> bool,
    problem: &'static str,
) -> Result<u32, CliError> {
    match v.parse::<u32>() {
        Ok(n) if ok(n) => Ok(n),
        _ => Err(CliError::Invalid {
            flag,
            value: v.to_string(),
            problem,
        }),
    }
}

fn common(flags: &[(&'static str, Option<String>)]) -> Result<Common, CliError> {
    let socket = value(flags, "--socket").ok_or(CliError::Required("--socket"))?;
    if socket.is_empty() {
        return Err(CliError::Invalid {
            flag: "--socket",
            value: String::new(),
            problem: "expected a path",
        });
    }
    let log_level = match value(flags, "--log-level") {
        None => log::LevelFilter::Info,
        Some(v) => v.parse().map_err(|_| CliError::Invalid {
            flag: "--log-level",
            value: v.to_string(),
            problem: "expected off, error, warn, info, debug or trace",
        })?,
    };
    Ok(Common {
        socket: PathBuf::from(socket),
        once: present(flags, "--once"),
        log_level,
    })
}

fn blk(flags: &[(&'static str, Option<String>)]) -> Result<BlkOptions, CliError> {
    let disk = value(flags, "--disk").ok_or(CliError::Required("--disk"))?;
    let mut o = BlkOptions::new(disk);
    o.readonly = present(flags, "--readonly");
    if let Some(v) = value(flags, "--num-queues") {
        o.num_queues = parse_u32(
            "--num-queues",
            v,
            |n| (1..=64).contains(&n),
            "expected an integer from 1 to 64",
        )? as u16;
    }
    if let Some(v) = value(flags, "--queue-size") {
        o.queue_size = parse_u32(
            "--queue-size",
            v,
            |n| (2..=32768).contains(&n) && n.is_power_of_two(),
            "expected a power of two from 2 to 32768",
        )? as u16;
    }
    if let Some(v) = value(flags, "--serial") {
        if v.len() > 20 {
            return Err(CliError::Invalid {
                flag: "--serial",
                value: v.to_string(),
                problem: "expected at most 20 bytes",
            });
        }
        o.serial = Some(v.to_string());
    }
    if let Some(v) = value(flags, "--logical-block-size") {
        o.logical_block_size = parse_u32(
            "--logical-block-size",
            v,
            |n| n == 512 || n == 4096,
            "expected 512 or 4096",
        )?;
    }
    Ok(o)
}

fn parse_mac(v: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = v.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn net(flags: &[(&'static str, Option<String>)]) -> Result<NetOptions, CliError> {
    let tap = value(flags, "--tap").ok_or(CliError::Required("--tap"))?;
    if tap.is_empty() || tap.len() > 15 {
        return Err(CliError::Invalid {
            flag: "--tap",
            value: tap.to_string(),
            problem: "expected an interface name of 1 to 15 bytes",
        });
    }
    let defaults = vmkit_virtio::net::NetConfig::default();
    let mut o = NetOptions {
        tap: tap.to_string(),
        mac: defaults.mac,
        mtu: defaults.mtu,
        queue_size: defaults.queue_size,
    };
    if let Some(v) = value(flags, "--mac") {
        o.mac = parse_mac(v).ok_or(CliError::Invalid {
            flag: "--mac",
            value: v.to_string(),
            problem: "expected six hex bytes like 52:54:00:12:34:56",
        })?;
    }
    if let Some(v) = value(flags, "--mtu") {
        o.mtu = parse_u32(
            "--mtu",
            v,
            |n| (68..=65535).contains(&n),
            "expected 68 to 65535",
        )? as u16;
    }
    if let Some(v) = value(flags, "--queue-size") {
        o.queue_size = parse_u32(
            "--queue-size",
            v,
            |n| (2..=32768).contains(&n) && n.is_power_of_two(),
            "expected a power of two from 2 to 32768",
        )? as u16;
    }
    Ok(o)
}

fn console(flags: &[(&'static str, Option<String>)]) -> Result<ConsoleOptions, CliError> {
    match (
        value(flags, "--output"),
        value(flags, "--input"),
        value(flags, "--connect"),
    ) {
        (None, None, None) => Ok(ConsoleOptions::Stdio),
        (Some(o), i, None) => Ok(ConsoleOptions::File {
            output: o.into(),
            input: i.map(PathBuf::from),
        }),
        (None, Some(_), None) => Err(CliError::Required("--output")),
        (None, None, Some(c)) => Ok(ConsoleOptions::Unix(c.into())),
        (_, _, Some(c)) => Err(CliError::Invalid {
            flag: "--connect",
            value: c.to_string(),
            problem: "cannot be combined with --output or --input",
        }),
    }
}

/// Parses the arguments after the program name.
///
/// # Errors
/// [`CliError`] naming the argument at fault.
pub fn parse(args: &[String]) -> Result<Command, CliError> {
    let Some(device) = args.first() else {
        return Err(CliError::MissingDevice);
    };
    let rest = &args[1..];
    if matches!(device.as_str(), "-h" | "--help" | "help")
        || rest.iter().any(|a| a == "-h" || a == "--help")
    {
        return Ok(Command::Help);
    }
    match device.as_str() {
        "blk" => {
            let flags = split_flags("blk", rest, &[COMMON_FLAGS, BLK_FLAGS])?;
            let c = common(&flags)?;
            Ok(Command::Blk(blk(&flags)?, c))
        }
        "rng" => {
            let flags = split_flags("rng", rest, &[COMMON_FLAGS])?;
            Ok(Command::Rng(common(&flags)?))
        }
        "net" => {
            let flags = split_flags("net", rest, &[COMMON_FLAGS, NET_FLAGS])?;
            let c = common(&flags)?;
            Ok(Command::Net(net(&flags)?, c))
        }
        "console" => {
            let flags = split_flags("console", rest, &[COMMON_FLAGS, CONSOLE_FLAGS])?;
            let c = common(&flags)?;
            Ok(Command::Console(console(&flags)?, c))
        }
        other => Err(CliError::UnknownDevice(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_blk_with_every_flag() {
        let c = parse(&args(
            "blk --socket /tmp/s --disk=/tmp/d --readonly --num-queues 4 --queue-size=256 \
             --id disk0 --logical-block-size 4096 --once --log-level debug",
        ))
        .unwrap();
        let Command::Blk(o, c) = c else {
            panic!("{c:?}")
        };
        assert_eq!(o.disk, PathBuf::from("/tmp/d"));
        assert!(o.readonly);
        assert_eq!(
            (o.num_queues, o.queue_size, o.logical_block_size),
            (4, 256, 4096)
        );
        assert_eq!(o.serial.as_deref(), Some("disk0"));
        assert_eq!(c.socket, PathBuf::from("/tmp/s"));
        assert!(c.once);
        assert_eq!(c.log_level, log::LevelFilter::Debug);
    }

    #[test]
    fn defaults_match_qemu() {
        let Command::Blk(o, c) = parse(&args("blk --socket s --path d")).unwrap() else {
            panic!()
        };
        assert_eq!(o, BlkOptions::new("d"));
        assert_eq!((o.num_queues, o.queue_size), (1, 128));
        assert!(!c.once);
        assert_eq!(c.log_level, log::LevelFilter::Info);
        assert_eq!(
            parse(&args("rng --socket s")).unwrap(),
            Command::Rng(Common {
                socket: "s".into(),
                once: false,
                log_level: log::LevelFilter::Info
            })
        );
    }

    #[test]
    fn errors_name_the_argument() {
        let cases = [
            ("", "missing device"),
            ("tap --socket s", "unknown device 'tap'"),
            (
                "console --socket s --input i",
                "missing required argument --output",
            ),
            (
                "console --socket s --output o --connect c",
                "--connect: cannot be combined",
            ),
            (
                "console --socket s --tap t",
                "unknown argument '--tap' for 'console'",
            ),
            ("net --socket s", "missing required argument --tap"),
            (
                "net --socket s --tap 0123456789abcdef",
                "--tap: expected an interface name",
            ),
            ("net --socket s --tap t --mac 52:54:00:12:34", "--mac"),
            ("net --socket s --tap t --mac 52:54:00:12:34:zz", "--mac"),
            ("net --socket s --tap t --mac 52:54:00:12:34:56:78", "--mac"),
            (
                "net --socket s --tap t --mtu 10",
                "--mtu: expected 68 to 65535, got '10'",
            ),
            ("net --socket s --tap t --queue-size 3", "--queue-size"),
            (
                "net --socket s --tap t --disk d",
                "unknown argument '--disk' for 'net'",
            ),
            ("blk --disk d", "missing required argument --socket"),
            ("blk --socket s", "missing required argument --disk"),
            (
                "blk --socket s --disk d --num-queues 0",
                "--num-queues: expected an integer from 1 to 64, got '0'",
            ),
            ("blk --socket s --disk d --num-queues x", "--num-queues"),
            (
                "blk --socket s --disk d --queue-size 100",
                "--queue-size: expected a power of two",
            ),
            (
                "blk --socket s --disk d --serial 123456789012345678901",
                "--serial",
            ),
            (
                "blk --socket s --disk d --logical-block-size 1024",
                "--logical-block-size",
            ),
            ("blk --socket s --disk d --log-level loud", "--log-level"),
            (
                "blk --socket s --disk d --bogus",
                "unknown argument '--bogus' for 'blk'",
            ),
            (
                "rng --socket s --disk d",
                "unknown argument '--disk' for 'rng'",
            ),
            ("blk --socket s --disk", "--disk needs a value"),
            (
                "blk --socket s --disk d --readonly=yes",
                "--readonly takes no value",
            ),
            (
                "blk --socket s --disk d --path e",
                "--disk given more than once",
            ),
            ("blk --socket= --disk d", "--socket: expected a path"),
        ];
        for (line, want) in cases {
            let e = parse(&args(line)).unwrap_err().to_string();
            assert!(e.contains(want), "{line:?}: {e:?} lacks {want:?}");
        }
    }

    #[test]
    fn parses_net() {
        let Command::Net(o, c) = parse(&args(
            "net --socket s --ifname vu0 --mac 02:00:00:aa:BB:0c --mtu 9000 --queue-size 512",
        ))
        .unwrap() else {
            panic!()
        };
        assert_eq!(o.tap, "vu0");
        assert_eq!(o.mac, [2, 0, 0, 0xaa, 0xbb, 0x0c]);
        assert_eq!((o.mtu, o.queue_size), (9000, 512));
        assert_eq!(c.socket, PathBuf::from("s"));
        let Command::Net(o, _) = parse(&args("net --socket s --tap t")).unwrap() else {
            panic!()
        };
        assert_eq!((o.mtu, o.queue_size), (1500, 256));
    }

    #[test]
    fn parses_console() {
        let con = |line: &str| match parse(&args(line)).unwrap() {
            Command::Console(o, _) => o,
            other => panic!("{other:?}"),
        };
        assert_eq!(con("console --socket s"), ConsoleOptions::Stdio);
        assert_eq!(
            con("console --socket s --connect /c"),
            ConsoleOptions::Unix("/c".into())
        );
        assert_eq!(
            con("console --socket s --output o --input i"),
            ConsoleOptions::File {
                output: "o".into(),
                input: Some("i".into())
            }
        );
    }

    #[test]
    fn help() {
        assert_eq!(parse(&args("--help")).unwrap(), Command::Help);
        assert_eq!(parse(&args("blk -h")).unwrap(), Command::Help);
        assert!(USAGE.contains("--num-queues"));
    }
}
