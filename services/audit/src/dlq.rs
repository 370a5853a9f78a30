//! Dead letters for operators: find them, look at one, replay them, or discard them.
//!
//! Replay publishes each selected dead letter back to its destination's queue (or, for a
//! message that died before it was routed, to the ingress queue) with the same message id,
//! its attempts restarted and its replay count raised, and marks it `replayed` only after the
//! broker confirmed the publish. A bulk replay stopped half-way can be run again: what was
//! confirmed is no longer `dead`, and what was not is still there to select. (A letter whose
//! publish was confirmed just before the stop, but not yet marked, is sent once more; the
//! destination drops the duplicate by message id.)

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use hiway_proto::amqp::BasicProperties;
use hiway_proto::amqp::{AMQPValue, FieldArray, FieldTable, LongString};
use hiway_proto::audit::{AuditEvent, AuditKind};
use hiway_proto::{DestinationName, MessageId, Names, headers};
use hiway_runtime::Publisher;
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

/// Which dead letters an operator means. Every condition given must hold.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// These dead letters (by dead id), or these messages (by message id).
    pub ids: Vec<Uuid>,
    /// Meant for this destination.
    pub destination: Option<String>,
    /// Came in on this channel.
    pub channel: Option<String>,
    /// Died at or after.
    pub since: Option<DateTime<Utc>>,
    /// Died before.
    pub until: Option<DateTime<Utc>>,
    /// The last attempt got this HTTP status.
    pub status_code: Option<i32>,
    /// The reason contains this text (case-insensitive).
    pub error: Option<String>,
    /// In this state (`dead` unless said otherwise).
    pub state: Option<String>,
    /// At most this many, oldest first.
    pub limit: Option<i64>,
}

impl Selection {
    /// Whether it names nothing at all (so "replay everything" must be asked for in words).
    pub fn is_everything(&self) -> bool {
        self.ids.is_empty()
            && self.destination.is_none()
            && self.channel.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.status_code.is_none()
            && self.error.is_none()
    }

    fn push_where(&self, q: &mut QueryBuilder<Postgres>) {
        q.push(" where state = ")
            .push_bind(self.state.clone().unwrap_or_else(|| "dead".into()));
        if !self.ids.is_empty() {
            q.push(" and (dead_id = any(").push_bind(self.ids.clone());
            q.push(") or message_id = any(")
                .push_bind(self.ids.clone())
                .push("))");
        }
        if let Some(d) = &self.destination {
            q.push(" and destination = ").push_bind(d.clone());
        }
        if let Some(c) = &self.channel {
            q.push(" and channel = ").push_bind(c.clone());
        }
        if let Some(t) = self.since {
            q.push(" and died_at >= ").push_bind(t);
        }
        if let Some(t) = self.until {
            q.push(" and died_at < ").push_bind(t);
        }
        if let Some(s) = self.status_code {
            q.push(" and last_status_code = ").push_bind(s);
        }
        if let Some(e) = &self.error {
            q.push(" and reason ilike ")
                .push_bind(format!("%{}%", e.replace('%', "\\%").replace('_', "\\_")));
        }
        q.push(" order by died_at, dead_id");
        if let Some(l) = self.limit {
            q.push(" limit ").push_bind(l);
        }
    }
}

/// A dead letter as an operator sees it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct DeadLetterRow {
    /// Its id.
    pub dead_id: Uuid,
    /// The message's id.
    pub message_id: Option<Uuid>,
    /// Channel.
    pub channel: Option<String>,
    /// Destination.
    pub destination: Option<String>,
    /// Routing key it died with.
    pub routing_key: String,
    /// Why it died.
    pub reason: String,
    /// Who dead-lettered it.
    pub dead_by: Option<String>,
    /// When.
    pub died_at: DateTime<Utc>,
    /// Content type.
    pub content_type: Option<String>,
    /// AMQP headers as JSON.
    pub headers: Value,
    /// Every attempt.
    pub attempts: Value,
    /// Last attempt's status.
    pub last_status_code: Option<i32>,
    /// dead, replayed or discarded.
    pub state: String,
    /// Times replayed.
    pub replays: i32,
    /// The payload.
    pub body: Vec<u8>,
}

