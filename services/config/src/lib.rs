//! hiway's configuration.
//!
//! One model for the whole config directory ([`Config`]), loaded in layers by [`load`]:
//! the embedded `config/default.toml`, then the file or directory named by `--config`, then
//! `HIWAY_*` environment variables. Everything is validated before any service connects, and
//! every error names the key and, where it can, the file it came from.

mod secret;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use hiway_proto::{ChannelName, ClientName, DestinationName, Names, RouteName};
use serde::Deserialize;

pub use secret::{SecretRef, SecretString};

/// The embedded default configuration, also the reference for every key.
pub const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

/// Environment variables with this prefix override configuration keys.
pub const ENV_PREFIX: &str = "HIWAY_";

/// Top-level sections; only `HIWAY_<SECTION>__…` variables are read as configuration, so
/// unrelated variables such as `HIWAY_TEST_AMQP_URL` never trip the unknown-key check.
const SECTIONS: &[&str] = &[
    "broker",
    "database",
    "ingress",
    "transformer",
    "sender",
    "audit",
    "shutdown",
    "runtime",
    "log",
    "telemetry",
    "clients",
    "channels",
    "destinations",
    "routes",
    "lookups",
];

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read or listed.
    #[error("cannot read configuration at {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file does not parse, a key is unknown, or a value has the wrong type. figment's
    /// message names the key and the file.
    #[error("{0}")]
    Parse(#[from] Box<figment::Error>),
    /// The values parse but do not fit together.
    #[error("configuration is not valid:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// RabbitMQ connection and naming.
    pub broker: BrokerConfig,
    /// PostgreSQL (the audit store).
    pub database: DatabaseConfig,
    /// The webhook listener.
    pub ingress: IngressConfig,
    /// The router.
    pub transformer: TransformerConfig,
    /// The delivery workers.
    pub sender: SenderConfig,
    /// The audit writer.
    pub audit: AuditConfig,
    /// How services stop.
    pub shutdown: ShutdownConfig,
    /// The threads that run a process's work.
    pub runtime: RuntimeConfig,
    /// Logging.
    pub log: LogConfig,
    /// Trace export (OpenTelemetry).
    pub telemetry: TelemetryConfig,
    /// Source systems allowed to post, by name.
    #[serde(default)]
    pub clients: BTreeMap<ClientName, ClientConfig>,
    /// Inbound endpoints, by name.
    #[serde(default)]
    pub channels: BTreeMap<ChannelName, ChannelConfig>,
    /// Systems hiway delivers to, by name.
    #[serde(default)]
    pub destinations: BTreeMap<DestinationName, DestinationConfig>,
    /// Which channels go to which destinations, by name.
    #[serde(default)]
    pub routes: BTreeMap<RouteName, RouteConfig>,
    /// Lookup tables filters and transforms read as `$name`, by name.
    #[serde(default)]
    pub lookups: BTreeMap<String, LookupConfig>,
    /// The directory relative file names (transform files, lookup tables) are read from: the
    /// `--config` directory, or the directory of the `--config` file; the working directory
    /// when there is none.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// Which file each route and lookup table was defined in, for error messages.
    #[serde(skip)]
    sources: BTreeMap<String, String>,
}

/// `[broker]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// AMQP URL; may hold a password, so it is kept as a secret.
    pub url: SecretString,
    /// Prefix of every exchange and queue name.
    pub prefix: String,
    /// Longest wait for a publisher confirm.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Longest wait for a connection and its AMQP handshake.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// First wait before reconnecting.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest wait between reconnection attempts.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Deliveries of one message (without an ack) after which the broker dead-letters it.
    pub delivery_limit: u32,
}

/// `[database]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// PostgreSQL URL; may hold a password.
    pub url: SecretString,
    /// Pool size per process.
    pub max_connections: u32,
}

/// `[ingress]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Retry-After value on 503.
    pub retry_after_seconds: u32,
    /// Whole-request timeout.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The most accepted messages carried in one broker message; 1: each on its own.
    pub batch_max_messages: usize,
    /// The most body bytes in one batch (a batch always takes at least one message).
    pub batch_max_bytes: usize,
    /// Batches awaiting their broker confirms at once.
    pub batches_in_flight: usize,
}

