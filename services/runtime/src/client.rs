//! The AMQP client, behind hiway's own types.
//!
//! This module is the only code in the services that names the client library (lapin). What
//! the services need of a broker connection is small: channels in confirm mode that publish
//! and report each publish's outcome, consumers with a prefetch, acks and nacks by delivery
//! tag (single or multiple), `basic.get` for circuit probes, the topology's declarations, and
//! the connection's blocked/unblocked/failed events. Keeping that surface here is what lets
//! the client change without touching a service (docs/design/architecture.md, "The AMQP
//! client, and why it may change").
//!
//! Messages' properties and headers are [`hiway_proto::amqp`]'s types, AMQP's data model
//! without a client.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use hiway_proto::amqp::{BasicProperties, FieldTable, ShortString};
use hiway_proto::topology::{Declare, ExchangeKind};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};

/// A failure of the broker connection or of a channel on it, or a wait on the broker that
/// ran out of time. Whatever it is, the session that saw it ends and reconnects; nothing
/// unacknowledged is lost (the broker redelivers it).
#[derive(Clone, Debug, thiserror::Error)]
pub enum BrokerError {
    /// The client reported the connection or channel failed, or the broker refused an
    /// operation (its reply text is in the message).
    #[error("{0}")]
    Client(String),
    /// The broker did not answer in time.
    #[error("{0}")]
    TimedOut(String),
    /// The connection or channel is closed.
    #[error("the connection to the broker is closed")]
    Closed,
}

impl From<lapin::Error> for BrokerError {
    fn from(error: lapin::Error) -> Self {
        Self::Client(error.to_string())
    }
}

/// One AMQP connection.
pub struct Connection {
    inner: lapin::Connection,
}

/// What happened to a connection, for a service that watches it (ingress answers 503 while
/// the broker blocks publishers or the connection is down).
#[derive(Debug)]
pub enum ConnectionEvent {
    /// The broker blocks publishers (a memory or disk alarm), with its reason.
    Blocked(String),
    /// The broker takes publishes again.
    Unblocked,
    /// The connection failed.
    Failed(BrokerError),
}

impl Connection {
    /// Opens a connection; `name` shows in the broker's connection list.
    pub(crate) async fn open(url: &str, name: &str) -> Result<Self, BrokerError> {
        let props = lapin::ConnectionProperties::default().with_connection_name(name.into());
        let inner = lapin::Connection::connect(url, props).await?;
        Ok(Self { inner })
    }

    /// A new channel.
    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        Ok(Channel {
            inner: self.inner.create_channel().await?,
        })
    }

    /// Whether the connection is up.
    pub fn is_open(&self) -> bool {
        self.inner.status().connected()
    }

    /// Whether the broker blocks publishers on it right now.
    pub fn is_blocked(&self) -> bool {
        self.inner.status().blocked()
    }

    /// The connection's events from now on. Subscribe before using the connection, so that
    /// no event is missed. The stream ends when the connection is gone.
    pub fn events(&self) -> impl Stream<Item = ConnectionEvent> + Send + Unpin + 'static {
        self.inner.events_listener().filter_map(|event| {
            std::future::ready(match event {
                lapin::Event::ConnectionBlocked(reason) => Some(ConnectionEvent::Blocked(reason)),
                lapin::Event::ConnectionUnblocked => Some(ConnectionEvent::Unblocked),
                lapin::Event::Error(error) => Some(ConnectionEvent::Failed(error.into())),
                _ => None,
            })
        })
    }

    /// Closes the connection if it is open, waiting at most a few seconds for the broker.
    pub async fn close(&self, code: u16, reason: &str) {
        if self.is_open() {
            let _ =
                tokio::time::timeout(CLOSE_TIMEOUT, self.inner.close(code, reason.into())).await;
        }
    }
}

/// How long a clean close may take: a broker that does not answer must not hold up a shutdown,
/// and nothing is lost by giving up (unacknowledged deliveries are redelivered).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an ack, nack, reject or consumer cancel may take. The client answers one as soon
/// as its frame is handed to the connection, so a healthy connection answers within
/// milliseconds; but one issued just as the connection dies may never be answered at all
/// (seen in the broker-restart test: the audit service waited on its batch ack for ever and
/// never reconnected). A timeout is an error like a failed connection: the caller ends its
/// session and reconnects, and the broker redelivers whatever was not settled.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The outcome of one publish on a channel in confirm mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirm {
    /// The broker took responsibility for the message.
    Ack,
    /// No queue was bound for it (`mandatory` set): the broker returned it.
    Returned,
    /// The broker refused it.
    Nack,
}

