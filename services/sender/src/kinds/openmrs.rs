//! The `openmrs` kind: one message is a workflow of several REST calls (patient, visit,
//! encounter, observations), made safe to retry with client-chosen uuids and undone when it
//! cannot be finished.
//!
//! The message body is a *workflow document* (see `docs/kinds/openmrs.md`):
//!
//! ```json
//! { "patient":   { "uuid": "…", "identifiers": [{ "identifier": "100008E", … }], "person": { … } },
//!   "visit":     { "uuid": "…", "visitType": "…", … },
//!   "encounter": { "uuid": "…", "encounterType": "…", "encounterDatetime": "…", … },
//!   "obs":       [ { "uuid": "…", "concept": "…", "obsDatetime": "…", "value": 61.5 } ] }
//! ```
//!
//! Only `patient` is required. The destination URL is the REST base
//! (`…/openmrs/ws/rest/v1/`). Steps, in order:
//! 1. patient: `GET patient?identifier=<first identifier>`. A patient found under another uuid
//!    is used as is and never rolled back. Otherwise `GET patient/{uuid}`: 200 means an earlier
//!    attempt created it; 404 means `POST patient`.
//! 2. visit, encounter, each obs: `GET {resource}/{uuid}`, and on 404 `POST {resource}` with
//!    the references (patient, visit, encounter, person) filled in by hiway.
//!
//! Checking with GET before every POST is what makes a retry resume rather than duplicate
//! (protocols §3.4: an error on a second POST proves nothing). A transient failure is retried
//! without undoing anything. A permanent one rolls back: every resource of the workflow that
//! exists under the uuid the document chose is deleted, last created first, then the message
//! is dead. A 500 is ambiguous (often a business rule, protocols §7): it is retried, and rolled
//! back first when it was the last attempt.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use hiway_config::DestinationKind;
use hiway_proto::{Envelope, headers};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Map, Value};

use super::http::{Answer, exchange, request};
use crate::destination::Destination;
use crate::outcome::{self, ERROR_TEXT_LIMIT, Outcome};

/// Sends one workflow document.
pub(crate) async fn send(destination: &Destination, envelope: &Envelope, body: Bytes) -> Outcome {
    // The kind makes its own requests from the document; a transform-chosen path or method
    // would be silently ignored, so it is refused instead.
    if envelope.path.is_some() || envelope.method.is_some() {
        return Outcome::Permanent {
            status: None,
            error: "the openmrs kind builds its own requests from a workflow document; \
                    the route's transform must not choose a path or method"
                .into(),
        };
    }
    let workflow = match Workflow::parse(&body) {
        Ok(w) => w,
        Err(reason) => {
            return Outcome::Permanent {
                status: None,
                error: format!("not an OpenMRS workflow document: {reason}"),
            };
        }
    };
    let run = Run {
        destination,
        envelope,
        last_attempt: envelope.attempt.saturating_add(1) >= destination.retry.max_attempts(),
    };
    run.execute(&workflow).await
}

/// The OpenMRS resources a workflow creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resource {
    Patient,
    Visit,
    Encounter,
    Obs,
}

impl Resource {
    /// Its path under the REST base.
    fn path(self) -> &'static str {
        match self {
            Resource::Patient => "patient",
            Resource::Visit => "visit",
            Resource::Encounter => "encounter",
            Resource::Obs => "obs",
        }
    }
}

/// One resource of the workflow, as the document gave it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Step {
    /// Where it is in the document: `patient`, `visit`, `encounter`, `obs[2]`.
    name: String,
    resource: Resource,
    /// The uuid the document chose for it.
    uuid: String,
    /// The create payload, `uuid` included.
    payload: Map<String, Value>,
}

/// A parsed workflow document.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Workflow {
    patient: Step,
    /// The patient's first identifier, by which an existing patient is found.
    identifier: String,
    visit: Option<Step>,
    encounter: Option<Step>,
    obs: Vec<Step>,
}

