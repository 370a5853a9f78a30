//! hiway transformer: routes each accepted message to its destinations.
//!
//! It consumes the ingress queue and, for each message, publishes one copy per matching
//! (route, destination) to the deliver exchange (routing key = destination) and one audit
//! batch (`received`, then `routed` or `unrouted`). All those publishes are in flight
//! together; the input is acked only once every one is confirmed. If any fails the input is
//! returned to the queue, so a copy may be sent twice but never lost (destinations dedupe on
//! the message id). A message whose envelope cannot be read is dead-lettered with the reason.

mod routes;

use std::time::Duration;

use futures_util::future::join_all;
use hiway_config::Config;
use hiway_proto::Envelope;
use hiway_proto::audit::{AuditEvent, AuditKind, RoutedCopy};
use hiway_runtime::amqp::close_channel;
use hiway_runtime::consume::{Reconnect, consume_concurrently};
use hiway_runtime::{Broker, Publisher};
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use routes::{Copy, Routes};

const SERVICE: &str = "transformer";

/// Why the transformer could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker could not be reached or the topology not declared.
    #[error("cannot connect to the broker: {0}")]
    Broker(#[from] lapin::Error),
}

/// The transformer, connected and ready to run.
pub struct Transformer {
    broker: Broker,
    connection: Connection,
    routes: Routes,
    prefetch: u16,
    drain: Duration,
}

/// Connects to the broker (declaring the topology) and builds the routing table.
pub async fn build(config: &Config) -> Result<Transformer, Error> {
    let broker = Broker::new(config);
    let connection = broker.connect("hiway-transformer").await?;
    Ok(Transformer {
        broker,
        connection,
        routes: Routes::from_config(config),
        prefetch: config.transformer.prefetch,
        drain: config.shutdown.drain_timeout,
    })
}

impl Transformer {
    /// Routes messages until `stop`, then finishes the ones in hand and returns.
    pub async fn run(self, stop: CancellationToken) -> Result<(), Error> {
        let mut connections =
            Reconnect::new(&self.broker, "hiway-transformer", self.connection, &stop);
        while let Some(conn) = connections.next().await {
            let ended = session(
                &self.broker,
                &conn,
                &self.routes,
                self.prefetch,
                self.drain,
                &stop,
            )
            .await;
            connections.ended(conn, ended).await;
        }
        tracing::info!("transformer stopped");
        Ok(())
    }
}

/// Consumes the ingress queue on one connection until `stop` or a broker error.
async fn session(
    broker: &Broker,
    conn: &Connection,
    routes: &Routes,
    prefetch: u16,
    drain: Duration,
    stop: &CancellationToken,
) -> Result<(), lapin::Error> {
    let names = broker.names();
    let publisher = broker.publisher(conn).await?;
    // Prefetch bounds how many messages are being routed at once (and so memory: at most
    // prefetch × the largest body); all of them are handled concurrently, so their confirms
    // are in flight together.
    let (channel, consumer) = broker
        .consumer(conn, &names.ingress_queue(), "hiway-transformer", prefetch)
        .await?;
    tracing::info!(queue = %names.ingress_queue(), prefetch, "transformer consuming");
    let deliver_exchange = names.deliver_exchange();
    let ended = consume_concurrently(consumer, usize::from(prefetch), stop, drain, |delivery| {
        route(&publisher, &deliver_exchange, routes, delivery)
    })
    .await;
    close_channel(&channel).await;
    publisher.close().await;
    ended
}

/// Routes one delivery and settles it.
async fn route(publisher: &Publisher, deliver_exchange: &str, routes: &Routes, delivery: Delivery) {
    let envelope = match Envelope::from_properties(&delivery.properties) {
        Ok(e) => e,
        Err(error) => {
            tracing::warn!(%error, "dead-lettering a message whose envelope cannot be read");
            return publisher
                .settle_poison(delivery, &error.to_string(), SERVICE)
                .await;
        }
    };
    let span = tracing::info_span!("transformer.route", message_id = %envelope.id, channel = %envelope.channel);
    async {
        let copies = routes.copies(&envelope.channel);
        let received = AuditEvent {
            at: envelope.received_at,
            ..AuditEvent::now(
                envelope.id,
                "ingress",
                AuditKind::Received {
                    channel: envelope.channel.clone(),
                    client: envelope.client.clone(),
                    content_type: envelope.content_type.clone(),
                    size_bytes: delivery.data.len() as u64,
                },
            )
        };
        let outcome = if copies.is_empty() {
            AuditKind::Unrouted {
                channel: envelope.channel.clone(),
            }
        } else {
            AuditKind::Routed {
                channel: envelope.channel.clone(),
                copies: copies
                    .iter()
                    .map(|c| RoutedCopy {
                        route: c.route.clone(),
                        destination: c.destination.clone(),
                    })
                    .collect(),
            }
        };
        let events = [received, AuditEvent::now(envelope.id, SERVICE, outcome)];

        let publishes = copies.iter().map(|c| {
            let props = envelope
                .for_destination(c.destination.clone(), c.route.clone())
                .to_properties();
            publisher.publish(
                deliver_exchange,
                c.destination.as_str(),
                &delivery.data,
                props,
            )
        });
        let (copies_published, audit) =
            tokio::join!(join_all(publishes), publisher.publish_audit(&events));

        let failure = copies_published
            .into_iter()
            .chain(std::iter::once(audit))
            .find_map(Result::err);
        match failure {
            None => {
                if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
                    tracing::warn!(%error, "ack failed; the message will be routed again");
                }
            }
            Some(error) => {
                // Some copy or the audit batch was not confirmed: route the whole message
                // again later. Copies already confirmed will be sent twice; destinations drop
                // duplicates by message id.
                tracing::warn!(%error, "publishing failed; returning the message to its queue");
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
            }
        }
    }
    .instrument(span)
    .await
}
