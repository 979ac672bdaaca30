//! Builds the guest workspace in `examples/guests` for `x86_64-unknown-none` and exports the
//! path of every guest binary as `VMKIT_GUEST_<NAME>` for `include_bytes!`.
//!
//! The nested cargo runs with its own target directory and with every variable removed that
//! would make it build for the host or instrument the guest (cargo-llvm-cov sets RUSTFLAGS,
//! wrappers and CARGO_TARGET_* variables for the host build; a guest must stay plain).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-none";
/// The guest binaries (`examples/guests/src/bin/<name>.rs`).
const GUESTS: &[&str] = &["hello", "pio_loop", "mmio", "paging", "exits", "counter"];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guests = manifest.join("../../../examples/guests");
    let guests = guests.canonicalize().unwrap_or(guests);
    for rel in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guests.join(rel).display());
    }

    ensure_target_installed();

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out.join("guests-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guests)
        .args([
            "build",
            "--release",
            "--bins",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    scrub_env(&mut cmd);
    let status = cmd.status().expect("failed to run cargo for the guests");
    assert!(
        status.success(),
        "building the guests in {} failed",
        guests.display()
    );

    for name in GUESTS {
        let bin = target_dir.join(TARGET).join("release").join(name);
        assert!(bin.exists(), "guest binary {} was not built", bin.display());
        println!(
            "cargo:rustc-env=VMKIT_GUEST_{}={}",
            name.to_uppercase(),
            bin.display()
        );
    }
}

/// Removes the variables that would leak the host build's configuration into the guest build.
fn scrub_env(cmd: &mut Command) {
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "LLVM_PROFILE_FILE",
        "CARGO_TARGET_DIR",
        "CARGO_INCREMENTAL",
    ] {
        cmd.env_remove(var);
    }
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_LLVM_COV")
            || key.starts_with("CARGO_TARGET_")
            || key.starts_with("CARGO_BUILD_")
            || key.starts_with("CARGO_PROFILE_")
        {
            cmd.env_remove(key);
        }
    }
}

/// Installs the guest target with rustup when the active toolchain lacks it (toolchain files
/// do not install targets automatically on every machine).
fn ensure_target_installed() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(sysroot) = sysroot {
        if Path::new(&sysroot)
            .join("lib/rustlib")
            .join(TARGET)
            .exists()
        {
            return;
        }
    }
    println!("cargo:warning=installing the {TARGET} target with rustup for the test guests");
    let mut cmd = Command::new("rustup");
    cmd.args(["target", "add", TARGET]);
    if let Ok(toolchain) = env::var("RUSTUP_TOOLCHAIN") {
        cmd.args(["--toolchain", &toolchain]);
    }
    let status = cmd.status().expect("failed to run rustup");
    assert!(status.success(), "`rustup target add {TARGET}` failed");
}
