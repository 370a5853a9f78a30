//! hiway ingress: the webhook endpoint sources post to.
//!
//! `POST /v1/channels/{channel}/messages` authenticates the client, checks the channel, the
//! content type, the size and (for JSON channels) that the body parses, then publishes the
//! body untouched to the ingress exchange and answers `202 {"id": …}` only once the broker
//! has confirmed it. Anything else gets a JSON error and publishes nothing.
//!
//! [`build`] binds the listener and connects to the broker; [`Ingress::run`] serves until the
//! stop token is cancelled, then finishes in-flight requests before returning.

pub mod auth;
mod error;
pub mod idempotency;
mod link;
mod outbox;
mod routes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use hiway_config::{ChannelConfig, Config};
use hiway_proto::ChannelName;
use hiway_runtime::Broker;
use hiway_runtime::amqp::{BrokerError, Connection};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

pub use error::IngressError;

/// Why ingress could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The broker could not be reached or the topology not declared.
    #[error("cannot connect to the broker: {0}")]
    Broker(#[from] BrokerError),
    /// PostgreSQL (the idempotency key store) could not be reached or migrated.
    #[error("cannot prepare the idempotency key store: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("cannot migrate the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The server failed while running.
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Shared by every request.
#[derive(Clone)]
pub(crate) struct AppState {
    clients: Arc<auth::Clients>,
    channels: Arc<HashMap<ChannelName, ChannelConfig>>,
    link: link::Link,
    outbox: outbox::Outbox,
    retry_after: u32,
    keys: Option<idempotency::KeyStore>,
}

/// Ingress, built and ready to run.
pub struct Ingress {
    listener: TcpListener,
    router: Router,
    broker: Broker,
    connection: Connection,
    link: link::Link,
    keys: Option<idempotency::KeyStore>,
    purge: Vec<(ChannelName, std::time::Duration)>,
    batches: Option<hiway_runtime::batcher::Writer>,
    drain: std::time::Duration,
}

/// Binds the listener and connects to the broker. Fails if either is impossible, so a
/// misconfiguration stops the process at start-up rather than at the first request.
pub async fn build(config: &Config) -> Result<Ingress, Error> {
    let broker = Broker::new(config);
    let connection = broker.connect("hiway-ingress").await?;
    let listener = TcpListener::bind(config.ingress.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.ingress.listen,
            source,
        })?;
    let link = link::Link::default();
    // Only channels with duplicate detection need the database; without them ingress runs on
    // the broker alone.
    let keys = if config.channels.values().any(|c| c.idempotency.is_some()) {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(config.database.max_connections)
            .acquire_timeout(std::time::Duration::from_secs(2))
            .connect(config.database.url.expose())
            .await?;
        idempotency::MIGRATOR.run(&pool).await?;
        // A claim pending for longer than a publish may take belongs to a request that died.
        Some(idempotency::KeyStore::new(
            pool,
            config.broker.publish_timeout * 2,
        ))
    } else {
        None
    };
    let purge: Vec<_> = config
        .channels
        .iter()
        .filter_map(|(name, c)| c.idempotency.as_ref().map(|i| (name.clone(), i.window)))
        .collect();
    let (outbox, batches) = outbox::Outbox::start(
        &config.ingress,
        config.names().ingress_exchange(),
        link.clone(),
    );
    let state = AppState {
        clients: Arc::new(auth::Clients::from_config(config)),
        channels: Arc::new(config.channels.clone().into_iter().collect()),
        link: link.clone(),
        outbox,
        retry_after: config.ingress.retry_after_seconds,
        keys: keys.clone(),
    };
    Ok(Ingress {
        listener,
        router: router(state, config),
        broker,
        connection,
        link,
        keys,
        purge,
        batches,
        drain: config.shutdown.drain_timeout,
    })
}

fn router(state: AppState, config: &Config) -> Router {
    Router::new()
        .route(
            "/v1/channels/{channel}/messages",
            post(routes::post_message),
        )
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .with_state(state)
        // Body limits are per channel and enforced in the handler, where the channel is known;
        // axum's global 2 MB default would otherwise answer first, without naming the channel.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            config.ingress.request_timeout,
        ))
        // Every refusal is logged once, at warn, with its reason, by `error::IngressError`; the
        // trace layer's own line for a 5xx (at error, without the reason) would only repeat
        // it, and louder. It stays available at debug.
        .layer(
            TraceLayer::new_for_http()
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
}

impl Ingress {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into())
    }

    /// Serves until `stop` is cancelled, then stops accepting connections, lets in-flight
    /// requests finish (their publishes are confirmed or answered 503), and closes the broker
    /// connection.
    pub async fn run(self, stop: CancellationToken) -> Result<(), Error> {
        let addr = self.local_addr();
        let link_stop = CancellationToken::new();
        let supervisor = tokio::spawn(self.link.clone().supervise(
            self.broker,
            self.connection,
            link_stop.clone(),
        ));
        if let Some(keys) = self.keys.clone() {
            tokio::spawn(purge_keys(keys, self.purge.clone(), link_stop.clone()));
        }
        tracing::info!(%addr, "ingress listening");
        let served = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        // Every request is answered, so every batch was settled; one is still in flight only
        // if its request timed out first. Let it be confirmed before the channel closes.
        if let Some(batches) = self.batches
            && tokio::time::timeout(self.drain, batches.finish())
                .await
                .is_err()
        {
            tracing::warn!(
                "a batch of messages was still unconfirmed when the drain timeout passed"
            );
        }
        // Only now, with every request answered, is the broker link closed.
        link_stop.cancel();
        let _ = supervisor.await;
        tracing::info!("ingress stopped");
        served.map_err(Error::Serve)
    }
}

/// Forgets expired idempotency keys every few minutes, so the table holds one window's worth.
async fn purge_keys(
    keys: idempotency::KeyStore,
    channels: Vec<(ChannelName, std::time::Duration)>,
    stop: CancellationToken,
) {
    loop {
        for (channel, window) in &channels {
            if let Err(error) = keys.purge(channel, *window).await {
                tracing::warn!(%error, %channel, "could not purge expired idempotency keys");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(300)) => {}
        }
    }
}
