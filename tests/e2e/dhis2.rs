//! End-to-end tests of the `dhis2` destination kind (being built).
