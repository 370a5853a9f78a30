# One CommCare "Monthly Summary" form → one DHIS2 data value set per facility in it
# (data set pBOMPrpg1QX, "Reproductive Health", monthly), for POST /api/dataValueSets.
#
# - The form's repeat group `facility` holds one entry per facility. CommCare's JSON gives a
#   repeat with one entry as an object and one with several as an array: both are read.
# - Each facility's code maps to an org unit through $orgunits; an unknown code fails the
#   whole report (it goes dead with the code named), so no facility's numbers land in the
#   wrong place and a replay after the fix sends the whole report.
# - Each column named in lookups/columns.csv becomes one data value, in the data element and
#   category option combo of its row: one column per category option combination.
#   Columns not in the table (facility_code, notes…) are not data. An empty answer is left
#   out; anything but a whole number fails the report with the column and facility named.
# - The month "2024-02" is DHIS2's monthly period "202402".

def period:
  if test("^[0-9]{4}-(0[1-9]|1[0-2])$") then sub("-"; "")
  else error("month \(tojson) is not YYYY-MM")
  end;

def facilities:
  if type == "array" then .[] elif type == "object" then . else empty end;

def org_unit:
  $orgunits[.facility_code]
  // error("no DHIS2 org unit for facility \(.facility_code | tojson) (lookups/orgunits.csv)");

def count($column; $facility):
  if type == "number" and . >= 0 and . == floor then tostring
  elif type == "string" and test("^[0-9]+$") then .
  else error("column \($column) of facility \($facility | tojson) is not a count: \(tojson)")
  end;

(.form.month | period) as $period
| (.metadata.timeEnd // .received_on | .[0:10]) as $submitted
| .form.facility
| facilities
| . as $row
| {
    dataSet: "pBOMPrpg1QX",
    period: $period,
    orgUnit: org_unit,
    completeDate: $submitted,
    dataValues: [
      $columns
      | to_entries[]
      | .key as $column
      | .value as $mapping
      | $row[$column]
      | select(. != null and . != "")
      | {
          dataElement: $mapping.data_element,
          categoryOptionCombo: $mapping.category_option_combo,
          value: count($column; $row.facility_code)
        }
    ]
  }
