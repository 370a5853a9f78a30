//! Audit events: what happened to a message, published by every service to the audit exchange
//! and written to PostgreSQL by the audit service.
//!
//! One AMQP message carries a JSON array of events (an [`AuditBatch`]): a stage that records
//! several facts about one message (received and routed, say) publishes them together, so the
//! audit trail costs one broker write per stage rather than one per fact.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{ChannelName, ClientName, DestinationName, MessageId, RouteName};

/// Several events published together, as one AMQP message body.
pub type AuditBatch = Vec<AuditEvent>;

/// One fact about one message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Unique per event, so a batch redelivered by the broker is written once.
    pub event_id: Uuid,
    /// The message the event is about.
    pub message_id: MessageId,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Which service recorded it (`ingress`, `transformer`, `sender`, …).
    pub service: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: AuditKind,
}

/// The kinds of events, with what each one knows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditKind {
    /// Ingress accepted the message (the broker confirmed it).
    Received {
        /// Channel it came in on.
        channel: ChannelName,
        /// Client that sent it.
        client: ClientName,
        /// Declared content type.
        content_type: String,
        /// Body size in bytes.
        size_bytes: u64,
    },
    /// The transformer sent one copy to each of these destinations.
    Routed {
        /// Channel it came in on.
        channel: ChannelName,
        /// (route, destination) pairs, one per copy.
        copies: Vec<RoutedCopy>,
    },
    /// No route matched: recorded, never silently dropped.
    Unrouted {
        /// Channel it came in on.
        channel: ChannelName,
    },
    /// A route's rule turned the message away: its filter was false, or its transform made
    /// nothing of it. The message is done as far as this route goes.
    Filtered {
        /// Channel it came in on.
        channel: ChannelName,
        /// The route.
        route: RouteName,
        /// Which rule: "filter" or "transform emitted nothing".
        reason: String,
    },
    /// One delivery attempt that did not succeed.
    Attempted {
        /// Where it was sent.
        destination: DestinationName,
        /// Which route sent it there.
        route: Option<RouteName>,
        /// 1 for the first attempt.
        attempt: u32,
        /// The HTTP status, if the destination answered.
        status_code: Option<u16>,
        /// How long the attempt took.
        duration_ms: u64,
        /// What went wrong, in words an operator can act on (no payload content).
        error: String,
        /// When it will be tried again; `None` when it will not (it went dead).
        #[serde(default)]
        retry_in_ms: Option<u64>,
    },
    /// The destination accepted the message.
    Delivered {
        /// Where it was delivered.
        destination: DestinationName,
        /// Which route sent it there.
        route: Option<RouteName>,
        /// Which attempt succeeded (1 for the first).
        attempt: u32,
        /// The status the destination answered: 2xx, or another that means delivered there
        /// (one its `delivered_statuses` lists, a DHIS2 409 for objects that exist already).
        status_code: u16,
        /// How long the successful attempt took.
        duration_ms: u64,
    },
    /// An operator replayed a dead letter: it is on its way again, attempts restarted.
    Replayed {
        /// Where it goes again (none for a message that died before routing).
        destination: Option<DestinationName>,
        /// How many times it has been replayed, this one included.
        replay: u32,
        /// The dead letter it came from.
        dead_id: Uuid,
    },
    /// An operator discarded a dead letter: it will not be delivered.
    Discarded {
        /// Where it was meant to go.
        destination: Option<DestinationName>,
        /// The dead letter.
        dead_id: Uuid,
    },
    /// This message's failure opened the destination's circuit: its sender stopped taking
    /// messages for a cool-down.
    CircuitOpened {
        /// The destination.
        destination: DestinationName,
        /// Consecutive retryable failures that opened it.
        failures: u32,
        /// How long before a probe.
        cool_down_ms: u64,
        /// Why, when it was not the count: the destination refused hiway's credentials.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// This message, sent as a probe, was delivered: the circuit is closed again.
    CircuitClosed {
        /// The destination.
        destination: DestinationName,
    },
    /// The message could not be processed and went to the dead-letter exchange.
    Dead {
        /// The destination, when the message died on its way to one.
        destination: Option<DestinationName>,
        /// Why.
        reason: String,
    },
}

/// One fanned-out copy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoutedCopy {
    /// The route that matched.
    pub route: RouteName,
    /// The destination it sends to.
    pub destination: DestinationName,
    /// Which output of the route's transform the copy is, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<u32>,
}

impl AuditEvent {
    /// An event that happens now.
    pub fn now(message_id: MessageId, service: &str, kind: AuditKind) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            message_id,
            at: Utc::now(),
            service: service.to_owned(),
            kind,
        }
    }

    /// The short name of the kind, as stored in the database (`received`, `routed`, …).
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            AuditKind::Received { .. } => "received",
            AuditKind::Routed { .. } => "routed",
            AuditKind::Unrouted { .. } => "unrouted",
            AuditKind::Filtered { .. } => "filtered",
            AuditKind::Attempted { .. } => "attempted",
            AuditKind::Delivered { .. } => "delivered",
            AuditKind::Dead { .. } => "dead",
            AuditKind::Replayed { .. } => "replayed",
            AuditKind::CircuitOpened { .. } => "circuit_opened",
            AuditKind::CircuitClosed { .. } => "circuit_closed",
            AuditKind::Discarded { .. } => "discarded",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_serializes_with_its_kind_inline() {
        let event = AuditEvent::now(
            MessageId::generate(),
            "sender",
            AuditKind::Delivered {
                destination: DestinationName::parse("dhis2").unwrap(),
                route: None,
                attempt: 1,
                status_code: 200,
                duration_ms: 12,
            },
        );
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["kind"], "delivered");
        assert_eq!(json["destination"], "dhis2");
        assert_eq!(event.kind_name(), "delivered");
        let back: AuditEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn an_event_with_an_invalid_destination_name_does_not_parse() {
        let json = serde_json::json!({
            "event_id": Uuid::now_v7(), "message_id": Uuid::now_v7(), "at": Utc::now(),
            "service": "sender", "kind": "dead", "destination": "Not Valid", "reason": "x"
        });
        assert!(serde_json::from_value::<AuditEvent>(json).is_err());
    }
}
