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

/// Where a secret comes from: `{ env = "VAR" }`, `{ file = "/path" }` or `{ value = "…" }`, or
/// the same as one string, `"env:VAR"`, `"file:/path"`, `"value:…"`.
///
/// The string form exists for overriding: configuration layers merge tables key by key, so a
/// later file writing `{ value = "…" }` over an earlier `{ env = "VAR" }` would leave both keys;
/// a string replaces the table whole.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "SecretSource")]
pub enum SecretRef {
    /// An environment variable.
    Env(String),
    /// A file whose content (trailing newline trimmed) is the secret.
    File(std::path::PathBuf),
    /// Inline; for tests and throwaway setups only.
    Value(SecretString),
}

/// How a secret reference is written.
#[derive(Deserialize)]
#[serde(untagged)]
enum SecretSource {
    Text(String),
    Table(SecretTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum SecretTable {
    Env(String),
    File(std::path::PathBuf),
    Value(SecretString),
}

impl TryFrom<SecretSource> for SecretRef {
    type Error = String;

    fn try_from(source: SecretSource) -> Result<Self, String> {
        match source {
            SecretSource::Table(SecretTable::Env(v)) => Ok(Self::Env(v)),
            SecretSource::Table(SecretTable::File(p)) => Ok(Self::File(p)),
            SecretSource::Table(SecretTable::Value(v)) => Ok(Self::Value(v)),
            SecretSource::Text(text) => match text.split_once(':') {
                Some(("env", var)) => Ok(Self::Env(var.to_owned())),
                Some(("file", path)) => Ok(Self::File(path.into())),
                Some(("value", value)) => Ok(Self::Value(SecretString::new(value))),
                // The text itself is never echoed: it may be the secret, written by mistake.
                _ => Err(
                    "a secret reference is { env = \"VAR\" }, { file = \"/path\" }, { value = \"…\" } or one string \"env:VAR\", \"file:/path\", \"value:…\"".to_owned(),
                ),
            },
        }
    }
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