/// `[transformer]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerConfig {
    /// Unacknowledged messages held at once.
    pub prefetch: u16,
    /// How often lookup table files are checked for changes (and re-read when changed).
    #[serde(with = "humantime_serde")]
    pub lookup_reload_interval: Duration,
}

/// `[sender]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderConfig {
    /// Destinations this process serves; empty = all.
    pub destinations: Vec<DestinationName>,
}

/// `[audit]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Events per commit.
    pub batch_size: usize,
    /// Oldest a pending batch may get before it is written.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Unacknowledged audit messages held at once.
    pub prefetch: u16,
    /// How long audit events and settled dead letters are kept; zero keeps them for ever.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the audit service deletes what is older than `retention`.
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
}

/// The shortest `audit.retention` other than zero. A shorter one is more likely a slip
/// ("90m" for "90d") than a wish, and would delete nearly the whole trail.
pub const MIN_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// `[shutdown]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Longest drain after a stop signal.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

/// The most `[runtime] worker_threads` a configuration may ask for.
pub const MAX_WORKER_THREADS: usize = 256;

/// `[runtime]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// tokio worker threads: 1 is tokio's current-thread scheduler, 0 one worker per CPU
    /// core, any other number a multi-threaded scheduler with that many workers.
    pub worker_threads: usize,
}

/// `[log]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// tracing filter directives.
    pub filter: String,
}

/// `[telemetry]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Where spans go, as OTLP over HTTP (protobuf): the collector's base URL, to which
    /// `/v1/traces` is added. `None` (the default, an empty string in a file): no export.
    #[serde(deserialize_with = "empty_is_none")]
    pub otlp_endpoint: Option<url::Url>,
    /// How long finished spans wait to be sent together.
    #[serde(with = "humantime_serde")]
    pub export_interval: Duration,
}

/// An empty string as `None`, so that the default file can spell out an unset URL.
fn empty_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<url::Url>, D::Error> {
    let text = Option::<String>::deserialize(d)?.unwrap_or_default();
    if text.trim().is_empty() {
        return Ok(None);
    }
    url::Url::parse(&text)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a URL: {e}")))
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[clients.<name>]`: a source system's credentials, as SHA-256 hashes (hex).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Hash of the bearer API key.
    pub api_key_sha256: Option<String>,
    /// Hash of the basic-auth password (the user name is the client's name).
    pub password_sha256: Option<String>,
}

/// `[channels.<name>]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Clients allowed to post here.
    pub clients: Vec<ClientName>,
    /// Accepted content types (no parameters).
    #[serde(default = "default_content_types")]
    pub content_types: Vec<String>,
    /// Largest accepted body.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Duplicate detection; off when absent.
    pub idempotency: Option<IdempotencyConfig>,
}

/// `[channels.<name>.idempotency]`: a repeated key within the window gets the first message's
/// id back, and nothing is published again.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a key is remembered.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Where the key is in a JSON body (RFC 6901 pointer, e.g. "/id" for a CommCare form), used
    /// when the request has no `Idempotency-Key` header.
    pub json_pointer: Option<String>,
    /// What to do when the key store (PostgreSQL) cannot be reached.
    #[serde(default)]
    pub on_store_error: OnStoreError,
}

/// What ingress does when it cannot check a key.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Answer 503 with Retry-After: no duplicate can slip through; the source retries.
    #[default]
    Reject,
    /// Accept without checking: nothing waits, but a duplicate may get through.
    Accept,
}

fn default_content_types() -> Vec<String> {
    vec!["application/json".to_owned()]
}

fn default_max_body_bytes() -> usize {
    1024 * 1024
}

impl ChannelConfig {
    /// Whether this channel takes this content type (parameters such as charset ignored).
    pub fn accepts(&self, content_type: &str) -> bool {
        let essence = essence(content_type);
        self.content_types
            .iter()
            .any(|c| c.eq_ignore_ascii_case(essence))
    }
}

/// The media type without parameters: `application/json; charset=utf-8` → `application/json`.
pub fn essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// Whether a content type is JSON (`application/json` or any `*/*+json`).
pub fn is_json(content_type: &str) -> bool {
    let e = essence(content_type).to_ascii_lowercase();
    e == "application/json" || e.ends_with("+json")
}

