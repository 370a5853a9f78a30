//! How each kind of destination is spoken to.
//!
//! Every kind takes one message (its envelope and body) and comes back with one [`Outcome`];
//! what happens then (ack, retry queue, dead letter) is the same for all of them and lives in
//! the crate root. A kind owns everything between: which requests to make (one for `http`, a
//! post and job polls for asynchronous `dhis2` imports, a workflow of several for `openmrs`)
//! and how to read the answers.

pub(crate) mod dhis2;
pub(crate) mod fhir;
pub(crate) mod http;
pub(crate) mod openmrs;

use bytes::Bytes;
use hiway_config::DestinationKind;
use hiway_proto::Envelope;

use crate::destination::Destination;
use crate::outcome::Outcome;

/// Sends one message the way its destination's kind requires.
pub(crate) async fn send(destination: &Destination, envelope: &Envelope, body: Bytes) -> Outcome {
    match destination.kind {
        DestinationKind::Http => http::send(destination, envelope, body).await,
        DestinationKind::Dhis2 => dhis2::send(destination, envelope, body).await,
        DestinationKind::Fhir => fhir::send(destination, envelope, body).await,
        DestinationKind::Openmrs => openmrs::send(destination, envelope, body).await,
    }
}
