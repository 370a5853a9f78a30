//! The `hiway` command as an operator uses it: the configuration in force and its mistakes.

use std::process::Command;

use hiway_tests::binary;

fn write(dir: &std::path::Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn environment_variables_override_the_configuration_files() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "10-main.toml",
        "[destinations.sink]\nurl = \"http://127.0.0.1:1/\"\n",
    );
    let output = Command::new(binary("hiway"))
        .args(["config", "check", "--show", "--config"])
        .arg(dir.path())
        .env("HIWAY_TRANSFORMER__PREFETCH", "7")
        .env("HIWAY_DESTINATIONS__SINK__HEADERS__X_SENDER", "a")
        // Not a configuration key: ignored rather than refused as unknown.
        .env("HIWAY_TEST_SOMETHING_ELSE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("prefetch: 7,"), "{stdout}");
    assert!(stdout.contains(r#""x_sender": "a""#), "{stdout}");
    assert!(stdout.contains("configuration is valid"), "{stdout}");
}

#[test]
fn config_check_names_the_key_and_the_file_of_each_mistake() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "10-main.toml",
        "[destinations.sink]\nurl = \"http://127.0.0.1:1/\"\n",
    );
    write(
        dir.path(),
        "20-routes.toml",
        "[routes.x]\nchannels = [\"nope\"]\ndestinations = [\"sink\", \"gone\"]\n",
    );
    let output = Command::new(binary("hiway"))
        .args(["config", "check", "--config"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("routes.x.channels[0]: unknown channel \"nope\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("routes.x.destinations[1]: unknown destination \"gone\""),
        "{stderr}"
    );
    assert!(stderr.contains("20-routes.toml"), "{stderr}");
}

#[test]
fn secrets_never_show_in_the_configuration_printout() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "hiway.toml",
        "[broker]\nurl = \"amqp://hiway:s3cret-broker@127.0.0.1:5672/%2f\"\n\
         [destinations.sink]\nurl = \"http://127.0.0.1:1/\"\n\
         auth = { type = \"bearer\", token = { value = \"s3cret-token\" } }\n",
    );
    let output = Command::new(binary("hiway"))
        .args(["config", "check", "--show", "--config"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("[redacted]"), "{stdout}");
    assert!(!stdout.contains("s3cret"), "{stdout}");
}

