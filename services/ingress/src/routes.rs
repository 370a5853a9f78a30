//! HTTP handlers.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hiway_config::OnStoreError;
use hiway_proto::{ChannelName, Envelope, headers, trace};
use serde::Serialize;
use tracing::Instrument;

use crate::AppState;
use crate::error::IngressError;
use crate::idempotency::{Claim, KeyStore, MAX_KEY_LEN};

/// The answer to an accepted message.
#[derive(Serialize)]
pub struct Accepted {
    /// The message id, for tracing it later (`hiway trace <id>`).
    pub id: String,
}

/// `POST /v1/channels/{channel}/messages`
pub async fn post_message(
    State(state): State<AppState>,
    Path(channel): Path<String>,
    request_headers: HeaderMap,
    body: Body,
) -> Result<Response, IngressError> {
    // Credentials first: an unauthenticated caller learns nothing, not even which channels
    // exist.
    let client = state.clients.authenticate(&request_headers)?;
    let channel_name =
        ChannelName::parse(&channel).map_err(|_| IngressError::UnknownChannel(channel.clone()))?;
    let config = state
        .channels
        .get(&channel_name)
        .ok_or_else(|| IngressError::UnknownChannel(channel.clone()))?;
    if !config.clients.contains(&client) {
        return Err(IngressError::Forbidden {
            client: client.to_string(),
            channel,
        });
    }

    let content_type = request_headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if !config.accepts(&content_type) {
        return Err(IngressError::UnsupportedContentType {
            channel,
            given: content_type,
            accepted: config.content_types.join(", "),
        });
    }

    let too_large = || IngressError::TooLarge {
        channel: channel.clone(),
        limit: config.max_body_bytes,
    };
    // A declared length over the limit is refused before a byte of the body is read.
    let declared = request_headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > config.max_body_bytes) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, config.max_body_bytes)
        .await
        .map_err(|e| {
            if std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            {
                too_large()
            } else {
                IngressError::BadBody(e.to_string())
            }
        })?;

    if hiway_config::is_json(&content_type)
        && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
    {
        return Err(IngressError::MalformedJson {
            message: json_message(&e),
            line: e.line(),
            column: e.column(),
        });
    }

    let publisher = state
        .link
        .publisher()
        .map_err(|why| IngressError::Unavailable(why.reason().to_owned(), state.retry_after))?;

    let mut envelope = Envelope::accepted(channel_name, client, content_type);
    let (traceparent, tracestate) = trace_context(&request_headers);
    let id = envelope.id;

    // Duplicate detection, for channels that ask for it.
    let mut claim: Option<(&KeyStore, String)> = None;
    if let (Some(settings), Some(store)) = (&config.idempotency, &state.keys)
        && let Some(key) =
            idempotency_key(&request_headers, settings.json_pointer.as_deref(), &bytes)?
    {
        match store
            .claim(&envelope.channel, &key, id, settings.window)
            .await
        {
            Ok(Claim::New) => claim = Some((store, key)),
            Ok(Claim::Duplicate(first)) => {
                tracing::debug!(message_id = %first, channel = %envelope.channel, "duplicate key: answering with the first message's id");
                let mut response = (
                    StatusCode::ACCEPTED,
                    Json(Accepted {
                        id: first.to_string(),
                    }),
                )
                    .into_response();
                response
                    .headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
                return Ok(response);
            }
            Ok(Claim::InProgress) => return Err(IngressError::KeyInUse(key, state.retry_after)),
            Err(error) => match settings.on_store_error {
                OnStoreError::Reject => {
                    tracing::warn!(%error, "idempotency store unavailable: answering 503");
                    return Err(IngressError::StoreUnavailable(state.retry_after));
                }
                OnStoreError::Accept => {
                    tracing::warn!(%error, "idempotency store unavailable: accepting without the duplicate check");
                }
            },
        }
    }

    let span = tracing::info_span!(
        "ingress.accept",
        message_id = %id,
        channel = %envelope.channel,
        client = %envelope.client,
        size = bytes.len()
    );
    // This span joins the source's trace (when traces are exported), and the message carries
    // on the context the next service is to join: this span's, or the source's as it came.
    (envelope.traceparent, envelope.tracestate) =
        hiway_runtime::telemetry::hand_on(&span, traceparent.map(str::to_owned), tracestate);
    let message = crate::outbox::Message {
        properties: envelope.to_properties(),
        body: bytes,
    };
    let published = state
        .outbox
        .publish(publisher, message)
        .instrument(span)
        .await;
    match (published, claim) {
        (Ok(()), Some((store, key))) => {
            if let Err(error) = store.accept(&envelope.channel, &key, id).await {
                // The message is accepted all the same; the claim stays pending and goes
                // stale, after which a retry with this key would be accepted again.
                tracing::warn!(%error, "could not mark the idempotency key accepted");
            }
        }
        (Ok(()), None) => {}
        (Err(error), claim) => {
            if let Some((store, key)) = claim {
                let _ = store.release(&envelope.channel, &key, id).await;
            }
            return Err(IngressError::Unavailable(
                error.to_string(),
                state.retry_after,
            ));
        }
    }
    Ok((StatusCode::ACCEPTED, Json(Accepted { id: id.to_string() })).into_response())
}

