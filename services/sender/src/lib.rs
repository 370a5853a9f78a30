//! hiway sender: delivers each destination's queue to that destination over HTTP.
//!
//! One process may serve several destinations (`sender.destinations`, empty = all), and
//! several processes may serve the same one: they compete for its queue, so adding a process
//! adds throughput. For each message the destination's kind ([`kinds`]) makes its requests
//! (one for `http`; a post and job polls for an asynchronous `dhis2` import; a workflow of
//! several for `openmrs`), with the copy's idempotency key in `Idempotency-Key` and the
//! message id in `X-Hiway-Message-Id`, and comes back with one outcome ([`outcome`]):
//! - delivered: it records `delivered` in the audit trail and acks once that is confirmed
//!   (the audit events of all the deliveries in hand travel in one broker message,
//!   [`AuditBatcher`]);
//! - retryable, attempts left: it publishes the message to the retry queue for the next wait
//!   of the destination's schedule (attempt count and history in its headers), records the
//!   attempt, and acks once both are confirmed;
//! - permanent, or no attempts left: it publishes the message to the dead-letter exchange with
//!   the reason and every attempt, records the attempt, and acks once both are confirmed.
//!
//! A failed delivery is never acked as delivered, and nothing is acked before its next home
//! has confirmed it.

mod circuit;
mod destination;
mod kinds;
mod login;
pub mod outcome;
mod retry;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::try_join_all;
use hiway_config::Config;
use hiway_proto::amqp::BasicProperties;
use hiway_proto::audit::{AuditEvent, AuditKind};
use hiway_proto::{Envelope, Names};
use hiway_runtime::amqp::{BrokerError, Connection, Delivery};
use hiway_runtime::consume::{Reconnect, consume_concurrently};
use hiway_runtime::{Acks, AuditBatcher, Broker, Publisher};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use circuit::Breaker;
pub use destination::{Destination, DestinationError};
use outcome::Outcome;

const SERVICE: &str = "sender";

/// Why the sender could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker could not be reached or the topology not declared.
    #[error("cannot connect to the broker: {0}")]
    Broker(#[from] BrokerError),
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
) -> Result<(), BrokerError> {
    let publisher = broker.publisher(conn).await?;
    // The audit events of every delivery in hand, across destinations, leave together.
    let (audit, audit_writer) = AuditBatcher::start(publisher.clone());
    let out = Out {
        publisher: &publisher,
        audit: &audit,
        names: broker.names(),
    };
    let workers = sender
        .destinations
        .iter()
        .map(|destination| serve(broker, conn, &out, destination, sender.drain, stop));
    let ended = try_join_all(workers).await.map(|_| ());
    // Every delivery has settled; let the last audit batches be confirmed before the channel
    // they use closes.
    drop(audit);
    audit_writer.finish().await;
    publisher.close().await;
    ended
}

/// Where a delivery's results go: retries and dead letters to the publisher, audit events to
/// the batcher.
struct Out<'a> {
    publisher: &'a Publisher,
    audit: &'a AuditBatcher,
    names: &'a Names,
}

