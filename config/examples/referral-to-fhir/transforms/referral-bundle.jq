# One CHW referral form → one FHIR R4 transaction Bundle (Patient, Encounter, Observation).
#
# Sees: `.` the referral (samples/referral.json), `$reasons` the lookup table
# lookups/reasons.csv (reason code → its whole row: system, code, display), `$hiway` the
# message's metadata. See README.md for the field-by-field mapping.

# Identifier systems: the community register is the source of truth for who a patient is,
# the referral id for which visit and which measurement this is. A real deployment puts its
# own URIs here (e.g. the national client registry's).
def register_system: "urn:example:cht:community-register";
def referral_system: "urn:example:cht:referral";
def observation_system: "urn:example:cht:referral-observation";

# An unknown reason code is an error, not a guess: the message goes dead for this route with
# this text as its reason, someone adds the row to lookups/reasons.csv (re-read without a
# restart) and replays it with `hiway dlq replay`.
def reason:
  $reasons[.reason]
  // error("unknown referral reason code \(.reason): add it to lookups/reasons.csv");

# fullUrls are urn:uuids derived (uuid5) from the referral id, not random: the same referral
# sent again makes the same Bundle, byte for byte, and the references between its entries
# stay the same. The server replaces them with its own ids anyway.
def full_url($what): "urn:uuid:" + ("referral:\(.id):\($what)" | uuid5);

# CHT/CommCare write sex as free text; FHIR's gender is a fixed code list.
def gender: {male: "male", female: "female", m: "male", f: "female"}[.patient.sex | ascii_downcase] // "unknown";

reason as $reason
| full_url("patient") as $patient
| full_url("encounter") as $encounter
| full_url("observation") as $observation
| (.patient.register_id) as $register_id
| {
    resourceType: "Bundle",
    type: "transaction",
    entry: [
      {
        fullUrl: $patient,
        resource: {
          resourceType: "Patient",
          identifier: [{system: register_system, value: $register_id}],
          name: [{family: .patient.family, given: [.patient.given]}],
          gender: gender,
          birthDate: .patient.birth_date
        },
        # Conditional create: if the facility already knows this register id (an earlier
        # referral, or the same one sent again), nothing is created and the Encounter and
        # Observation below point at the existing Patient. Never overwrite the facility's
        # copy with what a CHW typed.
        request: {
          method: "POST",
          url: "Patient",
          ifNoneExist: "identifier=\(register_system)|\($register_id)"
        }
      },
      {
        fullUrl: $encounter,
        resource: {
          resourceType: "Encounter",
          identifier: [{system: referral_system, value: .id}],
          # The CHW's home visit during which the referral was made: it is over.
          status: "finished",
          # R4: one Coding (R5 made it a list). HH = home health.
          class: {
            system: "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            code: "HH",
            display: "home health"
          },
          subject: {reference: $patient},
          participant: [{individual: {
            identifier: {system: "urn:example:cht:chw", value: .chw.id},
            display: .chw.name
          }}],
          period: {start: .reported_date},
          reasonCode: [{
            coding: [{system: $reason.system, code: $reason.code, display: $reason.display}],
            text: $reason.display
          }],
          # Where the patient is sent: a logical reference (by identifier) because the
          # facility's Location id on the server is not known here.
          hospitalization: {destination: {
            identifier: {system: "urn:example:facility-code", value: .facility.code},
            display: .facility.name
          }}
        },
        # Conditional update (upsert) keyed by the referral id: a corrected referral sent
        # again updates the same Encounter instead of adding one.
        request: {method: "PUT", url: "Encounter?identifier=\(referral_system)|\(.id)"}
      },
      {
        fullUrl: $observation,
        resource: {
          resourceType: "Observation",
          identifier: [{system: observation_system, value: "\(.id):temperature"}],
          status: "final",
          category: [{coding: [{
            system: "http://terminology.hl7.org/CodeSystem/observation-category",
            code: "vital-signs",
            display: "Vital Signs"
          }]}],
          code: {coding: [{system: "http://loinc.org", code: "8310-5", display: "Body temperature"}]},
          subject: {reference: $patient},
          encounter: {reference: $encounter},
          effectiveDateTime: .reported_date,
          # UCUM: "Cel" is the code, "°C" what people read.
          valueQuantity: {
            value: .vitals.temperature_c,
            unit: "°C",
            system: "http://unitsofmeasure.org",
            code: "Cel"
          }
        },
        # Also a conditional update, never a plain POST: a plain POST would add a second
        # temperature every time the referral is retried or replayed.
        request: {
          method: "PUT",
          url: "Observation?identifier=\(observation_system)|\(.id):temperature"
        }
      }
    ]
  }
