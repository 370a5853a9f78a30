//! hiway sender: delivers each destination's queue to that destination over HTTP.
//!
//! One process may serve several destinations (`sender.destinations`, empty = all), and
//! several processes may serve the same one: they compete for its queue, so adding a process
//! adds throughput. For each message the sender makes one HTTP request with the message id in
//! `Idempotency-Key` and `X-Hiway-Message-Id`. On a 2xx it records `delivered` in the audit
//! trail and acks only once that record is confirmed. On anything else it records the attempt,
//! waits `sender.requeue_delay`, and puts the message back on the destination's queue with its
//! attempt count raised, acking the original only once the new copy is confirmed: a failed
//! delivery is never acked as delivered. (Retry schedules and dead letters build on this.)

mod destination;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::try_join_all;
use hiway_config::Config;
use hiway_proto::audit::{AuditEvent, AuditKind};
use hiway_proto::{Envelope, Names, headers};
use hiway_runtime::consume::{Reconnect, consume_concurrently};
use hiway_runtime::{Broker, Publisher};
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use reqwest::header::CONTENT_TYPE;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use destination::{Destination, DestinationError};

const SERVICE: &str = "sender";
/// How much of a failed response's body is kept as its error text: enough for a DHIS2
/// conflict list or an OperationOutcome, bounded so one answer cannot bloat the audit trail.
const ERROR_TEXT_LIMIT: usize = 2048;

