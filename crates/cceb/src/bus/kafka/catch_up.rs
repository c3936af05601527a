//! The provisioning catch-up: before the bridge is ready, the provisioning
//! topic is read from its beginning so the tenant directory is complete.

use super::codec::DecodeError;
use super::{retry_later, Ingest};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

impl Ingest {
    /// Reads the provisioning topic from the beginning to its end as of now,
    /// applying only directory changes (no notifications: those come through
    /// the consumer group, once).
    pub(super) async fn catch_up(&self, stop: &CancellationToken) {
        let Some(topic) = self.bus.settings.provisioning_topic.clone() else { return };
        loop {
            match self.catch_up_once(&topic, stop).await {
                Ok(n) => {
                    tracing::info!(topic, records = n, "tenant directory caught up");
                    self.bus.caught_up.store(true, Ordering::Relaxed);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, topic, "directory catch-up failed; retrying"),
            }
            if !retry_later(stop).await {
                return;
            }
        }
    }

    async fn catch_up_once(&self, topic: &str, stop: &CancellationToken) -> Result<usize, String> {
        let settings = self.bus.settings.clone();
        let topic = topic.to_owned();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
        let stop2 = stop.clone();
        let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let c: BaseConsumer = settings
                .client()
                .set("group.id", format!("{}-directory", settings.group_id))
                .set("enable.auto.commit", "false")
                .create()
                .map_err(|e| e.to_string())?;
            let md = c.fetch_metadata(Some(&topic), Duration::from_secs(5)).map_err(|e| e.to_string())?;
            let mut tpl = TopicPartitionList::new();
            let mut high: HashMap<i32, i64> = HashMap::new();
            for p in md.topics().iter().flat_map(|t| t.partitions()) {
                let (lo, hi) = c.fetch_watermarks(&topic, p.id(), Duration::from_secs(5)).map_err(|e| e.to_string())?;
                if hi > lo {
                    high.insert(p.id(), hi);
                }
                tpl.add_partition_offset(&topic, p.id(), Offset::Beginning).map_err(|e| e.to_string())?;
            }
            c.assign(&tpl).map_err(|e| e.to_string())?;
            while !high.is_empty() && !stop2.is_cancelled() {
                match c.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => {
                        if high.get(&m.partition()).is_some_and(|&h| m.offset() + 1 >= h) {
                            high.remove(&m.partition());
                        }
                        if tx.blocking_send(m.payload().unwrap_or_default().to_vec()).is_err() {
                            return Ok(());
                        }
                    }
                    Some(Err(e)) => return Err(e.to_string()),
                    None => {}
                }
            }
            Ok(())
        });
        let mut n = 0;
        while let Some(payload) = rx.recv().await {
            let (record, value) = match self.bus.decode(&payload).await {
                Ok(d) => d,
                Err(DecodeError::Retry(e)) => return Err(e),
                Err(DecodeError::Skip(_)) => continue,
            };
            if let Ok(ev) = self.events.from_avro(&record, value, None) {
                self.dispatcher.apply_directory(&ev).await.map_err(|e| e.to_string())?;
                n += 1;
            }
        }
        reader.await.map_err(|e| e.to_string())??;
        self.dispatcher.commit().await.map_err(|e| e.to_string())?;
        Ok(n)
    }
}
