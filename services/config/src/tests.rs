use super::*;

const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn valid() -> String {
    format!(
        r#"
[clients.commcare]
api_key_sha256 = "{HASH}"

[channels.forms]
clients = ["commcare"]

[destinations.dhis2]
url = "http://127.0.0.1:9/api/dataValueSets"
auth = {{ type = "bearer", token = {{ value = "t0ken" }} }}

[routes.forms-to-dhis2]
channels = ["forms"]
destinations = ["dhis2"]
"#
    )
}

#[test]
fn the_embedded_defaults_load_on_their_own() {
    let config = Config::from_toml("").unwrap();
    assert_eq!(config.broker.prefix, "hiway");
    assert_eq!(config.transformer.prefetch, 256);
    assert_eq!(config.runtime.worker_threads, 1);
    assert!(config.routes.is_empty());
}

#[test]
fn a_valid_configuration_fills_per_entry_defaults() {
    let config = Config::from_toml(&valid()).unwrap();
    let forms = &config.channels[&ChannelName::parse("forms").unwrap()];
    assert_eq!(forms.content_types, ["application/json"]);
    assert_eq!(forms.max_body_bytes, 1024 * 1024);
    let dhis2 = &config.destinations[&DestinationName::parse("dhis2").unwrap()];
    assert_eq!(dhis2.concurrency, 16);
    assert_eq!(dhis2.effective_prefetch(), 256);
    assert_eq!(dhis2.method, "POST");
    assert!(dhis2.delivered_statuses.is_empty());
}

#[test]
fn an_unknown_key_is_refused_by_name() {
    let err = Config::from_toml("[ingress]\nlisten_addr = \"x\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("listen_addr"), "{err}");
}

#[test]
fn a_route_to_an_unknown_destination_names_the_route_and_the_destination() {
    let toml = valid().replace(r#"destinations = ["dhis2"]"#, r#"destinations = ["dhis3"]"#);
    let err = Config::from_toml(&toml).unwrap_err().to_string();
    assert!(
        err.contains("routes.forms-to-dhis2.destinations[0]"),
        "{err}"
    );
    assert!(err.contains("dhis3"), "{err}");
}

#[test]
fn a_channel_naming_an_unknown_client_is_refused() {
    let toml = valid().replace(r#"clients = ["commcare"]"#, r#"clients = ["cc"]"#);
    let err = Config::from_toml(&toml).unwrap_err().to_string();
    assert!(
        err.contains("channels.forms.clients[0]: unknown client \"cc\""),
        "{err}"
    );
}

#[test]
fn a_credential_that_is_not_a_sha256_hash_is_refused() {
    let toml = valid().replace(HASH, "secret");
    let err = Config::from_toml(&toml).unwrap_err().to_string();
    assert!(err.contains("clients.commcare.api_key_sha256"), "{err}");
}

#[test]
fn an_invalid_name_is_refused_where_it_is_written() {
    let toml = valid().replace("[channels.forms]", "[channels.Forms]");
    let err = Config::from_toml(&toml).unwrap_err().to_string();
    assert!(err.contains("Forms"), "{err}");
}

#[test]
fn a_missing_secret_variable_is_named_without_a_value() {
    let toml = valid().replace(
        r#"{ value = "t0ken" }"#,
        r#"{ env = "HIWAY_NOT_SET_ANYWHERE" }"#,
    );
    let err = Config::from_toml(&toml).unwrap_err().to_string();
    assert!(err.contains("destinations.dhis2.auth.token"), "{err}");
    assert!(err.contains("HIWAY_NOT_SET_ANYWHERE is not set"), "{err}");
}

#[test]
fn secrets_do_not_show_in_debug_output() {
    let config = Config::from_toml(&valid()).unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("t0ken"));
    assert!(!debug.contains("guest:guest"));
}

#[test]
fn a_directory_is_read_file_by_file_in_name_order_and_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("10-main.toml"), valid()).unwrap();
    std::fs::write(
        dir.path().join("20-override.toml"),
        "[transformer]\nprefetch = 7\n",
    )
    .unwrap();
    let config = load(Some(dir.path())).unwrap();
    assert_eq!(config.transformer.prefetch, 7);

    std::fs::write(
        dir.path().join("30-bad.toml"),
        "[routes.x]\nchannels = [\"nope\"]\ndestinations = [\"dhis2\"]\n",
    )
    .unwrap();
    let err = load(Some(dir.path())).unwrap_err().to_string();
    assert!(
        err.contains("routes.x.channels[0]: unknown channel \"nope\""),
        "{err}"
    );
    assert!(err.contains("30-bad.toml"), "{err}");
}

#[test]
fn content_types_match_without_parameters_and_json_is_recognised() {
    let config = Config::from_toml(&valid()).unwrap();
    let forms = &config.channels[&ChannelName::parse("forms").unwrap()];
    assert!(forms.accepts("application/json; charset=utf-8"));
    assert!(!forms.accepts("text/xml"));
    assert!(is_json("application/fhir+json"));
    assert!(!is_json("text/plain"));
}

