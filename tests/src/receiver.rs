//! A destination double: an HTTP server on port 0 that records every request and answers
//! with the statuses a test scripts (200 once the script runs out).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use tokio_util::sync::DropGuard;

/// One request the double received.
#[derive(Clone, Debug)]
pub struct Received {
    /// HTTP method.
    pub method: Method,
    /// Path and query.
    pub uri: Uri,
    /// All headers.
    pub headers: HeaderMap,
    /// The body, byte for byte.
    pub body: Bytes,
}

impl Received {
    /// A header as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct Inner {
    arrived: std::sync::atomic::AtomicUsize,
    /// Requests being answered now, and the most there ever were at once.
    in_flight: std::sync::atomic::AtomicUsize,
    peak_in_flight: std::sync::atomic::AtomicUsize,
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<(u16, String)>>,
    default: Mutex<Option<(u16, String)>>,
    delay: Mutex<Duration>,
}

/// The double. Dropping it stops the server.
pub struct Receiver {
    addr: SocketAddr,
    inner: Arc<Inner>,
    /// Stops the server when the double is dropped.
    _stop: DropGuard,
}

impl Receiver {
    /// Starts a double on a free port.
    pub async fn start() -> Self {
        Self::start_on(0).await
    }

    /// Starts a double on this port (0 for any): a destination that went away comes back at
    /// the same address.
    pub async fn start_on(port: u16) -> Self {
        let inner = Arc::new(Inner::default());
        let app = Router::new().fallback(record).with_state(inner.clone());
        let (listener, addr) = crate::doubles::bind("receiver", port).await;
        let stop = crate::doubles::serve(listener, app);
        Self {
            addr,
            inner,
            _stop: stop,
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The URL of `path` on this double.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next requests are answered with these statuses and bodies, in order.
    pub fn respond_with(&self, answers: &[(u16, &str)]) {
        self.inner
            .script
            .lock()
            .expect("lock")
            .extend(answers.iter().map(|(s, b)| (*s, (*b).to_owned())));
    }

    /// Once the script runs out, answer this (instead of 200) until told otherwise; `None`
    /// goes back to 200.
    pub fn set_default(&self, answer: Option<(u16, &str)>) {
        *self.inner.default.lock().expect("lock") = answer.map(|(s, b)| (s, b.to_owned()));
    }

    /// Every answer waits this long first (a slow destination).
    pub fn set_delay(&self, delay: Duration) {
        *self.inner.delay.lock().expect("lock") = delay;
    }

    /// Requests that have arrived, including those still waiting for their answer.
    pub fn arrived(&self) -> usize {
        self.inner.arrived.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most requests it was answering at the same time.
    pub fn peak_in_flight(&self) -> usize {
        self.inner
            .peak_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.inner.received.lock().expect("lock").clone()
    }

    /// Waits until at least `n` requests arrived, then returns them all.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        crate::eventually(
            &format!("{n} requests at {}", self.addr),
            timeout,
            || async {
                let r = self.received();
                (r.len() >= n).then_some(r)
            },
        )
        .await
    }
}

async fn record(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    use std::sync::atomic::Ordering::SeqCst;
    inner.arrived.fetch_add(1, SeqCst);
    let now = inner.in_flight.fetch_add(1, SeqCst) + 1;
    inner.peak_in_flight.fetch_max(now, SeqCst);
    let delay = *inner.delay.lock().expect("lock");
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    inner.in_flight.fetch_sub(1, SeqCst);
    let answer = inner
        .script
        .lock()
        .expect("lock")
        .pop_front()
        .or_else(|| inner.default.lock().expect("lock").clone());
    // Recorded after the delay and the choice of answer: a request counts as received when
    // the destination has decided what to do with it.
    inner.received.lock().expect("lock").push(Received {
        method,
        uri,
        headers,
        body,
    });
    match answer {
        Some((status, body)) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [("content-type", "application/json")],
            body,
        ),
        None => (
            StatusCode::OK,
            [("content-type", "application/json")],
            "{}".to_owned(),
        ),
    }
}
