//! Audit events of many messages, published together (group commit).
//!
//! Every message a worker settles needs its audit events confirmed by the broker before the
//! message is acked. Publishing them one broker message per handled message made the audit
//! trail half of all broker traffic (see docs/benchmarks.md). The batcher instead gathers the
//! events of every message in hand into one audit message, confirmed once; each caller is
//! told the outcome of the batch that carried its events and acks (or requeues) on that.
//!
//! The batching itself is [`crate::batcher`]'s: no timer, batches that grow with the load, and
//! a caller answered only after its own batch's confirm, so nothing is acked on the strength
//! of an audit event that the broker has not taken.

use hiway_proto::audit::AuditEvent;

use crate::batcher::{Batcher, Limits, Writer};
use crate::{PublishError, Publisher};

/// Batches awaiting their confirms at once.
const IN_FLIGHT: usize = 4;

/// The most events in one audit message: bounds its size (an event is a few hundred bytes,
/// so about 300 KB) and the work redone if the audit service fails mid-batch.
const MAX_EVENTS: usize = 1000;

/// Hands audit events to the batching task. Cheap to clone.
#[derive(Clone)]
pub struct AuditBatcher {
    batcher: Batcher<Vec<AuditEvent>>,
}

/// The batching task; [`AuditWriter::finish`] waits for every batch to be confirmed.
pub struct AuditWriter {
    writer: Writer,
}

impl AuditBatcher {
    /// Starts batching onto `publisher`. The task ends once every [`AuditBatcher`] clone is
    /// dropped and every batch is settled: call [`AuditWriter::finish`] before closing the
    /// publisher's channel.
    pub fn start(publisher: Publisher) -> (Self, AuditWriter) {
        let limits = Limits {
            // Each item is one message's events; the weight that bounds a batch is events.
            max_items: usize::MAX,
            max_weight: MAX_EVENTS,
            in_flight: IN_FLIGHT,
        };
        let (batcher, writer) =
            Batcher::start(limits, Vec::len, move |batch: Vec<Vec<AuditEvent>>| {
                let publisher = publisher.clone();
                async move {
                    let events: Vec<&AuditEvent> = batch.iter().flatten().collect();
                    publisher.publish_audit(&events).await
                }
            });
        (Self { batcher }, AuditWriter { writer })
    }

    /// Records `events` and waits until the broker confirmed the batch that carried them.
    /// An error means they may not be stored: the caller must not ack the message they
    /// describe.
    pub async fn record(&self, events: Vec<AuditEvent>) -> Result<(), PublishError> {
        if events.is_empty() {
            return Ok(());
        }
        self.batcher.submit(events).await
    }
}

impl AuditWriter {
    /// Waits until every batch handed to the task has been confirmed (or failed). The
    /// [`AuditBatcher`]s must have been dropped, or this waits for them.
    pub async fn finish(self) {
        self.writer.finish().await;
    }
}
