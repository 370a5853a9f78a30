//! Doubles of the health systems hiway delivers to. Each answers exactly the shapes documented
//! in `../shared/protocols.md` (success, warnings, conflicts, errors), checked against the
//! samples copied to `tests/fixtures/`.

pub mod dhis2;
pub mod fhir;
pub mod openmrs;
pub mod primero;

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Binds 127.0.0.1:`port` (0: any free port) for the double named `what`.
pub(crate) async fn bind(what: &str, port: u16) -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("bind the {what} double: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("the {what} double's address: {e}"));
    (listener, addr)
}

/// Serves `app` on `listener` until the guard returned is dropped (with the double that holds
/// it), finishing the requests in hand.
pub(crate) fn serve(listener: TcpListener, app: axum::Router) -> DropGuard {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(s.cancelled_owned())
            .await;
    });
    stop.drop_guard()
}
