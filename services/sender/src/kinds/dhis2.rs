//! The `dhis2` kind: posting imports and reading DHIS2's answers.
//!
//! DHIS2 before 2.38 (or called as `/api/37/…`) answers 200 with a bare `ImportSummary` even
//! when it rejected values; 2.38 and later wrap it in a `WebMessage` under `response` and answer
//! 409 for warnings and errors. The tracker importer answers an import report with
//! `validationReport.errorReports`. Whatever the shape, the verdict is in the body.
//!
//! Asynchronous imports (`dataValueSets?async=true`, and `/api/tracker` by default) answer 200
//! with a job, which says nothing about the outcome: the job is polled until DHIS2 marks it
//! completed, then its summary or report is read like a synchronous answer. DHIS2 keeps those
//! in memory only, so a summary that is gone (404, after a restart) means the outcome is
//! unknown and the message is sent again: data values are upserts, and tracker imports carry
//! client UIDs, where a re-sent CREATE that only finds its own objects counts as delivered.

use std::collections::HashSet;

use bytes::Bytes;
use hiway_config::DestinationKind;
use hiway_proto::Envelope;
use reqwest::header::ACCEPT;
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use tokio::time::Instant;

use super::http::{self, Answer};
use crate::destination::Destination;
use crate::outcome::{self, ERROR_TEXT_LIMIT, Outcome};

/// Tracker error codes saying an object is already there: what a re-sent CREATE gets back
/// (E1002 tracked entity, E1080 enrollment, E1030 event).
const ALREADY_EXISTS: &[&str] = &["E1002", "E1080", "E1030"];

/// `Some(Ok(()))` when the body is an import answer reporting success, `Some(Err(reason))` when
/// it reports rejected values (the reason lists DHIS2's own conflict texts), `None` when the
/// body is not an import answer at all.
pub fn read_import(body: &[u8]) -> Option<Result<(), String>> {
    let json: Value = serde_json::from_slice(body).ok()?;
    if let Some(summary) = import_summary(&json) {
        return Some(read_summary(summary));
    }
    if let Some(report) = tracker_report(&json) {
        return Some(read_tracker_report(report));
    }
    // A WebMessage without a summary: DHIS2's generic error shape.
    if json.get("httpStatusCode").is_some() && json["status"] == "ERROR" {
        return Some(Err(json["message"]
            .as_str()
            .unwrap_or("DHIS2 reported an error")
            .to_owned()));
    }
    None
}

fn import_summary(json: &Value) -> Option<&Value> {
    if json["responseType"] == "ImportSummary" {
        Some(json)
    } else if json["response"]["responseType"] == "ImportSummary" {
        Some(&json["response"])
    } else {
        None
    }
}

fn tracker_report(json: &Value) -> Option<&Value> {
    if json.get("validationReport").is_some() {
        Some(json)
    } else if json["response"].get("validationReport").is_some() {
        Some(&json["response"])
    } else {
        None
    }
}

fn read_summary(summary: &Value) -> Result<(), String> {
    let status = summary["status"].as_str().unwrap_or("?");
    let conflicts: Vec<String> = summary["conflicts"]
        .as_array()
        .map(|cs| cs.iter().map(conflict_text).collect())
        .unwrap_or_default();
    let rejected = summary["rejectedIndexes"]
        .as_array()
        .is_some_and(|r| !r.is_empty());
    if status == "ERROR" || !conflicts.is_empty() || rejected {
        let count = &summary["importCount"];
        Err(format!(
            "DHIS2 import {status} (imported {}, updated {}, ignored {}); conflicts: {}",
            count["imported"],
            count["updated"],
            count["ignored"],
            if conflicts.is_empty() {
                "none listed".to_owned()
            } else {
                conflicts.join("; ")
            }
        ))
    } else {
        Ok(())
    }
}

/// "E7610 dataElement eY5ehpbEsB7X: Data element not found…" (older servers send only
/// `object` and `value`).
fn conflict_text(c: &Value) -> String {
    let mut parts = Vec::new();
    for key in ["errorCode", "property", "object"] {
        if let Some(v) = c[key].as_str() {
            parts.push(v.to_owned());
        }
    }
    let value = c["value"].as_str().unwrap_or("");
    if parts.is_empty() {
        value.to_owned()
    } else {
        format!("{}: {value}", parts.join(" "))
    }
}

