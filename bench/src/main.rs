//! `hiway-bench`: a benchmark anyone can rerun (issue 5).
//!
//! One run, on one machine, measures:
//! 1. the baseline — RabbitMQ alone, one hop, through lapin ([`baseline`]);
//! 2. hiway end to end — HTTP load at stepped rates into ingress, routed by the transformer,
//!    delivered by the sender to a local sink, with the audit trail on ([`e2e`]);
//! 3. scaling per destination — a 50 ms destination served by 1, 2 and 4 sender processes at
//!    two concurrencies ([`scaling`]);
//!
//! and prints a markdown report ([`report`]) naming the targets met and not met. The services
//! run as separate processes from `--bin-dir` ([`processes`]) on a private installation
//! ([`install`]) that is removed at the end. `deploy/bench.sh` is the one command;
//! docs/benchmarks.md explains the method and the latest results.

mod baseline;
mod broker;
mod e2e;
mod install;
mod load;
mod plan;
mod processes;
mod procfs;
mod report;
mod run;
mod scaling;
mod sink;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

// The services' allocator (see the workspace Cargo.toml): the load generator and the sinks
// share the machine's cores with what they measure.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// One thread, like the services (`[runtime] worker_threads = 1`): a hand-off between threads is
// a futex wake-up, costly on the virtual machines this runs on. Measured in session 7 (six
// alternating runs): the baseline's client drove RabbitMQ to 12434–14317/s on one thread
// against 11153–12444/s on tokio's multi-threaded scheduler, and the load generator and sink
// used less CPU (docs/benchmarks.md).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match bench().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("[bench] error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the plan and prints the report; fails if the run could not start or stopped early
/// (the report of what was measured is printed first).
#[allow(clippy::print_stdout)] // the report on stdout is what the program is for
async fn bench() -> anyhow::Result<()> {
    let args = plan::Args::parse();
    let plan = plan::Plan::from_args(&args)?;
    let report = run::run(plan).await?;
    let text = report.to_markdown();
    println!("{text}");
    if let Some(out) = &args.out {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(out, &text).with_context(|| format!("cannot write {}", out.display()))?;
        progress(&format!("report written to {}", out.display()));
    }
    if let Some(failure) = &report.failure {
        anyhow::bail!("the benchmark stopped early: {failure}");
    }
    Ok(())
}

/// A progress line on stderr (stdout carries only the report).
pub fn progress(message: &str) {
    eprintln!("[bench] {message}");
}

/// A warning on stderr.
pub fn warn(message: &str) {
    eprintln!("[bench] warning: {message}");
}