const COLUMNS: &str = "select dead_id, message_id, channel, destination, routing_key, reason, dead_by, \
                       died_at, content_type, headers, attempts, last_status_code, state, replays, body \
                       from dead_letters";

/// The dead letters a selection names.
pub async fn select(
    pool: &PgPool,
    selection: &Selection,
) -> Result<Vec<DeadLetterRow>, sqlx::Error> {
    let mut q = QueryBuilder::new(COLUMNS);
    selection.push_where(&mut q);
    q.build_query_as().fetch_all(pool).await
}

/// What a replay did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Published, confirmed and marked replayed.
    pub replayed: usize,
    /// Could not be published; still dead, to be replayed again.
    pub failed: usize,
    /// Not messages for a destination or from ingress (an unreadable audit batch, say): they
    /// cannot be replayed, only discarded.
    pub unreplayable: usize,
}

/// Where a replayed letter goes: its destination's queue; or, for a message that died before
/// routing, the ingress queue. Anything else (an audit batch) has nowhere to go.
fn replay_target(letter: &DeadLetterRow, names: &Names) -> Option<(String, String)> {
    match &letter.destination {
        Some(d) => Some((names.deliver_exchange(), d.clone())),
        None if letter.routing_key == hiway_proto::topology::DEAD_KEY_INGRESS => Some((
            names.ingress_exchange(),
            hiway_proto::names::INGRESS_KEY.to_owned(),
        )),
        None => None,
    }
}

/// How many letters are published at once during a bulk replay: their confirms are in flight
/// together, then they are marked replayed in one statement.
const REPLAY_CHUNK: usize = 100;

/// Replays the selected dead letters.
pub async fn replay(
    pool: &PgPool,
    publisher: &Publisher,
    names: &Names,
    selection: &Selection,
) -> Result<ReplayReport, sqlx::Error> {
    let letters = select(pool, selection).await?;
    let mut report = ReplayReport::default();
    for chunk in letters.chunks(REPLAY_CHUNK) {
        let published = join_all(chunk.iter().map(|letter| async move {
            let Some((exchange, key)) = replay_target(letter, names) else {
                return (letter, Err(None));
            };
            let result = publisher
                .publish(&exchange, &key, &letter.body, replay_properties(letter))
                .await;
            (letter, result.map_err(Some))
        }))
        .await;
        let mut done = Vec::new();
        let mut events = Vec::new();
        for (letter, result) in published {
            match result {
                Ok(()) => {
                    done.push(letter.dead_id);
                    if let Some(id) = letter.message_id {
                        events.push(AuditEvent::now(
                            MessageId::from(id),
                            "operator",
                            AuditKind::Replayed {
                                destination: letter
                                    .destination
                                    .as_deref()
                                    .and_then(|d| DestinationName::parse(d).ok()),
                                replay: replays_after(letter),
                                dead_id: letter.dead_id,
                            },
                        ));
                    }
                }
                Err(Some(error)) => {
                    tracing::warn!(%error, dead_id = %letter.dead_id, "replay not confirmed; the letter stays dead");
                    report.failed += 1;
                }
                Err(None) => {
                    tracing::warn!(dead_id = %letter.dead_id, routing_key = %letter.routing_key, "this letter has no destination and did not come from ingress: it cannot be replayed, only discarded");
                    report.unreplayable += 1;
                }
            }
        }
        settle(pool, &done, "replayed", &events).await?;
        report.replayed += done.len();
    }
    Ok(report)
}

/// Discards the selected dead letters: they stay stored (for the record) but are no longer
/// dead, so no replay picks them up. Returns how many.
pub async fn discard(pool: &PgPool, selection: &Selection) -> Result<usize, sqlx::Error> {
    let letters = select(pool, selection).await?;
    let ids: Vec<Uuid> = letters.iter().map(|l| l.dead_id).collect();
    let events: Vec<AuditEvent> = letters
        .iter()
        .filter_map(|l| {
            l.message_id.map(|id| {
                AuditEvent::now(
                    MessageId::from(id),
                    "operator",
                    AuditKind::Discarded {
                        destination: l
                            .destination
                            .as_deref()
                            .and_then(|d| DestinationName::parse(d).ok()),
                        dead_id: l.dead_id,
                    },
                )
            })
        })
        .collect();
    settle(pool, &ids, "discarded", &events).await?;
    Ok(ids.len())
}

