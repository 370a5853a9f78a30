//! Filters, transforms and lookup tables on routes, end to end: what each message becomes,
//! what the trail says, and what happens when a program fails on one message.

use std::time::Duration;

use hiway_proto::amqp::BasicProperties;
use hiway_runtime::amqp::Connection;
use hiway_runtime::{Broker, Publisher};
use hiway_tests::{Receiver, TestHiway, eventually};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

fn sink(name: &str, receiver: &Receiver) -> String {
    format!(
        "[destinations.{name}]\nurl = \"{}\"\nretry = {{ schedule = [\"100ms\"], jitter = 0.0 }}\n",
        receiver.url("/")
    )
}

#[tokio::test]
async fn a_filter_lets_through_only_the_messages_it_selects_and_the_trail_says_why_the_others_stopped()
 {
    let visits = Receiver::start().await;
    let app = TestHiway::spawn(&format!(
        r#"
[channels.forms]
clients = ["source"]
{}
[routes.visits-only]
channels = ["forms"]
destinations = ["visits"]
filter = '.form."@name" == "Household Visit"'
"#,
        sink("visits", &visits)
    ))
    .await;

    let kept = app
        .post_json(
            "forms",
            &json!({"form": {"@name": "Household Visit", "n": 1}}),
        )
        .await;
    let dropped = app
        .post_json("forms", &json!({"form": {"@name": "Registration"}}))
        .await;

    let got = visits.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].header("x-hiway-message-id"),
        Some(&*kept.to_string())
    );
    // Untransformed: the very bytes the source sent.
    let body: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["form"]["n"], 1);

    let trail = app.wait_for_trail(dropped, &["received", "filtered"]).await;
    let filtered = trail.iter().find(|e| e.kind == "filtered").unwrap();
    assert_eq!(filtered.route.as_deref(), Some("visits-only"));
    assert_eq!(filtered.detail["reason"], "filter");
    app.wait_for_trail(kept, &["received", "routed", "delivered"])
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(visits.arrived(), 1, "the filtered message was not sent");
    app.shutdown().await;
}

#[tokio::test]
async fn one_report_becomes_one_request_per_facility_each_with_its_own_idempotency_key() {
    let dhis2 = Receiver::start().await;
    let app = TestHiway::spawn(&format!(
        r#"
[channels.reports]
clients = ["source"]
{}
[routes.per-facility]
channels = ["reports"]
destinations = ["dhis2"]
transform = '''
.period as $p
| .rows[]
| {{dataSet: "pBOMPrpg1QX", period: $p, orgUnit: .facility,
   dataValues: [{{dataElement: "f7n9E0hX8qk", value: (.count | tostring)}}]}}
'''
"#,
        sink("dhis2", &dhis2)
    ))
    .await;

    let id = app
        .post_json(
            "reports",
            &json!({"period": "202401", "rows": [
                {"facility": "DiszpKrYNg8", "count": 12},
                {"facility": "Rp268JB6Ne4", "count": 3}
            ]}),
        )
        .await;

    let mut got = dhis2.wait_for(2, WAIT).await;
    got.sort_by_key(|r| r.header("idempotency-key").unwrap().to_owned());
    let keys: Vec<_> = got
        .iter()
        .map(|r| r.header("idempotency-key").unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            format!("{id}:per-facility:0"),
            format!("{id}:per-facility:1")
        ]
    );
    let first: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(first["orgUnit"], "DiszpKrYNg8");
    assert_eq!(first["dataValues"][0]["value"], "12");
    assert_eq!(got[0].header("content-type"), Some("application/json"));

    let trail = app
        .wait_for_trail(id, &["routed", "delivered", "delivered"])
        .await;
    let routed = trail.iter().find(|e| e.kind == "routed").unwrap();
    assert_eq!(routed.detail["copies"].as_array().unwrap().len(), 2);
    assert_eq!(routed.detail["copies"][1]["part"], 1);
    app.shutdown().await;
}

