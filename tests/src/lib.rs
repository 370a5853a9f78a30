//! The end-to-end test harness: real hiway services against a real RabbitMQ and PostgreSQL.
//!
//! Each [`TestHiway`] gets its own name prefix on the broker (so tests running in parallel
//! never see each other's queues) and its own database; both are removed by
//! [`TestHiway::shutdown`]. Destinations are [`Receiver`]s: HTTP doubles on port 0 that record
//! every request and answer what the test scripts.
//!
//! The broker and database come from `HIWAY_TEST_AMQP_URL` and `HIWAY_TEST_DATABASE_URL`
//! (defaults: the ones `deploy/deps.sh` sets up). A missing one fails the test; it is never
//! skipped.

pub mod doubles;
pub mod fhir_validator;
pub mod pg_node;
pub mod rabbit_node;
mod receiver;

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use hiway_audit::TrailEntry;
use hiway_config::Config;
use hiway_proto::{MessageId, Names};
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use sqlx::{AssertSqlSafe, Connection as _, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use receiver::{Received, Receiver};

/// The bearer key of the client `source`, allowed on every channel the tests make.
pub const SOURCE_KEY: &str = "source-key";
/// The basic-auth password of the client `source`.
pub const SOURCE_PASSWORD: &str = "source-password";
/// The bearer key of the client `other`, which tests leave off channels to get a 403.
pub const OTHER_KEY: &str = "other-key";

/// The broker tests use.
pub fn amqp_url() -> String {
    std::env::var("HIWAY_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The database tests create their own databases from.
pub fn database_url() -> String {
    std::env::var("HIWAY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://hiway:hiway@127.0.0.1:5432/hiway".into())
}

/// Which services a test runs in-process.
#[derive(Clone, Copy, Debug)]
pub struct Services {
    /// The webhook endpoint.
    pub ingress: bool,
    /// The router.
    pub transformer: bool,
    /// The delivery workers.
    pub sender: bool,
    /// The audit writer.
    pub audit: bool,
}

impl Services {
    /// Every service.
    pub const ALL: Self = Self {
        ingress: true,
        transformer: true,
        sender: true,
        audit: true,
    };
}

fn sha256(s: &str) -> String {
    hiway_ingress::auth::hash_secret(s)
}

/// A running hiway for one test.
pub struct TestHiway {
    /// The configuration every service of this test runs with.
    pub config: Config,
    /// The directory holding that configuration as a file, for service processes.
    pub config_dir: tempfile::TempDir,
    /// Base URL of ingress, when it runs.
    pub ingress_url: String,
    /// The test's own database.
    pub pool: PgPool,
    /// An HTTP client for talking to ingress.
    pub http: reqwest::Client,
    database: String,
    database_admin_url: String,
    services: Vec<(&'static str, CancellationToken, JoinHandle<()>)>,
    processes: Vec<Child>,
    /// Taken by `shutdown`, or by `drop` when a test failed before it.
    leftovers: Option<Leftovers>,
}

impl TestHiway {
    /// Starts every service with these named entries (channels, destinations, routes; the
    /// clients `source` and `other` are always there).
    pub async fn spawn(entries: &str) -> Self {
        Self::spawn_with(entries, Services::ALL).await
    }

    /// Starts the chosen services.
    pub async fn spawn_with(entries: &str, services: Services) -> Self {
        Self::spawn_on(&amqp_url(), entries, services).await
    }

    /// Starts the chosen services against the broker at `amqp_url`.
    pub async fn spawn_on(amqp_url: &str, entries: &str, services: Services) -> Self {
        Self::spawn_full(amqp_url, &database_url(), "", entries, services).await
    }

    /// Starts the chosen services with extra `[broker]` settings (TOML lines).
    pub async fn spawn_with_broker_settings(
        broker_settings: &str,
        entries: &str,
        services: Services,
    ) -> Self {
        Self::spawn_full(
            &amqp_url(),
            &database_url(),
            broker_settings,
            entries,
            services,
        )
        .await
    }

    /// Starts the chosen services with a database made on the server at `database_admin_url`.
    pub async fn spawn_on_database(
        database_admin_url: &str,
        entries: &str,
        services: Services,
    ) -> Self {
        Self::spawn_full(&amqp_url(), database_admin_url, "", entries, services).await
    }

    /// Starts every service with an example configuration directory (`config/examples/…`):
    /// its files are copied, and `overrides` (TOML: destination URLs pointing at doubles,
    /// client key hashes) is laid over them with the test's broker and database settings.
    pub async fn spawn_example(example: &std::path::Path, overrides: &str) -> Self {
        Self::spawn_any(
            &amqp_url(),
            &database_url(),
            "",
            Entries::Example(example, overrides),
            Services::ALL,
        )
        .await
    }

    async fn spawn_full(
        amqp_url: &str,
        database_admin_url: &str,
        broker_settings: &str,
        entries: &str,
        services: Services,
    ) -> Self {
        Self::spawn_any(
            amqp_url,
            database_admin_url,
            broker_settings,
            Entries::Inline(entries),
            services,
        )
        .await
    }

    async fn spawn_any(
        amqp_url: &str,
        database_admin_url: &str,
        broker_settings: &str,
        entries: Entries<'_>,
        services: Services,
    ) -> Self {
        init_logging();
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let prefix = format!("t{}", &suffix[suffix.len() - 12..]);
        let database = format!("hiway_{prefix}");
        let database_url = create_database(database_admin_url, &database).await;
        let toml = format!(
            r#"
[broker]
url = "{amqp_url}"
prefix = "{prefix}"
publish_timeout = "5s"
reconnect_max = "1s"
{broker_settings}

[database]
url = "{database_url}"
max_connections = 3

[ingress]
listen = "127.0.0.1:0"
retry_after_seconds = 2

[audit]
flush_interval = "50ms"

[shutdown]
drain_timeout = "5s"

[transformer]
lookup_reload_interval = "200ms"
"#
        );
        let config_dir = tempfile::tempdir().expect("temp dir");
        let config = match entries {
            Entries::Inline(entries) => {
                let toml = format!(
                    r#"{toml}
[clients.source]
api_key_sha256 = "{}"
password_sha256 = "{}"

[clients.other]
api_key_sha256 = "{}"

{entries}
"#,
                    sha256(SOURCE_KEY),
                    sha256(SOURCE_PASSWORD),
                    sha256(OTHER_KEY),
                );
                std::fs::write(config_dir.path().join("hiway.toml"), &toml).expect("write config");
                Config::from_toml(&toml).unwrap_or_else(|e| panic!("test configuration: {e}"))
            }
            Entries::Example(example, overrides) => {
                copy_dir(example, config_dir.path());
                std::fs::write(
                    config_dir.path().join("zz-test.toml"),
                    format!("{toml}\n{overrides}\n"),
                )
                .expect("write config");
                hiway_config::load(Some(config_dir.path()))
                    .unwrap_or_else(|e| panic!("example configuration: {e}"))
            }
        };

        let pool = PgPool::connect(&database_url)
            .await
            .expect("connect to the test database");
        hiway_audit::MIGRATOR
            .run(&pool)
            .await
            .expect("migrate the test database");

        let mut this = Self {
            config,
            config_dir,
            ingress_url: String::new(),
            pool,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            database,
            database_admin_url: database_admin_url.to_owned(),
            services: Vec::new(),
            processes: Vec::new(),
            leftovers: None,
        };
        this.leftovers = Some(Leftovers::of(
            &this.config,
            &this.database,
            &this.database_admin_url,
        ));
        if services.audit {
            let audit = hiway_audit::build(&this.config).await.expect("build audit");
            this.start("audit", |stop| async move {
                audit.run(stop).await.expect("audit run")
            });
        }
        if services.transformer {
            let t = hiway_transformer::build(&this.config)
                .await
                .expect("build transformer");
            this.start("transformer", |stop| async move {
                t.run(stop).await.expect("transformer run")
            });
        }
        if services.sender {
            let s = hiway_sender::build(&this.config)
                .await
                .expect("build sender");
            this.start("sender", |stop| async move {
                s.run(stop).await.expect("sender run")
            });
        }
        if services.ingress {
            let ingress = hiway_ingress::build(&this.config)
                .await
                .expect("build ingress");
            this.ingress_url = format!("http://{}", ingress.local_addr());
            this.start("ingress", |stop| async move {
                ingress.run(stop).await.expect("ingress run")
            });
            let ready = format!("{}/readyz", this.ingress_url);
            let http = this.http.clone();
            eventually("ingress to be ready", Duration::from_secs(10), || {
                let (http, ready) = (http.clone(), ready.clone());
                async move {
                    http.get(&ready)
                        .send()
                        .await
                        .ok()
                        .filter(|r| r.status() == 200)
                }
            })
            .await;
        }
        this
    }

    fn start<F, Fut>(&mut self, name: &'static str, run: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(run(stop.clone()));
        self.services.push((name, stop, handle));
    }

    /// Stops one in-process service and waits for it to drain.
    pub async fn stop_service(&mut self, name: &str) {
        let i = self
            .services
            .iter()
            .position(|(n, ..)| *n == name)
            .expect("no such service");
        let (_, stop, handle) = self.services.remove(i);
        stop.cancel();
        handle.await.expect("service task panicked");
    }

    /// Starts an in-process sender again (after [`TestHiway::stop_service`]).
    pub async fn start_sender(&mut self) {
        let s = hiway_sender::build(&self.config)
            .await
            .expect("build sender");
        self.start("sender", |stop| async move {
            s.run(stop).await.expect("sender run")
        });
    }

    /// The installation's queue and exchange names.
    pub fn names(&self) -> Names {
        self.config.names()
    }

    /// The directory the running configuration was written to (lookup tables live there in
    /// example configurations).
    pub fn config_path(&self) -> &std::path::Path {
        self.config_dir.path()
    }

    /// A POST to a channel, authenticated as `source`, not yet sent.
    pub fn request(&self, channel: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!(
                "{}/v1/channels/{channel}/messages",
                self.ingress_url
            ))
            .bearer_auth(SOURCE_KEY)
    }

    /// Posts a JSON document as `source` and returns the accepted message's id; panics with
    /// the answer if it was not 202.
    pub async fn post_json(&self, channel: &str, body: &serde_json::Value) -> MessageId {
        let response = self
            .request(channel)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).expect("json"))
            .send()
            .await
            .expect("post to ingress");
        let status = response.status();
        let answer: serde_json::Value = response.json().await.expect("json answer");
        assert_eq!(status, 202, "ingress answered {status}: {answer}");
        answer["id"]
            .as_str()
            .expect("id in answer")
            .parse()
            .expect("id is a message id")
    }

    /// Every audit event of a message so far.
    pub async fn trail(&self, id: MessageId) -> Vec<TrailEntry> {
        hiway_audit::trail(&self.pool, id)
            .await
            .expect("read the trail")
    }

    /// Waits until the trail of `id` holds at least these kinds (in any order, with
    /// repeats counted), and returns it.
    pub async fn wait_for_trail(&self, id: MessageId, kinds: &[&str]) -> Vec<TrailEntry> {
        eventually(
            &format!("trail of {id} to hold {kinds:?}"),
            Duration::from_secs(20),
            || async move {
                let trail = self.trail(id).await;
                let have: Vec<&str> = trail.iter().map(|e| e.kind.as_str()).collect();
                let mut missing = have.clone();
                let complete = kinds
                    .iter()
                    .all(|k| match missing.iter().position(|h| h == k) {
                        Some(i) => {
                            missing.remove(i);
                            true
                        }
                        None => false,
                    });
                complete.then_some(trail)
            },
        )
        .await
    }

    /// Messages ready in a queue (not counting those delivered and unacked).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let connection =
            lapin::Connection::connect(self.config.broker.url.expose(), Default::default())
                .await
                .expect("connect to the broker");
        let channel = connection.create_channel().await.expect("channel");
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue exists");
        let _ = connection.close(200, "".into()).await;
        q.message_count()
    }

    /// Starts a `hiway-sender` process on this test's configuration, with extra environment
    /// (configuration overrides such as `HIWAY_DESTINATIONS__SINK__HEADERS__X_SENDER=a`).
    pub fn spawn_sender_process(&mut self, env: &[(&str, &str)]) -> usize {
        self.spawn_process("hiway-sender", env)
    }

    /// Starts the service binary `name` (`hiway-ingress`, …) on this test's configuration,
    /// with extra environment; returns its index for [`Self::kill_process`] and
    /// [`Self::terminate_process`].
    pub fn spawn_process(&mut self, name: &str, env: &[(&str, &str)]) -> usize {
        self.spawn_process_to(name, env, Stdio::inherit())
    }

    /// Starts the service binary `name` as [`Self::spawn_process`] does, with its logs
    /// (standard error) on a pipe, as a log collector would read them; returns its index and
    /// that pipe.
    pub fn spawn_process_with_logs(
        &mut self,
        name: &str,
        env: &[(&str, &str)],
    ) -> (usize, std::process::ChildStderr) {
        let index = self.spawn_process_to(name, env, Stdio::piped());
        let logs = self.processes[index]
            .stderr
            .take()
            .expect("the process's standard error is piped");
        (index, logs)
    }

    fn spawn_process_to(&mut self, name: &str, env: &[(&str, &str)], logs: Stdio) -> usize {
        let mut command = Command::new(binary(name));
        command
            .arg("--config")
            .arg(self.config_dir.path())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(logs);
        for (k, v) in env {
            command.env(k, v);
        }
        self.processes.push(
            command
                .spawn()
                .unwrap_or_else(|e| panic!("start {name}: {e}")),
        );
        self.processes.len() - 1
    }

    /// Runs the `hiway` command on this test's configuration and returns its output; panics
    /// with what it printed if it failed.
    pub async fn hiway(&self, args: &[&str]) -> String {
        let dir = self.config_dir.path().to_owned();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let output = tokio::task::spawn_blocking(move || {
            Command::new(binary("hiway"))
                .args(&args)
                .arg("--config")
                .arg(dir)
                .output()
        })
        .await
        .expect("join")
        .expect("run hiway");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "hiway failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// Dead letters stored so far, by state.
    pub async fn dead_letters(&self, state: &str) -> Vec<hiway_audit::dlq::DeadLetterRow> {
        let selection = hiway_audit::dlq::Selection {
            state: Some(state.to_owned()),
            ..Default::default()
        };
        hiway_audit::dlq::select(&self.pool, &selection)
            .await
            .expect("select dead letters")
    }

    /// SIGKILLs a process started by this harness: no drain, no goodbye.
    pub fn kill_process(&mut self, index: usize) {
        let child = &mut self.processes[index];
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// Sends SIGTERM to a process started by this harness and waits for it to exit.
    pub fn terminate_process(&mut self, index: usize) -> std::process::ExitStatus {
        let child = &mut self.processes[index];
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        child.wait().expect("wait for the process")
    }

    /// Stops everything, deletes this test's queues and exchanges, and drops its database.
    pub async fn shutdown(mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.processes.clear();
        for (_, stop, _) in &self.services {
            stop.cancel();
        }
        for (name, _, handle) in self.services.drain(..) {
            if tokio::time::timeout(Duration::from_secs(15), handle)
                .await
                .is_err()
            {
                panic!("service {name} did not stop within 15 s");
            }
        }
        self.pool.close().await;
        if let Some(leftovers) = self.leftovers.take() {
            leftovers.remove().await;
        }
    }
}

/// Publishes straight to an exchange of the test broker with the tests' own client, as
/// another tool (or the broker itself) would, bypassing hiway's checks, and waits for the
/// broker's confirm.
pub async fn publish_raw(
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) {
    let connection = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .expect("connect to the broker");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            Default::default(),
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let _ = connection.close(200, "published".into()).await;
}

/// Deletes a test's queues and exchanges from the shared broker, ignoring any already gone.
pub async fn delete_queues_and_exchanges(
    channel: &lapin::Channel,
    queues: &[String],
    exchanges: &[String],
) {
    for q in queues {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for e in exchanges {
        let _ = channel
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// What a test leaves on the shared broker and database server.
struct Leftovers {
    amqp_url: String,
    queues: Vec<String>,
    exchanges: Vec<String>,
    database: String,
    database_admin_url: String,
}

impl Leftovers {
    fn of(config: &Config, database: &str, database_admin_url: &str) -> Self {
        let names = config.names();
        let mut queues = names.all_queues(config.destinations.keys());
        for (name, d) in &config.destinations {
            queues.extend(
                d.retry
                    .schedule
                    .iter()
                    .map(|delay| names.retry_queue(name, *delay)),
            );
        }
        Self {
            amqp_url: config.broker.url.expose().to_owned(),
            queues,
            exchanges: vec![
                names.ingress_exchange(),
                names.deliver_exchange(),
                names.retry_exchange(),
                names.dead_exchange(),
                names.audit_exchange(),
            ],
            database: database.to_owned(),
            database_admin_url: database_admin_url.to_owned(),
        }
    }

    /// Deletes the queues and exchanges and drops the database.
    async fn remove(self) {
        if let Ok(connection) = lapin::Connection::connect(&self.amqp_url, Default::default()).await
            && let Ok(channel) = connection.create_channel().await
        {
            delete_queues_and_exchanges(&channel, &self.queues, &self.exchanges).await;
            let _ = channel.close(200, "".into()).await;
            let _ = connection.close(200, "".into()).await;
        }
        if let Ok(mut admin) = PgConnection::connect(&self.database_admin_url).await {
            // The name is made by this harness from a UUID, never from input.
            let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                "drop database if exists {} with (force)",
                self.database
            )))
            .execute(&mut admin)
            .await;
        }
    }
}

/// A test that panics never reaches [`TestHiway::shutdown`]; its service processes must not
/// outlive it (they would keep consuming, and keep the test runner's output open).
///
/// Nor may its queues and database: on a shared broker, quorum queues left by failed runs
/// pile up (each is a Raft group) until the broker struggles. The cleanup runs on a thread of
/// its own, since the test's runtime may be unwinding.
impl Drop for TestHiway {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        let Some(leftovers) = self.leftovers.take() else {
            return;
        };
        for (_, stop, _) in &self.services {
            stop.cancel();
        }
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(leftovers.remove());
            }
        })
        .join();
    }
}

