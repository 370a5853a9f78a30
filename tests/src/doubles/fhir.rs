//! The fhir double (being built).
