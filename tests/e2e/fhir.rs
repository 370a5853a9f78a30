//! End-to-end tests of the `fhir` destination kind (being built).
