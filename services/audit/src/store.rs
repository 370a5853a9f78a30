//! The PostgreSQL side of the audit trail: schema, batched writes, and reads.

use chrono::{DateTime, Utc};
use hiway_proto::MessageId;
use hiway_proto::audit::{AuditEvent, AuditKind};
use serde_json::value::RawValue;
use sqlx::PgPool;
use sqlx::postgres::PgPoolCopyExt;
use sqlx::types::Json;
use uuid::Uuid;

/// The schema history, embedded so every binary can bring a database up to date.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Writes a batch of events in one statement and one commit, skipping events already stored
/// (by `event_id`).
///
/// Array binds with `UNNEST` make it one round trip whatever the batch size. If any row is
/// refused the whole batch is refused and retried; every value is typed by the event itself,
/// so the only failures are the database's own (unreachable, disk full), which retrying
/// outlasts. Usable inside a transaction; the batch writer uses [`insert_batch`].
pub async fn insert_events<'e>(
    db: impl sqlx::PgExecutor<'e>,
    events: &[AuditEvent],
) -> Result<u64, sqlx::Error> {
    let n = events.len();
    let mut event_id = Vec::with_capacity(n);
    let mut message_id = Vec::with_capacity(n);
    let mut kind = Vec::with_capacity(n);
    let mut at = Vec::with_capacity(n);
    let mut service = Vec::with_capacity(n);
    let mut channel: Vec<Option<String>> = Vec::with_capacity(n);
    let mut client: Vec<Option<String>> = Vec::with_capacity(n);
    let mut destination: Vec<Option<String>> = Vec::with_capacity(n);
    let mut route: Vec<Option<String>> = Vec::with_capacity(n);
    let mut attempt: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut status_code: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut duration_ms: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut size_bytes: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut detail = Vec::with_capacity(n);
    for e in events {
        event_id.push(e.event_id);
        message_id.push(e.message_id.as_uuid());
        kind.push(e.kind_name());
        at.push(e.at);
        service.push(storable(&e.service).into_owned());
        let (c, cl, d, r, a, s, dur, size) = columns(&e.kind);
        channel.push(c);
        client.push(cl);
        destination.push(d);
        route.push(r);
        attempt.push(a);
        status_code.push(s);
        duration_ms.push(dur);
        size_bytes.push(size);
        detail.push(jsonb(&e.kind)?);
    }
    let result = sqlx::query(
        "insert into audit_events (event_id, message_id, kind, at, service, channel, client,
                                   destination, route, attempt, status_code, duration_ms,
                                   size_bytes, detail)
         select * from unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[],
                              $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],
                              $10::int4[], $11::int4[], $12::int8[], $13::int8[],
                              $14::jsonb[])
         on conflict (event_id) do nothing",
    )
    .bind(event_id)
    .bind(message_id)
    .bind(kind)
    .bind(at)
    .bind(service)
    .bind(channel)
    .bind(client)
    .bind(destination)
    .bind(route)
    .bind(attempt)
    .bind(status_code)
    .bind(duration_ms)
    .bind(size_bytes)
    .bind(detail)
    .execute(db)
    .await?;
    Ok(result.rows_affected())
}

/// Writes a batch of events as [`insert_events`] does, with the same result, but cheaper in
/// the usual case where none of them is stored yet.
///
/// The batch is first streamed with `COPY … FROM STDIN` in PostgreSQL's binary format: it
/// cost the database 8.7–8.8 µs per row against 13.3–14.0 µs for the same rows through
/// `INSERT … SELECT * FROM UNNEST(…)` with binary array binds (docs/benchmarks.md, session
/// 16), and `on conflict do nothing` would add an index probe and a WAL record per row on top
/// (about 45% longer, session 8). Events are only ever stored already when the broker
/// redelivers a batch whose commit went through but whose ack did not. A `COPY` is one
/// statement and one transaction, so if an event is already there it fails as a whole,
/// nothing of it stays, and the batch is written again skipping what is stored.
pub async fn insert_batch(pool: &PgPool, events: &[AuditEvent]) -> Result<u64, sqlx::Error> {
    match copy(pool, events).await {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            tracing::info!(
                events = events.len(),
                "some events of this batch were stored already (a redelivered batch): writing the others"
            );
            insert_events(pool, events).await
        }
        other => other,
    }
}

