//! The `referral-to-fhir` example (being built).
