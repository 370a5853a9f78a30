//! The `fhir` kind: one FHIR R4 transaction Bundle per message, posted to the server's base.
//!
//! A FHIR server's status code alone does not say whether a transaction went in: the verdict
//! is in the body (../shared/protocols.md §4, §7).
//! - 2xx with a `transaction-response` Bundle whose every entry answered 2xx: delivered. The
//!   transaction is atomic, so any other 2xx (not a Bundle, another Bundle type, a failed
//!   entry) means the server did not do what a transaction promises: permanent, named.
//! - An `OperationOutcome` body becomes the error text: each issue's severity, code,
//!   `expression`, `details.text` and `diagnostics`, so the dead letter says which entry and
//!   field broke.
//! - Retried: no answer or a timeout, 408, 425, 429 and 5xx (but 501 and 505), or an
//!   `OperationOutcome` whose error names a transient issue type (`transient`, `lock-error`,
//!   `no-store`, `timeout`, `throttled`). `Retry-After` is honoured.
//! - 409 is a version conflict: the resource changed under us, and the next attempt may well
//!   apply cleanly, so it is retried while the attempt number is at most
//!   `fhir.conflict_retries`, then it is permanent.
//! - Everything else (400, 404, 410, 412 several conditional matches, 422, other 4xx):
//!   permanent, with the server's own words.

use std::fmt::Write as _;

use bytes::Bytes;
use chrono::Utc;
use hiway_config::is_json;
use hiway_proto::Envelope;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde_json::Value;

use crate::destination::Destination;
use crate::kinds::http::{exchange, message_request};
use crate::outcome::{self, ERROR_TEXT_LIMIT, Outcome};

/// The media type of FHIR's JSON format (R4 http.html §Mime-type).
const FHIR_JSON: &str = "application/fhir+json";

/// Issue types (R4 ValueSet issue-type) under `transient`: "the content/operation failed
/// because of a transient condition". Not `exception` (an internal error: retrying it only
/// repeats it unless the status says otherwise) nor `incomplete` (about searches).
const TRANSIENT_ISSUES: [&str; 5] = [
    "transient",
    "lock-error",
    "no-store",
    "timeout",
    "throttled",
];

/// Posts the transaction Bundle and reads the answer.
pub(crate) async fn send(destination: &Destination, envelope: &Envelope, body: Bytes) -> Outcome {
    // A transform might hand over XML or text; FHIR JSON is the only format this kind speaks,
    // and relabelling anything else as JSON would only earn a 400 later.
    if !is_json(&envelope.content_type) {
        return Outcome::Permanent {
            status: None,
            error: format!(
                "the fhir kind posts {FHIR_JSON}; this message is {}",
                envelope.content_type
            ),
        };
    }
    let request = match message_request(destination, envelope) {
        Ok(r) => r,
        Err(outcome) => return outcome,
    };
    // `headers` replaces same-named headers (the message's own content type); the idempotency
    // headers from `message_request` stay.
    let mut fhir = HeaderMap::new();
    fhir.insert(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    fhir.insert(ACCEPT, HeaderValue::from_static(FHIR_JSON));
    let answer = match exchange(destination, request.headers(fhir).body(body.clone())).await {
        Ok(a) => a,
        Err(outcome) => return outcome,
    };
    read(
        answer.status,
        &answer.headers,
        &answer.body,
        &body,
        Attempt {
            number: envelope.attempt + 1,
            conflict_retries: destination.config.fhir.conflict_retries,
        },
    )
}

/// Which attempt this is, for the bounded retry of version conflicts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Attempt {
    /// 1 for the first attempt.
    pub number: u32,
    /// `fhir.conflict_retries`: the last attempt number whose 409 is still retried.
    pub conflict_retries: u32,
}

