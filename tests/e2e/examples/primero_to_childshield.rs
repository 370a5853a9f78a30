//! The `primero-to-childshield` example: Primero cases to ChildShield with Thai labels, and a
//! "sync failed" PATCH back to Primero when ChildShield refuses a case.

use std::time::Duration;

use hiway_tests::doubles::primero::{
    PASSWORD as PRIMERO_PASSWORD, Primero, USERNAME as PRIMERO_USER,
};
use hiway_tests::{Receiver, SOURCE_KEY, TestHiway, eventually, example_dir, key_hash};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
const CHANNEL: &str = "primero-cases";

/// The example's own sample case, as the README tells an operator to post it.
fn sample_case() -> Value {
    let path = example_dir("primero-to-childshield").join("samples/case.json");
    serde_json::from_slice(&std::fs::read(&path).expect("read the sample case")).expect("json")
}

/// The example with its destinations pointed at the doubles, the client `primero` made to
/// accept the harness's key, and retries shortened.
///
/// The example reads ChildShield's token and Primero's password from environment variables;
/// the override gives them inline in the one-string form, which replaces the example's
/// `{ env = … }` table. Primero is the Primero double: hiway logs in to it as the example
/// says.
/// The bearer token the ChildShield double expects.
const TOKEN: &str = "test-token";

async fn spawn(childshield: &Receiver, primero: &Primero) -> TestHiway {
    TestHiway::spawn_example(
        &example_dir("primero-to-childshield"),
        &format!(
            r#"
[clients.primero]
api_key_sha256 = "{}"

[destinations.childshield]
url = "{}"
auth = {{ type = "bearer", token = "value:{TOKEN}" }}
retry = {{ schedule = ["100ms"], jitter = 0.0 }}

[destinations.primero]
url = "{}"
auth = {{ username = "{PRIMERO_USER}", password = "value:{PRIMERO_PASSWORD}" }}
retry = {{ schedule = ["100ms"], jitter = 0.0 }}
"#,
            key_hash(SOURCE_KEY),
            childshield.url("/api/v1/cases"),
            primero.url("/api/v2/"),
        ),
    )
    .await
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

#[tokio::test]
async fn the_sample_case_reaches_childshield_with_thai_labels_and_its_primero_id() {
    let childshield = Receiver::start().await;
    childshield.set_default(Some((
        201,
        r#"{"case_ref":"b3222e84-a5d7-4692-a643-1ab3d41f17d6"}"#,
    )));
    let primero = Primero::start().await;
    let app = spawn(&childshield, &primero).await;

    let id = app.post_json(CHANNEL, &sample_case()).await;

    let got = childshield.wait_for(1, WAIT).await;
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].uri.path(), "/api/v1/cases");
    assert_eq!(got[0].header("authorization"), Some(&*bearer()));
    assert_eq!(
        got[0].header("idempotency-key"),
        Some(&*format!("{id}:cases-to-childshield:0"))
    );
    let body: Value = serde_json::from_slice(&got[0].body).expect("json body");
    assert_eq!(
        body,
        json!({
            "case_ref": "b3222e84-a5d7-4692-a643-1ab3d41f17d6",
            "source_system": "primero",
            "primero_case_number": "af0f298",
            "registration_date": "2024-03-05",
            "child": {
                "name": "Dao Saelee",
                "sex": "หญิง",
                "age": 13,
                "date_of_birth": "2011-02-14",
                "nationality": ["ไร้สัญชาติ"]
            },
            "risk_level": "สูง",
            // The multi-select, element by element, in Primero's order.
            "risks": [
                "เด็กที่ไม่มีผู้ดูแล",
                "เด็กที่ถูกค้ามนุษย์หรือถูกลักลอบพาเข้าเมือง",
                "เด็กที่ถูกใช้แรงงาน"
            ],
            "caseworker": "somchai.k"
        })
    );

    app.wait_for_trail(id, &["received", "routed", "delivered"])
        .await;
    assert_eq!(primero.requests().len(), 0, "nothing goes back to Primero");
    app.shutdown().await;
}

