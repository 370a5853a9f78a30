//! A FHIR R4 server double: an in-memory store behind the transaction interaction, answering
//! as ../shared/protocols.md §4 describes (checked against `tests/fixtures/fhir/`).
//!
//! `POST /` (or `/fhir`, the other common base) takes a `transaction` Bundle and, like a real
//! server:
//! - refuses what is not a transaction Bundle (400) or not FHIR JSON (415);
//! - checks the structure a real server checks before anything else (422 naming the field as
//!   `Bundle.entry[i].resource.status`): Observation needs `status` and `code`, Encounter needs
//!   `status` and a `class` that is one Coding (R4; a list is R5);
//! - runs DELETE, then POST, then PUT, then GET entries, all or nothing: on any failure the
//!   store is left untouched and the failing entry's status answers the whole request;
//! - honours conditional create (`ifNoneExist`: no match → 201, one → 200 with the existing
//!   location, several → 412) and conditional update (`PUT Type?identifier=…`: 201, 200, 412);
//!   a plain POST always creates;
//! - rewrites references to `urn:uuid:` fullUrls into the ids it assigned;
//! - answers a `transaction-response` shaped like `transaction-response.json`, entries in the
//!   request's order, and errors as OperationOutcomes shaped like the samples.
//!
//! `GET /{type}?identifier=system|value` (a searchset) and `GET /{type}/{id}` work too, so a
//! test can look as a client would. Test hooks: [`FhirServer::resources`],
//! [`FhirServer::received`] and [`FhirServer::respond_with`] (script the next answers).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
// chrono through sqlx's re-export: no new dependency for one timestamp format.
use sqlx::types::chrono::Utc;
use tokio_util::sync::DropGuard;

use crate::Received;

/// An answer the double sends instead of processing a transaction.
#[derive(Clone, Debug)]
pub struct Scripted {
    /// Its status.
    pub status: u16,
    /// Its body (usually an OperationOutcome).
    pub body: Value,
    /// A `Retry-After` in seconds, if any.
    pub retry_after: Option<u64>,
}

impl Scripted {
    /// `status` with an OperationOutcome of one issue.
    pub fn outcome(status: u16, code: &str, diagnostics: &str) -> Self {
        Self {
            status,
            body: operation_outcome(&[Issue::error(code, diagnostics)]),
            retry_after: None,
        }
    }
}

/// One issue of an OperationOutcome.
#[derive(Clone, Debug)]
pub struct Issue {
    /// fatal, error, warning or information.
    pub severity: &'static str,
    /// The IssueType code (`required`, `duplicate`, `transient`, …).
    pub code: String,
    /// Human-readable detail.
    pub diagnostics: String,
    /// FHIRPath of the element at fault, if one is.
    pub expression: Option<String>,
}

impl Issue {
    fn error(code: &str, diagnostics: &str) -> Self {
        Self {
            severity: "error",
            code: code.to_owned(),
            diagnostics: diagnostics.to_owned(),
            expression: None,
        }
    }

    fn at(code: &str, expression: String, diagnostics: String) -> Self {
        Self {
            severity: "error",
            code: code.to_owned(),
            diagnostics,
            expression: Some(expression),
        }
    }
}

/// An OperationOutcome holding these issues, shaped like `operationoutcome-422.json`.
pub fn operation_outcome(issues: &[Issue]) -> Value {
    let issues: Vec<Value> = issues
        .iter()
        .map(|i| {
            let mut issue = json!({
                "severity": i.severity,
                "code": i.code,
                "diagnostics": i.diagnostics,
            });
            if let Some(e) = &i.expression {
                issue["details"] = json!({ "text": i.diagnostics });
                issue["expression"] = json!([e]);
            }
            issue
        })
        .collect();
    json!({ "resourceType": "OperationOutcome", "issue": issues })
}

/// A stored resource: its current version only (history is not kept).
#[derive(Clone, Debug)]
struct Stored {
    version: u32,
    last_modified: String,
    resource: Value,
}

