//! The `commcare-visit-to-openmrs` example: a CommCare "ANC Visit" form becomes an OpenMRS
//! patient, visit, encounter and weight observation through the `openmrs` kind's workflow,
//! run against the OpenMRS double as the example's README describes.

use axum::http::Method;
use hiway_tests::doubles::openmrs::{self, OpenMrs, PASSWORD, Resource, USERNAME};
use hiway_tests::{SOURCE_KEY, TestHiway, example_dir, key_hash};
use serde_json::Value;

const EXAMPLE: &str = "commcare-visit-to-openmrs";

fn sample() -> Value {
    let path = example_dir(EXAMPLE).join("samples/visit.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("the sample")).expect("json")
}

/// The uuids the transform derives from the sample's form id, step by step.
struct Uuids {
    patient: String,
    visit: String,
    encounter: String,
    weight: String,
}

fn uuids(form: &Value) -> Uuids {
    let name = format!("commcare-form:{}", form["id"].as_str().expect("form id"));
    let derive = |step: &str| hiway_transform::uuid5(&format!("{name}:{step}"));
    Uuids {
        patient: derive("patient"),
        visit: derive("visit"),
        encounter: derive("encounter"),
        weight: derive("obs:weight_kg"),
    }
}

/// The example as shipped, with the doubles' address and credentials laid over it (the
/// password in the one-string secret form, which replaces the example's `{ env = … }`).
async fn spawn(double: &OpenMrs) -> TestHiway {
    let overrides = format!(
        r#"
[clients.commcare]
api_key_sha256 = "{}"

[destinations.openmrs]
url = "{}"
auth = {{ type = "basic", username = "{USERNAME}", password = "value:{PASSWORD}" }}
retry = {{ schedule = ["100ms"], jitter = 0.0 }}
"#,
        key_hash(SOURCE_KEY),
        double.url()
    );
    TestHiway::spawn_example(&example_dir(EXAMPLE), &overrides).await
}

fn reference(resource: &Value, field: &str) -> String {
    resource[field]["uuid"]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} reference in {resource}"))
        .to_owned()
}

fn lines(double: &OpenMrs, method: &Method) -> Vec<String> {
    double
        .requests()
        .iter()
        .filter(|r| r.method == *method)
        .map(ToString::to_string)
        .collect()
}

#[tokio::test]
async fn the_sample_visit_creates_a_linked_patient_visit_encounter_and_weight_obs_under_the_derived_uuids()
 {
    assert_eq!(USERNAME, "admin", "the example's user name is the double's");
    let double = OpenMrs::start().await;
    let app = spawn(&double).await;
    let form = sample();
    let ids = uuids(&form);

    let id = app.post_json("commcare-forms", &form).await;

    app.wait_for_trail(id, &["delivered"]).await;
    let patient = double
        .find(Resource::Patient, &ids.patient)
        .expect("the patient");
    assert_eq!(
        patient["identifiers"][0]["identifier"], "100008E",
        "{patient}"
    );
    let visit = double.find(Resource::Visit, &ids.visit).expect("the visit");
    assert_eq!(reference(&visit, "patient"), ids.patient);
    let encounter = double
        .find(Resource::Encounter, &ids.encounter)
        .expect("the encounter");
    assert_eq!(reference(&encounter, "patient"), ids.patient);
    assert_eq!(reference(&encounter, "visit"), ids.visit);
    let obs = double
        .find(Resource::Obs, &ids.weight)
        .expect("the weight obs");
    assert_eq!(reference(&obs, "person"), ids.patient);
    assert_eq!(reference(&obs, "encounter"), ids.encounter);
    assert_eq!(obs["value"], 61.5);
    assert_eq!(
        lines(&double, &Method::POST),
        ["POST patient", "POST visit", "POST encounter", "POST obs"]
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_refused_weight_obs_rolls_back_the_encounter_visit_and_patient_in_reverse_order_and_the_form_is_dead()
 {
    let double = OpenMrs::start().await;
    double.fail_next(
        Method::POST,
        Resource::Obs,
        400,
        openmrs::validation_error(&[("value", "error.null", "Cannot be empty or null")]),
    );
    let app = spawn(&double).await;
    let form = sample();
    let ids = uuids(&form);

    let id = app.post_json("commcare-forms", &form).await;

    app.wait_for_trail(id, &["dead"]).await;
    assert_eq!(
        lines(&double, &Method::DELETE),
        [
            format!("DELETE encounter/{}?purge=true", ids.encounter),
            format!("DELETE visit/{}?purge=true", ids.visit),
            format!("DELETE patient/{}?purge=true", ids.patient),
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
            double.stored(resource),
            Vec::<Value>::new(),
            "nothing of the form remains in {resource:?}"
        );
    }
    let dead = app.dead_letters("dead").await;
    assert_eq!(dead.len(), 1);
    let reason = &dead[0].reason;
    assert!(
        reason.contains("step obs[0] failed (POST obs)"),
        "the reason names the obs step: {reason}"
    );
    assert!(
        reason.contains(&format!(
            "rolled back encounter {}, visit {}, patient {}",
            ids.encounter, ids.visit, ids.patient
        )),
        "the reason lists what was rolled back: {reason}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn the_same_form_posted_twice_is_accepted_once_and_creates_nothing_twice() {
    let double = OpenMrs::start().await;
    let app = spawn(&double).await;
    let form = sample();

    let first = app.post_json("commcare-forms", &form).await;
    app.wait_for_trail(first, &["delivered"]).await;
    let second = app.post_json("commcare-forms", &form).await;

    assert_eq!(second, first, "ingress answers the first message's id");
    assert_eq!(
        lines(&double, &Method::POST),
        ["POST patient", "POST visit", "POST encounter", "POST obs"]
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_resend_that_gets_past_ingress_finds_everything_by_uuid_and_creates_nothing_twice() {
    let double = OpenMrs::start().await;
    let app = spawn(&double).await;
    let form = sample();
    let ids = uuids(&form);

    let first = app.post_json("commcare-forms", &form).await;
    app.wait_for_trail(first, &["delivered"]).await;
    // A different Idempotency-Key (say, after the window): a new message for ingress.
    let answer = app
        .request("commcare-forms")
        .header("content-type", "application/json")
        .header("idempotency-key", "resent-after-the-window")
        .body(serde_json::to_vec(&form).expect("json"))
        .send()
        .await
        .expect("post");
    assert_eq!(answer.status(), 202);
    let answer: Value = answer.json().await.expect("json answer");
    let second = answer["id"].as_str().expect("id").parse().expect("id");
    assert_ne!(second, first);
    let trail = app.wait_for_trail(second, &["delivered"]).await;

    let delivered = trail.iter().find(|e| e.kind == "delivered").unwrap();
    assert_eq!(delivered.status_code, Some(200), "the obs already existed");
    assert_eq!(
        lines(&double, &Method::POST),
        ["POST patient", "POST visit", "POST encounter", "POST obs"],
        "the resend posted nothing"
    );
    for (resource, uuid) in [
        (Resource::Patient, &ids.patient),
        (Resource::Visit, &ids.visit),
        (Resource::Encounter, &ids.encounter),
        (Resource::Obs, &ids.weight),
    ] {
        assert_eq!(double.stored(resource).len(), 1, "one {resource:?}");
        assert!(double.find(resource, uuid).is_some());
    }
    app.shutdown().await;
}
