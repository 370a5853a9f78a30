//! Scaling per destination: how delivery to a slow destination (50 ms per request) grows
//! with sender processes and with concurrency per process.
//!
//! For each cell, N messages are preloaded into the destination's deliver queue by publishing
//! valid envelopes directly (so ingress and the transformer are not part of the measurement),
//! then the sender processes are started (with hiway-audit running, so the audit trail is on)
//! and the sink times how fast it receives all N. A process with concurrency c can at best
//! deliver c / 50 ms; the ideal of a cell is processes × concurrency × 20 per second, and the
//! report shows how close each cell came, and the CPU it took.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hiway_proto::{ChannelName, ClientName, Envelope, RouteName};
use lapin::options::{ConfirmSelectOptions, QueuePurgeOptions};

use crate::broker::{self, Depths, Until};
use crate::install::{self, Installation};
use crate::plan::Plan;
use crate::processes::Fleet;
use crate::procfs::{CpuMeter, CpuUsage, Target};
use crate::sink::Sink;

/// Fewest messages per cell, so even a tiny smoke cell measures more than one wave.
const MIN_MESSAGES: u64 = 200;
/// Publisher confirms outstanding while preloading.
const PRELOAD_WINDOW: usize = 500;

/// One cell: a number of sender processes at one concurrency.
#[derive(Clone, Debug)]
pub struct Cell {
    /// Sender processes.
    pub processes: usize,
    /// Requests in flight per process.
    pub concurrency: usize,
    /// Messages preloaded.
    pub messages: u64,
    /// Messages that reached the sink.
    pub delivered: usize,
    /// From the first request's arrival at the sink to the last one's answer.
    pub elapsed: Duration,
    /// delivered / elapsed.
    pub rate: f64,
    /// processes × concurrency / delay.
    pub ideal: f64,
    /// CPU from starting the processes to the last arrival; the senders summed as
    /// `senders`.
    pub cpu: CpuUsage,
    /// Whether every message arrived before the timeout.
    pub complete: bool,
}

/// What the part measured.
#[derive(Clone, Debug, Default)]
pub struct Scaling {
    /// The destination's delay per request.
    pub delay: Duration,
    /// Cells, by concurrency then processes.
    pub cells: Vec<Cell>,
}