#[test]
fn a_secret_reference_written_as_one_string_replaces_the_table_of_an_earlier_layer() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("10-main.toml"),
        "[destinations.d]\nurl = \"http://127.0.0.1:1/\"\nauth = { type = \"bearer\", token = { env = \"HIWAY_TEST_NEVER_SET\" } }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("20-local.toml"),
        "[destinations.d]\nauth = { type = \"bearer\", token = \"value:local-token\" }\n",
    )
    .unwrap();
    let config = load(Some(dir.path())).unwrap();
    match &config.destinations.values().next().unwrap().auth {
        Some(DestinationAuth::Bearer { token }) => {
            assert_eq!(token.resolve().unwrap().expose(), "local-token");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_secret_string_without_a_known_source_is_refused_without_echoing_it() {
    let err = Config::from_toml(
        "[destinations.d]\nurl = \"http://127.0.0.1:1/\"\nauth = { type = \"bearer\", token = \"s3cr3t-typed-inline\" }\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("env:VAR"), "{err}");
    assert!(!err.contains("s3cr3t-typed-inline"), "{err}");
}

/// The valid configuration with these lines added to its one destination.
fn with_destination_lines(lines: &str) -> String {
    valid().replace(
        "[destinations.dhis2]\n",
        &format!("[destinations.dhis2]\n{lines}\n"),
    )
}

#[test]
fn delivered_statuses_accept_any_status_that_does_not_ask_for_another_try() {
    let toml = with_destination_lines("delivered_statuses = [409, 200, 303, 409]");
    let config = Config::from_toml(&toml).unwrap();
    let d = &config.destinations[&DestinationName::parse("dhis2").unwrap()];
    assert_eq!(d.delivered_statuses, [409, 200, 303, 409]);
}

#[test]
fn delivered_statuses_outside_100_to_599_are_refused_by_position() {
    let toml = with_destination_lines("delivered_statuses = [409, 99, 600]");
    let err = Config::from_toml(&toml).unwrap_err().to_string();
    assert!(
        err.contains("destinations.dhis2.delivered_statuses[1]: 99 is not an HTTP status"),
        "{err}"
    );
    assert!(
        err.contains("destinations.dhis2.delivered_statuses[2]: 600 is not an HTTP status"),
        "{err}"
    );
    assert!(!err.contains("delivered_statuses[0]"), "{err}");
}

#[test]
fn delivered_statuses_that_ask_for_another_try_are_refused_so_no_outage_counts_as_delivered() {
    for code in [408, 425, 429, 500, 501, 503, 505, 599] {
        let toml = with_destination_lines(&format!("delivered_statuses = [{code}]"));
        let err = Config::from_toml(&toml).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "destinations.dhis2.delivered_statuses[0]: {code} asks for another try"
            )),
            "{code}: {err}"
        );
    }
}

#[test]
fn delivered_statuses_that_are_not_numbers_of_16_bits_are_refused_naming_the_field() {
    for value in ["[70000]", "[-1]", "409", r#"["409"]"#] {
        let toml = with_destination_lines(&format!("delivered_statuses = {value}"));
        let err = Config::from_toml(&toml).unwrap_err().to_string();
        assert!(err.contains("delivered_statuses"), "{value}: {err}");
    }
}

#[test]
fn delivered_statuses_are_refused_on_kinds_that_read_their_systems_own_answers() {
    for kind in ["dhis2", "fhir", "openmrs"] {
        let toml =
            with_destination_lines(&format!("kind = \"{kind}\"\ndelivered_statuses = [409]"));
        let err = Config::from_toml(&toml).unwrap_err().to_string();
        assert!(
            err.contains("destinations.dhis2.delivered_statuses: only kind = \"http\" reads it"),
            "{kind}: {err}"
        );
    }
}

#[test]
fn the_default_prefetch_is_four_times_the_concurrency_but_never_under_256() {
    let prefetch = |lines: &str| {
        let config = Config::from_toml(&with_destination_lines(lines)).unwrap();
        config.destinations[&DestinationName::parse("dhis2").unwrap()].effective_prefetch()
    };
    assert_eq!(prefetch("concurrency = 8"), 256);
    assert_eq!(prefetch("concurrency = 100"), 400);
    assert_eq!(prefetch("concurrency = 100000"), u16::MAX);
    assert_eq!(prefetch("concurrency = 100\nprefetch = 10"), 10);
}

#[test]
fn a_thread_count_beyond_any_sensible_machine_is_refused_with_the_key_named() {
    let toml = format!("{}\n[runtime]\nworker_threads = 100000\n", valid());
    let err = Config::from_toml(&toml).unwrap_err().to_string();
    assert!(err.contains("runtime.worker_threads"), "{err}");
    assert!(err.contains("100000 is more than 256"), "{err}");

    let toml = format!("{}\n[runtime]\nworker_threads = 256\n", valid());
    assert_eq!(
        Config::from_toml(&toml).unwrap().runtime.worker_threads,
        256
    );
}

