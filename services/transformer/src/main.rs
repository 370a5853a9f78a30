//! `hiway-transformer --config DIR`: runs hiway's router alone.

use clap::Parser;

/// hiway's router.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    config: hiway_runtime::cli::ConfigArg,
}

// mimalloc instead of glibc's malloc: the hot paths (jq runs, JSON, AMQP frames) make
// many small short-lived allocations, and glibc's malloc took about a third of the
// transformer's CPU in the benchmark's profile (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (config, stop) = hiway_runtime::cli::start(&Args::parse().config)?;
    hiway_transformer::build(&config).await?.run(stop).await?;
    Ok(())
}