#[tokio::test]
async fn a_transform_failing_on_one_message_kills_it_for_that_route_only_and_a_replay_after_the_lookup_fix_delivers_it()
 {
    let archive = Receiver::start().await;
    let dhis2 = Receiver::start().await;
    let tables = tempfile::tempdir().unwrap();
    let orgunits = tables.path().join("orgunits.csv");
    std::fs::write(&orgunits, "code,uid\nFAC-1,DiszpKrYNg8\n").unwrap();
    let app = TestHiway::spawn(&format!(
        r#"
[channels.forms]
clients = ["source"]
{}{}
[lookups.orgunits]
file = "{}"
key = "code"
value = "uid"

[routes.archive]
channels = ["forms"]
destinations = ["archive"]

[routes.to-dhis2]
channels = ["forms"]
destinations = ["dhis2"]
transform = '''
{{orgUnit: ($orgunits[.facility] // error("no org unit for facility \(.facility)"))}}
'''
"#,
        sink("archive", &archive),
        sink("dhis2", &dhis2),
        orgunits.display()
    ))
    .await;

    let known = app.post_json("forms", &json!({"facility": "FAC-1"})).await;
    let unknown = app.post_json("forms", &json!({"facility": "FAC-9"})).await;

    // The other route is not held back by the failure.
    archive.wait_for(2, WAIT).await;
    let got = dhis2.wait_for(1, WAIT).await;
    assert!(
        std::str::from_utf8(&got[0].body)
            .unwrap()
            .contains("DiszpKrYNg8")
    );
    assert_eq!(
        got[0].header("x-hiway-message-id"),
        Some(&*known.to_string())
    );

    let dead = eventually("the failed route's dead letter", WAIT, || async {
        let dead = app.dead_letters("dead").await;
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].message_id.map(|m| m.to_string()),
        Some(unknown.to_string())
    );
    assert_eq!(dead[0].dead_by.as_deref(), Some("transformer"));
    assert!(
        dead[0].reason.contains("routes.to-dhis2.transform failed")
            && dead[0].reason.contains("no org unit for facility FAC-9"),
        "{}",
        dead[0].reason
    );

    // The operator adds the facility (read again without a restart) and replays.
    std::fs::write(
        &orgunits,
        "code,uid\nFAC-1,DiszpKrYNg8\nFAC-9,Rp268JB6Ne4\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let out = app.hiway(&["dlq", "replay", "--all"]).await;
    assert!(out.contains("replayed 1"), "{out}");

    let got = dhis2.wait_for(2, WAIT).await;
    assert!(
        std::str::from_utf8(&got[1].body)
            .unwrap()
            .contains("Rp268JB6Ne4")
    );
    assert_eq!(
        got[1].header("x-hiway-message-id"),
        Some(&*unknown.to_string())
    );
    // Only the failed route ran again: the archive did not get a second copy.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(archive.arrived(), 2);
    app.shutdown().await;
}

#[tokio::test]
async fn a_dead_delivery_triggers_the_on_dead_route_which_tells_the_source() {
    let partner = Receiver::start().await;
    partner.set_default(Some((
        422,
        r#"{"errors":[{"message":"age is not valid"}]}"#,
    )));
    let source_system = Receiver::start().await;
    let app = TestHiway::spawn(&format!(
        r#"
[channels.cases]
clients = ["source"]
{}{}
[routes.sync]
channels = ["cases"]
destinations = ["partner"]

[routes.sync-failed]
on_dead = ["partner"]
destinations = ["source-system"]
emits = "requests"
transform = '''
{{method: "PATCH", path: "cases/\(.body.data.id)",
  body: {{data: {{sync_status: "failed", sync_error: .reason}}}}}}
'''
"#,
        sink("partner", &partner),
        sink("source-system", &source_system)
    ))
    .await;

    let id = app
        .post_json("cases", &json!({"data": {"id": "4a7c", "age": -3}}))
        .await;

    let got = source_system.wait_for(1, WAIT).await;
    assert_eq!(got[0].method, "PATCH");
    assert_eq!(got[0].uri.path(), "/cases/4a7c");
    let body: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["data"]["sync_status"], "failed");
    assert!(
        body["data"]["sync_error"].as_str().unwrap().contains("422"),
        "{body}"
    );
    assert_eq!(
        got[0].header("idempotency-key"),
        Some(&*format!("{id}:sync-failed:0"))
    );
    let trail = app
        .wait_for_trail(id, &["received", "routed", "dead", "routed", "delivered"])
        .await;
    assert!(
        trail
            .iter()
            .any(|e| e.kind == "delivered" && e.destination.as_deref() == Some("source-system"))
    );
    app.shutdown().await;
}

