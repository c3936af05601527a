//! The record set: Avro schemas of actions and events plus the event →
//! notification mapping, loaded at start-up from a directory (or the default
//! set compiled into the binary) so an operator can drop in the real records.
//!
//! Layout of a schema directory:
//! `actions/*.avsc` (records clients may send), `bridge/*.avsc` (records only the
//! bridge publishes), `events/*.avsc` (backend records) and `mapping.toml`.

pub mod convert;
mod mapping;
pub mod wire;

pub use convert::{FieldError, Keys, Names};
pub use mapping::{Audience, DirectoryChange, Each, EventMapping, Transform};

use apache_avro::schema::{RecordSchema, Schema};
use apache_avro::types::Value as Avro;
use include_dir::{include_dir, Dir};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

static DEFAULT_SET: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/../../schemas");

/// Fields the bridge fills in every record it publishes (contract section 4).
pub const IDENTITY_FIELDS: [&str; 3] = ["tenantGuid", "agentGuid", "irInstance"];

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("schema directory {dir}: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
    #[error("{file}: {problem}")]
    File { file: String, problem: String },
}

fn file_error(file: &str, problem: impl Into<String>) -> SchemaError {
    SchemaError::File { file: file.to_owned(), problem: problem.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A client may send it as an action.
    Action,
    /// Only the bridge publishes it (chat availability).
    Bridge,
    /// The backend sends it; it becomes notifications.
    Event,
}

#[derive(Debug)]
pub struct Record {
    pub kind: RecordKind,
    pub schema: RecordSchema,
    /// Where it was loaded from, for messages.
    pub file: String,
    /// The schema as written in its file (`GET /v1/schemas`).
    pub source: serde_json::Value,
}

impl Record {
    pub fn name(&self) -> &str {
        &self.schema.name.name
    }

    pub fn has_field(&self, name: &str) -> bool {
        self.schema.lookup.contains_key(name)
    }
}

#[derive(Debug)]
pub struct SchemaSet {
    records: HashMap<String, Record>,
    mappings: HashMap<String, EventMapping>,
    names: Names,
    wire: wire::Wire,
    /// Where the set came from, for the start-up log.
    pub origin: String,
}

struct SourceFile {
    path: String,
    text: String,
}

/// The files of a record set, wherever they were read from.
struct Sources {
    avsc: Vec<(RecordKind, SourceFile)>,
    mapping: Option<SourceFile>,
}

impl SchemaSet {
    /// Loads the set from `dir`, or the default set shipped in the binary.
    pub fn load(dir: Option<&Path>) -> Result<Self, SchemaError> {
        let (sources, origin) = match dir {
            Some(dir) => (read_dir(dir)?, dir.display().to_string()),
            None => (embedded(), "built-in default set".to_owned()),
        };
        Self::from_sources(sources, origin)
    }

    fn from_sources(sources: Sources, origin: String) -> Result<Self, SchemaError> {
        let mapping_file = sources.mapping.ok_or_else(|| file_error(&format!("{origin}/mapping.toml"), "missing"))?;
        let avsc: Vec<&SourceFile> = sources.avsc.iter().map(|(_, f)| f).collect();
        let mut json = Vec::with_capacity(avsc.len());
        for f in &avsc {
            match serde_json::from_str::<serde_json::Value>(&f.text) {
                Ok(v) => json.push(v),
                Err(e) => return Err(file_error(&f.path, format!("not valid JSON: {e}"))),
            }
        }
        let parsed = Schema::parse_list(avsc.iter().map(|f| f.text.as_str())).map_err(|e| {
            // parse_list cannot say which file failed; the first one that fails
            // alone is almost always the culprit.
            let culprit =
                avsc.iter().find(|f| Schema::parse_str(&f.text).is_err()).map_or(origin.as_str(), |f| &f.path);
            file_error(culprit, format!("invalid Avro schema: {e}"))
        })?;
        let mut names = Names::new();
        let mut records = HashMap::new();
        for ((schema, (kind, file)), source) in parsed.into_iter().zip(&sources.avsc).zip(json) {
            collect_names(&schema, &mut names);
            let Schema::Record(rs) = schema else {
                return Err(file_error(&file.path, "top-level schema must be a record"));
            };
            let kind = *kind;
            let record = Record { kind, schema: rs, file: file.path.clone(), source };
            check_record(&record)?;
            if let Some(prev) = records.insert(record.name().to_owned(), record) {
                return Err(file_error(
                    &file.path,
                    format!("record `{}` is also defined in {}", prev.name(), prev.file),
                ));
            }
        }
        let mappings = mapping::load(&mapping_file.path, &mapping_file.text, &records)?;
        let wire = wire::Wire::new(records.iter().map(|(n, r)| (n.as_str(), Schema::Record(r.schema.clone()))));
        Ok(SchemaSet { records, mappings, names, wire, origin })
    }

    pub fn record(&self, name: &str) -> Option<&Record> {
        self.records.get(name)
    }

    /// A record clients may send, by name.
    pub fn action(&self, name: &str) -> Option<&Record> {
        self.records.get(name).filter(|r| r.kind == RecordKind::Action)
    }

    /// A backend event and its mapping, by name.
    pub fn event(&self, name: &str) -> Option<(&Record, &EventMapping)> {
        let r = self.records.get(name).filter(|r| r.kind == RecordKind::Event)?;
        Some((r, self.mappings.get(name)?))
    }

    /// Avro single-object encoding of the set's records (the Kafka wire format).
    pub fn wire(&self) -> &wire::Wire {
        &self.wire
    }

    pub fn action_names(&self) -> impl Iterator<Item = &str> {
        self.records.values().filter(|r| r.kind == RecordKind::Action).map(Record::name)
    }

    pub fn event_names(&self) -> impl Iterator<Item = &str> {
        self.records.values().filter(|r| r.kind == RecordKind::Event).map(Record::name)
    }

    /// The named types of the set, by full name.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The set as `GET /v1/schemas` serves it: each record's schema as written
    /// in its file, by kind and name, and the mapping as `mapping.toml` says it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (dir, kind) in KINDS {
            let records: serde_json::Map<String, serde_json::Value> = self
                .records
                .values()
                .filter(|r| r.kind == kind)
                .map(|r| (r.name().to_owned(), r.source.clone()))
                .collect();
            out.insert(dir.to_owned(), records.into());
        }
        let events: serde_json::Map<String, serde_json::Value> =
            self.mappings.iter().map(|(name, m)| (name.clone(), serde_json::to_value(m).unwrap_or_default())).collect();
        out.insert("mapping".to_owned(), serde_json::json!({ "events": events }));
        out.into()
    }

    /// Builds and validates a record from plain JSON.
    pub fn build(
        &self,
        record: &Record,
        json: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Avro, FieldError> {
        convert::record_from_json(&record.schema, json, &self.names)
    }
}