impl Workflow {
    /// Reads a body; the error names the field that is missing or wrong.
    pub(crate) fn parse(body: &[u8]) -> Result<Self, String> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
        let Value::Object(mut document) = value else {
            return Err("the body is not a JSON object".into());
        };
        // Unknown keys are refused: a misspelt "observations" would otherwise be dropped and
        // the workflow reported delivered without them.
        if let Some(key) = document
            .keys()
            .find(|k| !matches!(k.as_str(), "patient" | "visit" | "encounter" | "obs"))
        {
            return Err(format!(
                "unknown field `{key}` (expected patient, visit, encounter, obs)"
            ));
        }
        let patient = match document.remove("patient") {
            Some(v) => step("patient", Resource::Patient, v)?,
            None => return Err("`patient` is missing".into()),
        };
        let identifier = patient
            .payload
            .get("identifiers")
            .and_then(Value::as_array)
            .and_then(|ids| ids.first())
            .and_then(|id| id.get("identifier"))
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .ok_or("`patient.identifiers[0].identifier` is missing or not a non-empty string")?
            .to_owned();
        let visit = document
            .remove("visit")
            .filter(|v| !v.is_null())
            .map(|v| step("visit", Resource::Visit, v))
            .transpose()?;
        let encounter = document
            .remove("encounter")
            .filter(|v| !v.is_null())
            .map(|v| step("encounter", Resource::Encounter, v))
            .transpose()?;
        let obs = match document.remove("obs") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| step(&format!("obs[{i}]"), Resource::Obs, v))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err("`obs` is not a list".into()),
        };
        let workflow = Self {
            patient,
            identifier,
            visit,
            encounter,
            obs,
        };
        // Two steps with one uuid: the second would find the first by GET and be skipped, so
        // the workflow would be reported delivered without it.
        let mut seen: Vec<&Step> = Vec::new();
        for s in workflow.steps() {
            if let Some(first) = seen.iter().find(|f| f.uuid == s.uuid) {
                return Err(format!(
                    "`{}.uuid` repeats the uuid of `{}`: every resource needs its own",
                    s.name, first.name
                ));
            }
            seen.push(s);
        }
        Ok(workflow)
    }

    /// Every step, in the order they are made.
    fn steps(&self) -> impl Iterator<Item = &Step> {
        std::iter::once(&self.patient)
            .chain(&self.visit)
            .chain(&self.encounter)
            .chain(&self.obs)
    }

    /// What a rollback deletes, in order: the reverse of creation (observations, encounter,
    /// visit, patient), so nothing is deleted while something else still refers to it. A
    /// patient found by identifier belongs to someone else's history and is left alone.
    pub(crate) fn rollback_plan(&self, patient_reused: bool) -> Vec<&Step> {
        let mut plan: Vec<&Step> = self.steps().collect();
        if patient_reused {
            plan.remove(0);
        }
        plan.reverse();
        plan
    }

    /// The payload to POST for `step`, with the references hiway owns filled in: the
    /// patient's uuid (its own or the one found by identifier), and the visit and encounter
    /// of this workflow when it has them. A reference the document gave for a step it does
    /// not contain (an encounter's existing visit, say) is kept.
    pub(crate) fn payload(&self, step: &Step, patient: &str) -> Value {
        let mut payload = step.payload.clone();
        let mut set = |key: &str, uuid: &str| {
            payload.insert(key.to_owned(), Value::String(uuid.to_owned()));
        };
        match step.resource {
            Resource::Patient => {}
            Resource::Visit => set("patient", patient),
            Resource::Encounter => {
                set("patient", patient);
                if let Some(visit) = &self.visit {
                    set("visit", &visit.uuid);
                }
            }
            Resource::Obs => {
                set("person", patient);
                if let Some(encounter) = &self.encounter {
                    set("encounter", &encounter.uuid);
                }
            }
        }
        Value::Object(payload)
    }
}

/// One step read from the document: an object with a usable `uuid`.
fn step(name: &str, resource: Resource, value: Value) -> Result<Step, String> {
    let Value::Object(payload) = value else {
        return Err(format!("`{name}` is not an object"));
    };
    let uuid = match payload.get("uuid") {
        None | Some(Value::Null) => {
            return Err(format!(
                "`{name}.uuid` is missing: hiway needs a client-chosen uuid to make retries safe"
            ));
        }
        Some(Value::String(s)) if is_uuid(s) => s.clone(),
        Some(_) => {
            return Err(format!(
                "`{name}.uuid` is not a uuid (1 to 38 letters, digits and dashes)"
            ));
        }
    };
    Ok(Step {
        name: name.to_owned(),
        resource,
        uuid,
        payload,
    })
}