/// One channel. Cheap to clone: clones share the channel.
#[derive(Clone)]
pub struct Channel {
    inner: lapin::Channel,
}

impl Channel {
    /// Puts the channel in confirm mode: every publish then gets its own [`Confirm`].
    pub async fn confirm_select(&self) -> Result<(), BrokerError> {
        Ok(self
            .inner
            .confirm_select(ConfirmSelectOptions::default())
            .await?)
    }

    /// Publishes with `mandatory` set and waits for the broker's confirm (the channel must be
    /// in confirm mode). Many publishes may wait on one channel at once.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Confirm, BrokerError> {
        let pending = self
            .inner
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await?;
        Ok(match pending.await? {
            lapin::Confirmation::Ack(None) => Confirm::Ack,
            lapin::Confirmation::Ack(Some(_)) => Confirm::Returned,
            lapin::Confirmation::Nack(_) | lapin::Confirmation::NotRequested => Confirm::Nack,
        })
    }

    /// Starts a consumer on `queue` with a prefetch of `prefetch` for this channel's
    /// consumers (per consumer; never the broker's unlimited default).
    pub async fn consume(
        &self,
        queue: &str,
        tag: &str,
        prefetch: u16,
    ) -> Result<Consumer, BrokerError> {
        self.inner
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await?;
        let inner = self
            .inner
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Consumer {
            tag: tag.to_owned(),
            channel: self.clone(),
            inner,
        })
    }

    /// Acks `delivery_tag`, and with `multiple` every unacked delivery before it.
    pub async fn ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), BrokerError> {
        settle(
            self.inner
                .basic_ack(delivery_tag, BasicAckOptions { multiple }),
        )
        .await
    }

    /// Nacks `delivery_tag`: back to its queue with `requeue`, else to its dead-letter
    /// exchange.
    pub async fn nack(&self, delivery_tag: u64, requeue: bool) -> Result<(), BrokerError> {
        settle(self.inner.basic_nack(
            delivery_tag,
            BasicNackOptions {
                requeue,
                multiple: false,
            },
        ))
        .await
    }

    /// Cancels the consumer `tag`: the broker sends it nothing more, and its stream ends after
    /// the deliveries already received.
    pub async fn cancel(&self, tag: &str) -> Result<(), BrokerError> {
        settle(
            self.inner
                .basic_cancel(tag.into(), BasicCancelOptions::default()),
        )
        .await
    }

    /// Takes one message from `queue` (to be acked or nacked), or `None` if it is empty.
    pub async fn get(&self, queue: &str) -> Result<Option<Delivery>, BrokerError> {
        let got = self
            .inner
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?;
        Ok(got.map(|message| message.delivery.into()))
    }

    /// Carries out declarations (the topology's [`plan`](hiway_proto::topology::plan)), in
    /// order. Each is idempotent.
    pub async fn declare(&self, steps: &[Declare]) -> Result<(), BrokerError> {
        for step in steps {
            match step {
                Declare::Exchange { name, kind } => {
                    let kind = match kind {
                        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
                        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
                    };
                    let options = ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    };
                    self.inner
                        .exchange_declare(
                            name.as_str().into(),
                            kind,
                            options,
                            FieldTable::default(),
                        )
                        .await?;
                }
                Declare::Queue { name, args } => {
                    let options = QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    };
                    self.inner
                        .queue_declare(name.as_str().into(), options, args.clone())
                        .await?;
                }
                Declare::Bind {
                    queue,
                    exchange,
                    key,
                } => {
                    self.inner
                        .queue_bind(
                            queue.as_str().into(),
                            exchange.as_str().into(),
                            key.as_str().into(),
                            QueueBindOptions::default(),
                            FieldTable::default(),
                        )
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// How many messages are ready in `queue` and how many consumers it has, without
    /// changing it (a passive declare). A queue that does not exist is an error, and the
    /// broker closes the channel with it.
    pub async fn queue_depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = self
            .inner
            .queue_declare(queue.into(), options, FieldTable::default())
            .await?;
        Ok(QueueDepth {
            ready: q.message_count(),
            consumers: q.consumer_count(),
        })
    }

    /// Deletes `queue` with the messages in it, unconditionally, and returns how many there
    /// were. A queue that does not exist counts 0.
    pub async fn delete_queue(&self, queue: &str) -> Result<u32, BrokerError> {
        Ok(self
            .inner
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?)
    }

    /// Whether the channel is up.
    pub fn is_open(&self) -> bool {
        self.inner.status().connected()
    }

    /// Closes the channel if it is open, waiting at most a few seconds for the broker.
    /// Closing channels before their connection is what makes a shutdown clean (lapin reports
    /// a channel dropped while its connection closes as a connection error).
    pub async fn close(&self) {
        if self.is_open() {
            let _ =
                tokio::time::timeout(CLOSE_TIMEOUT, self.inner.close(200, "closing".into())).await;
        }
    }
}

