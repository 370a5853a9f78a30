//! Reading a dead-lettered delivery into a [`DeadLetter`].

use chrono::Utc;
use hiway_proto::amqp::{AMQPValue, BasicProperties, FieldTable};
use hiway_proto::{MessageId, batch, headers};
use hiway_runtime::amqp::Delivery;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::store::DeadLetter;

/// The dead letters a dead-lettered delivery holds: one, or one per message of a batch
/// ([`hiway_proto::batch`]), so that an operator sees, replays and discards each message on
/// its own, as if it had died alone. Whatever the delivery carries, a dead letter is made: a
/// message is never refused at the end of the line because its metadata is damaged.
///
/// A batch dies whole only at the broker's hand (its delivery limit on the ingress queue, or a
/// reject when a poison notice could not be published); its messages' dead letters each take
/// the batch's reason and time. A batch that cannot be read is stored whole, as it came.
pub fn from_delivery(delivery: &Delivery) -> Vec<DeadLetter> {
    let routing_key = delivery.routing_key.as_str();
    let whole = letter(&delivery.properties, &delivery.data, routing_key);
    if !batch::is_batch(&delivery.properties) {
        return vec![whole];
    }
    let Ok(messages) = batch::read(&delivery.properties, &delivery.data) else {
        return vec![whole];
    };
    // Each message's dead id is derived from the batch's (given by the hiway service that
    // dead-lettered it, or else drawn from the batch's bytes), so that a batch delivered
    // twice, or stored half-way before a stop, is stored once.
    let batch_id = headers::text_lossy(&delivery.properties, headers::DEAD_ID)
        .and_then(|s| s.parse::<Uuid>().ok())
        .unwrap_or_else(|| Uuid::new_v5(&Uuid::NAMESPACE_OID, &delivery.data));
    messages
        .into_iter()
        .enumerate()
        .map(|(index, (properties, body))| DeadLetter {
            dead_id: Uuid::new_v5(&batch_id, &(index as u64).to_be_bytes()),
            reason: whole.reason.clone(),
            dead_by: whole.dead_by.clone(),
            died_at: whole.died_at,
            ..letter(&properties, body, routing_key)
        })
        .collect()
}

/// One message's dead letter, from its properties and body.
fn letter(properties: &BasicProperties, body: &[u8], routing_key: &str) -> DeadLetter {
    let empty = FieldTable::default();
    let h = properties.headers().as_ref().unwrap_or(&empty);
    let text = |key: &str| headers::text_lossy(properties, key);
    let (reason, dead_by) = match text(headers::DEAD_REASON) {
        Some(reason) => (reason, text(headers::DEAD_BY)),
        // Dead-lettered by the broker itself (a reject without requeue, or a queue limit):
        // its x-death header says why and from which queue.
        None => (broker_reason(h), Some("broker".to_owned())),
    };
    let attempts = match h.inner().get(headers::ATTEMPTS) {
        Some(AMQPValue::LongString(s)) => {
            serde_json::from_slice(s.as_bytes()).unwrap_or(Value::Array(vec![]))
        }
        _ => Value::Array(vec![]),
    };
    let last_status_code = attempts
        .as_array()
        .and_then(|a| a.last())
        .and_then(|a| a["status_code"].as_i64())
        .and_then(|s| i32::try_from(s).ok());
    DeadLetter {
        attempts,
        last_status_code,
        dead_id: text(headers::DEAD_ID)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(Uuid::now_v7),
        message_id: properties
            .message_id()
            .as_ref()
            .and_then(|m| m.as_str().parse::<MessageId>().ok()),
        channel: text(headers::CHANNEL),
        destination: text(headers::DESTINATION),
        routing_key: routing_key.to_owned(),
        reason,
        dead_by,
        // The time it died, when a hiway service recorded it; the broker's own dead-lettering
        // carries its time in x-death, which is coarser: it is read as now.
        died_at: match h.inner().get(headers::DEAD_AT) {
            Some(AMQPValue::LongLongInt(micros)) => {
                chrono::TimeZone::timestamp_micros(&Utc, *micros)
                    .single()
                    .unwrap_or_else(Utc::now)
            }
            _ => Utc::now(),
        },
        content_type: properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str().to_owned()),
        headers: table_to_json(h),
        body: body.to_vec(),
    }
}

fn broker_reason(h: &FieldTable) -> String {
    let first_death = match h.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().first().cloned(),
        _ => None,
    };
    match first_death {
        Some(AMQPValue::FieldTable(t)) => {
            let field = |k: &str| match t.inner().get(k) {
                Some(AMQPValue::LongString(s)) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
                _ => "?".to_owned(),
            };
            format!(
                "dead-lettered by the broker from queue {} ({})",
                field("queue"),
                field("reason")
            )
        }
        _ => "dead-lettered by the broker".to_owned(),
    }
}

/// AMQP headers as plain JSON (strings, numbers, booleans, arrays, objects), for storage and
/// for rebuilding the headers on replay.
pub fn table_to_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), value_to_json(v)))
            .collect::<Map<_, _>>(),
    )
}

fn value_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Float(f) => Value::from(f64::from(*f)),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::DecimalValue(d) => Value::String(format!("{d:?}")),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::Timestamp(t) => (*t).into(),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::ByteArray(b) => Value::String(format!("{b:?}")),
        AMQPValue::Void => Value::Null,
    }
}