/// `[destinations.<name>]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// What kind of system it is.
    #[serde(default)]
    pub kind: DestinationKind,
    /// Where requests go.
    pub url: url::Url,
    /// HTTP method.
    #[serde(default = "default_method")]
    pub method: String,
    /// Extra headers on every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// How hiway authenticates to it.
    pub auth: Option<DestinationAuth>,
    /// Whole-request timeout.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Connect timeout.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Requests in flight per sender process.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Unacknowledged messages per sender process; default the larger of 256 and
    /// 4 × concurrency.
    pub prefetch: Option<u16>,
    /// When failed deliveries are tried again.
    #[serde(default)]
    pub retry: RetryConfig,
    /// When a sender stops sending to a destination that keeps failing.
    #[serde(default)]
    pub circuit: CircuitConfig,
    /// HTTP statuses that count as delivered besides 2xx, for a destination whose refusal
    /// means "it is here already" (a 409 for a key it holds). `http` kind only; none of
    /// 408, 425, 429 or 5xx, which ask for another try.
    #[serde(default)]
    pub delivered_statuses: Vec<u16>,
    /// Settings of the `dhis2` kind.
    #[serde(default)]
    pub dhis2: Dhis2Settings,
    /// Settings of the `fhir` kind.
    #[serde(default)]
    pub fhir: FhirSettings,
    /// Settings of the `openmrs` kind.
    #[serde(default)]
    pub openmrs: OpenmrsSettings,
}

/// `[destinations.<name>.dhis2]`: how the `dhis2` kind follows asynchronous imports.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dhis2Settings {
    /// Wait between two polls of an import job.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a job may run before the delivery counts as a retryable failure (re-sending
    /// is safe: data values are upserts, tracker imports use client UIDs).
    #[serde(default = "default_poll_timeout", with = "humantime_serde")]
    pub poll_timeout: Duration,
}

impl Default for Dhis2Settings {
    fn default() -> Self {
        Self {
            poll_interval: default_poll_interval(),
            poll_timeout: default_poll_timeout(),
        }
    }
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_poll_timeout() -> Duration {
    Duration::from_secs(600)
}

/// `[destinations.<name>.fhir]`: how the `fhir` kind treats version conflicts.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirSettings {
    /// A 409 (version conflict) is retried this many times, then the message is dead.
    #[serde(default = "default_conflict_retries")]
    pub conflict_retries: u32,
}

impl Default for FhirSettings {
    fn default() -> Self {
        Self {
            conflict_retries: default_conflict_retries(),
        }
    }
}

fn default_conflict_retries() -> u32 {
    3
}

/// `[destinations.<name>.openmrs]`: how the `openmrs` kind undoes a failed workflow.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenmrsSettings {
    /// Roll back with `?purge=true` (really delete) rather than void/retire.
    #[serde(default = "default_true")]
    pub purge_on_rollback: bool,
}

impl Default for OpenmrsSettings {
    fn default() -> Self {
        Self {
            purge_on_rollback: true,
        }
    }
}

fn default_true() -> bool {
    true
}

/// `[destinations.<name>.circuit]`: the circuit breaker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitConfig {
    /// Consecutive retryable failures after which the sender stops taking this destination's
    /// messages; 0 never stops.
    #[serde(default = "default_circuit_failures")]
    pub failures: u32,
    /// How long it waits before probing with one message.
    #[serde(default = "default_cool_down", with = "humantime_serde")]
    pub cool_down: Duration,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        Self {
            failures: default_circuit_failures(),
            cool_down: default_cool_down(),
        }
    }
}

fn default_circuit_failures() -> u32 {
    5
}

fn default_cool_down() -> Duration {
    Duration::from_secs(30)
}

/// `[destinations.<name>.retry]`: the retry schedule.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Wait before each retry: the first retry waits `schedule[0]`, and so on. A message is
    /// tried at most `schedule.len() + 1` times, then it is dead.
    #[serde(default = "default_schedule", deserialize_with = "durations")]
    pub schedule: Vec<Duration>,
    /// Each wait is shortened by a random fraction up to this, so messages that failed
    /// together do not all come back together.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            schedule: default_schedule(),
            jitter: default_jitter(),
        }
    }
}

impl RetryConfig {
    /// Attempts before a message is dead: the first one and one per step.
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.schedule.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }
}