/// Resources by type, then id.
#[derive(Clone, Debug, Default)]
struct Store {
    resources: BTreeMap<String, BTreeMap<String, Stored>>,
    next_id: u64,
}

#[derive(Default)]
struct Inner {
    store: Mutex<Store>,
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<Scripted>>,
}

/// The double. Dropping it stops the server.
pub struct FhirServer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    /// Stops the server when the double is dropped.
    _stop: DropGuard,
}

impl FhirServer {
    /// Starts a double on a free port of 127.0.0.1.
    pub async fn start() -> Self {
        let inner = Arc::new(Inner::default());
        let api = Router::new()
            .route("/", post(transaction))
            .route("/{resource_type}", get(search))
            .route("/{resource_type}/{id}", get(read));
        let app = Router::new()
            .merge(api.clone())
            .nest("/fhir", api)
            .with_state(inner.clone());
        let (listener, addr) = super::bind("fhir", 0).await;
        let stop = super::serve(listener, app);
        Self {
            addr,
            inner,
            _stop: stop,
        }
    }

    /// The FHIR base URL (where transactions are posted).
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The current version of every stored resource of this type, ids and meta included.
    pub fn resources(&self, resource_type: &str) -> Vec<Value> {
        let store = self.inner.store.lock().expect("lock");
        store
            .resources
            .get(resource_type)
            .map(|by_id| by_id.values().map(|s| s.resource.clone()).collect())
            .unwrap_or_default()
    }

    /// Every request received so far, scripted ones included.
    pub fn received(&self) -> Vec<Received> {
        self.inner.received.lock().expect("lock").clone()
    }

    /// The next transactions are answered with these, in order, without being processed.
    pub fn respond_with(&self, answers: &[Scripted]) {
        self.inner
            .script
            .lock()
            .expect("lock")
            .extend(answers.iter().cloned());
    }

    /// Waits until at least `n` requests arrived, then returns them all.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        crate::eventually(
            &format!("{n} requests at the fhir double {}", self.addr),
            timeout,
            || async {
                let r = self.received();
                (r.len() >= n).then_some(r)
            },
        )
        .await
    }
}

/// A FHIR JSON answer.
fn fhir(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/fhir+json;charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

fn failure(status: StatusCode, issues: &[Issue]) -> Response {
    fhir(status, &operation_outcome(issues))
}

fn record(inner: &Inner, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) {
    inner.received.lock().expect("lock").push(Received {
        method,
        uri,
        headers,
        body,
    });
}

async fn transaction(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&inner, method, uri, headers.clone(), body.clone());
    if let Some(s) = inner.script.lock().expect("lock").pop_front() {
        let mut response = fhir(
            StatusCode::from_u16(s.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &s.body,
        );
        if let Some(seconds) = s.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, seconds.into());
        }
        return response;
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !hiway_config::is_json(content_type) {
        return failure(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &[Issue::error(
                "not-supported",
                &format!("unsupported content type {content_type:?}: send application/fhir+json"),
            )],
        );
    }
    let bundle: Value = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return failure(
                StatusCode::BAD_REQUEST,
                &[Issue::error(
                    "structure",
                    &format!("failed to parse JSON: {e}"),
                )],
            );
        }
    };
    let mut store = inner.store.lock().expect("lock");
    match run_transaction(&store, &bundle) {
        Ok((next, response)) => {
            // Atomic: the store changes only when every entry succeeded.
            *store = next;
            fhir(StatusCode::OK, &response)
        }
        Err((status, issues)) => failure(status, &issues),
    }
}

type Failure = (StatusCode, Vec<Issue>);

/// One entry's request, read.
struct Entry<'a> {
    index: usize,
    method: &'a str,
    /// The type named by the URL.
    resource_type: String,
    /// `Type/id`'s id.
    id: Option<String>,
    /// `Type?query`'s query.
    query: Option<String>,
    if_none_exist: Option<String>,
    resource: Option<Value>,
}

