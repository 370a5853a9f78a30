//! `hiway status`: each destination's state, as an operator needs it at a glance.

use std::fmt::Write as _;

use hiway_config::Config;
use hiway_proto::audit::AuditKind;
use hiway_runtime::Broker;
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
    /// Why the circuit is open, when it is: what the `circuit_opened` event recorded.
    pub circuit_why: Option<String>,
}

/// Reads every configured destination's status from the broker and the database.
pub async fn read(config: &Config, pool: &PgPool) -> anyhow::Result<Vec<DestinationStatus>> {
    let broker = Broker::new(config);
    let connection = broker.connect("hiway-status").await?;
    let channel = connection.channel().await?;
    let names = config.names();
    let mut out = Vec::new();
    for (name, d) in &config.destinations {
        let q = channel.queue_depth(&names.deliver_queue(name)).await?;
        let mut retrying = Vec::new();
        let mut delays = d.retry.schedule.clone();
        delays.sort();
        delays.dedup();
        for delay in delays {
            let rq = channel.queue_depth(&names.retry_queue(name, delay)).await?;
            retrying.push((humantime::format_duration(delay).to_string(), rq.ready));
        }
        let dead: i64 = sqlx::query_scalar(
            "select count(*) from dead_letters where state = 'dead' and destination = $1",
        )
        .bind(name.as_str())
        .fetch_one(pool)
        .await?;
        let circuit: Option<(String, chrono::DateTime<chrono::Utc>, serde_json::Value)> =
            sqlx::query_as(
                "select kind, at, detail from audit_events
                 where destination = $1 and kind in ('circuit_opened', 'circuit_closed')
                 order by at desc limit 1",
            )
            .bind(name.as_str())
            .fetch_optional(pool)
            .await?;
        let (circuit, circuit_why) = match circuit {
            None => ("closed".to_owned(), None),
            Some((kind, at, detail)) => {
                let since = at.format("%Y-%m-%dT%H:%M:%SZ");
                if kind == "circuit_opened" {
                    (format!("open since {since}"), Some(why_open(detail)))
                } else {
                    (format!("closed since {since}"), None)
                }
            }
        };
        out.push(DestinationStatus {
            name: name.to_string(),
            queued: q.ready,
            consumers: q.consumers,
            retrying,
            dead,
            circuit,
            circuit_why,
        });
    }
    connection.close(200, "done").await;
    Ok(out)
}

/// Why a circuit opened, from its `circuit_opened` event's detail (the event's
/// [`AuditKind`], as the audit service stored it).
fn why_open(detail: serde_json::Value) -> String {
    match serde_json::from_value::<AuditKind>(detail) {
        Ok(AuditKind::CircuitOpened {
            failures,
            cool_down_ms,
            reason,
            ..
        }) => circuit_opened_because(failures, cool_down_ms, reason.as_deref()),
        _ => "no reason recorded".to_owned(),
    }
}

/// An opened circuit in words, as `hiway status` and `hiway trace` both say it: the reason
/// its event names (refused credentials), or else the failure count; and how often probes
/// go out.
pub(crate) fn circuit_opened_because(
    failures: u32,
    cool_down_ms: u64,
    reason: Option<&str>,
) -> String {
    let why = match reason {
        Some(reason) => reason.to_owned(),
        None => format!("{failures} consecutive retryable failures"),
    };
    format!(
        "{why}; a probe every {}",
        humantime::format_duration(std::time::Duration::from_millis(cool_down_ms))
    )
}

/// A table for people: one line per destination, and under an open circuit the reason.
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
        if let Some(why) = &s.circuit_why {
            let _ = writeln!(out, "  circuit open: {why}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_open_circuit_says_why_and_how_often_it_is_probed() {
        // The detail column holds the event's kind as the audit service serialized it.
        let opened = |reason: Option<&str>| {
            serde_json::to_value(AuditKind::CircuitOpened {
                destination: hiway_proto::DestinationName::parse("dhis2").unwrap(),
                failures: 5,
                cool_down_ms: 30_000,
                reason: reason.map(str::to_owned),
            })
            .unwrap()
        };
        assert_eq!(
            why_open(opened(None)),
            "5 consecutive retryable failures; a probe every 30s"
        );
        assert_eq!(
            why_open(opened(Some(
                "the destination refuses hiway's credentials (HTTP 401)"
            ))),
            "the destination refuses hiway's credentials (HTTP 401); a probe every 30s"
        );
        assert_eq!(why_open(json!({})), "no reason recorded");
    }

    #[test]
    fn the_reason_is_printed_under_its_destination_only_when_the_circuit_is_open() {
        let row = |name: &str, circuit: &str, why: Option<&str>| DestinationStatus {
            name: name.into(),
            queued: 1,
            consumers: 0,
            retrying: vec![],
            dead: 0,
            circuit: circuit.into(),
            circuit_why: why.map(str::to_owned),
        };
        let table = format(&[
            row("dhis2", "open since 2026-11-22T01:24:25Z", Some("why")),
            row("warehouse", "closed", None),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[1].starts_with("dhis2"), "{table}");
        assert_eq!(lines[2], "  circuit open: why");
        assert!(lines[3].starts_with("warehouse"), "{table}");
    }
}
