//! Process-wide logging: a `tracing-subscriber` writing to stderr, human-readable or JSON,
//! filtered by an `EnvFilter` directive. Only `main` calls [`init`]; library code never
//! installs a global subscriber.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

/// The log line format (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event for a terminal.
    #[default]
    Human,
    /// One JSON object per line for log collectors.
    Json,
}

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid log level {filter:?}: {source} (e.g. info, debug, fedgate=debug,quinn=warn)")]
    Filter { filter: String, source: tracing_subscriber::filter::ParseError },
    #[error("cannot install the logger: {0}")]
    Install(String),
}

/// Builds the filter for `directives` (`info`, `fedgate=debug,quinn=warn`, ...).
pub fn filter(directives: &str) -> Result<EnvFilter, LoggingError> {
    EnvFilter::builder()
        .parse(directives)
        .map_err(|source| LoggingError::Filter { filter: directives.to_owned(), source })
}

/// Installs the global subscriber: logs go to stderr so that command output on stdout
/// (`fedgate analyze`) stays clean.
pub fn init(format: LogFormat, directives: &str) -> Result<(), LoggingError> {
    let filter = filter(directives)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
    result.map_err(|e| LoggingError::Install(e.to_string()))
}

/// Rate limit for one *kind* of log line (an accept that failed, a refused handshake): one
/// line per `every`, however many events and whatever their details (a remote port, a
/// timestamp) — keying the limit by the message would let details defeat it. The events held
/// back are counted and reported with the next line that passes.
#[derive(Debug)]
pub struct LogGate {
    every: Duration,
    last: Mutex<Option<Instant>>,
    held: AtomicU64,
}

impl LogGate {
    pub const fn new(every: Duration) -> Self {
        Self { every, last: Mutex::new(None), held: AtomicU64::new(0) }
    }

    /// `Some(n)` when a line may be logged now, `n` = events held back since the last one;
    /// `None` when this one is held back.
    pub fn pass(&self) -> Option<u64> {
        self.pass_at(Instant::now())
    }

    fn pass_at(&self, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|at| now.saturating_duration_since(at) < self.every) {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.held.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_gate_lets_one_line_per_interval_and_counts_the_rest() {
        let gate = LogGate::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(gate.pass_at(t0), Some(0));
        for s in 1..10 {
            assert_eq!(gate.pass_at(t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(gate.pass_at(t0 + Duration::from_secs(10)), Some(9), "held back: 9");
        assert_eq!(gate.pass_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(gate.pass_at(t0 + Duration::from_secs(30)), Some(1));
    }

    #[test]
    fn filters_parse_or_explain() {
        for ok in ["info", "debug", "fedgate=debug,quinn=warn", "warn,fedgate::config=trace"] {
            assert!(filter(ok).is_ok(), "{ok}");
        }
        let err = filter("fedgate=loud").expect_err("bad level");
        assert!(err.to_string().starts_with("invalid log level \"fedgate=loud\""), "{err}");
    }
}
