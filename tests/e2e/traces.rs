//! Trace export: the services as separate processes, each sending its spans over OTLP/HTTP
//! to a collector double, which records what it is sent (decoded here with OpenTelemetry's
//! own protobuf definitions).

use std::time::Duration;

use hiway_tests::{Receiver, Services, TestHiway};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

use crate::bus::one_route_with;

const WAIT: Duration = Duration::from_secs(30);

/// The source's span: trace `0af7…319c`, span `b7ad…3331`.
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const SOURCE_SPAN: &str = "b7ad6b7169203331";

/// One exported span, as hex ids.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

fn spans(collector: &Receiver) -> Vec<Span> {
    let mut out = Vec::new();
    for request in collector.received() {
        assert_eq!(request.uri.path(), "/v1/traces");
        assert_eq!(
            request.header("content-type"),
            Some("application/x-protobuf")
        );
        let export =
            ExportTraceServiceRequest::decode(request.body.as_ref()).expect("an OTLP trace export");
        for resource in export.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    out.push(Span {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                    });
                }
            }
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running hiway whose ingress, transformer and sender are processes exporting to
/// `collector` every `export_interval`, delivering to `sink` (with these destination
/// settings, TOML lines).
async fn start(
    collector: &Receiver,
    sink: &Receiver,
    export_interval: &str,
    destination_settings: &str,
) -> TestHiway {
    // Audit in process (it records no message spans); the three services a message goes
    // through as processes, since trace export is set up once per process.
    let mut app = TestHiway::spawn_with(
        &one_route_with(sink, destination_settings),
        Services {
            ingress: false,
            transformer: false,
            sender: false,
            audit: true,
        },
    )
    .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let endpoint = collector.url("");
    let export = [
        ("HIWAY_TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
        ("HIWAY_TELEMETRY__EXPORT_INTERVAL", export_interval),
        ("HIWAY_INGRESS__LISTEN", listen.as_str()),
    ];
    for service in ["hiway-ingress", "hiway-transformer", "hiway-sender"] {
        app.spawn_process(service, &export);
    }
    app.ingress_url = format!("http://{listen}");
    hiway_tests::eventually("ingress ready", WAIT, || async {
        let ready = app
            .http
            .get(format!("{}/readyz", app.ingress_url))
            .send()
            .await;
        ready.ok().filter(|r| r.status() == 200).map(|_| ())
    })
    .await;
    app
}

/// Posts `{}` as part of the source's trace.
async fn post_traced(app: &TestHiway) {
    let response = app
        .request("forms")
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{TRACE_ID}-{SOURCE_SPAN}-01"))
        .header("tracestate", "congo=t61rcWkgMzE")
        .body(b"{}".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

/// The span of each stage in the source's trace, once the collector has all three.
fn stages(collector: &Receiver) -> Option<[Span; 3]> {
    let spans = spans(collector);
    let of = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name && s.trace_id == TRACE_ID)
            .cloned()
    };
    Some([
        of("ingress.accept")?,
        of("transformer.route")?,
        of("sender.deliver")?,
    ])
}

#[tokio::test]
async fn with_an_otlp_endpoint_each_service_records_its_span_in_the_sources_trace_and_the_destination_gets_the_senders()
 {
    let collector = Receiver::start().await;
    let sink = Receiver::start().await;
    let app = start(&collector, &sink, "100ms", "").await;
    post_traced(&app).await;
    let delivered = sink.wait_for(1, WAIT).await;

    let [ingress, transformer, sender] =
        hiway_tests::eventually("the three spans at the collector", WAIT, || async {
            stages(&collector)
        })
        .await;
    assert_eq!(
        (
            ingress.service.as_str(),
            transformer.service.as_str(),
            sender.service.as_str()
        ),
        ("hiway-ingress", "hiway-transformer", "hiway-sender")
    );
    // One chain: the source's span, then each stage the child of the one before.
    assert_eq!(ingress.parent_span_id, SOURCE_SPAN);
    assert_eq!(transformer.parent_span_id, ingress.span_id);
    assert_eq!(sender.parent_span_id, transformer.span_id);
    // The destination's span is to be the sender's child, and the vendor data goes along.
    assert_eq!(
        delivered[0].header("traceparent"),
        Some(format!("00-{TRACE_ID}-{}-01", sender.span_id).as_str())
    );
    assert_eq!(delivered[0].header("tracestate"), Some("congo=t61rcWkgMzE"));
    app.shutdown().await;
}

// Two workers: the test blocks one waiting for each process to exit, while the collector
// double, on the other, takes the spans the process sends as it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_waiting_for_their_batch_are_sent_when_a_service_stops() {
    let collector = Receiver::start().await;
    let sink = Receiver::start().await;
    // No batch is due within the test: only the flush at shutdown can send the spans.
    let mut app = start(&collector, &sink, "1h", "").await;
    post_traced(&app).await;
    sink.wait_for(1, WAIT).await;
    assert!(
        stages(&collector).is_none(),
        "nothing is sent before its batch is due"
    );

    for index in 0..3 {
        let status = app.terminate_process(index);
        assert!(status.success(), "process {index} stopped with {status}");
    }
    assert!(
        stages(&collector).is_some(),
        "each process sent its spans as it stopped: {:?}",
        spans(&collector)
    );
    app.shutdown().await;
}

#[tokio::test]
async fn each_attempt_is_its_own_sender_span_under_the_transformers_and_the_destination_sees_each()
{
    let collector = Receiver::start().await;
    let sink = Receiver::start().await;
    sink.respond_with(&[(503, r#"{"message":"down for maintenance"}"#)]);
    let app = start(
        &collector,
        &sink,
        "100ms",
        r#"retry = { schedule = ["200ms"] }"#,
    )
    .await;
    post_traced(&app).await;
    let requests = sink.wait_for(2, WAIT).await;

    let (transformer, attempts) = hiway_tests::eventually(
        "the transformer's and both attempts' spans",
        WAIT,
        || async {
            let spans = spans(&collector);
            let transformer = spans
                .iter()
                .find(|s| s.name == "transformer.route" && s.trace_id == TRACE_ID)?
                .clone();
            let attempts: Vec<Span> = spans
                .into_iter()
                .filter(|s| s.name == "sender.deliver" && s.trace_id == TRACE_ID)
                .collect();
            (attempts.len() == 2).then_some((transformer, attempts))
        },
    )
    .await;
    // The retried copy keeps the context the transformer gave it: both attempts are its
    // children, not the second a child of the first.
    for attempt in &attempts {
        assert_eq!(attempt.parent_span_id, transformer.span_id);
    }
    assert_ne!(attempts[0].span_id, attempts[1].span_id);
    let sent: Vec<&str> = requests
        .iter()
        .map(|r| r.header("traceparent").unwrap())
        .collect();
    for attempt in &attempts {
        let expected = format!("00-{TRACE_ID}-{}-01", attempt.span_id);
        assert!(
            sent.contains(&expected.as_str()),
            "{expected} not among {sent:?}"
        );
    }
    app.shutdown().await;
}
