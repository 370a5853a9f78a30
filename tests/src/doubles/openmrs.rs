//! An OpenMRS double: the REST resources a workflow touches (`patient`, `visit`, `encounter`,
//! `obs`) under `/openmrs/ws/rest/v1/`, kept in memory, on 127.0.0.1 port 0.
//!
//! It behaves the way `protocols.md` §3 describes OpenMRS:
//! - `POST /{resource}` creates (201, a default-ish representation), honouring a client
//!   `uuid`; a uuid already taken is a 500, as the database constraint makes it in OpenMRS;
//! - `GET /{resource}/{uuid}`: 200 (voided resources too, with `"voided": true`) or 404 in the
//!   `error-404.json` shape;
//! - `GET /patient?identifier=` (exact) or `?q=` (identifier, or part of a name):
//!   `{"results": [refs]}`, voided patients left out;
//! - `DELETE /{resource}/{uuid}` voids (404 if unknown); with `?purge=true` it deletes, and a
//!   uuid that is not there answers 204 as OpenMRS does. Purging something another resource
//!   still refers to is a 500 (the foreign key), so a rollback must go in reverse order;
//! - validation: missing required fields and an identifier already in use are 400 in the
//!   `error-400-validation.json` shape; a reference to a uuid that does not exist is 404;
//! - basic auth on every request ([`USERNAME`], [`PASSWORD`]), else 401 in the
//!   `error-401.json` shape with `WWW-Authenticate`.
//!
//! Not modelled: representations other than the default, updates (`POST /{resource}/{uuid}`),
//! persons apart from patients, and the rule that an encounter falls inside its visit's dates.
//!
//! Test hooks: [`OpenMrs::stored`] and [`OpenMrs::find`] read the store, [`OpenMrs::requests`]
//! is every request received (in order), [`OpenMrs::fail_next`] and
//! [`OpenMrs::fail_next_requests`] inject failures, [`OpenMrs::add_patient`] seeds a known
//! patient.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Map, Value, json};
use tokio_util::sync::DropGuard;

/// The user the double accepts.
pub const USERNAME: &str = "admin";
/// Its password (OpenMRS's demo default).
pub const PASSWORD: &str = "Admin123";
/// The REST base path.
pub const BASE: &str = "/openmrs/ws/rest/v1";

/// A resource the double keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// `patient`
    Patient,
    /// `visit`
    Visit,
    /// `encounter`
    Encounter,
    /// `obs`
    Obs,
}

impl Resource {
    const ALL: [Resource; 4] = [
        Resource::Patient,
        Resource::Visit,
        Resource::Encounter,
        Resource::Obs,
    ];

    /// Its path under [`BASE`].
    pub fn path(self) -> &'static str {
        match self {
            Resource::Patient => "patient",
            Resource::Visit => "visit",
            Resource::Encounter => "encounter",
            Resource::Obs => "obs",
        }
    }

    fn from_path(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.path() == s)
    }

    /// Fields a create must have (protocols §3.2).
    fn required(self) -> &'static [&'static str] {
        match self {
            Resource::Patient => &["identifiers", "person"],
            Resource::Visit => &["patient", "visitType"],
            Resource::Encounter => &["encounterDatetime", "patient", "encounterType"],
            Resource::Obs => &["person", "concept", "obsDatetime", "value"],
        }
    }

    /// Fields that refer to another resource of the double, which must exist.
    fn references(self) -> &'static [(&'static str, Resource)] {
        match self {
            Resource::Patient => &[],
            Resource::Visit => &[("patient", Resource::Patient)],
            Resource::Encounter => &[("patient", Resource::Patient), ("visit", Resource::Visit)],
            // A patient's person has the patient's uuid.
            Resource::Obs => &[
                ("person", Resource::Patient),
                ("encounter", Resource::Encounter),
            ],
        }
    }

    /// Fields that refer to metadata (types, concepts, locations): shown as refs.
    fn metadata(self) -> &'static [&'static str] {
        match self {
            Resource::Patient => &[],
            Resource::Visit => &["visitType", "location"],
            Resource::Encounter => &["encounterType", "location", "form"],
            Resource::Obs => &["concept", "location"],
        }
    }

    /// The noun of its privileges, as in "Get Patients".
    fn privilege_noun(self) -> &'static str {
        match self {
            Resource::Patient => "Patients",
            Resource::Visit => "Visits",
            Resource::Encounter => "Encounters",
            Resource::Obs => "Observations",
        }
    }
}

