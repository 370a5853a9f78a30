//! `hiway dlq …`: what the operator sees and does with dead letters.

use std::fmt::Write as _;

use anyhow::{Context, bail};
use hiway_audit::dlq::{self, DeadLetterRow, Selection};
use hiway_config::Config;
use hiway_runtime::Broker;
use sqlx::PgPool;
use uuid::Uuid;

/// One dlq command.
pub enum Action {
    /// List the selection.
    List(Selection),
    /// Show one letter whole.
    Show(Uuid),
    /// Replay the selection.
    Replay {
        /// Which.
        selection: Selection,
        /// Only say what would happen.
        dry_run: bool,
        /// Allow an empty selection (everything).
        all: bool,
    },
    /// Discard the selection.
    Discard {
        /// Which.
        selection: Selection,
        /// Only say what would happen.
        dry_run: bool,
        /// Allow an empty selection (everything).
        all: bool,
    },
}

/// Runs a dlq command, printing its result.
pub async fn run(config: &Config, pool: &PgPool, action: Action) -> anyhow::Result<()> {
    match action {
        Action::List(selection) => {
            let letters = dlq::select(pool, &selection).await?;
            crate::print(format_list(&letters))?;
        }
        Action::Show(id) => {
            let selection = Selection {
                ids: vec![id],
                state: None,
                ..Default::default()
            };
            let mut letters = dlq::select(pool, &selection).await?;
            for state in ["replayed", "discarded"] {
                if letters.is_empty() {
                    letters = dlq::select(
                        pool,
                        &Selection {
                            state: Some(state.into()),
                            ..selection.clone()
                        },
                    )
                    .await?;
                }
            }
            match letters.first() {
                Some(letter) => crate::print(format_one(letter))?,
                None => bail!("no dead letter with id {id}"),
            }
        }
        Action::Replay {
            selection,
            dry_run,
            all,
        }
        | Action::Discard {
            selection,
            dry_run,
            all,
        } if selection.is_everything() && !all && !dry_run => {
            let _ = selection;
            bail!(
                "no id or filter given: add --all to act on every dead letter, or --dry-run to see them"
            )
        }
        Action::Replay {
            selection, dry_run, ..
        } => {
            if dry_run {
                let letters = dlq::select(pool, &selection).await?;
                crate::print(format_args!(
                    "would replay {} dead letter(s):\n{}",
                    letters.len(),
                    format_list(&letters)
                ))?;
                return Ok(());
            }
            let broker = Broker::new(config);
            let connection = broker
                .connect("hiway-dlq")
                .await
                .context("cannot connect to the broker")?;
            let publisher = broker.publisher(&connection).await?;
            let report = dlq::replay(pool, &publisher, broker.names(), &selection).await?;
            connection.close(200, "done").await;
            crate::print(format_args!(
                "replayed {}; failed {} (still dead: run the same command again)\n",
                report.replayed, report.failed
            ))?;
            if report.failed > 0 {
                bail!("{} dead letter(s) could not be replayed", report.failed);
            }
        }
        Action::Discard {
            selection, dry_run, ..
        } => {
            if dry_run {
                let letters = dlq::select(pool, &selection).await?;
                crate::print(format_args!(
                    "would discard {} dead letter(s):\n{}",
                    letters.len(),
                    format_list(&letters)
                ))?;
                return Ok(());
            }
            let n = dlq::discard(pool, &selection).await?;
            crate::print(format_args!("discarded {n}\n"))?;
        }
    }
    Ok(())
}

/// One line per letter.
pub fn format_list(letters: &[DeadLetterRow]) -> String {
    let mut out = String::new();
    for l in letters {
        let reason: String = l.reason.chars().take(100).collect();
        let _ = writeln!(
            out,
            "{}  {}  message={} destination={} status={} state={} replays={}  {}",
            l.dead_id,
            l.died_at.format("%Y-%m-%dT%H:%M:%SZ"),
            l.message_id
                .map(|m| m.to_string())
                .unwrap_or_else(|| "-".into()),
            l.destination.as_deref().unwrap_or("-"),
            l.last_status_code
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into()),
            l.state,
            l.replays,
            reason
        );
    }
    let _ = writeln!(out, "{} dead letter(s)", letters.len());
    out
}

/// Everything about one letter.
pub fn format_one(l: &DeadLetterRow) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "dead letter  {}", l.dead_id);
    let _ = writeln!(
        out,
        "message      {}",
        l.message_id
            .map(|m| m.to_string())
            .unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        out,
        "state        {} (replayed {} times)",
        l.state, l.replays
    );
    let _ = writeln!(out, "channel      {}", l.channel.as_deref().unwrap_or("-"));
    let _ = writeln!(
        out,
        "destination  {}",
        l.destination.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        out,
        "died at      {} (by {})",
        l.died_at.to_rfc3339(),
        l.dead_by.as_deref().unwrap_or("-")
    );
    let _ = writeln!(out, "reason       {}", l.reason);
    let _ = writeln!(out, "attempts:");
    for a in l.attempts.as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  #{} {} status={} {}",
            a["attempt"],
            a["at"].as_str().unwrap_or(""),
            a["status_code"],
            a["error"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(out, "headers      {}", l.headers);
    let _ = writeln!(
        out,
        "content type {}",
        l.content_type.as_deref().unwrap_or("-")
    );
    let _ = writeln!(out, "payload ({} bytes):", l.body.len());
    let _ = writeln!(out, "{}", String::from_utf8_lossy(&l.body));
    out
}
