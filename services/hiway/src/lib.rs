//! The `hiway` command's library: running every service in one process, and the operator
//! commands. `main.rs` only parses arguments and calls these.

pub mod dlq;
pub mod sink;
pub mod status;
mod trail;

use std::future::Future;
use std::pin::Pin;

use anyhow::Context;
use hiway_config::Config;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use trail::format_trail;

type ServiceFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// Writes an operator command's output to stdout. Unlike `print!`, which panics when stdout
/// is closed, a failed write is an error the command returns: `hiway client new x | head -1`
/// closes the pipe after one line, and that must end the command quietly (see
/// [`OutputClosed`]), not with a panic.
pub fn print(text: impl std::fmt::Display) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match write!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(OutputClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to stdout")),
    }
}

/// stdout's reader went away (EPIPE) while a command wrote its output: the reader took what
/// it wanted, so the command ends with success and says nothing. Its own type, not any
/// broken pipe: a connection to the broker or the database breaking the same way is a
/// failure to report.
#[derive(Debug)]
pub struct OutputClosed;

impl std::fmt::Display for OutputClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed by its reader")
    }
}

impl std::error::Error for OutputClosed {}

/// Builds every service, then runs them all under one stop token. The same `build` and `run`
/// as the separate binaries: messages still cross RabbitMQ, so a laptop fails the way
/// production does. When one service fails, the others are stopped (they drain) and the
/// error names the service.
pub async fn run_all(config: &Config, stop: CancellationToken) -> anyhow::Result<()> {
    // Audit first: it applies the database migrations, and a database that is not there
    // should stop start-up before anything is accepted.
    let audit = hiway_audit::build(config).await.context("audit")?;
    let transformer = hiway_transformer::build(config)
        .await
        .context("transformer")?;
    let sender = hiway_sender::build(config).await.context("sender")?;
    let ingress = hiway_ingress::build(config).await.context("ingress")?;
    tracing::info!(addr = %ingress.local_addr(), "hiway running: ingress, transformer, sender, audit");

    let services: Vec<(&str, ServiceFuture)> = vec![
        (
            "ingress",
            Box::pin({
                let s = stop.clone();
                async move { Ok(ingress.run(s).await?) }
            }),
        ),
        (
            "transformer",
            Box::pin({
                let s = stop.clone();
                async move { Ok(transformer.run(s).await?) }
            }),
        ),
        (
            "sender",
            Box::pin({
                let s = stop.clone();
                async move { Ok(sender.run(s).await?) }
            }),
        ),
        (
            "audit",
            Box::pin({
                let s = stop.clone();
                async move { Ok(audit.run(s).await?) }
            }),
        ),
    ];
    let mut set = JoinSet::new();
    for (name, fut) in services {
        set.spawn(async move { (name, fut.await) });
    }
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        let (name, result) = joined.context("a service task panicked")?;
        if let Err(e) = result {
            tracing::error!(service = name, error = %format!("{e:#}"), "service failed; stopping the others");
            stop.cancel();
            first_error.get_or_insert(e.context(format!("service {name} failed")));
        } else if !stop.is_cancelled() {
            // A service returning on its own without a stop is unexpected; stop the rest
            // rather than run half a bus.
            tracing::error!(
                service = name,
                "service stopped unexpectedly; stopping the others"
            );
            stop.cancel();
            first_error.get_or_insert(anyhow::anyhow!("service {name} stopped unexpectedly"));
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
