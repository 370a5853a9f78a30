//! The HTTP load generator: posts the same ~1 KB CommCare-like form to ingress at a fixed
//! rate, open loop.
//!
//! Open loop means requests are sent on schedule whether or not earlier ones were answered,
//! as independent sources do. A closed loop (send, wait, send) slows down with the system
//! under test and so hides its latency; here a slow hiway shows up as latency, queued
//! requests and errors. Every few milliseconds a ticker works out how many requests are due
//! since the start and spawns them; in-flight requests are capped, and a request that would
//! exceed the cap is not sent and counts as an error (the system did not keep up).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::sync::{Semaphore, mpsc};

/// The request body: a CommCare form forward (`form-forward-json` from CommCare's data
/// forwarding), trimmed to about 1 KB of compact JSON.
pub const FORM: &[u8] = include_bytes!("../data/commcare-form-1k.json");

/// How often the generator looks at what is due. Short enough that a step at thousands per
/// second sends a handful of requests per tick rather than a burst.
const TICK: Duration = Duration::from_millis(2);

/// Requests in flight at once at most; also the size of the connection pool.
pub const MAX_IN_FLIGHT: usize = 512;

/// Longest wait for one answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Posts to one channel of ingress.
///
/// Straight on hyper's HTTP/1 connections rather than through reqwest: the generator shares
/// the machine with what it measures, and reqwest re-parses the URL (with IDNA), checks out of
/// a locked pool and arms a redirect policy on every request. Here the request head is built
/// from values prepared once, and idle connections wait in a stack. At most
/// [`MAX_IN_FLIGHT`] connections are open, one per request in flight.
pub struct Load {
    path: Uri,
    host: HeaderValue,
    authorization: HeaderValue,
    body: Bytes,
    pool: Arc<Pool>,
}

/// Where requests go, and the connections that are open and idle.
struct Pool {
    /// `host:port` to connect to.
    authority: String,
    idle: Mutex<Vec<Connection>>,
}

type Connection = SendRequest<Full<Bytes>>;

/// Why requests failed, by kind.
#[derive(Clone, Debug, Default)]
pub struct Errors {
    /// Due but not sent: [`MAX_IN_FLIGHT`] requests were already waiting.
    pub not_sent: u64,
    /// Answered with a status other than 202, by status.
    pub statuses: BTreeMap<u16, u64>,
    /// No answer: connection refused or reset, timeout.
    pub transport: u64,
    /// 202 without a readable message id.
    pub bad_answer: u64,
}

impl Errors {
    /// Every error.
    pub fn total(&self) -> u64 {
        self.not_sent + self.statuses.values().sum::<u64>() + self.transport + self.bad_answer
    }

    /// `12 × HTTP 503, 3 transport` (empty when there are none).
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(status, n)| format!("{n} × HTTP {status}"))
            .collect();
        if self.transport > 0 {
            parts.push(format!("{} transport", self.transport));
        }
        if self.not_sent > 0 {
            parts.push(format!("{} not sent (in-flight cap)", self.not_sent));
        }
        if self.bad_answer > 0 {
            parts.push(format!("{} bad 202 body", self.bad_answer));
        }
        parts.join(", ")
    }
}

/// What one run of the generator did.
#[derive(Debug)]
pub struct LoadResult {
    /// Requests due in the window (sent or not).
    pub offered: u64,
    /// Accepted messages: id (as u128) and when the 202 arrived.
    pub accepted: Vec<(u128, Instant)>,
    /// Failures.
    pub errors: Errors,
}

enum Outcome {
    Accepted(u128, Instant),
    Status(u16),
    Transport,
    BadAnswer,
}

#[derive(serde::Deserialize)]
struct Answer {
    id: String,
}

impl Load {
    /// A generator posting to `channel` of the ingress at `base_url` (`http://host:port`),
    /// authenticated with the bearer `key`.
    pub fn new(base_url: &str, channel: &str, key: &str) -> anyhow::Result<Self> {
        let url = url::Url::parse(base_url).with_context(|| format!("ingress URL {base_url}"))?;
        let host = url
            .host_str()
            .with_context(|| format!("ingress URL {base_url} has no host"))?;
        let port = url
            .port_or_known_default()
            .with_context(|| format!("ingress URL {base_url} has no port"))?;
        let authority = format!("{host}:{port}");
        Ok(Self {
            path: format!("/v1/channels/{channel}/messages").parse()?,
            host: HeaderValue::from_str(&authority)?,
            authorization: HeaderValue::from_str(&format!("Bearer {key}"))?,
            body: Bytes::from_static(FORM),
            pool: Arc::new(Pool {
                authority,
                idle: Mutex::new(Vec::with_capacity(MAX_IN_FLIGHT)),
            }),
        })
    }

