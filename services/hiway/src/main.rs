//! `hiway`: all services in one process, and the operator commands.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hiway_proto::MessageId;
use rand::RngCore;

/// hiway: an interoperability layer for health information exchange.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    config: hiway_runtime::cli::ConfigArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run ingress, transformer, sender and audit in one process.
    Run,
    /// Show each destination: queued, retrying per wait, dead, consumers, circuit.
    Status,
    /// Print the audit trail of one message.
    Trace {
        /// The id ingress answered with.
        id: String,
    },
    /// Dead letters: list, show, replay, discard.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Client credential commands.
    Client {
        #[command(subcommand)]
        command: ClientCommand,
    },
    /// A demo destination that answers 200 to every POST (for the demo and benchmarks).
    DemoSink {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// Delay before each answer, e.g. 50ms, to play a slow destination.
        #[arg(long, default_value = "0ms", value_parser = humantime_duration)]
        delay: Duration,
        /// Log every message received.
        #[arg(long)]
        verbose: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        select: Select,
    },
    /// Show one dead letter whole: reason, every attempt, headers, payload.
    Show {
        /// Its dead id (or the message id).
        id: uuid::Uuid,
    },
    /// Publish dead letters again, same message id, attempts restarted.
    Replay {
        #[command(flatten)]
        select: Select,
        /// Say what would be replayed, and do nothing.
        #[arg(long)]
        dry_run: bool,
        /// Required to replay every dead letter when no id or filter is given.
        #[arg(long)]
        all: bool,
    },
    /// Mark dead letters as discarded: kept for the record, never delivered.
    Discard {
        #[command(flatten)]
        select: Select,
        /// Say what would be discarded, and do nothing.
        #[arg(long)]
        dry_run: bool,
        /// Required to discard every dead letter when no id or filter is given.
        #[arg(long)]
        all: bool,
    },
}

/// Which dead letters: every condition given must hold.
#[derive(clap::Args)]
struct Select {
    /// Dead ids or message ids.
    ids: Vec<uuid::Uuid>,
    /// Meant for this destination.
    #[arg(long)]
    destination: Option<String>,
    /// Came in on this channel.
    #[arg(long)]
    channel: Option<String>,
    /// Died since: a time (2026-11-22T10:00:00Z) or an age (2h).
    #[arg(long, value_parser = when)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Died before: a time or an age.
    #[arg(long, value_parser = when)]
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// The last attempt got this HTTP status.
    #[arg(long)]
    status: Option<i32>,
    /// The reason contains this text.
    #[arg(long)]
    error: Option<String>,
    /// dead (default), replayed or discarded.
    #[arg(long)]
    state: Option<String>,
    /// At most this many.
    #[arg(long)]
    limit: Option<i64>,
}

impl Select {
    fn selection(&self) -> hiway_audit::dlq::Selection {
        hiway_audit::dlq::Selection {
            ids: self.ids.clone(),
            destination: self.destination.clone(),
            channel: self.channel.clone(),
            since: self.since,
            until: self.until,
            status_code: self.status,
            error: self.error.clone(),
            state: self.state.clone(),
            limit: self.limit,
        }
    }
}

/// A time, or an age counted back from now.
fn when(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    let age = humantime_duration(s)
        .map_err(|_| format!("{s:?} is neither a time (RFC 3339) nor an age like 2h"))?;
    Ok(chrono::Utc::now() - chrono::Duration::from_std(age).map_err(|e| e.to_string())?)
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and validate the configuration; explain every mistake with its key and file.
    Check {
        /// Also print the configuration in force (every layer applied; secrets redacted).
        #[arg(long)]
        show: bool,
    },
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Make a new random API key and password for a client and print the hashes to configure.
    New {
        /// The client's name.
        name: String,
    },
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    s.parse::<humantime::Duration>()
        .map(Into::into)
        .map_err(|e| e.to_string())
}

// The services' allocator (see the workspace Cargo.toml): `hiway run` is all of them in one
// process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match start() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `hiway … | head`: the reader took what it wanted.
        Err(error) if error.is::<hiway::OutputClosed>() => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The same words as returning the error from main.
            eprintln!("Error: {error:?}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn start() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Command::Run = args.command {
        return hiway_runtime::cli::serve(&args.config, |config, stop| async move {
            hiway::run_all(&config, stop).await
        });
    }
    // The operator commands do one thing at a time: one thread is plenty. (Some of them need
    // no configuration, so theirs cannot decide.)
    let one_thread = hiway_config::RuntimeConfig { worker_threads: 1 };
    hiway_runtime::cli::runtime(&one_thread)?.block_on(operate(args))
}

