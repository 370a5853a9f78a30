//! The dhis2 double (being built).