/// Runs every cell, adding each to `result` as it is measured. hiway-audit must be running;
/// nothing else may consume the slow queue.
pub async fn run(
    plan: &Plan,
    install: &Installation,
    fleet: &mut Fleet,
    depths: &Depths,
    slow: &Sink,
    result: &mut Scaling,
) -> anyhow::Result<()> {
    let queue = install
        .names
        .deliver_queue(&Installation::destination(install::SLOW));
    let audit_queue = install.names.audit_queue();
    result.delay = plan.slow_delay;
    for &concurrency in &plan.scaling_concurrency {
        for &processes in &plan.scaling_processes {
            let ideal = (processes * concurrency) as f64 / plan.slow_delay.as_secs_f64();
            let messages = ((ideal * plan.scaling_seconds).round() as u64).max(MIN_MESSAGES);
            crate::progress(&format!(
                "scaling: {processes} sender process(es) × concurrency {concurrency}, {messages} messages"
            ));
            preload(install, &queue, depths, messages).await?;
            slow.reset();

            let concurrency_env = concurrency.to_string();
            let only_slow = format!("[\"{}\"]", install::SLOW);
            let env = [
                ("HIWAY_SENDER__DESTINATIONS", only_slow.as_str()),
                (
                    "HIWAY_DESTINATIONS__SLOW__CONCURRENCY",
                    concurrency_env.as_str(),
                ),
            ];
            let started = Instant::now();
            let mut meter = CpuMeter::default();
            for i in 1..=processes {
                let label = format!("slow-sender-{concurrency}x{processes}-{i}");
                let pid = fleet.spawn("hiway-sender", &label, &env)?;
                meter = meter.watch(label, Target::Pid(pid));
            }
            let audit = fleet.pid("audit").context("hiway-audit is not running")?;
            let meter = meter
                .watch("audit", Target::Pid(audit))
                .with_infrastructure();
            let cpu_before = meter.snapshot();

            // Generous: a CPU-bound cell may reach a fraction of its ideal rate.
            let timeout = plan
                .drain_timeout
                .max(Duration::from_secs_f64(20.0 * plan.scaling_seconds));
            let complete = loop {
                if slow.received() as u64 >= messages {
                    break true;
                }
                if started.elapsed() > timeout {
                    break false;
                }
                fleet.check_alive()?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let wall = started.elapsed();
            let cpu = sum_senders(meter.usage(&cpu_before, &meter.snapshot()));
            fleet.stop("slow-sender").await;

            let delivered = slow.received();
            let elapsed = slow
                .span()
                .map_or(wall, |(first, last)| (last - first) + plan.slow_delay);
            let cell = Cell {
                processes,
                concurrency,
                messages,
                delivered,
                elapsed,
                rate: delivered as f64 / elapsed.as_secs_f64().max(1e-9),
                ideal,
                cpu,
                complete,
            };
            crate::progress(&format!(
                "  {:.0}/s ({:.0}% of the ideal {:.0}/s), senders {:.0}% CPU, machine {:.0}%",
                cell.rate,
                cell.rate / cell.ideal * 100.0,
                cell.ideal,
                cell.cpu.of("senders").unwrap_or(0.0),
                cell.cpu.machine.unwrap_or(0.0)
            ));
            result.cells.push(cell);
            if !complete {
                // Leftovers would be counted by the next cell.
                purge(install, &queue).await?;
            }
            wait_empty(depths, &audit_queue, plan.drain_timeout).await?;
        }
    }
    Ok(())
}

/// Replaces the per-process sender figures by their sum, `senders`.
fn sum_senders(usage: CpuUsage) -> CpuUsage {
    let (senders, mut rest): (Vec<_>, Vec<_>) = usage
        .per
        .into_iter()
        .partition(|(label, _)| label.starts_with("slow-sender-"));
    rest.insert(0, ("senders".into(), senders.iter().map(|(_, v)| v).sum()));
    CpuUsage {
        per: rest,
        machine: usage.machine,
    }
}

/// Publishes `n` copies for the slow destination straight to the deliver exchange, each with
/// its own valid envelope, and waits until the queue holds them all.
async fn preload(
    install: &Installation,
    queue: &str,
    depths: &Depths,
    n: u64,
) -> anyhow::Result<()> {
    let connection = broker::connect(&install.amqp_url, "hiway-bench-preload").await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let channel_name = ChannelName::parse(install::CHANNEL)?;
    let client = ClientName::parse(install::CLIENT)?;
    let destination = Installation::destination(install::SLOW);
    let route = RouteName::parse("bench-preload")?;
    let exchange = install.names.deliver_exchange();
    let publishing = broker::publish_windowed(
        &channel,
        &exchange,
        install::SLOW,
        crate::load::FORM,
        PRELOAD_WINDOW,
        Until::Count(n),
        || {
            Envelope::accepted(
                channel_name.clone(),
                client.clone(),
                "application/json".into(),
            )
            .for_destination(destination.clone(), route.clone())
            .to_properties()
        },
    );
    tokio::time::timeout(Duration::from_secs(120), publishing)
        .await
        .context("the broker stopped confirming the preloaded messages")?
        .context("preloading the slow destination's queue failed")?;
    let _ = connection.close(200, "preloaded".into()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = u64::from(depths.ready(queue).await?);
        if ready >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{queue} holds {ready} messages, {n} were preloaded");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn purge(install: &Installation, queue: &str) -> anyhow::Result<()> {
    let connection = broker::connect(&install.amqp_url, "hiway-bench-purge").await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await?;
    let _ = connection.close(200, "purged".into()).await;
    Ok(())
}

/// Waits until a queue has no ready message (the audit trail caught up), then a little more
/// for the last batch in hand to be written.
async fn wait_empty(depths: &Depths, queue: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while depths.ready(queue).await? > 0 {
        if Instant::now() > deadline {
            crate::warn(&format!("{queue} did not drain within {timeout:?}"));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}