#[test]
fn a_primero_login_refreshes_its_token_after_50_minutes_unless_told_otherwise() {
    let primero = |auth: &str| {
        format!(
            "[destinations.p]\nurl = \"https://primero.example.org/api/v2/cases\"\nauth = {auth}\n"
        )
    };
    let config = Config::from_toml(&primero(
        r#"{ type = "primero", username = "bot", password = "value:pw" }"#,
    ))
    .unwrap();
    match &config.destinations.values().next().unwrap().auth {
        Some(DestinationAuth::Primero {
            username,
            password,
            token_url,
            refresh_after,
        }) => {
            assert_eq!(username, "bot");
            assert_eq!(password.resolve().unwrap().expose(), "pw");
            assert_eq!(*token_url, None);
            assert_eq!(*refresh_after, Duration::from_secs(50 * 60));
        }
        other => panic!("{other:?}"),
    }

    let err = Config::from_toml(&primero(
        r#"{ type = "primero", username = "bot", password = { env = "HIWAY_NOT_SET_ANYWHERE" }, token_url = "ftp://x/tokens", refresh_after = "0s" }"#,
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("destinations.p.auth.password"), "{err}");
    assert!(
        err.contains("destinations.p.auth.token_url: ftp://x/tokens is not an http(s) URL"),
        "{err}"
    );
    assert!(
        err.contains("destinations.p.auth.refresh_after: must be longer than zero"),
        "{err}"
    );
}

#[test]
fn an_authorization_header_beside_auth_is_refused_naming_both() {
    let toml = valid().replace(
        "[destinations.dhis2]\n",
        "[destinations.dhis2]\nheaders = { authorization = \"Bearer other\" }\n",
    );
    let err = Config::from_toml(&toml).unwrap_err().to_string();
    assert!(
        err.contains(
            "destinations.dhis2.headers: \"authorization\" and auth both set the Authorization header"
        ),
        "{err}"
    );

    // Without auth, a header of one's own is how a destination is authenticated.
    let toml = valid().replace(
        "auth = { type = \"bearer\", token = { value = \"t0ken\" } }\n",
        "headers = { Authorization = \"Bearer mine\" }\n",
    );
    assert!(
        toml.contains("Bearer mine") && !toml.contains("t0ken"),
        "{toml}"
    );
    assert!(Config::from_toml(&toml).is_ok());
}

#[test]
fn the_audit_trail_is_kept_for_ever_unless_a_retention_is_set() {
    let config = Config::from_toml(&valid()).unwrap();
    assert!(config.audit.retention.is_zero());
    assert_eq!(config.audit.prune_interval, Duration::from_secs(3600));

    let toml = format!("{}\n[audit]\nretention = \"90d\"\n", valid());
    assert_eq!(
        Config::from_toml(&toml).unwrap().audit.retention,
        Duration::from_secs(90 * 24 * 3600)
    );
}

#[test]
fn a_retention_under_a_day_is_refused_as_a_likely_slip_naming_the_key() {
    // "90m" for "90d": ninety minutes would delete nearly the whole trail.
    let toml = format!("{}\n[audit]\nretention = \"90m\"\n", valid());
    let err = Config::from_toml(&toml).unwrap_err().to_string();
    assert!(err.contains("audit.retention"), "{err}");
    assert!(
        err.contains("1h 30m would delete nearly the whole trail"),
        "{err}"
    );
    assert!(err.contains("at least 1d, or 0s"), "{err}");

    let toml = format!("{}\n[audit]\nretention = \"1d\"\n", valid());
    assert!(Config::from_toml(&toml).is_ok());
}

#[test]
fn a_prune_interval_of_zero_is_refused_naming_the_key() {
    let toml = format!("{}\n[audit]\nprune_interval = \"0s\"\n", valid());
    let err = Config::from_toml(&toml).unwrap_err().to_string();
    assert!(
        err.contains("audit.prune_interval: must be longer than zero"),
        "{err}"
    );
}

#[test]
fn trace_export_is_off_by_default_and_on_with_an_http_endpoint() {
    assert_eq!(Config::from_toml("").unwrap().telemetry.otlp_endpoint, None);
    let toml = format!(
        "{}\n[telemetry]\notlp_endpoint = \"http://collector:4318\"\n",
        valid()
    );
    let endpoint = Config::from_toml(&toml).unwrap().telemetry.otlp_endpoint;
    assert_eq!(endpoint.unwrap().as_str(), "http://collector:4318/");
}

#[test]
fn a_trace_endpoint_that_is_not_an_http_url_is_refused_naming_the_key() {
    let toml = format!(
        "{}\n[telemetry]\notlp_endpoint = \"collector:4317\"\n",
        valid()
    );
    let err = Config::from_toml(&toml).unwrap_err().to_string();
    assert!(err.contains("telemetry.otlp_endpoint"), "{err}");
    assert!(err.contains("http or https"), "{err}");
    let toml = format!("{}\n[telemetry]\notlp_endpoint = \"not a url\"\n", valid());
    let err = Config::from_toml(&toml).unwrap_err().to_string();
    assert!(err.contains("otlp_endpoint"), "{err}");
    assert!(err.contains("is not a URL"), "{err}");
}
