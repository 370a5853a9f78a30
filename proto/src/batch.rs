//! Several accepted messages in one broker message, on the ingress → transformer hop.
//!
//! Why: much of RabbitMQ's CPU goes per broker message rather than per byte (a quorum-queue
//! append, a confirm, a delivery, an ack: the same bytes in a quarter of the messages cost it
//! 30–40% less), and on a small machine the broker is the largest consumer of CPU
//! (docs/benchmarks.md, session 18). Ingress accepts many requests at once under
//! load; carrying the ones that are waiting for a publish together in one broker message
//! takes most of one hop's broker messages away, and each request is still answered 202 only
//! after the broker confirmed the batch that holds it.
//!
//! Each message in a batch keeps what it would have had on its own: its AMQP properties (the
//! [`crate::Envelope`] is in them) and its body, byte for byte. The batch is a broker message
//! whose content type is [`CONTENT_TYPE`] and whose body is its messages one after the other,
//! each as
//!
//! ```text
//! u32 (big-endian) length of the properties | the properties, in AMQP 0-9-1's own encoding
//! u32 (big-endian) length of the body       | the body
//! ```
//!
//! AMQP's encoding of basic properties (the one a content header frame carries) is what the
//! broker would have stored for each message on its own, so nothing about a message is
//! translated, and a reader gets back exactly the [`BasicProperties`] that went in.

use amq_protocol::protocol::basic::{gen_properties, parse_properties};

use crate::amqp::{AMQPValue, BasicProperties, FieldTable};
use crate::headers;

/// The content type that marks a broker message as a batch.
pub const CONTENT_TYPE: &str = "application/vnd.hiway.batch";

/// The only batch format version this build writes and reads.
pub const VERSION: u8 = 1;

/// Why a broker message marked as a batch cannot be read. Such a batch is poison: no retry
/// can repair it, so the reader dead-letters it whole.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// Written by a newer (or older) hiway than this one reads.
    #[error("batch version {0} is not supported (this build reads version {VERSION})")]
    Version(i64),
    /// The body ends inside a message.
    #[error("the batch ends inside message {index} (at byte {offset}): {what}")]
    Truncated {
        /// Which message (0-based).
        index: usize,
        /// Where in the batch's body it was being read.
        offset: usize,
        /// What was being read.
        what: &'static str,
    },
    /// A message's properties do not decode.
    #[error("the properties of message {index} (at byte {offset}) do not decode")]
    Properties {
        /// Which message (0-based).
        index: usize,
        /// Where in the batch's body they start.
        offset: usize,
    },
    /// AMQP's encoder refused a message's properties while writing the batch.
    #[error("the message's properties cannot be encoded: {0}")]
    Encode(String),
    /// The count in the header and the messages in the body disagree.
    #[error("the batch says it holds {said} messages but its body holds {found}")]
    Count {
        /// The header's count.
        said: i64,
        /// The messages read.
        found: usize,
    },
}

/// Whether a broker message is a batch (by its content type).
pub fn is_batch(properties: &BasicProperties) -> bool {
    properties
        .content_type()
        .as_ref()
        .is_some_and(|t| t.as_str() == CONTENT_TYPE)
}

/// A batch being written: add messages, then take its body and properties.
#[derive(Debug, Default)]
pub struct BatchWriter {
    body: Vec<u8>,
    count: u32,
    scratch: Vec<u8>,
}

impl BatchWriter {
    /// An empty batch with room for about `bytes` of messages.
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            body: Vec::with_capacity(bytes),
            count: 0,
            scratch: Vec::new(),
        }
    }

    /// Appends one message. Fails, leaving the batch as it was, only if AMQP's encoder
    /// refuses the properties (hiway's own never are: writing into memory cannot fail).
    pub fn push(&mut self, properties: &BasicProperties, body: &[u8]) -> Result<(), BatchError> {
        // The properties are encoded into a buffer of their own, reused from one message to
        // the next, so that an encoder error cannot leave half a message in the batch.
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let encoded = cookie_factory::gen_simple(gen_properties(properties), scratch)
            .map_err(|e| BatchError::Encode(e.to_string()))?;
        self.body
            .extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        self.body.extend_from_slice(&encoded);
        self.body
            .extend_from_slice(&(body.len() as u32).to_be_bytes());
        self.body.extend_from_slice(body);
        self.scratch = encoded;
        self.count += 1;
        Ok(())
    }

    /// The broker message: its body, and its properties (persistent, marked as a batch, with
    /// the batch version and the count in headers).
    pub fn finish(self) -> (Vec<u8>, BasicProperties) {
        let mut h = FieldTable::default();
        h.insert(headers::VERSION.into(), AMQPValue::ShortShortUInt(VERSION));
        h.insert(headers::BATCH.into(), AMQPValue::LongUInt(self.count));
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_headers(h);
        (self.body, properties)
    }
}

