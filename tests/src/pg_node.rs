//! A private PostgreSQL server for tests that stop and restart the database, so they cannot
//! disturb the shared one other tests use. Driven by `deploy/postgres-node.sh`.

use std::path::PathBuf;
use std::process::Command;

/// A throwaway database server; removed on drop.
pub struct PgNode {
    name: String,
    port: u16,
}

fn run(args: &[&str]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/postgres-node.sh");
    let output = Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .expect("run postgres-node.sh");
    assert!(
        output.status.success(),
        "postgres-node.sh {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl PgNode {
    /// Starts a fresh server named `name` on `port` (blocking: a few seconds).
    pub fn start(name: &str, port: u16) -> Self {
        run(&["start", name, &port.to_string()]);
        Self {
            name: name.to_owned(),
            port,
        }
    }

    /// The URL of its `hiway` database, to create test databases from.
    pub fn url(&self) -> String {
        format!("postgres://hiway@127.0.0.1:{}/hiway", self.port)
    }

    /// Stops it, keeping its data.
    pub fn stop(&self) {
        run(&["stop", &self.name]);
    }

    /// Starts it again with its data.
    pub fn restart(&self) {
        run(&["restart", &self.name]);
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/postgres-node.sh");
        let _ = Command::new("bash")
            .arg(script)
            .args(["clean", &self.name])
            .output();
    }
}
