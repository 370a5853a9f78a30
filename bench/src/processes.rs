//! The hiway service processes of a run: started from `--bin-dir` on the bench's own
//! configuration, each with its stderr in a log file, stopped with SIGTERM (SIGKILL if it
//! does not exit in time).
//!
//! Services run as separate processes, as in production, so each one's CPU and memory can be
//! read from `/proc` on its own, and none of them shares the bench's async runtime with the
//! load generator and the sinks.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// How long a service may take to drain and exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// One running service process.
struct Service {
    label: String,
    pid: u32,
    child: Child,
    log: PathBuf,
}

/// What a service wrote to its log (filter `warn`: only warnings and errors).
#[derive(Clone, Debug)]
pub struct LogSummary {
    /// The service's label, e.g. `sender` or `slow-sender-2`.
    pub label: String,
    /// Lines written.
    pub lines: usize,
    /// The first few distinct lines (timestamps stripped), to name what went wrong.
    pub samples: Vec<String>,
}

/// Every service process the run started.
pub struct Fleet {
    bin_dir: PathBuf,
    env: Vec<(String, String)>,
    config_dir: PathBuf,
    log_dir: PathBuf,
    running: Vec<Service>,
    logs: Vec<(String, PathBuf)>,
}

impl Fleet {
    /// A fleet whose processes read `config_dir`, get `env` (configuration overrides for
    /// every process), and log into `log_dir`.
    pub fn new(
        bin_dir: &Path,
        config_dir: &Path,
        log_dir: &Path,
        env: &[(String, String)],
    ) -> Self {
        Self {
            bin_dir: bin_dir.to_path_buf(),
            env: env.to_vec(),
            config_dir: config_dir.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
            running: Vec::new(),
            logs: Vec::new(),
        }
    }

    /// Checks that every binary is there before anything is started.
    pub fn check_binaries(bin_dir: &Path, binaries: &[&str]) -> anyhow::Result<()> {
        let missing: Vec<&str> = binaries
            .iter()
            .copied()
            .filter(|b| !bin_dir.join(b).is_file())
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} not found in {}: build them first (cargo build --release --bins), or pass --bin-dir",
                missing.join(", "),
                bin_dir.display()
            );
        }
        Ok(())
    }

    /// Starts `binary --config <dir>` labelled `label`, with extra environment (configuration
    /// overrides). Returns its pid.
    pub fn spawn(
        &mut self,
        binary: &str,
        label: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<u32> {
        let log = self
            .log_dir
            .join(format!("{:02}-{label}.log", self.logs.len() + 1));
        let stderr = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(self.bin_dir.join(binary));
        command
            .arg("--config")
            .arg(&self.config_dir)
            // The configuration says `warn`; RUST_LOG from the bench's own environment would
            // override it and could flood the disk, so it is not passed on.
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // A bench that fails or is interrupted must not leave services consuming.
            .kill_on_drop(true);
        // The run's overrides first, so a process's own settings (the scaling part's
        // concurrency) win.
        for (k, v) in self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(env.iter().copied())
        {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin_dir.join(binary).display()))?;
        let pid = child.id().context("the process exited at once")?;
        self.logs.push((label.to_owned(), log.clone()));
        self.running.push(Service {
            label: label.to_owned(),
            pid,
            child,
            log,
        });
        Ok(pid)
    }

    /// The pid of a running service.
    pub fn pid(&self, label: &str) -> Option<u32> {
        self.running
            .iter()
            .find(|s| s.label == label)
            .map(|s| s.pid)
    }

    /// Fails, naming the service and quoting its log, if any service has exited: a benchmark
    /// of a crashed service would measure nothing.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for s in &mut self.running {
            if let Ok(Some(status)) = s.child.try_wait() {
                let log = std::fs::read_to_string(&s.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                bail!(
                    "{} (pid {}) exited with {status}; last lines of {}:\n{}",
                    s.label,
                    s.pid,
                    s.log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        Ok(())
    }

    /// Stops every running service whose label starts with `prefix`, all at once: SIGTERM,
    /// then SIGKILL after [`STOP_TIMEOUT`].
    pub async fn stop(&mut self, prefix: &str) {
        let (stopping, keep): (Vec<Service>, Vec<Service>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| s.label.starts_with(prefix));
        self.running = keep;
        for s in &stopping {
            terminate(s.pid).await;
        }
        for mut s in stopping {
            if tokio::time::timeout(STOP_TIMEOUT, s.child.wait())
                .await
                .is_err()
            {
                crate::warn(&format!(
                    "{} did not stop within {STOP_TIMEOUT:?} of SIGTERM; killing it",
                    s.label
                ));
                let _ = s.child.kill().await;
            }
        }
    }

    /// Stops every service.
    pub async fn stop_all(&mut self) {
        self.stop("").await;
    }

    /// What each service started so far wrote to its log.
    pub fn log_summaries(&self) -> Vec<LogSummary> {
        self.logs
            .iter()
            .map(|(label, path)| {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let mut samples: Vec<String> = Vec::new();
                for line in text.lines() {
                    let line = strip_timestamp(line);
                    if samples.len() < 3 && !samples.iter().any(|s| s == &line) {
                        samples.push(line);
                    }
                }
                LogSummary {
                    label: label.clone(),
                    lines: text.lines().count(),
                    samples,
                }
            })
            .collect()
    }
}

/// Sends SIGTERM through `kill(1)`: the workspace forbids unsafe code, so no libc call.
async fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// A log line without its leading timestamp and with colour codes removed, so equal
/// messages compare equal.
fn strip_timestamp(line: &str) -> String {
    let mut clean = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ … letter
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            clean.push(c);
        }
    }
    let trimmed = clean.trim();
    match trimmed.split_once(' ') {
        Some((first, rest)) if first.len() >= 20 && first.as_bytes()[4] == b'-' => {
            rest.trim().chars().take(300).collect()
        }
        _ => trimmed.chars().take(300).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_lose_timestamp_and_colours() {
        let line = "\u{1b}[2m2026-11-22T10:00:00.123456Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m hiway_sender: delivery failed";
        assert_eq!(strip_timestamp(line), "WARN hiway_sender: delivery failed");
    }
}