/// The messages of a batch: each one's properties and body (borrowed from the batch's body).
/// Any inconsistency is an error that names the message and the byte where it was found.
pub fn read<'a>(
    properties: &BasicProperties,
    body: &'a [u8],
) -> Result<Vec<(BasicProperties, &'a [u8])>, BatchError> {
    let header = properties.headers().as_ref();
    let version = header
        .and_then(|h| h.inner().get(headers::VERSION))
        .and_then(integer)
        .unwrap_or(0);
    if version != i64::from(VERSION) {
        return Err(BatchError::Version(version));
    }
    let said = header
        .and_then(|h| h.inner().get(headers::BATCH))
        .and_then(integer);
    let mut messages = Vec::with_capacity(said.map_or(0, |n| n.clamp(0, 1024) as usize));
    let mut offset = 0;
    while offset < body.len() {
        let index = messages.len();
        let truncated = |offset, what| BatchError::Truncated {
            index,
            offset,
            what,
        };
        let (props_len, at) =
            length(body, offset).ok_or(truncated(offset, "its properties' length"))?;
        let props_bytes = body
            .get(at..at + props_len)
            .ok_or(truncated(at, "its properties"))?;
        let props = match parse_properties(props_bytes) {
            Ok((&[], p)) => p,
            _ => return Err(BatchError::Properties { index, offset: at }),
        };
        let at = at + props_len;
        let (body_len, at) = length(body, at).ok_or(truncated(at, "its body's length"))?;
        let message = body
            .get(at..at + body_len)
            .ok_or(truncated(at, "its body"))?;
        messages.push((props, message));
        offset = at + body_len;
    }
    match said {
        Some(n) if n == messages.len() as i64 => Ok(messages),
        n => Err(BatchError::Count {
            said: n.unwrap_or(-1),
            found: messages.len(),
        }),
    }
}

/// The u32 length at `at`, and the offset after it.
fn length(body: &[u8], at: usize) -> Option<(usize, usize)> {
    let bytes: [u8; 4] = body.get(at..at + 4)?.try_into().ok()?;
    Some((u32::from_be_bytes(bytes) as usize, at + 4))
}

fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChannelName, ClientName, Envelope};

    fn envelope(channel: &str) -> Envelope {
        Envelope::accepted(
            ChannelName::parse(channel).unwrap(),
            ClientName::parse("commcare").unwrap(),
            "application/json".into(),
        )
    }

    #[test]
    fn messages_come_out_of_a_batch_with_the_properties_and_bodies_they_went_in_with() {
        let (a, b) = (envelope("forms"), envelope("visits"));
        let mut w = BatchWriter::with_capacity(64);
        w.push(&a.to_properties(), br#"{"form":1}"#).unwrap();
        w.push(&b.to_properties(), b"").unwrap();
        w.push(&a.to_properties(), &[0xff, 0x00, 0x7f]).unwrap();
        let (body, props) = w.finish();
        assert!(is_batch(&props));
        assert_eq!(props.delivery_mode(), &Some(2));
        let read = read(&props, &body).unwrap();
        assert_eq!(read.len(), 3);
        assert_eq!(read[0].0, a.to_properties());
        assert_eq!(read[0].1, br#"{"form":1}"#);
        assert_eq!(read[1].0, b.to_properties());
        assert_eq!(Envelope::from_properties(&read[1].0).unwrap().id, b.id);
        assert_eq!(read[1].1, b"");
        assert_eq!(read[2].1, [0xff, 0x00, 0x7f]);
    }

    #[test]
    fn a_single_message_is_not_taken_for_a_batch() {
        assert!(!is_batch(&envelope("forms").to_properties()));
        assert!(!is_batch(&BasicProperties::default()));
    }

    #[test]
    fn a_batch_cut_short_names_the_message_and_the_byte_where_it_ends() {
        let mut w = BatchWriter::default();
        w.push(&envelope("forms").to_properties(), b"0123456789")
            .unwrap();
        w.push(&envelope("forms").to_properties(), b"abcdefghij")
            .unwrap();
        let (body, props) = w.finish();
        let cut = &body[..body.len() - 3];
        match read(&props, cut) {
            Err(BatchError::Truncated { index, what, .. }) => {
                assert_eq!((index, what), (1, "its body"));
            }
            other => panic!("expected a truncated batch, got {other:?}"),
        }
        let error = read(&props, &body[..2]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the batch ends inside message 0 (at byte 0): its properties' length"
        );
    }

    #[test]
    fn a_batch_whose_count_disagrees_with_its_body_is_refused() {
        let mut w = BatchWriter::default();
        w.push(&envelope("forms").to_properties(), b"x").unwrap();
        let (body, props) = w.finish();
        let mut h = props.headers().clone().unwrap();
        h.insert(headers::BATCH.into(), AMQPValue::LongUInt(2));
        let props = props.with_headers(h);
        assert_eq!(
            read(&props, &body).unwrap_err(),
            BatchError::Count { said: 2, found: 1 }
        );
    }

    #[test]
    fn properties_that_do_not_decode_are_refused_with_the_message_they_belong_to() {
        let mut w = BatchWriter::default();
        w.push(&envelope("forms").to_properties(), b"x").unwrap();
        let (mut body, props) = w.finish();
        // The properties' flags say a content type follows, and its length runs past them.
        body[4] = 0xff;
        body[5] = 0xff;
        assert!(matches!(
            read(&props, &body),
            Err(BatchError::Properties {
                index: 0,
                offset: 4
            })
        ));
    }

    #[test]
    fn a_batch_of_another_version_is_refused() {
        let (body, props) = BatchWriter::default().finish();
        let mut h = props.headers().clone().unwrap();
        h.insert(headers::VERSION.into(), AMQPValue::ShortShortUInt(9));
        assert_eq!(
            read(&props.with_headers(h), &body).unwrap_err(),
            BatchError::Version(9)
        );
    }
}
