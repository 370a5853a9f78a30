//! One jq program: compiled once by jaq, run per message.
//!
//! Programs see the global variables `$hiway` (the message's metadata) and one `$<name>` per
//! lookup table, and two functions hiway adds to jq's: `uuid5` (a UUID derived from a string,
//! the same every time, so a re-sent message creates nothing twice in systems that take
//! client-chosen ids) and `dhis2_uid` (the same idea as an 11-character DHIS2 UID).

use jaq_core::data::JustLut;
use jaq_core::load::{Arena, File, Loader};
use jaq_core::native::{Filter, Fun, bome, run, v};
use jaq_core::{Compiler, Ctx, Vars, unwrap_valr};
use jaq_core::{DataT, RunPtr};
use jaq_json::Val;

type Data = JustLut<Val>;

/// A compiled program.
pub struct Program {
    filter: jaq_core::Filter<Data>,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Program")
    }
}

impl Program {
    /// Compiles `code`, with these global variable names (each starting with `$`). The error
    /// is jq's, with the line and column it points at.
    pub fn compile(code: &str, globals: &[String]) -> Result<Self, String> {
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs());
        let funs = jaq_core::funs()
            .chain(jaq_std::funs())
            .chain(jaq_json::funs())
            .chain(hiway_funs());
        let loader = Loader::new(defs);
        let arena = Arena::default();
        let modules = loader
            .load(&arena, File { code, path: () })
            .map_err(|errors| {
                let mut out = Vec::new();
                for (_file, error) in errors {
                    match error {
                        jaq_core::load::Error::Io(e) => {
                            out.extend(e.into_iter().map(|(p, m)| format!("{p}: {m}")));
                        }
                        jaq_core::load::Error::Lex(e) => {
                            out.extend(e.into_iter().map(|(expect, at)| {
                                format!("{}: expected {}", position(code, at), expect.as_str())
                            }));
                        }
                        jaq_core::load::Error::Parse(e) => {
                            out.extend(e.into_iter().map(|(expect, at)| {
                                let found = if at.is_empty() {
                                    "the end of the program".to_owned()
                                } else {
                                    format!("{at:?}")
                                };
                                format!(
                                    "{}: expected {}, found {found}",
                                    position(code, at),
                                    expect.as_str()
                                )
                            }));
                        }
                    }
                }
                out.join("; ")
            })?;
        let filter = Compiler::default()
            .with_funs(funs)
            .with_global_vars(globals.iter().map(String::as_str))
            .compile(modules)
            .map_err(|errors| {
                errors
                    .into_iter()
                    .flat_map(|(_file, errs)| errs)
                    .map(|(name, undefined)| {
                        format!(
                            "{}: undefined {} {name}",
                            position(code, name),
                            undefined.as_str()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            })?;
        Ok(Self { filter })
    }

    /// Runs the program on `input` with the global variables' values (in the order their names
    /// were given to [`Program::compile`]); every output, or the first error.
    pub fn run(
        &self,
        input: Val,
        globals: impl IntoIterator<Item = Val>,
    ) -> Result<Vec<Val>, String> {
        let ctx = Ctx::<Data>::new(&self.filter.lut, Vars::new(globals));
        self.filter
            .id
            .run((ctx, input))
            .map(unwrap_valr)
            .map(|r| r.map_err(error_text))
            .collect()
    }

    /// Whether the program's first output is true (anything but `false` and `null`). No output
    /// at all counts as false, as `select` would have it.
    pub fn test(&self, input: Val, globals: impl IntoIterator<Item = Val>) -> Result<bool, String> {
        let ctx = Ctx::<Data>::new(&self.filter.lut, Vars::new(globals));
        match self.filter.id.run((ctx, input)).map(unwrap_valr).next() {
            None => Ok(false),
            Some(Ok(v)) => Ok(!matches!(v, Val::Null | Val::Bool(false))),
            Some(Err(e)) => Err(error_text(e)),
        }
    }
}

/// The text of a run-time error: a string given to `error(…)` as it is, not JSON-quoted, so
/// the reason in a dead letter reads as the program's author wrote it.
fn error_text(e: jaq_core::Error<Val>) -> String {
    match e.into_val() {
        Val::TStr(s) => String::from_utf8_lossy(&s).into_owned(),
        other => other.to_string(),
    }
}

/// "line L, column C" of `at` (a slice of `code`) or "at the end" when it is not inside it.
fn position(code: &str, at: &str) -> String {
    let start = code.as_ptr() as usize;
    let here = at.as_ptr() as usize;
    if here < start || here > start + code.len() {
        return "in the program".to_owned();
    }
    let offset = here - start;
    let before = &code[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}")
}

/// The functions hiway adds to jq's.
fn hiway_funs<D: for<'a> DataT<V<'a> = Val>>() -> impl Iterator<Item = Fun<D>> {
    base().into_vec().into_iter().map(run)
}

fn base<D: for<'a> DataT<V<'a> = Val>>() -> Box<[Filter<RunPtr<D>>]> {
    Box::new([
        ("uuid5", v(0), |cv| {
            bome(text(&cv.1).map(|s| Val::from(uuid5(&s))))
        }),
        ("dhis2_uid", v(0), |cv| {
            bome(text(&cv.1).map(|s| Val::from(dhis2_uid(&s))))
        }),
    ])
}

fn text(v: &Val) -> Result<String, jaq_core::Error<Val>> {
    match v {
        Val::TStr(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        other => Err(jaq_core::Error::str(format_args!(
            "expected a string to derive an id from, found {other}"
        ))),
    }
}

/// hiway's UUID namespace: ids derived from the same string are the same in every
/// installation, and differ from other tools' v5 ids of the same string.
const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6869_7761_792d_4e53_8000_0000_0000_0001);

/// A UUID (version 5) derived from `name`.
pub fn uuid5(name: &str) -> String {
    uuid::Uuid::new_v5(&NAMESPACE, name.as_bytes()).to_string()
}

/// An 11-character DHIS2 UID derived from `name`: a letter, then ten letters or digits, as
/// DHIS2's `CodeGenerator` makes them.
pub fn dhis2_uid(name: &str) -> String {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    const ALPHANUMERIC: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let bytes = uuid::Uuid::new_v5(&NAMESPACE, name.as_bytes()).into_bytes();
    let mut uid = String::with_capacity(11);
    uid.push(char::from(LETTERS[usize::from(bytes[0]) % LETTERS.len()]));
    for b in &bytes[1..11] {
        uid.push(char::from(
            ALPHANUMERIC[usize::from(*b) % ALPHANUMERIC.len()],
        ));
    }
    uid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Val {
        jaq_json::read::parse_single(s.as_bytes()).unwrap()
    }

    fn out(p: &Program, input: &str) -> Vec<String> {
        p.run(json(input), [])
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_program_may_emit_zero_one_or_many_outputs() {
        let p = Program::compile(".items[] | {n: .}", &[]).unwrap();
        assert_eq!(
            out(&p, r#"{"items":[1,2,3]}"#),
            [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#]
        );
        assert!(out(&p, r#"{"items":[]}"#).is_empty());
    }

    #[test]
    fn a_syntax_error_names_the_line_and_column() {
        let err = Program::compile(".a |\n  {b: .c", &[]).unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("expected"), "{err}");
    }

    #[test]
    fn an_undefined_variable_or_function_is_a_compile_error() {
        let err = Program::compile("$orgunits[.x]", &[]).unwrap_err();
        assert!(err.contains("undefined variable"), "{err}");
        assert!(err.contains("orgunits"), "{err}");
        let err = Program::compile("frobnicate(1)", &[]).unwrap_err();
        assert!(err.contains("undefined filter"), "{err}");
    }

    #[test]
    fn global_variables_are_bound_in_the_order_given() {
        let p = Program::compile("[$a, $b]", &["$a".into(), "$b".into()]).unwrap();
        let got = p.run(Val::Null, [json("1"), json(r#""x""#)]).unwrap();
        assert_eq!(got[0].to_string(), r#"[1,"x"]"#);
    }

    #[test]
    fn a_runtime_error_is_reported_not_panicked() {
        let p = Program::compile(".a + 1", &[]).unwrap();
        let err = p.run(json(r#"{"a":"text"}"#), []).unwrap_err();
        assert!(err.contains("text"), "{err}");
    }

    #[test]
    fn an_error_raised_with_a_message_reads_as_written() {
        let p = Program::compile(r#"error("no org unit for \(.f | tojson)")"#, &[]).unwrap();
        let err = p.run(json(r#"{"f":"FAC-9"}"#), []).unwrap_err();
        assert_eq!(err, r#"no org unit for "FAC-9""#);
    }

    #[test]
    fn a_filter_is_true_only_for_a_first_output_other_than_false_and_null() {
        let p = Program::compile(".ok", &[]).unwrap();
        assert!(p.test(json(r#"{"ok":1}"#), []).unwrap());
        assert!(!p.test(json(r#"{"ok":false}"#), []).unwrap());
        assert!(!p.test(json(r#"{}"#), []).unwrap());
        let none = Program::compile("empty", &[]).unwrap();
        assert!(!none.test(json("1"), []).unwrap());
    }

    #[test]
    fn derived_ids_are_stable_and_well_formed() {
        let p = Program::compile("[uuid5, dhis2_uid]", &[]).unwrap();
        let a = p.run(json(r#""form-1""#), []).unwrap()[0].to_string();
        let b = p.run(json(r#""form-1""#), []).unwrap()[0].to_string();
        let c = p.run(json(r#""form-2""#), []).unwrap()[0].to_string();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let uid = dhis2_uid("form-1");
        assert_eq!(uid.len(), 11);
        assert!(uid.chars().next().unwrap().is_ascii_alphabetic());
        assert!(uid.chars().all(|c| c.is_ascii_alphanumeric()));
        assert!(uuid::Uuid::parse_str(&uuid5("x")).is_ok());
    }

    #[test]
    fn deriving_an_id_from_a_non_string_is_an_error_naming_the_value() {
        let p = Program::compile("uuid5", &[]).unwrap();
        let err = p.run(json("42"), []).unwrap_err();
        assert!(err.contains("42"), "{err}");
    }
}
