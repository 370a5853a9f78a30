//! A message's way through the bus: delivery, fan-out, fan-in, the audit trail.

use std::time::Duration;

use hiway_tests::{Receiver, TestHiway};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

fn one_route(sink: &Receiver) -> String {
    one_route_with(sink, "")
}

/// One channel to one destination, with extra settings for the destination.
pub fn one_route_with(sink: &Receiver, destination_settings: &str) -> String {
    format!(
        r#"
[channels.forms]
clients = ["source"]
[destinations.sink]
url = "{}"
{destination_settings}
[routes.forms-to-sink]
channels = ["forms"]
destinations = ["sink"]
"#,
        sink.url("/receive")
    )
}

/// The W3C recommendation's example.
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

#[tokio::test]
async fn a_posted_message_reaches_its_destination_unchanged_and_its_trail_is_stored() {
    let sink = Receiver::start().await;
    let app = TestHiway::spawn(&one_route(&sink)).await;
    // Whitespace and key order are part of the bytes the destination must get unchanged.
    let body = br#"{ "form": {"weight": 3.2, "facility": "F-001"},  "id": "f1" }"#;

    let response = app
        .request("forms")
        .header("content-type", "application/json; charset=utf-8")
        .header("traceparent", TRACEPARENT)
        .header("tracestate", "congo=t61rcWkgMzE")
        .header("tracestate", "rojo=00f067aa0ba902b7")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let answer: serde_json::Value = response.json().await.unwrap();
    let id = answer["id"].as_str().unwrap().to_owned();
    assert_eq!(
        uuid::Uuid::parse_str(&id).unwrap().get_version_num(),
        7,
        "ids are UUIDv7"
    );

    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.uri.path(), "/receive");
    assert_eq!(&r.body[..], &body[..]);
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(r.header("idempotency-key"), Some(id.as_str()));
    assert_eq!(r.header("x-hiway-message-id"), Some(id.as_str()));
    // The source's trace context goes on as it came; two tracestate lines are one list.
    assert_eq!(r.header("traceparent"), Some(TRACEPARENT));
    assert_eq!(
        r.header("tracestate"),
        Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    );

    let trail = app
        .wait_for_trail(id.parse().unwrap(), &["received", "routed", "delivered"])
        .await;
    let kinds: Vec<_> = trail.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["received", "routed", "delivered"]);
    let received = &trail[0];
    assert_eq!(received.channel.as_deref(), Some("forms"));
    assert_eq!(received.client.as_deref(), Some("source"));
    assert_eq!(received.size_bytes, Some(body.len() as i64));
    assert_eq!(
        trail[1].detail["copies"],
        json!([{"route": "forms-to-sink", "destination": "sink"}])
    );
    let delivered = &trail[2];
    assert_eq!(delivered.destination.as_deref(), Some("sink"));
    assert_eq!(delivered.route.as_deref(), Some("forms-to-sink"));
    assert_eq!(delivered.attempt, Some(1));
    assert_eq!(delivered.status_code, Some(200));
    assert!(delivered.duration_ms.is_some());
    app.shutdown().await;
}

#[tokio::test]
async fn basic_auth_is_accepted_like_a_bearer_key() {
    let sink = Receiver::start().await;
    let app = TestHiway::spawn(&one_route(&sink)).await;
    let response = app
        .http
        .post(format!("{}/v1/channels/forms/messages", app.ingress_url))
        .basic_auth("source", Some(hiway_tests::SOURCE_PASSWORD))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    sink.wait_for(1, WAIT).await;
    app.shutdown().await;
}

