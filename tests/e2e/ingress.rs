//! What ingress refuses, and that a refusal publishes nothing.

use std::time::Duration;

use hiway_tests::rabbit_node::RabbitNode;
use hiway_tests::{OTHER_KEY, Services, TestHiway};

const INGRESS_ONLY: Services = Services {
    ingress: true,
    transformer: false,
    sender: false,
    audit: false,
};

const ENTRIES: &str = r#"
[channels.forms]
clients = ["source"]
max_body_bytes = 64
[channels.xml]
clients = ["source"]
content_types = ["text/xml", "application/xml"]
[destinations.sink]
url = "http://127.0.0.1:9/"
[routes.r]
channels = ["forms", "xml"]
destinations = ["sink"]
"#;

/// The JSON error ingress answered, after checking the status.
async fn refused(response: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(response.status(), status, "expected {status} {code}");
    let body: serde_json::Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    body
}

#[tokio::test]
async fn each_refused_request_gets_its_status_and_a_reason_and_publishes_nothing() {
    // Only ingress runs, so anything it published would stay in the ingress queue.
    let app = TestHiway::spawn_with(ENTRIES, INGRESS_ONLY).await;
    let url = |channel: &str| format!("{}/v1/channels/{channel}/messages", app.ingress_url);
    let json = "application/json";

    let body = refused(
        app.request("forms")
            .header("content-type", json)
            .body("{\n  \"a\": 1,\n  oops\n}")
            .send()
            .await
            .unwrap(),
        400,
        "malformed_json",
    )
    .await;
    assert_eq!(
        (
            body["error"]["line"].as_u64(),
            body["error"]["column"].as_u64()
        ),
        (Some(3), Some(3))
    );

    let r = app
        .http
        .post(url("forms"))
        .header("content-type", json)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("www-authenticate"));
    refused(r, 401, "unauthenticated").await;
    let r = app
        .http
        .post(url("forms"))
        .bearer_auth("wrong-key")
        .header("content-type", json)
        .body("{}");
    refused(r.send().await.unwrap(), 401, "unauthenticated").await;
    let r = app
        .http
        .post(url("forms"))
        .basic_auth("source", Some("wrong"))
        .header("content-type", json)
        .body("{}");
    refused(r.send().await.unwrap(), 401, "unauthenticated").await;

    let r = app
        .http
        .post(url("forms"))
        .bearer_auth(OTHER_KEY)
        .header("content-type", json)
        .body("{}");
    let body = refused(r.send().await.unwrap(), 403, "forbidden").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"other\"")
    );

    let body = refused(
        app.request("nowhere")
            .header("content-type", json)
            .body("{}")
            .send()
            .await
            .unwrap(),
        404,
        "unknown_channel",
    )
    .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nowhere")
    );

    let big = format!("{{\"padding\": \"{}\"}}", "x".repeat(100));
    refused(
        app.request("forms")
            .header("content-type", json)
            .body(big.clone())
            .send()
            .await
            .unwrap(),
        413,
        "body_too_large",
    )
    .await;
    // Without a Content-Length (chunked), the limit is enforced while reading.
    let stream = futures_stream(big.into_bytes());
    refused(
        app.request("forms")
            .header("content-type", json)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .unwrap(),
        413,
        "body_too_large",
    )
    .await;

    let body = refused(
        app.request("forms")
            .header("content-type", "text/plain")
            .body("hi")
            .send()
            .await
            .unwrap(),
        415,
        "unsupported_content_type",
    )
    .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("application/json")
    );
    refused(
        app.request("forms").body("{}").send().await.unwrap(),
        415,
        "unsupported_content_type",
    )
    .await;

    let ingress_queue = app.names().ingress_queue();
    assert_eq!(
        app.queue_depth(&ingress_queue).await,
        0,
        "a refused request published something"
    );

    // The same checks pass a good request through, so the count above could have failed.
    app.post_json("forms", &serde_json::json!({"ok": true}))
        .await;
    let xml = app
        .request("xml")
        .header("content-type", "text/xml")
        .body("<a/>")
        .send()
        .await
        .unwrap();
    assert_eq!(
        xml.status(),
        202,
        "a non-JSON channel takes a body that is not JSON"
    );
    hiway_tests::eventually(
        "two messages in the ingress queue",
        Duration::from_secs(5),
        || async { (app.queue_depth(&ingress_queue).await == 2).then_some(()) },
    )
    .await;
    app.shutdown().await;
}

fn futures_stream(
    bytes: Vec<u8>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    let chunks: Vec<_> = bytes.chunks(16).map(|c| Ok(c.to_vec())).collect();
    futures_util::stream::iter(chunks)
}

