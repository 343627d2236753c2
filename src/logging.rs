//! The process logger: `env_logger` (`RUST_LOG`, default `info`), except that a few
//! messages Pingora logs at ERROR in normal operation are logged at the level they
//! deserve.
//!
//! Each is matched by its target and its exact text, so every other error Pingora logs
//! stays an error.

use log::{Level, Log, Metadata, Record};

/// (target, message, level it is logged at).
const BENIGN: &[(&str, &str, Level)] = &[
    // An idle pooled upstream connection lost a race between worker threads
    // (cloudflare/pingora#998); the request goes on over a new connection.
    (
        "pingora_core::connectors",
        "failed to acquire reusable stream",
        Level::Debug,
    ),
];

/// Installs the process logger. Does nothing if one is installed already.
pub fn init() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Downgrading { inner })).is_ok() {
        log::set_max_level(max);
    }
}

/// The level a record is logged at: its own, or lower for a known benign message.
fn level_of(record: &Record<'_>) -> Level {
    if record.level() != Level::Error {
        return record.level();
    }
    let Some(text) = record.args().as_str() else {
        return record.level();
    };
    BENIGN
        .iter()
        .find(|(target, message, _)| record.target() == *target && text == *message)
        .map_or(record.level(), |(_, _, level)| *level)
}

/// A logger that passes every record to `inner`, the known benign ones at their own
/// level.
struct Downgrading<L> {
    inner: L,
}

impl<L: Log> Log for Downgrading<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        let level = level_of(record);
        if level == record.level() {
            return self.inner.log(record);
        }
        let metadata = Metadata::builder()
            .level(level)
            .target(record.target())
            .build();
        if !self.inner.enabled(&metadata) {
            return;
        }
        self.inner.log(
            &Record::builder()
                .metadata(metadata)
                .args(*record.args())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what reaches it at `Info` and above.
    #[derive(Default)]
    struct Captured(Mutex<Vec<(Level, String, String)>>);

    impl Log for Captured {
        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            metadata.level() <= Level::Info
        }

        fn log(&self, record: &Record<'_>) {
            if self.enabled(record.metadata()) {
                self.0.lock().unwrap().push((
                    record.level(),
                    record.target().to_string(),
                    record.args().to_string(),
                ));
            }
        }

        fn flush(&self) {}
    }

    fn send(logger: &Downgrading<Captured>, level: Level, target: &str, args: std::fmt::Arguments) {
        logger.log(
            &Record::builder()
                .level(level)
                .target(target)
                .args(args)
                .build(),
        );
    }

    #[test]
    fn only_the_known_benign_message_is_downgraded() {
        let logger = Downgrading {
            inner: Captured::default(),
        };
        let pool = "pingora_core::connectors";
        send(
            &logger,
            Level::Error,
            pool,
            format_args!("failed to acquire reusable stream"),
        );
        // Anything else, from the same target or with the same text elsewhere, stays.
        send(&logger, Level::Error, pool, format_args!("connect refused"));
        send(
            &logger,
            Level::Error,
            "pingora_proxy",
            format_args!("failed to acquire reusable stream"),
        );
        send(&logger, Level::Warn, pool, format_args!("a warning"));
        let seen = logger.inner.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                (
                    Level::Error,
                    pool.to_string(),
                    "connect refused".to_string()
                ),
                (
                    Level::Error,
                    "pingora_proxy".to_string(),
                    "failed to acquire reusable stream".to_string()
                ),
                (Level::Warn, pool.to_string(), "a warning".to_string()),
            ]
        );
    }

    #[test]
    fn a_downgraded_message_shows_when_its_level_is_on() {
        struct Everything(Mutex<Vec<Level>>);
        impl Log for Everything {
            fn enabled(&self, _: &Metadata<'_>) -> bool {
                true
            }
            fn log(&self, record: &Record<'_>) {
                self.0.lock().unwrap().push(record.level());
            }
            fn flush(&self) {}
        }
        let logger = Downgrading {
            inner: Everything(Mutex::new(Vec::new())),
        };
        logger.log(
            &Record::builder()
                .level(Level::Error)
                .target("pingora_core::connectors")
                .args(format_args!("failed to acquire reusable stream"))
                .build(),
        );
        assert_eq!(*logger.inner.0.lock().unwrap(), [Level::Debug]);
    }
}
