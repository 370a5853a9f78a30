//! Failure handling: retries, dead letters, replay. Every test counts messages end to end:
//! none lost, each delivered or dead with its reason.

use std::collections::HashSet;
use std::time::Duration;

use hiway_tests::{Receiver, TestHiway, eventually};
use serde_json::json;

use crate::bus::one_route_with;

const WAIT: Duration = Duration::from_secs(30);

fn ids_at(sink: &Receiver) -> HashSet<String> {
    sink.received()
        .iter()
        .filter_map(|r| r.header("x-hiway-message-id").map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn a_destination_answering_503_for_a_while_gets_every_message_once_it_recovers() {
    let sink = Receiver::start().await;
    sink.respond_with(&[(503, "maintenance"); 25]);
    let app = TestHiway::spawn(&one_route_with(
        &sink,
        r#"retry = { schedule = ["100ms", "200ms", "400ms", "800ms", "800ms"], jitter = 0.2 }
circuit = { failures = 5, cool_down = "200ms" }"#,
    ))
    .await;

    let mut ids = HashSet::new();
    for n in 0..10 {
        ids.insert(app.post_json("forms", &json!({ "n": n })).await.to_string());
    }

    eventually("every message delivered", WAIT, || async {
        ids.is_subset(&ids_at(&sink)).then_some(())
    })
    .await;
    let mut attempts_recorded = 0;
    for id in &ids {
        let trail = app
            .wait_for_trail(id.parse().unwrap(), &["received", "routed", "delivered"])
            .await;
        attempts_recorded += trail.iter().filter(|e| e.kind == "attempted").count();
        let delivered = trail.iter().find(|e| e.kind == "delivered").unwrap();
        let failed_before = trail.iter().filter(|e| e.kind == "attempted").count() as i32;
        assert_eq!(
            delivered.attempt,
            Some(failed_before + 1),
            "attempts are counted across retries"
        );
    }
    assert_eq!(attempts_recorded, 25, "every 503 is in a trail");
    assert!(app.dead_letters("dead").await.is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn a_400_goes_dead_at_once_with_the_destinations_words_and_replay_delivers_it_after_the_fix()
{
    let sink = Receiver::start().await;
    sink.respond_with(&[(400, r#"{"error":"unknown facility F-999"}"#)]);
    let app = TestHiway::spawn(&one_route_with(&sink, "")).await;

    let id = app.post_json("forms", &json!({"facility": "F-999"})).await;

    let trail = app.wait_for_trail(id, &["attempted", "dead"]).await;
    assert_eq!(
        sink.received().len(),
        1,
        "a permanent failure is not retried"
    );
    let attempted = trail.iter().find(|e| e.kind == "attempted").unwrap();
    assert_eq!(attempted.status_code, Some(400));
    assert!(attempted.detail["retry_in_ms"].is_null());
    let dead = app.dead_letters("dead").await;
    assert_eq!(dead.len(), 1);
    let letter = &dead[0];
    assert_eq!(letter.message_id, Some(id.as_uuid()));
    assert_eq!(letter.destination.as_deref(), Some("sink"));
    assert_eq!(letter.last_status_code, Some(400));
    assert!(
        letter.reason.contains("unknown facility F-999"),
        "{}",
        letter.reason
    );
    assert_eq!(letter.attempts.as_array().unwrap().len(), 1);
    assert_eq!(&letter.body[..], br#"{"facility":"F-999"}"#);

    // The operator fixes the mapping at the destination (the double now answers 200) and replays.
    let listed = app
        .hiway(&["dlq", "list", "--destination", "sink", "--status", "400"])
        .await;
    assert!(listed.contains(&id.to_string()), "{listed}");
    let dry = app
        .hiway(&["dlq", "replay", "--error", "F-999", "--dry-run"])
        .await;
    assert!(dry.contains("would replay 1"), "{dry}");
    assert_eq!(sink.received().len(), 1, "a dry run sends nothing");
    let out = app.hiway(&["dlq", "replay", &id.to_string()]).await;
    assert!(out.contains("replayed 1"), "{out}");

    let got = sink.wait_for(2, WAIT).await;
    assert_eq!(
        got[1].header("x-hiway-message-id"),
        Some(id.to_string().as_str()),
        "same message id"
    );
    assert_eq!(&got[1].body[..], &got[0].body[..]);
    let trail = app
        .wait_for_trail(id, &["dead", "replayed", "delivered"])
        .await;
    let delivered = trail.iter().find(|e| e.kind == "delivered").unwrap();
    assert_eq!(delivered.attempt, Some(1), "attempts restart on replay");
    assert!(app.dead_letters("dead").await.is_empty());
    let replayed = &app.dead_letters("replayed").await[0];
    assert_eq!(replayed.replays, 1);

    // The operator reads the whole story in words, the replay included, from the stored trail.
    let printed = app.hiway(&["trace", &id.to_string()]).await;
    let line = |kind: &str| {
        printed
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(kind))
            .unwrap_or_else(|| panic!("no {kind} line in:\n{printed}"))
            .to_owned()
    };
    // A 400 is dead at once: the attempt names no wait before a next one.
    let attempted = line("attempted");
    assert!(
        attempted.contains("sender       destination=sink attempt=1 status=400 duration="),
        "{printed}"
    );
    assert!(!attempted.contains("retry_in="), "{printed}");
    assert!(
        line("replayed").ends_with(&format!(
            "operator     destination=sink replay=1 dead_id={}",
            replayed.dead_id
        )),
        "{printed}"
    );
    assert!(
        line("delivered").contains("sender       destination=sink attempt=1 status=200"),
        "{printed}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_409_is_delivered_where_the_destination_lists_it_in_delivered_statuses_and_dead_where_it_does_not()
 {
    // Two destinations that both answer 409 ("I have it already"): only one of them says so.
    let lenient = Receiver::start().await;
    let strict = Receiver::start().await;
    for sink in [&lenient, &strict] {
        sink.set_default(Some((409, r#"{"error":"already exists"}"#)));
    }
    let app = TestHiway::spawn(&format!(
        r#"
[channels.forms]
clients = ["source"]
[destinations.lenient]
url = "{}"
delivered_statuses = [409]
[destinations.strict]
url = "{}"
[routes.forms-to-both]
channels = ["forms"]
destinations = ["lenient", "strict"]
"#,
        lenient.url("/receive"),
        strict.url("/receive"),
    ))
    .await;

    let id = app.post_json("forms", &json!({"case": "c-1"})).await;

    let trail = app
        .wait_for_trail(
            id,
            &["received", "routed", "delivered", "attempted", "dead"],
        )
        .await;
    let delivered: Vec<_> = trail.iter().filter(|e| e.kind == "delivered").collect();
    assert_eq!(delivered.len(), 1, "{trail:#?}");
    assert_eq!(delivered[0].destination.as_deref(), Some("lenient"));
    assert_eq!(
        delivered[0].status_code,
        Some(409),
        "the trail keeps the status given"
    );
    let attempted = trail.iter().find(|e| e.kind == "attempted").unwrap();
    assert_eq!(attempted.destination.as_deref(), Some("strict"));
    assert_eq!(attempted.status_code, Some(409));
    let dead = app.dead_letters("dead").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].destination.as_deref(), Some("strict"));
    assert_eq!(dead[0].last_status_code, Some(409));
    assert!(
        dead[0].reason.starts_with("permanent failure: HTTP 409"),
        "{}",
        dead[0].reason
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        lenient.arrived(),
        1,
        "a delivered message is not sent again"
    );
    assert_eq!(strict.arrived(), 1, "a permanent failure is not retried");
    app.shutdown().await;
}

#[tokio::test]
async fn a_dhis2_409_with_conflicts_goes_dead_with_dhis2s_own_conflict_texts() {
    let dhis2 = Receiver::start().await;
    let warning = include_str!("../fixtures/dhis2/resp-238-409-warning.json");
    dhis2.respond_with(&[(409, warning)]);
    let app = TestHiway::spawn(&one_route_with(&dhis2, r#"kind = "dhis2""#)).await;
    let data_value_set: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/dhis2/datavalueset.json")).unwrap();

    let id = app.post_json("forms", &data_value_set).await;

    app.wait_for_trail(id, &["attempted", "dead"]).await;
    let dead = app.dead_letters("dead").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_status_code, Some(409));
    assert!(dead[0].reason.contains("E7610"), "{}", dead[0].reason);
    assert!(
        dead[0]
            .reason
            .contains("Data element not found or not accessible"),
        "{}",
        dead[0].reason
    );
    assert_eq!(
        dhis2.received().len(),
        1,
        "a rejected import is not retried"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_destination_down_longer_than_the_whole_schedule_leaves_every_message_dead_and_a_bulk_replay_delivers_them()
 {
    // A destination that is not there at all: nothing listens on its port.
    let gone = Receiver::start().await;
    let port = gone.port();
    let url_holder = gone.url("/");
    drop(gone);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let app = TestHiway::spawn(&format!(
        r#"
[channels.forms]
clients = ["source"]
[destinations.sink]
url = "{url_holder}"
connect_timeout = "1s"
retry = {{ schedule = ["100ms", "200ms"] }}
circuit = {{ failures = 5, cool_down = "100ms" }}
[routes.r]
channels = ["forms"]
destinations = ["sink"]
"#
    ))
    .await;

    let mut ids = HashSet::new();
    for n in 0..20 {
        ids.insert(app.post_json("forms", &json!({ "n": n })).await.to_string());
    }

    let dead = eventually("every message dead", WAIT, || async {
        let dead = app.dead_letters("dead").await;
        (dead.len() == 20).then_some(dead)
    })
    .await;
    for letter in &dead {
        assert!(
            letter.reason.starts_with("gave up after 3 attempts"),
            "{}",
            letter.reason
        );
        assert!(
            letter.reason.contains("could not connect"),
            "{}",
            letter.reason
        );
        assert_eq!(letter.attempts.as_array().unwrap().len(), 3);
        assert_eq!(letter.last_status_code, None);
    }
    let dead_ids: HashSet<String> = dead
        .iter()
        .map(|l| l.message_id.unwrap().to_string())
        .collect();
    assert_eq!(dead_ids, ids);

    // The destination comes back; the operator replays everything dead for it.
    let back = Receiver::start_on(port).await;
    let out = app
        .hiway(&["dlq", "replay", "--destination", "sink", "--since", "1h"])
        .await;
    assert!(out.contains("replayed 20"), "{out}");
    eventually("every message delivered", WAIT, || async {
        ids.is_subset(&ids_at(&back)).then_some(())
    })
    .await;
    assert!(app.dead_letters("dead").await.is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn a_message_that_keeps_failing_its_worker_is_dead_lettered_by_the_delivery_limit() {
    let sink = Receiver::start().await;
    // No sender runs: this test plays a worker that fails on the message every time.
    let services = hiway_tests::Services {
        ingress: true,
        transformer: true,
        sender: false,
        audit: true,
    };
    let app = TestHiway::spawn_with_broker_settings(
        "delivery_limit = 2",
        &one_route_with(&sink, ""),
        services,
    )
    .await;

    let id = app.post_json("forms", &json!({"poison": true})).await;

    let connection = lapin::Connection::connect(&hiway_tests::amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = app.names().deliver_queue(&"sink".parse().unwrap());
    let mut crashes = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        let got = channel
            .basic_get(queue.as_str().into(), Default::default())
            .await
            .unwrap();
        match got {
            Some(message) => {
                crashes += 1;
                message
                    .delivery
                    .nack(lapin::options::BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
            None if !app.dead_letters("dead").await.is_empty() => break,
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let dead = app.dead_letters("dead").await;
    assert_eq!(dead.len(), 1, "after {crashes} failed deliveries");
    assert_eq!(dead[0].message_id, Some(id.as_uuid()));
    assert_eq!(dead[0].dead_by.as_deref(), Some("broker"));
    assert!(
        dead[0].reason.contains("delivery_limit"),
        "{}",
        dead[0].reason
    );
    assert!(
        (2..=3).contains(&crashes),
        "dead-lettered after the limit, not before: {crashes}"
    );
    let _ = connection.close(200, "".into()).await;
    app.shutdown().await;
}

#[tokio::test]
async fn every_accepted_message_is_delivered_when_rabbitmq_restarts_during_a_load() {
    let node = tokio::task::spawn_blocking(|| {
        hiway_tests::rabbit_node::RabbitNode::start("hiway-e2e-restart", 5696)
    })
    .await
    .unwrap();
    let sink = Receiver::start().await;
    let app = std::sync::Arc::new(
        TestHiway::spawn_on(
            &node.url(),
            &one_route_with(&sink, r#"retry = { schedule = ["200ms"] }"#),
            hiway_tests::Services::ALL,
        )
        .await,
    );

    // A source posting numbered messages, 16 at a time, and posting each again after a
    // refusal until it is accepted, as CommCare does with a 503. It keeps posting until it
    // is told to stop, well after the broker is back: a fixed number of posts could all be
    // accepted before the broker went down, and then the test would prove nothing.
    let accepted_so_far = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop_posting = tokio_util::sync::CancellationToken::new();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = {
        let (app, accepted_so_far, stop_posting, next) = (
            app.clone(),
            accepted_so_far.clone(),
            stop_posting.clone(),
            next.clone(),
        );
        tokio::spawn(async move {
            let workers = (0..16).map(|_| {
                let (app, next, accepted_so_far, stop_posting) = (
                    app.clone(),
                    next.clone(),
                    accepted_so_far.clone(),
                    stop_posting.clone(),
                );
                tokio::spawn(async move {
                    let mut accepted = Vec::new();
                    let mut refused = 0;
                    while !stop_posting.is_cancelled() {
                        let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        loop {
                            let sent = app
                                .request("forms")
                                .header("content-type", "application/json")
                                .body(format!("{{\"n\":{n}}}"))
                                .send()
                                .await;
                            match sent {
                                Ok(r) if r.status() == 202 => {
                                    let body: serde_json::Value = r.json().await.unwrap();
                                    accepted.push(body["id"].as_str().unwrap().to_owned());
                                    accepted_so_far
                                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                    break;
                                }
                                _ => {
                                    refused += 1;
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                        }
                    }
                    (accepted, refused)
                })
            });
            let mut accepted = HashSet::new();
            let mut refused = 0;
            for w in futures_util::future::join_all(workers).await {
                let (a, r) = w.unwrap();
                accepted.extend(a);
                refused += r;
            }
            (accepted, refused)
        })
    };
    eventually("the load under way", WAIT, || async {
        (sink.received().len() >= 300).then_some(())
    })
    .await;
    let node = tokio::task::spawn_blocking(move || {
        node.restart();
        node
    })
    .await
    .unwrap();
    // The broker is back; the source goes on until 300 more posts are accepted.
    let after_restart = accepted_so_far.load(std::sync::atomic::Ordering::SeqCst) + 300;
    eventually(
        "300 more posts accepted after the restart",
        WAIT,
        || async {
            (accepted_so_far.load(std::sync::atomic::Ordering::SeqCst) >= after_restart)
                .then_some(())
        },
    )
    .await;
    stop_posting.cancel();
    let (accepted, refused) = load.await.unwrap();
    let posted = next.load(std::sync::atomic::Ordering::SeqCst);

    assert!(
        refused > 0,
        "the restart happened during the load (some posts were refused)"
    );
    // A worker takes a number only to post it, and posts it until it is accepted.
    assert_eq!(accepted.len(), posted, "every post was accepted in the end");
    eventually(
        "every accepted message delivered",
        Duration::from_secs(90),
        || async { accepted.is_subset(&ids_at(&sink)).then_some(()) },
    )
    .await;
    // A post answered 503 may still have been stored (the broker confirmed it just as the
    // connection died): the source retries it, and it arrives twice under two ids. That is
    // at-least-once; what must never happen is a delivery of something nobody posted.
    for r in sink.received() {
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert!(
            body["n"].as_u64().is_some_and(|n| n < posted as u64),
            "unexpected delivery: {body}"
        );
    }
    // Services first, while their broker is still there to say goodbye to.
    if let Ok(app) = std::sync::Arc::try_unwrap(app) {
        app.shutdown().await;
    }
    drop(node);
}

#[tokio::test]
async fn a_destination_never_gets_more_requests_at_once_than_its_concurrency_though_more_are_held()
{
    let sink = Receiver::start().await;
    sink.set_delay(Duration::from_millis(150));
    let app = TestHiway::spawn(&one_route_with(&sink, "concurrency = 2\nprefetch = 12")).await;

    let mut ids = HashSet::new();
    for n in 0..12 {
        ids.insert(app.post_json("forms", &json!({ "n": n })).await.to_string());
    }
    eventually("every message delivered", WAIT, || async {
        ids.is_subset(&ids_at(&sink)).then_some(())
    })
    .await;

    assert_eq!(
        sink.peak_in_flight(),
        2,
        "12 messages held, but only `concurrency` requests at a time"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_destination_that_keeps_failing_opens_its_circuit_so_messages_wait_and_a_probe_closes_it()
{
    let sink = Receiver::start().await;
    sink.set_default(Some((503, "down")));
    let app = TestHiway::spawn(&one_route_with(
        &sink,
        r#"concurrency = 1
retry = { schedule = ["1s"], jitter = 0.0 }
circuit = { failures = 3, cool_down = "700ms" }"#,
    ))
    .await;
    let mut ids = HashSet::new();
    for n in 0..20 {
        ids.insert(app.post_json("forms", &json!({ "n": n })).await.to_string());
    }

    let opened: (uuid::Uuid,) = eventually("the circuit to open", WAIT, || async {
        sqlx::query_as("select message_id from audit_events where kind = 'circuit_opened'")
            .fetch_optional(&app.pool)
            .await
            .unwrap()
    })
    .await;
    let at_open = sink.arrived();
    assert_eq!(
        at_open, 3,
        "it opened on the third consecutive failure, and the messages held waiting for a request \
         slot were not sent"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let while_open = sink.arrived() - at_open;
    assert!(
        (1..=4).contains(&while_open),
        "while open only probes go out, one per cool-down: {while_open}"
    );
    let status = app.hiway(&["status"]).await;
    assert!(status.contains("open since"), "{status}");
    assert!(
        status.contains("circuit open: 3 consecutive retryable failures; a probe every 700ms"),
        "{status}"
    );
    let trail = app.trail(opened.0.into()).await;
    assert!(
        trail.iter().any(|e| e.kind == "circuit_opened"),
        "the message that opened it has it in its trail"
    );

    // The destination recovers: the next probe gets through and the rest follows.
    sink.set_default(None);
    eventually("every message delivered", WAIT, || async {
        ids.is_subset(&ids_at(&sink)).then_some(())
    })
    .await;
    let _closed: (uuid::Uuid,) = eventually(
        "the probe that got through to close the circuit",
        WAIT,
        || async {
            sqlx::query_as("select message_id from audit_events where kind = 'circuit_closed'")
                .fetch_optional(&app.pool)
                .await
                .unwrap()
        },
    )
    .await;
    let status = app.hiway(&["status"]).await;
    assert!(status.contains("closed since"), "{status}");
    assert!(app.dead_letters("dead").await.is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn messages_held_while_a_circuit_opens_and_closes_again_and_again_do_not_use_up_their_delivery_limit()
 {
    let sink = Receiver::start().await;
    // Down, up for the probe, down again…: the circuit opens three times, and each time the
    // messages held waiting for the one request slot go back to the queue untried.
    sink.respond_with(&[
        (503, "down"),
        (200, "ok"),
        (503, "down"),
        (200, "ok"),
        (503, "down"),
        (200, "ok"),
    ]);
    let app = TestHiway::spawn_with_broker_settings(
        "delivery_limit = 2",
        &one_route_with(
            &sink,
            r#"concurrency = 1
prefetch = 30
retry = { schedule = ["100ms", "100ms", "100ms", "100ms"], jitter = 0.0 }
circuit = { failures = 1, cool_down = "100ms" }"#,
        ),
        hiway_tests::Services::ALL,
    )
    .await;
    // The first request takes a second, so that every message is held when it fails.
    sink.set_delay(Duration::from_secs(1));
    let mut ids = HashSet::new();
    for n in 0..30 {
        ids.insert(app.post_json("forms", &json!({ "n": n })).await.to_string());
    }
    sink.set_delay(Duration::ZERO);

    eventually("every message delivered", WAIT, || async {
        ids.is_subset(&ids_at(&sink)).then_some(())
    })
    .await;
    let opened: (i64,) =
        sqlx::query_as("select count(*) from audit_events where kind = 'circuit_opened'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(opened.0, 3, "the circuit opened three times");
    assert!(
        app.dead_letters("dead").await.is_empty(),
        "held three times, returned three times, still not poison (limit 2)"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn when_postgresql_is_stopped_during_a_load_the_trail_and_dead_letters_catch_up_when_it_returns()
 {
    let pg = tokio::task::spawn_blocking(|| {
        hiway_tests::pg_node::PgNode::start("hiway-e2e-outage", 5697)
    })
    .await
    .unwrap();
    let sink = Receiver::start().await;
    let broken = Receiver::start().await;
    broken.set_default(Some((422, r#"{"error":"unprocessable"}"#)));
    let app = TestHiway::spawn_on_database(
        &pg.url(),
        &format!(
            r#"
[channels.forms]
clients = ["source"]
[channels.bad]
clients = ["source"]
[channels.keyed]
clients = ["source"]
idempotency = {{ window = "1h" }}
[destinations.sink]
url = "{}"
[destinations.broken]
url = "{}"
[routes.good]
channels = ["forms", "keyed"]
destinations = ["sink"]
[routes.bad]
channels = ["bad"]
destinations = ["broken"]
"#,
            sink.url("/"),
            broken.url("/")
        ),
        hiway_tests::Services::ALL,
    )
    .await;

    let mut delivered_ids = Vec::new();
    let mut dead_ids = Vec::new();
    for n in 0..30 {
        delivered_ids.push(app.post_json("forms", &json!({ "n": n })).await);
    }
    let pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .unwrap();

    // The database is gone: messages still flow (delivery does not need it) ...
    for n in 30..100 {
        delivered_ids.push(app.post_json("forms", &json!({ "n": n })).await);
    }
    for n in 0..10 {
        dead_ids.push(app.post_json("bad", &json!({ "n": n })).await);
    }
    // ... but a channel that checks duplicates refuses rather than risk one.
    let refused = app
        .request("keyed")
        .header("content-type", "application/json")
        .header("idempotency-key", "k1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let ids: HashSet<String> = delivered_ids.iter().map(ToString::to_string).collect();
    eventually("deliveries during the outage", WAIT, || async {
        ids.is_subset(&ids_at(&sink)).then_some(())
    })
    .await;
    broken.wait_for(10, WAIT).await;

    let pg = tokio::task::spawn_blocking(move || {
        pg.restart();
        pg
    })
    .await
    .unwrap();

    // Nothing is missing once it is back: every trail complete, every dead letter stored.
    for id in &delivered_ids {
        app.wait_for_trail(*id, &["received", "routed", "delivered"])
            .await;
    }
    let dead = eventually("the dead letters stored", WAIT, || async {
        let dead = app.dead_letters("dead").await;
        (dead.len() == dead_ids.len()).then_some(dead)
    })
    .await;
    let stored: HashSet<_> = dead.iter().map(|l| l.message_id.unwrap()).collect();
    assert_eq!(
        stored,
        dead_ids
            .iter()
            .map(|id| id.as_uuid())
            .collect::<HashSet<_>>()
    );
    for id in &dead_ids {
        app.wait_for_trail(*id, &["received", "routed", "attempted", "dead"])
            .await;
    }
    // And the channel that refused accepts again.
    let accepted = app
        .request("keyed")
        .header("content-type", "application/json")
        .header("idempotency-key", "k1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    app.shutdown().await;
    drop(pg);
}
