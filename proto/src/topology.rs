//! The whole RabbitMQ topology, declared idempotently.
//!
//! Every service declares the [`plan`] when it connects, so whichever starts first creates what all
//! of them need, and a broker that lost its definitions gets them back on the next reconnect.
//! Declaring an existing exchange or queue with the same arguments is a no-op; with different
//! arguments the broker refuses (`PRECONDITION_FAILED`), which is why the arguments live here
//! and nowhere else.

use std::time::Duration;

use crate::amqp::{AMQPValue, FieldTable, LongString};

use crate::ids::DestinationName;
use crate::names::{AUDIT_KEY, INGRESS_KEY, Names};

/// Routing key under which the ingress queue dead-letters (poison envelopes).
pub const DEAD_KEY_INGRESS: &str = "ingress";
/// Routing key under which the audit queue dead-letters (unparsable audit batches).
pub const DEAD_KEY_AUDIT: &str = "audit";

/// What the topology needs to know about one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationTopology {
    /// Its name: routing key and queue name suffix.
    pub name: DestinationName,
    /// Its retry schedule: one delay queue per distinct wait.
    pub retry_delays: Vec<Duration>,
}

/// One step of declaring the topology. The steps are data, so the AMQP client that carries
/// them out (hiway-runtime's) is the only code that talks to the broker, and so a test can
/// read what would be declared without one.
#[derive(Clone, Debug, PartialEq)]
pub enum Declare {
    /// A durable exchange.
    Exchange {
        /// Its name.
        name: String,
        /// Direct or fanout.
        kind: ExchangeKind,
    },
    /// A durable queue with these arguments.
    Queue {
        /// Its name.
        name: String,
        /// Its `x-` arguments (type, dead-lettering, limits).
        args: FieldTable,
    },
    /// A binding of `queue` to `exchange` under `key`.
    Bind {
        /// The queue.
        queue: String,
        /// The exchange.
        exchange: String,
        /// The routing key (empty for a fanout).
        key: String,
    },
}

/// The kinds of exchange hiway uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeKind {
    /// Routes on the exact routing key.
    Direct,
    /// Routes to every bound queue.
    Fanout,
}

/// Every exchange, queue and binding for these destinations, in the order to declare them
/// (exchanges before the bindings that name them).
///
/// `delivery_limit` is the number of deliveries without an ack after which the broker
/// dead-letters a message from a worker's queue: a message that crashes its worker every time
/// must not be handed out forever.
pub fn plan(
    names: &Names,
    destinations: &[DestinationTopology],
    delivery_limit: u32,
) -> Vec<Declare> {
    let mut steps = Vec::new();
    for (exchange, kind) in [
        (names.ingress_exchange(), ExchangeKind::Direct),
        (names.deliver_exchange(), ExchangeKind::Direct),
        (names.retry_exchange(), ExchangeKind::Direct),
        // Fanout: whatever the routing key a message died with, it reaches the dead queue; the
        // key (the destination) is kept on the message for the audit service to read.
        (names.dead_exchange(), ExchangeKind::Fanout),
        (names.audit_exchange(), ExchangeKind::Direct),
    ] {
        steps.push(Declare::Exchange {
            name: exchange,
            kind,
        });
    }

    let dead = names.dead_exchange();
    let worker = |key: &str| {
        Args::quorum()
            .dead_letter(&dead, key)
            .delivery_limit(delivery_limit)
    };
    queue(&mut steps, &names.ingress_queue(), worker(DEAD_KEY_INGRESS));
    bind(
        &mut steps,
        &names.ingress_queue(),
        &names.ingress_exchange(),
        INGRESS_KEY,
    );

    queue(&mut steps, &names.audit_queue(), worker(DEAD_KEY_AUDIT));
    bind(
        &mut steps,
        &names.audit_queue(),
        &names.audit_exchange(),
        AUDIT_KEY,
    );

    // The dead queue has no dead-letter exchange and no delivery limit: it is the end of the
    // line, and what reaches it stays until the audit service has stored it durably.
    queue(&mut steps, &names.dead_queue(), Args::quorum());
    bind(&mut steps, &names.dead_queue(), &names.dead_exchange(), "");

    for d in destinations {
        let key = d.name.as_str();
        queue(&mut steps, &names.deliver_queue(&d.name), worker(key));
        bind(
            &mut steps,
            &names.deliver_queue(&d.name),
            &names.deliver_exchange(),
            key,
        );

        // Retries wait in a queue per delay whose TTL, once expired, dead-letters the message
        // back to the destination's queue. One queue per delay keeps every queue in expiry
        // order, so no message waits behind a longer one (jitter, a per-message TTL, only ever
        // shortens a wait, by at most the jitter fraction).
        let mut delays = d.retry_delays.clone();
        delays.sort();
        delays.dedup();
        for delay in delays {
            let ttl = u32::try_from(delay.as_millis()).unwrap_or(u32::MAX);
            let args = Args::quorum()
                .dead_letter(&names.deliver_exchange(), key)
                .ttl(ttl);
            queue(&mut steps, &names.retry_queue(&d.name, delay), args);
            bind(
                &mut steps,
                &names.retry_queue(&d.name, delay),
                &names.retry_exchange(),
                &names.retry_key(&d.name, delay),
            );
        }
    }
    steps
}

