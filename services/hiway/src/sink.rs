//! A demo destination: answers every POST with 200 (after an optional delay) and counts what
//! it received. Used by the README demo and the benchmark; it is not a production component.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct SinkState {
    delay: Duration,
    received: Arc<AtomicU64>,
    verbose: bool,
}

/// Serves the sink until `stop`.
pub async fn serve(
    listen: SocketAddr,
    delay: Duration,
    verbose: bool,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let state = SinkState {
        delay,
        received: Arc::new(AtomicU64::new(0)),
        verbose,
    };
    let app = Router::new()
        .route("/", post(receive))
        .route("/{*path}", post(receive))
        .route("/count", get(count))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "demo sink listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await?;
    Ok(())
}

async fn receive(State(state): State<SinkState>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    let n = state.received.fetch_add(1, Ordering::Relaxed) + 1;
    if state.verbose {
        let id = headers
            .get("x-hiway-message-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        tracing::info!(n, message_id = id, bytes = body.len(), body = %String::from_utf8_lossy(&body), "sink received a message");
    }
    StatusCode::OK
}

async fn count(State(state): State<SinkState>) -> String {
    state.received.load(Ordering::Relaxed).to_string()
}
