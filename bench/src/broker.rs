//! The bench's own broker work: connections, queue depths, publishing with a window of
//! confirms in flight, and removing everything the run declared.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

/// Longest wait for a broker operation the bench makes (connecting, reading a depth): a
/// broker that accepts TCP connections but does not answer (stopped, paused, overloaded)
/// must fail the run with a reason, not hang it.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects to RabbitMQ; `name` shows in the broker's connection list.
pub async fn connect(url: &str, name: &str) -> anyhow::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let what = || {
        format!(
            "cannot connect to RabbitMQ at {} (run deploy/deps.sh)",
            crate::plan::redact(url)
        )
    };
    tokio::time::timeout(BROKER_TIMEOUT, Connection::connect(url, props))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {BROKER_TIMEOUT:?}"))
        .with_context(what)?
        .with_context(what)
}

/// Reads queue depths with passive declares on one channel, reopened after a failure (a
/// passive declare of a missing queue closes the channel).
pub struct Depths {
    connection: Connection,
    channel: tokio::sync::Mutex<Option<Channel>>,
}

impl Depths {
    /// Opens a connection for reading depths.
    pub async fn open(url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            connection: connect(url, "hiway-bench-depths").await?,
            channel: tokio::sync::Mutex::new(None),
        })
    }

    /// Ready messages in a queue (not counting delivered, unacknowledged ones).
    pub async fn ready(&self, queue: &str) -> anyhow::Result<u32> {
        let mut guard = self.channel.lock().await;
        let channel = match guard.take() {
            Some(c) if c.status().connected() => c,
            _ => self.connection.create_channel().await?,
        };
        let declare = channel.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        );
        let declared = tokio::time::timeout(BROKER_TIMEOUT, declare)
            .await
            .with_context(|| format!("no answer about queue {queue} within {BROKER_TIMEOUT:?}"))?
            .with_context(|| format!("queue {queue} is not there"))?;
        *guard = Some(channel);
        Ok(declared.message_count())
    }

    /// Ready messages in each queue, in order.
    pub async fn all(&self, queues: &[String]) -> anyhow::Result<Vec<u32>> {
        let mut depths = Vec::with_capacity(queues.len());
        for q in queues {
            depths.push(self.ready(q).await?);
        }
        Ok(depths)
    }

    /// Closes the connection.
    pub async fn close(&self) {
        let _ = self.connection.close(200, "bench done".into()).await;
    }
}

/// When [`publish_windowed`] stops.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    /// After this many messages.
    Count(u64),
    /// At this instant.
    Deadline(Instant),
}

/// Publishes `body` with at most `window` confirms outstanding, and returns how many
/// messages were published once every one is confirmed. `channel` must be in confirm mode.
/// Publishes are mandatory, so a message no queue takes fails the run instead of vanishing.
///
/// This is how a careful publisher gets the broker's throughput: one confirm at a time would
/// measure the round trip, not the broker.
pub async fn publish_windowed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    window: usize,
    until: Until,
    mut properties: impl FnMut() -> BasicProperties,
) -> anyhow::Result<u64> {
    let mut pending = FuturesUnordered::new();
    let mut published = 0u64;
    loop {
        let more = match until {
            Until::Count(n) => published < n,
            Until::Deadline(at) => Instant::now() < at,
        };
        if !more {
            break;
        }
        if pending.len() >= window
            && let Some(confirm) = pending.next().await
        {
            confirmed(confirm)?;
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties(),
            )
            .await?;
        pending.push(confirm);
        published += 1;
    }
    while let Some(confirm) = pending.next().await {
        confirmed(confirm)?;
    }
    Ok(published)
}

fn confirmed(confirm: Result<Confirmation, lapin::Error>) -> anyhow::Result<()> {
    match confirm? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => bail!("the broker returned a message: no queue is bound"),
        Confirmation::Nack(_) => bail!("the broker refused a message (nack)"),
        Confirmation::NotRequested => bail!("the channel is not in confirm mode"),
    }
}

