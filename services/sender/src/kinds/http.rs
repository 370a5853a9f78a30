//! Plain HTTP: one request per message; the status code decides, with the destination's
//! `delivered_statuses` counted as delivered too.
//!
//! The request helpers here are shared by every kind: they set the destination's fixed
//! headers and credentials, the message's content type and its idempotency key.

use bytes::Bytes;
use hiway_proto::{Envelope, headers, trace};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap};
use reqwest::{Method, RequestBuilder, StatusCode, Url};

use crate::destination::Destination;
use crate::outcome::{self, Outcome};

/// An answer, read whole.
pub(crate) struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

/// Sends the message as the body of one request.
pub(crate) async fn send(destination: &Destination, envelope: &Envelope, body: Bytes) -> Outcome {
    let request = match message_request(destination, envelope) {
        Ok(r) => r,
        Err(outcome) => return outcome,
    };
    match exchange(destination, request.body(body)).await {
        Ok(a) => outcome::classify_http(
            a.status,
            &a.headers,
            &a.body,
            &destination.config.delivered_statuses,
        ),
        Err(outcome) => outcome,
    }
}

/// The request for a message, without its body: the destination's URL (with the path a
/// transform chose, if any) and method (or the transform's), its headers, the message's
/// content type, `Idempotency-Key`, `X-Hiway-Message-Id`, and the trace context
/// (`traceparent`, `tracestate`: the current span's when traces are exported, else the
/// source's, when it sent one).
pub(crate) fn message_request(
    destination: &Destination,
    envelope: &Envelope,
) -> Result<RequestBuilder, Outcome> {
    let url = target_url(&destination.url, envelope.path.as_deref()).map_err(permanent)?;
    let method = match &envelope.method {
        None => destination.method.clone(),
        Some(m) => Method::from_bytes(m.as_bytes())
            .map_err(|_| permanent(format!("the transform chose {m:?}, not an HTTP method")))?,
    };
    let mut request = request(destination, method, url)
        .header(CONTENT_TYPE, &envelope.content_type)
        .header(headers::HTTP_IDEMPOTENCY_KEY, envelope.idempotency_key())
        .header(headers::HTTP_MESSAGE_ID, envelope.id.to_string());
    // The trace context: this attempt's span's when traces are exported (the destination's
    // span is then its child), else the source's as it came. Checked again here because any
    // publisher can set these AMQP headers, and a value HTTP cannot carry would fail every
    // attempt.
    let own = hiway_runtime::telemetry::own_context(&tracing::Span::current());
    let (traceparent, tracestate) = match &own {
        Some((traceparent, tracestate)) => (Some(traceparent.as_str()), tracestate.as_deref()),
        None => (
            envelope.traceparent.as_deref(),
            envelope.tracestate.as_deref(),
        ),
    };
    if let Some(traceparent) = traceparent.and_then(trace::traceparent) {
        request = request.header(headers::TRACEPARENT, traceparent);
        if let Some(tracestate) = tracestate.and_then(trace::tracestate) {
            request = request.header(headers::TRACESTATE, tracestate);
        }
    }
    Ok(request)
}

/// A request to the destination with its fixed headers and credentials.
pub(crate) fn request(destination: &Destination, method: Method, url: Url) -> RequestBuilder {
    destination
        .client
        .request(method, url)
        .headers(destination.headers.clone())
}

/// Sends a request to the destination with its credentials and reads the whole answer; a
/// transport failure is already an outcome.
///
/// For a destination the sender logs in to ([`crate::login`]), the current token goes on the
/// request, and a 401 answer gets one new login and one repeat of the request.
pub(crate) async fn exchange(
    destination: &Destination,
    request: RequestBuilder,
) -> Result<Answer, Outcome> {
    let Some(login) = &destination.login else {
        return send_once(request).await;
    };
    // Bodies here are whole bytes, so the request can always be repeated.
    let repeat = request.try_clone();
    let token = login.authorization(&destination.client).await?;
    let answer = send_once(request.header(AUTHORIZATION, token.clone())).await?;
    match repeat {
        Some(repeat) if answer.status == StatusCode::UNAUTHORIZED => {
            tracing::info!(destination = %destination.name, "401 with the current token: logging in again");
            let token = login.renew(&destination.client, &token).await?;
            send_once(repeat.header(AUTHORIZATION, token)).await
        }
        _ => Ok(answer),
    }
}

/// Sends a request as it is and reads the whole answer; a transport failure is already an
/// outcome.
pub(crate) async fn send_once(request: RequestBuilder) -> Result<Answer, Outcome> {
    let response = request
        .send()
        .await
        .map_err(|e| outcome::transport_error(&e))?;
    let status = response.status();
    let headers = response.headers().clone();
    // The body is read either way: on success so the connection returns to the pool, and
    // because it may hold the verdict (DHIS2, FHIR) or the destination's own words.
    let body = response
        .bytes()
        .await
        .map_err(|e| outcome::transport_error(&e))?;
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// `base` with `path` appended to its path (one `/` between); without a path, `base`. A path
/// may carry its own query string; otherwise the base's query is kept.
pub(crate) fn target_url(base: &Url, path: Option<&str>) -> Result<Url, String> {
    let Some(path) = path else {
        return Ok(base.clone());
    };
    if path.contains("://") || path.starts_with("//") {
        return Err(format!(
            "the transform chose the path {path:?}: a path relative to the destination's URL, not a URL"
        ));
    }
    let (path_part, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, base.query()),
    };
    let mut url = base.clone();
    let joined = format!(
        "{}/{}",
        base.path().trim_end_matches('/'),
        path_part.trim_start_matches('/')
    );
    url.set_path(&joined);
    url.set_query(query);
    Ok(url)
}

fn permanent(error: String) -> Outcome {
    Outcome::Permanent {
        status: None,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn a_path_is_appended_to_the_destination_url_with_one_slash() {
        let base = url("http://primero.test/api/v2/");
        assert_eq!(
            target_url(&base, Some("cases/4a7c")).unwrap().as_str(),
            "http://primero.test/api/v2/cases/4a7c"
        );
        let base = url("http://primero.test/api/v2");
        assert_eq!(
            target_url(&base, Some("/cases/4a7c")).unwrap().as_str(),
            "http://primero.test/api/v2/cases/4a7c"
        );
    }

    #[test]
    fn the_base_query_is_kept_unless_the_path_brings_its_own() {
        let base = url("http://dhis2.test/api/tracker?async=false");
        assert_eq!(
            target_url(&base, Some("x")).unwrap().as_str(),
            "http://dhis2.test/api/tracker/x?async=false"
        );
        assert_eq!(
            target_url(&base, Some("x?importStrategy=UPDATE"))
                .unwrap()
                .as_str(),
            "http://dhis2.test/api/tracker/x?importStrategy=UPDATE"
        );
    }

    #[test]
    fn a_path_that_is_a_whole_url_is_refused_so_a_transform_cannot_redirect_data() {
        let base = url("http://primero.test/api/v2/");
        let err = target_url(&base, Some("http://elsewhere.test/x")).unwrap_err();
        assert!(err.contains("not a URL"), "{err}");
        assert!(target_url(&base, Some("//elsewhere.test/x")).is_err());
    }
}
