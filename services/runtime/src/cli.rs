//! What every binary's command line and start-up share.

use std::path::PathBuf;

use hiway_config::{Config, ConfigError};
use tokio_util::sync::CancellationToken;

/// `--config PATH`: a file, or a directory of `*.toml` files, layered over the built-in
/// defaults (then `HIWAY_*` variables).
#[derive(Clone, Debug, clap::Args)]
pub struct ConfigArg {
    /// Configuration file or directory (layered over the built-in defaults).
    #[arg(long, short, global = true, env = "HIWAY_CONFIG")]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    /// Loads and validates the configuration.
    pub fn load(&self) -> Result<Config, ConfigError> {
        hiway_config::load(self.config.as_deref())
    }
}

/// Start-up of a service binary: loads the configuration, sets up logging, and returns the
/// stop token the first SIGTERM or ctrl-c cancels. Call it inside the tokio runtime.
pub fn start(arg: &ConfigArg) -> Result<(Config, CancellationToken), ConfigError> {
    let config = arg.load()?;
    crate::telemetry::init(&config.log);
    Ok((config, crate::stop_signal()))
}
