//! End-to-end tests of `auth = { type = "primero", … }`: the sender logs in to Primero itself
//! (`POST /api/v2/tokens`), sends the JWT it was given, and logs in again when the token is
//! old or refused, against the Primero double.

use std::time::Duration;

use futures_util::future::join_all;
use hiway_tests::doubles::primero::{PASSWORD, Primero, USERNAME};
use hiway_tests::{TestHiway, eventually};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// One channel routed, untransformed, to Primero's case endpoint, logged in to as `user` with
/// `password`; `auth_settings` adds keys to the `auth` table.
fn config(primero: &Primero, user: &str, password: &str, auth_settings: &str) -> String {
    format!(
        r#"
[channels.cases]
clients = ["source"]
[destinations.primero]
url = "{}"
auth = {{ type = "primero", username = "{user}", password = {{ value = "{password}" }}{auth_settings} }}
concurrency = 8
retry = {{ schedule = ["100ms"], jitter = 0.0 }}
[routes.cases-to-primero]
channels = ["cases"]
destinations = ["primero"]
"#,
        primero.url("/api/v2/cases")
    )
}

fn case(n: usize) -> serde_json::Value {
    json!({ "data": { "name": format!("Case {n}"), "sex": "female", "age": 16 } })
}

#[tokio::test]
async fn the_sender_logs_in_to_primero_once_and_sends_the_token_it_was_given() {
    let primero = Primero::start().await;
    let app = TestHiway::spawn(&config(&primero, USERNAME, PASSWORD, "")).await;

    // Many at once, before any token exists: one login serves them all.
    let cases: Vec<_> = (0..20).map(case).collect();
    let ids = join_all(cases.iter().map(|c| app.post_json("cases", c))).await;
    for id in &ids {
        app.wait_for_trail(*id, &["received", "routed", "delivered"])
            .await;
    }

    assert_eq!(primero.logins(), 1, "one login for every request");
    assert_eq!(primero.refusals(), 0);
    let requests = primero.requests();
    assert_eq!(requests.len(), 20);
    let first = requests[0].authorization.clone().unwrap();
    assert!(
        first.starts_with("Bearer ey"),
        "a JWT as Primero issued it: {first}"
    );
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some(&*first))
    );
    assert!(requests.iter().all(|r| r.status == 200));
    app.shutdown().await;
}

#[tokio::test]
async fn a_token_primero_refuses_is_replaced_by_one_login_and_the_request_repeated() {
    let primero = Primero::start().await;
    let app = TestHiway::spawn(&config(&primero, USERNAME, PASSWORD, "")).await;
    let id = app.post_json("cases", &case(1)).await;
    app.wait_for_trail(id, &["received", "routed", "delivered"])
        .await;
    assert_eq!(primero.logins(), 1);

    // Primero no longer takes the token (it expired, or was revoked) long before hiway's
    // refresh_after (50 minutes by default).
    primero.expire_tokens();
    let id = app.post_json("cases", &case(2)).await;
    let trail = app
        .wait_for_trail(id, &["received", "routed", "delivered"])
        .await;

    assert_eq!(primero.logins(), 2);
    assert_eq!(
        primero.refusals(),
        1,
        "only the first try met the old token"
    );
    assert!(
        trail.iter().all(|e| e.kind != "attempted"),
        "the repeat is part of the same attempt, not a retry: {trail:#?}"
    );
    let requests = primero.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[1].status, 401);
    assert_eq!(requests[2].status, 200);
    assert_eq!(
        requests[1].body, requests[2].body,
        "the same request repeated"
    );
    assert_ne!(requests[1].authorization, requests[2].authorization);
    app.shutdown().await;
}

#[tokio::test]
async fn a_token_is_replaced_before_use_once_it_is_refresh_after_old() {
    let primero = Primero::start().await;
    let app = TestHiway::spawn(&config(
        &primero,
        USERNAME,
        PASSWORD,
        r#", refresh_after = "1s""#,
    ))
    .await;
    let id = app.post_json("cases", &case(1)).await;
    app.wait_for_trail(id, &["received", "routed", "delivered"])
        .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let id = app.post_json("cases", &case(2)).await;
    app.wait_for_trail(id, &["received", "routed", "delivered"])
        .await;

    assert_eq!(primero.logins(), 2);
    assert_eq!(
        primero.refusals(),
        0,
        "the old token was never offered again"
    );
    let requests = primero.requests();
    assert_ne!(requests[0].authorization, requests[1].authorization);
    app.shutdown().await;
}

#[tokio::test]
async fn a_refused_login_parks_the_destination_naming_the_login_and_primeros_words() {
    let primero = Primero::start().await;
    let short_cool_down = config(&primero, USERNAME, "wrong-password", "").replace(
        "concurrency = 8\n",
        "concurrency = 8\ncircuit = { failures = 5, cool_down = \"200ms\" }\n",
    );
    let app = TestHiway::spawn(&short_cool_down).await;
    let id = app.post_json("cases", &case(1)).await;

    // Primero answers the login 401: the credentials are wrong, and no message can get
    // through until an operator fixes them, so the circuit opens and the message waits.
    let trail = app
        .wait_for_trail(id, &["received", "routed", "attempted", "circuit_opened"])
        .await;
    let refused = trail.iter().find(|e| e.kind == "attempted").unwrap();
    assert_eq!(refused.status_code, Some(401));
    let error = refused.detail["error"].as_str().unwrap();
    assert!(
        error.starts_with("credentials refused; not counted as an attempt"),
        "{error}"
    );
    assert!(
        error.contains(&format!(
            "logging in at {} as \"{USERNAME}\"",
            primero.url("/api/v2/tokens")
        )),
        "{error}"
    );
    assert!(error.contains("HTTP 401"), "{error}");
    assert!(error.contains("Invalid User name or password."), "{error}");
    assert!(!error.contains("wrong-password"), "{error}");
    // Each probe logs in again, is refused again, and leaves the message waiting.
    eventually("two probes were refused too", WAIT, || async {
        (primero.logins() >= 3).then_some(())
    })
    .await;
    assert!(app.dead_letters("dead").await.is_empty());
    let queue = app.names().deliver_queue(&"primero".parse().unwrap());
    eventually("the message waits in its queue", WAIT, || async {
        (app.queue_depth(&queue).await == 1).then_some(())
    })
    .await;
    assert!(
        primero.requests().is_empty(),
        "nothing reached the cases without a token"
    );
    app.shutdown().await;
}
