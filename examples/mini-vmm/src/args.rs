//! Command-line parsing. Every error names the argument that was wrong.
//!
//! ```text
//! mini-vmm [--guest NAME | --kernel PATH [--initramfs PATH] [--cmdline TEXT]]
//!          [--memory size=SIZE] [--param N] [--stats]
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
    /// An option that only makes sense with `--kernel`.
    #[error("`{0}` needs `--kernel`")]
    NeedsKernel(&'static str),
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
        }
    }
}

/// Usage text.
pub const USAGE: &str = "usage: mini-vmm [--guest NAME | --kernel PATH [--initramfs PATH] \
[--cmdline TEXT]] [--memory size=SIZE] [--param N] [--stats]

With no arguments, boots the bundled `hello` guest on KVM and exits with its status.
  --guest NAME        bundled guest: hello, pio_loop, mmio, paging, exits, counter
  --kernel PATH       kernel image to boot (ELF, PVH ELF or bzImage); a bzImage gets KVM's
                      in-kernel irqchip and PIT, and COM1 interrupts on IRQ 4
  --initramfs PATH    initial RAM disk for the kernel
  --memory size=SIZE  guest RAM, e.g. size=128M (K, M, G suffixes; default 64M)
  --cmdline TEXT      kernel command line (default: console=ttyS0 reboot=k panic=-1)
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
                "--initramfs" => out.initramfs = Some(PathBuf::from(value("--initramfs")?)),
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
        if kernel.is_none() {
            if out.initramfs.is_some() {
                return Err(ArgsError::NeedsKernel("--initramfs"));
            }
            if out.cmdline.is_some() {
                return Err(ArgsError::NeedsKernel("--cmdline"));
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

    /// The command line a kernel gets: `--cmdline`, or [`DEFAULT_CMDLINE`].
    pub fn kernel_cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)
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
}