/// Runs a transaction on a copy of the store; returns the copy and the transaction-response.
fn run_transaction(store: &Store, bundle: &Value) -> Result<(Store, Value), Failure> {
    if bundle["resourceType"] != "Bundle" {
        return Err(bad(
            "Bundle.resourceType",
            format!(
                "expected a Bundle at the base, got {}",
                bundle["resourceType"].as_str().unwrap_or("no resourceType")
            ),
        ));
    }
    if bundle["type"] != "transaction" {
        return Err(bad(
            "Bundle.type",
            format!(
                "this server processes transaction Bundles, not {}",
                bundle["type"].as_str().unwrap_or("a Bundle without type")
            ),
        ));
    }
    let raw = bundle["entry"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let entries = raw
        .iter()
        .enumerate()
        .map(|(i, e)| read_entry(i, e))
        .collect::<Result<Vec<_>, _>>()?;
    let issues: Vec<Issue> = entries.iter().flat_map(validate).collect();
    if !issues.is_empty() {
        return Err((StatusCode::UNPROCESSABLE_ENTITY, issues));
    }

    let mut store = store.clone();
    let now = Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    // FHIR's processing order; answers go back in the request's order.
    let rank = |m: &str| match m {
        "DELETE" => 0,
        "POST" => 1,
        "PUT" => 2,
        _ => 3,
    };
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| rank(entries[i].method));

    // First decide where each entry lands, so every urn:uuid is known before any resource is
    // written with its references rewritten.
    let mut targets: Vec<Target> = Vec::with_capacity(entries.len());
    targets.resize_with(entries.len(), || Target::Nothing);
    let mut full_urls: HashMap<String, String> = HashMap::new();
    for &i in &order {
        let e = &entries[i];
        let target = plan(&mut store, e)?;
        if let Target::Create(id) | Target::Matched(id) | Target::Update(id) = &target
            && let Some(full_url) = raw[i]["fullUrl"].as_str()
        {
            full_urls.insert(full_url.to_owned(), format!("{}/{id}", e.resource_type));
        }
        targets[i] = target;
    }

    let mut responses: Vec<Value> = vec![Value::Null; entries.len()];
    for &i in &order {
        let e = &entries[i];
        let by_type = store.resources.entry(e.resource_type.clone()).or_default();
        responses[i] = match &targets[i] {
            Target::Matched(id) => {
                let s = &by_type[id];
                entry_response("200 OK", &e.resource_type, id, s)
            }
            Target::Create(id) | Target::Update(id) => {
                let mut resource = e.resource.clone().unwrap_or(Value::Null);
                rewrite_references(&mut resource, &full_urls);
                resource["id"] = json!(id);
                let previous = by_type.get(id);
                let unchanged = previous.is_some_and(|p| same_content(&p.resource, &resource));
                let stored = match previous {
                    // A real server (HAPI) does not bump the version of a no-op update.
                    Some(p) if unchanged => p.clone(),
                    _ => {
                        let version = previous.map_or(1, |p| p.version + 1);
                        resource["meta"] = json!({
                            "versionId": version.to_string(),
                            "lastUpdated": now,
                        });
                        Stored {
                            version,
                            last_modified: now.clone(),
                            resource,
                        }
                    }
                };
                let status = if previous.is_some() {
                    "200 OK"
                } else {
                    "201 Created"
                };
                let r = entry_response(status, &e.resource_type, id, &stored);
                by_type.insert(id.clone(), stored);
                r
            }
            Target::Deleted => json!({ "response": { "status": "204 No Content" } }),
            Target::Read(id) => {
                let s = &by_type[id];
                let mut r = entry_response("200 OK", &e.resource_type, id, s);
                r["resource"] = s.resource.clone();
                r
            }
            Target::Searched(bundle) => {
                json!({ "resource": bundle, "response": { "status": "200 OK" } })
            }
            Target::Nothing => Value::Null,
        };
    }
    let response = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::now_v7().to_string(),
        "type": "transaction-response",
        "entry": responses,
    });
    Ok((store, response))
}

