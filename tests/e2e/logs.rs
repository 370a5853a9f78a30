//! The services' logs as a log collector (a file, journald, a container runtime) gets them.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use hiway_tests::{Receiver, Services, TestHiway};

use crate::bus::one_route_with;

#[tokio::test]
async fn a_service_logging_to_a_pipe_writes_plain_text_without_colour_codes() {
    let sink = Receiver::start().await;
    let mut app = TestHiway::spawn_with(
        &one_route_with(&sink, ""),
        Services {
            ingress: false,
            transformer: false,
            sender: false,
            audit: false,
        },
    )
    .await;
    let (_, logs) = app.spawn_process_with_logs("hiway-ingress", &[("RUST_LOG", "info")]);

    // Its lines up to the one that says it listens (the pipe stays open while it runs).
    let lines = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            let mut seen = Vec::new();
            for line in BufReader::new(logs).lines() {
                let line = line.expect("a line of the log");
                let done = line.contains("ingress listening");
                seen.push(line);
                if done {
                    break;
                }
            }
            seen
        }),
    )
    .await
    .expect("ingress logged that it listens within 30 s")
    .expect("join");

    let text = lines.join("\n");
    assert!(
        text.contains("INFO") && text.contains("ingress listening"),
        "{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log that is not a terminal: {text:?}"
    );
}
