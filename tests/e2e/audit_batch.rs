//! The audit batcher (`hiway_runtime::AuditBatcher`) on the real broker: the events of many
//! messages in hand leave in a few broker messages, and a caller hears an error, never a false
//! success, when its batch could not be published.

use futures_util::future::join_all;
use hiway_config::Config;
use hiway_proto::MessageId;
use hiway_proto::audit::{AuditBatch, AuditEvent, AuditKind};
use hiway_runtime::amqp::Connection;
use hiway_runtime::{AuditBatcher, Broker};

/// An audit event of a new message, recorded by the service "test".
pub(crate) fn event() -> AuditEvent {
    AuditEvent::now(
        MessageId::generate(),
        "test",
        AuditKind::Unrouted {
            channel: "forms".parse().unwrap(),
        },
    )
}

/// A broker handle with a name prefix of its own (declared on `connect`); shared by the
/// tests of the runtime's building blocks.
pub(crate) async fn broker() -> Broker {
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let config = Config::from_toml(&format!(
        "[broker]\nurl = \"{}\"\nprefix = \"t{}\"\npublish_timeout = \"5s\"\n",
        hiway_tests::amqp_url(),
        &suffix[suffix.len() - 12..]
    ))
    .unwrap();
    Broker::new(&config)
}

#[tokio::test]
async fn the_events_of_three_hundred_messages_in_hand_travel_in_a_few_broker_messages() {
    let broker = broker().await;
    let connection = broker.connect("audit-batch-test").await.unwrap();
    let publisher = broker.publisher(&connection).await.unwrap();
    let (audit, writer) = AuditBatcher::start(publisher.clone());

    let sent: Vec<AuditEvent> = (0..300).map(|_| event()).collect();
    let answers = join_all(sent.iter().map(|e| audit.record(vec![e.clone()]))).await;
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    drop(audit);
    writer.finish().await;

    // Every event is on the audit queue, once, in far fewer messages than events.
    let channel = connection.channel().await.unwrap();
    let (mut messages, mut received) = (0, Vec::new());
    while let Some(m) = channel.get(&broker.names().audit_queue()).await.unwrap() {
        messages += 1;
        let batch: AuditBatch = serde_json::from_slice(&m.data).unwrap();
        received.extend(batch);
        m.ack(false).await.unwrap();
    }
    assert_eq!(received.len(), 300);
    let mut want: Vec<_> = sent.iter().map(|e| e.event_id).collect();
    let mut have: Vec<_> = received.iter().map(|e| e.event_id).collect();
    want.sort();
    have.sort();
    assert_eq!(have, want);
    // The batcher keeps at most 4 batches in flight; everything that queues up meanwhile
    // leaves in the next one.
    assert!(messages <= 8, "{messages} broker messages for 300 events");
    teardown(&broker, &connection).await;
}

#[tokio::test]
async fn a_batch_that_cannot_be_published_is_an_error_for_each_of_its_callers() {
    let broker = broker().await;
    let connection = broker.connect("audit-batch-test").await.unwrap();
    let publisher = broker.publisher(&connection).await.unwrap();
    let (audit, writer) = AuditBatcher::start(publisher.clone());
    publisher.close().await;

    let answers = join_all((0..3).map(|_| audit.record(vec![event()]))).await;

    assert!(
        answers.iter().all(Result::is_err),
        "no caller may ack on an unpublished event: {answers:?}"
    );
    drop(audit);
    writer.finish().await;
    teardown(&broker, &connection).await;
}

/// Deletes what `Broker::connect` declared under the test's prefix.
pub(crate) async fn teardown(broker: &Broker, connection: &Connection) {
    // The harness's own client, apart from the one under test.
    let admin = lapin::Connection::connect(&hiway_tests::amqp_url(), Default::default())
        .await
        .unwrap();
    let channel = admin.create_channel().await.unwrap();
    let names = broker.names();
    // Not the on-dead queue: only a transformer with on-dead routes declares it, and deleting
    // a queue that does not exist closes the channel.
    hiway_tests::delete_queues_and_exchanges(
        &channel,
        &[
            names.ingress_queue(),
            names.audit_queue(),
            names.dead_queue(),
        ],
        &[
            names.ingress_exchange(),
            names.deliver_exchange(),
            names.retry_exchange(),
            names.dead_exchange(),
            names.audit_exchange(),
        ],
    )
    .await;
    let _ = admin.close(200, "done".into()).await;
    connection.close(200, "done").await;
}
