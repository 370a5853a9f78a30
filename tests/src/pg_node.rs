//! A private PostgreSQL server for tests that stop and restart the database, so they cannot
//! disturb the shared one other tests use. Driven by `deploy/postgres-node.sh`.

use crate::{deploy_script, deploy_script_quietly};

const SCRIPT: &str = "postgres-node.sh";

/// A throwaway database server; removed on drop.
pub struct PgNode {
    name: String,
    port: u16,
}

impl PgNode {
    /// Starts a fresh server named `name` on `port` (blocking: a few seconds).
    pub fn start(name: &str, port: u16) -> Self {
        deploy_script(SCRIPT, &["start", name, &port.to_string()]);
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
        deploy_script(SCRIPT, &["stop", &self.name]);
    }

    /// Starts it again with its data.
    pub fn restart(&self) {
        deploy_script(SCRIPT, &["restart", &self.name]);
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        deploy_script_quietly(SCRIPT, &["clean", &self.name]);
    }
}
