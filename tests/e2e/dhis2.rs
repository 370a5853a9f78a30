//! End-to-end tests of the `dhis2` destination kind against the DHIS2 double: what was
//! imported, what went dead and why, and how asynchronous imports are followed to their end.
//! Routes have no transform: the body posted to the channel is the DHIS2 payload itself.

use std::time::Duration;

use hiway_tests::doubles::dhis2::{Dhis2, PASSWORD, TOKEN, USERNAME};
use hiway_tests::{TestHiway, eventually};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn basic_auth() -> String {
    format!(
        r#"auth = {{ type = "basic", username = "{USERNAME}", password = {{ value = "{PASSWORD}" }} }}"#
    )
}

fn token_auth(token: &str) -> String {
    format!(r#"auth = {{ type = "api-token", token = {{ value = "{token}" }} }}"#)
}

/// One channel `forms` routed to one `dhis2` destination at `path` on the double, with short
/// retry waits and polls so tests run in seconds. `settings` are more destination keys.
fn route_to(dhis2: &Dhis2, path: &str, settings: &str) -> String {
    format!(
        r#"
[channels.forms]
clients = ["source"]
[destinations.dhis2]
kind = "dhis2"
url = "{}"
{settings}
[routes.forms-to-dhis2]
channels = ["forms"]
destinations = ["dhis2"]
"#,
        dhis2.url(path)
    )
}

/// Short waits: two retries, polls every 20 ms for up to 5 s.
fn quick(auth: &str) -> String {
    format!(
        r#"{auth}
retry = {{ schedule = ["100ms", "200ms"] }}
dhis2 = {{ poll_interval = "20ms", poll_timeout = "5s" }}"#
    )
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/fixtures/dhis2/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The sample set with its third data element replaced by one DHIS2 does not know.
fn set_with_unknown_element() -> Value {
    let mut set = fixture("datavalueset.json");
    set["dataValues"][2]["dataElement"] = json!("eY5ehpbEsB7X");
    set
}

fn values_of(dhis2: &Dhis2) -> Vec<(String, String)> {
    let mut values: Vec<(String, String)> = dhis2
        .data_values()
        .into_iter()
        .map(|v| (v.data_element, v.value))
        .collect();
    values.sort();
    values
}

#[tokio::test]
async fn a_data_value_set_is_imported_synchronously_and_its_values_are_in_dhis2() {
    let dhis2 = Dhis2::start().await;
    let app = TestHiway::spawn(&route_to(
        &dhis2,
        "/api/dataValueSets",
        &quick(&basic_auth()),
    ))
    .await;

    let id = app.post_json("forms", &fixture("datavalueset.json")).await;

    let trail = app
        .wait_for_trail(id, &["received", "routed", "delivered"])
        .await;
    let delivered = trail.iter().find(|e| e.kind == "delivered").unwrap();
    assert_eq!(delivered.status_code, Some(200));
    assert_eq!(delivered.attempt, Some(1));
    assert_eq!(
        values_of(&dhis2),
        [
            ("Ix2HsbDMLea".to_owned(), "14".to_owned()),
            ("eY5ehpbEsB7".to_owned(), "16".to_owned()),
            ("f7n9E0hX8qk".to_owned(), "12".to_owned()),
        ]
    );
    let posts = dhis2.received_at("/api/dataValueSets");
    assert_eq!(posts.len(), 1, "one import, no polls");
    assert_eq!(
        posts[0].header("x-hiway-message-id"),
        Some(id.to_string().as_str()),
        "DHIS2 gets the message id to dedupe on"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_set_with_an_unknown_data_element_goes_dead_with_dhis2s_e7610_conflict() {
    let dhis2 = Dhis2::start().await;
    let app = TestHiway::spawn(&route_to(
        &dhis2,
        "/api/dataValueSets",
        &quick(&basic_auth()),
    ))
    .await;

    let id = app.post_json("forms", &set_with_unknown_element()).await;

    app.wait_for_trail(id, &["attempted", "dead"]).await;
    let dead = app.dead_letters("dead").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_status_code, Some(409));
    let reason = &dead[0].reason;
    assert!(reason.starts_with("permanent failure"), "{reason}");
    assert!(
        reason.contains("E7610")
            && reason.contains("Data element not found or not accessible: `eY5ehpbEsB7X`"),
        "{reason}"
    );
    assert_eq!(
        dhis2.received_at("/api/dataValueSets").len(),
        1,
        "a conflict is not retried"
    );
    // DHIS2 kept the two good rows: the dead letter is about the rejected one.
    assert_eq!(dhis2.data_values().len(), 2);
    app.shutdown().await;
}

#[tokio::test]
async fn the_same_set_sent_to_api_37_is_answered_200_yet_goes_dead_with_the_conflict() {
    let dhis2 = Dhis2::start().await;
    let app = TestHiway::spawn(&route_to(
        &dhis2,
        "/api/37/dataValueSets",
        &quick(&basic_auth()),
    ))
    .await;

    let id = app.post_json("forms", &set_with_unknown_element()).await;

    app.wait_for_trail(id, &["attempted", "dead"]).await;
    let dead = app.dead_letters("dead").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_status_code, Some(200), "pre-2.38 answers 200");
    let reason = &dead[0].reason;
    assert!(
        reason.contains("WARNING")
            && reason.contains("Data element not found or not accessible: `eY5ehpbEsB7X`"),
        "{reason}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn an_async_data_value_import_is_followed_through_its_job_polls_to_delivered() {
    let dhis2 = Dhis2::start().await;
    let app = TestHiway::spawn(&route_to(
        &dhis2,
        "/api/dataValueSets?async=true",
        &quick(&basic_auth()),
    ))
    .await;

    let id = app.post_json("forms", &fixture("datavalueset.json")).await;

    app.wait_for_trail(id, &["delivered"]).await;
    let jobs = dhis2.jobs();
    assert_eq!(jobs.len(), 1, "one import job");
    let polls = dhis2.received_at(&format!("/api/system/tasks/DATAVALUE_IMPORT/{}", jobs[0]));
    assert_eq!(
        polls.len(),
        3,
        "two polls answered 'not completed', then the completed one"
    );
    assert!(
        polls.iter().all(|p| p
            .header("authorization")
            .is_some_and(|a| a.starts_with("Basic "))),
        "polls carry the importing user's credentials"
    );
    let summaries = dhis2.received_at(&format!(
        "/api/system/taskSummaries/DATAVALUE_IMPORT/{}",
        jobs[0]
    ));
    assert_eq!(
        summaries.len(),
        1,
        "the summary is read once the job completed"
    );
    assert_eq!(dhis2.data_values().len(), 3);
    app.shutdown().await;
}

#[tokio::test]
async fn an_async_data_value_import_with_a_conflict_goes_dead_with_the_job_summarys_conflict() {
    let dhis2 = Dhis2::start().await;
    let app = TestHiway::spawn(&route_to(
        &dhis2,
        "/api/dataValueSets?async=true",
        &quick(&basic_auth()),
    ))
    .await;

    let id = app.post_json("forms", &set_with_unknown_element()).await;

    app.wait_for_trail(id, &["dead"]).await;
    let dead = app.dead_letters("dead").await;
    assert_eq!(dead.len(), 1);
    let reason = &dead[0].reason;
    assert!(
        reason.contains(&format!("import job {}", dhis2.jobs()[0])) && reason.contains("E7610"),
        "{reason}"
    );
    assert_eq!(dhis2.received_at("/api/dataValueSets").len(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn an_async_tracker_import_is_followed_to_its_report_and_delivered() {
    let dhis2 = Dhis2::start().await;
    let app = TestHiway::spawn(&route_to(&dhis2, "/api/tracker", &quick(&basic_auth()))).await;

    let id = app
        .post_json("forms", &fixture("tracker-events.json"))
        .await;

    let trail = app.wait_for_trail(id, &["delivered"]).await;
    assert!(
        trail.iter().all(|e| e.kind != "attempted"),
        "no failed attempt"
    );
    let events = dhis2.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["event"], "Qz6p3nC0aV1");
    assert_eq!(events[0]["dataValues"][0]["value"], "22");
    let job = &dhis2.jobs()[0];
    assert_eq!(
        dhis2.received_at(&format!("/api/tracker/jobs/{job}")).len(),
        3
    );
    assert_eq!(
        dhis2
            .received_at(&format!("/api/tracker/jobs/{job}/report"))
            .len(),
        1
    );
    app.shutdown().await;
}

#[tokio::test]
async fn an_async_tracker_import_rejected_for_an_unknown_org_unit_goes_dead_with_e1011() {
    let dhis2 = Dhis2::start().await;
    let app = TestHiway::spawn(&route_to(&dhis2, "/api/tracker", &quick(&basic_auth()))).await;
    let mut events = fixture("tracker-events.json");
    events["events"][0]["orgUnit"] = json!("DiszpKrYNg9");

    let id = app.post_json("forms", &events).await;

    app.wait_for_trail(id, &["attempted", "dead"]).await;
    let dead = app.dead_letters("dead").await;
    assert_eq!(dead.len(), 1);
    let reason = &dead[0].reason;
    assert!(
        reason.contains("E1011")
            && reason.contains("Could not find OrganisationUnit: `DiszpKrYNg9`, linked to Event."),
        "{reason}"
    );
    assert_eq!(
        dhis2.received_at("/api/tracker").len(),
        1,
        "a rejected import is not retried"
    );
    assert!(dhis2.events().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn a_tracker_report_dhis2_lost_is_sent_again_and_the_resent_create_counts_as_delivered() {
    let dhis2 = Dhis2::start().await;
    // The first job's report is gone once it completes, as after a DHIS2 restart; its event
    // was imported all the same.
    dhis2.forget_next_reports(1);
    let app = TestHiway::spawn(&route_to(&dhis2, "/api/tracker", &quick(&basic_auth()))).await;

    let id = app
        .post_json("forms", &fixture("tracker-events.json"))
        .await;

    let trail = app.wait_for_trail(id, &["attempted", "delivered"]).await;
    let attempted = trail.iter().find(|e| e.kind == "attempted").unwrap();
    assert_eq!(attempted.status_code, Some(404));
    let error = attempted.detail["error"].as_str().unwrap();
    assert!(error.contains("outcome is unknown"), "{error}");
    assert!(
        !attempted.detail["retry_in_ms"].is_null(),
        "the message is retried"
    );
    let delivered = trail.iter().find(|e| e.kind == "delivered").unwrap();
    assert_eq!(delivered.attempt, Some(2));
    assert_eq!(dhis2.received_at("/api/tracker").len(), 2, "sent again");
    // The second import met the event the first one made (default CREATE: E1030), which is
    // what a re-sent create looks like: delivered, and the event is there once.
    let second_job = &dhis2.jobs()[1];
    let report = reqwest_report(&dhis2, second_job).await;
    assert_eq!(
        report["validationReport"]["errorReports"][0]["errorCode"], "E1030",
        "{report}"
    );
    assert_eq!(dhis2.events().len(), 1);
    assert!(app.dead_letters("dead").await.is_empty());
    app.shutdown().await;
}

/// A job's report as DHIS2 serves it, read by the test itself.
async fn reqwest_report(dhis2: &Dhis2, job: &str) -> Value {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    client
        .get(dhis2.url(&format!("/api/tracker/jobs/{job}/report")))
        .basic_auth(USERNAME, Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_personal_access_token_is_sent_as_apitoken_and_accepted() {
    let dhis2 = Dhis2::start().await;
    let app = TestHiway::spawn(&route_to(
        &dhis2,
        "/api/dataValueSets",
        &quick(&token_auth(TOKEN)),
    ))
    .await;

    let id = app.post_json("forms", &fixture("datavalueset.json")).await;

    app.wait_for_trail(id, &["delivered"]).await;
    let posts = dhis2.received_at("/api/dataValueSets");
    assert_eq!(
        posts[0].header("authorization"),
        Some(format!("ApiToken {TOKEN}").as_str())
    );
    assert_eq!(dhis2.data_values().len(), 3);
    app.shutdown().await;
}

#[tokio::test]
async fn a_refused_token_parks_the_destination_until_dhis2_accepts_it_and_nothing_goes_dead() {
    const NEW_TOKEN: &str = "d2pat_createdLaterByTheAdministrator0123456789abc";
    let dhis2 = Dhis2::start().await;
    let settings = format!(
        "{}\ncircuit = {{ failures = 5, cool_down = \"300ms\" }}",
        quick(&token_auth(NEW_TOKEN))
    );
    let app = TestHiway::spawn(&route_to(&dhis2, "/api/dataValueSets", &settings)).await;
    let names = app.names();
    let queue = names.deliver_queue(&"dhis2".parse().unwrap());

    let id = app.post_json("forms", &fixture("datavalueset.json")).await;

    // The first 401 opens the circuit at once, naming why, and the message waits in its queue
    // with its attempt uncounted; probes meet the same 401 and change nothing.
    let trail = app
        .wait_for_trail(id, &["received", "routed", "attempted", "circuit_opened"])
        .await;
    let opened = trail.iter().find(|e| e.kind == "circuit_opened").unwrap();
    assert_eq!(
        opened.detail["reason"],
        "the destination refuses hiway's credentials (HTTP 401)"
    );
    let refused = trail.iter().find(|e| e.kind == "attempted").unwrap();
    assert_eq!(refused.status_code, Some(401));
    eventually("a few probes were refused", WAIT, || async {
        (dhis2.received().len() >= 3).then_some(())
    })
    .await;
    assert!(app.dead_letters("dead").await.is_empty());
    assert!(dhis2.data_values().is_empty());
    let status = app.hiway(&["status"]).await;
    assert!(
        status.contains(
            "circuit open: the destination refuses hiway's credentials (HTTP 401); a probe every 300ms"
        ),
        "an operator sees why the destination is parked: {status}"
    );
    let trail = app.trail(id).await;
    assert!(trail.iter().all(|e| e.kind != "dead"));
    assert_eq!(
        trail.iter().filter(|e| e.kind == "attempted").count(),
        1,
        "the probes' refusals are logged, not added to the trail"
    );

    // The administrator creates the token hiway was given: the next probe gets through, as
    // the message's first counted attempt.
    dhis2.accept_token(NEW_TOKEN);
    let trail = app.wait_for_trail(id, &["delivered"]).await;
    let delivered = trail.iter().find(|e| e.kind == "delivered").unwrap();
    assert_eq!(delivered.attempt, Some(1));
    assert_eq!(dhis2.data_values().len(), 3);
    assert!(app.dead_letters("dead").await.is_empty());
    assert_eq!(app.queue_depth(&queue).await, 0);
    app.shutdown().await;
}

#[tokio::test]
async fn a_dhis2_answering_503_is_retried_and_the_set_then_imported() {
    let dhis2 = Dhis2::start().await;
    dhis2.fail_next(2);
    let app = TestHiway::spawn(&route_to(
        &dhis2,
        "/api/dataValueSets",
        &quick(&basic_auth()),
    ))
    .await;

    let id = app.post_json("forms", &fixture("datavalueset.json")).await;

    let trail = app
        .wait_for_trail(id, &["attempted", "attempted", "delivered"])
        .await;
    let delivered = trail.iter().find(|e| e.kind == "delivered").unwrap();
    assert_eq!(delivered.attempt, Some(3));
    assert_eq!(dhis2.data_values().len(), 3);
    app.shutdown().await;
}

#[tokio::test]
async fn a_job_that_does_not_complete_within_the_poll_timeout_is_retried_then_dead() {
    let dhis2 = Dhis2::start().await;
    dhis2.set_polls_before_completed(u32::MAX);
    let app = TestHiway::spawn(&route_to(
        &dhis2,
        "/api/dataValueSets?async=true",
        &format!(
            r#"{}
retry = {{ schedule = ["50ms"] }}
dhis2 = {{ poll_interval = "20ms", poll_timeout = "200ms" }}"#,
            basic_auth()
        ),
    ))
    .await;

    let id = app.post_json("forms", &fixture("datavalueset.json")).await;

    app.wait_for_trail(id, &["attempted", "attempted", "dead"])
        .await;
    let dead = app.dead_letters("dead").await;
    assert_eq!(dead.len(), 1);
    let reason = &dead[0].reason;
    assert!(
        reason.starts_with("gave up after 2 attempts") && reason.contains("dhis2.poll_timeout"),
        "{reason}"
    );
    assert_eq!(dhis2.jobs().len(), 2, "each attempt started its own job");
    app.shutdown().await;
}
