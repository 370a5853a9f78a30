//! A Primero v2 double: its login (`POST /api/v2/tokens`) and the case endpoints a sync writes
//! to, on 127.0.0.1 port 0.
//!
//! It behaves the way `protocols.md` §6 describes Primero:
//! - `POST /api/v2/tokens` with `{"user":{"user_name":…,"password":…}}` (the
//!   `token-request.json` shape): for [`USERNAME`] and [`PASSWORD`], 200 with the JWT in the
//!   answer's `Authorization: Bearer …` header and `{"user_name":…}` as the body; otherwise
//!   401 `{"error":"Invalid User name or password."}`;
//! - every other request needs `Authorization: Bearer` with a token it issued that has not
//!   expired (60 minutes, or [`Primero::set_lifetime`]); otherwise 401 in the `errors` shape
//!   of §6.3;
//! - `POST /api/v2/cases` with `{"data":{…}}`: 204 when `data.id` is given (a client id), else
//!   200 with the record and a new `id`; `PATCH /api/v2/cases/:id`: 200 with the fields merged
//!   into `{"data":{"id":…}}`.
//!
//! Not modelled: re-issuing a token with a still-valid one, `DELETE /api/v2/tokens`, stored
//! records (a PATCH does not need the case to exist), incidents and tracing requests.
//!
//! Test hooks: [`Primero::logins`] counts logins (successful or not), [`Primero::requests`]
//! is every other request received, [`Primero::expire_tokens`] makes every token issued so
//! far expire at once, [`Primero::refusals`] counts 401s to expired or unknown tokens.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};
use tokio_util::sync::DropGuard;

/// The user the double accepts.
pub const USERNAME: &str = "integration.bot";
/// Its password.
pub const PASSWORD: &str = "s3cret-Primero";

/// A request to a case endpoint, as received.
#[derive(Clone, Debug)]
pub struct Request {
    /// Its method.
    pub method: Method,
    /// Its path.
    pub path: String,
    /// Its `Authorization` header.
    pub authorization: Option<String>,
    /// Its `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// Its body, as JSON (`Null` when empty or not JSON).
    pub body: Value,
    /// The status the double answered.
    pub status: u16,
}

#[derive(Default)]
struct Inner {
    /// Token → when it expires.
    tokens: HashMap<String, Instant>,
    lifetime: Option<Duration>,
    logins: usize,
    refusals: usize,
    issued: usize,
    requests: Vec<Request>,
}

/// A running double; stops when dropped.
pub struct Primero {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    /// Stops the server when the double is dropped.
    _stop: DropGuard,
}

impl Primero {
    /// Starts the double.
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let (listener, addr) = super::bind("Primero", 0).await;
        let stop = super::serve(listener, app);
        Self {
            addr,
            inner,
            _stop: stop,
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// How long tokens issued from now on stay valid (Primero: 60 minutes).
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.inner.lock().expect("lock").lifetime = Some(lifetime);
    }

    /// Every token issued so far stops working, as if it had expired.
    pub fn expire_tokens(&self) {
        self.inner.lock().expect("lock").tokens.clear();
    }

    /// Logins attempted, successful or not.
    pub fn logins(&self) -> usize {
        self.inner.lock().expect("lock").logins
    }

    /// Requests refused for an expired, unknown or missing token.
    pub fn refusals(&self) -> usize {
        self.inner.lock().expect("lock").refusals
    }

    /// Every request to a case endpoint, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.inner.lock().expect("lock").requests.clone()
    }

    /// Waits until `n` requests to a case endpoint have arrived; all of them, in order.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Request> {
        crate::eventually(
            &format!("{n} requests at the Primero double"),
            timeout,
            || {
                let requests = self.requests();
                async move { (requests.len() >= n).then_some(requests) }
            },
        )
        .await
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut inner = inner.lock().expect("lock");
    if path == "/api/v2/tokens" && method == Method::POST {
        return log_in(&mut inner, &json);
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let valid = authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .and_then(|t| inner.tokens.get(t))
        .is_some_and(|expires| Instant::now() < *expires);
    let (status, answer) = if !valid {
        inner.refusals += 1;
        (
            StatusCode::UNAUTHORIZED,
            Some(error(401, &path, "Unauthorized")),
        )
    } else {
        answer(&method, &path, &json)
    };
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    inner.requests.push(Request {
        method,
        path,
        authorization,
        idempotency_key,
        body: json,
        status: status.as_u16(),
    });
    match answer {
        Some(body) => (status, axum::Json(body)).into_response(),
        None => status.into_response(),
    }
}

fn log_in(inner: &mut Inner, json: &Value) -> Response {
    inner.logins += 1;
    let user = &json["user"];
    if user["user_name"] != USERNAME || user["password"] != PASSWORD {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({ "error": "Invalid User name or password." })),
        )
            .into_response();
    }
    inner.issued += 1;
    let lifetime = inner.lifetime.unwrap_or(Duration::from_secs(60 * 60));
    let token = jwt(inner.issued, lifetime);
    inner
        .tokens
        .insert(token.clone(), Instant::now() + lifetime);
    (
        StatusCode::OK,
        [(header::AUTHORIZATION, format!("Bearer {token}"))],
        axum::Json(json!({ "user_name": USERNAME })),
    )
        .into_response()
}

/// A JWT-shaped token (header.payload.signature); the double only compares it whole.
fn jwt(n: usize, lifetime: Duration) -> String {
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{}.{}.{}",
        b64(json!({ "alg": "HS256" })),
        b64(json!({ "sub": USERNAME, "jti": n, "exp": now + lifetime.as_secs() })),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("signature-{n}"))
    )
}

fn answer(method: &Method, path: &str, json: &Value) -> (StatusCode, Option<Value>) {
    let case = path.strip_prefix("/api/v2/cases");
    match (method.as_str(), case) {
        ("POST", Some("")) => match json["data"].get("id") {
            Some(_) => (StatusCode::NO_CONTENT, None),
            None => {
                let mut data = json["data"].clone();
                data["id"] = json!(uuid::Uuid::now_v7().to_string());
                (StatusCode::OK, Some(json!({ "data": data })))
            }
        },
        ("PATCH", Some(id)) if id.len() > 1 => {
            let mut data = json["data"].clone();
            data["id"] = json!(&id[1..]);
            (StatusCode::OK, Some(json!({ "data": data })))
        }
        _ => (StatusCode::NOT_FOUND, Some(error(404, path, "Not Found"))),
    }
}

/// The `errors` shape of protocols.md §6.3.
fn error(code: u16, resource: &str, message: &str) -> Value {
    json!({ "errors": [{ "code": code, "resource": resource, "message": message }] })
}