#[tokio::test]
async fn ingress_answers_503_with_retry_after_while_the_broker_is_down_or_blocking_and_recovers() {
    let node = tokio::task::spawn_blocking(|| RabbitNode::start("hiway-e2e-ingress", 5695))
        .await
        .unwrap();
    let app = TestHiway::spawn_on(&node.url(), ENTRIES, INGRESS_ONLY).await;
    let post = || {
        app.request("forms")
            .header("content-type", "application/json")
            .body("{}")
            .send()
    };
    assert_eq!(post().await.unwrap().status(), 202);

    // A memory alarm makes the broker block publishers.
    node.ctl(&["set_vm_memory_high_watermark", "0"]);
    let r = hiway_tests::eventually("a 503 while blocked", Duration::from_secs(15), || async {
        post().await.ok().filter(|r| r.status() == 503)
    })
    .await;
    assert_eq!(r.headers()["retry-after"], "2");
    refused(r, 503, "broker_unavailable").await;
    node.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    hiway_tests::eventually("a 202 once unblocked", Duration::from_secs(15), || async {
        post().await.ok().filter(|r| r.status() == 202)
    })
    .await;

    // The broker goes away altogether.
    let node = tokio::task::spawn_blocking(move || {
        node.stop();
        node
    })
    .await
    .unwrap();
    let r = post().await.unwrap();
    assert_eq!(r.headers()["retry-after"], "2");
    refused(r, 503, "broker_unavailable").await;
    let ready = app
        .http
        .get(format!("{}/readyz", app.ingress_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "not ready without a broker");

    let node = tokio::task::spawn_blocking(move || {
        node.restart();
        node
    })
    .await
    .unwrap();
    hiway_tests::eventually(
        "a 202 once the broker is back",
        Duration::from_secs(30),
        || async { post().await.ok().filter(|r| r.status() == 202) },
    )
    .await;
    app.shutdown().await;
    drop(node);
}

const IDEMPOTENT: &str = r#"
[channels.forms]
clients = ["source"]
idempotency = { window = "1h" }
[channels.commcare]
clients = ["source"]
idempotency = { window = "1h", json_pointer = "/id" }
[channels.short]
clients = ["source"]
idempotency = { window = "1s" }
[destinations.sink]
url = "http://127.0.0.1:9/"
[routes.r]
channels = ["forms", "commcare", "short"]
destinations = ["sink"]
"#;

async fn post_with_key(app: &TestHiway, channel: &str, key: &str, body: &str) -> (String, bool) {
    let response = app
        .request(channel)
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let replayed = response.headers().get("idempotent-replayed").is_some();
    let answer: serde_json::Value = response.json().await.unwrap();
    (answer["id"].as_str().unwrap().to_owned(), replayed)
}

#[tokio::test]
async fn a_repeated_idempotency_key_gets_the_first_id_back_and_publishes_nothing_again() {
    let app = TestHiway::spawn_with(IDEMPOTENT, INGRESS_ONLY).await;
    let queue = app.names().ingress_queue();

    let (first, replayed_first) = post_with_key(&app, "forms", "visit-42", r#"{"v":1}"#).await;
    let (again, replayed_again) = post_with_key(&app, "forms", "visit-42", r#"{"v":1}"#).await;
    let (other, _) = post_with_key(&app, "forms", "visit-43", r#"{"v":1}"#).await;

    assert_eq!(first, again);
    assert!(
        !replayed_first && replayed_again,
        "only the repeat says it was a replay"
    );
    assert_ne!(first, other, "another key is another message");
    hiway_tests::eventually("two messages published", Duration::from_secs(5), || async {
        (app.queue_depth(&queue).await == 2).then_some(())
    })
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_commcare_form_forwarded_twice_is_accepted_once_by_its_form_id() {
    let app = TestHiway::spawn_with(IDEMPOTENT, INGRESS_ONLY).await;
    let form: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/commcare/form-forward-json.json")).unwrap();

    let first = app.post_json("commcare", &form).await;
    let again = app.post_json("commcare", &form).await;
    let mut edited = form.clone();
    edited["id"] = "another-form-id".into();
    let other = app.post_json("commcare", &edited).await;

    assert_eq!(first, again);
    assert_ne!(first, other);
    let queue = app.names().ingress_queue();
    hiway_tests::eventually("two messages published", Duration::from_secs(5), || async {
        (app.queue_depth(&queue).await == 2).then_some(())
    })
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_key_is_forgotten_after_its_window() {
    let app = TestHiway::spawn_with(IDEMPOTENT, INGRESS_ONLY).await;
    let (first, _) = post_with_key(&app, "short", "k", "{}").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (later, replayed) = post_with_key(&app, "short", "k", "{}").await;
    assert_ne!(first, later);
    assert!(!replayed);
    app.shutdown().await;
}
