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
