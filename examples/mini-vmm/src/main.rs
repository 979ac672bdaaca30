//! mini-vmm: a minimal VMM built from the vmkit crates.
//!
//! With no arguments it boots the bundled `hello` guest on KVM, shows its serial output and
//! exits with the status the guest reported. `--help` lists the options.
//!
//! Exit status: the guest's, 2 for a bad command line, 1 for a VMM error, and
//! [`SNAPSHOT_EXIT_STATUS`] (75) after `--snapshot` saved the VM.

use std::io::Write;
use std::process::ExitCode;

use mini_vmm::args::{self, Args, ConsoleArg, SerialArg};
use mini_vmm::input::Terminal;
use mini_vmm::snapshot::SNAPSHOT_EXIT_STATUS;
use mini_vmm::vmm::{Outcome, Vmm};
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    mini_vmm::vmm::trace_boot("main");
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mini-vmm: {e}");
            return ExitCode::from(2);
        }
    };
    if args.help {
        println!("{}", args::USAGE);
        return ExitCode::SUCCESS;
    }
    let serial: Box<dyn Write + Send> = match &args.serial {
        SerialArg::Tty => Box::new(std::io::stdout()),
        SerialArg::Off => Box::new(std::io::sink()),
        SerialArg::File(p) => match std::fs::File::create(p) {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!("mini-vmm: `--serial file={}`: {e}", p.display());
                return ExitCode::from(1);
            }
        },
    };
    // stdin is the guest's input: hvc0's with `--console tty` (its event loop reads it),
    // else COM1's with `--serial tty`. A terminal in our foreground is put in raw mode for the
    // run (see `mini_vmm::input`) and restored when `terminal` drops, before the last lines.
    let console_tty = matches!(args.console, Some(ConsoleArg::Tty));
    let serial_input = matches!(args.serial, SerialArg::Tty) && !console_tty;
    let terminal = if console_tty || serial_input {
        Terminal::take(0).ok().flatten()
    } else {
        None
    };
    let built = match &args.restore {
        Some(dir) => {
            let start = Instant::now();
            Vmm::restore(dir, &args, serial).inspect(|_| {
                eprintln!(
                    "mini-vmm: restored {} in {:.1} ms",
                    dir.display(),
                    start.elapsed().as_secs_f64() * 1e3
                )
            })
        }
        None => Vmm::new(&args, serial),
    };
    let result = built.and_then(|mut vmm| {
        if serial_input {
            vmm.serial_input = Some(0);
        }
        // `--snapshot` applies to restored machines too.
        vmm.snapshot_after = args
            .snapshot
            .as_ref()
            .map(|s| Duration::from_millis(s.after_ms));
        let outcome = vmm.run();
        if args.stats {
            eprintln!("{}", vmm.stats());
        }
        if let (Ok(Outcome::Paused), Some(snap)) = (&outcome, &args.snapshot) {
            let start = Instant::now();
            vmm.save_snapshot(&snap.dir)?;
            eprintln!(
                "mini-vmm: snapshot written to {} in {:.1} ms",
                snap.dir.display(),
                start.elapsed().as_secs_f64() * 1e3
            );
        }
        vmm.flush_data_log()?;
        outcome
    });
    drop(terminal);
    match result {
        Ok(Outcome::Exited(status)) => ExitCode::from(status.min(255) as u8),
        Ok(Outcome::Shutdown) => {
            eprintln!("mini-vmm: the guest shut down");
            ExitCode::from(0)
        }
        Ok(Outcome::PowerOff) => {
            eprintln!("mini-vmm: the guest powered off");
            ExitCode::from(0)
        }
        Ok(Outcome::Paused) => ExitCode::from(SNAPSHOT_EXIT_STATUS),
        Ok(Outcome::Reset) => {
            eprintln!("mini-vmm: the guest reset the machine");
            ExitCode::from(0)
        }
        Err(e) => {
            eprintln!("mini-vmm: {e}");
            ExitCode::from(1)
        }
    }
}
