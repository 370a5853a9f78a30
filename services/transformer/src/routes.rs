//! The routing table: for each channel, and for each destination whose dead letters on-dead
//! routes take, the routes to run and their destinations.
//!
//! Built once at start-up from the configuration, so finding a message's routes is one map
//! lookup. The routes' programs (filters and transforms) are compiled beside it, in
//! [`hiway_transform::Transforms`].

use std::collections::HashMap;

use hiway_config::Config;
use hiway_proto::{ChannelName, DestinationName, RouteName};

/// One route and the destinations it sends to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The route.
    pub route: RouteName,
    /// Its destinations, each once.
    pub destinations: Vec<DestinationName>,
}

/// Channel → routes, and destination → on-dead routes.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    by_channel: HashMap<ChannelName, Vec<Entry>>,
    on_dead: HashMap<DestinationName, Vec<Entry>>,
}

impl Routes {
    /// From the validated configuration, in route-name order.
    pub fn from_config(config: &Config) -> Self {
        let mut routes = Self::default();
        for (route, r) in &config.routes {
            let mut destinations = Vec::new();
            for d in &r.destinations {
                // The same route naming a destination twice still makes one copy.
                if !destinations.contains(d) {
                    destinations.push(d.clone());
                }
            }
            let entry = Entry {
                route: route.clone(),
                destinations,
            };
            for channel in &r.channels {
                routes
                    .by_channel
                    .entry(channel.clone())
                    .or_default()
                    .push(entry.clone());
            }
            for d in &r.on_dead {
                routes
                    .on_dead
                    .entry(d.clone())
                    .or_default()
                    .push(entry.clone());
            }
        }
        routes
    }

    /// The routes that take messages from `channel`; empty when none does.
    pub fn for_channel(&self, channel: &ChannelName) -> &[Entry] {
        self.by_channel
            .get(channel)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The on-dead routes that take dead letters of `destination`.
    pub fn on_dead_of(&self, destination: &DestinationName) -> &[Entry] {
        self.on_dead
            .get(destination)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Whether any route takes dead letters (so the on-dead queue is needed).
    pub fn has_on_dead(&self) -> bool {
        !self.on_dead.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        Config::from_toml(&format!(
            r#"
[clients.c]
api_key_sha256 = "{hash}"
[channels.a]
clients = ["c"]
[channels.b]
clients = ["c"]
[channels.quiet]
clients = ["c"]
[destinations.x]
url = "http://127.0.0.1:1/"
[destinations.y]
url = "http://127.0.0.1:1/"
[routes.fan-out]
channels = ["a"]
destinations = ["x", "y", "x"]
[routes.fan-in]
channels = ["a", "b"]
destinations = ["y"]
[routes.when-x-fails]
on_dead = ["x"]
destinations = ["y"]
"#
        ))
        .unwrap()
    }

    fn copies(entries: &[Entry]) -> Vec<String> {
        entries
            .iter()
            .flat_map(|e| {
                e.destinations
                    .iter()
                    .map(move |d| format!("{}->{d}", e.route))
            })
            .collect()
    }

    #[test]
    fn one_channel_fans_out_to_every_destination_of_every_route() {
        let routes = Routes::from_config(&config());
        assert_eq!(
            copies(routes.for_channel(&ChannelName::parse("a").unwrap())),
            ["fan-in->y", "fan-out->x", "fan-out->y"]
        );
    }

    #[test]
    fn many_channels_fan_in_to_one_destination() {
        let routes = Routes::from_config(&config());
        assert_eq!(
            copies(routes.for_channel(&ChannelName::parse("b").unwrap())),
            ["fan-in->y"]
        );
    }

    #[test]
    fn a_channel_no_route_takes_has_no_routes() {
        let routes = Routes::from_config(&config());
        assert!(
            routes
                .for_channel(&ChannelName::parse("quiet").unwrap())
                .is_empty()
        );
    }

    #[test]
    fn on_dead_routes_are_found_by_the_destination_that_failed() {
        let routes = Routes::from_config(&config());
        assert!(routes.has_on_dead());
        assert_eq!(
            copies(routes.on_dead_of(&DestinationName::parse("x").unwrap())),
            ["when-x-fails->y"]
        );
        assert!(
            routes
                .on_dead_of(&DestinationName::parse("y").unwrap())
                .is_empty()
        );
    }
}
