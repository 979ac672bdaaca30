//! Command-line parsing. Every error names the argument that was wrong.
//!
//! ```text
//! mini-vmm [--guest NAME | --kernel PATH] [--memory size=SIZE] [--cmdline TEXT] [--param N]
//!          [--stats]
//! ```

use std::path::PathBuf;

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
}

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
    /// Value the guest reads from its parameter port (0x510).
    pub param: u32,
    /// Print usage and exit.
    pub help: bool,
    /// Print exit statistics when the guest stops.
    pub stats: bool,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            payload: Payload::Guest("hello".into()),
            memory: 64 << 20,
            cmdline: None,
            param: 0,
            help: false,
            stats: false,
        }
    }
}

/// Usage text.
pub const USAGE: &str = "usage: mini-vmm [--guest NAME | --kernel PATH] [--memory size=SIZE] \
[--cmdline TEXT] [--param N] [--stats]

With no arguments, boots the bundled `hello` guest on KVM and exits with its status.
  --guest NAME        bundled guest: hello, pio_loop, mmio, paging, exits, counter
  --kernel PATH       kernel image to boot (ELF, PVH ELF or bzImage)
  --memory size=SIZE  guest RAM, e.g. size=128M (K, M, G suffixes; default 64M)
  --cmdline TEXT      kernel command line
  --param N           value the guest reads from port 0x510
  --stats             print per-exit-kind counts and handling latency at the end";

fn invalid(arg: &str, value: &str, why: impl Into<String>) -> ArgsError {
    ArgsError::Invalid {
        arg: arg.into(),
        value: value.into(),
        why: why.into(),
    }
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
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .ok_or_else(|| ArgsError::MissingValue(name.into()))
            };
            match arg.as_str() {
                "-h" | "--help" => out.help = true,
                "--stats" => out.stats = true,
                "--guest" => guest = Some(value("--guest")?),
                "--kernel" => kernel = Some(PathBuf::from(value("--kernel")?)),
                "--cmdline" => out.cmdline = Some(value("--cmdline")?),
                "--param" => {
                    let v = value("--param")?;
                    out.param = v
                        .parse()
                        .map_err(|e| invalid("--param", &v, format!("{e}")))?;
                }
                "--memory" => {
                    let v = value("--memory")?;
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
        out.payload = match (guest, kernel) {
            (Some(_), Some(_)) => return Err(ArgsError::Conflict),
            (Some(g), None) => Payload::Guest(g),
            (None, Some(k)) => Payload::Kernel(k),
            (None, None) => Payload::Guest("hello".into()),
        };
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(parse_size("x", "1g").unwrap(), 1 << 30);
        assert!(parse_size("x", "99999999999999G").is_err());
    }
}
