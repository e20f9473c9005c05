//! The library's log lines (the `log` crate: a saved prefix ignored, a prefix not cached) on
//! stderr for the commands other than `serve`, whose tracing subscriber takes them instead.

struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            eprintln!("videollava: {}: {}", record.level().as_str().to_lowercase(), record.args());
        }
    }

    fn flush(&self) {}
}

/// Sends warnings and errors to stderr (once per process; later calls do nothing).
pub fn init() {
    if log::set_logger(&StderrLog).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}
