//! Reading DHIS2's import answers.
//!
//! DHIS2 before 2.38 (or called as `/api/37/…`) answers 200 with a bare `ImportSummary` even
//! when it rejected values; 2.38 and later wrap it in a `WebMessage` under `response` and answer
//! 409 for warnings and errors. The tracker importer answers an import report with
//! `validationReport.errorReports`. Whatever the shape, the verdict is in the body.

use serde_json::Value;

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

/// Sends one message to DHIS2; the import answer in the body decides.
pub(crate) async fn send(
    destination: &crate::destination::Destination,
    envelope: &hiway_proto::Envelope,
    body: bytes::Bytes,
) -> crate::outcome::Outcome {
    let request = match super::http::message_request(destination, envelope) {
        Ok(r) => r,
        Err(outcome) => return outcome,
    };
    match super::http::exchange(request.body(body)).await {
        Ok(a) => crate::outcome::classify(
            hiway_config::DestinationKind::Dhis2,
            a.status,
            &a.headers,
            &a.body,
        ),
        Err(outcome) => outcome,
    }
}
