//! Records the bridge cannot use (undecodable, or refused by the mapping):
//! counted, logged with their topic/partition/offset, copied to the
//! dead-letter topic when one is set, and skipped: one never stops its partition.

use super::{at, traceparent, Ingest, TRACEPARENT};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;

impl Ingest {
    /// Counts and logs a record the bridge cannot use and copies it to the
    /// dead-letter topic when one is set; the caller skips it.
    pub(super) async fn dead_letter(&self, m: &BorrowedMessage<'_>, reason: &str) {
        self.metrics.events_undecodable.increment(1);
        let trace = traceparent(m).map(|t| t.to_string());
        tracing::warn!(at = %at(m), %reason, traceparent = trace.as_deref(), "skipping a record that cannot be used");
        let bus = &self.bus;
        let Some(topic) = &bus.settings.dead_letter_topic else { return };
        let headers = OwnedHeaders::new()
            .insert(Header { key: "cceb-error", value: Some(reason) })
            .insert(Header { key: "cceb-source", value: Some(&at(m)) });
        // The trace goes on with the copy, for whoever looks into it.
        let headers = match &trace {
            Some(t) => headers.insert(Header { key: TRACEPARENT, value: Some(t.as_str()) }),
            None => headers,
        };
        let mut r = FutureRecord::to(topic).payload(m.payload().unwrap_or_default()).headers(headers);
        if let Some(k) = m.key() {
            r = r.key(k);
        }
        if let Err((e, _)) = bus.producer().inner.send(r, Timeout::After(bus.settings.publish_timeout)).await {
            tracing::warn!(error = %e, "dead-letter topic refused a record");
        }
    }
}
