//! The `commcare-to-dhis2-event` example (being built).
