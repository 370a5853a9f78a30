//! What RabbitMQ's own CPU per message depends on: the rate, the size of the bursts publishes
//! arrive in, and the number of hops, with nothing of hiway in the way.
//!
//! Why: in the benchmark RabbitMQ spends 120–140 µs of CPU per broker message end to end and
//! 84–88 µs in the baseline (docs/benchmarks.md, session 14), and the end-to-end ratio target
//! is read against that baseline. The baseline runs the broker flat out (500 confirms in
//! flight); hiway's traffic arrives paced, as HTTP requests do. This separates the two: the
//! same persistent messages (1023 bytes unless `--size` says otherwise) into fresh quorum
//! queues, published with lapin at a fixed rate in bursts every `--tick-ms`, through one hop (publisher → queue → consumer) or
//! two (publisher → queue → relay that republishes each delivery and acks it once the copy is
//! confirmed → queue → consumer), as hiway's ingress → transformer → sender do. It prints the
//! broker's CPU (user + system of the process listening on the AMQP port, from /proc) per
//! broker message.
//!
//! ```sh
//! cargo run --release -p hiway-bench --example broker_shape -- --rate 3000 --hops 2 --tick-ms 2
//! ```
//!
//! The queues are named `bench<12 hex>.shape.<n>` and deleted at the end of each run
//! (`deploy/clean-test-leftovers.sh` removes what a killed run leaves).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;

mod common;
use common::{cpu_ms, declare, delete};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Messages per second entering the first queue.
    #[arg(long, default_value_t = 3000)]
    rate: u64,
    /// Seconds of publishing per run.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Publishes go out every this many milliseconds, as many as are due: the burst size is
    /// rate × tick.
    #[arg(long, default_value_t = 2)]
    tick_ms: u64,
    /// 1: publisher → queue → consumer. 2: with a relay and a second queue in between.
    #[arg(long, default_value_t = 1)]
    hops: u32,
    /// Runs, one after the other.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// Bytes per message: a batch of n 1 KB messages is about n × 1024 (see
    /// docs/benchmarks.md, session 18).
    #[arg(long, default_value_t = 1023)]
    size: usize,
    /// The broker's process id (default: the beam.smp process).
    #[arg(long)]
    broker_pid: Option<u32>,
}

const PREFETCH: u16 = 256;
/// Time after the last publish for the last deliveries to arrive.
const SETTLE: Duration = Duration::from_secs(3);

#[allow(clippy::print_stdout)] // one line per run on stdout is what the program is for
fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(1..=2).contains(&args.hops) {
        bail!("--hops is 1 or 2");
    }
    let broker = match args.broker_pid {
        Some(pid) => pid,
        None => beam_pid()?,
    };
    // Like the services: one thread (lapin's I/O threads come on top).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let prefix = format!("bench{}", &suffix[suffix.len() - 12..]);
        for run in 1..=args.runs {
            let queues: Vec<String> = (1..=args.hops)
                .map(|n| format!("{prefix}.shape.{n}"))
                .collect();
            for q in &queues {
                declare(&args.url, q).await?;
            }
            let (broker_before, own_before, started) =
                (cpu_ms(Some(broker))?, cpu_ms(None)?, Instant::now());
            let result = flow(&args, &queues).await;
            let wall = started.elapsed().as_secs_f64();
            let (broker_cpu, own_cpu) = (
                cpu_ms(Some(broker))? - broker_before,
                cpu_ms(None)? - own_before,
            );
            for q in &queues {
                delete(&args.url, q).await?;
            }
            let consumed = result?;
            let expected = args.rate * args.seconds;
            if consumed < expected * 99 / 100 {
                bail!("only {consumed} of {expected} messages reached the last consumer");
            }
            let broker_messages = consumed * u64::from(args.hops);
            println!(
                "run {run}: {}/s, bursts every {} ms, {} hop(s): {consumed} delivered; broker {:.0}% of a core, {:.1} µs per broker message; clients {:.0}% of a core",
                args.rate,
                args.tick_ms,
                args.hops,
                broker_cpu as f64 / wall / 10.0,
                broker_cpu as f64 * 1000.0 / broker_messages as f64,
                own_cpu as f64 / wall / 10.0,
            );
        }
        Ok(())
    })
}

/// The process whose command is beam.smp (RabbitMQ's Erlang VM).
fn beam_pid() -> anyhow::Result<u32> {
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "beam.smp")
        {
            return Ok(pid);
        }
    }
    bail!("no beam.smp process: is RabbitMQ running? (or give --broker-pid)")
}

/// A channel in confirm mode on a connection of its own.
async fn confirming(url: &str) -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
    let connection =
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel))
}

async fn consumer(channel: &lapin::Channel, queue: &str) -> anyhow::Result<lapin::Consumer> {
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    Ok(channel
        .basic_consume(
            queue.into(),
            "shape".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

/// Publishes `body` to `queue` and waits for its confirm; true if acked.
async fn publish(channel: &lapin::Channel, queue: &str, body: &[u8]) -> bool {
    let properties = lapin::BasicProperties::default().with_delivery_mode(2);
    match channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
    {
        Ok(confirm) => confirm.await.is_ok_and(|c| c.is_ack()),
        Err(_) => false,
    }
}

/// Runs the flow for `--seconds` and returns how many messages the last consumer got.
async fn flow(args: &Args, queues: &[String]) -> anyhow::Result<u64> {
    let last = queues.last().context("no queue")?.clone();
    // The last consumer acks each delivery as it goes.
    let (sink_connection, sink_channel) = confirming(&args.url).await?;
    let mut deliveries = consumer(&sink_channel, &last).await?;
    let consumed = Arc::new(AtomicU64::new(0));
    let counter = consumed.clone();
    let sink = tokio::spawn(async move {
        while let Some(Ok(delivery)) = deliveries.next().await {
            if sink_channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                .await
                .is_err()
            {
                break;
            }
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    // The relay (two hops): each delivery of the first queue is republished to the second in
    // a task of its own, and acked once the copy is confirmed, as the transformer does.
    let mut relay = None;
    if let [first, second] = queues {
        let (connection, channel) = confirming(&args.url).await?;
        let mut deliveries = consumer(&channel, first).await?;
        let second: Arc<str> = second.as_str().into();
        let task = tokio::spawn(async move {
            while let Some(Ok(delivery)) = deliveries.next().await {
                let (channel, second) = (channel.clone(), second.clone());
                tokio::spawn(async move {
                    if publish(&channel, &second, &delivery.data).await {
                        let _ = channel
                            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                            .await;
                    }
                });
            }
        });
        relay = Some((connection, task));
    }
    // The publisher: every tick, as many messages as are due, each awaiting its own confirm.
    let (connection, publisher) = confirming(&args.url).await?;
    let body: Arc<[u8]> = vec![b'x'; args.size].into();
    let first: Arc<str> = queues[0].as_str().into();
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(args.tick_ms));
    while start.elapsed() < Duration::from_secs(args.seconds) {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * args.rate as f64) as u64;
        while sent < due {
            let (publisher, body, first) = (publisher.clone(), body.clone(), first.clone());
            tokio::spawn(async move { publish(&publisher, &first, &body).await });
            sent += 1;
        }
    }
    tokio::time::sleep(SETTLE).await;
    connection.close(200, "done".into()).await?;
    if let Some((connection, task)) = relay {
        connection.close(200, "done".into()).await?;
        task.abort();
    }
    sink_connection.close(200, "done".into()).await?;
    sink.abort();
    Ok(consumed.load(Ordering::Relaxed))
}
