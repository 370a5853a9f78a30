//! End-to-end tests of the `openmrs` destination kind (being built).
