//! Destinations that hand out short-lived tokens: the sender logs in itself.
//!
//! Primero v2 takes only `Authorization: Bearer <JWT>`, and its JWTs expire after 60 minutes
//! (`protocols.md` §6.1). A token configured once would stop working an hour after start-up,
//! so for `auth = { type = "primero", … }` the sender logs in with the user's name and
//! password (`POST /api/v2/tokens`), keeps the token it is given, and logs in again:
//! - before using a token that is `refresh_after` old (50 minutes by default), so a steady
//!   stream never meets an expired one;
//! - once when the destination answers 401 to a request made with it (a token revoked, or
//!   Primero's clock or lifetime setting differs), and then repeats that request once.
//!
//! One login serves every request in flight: requests that find the token stale or refused
//! wait for the one login under way instead of each starting their own. Issuing a new token
//! does not invalidate the old ones, so requests already sent with it are unaffected.
//!
//! A login the destination refuses (wrong password: 401; any other 4xx) is a permanent
//! outcome for the message that needed it, naming the login URL and the user; one that fails
//! on the way (no connection, a timeout, 5xx) is retried like any delivery.

use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Client, Url};
use tokio::sync::Mutex;

use crate::outcome::{self, Outcome};

/// A token and when it was issued.
#[derive(Clone)]
struct Token {
    header: HeaderValue,
    issued: Instant,
}

/// How one destination is logged in to, and its current token.
pub struct Login {
    url: Url,
    username: String,
    /// `{"user":{"user_name":…,"password":…}}`, built once.
    body: Bytes,
    refresh_after: Duration,
    current: Mutex<Option<Token>>,
}

impl std::fmt::Debug for Login {
    // Never the body: it holds the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("url", &self.url.as_str())
            .field("username", &self.username)
            .field("refresh_after", &self.refresh_after)
            .finish_non_exhaustive()
    }
}

impl Login {
    /// Logs in at `token_url`, or at `/api/v2/tokens` on `destination_url`'s host.
    pub fn primero(
        destination_url: &Url,
        token_url: Option<&Url>,
        username: &str,
        password: &str,
        refresh_after: Duration,
    ) -> Self {
        let url = token_url.cloned().unwrap_or_else(|| {
            let mut url = destination_url.clone();
            url.set_path("/api/v2/tokens");
            url.set_query(None);
            url.set_fragment(None);
            url
        });
        let body = serde_json::json!({ "user": { "user_name": username, "password": password } });
        Self {
            url,
            username: username.to_owned(),
            body: Bytes::from(body.to_string()),
            refresh_after,
            current: Mutex::new(None),
        }
    }

    /// The `Authorization` value to send now: the current token, or a new one when there is
    /// none yet or it is `refresh_after` old.
    pub async fn authorization(&self, client: &Client) -> Result<HeaderValue, Outcome> {
        self.token(client, None).await
    }

    /// The destination answered 401 to a request sent with `refused`: the value to repeat it
    /// with. Logs in again unless another request already replaced that token meanwhile.
    pub async fn renew(
        &self,
        client: &Client,
        refused: &HeaderValue,
    ) -> Result<HeaderValue, Outcome> {
        self.token(client, Some(refused)).await
    }

    /// The current token, unless it is `refresh_after` old or is the one just `refused`; then
    /// a new one. The lock is held through the login, so the requests in flight share it.
    async fn token(
        &self,
        client: &Client,
        refused: Option<&HeaderValue>,
    ) -> Result<HeaderValue, Outcome> {
        let mut current = self.current.lock().await;
        if let Some(token) = &*current {
            if refused == Some(&token.header) {
                // Known bad: never offered again, even if the login below fails.
                *current = None;
            } else if token.issued.elapsed() < self.refresh_after {
                return Ok(token.header.clone());
            }
        }
        let token = self.log_in(client).await?;
        let header = token.header.clone();
        *current = Some(token);
        Ok(header)
    }

    async fn log_in(&self, client: &Client) -> Result<Token, Outcome> {
        let issued = Instant::now();
        let answer = crate::kinds::http::send_once(
            client
                .post(self.url.clone())
                .header(CONTENT_TYPE, "application/json")
                .header(ACCEPT, "application/json")
                .body(self.body.clone()),
        )
        .await
        .map_err(|o| self.failed(o))?;
        match outcome::classify_http(answer.status, &answer.headers, &answer.body, &[]) {
            Outcome::Delivered { status } => {
                // Primero puts the JWT in the answer's Authorization header; the body only
                // names the user.
                let mut header = answer
                    .headers
                    .get(AUTHORIZATION)
                    .filter(|v| v.as_bytes().starts_with(b"Bearer ") && v.len() > 7)
                    .cloned()
                    .ok_or_else(|| Outcome::Permanent {
                        status: Some(status),
                        error: format!(
                            "logging in at {} as {:?}: HTTP {status} came without the token \
                             (an Authorization: Bearer header)",
                            self.url, self.username
                        ),
                    })?;
                header.set_sensitive(true);
                tracing::info!(url = %self.url, user = %self.username, "logged in");
                Ok(Token { header, issued })
            }
            other => Err(self.failed(other)),
        }
    }

    /// A failed login as the outcome of the message that needed it, saying so.
    fn failed(&self, outcome: Outcome) -> Outcome {
        outcome.in_context(|error| {
            format!("logging in at {} as {:?}: {error}", self.url, self.username)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_login_url_defaults_to_the_token_endpoint_on_the_destinations_host() {
        let base = Url::parse("https://primero.example.org/api/v2/?x=1").unwrap();
        let login = Login::primero(&base, None, "bot", "pw", Duration::from_secs(60));
        assert_eq!(
            login.url.as_str(),
            "https://primero.example.org/api/v2/tokens"
        );

        let own = Url::parse("https://auth.example.org/primero/api/v2/tokens").unwrap();
        let login = Login::primero(&base, Some(&own), "bot", "pw", Duration::from_secs(60));
        assert_eq!(login.url, own);
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let base = Url::parse("https://primero.example.org/api/v2/").unwrap();
        let login = Login::primero(&base, None, "bot", "s3cret!", Duration::from_secs(60));
        let shown = format!("{login:?}");
        assert!(shown.contains("bot"), "{shown}");
        assert!(!shown.contains("s3cret!"), "{shown}");
    }
}
