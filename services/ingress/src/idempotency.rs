//! Idempotent ingress: remembers, per channel, which message each key was accepted as.
//!
//! A key is claimed as `pending` before the publish and marked `accepted` after the broker
//! confirmed it, so a key never points at a message that was not stored: if the publish fails
//! the claim is released, and if the process dies between claim and confirm, the pending
//! claim goes stale and the source's retry takes it over.

use std::time::Duration;

use hiway_proto::{ChannelName, MessageId};
use sqlx::PgPool;
use uuid::Uuid;

/// The schema history (shared with every service that uses the database).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Longest key accepted, so a key cannot be used to fill the table with large values.
pub const MAX_KEY_LEN: usize = 255;

/// What a claim found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key is new (or expired, or abandoned): publish, then [`KeyStore::accept`].
    New,
    /// Already accepted as this message.
    Duplicate(MessageId),
    /// Another request with this key is being published right now.
    InProgress,
}

/// The key table.
#[derive(Clone, Debug)]
pub struct KeyStore {
    pool: PgPool,
    /// After this long a pending claim is taken to belong to a request that died.
    stale: Duration,
}

impl KeyStore {
    /// A store on `pool`; a claim pending longer than `stale` can be taken over.
    pub fn new(pool: PgPool, stale: Duration) -> Self {
        Self { pool, stale }
    }

    /// Claims `key` on `channel` for message `id`.
    pub async fn claim(
        &self,
        channel: &ChannelName,
        key: &str,
        id: MessageId,
        window: Duration,
    ) -> Result<Claim, sqlx::Error> {
        let claimed: Option<(Uuid,)> = sqlx::query_as(
            "insert into ingress_keys (channel, key, message_id, state, created_at)
             values ($1, $2, $3, 'pending', now())
             on conflict (channel, key) do update
                set message_id = excluded.message_id, state = 'pending', created_at = now()
                where ingress_keys.created_at < now() - $4 * interval '1 second'
                   or (ingress_keys.state = 'pending'
                       and ingress_keys.created_at < now() - $5 * interval '1 second')
             returning message_id",
        )
        .bind(channel.as_str())
        .bind(key)
        .bind(id.as_uuid())
        .bind(window.as_secs_f64())
        .bind(self.stale.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        if claimed.is_some() {
            return Ok(Claim::New);
        }
        let existing: Option<(Uuid, String)> = sqlx::query_as(
            "select message_id, state from ingress_keys where channel = $1 and key = $2",
        )
        .bind(channel.as_str())
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match existing {
            Some((id, state)) if state == "accepted" => Claim::Duplicate(MessageId::from(id)),
            // Pending, or released between the two statements: either way, try again soon.
            _ => Claim::InProgress,
        })
    }

    /// The message the key was claimed for is confirmed by the broker.
    pub async fn accept(
        &self,
        channel: &ChannelName,
        key: &str,
        id: MessageId,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "update ingress_keys set state = 'accepted'
             where channel = $1 and key = $2 and message_id = $3",
        )
        .bind(channel.as_str())
        .bind(key)
        .bind(id.as_uuid())
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// The publish failed: let the source's retry claim the key again.
    pub async fn release(
        &self,
        channel: &ChannelName,
        key: &str,
        id: MessageId,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "delete from ingress_keys
             where channel = $1 and key = $2 and message_id = $3 and state = 'pending'",
        )
        .bind(channel.as_str())
        .bind(key)
        .bind(id.as_uuid())
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Forgets the channel's keys older than its window.
    pub async fn purge(&self, channel: &ChannelName, window: Duration) -> Result<u64, sqlx::Error> {
        sqlx::query("delete from ingress_keys where channel = $1 and created_at < now() - $2 * interval '1 second'")
            .bind(channel.as_str())
            .bind(window.as_secs_f64())
            .execute(&self.pool)
            .await
            .map(|r| r.rows_affected())
    }
}