/// One request the double received.
#[derive(Clone, Debug)]
pub struct Request {
    /// Its method.
    pub method: Method,
    /// The path after the base, e.g. `visit/c4e1…` or `patient`.
    pub path: String,
    /// The query string, if any.
    pub query: Option<String>,
    /// The JSON body (`Null` when there was none or it was not JSON).
    pub body: Value,
    /// Whether it carried the right credentials.
    pub authorized: bool,
    /// Its `X-Hiway-Message-Id`, if any.
    pub message_id: Option<String>,
}

impl Request {
    /// The resource it addressed, if one of the double's.
    pub fn resource(&self) -> Option<Resource> {
        Resource::from_path(self.path.split('/').next().unwrap_or(""))
    }

    /// Whether it is `method` on `resource`.
    pub fn is(&self, method: &Method, resource: Resource) -> bool {
        self.method == *method && self.resource() == Some(resource)
    }
}

impl fmt::Display for Request {
    /// `DELETE visit/c4e1…?purge=true`, the way a test names a request in an assertion.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        if let Some(q) = &self.query {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

/// A scripted answer to the next matching request.
struct Injected {
    method: Method,
    resource: Resource,
    status: StatusCode,
    body: Value,
}

#[derive(Default)]
struct Inner {
    /// Every resource, in creation order; purged ones are removed.
    store: Vec<(Resource, Value)>,
    requests: Vec<Request>,
    injected: VecDeque<Injected>,
    /// The next this many requests get this status, whatever they are.
    outage: Option<(usize, StatusCode)>,
}

/// The double. Dropping it stops the server.
pub struct OpenMrs {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    /// Stops the server when the double is dropped.
    _stop: DropGuard,
}

impl OpenMrs {
    /// Starts a double on a free port.
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let (listener, addr) = super::bind("OpenMRS", 0).await;
        let stop = super::serve(listener, app);
        Self {
            addr,
            inner,
            _stop: stop,
        }
    }

    /// The REST base URL, `http://127.0.0.1:<port>/openmrs/ws/rest/v1/`: a destination's
    /// `url`.
    pub fn url(&self) -> String {
        format!("http://{}{BASE}/", self.addr)
    }