/// Where an entry lands.
enum Target {
    /// A new resource with this id.
    Create(String),
    /// A conditional create that found this one: nothing written.
    Matched(String),
    /// An existing (or client-named) resource, written over.
    Update(String),
    /// Deleted.
    Deleted,
    /// A read.
    Read(String),
    /// A search's searchset.
    Searched(Value),
    /// Not yet planned.
    Nothing,
}

/// Decides an entry's target; deletes happen here, since they come first and nothing refers
/// to them.
fn plan(store: &mut Store, e: &Entry<'_>) -> Result<Target, Failure> {
    let at = |what: &str| format!("Bundle.entry[{}].request.{what}", e.index);
    match e.method {
        "POST" => match &e.if_none_exist {
            None => Ok(Target::Create(new_id(store))),
            Some(query) => {
                // Some clients send the whole `Type?query`; the spec says only the query.
                let query = query.split_once('?').map_or(query.as_str(), |(_, q)| q);
                let found = matches(store, &e.resource_type, query, &at("ifNoneExist"))?;
                match found.as_slice() {
                    [] => Ok(Target::Create(new_id(store))),
                    [id] => Ok(Target::Matched(id.clone())),
                    _ => Err(several(&e.resource_type, query, "create")),
                }
            }
        },
        "PUT" => match (&e.id, &e.query) {
            (Some(id), _) => Ok(Target::Update(id.clone())),
            (None, Some(query)) => {
                let found = matches(store, &e.resource_type, query, &at("url"))?;
                match found.as_slice() {
                    [] => Ok(Target::Create(new_id(store))),
                    [id] => Ok(Target::Update(id.clone())),
                    _ => Err(several(&e.resource_type, query, "update")),
                }
            }
            (None, None) => Err(bad(
                &at("url"),
                format!("PUT {} needs an id or a search", e.resource_type),
            )),
        },
        "DELETE" => {
            let ids = match (&e.id, &e.query) {
                (Some(id), _) => vec![id.clone()],
                (None, Some(query)) => matches(store, &e.resource_type, query, &at("url"))?,
                (None, None) => {
                    return Err(bad(&at("url"), "DELETE needs an id or a search".into()));
                }
            };
            if let Some(by_type) = store.resources.get_mut(&e.resource_type) {
                for id in ids {
                    by_type.remove(&id);
                }
            }
            Ok(Target::Deleted)
        }
        "GET" => match (&e.id, &e.query) {
            (Some(id), _) => {
                if store
                    .resources
                    .get(&e.resource_type)
                    .is_some_and(|t| t.contains_key(id))
                {
                    Ok(Target::Read(id.clone()))
                } else {
                    Err(not_found(&e.resource_type, id))
                }
            }
            (None, query) => {
                let query = query.as_deref().unwrap_or("");
                let found = matches(store, &e.resource_type, query, &at("url"))?;
                Ok(Target::Searched(searchset(store, &e.resource_type, &found)))
            }
        },
        other => Err(bad(
            &at("method"),
            format!("method {other} is not supported in a transaction by this server"),
        )),
    }
}

fn new_id(store: &mut Store) -> String {
    // One sequence for all types, as HAPI does.
    store.next_id += 1;
    store.next_id.to_string()
}

fn entry_response(status: &str, resource_type: &str, id: &str, s: &Stored) -> Value {
    json!({
        "response": {
            "status": status,
            "location": format!("{resource_type}/{id}/_history/{}", s.version),
            "etag": format!("W/\"{}\"", s.version),
            "lastModified": s.last_modified,
        }
    })
}

fn bad(expression: &str, diagnostics: String) -> Failure {
    (
        StatusCode::BAD_REQUEST,
        vec![Issue::at("invalid", expression.to_owned(), diagnostics)],
    )
}

fn several(resource_type: &str, query: &str, what: &str) -> Failure {
    (
        StatusCode::PRECONDITION_FAILED,
        vec![Issue::error(
            "duplicate",
            &format!(
                "Failed to conditionally {what}: multiple resources match {resource_type}?{query}"
            ),
        )],
    )
}

