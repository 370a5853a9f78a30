//! `config/examples/commcare-monthly-report`: a CommCare monthly summary becomes one DHIS2
//! data value set per facility, each report column in its own category option combination,
//! imported asynchronously, against the DHIS2 double.

use std::time::Duration;

use hiway_tests::doubles::dhis2::{DEFAULT_COMBO, Dhis2, Metadata, Options, TOKEN};
use hiway_tests::{SOURCE_KEY, TestHiway, eventually, example_dir, key_hash};
use serde_json::{Value, json};

const EXAMPLE: &str = "commcare-monthly-report";
/// The category option combos of the "Fixed/Outreach" category combo in `lookups/columns.csv`.
const FIXED: &str = "PT59n8BQbqM";
const OUTREACH: &str = "pq2XI5kz2BY";
/// ANC 1st visit, ANC 4th or more visits, LLITN given (`lookups/columns.csv`).
const ANC1: &str = "fbfJHSPpUQD";
const ANC4: &str = "hfdmMSPBgLG";
const LLITN: &str = "Ix2HsbDMLea";
/// FAC-001 and FAC-002 (`lookups/orgunits.csv`).
const NGELEHUN: &str = "DiszpKrYNg8";
const ADONKIA: &str = "Rp268JB6Ne4";

fn sample() -> Value {
    let path = example_dir(EXAMPLE).join("samples/monthly-summary.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A DHIS2 that knows the example's data elements, facilities and combos, less `missing`.
async fn dhis2_without(missing: &[&str]) -> Dhis2 {
    let mut metadata = Metadata::default();
    for uid in [ANC1, ANC4, LLITN] {
        metadata.data_elements.insert(uid.into());
    }
    for uid in [NGELEHUN, ADONKIA] {
        metadata.org_units.insert(uid.into());
    }
    for uid in [FIXED, OUTREACH, DEFAULT_COMBO] {
        metadata.category_option_combos.insert(uid.into());
    }
    for uid in missing {
        metadata.category_option_combos.remove(*uid);
    }
    Dhis2::start_with(Options {
        metadata,
        ..Options::default()
    })
    .await
}

async fn spawn(dhis2: &Dhis2) -> TestHiway {
    TestHiway::spawn_example(
        &example_dir(EXAMPLE),
        &format!(
            r#"
[clients.commcare]
api_key_sha256 = "{}"
[destinations.dhis2-data-values]
url = "{}"
auth = {{ type = "api-token", token = "value:{TOKEN}" }}
retry = {{ schedule = ["100ms"], jitter = 0.0 }}
[destinations.dhis2-data-values.dhis2]
poll_interval = "50ms"
"#,
            key_hash(SOURCE_KEY),
            dhis2.url("/api/dataValueSets?async=true")
        ),
    )
    .await
}

/// What DHIS2 holds, as (org unit, data element, combo, period, value), sorted.
fn stored(dhis2: &Dhis2) -> Vec<(String, String, String, String, String)> {
    let mut values: Vec<_> = dhis2
        .data_values()
        .into_iter()
        .map(|v| {
            assert_eq!(v.attribute_option_combo, DEFAULT_COMBO);
            (
                v.org_unit,
                v.data_element,
                v.category_option_combo,
                v.period,
                v.value,
            )
        })
        .collect();
    values.sort();
    values
}

fn row(ou: &str, de: &str, coc: &str, value: &str) -> (String, String, String, String, String) {
    (
        ou.into(),
        de.into(),
        coc.into(),
        "202402".into(),
        value.into(),
    )
}

#[tokio::test]
async fn a_monthly_summary_becomes_one_data_value_set_per_facility_with_each_column_in_its_combo() {
    let dhis2 = dhis2_without(&[]).await;
    let app = spawn(&dhis2).await;

    let id = app.post_json("commcare-reports", &sample()).await;
    app.wait_for_trail(id, &["received", "routed", "delivered", "delivered"])
        .await;

    let mut expected = vec![
        row(NGELEHUN, ANC1, FIXED, "23"),
        row(NGELEHUN, ANC1, OUTREACH, "7"),
        row(NGELEHUN, ANC4, FIXED, "11"),
        row(NGELEHUN, ANC4, OUTREACH, "2"),
        row(NGELEHUN, LLITN, DEFAULT_COMBO, "19"),
        row(ADONKIA, ANC1, FIXED, "9"),
        row(ADONKIA, ANC1, OUTREACH, "0"),
        row(ADONKIA, ANC4, FIXED, "4"),
        // FAC-002's anc4_outreach was left empty: no value, not a zero.
        row(ADONKIA, LLITN, DEFAULT_COMBO, "9"),
    ];
    expected.sort();
    assert_eq!(stored(&dhis2), expected);

    let posts = dhis2.received_at("/api/dataValueSets");
    assert_eq!(posts.len(), 2, "one data value set per facility");
    let sets: Vec<Value> = posts
        .iter()
        .map(|p| serde_json::from_slice(&p.body).unwrap())
        .collect();
    for set in &sets {
        assert_eq!(set["dataSet"], "pBOMPrpg1QX");
        assert_eq!(
            set["completeDate"], "2024-03-02",
            "the day the form was filled"
        );
    }
    assert!(
        sets.iter().all(|s| s["dataValues"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["value"].is_string())),
        "DHIS2 values are strings: {sets:?}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_corrected_report_with_one_facility_updates_that_facilitys_values_in_place() {
    let dhis2 = dhis2_without(&[]).await;
    let app = spawn(&dhis2).await;
    let first = app.post_json("commcare-reports", &sample()).await;
    app.wait_for_trail(first, &["delivered", "delivered"]).await;

    // A repeat group with one entry is an object in CommCare's JSON, not an array.
    let mut correction = sample();
    correction["id"] = json!("b3a1d9e2-4c5f-4a6b-9d7e-00000000c0fe");
    correction["form"]["facility"] = json!({
        "facility_code": "FAC-002",
        "anc1_fixed": "10",
        "anc1_outreach": "0",
        "anc4_fixed": "4",
        "anc4_outreach": "1",
        "llitn_given": "9",
        "notes": "recounted"
    });
    let second = app.post_json("commcare-reports", &correction).await;
    app.wait_for_trail(second, &["received", "routed", "delivered"])
        .await;

    let values = stored(&dhis2);
    assert_eq!(
        values.len(),
        10,
        "updated in place, one value added: {values:?}"
    );
    assert!(
        values.contains(&row(ADONKIA, ANC1, FIXED, "10")),
        "{values:?}"
    );
    assert!(
        values.contains(&row(ADONKIA, ANC4, OUTREACH, "1")),
        "{values:?}"
    );
    assert!(
        values.contains(&row(NGELEHUN, ANC1, FIXED, "23")),
        "the other facility is untouched: {values:?}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_report_naming_an_unmapped_facility_or_holding_a_non_count_goes_dead_and_sends_nothing() {
    let dhis2 = dhis2_without(&[]).await;
    let app = spawn(&dhis2).await;

    let mut unmapped = sample();
    unmapped["id"] = json!("b3a1d9e2-4c5f-4a6b-9d7e-000000000009");
    unmapped["form"]["facility"][1]["facility_code"] = json!("FAC-009");
    let unmapped = app.post_json("commcare-reports", &unmapped).await;

    let mut typo = sample();
    typo["id"] = json!("b3a1d9e2-4c5f-4a6b-9d7e-00000000000a");
    typo["form"]["facility"][0]["anc1_outreach"] = json!("7a");
    let typo = app.post_json("commcare-reports", &typo).await;

    let dead = eventually("both reports dead", Duration::from_secs(20), || async {
        let dead = app.dead_letters("dead").await;
        (dead.len() == 2).then_some(dead)
    })
    .await;
    let reason_of = |id: hiway_proto::MessageId| {
        dead.iter()
            .find(|d| d.message_id.map(|m| m.to_string()) == Some(id.to_string()))
            .map(|d| d.reason.clone())
            .unwrap_or_else(|| panic!("no dead letter for {id}: {dead:?}"))
    };
    let reason = reason_of(unmapped);
    assert!(
        reason.contains(r#"no DHIS2 org unit for facility "FAC-009" (lookups/orgunits.csv)"#),
        "{reason}"
    );
    let reason = reason_of(typo);
    assert!(
        reason.contains(r#"column anc1_outreach of facility "FAC-001" is not a count: "7a""#),
        "{reason}"
    );
    assert!(
        dhis2.received_at("/api/dataValueSets").is_empty(),
        "no facility of a bad report reaches DHIS2"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_combo_dhis2_does_not_know_goes_dead_with_its_e7613_conflict_and_the_other_values_land() {
    // A DHIS2 where the "Outreach" combination was removed from the category combo.
    let dhis2 = dhis2_without(&[OUTREACH]).await;
    let app = spawn(&dhis2).await;

    let id = app.post_json("commcare-reports", &sample()).await;

    app.wait_for_trail(id, &["dead", "dead"]).await;
    let dead = app.dead_letters("dead").await;
    assert_eq!(dead.len(), 2, "each facility's set: {dead:?}");
    for letter in &dead {
        assert!(
            letter.reason.contains("E7613") && letter.reason.contains(OUTREACH),
            "{}",
            letter.reason
        );
    }
    let values = stored(&dhis2);
    assert_eq!(
        values.len(),
        6,
        "the fixed and default combos land: {values:?}"
    );
    assert!(values.iter().all(|v| v.2 != OUTREACH), "{values:?}");
    app.shutdown().await;
}
