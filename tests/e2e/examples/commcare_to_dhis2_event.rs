//! `config/examples/commcare-to-dhis2-event`: CommCare ANC visit forms become DHIS2 tracker
//! events, through a lookup table, against the DHIS2 double.

use std::time::Duration;

use hiway_tests::doubles::dhis2::{Dhis2, TOKEN};
use hiway_tests::{SOURCE_KEY, TestHiway, eventually, example_dir, key_hash};
use serde_json::Value;

const EXAMPLE: &str = "commcare-to-dhis2-event";

fn sample() -> Value {
    let path = example_dir(EXAMPLE).join("samples/anc-visit.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

async fn spawn(dhis2: &Dhis2) -> TestHiway {
    TestHiway::spawn_example(
        &example_dir(EXAMPLE),
        &format!(
            r#"
[clients.commcare]
api_key_sha256 = "{}"
[destinations.dhis2-tracker]
url = "{}"
auth = {{ type = "api-token", token = "value:{TOKEN}" }}
retry = {{ schedule = ["100ms"], jitter = 0.0 }}
"#,
            key_hash(SOURCE_KEY),
            dhis2.url("/api/tracker?async=false&importStrategy=CREATE_AND_UPDATE")
        ),
    )
    .await
}

#[tokio::test]
async fn an_anc_visit_form_becomes_one_dhis2_event_in_the_facility_the_lookup_names() {
    let dhis2 = Dhis2::start().await;
    let app = spawn(&dhis2).await;

    let form = sample();
    let id = app.post_json("commcare-forms", &form).await;
    app.wait_for_trail(id, &["received", "routed", "delivered"])
        .await;

    let events = dhis2.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    assert_eq!(
        event["orgUnit"], "DiszpKrYNg8",
        "FAC-001 through lookups/orgunits.csv"
    );
    assert_eq!(event["program"], "lxAQ7Zs9VYR");
    assert_eq!(event["occurredAt"], "2024-03-05T00:00:00.000");
    assert_eq!(
        event["event"],
        hiway_transform::dhis2_uid(form["id"].as_str().unwrap())
    );
    let values: Vec<(String, String)> = event["dataValues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["dataElement"].as_str().unwrap().to_owned(),
                v["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        values.contains(&("qrur9Dvnyt5".into(), "61.5".into())),
        "{values:?}"
    );
    assert!(
        values.contains(&("oZg33kd9taw".into(), "NONE".into())),
        "{values:?}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_form_from_an_unmapped_facility_goes_dead_naming_it_and_other_forms_are_filtered() {
    let dhis2 = Dhis2::start().await;
    let app = spawn(&dhis2).await;

    let mut form = sample();
    form["id"] = "7d1c0e55-0000-4000-8000-000000000009".into();
    form["form"]["facility_code"] = "FAC-009".into();
    let unmapped = app.post_json("commcare-forms", &form).await;

    let mut registration = sample();
    registration["id"] = "7d1c0e55-0000-4000-8000-00000000000a".into();
    registration["form"]["@name"] = "Registration".into();
    let other = app.post_json("commcare-forms", &registration).await;

    let dead = eventually(
        "the unmapped form's dead letter",
        Duration::from_secs(20),
        || async {
            let dead = app.dead_letters("dead").await;
            (!dead.is_empty()).then_some(dead)
        },
    )
    .await;
    assert_eq!(
        dead[0].message_id.map(|m| m.to_string()),
        Some(unmapped.to_string())
    );
    assert!(
        dead[0]
            .reason
            .contains(r#"no DHIS2 org unit for facility "FAC-009" (lookups/orgunits.csv)"#),
        "{}",
        dead[0].reason
    );
    app.wait_for_trail(other, &["received", "filtered"]).await;
    assert!(dhis2.events().is_empty(), "nothing reached DHIS2");
    app.shutdown().await;
}
