//! Retention: deletes audit events and settled dead letters older than `audit.retention`.
//!
//! Why: every message leaves three or more rows in `audit_events`, so a busy installation
//! adds millions a day, and a replayed or discarded dead letter keeps its whole body. Mature
//! engines prune on a schedule (OpenHIM's transaction `maxAge`, Mirth's data pruner); hiway's
//! audit service does it every `audit.prune_interval` when `audit.retention` is set.
//!
//! What is never deleted, whatever its age:
//! - a dead letter still waiting for an operator (state `dead`);
//! - the trail of a message with such a dead letter: the operator who finally looks at it
//!   needs to see what happened to it.
//!
//! Rows go in batches of [`BATCH`], one short transaction each: a long transaction would hold
//! one of the writer's pool connections and hold back vacuum, and a prune stopped half-way
//! keeps what it committed. With several audit processes only one prunes at a time (an
//! advisory lock); the others skip that round.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Rows deleted per transaction.
pub const BATCH: i64 = 10_000;

/// Taken for the length of each batch so that two audit processes do not prune at once
/// (an arbitrary constant: "hiway-pr" in ASCII).
pub const LOCK_KEY: i64 = 0x6869_7761_792d_7072;

/// What one prune deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Audit events.
    pub events: u64,
    /// Replayed or discarded dead letters.
    pub dead_letters: u64,
}

/// Deletes what is older than `before`, in batches, until nothing older is left, `stop` is
/// cancelled, or another process holds the prune lock. Returns what it deleted.
pub async fn prune(
    pool: &PgPool,
    before: DateTime<Utc>,
    stop: &CancellationToken,
) -> Result<Pruned, sqlx::Error> {
    // Events first: the dead letters they are checked against are still there.
    let Some(events) = delete_all(pool, DELETE_EVENTS, before, stop).await? else {
        return Ok(Pruned::default());
    };
    let dead_letters = delete_all(pool, DELETE_DEAD_LETTERS, before, stop)
        .await?
        .unwrap_or(0);
    Ok(Pruned {
        events,
        dead_letters,
    })
}

/// Runs `statement` batch after batch until a batch comes back short or `stop`; `None` if
/// another process held the lock before anything was deleted.
async fn delete_all(
    pool: &PgPool,
    statement: &'static str,
    before: DateTime<Utc>,
    stop: &CancellationToken,
) -> Result<Option<u64>, sqlx::Error> {
    let mut total = 0;
    while !stop.is_cancelled() {
        match batch(pool, statement, before).await? {
            Some(n) => {
                total += n;
                if n < BATCH as u64 {
                    break;
                }
            }
            None if total == 0 => {
                tracing::debug!("another audit process is pruning; skipping this round");
                return Ok(None);
            }
            None => break,
        }
    }
    Ok(Some(total))
}

/// One batch in its own transaction: `None` if another process holds the lock.
async fn batch(
    pool: &PgPool,
    statement: &'static str,
    before: DateTime<Utc>,
) -> Result<Option<u64>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let locked: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        return Ok(None);
    }
    let deleted = sqlx::query(statement)
        .bind(before)
        .bind(BATCH)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(Some(deleted))
}

// `at < $1` finds old rows through the BRIN index on `at` (they sit in the table's first
// blocks); `ctid` deletes exactly the rows picked, at most $2 of them.
const DELETE_EVENTS: &str = "
    delete from audit_events where ctid = any(array(
        select e.ctid from audit_events e
        where e.at < $1
          and not exists (
              select 1 from dead_letters d where d.message_id = e.message_id and d.state = 'dead')
        limit $2))";

// A settled dead letter is old when it was settled (replayed or discarded) before the cutoff,
// whenever it died.
const DELETE_DEAD_LETTERS: &str = "
    delete from dead_letters where ctid = any(array(
        select ctid from dead_letters
        where state <> 'dead' and coalesce(settled_at, died_at) < $1
        limit $2))";

/// Prunes what is older than `retention` a minute after start (or after `interval`, if
/// shorter) and then every `interval`, until `stop`. A failed prune is logged and tried again
/// next round: the rows wait, nothing else does.
pub async fn run(pool: PgPool, retention: Duration, interval: Duration, stop: CancellationToken) {
    // A retention reaching back past the calendar chrono knows (about 262,000 years) keeps
    // everything: nothing can be that old.
    let Some(reach) = chrono::Duration::from_std(retention)
        .ok()
        .filter(|r| Utc::now().checked_sub_signed(*r).is_some())
    else {
        tracing::info!(
            ?retention,
            "audit.retention reaches back past any date; nothing is pruned"
        );
        return;
    };
    // Not at once: a service restarted often would prune on every start, and one starting
    // after an outage has a backlog of audit batches to write first.
    let mut wait = interval.min(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = interval;
        let Some(before) = Utc::now().checked_sub_signed(reach) else {
            continue;
        };
        match prune(&pool, before, &stop).await {
            Ok(p) if p == Pruned::default() => {
                tracing::debug!(%before, "nothing older than the retention to prune");
            }
            Ok(p) => tracing::info!(
                events = p.events,
                dead_letters = p.dead_letters,
                %before,
                "pruned the audit trail"
            ),
            Err(error) => {
                tracing::warn!(%error, %before, "could not prune the audit trail; trying again next round");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_retention_reaching_past_any_date_keeps_everything_and_ends_the_job() {
        // Never connected: the job must end before it would touch the database.
        let pool = PgPool::connect_lazy("postgres://nobody@127.0.0.1:1/none").unwrap();
        let three_hundred_thousand_years = Duration::from_secs(300_000 * 365 * 24 * 3600);
        tokio::time::timeout(
            Duration::from_secs(5),
            run(
                pool,
                three_hundred_thousand_years,
                Duration::from_millis(1),
                CancellationToken::new(),
            ),
        )
        .await
        .expect("the job ends at once");
    }
}
