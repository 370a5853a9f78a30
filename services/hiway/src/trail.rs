//! `hiway trace`: the trail of one message, one line per event, oldest first.
//!
//! Each line is read from the event's `detail`, which holds the event's [`AuditKind`] as the
//! audit service stored it. Decoding that type, rather than picking keys out of the JSON by
//! name, means a renamed or added field changes this code at compile time instead of
//! silently printing `?`; and every kind, the operator's and the circuit's included, reads as
//! words rather than as raw JSON.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize as _;

use hiway_audit::TrailEntry;
use hiway_proto::DestinationName;
use hiway_proto::audit::AuditKind;

use crate::status::circuit_opened_because;

/// The widest kind (`circuit_opened`, `circuit_closed`), so the service column lines up.
const KIND_WIDTH: usize = 14;

/// Prints the trail of one message, oldest event first.
pub fn format_trail(id: &str, trail: &[TrailEntry]) -> String {
    let mut out = String::new();
    if trail.is_empty() {
        let _ = writeln!(out, "no events recorded for message {id}");
        return out;
    }
    let _ = writeln!(out, "message {id}");
    for e in trail {
        let _ = writeln!(
            out,
            "  {}  {:<KIND_WIDTH$} {:<12} {}",
            e.at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            e.kind,
            e.service,
            describe(&e.detail)
        );
    }
    out
}

/// One event in words. A detail that does not decode (written by another version of hiway,
/// say) is shown as stored, so nothing recorded is hidden.
fn describe(detail: &serde_json::Value) -> String {
    // Decoded from the borrowed value: the detail is not copied to be read.
    let Ok(kind) = AuditKind::deserialize(detail) else {
        return detail.to_string();
    };
    match kind {
        AuditKind::Received {
            channel,
            client,
            size_bytes,
            ..
        } => format!("channel={channel} client={client} size={size_bytes}B"),
        AuditKind::Routed { copies, .. } => {
            let copies: Vec<String> = copies
                .iter()
                .map(|c| {
                    let part = c.part.map(|p| format!(" output {p}")).unwrap_or_default();
                    format!("{} (route {}{part})", c.destination, c.route)
                })
                .collect();
            format!("to {}", copies.join(", "))
        }
        AuditKind::Unrouted { channel } => format!("no route takes channel {channel}"),
        AuditKind::Filtered { route, reason, .. } => {
            format!("route {route} turned it away: {reason}")
        }
        AuditKind::Attempted {
            destination,
            attempt,
            status_code,
            duration_ms,
            error,
            retry_in_ms,
            ..
        } => {
            let status = status_code.map_or_else(|| "-".to_owned(), |s| s.to_string());
            // The wait before the next attempt; none when this was the last (it went dead).
            let retry = retry_in_ms
                .map(|ms| format!(" retry_in={}", compact(ms)))
                .unwrap_or_default();
            format!(
                "destination={destination} attempt={attempt} status={status} duration={duration_ms}ms{retry} error={error}"
            )
        }
        AuditKind::Delivered {
            destination,
            attempt,
            status_code,
            duration_ms,
            ..
        } => format!(
            "destination={destination} attempt={attempt} status={status_code} duration={duration_ms}ms"
        ),
        AuditKind::Replayed {
            destination,
            replay,
            dead_id,
        } => format!(
            "destination={} replay={replay} dead_id={dead_id}",
            or_dash(destination.as_ref())
        ),
        AuditKind::Discarded {
            destination,
            dead_id,
        } => format!(
            "destination={} dead_id={dead_id}",
            or_dash(destination.as_ref())
        ),
        AuditKind::CircuitOpened {
            destination,
            failures,
            cool_down_ms,
            reason,
        } => format!(
            "destination={destination} {}",
            circuit_opened_because(failures, cool_down_ms, reason.as_deref())
        ),
        AuditKind::CircuitClosed { destination } => format!("destination={destination}"),
        AuditKind::Dead {
            destination,
            reason,
        } => format!(
            "destination={} reason={reason}",
            or_dash(destination.as_ref())
        ),
    }
}

fn or_dash(destination: Option<&DestinationName>) -> &str {
    destination.map_or("-", DestinationName::as_str)
}

