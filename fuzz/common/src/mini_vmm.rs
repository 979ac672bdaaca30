//! mini-vmm's snapshot descriptions: `machine.txt` and `devices.bin` are read by
//! `--restore` from a directory the VMM does not control, so both decoders get fuzzed.

use std::path::Path;

use mini_vmm::args::{Args, ConsoleArg, DiskArg, NetArg, Payload};
use mini_vmm::devices::I8042State;
use mini_vmm::snapshot::{DeviceStates, Machine};
use vm_superio::serial::SerialState;

/// Fuzz target name.
pub const MINI_VMM_SNAPSHOT: &str = "mini_vmm_snapshot";

/// Decodes `data` as a machine description (first byte even) or a device-state file (odd):
/// never panics, and whatever decodes re-encodes to the same value. Returns whether it
/// decoded.
pub fn decode(data: &[u8]) -> bool {
    let Some((&sel, rest)) = data.split_first() else {
        return false;
    };
    if sel & 1 == 0 {
        let file = Path::new("machine.txt");
        let Ok(text) = std::str::from_utf8(rest) else {
            return false;
        };
        match Machine::parse(text, file) {
            Ok(m) => {
                // A parsed description re-encodes (paths are one-line text by construction)
                // and decodes to the same machine.
                let again = m.to_text(file).expect("a parsed machine must re-encode");
                let m2 = Machine::parse(&again, file).expect("a re-encoded machine must parse");
                assert_eq!(m2, m, "re-encoding changed the machine");
                true
            }
            Err(_) => false,
        }
    } else {
        let file = Path::new("devices.bin");
        match DeviceStates::from_bytes(rest, file) {
            Ok(s) => {
                let again = DeviceStates::from_bytes(&s.to_bytes(), file)
                    .expect("re-encoded device states must decode");
                assert_eq!(again, s, "re-encoding changed the device states");
                true
            }
            Err(_) => false,
        }
    }
}

/// Valid inputs: a Linux machine with every kind of device, the bundled-guest machine, and
/// the device states of a freshly built machine.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let file = Path::new("machine.txt");
    let linux = Machine {
        memory: 256 << 20,
        cpus: 2,
        linux: true,
        payload: Payload::Kernel("/vmlinuz".into()),
        param: 0,
        disks: vec![
            DiskArg {
                path: "/dev/vda".into(),
                readonly: false,
            },
            DiskArg {
                path: "/images/ro disk.img".into(),
                readonly: true,
            },
        ],
        disk_sizes: vec![Some(64 << 20), None],
        nets: vec![NetArg {
            tap: "tap0".into(),
            mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        }],
        rng: true,
        console: Some(ConsoleArg::File("/hvc0.out".into())),
    };
    let guest = Machine::from_args(&Args::default(), false);
    let with_sel = |sel: u8, bytes: &[u8]| {
        let mut v = vec![sel];
        v.extend_from_slice(bytes);
        v
    };
    let text = |m: &Machine| m.to_text(file).expect("seed machines are valid");
    let mut cmos_nvram = [0u8; 128];
    cmos_nvram[0x0b] = 0x02; // RTC status B: 24-hour mode
    let devices = DeviceStates {
        serial: SerialState::default(),
        i8042: I8042State {
            config: 0x47,
            output: Some(0xfa),
            pending: None,
            reset: false,
        },
        cmos_index: 0x0b,
        cmos_nvram,
        power_off: false,
        exit_status: Some(3),
    };
    vec![
        ("machine-linux", with_sel(0, text(&linux).as_bytes())),
        ("machine-guest", with_sel(0, text(&guest).as_bytes())),
        (
            "machine-v1",
            with_sel(
                0,
                b"mini-vmm-snapshot 1\nmemory 4194304\ncpus 1\nlinux 1\nkernel /k\ndisk rw /a\n",
            ),
        ),
        ("devices", with_sel(1, &devices.to_bytes())),
    ]
}

/// Writes the seeds under `dir/mini_vmm_snapshot`.
pub fn write_seeds(dir: &Path) -> std::io::Result<()> {
    crate::write_corpus(dir, MINI_VMM_SNAPSHOT, seeds())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_decodes() {
        for (name, bytes) in seeds() {
            assert!(decode(&bytes), "seed {name} does not decode");
        }
        assert!(!decode(b""));
        assert!(!decode(b"\x00not a machine"));
        assert!(!decode(b"\x01short"));
    }
}