/// The columns [`copy_rows`] writes, in its order.
const COPY_EVENTS: &str = "copy audit_events (event_id, message_id, kind, at, service, channel, \
    client, destination, route, attempt, status_code, duration_ms, size_bytes, detail) \
    from stdin (format binary)";

async fn copy(pool: &PgPool, events: &[AuditEvent]) -> Result<u64, sqlx::Error> {
    let rows = copy_rows(events).map_err(sqlx::Error::Encode)?;
    let mut copy = pool.copy_in_raw(COPY_EVENTS).await?;
    // Dropped on an error, the copy tells PostgreSQL to abandon it: nothing is stored.
    copy.send(rows.as_slice()).await?;
    copy.finish().await
}

/// `events` in `COPY`'s binary format
/// (<https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>): a signature,
/// then per row its field count and each field as a length and its bytes (−1 for NULL), then
/// −1. The fields are encoded by sqlx's own `Encode` for their types (what it sends as bind
/// parameters is this same binary form), except `detail`: jsonb is a version byte (1) and the
/// JSON text, written straight from the event.
fn copy_rows(events: &[AuditEvent]) -> Result<Vec<u8>, sqlx::error::BoxDynError> {
    use sqlx::Encode;
    use sqlx::encode::IsNull;
    use sqlx::postgres::{PgArgumentBuffer, Postgres};

    /// Appends one field: its length, then what `encode` wrote (nothing for NULL).
    fn field(
        buf: &mut PgArgumentBuffer,
        encode: impl FnOnce(&mut PgArgumentBuffer) -> Result<IsNull, sqlx::error::BoxDynError>,
    ) -> Result<(), sqlx::error::BoxDynError> {
        let start = buf.len();
        buf.extend_from_slice(&[0; 4]);
        let len = match encode(buf)? {
            IsNull::Yes => {
                buf.truncate(start + 4);
                -1
            }
            IsNull::No => i32::try_from(buf.len() - start - 4)?,
        };
        buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }
    fn value<'q, T: Encode<'q, Postgres>>(
        buf: &mut PgArgumentBuffer,
        v: &T,
    ) -> Result<(), sqlx::error::BoxDynError> {
        field(buf, |buf| v.encode_by_ref(buf))
    }

    const FIELDS: i16 = 14;
    let mut buf = PgArgumentBuffer::default();
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
    buf.extend_from_slice(&0i32.to_be_bytes()); // no header extension
    for e in events {
        let (channel, client, destination, route, attempt, status, duration, size) =
            columns(&e.kind);
        buf.extend_from_slice(&FIELDS.to_be_bytes());
        value(&mut buf, &e.event_id)?;
        value(&mut buf, &e.message_id.as_uuid())?;
        value(&mut buf, &e.kind_name())?;
        value(&mut buf, &e.at)?;
        value(&mut buf, &storable(&e.service).as_ref())?;
        value(&mut buf, &channel)?;
        value(&mut buf, &client)?;
        value(&mut buf, &destination)?;
        value(&mut buf, &route)?;
        value(&mut buf, &attempt)?;
        value(&mut buf, &status)?;
        value(&mut buf, &duration)?;
        value(&mut buf, &size)?;
        field(&mut buf, |buf| {
            buf.push(1);
            write_json(buf, &e.kind)?;
            Ok(IsNull::No)
        })?;
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    Ok(std::mem::take(&mut *buf))
}

/// `s` as PostgreSQL can store it: its `text` and `jsonb` cannot hold U+0000 (the statement
/// fails, "invalid byte sequence" or "unsupported Unicode escape sequence"), and a failing
/// batch would be retried for ever, holding up the whole audit trail. A NUL in an event comes
/// from outside (a jq error quoting a posted value, a destination's answer, another publisher's
/// header), so it is stored as U+FFFD, the replacement character; a dead letter's body is
/// `bytea` and is kept as it came.
fn storable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}").into()
    } else {
        s.into()
    }
}