/// Runs `hiway config check` on a directory; returns (success, stderr).
fn check(dir: &std::path::Path) -> (bool, String) {
    let output = Command::new(binary("hiway"))
        .args(["config", "check", "--config"])
        .arg(dir)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const BASE: &str = r#"
[clients.c]
api_key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
[channels.forms]
clients = ["c"]
[destinations.dhis2]
url = "http://127.0.0.1:1/api/tracker"
"#;

#[test]
fn config_check_names_each_mistake_in_a_route() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-base.toml", BASE);
    write(
        dir.path(),
        "20-routes.toml",
        r#"
[routes.both]
channels = ["forms"]
on_dead = ["dhis2"]
destinations = ["dhis2"]
[routes.ghost]
on_dead = ["nowhere"]
destinations = ["dhis2"]
[routes.requests-of-nothing]
channels = ["forms"]
destinations = ["dhis2"]
emits = "requests"
[routes.two-programs]
channels = ["forms"]
destinations = ["dhis2"]
transform = "."
transform_file = "t.jq"
"#,
    );
    let (ok, stderr) = check(dir.path());
    assert!(!ok);
    for expected in [
        "routes.both.on_dead: a route takes either channels or dead letters",
        "routes.ghost.on_dead[0]: unknown destination \"nowhere\"",
        "routes.requests-of-nothing.emits: \"requests\" needs a transform",
        "routes.two-programs.transform_file: give transform or transform_file, not both",
        "20-routes.toml",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn config_check_names_the_file_route_and_position_of_a_jq_mistake() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-base.toml", BASE);
    std::fs::create_dir(dir.path().join("transforms")).unwrap();
    write(
        dir.path(),
        "transforms/event.jq",
        "{program: \"eBAyeGv0exc\",\n orgUnit: $orgunits[.facility]}\n",
    );
    write(
        dir.path(),
        "20-routes.toml",
        r#"
[routes.bad-syntax]
channels = ["forms"]
destinations = ["dhis2"]
filter = '.form | select(.type == "visit"'
[routes.unknown-table]
channels = ["forms"]
destinations = ["dhis2"]
transform_file = "transforms/event.jq"
[routes.missing-file]
channels = ["forms"]
destinations = ["dhis2"]
transform_file = "transforms/nope.jq"
"#,
    );
    let (ok, stderr) = check(dir.path());
    assert!(!ok);
    for expected in [
        "routes.bad-syntax.filter (in ",
        "20-routes.toml): jq: line 1, column 32: expected closing parenthesis",
        "routes.unknown-table.transform_file",
        "event.jq: jq: line 2, column 11: undefined variable $orgunits",
        "routes.missing-file.transform_file (in ",
        "cannot read",
        "nope.jq",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn config_check_names_each_mistake_in_a_lookup_table() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-base.toml", BASE);
    write(dir.path(), "dupes.csv", "code,uid\nA,x\nA,y\n");
    write(dir.path(), "cols.csv", "code,uid\nA,x\n");
    write(dir.path(), "broken.json", "{\"a\": [1,}");
    write(
        dir.path(),
        "30-lookups.toml",
        r#"
[lookups.gone]
file = "missing.csv"
key = "code"
[lookups.nokey]
file = "cols.csv"
[lookups.dupes]
file = "dupes.csv"
key = "code"
value = "uid"
[lookups.badcol]
file = "cols.csv"
key = "code"
value = "label"
[lookups.broken]
file = "broken.json"
[lookups.what]
file = "cols.txt"
"#,
    );
    let (ok, stderr) = check(dir.path());
    assert!(!ok);
    for expected in [
        "lookups.gone.file:",
        "missing.csv does not exist",
        "lookups.nokey.key: a CSV table needs the column its keys are in",
        "lookups.what.file:",
        "is neither .csv nor .json",
        "30-lookups.toml",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }

    // With the structural mistakes fixed, the contents are checked too.
    write(
        dir.path(),
        "30-lookups.toml",
        r#"
[lookups.dupes]
file = "dupes.csv"
key = "code"
value = "uid"
[lookups.badcol]
file = "cols.csv"
key = "code"
value = "label"
[lookups.broken]
file = "broken.json"
"#,
    );
    let (ok, stderr) = check(dir.path());
    assert!(!ok);
    for expected in [
        "lookups.dupes.file:",
        "line 3: the key \"A\" appears twice",
        "lookups.badcol.file:",
        "\"label\" is not in the header row (code, uid)",
        "lookups.broken.file:",
        "broken.json is not JSON",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn config_check_names_each_mistake_in_a_destination() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-base.toml", BASE);
    write(
        dir.path(),
        "40-destinations.toml",
        r#"
[destinations.ftp]
url = "ftp://example.org/"
[destinations.kindless]
kind = "hl7v2"
url = "http://127.0.0.1:1/"
"#,
    );
    let (ok, stderr) = check(dir.path());
    assert!(!ok);
    assert!(stderr.contains("hl7v2"), "{stderr}");
    assert!(stderr.contains("40-destinations.toml"), "{stderr}");

    write(
        dir.path(),
        "40-destinations.toml",
        r#"
[destinations.ftp]
url = "ftp://example.org/"
method = "GET"
concurrency = 0
retry = { schedule = ["10s"], jitter = 1.5 }
[destinations.pat]
kind = "dhis2"
url = "http://127.0.0.1:1/api/dataValueSets"
auth = { type = "api-token", token = { env = "HIWAY_TEST_UNSET_TOKEN" } }
[destinations.badheader]
url = "http://127.0.0.1:1/"
headers = { "X-Note" = "line one\nline two" }
"#,
    );
    let (ok, stderr) = check(dir.path());
    assert!(!ok);
    for expected in [
        "destinations.ftp.url: must be an http or https URL",
        "destinations.ftp.method: \"GET\" is not an HTTP method",
        "destinations.ftp.concurrency: must be at least 1",
        "destinations.ftp.retry.jitter: must be at least 0 and below 1",
        "destinations.pat.auth.token:",
        "HIWAY_TEST_UNSET_TOKEN",
        "40-destinations.toml",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }

    write(
        dir.path(),
        "40-destinations.toml",
        r#"
[destinations.badheader]
url = "http://127.0.0.1:1/"
headers = { "X-Note" = "line one\nline two" }
"#,
    );
    let (ok, stderr) = check(dir.path());
    assert!(!ok);
    assert!(
        stderr.contains("destinations.badheader.headers: \"X-Note\""),
        "{stderr}"
    );
}

#[test]
fn config_check_names_each_mistake_in_delivered_statuses() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "10-base.toml", BASE);
    write(
        dir.path(),
        "40-destinations.toml",
        r#"
[destinations.childshield]
url = "http://127.0.0.1:1/api/v1/cases"
delivered_statuses = [409, 503, 42]
[destinations.tracker]
kind = "dhis2"
url = "http://127.0.0.1:1/api/tracker"
delivered_statuses = [409]
"#,
    );
    let (ok, stderr) = check(dir.path());
    assert!(!ok);
    for expected in [
        "destinations.childshield.delivered_statuses[1]: 503 asks for another try",
        "destinations.childshield.delivered_statuses[2]: 42 is not an HTTP status",
        "destinations.tracker.delivered_statuses: only kind = \"http\" reads it",
        "40-destinations.toml",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(!stderr.contains("delivered_statuses[0]"), "{stderr}");

    // A value that is not a status number at all stops loading, naming the key and the file.
    write(
        dir.path(),
        "40-destinations.toml",
        "[destinations.childshield]\nurl = \"http://127.0.0.1:1/\"\ndelivered_statuses = [\"409\"]\n",
    );
    let (ok, stderr) = check(dir.path());
    assert!(!ok);
    assert!(
        stderr.contains("destinations.childshield.delivered_statuses"),
        "{stderr}"
    );
    assert!(stderr.contains("40-destinations.toml"), "{stderr}");

    write(
        dir.path(),
        "40-destinations.toml",
        "[destinations.childshield]\nurl = \"http://127.0.0.1:1/\"\ndelivered_statuses = [409]\n",
    );
    let (ok, stderr) = check(dir.path());
    assert!(ok, "{stderr}");
}

#[test]
fn output_cut_short_by_its_reader_ends_the_command_quietly() {
    // The command's stdout is a pipe whose only reader (`true`) has already exited, so its
    // first write fails with EPIPE every time, whatever the machine's load.
    let mut reader = Command::new("true")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let closed_pipe = reader.stdin.take().unwrap();
    assert!(reader.wait().unwrap().success());
    let output = Command::new(binary("hiway"))
        .args(["client", "new", "clinic-a"])
        .stdout(closed_pipe)
        .output()
        .unwrap();
    assert_eq!(
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).as_ref()
        ),
        (Some(0), "")
    );
}
