//! `hiway-transformer --config DIR`: runs hiway's router alone.

use clap::Parser;

/// hiway's router.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    config: hiway_runtime::cli::ConfigArg,
}

// mimalloc, not glibc's malloc: why is at its line in the workspace Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    hiway_runtime::cli::serve(&Args::parse().config, |config, stop| async move {
        hiway_transformer::build(&config).await?.run(stop).await?;
        Ok(())
    })
}