/// A list of durations written like `["10s", "1m"]`.
fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| {
            humantime::parse_duration(s)
                .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
        })
        .collect()
}

fn default_schedule() -> Vec<Duration> {
    [10, 60, 300, 1800, 7200, 21600]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}

fn default_jitter() -> f64 {
    0.1
}

impl DestinationConfig {
    /// The prefetch in force: the configured one, or the larger of [`MIN_DEFAULT_PREFETCH`]
    /// and four times the concurrency.
    ///
    /// A message is held from its delivery until its ack, and most of that time it is not
    /// talking to the destination: it waits for a request slot, then for the broker to
    /// confirm its outcome (audit event, retry, dead letter), then for its ack to be grouped
    /// with others. The window must cover the rate × that whole time, or the queue grows
    /// while the process idles: with 4 × 16 = 64 the benchmark's sender stalled at about
    /// 2000/s on a fast destination with a fifth of a core in use (docs/benchmarks.md).
    pub fn effective_prefetch(&self) -> u16 {
        self.prefetch.unwrap_or_else(|| {
            u16::try_from(self.concurrency.saturating_mul(4))
                .unwrap_or(u16::MAX)
                .max(MIN_DEFAULT_PREFETCH)
        })
    }
}

/// The smallest default prefetch of a destination, whatever its concurrency: hundreds of
/// messages in hand keep a fast destination busy while outcomes await their confirms.
pub const MIN_DEFAULT_PREFETCH: u16 = 256;

fn default_method() -> String {
    "POST".to_owned()
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_concurrency() -> usize {
    16
}

/// Destination kinds: how a destination's answers are read.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DestinationKind {
    /// Any HTTP endpoint: the status code decides.
    #[default]
    Http,
    /// DHIS2: the import summary in the body decides too (DHIS2 before 2.38 answers 200 even
    /// when it rejected values); asynchronous imports are followed to their real outcome.
    Dhis2,
    /// A FHIR server: transaction bundles posted to the base URL, OperationOutcomes read.
    Fhir,
    /// OpenMRS REST: a patient/visit/encounter/observations workflow, rolled back on failure.
    Openmrs,
}

/// How hiway authenticates to a destination.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum DestinationAuth {
    /// `Authorization: Basic …`
    Basic {
        /// User name.
        username: String,
        /// Password reference.
        password: SecretRef,
    },
    /// `Authorization: Bearer …`
    Bearer {
        /// Token reference.
        token: SecretRef,
    },
    /// `Authorization: ApiToken …`: a DHIS2 personal access token (`d2pat_…`).
    #[serde(rename = "api-token")]
    ApiToken {
        /// Token reference.
        token: SecretRef,
    },
    /// Primero v2: the sender logs in with a user name and password (`POST /api/v2/tokens`),
    /// sends the JWT it gets as `Authorization: Bearer …`, logs in again before the token is
    /// `refresh_after` old (Primero's JWTs expire after 60 minutes), and once more when the
    /// destination answers 401.
    Primero {
        /// The Primero user hiway acts as.
        username: String,
        /// Its password reference.
        password: SecretRef,
        /// Where to log in. Default: `/api/v2/tokens` on the destination URL's host.
        token_url: Option<url::Url>,
        /// Age at which a token is replaced before it is used again.
        #[serde(with = "humantime_serde", default = "default_primero_refresh")]
        refresh_after: Duration,
    },
}

fn default_primero_refresh() -> Duration {
    Duration::from_secs(50 * 60)
}

impl DestinationAuth {
    /// The secret this authentication reads, and the key it is under.
    pub fn secret(&self) -> (&'static str, &SecretRef) {
        match self {
            DestinationAuth::Basic { password, .. } | DestinationAuth::Primero { password, .. } => {
                ("password", password)
            }
            DestinationAuth::Bearer { token } | DestinationAuth::ApiToken { token } => {
                ("token", token)
            }
        }
    }
}

/// `[routes.<name>]`: from these channels to these destinations.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Channels whose messages this route takes.
    #[serde(default)]
    pub channels: Vec<ChannelName>,
    /// Instead of channels: dead letters of these destinations (an on-failure route).
    #[serde(default)]
    pub on_dead: Vec<DestinationName>,
    /// Destinations each message goes to.
    pub destinations: Vec<DestinationName>,
    /// A jq filter: the message takes this route only when its first output is true.
    pub filter: Option<String>,
    /// A jq program whose outputs (zero, one or many) are sent instead of the message.
    pub transform: Option<String>,
    /// The same, read from a file (relative to the configuration directory).
    pub transform_file: Option<PathBuf>,
    /// What the transform's outputs are: request bodies, or requests with a path and method.
    #[serde(default)]
    pub emits: Emits,
}

