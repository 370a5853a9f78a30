use super::*;

const BASE: &str = r#"
[clients.c]
api_key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
[channels.reports]
clients = ["c"]
[destinations.dhis2]
url = "http://127.0.0.1:1/api/dataValueSets"
"#;

fn route(extra: &str) -> String {
    format!("{BASE}\n[routes.r]\nchannels = [\"reports\"]\ndestinations = [\"dhis2\"]\n{extra}\n")
}

fn meta() -> Meta<'static> {
    Meta {
        message_id: "0193a0c4-0000-7000-8000-000000000001",
        channel: "reports",
        client: "c",
        received_at: "2026-11-22T10:00:00Z",
    }
}

fn r() -> RouteName {
    RouteName::parse("r").unwrap()
}

fn apply(toml: &str, body: &str) -> Result<Applied, String> {
    let config = Config::from_toml(toml).unwrap();
    let t = Transforms::compile(&config).unwrap();
    t.apply(&r(), &parse(body.as_bytes()).unwrap(), &meta())
}

fn bodies(a: Applied) -> Vec<String> {
    match a {
        Applied::Outputs(o) => o
            .into_iter()
            .map(|o| String::from_utf8(o.body).unwrap())
            .collect(),
        other => panic!("expected outputs, got {other:?}"),
    }
}

#[test]
fn a_route_without_programs_leaves_the_message_unchanged() {
    assert_eq!(apply(&route(""), "{}").unwrap(), Applied::Unchanged);
}