/// The source's trace context: `traceparent` if it parses (see hiway_proto::trace), and with
/// it the `tracestate`, several lines joined into one list as HTTP joins them. A value that
/// does not parse is dropped, never refused, and a tracestate never goes without a valid
/// traceparent.
fn trace_context(request_headers: &HeaderMap) -> (Option<&str>, Option<String>) {
    let Some(traceparent) = request_headers
        .get(headers::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(trace::traceparent)
    else {
        return (None, None);
    };
    let lines: Option<Vec<&str>> = request_headers
        .get_all(headers::TRACESTATE)
        .iter()
        .map(|v| v.to_str().ok())
        .collect();
    let tracestate = lines
        .filter(|l| !l.is_empty())
        .map(|l| l.join(","))
        .filter(|joined| trace::tracestate(joined).is_some());
    (Some(traceparent), tracestate)
}

/// The request's idempotency key: its `Idempotency-Key` header or, without one, the JSON value
/// at `pointer`. `None` when it has neither (it is accepted without the duplicate check).
fn idempotency_key(
    request_headers: &HeaderMap,
    pointer: Option<&str>,
    body: &[u8],
) -> Result<Option<String>, IngressError> {
    let key = match request_headers
        .get(headers::HTTP_IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
    {
        Some(k) if !k.trim().is_empty() => Some(k.trim().to_owned()),
        _ => pointer.and_then(|p| {
            let json: serde_json::Value = serde_json::from_slice(body).ok()?;
            match json.pointer(p)? {
                serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        }),
    };
    match key {
        Some(k) if k.len() > MAX_KEY_LEN => Err(IngressError::KeyTooLong(MAX_KEY_LEN)),
        other => Ok(other),
    }
}

/// serde_json's message without its own " at line X column Y" suffix, which the error adds
/// as separate fields.
fn json_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// `GET /healthz`: the process is alive.
pub async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, Json(serde_json::json!({"status": "ok"})))
}

/// `GET /readyz`: ready only while connected to the broker and allowed to publish.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.link.ready() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not connected to the broker"})),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    #[test]
    fn a_valid_traceparent_is_kept_with_its_tracestate_lines_joined_into_one_list() {
        let h = headers(&[
            ("traceparent", TRACEPARENT),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("tracestate", "rojo=00f067aa0ba902b7"),
        ]);
        assert_eq!(
            trace_context(&h),
            (
                Some(TRACEPARENT),
                Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".to_owned())
            )
        );
        assert_eq!(
            trace_context(&headers(&[("traceparent", TRACEPARENT)])),
            (Some(TRACEPARENT), None)
        );
    }

    #[test]
    fn a_traceparent_that_does_not_parse_is_dropped_and_its_tracestate_with_it() {
        let h = headers(&[
            ("traceparent", "00-not-a-trace-01"),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        assert_eq!(trace_context(&h), (None, None));
        let alone = headers(&[("tracestate", "congo=t61rcWkgMzE")]);
        assert_eq!(trace_context(&alone), (None, None));
    }

    #[test]
    fn a_tracestate_over_the_limit_is_dropped_whole_and_the_traceparent_kept() {
        let long = "a=b,".repeat(200);
        let h = headers(&[("traceparent", TRACEPARENT), ("tracestate", &long)]);
        assert_eq!(trace_context(&h), (Some(TRACEPARENT), None));
    }
}
