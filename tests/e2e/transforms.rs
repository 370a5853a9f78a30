//! End-to-end tests of filters, transforms and lookup tables (being built).
