//! Process-wide logging: a `tracing-subscriber` writing to stderr, human-readable or JSON,
//! filtered by an `EnvFilter` directive. Only `main` calls [`init`]; library code never
//! installs a global subscriber.

use std::io::IsTerminal;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_or_explain() {
        for ok in ["info", "debug", "fedgate=debug,quinn=warn", "warn,fedgate::config=trace"] {
            assert!(filter(ok).is_ok(), "{ok}");
        }
        let err = filter("fedgate=loud").expect_err("bad level");
        assert!(err.to_string().starts_with("invalid log level \"fedgate=loud\""), "{err}");
    }
}
