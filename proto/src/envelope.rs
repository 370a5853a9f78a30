//! Message metadata, carried in AMQP properties and `x-hiway-*` headers.
//!
//! The payload is never wrapped: it travels as the AMQP body exactly as the source sent it, so
//! a destination receives the same bytes and nothing has to re-encode them on the hot path.

use crate::amqp::BasicProperties;
use crate::amqp::{AMQPValue, FieldTable, LongString, ShortString};
use chrono::{DateTime, TimeZone, Utc};

use crate::headers;
use crate::ids::{ChannelName, ClientName, DestinationName, InvalidName, MessageId, RouteName};

/// The only envelope version this build writes and reads.
pub const VERSION: u8 = 1;

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// What hiway knows about a message, besides its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Assigned once by ingress.
    pub id: MessageId,
    /// Where it came in.
    pub channel: ChannelName,
    /// Who sent it.
    pub client: ClientName,
    /// The content type the source declared, e.g. `application/json`.
    pub content_type: String,
    /// When ingress accepted it.
    pub received_at: DateTime<Utc>,
    /// Set on each fanned-out copy: the destination it is for.
    pub destination: Option<DestinationName>,
    /// Set on each fanned-out copy: the route that chose the destination.
    pub route: Option<RouteName>,
    /// Delivery attempts made so far.
    pub attempt: u32,
    /// Times an operator replayed it.
    pub replay: u32,
    /// W3C trace context of the request that brought it in (valid values only, see
    /// [`crate::trace`]); passed on to destinations.
    pub traceparent: Option<String>,
    /// The `tracestate` that came with a valid `traceparent`.
    pub tracestate: Option<String>,
    /// Set when a route's transform made this copy: which of its outputs it is (0-based), so
    /// that each output has its own idempotency key.
    pub part: Option<u32>,
    /// A path, relative to the destination's URL, chosen by a transform that emits requests.
    pub path: Option<String>,
    /// An HTTP method chosen by a transform that emits requests.
    pub method: Option<String>,
    /// Set on copies made by an on-dead route (from a dead letter): such a copy going dead
    /// does not trigger on-dead routes again, so failures cannot loop.
    pub from_dead: bool,
}