/// Reads a FHIR server's answer to a posted transaction (`sent` is the posted Bundle, to
/// check the answer has one entry per request).
pub(crate) fn read(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    sent: &[u8],
    attempt: Attempt,
) -> Outcome {
    let code = status.as_u16();
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if status.is_success() {
        return match json.as_ref().map(|j| read_response_bundle(j, sent)) {
            Some(Ok(())) => Outcome::Delivered { status: code },
            Some(Err(reason)) => Outcome::Permanent {
                status: Some(code),
                error: bounded(format!("HTTP {status}: {reason}")),
            },
            None => Outcome::Permanent {
                status: Some(code),
                error: bounded(format!(
                    "HTTP {status}: the answer is not JSON, so not a transaction-response Bundle{}",
                    excerpt_suffix(body)
                )),
            },
        };
    }

    let operation_outcome = json
        .as_ref()
        .filter(|j| j["resourceType"] == "OperationOutcome");
    let error = bounded(match operation_outcome {
        Some(o) => format!("HTTP {status}: {}", outcome_text(o)),
        None => format!("HTTP {status}{}", excerpt_suffix(body)),
    });
    if status == StatusCode::CONFLICT {
        return if attempt.number <= attempt.conflict_retries {
            Outcome::Retry {
                status: Some(code),
                error,
                retry_after: outcome::retry_after(headers, Utc::now()),
            }
        } else {
            Outcome::Permanent {
                status: Some(code),
                error: bounded(format!(
                    "version conflict on attempt {}: gave up after {} conflict retries (fhir.conflict_retries); {error}",
                    attempt.number, attempt.conflict_retries
                )),
            }
        };
    }
    if outcome::retryable(status) || operation_outcome.is_some_and(names_a_transient_issue) {
        Outcome::Retry {
            status: Some(code),
            error,
            retry_after: outcome::retry_after(headers, Utc::now()),
        }
    } else {
        Outcome::Permanent {
            status: Some(code),
            error,
        }
    }
}

/// `Ok` when `json` is a transaction (or batch) response whose every entry succeeded, one per
/// entry sent; otherwise what is wrong with it.
fn read_response_bundle(json: &Value, sent: &[u8]) -> Result<(), String> {
    let resource_type = json["resourceType"].as_str().unwrap_or("no resourceType");
    let bundle_type = json["type"].as_str().unwrap_or("no type");
    if resource_type != "Bundle"
        || !matches!(bundle_type, "transaction-response" | "batch-response")
    {
        return Err(format!(
            "expected a transaction-response Bundle, got {resource_type} ({bundle_type})"
        ));
    }
    let entries = json["entry"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let sent_entries = serde_json::from_slice::<Value>(sent)
        .ok()
        .and_then(|b| b["entry"].as_array().map(Vec::len));
    if let Some(n) = sent_entries
        && n != entries.len()
    {
        return Err(format!(
            "the {bundle_type} has {} entries for the {n} sent",
            entries.len()
        ));
    }
    let failed: Vec<String> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, entry)| {
            let response = &entry["response"];
            let status = response["status"].as_str().unwrap_or("");
            // "201 Created", or only "201" (Medplum): the code is the first three characters.
            let code = status.get(..3).and_then(|c| c.parse::<u16>().ok());
            if code.is_some_and(|c| (200..300).contains(&c)) {
                return None;
            }
            let shown = if status.is_empty() {
                "no status"
            } else {
                status
            };
            let mut text = format!("entry[{i}] answered {shown}");
            if response["outcome"]["resourceType"] == "OperationOutcome" {
                let _ = write!(text, ": {}", outcome_text(&response["outcome"]));
            }
            Some(text)
        })
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("the {bundle_type} reports {}", failed.join("; ")))
    }
}

