//! The `kafka` scenario: `fanout`'s load with its events produced to Kafka and
//! consumed by `cceb serve` on `CCEB_BUS=kafka`, beside the same load through
//! the embedded bus's backend port in the same run. Events are encoded by the
//! bridge's own schema set (`cceb::schema`), so the tool produces exactly what
//! the bridge decodes. The broker is a tansu of the tool's own (memory
//! storage, a free loopback port) unless `--brokers` names one.

use crate::server::{cpu_seconds, Server};
use crate::{now_micros, open_with, post, read_and_ack, report, Args};
use anyhow::{anyhow, bail, Context};
use cceb::schema::SchemaSet;
use cceb_client::cceb_protocol::incoming::Hello;
use hdrhistogram::Histogram;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The event `fanout` posts: its `state` carries the send time.
const RECORD: &str = "AgentPresenceEvent";

/// A tansu broker of the tool's own.
struct Tansu {
    child: Child,
    pid: u32,
    port: u16,
}

impl Tansu {
    /// Where `scripts/test` builds and caches it.
    fn default_bin() -> PathBuf {
        let tools = std::env::var_os("CCEB_TOOLS").map_or_else(
            || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/cceb-tools"),
            PathBuf::from,
        );
        tools.join("tansu-0.6-dynostore-libsql/bin/tansu")
    }

