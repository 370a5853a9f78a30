//! Ingress's link to the broker: one connection, one confirm-mode channel, kept alive.
//!
//! Requests publish on the current channel; many publishes share it with their confirms in
//! flight together. When the connection fails, requests get 503 (never a hang) while a
//! supervisor reconnects; when the broker blocks publishers (memory or disk alarm), requests
//! get 503 too, because a publish would only wait until it timed out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures_util::StreamExt;
use hiway_runtime::amqp::{Connection, ConnectionEvent};
use hiway_runtime::{Broker, Publisher};
use tokio_util::sync::CancellationToken;

/// What requests need to know about the broker link.
#[derive(Clone, Default)]
pub struct Link(Arc<Inner>);

#[derive(Default)]
struct Inner {
    publisher: RwLock<Option<Publisher>>,
    blocked: AtomicBool,
}

/// Why there is no publisher to use right now.
pub enum Unavailable {
    /// Not connected.
    Disconnected,
    /// Connected, but the broker blocks publishers.
    Blocked,
}

impl Unavailable {
    /// Why, in words, for the 503's message and the publish error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Disconnected => "not connected",
            Self::Blocked => "the broker blocks publishers",
        }
    }
}

impl Link {
    /// The publisher to use, or why there is none.
    pub fn publisher(&self) -> Result<Publisher, Unavailable> {
        if self.0.blocked.load(Ordering::Acquire) {
            return Err(Unavailable::Blocked);
        }
        let guard = self.0.publisher.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(p) if p.is_open() => Ok(p.clone()),
            _ => Err(Unavailable::Disconnected),
        }
    }

    /// Whether a publish could be attempted now (for `/readyz`).
    pub fn ready(&self) -> bool {
        self.publisher().is_ok()
    }

    fn set(&self, publisher: Option<Publisher>) {
        *self.0.publisher.write().unwrap_or_else(|e| e.into_inner()) = publisher;
    }

    /// Keeps the link up until `stop`: watches the connection, reconnects when it fails.
    /// Starts from the connection `build` made, so a broker that is down at start-up is
    /// reported by `build`, not hidden here.
    pub async fn supervise(self, broker: Broker, first: Connection, stop: CancellationToken) {
        let mut connection = Some(first);
        loop {
            let Some(conn) = connection.take() else {
                match broker.connect_until("hiway-ingress", &stop).await {
                    Some(c) => connection = Some(c),
                    None => break,
                }
                continue;
            };
            // Subscribe before anything can happen on the connection, so no event is missed.
            let mut events = conn.events();
            match broker.publisher(&conn).await {
                Ok(p) => {
                    self.0.blocked.store(conn.is_blocked(), Ordering::Release);
                    self.set(Some(p));
                    tracing::info!("ingress connected to the broker");
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot open a publishing channel");
                    conn.close(320, "reconnecting").await;
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
            }
            let failed = loop {
                tokio::select! {
                    _ = stop.cancelled() => break false,
                    event = events.next() => match event {
                        Some(ConnectionEvent::Blocked(reason)) => {
                            tracing::warn!(%reason, "the broker blocks publishers: answering 503");
                            self.0.blocked.store(true, Ordering::Release);
                        }
                        Some(ConnectionEvent::Unblocked) => {
                            tracing::info!("the broker unblocked publishers");
                            self.0.blocked.store(false, Ordering::Release);
                        }
                        Some(ConnectionEvent::Failed(error)) => {
                            tracing::warn!(%error, "broker connection lost: answering 503 until it is back");
                            break true;
                        }
                        None => break true,
                    }
                }
            };
            let publisher = self
                .0
                .publisher
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(publisher) = publisher
                && !failed
            {
                publisher.close().await;
            }
            self.0.blocked.store(false, Ordering::Release);
            if !failed {
                // Shutting down: in-flight requests finished before `stop` reached us (the
                // server drains first), so closing now loses no confirm.
                conn.close(200, "shutdown").await;
                break;
            }
        }
    }
}