/// Writes JSON that PostgreSQL's `jsonb` can store: serde_json writes U+0000 as `\u0000`,
/// which `jsonb` refuses; this writes the escape of U+FFFD instead, as [`storable`] does for
/// `text`. Everything else is serde_json's compact form.
struct Storable;

impl serde_json::ser::Formatter for Storable {
    fn write_char_escape<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        char_escape: serde_json::ser::CharEscape,
    ) -> std::io::Result<()> {
        match char_escape {
            serde_json::ser::CharEscape::AsciiControl(0) => writer.write_all(br"\ufffd"),
            other => serde_json::ser::CompactFormatter.write_char_escape(writer, other),
        }
    }
}

/// `v` as storable JSON text, appended to `out`.
fn write_json(out: &mut Vec<u8>, v: &impl serde::Serialize) -> serde_json::Result<()> {
    v.serialize(&mut serde_json::Serializer::with_formatter(out, Storable))
}

/// `v` as a storable `jsonb` value to bind.
fn jsonb(v: &impl serde::Serialize) -> Result<Json<Box<RawValue>>, sqlx::Error> {
    let encode = |e: serde_json::Error| sqlx::Error::Encode(Box::new(e));
    let mut out = Vec::new();
    write_json(&mut out, v).map_err(encode)?;
    // serde_json writes UTF-8 only.
    let text = String::from_utf8(out).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    RawValue::from_string(text).map(Json).map_err(encode)
}

type Columns = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<i32>,
    Option<i64>,
    Option<i64>,
);

/// The searchable columns of an event: channel, client, destination, route, attempt, status,
/// duration, size.
fn columns(kind: &AuditKind) -> Columns {
    let s = |v: &dyn ToString| Some(v.to_string());
    match kind {
        AuditKind::Received {
            channel,
            client,
            size_bytes,
            ..
        } => (
            s(channel),
            s(client),
            None,
            None,
            None,
            None,
            None,
            Some(*size_bytes as i64),
        ),
        AuditKind::Routed { channel, .. } | AuditKind::Unrouted { channel } => {
            (s(channel), None, None, None, None, None, None, None)
        }
        AuditKind::Filtered { channel, route, .. } => {
            (s(channel), None, None, s(route), None, None, None, None)
        }
        AuditKind::Attempted {
            destination,
            route,
            attempt,
            status_code,
            duration_ms,
            ..
        } => (
            None,
            None,
            s(destination),
            route.as_ref().map(ToString::to_string),
            Some(*attempt as i32),
            status_code.map(i32::from),
            Some(*duration_ms as i64),
            None,
        ),
        AuditKind::Delivered {
            destination,
            route,
            attempt,
            status_code,
            duration_ms,
        } => (
            None,
            None,
            s(destination),
            route.as_ref().map(ToString::to_string),
            Some(*attempt as i32),
            Some(i32::from(*status_code)),
            Some(*duration_ms as i64),
            None,
        ),
        AuditKind::CircuitOpened { destination, .. } | AuditKind::CircuitClosed { destination } => {
            (None, None, s(destination), None, None, None, None, None)
        }
        AuditKind::Dead { destination, .. }
        | AuditKind::Replayed { destination, .. }
        | AuditKind::Discarded { destination, .. } => (
            None,
            None,
            destination.as_ref().map(ToString::to_string),
            None,
            None,
            None,
            None,
            None,
        ),
    }
}

