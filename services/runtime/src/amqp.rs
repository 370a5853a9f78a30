//! Broker connections, the topology, and publishing with confirms.

use std::time::Duration;

use hiway_config::{Config, SecretString};
use hiway_proto::amqp::{AMQPValue, BasicProperties, LongString};
use hiway_proto::topology::DestinationTopology;
use hiway_proto::{Names, topology};
use tokio_util::sync::CancellationToken;

pub use crate::client::{
    BrokerError, Channel, Confirm, Connection, ConnectionEvent, Consumer, Delivery, QueueDepth,
};

/// Why a publish was not accepted by the broker. In every case the message may not be stored,
/// so the caller must not report success (ingress answers 503; a consumer does not ack).
#[derive(Clone, Debug, thiserror::Error)]
pub enum PublishError {
    /// The channel or connection failed.
    #[error("the broker connection failed: {0}")]
    Broker(#[from] BrokerError),
    /// The broker refused to take responsibility for the message.
    #[error("the broker refused the message (nack)")]
    Nacked,
    /// No queue is bound for the routing key, so the message would have been dropped.
    #[error("no queue is bound for routing key {0:?}")]
    Unroutable(String),
    /// No confirm arrived in time.
    #[error("no confirm from the broker within {0:?}")]
    Timeout(Duration),
    /// The audit batcher has stopped (its session is ending), so nothing more is published.
    #[error("the audit batcher has stopped")]
    Closed,
}

/// How to reach the broker, and what to declare on it.
#[derive(Clone, Debug)]
pub struct Broker {
    url: SecretString,
    names: Names,
    destinations: Vec<DestinationTopology>,
    delivery_limit: u32,
    publish_timeout: Duration,
    connect_timeout: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
}

impl Broker {
    /// From the configuration: the topology covers every configured destination.
    pub fn new(config: &Config) -> Self {
        Self {
            url: config.broker.url.clone(),
            names: config.names(),
            destinations: config
                .destinations
                .iter()
                .map(|(name, d)| DestinationTopology {
                    name: name.clone(),
                    retry_delays: d.retry.schedule.clone(),
                })
                .collect(),
            delivery_limit: config.broker.delivery_limit,
            publish_timeout: config.broker.publish_timeout,
            connect_timeout: config.broker.connect_timeout,
            reconnect_min: config.broker.reconnect_min,
            reconnect_max: config.broker.reconnect_max,
        }
    }

    /// The installation's exchange and queue names.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Connects once and declares the topology. `name` shows in the broker's connection list,
    /// so an operator can tell which service a connection belongs to.
    ///
    /// Bounded by `broker.connect_timeout`: a broker that takes the TCP connection but never
    /// finishes the AMQP handshake (one shutting down, or wedged) must not hang a service.
    pub async fn connect(&self, name: &str) -> Result<Connection, BrokerError> {
        match tokio::time::timeout(self.connect_timeout, self.connect_unbounded(name)).await {
            Ok(result) => result,
            Err(_) => Err(BrokerError::TimedOut(format!(
                "no AMQP handshake within {:?}",
                self.connect_timeout
            ))),
        }
    }

    async fn connect_unbounded(&self, name: &str) -> Result<Connection, BrokerError> {
        let connection = Connection::open(self.url.expose(), name).await?;
        let channel = connection.channel().await?;
        let plan = topology::plan(&self.names, &self.destinations, self.delivery_limit);
        channel.declare(&plan).await?;
        // A channel used for declarations only; closing it keeps the broker's channel list tidy.
        channel.close().await;
        Ok(connection)
    }

