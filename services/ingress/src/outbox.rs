//! Accepted messages on their way to the broker: each on its own, or the ones waiting at the
//! same moment together in one batch ([`hiway_proto::batch`]).
//!
//! Why batches: much of RabbitMQ's cost goes per broker message rather than per byte, and on a
//! small machine the broker takes the largest share of the CPU (docs/benchmarks.md). Under
//! load many requests wait for a publish at once; carrying them in one broker message takes
//! most of the ingress hop's broker messages away. Each request is still answered 202 only
//! after the broker confirmed the batch that holds it. A message that finds ingress idle goes
//! out at once and alone, as a plain message, so a quiet installation's traffic looks exactly
//! as it did before batches ([`hiway_runtime::batcher`]: no timer, batches grow with the load).

use std::sync::Arc;

use axum::body::Bytes;
use hiway_config::IngressConfig;
use hiway_proto::amqp::BasicProperties;
use hiway_proto::batch::BatchWriter;
use hiway_proto::names::INGRESS_KEY;
use hiway_runtime::amqp::BrokerError;
use hiway_runtime::batcher::{Batcher, Limits, Writer};
use hiway_runtime::{PublishError, Publisher};

use crate::link::{Link, Unavailable};

/// One accepted message: its properties (the envelope) and its body, untouched.
pub(crate) struct Message {
    pub properties: BasicProperties,
    pub body: Bytes,
}

/// Where requests hand their messages.
#[derive(Clone)]
pub(crate) enum Outbox {
    /// Each message is its own broker message (`ingress.batch_max_messages = 1`).
    Single { exchange: Arc<str> },
    /// Messages waiting at the same moment leave together.
    Batched(Batcher<Message>),
}

impl Outbox {
    /// From `[ingress]`; with batching on, starts the batching task (whose [`Writer`] the
    /// caller finishes after the last request).
    pub fn start(config: &IngressConfig, exchange: String, link: Link) -> (Self, Option<Writer>) {
        let exchange: Arc<str> = exchange.into();
        if config.batch_max_messages <= 1 {
            return (Self::Single { exchange }, None);
        }
        let limits = Limits {
            max_items: config.batch_max_messages,
            max_weight: config.batch_max_bytes,
            in_flight: config.batches_in_flight,
        };
        let (batcher, writer) = Batcher::start(limits, weight, move |messages| {
            let (link, exchange) = (link.clone(), exchange.clone());
            // The publisher is looked up when the batch leaves, not when it was filled, so a
            // batch formed just before a reconnection goes out on the new channel.
            async move { publish(link.publisher(), &exchange, messages).await }
        });
        (Self::Batched(batcher), Some(writer))
    }

    /// Publishes `message` (with `publisher`, when it goes alone) and waits for the broker's
    /// confirm of the broker message that carries it.
    pub async fn publish(
        &self,
        publisher: Publisher,
        message: Message,
    ) -> Result<(), PublishError> {
        match self {
            Self::Single { exchange } => {
                publisher
                    .publish(exchange, INGRESS_KEY, &message.body, message.properties)
                    .await
            }
            Self::Batched(batcher) => batcher.submit(message).await,
        }
    }
}

fn weight(message: &Message) -> usize {
    message.body.len()
}

async fn publish(
    publisher: Result<Publisher, Unavailable>,
    exchange: &str,
    mut messages: Vec<Message>,
) -> Result<(), PublishError> {
    let publisher =
        publisher.map_err(|why| PublishError::Broker(BrokerError::Client(why.reason().into())))?;
    if messages.len() == 1
        && let Some(one) = messages.pop()
    {
        return publisher
            .publish(exchange, INGRESS_KEY, &one.body, one.properties)
            .await;
    }
    // Properties take a few hundred bytes a message.
    let bytes = messages.iter().map(|m| m.body.len() + 512).sum();
    let mut batch = BatchWriter::with_capacity(bytes);
    for m in &messages {
        // Never seen: AMQP's encoder refuses nothing hiway's envelopes hold. Should it, the
        // whole batch is refused (503) rather than any message in it dropped.
        batch
            .push(&m.properties, &m.body)
            .map_err(|e| PublishError::Broker(BrokerError::Client(e.to_string())))?;
    }
    let (body, properties) = batch.finish();
    publisher
        .publish(exchange, INGRESS_KEY, &body, properties)
        .await
}
