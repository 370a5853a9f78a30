//! The `referral-to-fhir` example: a CHW referral form becomes a FHIR R4 transaction Bundle
//! (conditional Patient, upserted Encounter and Observation) on the FHIR double, as
//! `config/examples/referral-to-fhir/README.md` describes.

use std::time::Duration;

use hiway_tests::doubles::fhir::FhirServer;
use hiway_tests::fhir_validator::validate_r4;
use hiway_tests::{TestHiway, eventually};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn sample() -> Value {
    serde_json::from_str(include_str!(
        "../../../config/examples/referral-to-fhir/samples/referral.json"
    ))
    .unwrap()
}

async fn spawn(server: &FhirServer) -> TestHiway {
    let overrides = format!(
        r#"
[clients.cht]
api_key_sha256 = "{}"

[destinations.fhir]
url = "{}"
retry = {{ schedule = ["100ms"], jitter = 0.0 }}
"#,
        hiway_tests::key_hash(hiway_tests::SOURCE_KEY),
        server.base_url()
    );
    TestHiway::spawn_example(&hiway_tests::example_dir("referral-to-fhir"), &overrides).await
}

fn reference(resource: &Value) -> String {
    format!(
        "{}/{}",
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    )
}

#[tokio::test]
async fn the_sample_referral_arrives_as_a_valid_r4_transaction_of_a_linked_patient_encounter_and_observation()
 {
    let server = FhirServer::start().await;
    let app = spawn(&server).await;

    let id = app.post_json("referrals", &sample()).await;
    app.wait_for_trail(id, &["delivered"]).await;

    let received = server.received();
    assert_eq!(received.len(), 1);
    let bundle: Value = serde_json::from_slice(&received[0].body).unwrap();
    assert_eq!(bundle["type"], "transaction");
    let sent = bundle.clone();
    tokio::task::spawn_blocking(move || validate_r4(&sent))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the Bundle the server received is not valid R4: {e}"));
    let entries = bundle["entry"].as_array().unwrap();
    assert_eq!(
        entries[0]["request"]["ifNoneExist"],
        "identifier=urn:example:cht:community-register|HH-1203-04"
    );
    assert!(
        entries
            .iter()
            .all(|e| e["fullUrl"].as_str().unwrap().starts_with("urn:uuid:"))
    );

    let patients = server.resources("Patient");
    let encounters = server.resources("Encounter");
    let observations = server.resources("Observation");
    assert_eq!(
        (patients.len(), encounters.len(), observations.len()),
        (1, 1, 1)
    );
    let (patient, encounter, observation) = (&patients[0], &encounters[0], &observations[0]);
    assert_eq!(patient["identifier"][0]["value"], "HH-1203-04");
    assert_eq!(patient["gender"], "male");
    assert_eq!(encounter["subject"]["reference"], reference(patient));
    assert_eq!(encounter["class"]["code"], "HH");
    assert_eq!(
        encounter["reasonCode"][0]["coding"][0]["code"], "R50.9",
        "the reason code went through lookups/reasons.csv"
    );
    assert_eq!(observation["subject"]["reference"], reference(patient));
    assert_eq!(observation["encounter"]["reference"], reference(encounter));
    assert_eq!(observation["code"]["coding"][0]["code"], "8310-5");
    assert_eq!(observation["valueQuantity"]["code"], "Cel");
    assert_eq!(observation["valueQuantity"]["value"], 39.2);
    app.shutdown().await;
}

#[tokio::test]
async fn the_same_referral_posted_twice_leaves_one_patient_one_encounter_and_one_observation() {
    let server = FhirServer::start().await;
    let app = spawn(&server).await;

    let first = app.post_json("referrals", &sample()).await;
    app.wait_for_trail(first, &["delivered"]).await;
    let second = app.post_json("referrals", &sample()).await;
    app.wait_for_trail(second, &["delivered"]).await;

    assert_eq!(server.received().len(), 2);
    let first_body: Value = serde_json::from_slice(&server.received()[0].body).unwrap();
    let second_body: Value = serde_json::from_slice(&server.received()[1].body).unwrap();
    assert_eq!(
        first_body, second_body,
        "uuid5 fullUrls: the same referral makes the same Bundle"
    );
    assert_eq!(
        server.resources("Patient").len(),
        1,
        "ifNoneExist found the first patient"
    );
    assert_eq!(
        server.resources("Encounter").len(),
        1,
        "the conditional PUT updated the first encounter"
    );
    assert_eq!(
        server.resources("Observation").len(),
        1,
        "the conditional PUT updated the first observation"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_referral_with_an_unknown_reason_code_goes_dead_for_the_route_naming_the_code() {
    let server = FhirServer::start().await;
    let app = spawn(&server).await;
    let mut referral = sample();
    referral["reason"] = "snakebite".into();

    let id = app.post_json("referrals", &referral).await;

    let dead = eventually("the referral's dead letter", WAIT, || async {
        let dead = app.dead_letters("dead").await;
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].message_id.map(|m| m.to_string()),
        Some(id.to_string())
    );
    assert_eq!(dead[0].dead_by.as_deref(), Some("transformer"));
    assert!(
        dead[0]
            .reason
            .contains("routes.referrals-to-fhir.transform failed")
            && dead[0]
                .reason
                .contains("unknown referral reason code snakebite"),
        "{}",
        dead[0].reason
    );
    assert!(server.received().is_empty(), "nothing reached the server");
    app.shutdown().await;
}

#[tokio::test]
async fn a_form_that_is_not_a_referral_is_filtered_and_never_reaches_the_server() {
    let server = FhirServer::start().await;
    let app = spawn(&server).await;
    let mut form = sample();
    form["type"] = "household_registration".into();

    let id = app.post_json("referrals", &form).await;

    app.wait_for_trail(id, &["filtered"]).await;
    assert!(server.received().is_empty());
    app.shutdown().await;
}
