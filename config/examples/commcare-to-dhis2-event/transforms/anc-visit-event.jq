# One CommCare "ANC Visit" form submission → one event of the DHIS2 event program
# "ANC visit" (program lxAQ7Zs9VYR, stage dBwrot7S420), in the /api/tracker payload.
#
# - The event UID is derived from the form id, so a re-sent form updates the same event.
# - The facility code the health worker chose maps to an org unit through $orgunits; an
#   unknown facility fails this message (it goes dead with the code named) rather than
#   landing in the wrong place.
# - Question values become data values; empty answers are left out.

def org_unit:
  $orgunits[.form.facility_code]
  // error("no DHIS2 org unit for facility \(.form.facility_code | tojson) (lookups/orgunits.csv)");

{
  events: [
    {
      event: (.id | dhis2_uid),
      program: "lxAQ7Zs9VYR",
      programStage: "dBwrot7S420",
      orgUnit: org_unit,
      status: "COMPLETED",
      occurredAt: "\(.form.visit_date)T00:00:00.000",
      completedAt: (.metadata.timeEnd[0:19] + ".000"),
      dataValues: [
        { dataElement: "qrur9Dvnyt5", value: .form.weight_kg },
        { dataElement: "oZg33kd9taw", value: $danger_signs[.form.danger_signs] }
      ]
      | map(select(.value != null and .value != ""))
    }
  ]
}