/// Why AMQP properties do not make an envelope. Such a message is poison: it is dead-lettered,
/// never requeued, because no retry can repair it.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// A property or header that must be present is missing.
    #[error("the message has no {0}")]
    Missing(&'static str),
    /// A header is there but of the wrong type or unparsable.
    #[error("the {field} of the message is not valid: {reason}")]
    Invalid {
        /// Which property or header.
        field: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// A name header holds an invalid name.
    #[error(transparent)]
    Name(#[from] InvalidName),
    /// Written by a newer (or older) hiway than this one reads.
    #[error("envelope version {0} is not supported (this build reads version {VERSION})")]
    Version(i64),
}

impl Envelope {
    /// The envelope of a message ingress just accepted.
    pub fn accepted(channel: ChannelName, client: ClientName, content_type: String) -> Self {
        Self {
            id: MessageId::generate(),
            channel,
            client,
            content_type,
            received_at: Utc::now(),
            destination: None,
            route: None,
            attempt: 0,
            replay: 0,
            traceparent: None,
            tracestate: None,
            part: None,
            path: None,
            method: None,
            from_dead: false,
        }
    }

    /// The key a destination can dedupe on: the message id for an untransformed copy; with the
    /// route and output index added for a transform's output, so that two outputs of one
    /// message (or two routes' outputs) are never taken for duplicates of each other, while a
    /// retry of the same output keeps its key.
    pub fn idempotency_key(&self) -> String {
        match (&self.route, self.part) {
            (Some(route), Some(part)) => format!("{}:{route}:{part}", self.id),
            _ => self.id.to_string(),
        }
    }

    /// The copy of this message for one destination, chosen by one route.
    pub fn for_destination(&self, destination: DestinationName, route: RouteName) -> Self {
        Self {
            destination: Some(destination),
            route: Some(route),
            attempt: 0,
            part: None,
            path: None,
            method: None,
            ..self.clone()
        }
    }

    /// AMQP properties for publishing: persistent, with every field as a property or header.
    pub fn to_properties(&self) -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert(headers::VERSION.into(), AMQPValue::ShortShortUInt(VERSION));
        h.insert(headers::CHANNEL.into(), long_string(self.channel.as_str()));
        h.insert(headers::CLIENT.into(), long_string(self.client.as_str()));
        h.insert(
            headers::RECEIVED_AT.into(),
            AMQPValue::LongLongInt(self.received_at.timestamp_micros()),
        );
        if let Some(destination) = &self.destination {
            h.insert(
                headers::DESTINATION.into(),
                long_string(destination.as_str()),
            );
        }
        if let Some(route) = &self.route {
            h.insert(headers::ROUTE.into(), long_string(route.as_str()));
        }
        h.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(self.attempt));
        h.insert(headers::REPLAY.into(), AMQPValue::LongUInt(self.replay));
        if let Some(traceparent) = &self.traceparent {
            h.insert(headers::TRACEPARENT.into(), long_string(traceparent));
        }
        if let Some(tracestate) = &self.tracestate {
            h.insert(headers::TRACESTATE.into(), long_string(tracestate));
        }
        if let Some(part) = self.part {
            h.insert(headers::PART.into(), AMQPValue::LongUInt(part));
        }
        if let Some(path) = &self.path {
            h.insert(headers::PATH.into(), long_string(path));
        }
        if let Some(method) = &self.method {
            h.insert(headers::METHOD.into(), long_string(method));
        }
        if self.from_dead {
            h.insert(headers::FROM_DEAD.into(), AMQPValue::Boolean(true));
        }
        BasicProperties::default()
            .with_message_id(ShortString::from(self.id.to_string()))
            .with_content_type(ShortString::from(self.content_type.as_str()))
            .with_timestamp(self.received_at.timestamp().max(0) as u64)
            .with_delivery_mode(PERSISTENT)
            .with_headers(h)
    }

    /// Reads an envelope back from AMQP properties.
    pub fn from_properties(props: &BasicProperties) -> Result<Self, EnvelopeError> {
        let id = props
            .message_id()
            .as_ref()
            .ok_or(EnvelopeError::Missing("message_id property"))?;
        let id = id
            .as_str()
            .parse::<MessageId>()
            .map_err(|e| EnvelopeError::Invalid {
                field: "message_id property",
                reason: e.to_string(),
            })?;
        let empty = FieldTable::default();
        let h = props.headers().as_ref().unwrap_or(&empty);
        let version = int(h, headers::VERSION)?.ok_or(EnvelopeError::Missing(headers::VERSION))?;
        if version != i64::from(VERSION) {
            return Err(EnvelopeError::Version(version));
        }
        let received_micros =
            int(h, headers::RECEIVED_AT)?.ok_or(EnvelopeError::Missing(headers::RECEIVED_AT))?;
        let received_at =
            Utc.timestamp_micros(received_micros)
                .single()
                .ok_or(EnvelopeError::Invalid {
                    field: headers::RECEIVED_AT,
                    reason: format!("{received_micros} is out of range"),
                })?;
        Ok(Self {
            id,
            channel: ChannelName::parse(
                text(h, headers::CHANNEL)?.ok_or(EnvelopeError::Missing(headers::CHANNEL))?,
            )?,
            client: ClientName::parse(
                text(h, headers::CLIENT)?.ok_or(EnvelopeError::Missing(headers::CLIENT))?,
            )?,
            content_type: props
                .content_type()
                .as_ref()
                .map(|c| c.as_str().to_owned())
                .unwrap_or_else(|| "application/octet-stream".to_owned()),
            received_at,
            destination: text(h, headers::DESTINATION)?
                .map(DestinationName::parse)
                .transpose()?,
            route: text(h, headers::ROUTE)?.map(RouteName::parse).transpose()?,
            attempt: counter(h, headers::ATTEMPT)?,
            replay: counter(h, headers::REPLAY)?,
            traceparent: text(h, headers::TRACEPARENT)?,
            tracestate: text(h, headers::TRACESTATE)?,
            part: int(h, headers::PART)?
                .map(|v| {
                    u32::try_from(v).map_err(|_| EnvelopeError::Invalid {
                        field: headers::PART,
                        reason: format!("{v} is not an index"),
                    })
                })
                .transpose()?,
            path: text(h, headers::PATH)?,
            method: text(h, headers::METHOD)?,
            from_dead: matches!(
                h.inner().get(headers::FROM_DEAD),
                Some(AMQPValue::Boolean(true))
            ),
        })
    }
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn text(h: &FieldTable, key: &'static str) -> Result<Option<String>, EnvelopeError> {
    match h.inner().get(key) {
        None => Ok(None),
        Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec())
            .map(Some)
            .map_err(|_| EnvelopeError::Invalid {
                field: key,
                reason: "not UTF-8".into(),
            }),
        Some(AMQPValue::ShortString(s)) => Ok(Some(s.as_str().to_owned())),
        Some(other) => Err(EnvelopeError::Invalid {
            field: key,
            reason: format!("expected a string, found {other:?}"),
        }),
    }
}

