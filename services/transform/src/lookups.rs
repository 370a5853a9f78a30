//! Lookup tables: CSV or JSON files in the configuration directory, seen by filters and
//! transforms as `$<name>`.
//!
//! A CSV table becomes an object from its `key` column to its `value` column (or to the whole
//! row as an object when no value column is named); a JSON file is used as it is. Tables are
//! read at start-up, and [`Lookups::reload_changed`] re-reads the ones whose file changed, so
//! an operator can fix a mapping without a restart. A table that no longer reads keeps its
//! last good contents, and the error is reported.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use hiway_config::{Config, LookupConfig};
use jaq_json::Val;

/// Every table, with its current contents.
#[derive(Debug)]
pub struct Lookups {
    tables: Vec<Table>,
    /// One value per table, in `tables` order: the order of the jq global variables.
    values: RwLock<Arc<[Val]>>,
}

#[derive(Debug)]
struct Table {
    name: String,
    path: PathBuf,
    config: LookupConfig,
    /// Modification time and length when last read: a change of either means re-read.
    stamp: Mutex<Option<(SystemTime, u64)>>,
}

impl Lookups {
    /// Reads every table; the errors name the table, its file and what is wrong.
    pub fn load(config: &Config) -> Result<Self, Vec<String>> {
        let mut tables = Vec::new();
        let mut values = Vec::new();
        let mut errors = Vec::new();
        for (name, lookup) in &config.lookups {
            let table = Table {
                name: name.clone(),
                path: lookup.path(&config.base_dir),
                config: lookup.clone(),
                stamp: Mutex::new(None),
            };
            match table.read() {
                Ok((value, stamp)) => {
                    *lock(&table.stamp) = stamp;
                    values.push(value);
                }
                Err(e) => errors.push(format!("lookups.{name}.file: {e}")),
            }
            tables.push(table);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            tables,
            values: RwLock::new(values.into()),
        })
    }

    /// The jq variable names, `$<name>`, in the order [`Lookups::values`] gives the values.
    pub fn variables(&self) -> impl Iterator<Item = String> + '_ {
        self.tables.iter().map(|t| format!("${}", t.name))
    }

    /// The current contents of every table. Cheap: the values are shared, not copied.
    pub fn values(&self) -> Arc<[Val]> {
        self.values
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the tables whose file changed since it was last read. Returns one line per
    /// table re-read (`Ok`) or that failed to re-read (`Err`, the old contents stay).
    pub fn reload_changed(&self) -> Vec<Result<String, String>> {
        let mut report = Vec::new();
        let mut values: Option<Vec<Val>> = None;
        for (i, table) in self.tables.iter().enumerate() {
            let now = stamp_of(&table.path);
            if now.is_some() && now == *lock(&table.stamp) {
                continue;
            }
            match table.read() {
                Ok((value, stamp)) => {
                    *lock(&table.stamp) = stamp;
                    values.get_or_insert_with(|| self.values().to_vec())[i] = value;
                    report.push(Ok(format!(
                        "lookups.{}: reloaded {}",
                        table.name,
                        table.path.display()
                    )));
                }
                Err(e) => {
                    // Remember the failed version too, so a broken file is reported once,
                    // not on every check, and is read again when it changes next.
                    *lock(&table.stamp) = now;
                    report.push(Err(format!(
                        "lookups.{}.file: {e}; keeping the previous contents",
                        table.name
                    )));
                }
            }
        }
        if let Some(values) = values {
            *self
                .values
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = values.into();
        }
        report
    }
}

impl Table {
    fn read(&self) -> Result<(Val, Option<(SystemTime, u64)>), String> {
        let stamp = stamp_of(&self.path);
        let bytes = std::fs::read(&self.path)
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        let json = match self.path.extension().and_then(|e| e.to_str()) {
            Some("csv") => csv_table(&bytes, &self.config)
                .map_err(|e| format!("{}: {e}", self.path.display()))?,
            Some("json") => serde_json::from_slice::<serde_json::Value>(&bytes)
                .map_err(|e| format!("{} is not JSON: {e}", self.path.display()))?,
            _ => {
                return Err(format!("{} is neither .csv nor .json", self.path.display()));
            }
        };
        Ok((to_val(&json), stamp))
    }
}

