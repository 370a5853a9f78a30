//! Logging and trace export, shared by every binary.
//!
//! Logs go to stderr, as text or JSON. Traces are exported only when `[telemetry]
//! otlp_endpoint` is set: each service's spans of a message (`ingress.accept`,
//! `transformer.route`, `sender.deliver`) then become OpenTelemetry spans in the trace of the
//! request that brought the message in, sent in batches over OTLP/HTTP. The trace context
//! travels between services in the message's `traceparent` header, and each service hands
//! on its own span's context, so the spans form one chain: the source's span, ingress,
//! transformer, sender, and the destination's, which gets the sender's `traceparent`.
//!
//! Without an endpoint nothing here costs anything per message: no OpenTelemetry layer is
//! installed, and a source's trace context goes to destinations unchanged
//! ([`own_context`]).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hiway_config::{LogConfig, LogFormat, TelemetryConfig};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer};

/// Whether this process exports spans: decides what [`own_context`] hands on.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Longest wait for the collector to answer one export.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Trace export of a running process; [`Telemetry::shutdown`] sends what is left.
#[must_use = "call shutdown() at the end, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global tracing subscriber, logs only (the commands of the `hiway` tool).
/// `RUST_LOG`, when set, overrides `log.filter`. Calling it twice is harmless (the second
/// call does nothing), so the all-in-one binary and tests can both call it.
pub fn init(config: &LogConfig) {
    install(config, None);
}

/// Installs the global tracing subscriber of a service: logs, and trace export when
/// `telemetry.otlp_endpoint` is set, naming the process `service` (`service.name`). Must be
/// called inside the tokio runtime, which carries the exports.
pub fn init_service(log: &LogConfig, telemetry: &TelemetryConfig, service: &str) -> Telemetry {
    let provider = telemetry.otlp_endpoint.as_ref().and_then(|endpoint| {
        match provider(endpoint, telemetry, service) {
            Ok(p) => Some(p),
            Err(error) => {
                // Logging is not up yet; a trace exporter that cannot be built must not stop
                // the service, only be reported.
                eprintln!("hiway: trace export to {endpoint} is off: {error}");
                None
            }
        }
    });
    let installed = install(log, provider.clone());
    let provider = provider.filter(|_| installed);
    if let (Some(_), Some(endpoint)) = (&provider, &telemetry.otlp_endpoint) {
        EXPORTING.store(true, Ordering::SeqCst);
        tracing::info!(%endpoint, "exporting traces over OTLP/HTTP");
    }
    Telemetry { provider }
}

impl Telemetry {
    /// Sends the spans still waiting and stops the exporter.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK's shutdown blocks until its export thread is done, and that export runs on
        // this runtime (see `Exporter`): block a thread of the blocking pool, not the runtime.
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(error)) = done {
            tracing::warn!(%error, "could not send the last spans");
        }
    }
}

/// Sets the subscriber; false if one was set already.
fn install(config: &LogConfig, provider: Option<SdkTracerProvider>) -> bool {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // The two log layers, one of them present; a macro because their type depends on the
    // subscriber stack under them, which differs below.
    macro_rules! logs {
        () => {
            (
                // Colours only for a person at a terminal: a file, journald or a log
                // collector would get the escape codes as text.
                matches!(config.format, LogFormat::Text).then(|| {
                    tracing_subscriber::fmt::layer()
                        .with_ansi(std::io::stderr().is_terminal())
                        .with_writer(std::io::stderr)
                }),
                matches!(config.format, LogFormat::Json).then(|| {
                    tracing_subscriber::fmt::layer()
                        .json()
                        .with_writer(std::io::stderr)
                }),
            )
        };
    }
    let Some(provider) = provider else {
        // Logs only: one filter for the whole subscriber, the cheapest shape per span.
        let (text, json) = logs!();
        return tracing_subscriber::registry()
            .with(filter)
            .with(text)
            .with(json)
            .try_init()
            .is_ok();
    };
    let (text, json) = logs!();
    // The log filter applies to the logs only: turning logs down to warnings must not empty
    // the traces. Spans are hiway's own, at info (one per message and stage), not those of
    // the libraries underneath.
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("hiway"))
        .with_filter(Targets::new().with_target("hiway", LevelFilter::INFO));
    tracing_subscriber::registry()
        .with(text.with_filter(filter.clone()))
        .with(json.with_filter(filter))
        .with(spans)
        .try_init()
        .is_ok()
}

