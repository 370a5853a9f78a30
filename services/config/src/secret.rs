//! Secrets: never printed, referenced from the environment or a file.

use std::fmt;

use serde::Deserialize;

/// A secret value. `Debug` and `Display` redact it, so it cannot leak through a log line or an
/// error message; [`SecretString::expose`] is the one way to read it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Call it only where the value is used.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a secret comes from: `{ env = "VAR" }`, `{ file = "/path" }` or `{ value = "…" }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum SecretRef {
    /// An environment variable.
    Env(String),
    /// A file whose content (trailing newline trimmed) is the secret.
    File(std::path::PathBuf),
    /// Inline; for tests and throwaway setups only.
    Value(SecretString),
}

impl SecretRef {
    /// Reads the secret. The error names where it looked, never the value.
    pub fn resolve(&self) -> Result<SecretString, String> {
        match self {
            SecretRef::Env(var) => std::env::var(var)
                .map(SecretString)
                .map_err(|_| format!("environment variable {var} is not set")),
            SecretRef::File(path) => std::fs::read_to_string(path)
                .map(|s| SecretString(s.trim_end_matches(['\r', '\n']).to_owned()))
                .map_err(|e| format!("cannot read secret file {}: {e}", path.display())),
            SecretRef::Value(v) => Ok(v.clone()),
        }
    }
}
