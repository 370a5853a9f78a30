//! The openmrs double (being built).
