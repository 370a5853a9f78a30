//! Logging setup shared by every binary.

use hiway_config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber. `RUST_LOG`, when set, overrides `log.filter`.
/// Calling it twice is harmless (the second call does nothing), so the all-in-one binary and
/// tests can both call it.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
