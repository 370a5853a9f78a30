# A ChildShield dead letter ({message_id, channel, destination, route, reason, body}, where
# body is the case as it was sent to ChildShield) → one PATCH of that case in Primero.
# Primero merges the fields of a PATCH into the case, so nothing else in it changes.
{
  method: "PATCH",
  path: "cases/\(.body.case_ref)",
  body: {
    data: {
      childshield_sync_status: "failed",
      # hiway's reason holds ChildShield's own answer ("permanent failure: HTTP 422 …:
      # {"errors": [{"field": …, "message": …}]}"), which is what the caseworker must fix.
      childshield_sync_error: .reason
    }
  }
}