/// What a route's transform emits.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Emits {
    /// Each output is a request body (JSON).
    #[default]
    Body,
    /// Each output is `{"body": …, "path": "…"?, "method": "…"?}`: the path is appended to the
    /// destination's URL and the method replaces its method.
    Requests,
}

/// `[lookups.<name>]`: a table filters and transforms read as `$<name>`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupConfig {
    /// A `.csv` or `.json` file, relative to the configuration directory.
    pub file: PathBuf,
    /// CSV only: the column whose values are the keys.
    pub key: Option<String>,
    /// CSV only: the column whose values are the values; without it each key maps to its
    /// whole row as an object.
    pub value: Option<String>,
}

impl RouteConfig {
    /// The transform's source text and where it came from, reading `transform_file`.
    pub fn transform_source(&self, base_dir: &Path) -> Option<Result<(String, String), String>> {
        if let Some(t) = &self.transform {
            return Some(Ok((t.clone(), "transform".into())));
        }
        self.transform_file.as_ref().map(|f| {
            let path = base_dir.join(f);
            std::fs::read_to_string(&path)
                .map(|t| (t, path.display().to_string()))
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
        })
    }
}

impl LookupConfig {
    /// Where the table's file is.
    pub fn path(&self, base_dir: &Path) -> PathBuf {
        base_dir.join(&self.file)
    }
}

impl Config {
    /// Exchange and queue names of this installation.
    pub fn names(&self) -> Names {
        Names::new(self.broker.prefix.clone())
    }

    /// The file a route (`routes.<name>`) or lookup table (`lookups.<name>`) was defined in,
    /// when it came from a file.
    pub fn source_of(&self, key: &str) -> Option<&str> {
        self.sources.get(key).map(String::as_str)
    }

    /// Every configured destination, for declaring the topology.
    pub fn destination_names(&self) -> Vec<DestinationName> {
        self.destinations.keys().cloned().collect()
    }

    /// The configuration built from the defaults and one TOML text, without the environment
    /// layer: for tests and tools that hold a configuration in memory.
    pub fn from_toml(toml: &str) -> Result<Self, ConfigError> {
        let figment = Figment::from(Toml::string(DEFAULT_TOML)).merge(Toml::string(toml));
        extract(figment, PathBuf::new())
    }

    fn validate(&self, figment: &Figment) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut err = |key: String, msg: String| {
            let source = figment
                .find_metadata(key.split('[').next().unwrap_or(&key))
                .and_then(|m| m.source.as_ref())
                .map(|s| format!(" (in {s})"))
                .unwrap_or_default();
            errors.push(format!("{key}: {msg}{source}"));
        };

