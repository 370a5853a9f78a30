//! Grouped acks (`hiway_runtime::acks`) on the real broker: deliveries finished out of order
//! and nacked ones in between are each settled exactly as reported, and acks flow while the
//! consumer runs, not only when it stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hiway_proto::amqp::BasicProperties;
use hiway_runtime::consume::consume_concurrently;
use tokio_util::sync::CancellationToken;

use crate::audit_batch::{broker, teardown};

#[tokio::test]
async fn three_hundred_messages_finished_out_of_order_through_a_prefetch_of_twenty_are_each_settled_as_reported()
 {
    let broker = broker().await;
    let names = broker.names().clone();
    let connection = broker.connect("acks-test").await.unwrap();
    let publisher = broker.publisher(&connection).await.unwrap();
    for n in 0..300u32 {
        publisher
            .publish(
                &names.ingress_exchange(),
                hiway_proto::names::INGRESS_KEY,
                &n.to_be_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
    }

    // Each handler takes 0–7 ms, so they finish out of order; every tenth is rejected to the
    // dead queue. With 20 unacked at most, the 300 only get through if acks flow meanwhile.
    let consumer = broker
        .consumer(&connection, &names.ingress_queue(), "acks-test", 20)
        .await
        .unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let consuming = {
        let (handled, stop) = (handled.clone(), stop.clone());
        tokio::spawn(async move {
            consume_concurrently(
                consumer,
                20,
                &stop,
                Duration::from_secs(5),
                |delivery, acks| {
                    let handled = handled.clone();
                    async move {
                        let n = u32::from_be_bytes(delivery.data[..4].try_into().unwrap());
                        tokio::time::sleep(Duration::from_millis(u64::from(n % 8))).await;
                        if n % 10 == 0 {
                            acks.nack(delivery.delivery_tag, false);
                        } else {
                            acks.ack(delivery.delivery_tag);
                        }
                        handled.fetch_add(1, Ordering::SeqCst);
                    }
                },
            )
            .await
        })
    };
    hiway_tests::eventually(
        "300 messages handled while the consumer runs",
        Duration::from_secs(30),
        || async { (handled.load(Ordering::SeqCst) >= 300).then_some(()) },
    )
    .await;
    stop.cancel();
    // The consumer's channel is closed when it returns, which would put anything left
    // unacked back in the queue.
    consuming.await.unwrap().unwrap();

    let check = connection.channel().await.unwrap();
    let count = |queue: String| {
        let check = check.clone();
        async move { check.queue_depth(&queue).await.unwrap().ready }
    };
    assert_eq!(
        count(names.ingress_queue()).await,
        0,
        "every ack reached the broker: nothing came back when the channel closed"
    );
    assert_eq!(
        count(names.dead_queue()).await,
        30,
        "the thirty rejected ones were rejected, not covered by a multiple-ack"
    );
    check.close().await;
    teardown(&broker, &connection).await;
}
