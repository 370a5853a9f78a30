//! The whole RabbitMQ topology, declared idempotently.
//!
//! Every service calls [`declare`] when it connects, so whichever starts first creates what all
//! of them need, and a broker that lost its definitions gets them back on the next reconnect.
//! Declaring an existing exchange or queue with the same arguments is a no-op; with different
//! arguments the broker refuses (`PRECONDITION_FAILED`), which is why the arguments live here
//! and nowhere else.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::ids::DestinationName;
use crate::names::{AUDIT_KEY, INGRESS_KEY, Names};

/// Routing key under which the ingress queue dead-letters (poison envelopes).
pub const DEAD_KEY_INGRESS: &str = "ingress";
/// Routing key under which the audit queue dead-letters (unparsable audit batches).
pub const DEAD_KEY_AUDIT: &str = "audit";

/// Declares every exchange, queue and binding for these destinations.
pub async fn declare(
    channel: &Channel,
    names: &Names,
    destinations: &[DestinationName],
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
    queue(
        channel,
        &names.ingress_queue(),
        Some((&dead, DEAD_KEY_INGRESS)),
    )
    .await?;
    bind(
        channel,
        &names.ingress_queue(),
        &names.ingress_exchange(),
        INGRESS_KEY,
    )
    .await?;

    queue(channel, &names.audit_queue(), Some((&dead, DEAD_KEY_AUDIT))).await?;
    bind(
        channel,
        &names.audit_queue(),
        &names.audit_exchange(),
        AUDIT_KEY,
    )
    .await?;

    // The dead queue has no dead-letter exchange of its own: it is the end of the line, and
    // what reaches it stays until the audit service has stored it durably.
    queue(channel, &names.dead_queue(), None).await?;
    bind(channel, &names.dead_queue(), &names.dead_exchange(), "").await?;

    for destination in destinations {
        let q = names.deliver_queue(destination);
        queue(channel, &q, Some((&dead, destination.as_str()))).await?;
        bind(channel, &q, &names.deliver_exchange(), destination.as_str()).await?;
    }
    Ok(())
}

/// Declares a durable quorum queue.
///
/// Quorum queues replicate across a cluster and, since RabbitMQ 3.10, outperform classic
/// queues for persistent messages. Dead-lettering is `at-least-once`, so a message moved to
/// the dead exchange is never lost on the way; RabbitMQ requires `reject-publish` overflow for
/// that strategy.
async fn queue(
    channel: &Channel,
    name: &str,
    dead_letter: Option<(&str, &str)>,
) -> Result<(), lapin::Error> {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string("quorum"));
    if let Some((exchange, key)) = dead_letter {
        args.insert("x-dead-letter-exchange".into(), string(exchange));
        args.insert("x-dead-letter-routing-key".into(), string(key));
        args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
        args.insert("x-overflow".into(), string("reject-publish"));
    }
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
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
