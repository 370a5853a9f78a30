//! hiway transformer: runs each accepted message through its routes.
//!
//! It consumes the ingress queue and, for each message, runs every route of its channel: the
//! route's filter (a jq program; false turns the message away from this route), then its
//! transform (a jq program whose zero, one or many outputs replace the message), and makes one
//! copy per output and destination on the deliver exchange (routing key = destination). The
//! audit events (`received`, then `routed`, `filtered` or `unrouted`) and the copies are in
//! flight together; the input is acked only once every one is confirmed. The audit events of
//! all the messages in hand travel together in one broker message ([`AuditBatcher`]). If any
//! fails the input is returned to the queue, so a copy may be sent twice but never lost
//! (destinations dedupe on the idempotency key). A route whose program fails on a message
//! dead-letters that message for that route alone, with jq's error; the other routes go on. A
//! message whose envelope cannot be read is dead-lettered whole.
//!
//! A broker message from ingress may be a batch of accepted messages ([`hiway_proto::batch`]):
//! each is routed as if it had come alone, and the batch is acked once all of them are
//! durable (or returned to the queue whole if any is not).
//!
//! On-dead routes take a copy of every dead letter (from their own queue on the dead
//! exchange) and run the same way, on `{message_id, channel, destination, route, reason,
//! body}`: that is how a failed delivery can tell its source ("sync failed").

mod routes;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use hiway_config::Config;
use hiway_proto::audit::{AuditEvent, AuditKind, RoutedCopy};
use hiway_proto::topology::{self, DEAD_KEY_INGRESS};
use hiway_proto::{Envelope, Names, RouteName, batch, headers};
use hiway_runtime::amqp::{BrokerError, Connection, Delivery};
use hiway_runtime::consume::{Reconnect, consume_concurrently};
use hiway_runtime::{Acks, AuditBatcher, Broker, Publisher};
use hiway_transform::{Applied, Input, Meta, Transforms};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use routes::{Entry, Routes};

const SERVICE: &str = "transformer";

/// Why the transformer could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker could not be reached or the topology not declared.
    #[error("cannot connect to the broker: {0}")]
    Broker(#[from] BrokerError),
    /// A route's program does not compile, or a lookup table does not read.
    #[error("the routes' programs cannot be used:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Transforms(Vec<String>),
}

/// The transformer, connected and ready to run.
pub struct Transformer {
    broker: Broker,
    connection: Connection,
    router: Arc<Router>,
    settings: Settings,
    reload_interval: Duration,
}

/// What a session needs besides the connection and the routes.
struct Settings {
    prefetch: u16,
    drain: Duration,
    delivery_limit: u32,
}

/// The routes and their compiled programs.
struct Router {
    routes: Routes,
    transforms: Transforms,
}

/// Compiles the routes' programs and reads the lookup tables (failing on any error), then
/// connects to the broker (declaring the topology).
pub async fn build(config: &Config) -> Result<Transformer, Error> {
    let transforms = Transforms::compile(config).map_err(Error::Transforms)?;
    let broker = Broker::new(config);
    let connection = broker.connect("hiway-transformer").await?;
    Ok(Transformer {
        broker,
        connection,
        router: Arc::new(Router {
            routes: Routes::from_config(config),
            transforms,
        }),
        settings: Settings {
            prefetch: config.transformer.prefetch,
            drain: config.shutdown.drain_timeout,
            delivery_limit: config.broker.delivery_limit,
        },
        reload_interval: config.transformer.lookup_reload_interval,
    })
}

impl Transformer {
    /// Routes messages until `stop`, then finishes the ones in hand and returns.
    pub async fn run(self, stop: CancellationToken) -> Result<(), Error> {
        let reloads = tokio::spawn(reload_lookups(
            self.router.clone(),
            self.reload_interval,
            stop.clone(),
        ));
        let mut connections =
            Reconnect::new(&self.broker, "hiway-transformer", self.connection, &stop);
        while let Some(conn) = connections.next().await {
            let ended = session(&self.broker, &conn, &self.router, &self.settings, &stop).await;
            connections.ended(conn, ended).await;
        }
        let _ = reloads.await;
        tracing::info!("transformer stopped");
        Ok(())
    }
}

