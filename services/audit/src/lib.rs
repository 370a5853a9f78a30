//! hiway audit: writes the audit trail and the dead letters to PostgreSQL.
//!
//! Audit batches from every service are collected until `audit.batch_size` events or
//! `audit.flush_interval`, whichever comes first, written in one statement and one commit,
//! and only then acked with one multiple-ack. While PostgreSQL is unreachable the batch is
//! retried and nothing is acked, so the broker keeps every event until the database is back.
//! Dead letters are stored one by one (they are rare) with a `dead` event in the same
//! transaction. An audit message that is not a valid batch is rejected to the dead-letter
//! exchange, where it is stored as a dead letter like any other.

mod dead;
pub mod dlq;
pub mod retention;
pub mod store;

use std::time::Duration;

use futures_util::StreamExt;
use hiway_config::Config;
use hiway_proto::audit::{AuditBatch, AuditEvent};
use hiway_runtime::Broker;
use hiway_runtime::amqp::{BrokerError, Connection, Consumer, Delivery};
use hiway_runtime::consume::Reconnect;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use dead::table_to_json;
pub use store::{MIGRATOR, TrailEntry, trail};

/// Why the audit service could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker could not be reached or the topology not declared.
    #[error("cannot connect to the broker: {0}")]
    Broker(#[from] BrokerError),
    /// PostgreSQL could not be reached.
    #[error("cannot connect to PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("cannot migrate the audit schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Connects a pool to the configured database.
pub async fn connect_database(config: &Config) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(config.database.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(config.database.url.expose())
        .await
}

/// The audit service, connected and ready to run.
pub struct Audit {
    broker: Broker,
    connection: Connection,
    pool: PgPool,
    batch_size: usize,
    flush_interval: Duration,
    prefetch: u16,
    drain: Duration,
    retention: Duration,
    prune_interval: Duration,
}

/// Connects to PostgreSQL (applying migrations) and to the broker.
pub async fn build(config: &Config) -> Result<Audit, Error> {
    let pool = connect_database(config).await?;
    MIGRATOR.run(&pool).await?;
    let broker = Broker::new(config);
    let connection = broker.connect("hiway-audit").await?;
    Ok(Audit {
        broker,
        connection,
        pool,
        batch_size: config.audit.batch_size,
        flush_interval: config.audit.flush_interval,
        prefetch: config.audit.prefetch,
        drain: config.shutdown.drain_timeout,
        retention: config.audit.retention,
        prune_interval: config.audit.prune_interval,
    })
}

impl Audit {
    /// The pool, for tools that read what was written.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Writes until `stop`, then flushes the open batch and returns.
    pub async fn run(self, stop: CancellationToken) -> Result<(), Error> {
        let writer = Writer {
            pool: self.pool.clone(),
            batch_size: self.batch_size,
            flush_interval: self.flush_interval,
            drain: self.drain,
        };
        // Pruning runs beside the writer, on the same pool, independent of the broker.
        let pruner = (!self.retention.is_zero()).then(|| {
            tokio::spawn(retention::run(
                self.pool.clone(),
                self.retention,
                self.prune_interval,
                stop.clone(),
            ))
        });
        let mut connections = Reconnect::new(&self.broker, "hiway-audit", self.connection, &stop);
        while let Some(conn) = connections.next().await {
            let ended = session(&self.broker, &conn, &writer, self.prefetch, &stop).await;
            connections.ended(conn, ended).await;
        }
        if let Some(pruner) = pruner {
            let _ = pruner.await;
        }
        self.pool.close().await;
        tracing::info!("audit stopped");
        Ok(())
    }
}

/// Consumes the audit and dead queues on one connection until `stop` or a broker error.
async fn session(
    broker: &Broker,
    conn: &Connection,
    writer: &Writer,
    prefetch: u16,
    stop: &CancellationToken,
) -> Result<(), BrokerError> {
    let names = broker.names();
    // Prefetch must exceed a batch (each message carries one or a few events), or batches
    // would only ever be flushed by the timer.
    let events = broker
        .consumer(conn, &names.audit_queue(), "hiway-audit", prefetch)
        .await?;
    // Dead letters are stored one at a time; a small window is plenty.
    let dead = broker
        .consumer(conn, &names.dead_queue(), "hiway-audit-dead", 16)
        .await?;
    // Closed after the loops end, before their connection: a clean close, not a dropped one.
    let channels = [events.channel().clone(), dead.channel().clone()];
    tracing::info!(queue = %names.audit_queue(), batch_size = writer.batch_size, "audit consuming");
    let (a, b) = tokio::join!(
        async {
            let r = writer.events(events, stop).await;
            tracing::debug!(ok = r.is_ok(), "audit events loop ended");
            r
        },
        async {
            let r = writer.dead(dead, stop).await;
            tracing::debug!(ok = r.is_ok(), "dead letter loop ended");
            r
        }
    );
    for channel in channels {
        channel.close().await;
    }
    a.and(b)
}

struct Writer {
    pool: PgPool,
    batch_size: usize,
    flush_interval: Duration,
    drain: Duration,
}

/// Pending work: the events to write, and each delivery with the range of its events.
#[derive(Default)]
struct Batch {
    events: AuditBatch,
    parts: Vec<(Delivery, std::ops::Range<usize>)>,
}

/// How writing events ended.
enum Written {
    /// Stored (or stored already).
    Yes,
    /// PostgreSQL refuses a value in them: writing them again cannot succeed.
    Refused(sqlx::Error),
    /// The service is stopping and the database did not come back before the drain deadline.
    Stopped,
}

/// Whether PostgreSQL refused the events themselves (a value out of range, a constraint),
/// not failed to take them (unreachable, disk full, a restart). Unique violations do not
/// come here: [`store::insert_batch`] skips the events stored already.
fn refused(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Encode(_) => true,
        sqlx::Error::Database(e) => e
            .code()
            .is_some_and(|c| c.starts_with("22") || (c.starts_with("23") && c != "23505")),
        _ => false,
    }
}

