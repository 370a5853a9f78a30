//! The routing table: for each channel, the (route, destination) copies to make.
//!
//! Built once at start-up from the configuration, so routing a message is one map lookup.
//! A route will later also carry a filter and a transform (jq programs compiled at start-up);
//! [`Copy`] is where their compiled forms will sit.

use std::collections::HashMap;

use hiway_config::Config;
use hiway_proto::{ChannelName, DestinationName, RouteName};

/// One copy of a message: which route makes it, for which destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copy {
    /// The route.
    pub route: RouteName,
    /// Its destination.
    pub destination: DestinationName,
}

/// Channel → copies.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    by_channel: HashMap<ChannelName, Vec<Copy>>,
}

impl Routes {
    /// From the validated configuration, in route-name order.
    pub fn from_config(config: &Config) -> Self {
        let mut by_channel: HashMap<ChannelName, Vec<Copy>> = HashMap::new();
        for (route, r) in &config.routes {
            for channel in &r.channels {
                let copies = by_channel.entry(channel.clone()).or_default();
                for destination in &r.destinations {
                    let copy = Copy {
                        route: route.clone(),
                        destination: destination.clone(),
                    };
                    // The same route naming a destination twice still makes one copy.
                    if !copies.contains(&copy) {
                        copies.push(copy);
                    }
                }
            }
        }
        Self { by_channel }
    }

    /// The copies for a message from `channel`; empty when no route takes it.
    pub fn copies(&self, channel: &ChannelName) -> &[Copy] {
        self.by_channel
            .get(channel)
            .map(Vec::as_slice)
            .unwrap_or(&[])
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
"#
        ))
        .unwrap()
    }

    #[test]
    fn one_channel_fans_out_to_every_destination_of_every_route() {
        let routes = Routes::from_config(&config());
        let copies: Vec<_> = routes
            .copies(&ChannelName::parse("a").unwrap())
            .iter()
            .map(|c| format!("{}->{}", c.route, c.destination))
            .collect();
        assert_eq!(copies, ["fan-in->y", "fan-out->x", "fan-out->y"]);
    }

    #[test]
    fn many_channels_fan_in_to_one_destination() {
        let routes = Routes::from_config(&config());
        let b = routes.copies(&ChannelName::parse("b").unwrap());
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].destination.as_str(), "y");
    }

    #[test]
    fn a_channel_no_route_takes_has_no_copies() {
        let routes = Routes::from_config(&config());
        assert!(
            routes
                .copies(&ChannelName::parse("quiet").unwrap())
                .is_empty()
        );
    }
}
