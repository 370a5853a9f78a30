//! Acknowledgements for one consumer channel, grouped into multiple-acks.
//!
//! Why: every `basic.ack` is a command the broker runs through the quorum queue's Raft log,
//! and a frame, a wake-up of the AMQP client's I/O and of the broker's channel process. Acked
//! one by one they were the largest cost per message that hiway controls: with acks turned
//! off as an experiment, the benchmark's sustained rate went from 1500/s to 2500/s. One
//! `basic.ack` with `multiple = true` settles every outstanding delivery up to its tag.
//!
//! A multiple-ack may only cover deliveries whose outcome is durable, and deliveries finish
//! out of order (they are handled concurrently). So the handlers *report* each verdict here
//! ([`Acks::ack`], [`Acks::nack`]) and one task per channel keeps the book: it sends one
//! multiple-ack for the longest run of reported deliveries from the oldest unreported one, and
//! nacks at once. Deliveries finished ahead of a gap (an older one still in hand) wait for it
//! to close, but not for long: when half the prefetch window is waiting, or after
//! [`HOLD`], they are acked one by one, so a slow delivery never holds the others' acks, and
//! with them the window. Each round takes whatever was reported while the previous frames
//! were being sent, so groups grow with the load by themselves.
//!
//! Every delivery of the channel must be reported exactly once, or it stays unacked until
//! the channel closes (then the broker redelivers it: never lost, only late).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::client::{BrokerError, Channel};
use tokio::sync::mpsc;

/// How a handler settled one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Ack,
    Nack { requeue: bool },
}

enum Report {
    Settled(u64, Verdict),
    /// Flush what is reported and stop.
    Finish,
}

/// Where the handlers of one channel report their verdicts. Cheap to clone.
#[derive(Clone)]
pub struct Acks {
    tx: mpsc::UnboundedSender<Report>,
}

/// The task that acks for one channel; [`AckTask::finish`] before closing the channel.
pub struct AckTask {
    tx: mpsc::UnboundedSender<Report>,
    task: tokio::task::JoinHandle<()>,
}

/// The longest a finished delivery waits behind an older one still in hand before it is
/// acked on its own. Short enough that a crash meanwhile redelivers little; long enough for
/// the usual gap (a confirm that arrives a few milliseconds later) to close.
pub const HOLD: Duration = Duration::from_millis(50);

/// Starts acking for `channel`, whose delivery tags start at 1 (a fresh channel) and whose
/// prefetch is `window`.
pub fn start(channel: &Channel, window: u16) -> (Acks, AckTask) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(channel.clone(), rx, usize::from(window / 2).max(1)));
    (Acks { tx: tx.clone() }, AckTask { tx, task })
}

impl Acks {
    /// The delivery's outcome is durable: it may be acked.
    pub fn ack(&self, delivery_tag: u64) {
        let _ = self.tx.send(Report::Settled(delivery_tag, Verdict::Ack));
    }

    /// The delivery could not be handled: nack it (sent at once, never grouped).
    pub fn nack(&self, delivery_tag: u64, requeue: bool) {
        let _ = self
            .tx
            .send(Report::Settled(delivery_tag, Verdict::Nack { requeue }));
    }

    /// Acks the delivery when what it became is durable (`Ok`: every publish confirmed);
    /// otherwise returns it to its queue to be handled again.
    pub fn settle(&self, delivery_tag: u64, durable: Result<(), crate::PublishError>) {
        match durable {
            Ok(()) => self.ack(delivery_tag),
            Err(error) => {
                tracing::warn!(%error, "could not make the outcome durable; returning the message to its queue");
                self.nack(delivery_tag, true);
            }
        }
    }
}

impl AckTask {
    /// Sends every ack reported so far, then stops. Reports made after this are dropped (their
    /// deliveries are redelivered when the channel closes).
    pub async fn finish(self) {
        let _ = self.tx.send(Report::Finish);
        let _ = self.task.await;
    }
}