/// Re-reads changed lookup tables every `interval` until `stop`.
async fn reload_lookups(router: Arc<Router>, interval: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        for line in router.transforms.lookups().reload_changed() {
            match line {
                Ok(done) => tracing::info!("{done}"),
                Err(error) => tracing::error!("{error}"),
            }
        }
    }
}

/// Consumes the ingress queue (and the on-dead queue, when on-dead routes exist) on one
/// connection until `stop` or a broker error.
async fn session(
    broker: &Broker,
    conn: &Connection,
    router: &Router,
    settings: &Settings,
    stop: &CancellationToken,
) -> Result<(), BrokerError> {
    let names = broker.names();
    let publisher = broker.publisher(conn).await?;
    // The audit events of every message in hand leave together, one broker message per batch.
    let (audit, audit_writer) = AuditBatcher::start(publisher.clone());
    // A batch holds many messages in one delivery, so prefetch alone would not bound the
    // messages being routed at once; these permits, one per message, do.
    let in_hand = tokio::sync::Semaphore::new(usize::from(settings.prefetch));
    let out = Out {
        publisher: &publisher,
        audit: &audit,
        deliver_exchange: &names.deliver_exchange(),
        in_hand: &in_hand,
    };
    // Prefetch bounds how many broker messages are held at once (and so memory: at most
    // prefetch × the largest body, or batch); all of them are handled concurrently, so their
    // confirms are in flight together.
    let prefetch = settings.prefetch;
    let consumer = broker
        .consumer(conn, &names.ingress_queue(), "hiway-transformer", prefetch)
        .await?;
    tracing::info!(queue = %names.ingress_queue(), prefetch, "transformer consuming");
    let ingress = consume_concurrently(
        consumer,
        usize::from(prefetch),
        stop,
        settings.drain,
        |delivery, acks| route(&out, router, delivery, acks),
    );
    let ended = if router.routes.has_on_dead() {
        let declare = conn.channel().await?;
        declare
            .declare(&topology::plan_on_dead(names, settings.delivery_limit))
            .await?;
        declare.close().await;
        let dead_consumer = broker
            .consumer(
                conn,
                &names.on_dead_queue(),
                "hiway-transformer-on-dead",
                prefetch,
            )
            .await?;
        let on_dead = consume_concurrently(
            dead_consumer,
            usize::from(prefetch),
            stop,
            settings.drain,
            |delivery, acks| route_dead(&out, router, delivery, acks),
        );
        tokio::try_join!(ingress, on_dead).map(|_| ())
    } else {
        retire_on_dead(conn, names).await;
        ingress.await
    };
    // Every handler has settled; let the last audit batches be confirmed before the channel
    // they use closes.
    drop(audit);
    audit_writer.finish().await;
    publisher.close().await;
    ended
}

/// With no on-dead route left, deletes the on-dead queue an earlier configuration made
/// ([`topology::plan_on_dead`]): bound to the dead-letter exchange, it would collect a copy of every
/// dead letter, read by nobody, for ever. The copies go with it; each is a copy of a dead
/// letter the audit service stored, so nothing is lost but the reaction of a route that no
/// longer exists. A transformer still on a configuration with on-dead routes (during a
/// rolling change) sees its consumer cancelled, reconnects and declares the queue again.
/// Best effort: a failure is logged and routing goes on.
async fn retire_on_dead(conn: &Connection, names: &Names) {
    let Ok(channel) = conn.channel().await else {
        return;
    };
    let queue = names.on_dead_queue();
    match channel.delete_queue(&queue).await {
        Ok(0) => {}
        Ok(copies) => tracing::warn!(
            %queue,
            copies,
            "no route has on_dead any more: deleted the on-dead queue and the copies of dead letters in it (the dead letters themselves are stored)"
        ),
        Err(error) => {
            tracing::warn!(%queue, %error, "could not delete the on-dead queue no route reads any more; delete it by hand")
        }
    }
    channel.close().await;
}

