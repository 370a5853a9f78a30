//! W3C Trace Context (`traceparent`, `tracestate`): which values hiway carries.
//!
//! A source's trace context goes through hiway to its destinations, so that a tracing system
//! that sees both ends joins them into one trace. Without trace export hiway records no spans
//! in that trace and passes the headers on as they came, as the recommendation asks of a
//! system that does not take part; with export on (`[telemetry]`, docs/operations.md
//! "Traces"), each service's span joins the source's trace and the context handed on is that
//! span's. Either way only values that parse are carried: a bad one is dropped, not refused
//! (the recommendation says a bad `traceparent` must not fail the request, and forwarding it
//! would only hand the destination the same problem).
//!
//! <https://www.w3.org/TR/trace-context/>

/// The longest `tracestate` carried. The recommendation asks that at least 512 characters be
/// passed on and lets a system drop what it cannot pass whole.
pub const MAX_TRACESTATE: usize = 512;

/// `value` if it is a valid `traceparent`, else `None`.
///
/// `version-traceid-parentid-flags`: two lowercase hex digits each for version and flags,
/// 32 and 16 for the ids, which must not be all zeros. Version `ff` is invalid; version `00`
/// has exactly these four fields; a later version may append fields after another `-`, and
/// only its first four are read.
pub fn traceparent(value: &str) -> Option<&str> {
    let bytes = value.as_bytes();
    if bytes.len() < 55 {
        return None;
    }
    let (version, trace_id, parent_id, flags) =
        (&bytes[0..2], &bytes[3..35], &bytes[36..52], &bytes[53..55]);
    let dashes = bytes[2] == b'-' && bytes[35] == b'-' && bytes[52] == b'-';
    let hex = |field: &[u8]| field.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let zeros = |field: &[u8]| field.iter().all(|b| *b == b'0');
    let rest_ok = match (version, bytes.len()) {
        (b"00", len) => len == 55,
        (_, 55) => true,
        _ => bytes[55] == b'-',
    };
    let valid = dashes
        && [version, trace_id, parent_id, flags].into_iter().all(hex)
        && version != b"ff"
        && !zeros(trace_id)
        && !zeros(parent_id)
        && rest_ok;
    valid.then_some(value)
}

/// The most list members a `tracestate` may have, as the recommendation says.
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// `value` if it may be carried as a `tracestate`: printable ASCII (the header's own
/// character set), at most [`MAX_TRACESTATE`] bytes, not empty once trimmed, and at most
/// [`MAX_TRACESTATE_MEMBERS`] list members (empty members, which joining several header lines
/// can leave, are allowed and not counted).
pub fn tracestate(value: &str) -> Option<&str> {
    let members = value
        .split(',')
        .filter(|member| !member.trim_matches([' ', '\t']).is_empty())
        .count();
    let valid = value.len() <= MAX_TRACESTATE
        && members > 0
        && members <= MAX_TRACESTATE_MEMBERS
        && value
            .bytes()
            .all(|b| matches!(b, b' ' | b'\t' | 0x21..=0x7e));
    valid.then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn the_recommendations_example_traceparent_is_carried_as_it_is() {
        assert_eq!(traceparent(GOOD), Some(GOOD));
        let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        assert_eq!(traceparent(unsampled), Some(unsampled));
    }

    #[test]
    fn a_traceparent_with_a_wrong_shape_or_zero_ids_is_dropped() {
        for bad in [
            "",
            "garbage",
            // Uppercase hex is not allowed.
            "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
            // All-zero trace id, then all-zero parent id.
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            // Version ff is forbidden.
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            // Version 00 has exactly four fields.
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            // A separator in the wrong place.
            "00-0af7651916cd43dd8448eb211c80319cb-7ad6b7169203331-01",
            // Not hex.
            "00-0af7651916cd43dd8448eb211c80319z-b7ad6b7169203331-01",
        ] {
            assert_eq!(traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_may_add_fields_after_a_dash() {
        let later = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-comes-next";
        assert_eq!(traceparent(later), Some(later));
        let glued = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x";
        assert_eq!(traceparent(glued), None);
    }

    #[test]
    fn a_tracestate_is_carried_unless_it_is_empty_too_long_or_not_printable() {
        assert_eq!(
            tracestate("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        assert_eq!(tracestate("  "), None);
        assert_eq!(tracestate(&"a=b,".repeat(200)), None, "over 512 bytes");
        assert_eq!(tracestate("a=b\u{7f}"), None);
    }

    #[test]
    fn a_tracestate_of_more_than_32_members_is_dropped_and_empty_members_do_not_count() {
        let members = |n: usize| (0..n).map(|i| format!("v{i}=x")).collect::<Vec<_>>();
        let thirty_two = members(32).join(",");
        assert_eq!(tracestate(&thirty_two), Some(thirty_two.as_str()));
        assert_eq!(tracestate(&members(33).join(",")), None);
        let with_empty = format!("{thirty_two}, ,,");
        assert_eq!(tracestate(&with_empty), Some(with_empty.as_str()));
        assert_eq!(tracestate(" , ,"), None, "only empty members");
    }
}