/// A queue's depth, as a passive declare reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueDepth {
    /// Messages ready (not counting those delivered and not yet acked).
    pub ready: u32,
    /// Consumers attached.
    pub consumers: u32,
}

/// One message delivered to a consumer (or got with [`Channel::get`]). Made once per message:
/// its parts are moved out of the client's delivery, nothing is copied.
pub struct Delivery {
    /// Its tag on the channel, for acks.
    pub delivery_tag: u64,
    /// The routing key it was published with.
    pub routing_key: ShortString,
    /// Its properties and headers.
    pub properties: BasicProperties,
    /// Its body.
    pub data: Vec<u8>,
    acker: lapin::Acker,
}

impl From<lapin::message::Delivery> for Delivery {
    fn from(d: lapin::message::Delivery) -> Self {
        Self {
            delivery_tag: d.delivery_tag,
            routing_key: d.routing_key,
            properties: d.properties,
            data: d.data,
            acker: d.acker,
        }
    }
}

impl Delivery {
    /// Acks it, and with `multiple` every unacked delivery before it on its channel.
    pub async fn ack(&self, multiple: bool) -> Result<(), BrokerError> {
        settle(self.acker.ack(BasicAckOptions { multiple })).await
    }

    /// Nacks it: back to its queue with `requeue`, else to its dead-letter exchange.
    pub async fn nack(&self, requeue: bool) -> Result<(), BrokerError> {
        settle(self.acker.nack(BasicNackOptions {
            requeue,
            multiple: false,
        }))
        .await
    }
}

/// A consumer: a stream of deliveries, ending when the consumer is cancelled (after the
/// deliveries already received) or with an error when its channel fails.
pub struct Consumer {
    tag: String,
    channel: Channel,
    inner: lapin::Consumer,
}

impl Consumer {
    /// Its consumer tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The channel it consumes on (where its acks go).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}

impl Stream for Consumer {
    type Item = Result<Delivery, BrokerError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner
            .poll_next_unpin(cx)
            .map(|next| next.map(|result| result.map(Delivery::from).map_err(BrokerError::from)))
    }
}

/// Awaits an acknowledgement-like operation for at most [`SETTLE_TIMEOUT`].
async fn settle<T>(op: impl Future<Output = lapin::Result<T>>) -> Result<(), BrokerError> {
    settle_within(SETTLE_TIMEOUT, op).await
}

async fn settle_within<T>(
    limit: Duration,
    op: impl Future<Output = lapin::Result<T>>,
) -> Result<(), BrokerError> {
    match tokio::time::timeout(limit, op).await {
        // An acker's `Ok(false)` means the channel had already failed: the broker redelivers
        // the message, and the consumer's stream reports that failure next.
        Ok(result) => result.map(|_| ()).map_err(BrokerError::from),
        Err(_) => Err(BrokerError::TimedOut(format!(
            "the broker did not take an acknowledgement within {limit:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_acknowledgement_that_is_never_answered_ends_in_an_error_naming_the_wait() {
        let error = settle_within(
            Duration::from_millis(20),
            std::future::pending::<lapin::Result<()>>(),
        )
        .await
        .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("did not take an acknowledgement within 20ms"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn an_acknowledgement_on_a_channel_already_failed_is_left_to_the_redelivery() {
        // lapin answers Ok(false) when the channel died first: nothing to wait for.
        settle_within(Duration::from_millis(20), async { Ok(false) })
            .await
            .unwrap();
    }
}
