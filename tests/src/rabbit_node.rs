//! A private RabbitMQ node for tests that stop, block or restart the broker, so they cannot
//! disturb the shared one other tests use. Driven by `deploy/rabbitmq-node.sh`.

use std::process::Command;

use crate::{deploy_script, deploy_script_quietly};

const SCRIPT: &str = "rabbitmq-node.sh";

/// A throwaway broker node; stopped and removed on drop.
pub struct RabbitNode {
    name: String,
    port: u16,
}

impl RabbitNode {
    /// Starts a fresh node named `name` with AMQP on `port` (blocking: takes a few seconds).
    pub fn start(name: &str, port: u16) -> Self {
        deploy_script(SCRIPT, &["start", name, &port.to_string()]);
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
        deploy_script(SCRIPT, &["stop", &self.name]);
    }

    /// Starts the stopped node again with its data (durable queues and messages survive).
    pub fn restart(&self) {
        deploy_script(SCRIPT, &["restart", &self.name]);
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
        deploy_script_quietly(SCRIPT, &["stop", &self.name]);
        deploy_script_quietly(SCRIPT, &["clean", &self.name]);
    }
}