fn int(h: &FieldTable, key: &'static str) -> Result<Option<i64>, EnvelopeError> {
    Ok(match h.inner().get(key) {
        None => None,
        Some(AMQPValue::ShortShortUInt(v)) => Some(i64::from(*v)),
        Some(AMQPValue::ShortShortInt(v)) => Some(i64::from(*v)),
        Some(AMQPValue::ShortUInt(v)) => Some(i64::from(*v)),
        Some(AMQPValue::ShortInt(v)) => Some(i64::from(*v)),
        Some(AMQPValue::LongUInt(v)) => Some(i64::from(*v)),
        Some(AMQPValue::LongInt(v)) => Some(i64::from(*v)),
        Some(AMQPValue::LongLongInt(v)) => Some(*v),
        Some(other) => {
            return Err(EnvelopeError::Invalid {
                field: key,
                reason: format!("expected an integer, found {other:?}"),
            });
        }
    })
}

fn counter(h: &FieldTable, key: &'static str) -> Result<u32, EnvelopeError> {
    match int(h, key)? {
        None => Ok(0),
        Some(v) => u32::try_from(v).map_err(|_| EnvelopeError::Invalid {
            field: key,
            reason: format!("{v} is not a count"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        let mut e = Envelope::accepted(
            ChannelName::parse("commcare").unwrap(),
            ClientName::parse("commcare-prod").unwrap(),
            "application/json".into(),
        );
        e.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        e.tracestate = Some("congo=t61rcWkgMzE".into());
        e
    }

    #[test]
    fn a_transform_output_keeps_its_index_path_and_method_through_amqp() {
        let mut copy = sample().for_destination(
            DestinationName::parse("primero").unwrap(),
            RouteName::parse("sync-failed").unwrap(),
        );
        copy.part = Some(2);
        copy.path = Some("cases/4a7c".into());
        copy.method = Some("PATCH".into());
        copy.from_dead = true;
        let back = Envelope::from_properties(&copy.to_properties()).unwrap();
        assert_eq!(back.part, Some(2));
        assert_eq!(back.path.as_deref(), Some("cases/4a7c"));
        assert_eq!(back.method.as_deref(), Some("PATCH"));
        assert!(back.from_dead);
        assert_eq!(back.idempotency_key(), format!("{}:sync-failed:2", copy.id));
    }

    #[test]
    fn an_untransformed_copy_is_keyed_by_its_message_id_alone() {
        let copy = sample().for_destination(
            DestinationName::parse("dhis2").unwrap(),
            RouteName::parse("forms").unwrap(),
        );
        assert_eq!(copy.idempotency_key(), copy.id.to_string());
    }

    #[test]
    fn an_envelope_survives_the_trip_through_amqp_properties() {
        let original = sample().for_destination(
            DestinationName::parse("dhis2").unwrap(),
            RouteName::parse("forms-to-dhis2").unwrap(),
        );
        let back = Envelope::from_properties(&original.to_properties()).unwrap();
        // Microsecond precision is what the header keeps.
        assert_eq!(
            back.received_at.timestamp_micros(),
            original.received_at.timestamp_micros()
        );
        assert_eq!(
            Envelope {
                received_at: original.received_at,
                ..back
            },
            original
        );
    }

    #[test]
    fn published_messages_are_persistent() {
        assert_eq!(*sample().to_properties().delivery_mode(), Some(2));
    }

    #[test]
    fn a_message_without_an_id_is_rejected_naming_the_property() {
        let props = sample()
            .to_properties()
            .with_message_id("not-a-uuid".into());
        let err = Envelope::from_properties(&props).unwrap_err();
        assert!(err.to_string().contains("message_id"), "{err}");
    }

    #[test]
    fn a_newer_envelope_version_is_refused_not_misread() {
        let mut h = sample().to_properties().headers().clone().unwrap();
        h.insert(headers::VERSION.into(), AMQPValue::ShortShortUInt(2));
        let props = sample().to_properties().with_headers(h);
        assert!(matches!(
            Envelope::from_properties(&props),
            Err(EnvelopeError::Version(2))
        ));
    }
}
