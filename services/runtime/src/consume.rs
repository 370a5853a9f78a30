//! The consuming loop every worker shares: reconnect when the broker goes away, handle
//! deliveries concurrently, and drain on stop.

use std::future::Future;
use std::time::Duration;

use futures_util::TryStreamExt;
use tokio_util::sync::CancellationToken;

use crate::amqp::{BrokerError, Connection, Consumer, Delivery};
use crate::{Acks, Broker};

/// Hands out broker connections to a worker until `stop`: first the one `build` made, then a
/// new one each time a session on the previous one fails.
///
/// ```ignore
/// let mut connections = Reconnect::new(&broker, "hiway-transformer", first, &stop);
/// while let Some(conn) = connections.next().await {
///     let ended = session(&conn).await;
///     connections.ended(conn, ended).await;
/// }
/// ```
///
/// A session returns `Ok(())` when it ended because of `stop` (drained), or the broker error
/// that ended it. Its unacknowledged deliveries go back to their queues when the connection
/// closes, which is safe because nothing is acked before its outcome is durable.
pub struct Reconnect<'a> {
    broker: &'a Broker,
    service: &'a str,
    first: Option<Connection>,
    stop: &'a CancellationToken,
    done: bool,
}

impl<'a> Reconnect<'a> {
    /// Starts with the connection `build` made.
    pub fn new(
        broker: &'a Broker,
        service: &'a str,
        first: Connection,
        stop: &'a CancellationToken,
    ) -> Self {
        Self {
            broker,
            service,
            first: Some(first),
            stop,
            done: false,
        }
    }

    /// The next connection, or `None` once the worker should return.
    pub async fn next(&mut self) -> Option<Connection> {
        if self.done || self.stop.is_cancelled() && self.first.is_none() {
            return None;
        }
        match self.first.take() {
            Some(c) => Some(c),
            None => self.broker.connect_until(self.service, self.stop).await,
        }
    }

    /// Closes the connection a session ran on and records how it ended.
    pub async fn ended(&mut self, connection: Connection, result: Result<(), BrokerError>) {
        match result {
            Ok(()) => {
                connection.close(200, "shutdown").await;
                self.done = true;
            }
            Err(error) => {
                tracing::warn!(%error, service = self.service, "broker session ended; reconnecting");
                connection.close(320, "reconnecting").await;
                self.done = self.stop.is_cancelled();
            }
        }
    }
}

/// Hands each delivery of `consumer` to `handle`, up to `concurrency` at once, until `stop`.
/// Each handler reports its delivery's verdict to the [`Acks`] it is given, which groups the
/// acks of the consumer's channel.
///
/// On stop it cancels the consumer (no new delivery comes), lets the deliveries in hand and
/// those already received finish (each reports its verdict) for at most `drain`, sends the
/// acks reported, then returns `Ok`. A broker error ends it with that error.
pub async fn consume_concurrently<H, Fut>(
    consumer: Consumer,
    concurrency: usize,
    stop: &CancellationToken,
    drain: Duration,
    handle: H,
) -> Result<(), BrokerError>
where
    H: Fn(Delivery, Acks) -> Fut,
    Fut: Future,
{
    // Every delivery of the window is in hand at once, so the window is `concurrency`.
    let window = u16::try_from(concurrency).unwrap_or(u16::MAX);
    let channel = consumer.channel().clone();
    let (acks, ack_task) = crate::acks::start(&channel, window);
    let tag = consumer.tag().to_owned();
    let work = consumer.try_for_each_concurrent(concurrency, |delivery| {
        let fut = handle(delivery, acks.clone());
        async move {
            fut.await;
            Ok(())
        }
    });
    // On stop the consumer is cancelled rather than dropped: the broker sends no more, and
    // the client ends the stream after the deliveries already received, which the handlers still
    // get (the transformer routes them, the sender puts them back untried). Dropped, they
    // would go back to the queue only when the channel closes, each counted as a delivery
    // toward `delivery_limit`.
    let cancel = async {
        stop.cancelled().await;
        if let Err(error) = channel.cancel(&tag).await {
            tracing::debug!(%error, "could not cancel the consumer; its channel is going anyway");
        }
        std::future::pending::<()>().await
    };
    let ended = tokio::select! {
        result = work => result,
        // `cancel` never ends: it only has to run while the handlers drain.
        () = cancel => Ok(()),
        _ = async { stop.cancelled().await; tokio::time::sleep(drain).await } => {
            tracing::warn!(?drain, "drain deadline passed; unfinished deliveries will be redelivered");
            Ok(())
        }
    };
    ack_task.finish().await;
    // The consumer's channel is done with: its unsettled deliveries go back to the queue.
    channel.close().await;
    ended
}
