//! AMQP header names. No service spells one inline.
//!
//! Standard AMQP properties carry what they were made for: `message_id` (the [`MessageId`]),
//! `content_type`, `timestamp` (seconds) and `correlation_id`. Everything else hiway needs
//! travels in these headers.
//!
//! [`MessageId`]: crate::MessageId

/// Envelope version, so a v2 envelope can live beside v1 during an upgrade.
pub const VERSION: &str = "x-hiway-v";
/// The channel the message arrived on.
pub const CHANNEL: &str = "x-hiway-channel";
/// The client that posted it.
pub const CLIENT: &str = "x-hiway-client";
/// When ingress accepted it, in microseconds since the Unix epoch (the AMQP `timestamp`
/// property has only second precision, too coarse for latency).
pub const RECEIVED_AT: &str = "x-hiway-received-at";
/// The destination a fanned-out copy is for.
pub const DESTINATION: &str = "x-hiway-destination";
/// The route that sent the copy to its destination.
pub const ROUTE: &str = "x-hiway-route";
/// Delivery attempts made so far for this copy (0 before the first).
pub const ATTEMPT: &str = "x-hiway-attempt";
/// How many times an operator replayed this copy.
pub const REPLAY: &str = "x-hiway-replay";
/// Which output of a route's transform this copy is (0-based).
pub const PART: &str = "x-hiway-part";
/// A path relative to the destination's URL, chosen by a transform.
pub const PATH: &str = "x-hiway-path";
/// An HTTP method chosen by a transform.
pub const METHOD: &str = "x-hiway-method";
/// Present (true) on copies made by an on-dead route.
pub const FROM_DEAD: &str = "x-hiway-from-dead";
/// W3C trace context, so one trace covers the whole path: the source's, passed through to
/// destinations (see [`crate::trace`]). The same names are used as HTTP headers.
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace context: vendor-specific trace data that goes with [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";

/// The HTTP header that carries the message id to destinations, besides `Idempotency-Key`.
pub const HTTP_MESSAGE_ID: &str = "x-hiway-message-id";
/// The HTTP header destinations can dedupe on.
pub const HTTP_IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Why a message was dead-lettered by a hiway service (as opposed to by the broker, which
/// writes `x-death`).
pub const DEAD_REASON: &str = "x-hiway-dead-reason";
/// Which service dead-lettered it.
pub const DEAD_BY: &str = "x-hiway-dead-by";
/// A unique id given to a dead letter when a hiway service publishes it, so that a dead letter
/// the broker delivers twice is stored once.
pub const DEAD_ID: &str = "x-hiway-dead-id";
/// The history of failed attempts of a copy, a JSON array of
/// `{"attempt", "at", "status_code", "error"}`, carried so that a dead letter holds every
/// attempt even before the audit trail is written.
pub const ATTEMPTS: &str = "x-hiway-attempts";
/// When a hiway service dead-lettered the message, in microseconds since the Unix epoch: the
/// time it died, which may be well before the audit service could store it.
pub const DEAD_AT: &str = "x-hiway-dead-at";

/// On a batch of messages (see [`crate::batch`]): how many it holds.
pub const BATCH: &str = "x-hiway-batch";

/// A header's value as text, if it is a string (long or short), with invalid UTF-8 replaced.
/// For the readers that must get on with a damaged message (the dead-letter store, on-dead
/// routes) rather than refuse it, as the envelope's strict reading does.
pub fn text_lossy(properties: &crate::amqp::BasicProperties, key: &str) -> Option<String> {
    use crate::amqp::AMQPValue;
    match properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::amqp::BasicProperties;
    use crate::amqp::{AMQPValue, FieldTable, LongString, ShortString};

    use super::text_lossy;

    fn with(value: AMQPValue) -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert("k".into(), value);
        BasicProperties::default().with_headers(h)
    }

    #[test]
    fn a_header_reads_as_text_when_it_is_a_string_of_either_kind_even_a_damaged_one() {
        let long = with(AMQPValue::LongString(LongString::from(b"gave up".to_vec())));
        assert_eq!(text_lossy(&long, "k").as_deref(), Some("gave up"));
        let short = with(AMQPValue::ShortString(ShortString::from("sender")));
        assert_eq!(text_lossy(&short, "k").as_deref(), Some("sender"));
        let damaged = with(AMQPValue::LongString(LongString::from(b"a\xffb".to_vec())));
        assert_eq!(text_lossy(&damaged, "k").as_deref(), Some("a\u{fffd}b"));
    }

    #[test]
    fn a_header_that_is_missing_or_not_a_string_has_no_text() {
        assert_eq!(text_lossy(&with(AMQPValue::LongInt(3)), "k"), None);
        assert_eq!(text_lossy(&with(AMQPValue::LongInt(3)), "other"), None);
        assert_eq!(text_lossy(&BasicProperties::default(), "k"), None);
    }
}
