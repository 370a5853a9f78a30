//! A DHIS2 double: an HTTP server on port 0 that imports data value sets and tracker payloads
//! against a small set of known metadata and answers with DHIS2's own shapes
//! (`../shared/protocols.md` §2, checked against the samples in `tests/fixtures/dhis2/`).
//!
//! What it serves:
//! - `POST /api/dataValueSets` (JSON only): the 2.38+ `WebMessage` answers, 200 `OK`, 409
//!   `WARNING` with per-row conflicts (E7610 data element, E7613 category option combo, E7612
//!   org unit, E7611 period, E7618 value missing) and `rejectedIndexes`, 409 `ERROR` when the
//!   whole set is refused (E7600 data set, E7603 org unit, E7604 attribute option combo). Under `/api/{NN}/dataValueSets` with `NN` < 38, the bare
//!   `ImportSummary`, always 200. With `async=true`, a `DATAVALUE_IMPORT` job instead, followed
//!   at `/api/system/tasks/DATAVALUE_IMPORT/{id}` and `/api/system/taskSummaries/…/{id}`.
//! - `POST /api/tracker` (flat or nested payloads): asynchronous by default ("Tracker job
//!   added", then `/api/tracker/jobs/{id}` and `/api/tracker/jobs/{id}/report`); with
//!   `async=false` the import report itself, 200 or 409 when its status is `ERROR`.
//!   `importStrategy` is `CREATE` by default (E1002/E1080/E1030 when the object exists),
//!   `UPDATE` or `CREATE_AND_UPDATE`; `atomicMode` is `ALL` by default (one error, nothing
//!   stored) or `OBJECT`.
//! - `GET /api/system/info`.
//!
//! Every request needs the configured basic credentials or `ApiToken <token>`, else 401. Jobs
//! complete after a configurable number of polls; a report can be made to go missing (as after
//! a DHIS2 restart), and the server can answer 503 for a while.
//!
//! Not served: ADX, XML and CSV bodies (415), id schemes other than UIDs, data value
//! `importStrategy` (values are always upserts, DHIS2's default).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};
use tokio_util::sync::DropGuard;

use crate::Received;

/// The user name the double accepts by default (DHIS2's demo user).
pub const USERNAME: &str = "admin";
/// Its password.
pub const PASSWORD: &str = "district";
/// The personal access token the double accepts by default.
pub const TOKEN: &str = "d2pat_hiwayDoubleToken0123456789abcdef0123456789";
/// DHIS2's default category option combo, used when a data value names none.
pub const DEFAULT_COMBO: &str = "HllvX50cXC0";

/// The metadata the double knows; anything else is "not found" the way DHIS2 says it.
#[derive(Clone, Debug)]
pub struct Metadata {
    /// Data element UIDs (aggregate and tracker).
    pub data_elements: BTreeSet<String>,
    /// Organisation unit UIDs.
    pub org_units: BTreeSet<String>,
    /// Data set UIDs.
    pub data_sets: BTreeSet<String>,
    /// Category option combo UIDs, for data values' `categoryOptionCombo` and data value sets'
    /// `attributeOptionCombo` alike.
    pub category_option_combos: BTreeSet<String>,
    /// Program UIDs.
    pub programs: BTreeSet<String>,
    /// Program stage UIDs.
    pub program_stages: BTreeSet<String>,
}

fn set(uids: &[&str]) -> BTreeSet<String> {
    uids.iter().map(|u| (*u).to_owned()).collect()
}

impl Default for Metadata {
    /// The UIDs of the samples (`datavalueset.json`, `tracker-events.json`): the docs' Sierra
    /// Leone walk-through. `DiszpKrYNg9` and `eY5ehpbEsB7X`, which the samples use as unknown
    /// ids, are not in it.
    fn default() -> Self {
        Self {
            data_elements: set(&[
                "f7n9E0hX8qk",
                "Ix2HsbDMLea",
                "eY5ehpbEsB7",
                "qrur9Dvnyt5",
                "oZg33kd9taw",
            ]),
            org_units: set(&["DiszpKrYNg8"]),
            data_sets: set(&["pBOMPrpg1QX"]),
            category_option_combos: set(&[DEFAULT_COMBO, "prWYhmj1HXF"]),
            programs: set(&["lxAQ7Zs9VYR"]),
            program_stages: set(&["dBwrot7S420"]),
        }
    }
}

/// How a double is set up.
#[derive(Clone, Debug)]
pub struct Options {
    /// What it knows.
    pub metadata: Metadata,
    /// The basic-auth user it accepts.
    pub username: String,
    /// That user's password.
    pub password: String,
    /// The personal access token it accepts.
    pub token: String,
    /// How many polls of a job's notifications answer "not completed" before one says
    /// completed.
    pub polls_before_completed: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            metadata: Metadata::default(),
            username: USERNAME.into(),
            password: PASSWORD.into(),
            token: TOKEN.into(),
            polls_before_completed: 2,
        }
    }
}

/// A data value the double holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataValue {
    /// Data element UID.
    pub data_element: String,
    /// Period, as sent.
    pub period: String,
    /// Organisation unit UID.
    pub org_unit: String,
    /// Category option combo UID.
    pub category_option_combo: String,
    /// Attribute option combo UID.
    pub attribute_option_combo: String,
    /// The value, always a string in DHIS2.
    pub value: String,
    /// Its comment.
    pub comment: Option<String>,
}

/// What kind of job, and so where it is polled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JobKind {
    DataValues,
    Tracker,
}

struct Job {
    kind: JobKind,
    polls: u32,
    /// The summary or report; `None` once forgotten (as after a restart).
    result: Option<Value>,
    /// Counts for the completion message.
    message: String,
}

/// (data element, period, org unit, category option combo, attribute option combo): DHIS2's
/// identity of a data value.
type ValueKey = (String, String, String, String, String);

#[derive(Default)]
struct Store {
    received: Vec<Received>,
    data_values: BTreeMap<ValueKey, DataValue>,
    tracked_entities: BTreeMap<String, Value>,
    enrollments: BTreeMap<String, Value>,
    events: BTreeMap<String, Value>,
    jobs: HashMap<String, Job>,
    forget_reports: u32,
    unavailable: u32,
    polls_before_completed: u32,
    next_uid: u64,
    /// Personal access tokens created since the double started ([`Dhis2::accept_token`]).
    more_tokens: Vec<String>,
}

impl Store {
    /// An 11-character DHIS2-style UID (a letter, then ten alphanumerics); sequential, so test
    /// failures are reproducible.
    fn uid(&mut self, prefix: char) -> String {
        self.next_uid += 1;
        format!("{prefix}{:010}", self.next_uid)
    }
}