#[test]
fn a_filter_that_is_false_turns_the_message_away() {
    let toml = route(r#"filter = '.form.type == "visit"'"#);
    assert_eq!(
        apply(&toml, r#"{"form":{"type":"referral"}}"#).unwrap(),
        Applied::Filtered
    );
    assert_eq!(
        apply(&toml, r#"{"form":{"type":"visit"}}"#).unwrap(),
        Applied::Unchanged
    );
}

#[test]
fn one_report_becomes_one_data_value_set_per_facility() {
    let toml = route(
        r#"transform = '.facilities[] | {orgUnit: .code, period: "202401", dataValues: [{dataElement: "x", value: (.n | tostring)}]}'"#,
    );
    let out = bodies(
        apply(
            &toml,
            r#"{"facilities":[{"code":"A","n":1},{"code":"B","n":2}]}"#,
        )
        .unwrap(),
    );
    assert_eq!(out.len(), 2);
    assert!(out[1].contains(r#""orgUnit":"B""#) && out[1].contains(r#""value":"2""#));
}

#[test]
fn the_message_metadata_is_visible_as_hiway() {
    let toml =
        route(r#"transform = '{id: $hiway.message_id, via: $hiway.route, from: $hiway.channel}'"#);
    let out = bodies(apply(&toml, "{}").unwrap());
    assert_eq!(
        out,
        [r#"{"id":"0193a0c4-0000-7000-8000-000000000001","via":"r","from":"reports"}"#]
    );
}

#[test]
fn a_transform_that_emits_requests_chooses_path_and_method() {
    let toml = route(
        "transform = '{path: (\"cases/\" + .id), method: \"patch\", body: {data: {sync_status: \"failed\"}}}'\nemits = \"requests\"",
    );
    match apply(&toml, r#"{"id":"4a7c"}"#).unwrap() {
        Applied::Outputs(o) => {
            assert_eq!(o[0].path.as_deref(), Some("cases/4a7c"));
            assert_eq!(o[0].method.as_deref(), Some("PATCH"));
            assert_eq!(o[0].body, br#"{"data":{"sync_status":"failed"}}"#);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_request_without_a_body_is_an_error_naming_the_route_and_output() {
    let toml = route("transform = '{path: \"x\"}'\nemits = \"requests\"");
    let err = apply(&toml, "{}").unwrap_err();
    assert!(err.contains("routes.r.transform output 0"), "{err}");
    assert!(err.contains("no \"body\""), "{err}");
}

#[test]
fn a_runtime_error_names_the_route_and_jq_reason() {
    let toml = route("transform = '.count + 1'");
    let err = apply(&toml, r#"{"count":"seven"}"#).unwrap_err();
    assert!(err.starts_with("routes.r.transform failed"), "{err}");
    assert!(err.contains("seven"), "{err}");
}

#[test]
fn a_program_that_does_not_compile_names_file_route_and_position() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hiway.toml"),
        route("transform = '''\n{orgUnit: .code,\n  value: (.n | tostring}\n'''"),
    )
    .unwrap();
    let config = hiway_config::load(Some(dir.path())).unwrap();
    let err = Transforms::compile(&config).unwrap_err().join("\n");
    assert!(err.contains("routes.r.transform"), "{err}");
    assert!(err.contains("hiway.toml"), "{err}");
    // TOML drops the newline right after the opening quotes, so the program starts at
    // `{orgUnit`: the unclosed parenthesis is on its second line.
    assert!(err.contains("jq: line 2, column 24"), "{err}");
}

#[test]
fn a_transform_file_is_read_from_the_configuration_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("transforms")).unwrap();
    std::fs::write(
        dir.path().join("transforms/map.jq"),
        "# one output per item\n.items[] | {v: .}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("hiway.toml"),
        route("transform_file = \"transforms/map.jq\""),
    )
    .unwrap();
    let config = hiway_config::load(Some(dir.path())).unwrap();
    let t = Transforms::compile(&config).unwrap();
    let out = t
        .apply(&r(), &parse(br#"{"items":[1,2]}"#).unwrap(), &meta())
        .unwrap();
    assert_eq!(bodies(out), [r#"{"v":1}"#, r#"{"v":2}"#]);

    std::fs::write(
        dir.path().join("transforms/map.jq"),
        ".items[] | {v: $nope}",
    )
    .unwrap();
    let err = Transforms::compile(&config).unwrap_err().join("\n");
    assert!(
        err.contains("routes.r.transform_file") && err.contains("map.jq"),
        "{err}"
    );
    assert!(err.contains("undefined variable"), "{err}");
}

#[test]
fn lookup_tables_are_variables_and_reloads_are_seen_by_the_next_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("orgunits.csv"),
        "code,uid\nFAC-1,DiszpKrYNg8\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("hiway.toml"),
        route(
            "transform = '{orgUnit: $orgunits[.facility]}'\n[lookups.orgunits]\nfile = \"orgunits.csv\"\nkey = \"code\"\nvalue = \"uid\"",
        ),
    )
    .unwrap();
    let config = hiway_config::load(Some(dir.path())).unwrap();
    let t = Transforms::compile(&config).unwrap();
    let input = parse(br#"{"facility":"FAC-1"}"#).unwrap();
    assert_eq!(
        bodies(t.apply(&r(), &input, &meta()).unwrap()),
        [r#"{"orgUnit":"DiszpKrYNg8"}"#]
    );
    std::fs::write(
        dir.path().join("orgunits.csv"),
        "code,uid\nFAC-1,ImspTQPwCqd\n",
    )
    .unwrap();
    assert_eq!(t.lookups().reload_changed().len(), 1);
    assert_eq!(
        bodies(t.apply(&r(), &input, &meta()).unwrap()),
        [r#"{"orgUnit":"ImspTQPwCqd"}"#]
    );
}

#[test]
fn a_body_that_is_not_json_is_an_error_saying_so() {
    let err = parse(b"<xml/>").unwrap_err();
    assert!(err.contains("not JSON"), "{err}");
}

#[test]
fn outputs_are_compact_json_with_strings_escaped_and_numbers_kept() {
    let toml = route("transform = '.'");
    let body = r#"{"text":"line\nbreak \"quoted\" \\ é 🙂 \u0001","n":[0,-7,1.5,12345678901234567890,1e300],"empty":{},"list":[],"nested":{"a":[null,true,false]}}"#;
    assert_eq!(
        bodies(apply(&toml, body).unwrap()),
        [
            r#"{"text":"line\nbreak \"quoted\" \\ é 🙂 \u0001","n":[0,-7,1.5,12345678901234567890,1e300],"empty":{},"list":[],"nested":{"a":[null,true,false]}}"#
        ]
    );
}

#[test]
fn the_filter_and_the_transform_both_see_hiway() {
    let toml = route(
        r#"filter = '$hiway.route == "r"'
transform = '$hiway'"#,
    );
    let out = bodies(apply(&toml, "{}").unwrap());
    let hiway: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
    assert_eq!(hiway["message_id"], "0193a0c4-0000-7000-8000-000000000001");
    assert_eq!(hiway["route"], "r");
    assert_eq!(hiway["received_at"], "2026-11-22T10:00:00Z");
}