/// Deletes queues and exchanges by name, ignoring the ones that are not there.
pub async fn delete(url: &str, queues: &[String], exchanges: &[String]) -> anyhow::Result<()> {
    let connection = connect(url, "hiway-bench-cleanup").await?;
    for q in queues {
        // A failed delete closes the channel, so each gets its own.
        let channel = connection.create_channel().await?;
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for e in exchanges {
        let channel = connection.create_channel().await?;
        let _ = channel
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "bench cleanup".into()).await;
    Ok(())
}

/// RabbitMQ's management API (port 15672 on the broker's host, same credentials), used for
/// what AMQP does not tell: the server version, and the list of queues and exchanges under
/// the run's prefix (the services may declare more than the bench knows of, e.g. retry
/// queues).
pub struct Management {
    base: String,
    vhost: String,
    user: String,
    password: String,
    http: reqwest::Client,
}

#[derive(serde::Deserialize)]
struct Named {
    name: String,
}

impl Management {
    /// The management API of the broker at `amqp_url`.
    pub fn from_amqp_url(amqp_url: &str) -> anyhow::Result<Self> {
        let url = url::Url::parse(amqp_url).context("the AMQP URL does not parse")?;
        let host = url.host_str().unwrap_or("127.0.0.1");
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let vhost = match url.path().trim_start_matches('/') {
            "" => "/".to_owned(),
            path => decode(path),
        };
        let user = if url.username().is_empty() {
            "guest".to_owned()
        } else {
            decode(url.username())
        };
        let password = decode(url.password().unwrap_or("guest"));
        Ok(Self {
            base: format!("http://{host}:15672/api"),
            vhost,
            user,
            password,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        })
    }

    async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let response = self
            .http
            .get(format!("{}/{path}", self.base))
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("GET {path}: HTTP {}", response.status());
        }
        Ok(response)
    }

    /// `rabbitmq_version` and `erlang_version` from `/api/overview`.
    pub async fn version(&self) -> anyhow::Result<String> {
        let overview: serde_json::Value =
            serde_json::from_slice(&self.get("overview").await?.bytes().await?)?;
        Ok(format!(
            "{} (Erlang {})",
            overview["rabbitmq_version"].as_str().unwrap_or("?"),
            overview["erlang_version"].as_str().unwrap_or("?")
        ))
    }

    /// Deletes every queue and exchange of the vhost whose name starts with `prefix.`;
    /// returns how many of each.
    pub async fn delete_prefixed(&self, prefix: &str) -> anyhow::Result<(usize, usize)> {
        let vhost = encode(&self.vhost);
        let starts = format!("{prefix}.");
        let mut counts = (0, 0);
        for (kind, count) in [("queues", &mut counts.0), ("exchanges", &mut counts.1)] {
            let body = self
                .get(&format!("{kind}/{vhost}?columns=name"))
                .await?
                .bytes()
                .await?;
            let names: Vec<Named> = serde_json::from_slice(&body)?;
            for n in names.into_iter().filter(|n| n.name.starts_with(&starts)) {
                let response = self
                    .http
                    .delete(format!("{}/{kind}/{vhost}/{}", self.base, encode(&n.name)))
                    .basic_auth(&self.user, Some(&self.password))
                    .send()
                    .await?;
                if response.status().is_success() {
                    *count += 1;
                }
            }
        }
        Ok(counts)
    }
}

/// Percent-encodes a path segment (the default vhost `/` becomes `%2F`).
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_management_api_is_found_from_the_amqp_url() {
        let m = Management::from_amqp_url("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(m.base, "http://127.0.0.1:15672/api");
        assert_eq!(m.vhost, "/");
        assert_eq!(encode(&m.vhost), "%2F");
        assert_eq!((m.user.as_str(), m.password.as_str()), ("guest", "guest"));
    }
}
