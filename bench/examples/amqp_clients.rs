//! What one hiway hop costs the AMQP client, with lapin (the client hiway uses) and with
//! amqprs (a client whose I/O runs as tasks on the caller's tokio runtime).
//!
//! Why: lapin runs each connection's I/O on a thread of its own, so every publish, confirm,
//! delivery and ack crosses between that thread and the service's; in the benchmark that
//! thread is a quarter of each service's CPU (docs/benchmarks.md, session 12). This measures
//! what a client without that thread would save, before anyone rewrites the services on it.
//!
//! Each run, on tokio's current-thread scheduler as the services run: one connection, a
//! publisher channel in confirm mode that publishes persistent 1023-byte messages into a
//! fresh quorum queue at a fixed rate (every 2 ms the messages due), each publish awaiting
//! its own confirm in a task of its own, as hiway's handlers do; and a consumer channel with
//! prefetch 256 that acks each delivery. It prints the process's CPU (user + system, from
//! `/proc/self/stat`) per message consumed. The two clients run alternately in one process,
//! each on its own connection, so both see the same broker and machine.
//!
//! ```sh
//! cargo run --release -p hiway-bench --example amqp_clients -- --rate 3000 --seconds 15 --runs 2
//! ```
//!
//! The queues are named `bench<12 hex>.clients.<client>` and deleted at the end of each run
//! (`deploy/clean-test-leftovers.sh` removes what a killed run leaves).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use futures_util::StreamExt;

mod common;
use common::{cpu_ms, declare, delete};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Messages per second.
    #[arg(long, default_value_t = 3000)]
    rate: u64,
    /// Seconds of publishing per run.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Runs of each client, alternating.
    #[arg(long, default_value_t = 2)]
    runs: u32,
    /// The broker (guest on 127.0.0.1 by default).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 5672)]
    port: u16,
}

/// What one run saw.
struct Counts {
    confirmed: u64,
    consumed: u64,
}

const BODY_BYTES: usize = 1023;
/// Time after the last publish for the last confirms and deliveries to arrive.
const SETTLE: Duration = Duration::from_secs(2);

#[allow(clippy::print_stdout)] // one line per run on stdout is what the program is for
fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let prefix = format!("bench{}", &suffix[suffix.len() - 12..]);
        let url = format!("amqp://guest:guest@{}:{}/%2f", args.host, args.port);
        for run in 1..=args.runs {
            for client in ["lapin", "amqprs"] {
                let queue = format!("{prefix}.clients.{client}");
                declare(&url, &queue).await?;
                let (cpu_before, started) = (cpu_ms(None)?, Instant::now());
                let counts = match client {
                    "lapin" => lapin_hop(&url, &queue, &args).await,
                    _ => amqprs_hop(&args, &queue).await,
                };
                let (cpu, wall) = (cpu_ms(None)? - cpu_before, started.elapsed().as_secs_f64());
                delete(&url, &queue).await?;
                let counts = counts?;
                let expected = args.rate * args.seconds;
                if counts.consumed < expected * 99 / 100 {
                    bail!(
                        "{client}: only {} of {expected} messages consumed",
                        counts.consumed
                    );
                }
                println!(
                    "run {run} {client:<6} {}/s for {}s: confirmed {}, consumed {}, CPU {cpu} ms ({:.0}% of a core), {:.1} µs per message",
                    args.rate,
                    args.seconds,
                    counts.confirmed,
                    counts.consumed,
                    cpu as f64 / wall / 10.0,
                    cpu as f64 * 1000.0 / counts.consumed as f64
                );
            }
        }
        Ok(())
    })
}

/// Calls `publish` as many times as are due, every 2 ms, for `seconds`.
async fn pace(rate: u64, seconds: u64, mut publish: impl FnMut()) {
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    while start.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            publish();
            sent += 1;
        }
    }
}

