//! Records to and from their bytes on Kafka: Confluent framing by schema id
//! when a registry is set, else Avro single-object encoding (`schema::wire`).

use super::KafkaBus;
use crate::bus::registry::RegistryError;
use crate::bus::BusError;
use crate::fault::ErrorKind;
use crate::schema::wire::confluent_frame;
use apache_avro::types::Value as Avro;

/// Why a record could not be decoded: worth a retry, or never.
pub(super) enum DecodeError {
    Retry(String),
    Skip(String),
}

impl KafkaBus {
    /// The record name and value of a consumed payload: Confluent-framed when a
    /// registry is configured and the payload starts with `00`, else single-object.
    pub(super) async fn decode(&self, payload: &[u8]) -> Result<(String, Avro), DecodeError> {
        let wire = self.schemas.wire();
        if let (Some(registry), Some((id, datum))) = (&self.registry, confluent_frame(payload)) {
            let writer = registry.writer(id).await.map_err(|e| match e {
                RegistryError::Http(_) | RegistryError::Refused { .. } => DecodeError::Retry(e.to_string()),
                RegistryError::BadSchema { .. } => DecodeError::Skip(e.to_string()),
            })?;
            let (name, value) =
                wire.decode_confluent(&writer.0, &writer.1, datum).map_err(|e| DecodeError::Skip(e.to_string()))?;
            return Ok((name.to_owned(), value));
        }
        wire.decode(payload).map(|(n, v)| (n.to_owned(), v)).map_err(|e| DecodeError::Skip(e.to_string()))
    }

    /// The record as it goes on the wire (registering its schema first when a registry is set).
    pub(super) async fn encode(&self, topic: &str, record: String, value: Avro) -> Result<Vec<u8>, BusError> {
        let wire = self.schemas.wire();
        match &self.registry {
            Some(registry) => {
                // The schema set is the bridge's own: a record without a schema
                // is a bridge defect, not the client's.
                let schema = wire
                    .schema(&record)
                    .ok_or_else(|| BusError::new(ErrorKind::Fatal, format!("no schema {record}")))?;
                let id = registry
                    .id_for(&format!("{topic}-value"), &record, schema)
                    .await
                    .map_err(|e| BusError::new(e.kind(), e))?;
                wire.encode_confluent(&record, id, value)
            }
            None => wire.encode(&record, value),
        }
        .map_err(|e| BusError::new(ErrorKind::Rejected, e))
    }
}