    /// Offers `rate` requests per second from `started` for `duration`, then waits for every
    /// answer.
    pub async fn run(&self, rate: f64, started: Instant, duration: Duration) -> LoadResult {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let total = (rate * duration.as_secs_f64()).round() as u64;
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut offered = 0u64;
        let mut errors = Errors::default();
        loop {
            ticker.tick().await;
            let elapsed = started.elapsed().min(duration);
            let due = ((rate * elapsed.as_secs_f64()) as u64).min(total);
            while offered < due {
                offered += 1;
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let request = self.request();
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let _ = tx.send(request.await);
                            drop(permit);
                        });
                    }
                    Err(_) => errors.not_sent += 1,
                }
            }
            if elapsed >= duration {
                break;
            }
        }
        // The channel ends when the last request task has sent its outcome.
        drop(tx);
        let mut accepted = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        while let Some(outcome) = rx.recv().await {
            match outcome {
                Outcome::Accepted(id, at) => accepted.push((id, at)),
                Outcome::Status(s) => *errors.statuses.entry(s).or_default() += 1,
                Outcome::Transport => errors.transport += 1,
                Outcome::BadAnswer => errors.bad_answer += 1,
            }
        }
        LoadResult {
            offered,
            accepted,
            errors,
        }
    }

    /// One POST; the accepted time is taken as soon as the 202's head arrives.
    fn request(&self) -> impl Future<Output = Outcome> + Send + 'static {
        let request = Request::post(self.path.clone())
            .header(HOST, self.host.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(self.body.clone()));
        let pool = self.pool.clone();
        async move {
            let Ok(request) = request else {
                return Outcome::Transport;
            };
            tokio::time::timeout(REQUEST_TIMEOUT, exchange(&pool, request))
                .await
                .unwrap_or(Outcome::Transport)
        }
    }
}

/// Sends `request` on an idle connection, or a new one, and reads the whole answer.
async fn exchange(pool: &Pool, request: Request<Full<Bytes>>) -> Outcome {
    let mut connection = loop {
        let pooled = pool
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match pooled {
            // A connection the server closed while it was idle is dropped here, not used.
            Some(mut c) => {
                if c.ready().await.is_ok() {
                    break c;
                }
            }
            None => match connect(&pool.authority).await {
                Ok(c) => break c,
                Err(_) => return Outcome::Transport,
            },
        }
    };
    let response = match connection.send_request(request).await {
        Ok(r) => r,
        Err(_) => return Outcome::Transport,
    };
    let at = Instant::now();
    let status = response.status().as_u16();
    // Read the body in every case, so the connection can take the next request.
    let body = response.into_body().collect().await.map(|b| b.to_bytes());
    if body.is_ok() {
        pool.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(connection);
    }
    if status != 202 {
        return Outcome::Status(status);
    }
    body.ok()
        .and_then(|b| serde_json::from_slice::<Answer>(&b).ok())
        .and_then(|a| uuid::Uuid::parse_str(&a.id).ok())
        .map_or(Outcome::BadAnswer, |id| Outcome::Accepted(id.as_u128(), at))
}

/// A new HTTP/1.1 connection; its I/O runs as a task of its own until either side closes it.
async fn connect(authority: &str) -> anyhow::Result<Connection> {
    let stream = tokio::net::TcpStream::connect(authority).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_is_about_one_kilobyte_of_json() {
        let form: serde_json::Value = serde_json::from_slice(FORM).unwrap();
        assert!((1000..=1048).contains(&FORM.len()), "{} bytes", FORM.len());
        assert_eq!(form["form"]["@name"], "ANC Visit");
    }

    #[test]
    fn errors_are_described_by_kind() {
        let mut e = Errors::default();
        assert_eq!((e.total(), e.describe().as_str()), (0, ""));
        e.statuses.insert(503, 12);
        e.transport = 3;
        e.not_sent = 1;
        assert_eq!(e.total(), 16);
        assert_eq!(
            e.describe(),
            "12 × HTTP 503, 3 transport, 1 not sent (in-flight cap)"
        );
    }
}
