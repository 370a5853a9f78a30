//! End-to-end tests of the `fhir` destination kind: transaction Bundles posted to a channel
//! reach the FHIR double through the real broker, and its answers (transaction-response,
//! OperationOutcome, conflicts, transient errors) decide delivered, retried or dead.

use std::time::Duration;

use hiway_tests::doubles::fhir::{FhirServer, Scripted};
use hiway_tests::fhir_validator::validate_r4;
use hiway_tests::{TestHiway, eventually};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// One channel `fhir` routed, untransformed, to one `fhir` destination with short retries.
fn fhir_route(server: &FhirServer, fhir_settings: &str) -> String {
    format!(
        r#"
[channels.fhir]
clients = ["source"]
content_types = ["application/fhir+json", "application/json"]
[destinations.emr]
kind = "fhir"
url = "{}"
retry = {{ schedule = ["100ms", "100ms", "100ms"], jitter = 0.0 }}
{fhir_settings}
[routes.fhir-to-emr]
channels = ["fhir"]
destinations = ["emr"]
"#,
        server.base_url()
    )
}

fn sample_bundle() -> Value {
    serde_json::from_str(include_str!("../fixtures/fhir/transaction-bundle.json")).unwrap()
}

/// Posts a Bundle as FHIR JSON and returns the message id.
async fn post_bundle(app: &TestHiway, bundle: &Value) -> hiway_proto::MessageId {
    let response = app
        .request("fhir")
        .header("content-type", "application/fhir+json")
        .body(serde_json::to_vec(bundle).unwrap())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(status, 202, "ingress answered {status}: {answer}");
    answer["id"].as_str().unwrap().parse().unwrap()
}

async fn dead_letter(app: &TestHiway) -> hiway_audit::dlq::DeadLetterRow {
    eventually("a dead letter", WAIT, || async {
        app.dead_letters("dead").await.into_iter().next()
    })
    .await
}