fn provider(
    endpoint: &url::Url,
    config: &TelemetryConfig,
    service: &str,
) -> Result<SdkTracerProvider, String> {
    let client = reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(Exporter {
            client,
            runtime: tokio::runtime::Handle::current(),
        })
        .with_endpoint(traces_url(endpoint))
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?;
    let batches = BatchConfigBuilder::default()
        .with_scheduled_delay(config.export_interval)
        .build();
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batches)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build())
}

/// The collector's base URL with OTLP's path for traces.
fn traces_url(endpoint: &url::Url) -> String {
    format!("{}/v1/traces", endpoint.as_str().trim_end_matches('/'))
}

/// OTLP requests over the service's own reqwest client.
///
/// The SDK exports from a thread of its own, outside any tokio runtime, and reqwest needs
/// one: each request is spawned onto the service's runtime and awaited from that thread.
#[derive(Debug)]
struct Exporter {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for Exporter {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let client = self.client.clone();
        let answer = self
            .runtime
            .spawn(async move {
                let response = client.execute(request).await?;
                let status = response.status();
                let headers = response.headers().clone();
                let body = response.bytes().await?;
                Ok::<_, reqwest::Error>((status, headers, body))
            })
            .await??;
        let (status, headers, body) = answer;
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

/// Makes `span` a child of the W3C trace context a message came with, when this process
/// exports spans; otherwise does nothing. Without a valid context the span starts a trace.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if !EXPORTING.load(Ordering::Relaxed) {
        return;
    }
    let Some(traceparent) = traceparent else {
        return;
    };
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert(
        hiway_proto::headers::TRACEPARENT.to_owned(),
        traceparent.to_owned(),
    );
    if let Some(tracestate) = tracestate {
        carrier.insert(
            hiway_proto::headers::TRACESTATE.to_owned(),
            tracestate.to_owned(),
        );
    }
    let parent = TraceContextPropagator::new().extract(&carrier);
    // An error only means the span is disabled or has started already: nothing to join.
    let _ = span.set_parent(parent);
}

/// Joins `span` to the trace context a message came with and returns the context the
/// message is to carry on to the next service: `span`'s own when this process exports spans
/// ([`set_parent`], then [`own_context`]), else the one that came, unchanged.
pub fn hand_on(
    span: &tracing::Span,
    traceparent: Option<String>,
    tracestate: Option<String>,
) -> (Option<String>, Option<String>) {
    set_parent(span, traceparent.as_deref(), tracestate.as_deref());
    match own_context(span) {
        Some((own, state)) => (Some(own), state),
        None => (traceparent, tracestate),
    }
}

/// The trace context to hand on from `span` (to the next service, or to a destination) when
/// this process exports spans: the span's own, so that what comes next is its child. `None`
/// when it does not export, or the span is not recorded: hand on the context the message
/// came with, unchanged.
pub fn own_context(span: &tracing::Span) -> Option<(String, Option<String>)> {
    if !EXPORTING.load(Ordering::Relaxed) {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    let traceparent = carrier.remove(hiway_proto::headers::TRACEPARENT)?;
    let tracestate = carrier
        .remove(hiway_proto::headers::TRACESTATE)
        .filter(|s| !s.is_empty());
    Some((traceparent, tracestate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_to_the_collectors_base_url_once() {
        for base in ["http://collector:4318", "http://collector:4318/"] {
            let url = url::Url::parse(base).unwrap();
            assert_eq!(traces_url(&url), "http://collector:4318/v1/traces");
        }
        let under = url::Url::parse("https://otel.example/ingest/").unwrap();
        assert_eq!(traces_url(&under), "https://otel.example/ingest/v1/traces");
    }

    #[test]
    fn without_export_a_span_has_no_context_of_its_own_to_hand_on() {
        // No OTel layer in unit tests: EXPORTING is false, and the context that came is
        // handed on unchanged.
        assert_eq!(own_context(&tracing::info_span!("test")), None);
    }
}