struct Inner {
    options: Options,
    base: String,
    store: Mutex<Store>,
}

impl Inner {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().expect("dhis2 double lock")
    }
}

/// The double. Dropping it stops the server.
pub struct Dhis2 {
    inner: Arc<Inner>,
    /// Stops the server when the double is dropped.
    _stop: DropGuard,
}

impl Dhis2 {
    /// Starts a double with the default metadata and credentials on a free port.
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    /// Starts a double set up as `options` on a free port.
    pub async fn start_with(options: Options) -> Self {
        let (listener, addr) = super::bind("dhis2", 0).await;
        let store = Store {
            polls_before_completed: options.polls_before_completed,
            ..Store::default()
        };
        let inner = Arc::new(Inner {
            options,
            base: format!("http://{addr}"),
            store: Mutex::new(store),
        });
        // One handler that dispatches on the path itself: every request, routed or not, is
        // recorded and authenticated the same way before anything else.
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let stop = super::serve(listener, app);
        Self { inner, _stop: stop }
    }

    /// The URL of `path` on this double (`/api/dataValueSets`, …).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.inner.base)
    }

    /// Every request received so far, in order.
    pub fn received(&self) -> Vec<Received> {
        self.inner.store().received.clone()
    }

    /// Requests received so far whose path is `path` (query ignored).
    pub fn received_at(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.uri.path() == path)
            .collect()
    }

    /// The data values imported so far.
    pub fn data_values(&self) -> Vec<DataValue> {
        self.inner.store().data_values.values().cloned().collect()
    }

    /// The tracker events imported so far, as sent.
    pub fn events(&self) -> Vec<Value> {
        self.inner.store().events.values().cloned().collect()
    }

    /// The tracked entities imported so far, as sent (without nested enrollments).
    pub fn tracked_entities(&self) -> Vec<Value> {
        self.inner
            .store()
            .tracked_entities
            .values()
            .cloned()
            .collect()
    }

    /// The ids of the jobs started so far.
    pub fn jobs(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.inner.store().jobs.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The next `n` jobs lose their summary or report once they complete, as after a DHIS2
    /// restart: it answers 404.
    pub fn forget_next_reports(&self, n: u32) {
        self.inner.store().forget_reports = n;
    }

    /// The next `n` requests are answered 503, before authentication (a proxy in front of a
    /// DHIS2 that is starting).
    pub fn fail_next(&self, n: u32) {
        self.inner.store().unavailable = n;
    }

    /// Accepts `token` from now on too, as when an administrator creates a personal access
    /// token (`POST /api/apiToken`) with the value hiway was given.
    pub fn accept_token(&self, token: &str) {
        self.inner.store().more_tokens.push(token.to_owned());
    }

    /// How many polls of a job answer "not completed" before one says completed, for jobs
    /// polled from now on.
    pub fn set_polls_before_completed(&self, n: u32) {
        self.inner.store().polls_before_completed = n;
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [("content-type", "application/json;charset=UTF-8")],
        body.to_string(),
    )
        .into_response()
}

/// DHIS2's generic error: `{"httpStatus":"Unauthorized","httpStatusCode":401,"status":"ERROR",…}`.
fn web_message(status: StatusCode, message: &str) -> Response {
    reply(
        status,
        json!({
            "httpStatus": status.canonical_reason().unwrap_or(""),
            "httpStatusCode": status.as_u16(),
            "status": "ERROR",
            "message": message,
        }),
    )
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let unavailable = {
        let mut store = inner.store();
        store.received.push(Received {
            method: method.clone(),
            uri: uri.clone(),
            headers: headers.clone(),
            body: body.clone(),
        });
        let unavailable = store.unavailable > 0;
        store.unavailable = store.unavailable.saturating_sub(1);
        unavailable
    };
    if unavailable {
        return web_message(
            StatusCode::SERVICE_UNAVAILABLE,
            "DHIS2 is starting, try again later",
        );
    }
    let more_tokens = inner.store().more_tokens.clone();
    if !authorised(&inner.options, &more_tokens, &headers) {
        let mut response = web_message(
            StatusCode::UNAUTHORIZED,
            "Account not found or not enabled, or the credentials are wrong",
        );
        response.headers_mut().insert(
            "www-authenticate",
            axum::http::HeaderValue::from_static("Basic realm=\"DHIS2\""),
        );
        return response;
    }
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (Method::GET, ["api", "system", "info"]) => reply(
            StatusCode::OK,
            json!({
                "version": "2.40.3",
                "revision": "b0a7c1e",
                "serverDate": now(),
                "contextPath": inner.base,
            }),
        ),
        (Method::POST, ["api", "dataValueSets"]) => {
            data_value_sets(&inner, None, &query, &headers, &body)
        }
        (Method::POST, ["api", version, "dataValueSets"]) if version.parse::<u32>().is_ok() => {
            data_value_sets(&inner, version.parse().ok(), &query, &headers, &body)
        }
        (Method::POST, ["api", "tracker"]) => tracker(&inner, &query, &headers, &body),
        (Method::POST, ["api", version, "tracker"]) if version.parse::<u32>().is_ok() => {
            tracker(&inner, &query, &headers, &body)
        }
        (Method::GET, ["api", "system", "tasks", job_type, id]) => {
            notifications(&inner, JobKind::DataValues, job_type, id)
        }
        (Method::GET, ["api", "system", "taskSummaries", _, id]) => {
            job_result(&inner, JobKind::DataValues, id)
        }
        (Method::GET, ["api", "tracker", "jobs", id]) => {
            notifications(&inner, JobKind::Tracker, "TRACKER_IMPORT_JOB", id)
        }
        (Method::GET, ["api", "tracker", "jobs", id, "report"]) => {
            job_result(&inner, JobKind::Tracker, id)
        }
        _ => web_message(
            StatusCode::NOT_FOUND,
            &format!("No endpoint {} in this DHIS2 double", uri.path()),
        ),
    }
}

/// Basic with the configured user, or `ApiToken` with the configured token or one created
/// since.
fn authorised(options: &Options, more_tokens: &[String], headers: &HeaderMap) -> bool {
    let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    if let Some(token) = value.strip_prefix("ApiToken ") {
        return token == options.token || more_tokens.iter().any(|t| t == token);
    }
    if let Some(encoded) = value.strip_prefix("Basic ") {
        let expected = format!("{}:{}", options.username, options.password);
        return base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .is_ok_and(|raw| raw == expected.as_bytes());
    }
    false
}

fn now() -> String {
    // chrono through sqlx's re-export: the tests crate has no chrono dependency of its own.
    sqlx::types::chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3f")
        .to_string()
}