    async fn start(bin: &Path) -> anyhow::Result<Tansu> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} (scripts/test builds it; or give --brokers)", bin.display()))?;
        let pid = child.id().context("no pid")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if Instant::now() > deadline {
                bail!("tansu did not listen on 127.0.0.1:{port}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Tansu { child, pid, port })
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// The broker, the bridge's topics and consumer group (named for this run, as
/// the tests name theirs, so a shared broker's old records are never read),
/// and the producer.
struct Kafka {
    tansu: Option<Tansu>,
    brokers: String,
    events: String,
    provisioning: String,
    actions: String,
    group: String,
    admin: AdminClient<DefaultClientContext>,
    producer: FutureProducer,
    schemas: SchemaSet,
}

impl Kafka {
    async fn start(a: &Args) -> anyhow::Result<Kafka> {
        let (tansu, brokers) = match &a.brokers {
            Some(b) => (None, b.clone()),
            None => {
                let t = Tansu::start(&a.tansu.clone().unwrap_or_else(Tansu::default_bin)).await?;
                let brokers = format!("127.0.0.1:{}", t.port);
                (Some(t), brokers)
            }
        };
        let id = format!("{}-{}", std::process::id(), now_micros());
        let (events, provisioning, actions) =
            (format!("bench-ev-{id}"), format!("bench-prov-{id}"), format!("bench-act-{id}"));
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &brokers).create().context("kafka admin client")?;
        let topics: Vec<NewTopic> = [&events, &provisioning, &actions]
            .iter()
            .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
            .collect();
        let created = admin.create_topics(&topics, &AdminOptions::new()).await.context("creating topics")?;
        for r in created {
            r.map_err(|(topic, e)| anyhow!("creating topic {topic}: {e}"))?;
        }
        // No linger: a record goes out as soon as it is queued (what queues
        // behind an in-flight request is batched anyway).
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("linger.ms", "0")
            .set("message.timeout.ms", "30000")
            .create()
            .context("kafka producer")?;
        // The built-in set: the one the bridge loads without CCEB_SCHEMA_DIR.
        let schemas = SchemaSet::load(None)?;
        let group = format!("bench-{id}");
        Ok(Kafka { tansu, brokers, events, provisioning, actions, group, admin, producer, schemas })
    }

    /// The bridge's settings for this broker and these topics.
    fn env(&self, fetch_wait_ms: u64) -> Vec<(&'static str, String)> {
        vec![
            // tansu 0.6 reads, sleeps through the fetch's max wait (half of
            // it from 250 ms) and answers with what it read, records waiting
            // or not: a record waits up to two max waits. At librdkafka's
            // 500 ms that, not the bridge, would be the latency measured.
            ("CCEB_KAFKA_PROPERTIES", format!("{{\"fetch.wait.max.ms\"=\"{fetch_wait_ms}\"}}")),
            ("CCEB_BUS", "kafka".into()),
            ("CCEB_KAFKA_BROKERS", self.brokers.clone()),
            ("CCEB_KAFKA_EVENT_TOPICS", format!("[{},{}]", self.events, self.provisioning)),
            ("CCEB_KAFKA_PROVISIONING_TOPIC", self.provisioning.clone()),
            ("CCEB_KAFKA_ACTION_TOPIC", self.actions.clone()),
            ("CCEB_KAFKA_GROUP_ID", self.group.clone()),
        ]
    }

    /// CPU seconds of the broker, when it is ours.
    fn broker_cpu(&self) -> anyhow::Result<Option<f64>> {
        self.tansu.as_ref().map(|t| cpu_seconds(t.pid)).transpose()
    }

    /// The event `post` sends, as the single-object Avro record the bridge decodes.
    fn encode(&self, agent: &str, state: &str) -> anyhow::Result<Vec<u8>> {
        let (record, _) = self.schemas.event(RECORD).context("no AgentPresenceEvent in the schema set")?;
        let value = Map::from_iter([
            ("tenantGuid".to_owned(), Value::from("tenant-1")),
            ("agentGuid".to_owned(), Value::from(agent)),
            ("state".to_owned(), Value::from(state)),
        ]);
        let avro = self.schemas.build(record, &value).map_err(|e| anyhow!("{RECORD}: {e}"))?;
        Ok(self.schemas.wire().encode(RECORD, avro)?)
    }

    /// Queues one record, keyed by its agent as the tests key theirs; waits
    /// while librdkafka's queue is full.
    async fn send(&self, agent: &str, payload: &[u8]) -> anyhow::Result<DeliveryFuture> {
        loop {
            match self.producer.send_result(FutureRecord::to(&self.events).key(agent).payload(payload)) {
                Ok(d) => return Ok(d),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// `post` on Kafka: `batch` records at a time, each stamped with its
    /// batch's time, the broker's acks for a batch awaited before the next
    /// (as `post` awaits the backend port's 202), at `rate` records/s (0: as
    /// fast as it goes).
    async fn produce(&self, agents: &[usize], events: usize, batch: usize, rate: u64) -> anyhow::Result<()> {
        crate::paced(events, batch, rate, |range, t| async move {
            let mut deliveries = Vec::with_capacity(range.len());
            for i in range {
                let agent = format!("agent-{}", agents[i % agents.len()]);
                deliveries.push(self.send(&agent, &self.encode(&agent, &t)?).await?);
            }
            for d in deliveries {
                delivered(d).await?;
            }
            Ok(())
        })
        .await
    }

    /// Produces one event for an agent nobody is, and waits until the bridge's
    /// group committed past it: the consumer is assigned and reading before
    /// the clock starts (readiness alone does not say the group has joined).
    async fn warm_up(&self) -> anyhow::Result<()> {
        let agent = "bench-warm-up";
        let d = delivered(self.send(agent, &self.encode(agent, "0")?).await?).await?;
        let (brokers, group, topic) = (self.brokers.clone(), self.group.clone(), self.events.clone());
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer =
                ClientConfig::new().set("bootstrap.servers", &brokers).set("group.id", &group).create()?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&topic, d.partition);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let committed = c.committed_offsets(tpl.clone(), Duration::from_secs(2)).ok().and_then(|t| {
                    match t.find_partition(&topic, d.partition)?.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    }
                });
                if committed.is_some_and(|c| c > d.offset) {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("the bridge did not consume {topic} within 60 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await?
    }

    /// Our own broker stops; on a shared one (`--brokers`), this run's
    /// topics and consumer group are deleted, so runs leave nothing behind.
    async fn stop(self) {
        let Some(t) = self.tansu else {
            let opts = AdminOptions::new();
            let topics = [self.events.as_str(), self.provisioning.as_str(), self.actions.as_str()];
            let deleted = self.admin.delete_topics(&topics, &opts).await;
            let group = self.admin.delete_groups(&[&self.group], &opts).await;
            for r in [deleted, group] {
                match r {
                    Err(e) => eprintln!("note: cannot clean up on {}: {e}", self.brokers),
                    Ok(results) => {
                        for (name, e) in results.into_iter().filter_map(Result::err) {
                            eprintln!("note: cannot delete {name} on {}: {e}", self.brokers);
                        }
                    }
                }
            }
            return;
        };
        t.stop().await;
    }
}

async fn delivered(d: DeliveryFuture) -> anyhow::Result<Delivery> {
    d.await.context("the producer went away")?.map_err(|(e, _)| anyhow!("the broker refused a record: {e}"))
}

/// One run of the load, on the embedded bus (`kafka` None) or on Kafka.
struct Run {
    delivered: u64,
    per_s: f64,
    h: Histogram<u64>,
    cpu_bridge: f64,
    /// Of our own broker only.
    cpu_broker: Option<f64>,
}

async fn run(a: &Args, kafka: Option<&Kafka>) -> anyhow::Result<Run> {
    let env = kafka.map(|k| k.env(a.fetch_wait_ms)).unwrap_or_default();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(&a.cceb, &env).await?;
    if let Some(k) = kafka {
        k.warm_up().await?;
    }
    let long_lived = a.long_lived;
    let sessions = open_with(&server, a.fanout_sessions, 256, |_| Hello { long_lived, ..Hello::default() }).await?;
    let readers = read_and_ack(sessions.into_iter().map(|(conn, _)| conn));
    let broker_cpu = || kafka.map_or(Ok(None), Kafka::broker_cpu);
    let (cpu0, broker0, started) = (server.cpu_seconds()?, broker_cpu()?, Instant::now());
    let agents: Vec<usize> = (0..a.fanout_sessions).collect();
    match kafka {
        Some(k) => k.produce(&agents, a.events, a.batch, a.rate).await?,
        None => post(server.backend(), agents, a.events, a.batch, a.rate).await?,
    }
    readers.wait_for(a.events as u64, Duration::from_secs(120)).await;
    let elapsed = started.elapsed();
    let cpu_bridge = server.cpu_seconds()? - cpu0;
    let cpu_broker = broker_cpu()?.zip(broker0).map(|(after, before)| after - before);
    server.stop().await?;
    let delivered = readers.received.load(Ordering::Relaxed);
    let h = readers.finish().await?;
    Ok(Run { delivered, per_s: delivered as f64 / elapsed.as_secs_f64(), h, cpu_bridge, cpu_broker })
}

pub async fn kafka(a: &Args) -> anyhow::Result<()> {
    // The broker first: without one, fail before the embedded run.
    let k = Kafka::start(a).await?;
    let embedded = run(a, None).await;
    let on_kafka = match &embedded {
        Ok(_) => run(a, Some(&k)).await,
        Err(_) => Err(anyhow!("not run: the embedded run failed")),
    };
    let broker = match &k.tansu {
        Some(_) => format!("tansu (memory storage) on {}", k.brokers),
        None => k.brokers.clone(),
    };
    k.stop().await;
    let (embedded, on_kafka) = (embedded?, on_kafka?);
    let per_100k = |cpu: f64, n: u64| cpu / (n.max(1) as f64 / 100_000.0);
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let figures = |r: &Run| {
        json!({"delivered": r.delivered, "per_s": r.per_s, "p50_ms": ms(&r.h, 0.5), "p99_ms": ms(&r.h, 0.99),
               "p999_ms": ms(&r.h, 0.999), "max_ms": r.h.max() as f64 / 1000.0,
               "server_cpu_s_per_100k": per_100k(r.cpu_bridge, r.delivered),
               "broker_cpu_s_per_100k": r.cpu_broker.map(|c| per_100k(c, r.delivered))})
    };
    let broker_cpu = on_kafka
        .cpu_broker
        .map_or("— (not our broker)".to_owned(), |c| format!("{:.2}", per_100k(c, on_kafka.delivered)));
    let target = crate::target_rate(a);
    report(
        "kafka",
        &[
            ("sessions", a.fanout_sessions.to_string()),
            ("long-lived", a.long_lived.to_string()),
            ("target rate (/s)", target.clone()),
            ("events per batch", a.batch.to_string()),
            ("broker", broker.clone()),
            ("bridge fetch.wait.max.ms", a.fetch_wait_ms.to_string()),
            ("kafka: delivered+acked", format!("{} of {}", on_kafka.delivered, a.events)),
            ("kafka: notifications/s", format!("{:.0}", on_kafka.per_s)),
            ("kafka: p50/p99/p99.9/max (ms)", crate::latencies(&on_kafka.h)),
            ("kafka: server CPU s per 100k", format!("{:.2}", per_100k(on_kafka.cpu_bridge, on_kafka.delivered))),
            ("kafka: broker CPU s per 100k", broker_cpu),
            ("embedded: delivered+acked", format!("{} of {}", embedded.delivered, a.events)),
            ("embedded: notifications/s", format!("{:.0}", embedded.per_s)),
            ("embedded: p50/p99/p99.9/max (ms)", crate::latencies(&embedded.h)),
            ("embedded: server CPU s per 100k", format!("{:.2}", per_100k(embedded.cpu_bridge, embedded.delivered))),
        ],
        json!({"sessions": a.fanout_sessions, "long_lived": a.long_lived, "target_rate": target, "batch": a.batch,
               "events": a.events, "broker": broker, "fetch_wait_ms": a.fetch_wait_ms, "kafka": figures(&on_kafka), "embedded": figures(&embedded)}),
    );
    Ok(())
}
