//! Typed ids. Each is parsed once at the boundary and cannot be built any other way.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The id of one accepted message: a UUIDv7, so ids sort by arrival and audit inserts land at
/// the end of the index. Assigned once by ingress; stable across routing, retries and replays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(Uuid);

impl MessageId {
    /// A new id for a message accepted now.
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    /// The underlying UUID, for database binds.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl From<Uuid> for MessageId {
    fn from(value: Uuid) -> Self {
        Self(value)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for MessageId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// Why a string is not a valid name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{kind} name {value:?} is not valid: use 1 to 64 characters among lowercase letters, digits, '-' and '_', starting with a letter or digit"
)]
pub struct InvalidName {
    /// Which kind of name it was meant to be ("channel", "destination", …).
    pub kind: &'static str,
    /// The rejected text.
    pub value: String,
}

fn valid_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'_')
}

/// Names are restricted because they become parts of queue names, routing keys and URLs: a
/// name that is valid here is valid in all three without escaping.
macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Parses and validates a name.
            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidName> {
                let value = value.into();
                if valid_name(&value) {
                    Ok(Self(value))
                } else {
                    Err(InvalidName { kind: $kind, value })
                }
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = InvalidName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A channel: one inbound endpoint, `POST /v1/channels/{channel}/messages`.
    ChannelName,
    "channel"
);
name_type!(
    /// A client: a source system that authenticates to ingress.
    ClientName,
    "client"
);
name_type!(
    /// A route: from which channels to which destinations.
    RouteName,
    "route"
);
name_type!(
    /// A destination: one system hiway delivers to, with its own queue and workers.
    DestinationName,
    "destination"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_lowercase_digits_dash_and_underscore() {
        assert_eq!(
            ChannelName::parse("commcare-forms_1").unwrap().as_str(),
            "commcare-forms_1"
        );
    }

    #[test]
    fn names_reject_what_would_break_a_queue_name_or_url() {
        for bad in [
            "",
            "Upper",
            "has space",
            "dot.ted",
            "-lead",
            "slash/",
            &"a".repeat(65),
        ] {
            let err = DestinationName::parse(bad).unwrap_err();
            assert_eq!(err.kind, "destination");
            assert_eq!(err.value, bad);
        }
    }

    #[test]
    fn message_ids_sort_by_creation_time() {
        let a = MessageId::generate();
        let b = MessageId::generate();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<MessageId>().unwrap(), a);
    }
}
