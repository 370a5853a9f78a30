//! A transform's output written as compact JSON, byte for byte what jaq's `Display` writes.
//!
//! jaq writes values through `core::fmt` with its pretty-printer's styles, one `write!` per
//! quote, comma and string piece, and every string through a lossy UTF-8 adapter. That made
//! serializing the example mapping's DHIS2 event about 31,000 instructions per message, a
//! tenth of what the transformer spends on one (callgrind, docs/benchmarks.md, session 16).
//! This writer appends to one buffer instead and copies valid UTF-8 as it is. The unit tests
//! hold it to jaq's output for every kind of value, escapes and invalid UTF-8 included.

use std::io::Write as _;

use jaq_json::Val;

/// `v` as compact JSON (jaq's notation for what JSON cannot say: `NaN`, byte strings, keys
/// that are not strings), appended to `out`.
pub(crate) fn write(out: &mut Vec<u8>, v: &Val) {
    match v {
        Val::Null => out.extend_from_slice(b"null"),
        Val::Bool(true) => out.extend_from_slice(b"true"),
        Val::Bool(false) => out.extend_from_slice(b"false"),
        // Writing to a Vec cannot fail.
        Val::Num(n) => write!(out, "{n}").unwrap_or_default(),
        Val::TStr(s) => match std::str::from_utf8(s) {
            Ok(_) => string(out, s),
            // jaq replaces what is not UTF-8 with U+FFFD. The bytes it escapes are ASCII,
            // which never continue a UTF-8 sequence, so replacing first and escaping then
            // gives what jaq gives.
            Err(_) => string(out, String::from_utf8_lossy(s).as_bytes()),
        },
        // Byte strings are not JSON; jaq's notation for them is rare enough to borrow as is.
        Val::BStr(_) => write!(out, "{v}").unwrap_or_default(),
        Val::Arr(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(out, item);
            }
            out.push(b']');
        }
        Val::Obj(fields) => {
            out.push(b'{');
            for (i, (key, value)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(out, key);
                out.push(b':');
                write(out, value);
            }
            out.push(b'}');
        }
    }
}

/// A JSON string of valid UTF-8 `s`, escaped as jaq escapes it: the short escapes where JSON
/// has one, `\u00XX` for the other control characters and DEL.
fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    let mut plain = 0;
    for (i, &b) in s.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f | 0x7f => &[],
            _ => continue,
        };
        out.extend_from_slice(&s[plain..i]);
        plain = i + 1;
        if short.is_empty() {
            write!(out, "\\u{b:04x}").unwrap_or_default();
        } else {
            out.extend_from_slice(short);
        }
    }
    out.extend_from_slice(&s[plain..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use jaq_json::Num;

    fn json(s: &str) -> Val {
        jaq_json::read::parse_single(s.as_bytes()).unwrap()
    }

    fn written(v: &Val) -> String {
        let mut out = Vec::new();
        write(&mut out, v);
        String::from_utf8(out).expect("the writer writes UTF-8")
    }

    fn same_as_jaq(v: &Val) {
        assert_eq!(written(v), v.to_string(), "for {v:?}");
    }

    #[test]
    fn every_kind_of_json_value_is_written_as_jaq_writes_it() {
        for text in [
            "null",
            "true",
            "false",
            "0",
            "-17",
            "3.25",
            "61.50",
            "1e400",
            "123456789012345678901234567890",
            r#""""#,
            r#""plain text""#,
            "[]",
            "{}",
            r#"[1,[2,[3,{}]],"x",null]"#,
            r#"{"events":[{"event":"a1","dataValues":[{"dataElement":"x","value":"61.5"}]}],"n":{"m":{}}}"#,
            r#""ünïcödé ✓ 日本語 🎉""#,
        ] {
            same_as_jaq(&json(text));
        }
    }

    #[test]
    fn escapes_are_written_as_jaq_writes_them() {
        same_as_jaq(&json(
            r#""quote \" backslash \\ slash / newline \n return \r tab \t backspace \b formfeed \f""#,
        ));
        let controls: String = (0u8..0x20).chain([0x7f]).map(char::from).collect();
        same_as_jaq(&Val::from(controls.clone()));
        same_as_jaq(&Val::from(format!("a{controls}b")));
        same_as_jaq(&json(r#"{"ke\"y\n":"va\u0001lue"}"#));
    }

    #[test]
    fn invalid_utf8_is_replaced_as_jaq_replaces_it() {
        for bytes in [
            &b"bad \xff byte"[..],
            b"\xe2\x82",
            b"cut \xe2\x82\nthen a newline",
            b"\xf0\x9f\x8e",
            b"\xc3\x28 \x80\x80 ok",
            b"\"\xed\xa0\x80\"",
        ] {
            same_as_jaq(&Val::utf8_str(bytes.to_vec()));
        }
    }

    #[test]
    fn what_json_cannot_say_is_written_in_jaqs_notation() {
        for v in [
            Val::Num(Num::Float(f64::NAN)),
            Val::Num(Num::Float(f64::INFINITY)),
            Val::Num(Num::Float(f64::NEG_INFINITY)),
            Val::Num(Num::Float(0.1)),
            Val::byte_str(b"by\x00tes\xff".to_vec()),
            Val::obj(
                [(json("1"), json("2")), (json("[3]"), Val::Null)]
                    .into_iter()
                    .collect(),
            ),
        ] {
            same_as_jaq(&v);
        }
    }
}
