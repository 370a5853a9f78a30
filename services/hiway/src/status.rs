//! `hiway status`: each destination's state, as an operator needs it at a glance.

use std::fmt::Write as _;

use hiway_config::Config;
use hiway_runtime::Broker;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sqlx::PgPool;

/// One destination's numbers.
#[derive(Debug)]
pub struct DestinationStatus {
    /// Its name.
    pub name: String,
    /// Messages waiting in its queue.
    pub queued: u32,
    /// Consumers on its queue (sender workers with a closed circuit).
    pub consumers: u32,
    /// Messages waiting for a retry, per wait.
    pub retrying: Vec<(String, u32)>,
    /// Dead letters waiting for an operator.
    pub dead: i64,
    /// The last circuit event: `open since …` or `closed since …`.
    pub circuit: String,
}

/// Reads every configured destination's status from the broker and the database.
pub async fn read(config: &Config, pool: &PgPool) -> anyhow::Result<Vec<DestinationStatus>> {
    let broker = Broker::new(config);
    let connection = broker.connect("hiway-status").await?;
    let channel = connection.create_channel().await?;
    let names = config.names();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let mut out = Vec::new();
    for (name, d) in &config.destinations {
        let q = channel
            .queue_declare(
                names.deliver_queue(name).into(),
                passive,
                FieldTable::default(),
            )
            .await?;
        let mut retrying = Vec::new();
        let mut delays = d.retry.schedule.clone();
        delays.sort();
        delays.dedup();
        for delay in delays {
            let rq = channel
                .queue_declare(
                    names.retry_queue(name, delay).into(),
                    passive,
                    FieldTable::default(),
                )
                .await?;
            retrying.push((
                humantime::format_duration(delay).to_string(),
                rq.message_count(),
            ));
        }
        let dead: i64 = sqlx::query_scalar(
            "select count(*) from dead_letters where state = 'dead' and destination = $1",
        )
        .bind(name.as_str())
        .fetch_one(pool)
        .await?;
        let circuit: Option<(String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
            "select kind, at from audit_events
             where destination = $1 and kind in ('circuit_opened', 'circuit_closed')
             order by at desc limit 1",
        )
        .bind(name.as_str())
        .fetch_optional(pool)
        .await?;
        let circuit = match circuit {
            Some((kind, at)) if kind == "circuit_opened" => {
                format!("open since {}", at.format("%Y-%m-%dT%H:%M:%SZ"))
            }
            Some((_, at)) => format!("closed since {}", at.format("%Y-%m-%dT%H:%M:%SZ")),
            None => "closed".to_owned(),
        };
        out.push(DestinationStatus {
            name: name.to_string(),
            queued: q.message_count(),
            consumers: q.consumer_count(),
            retrying,
            dead,
            circuit,
        });
    }
    hiway_runtime::amqp::close_connection(&connection, 200, "done").await;
    Ok(out)
}

/// A table for people.
pub fn format(statuses: &[DestinationStatus]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:>8} {:>9} {:>6}  {:<32} retrying (per wait)",
        "destination", "queued", "consumers", "dead", "circuit"
    );
    for s in statuses {
        let retrying: Vec<String> = s.retrying.iter().map(|(d, n)| format!("{d}:{n}")).collect();
        let _ = writeln!(
            out,
            "{:<24} {:>8} {:>9} {:>6}  {:<32} {}",
            s.name,
            s.queued,
            s.consumers,
            s.dead,
            s.circuit,
            retrying.join(" ")
        );
    }
    out
}
