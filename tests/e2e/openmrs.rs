//! End-to-end tests of the `openmrs` destination kind: a workflow document posted to a channel
//! becomes a patient, a visit, an encounter and observations in the OpenMRS double, each
//! created once under the uuid the document chose, or rolled back when OpenMRS refuses a step.
//! Routes have no transform: the posted body is the workflow document.

use std::time::Duration;

use axum::http::Method;
use hiway_tests::doubles::openmrs::{OpenMrs, PASSWORD, Request, Resource, USERNAME};
use hiway_tests::{TestHiway, eventually};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

const PATIENT: &str = "3f0c7a52-5a8e-4a0e-9d2b-7c1e0a9b6d11";
const VISIT: &str = "c4e1b3a0-1d0f-4c55-8f0e-5b2a9d7e3f21";
const ENCOUNTER: &str = "e7d2c1f0-8a3b-4b9e-9c1d-2f4a6b8c0d13";
const OBS: [&str; 2] = [
    "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
    "1b2c3d4e-5f6a-4b7c-9d8e-0f1a2b3c4d5e",
];

/// One channel routed, untransformed, to an `openmrs` destination at the double, with a short
/// retry schedule (three attempts in all).
fn config(double: &OpenMrs) -> String {
    config_with(double, "")
}

/// The same, with more settings for the destination.
fn config_with(double: &OpenMrs, destination_settings: &str) -> String {
    format!(
        r#"
[channels.visits]
clients = ["source"]
[destinations.emr]
kind = "openmrs"
url = "{}"
auth = {{ type = "basic", username = "{USERNAME}", password = {{ value = "{PASSWORD}" }} }}
retry = {{ schedule = ["100ms", "100ms"], jitter = 0.0 }}
{destination_settings}
[routes.visits-to-emr]
channels = ["visits"]
destinations = ["emr"]
"#,
        double.url()
    )
}

