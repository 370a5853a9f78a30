//! What to run: the command line, and the settings a run derives from it.
//!
//! Every knob has a default that gives a full run of a few minutes on a 2-core machine;
//! `--smoke` shrinks everything to seconds so CI can check that the benchmark still runs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};

/// The broker `deploy/deps.sh` sets up.
const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The database `deploy/deps.sh` sets up; the bench creates its own database from it.
const DEFAULT_DATABASE_URL: &str = "postgres://hiway:hiway@127.0.0.1:5432/hiway";

/// The default ladder of offered rates (messages per second). It runs past where a 2-core
/// machine breaks; the ladder stops after two consecutive unsustained steps, so the tail
/// costs nothing when it is not reached. Steps are 250/s apart up to 5000/s, so that the
/// sustained rate (and its ratio to the baseline) is known to within 250/s wherever a 2-core
/// machine reaches its limit: it sustains 2750-3250/s, and with a gap from 3000 to 4000/s
/// the ladder could not tell 3000 from 3750.
const DEFAULT_RATES: &[u32] = &[
    250, 500, 750, 1000, 1250, 1500, 1750, 2000, 2250, 2500, 2750, 3000, 3250, 3500, 3750, 4000,
    4250, 4500, 4750, 5000, 6000, 8000,
];

/// hiway's benchmark: RabbitMQ alone (the baseline), hiway end to end at stepped rates, and
/// sender scaling on a slow destination, in one run, with a markdown report.
#[derive(Parser, Debug)]
#[command(version)]
pub struct Args {
    /// Directory holding hiway-ingress, hiway-transformer, hiway-sender and hiway-audit.
    /// Default: the directory of this executable, so target/release/hiway-bench uses the
    /// release binaries next to it (target/release).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// RabbitMQ. The bench uses its own name prefix and deletes what it declared.
    #[arg(long, env = "HIWAY_TEST_AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
    /// PostgreSQL, as a role allowed to create databases: the bench creates a fresh database
    /// from it for the audit trail and drops it at the end.
    #[arg(long, env = "HIWAY_TEST_DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    /// Seconds of load per end-to-end step, and of publishing for the baseline.
    /// Default 10 (1 with --smoke).
    #[arg(long)]
    pub step_seconds: Option<f64>,
    /// Offered rates of the end-to-end ladder, messages per second, comma separated.
    /// Default 250,500,…,5000 (every 250),6000,8000 (50,100 with --smoke).
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<u32>,
    /// Seconds of work per scaling cell at the cell's ideal rate (it sets how many messages
    /// are preloaded). Default 5 (1 with --smoke).
    #[arg(long)]
    pub scaling_seconds: Option<f64>,
    /// Which parts to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "baseline,e2e,scaling")]
    pub parts: Vec<Part>,
    /// A configuration override for every service process, `HIWAY_<SECTION>__<KEY>=VALUE`
    /// (repeatable), e.g. `HIWAY_DESTINATIONS__SINK__CONCURRENCY=64`. For diagnosis: the
    /// report lists every override, because the targets are about hiway as shipped.
    #[arg(long = "service-env", value_name = "KEY=VALUE")]
    pub service_env: Vec<String>,
    /// A quick run for CI: tiny durations, few steps; proves the benchmark runs and writes a
    /// report, says nothing about speed.
    #[arg(long)]
    pub smoke: bool,
    /// Also write the markdown report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A part of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// RabbitMQ alone, one hop.
    Baseline,
    /// hiway end to end at stepped rates.
    E2e,
    /// Sender processes × concurrency on a slow destination.
    Scaling,
}

