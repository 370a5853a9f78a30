//! Exchange and queue names, all derived from one prefix.
//!
//! The prefix lets several hiway installations (or test runs) share one broker and vhost
//! without seeing each other's messages.

use std::time::Duration;

use crate::DestinationName;

/// Routing key of messages on the ingress exchange.
pub const INGRESS_KEY: &str = "message";
/// Routing key of audit batches on the audit exchange.
pub const AUDIT_KEY: &str = "event";

/// Every exchange and queue name of one installation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// Names under `prefix` (`hiway` by default).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Ingress publishes accepted messages here.
    pub fn ingress_exchange(&self) -> String {
        format!("{}.ingress", self.prefix)
    }

    /// The transformer consumes this queue.
    pub fn ingress_queue(&self) -> String {
        format!("{}.ingress", self.prefix)
    }

    /// The transformer publishes one copy per destination here, routing key = destination.
    pub fn deliver_exchange(&self) -> String {
        format!("{}.deliver", self.prefix)
    }

    /// One queue per destination; its senders compete for it.
    pub fn deliver_queue(&self, destination: &DestinationName) -> String {
        format!("{}.deliver.{}", self.prefix, destination)
    }

    /// Retries are published here, routing key [`Names::retry_key`].
    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.prefix)
    }

    /// The queue where a destination's messages wait `delay` before their next attempt. Named
    /// by the delay, not by its position in the schedule, so a changed schedule declares new
    /// queues instead of clashing with the old ones' arguments.
    pub fn retry_queue(&self, destination: &DestinationName, delay: Duration) -> String {
        format!(
            "{}.retry.{}.{}ms",
            self.prefix,
            destination,
            delay.as_millis()
        )
    }

    /// Routing key on the retry exchange for one destination and delay.
    pub fn retry_key(&self, destination: &DestinationName, delay: Duration) -> String {
        format!("{}.{}ms", destination, delay.as_millis())
    }

    /// Messages that cannot be delivered or processed end here, with their reason.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The audit service stores what reaches this queue as dead letters.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The transformer takes a copy of every dead letter from this queue, for on-dead routes
    /// (declared only when such routes exist).
    pub fn on_dead_queue(&self) -> String {
        format!("{}.on-dead", self.prefix)
    }

    /// Every service publishes audit batches here.
    pub fn audit_exchange(&self) -> String {
        format!("{}.audit", self.prefix)
    }

    /// The audit service consumes this queue.
    pub fn audit_queue(&self) -> String {
        format!("{}.audit", self.prefix)
    }

    /// Every queue of the installation for these destinations, for tools and tests.
    pub fn all_queues<'a>(
        &self,
        destinations: impl IntoIterator<Item = &'a DestinationName>,
    ) -> Vec<String> {
        let mut queues = vec![
            self.ingress_queue(),
            self.audit_queue(),
            self.dead_queue(),
            self.on_dead_queue(),
        ];
        queues.extend(destinations.into_iter().map(|d| self.deliver_queue(d)));
        queues
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::new("hiway")
    }
}
