//! A Confluent-compatible schema registry client: schema ids for the records
//! the bridge produces (registered under `<topic>-value`, the registry's
//! default TopicNameStrategy) and writer schemas for the ids it consumes.
//! Both are cached: the registry is asked once per (subject, record) and id.

use crate::fault::ErrorKind;
use crate::sync::lock;
use apache_avro::schema::Schema;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry: {0}")]
    Http(String),
    #[error("schema registry id {id}: {reason}")]
    BadSchema { id: u32, reason: String },
    #[error("schema registry: registering {subject} answered {status}")]
    Refused { subject: String, status: reqwest::StatusCode },
}

impl RegistryError {
    /// Whether the look-up may succeed later: the registry's answer tells a
    /// schema it will never take (409 incompatible, 422 invalid) from a
    /// registry that is away or overloaded.
    pub fn kind(&self) -> ErrorKind {
        use reqwest::StatusCode as S;
        match self {
            RegistryError::Http(_) => ErrorKind::Unavailable,
            RegistryError::BadSchema { .. } => ErrorKind::Rejected,
            RegistryError::Refused { status, .. } => match *status {
                S::REQUEST_TIMEOUT | S::TOO_MANY_REQUESTS => ErrorKind::Unavailable,
                // The bridge's credentials: no record gets through until they are fixed.
                S::UNAUTHORIZED | S::FORBIDDEN => ErrorKind::Fatal,
                s if s.is_client_error() => ErrorKind::Rejected,
                _ => ErrorKind::Unavailable,
            },
        }
    }
}

type Writer = Arc<(String, Schema)>;

pub struct SchemaRegistry {
    http: reqwest::Client,
    url: String,
    ids: Mutex<HashMap<(String, String), u32>>,
    writers: Mutex<HashMap<u32, Writer>>,
}

#[derive(Deserialize)]
struct IdAnswer {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaAnswer {
    schema: String,
}

impl SchemaRegistry {
    pub fn new(url: &str, timeout: Duration) -> Result<SchemaRegistry, RegistryError> {
        let http =
            reqwest::Client::builder().timeout(timeout).build().map_err(|e| RegistryError::Http(e.to_string()))?;
        Ok(SchemaRegistry {
            http,
            url: url.trim_end_matches('/').to_owned(),
            ids: Mutex::default(),
            writers: Mutex::default(),
        })
    }

    /// The id of `schema` under `subject`, registering it if the registry does not have it.
    pub async fn id_for(&self, subject: &str, record: &str, schema: &Schema) -> Result<u32, RegistryError> {
        let key = (subject.to_owned(), record.to_owned());
        if let Some(&id) = lock(&self.ids).get(&key) {
            return Ok(id);
        }
        let text = serde_json::to_string(schema).map_err(|e| RegistryError::Http(e.to_string()))?;
        let r = self
            .http
            .post(format!("{}/subjects/{subject}/versions", self.url))
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .json(&json!({ "schema": text }))
            .send()
            .await
            .map_err(|e| RegistryError::Http(e.to_string()))?;
        if !r.status().is_success() {
            return Err(RegistryError::Refused { subject: subject.to_owned(), status: r.status() });
        }
        let id = r.json::<IdAnswer>().await.map_err(|e| RegistryError::Http(e.to_string()))?.id;
        lock(&self.ids).insert(key, id);
        Ok(id)
    }

    /// The record name and writer schema of `id`.
    pub async fn writer(&self, id: u32) -> Result<Writer, RegistryError> {
        if let Some(w) = lock(&self.writers).get(&id) {
            return Ok(w.clone());
        }
        let r = self
            .http
            .get(format!("{}/schemas/ids/{id}", self.url))
            .send()
            .await
            .map_err(|e| RegistryError::Http(e.to_string()))?;
        if !r.status().is_success() {
            return Err(RegistryError::Http(format!("schema id {id} answered {}", r.status())));
        }
        let text = r.json::<SchemaAnswer>().await.map_err(|e| RegistryError::Http(e.to_string()))?.schema;
        let bad = |reason: String| RegistryError::BadSchema { id, reason };
        let schema = Schema::parse_str(&text).map_err(|e| bad(e.to_string()))?;
        let Schema::Record(rs) = &schema else { return Err(bad("not a record".into())) };
        let w = Arc::new((rs.name.name.clone(), schema.clone()));
        lock(&self.writers).insert(id, w.clone());
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode as S;

    #[test]
    fn a_registry_refusal_is_retried_only_when_the_registry_may_answer_otherwise() {
        let kind = |status| RegistryError::Refused { subject: "actions-value".into(), status }.kind();
        assert_eq!(kind(S::CONFLICT), ErrorKind::Rejected, "incompatible with the subject's schema");
        assert_eq!(kind(S::UNPROCESSABLE_ENTITY), ErrorKind::Rejected, "an invalid schema");
        assert_eq!(kind(S::UNAUTHORIZED), ErrorKind::Fatal);
        assert_eq!(kind(S::FORBIDDEN), ErrorKind::Fatal);
        for status in [S::TOO_MANY_REQUESTS, S::REQUEST_TIMEOUT, S::INTERNAL_SERVER_ERROR, S::SERVICE_UNAVAILABLE] {
            assert_eq!(kind(status), ErrorKind::Unavailable, "{status}");
        }
        assert_eq!(RegistryError::Http("connection refused".into()).kind(), ErrorKind::Unavailable);
    }
}
