//! The example configurations in `config/examples/`, each run end to end as its README says.

mod commcare_monthly_report;
mod commcare_to_dhis2_event;
mod commcare_visit_to_openmrs;
mod primero_to_childshield;
mod referral_to_fhir;
