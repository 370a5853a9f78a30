//! What an answer means: delivered, worth another try, or never going to work.
//!
//! The rules (see also `docs/delivery.md`):
//! - 2xx is delivered, unless a `dhis2` destination's import summary says values were
//!   rejected; so is any status an `http` destination lists in `delivered_statuses`;
//! - connection errors, timeouts, 408, 425, 429 and 5xx (but 501 and 505) are retryable, with
//!   `Retry-After` honoured;
//! - every other answer is permanent: retrying cannot change it, so the message goes dead at
//!   once with the destination's own words, for an operator to fix and replay.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hiway_config::DestinationKind;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

use crate::kinds::dhis2;

/// How much of an answer's body is kept as its error text: enough for a DHIS2 conflict list or
/// an OperationOutcome, bounded so one answer cannot bloat the audit trail.
pub const ERROR_TEXT_LIMIT: usize = 2048;

/// What one attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The destination took it.
    Delivered {
        /// The status it answered: 2xx, or one that means delivered for this destination.
        status: u16,
    },
    /// It may work later.
    Retry {
        /// The status, if the destination answered.
        status: Option<u16>,
        /// What went wrong.
        error: String,
        /// The destination's own `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// It will not work until someone changes something.
    Permanent {
        /// The status, if the destination answered.
        status: Option<u16>,
        /// What went wrong, in the destination's words where it gave any.
        error: String,
    },
}

impl Outcome {
    /// The destination refused hiway's credentials: a 401, after the new login and repeat a
    /// destination with a login gets. No message gets through until an operator fixes them,
    /// so the sender parks the destination instead of dead-lettering each message
    /// (protocols: "park the queue, don't drop messages"). A 403 is not one: DHIS2 and others
    /// answer it for one record the user may not write, which other messages may not touch.
    pub fn refuses_credentials(&self) -> bool {
        matches!(
            self,
            Outcome::Permanent {
                status: Some(401),
                ..
            }
        )
    }

    /// The same outcome with its error text put in context (`context` gets the text and
    /// returns the new one), so a reason says which step failed; a delivery is unchanged.
    pub fn in_context(self, context: impl FnOnce(String) -> String) -> Outcome {
        match self {
            Outcome::Retry {
                status,
                error,
                retry_after,
            } => Outcome::Retry {
                status,
                error: context(error),
                retry_after,
            },
            Outcome::Permanent { status, error } => Outcome::Permanent {
                status,
                error: context(error),
            },
            delivered @ Outcome::Delivered { .. } => delivered,
        }
    }

    /// The HTTP status of the attempt, if there was an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Delivered { status } => Some(*status),
            Outcome::Retry { status, .. } | Outcome::Permanent { status, .. } => *status,
        }
    }
}

/// Whether a status is worth another attempt.
pub fn retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 425 | 429)
        || (status.is_server_error()
            && status != StatusCode::NOT_IMPLEMENTED
            && status != StatusCode::HTTP_VERSION_NOT_SUPPORTED)
}

/// Reads an answer.
pub fn classify(
    kind: DestinationKind,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Outcome {
    let code = status.as_u16();
    if kind == DestinationKind::Dhis2
        && (status.is_success() || status == StatusCode::CONFLICT)
        && let Some(verdict) = dhis2::read_import(body)
    {
        return match verdict {
            Ok(()) if status.is_success() => Outcome::Delivered { status: code },
            Ok(()) => Outcome::Permanent {
                status: Some(code),
                error: answer_text(status, body),
            },
            Err(reason) => Outcome::Permanent {
                status: Some(code),
                error: format!("HTTP {status}: {reason}"),
            },
        };
    }
    if status.is_success() {
        Outcome::Delivered { status: code }
    } else if retryable(status) {
        Outcome::Retry {
            status: Some(code),
            error: answer_text(status, body),
            retry_after: retry_after(headers, Utc::now()),
        }
    } else {
        Outcome::Permanent {
            status: Some(code),
            error: answer_text(status, body),
        }
    }
}

/// Reads an answer of an `http` destination: as [`classify`] does, except that a status the
/// destination lists in `delivered_statuses` is delivered, with that status.
///
/// A retryable status is retried even when listed: configuration refuses to list one, and the
/// check here keeps "never counts an outage as delivered" true whatever the list holds.
pub fn classify_http(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    delivered_statuses: &[u16],
) -> Outcome {
    let code = status.as_u16();
    if delivered_statuses.contains(&code) && !retryable(status) {
        return Outcome::Delivered { status: code };
    }
    classify(DestinationKind::Http, status, headers, body)
}

/// A transport failure: nothing was answered, so another attempt may go through.
pub fn transport_error(e: &reqwest::Error) -> Outcome {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut error = kind.to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        error.push_str(": ");
        error.push_str(&s.to_string());
        source = s.source();
    }
    Outcome::Retry {
        status: None,
        error,
        retry_after: None,
    }
}

/// "HTTP 400 Bad Request: <the start of the body>".
fn answer_text(status: StatusCode, body: &[u8]) -> String {
    let excerpt = String::from_utf8_lossy(&body[..body.len().min(ERROR_TEXT_LIMIT)]);
    let excerpt = excerpt.trim();
    if excerpt.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {excerpt}")
    }
}

