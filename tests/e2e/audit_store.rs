//! The audit trail's table on the real PostgreSQL: the batch writer's `COPY`, and its
//! fallback when the broker redelivers a batch that was already committed.

use hiway_audit::store::{insert_batch, insert_events};
use hiway_proto::audit::{AuditEvent, AuditKind, RoutedCopy};
use hiway_proto::{DestinationName, MessageId, RouteName};
use std::time::Duration;

use hiway_tests::{TestHiway, eventually};

use crate::audit_batch::event;

async fn stored(app: &TestHiway) -> Vec<uuid::Uuid> {
    sqlx::query_scalar("select event_id from audit_events where service = 'test' order by event_id")
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_batch_written_again_stores_only_the_events_not_stored_yet() {
    let app = TestHiway::spawn("[channels.forms]\nclients = [\"source\"]\n").await;
    let first: Vec<AuditEvent> = (0..3).map(|_| event()).collect();
    assert_eq!(insert_batch(&app.pool, &first).await.unwrap(), 3);

    // The same batch again, as when its ack was lost after its commit: nothing new, no error.
    assert_eq!(insert_batch(&app.pool, &first).await.unwrap(), 0);

    // Two stored events and two new ones: the new ones are written, each event once.
    let mut mixed = first[..2].to_vec();
    mixed.extend([event(), event()]);
    assert_eq!(insert_batch(&app.pool, &mixed).await.unwrap(), 2);

    let mut expected: Vec<uuid::Uuid> = first
        .iter()
        .chain(&mixed[2..])
        .map(|e| e.event_id)
        .collect();
    expected.sort();
    assert_eq!(stored(&app).await, expected);
    app.shutdown().await;
}

/// One event of every kind, with and without their optional fields, recorded by `service`.
fn every_kind(service: &str) -> Vec<AuditEvent> {
    let channel = || "forms".parse().unwrap();
    let destination = || DestinationName::parse("dhis2").unwrap();
    let route = || RouteName::parse("to-dhis2").unwrap();
    let kinds = vec![
        AuditKind::Received {
            channel: channel(),
            client: "commcare".parse().unwrap(),
            content_type: "application/json".into(),
            size_bytes: 1023,
        },
        AuditKind::Routed {
            channel: channel(),
            copies: vec![
                RoutedCopy {
                    route: route(),
                    destination: destination(),
                    part: None,
                },
                RoutedCopy {
                    route: route(),
                    destination: destination(),
                    part: Some(2),
                },
            ],
        },
        AuditKind::Unrouted { channel: channel() },
        AuditKind::Filtered {
            channel: channel(),
            route: route(),
            reason: "filter".into(),
        },
        AuditKind::Attempted {
            destination: destination(),
            route: Some(route()),
            attempt: 2,
            status_code: Some(503),
            duration_ms: 40,
            error: "503 Service Unavailable: \"busy\"\n\ttry later ✓".into(),
            retry_in_ms: Some(2000),
        },
        AuditKind::Attempted {
            destination: destination(),
            route: None,
            attempt: 1,
            status_code: None,
            duration_ms: 5,
            error: "connection refused".into(),
            retry_in_ms: None,
        },
        AuditKind::Delivered {
            destination: destination(),
            route: Some(route()),
            attempt: 1,
            status_code: 200,
            duration_ms: 12,
        },
        AuditKind::Replayed {
            destination: Some(destination()),
            replay: 1,
            dead_id: uuid::Uuid::now_v7(),
        },
        AuditKind::Replayed {
            destination: None,
            replay: 3,
            dead_id: uuid::Uuid::now_v7(),
        },
        AuditKind::Discarded {
            destination: None,
            dead_id: uuid::Uuid::now_v7(),
        },
        AuditKind::CircuitOpened {
            destination: destination(),
            failures: 5,
            cool_down_ms: 30000,
            reason: Some("401 Unauthorized".into()),
        },
        AuditKind::CircuitClosed {
            destination: destination(),
        },
        AuditKind::Dead {
            destination: Some(destination()),
            reason: "4xx".into(),
        },
        AuditKind::Dead {
            destination: None,
            reason: "not JSON".into(),
        },
    ];
    // A kind added to AuditKind stops this match compiling: add it to the list above.
    for kind in &kinds {
        match kind {
            AuditKind::Received { .. }
            | AuditKind::Routed { .. }
            | AuditKind::Unrouted { .. }
            | AuditKind::Filtered { .. }
            | AuditKind::Attempted { .. }
            | AuditKind::Delivered { .. }
            | AuditKind::Replayed { .. }
            | AuditKind::Discarded { .. }
            | AuditKind::CircuitOpened { .. }
            | AuditKind::CircuitClosed { .. }
            | AuditKind::Dead { .. } => {}
        }
    }
    kinds
        .into_iter()
        .map(|kind| AuditEvent::now(MessageId::generate(), service, kind))
        .collect()
}

/// Every column of the rows `service` recorded, as JSON, in event order.
async fn rows(app: &TestHiway, service: &str) -> Vec<serde_json::Value> {
    sqlx::query_scalar(
        "select to_jsonb(a) from audit_events a where service = $1 order by event_id",
    )
    .bind(service)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_batch_writers_copy_stores_every_kind_of_event_as_the_insert_does() {
    let app = TestHiway::spawn("[channels.forms]\nclients = [\"source\"]\n").await;
    let events = every_kind("copy-test");
    assert_eq!(
        insert_batch(&app.pool, &events).await.unwrap(),
        events.len() as u64
    );
    let copied = rows(&app, "copy-test").await;
    assert_eq!(copied.len(), events.len());

    sqlx::query("delete from audit_events where service = 'copy-test'")
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        insert_events(&app.pool, &events).await.unwrap(),
        events.len() as u64
    );
    let inserted = rows(&app, "copy-test").await;
    assert_eq!(copied, inserted);

    // And what is stored is the event: its kind's fields in `detail`, its time to the
    // microsecond, the searchable columns filled.
    let attempted = copied
        .iter()
        .find(|r| r["event_id"] == events[4].event_id.to_string())
        .unwrap();
    assert_eq!(attempted["kind"], "attempted");
    assert_eq!(attempted["status_code"], 503);
    assert_eq!(attempted["route"], "to-dhis2");
    assert_eq!(attempted["client"], serde_json::Value::Null);
    assert_eq!(
        attempted["detail"]["error"],
        "503 Service Unavailable: \"busy\"\n\ttry later ✓"
    );
    let at: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(attempted["at"].clone()).unwrap();
    assert_eq!(at.timestamp_micros(), events[4].at.timestamp_micros());
    app.shutdown().await;
}

#[tokio::test]
async fn a_nul_in_an_events_text_is_stored_as_the_replacement_character_not_refused() {
    let app = TestHiway::spawn("[channels.forms]\nclients = [\"source\"]\n").await;
    // A jq error quoting a posted value, or a destination's answer, can carry U+0000, which
    // PostgreSQL's text and jsonb refuse: the batch would be retried for ever.
    let attempted = |error: &str| {
        AuditEvent::now(
            MessageId::generate(),
            "nul-test",
            AuditKind::Attempted {
                destination: DestinationName::parse("dhis2").unwrap(),
                route: None,
                attempt: 1,
                status_code: Some(409),
                duration_ms: 3,
                error: error.into(),
                retry_in_ms: None,
            },
        )
    };
    let copied = attempted("conflict on \"a\0b\"");
    assert_eq!(
        insert_batch(&app.pool, std::slice::from_ref(&copied))
            .await
            .unwrap(),
        1
    );
    let inserted = attempted("\0 at the start");
    assert_eq!(
        insert_events(&app.pool, std::slice::from_ref(&inserted))
            .await
            .unwrap(),
        1
    );
    // A literal backslash-u-0000 is text like any other, and stays as it is.
    let literal = attempted(r"a literal \u0000");
    assert_eq!(
        insert_batch(&app.pool, std::slice::from_ref(&literal))
            .await
            .unwrap(),
        1
    );

    let error = |e: &AuditEvent| {
        let id = e.event_id;
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "select detail->>'error' from audit_events where event_id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(error(&copied).await, "conflict on \"a\u{FFFD}b\"");
    assert_eq!(error(&inserted).await, "\u{FFFD} at the start");
    assert_eq!(error(&literal).await, r"a literal \u0000");
    app.shutdown().await;
}

#[tokio::test]
async fn a_dead_letter_with_a_nul_in_its_reason_and_headers_is_stored_with_its_body_untouched() {
    let app = TestHiway::spawn("[channels.forms]\nclients = [\"source\"]\n").await;
    let message_id = MessageId::generate();
    let dead = hiway_audit::store::DeadLetter {
        dead_id: uuid::Uuid::now_v7(),
        message_id: Some(message_id),
        channel: Some("forms".into()),
        destination: Some("dhis2".into()),
        routing_key: "dhis2".into(),
        reason: "routes.r.transform failed: bad value \"x\0y\"".into(),
        dead_by: Some("transformer".into()),
        died_at: chrono::Utc::now(),
        content_type: Some("application/json".into()),
        headers: serde_json::json!({"x-other\0": "v\0", "list": ["\0"]}),
        attempts: serde_json::json!([]),
        last_status_code: None,
        body: b"{\"value\":\"x\\u0000y\"}\0raw".to_vec(),
    };
    hiway_audit::store::insert_dead_letter(&app.pool, &dead)
        .await
        .unwrap();
    let (reason, headers, body): (String, serde_json::Value, Vec<u8>) =
        sqlx::query_as("select reason, headers, body from dead_letters where dead_id = $1")
            .bind(dead.dead_id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        reason,
        "routes.r.transform failed: bad value \"x\u{FFFD}y\""
    );
    assert_eq!(
        headers,
        serde_json::json!({"x-other\u{FFFD}": "v\u{FFFD}", "list": ["\u{FFFD}"]})
    );
    assert_eq!(body, dead.body);
    let dead_reason: String = sqlx::query_scalar(
        "select detail->>'reason' from audit_events where message_id = $1 and kind = 'dead'",
    )
    .bind(message_id.as_uuid())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(dead_reason, reason);
    app.shutdown().await;
}

#[tokio::test]
async fn an_audit_message_postgresql_refuses_is_dead_lettered_and_the_trail_goes_on() {
    use chrono::TimeZone;
    let app = TestHiway::spawn("[channels.forms]\nclients = [\"source\"]\n").await;
    let broker = hiway_runtime::Broker::new(&app.config);
    let connection = broker.connect("refused-test").await.unwrap();
    let publisher = broker.publisher(&connection).await.unwrap();
    let unrouted = || {
        AuditEvent::now(
            MessageId::generate(),
            "refused-test",
            AuditKind::Unrouted {
                channel: "forms".parse().unwrap(),
            },
        )
    };
    // Before 4713 BC: a time the event can hold and PostgreSQL's timestamptz cannot (22008),
    // so writing it again and again would never succeed.
    let mut ancient = unrouted();
    ancient.at = chrono::Utc.with_ymd_and_hms(-5000, 1, 1, 0, 0, 0).unwrap();
    let sent = serde_json::to_vec(&[&ancient]).unwrap();
    assert_eq!(
        serde_json::from_slice::<Vec<AuditEvent>>(&sent).unwrap()[0],
        ancient
    );
    let (before, after) = (unrouted(), unrouted());
    publisher.publish_audit(&[&before]).await.unwrap();
    publisher.publish_audit(&[&ancient]).await.unwrap();
    publisher.publish_audit(&[&after]).await.unwrap();

    let stored = eventually(
        "the events around the refused one",
        Duration::from_secs(20),
        || async {
            let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
            "select event_id from audit_events where service = 'refused-test' order by event_id",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
            (ids.len() == 2).then_some(ids)
        },
    )
    .await;
    assert_eq!(stored, vec![before.event_id, after.event_id]);
    let dead = eventually(
        "the refused message's dead letter",
        Duration::from_secs(20),
        || async {
            let dead = app.dead_letters("dead").await;
            (!dead.is_empty()).then_some(dead)
        },
    )
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, sent);
    publisher.close().await;
    app.shutdown().await;
}
