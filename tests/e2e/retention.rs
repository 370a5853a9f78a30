//! Audit retention on the real PostgreSQL: what a prune deletes, what it keeps whatever its
//! age, and the audit service pruning on its own when `audit.retention` is set.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hiway_audit::retention::{self, LOCK_KEY, Pruned};
use hiway_tests::{Services, TestHiway};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const NO_SERVICES: Services = Services {
    ingress: false,
    transformer: false,
    sender: false,
    audit: false,
};

fn days_ago(days: i64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::days(days)
}

/// Stores one event of `message` at `at`; returns its id.
async fn event(pool: &PgPool, message: Uuid, at: DateTime<Utc>) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "insert into audit_events (event_id, message_id, kind, at, service, detail)
         values ($1, $2, 'unrouted', $3, 'test', '{}')",
    )
    .bind(id)
    .bind(message)
    .bind(at)
    .execute(pool)
    .await
    .unwrap();
    id
}

/// Stores a dead letter of `message` in `state`, died three days ago; returns its id.
async fn dead_letter(
    pool: &PgPool,
    message: Uuid,
    state: &str,
    settled_at: Option<DateTime<Utc>>,
) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "insert into dead_letters (dead_id, message_id, routing_key, reason, died_at, headers,
                                   body, state, settled_at)
         values ($1, $2, 'sink', 'test', $3, '{}', '\\x00', $4, $5)",
    )
    .bind(id)
    .bind(message)
    .bind(days_ago(3))
    .bind(state)
    .bind(settled_at)
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn ids(pool: &PgPool, query: &'static str) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = sqlx::query_scalar(query).fetch_all(pool).await.unwrap();
    ids.sort();
    ids
}

fn sorted(mut v: Vec<Uuid>) -> Vec<Uuid> {
    v.sort();
    v
}

#[tokio::test]
async fn a_prune_deletes_old_events_and_settled_dead_letters_but_keeps_what_an_operator_still_needs()
 {
    let app = TestHiway::spawn_with("", NO_SERVICES).await;
    let pool = &app.pool;
    let (delivered, waiting, recent, discarded, replayed) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    event(pool, delivered, days_ago(2)).await;
    // A dead letter still waiting for an operator keeps its message's whole trail.
    let old_waiting = event(pool, waiting, days_ago(2)).await;
    let waiting_letter = dead_letter(pool, waiting, "dead", None).await;
    let new_event = event(pool, recent, days_ago(0)).await;
    // Settled before the cutoff: the dead letter and its trail go.
    event(pool, discarded, days_ago(2)).await;
    let _ = dead_letter(pool, discarded, "discarded", Some(days_ago(2))).await;
    // Died long ago but replayed an hour ago: the dead letter stays, its old event goes.
    event(pool, replayed, days_ago(2)).await;
    let replayed_letter = dead_letter(
        pool,
        replayed,
        "replayed",
        Some(Utc::now() - chrono::Duration::hours(1)),
    )
    .await;

    let pruned = retention::prune(pool, days_ago(1), &CancellationToken::new())
        .await
        .unwrap();

    assert_eq!(
        pruned,
        Pruned {
            events: 3,
            dead_letters: 1
        }
    );
    assert_eq!(
        ids(pool, "select event_id from audit_events").await,
        sorted(vec![old_waiting, new_event])
    );
    assert_eq!(
        ids(pool, "select dead_id from dead_letters").await,
        sorted(vec![waiting_letter, replayed_letter])
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_prune_goes_on_batch_after_batch_until_nothing_old_is_left() {
    let app = TestHiway::spawn_with("", NO_SERVICES).await;
    let old = 2 * retention::BATCH + 345;
    sqlx::query(
        "insert into audit_events (event_id, message_id, kind, at, service, detail)
         select gen_random_uuid(), gen_random_uuid(), 'unrouted', now() - interval '2 days',
                'test', '{}'
         from generate_series(1, $1)",
    )
    .bind(old)
    .execute(&app.pool)
    .await
    .unwrap();
    let kept = event(&app.pool, Uuid::now_v7(), days_ago(0)).await;

    let pruned = retention::prune(&app.pool, days_ago(1), &CancellationToken::new())
        .await
        .unwrap();

    assert_eq!(pruned.events, old as u64);
    assert_eq!(
        ids(&app.pool, "select event_id from audit_events").await,
        vec![kept]
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_prune_skips_its_round_while_another_process_is_pruning() {
    let app = TestHiway::spawn_with("", NO_SERVICES).await;
    let old = event(&app.pool, Uuid::now_v7(), days_ago(2)).await;
    let mut other = app.pool.begin().await.unwrap();
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *other)
        .await
        .unwrap();

    let pruned = retention::prune(&app.pool, days_ago(1), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(pruned, Pruned::default());
    assert_eq!(
        ids(&app.pool, "select event_id from audit_events").await,
        vec![old]
    );

    // Once the other is done, the next round prunes.
    other.commit().await.unwrap();
    let pruned = retention::prune(&app.pool, days_ago(1), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(pruned.events, 1);
    app.shutdown().await;
}

#[tokio::test]
async fn the_audit_service_prunes_on_its_own_when_a_retention_is_set() {
    let app = TestHiway::spawn_with("", NO_SERVICES).await;
    let old = event(&app.pool, Uuid::now_v7(), days_ago(2)).await;
    let kept = event(&app.pool, Uuid::now_v7(), days_ago(0)).await;
    let mut config = app.config.clone();
    config.audit.retention = Duration::from_secs(24 * 3600);
    config.audit.prune_interval = Duration::from_millis(100);
    let audit = hiway_audit::build(&config).await.unwrap();
    let stop = CancellationToken::new();
    let running = tokio::spawn(audit.run(stop.clone()));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ids(&app.pool, "select event_id from audit_events").await != vec![kept] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the event of two days ago ({old}) is still there after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    stop.cancel();
    running.await.unwrap().unwrap();
    app.shutdown().await;
}
