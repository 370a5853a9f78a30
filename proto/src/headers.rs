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
/// W3C trace context, so one trace covers the whole path.
pub const TRACEPARENT: &str = "traceparent";

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
