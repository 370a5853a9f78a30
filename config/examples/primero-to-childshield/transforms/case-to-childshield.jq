# A Primero case record ({"data": {…}}, as GET /api/v2/cases/<id> returns it) → one
# ChildShield case for POST /api/v1/cases (the contract is in ../README.md).
#
# Option codes become Thai labels through $labels (../lookups/labels.json). A code that has
# no label there stops this case for this route with a reason naming the field and the code:
# add the label to the table (it is re-read without a restart), then `hiway dlq replay`.
# Sending the English code instead would put a value ChildShield's users cannot read.

# The Thai label of one option code of `field`; an absent or empty value stays null.
def thai($field):
  if . == null or . == "" then null
  else $labels[$field][.] // error("no Thai label for \($field) code \(.) in lookups/labels.json")
  end;

# A multi-select (an array of codes; a lone code is taken as one element) → its labels, in
# Primero's order.
def thai_each($field):
  if . == null then [] elif type == "array" then map(thai($field)) else [thai($field)] end;

.data as $case
| {
    # Primero's own case id: ChildShield keys the case on it (409 when it already has it),
    # and the sync-failed route uses it to find the case in Primero again.
    case_ref: $case.id,
    source_system: "primero",
    primero_case_number: $case.case_id_display,
    registration_date: $case.registration_date,
    child: {
      name: $case.name,
      sex: ($case.sex | thai("sex")),
      age: $case.age,
      date_of_birth: $case.date_of_birth,
      nationality: ($case.nationality | thai_each("nationality"))
    },
    risk_level: ($case.risk_level | thai("risk_level")),
    risks: ($case.protection_concerns | thai_each("protection_concerns")),
    caseworker: $case.owned_by
  }