async fn create_database(admin_url: &str, name: &str) -> String {
    let mut admin = PgConnection::connect(admin_url).await.unwrap_or_else(|e| {
        panic!("cannot reach PostgreSQL at HIWAY_TEST_DATABASE_URL (run deploy/deps.sh): {e}")
    });
    // The name is made by this harness from a UUID, never from input.
    sqlx::raw_sql(AssertSqlSafe(format!("create database {name}")))
        .execute(&mut admin)
        .await
        .expect("create the test database");
    let mut url = url::Url::parse(admin_url).expect("database URL");
    url.set_path(name);
    url.to_string()
}

/// Polls `check` until it returns `Some`, or panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs one of the project's `deploy/` scripts and panics with its output if it fails.
pub(crate) fn deploy_script(script: &str, args: &[&str]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(script);
    let output = Command::new("bash")
        .arg(path)
        .args(args)
        .output()
        .expect("run a deploy script");
    assert!(
        output.status.success(),
        "deploy/{script} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs a `deploy/` script for cleanup, where a failure must not panic (from `Drop`).
pub(crate) fn deploy_script_quietly(script: &str, args: &[&str]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(script);
    let _ = Command::new("bash").arg(path).args(args).output();
}

/// Where the test's named entries come from.
enum Entries<'a> {
    /// TOML text, with the clients `source` and `other`.
    Inline(&'a str),
    /// An example configuration directory, and TOML laid over it.
    Example(&'a std::path::Path, &'a str),
}

/// Copies a directory tree (an example configuration) file by file.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()))
    {
        let entry = entry.expect("directory entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir_all(&target).expect("create directory");
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// The repository's `config/examples/<name>` directory.
pub fn example_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../config/examples")
        .join(name)
}

/// The SHA-256 hash of a test secret, as a client's `api_key_sha256`.
pub fn key_hash(secret: &str) -> String {
    sha256(secret)
}

/// The path of a workspace binary, built once per test run so it matches the code under
/// test.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let target = BUILT.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--workspace", "--bins"])
            .current_dir(&root)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"))
            .join("debug")
    });
    target.join(name)
}

fn init_logging() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into());
    hiway_runtime::telemetry::init(&hiway_config::LogConfig {
        format: hiway_config::LogFormat::Text,
        filter,
    });
}
