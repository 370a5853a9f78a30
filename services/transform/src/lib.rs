//! hiway's filters, transforms and lookup tables.
//!
//! Every route's jq programs are compiled once, when a service starts or `hiway config check`
//! runs: a program that does not compile stops both, naming the file, the route and jq's
//! error. Per message, [`Transforms::apply`] runs a route's filter and transform on the body
//! (parsed once per message, whatever the number of routes) and returns what to send: nothing
//! (filtered), or each output serialized as a request body, with the path and method a
//! transform that emits requests chose.
//!
//! Programs see these global variables:
//! - `$hiway`: `{message_id, channel, client, received_at, route}` of the message;
//! - `$<name>` for each lookup table (`[lookups.<name>]`).

mod jq;
mod json;
mod lookups;

use std::collections::BTreeMap;

use hiway_config::{Config, Emits};
use hiway_proto::RouteName;
use jaq_json::Val;

pub use jq::{Program, dhis2_uid, uuid5};
pub use lookups::Lookups;

/// The compiled programs of every route, and the lookup tables they read.
#[derive(Debug)]
pub struct Transforms {
    routes: BTreeMap<RouteName, RoutePrograms>,
    lookups: Lookups,
}

#[derive(Debug)]
struct RoutePrograms {
    filter: Option<Program>,
    transform: Option<Program>,
    emits: Emits,
}

/// What a route makes of one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// The route has no transform: the message goes as it came.
    Unchanged,
    /// The filter turned it away.
    Filtered,
    /// The transform's outputs, zero or more.
    Outputs(Vec<Output>),
}

/// One output of a transform.
#[derive(Debug, PartialEq, Eq)]
pub struct Output {
    /// The request body, JSON.
    pub body: Vec<u8>,
    /// A path relative to the destination's URL (transforms that emit requests).
    pub path: Option<String>,
    /// An HTTP method (transforms that emit requests).
    pub method: Option<String>,
}

/// What `$hiway` holds for a message.
#[derive(Debug)]
pub struct Meta<'a> {
    /// The message id.
    pub message_id: &'a str,
    /// Its channel.
    pub channel: &'a str,
    /// Its client.
    pub client: &'a str,
    /// When ingress accepted it (RFC 3339).
    pub received_at: &'a str,
}

/// The parsed body of a message, shared by every route that needs it.
pub type Input = Val;

/// Parses a message body as JSON for the programs; the error says where it stops being JSON.
pub fn parse(body: &[u8]) -> Result<Input, String> {
    jaq_json::read::parse_single(body).map_err(|e| format!("the body is not JSON: {e}"))
}

/// Makes a jq value from a JSON value (used for the input of on-dead routes).
pub fn from_json(json: &serde_json::Value) -> Input {
    lookups::to_val(json)
}

impl Transforms {
    /// Compiles every route's programs and reads every lookup table. All errors are returned
    /// at once, each naming the route or table, its file and what is wrong.
    pub fn compile(config: &Config) -> Result<Self, Vec<String>> {
        let lookups = Lookups::load(config)?;
        let globals: Vec<String> = std::iter::once("$hiway".to_owned())
            .chain(lookups.variables())
            .collect();
        let mut errors = Vec::new();
        let mut routes = BTreeMap::new();
        for (name, route) in &config.routes {
            let file = config
                .source_of(&format!("routes.{name}"))
                .map(|f| format!(" (in {f})"))
                .unwrap_or_default();
            let filter = route.filter.as_deref().and_then(|code| {
                Program::compile(code, &globals)
                    .map_err(|e| errors.push(format!("routes.{name}.filter{file}: jq: {e}")))
                    .ok()
            });
            let transform = match route.transform_source(&config.base_dir) {
                None => None,
                Some(Err(e)) => {
                    errors.push(format!("routes.{name}.transform_file{file}: {e}"));
                    None
                }
                Some(Ok((code, origin))) => {
                    let key = if origin == "transform" {
                        format!("routes.{name}.transform{file}")
                    } else {
                        format!("routes.{name}.transform_file{file}: {origin}")
                    };
                    Program::compile(&code, &globals)
                        .map_err(|e| errors.push(format!("{key}: jq: {e}")))
                        .ok()
                }
            };
            routes.insert(
                name.clone(),
                RoutePrograms {
                    filter,
                    transform,
                    emits: route.emits,
                },
            );
        }
        if errors.is_empty() {
            Ok(Self { routes, lookups })
        } else {
            Err(errors)
        }
    }