#[tokio::test]
async fn a_case_not_shared_with_childshield_or_not_open_is_recorded_filtered_and_not_sent() {
    let childshield = Receiver::start().await;
    let primero = Primero::start().await;
    let app = spawn(&childshield, &primero).await;
    let mut not_shared = sample_case();
    not_shared["data"]["share_with_childshield"] = json!(false);
    let mut closed = sample_case();
    closed["data"]["status"] = json!("closed");

    let ids = [
        app.post_json(CHANNEL, &not_shared).await,
        app.post_json(CHANNEL, &closed).await,
    ];

    for id in ids {
        let trail = app.wait_for_trail(id, &["received", "filtered"]).await;
        let filtered = trail.iter().find(|e| e.kind == "filtered").unwrap();
        assert_eq!(filtered.route.as_deref(), Some("cases-to-childshield"));
        assert_eq!(filtered.detail["reason"], "filter");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(childshield.arrived(), 0, "a filtered case is not sent");
    assert_eq!(primero.requests().len(), 0);
    app.shutdown().await;
}

#[tokio::test]
async fn a_case_childshield_refuses_with_422_is_dead_and_primero_gets_one_sync_failed_patch() {
    let childshield = Receiver::start().await;
    childshield.set_default(Some((
        422,
        r#"{"errors":[{"field":"child.date_of_birth","message":"date of birth is in the future"}]}"#,
    )));
    let primero = Primero::start().await;
    let app = spawn(&childshield, &primero).await;

    let id = app.post_json(CHANNEL, &sample_case()).await;

    let got = primero.wait_for(1, WAIT).await;
    assert_eq!(got[0].method, "PATCH");
    assert_eq!(
        got[0].path,
        "/api/v2/cases/b3222e84-a5d7-4692-a643-1ab3d41f17d6"
    );
    // The JWT hiway got by logging in as the example's integration user.
    assert_eq!(primero.logins(), 1);
    assert_eq!(got[0].status, 200, "Primero took the token");
    assert!(
        got[0]
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer ey")),
        "{:?}",
        got[0].authorization
    );
    assert_eq!(
        got[0].idempotency_key.as_deref(),
        Some(&*format!("{id}:sync-failed:0"))
    );
    let body = &got[0].body;
    assert_eq!(body["data"]["childshield_sync_status"], "failed");
    let reason = body["data"]["childshield_sync_error"].as_str().unwrap();
    assert!(
        reason.starts_with("permanent failure: HTTP 422")
            && reason.contains("date of birth is in the future"),
        "{reason}"
    );
    assert_eq!(
        body["data"].as_object().unwrap().len(),
        2,
        "the PATCH carries only the two sync fields, so Primero's merge changes nothing else"
    );

    let trail = app
        .wait_for_trail(
            id,
            &[
                "received",
                "routed",
                "attempted",
                "dead",
                "routed",
                "delivered",
            ],
        )
        .await;
    let kinds: Vec<&str> = trail.iter().map(|e| e.kind.as_str()).collect();
    let mut failure = kinds[2..4].to_vec();
    failure.sort_unstable();
    assert_eq!(
        (kinds[..2].to_vec(), failure, kinds[4..].to_vec()),
        (
            vec!["received", "routed"],
            vec!["attempted", "dead"],
            vec!["routed", "delivered"]
        ),
        "{trail:#?}"
    );
    let dead = trail.iter().find(|e| e.kind == "dead").unwrap();
    assert_eq!(dead.destination.as_deref(), Some("childshield"));
    let delivered = trail.iter().find(|e| e.kind == "delivered").unwrap();
    assert_eq!(delivered.destination.as_deref(), Some("primero"));

    // Exactly one PATCH, and ChildShield was not asked again: a 422 is final.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(primero.requests().len(), 1);
    assert_eq!(childshield.arrived(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn a_case_childshield_already_holds_is_delivered_with_its_409_and_primero_is_not_told() {
    let childshield = Receiver::start().await;
    childshield.set_default(Some((
        409,
        r#"{"errors":[{"field":"case_ref","message":"case already exists"}]}"#,
    )));
    let primero = Primero::start().await;
    let app = spawn(&childshield, &primero).await;

    let id = app.post_json(CHANNEL, &sample_case()).await;

    let trail = app
        .wait_for_trail(id, &["received", "routed", "delivered"])
        .await;
    let delivered = trail.iter().find(|e| e.kind == "delivered").unwrap();
    assert_eq!(delivered.destination.as_deref(), Some("childshield"));
    assert_eq!(
        delivered.status_code,
        Some(409),
        "the trail keeps the status ChildShield gave"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let trail = app.trail(id).await;
    let mut kinds: Vec<&str> = trail.iter().map(|e| e.kind.as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        ["delivered", "received", "routed"],
        "no failed attempt, nothing dead, no on-dead route: {trail:#?}"
    );
    assert!(app.dead_letters("dead").await.is_empty());
    assert_eq!(
        childshield.arrived(),
        1,
        "a delivered case is not sent again"
    );
    assert_eq!(
        primero.requests().len(),
        0,
        "Primero is not told the sync failed"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_case_with_a_code_missing_from_the_labels_is_dead_naming_the_code_and_is_not_sent() {
    let childshield = Receiver::start().await;
    let primero = Primero::start().await;
    let app = spawn(&childshield, &primero).await;
    let mut case = sample_case();
    case["data"]["protection_concerns"] = json!(["unaccompanied", "forced_marriage"]);

    let id = app.post_json(CHANNEL, &case).await;

    let dead = eventually("the case's dead letter", WAIT, || async {
        let dead = app.dead_letters("dead").await;
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(
        dead[0].message_id.map(|m| m.to_string()),
        Some(id.to_string())
    );
    assert!(
        dead[0]
            .reason
            .contains("routes.cases-to-childshield.transform failed")
            && dead[0]
                .reason
                .contains("no Thai label for protection_concerns code forced_marriage"),
        "{}",
        dead[0].reason
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(childshield.arrived(), 0);
    assert_eq!(
        primero.requests().len(),
        0,
        "only copies that died at ChildShield are reported to Primero"
    );
    app.shutdown().await;
}
