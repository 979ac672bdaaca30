//! Shared pieces of vmkit's fuzz targets: how raw fuzzer bytes are decoded into inputs for
//! each crate, and the seed corpora (valid inputs the fuzzer starts mutating from).
//!
//! Each crate owns one module here. Every module exposes `write_seeds(dir)`, which writes
//! one sub-directory per fuzz target (named like the target) under `dir`. The `write-seeds`
//! binary calls all of them; unit tests check that the seeds are valid inputs.

#![deny(missing_docs)]

use std::path::Path;

pub mod memory;
pub mod mini_vmm;
pub mod paging;
pub mod vcpu;
pub mod virtio;

/// Writes one target's seeds as files `dir/target/NAME`.
pub fn write_corpus<N: AsRef<Path>>(
    dir: &Path,
    target: &str,
    seeds: impl IntoIterator<Item = (N, Vec<u8>)>,
) -> std::io::Result<()> {
    let target = dir.join(target);
    std::fs::create_dir_all(&target)?;
    for (name, bytes) in seeds {
        std::fs::write(target.join(name), bytes)?;
    }
    Ok(())
}

/// Writes the seed corpus of every fuzz target under `dir` (one sub-directory per target).
pub fn write_all_seeds(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    memory::write_seeds(dir)?;
    mini_vmm::write_seeds(dir)?;
    paging::write_seeds(dir)?;
    vcpu::write_seeds(dir)?;
    virtio::write_seeds(dir)?;
    Ok(())
}