        if self.broker.prefix.is_empty()
            || !self
                .broker
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            err(
                "broker.prefix".into(),
                format!(
                    "{:?} must be non-empty letters, digits, '-', '_' or '.'",
                    self.broker.prefix
                ),
            );
        }
        if let Err(e) = url::Url::parse(self.broker.url.expose()) {
            err("broker.url".into(), format!("is not a URL: {e}"));
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint
            && !matches!(endpoint.scheme(), "http" | "https")
        {
            err(
                "telemetry.otlp_endpoint".into(),
                format!("{endpoint} must be an http or https URL (OTLP over HTTP)"),
            );
        }
        for (key, d) in [
            ("broker.publish_timeout", self.broker.publish_timeout),
            ("broker.connect_timeout", self.broker.connect_timeout),
            ("broker.reconnect_min", self.broker.reconnect_min),
            ("ingress.request_timeout", self.ingress.request_timeout),
            (
                "transformer.lookup_reload_interval",
                self.transformer.lookup_reload_interval,
            ),
            ("audit.flush_interval", self.audit.flush_interval),
            ("audit.prune_interval", self.audit.prune_interval),
            ("telemetry.export_interval", self.telemetry.export_interval),
        ] {
            if d.is_zero() {
                err(key.into(), "must be longer than zero".into());
            }
        }
        if !self.audit.retention.is_zero() && self.audit.retention < MIN_RETENTION {
            err(
                "audit.retention".into(),
                format!(
                    "{} would delete nearly the whole trail; use at least 1d, or 0s to keep it for ever",
                    humantime::format_duration(self.audit.retention)
                ),
            );
        }
        if self.broker.reconnect_max < self.broker.reconnect_min {
            err(
                "broker.reconnect_max".into(),
                "must not be shorter than reconnect_min".into(),
            );
        }
        for (key, v) in [
            (
                "transformer.prefetch",
                usize::from(self.transformer.prefetch),
            ),
            ("audit.prefetch", usize::from(self.audit.prefetch)),
            ("audit.batch_size", self.audit.batch_size),
            (
                "ingress.batch_max_messages",
                self.ingress.batch_max_messages,
            ),
            ("ingress.batch_max_bytes", self.ingress.batch_max_bytes),
            ("ingress.batches_in_flight", self.ingress.batches_in_flight),
            (
                "database.max_connections",
                self.database.max_connections as usize,
            ),
        ] {
            if v == 0 {
                err(key.into(), "must be at least 1".into());
            }
        }

        // One process is meant to use a few cores at most (scale out with more processes); a
        // number this large is a typo, and tokio would try to start every one of its threads.
        if self.runtime.worker_threads > MAX_WORKER_THREADS {
            err(
                "runtime.worker_threads".into(),
                format!(
                    "{} is more than {MAX_WORKER_THREADS}; use 0 for one per CPU core, or run more processes",
                    self.runtime.worker_threads
                ),
            );
        }

        for (name, client) in &self.clients {
            if client.api_key_sha256.is_none() && client.password_sha256.is_none() {
                err(
                    format!("clients.{name}"),
                    "has neither api_key_sha256 nor password_sha256, so it could never authenticate"
                        .into(),
                );
            }
            for (field, value) in [
                ("api_key_sha256", &client.api_key_sha256),
                ("password_sha256", &client.password_sha256),
            ] {
                if let Some(v) = value
                    && (v.len() != 64 || hex::decode(v).is_err())
                {
                    err(
                        format!("clients.{name}.{field}"),
                        "must be a SHA-256 hash: 64 hex digits (make one with `hiway client new`)"
                            .into(),
                    );
                }
            }
        }

        for (name, channel) in &self.channels {
            for (i, client) in channel.clients.iter().enumerate() {
                if !self.clients.contains_key(client) {
                    err(
                        format!("channels.{name}.clients[{i}]"),
                        format!("unknown client \"{client}\""),
                    );
                }
            }
            if channel.content_types.is_empty() {
                err(
                    format!("channels.{name}.content_types"),
                    "must name at least one".into(),
                );
            }
            if let Some(i) = &channel.idempotency {
                if i.window.is_zero() {
                    err(
                        format!("channels.{name}.idempotency.window"),
                        "must be longer than zero".into(),
                    );
                }
                if let Some(p) = &i.json_pointer
                    && !p.starts_with('/')
                {
                    err(
                        format!("channels.{name}.idempotency.json_pointer"),
                        format!("{p:?} is not a JSON pointer: it starts with '/', e.g. \"/id\""),
                    );
                }
            }
            if channel.max_body_bytes == 0 {
                err(
                    format!("channels.{name}.max_body_bytes"),
                    "must be at least 1".into(),
                );
            }
        }

        for (name, d) in &self.destinations {
            if !matches!(d.url.scheme(), "http" | "https") {
                err(
                    format!("destinations.{name}.url"),
                    "must be an http or https URL".into(),
                );
            }
            if method_with_body(&d.method).is_none() {
                err(
                    format!("destinations.{name}.method"),
                    format!("{:?} is not an HTTP method", d.method),
                );
            }
            if d.concurrency == 0 {
                err(
                    format!("destinations.{name}.concurrency"),
                    "must be at least 1".into(),
                );
            }
            if d.prefetch == Some(0) {
                err(
                    format!("destinations.{name}.prefetch"),
                    "must be at least 1".into(),
                );
            }
            if d.retry.schedule.iter().any(|w| w.as_millis() < 1) {
                err(
                    format!("destinations.{name}.retry.schedule"),
                    "every wait must be at least 1ms".into(),
                );
            }
            if !(0.0..1.0).contains(&d.retry.jitter) {
                err(
                    format!("destinations.{name}.retry.jitter"),
                    "must be at least 0 and below 1".into(),
                );
            }
            if d.circuit.cool_down.is_zero() {
                err(
                    format!("destinations.{name}.circuit.cool_down"),
                    "must be longer than zero".into(),
                );
            }
            for (i, &code) in d.delivered_statuses.iter().enumerate() {
                let key = format!("destinations.{name}.delivered_statuses[{i}]");
                if !(100..=599).contains(&code) {
                    err(key, format!("{code} is not an HTTP status (100 to 599)"));
                } else if matches!(code, 408 | 425 | 429 | 500..=599) {
                    // Such an answer says the request was not handled (yet): counting it as
                    // delivered would lose the message while the destination is down.
                    err(
                        key,
                        format!(
                            "{code} asks for another try (a server error, or 408, 425, 429), so it never means the message arrived"
                        ),
                    );
                }
            }
            if !d.delivered_statuses.is_empty() && d.kind != DestinationKind::Http {
                // The other kinds read their systems' own bodies, where a 409 has meanings of
                // its own (DHIS2 conflicts, FHIR version conflicts) or a status belongs to one
                // step of several (OpenMRS): ignoring the list silently would mislead.
                err(
                    format!("destinations.{name}.delivered_statuses"),
                    "only kind = \"http\" reads it; this destination's kind reads its system's own answers (docs/kinds/)".into(),
                );
            }
            if d.timeout.is_zero() || d.connect_timeout.is_zero() {
                err(
                    format!("destinations.{name}.timeout"),
                    "timeouts must be longer than zero".into(),
                );
            }
            for header in d.headers.keys() {
                if header.is_empty() || !header.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                    err(
                        format!("destinations.{name}.headers"),
                        format!("{header:?} is not a header name"),
                    );
                }
            }
            if let Some(auth) = &d.auth {
                // Both would go out: two Authorization headers, which servers read differently.
                if let Some(header) = d
                    .headers
                    .keys()
                    .find(|h| h.eq_ignore_ascii_case("authorization"))
                {
                    err(
                        format!("destinations.{name}.headers"),
                        format!("{header:?} and auth both set the Authorization header: keep one"),
                    );
                }
                let (key, secret) = auth.secret();
                if let Err(e) = secret.resolve() {
                    err(format!("destinations.{name}.auth.{key}"), e);
                }
                if let DestinationAuth::Primero {
                    token_url,
                    refresh_after,
                    ..
                } = auth
                {
                    if refresh_after.is_zero() {
                        err(
                            format!("destinations.{name}.auth.refresh_after"),
                            "must be longer than zero".into(),
                        );
                    }
                    if let Some(u) = token_url
                        && !matches!(u.scheme(), "http" | "https")
                    {
                        err(
                            format!("destinations.{name}.auth.token_url"),
                            format!("{u} is not an http(s) URL"),
                        );
                    }
                }
            }
        }

        for (name, route) in &self.routes {
            match (route.channels.is_empty(), route.on_dead.is_empty()) {
                (true, true) => err(
                    format!("routes.{name}.channels"),
                    "must name at least one channel (or on_dead: destinations whose dead letters the route takes)".into(),
                ),
                (false, false) => err(
                    format!("routes.{name}.on_dead"),
                    "a route takes either channels or dead letters (on_dead), not both".into(),
                ),
                _ => {}
            }
            for (i, d) in route.on_dead.iter().enumerate() {
                if !self.destinations.contains_key(d) {
                    err(
                        format!("routes.{name}.on_dead[{i}]"),
                        format!("unknown destination \"{d}\""),
                    );
                }
            }
            if route.transform.is_some() && route.transform_file.is_some() {
                err(
                    format!("routes.{name}.transform_file"),
                    "give transform or transform_file, not both".into(),
                );
            }
            if route.emits == Emits::Requests
                && route.transform.is_none()
                && route.transform_file.is_none()
            {
                err(
                    format!("routes.{name}.emits"),
                    "\"requests\" needs a transform that makes them".into(),
                );
            }
            // Whether a transform file reads (and compiles) is checked with the programs, by
            // `hiway_transform::Transforms::compile`, so every program error shows at once.
            if route.destinations.is_empty() {
                err(
                    format!("routes.{name}.destinations"),
                    "must name at least one destination".into(),
                );
            }
            for (i, c) in route.channels.iter().enumerate() {
                if !self.channels.contains_key(c) {
                    err(
                        format!("routes.{name}.channels[{i}]"),
                        format!("unknown channel \"{c}\""),
                    );
                }
            }
            for (i, d) in route.destinations.iter().enumerate() {
                if !self.destinations.contains_key(d) {
                    err(
                        format!("routes.{name}.destinations[{i}]"),
                        format!("unknown destination \"{d}\""),
                    );
                }
            }
        }
        for (name, lookup) in &self.lookups {
            if !name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                err(
                    format!("lookups.{name}"),
                    "a lookup's name is a jq variable name: letters, digits and '_', not starting with a digit".into(),
                );
            }
            let path = lookup.path(&self.base_dir);
            match path.extension().and_then(|e| e.to_str()) {
                Some("csv") => {
                    if lookup.key.is_none() {
                        err(
                            format!("lookups.{name}.key"),
                            "a CSV table needs the column its keys are in".into(),
                        );
                    }
                }
                Some("json") => {
                    if lookup.key.is_some() || lookup.value.is_some() {
                        err(
                            format!("lookups.{name}.key"),
                            "key and value are for CSV tables; a JSON file is used as it is".into(),
                        );
                    }
                }
                _ => err(
                    format!("lookups.{name}.file"),
                    format!("{} is neither .csv nor .json", path.display()),
                ),
            }
            if !path.is_file() {
                err(
                    format!("lookups.{name}.file"),
                    format!("{} does not exist or is not a file", path.display()),
                );
            }
        }
        for (i, d) in self.sender.destinations.iter().enumerate() {
            if !self.destinations.contains_key(d) {
                err(
                    format!("sender.destinations[{i}]"),
                    format!("unknown destination \"{d}\""),
                );
            }
        }

        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }
}