    /// Connects, retrying with growing pauses, until it succeeds or `stop` is cancelled
    /// (then `None`).
    pub async fn connect_until(&self, name: &str, stop: &CancellationToken) -> Option<Connection> {
        let mut wait = self.reconnect_min;
        loop {
            let attempt = tokio::select! {
                _ = stop.cancelled() => return None,
                attempt = self.connect(name) => attempt,
            };
            match attempt {
                Ok(connection) => return Some(connection),
                Err(error) => {
                    tracing::warn!(%error, service = name, retry_in = ?wait, "cannot reach the broker");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(self.reconnect_max);
        }
    }

    /// A channel in confirm mode on `connection`.
    pub async fn publisher(&self, connection: &Connection) -> Result<Publisher, BrokerError> {
        let channel = connection.channel().await?;
        channel.confirm_select().await?;
        Ok(Publisher {
            channel,
            timeout: self.publish_timeout,
            audit_exchange: self.names.audit_exchange().into(),
            dead_exchange: self.names.dead_exchange().into(),
        })
    }

    /// A consumer on `queue` with its own channel and a deliberate prefetch (per consumer;
    /// never the broker's unlimited default). The caller says why it chose `prefetch`.
    pub async fn consumer(
        &self,
        connection: &Connection,
        queue: &str,
        tag: &str,
        prefetch: u16,
    ) -> Result<Consumer, BrokerError> {
        let channel = connection.channel().await?;
        channel.consume(queue, tag, prefetch).await
    }
}

/// A channel in confirm mode. Cheap to clone; many publishes may be in flight on it at once,
/// each awaiting its own confirm, which is how hiway keeps the broker busy without ever
/// waiting for one confirm at a time.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    timeout: Duration,
    // Made once per channel, not per publish: ingress clones the publisher for every request.
    audit_exchange: std::sync::Arc<str>,
    dead_exchange: std::sync::Arc<str>,
}

impl Publisher {
    /// Publishes and waits for the broker's confirm. `mandatory` is set, so a message no queue
    /// would take comes back as [`PublishError::Unroutable`] instead of vanishing.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let confirm = self
            .channel
            .publish(exchange, routing_key, body, properties);
        match tokio::time::timeout(self.timeout, confirm).await {
            Err(_) => Err(PublishError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(PublishError::Broker(e)),
            Ok(Ok(Confirm::Ack)) => Ok(()),
            Ok(Ok(Confirm::Returned)) => Err(PublishError::Unroutable(routing_key.to_owned())),
            Ok(Ok(Confirm::Nack)) => Err(PublishError::Nacked),
        }
    }

    /// Publishes a batch of audit events (`AuditEvent`s, or references to them) as one
    /// message and waits for the confirm. Workers go through [`crate::AuditBatcher`], which
    /// gathers the events of many messages into one call.
    pub async fn publish_audit<E: serde::Serialize>(
        &self,
        events: &[E],
    ) -> Result<(), PublishError> {
        // Serializing plain data structures cannot fail.
        let body = serde_json::to_vec(events).unwrap_or_default();
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        self.publish(
            &self.audit_exchange,
            hiway_proto::names::AUDIT_KEY,
            &body,
            props,
        )
        .await
    }

    /// Sends a delivery to the dead-letter exchange with the reason, keeping its body and
    /// properties. The caller acks the original only after this returns `Ok`.
    pub async fn publish_dead(
        &self,
        delivery: &Delivery,
        reason: &str,
        service: &str,
    ) -> Result<(), PublishError> {
        self.publish_dead_parts(
            delivery.routing_key.as_str(),
            &delivery.data,
            delivery.properties.clone(),
            reason,
            service,
        )
        .await
    }

    /// Settles a delivery that can never be processed (poison): dead-letters it with the
    /// reason and acks it; if that publish fails, rejects it without requeue so the queue's own
    /// dead-letter settings take it. Either way it leaves the queue.
    pub async fn settle_poison(
        &self,
        delivery: Delivery,
        reason: &str,
        service: &str,
        acks: &crate::Acks,
    ) {
        match self.publish_dead(&delivery, reason, service).await {
            Ok(()) => acks.ack(delivery.delivery_tag),
            Err(error) => {
                tracing::warn!(%error, "could not publish the dead letter; rejecting to the queue's dead-letter exchange");
                acks.nack(delivery.delivery_tag, false);
            }
        }
    }

    /// [`Publisher::publish_dead`] for a delivery already taken apart.
    pub async fn publish_dead_parts(
        &self,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        reason: &str,
        service: &str,
    ) -> Result<(), PublishError> {
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            hiway_proto::headers::DEAD_REASON.into(),
            long_string(reason),
        );
        headers.insert(hiway_proto::headers::DEAD_BY.into(), long_string(service));
        headers.insert(
            hiway_proto::headers::DEAD_AT.into(),
            AMQPValue::LongLongInt(chrono::Utc::now().timestamp_micros()),
        );
        headers.insert(
            hiway_proto::headers::DEAD_ID.into(),
            long_string(&uuid::Uuid::now_v7().to_string()),
        );
        let props = properties.with_headers(headers).with_delivery_mode(2);
        self.publish(&self.dead_exchange, routing_key, body, props)
            .await
    }

    /// Closes the channel ([`Channel::close`]).
    pub async fn close(&self) {
        self.channel.close().await;
    }

    /// Whether the channel can still publish.
    pub fn is_open(&self) -> bool {
        self.channel.is_open()
    }
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}