impl Writer {
    /// Collects, writes and acks audit batches until `stop`.
    async fn events(
        &self,
        mut consumer: Consumer,
        stop: &CancellationToken,
    ) -> Result<(), BrokerError> {
        loop {
            let mut batch = Batch::default();
            let mut deadline: Option<Instant> = None;
            let mut stopping = false;
            while batch.events.len() < self.batch_size {
                let timer = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            match serde_json::from_slice::<AuditBatch>(&delivery.data) {
                                Ok(events) => {
                                    let start = batch.events.len();
                                    batch.events.extend(events);
                                    deadline.get_or_insert_with(|| Instant::now() + self.flush_interval);
                                    batch.parts.push((delivery, start..batch.events.len()));
                                }
                                Err(error) => {
                                    tracing::warn!(%error, "an audit message is not a valid batch; dead-lettering it");
                                    delivery.nack(false).await?;
                                }
                            }
                        }
                        Some(Err(error)) => return Err(error),
                        None => return Err(BrokerError::Closed),
                    },
                    _ = timer => break,
                    _ = stop.cancelled() => { stopping = true; break; }
                }
            }
            if !batch.parts.is_empty() && !self.settle(batch, stop).await? {
                // Stopped before the database came back: what is not acked, the broker
                // redelivers to the next audit process.
                return Ok(());
            }
            if stopping {
                return Ok(());
            }
        }
    }

    /// Writes a batch and acks its deliveries; false if it stopped first.
    ///
    /// One statement and one multiple-ack for the whole batch, usually. If PostgreSQL refuses
    /// a value in it, each delivery's events are written on their own, and a delivery whose
    /// events are refused again is dead-lettered (stored in `dead_letters` with its body, the
    /// error in the log): one bad message must not hold up the audit trail, as retrying the
    /// whole batch for ever would.
    async fn settle(&self, batch: Batch, stop: &CancellationToken) -> Result<bool, BrokerError> {
        let error = match self.write(&batch.events, stop).await {
            Written::Yes => {
                // One ack for the whole batch: every delivery up to the last on this channel
                // was either part of it or already rejected.
                if let Some((last, _)) = batch.parts.last() {
                    last.ack(true).await?;
                }
                return Ok(true);
            }
            Written::Stopped => return Ok(false),
            Written::Refused(error) => error,
        };
        tracing::warn!(%error, messages = batch.parts.len(), "PostgreSQL refuses a value in this audit batch; writing its messages one by one");
        let mut written = None;
        for (delivery, range) in &batch.parts {
            match self.write(&batch.events[range.clone()], stop).await {
                Written::Yes => written = Some(delivery),
                Written::Stopped => return Ok(false),
                Written::Refused(error) => {
                    tracing::error!(%error, events = range.len(), "PostgreSQL refuses the events of this audit message; dead-lettering it");
                    delivery.nack(false).await?;
                }
            }
        }
        // The dead-lettered ones are settled already; this acks the others.
        if let Some(last) = written {
            last.ack(true).await?;
        }
        Ok(true)
    }

    /// Writes events, retrying while the database fails to take them.
    async fn write(&self, events: &[AuditEvent], stop: &CancellationToken) -> Written {
        let span = tracing::info_span!("audit.flush", events = events.len());
        async {
            let mut wait = Duration::from_millis(100);
            let mut give_up: Option<Instant> = None;
            loop {
                match store::insert_batch(&self.pool, events).await {
                    Ok(_) => return Written::Yes,
                    Err(error) if refused(&error) => return Written::Refused(error),
                    Err(error) => {
                        tracing::warn!(%error, retry_in = ?wait, "cannot write the audit batch; holding it until PostgreSQL answers");
                    }
                }
                if stop.is_cancelled() {
                    let deadline = *give_up.get_or_insert_with(|| Instant::now() + self.drain);
                    if Instant::now() >= deadline {
                        return Written::Stopped;
                    }
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
        .instrument(span)
        .await
    }

    /// Stores dead letters until `stop`, each acked after its commit.
    async fn dead(
        &self,
        mut consumer: Consumer,
        stop: &CancellationToken,
    ) -> Result<(), BrokerError> {
        loop {
            let delivery = tokio::select! {
                next = consumer.next() => match next {
                    Some(Ok(d)) => d,
                    Some(Err(error)) => return Err(error),
                    None => return Err(BrokerError::Closed),
                },
                _ = stop.cancelled() => return Ok(()),
            };
            // Several letters only for a batch (dead at the broker's hand); each is stored
            // at most once by its dead id, so a stop half-way loses nothing on redelivery.
            for letter in dead::from_delivery(&delivery) {
                let mut wait = Duration::from_millis(100);
                loop {
                    match store::insert_dead_letter(&self.pool, &letter).await {
                        Ok(()) => break,
                        Err(error) => {
                            tracing::warn!(%error, "cannot store a dead letter; holding it until PostgreSQL answers");
                            if stop.is_cancelled() {
                                return Ok(());
                            }
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
            delivery.ack(false).await?;
        }
    }
}
