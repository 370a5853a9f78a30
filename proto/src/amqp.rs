//! AMQP 0-9-1's data model: message properties and field tables (headers, queue arguments).
//!
//! These are the types of `amq-protocol`, the protocol crate lapin is built on, used here
//! without any client: proto describes messages, and hiway-runtime alone decides which client
//! carries them (docs/design/architecture.md, "The AMQP client").

pub use amq_protocol::protocol::BasicProperties;
pub use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