/// `Retry-After` as seconds or as an HTTP date.
pub fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((when - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../../tests/fixtures/dhis2/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn http(status: u16) -> Outcome {
        classify(
            DestinationKind::Http,
            StatusCode::from_u16(status).unwrap(),
            &HeaderMap::new(),
            b"",
        )
    }

    #[test]
    fn a_2xx_is_delivered() {
        assert_eq!(http(200), Outcome::Delivered { status: 200 });
        assert_eq!(http(204), Outcome::Delivered { status: 204 });
    }

    fn http_delivering(status: u16, delivered_statuses: &[u16]) -> Outcome {
        classify_http(
            StatusCode::from_u16(status).unwrap(),
            &HeaderMap::new(),
            br#"{"errors":[{"field":"case_ref","message":"case already exists"}]}"#,
            delivered_statuses,
        )
    }

    #[test]
    fn a_status_the_destination_lists_as_delivered_is_delivered_with_that_status() {
        assert_eq!(
            http_delivering(409, &[409]),
            Outcome::Delivered { status: 409 }
        );
        assert_eq!(
            http_delivering(303, &[409, 303]),
            Outcome::Delivered { status: 303 }
        );
    }

    #[test]
    fn a_status_the_destination_does_not_list_keeps_its_usual_outcome() {
        assert!(matches!(
            http_delivering(409, &[]),
            Outcome::Permanent {
                status: Some(409),
                ..
            }
        ));
        assert!(matches!(
            http_delivering(422, &[409]),
            Outcome::Permanent {
                status: Some(422),
                ..
            }
        ));
        assert_eq!(
            http_delivering(201, &[409]),
            Outcome::Delivered { status: 201 }
        );
    }

    #[test]
    fn a_retryable_status_is_retried_even_when_listed_as_delivered() {
        for status in [408, 425, 429, 500, 503] {
            assert!(
                matches!(http_delivering(status, &[status]), Outcome::Retry { .. }),
                "{status}"
            );
        }
    }

    #[test]
    fn throttling_timeouts_and_server_errors_are_retried() {
        for status in [408, 425, 429, 500, 502, 503, 504] {
            assert!(matches!(http(status), Outcome::Retry { .. }), "{status}");
        }
    }

    #[test]
    fn other_client_errors_and_unsupported_features_are_permanent() {
        for status in [400, 401, 403, 404, 409, 413, 415, 422, 501, 505, 301] {
            assert!(
                matches!(http(status), Outcome::Permanent { .. }),
                "{status}"
            );
        }
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_as_an_http_date() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(retry_after(&h, Utc::now()), Some(Duration::from_secs(120)));
        let now = DateTime::parse_from_rfc2822("Wed, 21 Oct 2015 07:28:00 GMT")
            .unwrap()
            .with_timezone(&Utc);
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:30:00 GMT"),
        );
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(120)));
        let outcome = classify(
            DestinationKind::Http,
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            b"",
        );
        assert!(matches!(
            outcome,
            Outcome::Retry {
                retry_after: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn the_destinations_own_words_are_kept_in_the_error() {
        let outcome = classify(
            DestinationKind::Http,
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            br#"{"error":"bad id"}"#,
        );
        assert_eq!(
            outcome,
            Outcome::Permanent {
                status: Some(400),
                error: r#"HTTP 400 Bad Request: {"error":"bad id"}"#.into()
            }
        );
    }

    #[test]
    fn a_dhis2_409_with_conflicts_is_permanent_and_carries_the_conflict_texts() {
        let body = fixture("resp-238-409-warning.json");
        let outcome = classify(
            DestinationKind::Dhis2,
            StatusCode::CONFLICT,
            &HeaderMap::new(),
            &body,
        );
        let Outcome::Permanent {
            status: Some(409),
            error,
        } = outcome
        else {
            panic!("{outcome:?}")
        };
        assert!(error.contains("E7610"), "{error}");
        assert!(
            error.contains("Data element not found or not accessible"),
            "{error}"
        );
    }

    #[test]
    fn a_dhis2_409_error_summary_is_permanent() {
        let body = fixture("resp-238-409-error.json");
        let outcome = classify(
            DestinationKind::Dhis2,
            StatusCode::CONFLICT,
            &HeaderMap::new(),
            &body,
        );
        let Outcome::Permanent { error, .. } = outcome else {
            panic!("{outcome:?}")
        };
        assert!(
            error.contains("E7603") && error.contains("Org unit not found"),
            "{error}"
        );
    }

    #[test]
    fn a_pre_2_38_dhis2_200_with_a_warning_is_permanent_not_delivered() {
        let body = fixture("resp-237-importsummary.json");
        let outcome = classify(
            DestinationKind::Dhis2,
            StatusCode::OK,
            &HeaderMap::new(),
            &body,
        );
        let Outcome::Permanent {
            status: Some(200),
            error,
        } = outcome
        else {
            panic!("{outcome:?}")
        };
        assert!(
            error.contains("WARNING") && error.contains("eY5ehpbEsB7X"),
            "{error}"
        );
    }

    #[test]
    fn a_dhis2_successful_import_is_delivered() {
        let body = fixture("resp-238-ok.json");
        assert_eq!(
            classify(
                DestinationKind::Dhis2,
                StatusCode::OK,
                &HeaderMap::new(),
                &body
            ),
            Outcome::Delivered { status: 200 }
        );
    }

    #[test]
    fn a_dhis2_tracker_error_report_is_permanent_with_its_error_codes() {
        let body = fixture("tracker-report-error.json");
        let outcome = classify(
            DestinationKind::Dhis2,
            StatusCode::CONFLICT,
            &HeaderMap::new(),
            &body,
        );
        let Outcome::Permanent { error, .. } = outcome else {
            panic!("{outcome:?}")
        };
        assert!(error.contains("E1011"), "{error}");
    }

    #[test]
    fn the_same_dhis2_warning_sent_to_a_plain_http_destination_is_only_its_status() {
        let body = fixture("resp-237-importsummary.json");
        assert_eq!(
            classify(
                DestinationKind::Http,
                StatusCode::OK,
                &HeaderMap::new(),
                &body
            ),
            Outcome::Delivered { status: 200 }
        );
    }
}
