//! The `commcare-monthly-report` example (being built).
