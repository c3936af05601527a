//! Avro on the bus: single-object encoding (`C3 01`, the 8-byte little-endian
//! CRC-64-AVRO fingerprint of the writer schema, then the binary datum), whose
//! fingerprint names the record so a consumer needs no registry; and the
//! Confluent framing (`00`, a big-endian 4-byte schema id, the datum) used
//! with a schema registry.

use apache_avro::headers::{HeaderBuilder, RabinFingerprintHeader};
use apache_avro::schema::Schema;
use apache_avro::types::Value as Avro;
use std::collections::HashMap;

const MAGIC: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;
const CONFLUENT_HEADER_LEN: usize = 5;

/// The schema id and datum of a Confluent-framed message, if it is one.
pub fn confluent_frame(bytes: &[u8]) -> Option<(u32, &[u8])> {
    if bytes.len() < CONFLUENT_HEADER_LEN || bytes[0] != 0 {
        return None;
    }
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    Some((id, &bytes[CONFLUENT_HEADER_LEN..]))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not Avro single-object encoding (no C3 01 header)")]
    NotSingleObject,
    #[error("unknown schema fingerprint {0:016x}")]
    UnknownFingerprint(u64),
    #[error("record `{0}` is not in the schema set")]
    UnknownRecord(String),
    #[error("`{record}` does not decode: {reason}")]
    Decode { record: String, reason: String },
    #[error("`{record}` does not encode: {reason}")]
    Encode { record: String, reason: String },
}

/// Every record of the set with its single-object header, and the reverse index.
#[derive(Debug, Default)]
pub struct Wire {
    records: HashMap<String, (Schema, [u8; HEADER_LEN])>,
    by_fingerprint: HashMap<[u8; 8], String>,
}

impl Wire {
    pub fn new<'a>(schemas: impl IntoIterator<Item = (&'a str, Schema)>) -> Wire {
        let mut w = Wire::default();
        for (name, schema) in schemas {
            let header = RabinFingerprintHeader::from_schema(&schema).build_header();
            let mut h = [0u8; HEADER_LEN];
            h.copy_from_slice(&header[..HEADER_LEN]);
            let mut fp = [0u8; 8];
            fp.copy_from_slice(&h[2..]);
            w.by_fingerprint.insert(fp, name.to_owned());
            w.records.insert(name.to_owned(), (schema, h));
        }
        w
    }

    /// The record's schema, its single-object header, and `value` as a binary datum.
    fn datum(&self, record: &str, value: Avro) -> Result<(&[u8; HEADER_LEN], Vec<u8>), WireError> {
        let (schema, header) = self.records.get(record).ok_or_else(|| WireError::UnknownRecord(record.to_owned()))?;
        let datum = apache_avro::to_avro_datum(schema, value)
            .map_err(|e| WireError::Encode { record: record.to_owned(), reason: e.to_string() })?;
        Ok((header, datum))
    }

    pub fn encode(&self, record: &str, value: Avro) -> Result<Vec<u8>, WireError> {
        let (header, datum) = self.datum(record, value)?;
        Ok([&header[..], &datum].concat())
    }

    /// A record's own schema (to register it, or to resolve a writer's data to it).
    pub fn schema(&self, record: &str) -> Option<&Schema> {
        self.records.get(record).map(|(s, _)| s)
    }

    /// `00`, the schema id, the binary datum.
    pub fn encode_confluent(&self, record: &str, id: u32, value: Avro) -> Result<Vec<u8>, WireError> {
        let (_, datum) = self.datum(record, value)?;
        Ok([&[0][..], &id.to_be_bytes(), &datum].concat())
    }

    /// Decodes a Confluent datum written with `writer` (named `record`) into
    /// the set's own schema of that record.
    pub fn decode_confluent<'a>(
        &'a self,
        record: &str,
        writer: &Schema,
        datum: &[u8],
    ) -> Result<(&'a str, Avro), WireError> {
        let (name, (ours, _)) =
            self.records.get_key_value(record).ok_or_else(|| WireError::UnknownRecord(record.to_owned()))?;
        let mut rest = datum;
        let value = apache_avro::from_avro_datum(writer, &mut rest, Some(ours))
            .map_err(|e| WireError::Decode { record: name.clone(), reason: e.to_string() })?;
        Ok((name, value))
    }

    /// The record name and value of one single-object encoded message.
    pub fn decode<'a>(&'a self, bytes: &[u8]) -> Result<(&'a str, Avro), WireError> {
        if bytes.len() < HEADER_LEN || bytes[..2] != MAGIC {
            return Err(WireError::NotSingleObject);
        }
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&bytes[2..HEADER_LEN]);
        let name = self.by_fingerprint.get(&fp).ok_or(WireError::UnknownFingerprint(u64::from_le_bytes(fp)))?;
        let (schema, _) = &self.records[name];
        let mut rest = &bytes[HEADER_LEN..];
        let value = apache_avro::from_avro_datum(schema, &mut rest, None)
            .map_err(|e| WireError::Decode { record: name.clone(), reason: e.to_string() })?;
        if !rest.is_empty() {
            return Err(WireError::Decode { record: name.clone(), reason: format!("{} bytes left over", rest.len()) });
        }
        Ok((name, value))
    }
}

