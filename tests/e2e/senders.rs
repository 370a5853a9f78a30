//! Sender processes: competing consumers, and a sender killed mid-stream.

use std::collections::HashSet;
use std::time::Duration;

use hiway_tests::{Receiver, Services, TestHiway};
use serde_json::json;

/// Ingress, transformer and audit in-process; senders are real processes.
const NO_SENDER: Services = Services {
    ingress: true,
    transformer: true,
    sender: false,
    audit: true,
};

fn sink_route(sink: &Receiver, concurrency: usize) -> String {
    format!(
        r#"
[channels.forms]
clients = ["source"]
[destinations.sink]
url = "{}"
concurrency = {concurrency}
[routes.r]
channels = ["forms"]
destinations = ["sink"]
"#,
        sink.url("/")
    )
}

async fn post_many(app: &TestHiway, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(app.post_json("forms", &json!({"n": i})).await.to_string());
    }
    ids
}

#[tokio::test]
async fn two_sender_processes_for_one_destination_share_the_work() {
    let sink = Receiver::start().await;
    // Slow enough that one process alone could not take every message before the other
    // starts taking its share.
    sink.set_delay(Duration::from_millis(20));
    let mut app = TestHiway::spawn_with(&sink_route(&sink, 4), NO_SENDER).await;
    // Each process marks its requests through a configuration override in its environment.
    app.spawn_sender_process(&[("HIWAY_DESTINATIONS__SINK__HEADERS__X_SENDER", "a")]);
    app.spawn_sender_process(&[("HIWAY_DESTINATIONS__SINK__HEADERS__X_SENDER", "b")]);

    let ids = post_many(&app, 200).await;

    let got = sink.wait_for(200, Duration::from_secs(60)).await;
    let delivered: HashSet<_> = got
        .iter()
        .map(|r| r.header("x-hiway-message-id").unwrap().to_owned())
        .collect();
    assert_eq!(delivered, ids.iter().cloned().collect::<HashSet<_>>());
    let by = |who| {
        got.iter()
            .filter(|r| r.header("x_sender") == Some(who))
            .count()
    };
    let (a, b) = (by("a"), by("b"));
    assert_eq!(
        a + b,
        got.len(),
        "every request came from one of the two processes"
    );
    assert!(
        a >= 20 && b >= 20,
        "both processes took a share: a={a}, b={b}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_sender_killed_mid_stream_and_restarted_delivers_every_accepted_message() {
    let sink = Receiver::start().await;
    sink.set_delay(Duration::from_millis(10));
    let mut app = TestHiway::spawn_with(&sink_route(&sink, 8), NO_SENDER).await;
    let first = app.spawn_sender_process(&[]);

    let ids = post_many(&app, 300).await;
    sink.wait_for(50, Duration::from_secs(30)).await;
    // SIGKILL: requests in flight and messages prefetched but unacked are abandoned.
    app.kill_process(first);
    let before_restart = sink.received().len();
    assert!(
        before_restart < 300,
        "the kill came mid-stream ({before_restart} already delivered)"
    );
    app.spawn_sender_process(&[]);

    let expected: HashSet<_> = ids.into_iter().collect();
    let delivered = hiway_tests::eventually(
        "every accepted message delivered",
        Duration::from_secs(60),
        || async {
            let seen: HashSet<_> = sink
                .received()
                .iter()
                .map(|r| r.header("x-hiway-message-id").unwrap().to_owned())
                .collect();
            expected.is_subset(&seen).then_some(seen)
        },
    )
    .await;
    assert_eq!(
        delivered, expected,
        "nothing but the accepted messages was delivered"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_sender_stopped_with_sigterm_finishes_its_requests_in_flight_before_exiting() {
    let sink = Receiver::start().await;
    sink.set_delay(Duration::from_millis(1500));
    let mut app = TestHiway::spawn_with(&sink_route(&sink, 2), NO_SENDER).await;
    let sender = app.spawn_sender_process(&[]);
    let ids = post_many(&app, 2).await;
    hiway_tests::eventually(
        "both requests in flight",
        Duration::from_secs(20),
        || async { (sink.arrived() == 2).then_some(()) },
    )
    .await;

    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || (app.terminate_process(sender), app))
        .await
        .unwrap();
    let (status, mut app) = status;

    assert!(
        status.success(),
        "the sender exits cleanly after draining: {status}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "it waited for the answers"
    );
    assert_eq!(
        sink.received().len(),
        2,
        "both requests were answered before it exited"
    );
    for id in &ids {
        app.wait_for_trail(id.parse().unwrap(), &["delivered"])
            .await;
    }
    // Both were acked before the exit: a new sender finds nothing to send again.
    assert_eq!(
        app.queue_depth(&app.names().deliver_queue(&"sink".parse().unwrap()))
            .await,
        0
    );
    app.spawn_sender_process(&[]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.arrived(), 2, "nothing was delivered twice");
    app.shutdown().await;
}
