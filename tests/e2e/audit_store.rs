//! The audit trail's table on the real PostgreSQL: the batch writer's plain insert, and its
//! fallback when the broker redelivers a batch that was already committed.

use hiway_audit::store::insert_batch;
use hiway_proto::audit::AuditEvent;
use hiway_tests::TestHiway;

use crate::audit_batch::event;

async fn stored(app: &TestHiway) -> Vec<uuid::Uuid> {
    sqlx::query_scalar("select event_id from audit_events where service = 'test' order by event_id")
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_batch_written_again_stores_only_the_events_not_stored_yet() {
    let app = TestHiway::spawn("[channels.forms]\nclients = [\"source\"]\n").await;
    let first: Vec<AuditEvent> = (0..3).map(|_| event()).collect();
    assert_eq!(insert_batch(&app.pool, &first).await.unwrap(), 3);

    // The same batch again, as when its ack was lost after its commit: nothing new, no error.
    assert_eq!(insert_batch(&app.pool, &first).await.unwrap(), 0);

    // Two stored events and two new ones: the new ones are written, each event once.
    let mut mixed = first[..2].to_vec();
    mixed.extend([event(), event()]);
    assert_eq!(insert_batch(&app.pool, &mixed).await.unwrap(), 2);

    let mut expected: Vec<uuid::Uuid> = first
        .iter()
        .chain(&mixed[2..])
        .map(|e| e.event_id)
        .collect();
    expected.sort();
    assert_eq!(stored(&app).await, expected);
    app.shutdown().await;
}
