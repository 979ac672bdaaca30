//! Writes every fuzz target's seed corpus: `write-seeds [DIR]` (default `fuzz/corpus`).

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../corpus").to_string());
    vmkit_fuzz_common::write_all_seeds(std::path::Path::new(&dir))?;
    println!("seed corpora written under {dir}");
    Ok(())
}
