//! Push announcements for long-lived sessions without a connection (contract
//! section 6). The payload stays in the mailbox; the provider only tells the
//! device that something waits. Announcing never blocks delivery: it is a
//! `try_send` into a bounded queue, and a full queue drops the announcement
//! (counted), never the notification.

use crate::metrics::{Metrics, PushOutcome};
use cceb_protocol::NotificationType;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a push provider receives: `{token, session_id, type, uuid}`.
#[derive(Debug, Clone, Serialize)]
pub struct Announcement {
    pub token: String,
    pub session_id: Arc<str>,
    #[serde(rename = "type")]
    pub ty: NotificationType,
    pub uuid: String,
}

pub trait Push: Send + Sync + 'static {
    /// Queues an announcement; must return at once.
    fn announce(&self, a: Announcement);
}

/// No provider configured: announcements are not made.
pub struct NoPush;

impl Push for NoPush {
    fn announce(&self, _: Announcement) {}
}

#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub url: String,
    /// Sent as `Authorization: Bearer` when set.
    pub bearer: Option<String>,
    /// Attempts per announcement, the first included.
    pub attempts: u32,
    pub first_backoff: Duration,
    pub timeout: Duration,
    pub queue: usize,
    pub concurrency: usize,
}

/// POSTs each announcement as JSON to a configured URL, retrying with
/// exponential backoff on errors and non-2xx answers.
pub struct Webhook {
    tx: mpsc::Sender<Announcement>,
    metrics: Arc<Metrics>,
}

impl Webhook {
    pub fn start(
        settings: WebhookSettings,
        metrics: Arc<Metrics>,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Webhook, reqwest::Error> {
        let client = reqwest::Client::builder().timeout(settings.timeout).build()?;
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        tasks.spawn(send_loop(rx, client, Arc::new(settings), metrics.clone(), tasks.clone(), stop));
        Ok(Webhook { tx, metrics })
    }
}

impl Push for Webhook {
    fn announce(&self, a: Announcement) {
        if self.tx.try_send(a).is_err() {
            self.metrics.push_outcome(PushOutcome::Shed);
        }
    }
}

async fn send_loop(
    mut rx: mpsc::Receiver<Announcement>,
    client: reqwest::Client,
    settings: Arc<WebhookSettings>,
    metrics: Arc<Metrics>,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    loop {
        // A slot first: an announcement leaves the queue only to be sent, so
        // at most `concurrency` in flight plus `queue` waiting are held.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let a = tokio::select! {
            // Nothing queued is started once the bridge stops.
            biased;
            _ = stop.cancelled() => return,
            a = rx.recv() => match a { Some(a) => a, None => return },
        };
        let (client, settings, metrics, stop) = (client.clone(), settings.clone(), metrics.clone(), stop.clone());
        tasks.spawn(async move {
            let outcome = tokio::select! {
                _ = stop.cancelled() => PushOutcome::Cancelled,
                ok = deliver(&client, &settings, &a) => if ok { PushOutcome::Sent } else { PushOutcome::Failed },
            };
            if outcome == PushOutcome::Failed {
                tracing::warn!(session = %a.session_id, uuid = %a.uuid, "push announcement failed after retries");
            }
            metrics.push_outcome(outcome);
            drop(slot);
        });
    }
}

async fn deliver(client: &reqwest::Client, s: &WebhookSettings, a: &Announcement) -> bool {
    let mut backoff = s.first_backoff;
    for attempt in 1..=s.attempts.max(1) {
        let mut req = client.post(&s.url).json(a);
        if let Some(b) = &s.bearer {
            req = req.bearer_auth(b);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => return true,
            Ok(r) => tracing::debug!(status = %r.status(), attempt, "push webhook refused"),
            Err(e) => tracing::debug!(error = %e, attempt, "push webhook unreachable"),
        }
        if attempt < s.attempts {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement(n: usize) -> Announcement {
        Announcement {
            token: "device".into(),
            session_id: "s".into(),
            ty: NotificationType::Presence,
            uuid: format!("u-{n}"),
        }
    }

    fn pushed(metrics: &Metrics, outcome: &str) -> f64 {
        let series = format!("cceb_push_announcements_total{{outcome=\"{outcome}\"}} ");
        let text = metrics.render();
        text.lines().find_map(|l| l.strip_prefix(series.as_str())?.parse().ok()).unwrap_or(0.0)
    }

    #[tokio::test]
    async fn past_the_one_in_flight_and_a_full_queue_announcements_are_shed_and_counted() {
        // Accepts connections and never answers: the first announcement stays in flight.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/push", silent.local_addr().expect("addr"));
        let (accepted, mut in_flight) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((socket, _)) = silent.accept().await {
                let _ = accepted.send(socket);
            }
        });
        let metrics = Arc::new(Metrics::new([]));
        let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
        let settings = WebhookSettings {
            url,
            bearer: None,
            attempts: 1,
            first_backoff: Duration::from_millis(10),
            timeout: Duration::from_secs(60),
            queue: 1,
            concurrency: 1,
        };
        let webhook = Webhook::start(settings, metrics.clone(), &tasks, stop.clone()).expect("starts");

        webhook.announce(announcement(0));
        let first = tokio::time::timeout(Duration::from_secs(10), in_flight.recv()).await;
        let _first = first.expect("the first announcement is sent").expect("accepted");
        assert_eq!(pushed(&metrics, "shed"), 0.0);
        // One waits in the queue; the next three find it full.
        for n in 1..=4 {
            webhook.announce(announcement(n));
        }
        assert_eq!(pushed(&metrics, "shed"), 3.0, "one queued, three shed");
        // However long the one in flight takes, the queued one waits in the
        // queue for a slot (it does not leave it to wait elsewhere).
        tokio::time::sleep(Duration::from_millis(50)).await;
        webhook.announce(announcement(5));
        assert_eq!(pushed(&metrics, "shed"), 4.0, "the queue is still full");

        stop.cancel();
        tasks.close();
        tasks.wait().await;
        assert_eq!(pushed(&metrics, "cancelled"), 1.0, "the one in flight ends with the bridge");
        assert_eq!(pushed(&metrics, "sent") + pushed(&metrics, "failed"), 0.0);
    }
}
