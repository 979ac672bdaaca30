//! mini-vmm as a library: the pieces of the example VMM (argument parsing, devices, the
//! `Vmm` itself), so tests and later tools can drive them without spawning the binary.
//!
//! ```no_run
//! use mini_vmm::{args::Args, vmm::{Outcome, Vmm}};
//! let args = Args::parse(["--guest".to_string(), "hello".to_string()]).unwrap();
//! let mut vmm = Vmm::new(&args, std::io::stdout()).unwrap();
//! assert_eq!(vmm.run().unwrap(), Outcome::Exited(0));
//! ```

pub mod acpi;
pub mod args;
pub mod devices;
pub mod virtio;
pub mod vmm;
