//! `hiway-ingress --config DIR`: runs the webhook endpoint alone.

use std::path::PathBuf;

use clap::Parser;

/// hiway's webhook endpoint.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file or directory (layered over the built-in defaults).
    #[arg(long, short, env = "HIWAY_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = hiway_config::load(args.config.as_deref())?;
    hiway_runtime::telemetry::init(&config.log);
    let stop = hiway_runtime::stop_signal();
    let ingress = hiway_ingress::build(&config).await?;
    ingress.run(stop).await?;
    Ok(())
}
