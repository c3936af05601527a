//! Plain JSON ⇄ Avro values, directed by the schema: the only way outside JSON
//! (client action details, backend-port events) becomes an Avro record, and the
//! only way a record becomes notification data.

use apache_avro::schema::{RecordSchema, Schema, UnionSchema};
use apache_avro::types::Value as Avro;
use serde_json::{Map, Number, Value as Json};
use std::collections::HashMap;

/// Named types of a schema set, by full name, for resolving `Schema::Ref`.
pub type Names = HashMap<String, Schema>;

/// A value that does not fit the schema, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending field: `interactionId`, `deltas.recordingControls`, `interactions[2].state`.
    pub field: String,
    pub reason: String,
}

impl FieldError {
    fn here(reason: impl Into<String>) -> Self {
        FieldError { field: String::new(), reason: reason.into() }
    }

    fn within(mut self, segment: &str) -> Self {
        self.field = if self.field.is_empty() {
            segment.to_owned()
        } else if self.field.starts_with('[') {
            format!("{segment}{}", self.field)
        } else {
            format!("{segment}.{}", self.field)
        };
        self
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

/// Converts a JSON object into an Avro record of `schema`: missing optional
/// fields take their default, unknown keys are refused, unions take plain JSON.
pub fn record_from_json(schema: &RecordSchema, obj: &Map<String, Json>, names: &Names) -> Result<Avro, FieldError> {
    if let Some(unknown) = obj.keys().find(|k| !schema.lookup.contains_key(k.as_str())) {
        return Err(FieldError::here(format!("`{}` has no field `{unknown}`", schema.name.name)).within(unknown));
    }
    let mut fields = Vec::with_capacity(schema.fields.len());
    for field in &schema.fields {
        let value = match obj.get(&field.name) {
            Some(v) => from_json(&field.schema, v, names),
            None => match &field.default {
                Some(default) => from_json(&field.schema, default, names),
                None => Err(FieldError::here("required field is missing")),
            },
        }
        .map_err(|e| e.within(&field.name))?;
        fields.push((field.name.clone(), value));
    }
    Ok(Avro::Record(fields))
}

/// Converts any JSON value to an Avro value of `schema`.
pub fn from_json(schema: &Schema, json: &Json, names: &Names) -> Result<Avro, FieldError> {
    let mismatch = |want: &str| FieldError::here(format!("expected {want}, got {}", kind(json)));
    Ok(match schema {
        Schema::Null => match json {
            Json::Null => Avro::Null,
            _ => return Err(mismatch("null")),
        },
        Schema::Boolean => Avro::Boolean(json.as_bool().ok_or_else(|| mismatch("a boolean"))?),
        Schema::Int | Schema::Date | Schema::TimeMillis => {
            let n = json.as_i64().ok_or_else(|| mismatch("an integer"))?;
            let n = i32::try_from(n).map_err(|_| FieldError::here(format!("{n} does not fit a 32-bit int")))?;
            match schema {
                Schema::Date => Avro::Date(n),
                Schema::TimeMillis => Avro::TimeMillis(n),
                _ => Avro::Int(n),
            }
        }
        Schema::Long
        | Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => {
            let n = json.as_i64().ok_or_else(|| mismatch("an integer"))?;
            match schema {
                Schema::TimeMicros => Avro::TimeMicros(n),
                Schema::TimestampMillis => Avro::TimestampMillis(n),
                Schema::TimestampMicros => Avro::TimestampMicros(n),
                Schema::TimestampNanos => Avro::TimestampNanos(n),
                Schema::LocalTimestampMillis => Avro::LocalTimestampMillis(n),
                Schema::LocalTimestampMicros => Avro::LocalTimestampMicros(n),
                Schema::LocalTimestampNanos => Avro::LocalTimestampNanos(n),
                _ => Avro::Long(n),
            }
        }
        Schema::Float => Avro::Float(json.as_f64().ok_or_else(|| mismatch("a number"))? as f32),
        Schema::Double => Avro::Double(json.as_f64().ok_or_else(|| mismatch("a number"))?),
        Schema::String => Avro::String(json.as_str().ok_or_else(|| mismatch("a string"))?.to_owned()),
        Schema::Bytes => Avro::Bytes(json.as_str().ok_or_else(|| mismatch("a string"))?.as_bytes().to_vec()),
        Schema::Uuid => {
            let s = json.as_str().ok_or_else(|| mismatch("a UUID string"))?;
            Avro::Uuid(s.parse().map_err(|_| FieldError::here(format!("`{s}` is not a UUID")))?)
        }
        Schema::Fixed(fixed) => {
            let s = json.as_str().ok_or_else(|| mismatch("a string"))?;
            if s.len() != fixed.size {
                return Err(FieldError::here(format!("expected {} bytes, got {}", fixed.size, s.len())));
            }
            Avro::Fixed(fixed.size, s.as_bytes().to_vec())
        }
        Schema::Enum(e) => {
            let s = json.as_str().ok_or_else(|| mismatch("a string"))?;
            let idx = e
                .symbols
                .iter()
                .position(|sym| sym == s)
                .ok_or_else(|| FieldError::here(format!("`{s}` is not one of {}", e.symbols.join(", "))))?;
            Avro::Enum(idx as u32, s.to_owned())
        }
        Schema::Array(a) => {
            let items = json.as_array().ok_or_else(|| mismatch("an array"))?;
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                out.push(from_json(&a.items, item, names).map_err(|e| e.within(&format!("[{i}]")))?);
            }
            Avro::Array(out)
        }
        Schema::Map(m) => {
            let obj = json.as_object().ok_or_else(|| mismatch("an object"))?;
            let mut out = HashMap::with_capacity(obj.len());
            for (k, v) in obj {
                out.insert(k.clone(), from_json(&m.types, v, names).map_err(|e| e.within(k))?);
            }
            Avro::Map(out)
        }
        Schema::Record(r) => record_from_json(r, json.as_object().ok_or_else(|| mismatch("an object"))?, names)?,
        Schema::Union(u) => union_from_json(u, json, names)?,
        Schema::Ref { name } => {
            let target = names
                .get(&name.fullname(None))
                .ok_or_else(|| FieldError::here(format!("schema refers to unknown type `{}`", name.name)))?;
            from_json(target, json, names)?
        }
        other => return Err(FieldError::here(format!("the bridge cannot fill a field of type {other:?}"))),
    })
}

fn union_from_json(u: &UnionSchema, json: &Json, names: &Names) -> Result<Avro, FieldError> {
    let variants = u.variants();
    if json.is_null() {
        return match variants.iter().position(|s| matches!(s, Schema::Null)) {
            Some(i) => Ok(Avro::Union(i as u32, Box::new(Avro::Null))),
            None => Err(FieldError::here("must not be null")),
        };
    }
    let mut last = None;
    let mut candidates = 0;
    for (i, variant) in variants.iter().enumerate() {
        if matches!(variant, Schema::Null) {
            continue;
        }
        candidates += 1;
        match from_json(variant, json, names) {
            Ok(v) => return Ok(Avro::Union(i as u32, Box::new(v))),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) if candidates == 1 => Err(e),
        _ => Err(FieldError::here(format!("{} matches none of the union's types", kind(json)))),
    }
}

fn kind(json: &Json) -> &'static str {
    match json {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(n) if n.is_f64() => "a fractional number",
        Json::Number(_) => "an integer",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// How record keys are written when an Avro value becomes JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// As in the schema (camelCase): the backend's view.
    AsIs,
    /// snake_case, null fields left out: notification `data` (contract section 5).
    Snake,
}

/// Converts an Avro value to plain JSON (unions unwrapped, enums as symbols).
pub fn to_json(value: &Avro, keys: Keys) -> Json {
    match value {
        Avro::Null => Json::Null,
        Avro::Boolean(b) => Json::Bool(*b),
        Avro::Int(n) | Avro::Date(n) | Avro::TimeMillis(n) => Json::from(*n),
        Avro::Long(n)
        | Avro::TimeMicros(n)
        | Avro::TimestampMillis(n)
        | Avro::TimestampMicros(n)
        | Avro::TimestampNanos(n)
        | Avro::LocalTimestampMillis(n)
        | Avro::LocalTimestampMicros(n)
        | Avro::LocalTimestampNanos(n) => Json::from(*n),
        Avro::Float(f) => Number::from_f64(f64::from(*f)).map_or(Json::Null, Json::Number),
        Avro::Double(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Avro::String(s) | Avro::Enum(_, s) => Json::String(s.clone()),
        Avro::Bytes(b) | Avro::Fixed(_, b) => Json::String(String::from_utf8_lossy(b).into_owned()),
        Avro::Uuid(u) => Json::String(u.to_string()),
        Avro::Union(_, inner) => to_json(inner, keys),
        Avro::Array(items) => Json::Array(items.iter().map(|v| to_json(v, keys)).collect()),
        Avro::Map(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), to_json(v, keys))).collect()),
        Avro::Record(fields) => {
            let mut obj = Map::with_capacity(fields.len());
            for (name, v) in fields {
                let v = to_json(v, keys);
                match keys {
                    Keys::AsIs => {
                        obj.insert(name.clone(), v);
                    }
                    Keys::Snake if v.is_null() => {}
                    Keys::Snake => {
                        obj.insert(snake_case(name), v);
                    }
                }
            }
            Json::Object(obj)
        }
        other => Json::String(format!("{other:?}")),
    }
}

