//! The whole RabbitMQ topology, declared idempotently.
//!
//! Every service calls [`declare`] when it connects, so whichever starts first creates what all
//! of them need, and a broker that lost its definitions gets them back on the next reconnect.
//! Declaring an existing exchange or queue with the same arguments is a no-op; with different
//! arguments the broker refuses (`PRECONDITION_FAILED`), which is why the arguments live here
//! and nowhere else.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::ids::DestinationName;
use crate::names::{AUDIT_KEY, INGRESS_KEY, Names};

/// Routing key under which the ingress queue dead-letters (poison envelopes).
pub const DEAD_KEY_INGRESS: &str = "ingress";
/// Routing key under which the audit queue dead-letters (unparsable audit batches).
pub const DEAD_KEY_AUDIT: &str = "audit";

/// What the topology needs to know about one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationTopology {
    /// Its name: routing key and queue name suffix.
    pub name: DestinationName,
    /// Its retry schedule: one delay queue per distinct wait.
    pub retry_delays: Vec<Duration>,
}

/// Declares every exchange, queue and binding for these destinations.
///
/// `delivery_limit` is the number of deliveries without an ack after which the broker
/// dead-letters a message from a worker's queue: a message that crashes its worker every time
/// must not be handed out forever.
pub async fn declare(
    channel: &Channel,
    names: &Names,
    destinations: &[DestinationTopology],
    delivery_limit: u32,
) -> Result<(), lapin::Error> {
    for (exchange, kind) in [
        (names.ingress_exchange(), ExchangeKind::Direct),
        (names.deliver_exchange(), ExchangeKind::Direct),
        (names.retry_exchange(), ExchangeKind::Direct),
        // Fanout: whatever the routing key a message died with, it reaches the dead queue; the
        // key (the destination) is kept on the message for the audit service to read.
        (names.dead_exchange(), ExchangeKind::Fanout),
        (names.audit_exchange(), ExchangeKind::Direct),
    ] {
        channel
            .exchange_declare(
                exchange.into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
    }

    let dead = names.dead_exchange();
    let worker = |key: &str| {
        Args::quorum()
            .dead_letter(&dead, key)
            .delivery_limit(delivery_limit)
    };
    queue(channel, &names.ingress_queue(), worker(DEAD_KEY_INGRESS)).await?;
    bind(
        channel,
        &names.ingress_queue(),
        &names.ingress_exchange(),
        INGRESS_KEY,
    )
    .await?;

    queue(channel, &names.audit_queue(), worker(DEAD_KEY_AUDIT)).await?;
    bind(
        channel,
        &names.audit_queue(),
        &names.audit_exchange(),
        AUDIT_KEY,
    )
    .await?;

    // The dead queue has no dead-letter exchange and no delivery limit: it is the end of the
    // line, and what reaches it stays until the audit service has stored it durably.
    queue(channel, &names.dead_queue(), Args::quorum()).await?;
    bind(channel, &names.dead_queue(), &names.dead_exchange(), "").await?;

    for d in destinations {
        let key = d.name.as_str();
        queue(channel, &names.deliver_queue(&d.name), worker(key)).await?;
        bind(
            channel,
            &names.deliver_queue(&d.name),
            &names.deliver_exchange(),
            key,
        )
        .await?;

        // Retries wait in a queue per delay whose TTL, once expired, dead-letters the message
        // back to the destination's queue. One queue per delay keeps every queue in expiry
        // order, so no message waits behind a longer one (jitter, a per-message TTL, only ever
        // shortens a wait, by at most the jitter fraction).
        let mut delays = d.retry_delays.clone();
        delays.sort();
        delays.dedup();
        for delay in delays {
            let ttl = u32::try_from(delay.as_millis()).unwrap_or(u32::MAX);
            let args = Args::quorum()
                .dead_letter(&names.deliver_exchange(), key)
                .ttl(ttl);
            queue(channel, &names.retry_queue(&d.name, delay), args).await?;
            let retry_key = names.retry_key(&d.name, delay);
            bind(
                channel,
                &names.retry_queue(&d.name, delay),
                &names.retry_exchange(),
                &retry_key,
            )
            .await?;
        }
    }
    Ok(())
}

/// Declares the queue on-dead routes read: a second copy of every dead letter (the audit
/// service stores the first). It has no dead-letter exchange of its own, so a copy the
/// transformer cannot handle is dropped after `delivery_limit` deliveries rather than dead
/// again in a loop; the dead letter itself is stored either way.
pub async fn declare_on_dead(
    channel: &Channel,
    names: &Names,
    delivery_limit: u32,
) -> Result<(), lapin::Error> {
    queue(
        channel,
        &names.on_dead_queue(),
        Args::quorum().delivery_limit(delivery_limit),
    )
    .await?;
    bind(channel, &names.on_dead_queue(), &names.dead_exchange(), "").await
}

/// Deletes the queue on-dead routes read, with the copies in it, and returns how many there
/// were: for a configuration without on-dead routes, where it would collect a copy of every
/// dead letter for ever. RabbitMQ answers a delete of a queue that does not exist with
/// delete-ok (0), quietly. The delete is unconditional: quorum queues refuse `if-unused` with
/// a connection error.
pub async fn delete_on_dead(channel: &Channel, names: &Names) -> Result<u32, lapin::Error> {
    channel
        .queue_delete(
            names.on_dead_queue().as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
}

/// Queue arguments, built up from a durable quorum queue.
struct Args(FieldTable);

impl Args {
    /// A durable quorum queue: replicated across a cluster and, since RabbitMQ 3.10, faster
    /// than a classic queue for persistent messages.
    fn quorum() -> Self {
        let mut t = FieldTable::default();
        t.insert("x-queue-type".into(), string("quorum"));
        Self(t)
    }

    /// Dead-letters to `exchange` with `key`, `at-least-once` so a message is never lost on the
    /// way; RabbitMQ requires `reject-publish` overflow for that strategy.
    fn dead_letter(mut self, exchange: &str, key: &str) -> Self {
        self.0
            .insert("x-dead-letter-exchange".into(), string(exchange));
        self.0
            .insert("x-dead-letter-routing-key".into(), string(key));
        self.0
            .insert("x-dead-letter-strategy".into(), string("at-least-once"));
        self.0.insert("x-overflow".into(), string("reject-publish"));
        self
    }

    fn delivery_limit(mut self, limit: u32) -> Self {
        self.0
            .insert("x-delivery-limit".into(), AMQPValue::LongUInt(limit));
        self
    }

    fn ttl(mut self, millis: u32) -> Self {
        self.0
            .insert("x-message-ttl".into(), AMQPValue::LongUInt(millis));
        self
    }
}

async fn queue(channel: &Channel, name: &str, args: Args) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args.0,
        )
        .await?;
    Ok(())
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
) -> Result<(), lapin::Error> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}