/// A wait as one word (`20s`, `1m5s`, `2h`), whole seconds from one second up: the jitter's
/// milliseconds say nothing to an operator, and a space would break the `key=value` line.
fn compact(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let whole = Duration::from_secs((ms + 500) / 1000);
    humantime::format_duration(whole)
        .to_string()
        .replace(' ', "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use hiway_proto::audit::RoutedCopy;
    use hiway_proto::{ChannelName, ClientName, RouteName};

    fn destination(name: &str) -> DestinationName {
        DestinationName::parse(name).unwrap()
    }

    /// One trail row as the audit store returns it: the kind's name in `kind`, and the kind
    /// itself, serialized, in `detail` (the columns beside it are not read here).
    fn entry(service: &str, kind: AuditKind) -> TrailEntry {
        let detail = serde_json::to_value(&kind).unwrap();
        TrailEntry {
            kind: detail["kind"].as_str().unwrap().to_owned(),
            at: "2026-11-22T01:24:25.304Z".parse().unwrap(),
            service: service.into(),
            channel: None,
            client: None,
            destination: None,
            route: None,
            attempt: None,
            status_code: None,
            duration_ms: None,
            size_bytes: None,
            detail,
        }
    }

    fn line(service: &str, kind: AuditKind) -> String {
        let trail = format_trail("m", &[entry(service, kind)]);
        trail.lines().nth(1).unwrap().to_owned()
    }

    #[test]
    fn every_kind_of_event_reads_as_words_with_its_fields() {
        let dead_id: uuid::Uuid = "01a200db-828d-73d8-88fd-6dd28cc76c07".parse().unwrap();
        let cases = [
            (
                line(
                    "ingress",
                    AuditKind::Received {
                        channel: ChannelName::parse("demo").unwrap(),
                        client: ClientName::parse("clinic").unwrap(),
                        content_type: "application/json".into(),
                        size_bytes: 21,
                    },
                ),
                "received       ingress      channel=demo client=clinic size=21B",
            ),
            (
                line(
                    "transformer",
                    AuditKind::Routed {
                        channel: ChannelName::parse("demo").unwrap(),
                        copies: vec![
                            RoutedCopy {
                                route: RouteName::parse("to-dhis2").unwrap(),
                                destination: destination("dhis2"),
                                part: None,
                            },
                            RoutedCopy {
                                route: RouteName::parse("split").unwrap(),
                                destination: destination("fhir"),
                                part: Some(1),
                            },
                        ],
                    },
                ),
                "routed         transformer  to dhis2 (route to-dhis2), fhir (route split output 1)",
            ),
            (
                line(
                    "transformer",
                    AuditKind::Unrouted {
                        channel: ChannelName::parse("demo").unwrap(),
                    },
                ),
                "unrouted       transformer  no route takes channel demo",
            ),
            (
                line(
                    "transformer",
                    AuditKind::Filtered {
                        channel: ChannelName::parse("demo").unwrap(),
                        route: RouteName::parse("visits").unwrap(),
                        reason: "filter".into(),
                    },
                ),
                "filtered       transformer  route visits turned it away: filter",
            ),
            (
                line(
                    "sender",
                    AuditKind::Attempted {
                        destination: destination("dhis2"),
                        route: None,
                        attempt: 2,
                        status_code: Some(503),
                        duration_ms: 12,
                        error: "HTTP 503 Service Unavailable".into(),
                        retry_in_ms: Some(65_400),
                    },
                ),
                "attempted      sender       destination=dhis2 attempt=2 status=503 duration=12ms retry_in=1m5s error=HTTP 503 Service Unavailable",
            ),
            (
                line(
                    "sender",
                    AuditKind::Attempted {
                        destination: destination("dhis2"),
                        route: None,
                        attempt: 3,
                        status_code: None,
                        duration_ms: 0,
                        error: "could not connect".into(),
                        retry_in_ms: None,
                    },
                ),
                "attempted      sender       destination=dhis2 attempt=3 status=- duration=0ms error=could not connect",
            ),
            (
                line(
                    "sender",
                    AuditKind::Delivered {
                        destination: destination("dhis2"),
                        route: None,
                        attempt: 1,
                        status_code: 200,
                        duration_ms: 2,
                    },
                ),
                "delivered      sender       destination=dhis2 attempt=1 status=200 duration=2ms",
            ),
            (
                line(
                    "sender",
                    AuditKind::Dead {
                        destination: Some(destination("dhis2")),
                        reason: "gave up after 3 attempts".into(),
                    },
                ),
                "dead           sender       destination=dhis2 reason=gave up after 3 attempts",
            ),
            (
                line(
                    "operator",
                    AuditKind::Replayed {
                        destination: Some(destination("dhis2")),
                        replay: 1,
                        dead_id,
                    },
                ),
                "replayed       operator     destination=dhis2 replay=1 dead_id=01a200db-828d-73d8-88fd-6dd28cc76c07",
            ),
            (
                line(
                    "operator",
                    AuditKind::Discarded {
                        destination: None,
                        dead_id,
                    },
                ),
                "discarded      operator     destination=- dead_id=01a200db-828d-73d8-88fd-6dd28cc76c07",
            ),
            (
                line(
                    "sender",
                    AuditKind::CircuitOpened {
                        destination: destination("dhis2"),
                        failures: 3,
                        cool_down_ms: 5_000,
                        reason: None,
                    },
                ),
                "circuit_opened sender       destination=dhis2 3 consecutive retryable failures; a probe every 5s",
            ),
            (
                line(
                    "sender",
                    AuditKind::CircuitClosed {
                        destination: destination("dhis2"),
                    },
                ),
                "circuit_closed sender       destination=dhis2",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, format!("  2026-11-22T01:24:25.304Z  {want}"));
        }
    }

    #[test]
    fn a_detail_that_does_not_decode_is_shown_as_stored() {
        let mut odd = entry(
            "sender",
            AuditKind::CircuitClosed {
                destination: destination("dhis2"),
            },
        );
        odd.kind = "rerouted".into();
        odd.detail = serde_json::json!({"kind": "rerouted", "to": "elsewhere"});
        let trail = format_trail("m", &[odd]);
        assert!(
            trail.ends_with("sender       {\"kind\":\"rerouted\",\"to\":\"elsewhere\"}\n"),
            "{trail}"
        );
    }

    #[test]
    fn a_message_with_no_events_says_so() {
        assert_eq!(
            format_trail("m-1", &[]),
            "no events recorded for message m-1\n"
        );
    }

    #[test]
    fn waits_are_one_word_in_whole_seconds_from_a_second_up() {
        assert_eq!(compact(250), "250ms");
        assert_eq!(compact(20_345), "20s");
        assert_eq!(compact(65_400), "1m5s");
        assert_eq!(compact(7_200_000), "2h");
    }
}
