//! The bench's private hiway installation: a unique name prefix on the broker, a fresh
//! database, a configuration directory for the service processes, and the removal of all of
//! it at the end.
//!
//! Like the test harness (tests/src/lib.rs), nothing is shared with another installation on
//! the same broker or PostgreSQL, so the bench can run next to a live hiway or the tests.

use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::Context;
use hiway_proto::{DestinationName, Names};
use sqlx::{AssertSqlSafe, Connection as _, PgConnection};

use crate::broker;

/// The client the load generator posts as.
pub const CLIENT: &str = "bench";
/// Its bearer key (the configuration holds only its hash).
pub const CLIENT_KEY: &str = "hiway-bench-key";
/// The channel the load generator posts to.
pub const CHANNEL: &str = "forms";
/// The end-to-end destination (the fast sink).
pub const SINK: &str = "sink";
/// The scaling destination (the slow sink).
pub const SLOW: &str = "slow";
/// The route from [`CHANNEL`] to [`SINK`].
pub const ROUTE: &str = "forms-to-sink";

/// One run's installation.
pub struct Installation {
    /// Broker name prefix, `bench<12 hex digits>`.
    pub prefix: String,
    /// Queue and exchange names under the prefix.
    pub names: Names,
    /// RabbitMQ.
    pub amqp_url: String,
    /// Base URL of the ingress process.
    pub ingress_url: String,
    admin_url: String,
    database: String,
    dir: PathBuf,
}

/// The route's jq transform: a typical mapping, the CommCare form to a DHIS2 tracker event (as
/// in `config/examples/commcare-to-dhis2-event`, without its lookup tables), so that the end-to-end
/// figures include the cost of parsing the body, running jq and serializing its output.
const TRANSFORM: &str = r#"{
  events: [{
    event: (.id | dhis2_uid),
    program: "lxAQ7Zs9VYR",
    programStage: "dBwrot7S420",
    orgUnit: "DiszpKrYNg8",
    status: "COMPLETED",
    occurredAt: "\(.form.visit_date)T00:00:00.000",
    completedAt: (.form.meta.timeEnd[0:19] + ".000"),
    dataValues: [
      { dataElement: "qrur9Dvnyt5", value: .form.weight_kg },
      { dataElement: "oZg33kd9taw", value: .form.danger_signs }
    ] | map(select(.value != null and .value != ""))
  }]
}"#;

impl Installation {
    /// Creates the database and writes the configuration: every service setting at its
    /// default (the bench measures hiway as shipped), except names, addresses and the log
    /// filter.
    pub async fn create(
        amqp_url: &str,
        admin_url: &str,
        sink_url: &str,
        slow_url: &str,
    ) -> anyhow::Result<Self> {
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let prefix = format!("bench{}", &suffix[suffix.len() - 12..]);
        let database = format!("hiway_{prefix}");
        let database_url = create_database(admin_url, &database).await?;
        let port = free_port()?;
        let toml = format!(
            r#"# Written by hiway-bench for one run; removed at its end.
[broker]
url = "{amqp_url}"
prefix = "{prefix}"

[database]
url = "{database_url}"

[ingress]
listen = "127.0.0.1:{port}"

[log]
filter = "warn"

[clients.{CLIENT}]
api_key_sha256 = "{key_hash}"

[channels.{CHANNEL}]
clients = ["{CLIENT}"]

[destinations.{SINK}]
url = "{sink_url}"

[destinations.{SLOW}]
url = "{slow_url}"

[routes.{ROUTE}]
channels = ["{CHANNEL}"]
destinations = ["{SINK}"]
filter = '.form."@name" == "ANC Visit"'
transform = '''{TRANSFORM}'''
"#,
            key_hash = hiway_ingress::auth::hash_secret(CLIENT_KEY),
        );
        let config = hiway_config::Config::from_toml(&toml)
            .map_err(|e| anyhow::anyhow!("the bench's configuration is not valid: {e}"))?;
        let dir = std::env::temp_dir().join(format!("hiway-{prefix}"));
        let config_dir = dir.join("config");
        std::fs::create_dir_all(&config_dir)
            .with_context(|| format!("cannot create {}", config_dir.display()))?;
        std::fs::create_dir_all(dir.join("logs"))?;
        std::fs::write(config_dir.join("hiway.toml"), &toml)?;
        Ok(Self {
            names: config.names(),
            prefix,
            amqp_url: amqp_url.to_owned(),
            ingress_url: format!("http://127.0.0.1:{port}"),
            admin_url: admin_url.to_owned(),
            database,
            dir,
        })
    }

