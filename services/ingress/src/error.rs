//! What ingress answers when it does not accept a message. Every variant is an answer the
//! source can act on. Nothing was published, with one exception a source cannot tell apart:
//! a 503 after the broker took the message but its confirm was lost with the connection.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// 401: no credentials, or credentials that match no client.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// 403: the client is known but not allowed on this channel.
    #[error("client \"{client}\" is not allowed to post to channel \"{channel}\"")]
    Forbidden {
        /// The authenticated client.
        client: String,
        /// The channel it tried.
        channel: String,
    },
    /// 404: no such channel.
    #[error("there is no channel \"{0}\"")]
    UnknownChannel(String),
    /// 415: the channel does not take this content type.
    #[error("channel \"{channel}\" does not accept content type {given:?}; it accepts {accepted}")]
    UnsupportedContentType {
        /// The channel.
        channel: String,
        /// What the request declared ("" when it declared none).
        given: String,
        /// What the channel takes.
        accepted: String,
    },
    /// 413: the body is larger than the channel allows.
    #[error("the body is larger than channel \"{channel}\" allows ({limit} bytes)")]
    TooLarge {
        /// The channel.
        channel: String,
        /// Its limit.
        limit: usize,
    },
    /// 400: the body of a JSON channel is not JSON.
    #[error("the body is not valid JSON: {message} at line {line}, column {column}")]
    MalformedJson {
        /// serde_json's description.
        message: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
    },
    /// 400: the body could not be read.
    #[error("the request body could not be read: {0}")]
    BadBody(String),
    /// 409: another request with the same idempotency key is being accepted right now.
    #[error("a request with idempotency key {0:?} is being accepted right now; retry shortly")]
    KeyInUse(String, u32),
    /// 400: the idempotency key is unusable.
    #[error("the idempotency key is longer than {0} bytes")]
    KeyTooLong(usize),
    /// 503: the broker is unreachable, blocked, or did not confirm; the source should retry.
    #[error("the message was not accepted because the broker is unavailable ({0}); retry later")]
    Unavailable(String, u32),
    /// 503: the idempotency key store is unreachable and the channel refuses to accept
    /// without checking.
    #[error(
        "the message was not accepted because duplicates cannot be checked right now; retry later"
    )]
    StoreUnavailable(u32),
}

#[derive(Serialize)]
struct Body<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    column: Option<usize>,
}

impl IngressError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            Self::Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            Self::UnknownChannel(_) => (StatusCode::NOT_FOUND, "unknown_channel"),
            Self::UnsupportedContentType { .. } => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_content_type",
            ),
            Self::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            Self::MalformedJson { .. } => (StatusCode::BAD_REQUEST, "malformed_json"),
            Self::BadBody(_) => (StatusCode::BAD_REQUEST, "unreadable_body"),
            Self::Unavailable(..) => (StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable"),
            Self::KeyInUse(..) => (StatusCode::CONFLICT, "idempotency_key_in_use"),
            Self::KeyTooLong(_) => (StatusCode::BAD_REQUEST, "idempotency_key_too_long"),
            Self::StoreUnavailable(..) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "idempotency_store_unavailable",
            ),
        }
    }
}

impl IntoResponse for IngressError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        // Logged once, here, where it is turned into an answer. The message never holds
        // payload content or credentials.
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), code, error = %self, "request not accepted");
        } else {
            tracing::debug!(status = status.as_u16(), code, error = %self, "request refused");
        }
        let (line, column) = match &self {
            Self::MalformedJson { line, column, .. } => (Some(*line), Some(*column)),
            _ => (None, None),
        };
        let body = Body {
            error: ErrorBody {
                code,
                message: self.to_string(),
                line,
                column,
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        match &self {
            Self::Unavailable(_, retry_after)
            | Self::KeyInUse(_, retry_after)
            | Self::StoreUnavailable(retry_after) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            Self::Unauthenticated(_) => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer, Basic realm=\"hiway\""),
                );
            }
            _ => {}
        }
        response
    }
}
