//! The consumer group loop: a batch of records → `Dispatcher::ingest` →
//! `Dispatcher::commit` → offset commit. Offsets are committed only once every
//! notification the records made is in the session mailboxes and durable.

use super::codec::DecodeError;
use super::{at, retry_later, traceparent, Ingest, KafkaSettings};
use crate::bus::BusError;
use crate::fault::ErrorKind;
use futures_util::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use tokio_util::sync::CancellationToken;

/// Most records taken from the consumer before one commit.
const BATCH: usize = 500;

/// The consumer group, subscribed to the event topics; offsets are committed by `consume` alone.
pub(super) fn subscribe(settings: &KafkaSettings) -> Result<StreamConsumer, BusError> {
    let consumer: StreamConsumer = settings
        .client()
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| BusError::new(ErrorKind::Fatal, format!("kafka consumer: {e}")))?;
    let topics: Vec<&str> = settings.event_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| BusError::new(ErrorKind::Fatal, format!("kafka subscribe: {e}")))?;
    Ok(consumer)
}

impl Ingest {
    pub(super) async fn consume(&self, consumer: StreamConsumer, stop: &CancellationToken) {
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                m = consumer.recv() => m,
            };
            let started = std::time::Instant::now();
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match consumer.recv().now_or_never() {
                    Some(m) => batch.push(m),
                    None => break,
                }
            }
            for m in &batch {
                match m {
                    // Stopped before the record was taken: commit nothing, it comes again.
                    Ok(m) => {
                        if !self.handle(m, stop).await {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "kafka consumer error"),
                }
            }
            // Offsets only once every notification of the batch is durable.
            while let Err(e) = self.dispatcher.commit().await {
                tracing::error!(error = %e, "cannot make notifications durable; offsets held");
                if !retry_later(stop).await {
                    return;
                }
            }
            self.metrics.event_ingest_seconds.record(started.elapsed().as_secs_f64());
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Async) {
                tracing::warn!(error = %e, "offset commit failed; records may be delivered again");
            }
        }
    }

    /// Takes one record (ingested, or skipped as unusable); `false` when the
    /// bridge stopped before it could be taken.
    async fn handle(&self, m: &BorrowedMessage<'_>, stop: &CancellationToken) -> bool {
        let decoded = loop {
            match self.bus.decode(m.payload().unwrap_or_default()).await {
                Err(DecodeError::Retry(e)) => {
                    // The registry is away: the record is fine, wait for it.
                    tracing::warn!(error = %e, at = %at(m), "cannot decode yet; retrying");
                    if !retry_later(stop).await {
                        return false;
                    }
                }
                other => break other,
            }
        };
        let event = match decoded {
            // Its position names the record: read again after a crash, it makes the same uuids.
            Ok((record, value)) => self
                .events
                .from_avro(&record, value, Some(format!("kafka:{}", at(m))))
                .map(|ev| ev.traced(traceparent(m)))
                .map_err(|e| e.to_string()),
            Err(DecodeError::Skip(e) | DecodeError::Retry(e)) => Err(e),
        };
        let ev = match event {
            Ok(ev) => ev,
            Err(reason) => {
                self.dead_letter(m, &reason).await;
                return true;
            }
        };
        // A store failure must not skip the record: retry until it is taken.
        while let Err(e) = self.dispatcher.ingest(std::slice::from_ref(&ev)).await {
            tracing::error!(error = %e, at = %at(m), traceparent = ev.traceparent().map(tracing::field::display), "cannot ingest; retrying");
            if !retry_later(stop).await {
                return false;
            }
        }
        self.metrics.events_accepted.increment(1);
        true
    }
}