async fn lapin_hop(url: &str, queue: &str, args: &Args) -> anyhow::Result<Counts> {
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions,
    };
    use lapin::types::FieldTable;
    let connection =
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consuming = connection.create_channel().await?;
    consuming.basic_qos(256, BasicQosOptions::default()).await?;
    let mut consumer = consuming
        .basic_consume(
            queue.into(),
            "clients".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumed = Arc::new(AtomicU64::new(0));
    let confirmed = Arc::new(AtomicU64::new(0));
    let counter = consumed.clone();
    let acking = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            if consuming
                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                .await
                .is_err()
            {
                break;
            }
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let body: Arc<[u8]> = vec![b'x'; BODY_BYTES].into();
    let queue: Arc<str> = queue.into();
    pace(args.rate, args.seconds, || {
        let (publisher, body, queue, confirmed) = (
            publisher.clone(),
            body.clone(),
            queue.clone(),
            confirmed.clone(),
        );
        tokio::spawn(async move {
            let properties = lapin::BasicProperties::default().with_delivery_mode(2);
            let Ok(confirm) = publisher
                .basic_publish(
                    "".into(),
                    queue.as_ref().into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await
            else {
                return;
            };
            if confirm.await.is_ok_and(|c| c.is_ack()) {
                confirmed.fetch_add(1, Ordering::Relaxed);
            }
        });
    })
    .await;
    tokio::time::sleep(SETTLE).await;
    connection.close(200, "done".into()).await?;
    acking.abort();
    Ok(Counts {
        confirmed: confirmed.load(Ordering::Relaxed),
        consumed: consumed.load(Ordering::Relaxed),
    })
}

/// Publishes awaiting their confirm, by delivery tag. amqprs reports confirms to a channel
/// callback (one `basic.ack` may cover many tags), so each publish registers a oneshot here,
/// as hiway's publisher would have to.
type Waiting = Arc<Mutex<BTreeMap<u64, tokio::sync::oneshot::Sender<bool>>>>;

struct Confirms(Waiting);

impl Confirms {
    fn settle(&self, tag: u64, multiple: bool, ack: bool) {
        let Ok(mut waiting) = self.0.lock() else {
            return;
        };
        let settled = if multiple {
            let later = waiting.split_off(&(tag + 1));
            std::mem::replace(&mut *waiting, later)
        } else {
            waiting
                .remove(&tag)
                .map(|tx| BTreeMap::from([(tag, tx)]))
                .unwrap_or_default()
        };
        for (_, tx) in settled {
            let _ = tx.send(ack);
        }
    }
}

#[async_trait::async_trait]
impl amqprs::callbacks::ChannelCallback for Confirms {
    async fn close(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::Cancel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(
        &mut self,
        _: &amqprs::channel::Channel,
        active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &amqprs::channel::Channel, ack: amqprs::Ack) {
        self.settle(ack.delivery_tag(), ack.mutiple(), true);
    }
    async fn publish_nack(&mut self, _: &amqprs::channel::Channel, nack: amqprs::Nack) {
        self.settle(nack.delivery_tag(), nack.multiple(), false);
    }
    async fn publish_return(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::Return,
        _: amqprs::BasicProperties,
        _: Vec<u8>,
    ) {
    }
}

async fn amqprs_hop(args: &Args, queue: &str) -> anyhow::Result<Counts> {
    use amqprs::channel::{
        BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments,
        ConfirmSelectArguments,
    };
    use amqprs::connection::{Connection, OpenConnectionArguments};
    let connection = Connection::open(&OpenConnectionArguments::new(
        &args.host, args.port, "guest", "guest",
    ))
    .await?;
    let publisher = connection.open_channel(None).await?;
    let waiting: Waiting = Arc::default();
    publisher
        .register_callback(Confirms(waiting.clone()))
        .await?;
    publisher
        .confirm_select(ConfirmSelectArguments::default())
        .await?;
    let consuming = connection.open_channel(None).await?;
    consuming
        .basic_qos(BasicQosArguments::new(0, 256, false))
        .await?;
    let (_tag, mut deliveries) = consuming
        .basic_consume_rx(BasicConsumeArguments::new(queue, "clients"))
        .await?;
    let consumed = Arc::new(AtomicU64::new(0));
    let confirmed = Arc::new(AtomicU64::new(0));
    let counter = consumed.clone();
    let acking = tokio::spawn(async move {
        while let Some(message) = deliveries.recv().await {
            let Some(deliver) = message.deliver else {
                continue;
            };
            let ack = BasicAckArguments::new(deliver.delivery_tag(), false);
            if consuming.basic_ack(ack).await.is_err() {
                break;
            }
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let queue: Arc<str> = queue.into();
    // Delivery tags of a channel in confirm mode count publishes from 1.
    let mut tag = 0u64;
    pace(args.rate, args.seconds, || {
        tag += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Ok(mut waiting) = waiting.lock() {
            waiting.insert(tag, tx);
        }
        let (publisher, queue, confirmed) = (publisher.clone(), queue.clone(), confirmed.clone());
        tokio::spawn(async move {
            let mut properties = amqprs::BasicProperties::default();
            properties.with_delivery_mode(2);
            let body = vec![b'x'; BODY_BYTES];
            let published = publisher
                .basic_publish(properties, body, BasicPublishArguments::new("", &queue))
                .await;
            if published.is_ok() && rx.await.unwrap_or(false) {
                confirmed.fetch_add(1, Ordering::Relaxed);
            }
        });
    })
    .await;
    tokio::time::sleep(SETTLE).await;
    connection.close().await?;
    acking.abort();
    Ok(Counts {
        confirmed: confirmed.load(Ordering::Relaxed),
        consumed: consumed.load(Ordering::Relaxed),
    })
}