async fn run(channel: Channel, mut rx: mpsc::UnboundedReceiver<Report>, limit: usize) {
    let mut book = Book::new(limit);
    // After a failed frame the channel is gone: its deliveries are being returned by the
    // broker, and every later frame would fail the same way.
    let mut broken = false;
    let mut finishing = false;
    // Since when deliveries have been waiting ahead of a gap.
    let mut waiting_since: Option<tokio::time::Instant> = None;
    while !finishing {
        let first = match waiting_since {
            Some(since) => tokio::select! {
                report = rx.recv() => report,
                _ = tokio::time::sleep_until(since + HOLD) => None,
            },
            None => rx.recv().await,
        };
        let mut frames = match first {
            None if waiting_since.is_some() => book.flush(),
            None => break,
            Some(first) => {
                let mut verdicts = Vec::new();
                let reports =
                    std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok()));
                for report in reports {
                    match report {
                        Report::Settled(tag, verdict) => verdicts.push((tag, verdict)),
                        Report::Finish => {
                            finishing = true;
                            break;
                        }
                    }
                }
                book.round(verdicts)
            }
        };
        if finishing {
            frames.extend(book.flush());
        }
        waiting_since = match (book.waiting(), waiting_since) {
            (0, _) => None,
            (_, Some(since)) => Some(since),
            (_, None) => Some(tokio::time::Instant::now()),
        };
        if broken {
            continue;
        }
        // Nacks first, then the acks, each group all at once: awaiting frame by frame would
        // cost a round trip to the client's I/O per frame. A nack must reach the broker
        // before a multiple-ack that passes its tag; the acks of one round cover disjoint
        // tags, so their order does not matter.
        let (nacks, acks): (Vec<Frame>, Vec<Frame>) = frames
            .into_iter()
            .partition(|f| matches!(f, Frame::Nack { .. }));
        let mut error = None;
        for group in [nacks, acks] {
            let sent = futures_util::future::join_all(group.into_iter().map(|f| send(&channel, f)));
            error = sent.await.into_iter().find_map(Result::err);
            if error.is_some() {
                break;
            }
        }
        if let Some(error) = error {
            tracing::warn!(%error, "ack failed; the broker will deliver the channel's unacked messages again");
            broken = true;
        }
    }
}

async fn send(channel: &Channel, frame: Frame) -> Result<(), BrokerError> {
    match frame {
        Frame::Ack { tag, multiple } => channel.ack(tag, multiple).await,
        Frame::Nack { tag, requeue } => channel.nack(tag, requeue).await,
    }
}

/// One frame to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    Ack { tag: u64, multiple: bool },
    Nack { tag: u64, requeue: bool },
}

/// The bookkeeping, apart from any I/O so that it can be tested on its own.
#[derive(Debug)]
struct Book {
    /// The oldest delivery tag not yet reported; every tag below it is settled or covered by
    /// an ack already sent.
    next: u64,
    /// Reported tags above `next`: `true` while its ack is still to be sent.
    ahead: BTreeMap<u64, bool>,
    /// How many acks may wait ahead of a gap before they are sent one by one.
    limit: usize,
}

impl Book {
    fn new(limit: usize) -> Self {
        Self {
            next: 1,
            ahead: BTreeMap::new(),
            limit,
        }
    }

    /// Takes the verdicts reported since the last round and says what to send.
    fn round(&mut self, verdicts: Vec<(u64, Verdict)>) -> Vec<Frame> {
        let mut frames = Vec::new();
        for (tag, verdict) in verdicts {
            if tag < self.next || self.ahead.contains_key(&tag) {
                // Reported twice: the first report stands.
                continue;
            }
            match verdict {
                // Sent before any ack (see `run`), so the multiple-ack computed below cannot
                // cover them: a nacked delivery is no longer outstanding.
                Verdict::Nack { requeue } => {
                    frames.push(Frame::Nack { tag, requeue });
                    self.ahead.insert(tag, false);
                }
                Verdict::Ack => {
                    self.ahead.insert(tag, true);
                }
            }
        }
        // The run from the oldest unreported tag: one multiple-ack up to its last unacked
        // tag covers it all (tags acked or nacked alone are no longer outstanding).
        let mut last_unacked = None;
        while let Some(unacked) = self.ahead.remove(&self.next) {
            if unacked {
                last_unacked = Some(self.next);
            }
            self.next += 1;
        }
        if let Some(tag) = last_unacked {
            frames.push(Frame::Ack {
                tag,
                multiple: true,
            });
        }
        // Half the window waiting behind one slow delivery: stop waiting.
        if self.waiting() >= self.limit {
            frames.extend(self.flush());
        }
        frames
    }

    /// How many acks wait ahead of a gap.
    fn waiting(&self) -> usize {
        self.ahead.values().filter(|unacked| **unacked).count()
    }

