//! Stop signals.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or ctrl-c. Services then stop taking work and drain.
/// A second signal exits the process at once, for an operator who does not want to wait.
pub fn stop_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stop signal received: draining (signal again to exit at once)");
        trigger.cancel();
        wait_for_signal().await;
        tracing::warn!("second stop signal: exiting without draining");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
