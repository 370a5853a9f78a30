//! The `fhir` kind. Until its own reading of answers lands, it is sent as plain HTTP.

use bytes::Bytes;
use hiway_proto::Envelope;

use crate::destination::Destination;
use crate::outcome::Outcome;

/// Sends one message.
pub(crate) async fn send(destination: &Destination, envelope: &Envelope, body: Bytes) -> Outcome {
    super::http::send(destination, envelope, body).await
}