/// Where a handler's results go: copies and dead letters to the publisher, audit events to
/// the batcher.
struct Out<'a> {
    publisher: &'a Publisher,
    audit: &'a AuditBatcher,
    deliver_exchange: &'a str,
    /// One permit per message being routed (see [`session`]).
    in_hand: &'a tokio::sync::Semaphore,
}

/// Routes one broker message from the ingress queue, a single message or a batch of them
/// ([`hiway_proto::batch`]), and settles it.
async fn route(out: &Out<'_>, router: &Router, delivery: Delivery, acks: Acks) {
    if batch::is_batch(&delivery.properties) {
        return route_batch(out, router, delivery, acks).await;
    }
    let envelope = match Envelope::from_properties(&delivery.properties) {
        Ok(e) => e,
        Err(error) => {
            tracing::warn!(%error, "dead-lettering a message whose envelope cannot be read");
            return out
                .publisher
                .settle_poison(delivery, &error.to_string(), SERVICE, &acks)
                .await;
        }
    };
    let durable = route_one(out, router, envelope, &delivery.data).await;
    acks.settle(delivery.delivery_tag, durable);
}

/// Routes every message of a batch, all at once, and acks the batch once every one's copies,
/// dead letters and audit events are confirmed. If any fails the whole batch goes back to the
/// queue, and the messages already routed are routed again (their copies sent twice, which
/// destinations dedupe by idempotency key), as for a single message whose publishes fail.
/// A message of the batch whose envelope cannot be read is dead-lettered alone; a batch that
/// cannot be read at all is dead-lettered whole, with the reason naming where it is broken.
async fn route_batch(out: &Out<'_>, router: &Router, delivery: Delivery, acks: Acks) {
    let messages = match batch::read(&delivery.properties, &delivery.data) {
        Ok(m) => m,
        Err(error) => {
            tracing::warn!(%error, "dead-lettering a batch that cannot be read");
            return out
                .publisher
                .settle_poison(delivery, &error.to_string(), SERVICE, &acks)
                .await;
        }
    };
    let routing_key = delivery.routing_key.as_str();
    let routed = messages.into_iter().map(|(properties, body)| async move {
        match Envelope::from_properties(&properties) {
            Ok(envelope) => route_one(out, router, envelope, body).await,
            Err(error) => {
                tracing::warn!(%error, "dead-lettering a message of a batch whose envelope cannot be read");
                out.publisher
                    .publish_dead_parts(routing_key, body, properties, &error.to_string(), SERVICE)
                    .await
            }
        }
    });
    let durable = join_all(routed).await.into_iter().collect();
    acks.settle(delivery.delivery_tag, durable);
}

/// Runs a message's routes and publishes what they made. Ok only when every copy, dead
/// letter and audit event is confirmed.
async fn route_one(
    out: &Out<'_>,
    router: &Router,
    mut envelope: Envelope,
    body: &[u8],
) -> Result<(), hiway_runtime::PublishError> {
    // Never closed, so this waits for a permit and never fails.
    let _permit = out.in_hand.acquire().await;
    let span = tracing::info_span!("transformer.route", message_id = %envelope.id, channel = %envelope.channel);
    // Joins the trace the message came with (when traces are exported); its copies carry this
    // span's context on, or the one that came, unchanged.
    (envelope.traceparent, envelope.tracestate) = hiway_runtime::telemetry::hand_on(
        &span,
        envelope.traceparent.take(),
        envelope.tracestate.take(),
    );
    async {
        // A replayed dead letter of one route (its envelope names the route) runs that route
        // alone: the others already sent their copies.
        let entries: Vec<&Entry> = router
            .routes
            .for_channel(&envelope.channel)
            .iter()
            .filter(|e| envelope.route.as_ref().is_none_or(|r| *r == e.route))
            .collect();
        let received = AuditEvent {
            at: envelope.received_at,
            ..AuditEvent::now(
                envelope.id,
                "ingress",
                AuditKind::Received {
                    channel: envelope.channel.clone(),
                    client: envelope.client.clone(),
                    content_type: envelope.content_type.clone(),
                    size_bytes: body.len() as u64,
                },
            )
        };
        let plan = plan(router, &envelope, &entries, || hiway_transform::parse(body));
        carry_out(out, &envelope, body, plan, Some(received)).await
    }
    .instrument(span)
    .await
}

