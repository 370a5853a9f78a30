//! HTTP handlers.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hiway_config::OnStoreError;
use hiway_proto::names::INGRESS_KEY;
use hiway_proto::{ChannelName, Envelope, headers, trace};
use serde::Serialize;
use tracing::Instrument;

use crate::AppState;
use crate::error::IngressError;
use crate::idempotency::{Claim, KeyStore, MAX_KEY_LEN};
use crate::link::Unavailable;

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

    let publisher = state.link.publisher().map_err(|why| {
        let reason = match why {
            Unavailable::Disconnected => "not connected",
            Unavailable::Blocked => "the broker blocks publishers",
        };
        IngressError::Unavailable(reason.to_owned(), state.retry_after)
    })?;

    let mut envelope = Envelope::accepted(channel_name, client, content_type);
    // The source's trace context; a value that does not parse is dropped, never refused (see
    // hiway_proto::trace), and a tracestate only goes with a valid traceparent. Several
    // tracestate lines are one list, joined as HTTP joins them.
    let traceparent = request_headers
        .get(headers::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(trace::traceparent);
    let tracestate = traceparent.and_then(|_| {
        let lines: Option<Vec<&str>> = request_headers
            .get_all(headers::TRACESTATE)
            .iter()
            .map(|v| v.to_str().ok())
            .collect();
        lines
            .filter(|l| !l.is_empty())
            .map(|l| l.join(","))
            .filter(|joined| trace::tracestate(joined).is_some())
    });
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
    hiway_runtime::telemetry::set_parent(&span, traceparent, tracestate.as_deref());
    (envelope.traceparent, envelope.tracestate) = match hiway_runtime::telemetry::own_context(&span)
    {
        Some((own, state)) => (Some(own), state),
        None => (traceparent.map(str::to_owned), tracestate),
    };
    let published = publisher
        .publish(
            &state.names.ingress_exchange(),
            INGRESS_KEY,
            &bytes,
            envelope.to_properties(),
        )
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
