//! Group commit: what many callers hand in, published together, each caller told the outcome
//! of the publish that carried its part.
//!
//! Two services use it: workers gather the audit events of every message in hand into one
//! audit message ([`crate::AuditBatcher`]), and ingress gathers the requests waiting for a
//! publish into one batch message ([`hiway_proto::batch`]). Both exist because much of
//! RabbitMQ's cost goes per broker message rather than per byte (docs/benchmarks.md).
//!
//! It never waits on a timer: when it is idle, the first item goes out at once, so a quiet
//! system sees no added latency. While `in_flight` publishes await their confirms, new items
//! queue up and leave together in the next one, so the batch size grows with the load by
//! itself. A caller is only answered after its own batch's confirm: nothing is reported
//! stored on the strength of a publish the broker has not taken.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::PublishError;

/// How large a batch may grow, and how many may await their confirms at once.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The most items in one batch.
    pub max_items: usize,
    /// The most weight (as the batcher's `weight` function counts it) in one batch; a batch
    /// always takes at least one item, however heavy.
    pub max_weight: usize,
    /// Batches awaiting their confirms at once. More than one keeps the broker busy while a
    /// confirm is on its way back (never one confirm at a time); a few are enough, since each
    /// batch takes everything that queued up meanwhile.
    pub in_flight: usize,
}

struct Pending<T> {
    item: T,
    done: oneshot::Sender<Result<(), PublishError>>,
}

/// Hands items to the batching task. Cheap to clone.
pub struct Batcher<T> {
    queue: mpsc::UnboundedSender<Pending<T>>,
}

impl<T> Clone for Batcher<T> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

/// The batching task; [`Writer::finish`] waits for every batch to be confirmed.
pub struct Writer {
    task: JoinHandle<()>,
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts the batching task. `publish` sends one batch and reports the broker's answer;
    /// `weight` says how much of [`Limits::max_weight`] an item takes. The task ends once
    /// every [`Batcher`] clone is dropped and every batch is settled: call [`Writer::finish`]
    /// before closing the channel `publish` uses.
    pub fn start<P, F>(limits: Limits, weight: fn(&T) -> usize, publish: P) -> (Self, Writer)
    where
        P: Fn(Vec<T>) -> F + Send + Sync + 'static,
        F: Future<Output = Result<(), PublishError>> + Send + 'static,
    {
        let (queue, incoming) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(limits, weight, publish, incoming));
        (Self { queue }, Writer { task })
    }

    /// Hands `item` in and waits until the broker confirmed the batch that carried it. An
    /// error means it may not be stored: the caller must not report it stored.
    pub async fn submit(&self, item: T) -> Result<(), PublishError> {
        let (done, answer) = oneshot::channel();
        self.queue
            .send(Pending { item, done })
            .map_err(|_| PublishError::Closed)?;
        answer.await.unwrap_or(Err(PublishError::Closed))
    }
}

impl Writer {
    /// Waits until every batch handed to the task has been confirmed (or failed). The
    /// [`Batcher`]s must have been dropped, or this waits for them.
    pub async fn finish(self) {
        let _ = self.task.await;
    }
}

async fn run<T, P, F>(
    limits: Limits,
    weight: fn(&T) -> usize,
    publish: P,
    mut incoming: mpsc::UnboundedReceiver<Pending<T>>,
) where
    T: Send + 'static,
    P: Fn(Vec<T>) -> F,
    F: Future<Output = Result<(), PublishError>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.in_flight));
    // An item taken off the queue that would have made the last batch too heavy starts the
    // next one.
    let mut carried: Option<Pending<T>> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match incoming.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        // Waiting for a slot is what makes batches: items go on queuing meanwhile.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut load = weight(&first.item);
        let mut batch = vec![first];
        while batch.len() < limits.max_items && load < limits.max_weight {
            let Ok(next) = incoming.try_recv() else {
                break;
            };
            let w = weight(&next.item);
            if load + w > limits.max_weight {
                carried = Some(next);
                break;
            }
            load += w;
            batch.push(next);
        }
        let (items, dones): (Vec<T>, Vec<_>) = batch.into_iter().map(|p| (p.item, p.done)).unzip();
        let published = publish(items);
        tokio::spawn(async move {
            let result = published.await;
            drop(slot);
            for done in dones {
                let _ = done.send(result.clone());
            }
        });
    }
    // Every sender is gone: wait for the batches still in flight by taking every slot.
    let _ = slots.acquire_many(limits.in_flight as u32).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Seen = Arc<Mutex<Vec<Vec<usize>>>>;

    /// A batcher whose publish records each batch and succeeds once `release` is notified.
    fn recording(
        limits: Limits,
        release: Arc<tokio::sync::Notify>,
    ) -> (Batcher<usize>, Writer, Seen) {
        let seen: Seen = Arc::default();
        let record = seen.clone();
        let (batcher, writer) = Batcher::start(
            limits,
            |n: &usize| *n,
            move |items: Vec<usize>| {
                record.lock().unwrap().push(items);
                let release = release.clone();
                async move {
                    release.notified().await;
                    Ok(())
                }
            },
        );
        (batcher, writer, seen)
    }

    #[tokio::test]
    async fn items_that_queue_while_a_batch_is_in_flight_leave_together_within_the_limits() {
        let release = Arc::new(tokio::sync::Notify::new());
        let limits = Limits {
            max_items: 3,
            max_weight: 10,
            in_flight: 1,
        };
        let (batcher, writer, seen) = recording(limits, release.clone());
        let submit = |n: usize| {
            let b = batcher.clone();
            tokio::spawn(async move { b.submit(n).await })
        };
        // The batcher is idle: the first item goes out at once, alone.
        let mut waiting = vec![submit(1)];
        while seen.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        // These queue while it awaits its confirm (one batch in flight at most).
        waiting.extend([1, 1, 1, 1, 8, 4].map(submit));
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert_eq!(seen.lock().unwrap().len(), 1);
        for _ in 0..4 {
            release.notify_one();
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
        }
        for w in waiting {
            assert!(w.await.unwrap().is_ok());
        }
        drop(batcher);
        writer.finish().await;
        // Then at most 3 items a batch, and never more than 10 of weight: the 4, which would
        // have made 1 + 8 weigh 13, starts a batch of its own.
        assert_eq!(
            *seen.lock().unwrap(),
            vec![vec![1], vec![1, 1, 1], vec![1, 8], vec![4]]
        );
    }

    #[tokio::test]
    async fn every_caller_of_a_batch_gets_its_failure() {
        let limits = Limits {
            max_items: 10,
            max_weight: 100,
            in_flight: 2,
        };
        let (batcher, writer) = Batcher::start(
            limits,
            |_: &u8| 1,
            |_items: Vec<u8>| async { Err(PublishError::Nacked) },
        );
        let (a, b) = tokio::join!(batcher.submit(1), batcher.submit(2));
        assert!(matches!(a, Err(PublishError::Nacked)));
        assert!(matches!(b, Err(PublishError::Nacked)));
        drop(batcher);
        writer.finish().await;
    }
}