/// The queue on-dead routes read: a second copy of every dead letter (the audit service
/// stores the first). It has no dead-letter exchange of its own, so a copy the transformer
/// cannot handle is dropped after `delivery_limit` deliveries rather than dead again in a
/// loop; the dead letter itself is stored either way.
///
/// Its removal, for a configuration without on-dead routes (where it would collect a copy of
/// every dead letter for ever), is a queue delete of [`Names::on_dead_queue`]: RabbitMQ
/// answers a delete of a queue that does not exist with delete-ok (0), quietly, and the
/// delete must be unconditional, as quorum queues refuse `if-unused` with a connection error.
pub fn plan_on_dead(names: &Names, delivery_limit: u32) -> Vec<Declare> {
    let mut steps = Vec::new();
    queue(
        &mut steps,
        &names.on_dead_queue(),
        Args::quorum().delivery_limit(delivery_limit),
    );
    bind(
        &mut steps,
        &names.on_dead_queue(),
        &names.dead_exchange(),
        "",
    );
    steps
}

/// Queue arguments, built up from a durable quorum queue.
struct Args(FieldTable);

impl Args {
    /// A durable quorum queue: replicated across a cluster and, since RabbitMQ 3.10, faster
    /// than a classic queue for persistent messages.
    fn quorum() -> Self {
        let mut t = FieldTable::default();
        t.insert("x-queue-type".into(), string("quorum"));
        Self(t)
    }

    /// Dead-letters to `exchange` with `key`, `at-least-once` so a message is never lost on the
    /// way; RabbitMQ requires `reject-publish` overflow for that strategy.
    fn dead_letter(mut self, exchange: &str, key: &str) -> Self {
        self.0
            .insert("x-dead-letter-exchange".into(), string(exchange));
        self.0
            .insert("x-dead-letter-routing-key".into(), string(key));
        self.0
            .insert("x-dead-letter-strategy".into(), string("at-least-once"));
        self.0.insert("x-overflow".into(), string("reject-publish"));
        self
    }

    fn delivery_limit(mut self, limit: u32) -> Self {
        self.0
            .insert("x-delivery-limit".into(), AMQPValue::LongUInt(limit));
        self
    }

    fn ttl(mut self, millis: u32) -> Self {
        self.0
            .insert("x-message-ttl".into(), AMQPValue::LongUInt(millis));
        self
    }
}

fn queue(steps: &mut Vec<Declare>, name: &str, args: Args) {
    steps.push(Declare::Queue {
        name: name.to_owned(),
        args: args.0,
    });
}

fn bind(steps: &mut Vec<Declare>, queue: &str, exchange: &str, key: &str) {
    steps.push(Declare::Bind {
        queue: queue.to_owned(),
        exchange: exchange.to_owned(),
        key: key.to_owned(),
    });
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_for(delays: &[u64]) -> Vec<Declare> {
        let destination = DestinationTopology {
            name: DestinationName::parse("dhis2").unwrap(),
            retry_delays: delays.iter().map(|s| Duration::from_secs(*s)).collect(),
        };
        plan(&Names::new("t"), &[destination], 5)
    }

    fn queue_args<'a>(steps: &'a [Declare], queue: &str) -> &'a FieldTable {
        steps
            .iter()
            .find_map(|s| match s {
                Declare::Queue { name, args } if name == queue => Some(args),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no queue {queue} in the plan"))
    }

    #[test]
    fn every_binding_names_a_queue_and_an_exchange_declared_before_it() {
        let steps = plan_for(&[30, 300]);
        for (i, step) in steps.iter().enumerate() {
            if let Declare::Bind {
                queue, exchange, ..
            } = step
            {
                let before = &steps[..i];
                assert!(
                    before
                        .iter()
                        .any(|s| matches!(s, Declare::Queue { name, .. } if name == queue)),
                    "{queue} is bound before it is declared"
                );
                assert!(
                    before
                        .iter()
                        .any(|s| matches!(s, Declare::Exchange { name, .. } if name == exchange)),
                    "{exchange} is bound to before it is declared"
                );
            }
        }
    }

    #[test]
    fn a_retry_schedule_gets_one_delay_queue_per_distinct_wait_with_that_wait_as_its_ttl() {
        let names = Names::new("t");
        let dhis2 = DestinationName::parse("dhis2").unwrap();
        let steps = plan_for(&[300, 30, 30]);
        let retry_queues: Vec<&str> = steps
            .iter()
            .filter_map(|s| match s {
                Declare::Queue { name, .. } if name.contains("retry") => Some(name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            retry_queues,
            [
                names.retry_queue(&dhis2, Duration::from_secs(30)),
                names.retry_queue(&dhis2, Duration::from_secs(300)),
            ]
        );
        let args = queue_args(&steps, retry_queues[0]);
        assert_eq!(
            args.inner().get("x-message-ttl"),
            Some(&AMQPValue::LongUInt(30_000))
        );
        assert_eq!(
            args.inner().get("x-dead-letter-exchange"),
            Some(&string(&names.deliver_exchange()))
        );
    }

    #[test]
    fn worker_queues_dead_letter_at_least_once_after_the_delivery_limit_and_the_dead_queue_does_not()
     {
        let names = Names::new("t");
        let steps = plan_for(&[]);
        let ingress = queue_args(&steps, &names.ingress_queue());
        assert_eq!(
            ingress.inner().get("x-delivery-limit"),
            Some(&AMQPValue::LongUInt(5))
        );
        assert_eq!(
            ingress.inner().get("x-dead-letter-strategy"),
            Some(&string("at-least-once"))
        );
        let dead = queue_args(&steps, &names.dead_queue());
        assert_eq!(dead.inner().get("x-dead-letter-exchange"), None);
        assert_eq!(dead.inner().get("x-delivery-limit"), None);
        assert_eq!(dead.inner().get("x-queue-type"), Some(&string("quorum")));
    }
}