/// A dead letter as stored.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// Unique id of this dead letter.
    pub dead_id: Uuid,
    /// The message, when its id could be read.
    pub message_id: Option<MessageId>,
    /// Channel it came in on, when known.
    pub channel: Option<String>,
    /// Destination it was meant for, when it died on the way to one.
    pub destination: Option<String>,
    /// The routing key it died with.
    pub routing_key: String,
    /// Why it died.
    pub reason: String,
    /// Which service (or "broker") dead-lettered it.
    pub dead_by: Option<String>,
    /// When.
    pub died_at: DateTime<Utc>,
    /// Its content type.
    pub content_type: Option<String>,
    /// All its AMQP headers, as JSON.
    pub headers: serde_json::Value,
    /// Every delivery attempt: `{attempt, at, status_code, error}`.
    pub attempts: serde_json::Value,
    /// The status code of the last attempt, if the destination answered.
    pub last_status_code: Option<i32>,
    /// Its payload, untouched.
    pub body: Vec<u8>,
}

/// Stores a dead letter and its `dead` audit event in one transaction. A dead letter already
/// stored is skipped by `dead_id`.
pub async fn insert_dead_letter(pool: &PgPool, dead: &DeadLetter) -> Result<(), sqlx::Error> {
    let text = |t: &Option<String>| t.as_deref().map(|t| storable(t).into_owned());
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "insert into dead_letters (dead_id, message_id, channel, destination, routing_key, reason,
                                   dead_by, died_at, content_type, headers, body, attempts,
                                   last_status_code)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         on conflict (dead_id) do nothing",
    )
    .bind(dead.dead_id)
    .bind(dead.message_id.map(|m| m.as_uuid()))
    .bind(text(&dead.channel))
    .bind(text(&dead.destination))
    .bind(storable(&dead.routing_key))
    .bind(storable(&dead.reason))
    .bind(text(&dead.dead_by))
    .bind(dead.died_at)
    .bind(text(&dead.content_type))
    .bind(jsonb(&dead.headers)?)
    .bind(&dead.body)
    .bind(jsonb(&dead.attempts)?)
    .bind(dead.last_status_code)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 1
        && let Some(message_id) = dead.message_id
    {
        let event = AuditEvent {
            // The event id is the dead letter's, so the pair is written at most once.
            event_id: dead.dead_id,
            at: dead.died_at,
            ..AuditEvent::now(
                message_id,
                dead.dead_by.as_deref().unwrap_or("broker"),
                AuditKind::Dead {
                    destination: dead
                        .destination
                        .as_deref()
                        .and_then(|d| hiway_proto::DestinationName::parse(d).ok()),
                    reason: dead.reason.clone(),
                },
            )
        };
        sqlx::query(
            "insert into audit_events (event_id, message_id, kind, at, service, destination, detail)
             values ($1, $2, 'dead', $3, $4, $5, $6) on conflict (event_id) do nothing",
        )
        .bind(event.event_id)
        .bind(message_id.as_uuid())
        .bind(event.at)
        .bind(storable(&event.service))
        .bind(text(&dead.destination))
        .bind(jsonb(&event.kind)?)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// One line of a message's trail.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct TrailEntry {
    /// Event kind.
    pub kind: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Recorded by.
    pub service: String,
    /// Channel, for received/routed/unrouted.
    pub channel: Option<String>,
    /// Client, for received.
    pub client: Option<String>,
    /// Destination, for attempts, deliveries, dead letters.
    pub destination: Option<String>,
    /// Route.
    pub route: Option<String>,
    /// Attempt number.
    pub attempt: Option<i32>,
    /// HTTP status.
    pub status_code: Option<i32>,
    /// Attempt duration.
    pub duration_ms: Option<i64>,
    /// Body size, for received.
    pub size_bytes: Option<i64>,
    /// The whole event.
    pub detail: serde_json::Value,
}

/// Every event of one message, oldest first.
pub async fn trail(pool: &PgPool, id: MessageId) -> Result<Vec<TrailEntry>, sqlx::Error> {
    sqlx::query_as(
        "select kind, at, service, channel, client, destination, route, attempt, status_code,
                duration_ms, size_bytes, detail
         from audit_events where message_id = $1 order by at, event_id",
    )
    .bind(id.as_uuid())
    .fetch_all(pool)
    .await
}
