//! The baseline: what RabbitMQ alone does on this machine for one hop, through lapin.
//!
//! One publisher sends persistent 1 KB messages into a quorum queue with a window of
//! publisher confirms in flight; one consumer with a prefetch in the hundreds acks each
//! message as it goes. That is exactly the work of one hiway hop (ingress → transformer, or
//! transformer → sender) with nothing of hiway in it, so the end-to-end rate can be read
//! against it. Publisher and consumer run together; the rate is every message consumed over
//! the time from the first publish to the last ack, so a consumer that falls behind lowers it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use hiway_proto::{ChannelName, ClientName, Envelope};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::broker::{self, Until};
use crate::procfs::{CpuMeter, CpuUsage};

/// Publisher confirms outstanding at once.
pub const WINDOW: usize = 500;
/// Consumer prefetch.
pub const PREFETCH: u16 = 250;

/// What the baseline measured.
#[derive(Clone, Debug)]
pub struct Baseline {
    /// Messages published (and confirmed).
    pub published: u64,
    /// Messages consumed and acked.
    pub consumed: u64,
    /// Publishing time.
    pub publishing: Duration,
    /// First publish to last ack.
    pub elapsed: Duration,
    /// Messages per second through the hop: consumed / elapsed.
    pub rate: f64,
    /// Messages per second confirmed to the publisher.
    pub publish_rate: f64,
    /// Body size.
    pub body_bytes: usize,
    /// CPU while it ran.
    pub cpu: CpuUsage,
}

/// Runs the baseline on `queue` (declared here, deleted at the end) for `duration` of
/// publishing.
pub async fn run(
    amqp_url: &str,
    queue: &str,
    body: &[u8],
    duration: Duration,
    drain_timeout: Duration,
) -> anyhow::Result<Baseline> {
    let setup = broker::connect(amqp_url, "hiway-bench-baseline").await?;
    let channel = setup.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .context("cannot declare the baseline's quorum queue")?;

    // Separate connections, as separate services would have.
    let consumer_conn = broker::connect(amqp_url, "hiway-bench-baseline-consumer").await?;
    let consumer_channel = consumer_conn.create_channel().await?;
    consumer_channel
        .basic_qos(PREFETCH, BasicQosOptions { global: false })
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            queue.into(),
            "hiway-bench-baseline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let publisher_conn = broker::connect(amqp_url, "hiway-bench-baseline-publisher").await?;
    let publisher = publisher_conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    // The consumer learns how many to expect only when publishing ends.
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let expect = expected.clone();
    let consuming = tokio::spawn(async move {
        let mut consumed = 0u64;
        let mut last = None;
        while consumed < expect.load(Ordering::Acquire) {
            match tokio::time::timeout(Duration::from_millis(100), consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    delivery.ack(BasicAckOptions::default()).await?;
                    consumed += 1;
                    last = Some(Instant::now());
                }
                Ok(Some(Err(error))) => return Err(anyhow::Error::from(error)),
                Ok(None) => bail!("the baseline consumer was cancelled"),
                Err(_) => {} // nothing for 100 ms: look at `expected` again
            }
        }
        Ok((consumed, last))
    });

    let meter = CpuMeter::default().with_infrastructure();
    let cpu_before = meter.snapshot();
    // Properties as hiway writes them (persistent, envelope headers), a fresh id per message.
    let channel_name = ChannelName::parse(crate::install::CHANNEL)?;
    let client = ClientName::parse(crate::install::CLIENT)?;
    let started = Instant::now();
    // Confirms that never come (a broker blocking publishers) must end the run, not hang it.
    let publishing = broker::publish_windowed(
        &publisher,
        "",
        queue,
        body,
        WINDOW,
        Until::Deadline(started + duration),
        || {
            Envelope::accepted(
                channel_name.clone(),
                client.clone(),
                "application/json".into(),
            )
            .to_properties()
        },
    );
    let published = tokio::time::timeout(duration + drain_timeout, publishing)
        .await
        .context("the broker stopped confirming the baseline's messages")?
        .context("baseline publishing failed")?;
    let publishing = started.elapsed();
    expected.store(published, Ordering::Release);

    let (consumed, last) = tokio::time::timeout(drain_timeout, consuming)
        .await
        .context("the baseline consumer did not receive every message in time")?
        .context("the baseline consumer panicked")??;
    let cpu = meter.usage(&cpu_before, &meter.snapshot());
    let elapsed = last.map_or(publishing, |l| l.saturating_duration_since(started));

    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    for c in [&publisher_conn, &consumer_conn, &setup] {
        let _ = c.close(200, "baseline done".into()).await;
    }
    Ok(Baseline {
        published,
        consumed,
        publishing,
        elapsed,
        rate: consumed as f64 / elapsed.as_secs_f64().max(1e-9),
        publish_rate: published as f64 / publishing.as_secs_f64().max(1e-9),
        body_bytes: body.len(),
        cpu,
    })
}