fn sample(name: &str) -> Value {
    let path = format!("{}/fixtures/openmrs/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// A workflow made of the samples: the sample patient, a visit, an encounter (its nested obs
/// left out) and two weight observations, each with its own uuid. The references between
/// them are left for hiway to fill in.
fn workflow() -> Value {
    let mut visit = sample("visit-create.json");
    visit["uuid"] = json!(VISIT);
    visit.as_object_mut().unwrap().remove("patient");
    let mut encounter = sample("encounter-create.json");
    encounter["uuid"] = json!(ENCOUNTER);
    for field in ["patient", "visit", "obs"] {
        encounter.as_object_mut().unwrap().remove(field);
    }
    let obs: Vec<Value> = OBS
        .iter()
        .map(|uuid| {
            let mut obs = sample("obs-create.json");
            obs["uuid"] = json!(uuid);
            for field in ["person", "encounter"] {
                obs.as_object_mut().unwrap().remove(field);
            }
            obs
        })
        .collect();
    json!({
        "patient": sample("patient-create.json"),
        "visit": visit,
        "encounter": encounter,
        "obs": obs,
    })
}

fn lines(requests: &[Request], method: &Method) -> Vec<String> {
    requests
        .iter()
        .filter(|r| r.method == *method)
        .map(ToString::to_string)
        .collect()
}

fn reference(resource: &Value, field: &str) -> String {
    resource[field]["uuid"]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} reference in {resource}"))
        .to_owned()
}

#[tokio::test]
async fn a_delivered_workflow_creates_the_patient_visit_encounter_and_observations_under_hiways_uuids()
 {
    let openmrs = OpenMrs::start().await;
    let app = TestHiway::spawn(&config(&openmrs)).await;

    let id = app.post_json("visits", &workflow()).await;

    let trail = app.wait_for_trail(id, &["delivered"]).await;
    let delivered = trail.iter().find(|e| e.kind == "delivered").unwrap();
    assert_eq!(delivered.status_code, Some(201), "the last obs was created");
    assert_eq!(delivered.attempt, Some(1));
    let requests = openmrs.requests();
    assert_eq!(
        lines(&requests, &Method::POST),
        [
            "POST patient",
            "POST visit",
            "POST encounter",
            "POST obs",
            "POST obs"
        ],
        "one create per resource, in order"
    );
    assert!(
        requests
            .iter()
            .all(|r| r.authorized && r.message_id.as_deref() == Some(id.to_string().as_str())),
        "every request carries the credentials and the message id"
    );
    assert!(openmrs.find(Resource::Patient, PATIENT).is_some());
    let visit = openmrs.find(Resource::Visit, VISIT).expect("the visit");
    assert_eq!(reference(&visit, "patient"), PATIENT);
    let encounter = openmrs
        .find(Resource::Encounter, ENCOUNTER)
        .expect("the encounter");
    assert_eq!(reference(&encounter, "patient"), PATIENT);
    assert_eq!(reference(&encounter, "visit"), VISIT);
    for uuid in OBS {
        let obs = openmrs.find(Resource::Obs, uuid).expect("each obs");
        assert_eq!(reference(&obs, "person"), PATIENT);
        assert_eq!(reference(&obs, "encounter"), ENCOUNTER);
        assert_eq!(obs["value"], 61.5);
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_patient_already_known_by_identifier_is_reused_not_duplicated() {
    let openmrs = OpenMrs::start().await;
    // Registered earlier by someone else, under a uuid hiway never chose.
    let mut known = sample("patient-create.json");
    known["uuid"] = json!("9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a");
    let known = openmrs.add_patient(known);
    let app = TestHiway::spawn(&config(&openmrs)).await;

    let id = app.post_json("visits", &workflow()).await;

    app.wait_for_trail(id, &["delivered"]).await;
    let requests = openmrs.requests();
    assert_eq!(
        requests[0].to_string(),
        "GET patient?identifier=100008E",
        "the patient is looked up by its first identifier"
    );
    assert!(
        !requests
            .iter()
            .any(|r| r.is(&Method::POST, Resource::Patient)),
        "no patient is created: {:?}",
        lines(&requests, &Method::POST)
    );
    let patients = openmrs.stored(Resource::Patient);
    assert_eq!(patients.len(), 1, "still one patient");
    assert_eq!(patients[0]["uuid"], known);
    let visit = openmrs.find(Resource::Visit, VISIT).expect("the visit");
    assert_eq!(reference(&visit, "patient"), known);
    let encounter = openmrs
        .find(Resource::Encounter, ENCOUNTER)
        .expect("the encounter");
    assert_eq!(reference(&encounter, "patient"), known);
    for uuid in OBS {
        let obs = openmrs.find(Resource::Obs, uuid).expect("each obs");
        assert_eq!(reference(&obs, "person"), known);
    }
    app.shutdown().await;
}

#[tokio::test]
async fn an_obs_rejected_with_400_rolls_back_everything_created_in_reverse_order_and_the_message_is_dead()
 {
    let openmrs = OpenMrs::start().await;
    let app = TestHiway::spawn(&config(&openmrs)).await;
    let mut document = workflow();
    // The second observation has no value: OpenMRS's validation refuses it.
    document["obs"][1].as_object_mut().unwrap().remove("value");

    let id = app.post_json("visits", &document).await;

    app.wait_for_trail(id, &["attempted", "dead"]).await;
    let dead = app.dead_letters("dead").await;
    assert_eq!(dead.len(), 1);
    let letter = &dead[0];
    assert_eq!(letter.last_status_code, Some(400));
    assert_eq!(
        letter.attempts.as_array().unwrap().len(),
        1,
        "a refusal is not retried"
    );
    for expected in [
        "step obs[1] failed (POST obs)",
        "Invalid Submission",
        "fieldErrors: value",
        &format!(
            "rolled back obs[0] {}, encounter {ENCOUNTER}, visit {VISIT}, patient {PATIENT}",
            OBS[0]
        ),
    ] {
        assert!(
            letter.reason.contains(expected),
            "the reason should contain {expected:?}: {}",
            letter.reason
        );
    }
    assert_eq!(
        lines(&openmrs.requests(), &Method::DELETE),
        [
            format!("DELETE obs/{}?purge=true", OBS[0]),
            format!("DELETE encounter/{ENCOUNTER}?purge=true"),
            format!("DELETE visit/{VISIT}?purge=true"),
            format!("DELETE patient/{PATIENT}?purge=true"),
        ],
        "last created, first deleted"
    );
    for resource in [
        Resource::Patient,
        Resource::Visit,
        Resource::Encounter,
        Resource::Obs,
    ] {
        assert_eq!(
            openmrs.stored(resource),
            Vec::<Value>::new(),
            "nothing of the workflow remains in {resource:?}"
        );
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_503_mid_workflow_is_retried_and_the_retry_resumes_without_duplicates() {
    let openmrs = OpenMrs::start().await;
    openmrs.fail_next(
        Method::POST,
        Resource::Encounter,
        503,
        json!({ "error": { "message": "Service Unavailable" } }),
    );
    let app = TestHiway::spawn(&config(&openmrs)).await;

    let id = app.post_json("visits", &workflow()).await;

    let trail = app.wait_for_trail(id, &["attempted", "delivered"]).await;
    let attempted = trail.iter().find(|e| e.kind == "attempted").unwrap();
    assert_eq!(attempted.status_code, Some(503));
    assert_eq!(
        trail
            .iter()
            .find(|e| e.kind == "delivered")
            .unwrap()
            .attempt,
        Some(2)
    );
    let requests = openmrs.requests();
    assert_eq!(
        lines(&requests, &Method::POST),
        [
            "POST patient",
            "POST visit",
            "POST encounter",
            // The retry: patient and visit found by GET, the encounter posted again.
            "POST encounter",
            "POST obs",
            "POST obs",
        ]
    );
    assert!(
        lines(&requests, &Method::DELETE).is_empty(),
        "nothing rolled back"
    );
    for (resource, count) in [
        (Resource::Patient, 1),
        (Resource::Visit, 1),
        (Resource::Encounter, 1),
        (Resource::Obs, 2),
    ] {
        assert_eq!(
            openmrs.stored(resource).len(),
            count,
            "{resource:?} created exactly as often as the workflow has it"
        );
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_500_on_every_attempt_is_rolled_back_before_the_message_goes_dead() {
    let openmrs = OpenMrs::start().await;
    // OpenMRS's 500 is often a business rule: it comes back on every attempt.
    let rule = json!({ "error": { "message": "Encounter datetime should be between the visit start and stop dates" } });
    for _ in 0..3 {
        openmrs.fail_next(Method::POST, Resource::Encounter, 500, rule.clone());
    }
    let app = TestHiway::spawn(&config(&openmrs)).await;

    let id = app.post_json("visits", &workflow()).await;

    app.wait_for_trail(id, &["attempted", "attempted", "attempted", "dead"])
        .await;
    let dead = eventually("the dead letter", WAIT, || async {
        app.dead_letters("dead").await.pop()
    })
    .await;
    assert!(
        dead.reason.starts_with("gave up after 3 attempts"),
        "{}",
        dead.reason
    );
    assert!(
        dead.reason.contains(&format!(
            "last attempt, so rolled back visit {VISIT}, patient {PATIENT}"
        )),
        "{}",
        dead.reason
    );
    assert_eq!(
        lines(&openmrs.requests(), &Method::DELETE),
        [
            format!("DELETE visit/{VISIT}?purge=true"),
            format!("DELETE patient/{PATIENT}?purge=true"),
        ],
        "the two earlier attempts rolled nothing back"
    );
    assert!(openmrs.stored(Resource::Patient).is_empty());
    assert!(openmrs.stored(Resource::Visit).is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn without_purge_on_rollback_a_rejected_workflow_is_voided_and_sending_it_again_stops_at_the_voided_patient()
 {
    let openmrs = OpenMrs::start().await;
    let app = TestHiway::spawn(&config_with(
        &openmrs,
        "openmrs = { purge_on_rollback = false }",
    ))
    .await;
    let mut document = workflow();
    document["visit"]
        .as_object_mut()
        .unwrap()
        .remove("visitType");

    let id = app.post_json("visits", &document).await;

    app.wait_for_trail(id, &["attempted", "dead"]).await;
    assert_eq!(
        lines(&openmrs.requests(), &Method::DELETE),
        [format!("DELETE patient/{PATIENT}")],
        "voided, not purged"
    );
    let patient = openmrs
        .find(Resource::Patient, PATIENT)
        .expect("the voided patient");
    assert_eq!(patient["voided"], true);

    // Sent again as it is (a replay would be the same), the workflow finds its patient's
    // uuid taken by a voided patient: dead again, with a reason that says what to do.
    let again = app.post_json("visits", &document).await;
    app.wait_for_trail(again, &["attempted", "dead"]).await;
    let dead = eventually("the second message's dead letter", WAIT, || async {
        app.dead_letters("dead")
            .await
            .into_iter()
            .find(|d| d.message_id == Some(again.as_uuid()))
    })
    .await;
    assert!(
        dead.reason.contains("step patient failed") && dead.reason.contains("is voided"),
        "{}",
        dead.reason
    );
    assert!(openmrs.stored(Resource::Visit).is_empty());
    app.shutdown().await;
}