/// The JSON body, or the status and message DHIS2 answers instead (415 for another type, 400
/// for bad JSON).
fn json_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, (StatusCode, String)> {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !hiway_config::is_json(content_type) {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content type '{content_type}' not supported by this DHIS2 double"),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("JSON parse error: {e}")))
}

fn flag(query: &HashMap<String, String>, name: &str) -> Option<bool> {
    query.get(name).map(|v| v.eq_ignore_ascii_case("true"))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Data value sets

fn data_value_sets(
    inner: &Inner,
    version: Option<u32>,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let set = match json_body(headers, body) {
        Ok(v) => v,
        Err((status, message)) => return web_message(status, &message),
    };
    let is_async = flag(query, "async").unwrap_or(false);
    let dry_run = flag(query, "dryRun").unwrap_or(false);
    let mut store = inner.store();
    let summary = import_data_values(&inner.options.metadata, &mut store, &set, is_async, dry_run);
    if is_async {
        // Async imports are not affected by the 2.38 change: 200 and a job, whatever follows.
        let id = start_job(&mut store, JobKind::DataValues, summary);
        return reply(
            StatusCode::OK,
            json!({
                "httpStatus": "OK",
                "httpStatusCode": 200,
                "status": "OK",
                "message": "Initiated DATAVALUE_IMPORT",
                "response": {
                    "name": "DATAVALUE_IMPORT",
                    "id": id,
                    "created": now(),
                    "jobType": "DATAVALUE_IMPORT",
                    "relativeNotifierEndpoint": format!("/api/system/tasks/DATAVALUE_IMPORT/{id}"),
                }
            }),
        );
    }
    if version.is_some_and(|v| v < 38) {
        return reply(StatusCode::OK, legacy_summary(&summary));
    }
    let (status, web_status, message) = match summary["status"].as_str() {
        Some("SUCCESS") => (StatusCode::OK, "OK", "Import was successful."),
        Some("WARNING") => (
            StatusCode::CONFLICT,
            "WARNING",
            "One more conflicts encountered, please check import summary.",
        ),
        _ => (
            StatusCode::CONFLICT,
            "ERROR",
            "An error occurred, please check import summary.",
        ),
    };
    reply(
        status,
        json!({
            "httpStatus": status.canonical_reason().unwrap_or(""),
            "httpStatusCode": status.as_u16(),
            "status": web_status,
            "message": message,
            "response": summary,
        }),
    )
}

/// The summary as a pre-2.38 server sends it: no import options echo, no rejected indexes,
/// conflicts with only `object` and `value`.
fn legacy_summary(summary: &Value) -> Value {
    let conflicts: Vec<Value> = summary["conflicts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| json!({ "object": c["object"], "value": c["value"] }))
        .collect();
    json!({
        "responseType": "ImportSummary",
        "status": summary["status"],
        "description": summary["description"],
        "importCount": summary["importCount"],
        "conflicts": conflicts,
        "dataSetComplete": summary["dataSetComplete"],
    })
}

fn import_options(is_async: bool, dry_run: bool) -> Value {
    // The echo DHIS2 puts in every summary (`resp-238-ok.json`), with what this request set.
    // Parsed from text: as a `json!` literal it is deeper than the macro's recursion limit.
    let mut options: Value = serde_json::from_str(
        r#"{ "idSchemes": {}, "dryRun": false, "async": false, "importStrategy": "CREATE_AND_UPDATE",
             "mergeMode": "REPLACE", "reportMode": "FULL", "skipExistingCheck": false, "sharing": false,
             "skipNotifications": false, "skipAudit": false, "datasetAllowsPeriods": false,
             "strictPeriods": false, "strictDataElements": false, "strictCategoryOptionCombos": false,
             "strictAttributeOptionCombos": false, "strictOrganisationUnits": false,
             "strictDataSetApproval": false, "strictDataSetLocking": false,
             "strictDataSetInputPeriods": false, "requireCategoryOptionCombo": false,
             "requireAttributeOptionCombo": false, "skipPatternValidation": false,
             "ignoreEmptyCollection": false, "force": false, "firstRowIsHeader": true,
             "skipLastUpdated": false, "mergeDataValues": false, "skipCache": false }"#,
    )
    .expect("import options literal");
    options["async"] = json!(is_async);
    options["dryRun"] = json!(dry_run);
    options
}

/// One conflict, DHIS2's way (`ImportConflict`).
fn conflict(
    code: &str,
    property: &str,
    kind: &str,
    uid: &str,
    indexes: Option<Vec<usize>>,
) -> Value {
    let message = match code {
        "E7600" => format!("Data set not found or not accessible: `{uid}`"),
        "E7603" => format!("Org unit not found or not accessible: `{uid}`"),
        "E7604" => format!("Attribute option combo not found or not accessible: `{uid}`"),
        "E7610" => format!("Data element not found or not accessible: `{uid}`"),
        "E7611" => format!("Period not valid: `{uid}`"),
        "E7612" => format!("Organisation unit not found or not accessible: `{uid}`"),
        "E7613" => {
            format!("Category option combo not found or not accessible for writing data: `{uid}`")
        }
        "E7618" => format!("Data value or comment not specified for data element: `{uid}`"),
        _ => format!("{code}: `{uid}`"),
    };
    let mut c = json!({
        "object": uid,
        "objects": { kind: uid },
        "value": message,
        "errorCode": code,
        "property": property,
    });
    if let Some(indexes) = indexes {
        c["indexes"] = json!(indexes);
    }
    c
}

/// Imports a data value set into the store and returns its `ImportSummary` (the bare one, as
/// a job summary or a pre-2.38 answer carries it).
fn import_data_values(
    metadata: &Metadata,
    store: &mut Store,
    set: &Value,
    is_async: bool,
    dry_run: bool,
) -> Value {
    let top = |key: &str| set[key].as_str().map(str::to_owned);
    let summary = |status: &str,
                   description: &str,
                   counts: [usize; 3],
                   conflicts: Vec<Value>,
                   rejected: Vec<usize>,
                   complete: Value| {
        json!({
            "responseType": "ImportSummary",
            "status": status,
            "importOptions": import_options(is_async, dry_run),
            "description": description,
            "importCount": { "imported": counts[0], "updated": counts[1], "ignored": counts[2], "deleted": 0 },
            "conflicts": conflicts,
            "rejectedIndexes": rejected,
            "dataSetComplete": complete,
        })
    };
    // Whole-set problems abort the import (DataValueSetImportValidator.abortDataSetImport).
    let abort = if let Some(ds) = top("dataSet").filter(|ds| !metadata.data_sets.contains(ds)) {
        Some(conflict("E7600", "dataSet", "dataSet", &ds, None))
    } else if let Some(ou) = top("orgUnit").filter(|ou| !metadata.org_units.contains(ou)) {
        Some(conflict("E7603", "orgUnit", "organisationUnit", &ou, None))
    } else {
        top("attributeOptionCombo")
            .filter(|aoc| !metadata.category_option_combos.contains(aoc))
            .map(|aoc| {
                conflict(
                    "E7604",
                    "attributeOptionCombo",
                    "categoryOptionCombo",
                    &aoc,
                    None,
                )
            })
    };
    if let Some(c) = abort {
        return summary(
            "ERROR",
            "Import process was aborted",
            [0, 0, 0],
            vec![c],
            vec![],
            json!("false"),
        );
    }

    let rows = set["dataValues"].as_array().cloned().unwrap_or_default();
    // Conflicts with the same code and object are one conflict listing every row.
    let mut conflicts: Vec<(String, String, String, String, Vec<usize>)> = Vec::new();
    let mut add = |code: &str, property: &str, kind: &str, uid: String, i: usize| match conflicts
        .iter_mut()
        .find(|c| c.0 == code && c.3 == uid)
    {
        Some(c) => c.4.push(i),
        None => conflicts.push((code.into(), property.into(), kind.into(), uid, vec![i])),
    };
    let (mut imported, mut updated, mut ignored) = (0, 0, 0);
    let mut rejected = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let field = |key: &str| row[key].as_str().map(str::to_owned).or_else(|| top(key));
        let data_element = row["dataElement"].as_str().unwrap_or("").to_owned();
        let org_unit = field("orgUnit").unwrap_or_default();
        let period = field("period").unwrap_or_default();
        let value = text(&row["value"]);
        let comment = row["comment"].as_str().map(str::to_owned);
        let combo = row["categoryOptionCombo"]
            .as_str()
            .unwrap_or(DEFAULT_COMBO)
            .to_owned();
        let problem = if !metadata.data_elements.contains(&data_element) {
            Some(("E7610", "dataElement", "dataElement", data_element.clone()))
        } else if !metadata.category_option_combos.contains(&combo) {
            Some((
                "E7613",
                "categoryOptionCombo",
                "categoryOptionCombo",
                combo.clone(),
            ))
        } else if !metadata.org_units.contains(&org_unit) {
            Some(("E7612", "orgUnit", "organisationUnit", org_unit.clone()))
        } else if period.is_empty() {
            Some(("E7611", "period", "period", period.clone()))
        } else if value.is_none() && comment.is_none() {
            Some(("E7618", "value", "dataElement", data_element.clone()))
        } else {
            None
        };
        if let Some((code, property, kind, uid)) = problem {
            add(code, property, kind, uid, i);
            rejected.push(i);
            // DHIS2 counts a rejected row as ignored.
            ignored += 1;
            continue;
        }
        let data_value = DataValue {
            category_option_combo: combo,
            attribute_option_combo: field("attributeOptionCombo")
                .unwrap_or_else(|| DEFAULT_COMBO.to_owned()),
            data_element,
            period,
            org_unit,
            value: value.unwrap_or_default(),
            comment,
        };
        let key = (
            data_value.data_element.clone(),
            data_value.period.clone(),
            data_value.org_unit.clone(),
            data_value.category_option_combo.clone(),
            data_value.attribute_option_combo.clone(),
        );
        // Same value and comment: unchanged, ignored; otherwise an upsert.
        match store.data_values.get(&key) {
            Some(old) if old.value == data_value.value && old.comment == data_value.comment => {
                ignored += 1;
                continue;
            }
            Some(_) => updated += 1,
            None => imported += 1,
        }
        if !dry_run {
            store.data_values.insert(key, data_value);
        }
    }
    let conflicts: Vec<Value> = conflicts
        .into_iter()
        .map(|(code, property, kind, uid, indexes)| {
            conflict(&code, &property, &kind, &uid, Some(indexes))
        })
        .collect();
    let (status, complete) = if conflicts.is_empty() {
        let complete = match (top("dataSet"), top("completeDate")) {
            (Some(_), Some(date)) => json!(date),
            _ => json!("false"),
        };
        ("SUCCESS", complete)
    } else {
        ("WARNING", json!("false"))
    };
    summary(
        status,
        "Import process completed successfully",
        [imported, updated, ignored],
        conflicts,
        rejected,
        complete,
    )
}

// ---------------------------------------------------------------------------------------------
// Jobs

fn start_job(store: &mut Store, kind: JobKind, result: Value) -> String {
    let id = store.uid('J');
    let forget = store.forget_reports > 0;
    store.forget_reports = store.forget_reports.saturating_sub(1);
    let message = match kind {
        JobKind::DataValues => "Import done".to_owned(),
        JobKind::Tracker => {
            let stats = &result["stats"];
            format!(
                "Import complete with status {}, {} created, {} updated, {} deleted, {} ignored",
                result["status"].as_str().unwrap_or("OK"),
                stats["created"],
                stats["updated"],
                stats["deleted"],
                stats["ignored"]
            )
        }
    };
    store.jobs.insert(
        id.clone(),
        Job {
            kind,
            polls: 0,
            result: (!forget).then_some(result),
            message,
        },
    );
    id
}

/// A job's notifications, newest first: "started" until it has been polled enough, then the
/// completed one on top. An unknown job has none.
fn notifications(inner: &Inner, kind: JobKind, category: &str, id: &str) -> Response {
    let mut store = inner.store();
    let needed = store.polls_before_completed;
    let Some(job) = store.jobs.get_mut(id).filter(|j| j.kind == kind) else {
        return reply(StatusCode::OK, json!([]));
    };
    let started = json!({
        "uid": format!("{id}-1"), "level": "INFO", "category": category,
        "time": now(), "message": "Process started", "completed": false
    });
    let done = job.polls >= needed;
    job.polls += 1;
    if !done {
        return reply(StatusCode::OK, json!([started]));
    }
    let completed = json!({
        "uid": format!("{id}-2"), "level": "INFO", "category": category,
        "time": now(), "message": job.message, "completed": true
    });
    reply(StatusCode::OK, json!([completed, started]))
}

/// A completed job's summary or report; 404 before it completes, for an unknown job, and for
/// one whose report was forgotten.
fn job_result(inner: &Inner, kind: JobKind, id: &str) -> Response {
    let store = inner.store();
    let needed = store.polls_before_completed;
    match store.jobs.get(id).filter(|j| j.kind == kind) {
        Some(Job {
            result: Some(result),
            polls,
            ..
        }) if *polls > needed => reply(StatusCode::OK, result.clone()),
        _ => web_message(
            StatusCode::NOT_FOUND,
            &format!("Summary for job {id} does not exist"),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Tracker

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Create,
    Update,
    CreateAndUpdate,
}

fn tracker(
    inner: &Inner,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let payload = match json_body(headers, body) {
        Ok(v) => v,
        Err((status, message)) => return web_message(status, &message),
    };
    let strategy = match query
        .get("importStrategy")
        .map(|s| s.to_ascii_uppercase())
        .as_deref()
    {
        None | Some("CREATE") => Strategy::Create,
        Some("UPDATE") => Strategy::Update,
        Some("CREATE_AND_UPDATE") => Strategy::CreateAndUpdate,
        Some(other) => {
            return web_message(
                StatusCode::BAD_REQUEST,
                &format!("Value {other} is not valid for parameter importStrategy"),
            );
        }
    };
    let atomic_all = !query
        .get("atomicMode")
        .is_some_and(|m| m.eq_ignore_ascii_case("OBJECT"));
    // Asynchronous unless asked otherwise: DHIS2's default.
    let is_async = flag(query, "async").unwrap_or(true);
    let mut store = inner.store();
    let report = import_tracker(
        &inner.options.metadata,
        &mut store,
        &payload,
        strategy,
        atomic_all,
    );
    if is_async {
        let id = start_job(&mut store, JobKind::Tracker, report);
        return reply(
            StatusCode::OK,
            json!({
                "httpStatus": "OK",
                "httpStatusCode": 200,
                "status": "OK",
                "message": "Tracker job added",
                "response": {
                    "id": id,
                    "location": format!("{}/api/tracker/jobs/{id}", inner.base),
                }
            }),
        );
    }
    // TrackerImportController.importSync: 409 when the status is ERROR, the bare report.
    let status = if report["status"] == "ERROR" {
        StatusCode::CONFLICT
    } else {
        StatusCode::OK
    };
    reply(status, report)
}

/// One tracker object of a payload.
struct Object {
    /// `TRACKED_ENTITY`, `ENROLLMENT` or `EVENT`.
    kind: &'static str,
    uid: String,
    value: Value,
}

/// The payload's objects, flat: nested enrollments and events are taken out of their parents.
fn objects(store: &mut Store, payload: &Value) -> Vec<Object> {
    let mut out = Vec::new();
    let mut push = |store: &mut Store, kind: &'static str, key: &str, mut value: Value| {
        let uid = match value[key].as_str() {
            Some(uid) => uid.to_owned(),
            None => {
                // DHIS2 generates the UID of an object sent without one.
                let uid = store.uid(kind.chars().next().unwrap_or('X'));
                value[key] = json!(uid);
                uid
            }
        };
        out.push(Object { kind, uid, value });
    };
    for mut te in payload["trackedEntities"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let enrollments = te
            .as_object_mut()
            .and_then(|o| o.remove("enrollments"))
            .and_then(|e| e.as_array().cloned())
            .unwrap_or_default();
        push(store, "TRACKED_ENTITY", "trackedEntity", te);
        for mut en in enrollments {
            let events = en
                .as_object_mut()
                .and_then(|o| o.remove("events"))
                .and_then(|e| e.as_array().cloned())
                .unwrap_or_default();
            push(store, "ENROLLMENT", "enrollment", en);
            for ev in events {
                push(store, "EVENT", "event", ev);
            }
        }
    }
    for en in payload["enrollments"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        push(store, "ENROLLMENT", "enrollment", en);
    }
    for ev in payload["events"].as_array().cloned().unwrap_or_default() {
        push(store, "EVENT", "event", ev);
    }
    out
}

/// The first reason DHIS2 would reject `object`, as (code, message).
fn tracker_error(
    metadata: &Metadata,
    store: &Store,
    object: &Object,
    strategy: Strategy,
) -> Option<(&'static str, String)> {
    let v = &object.value;
    let uid = &object.uid;
    let known =
        |set: &BTreeSet<String>, key: &str| v[key].as_str().is_some_and(|x| set.contains(x));
    let named = |key: &str| v[key].as_str().unwrap_or("").to_owned();
    let (exists, exists_code, exists_text, missing_code, missing_text) = match object.kind {
        "TRACKED_ENTITY" => (
            store.tracked_entities.contains_key(uid),
            "E1002",
            format!("TrackedEntity: `{uid}`, already exists."),
            "E1063",
            format!("TrackedEntity: `{uid}`, does not exist."),
        ),
        "ENROLLMENT" => (
            store.enrollments.contains_key(uid),
            "E1080",
            format!("Enrollment: `{uid}`, already exists."),
            "E1081",
            format!("Enrollment: `{uid}`, do not exist."),
        ),
        _ => (
            store.events.contains_key(uid),
            "E1030",
            format!("Event: `{uid}`, already exists."),
            "E1032",
            format!("Event: `{uid}`, do not exist."),
        ),
    };
    if strategy == Strategy::Create && exists {
        return Some((exists_code, exists_text));
    }
    if strategy == Strategy::Update && !exists {
        return Some((missing_code, missing_text));
    }
    match object.kind {
        "TRACKED_ENTITY" if !known(&metadata.org_units, "orgUnit") => Some((
            "E1049",
            format!(
                "Could not find OrganisationUnit: `{}`, linked to Tracked Entity.",
                named("orgUnit")
            ),
        )),
        "ENROLLMENT" if !known(&metadata.programs, "program") => Some((
            "E1069",
            format!(
                "Could not find Program: `{}`, linked to Enrollment.",
                named("program")
            ),
        )),
        "ENROLLMENT" if !known(&metadata.org_units, "orgUnit") => Some((
            "E1070",
            format!(
                "Could not find OrganisationUnit: `{}`, linked to Enrollment.",
                named("orgUnit")
            ),
        )),
        "EVENT" if !known(&metadata.programs, "program") => Some((
            "E1010",
            format!(
                "Could not find Program: `{}`, linked to Event.",
                named("program")
            ),
        )),
        "EVENT" if !known(&metadata.program_stages, "programStage") => Some((
            "E1013",
            format!(
                "Could not find ProgramStage: `{}`, linked to Event.",
                named("programStage")
            ),
        )),
        "EVENT" if !known(&metadata.org_units, "orgUnit") => Some((
            "E1011",
            format!(
                "Could not find OrganisationUnit: `{}`, linked to Event.",
                named("orgUnit")
            ),
        )),
        "EVENT" if v["occurredAt"].as_str().is_none_or(str::is_empty) => {
            Some(("E1031", "Event OccurredAt date is missing.".to_owned()))
        }
        _ => None,
    }
}

/// Validates and (unless refused) stores a tracker payload; returns the import report.
fn import_tracker(
    metadata: &Metadata,
    store: &mut Store,
    payload: &Value,
    strategy: Strategy,
    atomic_all: bool,
) -> Value {
    let objects = objects(store, payload);
    let mut errors = Vec::new();
    let mut valid = Vec::new();
    for object in objects {
        match tracker_error(metadata, store, &object, strategy) {
            Some((code, message)) => errors.push(json!({
                "message": message,
                "errorCode": code,
                "trackerType": object.kind,
                "uid": object.uid,
            })),
            None => valid.push(object),
        }
    }
    let total = errors.len() + valid.len();
    // atomicMode=ALL: one error and nothing is committed; the report lists no bundle.
    if !errors.is_empty() && atomic_all {
        return json!({
            "status": "ERROR",
            "validationReport": { "errorReports": errors, "warningReports": [] },
            "stats": { "created": 0, "updated": 0, "deleted": 0, "ignored": total, "total": total },
            "bundleReport": { "typeReportMap": {} },
        });
    }
    let mut by_type: BTreeMap<&str, (usize, usize, Vec<Value>)> = BTreeMap::new();
    let (mut created, mut updated) = (0, 0);
    for object in valid {
        let map = match object.kind {
            "TRACKED_ENTITY" => &mut store.tracked_entities,
            "ENROLLMENT" => &mut store.enrollments,
            _ => &mut store.events,
        };
        let entry = by_type.entry(object.kind).or_default();
        if map.insert(object.uid.clone(), object.value).is_some() {
            updated += 1;
            entry.1 += 1;
        } else {
            created += 1;
            entry.0 += 1;
        }
        entry
            .2
            .push(json!({ "trackerType": object.kind, "uid": object.uid, "errorReports": [] }));
    }
    let type_reports: serde_json::Map<String, Value> = by_type
        .into_iter()
        .map(|(kind, (c, u, reports))| {
            (
                kind.to_owned(),
                json!({
                    "trackerType": kind,
                    "stats": { "created": c, "updated": u, "deleted": 0, "ignored": 0, "total": c + u },
                    "objectReports": reports,
                }),
            )
        })
        .collect();
    json!({
        "status": if errors.is_empty() { "OK" } else { "ERROR" },
        "validationReport": { "errorReports": errors, "warningReports": [] },
        "stats": {
            "created": created, "updated": updated, "deleted": 0,
            "ignored": total - created - updated, "total": total
        },
        "bundleReport": { "typeReportMap": type_reports },
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!("{}/fixtures/dhis2/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The sample data value set with its third data element replaced by an unknown id, as
    /// `resp-238-409-warning.json` answers it (protocols.md §2.8).
    fn set_with_unknown_element() -> Value {
        let mut set = fixture("datavalueset.json");
        set["dataValues"][2]["dataElement"] = json!("eY5ehpbEsB7X");
        set
    }

    /// Objects whose keys are data (a type → id map, a tracker type → report map), not fields:
    /// only their being objects is compared.
    const OPEN_MAPS: &[&str] = &["objects", "typeReportMap"];

    /// Panics unless `actual` has exactly the keys of `expected` with the same JSON types,
    /// recursively (arrays by their first elements), apart from the keys in `left_out`, which
    /// the sample left out and the double may send.
    fn assert_same_shape(expected: &Value, actual: &Value, at: &str, left_out: &[&str]) {
        let open = OPEN_MAPS.iter().any(|k| at.ends_with(&format!(".{k}")));
        match (expected, actual) {
            (Value::Object(_), Value::Object(_)) if open => {}
            (Value::Object(e), Value::Object(a)) => {
                let want: BTreeSet<&String> = e.keys().collect();
                let have: BTreeSet<&String> = a
                    .keys()
                    .filter(|k| e.contains_key(*k) || !left_out.contains(&k.as_str()))
                    .collect();
                assert_eq!(have, want, "keys at {at}: answer {actual}");
                for (k, v) in e {
                    assert_same_shape(v, &a[k], &format!("{at}.{k}"), left_out);
                }
            }
            (Value::Array(e), Value::Array(a)) => {
                if let (Some(e), Some(a)) = (e.first(), a.first()) {
                    assert_same_shape(e, a, &format!("{at}[0]"), left_out);
                }
            }
            (e, a) => assert_eq!(
                std::mem::discriminant(e),
                std::mem::discriminant(a),
                "type at {at}: sample {e}, answer {a}"
            ),
        }
    }

    fn without(mut v: Value, pointer_parent: &str, key: &str) -> Value {
        if let Some(o) = v.pointer_mut(pointer_parent).and_then(Value::as_object_mut) {
            o.remove(key);
        }
        v
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    async fn call(dhis2: &Dhis2, method: Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        let client = client();
        let mut request = client
            .request(method, dhis2.url(path))
            .basic_auth(USERNAME, Some(PASSWORD));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.expect("request to the double");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
        (status, json)
    }

    async fn post(dhis2: &Dhis2, path: &str, body: &Value) -> (u16, Value) {
        call(dhis2, Method::POST, path, Some(body)).await
    }

    async fn get(dhis2: &Dhis2, path: &str) -> (u16, Value) {
        call(dhis2, Method::GET, path, None).await
    }

    #[tokio::test]
    async fn an_accepted_data_value_set_is_answered_like_the_238_ok_sample_and_stored() {
        let dhis2 = Dhis2::start().await;

        let (status, answer) =
            post(&dhis2, "/api/dataValueSets", &fixture("datavalueset.json")).await;

        assert_eq!(status, 200, "{answer}");
        assert_same_shape(&fixture("resp-238-ok.json"), &answer, "$", &[]);
        assert_eq!(answer["response"]["importCount"]["imported"], 3, "{answer}");
        assert_eq!(answer["response"]["dataSetComplete"], "2024-02-03");
        let values = dhis2.data_values();
        assert_eq!(values.len(), 3);
        let commented = values
            .iter()
            .find(|v| v.data_element == "Ix2HsbDMLea")
            .unwrap();
        assert_eq!(commented.value, "14");
        assert_eq!(commented.comment.as_deref(), Some("from CHW reports"));
        assert_eq!(commented.org_unit, "DiszpKrYNg8");
        assert_eq!(commented.attribute_option_combo, "HllvX50cXC0");
    }

    #[tokio::test]
    async fn an_unknown_category_option_combo_rejects_its_row_and_an_unknown_attribute_combo_the_set()
     {
        let dhis2 = Dhis2::start().await;
        let mut set = fixture("datavalueset.json");
        set["dataValues"][1]["categoryOptionCombo"] = json!("prWYhmj1HXX");

        let (status, answer) = post(&dhis2, "/api/dataValueSets", &set).await;

        assert_eq!(status, 409, "{answer}");
        assert_eq!(answer["status"], "WARNING", "{answer}");
        let conflict = &answer["response"]["conflicts"][0];
        assert_eq!(conflict["errorCode"], "E7613", "{answer}");
        assert_eq!(conflict["object"], "prWYhmj1HXX");
        assert_eq!(conflict["indexes"], json!([1]));
        assert_eq!(answer["response"]["rejectedIndexes"], json!([1]));
        assert_eq!(dhis2.data_values().len(), 2, "the other rows are imported");

        set["attributeOptionCombo"] = json!("HllvX50cXC1");
        let (status, answer) = post(&dhis2, "/api/dataValueSets", &set).await;
        assert_eq!(status, 409, "{answer}");
        assert_eq!(answer["status"], "ERROR", "{answer}");
        assert_eq!(
            answer["response"]["conflicts"][0]["errorCode"], "E7604",
            "{answer}"
        );
        assert_eq!(dhis2.data_values().len(), 2, "nothing more is stored");
    }

    #[tokio::test]
    async fn sending_the_same_set_again_ignores_it_and_a_changed_value_is_updated() {
        let dhis2 = Dhis2::start().await;
        let mut set = fixture("datavalueset.json");
        post(&dhis2, "/api/dataValueSets", &set).await;

        let (_, again) = post(&dhis2, "/api/dataValueSets", &set).await;
        set["dataValues"][0]["value"] = json!("13");
        let (_, changed) = post(&dhis2, "/api/dataValueSets", &set).await;

        assert_eq!(
            again["response"]["importCount"],
            json!({"imported":0,"updated":0,"ignored":3,"deleted":0})
        );
        assert_eq!(
            changed["response"]["importCount"],
            json!({"imported":0,"updated":1,"ignored":2,"deleted":0})
        );
        assert_eq!(dhis2.data_values().len(), 3);
    }

    #[tokio::test]
    async fn an_unknown_data_element_is_answered_exactly_like_the_238_warning_sample() {
        let dhis2 = Dhis2::start().await;

        let (status, answer) =
            post(&dhis2, "/api/dataValueSets", &set_with_unknown_element()).await;

        assert_eq!(status, 409, "{answer}");
        // The sample leaves out the import options echo "for brevity" (protocols.md §2.5).
        assert_eq!(
            without(answer, "/response", "importOptions"),
            fixture("resp-238-409-warning.json")
        );
        assert_eq!(dhis2.data_values().len(), 2, "the accepted rows are stored");
    }

    #[tokio::test]
    async fn an_unknown_org_unit_on_a_row_is_an_e7612_conflict() {
        let dhis2 = Dhis2::start().await;
        let mut set = fixture("datavalueset.json");
        set["dataValues"][1]["orgUnit"] = json!("DiszpKrYNg9");

        let (status, answer) = post(&dhis2, "/api/dataValueSets", &set).await;

        assert_eq!(status, 409);
        let conflict = &answer["response"]["conflicts"][0];
        assert_eq!(conflict["errorCode"], "E7612", "{answer}");
        assert_eq!(
            conflict["value"],
            "Organisation unit not found or not accessible: `DiszpKrYNg9`"
        );
        assert_eq!(conflict["indexes"], json!([1]));
        assert_eq!(answer["response"]["rejectedIndexes"], json!([1]));
    }

    #[tokio::test]
    async fn an_unknown_org_unit_for_the_whole_set_is_answered_exactly_like_the_238_error_sample() {
        let dhis2 = Dhis2::start().await;
        let mut set = fixture("datavalueset.json");
        set["orgUnit"] = json!("DiszpKrYNg9");

        let (status, answer) = post(&dhis2, "/api/dataValueSets", &set).await;

        assert_eq!(status, 409);
        assert_eq!(
            without(answer, "/response", "importOptions"),
            fixture("resp-238-409-error.json")
        );
        assert!(
            dhis2.data_values().is_empty(),
            "an aborted set stores nothing"
        );
    }

    #[tokio::test]
    async fn an_unknown_data_set_aborts_the_set_with_e7600() {
        let dhis2 = Dhis2::start().await;
        let mut set = fixture("datavalueset.json");
        set["dataSet"] = json!("pBOMPrpg1QY");

        let (status, answer) = post(&dhis2, "/api/dataValueSets", &set).await;

        assert_eq!(status, 409);
        assert_same_shape(
            &fixture("resp-238-409-error.json"),
            &answer,
            "$",
            &["importOptions"],
        );
        assert_eq!(answer["status"], "ERROR");
        assert_eq!(answer["response"]["conflicts"][0]["errorCode"], "E7600");
        assert_eq!(
            answer["response"]["conflicts"][0]["value"],
            "Data set not found or not accessible: `pBOMPrpg1QY`"
        );
    }

    #[tokio::test]
    async fn api_37_answers_the_bare_summary_with_200_exactly_like_the_237_sample() {
        let dhis2 = Dhis2::start().await;

        let (status, answer) =
            post(&dhis2, "/api/37/dataValueSets", &set_with_unknown_element()).await;

        assert_eq!(status, 200, "pre-2.38 answers 200 even with conflicts");
        assert_eq!(answer, fixture("resp-237-importsummary.json"));
    }

    #[tokio::test]
    async fn an_async_data_value_import_is_a_job_completed_after_some_polls_with_its_summary() {
        let dhis2 = Dhis2::start().await;

        let (status, answer) = post(
            &dhis2,
            "/api/dataValueSets?async=true",
            &fixture("datavalueset.json"),
        )
        .await;

        assert_eq!(status, 200);
        assert_same_shape(&fixture("resp-async-job.json"), &answer, "$", &[]);
        let id = answer["response"]["id"].as_str().unwrap().to_owned();
        let tasks = format!("/api/system/tasks/DATAVALUE_IMPORT/{id}");
        let summary = format!("/api/system/taskSummaries/DATAVALUE_IMPORT/{id}");
        assert_eq!(
            answer["response"]["relativeNotifierEndpoint"],
            tasks.as_str()
        );
        assert_eq!(
            get(&dhis2, &summary).await.0,
            404,
            "no summary before the job completes"
        );
        for poll in 0..2 {
            let (_, notes) = get(&dhis2, &tasks).await;
            assert_eq!(notes[0]["completed"], false, "poll {poll}: {notes}");
        }
        let (_, notes) = get(&dhis2, &tasks).await;
        assert_eq!(notes[0]["completed"], true, "{notes}");
        let (status, summary) = get(&dhis2, &summary).await;
        assert_eq!(status, 200);
        assert_same_shape(
            &fixture("resp-238-ok.json")["response"],
            &summary,
            "summary",
            &[],
        );
        assert_eq!(summary["status"], "SUCCESS");
    }

    #[tokio::test]
    async fn a_forgotten_summary_answers_404() {
        let dhis2 = Dhis2::start().await;
        dhis2.forget_next_reports(1);
        dhis2.set_polls_before_completed(0);
        let (_, job) = post(&dhis2, "/api/tracker", &fixture("tracker-events.json")).await;
        let id = job["response"]["id"].as_str().unwrap();

        let (_, notes) = get(&dhis2, &format!("/api/tracker/jobs/{id}")).await;
        let (status, report) = get(&dhis2, &format!("/api/tracker/jobs/{id}/report")).await;

        assert_eq!(notes[0]["completed"], true);
        assert_eq!(status, 404);
        assert_eq!(
            report["message"],
            format!("Summary for job {id} does not exist")
        );
    }

    #[tokio::test]
    async fn an_async_tracker_import_is_a_job_with_a_report_and_unknown_jobs_have_none() {
        let dhis2 = Dhis2::start().await;

        let (status, answer) = post(&dhis2, "/api/tracker", &fixture("tracker-events.json")).await;

        assert_eq!(status, 200);
        assert_same_shape(&fixture("tracker-async-response.json"), &answer, "$", &[]);
        let id = answer["response"]["id"].as_str().unwrap();
        assert_eq!(
            answer["response"]["location"],
            dhis2.url(&format!("/api/tracker/jobs/{id}"))
        );
        for _ in 0..3 {
            get(&dhis2, &format!("/api/tracker/jobs/{id}")).await;
        }
        let (status, report) = get(&dhis2, &format!("/api/tracker/jobs/{id}/report")).await;
        assert_eq!(status, 200);
        assert_same_shape(
            &fixture("tracker-report-error.json"),
            &report,
            "report",
            &[],
        );
        assert_eq!(report["status"], "OK", "{report}");
        assert_eq!(report["stats"]["created"], 1);
        assert_eq!(dhis2.events()[0]["event"], "Qz6p3nC0aV1");
        let (status, missing) = get(&dhis2, "/api/tracker/jobs/NoSuchJob01/report").await;
        assert_eq!(status, 404);
        assert_eq!(
            missing["message"],
            "Summary for job NoSuchJob01 does not exist"
        );
    }

    #[tokio::test]
    async fn a_sync_tracker_import_with_an_unknown_org_unit_is_answered_exactly_like_the_error_sample()
     {
        let dhis2 = Dhis2::start().await;
        let mut events = fixture("tracker-events.json");
        events["events"][0]["orgUnit"] = json!("DiszpKrYNg9");

        let (status, report) = post(&dhis2, "/api/tracker?async=false", &events).await;

        assert_eq!(status, 409);
        assert_eq!(report, fixture("tracker-report-error.json"));
        assert!(dhis2.events().is_empty());
    }

    #[tokio::test]
    async fn a_second_create_of_an_event_is_e1030_and_create_and_update_updates_it() {
        let dhis2 = Dhis2::start().await;
        let events = fixture("tracker-events.json");
        let (first, _) = post(&dhis2, "/api/tracker?async=false", &events).await;

        let (again, report) = post(&dhis2, "/api/tracker?async=false", &events).await;
        let (upsert, updated) = post(
            &dhis2,
            "/api/tracker?async=false&importStrategy=CREATE_AND_UPDATE",
            &events,
        )
        .await;

        assert_eq!(first, 200);
        assert_eq!(again, 409);
        let error = &report["validationReport"]["errorReports"][0];
        assert_eq!(error["errorCode"], "E1030");
        assert_eq!(error["message"], "Event: `Qz6p3nC0aV1`, already exists.");
        assert_eq!(upsert, 200, "{updated}");
        assert_eq!(updated["stats"]["updated"], 1);
        assert_eq!(dhis2.events().len(), 1);
    }

    #[tokio::test]
    async fn with_atomic_mode_all_one_bad_event_keeps_the_good_one_out() {
        let dhis2 = Dhis2::start().await;
        let mut events = fixture("tracker-events.json");
        let mut bad = events["events"][0].clone();
        bad["event"] = json!("Qz6p3nC0aV2");
        bad["program"] = json!("lxAQ7Zs9VYX");
        events["events"].as_array_mut().unwrap().push(bad);

        let (status, report) = post(&dhis2, "/api/tracker?async=false", &events).await;

        assert_eq!(status, 409);
        assert_eq!(
            report["validationReport"]["errorReports"][0]["errorCode"],
            "E1010"
        );
        assert_eq!(report["stats"]["total"], 2);
        assert!(dhis2.events().is_empty());
    }

    #[tokio::test]
    async fn requests_without_the_right_credentials_get_dhis2s_401_and_a_token_is_accepted() {
        let dhis2 = Dhis2::start().await;
        let client = client();
        let info = dhis2.url("/api/system/info");

        let anonymous = client.get(&info).send().await.unwrap();
        let wrong = client
            .get(&info)
            .header("authorization", "ApiToken d2pat_wrong")
            .send()
            .await
            .unwrap();
        let token = client
            .get(&info)
            .header("authorization", format!("ApiToken {TOKEN}"))
            .send()
            .await
            .unwrap();

        assert_eq!(anonymous.status(), 401);
        let body: Value = anonymous.json().await.unwrap();
        assert_eq!(body["httpStatus"], "Unauthorized");
        assert_eq!(body["httpStatusCode"], 401);
        assert_eq!(body["status"], "ERROR");
        assert!(body["message"].is_string());
        assert_eq!(wrong.status(), 401);
        assert_eq!(token.status(), 200);
        let info: Value = token.json().await.unwrap();
        assert!(
            info["version"].is_string() && info["serverDate"].is_string(),
            "{info}"
        );
    }

    #[tokio::test]
    async fn it_answers_503_as_many_times_as_told_then_works_and_records_everything() {
        let dhis2 = Dhis2::start().await;
        dhis2.fail_next(2);

        let first = get(&dhis2, "/api/system/info").await.0;
        let second = get(&dhis2, "/api/system/info").await.0;
        let third = get(&dhis2, "/api/system/info").await.0;

        assert_eq!([first, second, third], [503, 503, 200]);
        assert_eq!(dhis2.received_at("/api/system/info").len(), 3);
    }

    #[tokio::test]
    async fn a_body_that_is_not_json_is_refused_with_415() {
        let dhis2 = Dhis2::start().await;
        let response = client()
            .post(dhis2.url("/api/dataValueSets"))
            .basic_auth(USERNAME, Some(PASSWORD))
            .header("content-type", "application/adx+xml")
            .body("<adx/>")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 415);
    }
}
