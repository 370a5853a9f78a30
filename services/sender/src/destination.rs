//! A destination as the sender uses it: one HTTP client, built once, and the request parts
//! that never change.

use base64::Engine;
use hiway_config::{
    CircuitConfig, DestinationAuth, DestinationConfig, DestinationKind, RetryConfig,
};
use hiway_proto::DestinationName;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Method, Url};

use crate::login::Login;

/// Why a destination cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// A header name or value is not valid HTTP.
    #[error("destinations.{destination}.headers: {reason}")]
    Header {
        /// Which destination.
        destination: DestinationName,
        /// What was wrong.
        reason: String,
    },
    /// A secret could not be read.
    #[error("destinations.{destination}.auth: {reason}")]
    Secret {
        /// Which destination.
        destination: DestinationName,
        /// Where it looked.
        reason: String,
    },
    /// The HTTP client could not be built (TLS setup).
    #[error("destinations.{destination}: cannot build the HTTP client: {source}")]
    Client {
        /// Which destination.
        destination: DestinationName,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
}

/// Everything needed to send to one destination.
#[derive(Debug)]
pub struct Destination {
    /// Its name (also its queue's routing key).
    pub name: DestinationName,
    /// The client: its connection pool, timeouts and TLS settings belong to this destination
    /// alone, and its connections stay warm between requests.
    pub client: Client,
    /// Request method.
    pub method: Method,
    /// Request URL.
    pub url: Url,
    /// Configured headers and authorization, prepared once.
    pub headers: HeaderMap,
    /// Requests in flight at once in this process.
    pub concurrency: usize,
    /// One permit per request in flight: a message holds one while its kind talks to the
    /// destination, not while its outcome is being made durable, so waiting for the broker
    /// does not take a request slot.
    pub requests: tokio::sync::Semaphore,
    /// Unacknowledged messages held by this process.
    pub prefetch: u16,
    /// How its answers are read.
    pub kind: DestinationKind,
    /// When failed deliveries are tried again.
    pub retry: RetryConfig,
    /// When to stop sending to it.
    pub circuit: CircuitConfig,
    /// Its whole configuration, for the settings of its kind.
    pub config: DestinationConfig,
    /// For a destination that hands out short-lived tokens, how the sender logs in; its
    /// token is then added per request, not in `headers`.
    pub login: Option<Login>,
}

impl Destination {
    /// Builds the client and the fixed request parts.
    pub fn new(
        name: DestinationName,
        config: &DestinationConfig,
    ) -> Result<Self, DestinationError> {
        let header_error = |reason: String| DestinationError::Header {
            destination: name.clone(),
            reason,
        };
        let mut headers = HeaderMap::new();
        for (k, v) in &config.headers {
            let key = HeaderName::try_from(k.as_str())
                .map_err(|e| header_error(format!("{k:?}: {e}")))?;
            let value = HeaderValue::try_from(v.as_str())
                .map_err(|e| header_error(format!("{k:?}: {e}")))?;
            headers.insert(key, value);
        }
        let mut login = None;
        if let Some(auth) = &config.auth {
            let secret = auth
                .secret()
                .1
                .resolve()
                .map_err(|reason| DestinationError::Secret {
                    destination: name.clone(),
                    reason,
                })?;
            let secret = secret.expose();
            // Every kind but a login sends the same credentials on every request.
            let fixed = match auth {
                DestinationAuth::Primero {
                    username,
                    token_url,
                    refresh_after,
                    ..
                } => {
                    login = Some(Login::primero(
                        &config.url,
                        token_url.as_ref(),
                        username,
                        secret,
                        *refresh_after,
                    ));
                    None
                }
                DestinationAuth::Basic { username, .. } => Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD
                        .encode(format!("{username}:{secret}"))
                )),
                DestinationAuth::Bearer { .. } => Some(format!("Bearer {secret}")),
                DestinationAuth::ApiToken { .. } => Some(format!("ApiToken {secret}")),
            };
            if let Some(value) = fixed {
                let mut value = HeaderValue::try_from(value).map_err(|_| {
                    header_error("the credentials are not valid in a header".into())
                })?;
                // Marked sensitive so no debug output or HTTP/2 table ever shows it.
                value.set_sensitive(true);
                headers.insert(AUTHORIZATION, value);
            }
        }
        let client = Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            // Keep as many idle connections as requests can be in flight, so a steady stream
            // never opens new ones.
            .pool_max_idle_per_host(config.concurrency)
            .tcp_nodelay(true)
            // A POST redirected would be re-sent as a GET by the usual rules: never follow;
            // a 3xx is reported as a permanent failure naming the status.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("hiway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| DestinationError::Client {
                destination: name.clone(),
                source,
            })?;
        let method = Method::from_bytes(config.method.as_bytes()).unwrap_or(Method::POST);
        Ok(Self {
            name,
            client,
            method,
            url: config.url.clone(),
            headers,
            concurrency: config.concurrency,
            requests: tokio::sync::Semaphore::new(config.concurrency),
            prefetch: config.effective_prefetch(),
            kind: config.kind,
            retry: config.retry.clone(),
            circuit: config.circuit.clone(),
            config: config.clone(),
            login,
        })
    }
}