/// OpenMRS uuids are 36-character UUIDs or CIEL-style strings (`5089AAAA…`), at most 38
/// characters. The check also keeps a uuid from changing the URL it is put into.
fn is_uuid(s: &str) -> bool {
    (1..=38).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// How a step's failure is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Severity {
    /// Network, timeout, 429, 502/503/504: retry; the next attempt resumes.
    Transient,
    /// 500: retried, but rolled back first on the last attempt.
    Ambiguous,
    /// Everything else: roll back and give up.
    Permanent,
}

/// Why a step did not complete.
#[derive(Debug)]
struct Failure {
    step: String,
    /// The request that failed, e.g. `POST obs`.
    request: String,
    severity: Severity,
    status: Option<u16>,
    retry_after: Option<Duration>,
    /// What went wrong, in OpenMRS's words where it gave any.
    reason: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "step {} failed ({}): {}",
            self.step, self.request, self.reason
        )
    }
}

/// What a rollback managed.
#[derive(Debug, Default)]
struct Rollback {
    /// `encounter 9c1…` for each resource deleted.
    removed: Vec<String>,
    /// Each resource that may still be there, with why.
    failed: Vec<String>,
}

impl fmt::Display for Rollback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.removed.is_empty() {
            write!(f, "nothing to roll back")?;
        } else {
            write!(f, "rolled back {}", self.removed.join(", "))?;
        }
        if !self.failed.is_empty() {
            write!(
                f,
                "; ROLLBACK INCOMPLETE, still in OpenMRS: {}",
                self.failed.join(", ")
            )?;
        }
        Ok(())
    }
}

/// One attempt at one workflow.
struct Run<'a> {
    destination: &'a Destination,
    envelope: &'a Envelope,
    /// No retry follows this attempt: the message goes dead whatever it comes to.
    last_attempt: bool,
}