fn not_found(resource_type: &str, id: &str) -> Failure {
    (
        StatusCode::NOT_FOUND,
        vec![Issue::error(
            "not-found",
            &format!("Resource {resource_type}/{id} is not known"),
        )],
    )
}

fn read_entry(index: usize, entry: &Value) -> Result<Entry<'_>, Failure> {
    let at = |what: &str| format!("Bundle.entry[{index}].{what}");
    let request = &entry["request"];
    let method = request["method"].as_str().ok_or_else(|| {
        bad(
            &at("request.method"),
            "every entry needs request.method".into(),
        )
    })?;
    let url = request["url"]
        .as_str()
        .ok_or_else(|| bad(&at("request.url"), "every entry needs request.url".into()))?;
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (url, None),
    };
    let mut parts = path.trim_matches('/').splitn(2, '/');
    let resource_type = parts.next().unwrap_or("").to_owned();
    let id = parts.next().map(str::to_owned);
    if resource_type.is_empty() || !resource_type.starts_with(|c: char| c.is_ascii_uppercase()) {
        return Err(bad(
            &at("request.url"),
            format!("{url:?} does not start with a resource type"),
        ));
    }
    let resource = entry.get("resource").cloned();
    if matches!(method, "POST" | "PUT") {
        let Some(r) = &resource else {
            return Err(bad(&at("resource"), format!("{method} needs a resource")));
        };
        if r["resourceType"] != resource_type.as_str() {
            return Err(bad(
                &at("resource.resourceType"),
                format!(
                    "the resource is a {} but the request is for {resource_type}",
                    r["resourceType"]
                        .as_str()
                        .unwrap_or("resource without a type")
                ),
            ));
        }
    }
    Ok(Entry {
        index,
        method,
        resource_type,
        id,
        query,
        if_none_exist: request["ifNoneExist"].as_str().map(str::to_owned),
        resource,
    })
}

/// The structural checks a real server makes before processing (R4 cardinality and value
/// sets of the few elements hiway's mappings produce).
fn validate(e: &Entry<'_>) -> Vec<Issue> {
    let Some(resource) = &e.resource else {
        return Vec::new();
    };
    let path = |field: &str| format!("Bundle.entry[{}].resource.{field}", e.index);
    let mut issues = Vec::new();
    let mut required = |field: &str| {
        if resource.get(field).is_none_or(Value::is_null) {
            issues.push(Issue::at(
                "required",
                path(field),
                format!(
                    "{}.{field}: minimum required = 1, but only found 0",
                    e.resource_type
                ),
            ));
        }
    };
    match e.resource_type.as_str() {
        "Observation" => {
            required("status");
            required("code");
        }
        "Encounter" => {
            required("status");
            required("class");
        }
        _ => {}
    }
    let allowed: &[&str] = match e.resource_type.as_str() {
        "Observation" => &[
            "registered",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "cancelled",
            "entered-in-error",
            "unknown",
        ],
        "Encounter" => &[
            "planned",
            "arrived",
            "triaged",
            "in-progress",
            "onleave",
            "finished",
            "cancelled",
            "entered-in-error",
            "unknown",
        ],
        _ => &[],
    };
    if let Some(status) = resource.get("status").and_then(Value::as_str)
        && !allowed.is_empty()
        && !allowed.contains(&status)
    {
        issues.push(Issue::at(
            "code-invalid",
            path("status"),
            format!("{}.status: unknown code {status:?}", e.resource_type),
        ));
    }
    if e.resource_type == "Encounter"
        && let Some(class) = resource.get("class")
        && !class.is_object()
    {
        issues.push(Issue::at(
            "structure",
            path("class"),
            "Encounter.class must be a single Coding in R4 (a list of CodeableConcept is R5)"
                .into(),
        ));
    }
    if e.resource_type == "Patient"
        && let Some(gender) = resource.get("gender").and_then(Value::as_str)
        && !["male", "female", "other", "unknown"].contains(&gender)
    {
        issues.push(Issue::at(
            "code-invalid",
            path("gender"),
            format!("Patient.gender: unknown code {gender:?}"),
        ));
    }
    issues
}

