//! The `primero-to-childshield` example (being built).
