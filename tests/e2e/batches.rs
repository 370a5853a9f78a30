//! Batches on the ingress hop: ingress carries the messages waiting for a publish at the same
//! moment in one broker message (proto/src/batch.rs); the transformer routes each of them as
//! if it had come alone, and the dead-letter store splits a batch the broker dead-lettered
//! into one dead letter per message.

use std::time::Duration;

use futures_util::future::join_all;
use hiway_proto::amqp::AMQPValue;
use hiway_proto::batch::BatchWriter;
use hiway_proto::{ChannelName, ClientName, Envelope, MessageId, headers};
use hiway_tests::{Receiver, Services, TestHiway, publish_raw as publish};
use serde_json::json;

use crate::bus::{one_route_with, publish_behind_ingress};

const WAIT: Duration = Duration::from_secs(30);

fn envelope() -> Envelope {
    Envelope::accepted(
        ChannelName::parse("forms").unwrap(),
        ClientName::parse("source").unwrap(),
        "application/json".into(),
    )
}

#[tokio::test]
async fn requests_posted_at_once_share_broker_messages_and_each_is_delivered_with_its_own_trail() {
    const N: usize = 200;
    let sink = Receiver::start().await;
    // No transformer yet, so that what ingress published stays in the ingress queue to count.
    let mut app = TestHiway::spawn_with(
        &one_route_with(&sink, ""),
        Services {
            transformer: false,
            ..Services::ALL
        },
    )
    .await;
    let forms: Vec<serde_json::Value> = (0..N).map(|i| json!({"form": i})).collect();
    let ids: Vec<MessageId> = join_all(forms.iter().map(|f| app.post_json("forms", f))).await;

    let in_queue = app.queue_depth(&app.names().ingress_queue()).await;
    assert!(
        (1..N as u32).contains(&in_queue),
        "{N} accepted messages should have gone to the broker in fewer broker messages, found {in_queue}"
    );

    app.spawn_process("hiway-transformer", &[]);
    let got = sink.wait_for(N, WAIT).await;
    let mut forms: Vec<i64> = got
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["form"]
                .as_i64()
                .unwrap()
        })
        .collect();
    forms.sort_unstable();
    assert_eq!(
        forms,
        (0..N as i64).collect::<Vec<_>>(),
        "each message once, unchanged"
    );
    for id in [ids[0], ids[N / 2], ids[N - 1]] {
        let trail = app
            .wait_for_trail(id, &["received", "routed", "delivered"])
            .await;
        let received = trail.iter().find(|e| e.kind == "received").unwrap();
        assert_eq!(received.channel.as_deref(), Some("forms"));
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_message_of_a_batch_whose_envelope_cannot_be_read_is_dead_lettered_alone() {
    let sink = Receiver::start().await;
    let app = TestHiway::spawn(&one_route_with(&sink, "")).await;
    let (first, last) = (envelope(), envelope());
    let mut batch = BatchWriter::default();
    batch.push(&first.to_properties(), br#"{"n":1}"#).unwrap();
    // A message whose channel header is missing: poison, whatever else is around it.
    let mut broken = envelope().to_properties();
    let mut h = broken.headers().clone().unwrap().inner().clone();
    h.retain(|k, _| k.as_str() != headers::CHANNEL);
    broken = broken.with_headers(h.into());
    batch.push(&broken, br#"{"n":2}"#).unwrap();
    batch.push(&last.to_properties(), br#"{"n":3}"#).unwrap();
    let (body, properties) = batch.finish();
    publish_behind_ingress(&app, &body, properties).await;

    let got = sink.wait_for(2, WAIT).await;
    let mut bodies: Vec<&[u8]> = got.iter().map(|r| &r.body[..]).collect();
    bodies.sort_unstable();
    assert_eq!(bodies, [&br#"{"n":1}"#[..], br#"{"n":3}"#]);
    app.wait_for_trail(first.id, &["delivered"]).await;
    app.wait_for_trail(last.id, &["delivered"]).await;
    let dead = hiway_tests::eventually("the dead letter", WAIT, || async {
        app.dead_letters("dead").await.into_iter().next()
    })
    .await;
    assert_eq!(&dead.body[..], br#"{"n":2}"#);
    assert!(dead.reason.contains(headers::CHANNEL), "{}", dead.reason);
    assert_eq!(dead.dead_by.as_deref(), Some("transformer"));
    assert_eq!(app.dead_letters("dead").await.len(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn a_batch_that_cannot_be_read_is_dead_lettered_whole_naming_where_it_breaks_and_the_queue_goes_on()
 {
    let sink = Receiver::start().await;
    let app = TestHiway::spawn(&one_route_with(&sink, "")).await;
    let mut batch = BatchWriter::default();
    batch
        .push(&envelope().to_properties(), br#"{"n":1}"#)
        .unwrap();
    batch
        .push(&envelope().to_properties(), br#"{"n":2}"#)
        .unwrap();
    let (body, properties) = batch.finish();
    let cut = &body[..body.len() - 4];
    publish_behind_ingress(&app, cut, properties).await;
    let good = app
        .post_json("forms", &json!({"after": "broken batch"}))
        .await;

    app.wait_for_trail(good, &["delivered"]).await;
    let dead = hiway_tests::eventually("the dead letter", WAIT, || async {
        app.dead_letters("dead").await.into_iter().next()
    })
    .await;
    assert_eq!(
        dead.reason,
        format!(
            "the batch ends inside message 1 (at byte {}): its body",
            cut.len() - 3
        ),
    );
    assert_eq!(
        dead.content_type.as_deref(),
        Some(hiway_proto::batch::CONTENT_TYPE)
    );
    assert_eq!(&dead.body[..], cut, "kept as it came");
    assert_eq!(
        sink.received().len(),
        1,
        "nothing of the broken batch was delivered"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_batch_the_broker_dead_lettered_is_stored_as_one_dead_letter_per_message_each_replayable()
{
    let sink = Receiver::start().await;
    let app = TestHiway::spawn(&one_route_with(&sink, "")).await;
    let (a, b) = (envelope(), envelope());
    let mut batch = BatchWriter::default();
    batch.push(&a.to_properties(), br#"{"n":"a"}"#).unwrap();
    batch.push(&b.to_properties(), br#"{"n":"b"}"#).unwrap();
    let (body, properties) = batch.finish();
    // As RabbitMQ dead-letters a message off the ingress queue at its delivery limit: the
    // message as it was, with an x-death entry and no hiway reason.
    let mut death = hiway_proto::amqp::FieldTable::default();
    death.insert(
        "queue".into(),
        AMQPValue::LongString(app.names().ingress_queue().into_bytes().into()),
    );
    death.insert(
        "reason".into(),
        AMQPValue::LongString(b"delivery_limit".to_vec().into()),
    );
    let mut h = properties.headers().clone().unwrap();
    h.insert(
        "x-death".into(),
        AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
    );
    let properties = properties.with_headers(h);
    let dead_exchange = app.names().dead_exchange();
    let dead = |body: Vec<u8>, properties| {
        let exchange = dead_exchange.clone();
        async move {
            publish(
                &exchange,
                hiway_proto::topology::DEAD_KEY_INGRESS,
                &body,
                properties,
            )
            .await
        }
    };
    dead(body.clone(), properties.clone()).await;
    // Delivered twice (its ack lost, say), it is still stored once.
    dead(body, properties).await;
    // Dead letters are stored one delivery after the other, so once this last one is there,
    // the duplicate batch has been handled too.
    let last = envelope();
    dead(b"last".to_vec(), last.to_properties()).await;

    let letters = hiway_tests::eventually("the last dead letter", WAIT, || async {
        let letters = app.dead_letters("dead").await;
        letters
            .iter()
            .any(|l| l.message_id == Some(last.id.as_uuid()))
            .then_some(letters)
    })
    .await;
    let letters: Vec<_> = letters
        .into_iter()
        .filter(|l| l.message_id != Some(last.id.as_uuid()))
        .collect();
    let mut ids: Vec<_> = letters.iter().map(|l| l.message_id).collect();
    ids.sort_unstable();
    let mut expected = vec![Some(a.id.as_uuid()), Some(b.id.as_uuid())];
    expected.sort_unstable();
    assert_eq!(
        ids, expected,
        "one dead letter per message, each stored once"
    );
    for letter in &letters {
        assert_eq!(letter.channel.as_deref(), Some("forms"));
        assert!(
            letter.reason.contains("delivery_limit"),
            "{}",
            letter.reason
        );
        assert_eq!(letter.content_type.as_deref(), Some("application/json"));
    }

    let out = app.hiway(&["dlq", "replay", &a.id.to_string()]).await;
    assert!(out.contains("replayed 1"), "{out}");
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(&got[0].body[..], br#"{"n":"a"}"#);
    assert_eq!(
        got[0].header("x-hiway-message-id"),
        Some(a.id.to_string().as_str())
    );
    app.wait_for_trail(a.id, &["dead", "replayed", "delivered"])
        .await;
    app.shutdown().await;
}