/// Messages are sent as request bodies, so only methods that carry one make sense.
fn method_with_body(method: &str) -> Option<()> {
    matches!(method, "POST" | "PUT" | "PATCH").then_some(())
}

/// Loads the configuration: defaults, then `path` (a file, or a directory of `*.toml` files
/// read in name order), then `HIWAY_*` environment variables; then validates it.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    let base_dir = match path {
        Some(p) if p.is_dir() => p.to_owned(),
        Some(p) => p.parent().map(Path::to_owned).unwrap_or_default(),
        None => PathBuf::new(),
    };
    let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
    if let Some(path) = path {
        for file in config_files(path)? {
            figment = figment.merge(Toml::file_exact(file));
        }
    }
    figment = figment.merge(
        Env::prefixed(ENV_PREFIX)
            .split("__")
            // Keys are not lowercased yet when the filter sees them.
            .filter(|key| {
                let section = key.as_str().split('.').next().unwrap_or("");
                SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(section))
            }),
    );
    extract(figment, base_dir)
}

fn extract(figment: Figment, base_dir: PathBuf) -> Result<Config, ConfigError> {
    let mut config: Config = figment.extract().map_err(Box::new)?;
    config.base_dir = base_dir;
    let keys: Vec<String> = config
        .routes
        .keys()
        .map(|r| format!("routes.{r}"))
        .chain(config.lookups.keys().map(|l| format!("lookups.{l}")))
        .collect();
    for key in keys {
        if let Some(source) = figment.find_metadata(&key).and_then(|m| m.source.as_ref()) {
            config.sources.insert(key, source.to_string());
        }
    }
    config.validate(&figment)?;
    Ok(config)
}

/// The files `--config PATH` names: PATH itself, or the `*.toml` files in it, sorted.
fn config_files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let io = |source| ConfigError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.extension().is_some_and(|e| e == "toml") && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// A lookup from credential hash to client, built once at start-up for ingress.
pub fn api_key_index(config: &Config) -> HashMap<String, ClientName> {
    config
        .clients
        .iter()
        .filter_map(|(name, c)| {
            c.api_key_sha256
                .as_ref()
                .map(|h| (h.to_ascii_lowercase(), name.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests;
