//! Seeds and input decoding for the vmkit-paging fuzz targets.

use std::path::Path;

/// Writes the seed corpora of the vmkit-paging fuzz targets under `dir`.
pub fn write_seeds(_dir: &Path) -> std::io::Result<()> {
    // Filled in by the vmkit-paging crate's fuzz work; no targets yet.
    Ok(())
}
