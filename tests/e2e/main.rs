//! End-to-end tests: one test binary, one module per flow. Every test runs real services on
//! a real RabbitMQ and PostgreSQL; destinations are HTTP doubles.

// In tests a panic is the failure report, helpers included.
#![allow(clippy::unwrap_used)]

mod acks;
mod audit_batch;
mod audit_store;
mod batches;
mod bus;
mod cli;
mod dhis2;
mod examples;
mod failures;
mod fhir;
mod ingress;
mod logs;
mod openmrs;
mod primero;
mod retention;
mod senders;
mod traces;
mod transforms;