/// Why the sender could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker could not be reached or the topology not declared.
    #[error("cannot connect to the broker: {0}")]
    Broker(#[from] lapin::Error),
    /// A destination's settings cannot be used.
    #[error(transparent)]
    Destination(#[from] DestinationError),
}

/// The sender, connected and ready to run.
pub struct Sender {
    broker: Broker,
    connection: Connection,
    destinations: Vec<Arc<Destination>>,
    requeue_delay: Duration,
    drain: Duration,
}

/// Connects to the broker and builds one HTTP client per served destination.
pub async fn build(config: &Config) -> Result<Sender, Error> {
    let serve_all = config.sender.destinations.is_empty();
    let destinations = config
        .destinations
        .iter()
        .filter(|(name, _)| serve_all || config.sender.destinations.contains(name))
        .map(|(name, d)| Destination::new(name.clone(), d).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let broker = Broker::new(config);
    let connection = broker.connect("hiway-sender").await?;
    Ok(Sender {
        broker,
        connection,
        destinations,
        requeue_delay: config.sender.requeue_delay,
        drain: config.shutdown.drain_timeout,
    })
}

impl Sender {
    /// Delivers until `stop`, then finishes the requests in flight and returns.
    pub async fn run(self, stop: CancellationToken) -> Result<(), Error> {
        let Self {
            broker,
            connection,
            destinations,
            requeue_delay,
            drain,
        } = self;
        let settings = Settings {
            destinations,
            requeue_delay,
            drain,
        };
        let mut connections = Reconnect::new(&broker, "hiway-sender", connection, &stop);
        while let Some(conn) = connections.next().await {
            let ended = session(&broker, &settings, &conn, &stop).await;
            connections.ended(conn, ended).await;
        }
        tracing::info!("sender stopped");
        Ok(())
    }
}

/// Consumes every served destination's queue on one connection until `stop` or a broker
/// error.
async fn session(
    broker: &Broker,
    sender: &Settings,
    conn: &Connection,
    stop: &CancellationToken,
) -> Result<(), lapin::Error> {
    let names = broker.names();
    let publisher = broker.publisher(conn).await?;
    let mut workers = Vec::new();
    for destination in &sender.destinations {
        let queue = names.deliver_queue(&destination.name);
        // Prefetch covers the requests in flight plus a small buffer, so the next one starts
        // as soon as a slot frees; more would only sit unacked, redelivered after a crash.
        let (channel, consumer) = broker
            .consumer(conn, &queue, "hiway-sender", destination.prefetch)
            .await?;
        tracing::info!(%queue, concurrency = destination.concurrency, prefetch = destination.prefetch, "sender consuming");
        let publisher = &publisher;
        workers.push(async move {
            let _channel = channel; // kept open for as long as its consumer runs
            consume_concurrently(
                consumer,
                destination.concurrency,
                stop,
                sender.drain,
                |delivery| {
                    deliver(
                        destination,
                        publisher,
                        names,
                        sender.requeue_delay,
                        delivery,
                    )
                },
            )
            .await
        });
    }
    try_join_all(workers).await.map(|_| ())
}

/// What a session needs besides the connection.
struct Settings {
    destinations: Vec<Arc<Destination>>,
    requeue_delay: Duration,
    drain: Duration,
}

/// What became of one attempt.
enum Outcome {
    Delivered { status: u16 },
    Failed { status: Option<u16>, error: String },
}

/// Delivers one message and settles it.
async fn deliver(
    destination: &Destination,
    publisher: &Publisher,
    names: &Names,
    requeue_delay: Duration,
    delivery: Delivery,
) {
    let envelope = match Envelope::from_properties(&delivery.properties) {
        Ok(e) => e,
        Err(error) => {
            tracing::warn!(%error, destination = %destination.name, "dead-lettering a message whose envelope cannot be read");
            return dead_letter(publisher, delivery, &error.to_string()).await;
        }
    };
    let attempt = envelope.attempt + 1;
    let span = tracing::info_span!(
        "sender.deliver",
        message_id = %envelope.id,
        destination = %destination.name,
        attempt,
        status = tracing::field::Empty,
    );
    async {
        let Delivery {
            data,
            acker,
            properties,
            ..
        } = delivery;
        // Moved, not copied: the same buffer is the request body and, if needed, the retry.
        let body = Bytes::from(data);
        let started = Instant::now();
        let outcome = send(destination, &envelope, body.clone()).await;
        let duration_ms = started.elapsed().as_millis() as u64;

        match outcome {
            Outcome::Delivered { status } => {
                tracing::Span::current().record("status", status);
                let event = AuditEvent::now(
                    envelope.id,
                    SERVICE,
                    AuditKind::Delivered {
                        destination: destination.name.clone(),
                        route: envelope.route.clone(),
                        attempt,
                        status_code: status,
                        duration_ms,
                    },
                );
                settle(&acker, publisher.publish_audit(&[event]).await.map(|_| ())).await;
            }
            Outcome::Failed { status, error } => {
                if let Some(status) = status {
                    tracing::Span::current().record("status", status);
                }
                tracing::warn!(%error, "delivery failed; the message goes back to its queue");
                let event = AuditEvent::now(
                    envelope.id,
                    SERVICE,
                    AuditKind::Attempted {
                        destination: destination.name.clone(),
                        route: envelope.route.clone(),
                        attempt,
                        status_code: status,
                        duration_ms,
                        error,
                    },
                );
                tokio::time::sleep(requeue_delay).await;
                let mut again = envelope.clone();
                again.attempt = attempt;
                // The new copy keeps the original properties (e.g. correlation id) with the
                // attempt count raised.
                let props = properties
                    .clone()
                    .with_headers(merge_headers(&properties, &again.to_properties()));
                let exchange = names.deliver_exchange();
                let events = [event];
                let requeued = tokio::try_join!(
                    publisher.publish(&exchange, destination.name.as_str(), &body, props),
                    publisher.publish_audit(&events),
                );
                settle(&acker, requeued.map(|_| ())).await;
            }
        }
    }
    .instrument(span)
    .await
}

/// Acks when the outcome is durable; otherwise returns the message to its queue.
async fn settle(acker: &lapin::Acker, durable: Result<(), hiway_runtime::PublishError>) {
    match durable {
        Ok(()) => {
            if let Err(error) = acker.ack(BasicAckOptions::default()).await {
                tracing::warn!(%error, "ack failed; the message will be delivered again");
            }
        }
        Err(error) => {
            tracing::warn!(%error, "could not record the outcome; the message will be delivered again");
            let _ = acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
        }
    }
}

/// The original headers with hiway's own replaced by `fresh`'s.
fn merge_headers(
    original: &lapin::BasicProperties,
    fresh: &lapin::BasicProperties,
) -> lapin::types::FieldTable {
    let mut merged = original.headers().clone().unwrap_or_default();
    if let Some(h) = fresh.headers() {
        for (k, v) in h.inner() {
            merged.insert(k.clone(), v.clone());
        }
    }
    merged
}

/// Makes the HTTP request.
async fn send(destination: &Destination, envelope: &Envelope, body: Bytes) -> Outcome {
    let id = envelope.id.to_string();
    let request = destination
        .client
        .request(destination.method.clone(), destination.url.clone())
        .headers(destination.headers.clone())
        .header(CONTENT_TYPE, &envelope.content_type)
        .header(headers::HTTP_IDEMPOTENCY_KEY, &id)
        .header(headers::HTTP_MESSAGE_ID, &id)
        .body(body);
    match request.send().await {
        Err(e) => Outcome::Failed {
            status: None,
            error: describe(&e),
        },
        Ok(response) => {
            let status = response.status();
            // The body is read either way: on success so the connection returns to the pool,
            // on failure because the destination's own words are the most useful error text.
            let text = response.bytes().await.unwrap_or_default();
            if status.is_success() {
                Outcome::Delivered {
                    status: status.as_u16(),
                }
            } else {
                let excerpt = String::from_utf8_lossy(&text[..text.len().min(ERROR_TEXT_LIMIT)]);
                Outcome::Failed {
                    status: Some(status.as_u16()),
                    error: format!("HTTP {status}: {}", excerpt.trim()),
                }
            }
        }
    }
}

/// A transport error in words, without the URL's query (which may hold a token).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut text = kind.to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

async fn dead_letter(publisher: &Publisher, delivery: Delivery, reason: &str) {
    match publisher.publish_dead(&delivery, reason, SERVICE).await {
        Ok(()) => {
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        Err(error) => {
            tracing::warn!(%error, "could not publish the dead letter; rejecting to the queue's dead-letter exchange");
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: false,
                    ..Default::default()
                })
                .await;
        }
    }
}
