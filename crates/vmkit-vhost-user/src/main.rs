//! `vmkit-vhost-user`: vmkit's virtio devices as vhost-user backend daemons.
//! Run `vmkit-vhost-user --help` for the flags.

use std::process::ExitCode;
use std::sync::Arc;

use vmkit_vhost_user::cli::{self, Command, Common};
use vmkit_vhost_user::{
    blk_backend, console_backend, install_signal_handlers, logger, rng_backend, serve, tap_backend,
    QueueHandler, ServeOptions, Stop, VirtioBackend,
};

fn run<H: QueueHandler>(backend: VirtioBackend<H>, common: &Common, stop: &Stop) -> ExitCode {
    let opts = ServeOptions { once: common.once };
    match serve(Arc::new(backend), &common.socket, stop, opts) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = match cli::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmkit-vhost-user: {e}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    let common = match &cmd {
        Command::Help => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Command::Blk(_, c) | Command::Rng(c) | Command::Net(_, c) | Command::Console(_, c) => {
            c.clone()
        }
    };
    logger::init(common.log_level);
    let stop = match Stop::new() {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot create the stop eventfd: {e}");
            return ExitCode::FAILURE;
        }
    };
    // First, so that every thread started later inherits the blocked signal mask.
    if let Err(e) = install_signal_handlers(stop.clone()) {
        log::error!("{e}");
        return ExitCode::FAILURE;
    }
    match cmd {
        Command::Blk(opts, _) => match blk_backend(&opts) {
            Ok(b) => {
                log::info!(
                    "serving {} ({}{} queue(s) of {})",
                    opts.disk.display(),
                    if opts.readonly { "read-only, " } else { "" },
                    opts.num_queues,
                    opts.queue_size
                );
                run(b, &common, &stop)
            }
            Err(e) => {
                log::error!("--disk: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Rng(_) => run(rng_backend(), &common, &stop),
        Command::Console(opts, _) => {
            use vmkit_virtio::console::ConsoleBackend;
            let b = match &opts {
                cli::ConsoleOptions::Stdio => ConsoleBackend::stdio(),
                cli::ConsoleOptions::File { output, input } => {
                    ConsoleBackend::file(output, input.as_deref())
                }
                cli::ConsoleOptions::Unix(path) => ConsoleBackend::unix_socket(path),
            };
            match b {
                Ok(b) => run(console_backend(b), &common, &stop),
                Err(e) => {
                    log::error!("console: cannot open {opts:?}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Net(opts, _) => {
            let cfg = vmkit_virtio::net::NetConfig {
                mac: opts.mac,
                mtu: opts.mtu,
                queue_size: opts.queue_size,
            };
            match tap_backend(&opts.tap, cfg) {
                Ok(b) => run(b, &common, &stop),
                Err(e) => {
                    log::error!("--tap: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Help => ExitCode::SUCCESS,
    }
}