    /// Every ack waiting ahead of a gap, each alone (the gap is still open).
    fn flush(&mut self) -> Vec<Frame> {
        self.ahead
            .iter_mut()
            .filter(|(_, unacked)| **unacked)
            .map(|(tag, unacked)| {
                *unacked = false;
                Frame::Ack {
                    tag: *tag,
                    multiple: false,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACK: Verdict = Verdict::Ack;

    fn acks(tags: &[u64]) -> Vec<(u64, Verdict)> {
        tags.iter().map(|t| (*t, ACK)).collect()
    }

    #[test]
    fn deliveries_finished_in_order_are_acked_with_one_multiple_ack() {
        let mut book = Book::new(100);
        assert_eq!(
            book.round(acks(&[1, 2, 3, 4])),
            vec![Frame::Ack {
                tag: 4,
                multiple: true
            }]
        );
        assert_eq!(
            book.round(acks(&[5])),
            vec![Frame::Ack {
                tag: 5,
                multiple: true
            }]
        );
    }

    #[test]
    fn a_delivery_still_in_hand_is_never_covered_by_a_multiple_ack() {
        let mut book = Book::new(100);
        // 2 is still being handled: only 1 may be acked now.
        assert_eq!(
            book.round(acks(&[1, 3, 4])),
            vec![Frame::Ack {
                tag: 1,
                multiple: true
            }]
        );
        // 2 finishes: 2, 3 and 4 go in one multiple-ack.
        assert_eq!(
            book.round(acks(&[2])),
            vec![Frame::Ack {
                tag: 4,
                multiple: true
            }]
        );
    }

    #[test]
    fn deliveries_ahead_of_a_gap_wait_for_it_until_half_the_window_is_waiting() {
        let mut book = Book::new(3);
        assert_eq!(book.round(acks(&[2, 3])), vec![]);
        assert_eq!(book.waiting(), 2);
        // 1 is slow, and a third ack would wait behind it: all three are acked alone.
        assert_eq!(
            book.round(acks(&[4])),
            vec![
                Frame::Ack {
                    tag: 2,
                    multiple: false
                },
                Frame::Ack {
                    tag: 3,
                    multiple: false
                },
                Frame::Ack {
                    tag: 4,
                    multiple: false
                },
            ]
        );
        assert_eq!(book.waiting(), 0);
        // 1 finally finishes: its own multiple-ack covers nothing else (2–4 are acked).
        assert_eq!(
            book.round(acks(&[1, 5])),
            vec![Frame::Ack {
                tag: 5,
                multiple: true
            }]
        );
    }

    #[test]
    fn a_nack_is_sent_at_once_and_before_a_multiple_ack_that_passes_it() {
        let mut book = Book::new(100);
        assert_eq!(
            book.round(vec![
                (1, ACK),
                (2, Verdict::Nack { requeue: true }),
                (3, ACK)
            ]),
            vec![
                Frame::Nack {
                    tag: 2,
                    requeue: true
                },
                Frame::Ack {
                    tag: 3,
                    multiple: true
                },
            ]
        );
    }

    #[test]
    fn a_run_ending_in_deliveries_already_settled_is_acked_up_to_its_last_unacked_one() {
        let mut book = Book::new(100);
        assert_eq!(
            book.round(vec![(2, ACK), (3, Verdict::Nack { requeue: false })]),
            vec![Frame::Nack {
                tag: 3,
                requeue: false
            }]
        );
        assert_eq!(
            book.round(acks(&[1])),
            vec![Frame::Ack {
                tag: 2,
                multiple: true
            }]
        );
        // A run made only of nacked tags sends no ack at all.
        assert_eq!(
            book.round(vec![(4, Verdict::Nack { requeue: true })]),
            vec![Frame::Nack {
                tag: 4,
                requeue: true
            }]
        );
    }

    #[test]
    fn a_delivery_reported_twice_is_settled_once() {
        let mut book = Book::new(100);
        assert_eq!(book.round(acks(&[1])).len(), 1);
        assert_eq!(book.round(acks(&[1])), vec![]);
        assert_eq!(book.round(vec![(3, ACK)]), vec![]);
        assert_eq!(
            book.round(vec![(3, Verdict::Nack { requeue: true })]),
            vec![]
        );
        assert_eq!(book.waiting(), 1, "3 still waits to be acked, not nacked");
    }

    #[test]
    fn flushing_acks_each_delivery_still_waiting_behind_a_gap_alone() {
        let mut book = Book::new(100);
        book.round(acks(&[2, 4]));
        assert_eq!(
            book.flush(),
            vec![
                Frame::Ack {
                    tag: 2,
                    multiple: false
                },
                Frame::Ack {
                    tag: 4,
                    multiple: false
                },
            ]
        );
        assert_eq!(book.flush(), vec![]);
    }
}
