//! Client authentication: bearer API keys and basic auth, checked against SHA-256 hashes.
//!
//! Credentials are random 256-bit secrets made by `hiway client new`, so a single SHA-256 is
//! enough to make a leaked config useless to an attacker, and it costs microseconds per
//! request where a password hash (argon2, bcrypt) would cost tens of milliseconds.

use std::collections::HashMap;

use axum::http::{HeaderMap, header};
use base64::Engine;
use hiway_config::Config;
use hiway_proto::ClientName;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::IngressError;

/// The credentials of every client, indexed for lookup.
#[derive(Debug, Default)]
pub struct Clients {
    by_api_key: HashMap<[u8; 32], ClientName>,
    passwords: HashMap<String, (ClientName, [u8; 32])>,
}

impl Clients {
    /// From the validated configuration (hashes are known to be 64 hex digits).
    pub fn from_config(config: &Config) -> Self {
        let mut clients = Self::default();
        for (name, c) in &config.clients {
            if let Some(hash) = c.api_key_sha256.as_deref().and_then(decode) {
                clients.by_api_key.insert(hash, name.clone());
            }
            if let Some(hash) = c.password_sha256.as_deref().and_then(decode) {
                clients
                    .passwords
                    .insert(name.as_str().to_owned(), (name.clone(), hash));
            }
        }
        clients
    }

    /// The client these request headers authenticate, or 401.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<ClientName, IngressError> {
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(IngressError::Unauthenticated(
                "the request has no Authorization header",
            ))?
            .to_str()
            .map_err(|_| IngressError::Unauthenticated("the Authorization header is not text"))?;
        let (scheme, credentials) = value.split_once(' ').ok_or(IngressError::Unauthenticated(
            "the Authorization header has no scheme",
        ))?;
        let credentials = credentials.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            // The hash of the presented key is looked up: the map compares hashes, never keys,
            // so lookup time tells an attacker nothing about any real key.
            let hash: [u8; 32] = Sha256::digest(credentials.as_bytes()).into();
            self.by_api_key
                .get(&hash)
                .cloned()
                .ok_or(IngressError::Unauthenticated(
                    "the API key matches no client",
                ))
        } else if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(credentials)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or(IngressError::Unauthenticated(
                    "the basic credentials are not valid base64",
                ))?;
            let (user, password) = decoded
                .split_once(':')
                .ok_or(IngressError::Unauthenticated(
                    "the basic credentials have no ':'",
                ))?;
            let bad = IngressError::Unauthenticated("the user name or password is wrong");
            let (client, expected) = self.passwords.get(user).ok_or(bad)?;
            let given: [u8; 32] = Sha256::digest(password.as_bytes()).into();
            if bool::from(given.ct_eq(expected)) {
                Ok(client.clone())
            } else {
                Err(IngressError::Unauthenticated(
                    "the user name or password is wrong",
                ))
            }
        } else {
            Err(IngressError::Unauthenticated(
                "use Bearer or Basic authentication",
            ))
        }
    }
}

fn decode(hex_hash: &str) -> Option<[u8; 32]> {
    hex::decode(hex_hash).ok()?.try_into().ok()
}

/// A new random credential and its SHA-256 hash (hex), for `hiway client new`.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn clients() -> Clients {
        let toml = format!(
            "[clients.commcare]\napi_key_sha256 = \"{}\"\npassword_sha256 = \"{}\"\n",
            hash_secret("key-1"),
            hash_secret("pass-1")
        );
        Clients::from_config(&Config::from_toml(&toml).unwrap())
    }

    fn with_auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn a_known_bearer_key_authenticates_its_client() {
        let client = clients().authenticate(&with_auth("Bearer key-1")).unwrap();
        assert_eq!(client.as_str(), "commcare");
    }

    #[test]
    fn basic_auth_uses_the_client_name_and_password() {
        let good = base64::engine::general_purpose::STANDARD.encode("commcare:pass-1");
        let bad = base64::engine::general_purpose::STANDARD.encode("commcare:pass-2");
        assert!(
            clients()
                .authenticate(&with_auth(&format!("Basic {good}")))
                .is_ok()
        );
        assert!(
            clients()
                .authenticate(&with_auth(&format!("Basic {bad}")))
                .is_err()
        );
    }

    #[test]
    fn a_wrong_key_or_missing_header_is_refused() {
        assert!(clients().authenticate(&with_auth("Bearer nope")).is_err());
        assert!(clients().authenticate(&HeaderMap::new()).is_err());
        assert!(clients().authenticate(&with_auth("Digest x")).is_err());
    }
}