impl Run<'_> {
    async fn execute(&self, workflow: &Workflow) -> Outcome {
        let mut patient_reused = false;
        let result = async {
            let (patient, reused, mut status) = self.patient(workflow).await?;
            patient_reused = reused;
            for step in workflow.steps().skip(1) {
                status = self.ensure(step, workflow.payload(step, &patient)).await?;
            }
            Ok::<u16, Failure>(status)
        }
        .await;
        let failure = match result {
            Ok(status) => return Outcome::Delivered { status },
            Err(f) => f,
        };
        tracing::info!(step = %failure.step, status = failure.status, severity = ?failure.severity, "openmrs workflow step failed");
        match failure.severity {
            Severity::Transient => Outcome::Retry {
                status: failure.status,
                error: format!("{failure}; nothing rolled back, the next attempt resumes"),
                retry_after: failure.retry_after,
            },
            Severity::Ambiguous if !self.last_attempt => Outcome::Retry {
                status: failure.status,
                error: format!("{failure}; nothing rolled back, the next attempt resumes"),
                retry_after: failure.retry_after,
            },
            Severity::Ambiguous => {
                let rollback = self.rollback(workflow, patient_reused).await;
                Outcome::Retry {
                    status: failure.status,
                    error: format!("{failure}; last attempt, so {rollback}"),
                    retry_after: failure.retry_after,
                }
            }
            Severity::Permanent => {
                let rollback = self.rollback(workflow, patient_reused).await;
                Outcome::Permanent {
                    status: failure.status,
                    error: format!("{failure}; {rollback}"),
                }
            }
        }
    }

    /// The patient step: returns the uuid to refer to, whether it was found by identifier
    /// (someone else's), and the status of the last request.
    async fn patient(&self, workflow: &Workflow) -> Result<(String, bool, u16), Failure> {
        let step = &workflow.patient;
        // `identifier=` is the exact-match search (webservices.rest `patientByIdentifier`);
        // `q=` would also match names.
        let url = self.url(
            &[Resource::Patient.path()],
            &[("identifier", &workflow.identifier)],
        );
        let answer = self
            .call(step, "GET patient?identifier=", Method::GET, url, None)
            .await?;
        if !answer.status.is_success() {
            return Err(self.refused(step, "GET patient?identifier=", &answer));
        }
        let found = search_results(&answer.body).ok_or_else(|| Failure {
            step: step.name.clone(),
            request: "GET patient?identifier=".into(),
            severity: Severity::Permanent,
            status: Some(answer.status.as_u16()),
            retry_after: None,
            reason: "the search answer has no `results` list of patients with uuids".into(),
        })?;
        if found.contains(&step.uuid) {
            // Ours, made by an earlier attempt.
            return Ok((step.uuid.clone(), false, answer.status.as_u16()));
        }
        match found.as_slice() {
            [] => {}
            [other] => return Ok((other.clone(), true, answer.status.as_u16())),
            several => {
                return Err(Failure {
                    step: step.name.clone(),
                    request: "GET patient?identifier=".into(),
                    severity: Severity::Permanent,
                    status: Some(answer.status.as_u16()),
                    retry_after: None,
                    reason: format!(
                        "{} patients carry the first identifier ({}); hiway will not choose one",
                        several.len(),
                        several.join(", ")
                    ),
                });
            }
        }
        let status = self
            .ensure(step, workflow.payload(step, &step.uuid))
            .await?;
        Ok((step.uuid.clone(), false, status))
    }

    /// `GET {resource}/{uuid}`; on 404, `POST {resource}`. Returns the status of the last
    /// request.
    async fn ensure(&self, step: &Step, payload: Value) -> Result<u16, Failure> {
        let resource = step.resource.path();
        let get = format!("GET {resource}/{{uuid}}");
        let answer = self
            .call(
                step,
                &get,
                Method::GET,
                self.url(&[resource, &step.uuid], &[]),
                None,
            )
            .await?;
        match answer.status {
            StatusCode::OK if is_voided(&answer.body) => {
                return Err(Failure {
                    step: step.name.clone(),
                    request: get,
                    severity: Severity::Permanent,
                    status: Some(200),
                    retry_after: None,
                    reason: format!(
                        "{resource} {} exists but is voided (an earlier rollback without purge?); \
                         purge it or give the workflow new uuids",
                        step.uuid
                    ),
                });
            }
            s if s.is_success() => return Ok(s.as_u16()),
            StatusCode::NOT_FOUND => {}
            _ => return Err(self.refused(step, &get, &answer)),
        }
        let post = format!("POST {resource}");
        let answer = self
            .call(
                step,
                &post,
                Method::POST,
                self.url(&[resource], &[]),
                Some(&payload),
            )
            .await?;
        if answer.status.is_success() {
            Ok(answer.status.as_u16())
        } else {
            Err(self.refused(step, &post, &answer))
        }
    }

    /// Deletes what exists of the workflow under its own uuids, last created first.
    async fn rollback(&self, workflow: &Workflow, patient_reused: bool) -> Rollback {
        let purge = self.destination.config.openmrs.purge_on_rollback;
        let mut done = Rollback::default();
        for step in workflow.rollback_plan(patient_reused) {
            let resource = step.resource.path();
            let what = format!("{} {}", step.name, step.uuid);
            // Checked first: a purge of a missing uuid answers 204 too, and the report must
            // say what was really there.
            let get = format!("GET {resource}/{{uuid}}");
            let url = self.url(&[resource, &step.uuid], &[]);
            match self.call(step, &get, Method::GET, url, None).await {
                Ok(a) if a.status == StatusCode::NOT_FOUND => continue,
                Ok(a) if a.status.is_success() && is_voided(&a.body) => continue,
                Ok(a) if a.status.is_success() => {}
                Ok(a) => {
                    let reason = self.refused(step, &get, &a).reason;
                    done.failed
                        .push(format!("{what} (could not check: {reason})"));
                    continue;
                }
                Err(f) => {
                    done.failed
                        .push(format!("{what} (could not check: {})", f.reason));
                    continue;
                }
            }
            let query: &[(&str, &str)] = if purge { &[("purge", "true")] } else { &[] };
            let url = self.url(&[resource, &step.uuid], query);
            let delete = format!("DELETE {resource}/{{uuid}}");
            match self.call(step, &delete, Method::DELETE, url, None).await {
                Ok(a) if a.status.is_success() => done.removed.push(what),
                Ok(a) => {
                    let reason = self.refused(step, &delete, &a).reason;
                    done.failed.push(format!("{what} ({reason})"));
                }
                Err(f) => done.failed.push(format!("{what} ({})", f.reason)),
            }
        }
        done
    }

    /// `{base}/{segments…}?{query}`, each part escaped.
    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.destination.url.clone();
        url.set_query(None);
        // Segments, not string joining: each is percent-encoded, so nothing in a uuid can
        // change the path (they are checked too).
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// One request of the workflow. Every request carries the message id; a create also
    /// carries an idempotency key of its own (one per resource, since one message makes
    /// several creates).
    async fn call(
        &self,
        step: &Step,
        what: &str,
        method: Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<Answer, Failure> {
        let mut builder = request(self.destination, method, url)
            .header(ACCEPT, "application/json")
            .header(headers::HTTP_MESSAGE_ID, self.envelope.id.to_string());
        if let Some(body) = body {
            let key = format!(
                "{}:{}:{}",
                self.envelope.idempotency_key(),
                step.resource.path(),
                step.uuid
            );
            builder = builder
                .header(CONTENT_TYPE, "application/json")
                .header(headers::HTTP_IDEMPOTENCY_KEY, key)
                .body(body.to_string());
        }
        exchange(self.destination, builder)
            .await
            .map_err(|outcome| {
                let (status, reason, retry_after) = match outcome {
                    Outcome::Retry {
                        status,
                        error,
                        retry_after,
                    } => (status, error, retry_after),
                    Outcome::Permanent { status, error } => (status, error, None),
                    Outcome::Delivered { status } => (Some(status), String::new(), None),
                };
                Failure {
                    step: step.name.clone(),
                    request: what.to_owned(),
                    severity: Severity::Transient,
                    status,
                    retry_after,
                    reason,
                }
            })
    }

    /// A non-2xx answer as a failure: how bad it is, and OpenMRS's own words.
    fn refused(&self, step: &Step, what: &str, answer: &Answer) -> Failure {
        let classified = outcome::classify(
            DestinationKind::Openmrs,
            answer.status,
            &answer.headers,
            &answer.body,
        );
        let (severity, retry_after) = match classified {
            Outcome::Retry { retry_after, .. }
                if answer.status == StatusCode::INTERNAL_SERVER_ERROR =>
            {
                (Severity::Ambiguous, retry_after)
            }
            Outcome::Retry { retry_after, .. } => (Severity::Transient, retry_after),
            // A success is not refused; a 404 answering a GET is read before this. Anything
            // else ends the workflow.
            Outcome::Delivered { .. } | Outcome::Permanent { .. } => (Severity::Permanent, None),
        };
        Failure {
            step: step.name.clone(),
            request: what.to_owned(),
            severity,
            status: Some(answer.status.as_u16()),
            retry_after,
            reason: format!("HTTP {}: {}", answer.status, error_text(&answer.body)),
        }
    }
}