    /// The configuration directory every service gets as `--config`.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.join("config")
    }

    /// Where service logs go.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// A destination's name, parsed.
    pub fn destination(name: &str) -> DestinationName {
        // The names are this module's constants, valid by construction.
        DestinationName::parse(name).unwrap_or_else(|_| unreachable!("{name} is a valid name"))
    }

    /// The queue the bench's baseline uses (under the prefix, so cleanup finds it).
    pub fn baseline_queue(&self) -> String {
        format!("{}.baseline", self.prefix)
    }

    /// Deletes the run's queues and exchanges and drops its database. Call only once every
    /// service process has exited: a live service would declare its topology again.
    pub async fn remove(&self) {
        let names = &self.names;
        let mut queues = names.all_queues([&Self::destination(SINK), &Self::destination(SLOW)]);
        queues.push(self.baseline_queue());
        let exchanges = [
            names.ingress_exchange(),
            names.deliver_exchange(),
            names.retry_exchange(),
            names.dead_exchange(),
            names.audit_exchange(),
        ];
        if let Err(error) = broker::delete(&self.amqp_url, &queues, &exchanges).await {
            crate::warn(&format!("could not delete the bench's queues: {error:#}"));
        }
        // Whatever else the services declared under the prefix (retry queues, …).
        match broker::Management::from_amqp_url(&self.amqp_url) {
            Ok(m) => {
                if let Err(error) = m.delete_prefixed(&self.prefix).await {
                    crate::warn(&format!(
                        "could not list leftovers under {} with the management API: {error:#}",
                        self.prefix
                    ));
                }
            }
            Err(error) => crate::warn(&format!("{error:#}")),
        }
        match PgConnection::connect(&self.admin_url).await {
            Ok(mut admin) => {
                // The name is made here from a UUID, never from input.
                let drop = format!("drop database if exists {} with (force)", self.database);
                if let Err(error) = sqlx::raw_sql(AssertSqlSafe(drop)).execute(&mut admin).await {
                    crate::warn(&format!("could not drop {}: {error}", self.database));
                }
                let _ = admin.close().await;
            }
            Err(error) => crate::warn(&format!("could not drop {}: {error}", self.database)),
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Creates a database from the admin URL and returns its URL.
async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let mut admin = PgConnection::connect(admin_url).await.with_context(|| {
        format!(
            "cannot reach PostgreSQL at {} (run deploy/deps.sh)",
            crate::plan::redact(admin_url)
        )
    })?;
    // The name is made by the caller from a UUID, never from input.
    sqlx::raw_sql(AssertSqlSafe(format!("create database {name}")))
        .execute(&mut admin)
        .await
        .context("cannot create the bench database (the role needs CREATEDB)")?;
    let _ = admin.close().await;
    let mut url = url::Url::parse(admin_url).context("the database URL does not parse")?;
    url.set_path(name);
    Ok(url.to_string())
}

/// PostgreSQL's version, e.g. `15.8 (Debian 15.8-0+deb12u1)`.
pub async fn postgres_version(admin_url: &str) -> anyhow::Result<String> {
    let mut admin = PgConnection::connect(admin_url).await?;
    let (version,): (String,) = sqlx::query_as("show server_version")
        .fetch_one(&mut admin)
        .await?;
    let _ = admin.close().await;
    Ok(version)
}

/// A port that was free a moment ago, for ingress (its configuration needs a fixed port so
/// the bench knows where to post).
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("no free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}
