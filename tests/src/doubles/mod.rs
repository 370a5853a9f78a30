//! Doubles of the health systems hiway delivers to. Each answers exactly the shapes documented
//! in `../shared/protocols.md` (success, warnings, conflicts, errors), checked against the
//! samples copied to `tests/fixtures/`.

pub mod dhis2;
pub mod fhir;
pub mod openmrs;
pub mod primero;