#[cfg(test)]
mod tests {
    use super::super::SchemaSet;
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn a_record_round_trips_and_its_header_names_it() {
        let set = SchemaSet::load(None).expect("default set");
        let (r, _) = set.event("AgentPresenceEvent").expect("record");
        let v = set.build(r, json!({"tenantGuid":"t","agentGuid":"a","state":"Away"}).as_object().expect("obj"));
        let v = v.expect("valid");
        let bytes = set.wire().encode("AgentPresenceEvent", v.clone()).expect("encodes");
        assert_eq!(bytes[..2], MAGIC);
        assert_eq!(set.wire().decode(&bytes), Ok(("AgentPresenceEvent", v)));
        let mut unknown = bytes.clone();
        unknown[5] ^= 0xFF;
        assert!(matches!(set.wire().decode(&unknown), Err(WireError::UnknownFingerprint(_))));
        assert_eq!(set.wire().decode(b"{\"json\":1}"), Err(WireError::NotSingleObject));
        let mut truncated = bytes;
        truncated.truncate(12);
        assert!(matches!(set.wire().decode(&truncated), Err(WireError::Decode { .. })));
    }

    #[test]
    fn confluent_framing_carries_the_schema_id_and_decodes_with_the_writer_schema() {
        let set = SchemaSet::load(None).expect("default set");
        let (r, _) = set.event("AgentPresenceEvent").expect("record");
        let v = set.build(r, json!({"tenantGuid":"t","agentGuid":"a","state":"Away"}).as_object().expect("obj"));
        let v = v.expect("valid");
        let bytes = set.wire().encode_confluent("AgentPresenceEvent", 258, v.clone()).expect("encodes");
        let (id, datum) = confluent_frame(&bytes).expect("framed");
        assert_eq!((bytes[0], id), (0, 258));
        let writer = set.wire().schema("AgentPresenceEvent").expect("schema").clone();
        assert_eq!(set.wire().decode_confluent("AgentPresenceEvent", &writer, datum), Ok(("AgentPresenceEvent", v)));
        assert_eq!(confluent_frame(&[0, 1]), None);
        assert_eq!(confluent_frame(&[0xC3, 1, 0, 0, 0, 0]), None);
    }

    static SET: std::sync::LazyLock<SchemaSet> =
        std::sync::LazyLock::new(|| SchemaSet::load(None).expect("default set"));

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(header in any::<bool>(), tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = if header { SET.wire().records["AgentPresenceEvent"].1.to_vec() } else { Vec::new() };
            bytes.extend(tail);
            let _ = SET.wire().decode(&bytes);
        }
    }
}
