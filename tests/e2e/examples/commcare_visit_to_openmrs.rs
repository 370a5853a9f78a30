//! The `commcare-visit-to-openmrs` example (being built).