#[tokio::test]
async fn one_message_fans_out_to_two_destinations() {
    let dhis2 = Receiver::start().await;
    let openmrs = Receiver::start().await;
    let app = TestHiway::spawn(&format!(
        r#"
[channels.visits]
clients = ["source"]
[destinations.dhis2]
url = "{}"
[destinations.openmrs]
url = "{}"
[routes.visits-everywhere]
channels = ["visits"]
destinations = ["dhis2", "openmrs"]
"#,
        dhis2.url("/api/dataValueSets"),
        openmrs.url("/openmrs/ws/rest/v1/encounter")
    ))
    .await;

    let id = app.post_json("visits", &json!({"visit": 1})).await;

    for destination in [&dhis2, &openmrs] {
        let got = destination.wait_for(1, WAIT).await;
        assert_eq!(
            got[0].header("x-hiway-message-id"),
            Some(id.to_string().as_str())
        );
        assert_eq!(&got[0].body[..], br#"{"visit":1}"#);
    }
    let trail = app
        .wait_for_trail(id, &["received", "routed", "delivered", "delivered"])
        .await;
    let mut delivered_to: Vec<_> = trail
        .iter()
        .filter(|e| e.kind == "delivered")
        .filter_map(|e| e.destination.clone())
        .collect();
    delivered_to.sort();
    assert_eq!(delivered_to, ["dhis2", "openmrs"]);
    app.shutdown().await;
}

#[tokio::test]
async fn two_channels_fan_in_to_one_destination() {
    let dhis2 = Receiver::start().await;
    let app = TestHiway::spawn(&format!(
        r#"
[channels.commcare]
clients = ["source"]
[channels.cht]
clients = ["source"]
[destinations.dhis2]
url = "{}"
[routes.reports]
channels = ["commcare", "cht"]
destinations = ["dhis2"]
"#,
        dhis2.url("/api/dataValueSets")
    ))
    .await;

    let a = app
        .post_json("commcare", &json!({"from": "commcare"}))
        .await;
    let b = app.post_json("cht", &json!({"from": "cht"})).await;

    let got = dhis2.wait_for(2, WAIT).await;
    let mut ids: Vec<_> = got
        .iter()
        .map(|r| r.header("x-hiway-message-id").unwrap().to_owned())
        .collect();
    ids.sort();
    let mut expected = vec![a.to_string(), b.to_string()];
    expected.sort();
    assert_eq!(ids, expected);
    for id in [a, b] {
        app.wait_for_trail(id, &["received", "routed", "delivered"])
            .await;
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_message_no_route_takes_is_recorded_as_unrouted_not_dropped() {
    let sink = Receiver::start().await;
    let mut entries = one_route(&sink);
    entries.push_str("\n[channels.orphans]\nclients = [\"source\"]\n");
    let app = TestHiway::spawn(&entries).await;

    let id = app
        .post_json("orphans", &json!({"nobody": "wants me"}))
        .await;

    let trail = app.wait_for_trail(id, &["received", "unrouted"]).await;
    assert_eq!(trail.last().unwrap().channel.as_deref(), Some("orphans"));
    // Routed once the trail is written, so the message has been fully handled: no copy left.
    assert_eq!(app.queue_depth(&app.names().ingress_queue()).await, 0);
    assert!(sink.received().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn a_failed_delivery_is_recorded_and_the_message_delivered_on_a_later_attempt() {
    let sink = Receiver::start().await;
    sink.respond_with(&[(503, r#"{"message":"down for maintenance"}"#)]);
    let app = TestHiway::spawn(&one_route_with(
        &sink,
        r#"retry = { schedule = ["200ms"] }"#,
    ))
    .await;

    let id = app.post_json("forms", &json!({"n": 1})).await;

    let got = sink.wait_for(2, WAIT).await;
    assert!(
        got.iter()
            .all(|r| r.header("x-hiway-message-id") == Some(id.to_string().as_str()))
    );
    let trail = app
        .wait_for_trail(id, &["received", "routed", "attempted", "delivered"])
        .await;
    let attempted = trail.iter().find(|e| e.kind == "attempted").unwrap();
    assert_eq!(attempted.attempt, Some(1));
    assert_eq!(attempted.status_code, Some(503));
    let error = attempted.detail["error"].as_str().unwrap();
    assert!(
        error.contains("down for maintenance"),
        "the destination's own words are kept: {error}"
    );
    let delivered = trail.iter().find(|e| e.kind == "delivered").unwrap();
    assert_eq!(delivered.attempt, Some(2));
    app.shutdown().await;
}

#[tokio::test]
async fn an_unreadable_envelope_is_dead_lettered_with_its_reason_and_does_not_block_the_queue() {
    let sink = Receiver::start().await;
    let app = TestHiway::spawn(&one_route(&sink)).await;
    // Published straight to the ingress exchange without hiway's headers, as a misbehaving
    // tool might.
    publish_behind_ingress(
        &app,
        b"{}",
        lapin::BasicProperties::default().with_message_id("not-a-uuid".into()),
    )
    .await;
    let good = app.post_json("forms", &json!({"after": "poison"})).await;

    sink.wait_for(1, WAIT).await;
    app.wait_for_trail(good, &["delivered"]).await;
    let (reason, dead_by): (String, Option<String>) =
        hiway_tests::eventually("the dead letter", WAIT, || async {
            sqlx::query_as("select reason, dead_by from dead_letters")
                .fetch_optional(&app.pool)
                .await
                .unwrap()
        })
        .await;
    assert!(reason.contains("message_id"), "{reason}");
    assert_eq!(dead_by.as_deref(), Some("transformer"));
    app.shutdown().await;
}

/// Any AMQP client the services use must take a message whose header bytes are not UTF-8
/// (another publisher's, or a damaged one) as an ordinary bad message: the transformer
/// dead-letters it naming the header, the audit service stores that dead letter with the same
/// header, and the queue goes on. A client that failed to decode it would drop its connection
/// at every redelivery (docs/design/architecture.md, (o)).
#[tokio::test]
async fn a_message_whose_header_is_not_utf8_is_dead_lettered_naming_the_header_and_the_queue_goes_on()
 {
    use hiway_proto::amqp::{AMQPValue, LongString};
    use hiway_proto::{ChannelName, ClientName, Envelope};

    let sink = Receiver::start().await;
    let app = TestHiway::spawn(&one_route(&sink)).await;
    let envelope = Envelope::accepted(
        ChannelName::parse("forms").unwrap(),
        ClientName::parse("source").unwrap(),
        "application/json".into(),
    );
    let mut properties = envelope.to_properties();
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        hiway_proto::headers::TRACEPARENT.into(),
        AMQPValue::LongString(LongString::from(b"00-\xff\xfe-01".to_vec())),
    );
    properties = properties.with_headers(headers);
    publish_behind_ingress(&app, b"{\"damaged\": true}", properties).await;
    let good = app.post_json("forms", &json!({"after": "damaged"})).await;

    app.wait_for_trail(good, &["delivered"]).await;
    let dead = hiway_tests::eventually("the dead letter", WAIT, || async {
        app.dead_letters("dead").await.into_iter().next()
    })
    .await;
    assert_eq!(dead.message_id, Some(envelope.id.as_uuid()));
    assert!(
        dead.reason.contains("traceparent") && dead.reason.contains("not UTF-8"),
        "{}",
        dead.reason
    );
    assert_eq!(dead.dead_by.as_deref(), Some("transformer"));
    assert_eq!(
        sink.received().len(),
        1,
        "only the good message was delivered"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_trace_context_that_does_not_parse_is_dropped_and_the_message_is_delivered_without_it() {
    let sink = Receiver::start().await;
    let app = TestHiway::spawn(&one_route(&sink)).await;
    let response = app
        .request("forms")
        .header("content-type", "application/json")
        .header("traceparent", "00-not-a-trace-01")
        .header("tracestate", "congo=t61rcWkgMzE")
        .body(b"{}".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        202,
        "a bad traceparent never fails a request"
    );

    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].header("traceparent"), None);
    assert_eq!(
        got[0].header("tracestate"),
        None,
        "a tracestate only goes with a valid traceparent"
    );
    app.shutdown().await;
}

/// Ingress keeps only valid trace context, but any publisher can set the AMQP headers: the
/// sender checks them again, so that a value HTTP cannot carry does not fail every attempt.
#[tokio::test]
async fn a_trace_header_set_behind_ingress_that_http_cannot_carry_is_not_sent_and_the_message_is_delivered()
 {
    use hiway_proto::{ChannelName, ClientName, Envelope};

    let sink = Receiver::start().await;
    let app = TestHiway::spawn(&one_route(&sink)).await;
    let mut envelope = Envelope::accepted(
        ChannelName::parse("forms").unwrap(),
        ClientName::parse("source").unwrap(),
        "application/json".into(),
    );
    envelope.traceparent = Some(format!("{TRACEPARENT}\r\nx-injected: yes"));
    envelope.tracestate = Some("congo=t61rcWkgMzE".into());
    publish_behind_ingress(&app, b"{}", envelope.to_properties()).await;

    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].header("x-hiway-message-id"),
        Some(envelope.id.to_string().as_str())
    );
    assert_eq!(got[0].header("traceparent"), None);
    assert_eq!(got[0].header("tracestate"), None);
    assert_eq!(got[0].header("x-injected"), None);
    app.wait_for_trail(envelope.id, &["delivered"]).await;
    app.shutdown().await;
}

/// Publishes to the ingress exchange with the tests' own client, as another tool would,
/// bypassing ingress (and so its checks), and waits for the broker's confirm.
pub(crate) async fn publish_behind_ingress(
    app: &TestHiway,
    body: &[u8],
    properties: lapin::BasicProperties,
) {
    let exchange = app.names().ingress_exchange();
    hiway_tests::publish_raw(&exchange, hiway_proto::names::INGRESS_KEY, body, properties).await;
}