async fn operate(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Run => unreachable!("`hiway run` is served by main"),
        Command::Trace { id } => {
            let config = args.config.load()?;
            let id: MessageId = id
                .parse()
                .with_context(|| format!("{id:?} is not a message id"))?;
            let pool = hiway_audit::connect_database(&config)
                .await
                .context("cannot connect to PostgreSQL")?;
            let trail = hiway_audit::trail(&pool, id).await?;
            hiway::print(hiway::format_trail(&id.to_string(), &trail))?;
            Ok(())
        }
        Command::Status => {
            let config = args.config.load()?;
            let pool = hiway_audit::connect_database(&config)
                .await
                .context("cannot connect to PostgreSQL")?;
            let statuses = hiway::status::read(&config, &pool).await?;
            hiway::print(hiway::status::format(&statuses))?;
            Ok(())
        }
        Command::Dlq { command } => {
            let config = args.config.load()?;
            let pool = hiway_audit::connect_database(&config)
                .await
                .context("cannot connect to PostgreSQL")?;
            hiway::dlq::run(&config, &pool, command.into()).await
        }
        Command::Config {
            command: ConfigCommand::Check { show },
        } => {
            let config = args.config.load()?;
            // What start-up would refuse beyond the file's own checks: programs that do not
            // compile, lookup tables that do not read, destinations whose headers or secrets
            // cannot be used. Every problem is listed at once.
            let mut problems = match hiway_transform::Transforms::compile(&config) {
                Ok(_) => Vec::new(),
                Err(errors) => errors,
            };
            for (name, d) in &config.destinations {
                if let Err(e) = hiway_sender::Destination::new(name.clone(), d) {
                    problems.push(e.to_string());
                }
            }
            if !problems.is_empty() {
                anyhow::bail!(
                    "configuration is not valid:\n{}",
                    problems
                        .iter()
                        .map(|p| format!("  - {p}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            if show {
                hiway::print(format_args!("{config:#?}\n"))?;
            }
            let programs = config
                .routes
                .values()
                .map(|r| {
                    usize::from(r.filter.is_some())
                        + usize::from(r.transform.is_some() || r.transform_file.is_some())
                })
                .sum::<usize>();
            hiway::print(format_args!(
                "configuration is valid: {} clients, {} channels, {} destinations, {} routes, {} jq programs, {} lookup tables\n",
                config.clients.len(),
                config.channels.len(),
                config.destinations.len(),
                config.routes.len(),
                programs,
                config.lookups.len()
            ))?;
            Ok(())
        }
        Command::Client {
            command: ClientCommand::New { name },
        } => {
            let name = hiway_proto::ClientName::parse(name)?;
            let key = random_secret();
            let password = random_secret();
            hiway::print(format_args!(
                "# Give these to the client (shown once; hiway keeps only the hashes):\n\
                 #   API key:  {key}      (Authorization: Bearer <key>)\n\
                 #   password: {password} (basic auth, user name {name})\n\
                 [clients.{name}]\n\
                 api_key_sha256 = \"{}\"\n\
                 password_sha256 = \"{}\"\n",
                hiway_ingress::auth::hash_secret(&key),
                hiway_ingress::auth::hash_secret(&password)
            ))?;
            Ok(())
        }
        Command::DemoSink {
            listen,
            delay,
            verbose,
        } => {
            hiway_runtime::telemetry::init(&hiway_config::Config::from_toml("")?.log);
            let stop = hiway_runtime::stop_signal();
            hiway::sink::serve(listen, delay, verbose, stop).await
        }
    }
}

/// 32 random bytes, hex: a 256-bit secret.
fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl From<DlqCommand> for hiway::dlq::Action {
    fn from(c: DlqCommand) -> Self {
        use hiway::dlq::Action;
        match c {
            DlqCommand::List { select } => Action::List(select.selection()),
            DlqCommand::Show { id } => Action::Show(id),
            DlqCommand::Replay {
                select,
                dry_run,
                all,
            } => Action::Replay {
                selection: select.selection(),
                dry_run,
                all,
            },
            DlqCommand::Discard {
                select,
                dry_run,
                all,
            } => Action::Discard {
                selection: select.selection(),
                dry_run,
                all,
            },
        }
    }
}