#[tokio::test]
async fn a_transaction_bundle_is_stored_by_the_fhir_server_and_what_it_received_is_valid_r4() {
    let server = FhirServer::start().await;
    let app = TestHiway::spawn(&fhir_route(&server, "")).await;
    let bundle = sample_bundle();

    let id = post_bundle(&app, &bundle).await;

    let trail = app.wait_for_trail(id, &["delivered"]).await;
    let delivered = trail.iter().find(|e| e.kind == "delivered").unwrap();
    assert_eq!(delivered.status_code, Some(200));
    assert_eq!(delivered.attempt, Some(1));
    let received = server.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!(request.uri.path(), "/");
    assert_eq!(
        request
            .headers
            .get_all("content-type")
            .iter()
            .collect::<Vec<_>>(),
        ["application/fhir+json"],
        "one content type, the FHIR one"
    );
    assert_eq!(request.header("accept"), Some("application/fhir+json"));
    assert_eq!(
        request.header("x-hiway-message-id"),
        Some(id.to_string().as_str())
    );
    assert!(request.header("idempotency-key").is_some());
    let sent: Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(sent, bundle, "no transform: the Bundle arrives as posted");
    tokio::task::spawn_blocking(move || validate_r4(&sent))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the Bundle the server received is not valid R4: {e}"));

    let patients = server.resources("Patient");
    assert_eq!(patients.len(), 1);
    let patient = format!("Patient/{}", patients[0]["id"].as_str().unwrap());
    let observations = server.resources("Observation");
    assert_eq!(observations.len(), 1);
    assert_eq!(
        observations[0]["subject"]["reference"], patient,
        "urn:uuid references are resolved"
    );
    assert_eq!(server.resources("Encounter").len(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn the_same_bundle_posted_twice_creates_no_second_patient() {
    let server = FhirServer::start().await;
    let app = TestHiway::spawn(&fhir_route(&server, "")).await;
    let bundle = sample_bundle();

    let first = post_bundle(&app, &bundle).await;
    app.wait_for_trail(first, &["delivered"]).await;
    // The second as plain JSON: the kind still sends it as FHIR JSON.
    let second = app.post_json("fhir", &bundle).await;
    app.wait_for_trail(second, &["delivered"]).await;

    let received = server.received();
    assert_eq!(received.len(), 2);
    assert_eq!(
        received[1].header("content-type"),
        Some("application/fhir+json")
    );
    assert_eq!(
        server.resources("Patient").len(),
        1,
        "ifNoneExist matched the first patient"
    );
    assert_eq!(
        server.resources("Encounter").len(),
        1,
        "the conditional PUT updated the first encounter"
    );
    // The sample's Observation is a plain POST: the reason docs/kinds/fhir.md says only
    // conditional entries are safe to send twice.
    assert_eq!(server.resources("Observation").len(), 2);
    app.shutdown().await;
}

#[tokio::test]
async fn a_bundle_the_fhir_server_rejects_with_422_goes_dead_with_the_failing_field_in_the_reason()
{
    let server = FhirServer::start().await;
    let app = TestHiway::spawn(&fhir_route(&server, "")).await;
    let mut bundle = sample_bundle();
    bundle["entry"][2]["resource"]
        .as_object_mut()
        .unwrap()
        .remove("status");

    let id = post_bundle(&app, &bundle).await;

    app.wait_for_trail(id, &["attempted", "dead"]).await;
    let letter = dead_letter(&app).await;
    assert_eq!(letter.message_id, Some(id.as_uuid()));
    assert_eq!(letter.last_status_code, Some(422));
    assert!(
        letter.reason.contains("permanent failure")
            && letter
                .reason
                .contains("error required at Bundle.entry[2].resource.status"),
        "{}",
        letter.reason
    );
    assert_eq!(server.received().len(), 1, "a 422 is not retried");
    assert!(
        server.resources("Patient").is_empty(),
        "the transaction is all or nothing"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_version_conflict_is_retried_conflict_retries_times_then_goes_dead() {
    let server = FhirServer::start().await;
    // More conflicts than the sender should try: a fourth attempt would meet a fifth 409 and
    // show up in the count below.
    server.respond_with(&vec![
        Scripted::outcome(
            409,
            "conflict",
            "Encounter/1 changed since it was read"
        );
        5
    ]);
    let app = TestHiway::spawn(&fhir_route(&server, "fhir = { conflict_retries = 2 }")).await;

    let id = post_bundle(&app, &sample_bundle()).await;

    let trail = app
        .wait_for_trail(id, &["attempted", "attempted", "attempted", "dead"])
        .await;
    assert_eq!(server.received().len(), 3, "the first try and 2 retries");
    let attempts: Vec<_> = trail.iter().filter(|e| e.kind == "attempted").collect();
    assert!(
        attempts.iter().all(|a| a.status_code == Some(409)),
        "{attempts:?}"
    );
    assert!(
        attempts[..2]
            .iter()
            .all(|a| !a.detail["retry_in_ms"].is_null()),
        "the first two conflicts are retried: {attempts:?}"
    );
    let letter = dead_letter(&app).await;
    assert!(
        letter.reason.contains("gave up after 2 conflict retries")
            && letter.reason.contains("Encounter/1 changed"),
        "{}",
        letter.reason
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_503_with_a_transient_outcome_is_retried_then_delivered() {
    let server = FhirServer::start().await;
    server.respond_with(&vec![
        Scripted::outcome(
            503,
            "transient",
            "database failover in progress"
        );
        2
    ]);
    let app = TestHiway::spawn(&fhir_route(&server, "")).await;

    let id = post_bundle(&app, &sample_bundle()).await;

    let trail = app
        .wait_for_trail(id, &["attempted", "attempted", "delivered"])
        .await;
    let failed: Vec<_> = trail.iter().filter(|e| e.kind == "attempted").collect();
    assert!(
        failed.iter().all(|a| a.status_code == Some(503)
            && a.detail["error"]
                .as_str()
                .is_some_and(|e| e.contains("error transient: database failover"))),
        "{failed:?}"
    );
    let delivered = trail.iter().find(|e| e.kind == "delivered").unwrap();
    assert_eq!(delivered.attempt, Some(3));
    assert_eq!(server.received().len(), 3);
    assert_eq!(server.resources("Patient").len(), 1);
    assert!(app.dead_letters("dead").await.is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn a_412_for_duplicate_patients_goes_dead_at_once_for_a_human_to_merge() {
    let server = FhirServer::start().await;
    let app = TestHiway::spawn(&fhir_route(&server, "")).await;
    // Two copies of the patient, created by plain POSTs someone else sent.
    let mut duplicates = sample_bundle();
    let mut patient = duplicates["entry"][0].clone();
    patient["request"] = serde_json::json!({ "method": "POST", "url": "Patient" });
    let mut copy = patient.clone();
    copy["fullUrl"] = "urn:uuid:6f1c2a4e-3b7d-4c1e-9a0b-2d5e8f7a1c99".into();
    duplicates["entry"] = serde_json::json!([patient, copy]);
    let seeded = post_bundle(&app, &duplicates).await;
    app.wait_for_trail(seeded, &["delivered"]).await;
    assert_eq!(server.resources("Patient").len(), 2);

    let id = post_bundle(&app, &sample_bundle()).await;

    app.wait_for_trail(id, &["attempted", "dead"]).await;
    let letter = dead_letter(&app).await;
    assert_eq!(letter.last_status_code, Some(412));
    assert!(
        letter
            .reason
            .contains("multiple resources match Patient?identifier="),
        "{}",
        letter.reason
    );
    assert_eq!(server.received().len(), 2, "a 412 is not retried");
    assert!(server.resources("Encounter").is_empty());
    app.shutdown().await;
}
