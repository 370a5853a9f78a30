//! The circuit breaker of one destination in one sender process.
//!
//! Closed, it counts consecutive retryable failures (a delivery resets the count; a permanent
//! failure leaves it, since the destination did answer). When the count reaches the threshold
//! it trips: the consumer stops, and the destination's messages wait in its queue instead of
//! each burning an attempt against a destination that is down. Refused credentials (401) trip
//! it at once, whatever the threshold: no message can get through until they are fixed.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio_util::sync::CancellationToken;

use crate::outcome::Outcome;

/// Counts failures and trips.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    consecutive: AtomicU32,
    trip: Mutex<CancellationToken>,
}

impl Breaker {
    /// A closed breaker that trips after `threshold` consecutive retryable failures (never,
    /// for 0).
    pub fn new(threshold: u32) -> Self {
        Self {
            threshold,
            consecutive: AtomicU32::new(0),
            trip: Mutex::new(CancellationToken::new()),
        }
    }

    /// Closes the breaker for a new round; the token is cancelled when it trips.
    pub fn arm(&self, trip: CancellationToken) {
        self.consecutive.store(0, Ordering::SeqCst);
        *self.trip.lock().unwrap_or_else(|e| e.into_inner()) = trip;
    }

    /// Counts an outcome. Returns the failure count if this outcome tripped the breaker.
    pub fn record(&self, outcome: &Outcome) -> Option<u32> {
        match outcome {
            Outcome::Delivered { .. } => {
                self.consecutive.store(0, Ordering::SeqCst);
                None
            }
            Outcome::Permanent { .. } if outcome.refuses_credentials() => {
                let n = self.consecutive.load(Ordering::SeqCst) + 1;
                self.trip().then_some(n)
            }
            Outcome::Permanent { .. } => None,
            Outcome::Retry { .. } => {
                let n = self.consecutive.fetch_add(1, Ordering::SeqCst) + 1;
                (self.threshold > 0 && n == self.threshold && self.trip()).then_some(n)
            }
        }
    }

    /// Trips the breaker; false if it had tripped already (the trip is reported once).
    fn trip(&self) -> bool {
        let trip = self.trip.lock().unwrap_or_else(|e| e.into_inner());
        let first = !trip.is_cancelled();
        trip.cancel();
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry() -> Outcome {
        Outcome::Retry {
            status: Some(503),
            error: "down".into(),
            retry_after: None,
        }
    }

    #[test]
    fn it_trips_once_on_the_threshold_failure_and_not_before() {
        let breaker = Breaker::new(3);
        let trip = CancellationToken::new();
        breaker.arm(trip.clone());
        assert_eq!(breaker.record(&retry()), None);
        assert_eq!(breaker.record(&retry()), None);
        assert!(!trip.is_cancelled());
        assert_eq!(breaker.record(&retry()), Some(3));
        assert!(trip.is_cancelled());
        assert_eq!(breaker.record(&retry()), None, "it reports the trip once");
    }

    #[test]
    fn a_delivery_resets_the_count_and_a_permanent_failure_does_not_count() {
        let breaker = Breaker::new(2);
        let trip = CancellationToken::new();
        breaker.arm(trip.clone());
        breaker.record(&retry());
        breaker.record(&Outcome::Delivered { status: 200 });
        breaker.record(&retry());
        breaker.record(&Outcome::Permanent {
            status: Some(400),
            error: "bad".into(),
        });
        assert!(!trip.is_cancelled());
    }

    #[test]
    fn refused_credentials_trip_at_once_whatever_the_threshold_and_are_reported_once() {
        let refused = Outcome::Permanent {
            status: Some(401),
            error: "Unauthorized".into(),
        };
        for threshold in [0, 5] {
            let breaker = Breaker::new(threshold);
            let trip = CancellationToken::new();
            breaker.arm(trip.clone());
            breaker.record(&retry());
            assert_eq!(breaker.record(&refused), Some(2), "threshold {threshold}");
            assert!(trip.is_cancelled());
            assert_eq!(breaker.record(&refused), None, "it reports the trip once");
        }
        // A 403 is about one record, not the credentials: it does not trip.
        let breaker = Breaker::new(1);
        let trip = CancellationToken::new();
        breaker.arm(trip.clone());
        breaker.record(&Outcome::Permanent {
            status: Some(403),
            error: "no write access to this org unit".into(),
        });
        assert!(!trip.is_cancelled());
    }

    #[test]
    fn a_threshold_of_zero_never_trips() {
        let breaker = Breaker::new(0);
        let trip = CancellationToken::new();
        breaker.arm(trip.clone());
        for _ in 0..100 {
            breaker.record(&retry());
        }
        assert!(!trip.is_cancelled());
    }
}
