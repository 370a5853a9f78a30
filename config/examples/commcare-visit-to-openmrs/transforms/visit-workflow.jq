# A CommCare "ANC Visit" form (form forwarding, JSON) → one openmrs workflow document:
# {patient, visit, encounter, obs}. The openmrs kind finds or creates the patient, then
# creates the visit, the encounter and each observation, and rolls everything back if
# OpenMRS refuses a step (docs/kinds/openmrs.md).
#
# Every site-specific uuid comes from the lookup table $openmrs (lookups/openmrs.json).

# OpenMRS wants "+0200", CommCare writes "+02:00".
def openmrs_datetime:
  length as $n | .[0:$n - 3] + .[$n - 2:];

# Fail loudly (the message goes dead with this reason) rather than send half a patient.
def required($what):
  if . == null or . == "" then error("ANC Visit form: no \($what)") else . end;

.id as $form_id
| .form as $f
| ($f.meta.timeStart | required("meta.timeStart") | openmrs_datetime) as $start
| ($f.meta.timeEnd // $f.meta.timeStart | openmrs_datetime) as $end
# Uuids are UUIDv5 of the form id and the step: the same form (a CommCare resend, a retry,
# a replay) always yields the same uuids, and the openmrs kind finds what already exists
# by GET instead of creating it twice. The patient's uuid is derived from the form too, not
# from the national id alone: a person already in OpenMRS is found by identifier and reused
# (and never rolled back); a patient uuid shared by every form about that person would make
# each later form count the patient as its own and purge it on a rollback.
| "commcare-form:\($form_id)" as $name
| {
    patient: {
      uuid: ("\($name):patient" | uuid5),
      identifiers: [{
        identifier: ($f.patient.national_id | required("patient national id")),
        identifierType: $openmrs.identifier_type,
        location: $openmrs.location,
        preferred: true
      }],
      person: {
        gender: ($openmrs.gender[$f.patient.sex // ""]
                 // error("ANC Visit form \($form_id): unknown sex \($f.patient.sex | tojson)")),
        birthdate: ($f.patient.birth_date | required("patient birth date")),
        names: [{
          givenName: ($f.patient.given_name | required("patient given name")),
          familyName: ($f.patient.family_name | required("patient family name"))
        }]
      }
    },
    # patient, visit and encounter references are left out: the kind fills them in with the
    # uuids it actually used (the patient may be an existing one found by identifier).
    visit: {
      uuid: ("\($name):visit" | uuid5),
      visitType: $openmrs.visit_type,
      startDatetime: $start,
      stopDatetime: $end,
      location: $openmrs.location
    },
    encounter: {
      uuid: ("\($name):encounter" | uuid5),
      encounterDatetime: $start,
      encounterType: $openmrs.encounter_type,
      location: $openmrs.location
    },
    # One obs per answered numeric question that has a concept in the lookup table; an
    # unanswered question makes no obs (OpenMRS refuses an obs without a value).
    obs: [
      $openmrs.concepts | to_entries[]
      | .key as $question
      | ($f[$question] // "") as $answer
      | select($answer != "")
      | {
          uuid: ("\($name):obs:\($question)" | uuid5),
          concept: .value,
          obsDatetime: $start,
          value: ($answer | tonumber)
        }
    ]
  }