/// Ids of the resources of a type that match a search (`identifier=system|value`,
/// `identifier=value`, `_id=…`, several ANDed). An unknown parameter is a 400, as on a
/// strict server, rather than a search that silently matches everything.
fn matches(
    store: &Store,
    resource_type: &str,
    query: &str,
    expression: &str,
) -> Result<Vec<String>, Failure> {
    let mut criteria = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        match name {
            "identifier" | "_id" => criteria.push((name, value)),
            _ => {
                return Err(bad(
                    expression,
                    format!("unknown search parameter {name:?} for {resource_type}"),
                ));
            }
        }
    }
    let Some(by_type) = store.resources.get(resource_type) else {
        return Ok(Vec::new());
    };
    Ok(by_type
        .iter()
        .filter(|(id, s)| {
            criteria.iter().all(|(name, value)| match *name {
                "_id" => *id == value,
                _ => has_identifier(&s.resource, value),
            })
        })
        .map(|(id, _)| id.clone())
        .collect())
}

/// Whether a resource carries an identifier matching a token search value.
fn has_identifier(resource: &Value, token: &str) -> bool {
    let identifiers = resource["identifier"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    identifiers.iter().any(|i| {
        let system = i["system"].as_str().unwrap_or("");
        let value = i["value"].as_str().unwrap_or("");
        match token.split_once('|') {
            // `system|` matches any value in the system; `|value` one without a system.
            Some((s, "")) => system == s,
            Some((s, v)) => system == s && value == v,
            None => value == token,
        }
    })
}

/// Minimal percent-decoding for search values (`%7C` for `|`, `%3A` for `:`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Replaces every `reference` that names a `urn:uuid:` fullUrl of this transaction.
fn rewrite_references(value: &mut Value, full_urls: &HashMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "reference"
                    && let Some(target) = v.as_str().and_then(|r| full_urls.get(r))
                {
                    *v = Value::String(target.clone());
                } else {
                    rewrite_references(v, full_urls);
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| rewrite_references(v, full_urls)),
        _ => {}
    }
}

/// Whether two versions differ only in `id` and `meta`.
fn same_content(stored: &Value, incoming: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(map) = v.as_object_mut() {
            map.remove("id");
            map.remove("meta");
        }
        v
    };
    strip(stored) == strip(incoming)
}

fn searchset(store: &Store, resource_type: &str, ids: &[String]) -> Value {
    let entries: Vec<Value> = ids
        .iter()
        .filter_map(|id| store.resources.get(resource_type)?.get(id))
        .map(|s| {
            json!({
                "fullUrl": format!("{resource_type}/{}", s.resource["id"].as_str().unwrap_or("")),
                "resource": s.resource,
                "search": { "mode": "match" },
            })
        })
        .collect();
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": entries.len(),
        "entry": entries,
    })
}

async fn search(
    State(inner): State<Arc<Inner>>,
    Path(resource_type): Path<String>,
    RawQuery(query): RawQuery,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    record(&inner, method, uri, headers, Bytes::new());
    let store = inner.store.lock().expect("lock");
    let query = query.unwrap_or_default();
    match matches(&store, &resource_type, &query, "search") {
        Ok(ids) => fhir(StatusCode::OK, &searchset(&store, &resource_type, &ids)),
        Err((status, issues)) => failure(status, &issues),
    }
}