/// Runs the on-dead routes on one dead letter and settles it.
async fn route_dead(out: &Out<'_>, router: &Router, delivery: Delivery, acks: Acks) {
    // Only dead copies on their way to a destination concern on-dead routes; a dead letter
    // that is not one (poison, a failed transform, or a copy an on-dead route made) is taken
    // off this queue and left to the dead-letter store.
    let envelope = match Envelope::from_properties(&delivery.properties) {
        Ok(e) if !e.from_dead && e.destination.is_some() => e,
        _ => return acks.ack(delivery.delivery_tag),
    };
    let Some(destination) = envelope.destination.clone() else {
        return acks.ack(delivery.delivery_tag);
    };
    let entries: Vec<&Entry> = router.routes.on_dead_of(&destination).iter().collect();
    if entries.is_empty() {
        return acks.ack(delivery.delivery_tag);
    }
    let span = tracing::info_span!("transformer.on_dead", message_id = %envelope.id, destination = %destination);
    async {
        let reason =
            headers::text_lossy(&delivery.properties, headers::DEAD_REASON).unwrap_or_default();
        let body = &delivery.data;
        let input = || {
            // The failed message's own body, as JSON when it is JSON, else as text.
            let original = serde_json::from_slice::<serde_json::Value>(body)
                .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned().into());
            Ok(hiway_transform::from_json(&serde_json::json!({
                "message_id": envelope.id.to_string(),
                "channel": envelope.channel.as_str(),
                "destination": destination.as_str(),
                "route": envelope.route.as_ref().map(RouteName::as_str),
                "reason": reason,
                "body": original,
            })))
        };
        let mut source = envelope.clone();
        source.from_dead = true;
        source.route = None;
        source.destination = None;
        let plan = plan(router, &source, &entries, input);
        let durable = carry_out(out, &source, body, plan, None).await;
        acks.settle(delivery.delivery_tag, durable);
    }
    .instrument(span)
    .await
}

/// What running the routes made of one message.
#[derive(Default)]
struct Plan {
    /// Copies to publish: their envelope, and their body (`None`: the message's own; else an
    /// index into `bodies`, so an output sent to several destinations is held once).
    copies: Vec<(Envelope, Option<usize>)>,
    /// The transforms' outputs.
    bodies: Vec<Vec<u8>>,
    /// Routes whose rule turned the message away, and which rule.
    filtered: Vec<(RouteName, String)>,
    /// Routes whose program failed, and jq's error.
    failed: Vec<(RouteName, String)>,
    /// No route takes the message at all.
    unrouted: bool,
}

