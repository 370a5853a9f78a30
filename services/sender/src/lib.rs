//! hiway sender: delivers each destination's queue to that destination over HTTP.
//!
//! One process may serve several destinations (`sender.destinations`, empty = all), and
//! several processes may serve the same one: they compete for its queue, so adding a process
//! adds throughput. For each message the sender makes one HTTP request with the message id in
//! `Idempotency-Key` and `X-Hiway-Message-Id`, and reads the answer ([`outcome`]):
//! - delivered: it records `delivered` in the audit trail and acks once that is confirmed;
//! - retryable, attempts left: it publishes the message to the retry queue for the next wait
//!   of the destination's schedule (attempt count and history in its headers), records the
//!   attempt, and acks once both are confirmed;
//! - permanent, or no attempts left: it publishes the message to the dead-letter exchange with
//!   the reason and every attempt, records the attempt, and acks once both are confirmed.
//!
//! A failed delivery is never acked as delivered, and nothing is acked before its next home
//! has confirmed it.

mod destination;
mod dhis2;
pub mod outcome;
mod retry;

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
use outcome::Outcome;

const SERVICE: &str = "sender";

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
            drain,
        } = self;
        let settings = Settings {
            destinations,
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
                |delivery| deliver(destination, publisher, names, delivery),
            )
            .await
        });
    }
    try_join_all(workers).await.map(|_| ())
}

/// What a session needs besides the connection.
struct Settings {
    destinations: Vec<Arc<Destination>>,
    drain: Duration,
}

/// Delivers one message and settles it: ack once its outcome is durable (delivered and
/// recorded, scheduled for retry, or dead), nack with requeue if that could not be made
/// durable.
async fn deliver(
    destination: &Destination,
    publisher: &Publisher,
    names: &Names,
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
            routing_key,
            ..
        } = delivery;
        // Moved, not copied: the same buffer is the request body and, if needed, the retry.
        let body = Bytes::from(data);
        let started = Instant::now();
        let outcome = send(destination, &envelope, body.clone()).await;
        let duration_ms = started.elapsed().as_millis() as u64;
        if let Some(status) = outcome.status() {
            tracing::Span::current().record("status", status);
        }

        let durable = match outcome {
            Outcome::Delivered { status } => {
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
                publisher.publish_audit(&[event]).await
            }
            Outcome::Retry {
                status,
                error,
                retry_after,
            } if attempt < destination.retry.max_attempts() => {
                let delay = retry::next_delay(&destination.retry.schedule, attempt, retry_after);
                let wait = retry::jittered(delay, destination.retry.jitter);
                tracing::info!(%error, retry_in = ?wait, "delivery failed; retrying later");
                let props = retry::next_properties(&properties, &envelope, attempt, status, &error)
                    .with_expiration(wait.as_millis().to_string().into());
                let event = attempted(
                    &envelope,
                    destination,
                    attempt,
                    status,
                    duration_ms,
                    error,
                    Some(wait),
                );
                let exchange = names.retry_exchange();
                let key = names.retry_key(&destination.name, delay);
                let events = [event];
                tokio::try_join!(
                    publisher.publish(&exchange, &key, &body, props),
                    publisher.publish_audit(&events),
                )
                .map(|_| ())
            }
            Outcome::Retry { status, error, .. } => {
                let reason = format!("gave up after {attempt} attempts; last: {error}");
                let dead = Dead {
                    routing_key: routing_key.as_str(),
                    body: &body,
                    properties: &properties,
                };
                go_dead(
                    publisher,
                    destination,
                    &envelope,
                    dead,
                    attempt,
                    status,
                    duration_ms,
                    error,
                    reason,
                )
                .await
            }
            Outcome::Permanent { status, error } => {
                let reason = format!("permanent failure: {error}");
                let dead = Dead {
                    routing_key: routing_key.as_str(),
                    body: &body,
                    properties: &properties,
                };
                go_dead(
                    publisher,
                    destination,
                    &envelope,
                    dead,
                    attempt,
                    status,
                    duration_ms,
                    error,
                    reason,
                )
                .await
            }
        };
        settle(&acker, durable).await;
    }
    .instrument(span)
    .await
}

/// The message being dead-lettered, as it arrived.
struct Dead<'a> {
    routing_key: &'a str,
    body: &'a [u8],
    properties: &'a lapin::BasicProperties,
}

/// Sends the message dead, with every attempt in its headers, and records this last attempt.
#[allow(clippy::too_many_arguments)] // each is one fact of the attempt; a struct would only rename them
async fn go_dead(
    publisher: &Publisher,
    destination: &Destination,
    envelope: &Envelope,
    dead: Dead<'_>,
    attempt: u32,
    status: Option<u16>,
    duration_ms: u64,
    error: String,
    reason: String,
) -> Result<(), hiway_runtime::PublishError> {
    tracing::warn!(%reason, "delivery failed; the message is dead");
    let props = retry::next_properties(dead.properties, envelope, attempt, status, &error);
    let events = [attempted(
        envelope,
        destination,
        attempt,
        status,
        duration_ms,
        error,
        None,
    )];
    tokio::try_join!(
        publisher.publish_dead_parts(dead.routing_key, dead.body, props, &reason, SERVICE),
        publisher.publish_audit(&events),
    )
    .map(|_| ())
}

fn attempted(
    envelope: &Envelope,
    destination: &Destination,
    attempt: u32,
    status_code: Option<u16>,
    duration_ms: u64,
    error: String,
    retry_in: Option<Duration>,
) -> AuditEvent {
    AuditEvent::now(
        envelope.id,
        SERVICE,
        AuditKind::Attempted {
            destination: destination.name.clone(),
            route: envelope.route.clone(),
            attempt,
            status_code,
            duration_ms,
            error,
            retry_in_ms: retry_in.map(|d| d.as_millis() as u64),
        },
    )
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

/// Makes the HTTP request and reads the answer.
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
        Err(e) => outcome::transport_error(&e),
        Ok(response) => {
            let status = response.status();
            let response_headers = response.headers().clone();
            // The body is read either way: on success so the connection returns to the pool,
            // and because it may hold the verdict (DHIS2) or the destination's own words.
            match response.bytes().await {
                Ok(body) => outcome::classify(destination.kind, status, &response_headers, &body),
                Err(e) => outcome::transport_error(&e),
            }
        }
    }
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