async fn read(
    State(inner): State<Arc<Inner>>,
    Path((resource_type, id)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    record(&inner, method, uri, headers, Bytes::new());
    let store = inner.store.lock().expect("lock");
    match store.resources.get(&resource_type).and_then(|t| t.get(&id)) {
        Some(s) => {
            let mut response = fhir(StatusCode::OK, &s.resource);
            if let Ok(etag) = format!("W/\"{}\"", s.version).parse() {
                response.headers_mut().insert(header::ETAG, etag);
            }
            response
        }
        None => {
            let (status, issues) = not_found(&resource_type, &id);
            failure(status, &issues)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!("{}/fixtures/fhir/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// A client that cannot hang a test: every request has a deadline.
    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client")
    }

    async fn post(server: &FhirServer, bundle: &Value) -> (u16, Value) {
        let response = client()
            .post(server.base_url())
            .header("content-type", "application/fhir+json")
            .body(bundle.to_string())
            .send()
            .await
            .expect("post to the fhir double");
        let status = response.status().as_u16();
        let body = response.json().await.expect("a JSON answer");
        (status, body)
    }

    fn statuses(response: &Value) -> Vec<&str> {
        response["entry"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| e["response"]["status"].as_str().expect("a status"))
            .collect()
    }

    #[tokio::test]
    async fn the_sample_transaction_creates_three_resources_with_references_rewritten() {
        let server = FhirServer::start().await;

        let (status, response) = post(&server, &fixture("transaction-bundle.json")).await;

        assert_eq!(status, 200, "{response}");
        assert_eq!(response["type"], "transaction-response");
        assert_eq!(statuses(&response), ["201 Created"; 3]);
        let sample = fixture("transaction-response.json");
        let keys = |e: &Value| {
            let mut k: Vec<String> = e["response"].as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(&response["entry"][1]),
            keys(&sample["entry"][1]),
            "entries shaped like the sample"
        );
        let location = response["entry"][0]["response"]["location"]
            .as_str()
            .unwrap();
        assert!(
            location.starts_with("Patient/") && location.ends_with("/_history/1"),
            "{location}"
        );
        let patient_ref = location.trim_end_matches("/_history/1");
        let observation = &server.resources("Observation")[0];
        assert_eq!(observation["subject"]["reference"], patient_ref);
        let encounter = &server.resources("Encounter")[0];
        assert_eq!(encounter["subject"]["reference"], patient_ref);
        assert_eq!(
            observation["encounter"]["reference"],
            format!("Encounter/{}", encounter["id"].as_str().unwrap())
        );
    }

    #[tokio::test]
    async fn the_same_transaction_again_matches_the_patient_updates_the_encounter_and_duplicates_the_observation()
     {
        let server = FhirServer::start().await;
        let bundle = fixture("transaction-bundle.json");
        post(&server, &bundle).await;

        let (status, response) = post(&server, &bundle).await;

        assert_eq!(status, 200, "{response}");
        assert_eq!(statuses(&response), ["200 OK", "200 OK", "201 Created"]);
        assert_eq!(server.resources("Patient").len(), 1, "conditional create");
        assert_eq!(server.resources("Encounter").len(), 1, "conditional update");
        assert_eq!(
            server.resources("Observation").len(),
            2,
            "a plain POST duplicates"
        );
    }

    #[tokio::test]
    async fn the_carebundle_sample_creates_all_48_resources_and_leaves_no_urn_uuid_reference() {
        let server = FhirServer::start().await;

        let (status, response) = post(&server, &fixture("carebundle-sample.json")).await;

        assert_eq!(status, 200, "{response}");
        assert_eq!(statuses(&response), ["201 Created"; 48]);
        assert_eq!(server.resources("Observation").len(), 34);
        for resource_type in ["Observation", "DiagnosticReport", "Encounter", "Condition"] {
            for resource in server.resources(resource_type) {
                assert!(
                    !resource.to_string().contains("\"reference\":\"urn:uuid:"),
                    "{resource_type}/{} kept a urn:uuid reference",
                    resource["id"]
                );
            }
        }
    }

    #[tokio::test]
    async fn an_observation_without_status_is_422_naming_the_entry_and_nothing_is_stored() {
        let server = FhirServer::start().await;
        let mut bundle = fixture("transaction-bundle.json");
        bundle["entry"][2]["resource"]
            .as_object_mut()
            .unwrap()
            .remove("status");

        let (status, outcome) = post(&server, &bundle).await;

        assert_eq!(status, 422, "{outcome}");
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        assert_eq!(outcome["issue"][0]["code"], "required");
        assert_eq!(
            outcome["issue"][0]["expression"][0],
            "Bundle.entry[2].resource.status"
        );
        assert!(server.resources("Patient").is_empty(), "all or nothing");
    }

    #[tokio::test]
    async fn an_encounter_class_given_as_an_r5_list_is_422() {
        let server = FhirServer::start().await;
        let mut bundle = fixture("transaction-bundle.json");
        let class = bundle["entry"][1]["resource"]["class"].clone();
        bundle["entry"][1]["resource"]["class"] = json!([class]);

        let (status, outcome) = post(&server, &bundle).await;

        assert_eq!(status, 422, "{outcome}");
        assert_eq!(
            outcome["issue"][0]["expression"][0],
            "Bundle.entry[1].resource.class"
        );
    }

    #[tokio::test]
    async fn two_patients_with_the_same_identifier_make_the_conditional_create_412_and_roll_back() {
        let server = FhirServer::start().await;
        let bundle = fixture("transaction-bundle.json");
        // Two plain creates of the same patient: the duplicates a human must merge.
        let mut twice = bundle.clone();
        let mut plain = bundle["entry"][0].clone();
        plain["request"] = json!({ "method": "POST", "url": "Patient" });
        plain["fullUrl"] = json!("urn:uuid:00000000-0000-4000-8000-000000000001");
        let mut plain2 = plain.clone();
        plain2["fullUrl"] = json!("urn:uuid:00000000-0000-4000-8000-000000000002");
        twice["entry"] = json!([plain, plain2]);
        assert_eq!(post(&server, &twice).await.0, 200);

        let (status, outcome) = post(&server, &bundle).await;

        assert_eq!(status, 412, "{outcome}");
        assert_eq!(outcome["issue"][0]["code"], "duplicate");
        assert!(
            outcome["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .contains(
                    "multiple resources match Patient?identifier=urn:example:openmrs-id|100008E"
                )
        );
        assert!(server.resources("Encounter").is_empty(), "all or nothing");
        assert_eq!(server.resources("Patient").len(), 2);
    }

    #[tokio::test]
    async fn a_bundle_that_is_not_a_transaction_is_400() {
        let server = FhirServer::start().await;
        let mut bundle = fixture("transaction-bundle.json");
        bundle["type"] = json!("collection");

        let (status, outcome) = post(&server, &bundle).await;

        assert_eq!(status, 400, "{outcome}");
        assert_eq!(outcome["issue"][0]["expression"][0], "Bundle.type");
        let (status, _) = post(&server, &fixture("patient.json")).await;
        assert_eq!(status, 400, "a bare resource at the base");
    }

    #[tokio::test]
    async fn scripted_answers_come_first_then_transactions_are_processed_again() {
        let server = FhirServer::start().await;
        server.respond_with(&[Scripted {
            retry_after: Some(3),
            ..Scripted::outcome(503, "transient", "database failover")
        }]);
        let bundle = fixture("transaction-bundle.json");

        let response = client()
            .post(server.base_url())
            .header("content-type", "application/fhir+json")
            .body(bundle.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "3");
        assert!(server.resources("Patient").is_empty());

        assert_eq!(post(&server, &bundle).await.0, 200);
        assert_eq!(server.resources("Patient").len(), 1);
        assert_eq!(server.received().len(), 2);
    }

    #[tokio::test]
    async fn stored_resources_can_be_searched_by_identifier_and_read_by_id() {
        let server = FhirServer::start().await;
        post(&server, &fixture("transaction-bundle.json")).await;
        let http = client();

        let found: Value = http
            .get(format!(
                "{}fhir/Patient?identifier=urn:example:openmrs-id%7C100008E",
                server.base_url()
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(found["total"], 1, "{found}");
        let id = found["entry"][0]["resource"]["id"].as_str().unwrap();
        let read = http
            .get(format!("{}Patient/{id}", server.base_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), 200);
        let missing = http
            .get(format!("{}Patient/nope", server.base_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
        let outcome: Value = missing.json().await.unwrap();
        assert_eq!(outcome["issue"][0]["code"], "not-found");
    }
}
