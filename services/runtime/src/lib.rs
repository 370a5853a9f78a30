//! What every hiway main shares, and nothing else: telemetry, stop signals, broker
//! connections and confirmed publishing. No business logic lives here.

pub mod acks;
pub mod amqp;
pub mod audit;
pub mod batcher;
pub mod cli;
pub mod client;
pub mod consume;
pub mod shutdown;
pub mod telemetry;

pub use acks::Acks;
pub use amqp::{Broker, PublishError, Publisher};
pub use audit::{AuditBatcher, AuditWriter};
pub use shutdown::stop_signal;
