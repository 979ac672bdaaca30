//! Seeds and input decoding for the vmkit-vcpu fuzz targets.

use std::path::Path;

/// Writes the seed corpora of the vmkit-vcpu fuzz targets under `dir`.
pub fn write_seeds(_dir: &Path) -> std::io::Result<()> {
    // Filled in by the vmkit-vcpu crate's fuzz work; no targets yet.
    Ok(())
}