    /// Whether this route runs a program on the message (so it needs the body as JSON).
    pub fn needs_json(&self, route: &RouteName) -> bool {
        self.routes
            .get(route)
            .is_some_and(|r| r.filter.is_some() || r.transform.is_some())
    }

    /// The lookup tables, to reload them.
    pub fn lookups(&self) -> &Lookups {
        &self.lookups
    }

    /// Runs the route's filter, then its transform. The error says which program failed and
    /// why; the caller dead-letters the message for this route only.
    pub fn apply(
        &self,
        route: &RouteName,
        input: &Input,
        meta: &Meta<'_>,
    ) -> Result<Applied, String> {
        let Some(programs) = self.routes.get(route) else {
            return Ok(Applied::Unchanged);
        };
        if programs.filter.is_none() && programs.transform.is_none() {
            return Ok(Applied::Unchanged);
        }
        let tables = self.lookups.values();
        // Built once for both programs: a clone of a jq value only counts a reference.
        let hiway = hiway_var(meta, route);
        let globals = || std::iter::once(hiway.clone()).chain(tables.iter().cloned());
        if let Some(filter) = &programs.filter
            && !filter
                .test(input.clone(), globals())
                .map_err(|e| format!("routes.{route}.filter failed: {e}"))?
        {
            return Ok(Applied::Filtered);
        }
        let Some(transform) = &programs.transform else {
            return Ok(Applied::Unchanged);
        };
        let outputs = transform
            .run(input.clone(), globals())
            .map_err(|e| format!("routes.{route}.transform failed: {e}"))?;
        outputs
            .iter()
            .enumerate()
            .map(|(i, v)| match programs.emits {
                Emits::Body => Ok(Output {
                    body: to_json(v),
                    path: None,
                    method: None,
                }),
                Emits::Requests => request(v).map_err(|e| {
                    format!("routes.{route}.transform output {i} is not a request: {e}")
                }),
            })
            .collect::<Result<_, _>>()
            .map(Applied::Outputs)
    }
}

fn hiway_var(meta: &Meta<'_>, route: &RouteName) -> Val {
    let field = |k: &str, v: &str| (Val::from(k.to_owned()), Val::from(v.to_owned()));
    Val::obj(
        [
            field("message_id", meta.message_id),
            field("channel", meta.channel),
            field("client", meta.client),
            field("received_at", meta.received_at),
            field("route", route.as_str()),
        ]
        .into_iter()
        .collect(),
    )
}

fn to_json(v: &Val) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    json::write(&mut out, v);
    out
}

/// `{"body": …, "path": "…"?, "method": "…"?}` read as an [`Output`].
fn request(v: &Val) -> Result<Output, String> {
    let Val::Obj(fields) = v else {
        return Err(format!("expected an object with \"body\", found {v}"));
    };
    let text = |k: &str| -> Result<Option<String>, String> {
        match fields.get(&Val::from(k.to_owned())) {
            None | Some(Val::Null) => Ok(None),
            Some(Val::TStr(s)) => Ok(Some(String::from_utf8_lossy(s).into_owned())),
            Some(other) => Err(format!("\"{k}\" must be a string, found {other}")),
        }
    };
    for key in fields.keys() {
        if !matches!(key, Val::TStr(k) if ["body", "path", "method"].contains(&&*String::from_utf8_lossy(k)))
        {
            return Err(format!(
                "unknown field {key}; a request has body, path and method"
            ));
        }
    }
    let body = fields
        .get(&Val::from("body".to_owned()))
        .ok_or("it has no \"body\"")?;
    Ok(Output {
        body: to_json(body),
        path: text("path")?,
        method: text("method")?.map(|m| m.to_ascii_uppercase()),
    })
}

#[cfg(test)]
mod tests;