/// Serves one destination: consumes while its circuit is closed; when it trips, lets go of
/// its messages, waits the cool-down and probes with one message until one is delivered.
async fn serve(
    broker: &Broker,
    conn: &Connection,
    out: &Out<'_>,
    destination: &Destination,
    drain: Duration,
    stop: &CancellationToken,
) -> Result<(), BrokerError> {
    let names = broker.names();
    let queue = names.deliver_queue(&destination.name);
    let breaker = Breaker::new(destination.circuit.failures);
    loop {
        // Closed: consume. The round ends on stop or when the breaker trips.
        let round = stop.child_token();
        breaker.arm(round.clone());
        // Prefetch covers the requests in flight and the messages whose outcome awaits its
        // confirm, so the next request starts as soon as a slot frees.
        let consumer = broker
            .consumer(conn, &queue, "hiway-sender", destination.prefetch)
            .await?;
        tracing::info!(%queue, concurrency = destination.concurrency, prefetch = destination.prefetch, "sender consuming");
        // Every message held is handled at once; `destination.requests` lets `concurrency` of
        // them talk to the destination while the others wait for a slot or for their outcome
        // to be confirmed.
        consume_concurrently(
            consumer,
            usize::from(destination.prefetch),
            &round,
            drain,
            |delivery, acks| deliver(destination, out, &breaker, Some(&round), delivery, acks),
        )
        .await?;
        // The messages held but not started are back in the queue ([`give_back`]): they wait
        // there rather than fail against a destination that is down. The consumer's channel
        // is closed, which returns any that could not be put back.
        if stop.is_cancelled() {
            return Ok(());
        }

        // Open: wait, then probe with a single message until one gets through.
        tracing::warn!(destination = %destination.name, cool_down = ?destination.circuit.cool_down, "circuit open: not sending");
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(destination.circuit.cool_down) => {}
            }
            let probe_channel = conn.channel().await?;
            let Some(probe) = probe_channel.get(&queue).await? else {
                // Nothing to probe with: the circuit stays open until a message arrives.
                probe_channel.close().await;
                continue;
            };
            let id = Envelope::from_properties(&probe.properties)
                .ok()
                .map(|e| e.id);
            let (acks, ack_task) = hiway_runtime::acks::start(&probe_channel, 1);
            let answered = deliver(destination, out, &breaker, None, probe, acks).await;
            ack_task.finish().await;
            probe_channel.close().await;
            if answered {
                tracing::info!(destination = %destination.name, "probe answered: circuit closed");
                if let Some(id) = id {
                    let event = AuditEvent::now(
                        id,
                        SERVICE,
                        AuditKind::CircuitClosed {
                            destination: destination.name.clone(),
                        },
                    );
                    if let Err(error) = out.audit.record(vec![event]).await {
                        tracing::warn!(%error, "could not record that the circuit closed");
                    }
                }
                break;
            }
        }
    }
}

/// What a session needs besides the connection.
struct Settings {
    destinations: Vec<Arc<Destination>>,
    drain: Duration,
}