/// An OperationOutcome as one line: per issue, "severity code at expression: details
/// (diagnostics)", issues separated by "; ".
pub(crate) fn outcome_text(outcome: &Value) -> String {
    let issues = outcome["issue"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if issues.is_empty() {
        return "OperationOutcome without issues".to_owned();
    }
    let texts: Vec<String> = issues
        .iter()
        .map(|issue| {
            let mut text = format!(
                "{} {}",
                issue["severity"].as_str().unwrap_or("?"),
                issue["code"].as_str().unwrap_or("?")
            );
            let expressions: Vec<&str> = issue["expression"]
                .as_array()
                .map(|e| e.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if !expressions.is_empty() {
                let _ = write!(text, " at {}", expressions.join(", "));
            }
            let details = issue["details"]["text"].as_str();
            let diagnostics = issue["diagnostics"].as_str();
            match (details, diagnostics) {
                (Some(d), Some(g)) if d != g => {
                    let _ = write!(text, ": {d} ({g})");
                }
                (Some(d), _) | (None, Some(d)) => {
                    let _ = write!(text, ": {d}");
                }
                (None, None) => {}
            }
            text
        })
        .collect();
    texts.join("; ")
}

/// Whether an error (or fatal) issue says the failure is transient.
fn names_a_transient_issue(outcome: &Value) -> bool {
    outcome["issue"].as_array().is_some_and(|issues| {
        issues.iter().any(|issue| {
            matches!(issue["severity"].as_str(), Some("error" | "fatal"))
                && issue["code"]
                    .as_str()
                    .is_some_and(|c| TRANSIENT_ISSUES.contains(&c))
        })
    })
}

/// ": <the start of the body>", or nothing for an empty body.
fn excerpt_suffix(body: &[u8]) -> String {
    let excerpt = String::from_utf8_lossy(&body[..body.len().min(ERROR_TEXT_LIMIT)]);
    let excerpt = excerpt.trim();
    if excerpt.is_empty() {
        String::new()
    } else {
        format!(": {excerpt}")
    }
}

/// `text` cut to [`ERROR_TEXT_LIMIT`] bytes (on a character boundary), marked with "…" when
/// cut: one answer listing thousands of issues must not bloat the audit trail.
fn bounded(mut text: String) -> String {
    if text.len() <= ERROR_TEXT_LIMIT {
        return text;
    }
    let mut end = ERROR_TEXT_LIMIT - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::RETRY_AFTER;
    use std::time::Duration;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../../tests/fixtures/fhir/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    const FIRST: Attempt = Attempt {
        number: 1,
        conflict_retries: 3,
    };

    fn read_answer(status: u16, body: &[u8], attempt: Attempt) -> Outcome {
        read(
            StatusCode::from_u16(status).unwrap(),
            &HeaderMap::new(),
            body,
            &fixture("transaction-bundle.json"),
            attempt,
        )
    }

    fn permanent_error(outcome: Outcome) -> String {
        match outcome {
            Outcome::Permanent { error, .. } => error,
            other => panic!("expected a permanent failure, got {other:?}"),
        }
    }

    #[test]
    fn a_transaction_response_whose_entries_all_succeeded_is_delivered() {
        let body = fixture("transaction-response.json");
        assert_eq!(
            read_answer(200, &body, FIRST),
            Outcome::Delivered { status: 200 }
        );
    }

    #[test]
    fn a_status_without_its_reason_phrase_is_read_as_medplum_sends_it() {
        let mut bundle: Value =
            serde_json::from_slice(&fixture("transaction-response.json")).unwrap();
        for entry in bundle["entry"].as_array_mut().unwrap() {
            entry["response"]["status"] = "201".into();
        }
        let body = serde_json::to_vec(&bundle).unwrap();
        assert_eq!(
            read_answer(200, &body, FIRST),
            Outcome::Delivered { status: 200 }
        );
    }

    #[test]
    fn a_2xx_that_is_not_a_transaction_response_is_permanent_and_says_what_it_was() {
        let error = permanent_error(read_answer(200, &fixture("patient.json"), FIRST));
        assert!(
            error.contains("transaction-response") && error.contains("Patient"),
            "{error}"
        );
        let error = permanent_error(read_answer(200, b"<html>ok</html>", FIRST));
        assert!(error.contains("not JSON"), "{error}");
    }

    #[test]
    fn a_transaction_response_with_a_failed_entry_is_permanent_and_names_the_entry() {
        let mut bundle: Value =
            serde_json::from_slice(&fixture("transaction-response.json")).unwrap();
        bundle["entry"][2]["response"] = serde_json::json!({
            "status": "422 Unprocessable Entity",
            "outcome": serde_json::from_slice::<Value>(&fixture("operationoutcome-422.json")).unwrap(),
        });
        let body = serde_json::to_vec(&bundle).unwrap();
        let error = permanent_error(read_answer(200, &body, FIRST));
        assert!(error.contains("entry[2] answered 422"), "{error}");
        assert!(error.contains("Bundle.entry[2].resource.status"), "{error}");
    }

    #[test]
    fn a_transaction_response_missing_entries_is_permanent() {
        let mut bundle: Value =
            serde_json::from_slice(&fixture("transaction-response.json")).unwrap();
        bundle["entry"].as_array_mut().unwrap().pop();
        let body = serde_json::to_vec(&bundle).unwrap();
        let error = permanent_error(read_answer(200, &body, FIRST));
        assert!(error.contains("2 entries for the 3 sent"), "{error}");
    }

    #[test]
    fn a_422_is_permanent_and_its_error_names_the_failing_field() {
        let outcome = read_answer(422, &fixture("operationoutcome-422.json"), FIRST);
        assert_eq!(
            outcome,
            Outcome::Permanent {
                status: Some(422),
                error: "HTTP 422 Unprocessable Entity: error required at Bundle.entry[2].resource.status: \
                        Observation.status: minimum required = 1, but only found 0 \
                        (Bundle.entry[2].resource: Observation.status is required)"
                    .into()
            }
        );
    }

    #[test]
    fn a_412_for_several_conditional_matches_is_permanent_with_the_servers_diagnostics() {
        let error = permanent_error(read_answer(
            412,
            &fixture("operationoutcome-412.json"),
            FIRST,
        ));
        assert!(
            error.starts_with("HTTP 412 Precondition Failed: error duplicate: "),
            "{error}"
        );
        assert!(error.contains("multiple resources match"), "{error}");
    }

    #[test]
    fn other_client_errors_are_permanent() {
        for status in [400, 401, 403, 404, 405, 410, 415, 501, 505] {
            assert!(
                matches!(read_answer(status, b"", FIRST), Outcome::Permanent { .. }),
                "{status}"
            );
        }
    }

    #[test]
    fn throttling_and_server_errors_are_retried_honouring_retry_after() {
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(
                matches!(read_answer(status, b"", FIRST), Outcome::Retry { .. }),
                "{status}"
            );
        }
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let outcome = read(StatusCode::TOO_MANY_REQUESTS, &headers, b"", b"", FIRST);
        assert!(
            matches!(outcome, Outcome::Retry { retry_after: Some(d), .. } if d == Duration::from_secs(7)),
            "{outcome:?}"
        );
    }

    #[test]
    fn a_transient_issue_is_retried_whatever_the_4xx_status() {
        let body = br#"{"resourceType":"OperationOutcome","issue":[
            {"severity":"error","code":"lock-error","diagnostics":"index busy"}]}"#;
        let Outcome::Retry { error, .. } = read_answer(400, body, FIRST) else {
            panic!("a lock-error issue should be retried")
        };
        assert_eq!(error, "HTTP 400 Bad Request: error lock-error: index busy");
        let warning_only = br#"{"resourceType":"OperationOutcome","issue":[
            {"severity":"warning","code":"transient"},{"severity":"error","code":"invalid"}]}"#;
        assert!(matches!(
            read_answer(400, warning_only, FIRST),
            Outcome::Permanent { .. }
        ));
    }

    #[test]
    fn a_409_is_retried_up_to_conflict_retries_then_permanent() {
        let conflict = br#"{"resourceType":"OperationOutcome","issue":[
            {"severity":"error","code":"conflict","diagnostics":"Encounter/456 changed"}]}"#;
        let at = |number| Attempt {
            number,
            conflict_retries: 2,
        };
        for n in [1, 2] {
            assert!(
                matches!(
                    read_answer(409, conflict, at(n)),
                    Outcome::Retry {
                        status: Some(409),
                        ..
                    }
                ),
                "attempt {n}"
            );
        }
        let error = permanent_error(read_answer(409, conflict, at(3)));
        assert!(
            error.contains("gave up after 2 conflict retries"),
            "{error}"
        );
        assert!(error.contains("Encounter/456 changed"), "{error}");
        let never = Attempt {
            number: 1,
            conflict_retries: 0,
        };
        assert!(matches!(
            read_answer(409, conflict, never),
            Outcome::Permanent { .. }
        ));
    }

    #[test]
    fn a_huge_operation_outcome_is_cut_to_the_error_text_limit() {
        let issues: Vec<Value> = (0..500)
            .map(|i| serde_json::json!({"severity":"error","code":"value","diagnostics":format!("bad value é {i}")}))
            .collect();
        let body = serde_json::to_vec(
            &serde_json::json!({"resourceType":"OperationOutcome","issue":issues}),
        )
        .unwrap();
        let error = permanent_error(read_answer(400, &body, FIRST));
        assert!(error.len() <= ERROR_TEXT_LIMIT, "{}", error.len());
        assert!(error.ends_with('…'));
    }
}