/// Everything a run needs to know, resolved from [`Args`].
#[derive(Clone, Debug)]
pub struct Plan {
    /// A smoke run (the report says so).
    pub smoke: bool,
    /// Where the service binaries are.
    pub bin_dir: PathBuf,
    /// RabbitMQ.
    pub amqp_url: String,
    /// PostgreSQL admin URL (databases are created from it).
    pub database_url: String,
    /// Parts to run.
    pub parts: Vec<Part>,
    /// Load per end-to-end step.
    pub step: Duration,
    /// The ladder.
    pub rates: Vec<u32>,
    /// Publishing time of the baseline.
    pub baseline: Duration,
    /// Unreported load before the ladder, so the first step does not pay for cold
    /// connections, lazily grown buffers and pools, and PostgreSQL's first inserts.
    pub warmup: Duration,
    /// How long after a step's end its messages may still arrive and count as completed.
    pub grace: Duration,
    /// Longest wait for every queue to drain between steps.
    pub drain_timeout: Duration,
    /// Idle time after start-up before idle memory is read.
    pub settle: Duration,
    /// Delay of the slow destination used for scaling.
    pub slow_delay: Duration,
    /// Sender processes per scaling cell.
    pub scaling_processes: Vec<usize>,
    /// Concurrency per sender process per scaling cell.
    pub scaling_concurrency: Vec<usize>,
    /// Seconds of work per scaling cell at its ideal rate.
    pub scaling_seconds: f64,
    /// Configuration overrides for every service process.
    pub service_env: Vec<(String, String)>,
    /// The command line, for the report.
    pub command_line: String,
}

impl Plan {
    /// Resolves defaults (which depend on `--smoke`) and checks the values.
    pub fn from_args(args: &Args) -> anyhow::Result<Self> {
        let smoke = args.smoke;
        let step_seconds = args.step_seconds.unwrap_or(if smoke { 1.0 } else { 10.0 });
        if !(step_seconds > 0.0 && step_seconds.is_finite()) {
            bail!("--step-seconds must be a positive number of seconds");
        }
        let step = Duration::from_secs_f64(step_seconds);
        let mut rates = if args.rates.is_empty() {
            if smoke {
                vec![50, 100]
            } else {
                DEFAULT_RATES.to_vec()
            }
        } else {
            args.rates.clone()
        };
        rates.retain(|r| *r > 0);
        if rates.is_empty() {
            bail!("--rates needs at least one positive rate");
        }
        let scaling_seconds = args
            .scaling_seconds
            .unwrap_or(if smoke { 1.0 } else { 5.0 });
        if !(scaling_seconds > 0.0 && scaling_seconds.is_finite()) {
            bail!("--scaling-seconds must be a positive number of seconds");
        }
        let bin_dir = match &args.bin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()
                .context("cannot find this executable's path; pass --bin-dir")?
                .parent()
                .context("this executable has no directory; pass --bin-dir")?
                .to_path_buf(),
        };
        let service_env = args
            .service_env
            .iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if k.starts_with(hiway_config::ENV_PREFIX) => {
                    Ok((k.to_owned(), v.to_owned()))
                }
                _ => bail!("--service-env takes HIWAY_<SECTION>__<KEY>=VALUE, not {kv:?}"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut parts = args.parts.clone();
        parts.dedup();
        Ok(Self {
            smoke,
            bin_dir,
            amqp_url: args.amqp_url.clone(),
            database_url: args.database_url.clone(),
            parts,
            step,
            rates,
            baseline: step,
            warmup: if smoke {
                Duration::ZERO
            } else {
                Duration::from_secs(3)
            },
            grace: Duration::from_secs(1),
            drain_timeout: if smoke {
                Duration::from_secs(30)
            } else {
                Duration::from_secs(180)
            },
            settle: if smoke {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(3)
            },
            slow_delay: Duration::from_millis(50),
            scaling_processes: if smoke { vec![1, 2] } else { vec![1, 2, 4] },
            scaling_concurrency: if smoke { vec![8] } else { vec![8, 32] },
            scaling_seconds,
            service_env,
            command_line: std::env::args()
                .map(|a| redact(&a))
                .collect::<Vec<_>>()
                .join(" "),
        })
    }

    /// Whether a part is to run.
    pub fn runs(&self, part: Part) -> bool {
        self.parts.contains(&part)
    }
}

/// A URL with its password replaced by `***` (anything else unchanged), so the report can show
/// the command line and the servers without leaking credentials.
pub fn redact(text: &str) -> String {
    // `--amqp-url=…` keeps its flag.
    if let Some((flag, value)) = text.split_once('=')
        && flag.starts_with("--")
    {
        return format!("{flag}={}", redact(value));
    }
    match url::Url::parse(text) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_the_report() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact("--database-url=postgres://a:b@h/d"),
            "--database-url=postgres://a:***@h/d"
        );
        assert_eq!(redact("--smoke"), "--smoke");
    }
}
