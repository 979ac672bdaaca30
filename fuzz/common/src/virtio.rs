//! Seeds and input decoding for the vmkit-virtio fuzz targets.

use std::path::Path;

/// Writes the seed corpora of the vmkit-virtio fuzz targets under `dir`.
pub fn write_seeds(_dir: &Path) -> std::io::Result<()> {
    // Filled in by the vmkit-virtio crate's fuzz work; no targets yet.
    Ok(())
}
