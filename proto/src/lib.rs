//! The wire contract of hiway: what every service must agree on.
//!
//! - [`ids`]: typed ids and names (message ids are UUIDv7; channel, client, route and
//!   destination names are validated once, because they end up in queue names and headers).
//! - [`headers`]: the AMQP header names that carry message metadata.
//! - [`names`]: exchange and queue names, as functions of one prefix.
//! - [`envelope`]: message metadata to and from AMQP properties; the payload travels as the
//!   AMQP body, untouched.
//! - [`audit`]: the audit events every service publishes.
//! - [`batch`]: several accepted messages in one broker message (ingress → transformer).
//! - [`topology`]: the whole RabbitMQ topology, as a plan of idempotent declarations.
//! - [`trace`]: which W3C trace context values are carried through to destinations.
//! - [`amqp`]: AMQP's data model (properties, field tables), without a client.

pub mod amqp;
pub mod audit;
pub mod batch;
pub mod envelope;
pub mod headers;
pub mod ids;
pub mod names;
pub mod topology;
pub mod trace;

pub use audit::{AuditEvent, AuditKind};
pub use envelope::{Envelope, EnvelopeError};
pub use ids::{ChannelName, ClientName, DestinationName, InvalidName, MessageId, RouteName};
pub use names::Names;
