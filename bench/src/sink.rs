//! The destination hiway delivers to: an HTTP server in the bench process that answers 200
//! (after an optional delay, to play a slow destination) and records when each message first
//! arrived, by its `X-Hiway-Message-Id`.
//!
//! It runs in the same process as the load generator on purpose: the 202 and the arrival are
//! then read from the same monotonic clock, so accepted-to-delivered latency needs no clock
//! synchronisation.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hiway_proto::headers::HTTP_MESSAGE_ID;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running sink.
pub struct Sink {
    addr: SocketAddr,
    state: Arc<SinkState>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

struct SinkState {
    delay: Duration,
    /// First arrival of each message id (as a u128).
    arrivals: Mutex<HashMap<u128, Instant>>,
    /// Requests for a message that had already arrived (redeliveries).
    duplicates: AtomicU64,
    /// Requests without a readable message id.
    unidentified: AtomicU64,
    /// Bodies that are not a tracker payload (`{"events":…`), the end-to-end route's transform
    /// output. Meaningless for the scaling sink, which gets envelopes published raw.
    untransformed: AtomicU64,
}

impl Sink {
    /// Starts a sink on a free port of 127.0.0.1 that waits `delay` before each answer.
    pub async fn start(delay: Duration) -> anyhow::Result<Self> {
        let state = Arc::new(SinkState {
            delay,
            arrivals: Mutex::new(HashMap::new()),
            duplicates: AtomicU64::new(0),
            unidentified: AtomicU64::new(0),
            untransformed: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/receive", post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                crate::warn(&format!("the sink on {addr} failed: {error}"));
            }
        });
        Ok(Self {
            addr,
            state,
            stop,
            task,
        })
    }

    /// The URL to configure as the destination.
    pub fn url(&self) -> String {
        format!("http://{}/receive", self.addr)
    }

    fn arrivals(&self) -> std::sync::MutexGuard<'_, HashMap<u128, Instant>> {
        self.state
            .arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Distinct messages received since the last [`Sink::reset`].
    pub fn received(&self) -> usize {
        self.arrivals().len()
    }

    /// The first arrival of each of these message ids (`None`: not arrived).
    pub fn arrivals_of(&self, ids: &[u128]) -> Vec<Option<Instant>> {
        let arrivals = self.arrivals();
        ids.iter().map(|id| arrivals.get(id).copied()).collect()
    }

    /// How many of these message ids have arrived.
    pub fn count_of(&self, ids: &[u128]) -> usize {
        let arrivals = self.arrivals();
        ids.iter().filter(|id| arrivals.contains_key(id)).count()
    }

    /// The earliest and latest first arrivals since the last reset.
    pub fn span(&self) -> Option<(Instant, Instant)> {
        let arrivals = self.arrivals();
        let first = arrivals.values().min()?;
        let last = arrivals.values().max()?;
        Some((*first, *last))
    }

    /// Redeliveries and requests without an id, since the start.
    pub fn anomalies(&self) -> (u64, u64) {
        (
            self.state.duplicates.load(Ordering::Relaxed),
            self.state.unidentified.load(Ordering::Relaxed),
        )
    }

    /// Bodies received that were not a transform's tracker payload, since the start.
    pub fn untransformed(&self) -> u64 {
        self.state.untransformed.load(Ordering::Relaxed)
    }

    /// Forgets every arrival.
    pub fn reset(&self) {
        self.arrivals().clear();
    }

    /// Stops the server.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Records the arrival before anything else (the latency ends when hiway's request is here),
/// then plays the destination's delay and answers 200. The body is read (as a real destination
/// would, which keeps the connection reusable) and checked to be a transform's output.
async fn receive(
    State(state): State<Arc<SinkState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    if !body.starts_with(br#"{"events":["#) {
        state.untransformed.fetch_add(1, Ordering::Relaxed);
    }
    let id = headers
        .get(HTTP_MESSAGE_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| uuid::Uuid::parse_str(s).ok());
    match id {
        Some(id) => {
            let mut arrivals = state
                .arrivals
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match arrivals.entry(id.as_u128()) {
                Entry::Vacant(e) => {
                    e.insert(at);
                }
                Entry::Occupied(_) => {
                    state.duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        None => {
            state.unidentified.fetch_add(1, Ordering::Relaxed);
        }
    }
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    StatusCode::OK
}