    /// Every stored `resource` (voided ones too), in creation order.
    pub fn stored(&self, resource: Resource) -> Vec<Value> {
        self.lock()
            .store
            .iter()
            .filter(|(r, _)| *r == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// One stored resource.
    pub fn find(&self, resource: Resource, uuid: &str) -> Option<Value> {
        self.lock().find(resource, uuid).cloned()
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// Stores a patient as if an earlier system had created it (no request is logged).
    /// Returns its uuid.
    pub fn add_patient(&self, payload: Value) -> String {
        let Value::Object(payload) = payload else {
            panic!("a patient is a JSON object")
        };
        let mut inner = self.lock();
        let representation = inner.represent(Resource::Patient, payload);
        let uuid = uuid_of(&representation).to_owned();
        inner.store.push((Resource::Patient, representation));
        uuid
    }

    /// The next `method` on `resource` is answered `status` with `body` (and changes nothing).
    pub fn fail_next(&self, method: Method, resource: Resource, status: u16, body: Value) {
        self.lock().injected.push_back(Injected {
            method,
            resource,
            status: StatusCode::from_u16(status).expect("a status code"),
            body,
        });
    }

    /// The next `n` requests, whatever they are, are answered `status` (an outage: a proxy's
    /// 503, say) and change nothing.
    pub fn fail_next_requests(&self, n: usize, status: u16) {
        self.lock().outage = Some((n, StatusCode::from_u16(status).expect("a status code")));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("OpenMRS double lock")
    }
}

/// The `error-400-validation.json` shape: `Invalid Submission` with field errors, each
/// `(field, code, message)`.
pub fn validation_error(fields: &[(&str, &str, &str)]) -> Value {
    let mut field_errors = Map::new();
    for (field, code, message) in fields {
        let list = field_errors
            .entry((*field).to_owned())
            .or_insert_with(|| json!([]));
        if let Value::Array(list) = list {
            list.push(json!({ "code": code, "message": message }));
        }
    }
    json!({ "error": {
        "message": "Invalid Submission",
        "code": "webservices.rest.error.invalid.submission",
        "globalErrors": [],
        "fieldErrors": field_errors,
    } })
}

/// The `wrapErrorResponse` shape of every other error (`error-401.json`, `error-404.json`).
pub fn wrapped_error(message: &str, code: &str, raw: Option<&str>) -> Value {
    json!({ "error": {
        "message": message,
        "code": code,
        "detail": "",
        "rawMessage": raw,
        "translatedMessage": raw,
    } })
}

/// `error-404.json`: a uuid that does not exist.
pub fn not_found_error() -> Value {
    wrapped_error(
        "Object with given uuid doesn't exist [null]",
        "org.openmrs.module.webservices.rest.web.resource.impl.DelegatingCrudResource:83",
        None,
    )
}

/// `error-401.json`: no or wrong credentials for a privilege such as `Get Patients`.
pub fn unauthorized_error(privilege: &str) -> Value {
    let raw = format!("Privileges required: {privilege}");
    wrapped_error(
        &format!("User is not logged in [{raw}]"),
        "org.openmrs.aop.AuthorizationAdvice:75",
        Some(&raw),
    )
}

impl Inner {
    fn find(&self, resource: Resource, uuid: &str) -> Option<&Value> {
        self.store
            .iter()
            .find(|(r, v)| *r == resource && uuid_of(v) == uuid)
            .map(|(_, v)| v)
    }

    /// The default-ish representation of a create payload: the fields sent, references as
    /// refs (`{"uuid", "display", "links"}`), plus `uuid`, `display`, `voided` and `links`.
    fn represent(&self, resource: Resource, mut payload: Map<String, Value>) -> Value {
        let uuid = match payload.get("uuid").and_then(Value::as_str) {
            Some(u) => u.to_owned(),
            None => uuid::Uuid::now_v7().to_string(),
        };
        for (field, target) in resource.references() {
            if let Some(reference) = payload.get(*field).and_then(reference_uuid) {
                let display = self
                    .find(*target, &reference)
                    .and_then(|v| v.get("display").cloned())
                    .unwrap_or(Value::Null);
                payload.insert(
                    (*field).to_owned(),
                    reference_rep(*target, &reference, display),
                );
            }
        }
        for field in resource.metadata() {
            if let Some(reference) = payload.get(*field).and_then(reference_uuid) {
                payload.insert((*field).to_owned(), json!({ "uuid": reference }));
            }
        }
        let display = match resource {
            Resource::Patient => {
                let identifier = payload
                    .get("identifiers")
                    .and_then(|ids| ids[0]["identifier"].as_str())
                    .unwrap_or("")
                    .to_owned();
                let person = payload.get_mut("person").and_then(Value::as_object_mut);
                let name = person
                    .as_ref()
                    .and_then(|p| p.get("names"))
                    .and_then(|n| n.get(0))
                    .map(|n| {
                        format!(
                            "{} {}",
                            n["givenName"].as_str().unwrap_or(""),
                            n["familyName"].as_str().unwrap_or("")
                        )
                    })
                    .unwrap_or_default();
                // A patient is a person: they share the uuid.
                if let Some(person) = person {
                    person.insert("uuid".into(), json!(uuid));
                    person.insert("display".into(), json!(name));
                }
                if let Some(Value::Array(ids)) = payload.get_mut("identifiers") {
                    for id in ids.iter_mut().filter_map(Value::as_object_mut) {
                        id.entry("uuid")
                            .or_insert_with(|| json!(uuid::Uuid::now_v7().to_string()));
                    }
                }
                format!("{identifier} - {name}")
            }
            Resource::Visit => format!("Visit @ {}", text(&payload, "startDatetime")),
            Resource::Encounter => format!("Encounter @ {}", text(&payload, "encounterDatetime")),
            Resource::Obs => format!("Obs: {}", payload.get("value").unwrap_or(&Value::Null)),
        };
        payload.insert("uuid".into(), json!(uuid));
        payload.insert("display".into(), json!(display));
        payload.insert("voided".into(), json!(false));
        payload.insert("links".into(), links(resource, &uuid));
        Value::Object(payload)
    }

    fn create(&mut self, resource: Resource, body: &[u8]) -> (StatusCode, Value) {
        let Ok(Value::Object(payload)) = serde_json::from_slice::<Value>(body) else {
            return (
                StatusCode::BAD_REQUEST,
                wrapped_error(
                    "Could not read JSON: the body is not a JSON object",
                    "org.openmrs.module.webservices.rest.web.RestUtil:1",
                    None,
                ),
            );
        };
        if let Some(uuid) = payload.get("uuid").and_then(Value::as_str)
            && self.find(resource, uuid).is_some()
        {
            // OpenMRS does not check: the unique index on uuid does, and that is a 500.
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                wrapped_error(
                    &format!(
                        "could not execute statement [Duplicate entry '{uuid}' for key 'uuid']"
                    ),
                    "org.hibernate.exception.ConstraintViolationException:1",
                    None,
                ),
            );
        }
        let missing: Vec<(&str, &str, &str)> = resource
            .required()
            .iter()
            .filter(|f| payload.get(**f).is_none_or(Value::is_null))
            .map(|f| (*f, "error.null", "Cannot be empty or null"))
            .collect();
        if !missing.is_empty() {
            return (StatusCode::BAD_REQUEST, validation_error(&missing));
        }
        if resource == Resource::Patient
            && let Some(errors) = self.patient_errors(&payload)
        {
            return (StatusCode::BAD_REQUEST, errors);
        }
        for (field, target) in resource.references() {
            let Some(value) = payload.get(*field) else {
                continue;
            };
            let exists = reference_uuid(value).is_some_and(|u| self.find(*target, &u).is_some());
            if !exists {
                return (StatusCode::NOT_FOUND, not_found_error());
            }
        }
        let representation = self.represent(resource, payload);
        self.store.push((resource, representation.clone()));
        (StatusCode::CREATED, representation)
    }

    /// `PatientValidator`'s rules that matter here: at least one identifier, each with a
    /// value and a type and not in use by another patient; at least one name.
    fn patient_errors(&self, payload: &Map<String, Value>) -> Option<Value> {
        let identifiers = payload
            .get("identifiers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if identifiers.is_empty() {
            return Some(validation_error(&[(
                "identifiers",
                "Patient.identifiers.required",
                "At least one identifier is required",
            )]));
        }
        for (i, id) in identifiers.iter().enumerate() {
            let Some(value) = id.get("identifier").and_then(Value::as_str) else {
                return Some(validation_error(&[(
                    &format!("identifiers[{i}].identifier"),
                    "error.null",
                    "Cannot be empty or null",
                )]));
            };
            if id.get("identifierType").is_none_or(Value::is_null) {
                return Some(validation_error(&[(
                    &format!("identifiers[{i}].identifierType"),
                    "error.null",
                    "Cannot be empty or null",
                )]));
            }
            let in_use = self.store.iter().any(|(r, p)| {
                *r == Resource::Patient
                    && p["voided"] != json!(true)
                    && p["identifiers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|other| other["identifier"].as_str() == Some(value))
            });
            if in_use {
                return Some(validation_error(&[(
                    &format!("identifiers[{i}].identifier"),
                    "PatientIdentifier.error.duplicate",
                    &format!("Identifier {value} already in use by another patient"),
                )]));
            }
        }
        let has_name = payload
            .get("person")
            .and_then(|p| p["names"].as_array())
            .is_some_and(|n| !n.is_empty());
        if !has_name {
            return Some(validation_error(&[(
                "person.names",
                "Person.names.required",
                "At least one name is required",
            )]));
        }
        None
    }

    fn search(&self, resource: Resource, query: &[(String, String)]) -> Value {
        let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let results: Vec<Value> = self
            .store
            .iter()
            .filter(|(r, v)| *r == resource && v["voided"] != json!(true))
            .filter(|(_, v)| {
                let identifiers = || {
                    v["identifiers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|i| i["identifier"].as_str())
                };
                match (param("identifier"), param("q")) {
                    (Some(id), _) => identifiers().any(|i| i == id),
                    (None, Some(q)) => {
                        let q = q.to_lowercase();
                        identifiers().any(|i| i.to_lowercase() == q)
                            || v["person"]["display"]
                                .as_str()
                                .is_some_and(|n| n.to_lowercase().contains(&q))
                    }
                    (None, None) => true,
                }
            })
            .map(|(_, v)| reference_rep(resource, uuid_of(v), v["display"].clone()))
            .collect();
        json!({ "results": results })
    }

    fn delete(&mut self, resource: Resource, uuid: &str, purge: bool) -> (StatusCode, Value) {
        let Some(i) = self
            .store
            .iter()
            .position(|(r, v)| *r == resource && uuid_of(v) == uuid)
        else {
            // Purging what is not there succeeds (DELETE is idempotent); voiding it is a 404.
            return if purge {
                (StatusCode::NO_CONTENT, Value::Null)
            } else {
                (StatusCode::NOT_FOUND, not_found_error())
            };
        };
        if !purge {
            self.store[i].1["voided"] = json!(true);
            return (StatusCode::NO_CONTENT, Value::Null);
        }
        let referrer = self.store.iter().find(|(r, v)| {
            r.references().iter().any(|(field, target)| {
                *target == resource && v[*field]["uuid"].as_str() == Some(uuid)
            })
        });
        if let Some((r, v)) = referrer {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                wrapped_error(
                    &format!(
                        "could not execute statement [Cannot delete or update a parent row: \
                         {} {} refers to {} {uuid}]",
                        r.path(),
                        uuid_of(v),
                        resource.path()
                    ),
                    "org.hibernate.exception.ConstraintViolationException:1",
                    None,
                ),
            );
        }
        self.store.remove(i);
        (StatusCode::NO_CONTENT, Value::Null)
    }
}

fn uuid_of(v: &Value) -> &str {
    v["uuid"].as_str().unwrap_or("")
}

fn text<'a>(payload: &'a Map<String, Value>, field: &str) -> &'a str {
    payload.get(field).and_then(Value::as_str).unwrap_or("")
}

/// A reference is a uuid, or an object with one.
fn reference_uuid(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("uuid").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn reference_rep(resource: Resource, uuid: &str, display: Value) -> Value {
    json!({ "uuid": uuid, "display": display, "links": links(resource, uuid) })
}

fn links(resource: Resource, uuid: &str) -> Value {
    json!([{ "rel": "self", "uri": format!("{BASE}/{}/{uuid}", resource.path()), "resourceAlias": resource.path() }])
}

fn answer(status: StatusCode, body: Value) -> Response {
    if status == StatusCode::NO_CONTENT {
        return status.into_response();
    }
    (
        status,
        [(header::CONTENT_TYPE, "application/json;charset=UTF-8")],
        body.to_string(),
    )
        .into_response()
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(path) = uri.path().strip_prefix(BASE) else {
        return answer(
            StatusCode::NOT_FOUND,
            wrapped_error("Unknown resource", "not under /openmrs/ws/rest/v1", None),
        );
    };
    let path = path.trim_matches('/').to_owned();
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USERNAME}:{PASSWORD}"))
    );
    let authorized = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(expected.as_str());
    let query: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let request = Request {
        method: method.clone(),
        path: path.clone(),
        query: uri.query().map(str::to_owned),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        authorized,
        message_id: headers
            .get("x-hiway-message-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    let mut inner = inner.lock().expect("OpenMRS double lock");
    inner.requests.push(request);

    let segments: Vec<&str> = path.split('/').collect();
    let Some(resource) = Resource::from_path(segments[0]) else {
        return answer(
            StatusCode::NOT_FOUND,
            wrapped_error(
                &format!("Unknown resource: {}", segments[0]),
                "org.openmrs.module.webservices.rest.web.response.UnknownResourceException:1",
                None,
            ),
        );
    };
    let purge = query.iter().any(|(k, v)| k == "purge" && v == "true");

    if !authorized {
        let verb = match method {
            Method::GET => "Get",
            Method::POST => "Add",
            Method::DELETE if purge => "Purge",
            _ => "Delete",
        };
        let privilege = format!("{verb} {}", resource.privilege_noun());
        let mut response = answer(StatusCode::UNAUTHORIZED, unauthorized_error(&privilege));
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"OpenMRS at /openmrs\""),
        );
        return response;
    }
    if let Some((left, status)) = inner.outage.take() {
        if left > 1 {
            inner.outage = Some((left - 1, status));
        }
        // What a proxy in front of a restarting OpenMRS sends: not OpenMRS's JSON.
        return (status, "<html><body>Service Unavailable</body></html>").into_response();
    }
    if let Some(i) = inner
        .injected
        .iter()
        .position(|f| f.method == method && f.resource == resource)
        && let Some(failure) = inner.injected.remove(i)
    {
        return answer(failure.status, failure.body);
    }