/// Marks letters settled and records the events, in one transaction.
async fn settle(
    pool: &PgPool,
    ids: &[Uuid],
    state: &str,
    events: &[AuditEvent],
) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    sqlx::query(
        "update dead_letters set state = $2, settled_at = now(),
                replays = replays + case when $2 = 'replayed' then 1 else 0 end
         where dead_id = any($1)",
    )
    .bind(ids)
    .bind(state)
    .execute(&mut *tx)
    .await?;
    crate::store::insert_events(&mut *tx, events).await?;
    tx.commit().await
}

fn replays_after(letter: &DeadLetterRow) -> u32 {
    let carried = letter.headers[headers::REPLAY].as_u64().unwrap_or(0);
    u32::try_from(carried.max(letter.replays as u64) + 1).unwrap_or(u32::MAX)
}

/// The properties a replayed letter is published with: its own, without what recorded its
/// death and its past attempts, with attempts restarted and the replay counted.
fn replay_properties(letter: &DeadLetterRow) -> BasicProperties {
    const DROPPED: &[&str] = &[
        headers::DEAD_REASON,
        headers::DEAD_BY,
        headers::DEAD_ID,
        headers::ATTEMPTS,
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-delivery-count",
    ];
    let mut table = FieldTable::default();
    if let Value::Object(map) = &letter.headers {
        for (k, v) in map {
            if !DROPPED.contains(&k.as_str()) {
                table.insert(k.as_str().into(), json_to_amqp(v));
            }
        }
    }
    table.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(0));
    table.insert(
        headers::REPLAY.into(),
        AMQPValue::LongUInt(replays_after(letter)),
    );
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table);
    if let Some(id) = letter.message_id {
        props = props.with_message_id(id.to_string().into());
    }
    if let Some(ct) = &letter.content_type {
        props = props.with_content_type(ct.as_str().into());
    }
    props
}

fn json_to_amqp(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Value::Array(a) => {
            let mut arr = FieldArray::default();
            for item in a {
                arr.push(json_to_amqp(item));
            }
            AMQPValue::FieldArray(arr)
        }
        Value::Object(o) => {
            let mut t = FieldTable::default();
            for (k, item) in o {
                t.insert(k.as_str().into(), json_to_amqp(item));
            }
            AMQPValue::FieldTable(t)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_letter_keeps_its_id_and_envelope_and_restarts_its_attempts() {
        let envelope = hiway_proto::Envelope::accepted(
            "forms".parse().unwrap(),
            "source".parse().unwrap(),
            "application/json".into(),
        )
        .for_destination("dhis2".parse().unwrap(), "r".parse().unwrap());
        let mut original = envelope.clone();
        original.attempt = 7;
        let props = original.to_properties();
        let mut headers = crate::dead::table_to_json(props.headers().as_ref().unwrap());
        headers[headers::DEAD_REASON] = "gave up".into();
        headers["x-death"] = serde_json::json!([{"queue": "q"}]);
        let letter = DeadLetterRow {
            dead_id: Uuid::now_v7(),
            message_id: Some(envelope.id.as_uuid()),
            channel: Some("forms".into()),
            destination: Some("dhis2".into()),
            routing_key: "dhis2".into(),
            reason: "gave up".into(),
            dead_by: Some("sender".into()),
            died_at: Utc::now(),
            content_type: Some("application/json".into()),
            headers,
            attempts: serde_json::json!([]),
            last_status_code: Some(503),
            state: "dead".into(),
            replays: 0,
            body: b"{}".to_vec(),
        };

        let replayed = hiway_proto::Envelope::from_properties(&replay_properties(&letter)).unwrap();

        assert_eq!(replayed.id, envelope.id);
        assert_eq!(replayed.attempt, 0);
        assert_eq!(replayed.replay, 1);
        assert_eq!(replayed.destination, envelope.destination);
        assert_eq!(replayed.channel, envelope.channel);
        let h = replay_properties(&letter).headers().clone().unwrap();
        assert!(!h.contains_key(headers::DEAD_REASON));
        assert!(!h.contains_key("x-death"));
    }
}