fn read_tracker_report(report: &Value) -> Result<(), String> {
    let errors: Vec<String> = report["validationReport"]["errorReports"]
        .as_array()
        .map(|es| {
            es.iter()
                .map(|e| {
                    format!(
                        "{} {} {}: {}",
                        e["errorCode"].as_str().unwrap_or("?"),
                        e["trackerType"].as_str().unwrap_or(""),
                        e["uid"].as_str().unwrap_or(""),
                        e["message"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if report["status"] == "ERROR" || !errors.is_empty() {
        Err(format!(
            "DHIS2 tracker import {}; errors: {}",
            report["status"].as_str().unwrap_or("?"),
            errors.join("; ")
        ))
    } else {
        Ok(())
    }
}

/// Sends one message to DHIS2; the import answer in the body decides, or for an asynchronous
/// import the summary of the job it started.
pub(crate) async fn send(destination: &Destination, envelope: &Envelope, body: Bytes) -> Outcome {
    let request = match http::message_request(destination, envelope) {
        Ok(r) => r,
        Err(outcome) => return outcome,
    };
    let answer = match http::exchange(destination, request.body(body)).await {
        Ok(a) => a,
        Err(outcome) => return outcome,
    };
    // Async imports are answered 200 whatever becomes of them; only a 200 can be a job.
    if answer.status.is_success() {
        match read_job(&answer.body) {
            Some(Ok(job)) => return follow(destination, &job).await,
            Some(Err(error)) => {
                return Outcome::Permanent {
                    status: Some(answer.status.as_u16()),
                    error,
                };
            }
            None => {}
        }
    }
    read_answer(&answer)
}

/// Reads an import answer (a synchronous one, or a job's summary).
fn read_answer(answer: &Answer) -> Outcome {
    if (answer.status.is_success() || answer.status == StatusCode::CONFLICT)
        && already_created(&answer.body)
    {
        // The status stays the one DHIS2 gave (409 for a sync tracker import): the trail shows
        // what was answered, the outcome what it means.
        return Outcome::Delivered {
            status: answer.status.as_u16(),
        };
    }
    outcome::classify(
        DestinationKind::Dhis2,
        answer.status,
        &answer.headers,
        &answer.body,
    )
}

/// An import job DHIS2 started instead of answering.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Job {
    /// A data value (or other) import: its notifications at `/api/system/tasks/{job_type}/{id}`,
    /// its summary at `/api/system/taskSummaries/{job_type}/{id}`.
    Task {
        /// `DATAVALUE_IMPORT` for `dataValueSets`.
        job_type: String,
        /// The job's UID.
        id: String,
    },
    /// A tracker import: its notifications at `/api/tracker/jobs/{id}`, its report at
    /// `/api/tracker/jobs/{id}/report`.
    Tracker {
        /// The job's UID.
        id: String,
    },
}

impl Job {
    fn id(&self) -> &str {
        match self {
            Job::Task { id, .. } | Job::Tracker { id } => id,
        }
    }

    /// Where its progress is, and where its outcome is, on the DHIS2 behind `destination`.
    fn urls(&self, destination: &Url) -> Result<(Url, Url), String> {
        match self {
            Job::Task { job_type, id } => Ok((
                api_url(destination, &["system", "tasks", job_type, id])?,
                api_url(destination, &["system", "taskSummaries", job_type, id])?,
            )),
            Job::Tracker { id } => Ok((
                api_url(destination, &["tracker", "jobs", id])?,
                api_url(destination, &["tracker", "jobs", id, "report"])?,
            )),
        }
    }
}

/// `Some` when the answer is a job DHIS2 started (`Err` when its id cannot be used), `None`
/// when it is anything else.
fn read_job(body: &[u8]) -> Option<Result<Job, String>> {
    let json: Value = serde_json::from_slice(body).ok()?;
    let response = &json["response"];
    let notifier = response["relativeNotifierEndpoint"].as_str();
    let location = response["location"].as_str();
    let tracker = json["message"] == "Tracker job added"
        || location.is_some_and(|l| l.contains("/tracker/jobs/"));
    if notifier.is_none() && !tracker {
        return None;
    }
    // The id and type go into URL paths of polls sent with the destination's credentials, so
    // only what a DHIS2 UID or job type can be is taken.
    let Some(id) = response["id"].as_str().filter(|id| is_code(id)) else {
        return Some(Err(format!(
            "DHIS2 started an import job but its id {} cannot be used; the outcome is unknown",
            response["id"]
        )));
    };
    if tracker && notifier.is_none() {
        return Some(Ok(Job::Tracker { id: id.to_owned() }));
    }
    // "/api/system/tasks/DATAVALUE_IMPORT/{id}"; `jobType` says the same where it is sent.
    let job_type = response["jobType"]
        .as_str()
        .or_else(|| notifier?.trim_end_matches('/').rsplit('/').nth(1))
        .filter(|t| is_code(t));
    Some(match job_type {
        Some(job_type) => Ok(Job::Task {
            job_type: job_type.to_owned(),
            id: id.to_owned(),
        }),
        None => Err(format!(
            "DHIS2 started import job {id} but its type cannot be read; the outcome is unknown"
        )),
    })
}

fn is_code(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `/api/<tail>` on the DHIS2 behind `destination`: its URL cut before the `api` segment (a
/// DHIS2 under a context path keeps it). Job endpoints are unversioned, so `/api/37/…` gives
/// `/api/…` too. A URL without an `api` segment is taken to be DHIS2 at the server's root.
fn api_url(destination: &Url, tail: &[&str]) -> Result<Url, String> {
    let segments: Vec<&str> = destination
        .path_segments()
        .map(|s| s.collect())
        .unwrap_or_default();
    let context = match segments.iter().position(|s| *s == "api") {
        Some(i) => &segments[..i],
        None => &[],
    };
    let mut url = destination.clone();
    url.set_query(None);
    url.set_fragment(None);
    url.path_segments_mut()
        .map_err(|()| format!("{destination} cannot hold a DHIS2 job path"))?
        .clear()
        .extend(context)
        .push("api")
        .extend(tail);
    Ok(url)
}

/// Polls a job until DHIS2 says it is completed, then reads its summary or report.
async fn follow(destination: &Destination, job: &Job) -> Outcome {
    let settings = &destination.config.dhis2;
    let deadline = Instant::now() + settings.poll_timeout;
    let (progress, result) = match job.urls(&destination.url) {
        Ok(urls) => urls,
        Err(error) => {
            return Outcome::Permanent {
                status: None,
                error,
            };
        }
    };
    let id = job.id();
    tracing::debug!(job = id, "following a DHIS2 import job");
    loop {
        let answer = match get(destination, progress.clone()).await {
            Ok(a) => a,
            Err(outcome) => return polling_failed(id, outcome),
        };
        if answer.status == StatusCode::NOT_FOUND {
            return outcome_unknown(id, &answer);
        }
        if !answer.status.is_success() {
            return polling_failed(id, classify_plain(&answer));
        }
        if completed(&answer.body) {
            break;
        }
        if Instant::now() + settings.poll_interval > deadline {
            // Re-sending is safe (upserts, client UIDs), and a later attempt may find DHIS2
            // less busy; meanwhile this message stops holding a delivery slot.
            return Outcome::Retry {
                status: None,
                error: format!(
                    "DHIS2 import job {id} was not completed within {:?} (dhis2.poll_timeout); \
                     the message will be sent again",
                    settings.poll_timeout
                ),
                retry_after: None,
            };
        }
        tokio::time::sleep(settings.poll_interval).await;
    }
    let answer = match get(destination, result).await {
        Ok(a) => a,
        Err(outcome) => return polling_failed(id, outcome),
    };
    if answer.status == StatusCode::NOT_FOUND {
        return outcome_unknown(id, &answer);
    }
    if !answer.status.is_success() {
        return polling_failed(id, classify_plain(&answer));
    }
    read_job_result(id, &answer)
}

/// Reads a completed job's summary (data values) or report (tracker).
fn read_job_result(id: &str, answer: &Answer) -> Outcome {
    let status = answer.status.as_u16();
    if already_created(&answer.body) {
        return Outcome::Delivered { status };
    }
    match read_import(&answer.body) {
        Some(Ok(())) => Outcome::Delivered { status },
        Some(Err(reason)) => Outcome::Permanent {
            status: Some(status),
            error: format!("DHIS2 import job {id}: {reason}"),
        },
        // DHIS2 answers `null` or `{}` for a summary it no longer holds.
        None => Outcome::Retry {
            status: Some(status),
            error: format!(
                "DHIS2 import job {id} completed but its summary is not an import summary, so \
                 the outcome is unknown and the message will be sent again: {}",
                excerpt(&answer.body)
            ),
            retry_after: None,
        },
    }
}

async fn get(destination: &Destination, url: Url) -> Result<Answer, Outcome> {
    // The same credentials as the import: DHIS2 shows a job only to the user who started it.
    http::exchange(
        destination,
        http::request(destination, Method::GET, url).header(ACCEPT, "application/json"),
    )
    .await
}

/// Whether a job's notifications include the one marking it completed (DHIS2 lists them
/// newest first, but the order is not relied on).
fn completed(body: &[u8]) -> bool {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(notifications)) => notifications.iter().any(|n| n["completed"] == true),
        Ok(notification) => notification["completed"] == true,
        Err(_) => false,
    }
}

/// The job or its summary is gone: DHIS2 keeps them in memory only, so after a restart (or
/// many later jobs) nobody can say whether the import happened. Sending again is safe.
fn outcome_unknown(id: &str, answer: &Answer) -> Outcome {
    Outcome::Retry {
        status: Some(answer.status.as_u16()),
        error: format!(
            "DHIS2 has no report for import job {id} (HTTP {}: {}), so its outcome is unknown \
             (DHIS2 keeps job reports in memory only); the message will be sent again",
            answer.status,
            excerpt(&answer.body)
        ),
        retry_after: None,
    }
}

/// A poll that failed: a transport error or 5xx is retried like any other, a refusal (401,
/// 403) is permanent, and either way the error says it was the poll that failed.
fn polling_failed(id: &str, outcome: Outcome) -> Outcome {
    outcome.in_context(|error| {
        format!(
            "polling DHIS2 import job {id} (the import was accepted, its outcome unknown): {error}"
        )
    })
}

fn classify_plain(answer: &Answer) -> Outcome {
    outcome::classify(
        DestinationKind::Http,
        answer.status,
        &answer.headers,
        &answer.body,
    )
}

fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(ERROR_TEXT_LIMIT)])
        .trim()
        .to_owned()
}

/// Whether a tracker report rejects the import only because every object in it already exists:
/// what a re-sent CREATE gets when the first one was committed, so the message is delivered.
///
/// With `atomicMode=ALL` (the default) one error keeps every object out, so a payload mixing
/// an existing object with a new one must not count as delivered: the distinct objects with
/// "already exists" errors must cover the report's `stats.total`. A report without stats
/// cannot show that and is left to the usual reading.
fn already_created(body: &[u8]) -> bool {
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let Some(report) = tracker_report(&json) else {
        return false;
    };
    let Some(errors) = report["validationReport"]["errorReports"].as_array() else {
        return false;
    };
    let all_exist = !errors.is_empty()
        && errors.iter().all(|e| {
            e["errorCode"]
                .as_str()
                .is_some_and(|code| ALREADY_EXISTS.contains(&code))
        });
    if !all_exist {
        return false;
    }
    let objects: HashSet<(&str, &str)> = errors
        .iter()
        .map(|e| {
            (
                e["trackerType"].as_str().unwrap_or(""),
                e["uid"].as_str().unwrap_or(""),
            )
        })
        .collect();
    report["stats"]["total"]
        .as_u64()
        .is_some_and(|total| objects.len() as u64 >= total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../../tests/fixtures/dhis2/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: Default::default(),
            body: Bytes::from(body.to_owned()),
        }
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    /// A tracker report rejecting `errors` (code, type, uid) out of `total` objects.
    fn rejection_report(errors: &[(&str, &str, &str)], total: u64) -> String {
        let reports: Vec<Value> = errors
            .iter()
            .map(|(code, kind, uid)| {
                serde_json::json!({
                    "message": format!("{kind}: `{uid}`, already exists."),
                    "errorCode": code, "trackerType": kind, "uid": uid
                })
            })
            .collect();
        serde_json::json!({
            "status": "ERROR",
            "validationReport": { "errorReports": reports, "warningReports": [] },
            "stats": { "created": 0, "updated": 0, "deleted": 0, "ignored": total, "total": total },
            "bundleReport": { "typeReportMap": {} }
        })
        .to_string()
    }

    #[test]
    fn a_data_value_import_job_is_recognised_with_its_type_and_id() {
        let job = read_job(&fixture("resp-async-job.json"));
        assert_eq!(
            job,
            Some(Ok(Job::Task {
                job_type: "DATAVALUE_IMPORT".into(),
                id: "YR1UxOUXmzT".into()
            }))
        );
    }

    #[test]
    fn a_tracker_job_is_recognised_with_its_id() {
        let job = read_job(&fixture("tracker-async-response.json"));
        assert_eq!(
            job,
            Some(Ok(Job::Tracker {
                id: "cHh2OCTJvRw".into()
            }))
        );
    }

    #[test]
    fn import_answers_and_reports_are_not_jobs() {
        for name in [
            "resp-238-ok.json",
            "resp-238-409-warning.json",
            "resp-237-importsummary.json",
            "tracker-report-error.json",
        ] {
            assert_eq!(read_job(&fixture(name)), None, "{name}");
        }
    }

    #[test]
    fn a_job_whose_id_could_change_the_poll_path_is_refused() {
        let body = br#"{"message":"Tracker job added","response":{"id":"../../users","location":"x/api/tracker/jobs/x"}}"#;
        let Some(Err(error)) = read_job(body) else {
            panic!("{:?}", read_job(body))
        };
        assert!(error.contains("cannot be used"), "{error}");
    }

    #[test]
    fn the_job_type_is_taken_from_the_notifier_endpoint_when_job_type_is_missing() {
        let body = br#"{"message":"Initiated dataValueImport","response":{"id":"abc123","relativeNotifierEndpoint":"/api/system/tasks/DATAVALUE_IMPORT/abc123"}}"#;
        assert_eq!(
            read_job(body),
            Some(Ok(Job::Task {
                job_type: "DATAVALUE_IMPORT".into(),
                id: "abc123".into()
            }))
        );
    }

    #[test]
    fn job_urls_are_unversioned_and_keep_the_context_path() {
        let job = Job::Task {
            job_type: "DATAVALUE_IMPORT".into(),
            id: "YR1UxOUXmzT".into(),
        };
        let (progress, summary) = job
            .urls(&url("https://h.test/dhis/api/37/dataValueSets?async=true"))
            .unwrap();
        assert_eq!(
            progress.as_str(),
            "https://h.test/dhis/api/system/tasks/DATAVALUE_IMPORT/YR1UxOUXmzT"
        );
        assert_eq!(
            summary.as_str(),
            "https://h.test/dhis/api/system/taskSummaries/DATAVALUE_IMPORT/YR1UxOUXmzT"
        );
        let job = Job::Tracker {
            id: "cHh2OCTJvRw".into(),
        };
        let (progress, report) = job.urls(&url("http://h.test:8080/api/tracker")).unwrap();
        assert_eq!(
            progress.as_str(),
            "http://h.test:8080/api/tracker/jobs/cHh2OCTJvRw"
        );
        assert_eq!(
            report.as_str(),
            "http://h.test:8080/api/tracker/jobs/cHh2OCTJvRw/report"
        );
    }

    #[test]
    fn a_destination_url_without_an_api_segment_is_dhis2_at_the_root() {
        let job = Job::Tracker { id: "j1".into() };
        let (progress, _) = job.urls(&url("http://gw.test/dhis2-tracker")).unwrap();
        assert_eq!(progress.as_str(), "http://gw.test/api/tracker/jobs/j1");
    }

    #[test]
    fn a_job_is_completed_once_a_notification_says_so() {
        assert!(!completed(b"[]"));
        assert!(!completed(
            br#"[{"uid":"a","level":"INFO","message":"Process started","completed":false}]"#
        ));
        assert!(completed(
            br#"[{"message":"Import done","completed":true},{"message":"Process started","completed":false}]"#
        ));
        assert!(!completed(b"not json"));
    }

    #[test]
    fn a_completed_data_value_job_is_read_like_a_synchronous_summary() {
        let ok = fixture("resp-238-ok.json");
        let ok: Value = serde_json::from_slice(&ok).unwrap();
        let summary = ok["response"].to_string();
        assert_eq!(
            read_job_result("YR1UxOUXmzT", &answer(200, &summary)),
            Outcome::Delivered { status: 200 }
        );
        let warning = String::from_utf8(fixture("resp-237-importsummary.json")).unwrap();
        let Outcome::Permanent { error, .. } =
            read_job_result("YR1UxOUXmzT", &answer(200, &warning))
        else {
            panic!("a summary with conflicts must be permanent")
        };
        assert!(
            error.contains("YR1UxOUXmzT") && error.contains("eY5ehpbEsB7X"),
            "{error}"
        );
    }

    #[test]
    fn a_completed_tracker_job_with_an_error_report_is_permanent() {
        let report = String::from_utf8(fixture("tracker-report-error.json")).unwrap();
        let Outcome::Permanent { error, .. } =
            read_job_result("cHh2OCTJvRw", &answer(200, &report))
        else {
            panic!("an E1011 report must be permanent")
        };
        assert!(
            error.contains("E1011") && error.contains("DiszpKrYNg9"),
            "{error}"
        );
    }

    #[test]
    fn a_summary_that_is_not_one_leaves_the_outcome_unknown_and_is_retried() {
        let outcome = read_job_result("j1", &answer(200, "null"));
        let Outcome::Retry { error, .. } = outcome else {
            panic!("{outcome:?}")
        };
        assert!(error.contains("outcome is unknown"), "{error}");
    }

    #[test]
    fn a_missing_report_is_retried_because_the_outcome_is_unknown() {
        let outcome = outcome_unknown(
            "cHh2OCTJvRw",
            &answer(
                404,
                r#"{"message":"Summary for job cHh2OCTJvRw does not exist"}"#,
            ),
        );
        let Outcome::Retry {
            status: Some(404),
            error,
            ..
        } = outcome
        else {
            panic!("{outcome:?}")
        };
        assert!(
            error.contains("outcome is unknown") && error.contains("cHh2OCTJvRw"),
            "{error}"
        );
    }

    #[test]
    fn a_refused_poll_is_permanent_and_a_failed_one_retried_both_naming_the_poll() {
        let refused = polling_failed("j1", classify_plain(&answer(403, "forbidden")));
        assert!(
            matches!(&refused, Outcome::Permanent { error, .. } if error.contains("polling DHIS2 import job j1")),
            "{refused:?}"
        );
        let failed = polling_failed("j1", classify_plain(&answer(503, "")));
        assert!(matches!(failed, Outcome::Retry { .. }), "{failed:?}");
    }

    #[test]
    fn a_resent_tracker_create_that_finds_only_its_own_objects_is_delivered() {
        let report = rejection_report(
            &[
                ("E1002", "TRACKED_ENTITY", "PQfMcpmXeFE"),
                ("E1030", "EVENT", "Qz6p3nC0aV1"),
            ],
            2,
        );
        assert_eq!(
            read_answer(&answer(409, &report)),
            Outcome::Delivered { status: 409 }
        );
        assert_eq!(
            read_job_result("j1", &answer(200, &report)),
            Outcome::Delivered { status: 200 }
        );
    }

    #[test]
    fn an_existing_object_beside_a_new_one_is_not_delivered_since_nothing_was_committed() {
        // Two events sent, one exists: with atomicMode=ALL the new one was not imported either.
        let report = rejection_report(&[("E1030", "EVENT", "Qz6p3nC0aV1")], 2);
        assert!(matches!(
            read_answer(&answer(409, &report)),
            Outcome::Permanent { .. }
        ));
    }

    #[test]
    fn already_exists_beside_another_error_is_permanent() {
        let mut report: Value =
            serde_json::from_str(&rejection_report(&[("E1030", "EVENT", "Qz6p3nC0aV1")], 2))
                .unwrap();
        report["validationReport"]["errorReports"]
            .as_array_mut()
            .unwrap()
            .push(
                serde_json::json!({"errorCode":"E1011","trackerType":"EVENT","uid":"Zz6p3nC0aV2",
                "message":"Could not find OrganisationUnit: `DiszpKrYNg9`, linked to Event."}),
            );
        let outcome = read_answer(&answer(409, &report.to_string()));
        let Outcome::Permanent { error, .. } = outcome else {
            panic!("{outcome:?}")
        };
        assert!(error.contains("E1011"), "{error}");
    }

    #[test]
    fn the_sample_tracker_error_report_stays_permanent() {
        let report = String::from_utf8(fixture("tracker-report-error.json")).unwrap();
        assert!(matches!(
            read_answer(&answer(409, &report)),
            Outcome::Permanent {
                status: Some(409),
                ..
            }
        ));
    }
}