/// The uuids in a search answer (`{"results": [{"uuid": …}, …]}`).
fn search_results(body: &[u8]) -> Option<Vec<String>> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value
        .get("results")?
        .as_array()?
        .iter()
        .map(|r| r.get("uuid").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

/// Whether a representation says it was voided (or, for metadata, retired).
fn is_voided(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| {
        v.get("voided").and_then(Value::as_bool) == Some(true)
            || v.get("retired").and_then(Value::as_bool) == Some(true)
    })
}

/// OpenMRS's own words from an error body: `error.message`, then every `globalErrors`
/// message and `fieldErrors` as `field: message`. A body of another shape is quoted, cut to
/// [`ERROR_TEXT_LIMIT`].
pub(crate) fn error_text(body: &[u8]) -> String {
    let excerpt = || {
        let cut = &body[..body.len().min(ERROR_TEXT_LIMIT)];
        let text = String::from_utf8_lossy(cut).trim().to_owned();
        if text.is_empty() {
            "(empty body)".to_owned()
        } else {
            text
        }
    };
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return excerpt();
    };
    let Some(error) = value.get("error") else {
        return excerpt();
    };
    let mut parts = Vec::new();
    if let Some(message) = error.get("message").and_then(Value::as_str) {
        parts.push(message.to_owned());
    }
    let messages = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("message").and_then(Value::as_str).map(str::to_owned))
            .collect()
    };
    if let Some(global) = error.get("globalErrors") {
        let global = messages(global);
        if !global.is_empty() {
            parts.push(format!("globalErrors: {}", global.join("; ")));
        }
    }
    if let Some(fields) = error.get("fieldErrors").and_then(Value::as_object) {
        let fields: Vec<String> = fields
            .iter()
            .map(|(field, errors)| format!("{field}: {}", messages(errors).join("; ")))
            .collect();
        if !fields.is_empty() {
            parts.push(format!("fieldErrors: {}", fields.join(", ")));
        }
    }
    if parts.is_empty() {
        return excerpt();
    }
    let mut text = parts.join(" | ");
    if text.len() > ERROR_TEXT_LIMIT {
        let mut end = ERROR_TEXT_LIMIT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../../tests/fixtures/openmrs/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn sample(name: &str) -> Value {
        serde_json::from_slice(&fixture(name)).unwrap()
    }

    /// A whole workflow built from the samples, with uuids of its own.
    fn document() -> Value {
        let mut visit = sample("visit-create.json");
        visit["uuid"] = json!("c4e1b3a0-1d0f-4c55-8f0e-5b2a9d7e3f21");
        let mut encounter = sample("encounter-create.json");
        encounter["uuid"] = json!("e7d2c1f0-8a3b-4b9e-9c1d-2f4a6b8c0d13");
        let mut obs = sample("obs-create.json");
        obs["uuid"] = json!("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d");
        json!({
            "patient": sample("patient-create.json"),
            "visit": visit,
            "encounter": encounter,
            "obs": [obs],
        })
    }

    fn parse(v: &Value) -> Result<Workflow, String> {
        Workflow::parse(v.to_string().as_bytes())
    }

    #[test]
    fn a_document_made_of_the_samples_parses_into_its_steps_in_order() {
        let workflow = parse(&document()).unwrap();
        let names: Vec<&str> = workflow.steps().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["patient", "visit", "encounter", "obs[0]"]);
        assert_eq!(workflow.identifier, "100008E");
        assert_eq!(
            workflow.patient.uuid,
            "3f0c7a52-5a8e-4a0e-9d2b-7c1e0a9b6d11"
        );
    }

    #[test]
    fn only_the_patient_is_required() {
        let workflow = parse(&json!({ "patient": sample("patient-create.json") })).unwrap();
        assert_eq!(workflow.steps().count(), 1);
        let workflow = parse(&json!({
            "patient": sample("patient-create.json"), "visit": null, "obs": [] }))
        .unwrap();
        assert_eq!(workflow.steps().count(), 1);
    }

    #[test]
    fn a_document_that_is_not_a_workflow_is_refused_naming_the_field() {
        let cases = [
            (json!([1, 2]), "not a JSON object"),
            (json!({}), "`patient` is missing"),
            (json!({ "patient": "x" }), "`patient` is not an object"),
            (
                json!({ "patient": sample("patient-create.json"), "observations": [] }),
                "unknown field `observations`",
            ),
            (
                json!({ "patient": { "identifiers": [{ "identifier": "1" }] } }),
                "`patient.uuid` is missing",
            ),
            (
                json!({ "patient": { "uuid": "a/../b", "identifiers": [{ "identifier": "1" }] } }),
                "`patient.uuid` is not a uuid",
            ),
            (
                json!({ "patient": { "uuid": "p1", "identifiers": [] } }),
                "`patient.identifiers[0].identifier` is missing",
            ),
            (
                json!({ "patient": sample("patient-create.json"), "obs": { "uuid": "o" } }),
                "`obs` is not a list",
            ),
            (
                json!({ "patient": sample("patient-create.json"), "obs": [{ "uuid": "o" }, { "value": 1 }] }),
                "`obs[1].uuid` is missing",
            ),
            (
                json!({ "patient": sample("patient-create.json"), "visit": { "uuid": "v" }, "encounter": { "uuid": "v" } }),
                "`encounter.uuid` repeats the uuid of `visit`",
            ),
        ];
        for (doc, expected) in cases {
            let err = parse(&doc).unwrap_err();
            assert!(
                err.contains(expected),
                "{doc}: got {err:?}, wanted {expected:?}"
            );
        }
        let err = Workflow::parse(b"<xml/>").unwrap_err();
        assert!(err.contains("not JSON"), "{err}");
    }

    #[test]
    fn hiway_fills_in_the_patient_visit_and_encounter_references() {
        let mut doc = document();
        // Whatever the transform put there is replaced by the workflow's own uuids.
        doc["visit"]["patient"] = json!("stale");
        doc["obs"][0]["person"] = json!("stale");
        let workflow = parse(&doc).unwrap();
        let patient = "found-patient-uuid";

        let visit = workflow.payload(workflow.visit.as_ref().unwrap(), patient);
        assert_eq!(visit["patient"], patient);
        assert_eq!(visit["uuid"], "c4e1b3a0-1d0f-4c55-8f0e-5b2a9d7e3f21");
        assert_eq!(visit["visitType"], "7b0f5697-27e3-40c4-8bae-f4049abfb4ed");

        let encounter = workflow.payload(workflow.encounter.as_ref().unwrap(), patient);
        assert_eq!(encounter["patient"], patient);
        assert_eq!(encounter["visit"], "c4e1b3a0-1d0f-4c55-8f0e-5b2a9d7e3f21");

        let obs = workflow.payload(&workflow.obs[0], patient);
        assert_eq!(obs["person"], patient);
        assert_eq!(obs["encounter"], "e7d2c1f0-8a3b-4b9e-9c1d-2f4a6b8c0d13");

        let own = workflow.payload(&workflow.patient, patient);
        assert_eq!(own, document()["patient"], "the patient is posted as given");
    }

    #[test]
    fn a_reference_to_something_outside_the_workflow_is_kept() {
        let mut doc = document();
        doc.as_object_mut().unwrap().remove("visit");
        doc["encounter"]["visit"] = json!("an-existing-visit");
        let workflow = parse(&doc).unwrap();
        let encounter = workflow.payload(workflow.encounter.as_ref().unwrap(), "p");
        assert_eq!(encounter["visit"], "an-existing-visit");
    }

    #[test]
    fn the_rollback_plan_is_the_reverse_of_creation_and_spares_a_patient_found_by_identifier() {
        let mut doc = document();
        let mut second = doc["obs"][0].clone();
        second["uuid"] = json!("second-obs");
        doc["obs"].as_array_mut().unwrap().push(second);
        let workflow = parse(&doc).unwrap();

        let plan: Vec<&str> = workflow
            .rollback_plan(false)
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(plan, ["obs[1]", "obs[0]", "encounter", "visit", "patient"]);

        let plan: Vec<&str> = workflow
            .rollback_plan(true)
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(plan, ["obs[1]", "obs[0]", "encounter", "visit"]);
    }

    #[test]
    fn openmrs_validation_errors_are_read_into_their_messages_and_fields() {
        let text = error_text(&fixture("error-400-validation.json"));
        assert_eq!(
            text,
            "Invalid Submission | fieldErrors: identifiers[0].identifier: \
             Identifier 100008E already in use by another patient"
        );
        let text = error_text(
            br#"{"error":{"message":"Invalid Submission","globalErrors":[{"code":"x","message":"Encounter date is after the visit"}],"fieldErrors":{}}}"#,
        );
        assert_eq!(
            text,
            "Invalid Submission | globalErrors: Encounter date is after the visit"
        );
        assert_eq!(
            error_text(&fixture("error-404.json")),
            "Object with given uuid doesn't exist [null]"
        );
        assert_eq!(
            error_text(b"<html>Bad gateway</html>"),
            "<html>Bad gateway</html>"
        );
        assert_eq!(error_text(b""), "(empty body)");
    }

    #[test]
    fn search_results_and_voided_representations_are_read() {
        assert_eq!(
            search_results(br#"{"results":[{"uuid":"a","display":"x"},{"uuid":"b"}]}"#),
            Some(vec!["a".to_owned(), "b".to_owned()])
        );
        assert_eq!(search_results(br#"{"results":[]}"#), Some(vec![]));
        assert_eq!(search_results(br#"{"error":{}}"#), None);
        assert!(is_voided(br#"{"uuid":"a","voided":true}"#));
        assert!(!is_voided(br#"{"uuid":"a","voided":false}"#));
    }

    #[test]
    fn uuids_are_openmrs_shaped_and_cannot_reach_outside_their_path_segment() {
        assert!(is_uuid("3f0c7a52-5a8e-4a0e-9d2b-7c1e0a9b6d11"));
        assert!(is_uuid("5089AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"));
        for bad in ["", "a/b", "a?purge=true", "..", "a b", &"x".repeat(39)] {
            assert!(!is_uuid(bad), "{bad:?}");
        }
    }
}
