//! What the experiments in `bench/examples` share: fresh quorum queues, and CPU time from
//! `/proc`. (A module, not an example: Cargo builds only `examples/*.rs` and
//! `examples/*/main.rs` as examples.)

use anyhow::Context;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};

/// A process's CPU time so far (user + system), in milliseconds: `pid`'s, or this process's.
pub fn cpu_ms(pid: Option<u32>) -> anyhow::Result<u64> {
    let path = pid.map_or("/proc/self/stat".to_owned(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let after = stat.rfind(')').with_context(|| format!("no ) in {path}"))?;
    let fields: Vec<&str> = stat[after + 2..].split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i)
            .with_context(|| format!("short {path}"))?
            .parse()?)
    };
    // utime and stime, in clock ticks of 10 ms on Linux.
    Ok((ticks(11)? + ticks(12)?) * 10)
}

/// Declares a fresh durable quorum queue (with lapin, outside any measured part).
pub async fn declare(url: &str, queue: &str) -> anyhow::Result<()> {
    let connection =
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), options, arguments)
        .await?;
    connection.close(200, "declared".into()).await?;
    Ok(())
}

/// Deletes a queue.
pub async fn delete(url: &str, queue: &str) -> anyhow::Result<()> {
    let connection =
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    connection.close(200, "deleted".into()).await?;
    Ok(())
}
