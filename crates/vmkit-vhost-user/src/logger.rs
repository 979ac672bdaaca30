//! A minimal `log` sink for the binary: one line per record on stderr, with the time since
//! start, the level and the module, so a daemon's log can be read next to a guest console.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

struct StderrLogger {
    start: Instant,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let t = self.start.elapsed();
        // A closed stderr must not take the daemon down.
        let _ = writeln!(
            std::io::stderr().lock(),
            "[{:>5}.{:03} {:<5} {}] {}",
            t.as_secs(),
            t.subsec_millis(),
            record.level(),
            record.target(),
            record.args()
        );
    }

    fn flush(&self) {}
}

static LOGGER: OnceLock<StderrLogger> = OnceLock::new();

/// Sends `log` records up to `level` to stderr. Later calls only change the level.
pub fn init(level: log::LevelFilter) {
    let logger = LOGGER.get_or_init(|| StderrLogger {
        start: Instant::now(),
    });
    // Fails only if another logger was installed first; then that one keeps working.
    let _ = log::set_logger(logger);
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    #[test]
    fn init_twice_changes_level() {
        super::init(log::LevelFilter::Trace);
        log::trace!("logger test record");
        super::init(log::LevelFilter::Warn);
        assert_eq!(log::max_level(), log::LevelFilter::Warn);
        log::warn!("logger test warning");
    }
}