/// `interactionId` → `interaction_id`, `mediaResourceId` → `media_resource_id`,
/// `URLValue` → `url_value`.
pub fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let prev = i.checked_sub(1).map(|p| chars[p]);
            let next = chars.get(i + 1);
            let boundary = match prev {
                Some(p) if p.is_lowercase() || p.is_ascii_digit() => true,
                Some(p) if p.is_uppercase() => next.is_some_and(|n| n.is_lowercase()),
                _ => false,
            };
            if boundary && !out.ends_with('_') {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Reads a top-level field of a record value, unwrapping a union.
pub fn field<'v>(record: &'v Avro, name: &str) -> Option<&'v Avro> {
    let Avro::Record(fields) = record else { return None };
    let v = fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)?;
    match v {
        Avro::Union(_, inner) if matches!(**inner, Avro::Null) => None,
        Avro::Union(_, inner) => Some(inner),
        Avro::Null => None,
        v => Some(v),
    }
}

pub fn field_str<'v>(record: &'v Avro, name: &str) -> Option<&'v str> {
    match field(record, name)? {
        Avro::String(s) | Avro::Enum(_, s) => Some(s),
        _ => None,
    }
}

pub fn field_i64(record: &Avro, name: &str) -> Option<i64> {
    match field(record, name)? {
        Avro::Int(n) => Some(i64::from(*n)),
        Avro::Long(n) => Some(*n),
        _ => None,
    }
}

