//! A private RabbitMQ node for tests that stop, block or restart the broker, so they cannot
//! disturb the shared one other tests use. Driven by `deploy/rabbitmq-node.sh`.

use std::path::PathBuf;
use std::process::Command;

/// A throwaway broker node; stopped and removed on drop.
pub struct RabbitNode {
    name: String,
    port: u16,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/rabbitmq-node.sh")
}

fn run(args: &[&str]) {
    let output = Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .expect("run rabbitmq-node.sh");
    assert!(
        output.status.success(),
        "rabbitmq-node.sh {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl RabbitNode {
    /// Starts a fresh node named `name` with AMQP on `port` (blocking: takes a few seconds).
    pub fn start(name: &str, port: u16) -> Self {
        run(&["start", name, &port.to_string()]);
        Self {
            name: name.to_owned(),
            port,
        }
    }

    /// The AMQP URL of the node.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops the node, keeping its data.
    pub fn stop(&self) {
        run(&["stop", &self.name]);
    }

    /// Starts the stopped node again with its data (durable queues and messages survive).
    pub fn restart(&self) {
        run(&["restart", &self.name]);
    }

    /// Runs `rabbitmqctl` against this node.
    pub fn ctl(&self, args: &[&str]) {
        let status = Command::new("rabbitmqctl")
            .arg("-n")
            .arg(format!("{}@localhost", self.name))
            .args(args)
            .status()
            .expect("run rabbitmqctl");
        assert!(status.success(), "rabbitmqctl {args:?} failed");
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["stop", &self.name])
            .output();
        let _ = Command::new("bash")
            .arg(script())
            .args(["clean", &self.name])
            .output();
    }
}
