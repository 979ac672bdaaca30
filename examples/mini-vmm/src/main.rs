//! mini-vmm: a minimal VMM built from the vmkit crates.
//!
//! With no arguments it boots the bundled `hello` guest on KVM, shows its serial output and
//! exits with the status the guest reported. `--help` lists the options.

use std::io::Write;
use std::process::ExitCode;

use mini_vmm::args::{self, Args, SerialArg};
use mini_vmm::vmm::{Outcome, Vmm};

fn main() -> ExitCode {
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
    let result = Vmm::new(&args, serial).and_then(|mut vmm| {
        let outcome = vmm.run();
        if args.stats {
            eprintln!("{}", vmm.stats());
        }
        outcome
    });
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
