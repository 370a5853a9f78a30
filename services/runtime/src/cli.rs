//! What every binary's command line and start-up share.

use std::future::Future;
use std::path::PathBuf;

use hiway_config::{Config, ConfigError, RuntimeConfig};
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

/// A service binary's whole life: loads the configuration, builds the tokio runtime its
/// `[runtime]` section asks for, sets up logging, trace export and the stop token (cancelled
/// by the first SIGTERM or ctrl-c) inside it, runs `service` to its end, then sends the spans
/// still waiting. Spans are named after the binary (`service.name`: `hiway-ingress`, …).
///
/// The runtime is built here, not by `#[tokio::main]`, because its shape is configuration,
/// which must be read first.
pub fn serve<E, Fut>(
    arg: &ConfigArg,
    service: impl FnOnce(Config, CancellationToken) -> Fut,
) -> Result<(), E>
where
    Fut: Future<Output = Result<(), E>>,
    E: From<ConfigError> + From<std::io::Error>,
{
    let config = arg.load()?;
    runtime(&config.runtime)?.block_on(async {
        let telemetry =
            crate::telemetry::init_service(&config.log, &config.telemetry, &binary_name());
        let stop = crate::stop_signal();
        let result = service(config, stop).await;
        telemetry.shutdown().await;
        result
    })
}

/// This executable's file name, without extension: what its spans are named after.
fn binary_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "hiway".to_owned())
}

/// The tokio runtime `[runtime] worker_threads` describes: 1, the current-thread scheduler;
/// 0, the multi-threaded one with a worker per core; n, the multi-threaded one with n.
///
/// For 0 the number of cores is given to tokio rather than left to its default, which
/// `TOKIO_WORKER_THREADS` in the environment would override: hiway's own configuration
/// (file or `HIWAY_RUNTIME__WORKER_THREADS`) is the one place that decides.
pub fn runtime(config: &RuntimeConfig) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match config.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let n = if n == 0 {
                std::thread::available_parallelism().map_or(1, usize::from)
            } else {
                n
            };
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use tokio::runtime::RuntimeFlavor;

    use super::*;

    fn shape(worker_threads: usize) -> (RuntimeFlavor, usize) {
        let runtime = runtime(&RuntimeConfig { worker_threads }).unwrap();
        (
            runtime.handle().runtime_flavor(),
            runtime.metrics().num_workers(),
        )
    }

    #[test]
    fn one_worker_thread_means_the_current_thread_scheduler() {
        assert_eq!(shape(1), (RuntimeFlavor::CurrentThread, 1));
    }

    #[test]
    fn more_worker_threads_mean_the_multi_threaded_scheduler_with_that_many_and_zero_one_per_core()
    {
        assert_eq!(shape(3), (RuntimeFlavor::MultiThread, 3));
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(shape(0), (RuntimeFlavor::MultiThread, cores));
    }
}