fn csv_table(bytes: &[u8], config: &LookupConfig) -> Result<serde_json::Value, String> {
    let key = config
        .key
        .as_deref()
        .ok_or("a CSV table needs `key`, the column its keys are in")?;
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let headers = reader
        .headers()
        .map_err(|e| format!("cannot read the header row: {e}"))?
        .clone();
    let column = |name: &str, field: &str| {
        headers.iter().position(|h| h == name).ok_or_else(|| {
            format!(
                "{field} column {name:?} is not in the header row ({})",
                headers.iter().collect::<Vec<_>>().join(", ")
            )
        })
    };
    let key_at = column(key, "the key")?;
    let value_at = config
        .value
        .as_deref()
        .map(|v| column(v, "the value"))
        .transpose()?;
    let mut table = BTreeMap::new();
    for row in reader.records() {
        let row = row.map_err(|e| e.to_string())?;
        let line = row.position().map_or(0, csv::Position::line);
        let k = row.get(key_at).unwrap_or_default();
        if k.is_empty() {
            return Err(format!("line {line}: the key column {key:?} is empty"));
        }
        let v = match value_at {
            Some(i) => serde_json::Value::from(row.get(i).unwrap_or_default()),
            None => headers
                .iter()
                .zip(row.iter())
                .map(|(h, v)| (h.to_owned(), serde_json::Value::from(v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        };
        if table.insert(k.to_owned(), v).is_some() {
            return Err(format!("line {line}: the key {k:?} appears twice"));
        }
    }
    Ok(serde_json::Value::Object(table.into_iter().collect()))
}

/// A JSON value as jq sees it.
pub(crate) fn to_val(json: &serde_json::Value) -> Val {
    // Written and read back: jaq-json's reader is the one definition of how JSON becomes a
    // jq value (numbers especially), and tables are read rarely.
    let text = json.to_string();
    jaq_json::read::parse_single(text.as_bytes()).unwrap_or_default()
}

fn stamp_of(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, lookups: &str) -> Config {
        std::fs::write(dir.join("lookups.toml"), lookups).unwrap();
        hiway_config::load(Some(dir)).unwrap()
    }

    #[test]
    fn a_csv_table_maps_its_key_column_to_its_value_column() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("orgunits.csv"),
            "code,uid,name\nFAC-1,DiszpKrYNg8,Ngelehun CHC\nFAC-2,Rp268JB6Ne4,Adonkia CHP\n",
        )
        .unwrap();
        let c = config(
            dir.path(),
            "[lookups.orgunits]\nfile = \"orgunits.csv\"\nkey = \"code\"\nvalue = \"uid\"\n",
        );
        let l = Lookups::load(&c).unwrap();
        assert_eq!(l.variables().collect::<Vec<_>>(), ["$orgunits"]);
        assert_eq!(
            l.values()[0].to_string(),
            r#"{"FAC-1":"DiszpKrYNg8","FAC-2":"Rp268JB6Ne4"}"#
        );
    }

    #[test]
    fn a_csv_table_without_a_value_column_maps_each_key_to_its_row() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.csv"), "code,uid\nA,x\n").unwrap();
        let c = config(
            dir.path(),
            "[lookups.f]\nfile = \"f.csv\"\nkey = \"code\"\n",
        );
        let l = Lookups::load(&c).unwrap();
        assert_eq!(l.values()[0].to_string(), r#"{"A":{"code":"A","uid":"x"}}"#);
    }

    #[test]
    fn a_duplicate_key_is_refused_naming_its_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.csv"), "code,uid\nA,x\nB,y\nA,z\n").unwrap();
        let c = config(
            dir.path(),
            "[lookups.f]\nfile = \"f.csv\"\nkey = \"code\"\nvalue = \"uid\"\n",
        );
        let err = Lookups::load(&c).unwrap_err().join("\n");
        assert!(err.contains("lookups.f.file"), "{err}");
        assert!(
            err.contains("line 4") && err.contains("\"A\" appears twice"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_column_is_refused_naming_the_columns_there_are() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.csv"), "code,uid\nA,x\n").unwrap();
        let c = config(
            dir.path(),
            "[lookups.f]\nfile = \"f.csv\"\nkey = \"code\"\nvalue = \"label\"\n",
        );
        let err = Lookups::load(&c).unwrap_err().join("\n");
        assert!(
            err.contains("\"label\" is not in the header row (code, uid)"),
            "{err}"
        );
    }

    #[test]
    fn a_json_table_is_used_as_it_is_and_bad_json_names_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("labels.json"), r#"{"sex": {"m": "ชาย"}}"#).unwrap();
        let c = config(dir.path(), "[lookups.labels]\nfile = \"labels.json\"\n");
        let l = Lookups::load(&c).unwrap();
        assert_eq!(l.values()[0].to_string(), r#"{"sex":{"m":"ชาย"}}"#);

        std::fs::write(dir.path().join("labels.json"), "{\n \"sex\": }").unwrap();
        let err = Lookups::load(&c).unwrap_err().join("\n");
        assert!(
            err.contains("is not JSON") && err.contains("line 2"),
            "{err}"
        );
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_last_good_contents() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.json");
        std::fs::write(&file, r#"{"a": 1}"#).unwrap();
        let c = config(dir.path(), "[lookups.m]\nfile = \"m.json\"\n");
        let l = Lookups::load(&c).unwrap();
        assert!(l.reload_changed().is_empty(), "nothing changed yet");

        // A different length is a change even within the file system's time resolution.
        std::fs::write(&file, r#"{"a": 22}"#).unwrap();
        let report = l.reload_changed();
        assert_eq!(report.len(), 1);
        assert!(report[0].is_ok(), "{report:?}");
        assert_eq!(l.values()[0].to_string(), r#"{"a":22}"#);

        std::fs::write(&file, "{broken").unwrap();
        let report = l.reload_changed();
        assert!(
            matches!(&report[..], [Err(e)] if e.contains("keeping the previous contents")),
            "{report:?}"
        );
        assert_eq!(l.values()[0].to_string(), r#"{"a":22}"#);
        assert!(
            l.reload_changed().is_empty(),
            "a broken file is reported once"
        );
    }
}