    match (&method, segments.as_slice()) {
        (&Method::POST, [_]) => {
            let (status, body) = inner.create(resource, &body);
            answer(status, body)
        }
        (&Method::GET, [_]) => answer(StatusCode::OK, inner.search(resource, &query)),
        (&Method::GET, [_, uuid]) => match inner.find(resource, uuid) {
            Some(v) => answer(StatusCode::OK, v.clone()),
            None => answer(StatusCode::NOT_FOUND, not_found_error()),
        },
        (&Method::DELETE, [_, uuid]) => {
            let (status, body) = inner.delete(resource, uuid, purge);
            answer(status, body)
        }
        _ => answer(
            StatusCode::METHOD_NOT_ALLOWED,
            wrapped_error(
                &format!("{method} {path} is not supported by the OpenMRS double"),
                "org.springframework.web.HttpRequestMethodNotSupportedException:1",
                None,
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!("{}/fixtures/openmrs/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    /// The structure of a JSON value: keys kept, leaves replaced by their type.
    fn shape(v: &Value) -> Value {
        match v {
            Value::Object(o) => {
                Value::Object(o.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(shape).collect()),
            Value::String(_) => json!("string"),
            Value::Number(_) => json!("number"),
            Value::Bool(_) => json!("bool"),
            Value::Null => json!("null"),
        }
    }

    /// A client with a timeout, so a double that stops answering fails the test instead of
    /// hanging it.
    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .unwrap()
    }

    async fn post(double: &OpenMrs, resource: &str, body: &Value) -> (u16, Value) {
        let response = client()
            .post(format!("{}{resource}", double.url()))
            .basic_auth(USERNAME, Some(PASSWORD))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    #[test]
    fn its_error_bodies_have_the_shapes_of_the_openmrs_samples() {
        assert_eq!(not_found_error(), fixture("error-404.json"));
        assert_eq!(
            unauthorized_error("Get Patients"),
            fixture("error-401.json")
        );
        let validation = validation_error(&[(
            "identifiers[0].identifier",
            "PatientIdentifier.error.duplicate",
            "any message",
        )]);
        assert_eq!(
            shape(&validation),
            shape(&fixture("error-400-validation.json"))
        );
        let wrapped = wrapped_error("m", "c", Some("r"));
        assert_eq!(shape(&wrapped), shape(&fixture("error-401.json")));
    }

    #[tokio::test]
    async fn a_second_patient_with_the_same_identifier_gets_exactly_the_sample_validation_error() {
        let double = OpenMrs::start().await;
        let patient = fixture("patient-create.json");
        assert_eq!(post(&double, "patient", &patient).await.0, 201);

        let mut twin = patient.clone();
        twin["uuid"] = json!("another-uuid");
        let (status, body) = post(&double, "patient", &twin).await;

        assert_eq!(status, 400);
        assert_eq!(body, fixture("error-400-validation.json"));
        assert_eq!(double.stored(Resource::Patient).len(), 1);
    }

    #[tokio::test]
    async fn requests_without_credentials_get_the_sample_401_and_a_challenge() {
        let double = OpenMrs::start().await;
        let response = client()
            .get(format!("{}patient?q=100008E", double.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        assert!(response.headers().contains_key("www-authenticate"));
        assert_eq!(
            response.json::<Value>().await.unwrap(),
            fixture("error-401.json")
        );
        assert!(!double.requests()[0].authorized);
    }

    #[tokio::test]
    async fn creates_honour_the_client_uuid_check_references_and_are_found_by_identifier() {
        let double = OpenMrs::start().await;
        let patient = fixture("patient-create.json");
        let (status, created) = post(&double, "patient", &patient).await;
        assert_eq!(status, 201);
        assert_eq!(created["uuid"], patient["uuid"]);
        assert_eq!(created["person"]["uuid"], patient["uuid"]);

        let mut visit = fixture("visit-create.json");
        visit["patient"] = json!("nobody");
        let (status, body) = post(&double, "visit", &visit).await;
        assert_eq!(status, 404, "a visit of an unknown patient");
        assert_eq!(body, fixture("error-404.json"));
        let (status, body) = post(&double, "visit", &json!({ "patient": patient["uuid"] })).await;
        assert_eq!(status, 400);
        assert_eq!(
            body["error"]["fieldErrors"]["visitType"][0]["code"],
            "error.null"
        );

        for query in ["identifier=100008E", "q=100008E", "q=banda"] {
            let found: Value = client()
                .get(format!("{}patient?{query}", double.url()))
                .basic_auth(USERNAME, Some(PASSWORD))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(found["results"][0]["uuid"], patient["uuid"], "{query}");
        }
    }

    #[tokio::test]
    async fn purging_a_patient_that_a_visit_refers_to_fails_and_a_purge_in_reverse_order_succeeds()
    {
        let double = OpenMrs::start().await;
        let patient = fixture("patient-create.json");
        post(&double, "patient", &patient).await;
        let mut visit = fixture("visit-create.json");
        visit["uuid"] = json!("v1");
        assert_eq!(post(&double, "visit", &visit).await.0, 201);
        let delete = |path: String| {
            client()
                .delete(format!("{}{path}?purge=true", double.url()))
                .basic_auth(USERNAME, Some(PASSWORD))
                .send()
        };
        let uuid = patient["uuid"].as_str().unwrap();

        assert_eq!(
            delete(format!("patient/{uuid}")).await.unwrap().status(),
            500
        );
        assert_eq!(delete("visit/v1".into()).await.unwrap().status(), 204);
        assert_eq!(
            delete(format!("patient/{uuid}")).await.unwrap().status(),
            204
        );
        assert!(double.stored(Resource::Patient).is_empty());
        assert!(double.stored(Resource::Visit).is_empty());
    }

    #[tokio::test]
    async fn injected_failures_answer_once_and_change_nothing() {
        let double = OpenMrs::start().await;
        double.fail_next_requests(2, 503);
        double.fail_next(
            Method::POST,
            Resource::Patient,
            500,
            json!({"error": {"message": "x"}}),
        );
        let patient = fixture("patient-create.json");

        assert_eq!(post(&double, "patient", &patient).await.0, 503);
        assert_eq!(post(&double, "patient", &patient).await.0, 503);
        assert_eq!(post(&double, "patient", &patient).await.0, 500);
        assert!(double.stored(Resource::Patient).is_empty());
        assert_eq!(post(&double, "patient", &patient).await.0, 201);
        assert_eq!(double.requests().len(), 4);
    }
}
