//! Audit events of many messages, published together (group commit).
//!
//! Every message a worker settles needs its audit events confirmed by the broker before the
//! message is acked. Publishing them one broker message per handled message made the audit
//! trail half of all broker traffic (see docs/benchmarks.md). The batcher instead gathers the
//! events of every message in hand into one audit message, confirmed once; each caller is
//! told the outcome of the batch that carried its events and acks (or requeues) on that.
//!
//! It never waits on a timer: when it is idle, the first events go out at once, so a quiet
//! system sees no added latency. While `IN_FLIGHT` batches await their confirms, new events
//! queue up and leave together in the next batch, so the batch size grows with the load by
//! itself. A caller is only answered after its own batch's confirm: nothing is acked on the
//! strength of an audit event that the broker has not taken.

use std::sync::Arc;

use hiway_proto::audit::AuditEvent;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::{PublishError, Publisher};

/// Batches awaiting their confirms at once. More than one keeps the broker busy while a
/// confirm is on its way back (never one confirm at a time); a few are enough, since each
/// batch takes everything that queued up meanwhile.
const IN_FLIGHT: usize = 4;

/// The most events in one audit message: bounds its size (an event is a few hundred bytes,
/// so about 300 KB) and the work redone if the audit service fails mid-batch.
const MAX_EVENTS: usize = 1000;

struct Pending {
    events: Vec<AuditEvent>,
    done: oneshot::Sender<Result<(), PublishError>>,
}

/// Hands audit events to the batching task. Cheap to clone.
#[derive(Clone)]
pub struct AuditBatcher {
    queue: mpsc::UnboundedSender<Pending>,
}

/// The batching task; [`AuditWriter::finish`] waits for every batch to be confirmed.
pub struct AuditWriter {
    task: JoinHandle<()>,
}

impl AuditBatcher {
    /// Starts batching onto `publisher`. The task ends once every [`AuditBatcher`] clone is
    /// dropped and every batch is settled: call [`AuditWriter::finish`] before closing the
    /// publisher's channel.
    pub fn start(publisher: Publisher) -> (Self, AuditWriter) {
        let (queue, incoming) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(publisher, incoming));
        (Self { queue }, AuditWriter { task })
    }

    /// Records `events` and waits until the broker confirmed the batch that carried them.
    /// An error means they may not be stored: the caller must not ack the message they
    /// describe.
    pub async fn record(&self, events: Vec<AuditEvent>) -> Result<(), PublishError> {
        if events.is_empty() {
            return Ok(());
        }
        let (done, answer) = oneshot::channel();
        self.queue
            .send(Pending { events, done })
            .map_err(|_| PublishError::Closed)?;
        answer.await.unwrap_or(Err(PublishError::Closed))
    }
}

impl AuditWriter {
    /// Waits until every batch handed to the task has been confirmed (or failed). The
    /// [`AuditBatcher`]s must have been dropped, or this waits for them.
    pub async fn finish(self) {
        let _ = self.task.await;
    }
}

async fn run(publisher: Publisher, mut incoming: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = incoming.recv().await {
        // Waiting for a slot is what makes batches: events go on queuing meanwhile.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut count = first.events.len();
        let mut batch = vec![first];
        while count < MAX_EVENTS {
            match incoming.try_recv() {
                Ok(next) => {
                    count += next.events.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let publisher = publisher.clone();
        tokio::spawn(async move {
            let events: Vec<&AuditEvent> = batch.iter().flat_map(|p| &p.events).collect();
            let result = publisher.publish_audit(&events).await;
            drop(slot);
            for pending in batch {
                let _ = pending.done.send(result.clone());
            }
        });
    }
    // Every sender is gone: wait for the batches still in flight by taking every slot.
    let _ = slots.acquire_many(IN_FLIGHT as u32).await;
}