/// Delivers one message and settles it: ack once its outcome is durable (delivered and
/// recorded, scheduled for retry, or dead), nack with requeue if that could not be made
/// durable. Returns whether the destination answered (delivered, or a permanent refusal):
/// either way it is up, which is what a circuit probe asks.
///
/// A message still waiting for a request slot when `round` ends (the circuit opened, or the
/// sender is stopping) is not sent: it goes back to its queue untried ([`give_back`]).
async fn deliver(
    destination: &Destination,
    out: &Out<'_>,
    breaker: &Breaker,
    round: Option<&CancellationToken>,
    delivery: Delivery,
    acks: Acks,
) -> bool {
    let Out {
        publisher,
        audit,
        names,
    } = *out;
    let envelope = match Envelope::from_properties(&delivery.properties) {
        Ok(e) => e,
        Err(error) => {
            tracing::warn!(%error, destination = %destination.name, "dead-lettering a message whose envelope cannot be read");
            publisher
                .settle_poison(delivery, &error.to_string(), SERVICE, &acks)
                .await;
            return false;
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
    // Joins the trace the message came with, when traces are exported; the request then
    // carries this span's context (kinds::http::message_request). Not `hand_on`: the envelope
    // keeps the context that came, so that a retry's copy is again a child of the
    // transformer's span, a sibling of this attempt, not its child.
    hiway_runtime::telemetry::set_parent(
        &span,
        envelope.traceparent.as_deref(),
        envelope.tracestate.as_deref(),
    );
    async {
        let Delivery {
            data,
            delivery_tag,
            properties,
            routing_key,
            ..
        } = delivery;
        // Moved, not copied: the same buffer is the request body and, if needed, the retry.
        let body = Bytes::from(data);
        let slot = match round {
            Some(round) => tokio::select! {
                biased;
                _ = round.cancelled() => {
                    give_back(out, destination, &acks, delivery_tag, &body, properties).await;
                    return false;
                }
                slot = destination.requests.acquire() => slot,
            },
            None => destination.requests.acquire().await,
        };
        let started = Instant::now();
        let outcome = kinds::send(destination, &envelope, body.clone()).await;
        let duration_ms = started.elapsed().as_millis() as u64;
        if let Some(status) = outcome.status() {
            tracing::Span::current().record("status", status);
        }
        let parked = outcome.refuses_credentials();
        let answered = !matches!(outcome, Outcome::Retry { .. }) && !parked;
        let permanent = matches!(outcome, Outcome::Permanent { .. });
        // Recorded in this message's trail when its failure is the one that opened the circuit.
        let tripped = breaker.record(&outcome).map(|failures| {
            tracing::warn!(failures, "circuit opened");
            AuditEvent::now(
                envelope.id,
                SERVICE,
                AuditKind::CircuitOpened {
                    destination: destination.name.clone(),
                    failures,
                    cool_down_ms: destination.circuit.cool_down.as_millis() as u64,
                    reason: parked
                        .then(|| "the destination refuses hiway's credentials (HTTP 401)".into()),
                },
            )
        });
        // Freed only now that the breaker has counted this answer: a message waiting for the
        // slot must see the round ended if this failure opened the circuit, not start a request.
        drop(slot);

        // Refused credentials: the message goes back to its queue, the attempt uncounted, and
        // waits there with the others (the circuit is open) until the credentials are fixed
        // and a probe gets through.
        if parked && let Outcome::Permanent { status, error } = outcome {
            tracing::error!(
                status,
                "the destination refuses hiway's credentials: its circuit is open and its messages wait in their queue until they are fixed"
            );
            // In the trail of the messages refused while consuming (the one that opened the
            // circuit, and those in flight with it), not of every probe: a probe every
            // cool-down for hours would bury one message's trail in identical events. The
            // probes' refusals are in the log.
            if round.is_some() {
                let event = attempted(
                    &envelope,
                    destination,
                    attempt,
                    status,
                    duration_ms,
                    format!("credentials refused; not counted as an attempt, the message waits in its queue: {error}"),
                    None,
                );
                let events: Vec<_> = std::iter::once(event).chain(tripped).collect();
                if let Err(error) = audit.record(events).await {
                    tracing::warn!(%error, "could not record the refused attempt");
                }
            }
            give_back(out, destination, &acks, delivery_tag, &body, properties).await;
            return false;
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
                audit.record(vec![event]).await
            }
            Outcome::Retry {
                status,
                error,
                retry_after,
            } if attempt < destination.retry.max_attempts() => {
                let delay = retry::next_delay(&destination.retry.schedule, attempt, retry_after);
                let wait = retry::jittered(delay, destination.retry.jitter);
                tracing::info!(status, retry_in = ?wait, "delivery failed; retrying later");
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
                let events: Vec<_> = std::iter::once(event).chain(tripped).collect();
                tokio::try_join!(
                    publisher.publish(&exchange, &key, &body, props),
                    audit.record(events),
                )
                .map(|_| ())
            }
            Outcome::Retry { status, error, .. } | Outcome::Permanent { status, error } => {
                let reason = if permanent {
                    format!("permanent failure: {error}")
                } else {
                    format!("gave up after {attempt} attempts; last: {error}")
                };
                // The status, not the reason: the destination's answer may echo the payload,
                // and payloads never go into logs. The reason is in the dead letter.
                tracing::warn!(status, permanent, "delivery failed; the message is dead");
                let props = retry::next_properties(&properties, &envelope, attempt, status, &error);
                let last = attempted(
                    &envelope,
                    destination,
                    attempt,
                    status,
                    duration_ms,
                    error,
                    None,
                );
                let events: Vec<_> = std::iter::once(last).chain(tripped).collect();
                tokio::try_join!(
                    publisher.publish_dead_parts(
                        routing_key.as_str(),
                        &body,
                        props,
                        &reason,
                        SERVICE
                    ),
                    audit.record(events),
                )
                .map(|_| ())
            }
        };
        acks.settle(delivery_tag, durable);
        answered
    }
    .instrument(span)
    .await
}

/// Puts a message that was held but never sent back into its destination's queue, as a new
/// copy, and acks the one in hand.
///
/// Why not simply leave it unacked for the channel's close to return: the broker counts every
/// return toward the queue's `delivery_limit` (which is there to catch poison that crashes
/// its worker), so with prefetch in the hundreds, a destination whose circuit opened a few
/// times would have messages that never reached it dead-lettered as poison. The copy starts
/// with a clean count. If it cannot be published, the message is left unacked and the close
/// returns it after all.
async fn give_back(
    out: &Out<'_>,
    destination: &Destination,
    acks: &Acks,
    delivery_tag: u64,
    body: &[u8],
    properties: BasicProperties,
) {
    let exchange = out.names.deliver_exchange();
    match out
        .publisher
        .publish(&exchange, destination.name.as_str(), body, properties)
        .await
    {
        Ok(()) => acks.ack(delivery_tag),
        Err(error) => {
            tracing::warn!(%error, "could not put a held message back; the channel's close returns it");
        }
    }
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