fn check_record(r: &Record) -> Result<(), SchemaError> {
    let required: &[&str] = match r.kind {
        RecordKind::Action | RecordKind::Bridge => &IDENTITY_FIELDS,
        RecordKind::Event => &["tenantGuid"],
    };
    for f in required {
        let ok =
            r.schema.lookup.get(*f).map(|&i| &r.schema.fields[i].schema).is_some_and(|s| matches!(s, Schema::String));
        if !ok {
            return Err(file_error(&r.file, format!("record `{}` needs a string field `{f}`", r.name())));
        }
    }
    Ok(())
}

fn collect_names(schema: &Schema, names: &mut Names) {
    match schema {
        Schema::Record(r) => {
            names.insert(r.name.fullname(None), schema.clone());
            r.fields.iter().for_each(|f| collect_names(&f.schema, names));
        }
        Schema::Enum(e) => {
            names.insert(e.name.fullname(None), schema.clone());
        }
        Schema::Fixed(f) => {
            names.insert(f.name.fullname(None), schema.clone());
        }
        Schema::Array(a) => collect_names(&a.items, names),
        Schema::Map(m) => collect_names(&m.types, names),
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_names(v, names)),
        _ => {}
    }
}

const KINDS: [(&str, RecordKind); 3] =
    [("actions", RecordKind::Action), ("bridge", RecordKind::Bridge), ("events", RecordKind::Event)];

fn read_file(path: &Path) -> Result<SourceFile, SchemaError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(&path.display().to_string(), e.to_string()))?;
    Ok(SourceFile { path: path.display().to_string(), text })
}

fn read_dir(dir: &Path) -> Result<Sources, SchemaError> {
    let io = |source| SchemaError::Dir { dir: dir.to_owned(), source };
    let mut avsc = Vec::new();
    for (sub, kind) in KINDS {
        let sub_dir = dir.join(sub);
        if !sub_dir.is_dir() {
            continue;
        }
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&sub_dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "avsc"))
            .collect();
        paths.sort();
        for path in paths {
            avsc.push((kind, read_file(&path)?));
        }
    }
    let mapping = dir.join("mapping.toml");
    let mapping = if mapping.is_file() { Some(read_file(&mapping)?) } else { None };
    Ok(Sources { avsc, mapping })
}

fn embedded() -> Sources {
    let built_in = |f: &include_dir::File<'_>| SourceFile {
        path: format!("(built-in) {}", f.path().display()),
        text: f.contents_utf8().unwrap_or_default().to_owned(),
    };
    let mut avsc = Vec::new();
    for (sub, kind) in KINDS {
        let Some(d) = DEFAULT_SET.get_dir(sub) else { continue };
        let mut entries: Vec<_> = d.files().filter(|f| f.path().extension().is_some_and(|x| x == "avsc")).collect();
        entries.sort_by_key(|f| f.path());
        avsc.extend(entries.into_iter().map(|f| (kind, built_in(f))));
    }
    Sources { avsc, mapping: DEFAULT_SET.get_file("mapping.toml").map(built_in) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_set_loads_with_36_actions_and_a_mapping_per_event() {
        let set = SchemaSet::load(None).expect("default set");
        assert_eq!(set.action_names().count(), 36);
        assert!(set.action("AgentChatAvailabilityEvent").is_none(), "bridge-only record is not a client action");
        assert!(set.record("AgentChatAvailabilityEvent").is_some());
        for name in ["InteractionUpdateEvent", "OffHookEvent", "AgentUpdatedEvent", "AgentInteractionListEvent"] {
            assert!(set.event(name).is_some(), "{name}");
        }
    }

    #[test]
    fn shipped_directory_equals_the_built_in_set() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        let set = SchemaSet::load(Some(&dir)).expect("directory set");
        assert_eq!(set.action_names().count(), 36);
    }
}