/// A hiway whose configuration has no on-dead route, its transformer not started yet, with
/// the on-dead queue an earlier configuration made (bound to the dead-letter exchange), and
/// a channel to publish with.
async fn with_on_dead_queue_left() -> (TestHiway, Connection, Publisher) {
    let app = TestHiway::spawn_with(
        "[channels.forms]\nclients = [\"source\"]\n",
        hiway_tests::Services {
            transformer: false,
            ..hiway_tests::Services::ALL
        },
    )
    .await;
    let broker = Broker::new(&app.config);
    let connection = broker.connect("on-dead-test").await.unwrap();
    let channel = connection.channel().await.unwrap();
    channel
        .declare(&hiway_proto::topology::plan_on_dead(
            &app.names(),
            app.config.broker.delivery_limit,
        ))
        .await
        .unwrap();
    channel.close().await;
    let publisher = broker.publisher(&connection).await.unwrap();
    (app, connection, publisher)
}

/// Publishes a dead letter and waits until the audit service has stored it (the `n`th).
async fn dead_letter(app: &TestHiway, publisher: &Publisher, n: usize) {
    publisher
        .publish(
            &app.names().dead_exchange(),
            "forms",
            b"dead body",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    eventually("the dead letter is stored", WAIT, || async {
        (app.dead_letters("dead").await.len() == n).then_some(())
    })
    .await;
}

/// Starts the transformer and waits until it has routed a message, which it does only after
/// it has dealt with the on-dead queue.
async fn start_transformer(
    app: &TestHiway,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<Result<(), hiway_transformer::Error>>,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let transformer = hiway_transformer::build(&app.config).await.unwrap();
    let running = tokio::spawn(transformer.run(stop.clone()));
    let id = app.post_json("forms", &json!({"form": 1})).await;
    app.wait_for_trail(id, &["received", "unrouted"]).await;
    (stop, running)
}

#[tokio::test]
async fn an_on_dead_queue_left_by_an_earlier_configuration_is_deleted_with_its_copies() {
    let (app, connection, publisher) = with_on_dead_queue_left().await;
    let on_dead = app.names().on_dead_queue();
    dead_letter(&app, &publisher, 1).await;
    assert_eq!(app.queue_depth(&on_dead).await, 1);

    let (stop, running) = start_transformer(&app).await;

    let check = connection.channel().await.unwrap();
    let found = check.queue_depth(&on_dead).await;
    // Not any failure: the broker's answer that no such queue exists.
    assert!(
        matches!(&found, Err(e) if e.to_string().contains("NOT_FOUND")),
        "the on-dead queue is gone: {found:?}"
    );
    // The dead letter itself is stored, and later ones still are.
    dead_letter(&app, &publisher, 2).await;
    connection.close(200, "done").await;
    stop.cancel();
    running.await.unwrap().unwrap();
    app.shutdown().await;
}

#[tokio::test]
async fn a_dead_letter_whose_reason_quotes_a_nul_is_stored_and_the_ones_after_it_are_too() {
    let dhis2 = Receiver::start().await;
    let app = TestHiway::spawn(&format!(
        r#"
[channels.forms]
clients = ["source"]
{}
[routes.to-dhis2]
channels = ["forms"]
destinations = ["dhis2"]
transform = 'error("no org unit for facility \(.facility)")'
"#,
        sink("dhis2", &dhis2),
    ))
    .await;

    // JSON may carry U+0000 (as \u0000); jq quotes it into the reason, which PostgreSQL's
    // text cannot hold.
    let nul = app
        .post_json("forms", &json!({"facility": "FAC\u{0}9"}))
        .await;
    let after = app.post_json("forms", &json!({"facility": "FAC-8"})).await;

    let dead = eventually("both dead letters", WAIT, || async {
        let dead = app.dead_letters("dead").await;
        (dead.len() == 2).then_some(dead)
    })
    .await;
    let reason = |id: hiway_proto::MessageId| {
        dead.iter()
            .find(|d| d.message_id == Some(id.as_uuid()))
            .map(|d| d.reason.clone())
            .unwrap()
    };
    assert!(
        reason(nul).ends_with("no org unit for facility FAC\u{FFFD}9"),
        "{}",
        reason(nul)
    );
    assert!(reason(after).ends_with("no org unit for facility FAC-8"));
    // The body is kept as it was posted, NUL escape and all.
    let body = &dead
        .iter()
        .find(|d| d.message_id == Some(nul.as_uuid()))
        .unwrap()
        .body;
    assert!(std::str::from_utf8(body).unwrap().contains(r"FAC\u00009"));
    app.shutdown().await;
}
