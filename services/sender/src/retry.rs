//! The retry schedule: which wait comes next, with jitter, and the headers a retried copy
//! carries.

use std::time::Duration;

use hiway_proto::amqp::{AMQPValue, BasicProperties, FieldTable, LongString};
use hiway_proto::{Envelope, headers};
use serde_json::json;

/// How many past attempts a message carries in its headers; older ones are in the trail.
const HISTORY_LIMIT: usize = 50;
/// How much of each attempt's error text the headers keep.
const HISTORY_ERROR_LIMIT: usize = 500;

/// The wait before attempt `attempt + 1`, after attempt `attempt` (1-based) failed: the
/// schedule's next step, or, when the destination asked for longer with `Retry-After`, the
/// first later step at least that long (or the last one).
pub fn next_delay(schedule: &[Duration], attempt: u32, retry_after: Option<Duration>) -> Duration {
    let index = (attempt as usize)
        .saturating_sub(1)
        .min(schedule.len().saturating_sub(1));
    let steps = &schedule[index..];
    match retry_after {
        Some(asked) => steps
            .iter()
            .copied()
            .find(|d| *d >= asked)
            .or(steps.last().copied()),
        None => steps.first().copied(),
    }
    .unwrap_or(Duration::from_secs(10))
}

/// `delay` shortened by a random fraction up to `jitter`. Only ever shorter: the delay queue's
/// own TTL is the longest a message can wait there.
pub fn jittered(delay: Duration, jitter: f64) -> Duration {
    let cut = rand::random::<f64>() * jitter;
    delay.mul_f64(1.0 - cut).max(Duration::from_millis(1))
}

/// The properties of the copy that goes on after attempt `attempt` failed: the original ones,
/// with the attempt count raised and this attempt added to the history.
pub fn next_properties(
    original: &BasicProperties,
    envelope: &Envelope,
    attempt: u32,
    status: Option<u16>,
    error: &str,
) -> BasicProperties {
    let mut h = original.headers().clone().unwrap_or_default();
    let mut next = envelope.clone();
    next.attempt = attempt;
    if let Some(fresh) = next.to_properties().headers() {
        for (k, v) in fresh.inner() {
            h.insert(k.clone(), v.clone());
        }
    }
    let mut history = history(&h);
    let error: String = error.chars().take(HISTORY_ERROR_LIMIT).collect();
    history.push(json!({
        "attempt": attempt,
        "at": chrono::Utc::now(),
        "status_code": status,
        "error": error,
    }));
    if history.len() > HISTORY_LIMIT {
        history.drain(..history.len() - HISTORY_LIMIT);
    }
    let text = serde_json::Value::Array(history).to_string();
    h.insert(
        headers::ATTEMPTS.into(),
        AMQPValue::LongString(LongString::from(text.into_bytes())),
    );
    original.clone().with_headers(h)
}

/// The attempt history a message carries (empty if none or unreadable).
pub fn history(h: &FieldTable) -> Vec<serde_json::Value> {
    match h.inner().get(headers::ATTEMPTS) {
        Some(AMQPValue::LongString(s)) => serde_json::from_slice(s.as_bytes()).unwrap_or_default(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> Vec<Duration> {
        [10, 60, 300].into_iter().map(Duration::from_secs).collect()
    }

    #[test]
    fn each_failed_attempt_waits_the_next_step_and_the_last_step_repeats() {
        let s = schedule();
        assert_eq!(next_delay(&s, 1, None), Duration::from_secs(10));
        assert_eq!(next_delay(&s, 2, None), Duration::from_secs(60));
        assert_eq!(next_delay(&s, 3, None), Duration::from_secs(300));
        assert_eq!(next_delay(&s, 9, None), Duration::from_secs(300));
    }

    #[test]
    fn retry_after_skips_to_the_first_step_at_least_that_long() {
        let s = schedule();
        assert_eq!(
            next_delay(&s, 1, Some(Duration::from_secs(30))),
            Duration::from_secs(60)
        );
        assert_eq!(
            next_delay(&s, 1, Some(Duration::from_secs(5))),
            Duration::from_secs(10)
        );
        assert_eq!(
            next_delay(&s, 1, Some(Duration::from_secs(3600))),
            Duration::from_secs(300)
        );
    }

    #[test]
    fn jitter_only_shortens_and_by_at_most_its_fraction() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(100), 0.1);
            assert!(
                d <= Duration::from_secs(100) && d >= Duration::from_secs(90),
                "{d:?}"
            );
        }
        assert_eq!(
            jittered(Duration::from_secs(100), 0.0),
            Duration::from_secs(100)
        );
    }

    #[test]
    fn a_retried_copy_carries_its_attempt_count_and_history() {
        let envelope = Envelope::accepted(
            "forms".parse().unwrap(),
            "source".parse().unwrap(),
            "application/json".into(),
        );
        let first = next_properties(
            &envelope.to_properties(),
            &envelope,
            1,
            Some(503),
            "HTTP 503",
        );
        let after_first = Envelope::from_properties(&first).unwrap();
        assert_eq!(after_first.attempt, 1);
        let second = next_properties(&first, &after_first, 2, None, "timed out");
        assert_eq!(Envelope::from_properties(&second).unwrap().attempt, 2);
        let h = history(second.headers().as_ref().unwrap());
        assert_eq!(h.len(), 2);
        assert_eq!(h[0]["status_code"], 503);
        assert_eq!(h[1]["error"], "timed out");
        assert_eq!(
            second.message_id(),
            envelope.to_properties().message_id(),
            "the id is kept"
        );
    }
}