pub fn field_bool(record: &Avro, name: &str) -> Option<bool> {
    match field(record, name)? {
        Avro::Boolean(b) => Some(*b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn record(schema: &str) -> RecordSchema {
        match Schema::parse_str(schema).expect("schema") {
            Schema::Record(r) => r,
            other => panic!("not a record: {other:?}"),
        }
    }

    const NESTED: &str = r#"{"type":"record","name":"E","fields":[
        {"name":"tenantGuid","type":"string"},
        {"name":"count","type":"int"},
        {"name":"kind","type":{"type":"enum","name":"K","symbols":["A","B"]}},
        {"name":"note","type":["null","string"],"default":null},
        {"name":"items","type":{"type":"array","items":{"type":"record","name":"I","fields":[{"name":"state","type":"string"}]}}},
        {"name":"deltas","type":{"type":"record","name":"D","fields":[{"name":"recordingControls","type":["null","int"],"default":null}]}}
    ]}"#;

    #[test]
    fn converts_and_names_the_bad_field() {
        let r = record(NESTED);
        let names = Names::new();
        let good =
            json!({"tenantGuid":"t","count":1,"kind":"B","items":[{"state":"x"}],"deltas":{"recordingControls":2}});
        let v = record_from_json(&r, good.as_object().expect("obj"), &names).expect("valid");
        assert!(v.validate(&Schema::Record(r.clone())));
        assert_eq!(field_str(&v, "note"), None);

        let err = |j: Json| record_from_json(&r, j.as_object().expect("obj"), &names).expect_err("invalid").field;
        assert_eq!(err(json!({"count":1,"kind":"A","items":[],"deltas":{}})), "tenantGuid");
        assert_eq!(err(json!({"tenantGuid":"t","count":"1","kind":"A","items":[],"deltas":{}})), "count");
        assert_eq!(err(json!({"tenantGuid":"t","count":1,"kind":"C","items":[],"deltas":{}})), "kind");
        assert_eq!(
            err(json!({"tenantGuid":"t","count":1,"kind":"A","items":[{"state":1}],"deltas":{}})),
            "items[0].state"
        );
        assert_eq!(
            err(json!({"tenantGuid":"t","count":1,"kind":"A","items":[],"deltas":{"recordingControls":"x"}})),
            "deltas.recordingControls"
        );
        assert_eq!(err(json!({"tenantGuid":"t","count":1,"kind":"A","items":[],"deltas":{},"bogus":1})), "bogus");
        assert_eq!(err(json!({"tenantGuid":"t","count":3000000000i64,"kind":"A","items":[],"deltas":{}})), "count");
    }

    #[test]
    fn snake_json_leaves_out_nulls() {
        let r = record(NESTED);
        let v = record_from_json(
            &r,
            json!({"tenantGuid":"t","count":1,"kind":"A","items":[{"state":"s"}],"deltas":{}})
                .as_object()
                .expect("obj"),
            &Names::new(),
        )
        .expect("valid");
        assert_eq!(
            to_json(&v, Keys::Snake),
            json!({"tenant_guid":"t","count":1,"kind":"A","items":[{"state":"s"}],"deltas":{}})
        );
        assert_eq!(to_json(&v, Keys::AsIs)["note"], Json::Null);
    }

    #[test]
    fn snake_cases_names() {
        for (a, b) in [
            ("interactionId", "interaction_id"),
            ("mediaResourceId", "media_resource_id"),
            ("irInstance", "ir_instance"),
            ("URLValue", "url_value"),
            ("already_snake", "already_snake"),
            ("line2Id", "line2_id"),
        ] {
            assert_eq!(snake_case(a), b);
        }
    }

    proptest! {
        #[test]
        fn conversion_never_panics_and_valid_output_validates(v in arb_json()) {
            let r = record(NESTED);
            if let Json::Object(obj) = &v {
                if let Ok(avro) = record_from_json(&r, obj, &Names::new()) {
                    prop_assert!(avro.validate(&Schema::Record(r.clone())));
                }
            }
            let _ = from_json(&Schema::Record(r), &v, &Names::new());
        }
    }

    fn arb_json() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(Json::from),
            any::<f64>().prop_map(Json::from),
            prop_oneof![Just("A".to_owned()), Just("t".to_owned()), "[a-zA-Z]{0,6}"].prop_map(Json::String),
        ];
        let keys = prop_oneof![
            Just("tenantGuid".to_owned()),
            Just("count".to_owned()),
            Just("kind".to_owned()),
            Just("note".to_owned()),
            Just("items".to_owned()),
            Just("deltas".to_owned()),
            Just("state".to_owned()),
            Just("recordingControls".to_owned()),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
                prop::collection::btree_map(keys.clone(), inner, 0..7)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }
}