/// Runs every route's programs (CPU only, no I/O). The body is parsed at most once, and only
/// if some route has a program.
fn plan(
    router: &Router,
    envelope: &Envelope,
    entries: &[&Entry],
    parse: impl FnOnce() -> Result<Input, String>,
) -> Plan {
    let mut plan = Plan {
        unrouted: entries.is_empty(),
        ..Plan::default()
    };
    // The common case, no program on any route: copies only, none of the per-message work
    // programs need (metadata strings, parsing).
    if !entries
        .iter()
        .any(|e| router.transforms.needs_json(&e.route))
    {
        for entry in entries {
            for d in &entry.destinations {
                plan.copies.push((
                    envelope.for_destination(d.clone(), entry.route.clone()),
                    None,
                ));
            }
        }
        return plan;
    }
    let mut parse = Some(parse);
    let mut input: Option<Result<Input, String>> = None;
    let (id, received_at) = (envelope.id.to_string(), envelope.received_at.to_rfc3339());
    let meta = Meta {
        message_id: &id,
        channel: envelope.channel.as_str(),
        client: envelope.client.as_str(),
        received_at: &received_at,
    };
    for entry in entries {
        let applied = if router.transforms.needs_json(&entry.route) {
            let parsed = input.get_or_insert_with(|| match parse.take() {
                Some(p) => p(),
                None => Err("the body could not be read".into()),
            });
            match parsed {
                Ok(value) => router.transforms.apply(&entry.route, value, &meta),
                Err(e) => Err(format!("routes.{}: {e}", entry.route)),
            }
        } else {
            Ok(Applied::Unchanged)
        };
        let copy = |destination: &hiway_proto::DestinationName| {
            envelope.for_destination(destination.clone(), entry.route.clone())
        };
        match applied {
            Ok(Applied::Unchanged) => {
                for d in &entry.destinations {
                    plan.copies.push((copy(d), None));
                }
            }
            Ok(Applied::Filtered) => plan.filtered.push((entry.route.clone(), "filter".into())),
            Ok(Applied::Outputs(outputs)) if outputs.is_empty() => plan
                .filtered
                .push((entry.route.clone(), "transform emitted nothing".into())),
            Ok(Applied::Outputs(outputs)) => {
                for (part, output) in outputs.into_iter().enumerate() {
                    let body = plan.bodies.len();
                    plan.bodies.push(output.body);
                    for d in &entry.destinations {
                        let mut e = copy(d);
                        e.part = Some(u32::try_from(part).unwrap_or(u32::MAX));
                        e.path.clone_from(&output.path);
                        e.method.clone_from(&output.method);
                        e.content_type = "application/json".into();
                        plan.copies.push((e, Some(body)));
                    }
                }
            }
            Err(error) => {
                tracing::warn!(route = %entry.route, %error, "a route's program failed; the message is dead for that route");
                plan.failed.push((entry.route.clone(), error));
            }
        }
    }
    plan
}

/// Publishes a plan's copies, dead letters and audit events, all in flight together. Ok only
/// when every one was confirmed.
async fn carry_out(
    out: &Out<'_>,
    envelope: &Envelope,
    body: &[u8],
    plan: Plan,
    received: Option<AuditEvent>,
) -> Result<(), hiway_runtime::PublishError> {
    let mut events: Vec<AuditEvent> = received.into_iter().collect();
    if plan.unrouted {
        events.push(AuditEvent::now(
            envelope.id,
            SERVICE,
            AuditKind::Unrouted {
                channel: envelope.channel.clone(),
            },
        ));
    }
    if !plan.copies.is_empty() {
        events.push(AuditEvent::now(
            envelope.id,
            SERVICE,
            AuditKind::Routed {
                channel: envelope.channel.clone(),
                copies: plan
                    .copies
                    .iter()
                    .filter_map(|(e, _)| {
                        Some(RoutedCopy {
                            route: e.route.clone()?,
                            destination: e.destination.clone()?,
                            part: e.part,
                        })
                    })
                    .collect(),
            },
        ));
    }
    for (route, reason) in &plan.filtered {
        events.push(AuditEvent::now(
            envelope.id,
            SERVICE,
            AuditKind::Filtered {
                channel: envelope.channel.clone(),
                route: route.clone(),
                reason: reason.clone(),
            },
        ));
    }
    let copies = plan.copies.iter().map(|(e, own)| {
        let destination = e.destination.as_ref().map_or("", |d| d.as_str());
        out.publisher.publish(
            out.deliver_exchange,
            destination,
            own.map_or(body, |i| plan.bodies[i].as_slice()),
            e.to_properties(),
        )
    });
    // A failed route's dead letter carries the message as it came, with the route named, so
    // that replaying it runs that route again, and that route alone.
    let dead = plan.failed.iter().map(|(route, reason)| {
        let mut e = envelope.clone();
        e.route = Some(route.clone());
        out.publisher
            .publish_dead_parts(DEAD_KEY_INGRESS, body, e.to_properties(), reason, SERVICE)
    });
    let (copies, dead, audit) =
        tokio::join!(join_all(copies), join_all(dead), out.audit.record(events));
    copies
        .into_iter()
        .chain(dead)
        .chain(std::iter::once(audit))
        .collect()
}
