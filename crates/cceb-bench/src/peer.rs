//! `cceb-bench peer`: the bridge and nginx + nchan side by side, driven by
//! the same generator (BENCHMARKS.md, "Side by side with nchan"). Every run
//! starts its server afresh, the bridge's run and nchan's one after the other.
//! Nothing is installed here: scripts/bench-peer installs Debian's nginx and
//! nchan module, then runs this.

use crate::server::{self, Backend, Server};
use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::fmt::Write as _;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(clap::Args)]
pub struct Options {
    /// peer: the nginx binary (scripts/bench-peer installs Debian's).
    #[arg(long, default_value = "nginx")]
    nginx: String,
    /// peer: the nchan module nginx loads.
    #[arg(long, default_value = "/usr/lib/nginx/modules/ngx_nchan_module.so")]
    nchan_module: String,
    /// peer: subscribers of the broadcast and unicast runs.
    #[arg(long, default_value_t = 1_000)]
    peer_subscribers: usize,
    /// peer: publishes/s of the fixed-rate broadcast (each reaches every subscriber).
    #[arg(long, default_value_t = 20)]
    peer_publish_rate: u64,
    /// peer: seconds each broadcast and unicast run publishes for.
    #[arg(long, default_value_t = 10)]
    peer_seconds: u64,
    /// peer: connections opened for the connect rate.
    #[arg(long, default_value_t = 5_000)]
    peer_connects: usize,
    /// peer: connections held for the idle memory per connection.
    #[arg(long, default_value_t = 10_000)]
    peer_idle: usize,
}

/// Connections opened at once, as the other scenarios do.
const PARALLEL: usize = 256;
/// Makes a message's data ~150 bytes, like `fanout`'s.
const PAD: &str = "routing profile B, open 08:00-20:00 CET";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cceb,
    Nchan,
}

/// What is published: message n goes to every subscriber (broadcast) or to
/// subscriber n mod `subscribers` alone (unicast).
#[derive(Clone, Copy)]
enum Load {
    Broadcast { subscribers: usize },
    Unicast { subscribers: usize },
}

impl Load {
    fn subscribers(self) -> usize {
        match self {
            Load::Broadcast { subscribers } | Load::Unicast { subscribers } => subscribers,
        }
    }

    /// Deliveries per message.
    fn fanout(self) -> u64 {
        match self {
            Load::Broadcast { subscribers } => subscribers as u64,
            Load::Unicast { .. } => 1,
        }
    }

    /// The bridge's event for message `n`, stamped `t` (µs): tenant-wide
    /// (`TenantUpdatedEvent` reaches every session of the tenant) or for one agent.
    fn event(self, n: u64, t: u64) -> Value {
        match self {
            Load::Broadcast { .. } => json!({"record": "TenantUpdatedEvent",
                "value": {"tenantGuid": "tenant-1", "deltas": {"name": PAD}, "timestamp": t}}),
            Load::Unicast { subscribers } => json!({"record": "AgentPresenceEvent",
                "value": {"tenantGuid": "tenant-1", "agentGuid": agent(n as usize % subscribers), "state": "Available",
                          "reasonCode": PAD, "timestamp": t}}),
        }
    }

    /// nchan's channel and message for message `n`: the `data` the bridge's
    /// notification of [`Load::event`] carries, so both payloads are the same.
    fn message(self, n: u64, t: u64) -> (String, String) {
        match self {
            Load::Broadcast { .. } => (
                "tenant-1".to_owned(),
                json!({"event_type": "TenantUpdatedEvent", "tenant_guid": "tenant-1", "deltas": {"name": PAD}, "timestamp": t})
                    .to_string(),
            ),
            Load::Unicast { subscribers } => {
                let a = agent(n as usize % subscribers);
                let body = json!({"tenant_guid": "tenant-1", "agent_guid": a, "state": "Available", "reason_code": PAD, "timestamp": t});
                (a, body.to_string())
            }
        }
    }
}

fn agent(i: usize) -> String {
    format!("agent-{i}")
}

/// How the publishers go: `Rate` publishes `total` messages at `per_s`;
/// `Ahead` publishes for `for_` as fast as deliveries keep up, at most
/// `window` messages beyond what has been delivered (the bridge closes a
/// short-lived connection that falls `CCEB_MAX_UNACKED` behind, and nchan
/// would only buffer: either way an open loop measures queues, not rates).
#[derive(Clone, Copy)]
enum Pace {
    Rate { per_s: f64, total: u64 },
    Ahead { window: u64, for_: Duration },
}

/// One server under test.
enum Peer {
    Cceb(Server),
    Nchan(Nginx),
}

impl Peer {
    async fn start(kind: Kind, cceb: &str, a: &Options) -> anyhow::Result<Peer> {
        let connections = a.peer_idle.max(a.peer_connects).max(a.peer_subscribers);
        Ok(match kind {
            Kind::Cceb => Peer::Cceb(Server::start(cceb, &[]).await?),
            Kind::Nchan => Peer::Nchan(Nginx::start(&a.nginx, &a.nchan_module, connections).await?),
        })
    }

    /// Subscriber i: the bridge's agent i (a `hello` with its token; it acks
    /// every notification), or nchan's channel of agent i (broadcast: the tenant's).
    fn dial(&self, i: usize, broadcast: bool) -> Dial {
        match self {
            Peer::Cceb(s) => {
                let token = s.token("tenant-1", &agent(i));
                let hello = json!({"type": "hello", "uuid": format!("hello-{i}"), "data": {"token": token}});
                Dial { url: s.ws_url(), hello: Some(hello.to_string()) }
            }
            Peer::Nchan(n) => {
                let channel = if broadcast { "tenant-1".to_owned() } else { agent(i) };
                Dial { url: format!("ws://127.0.0.1:{}/sub/{channel}", n.port), hello: None }
            }
        }
    }

    fn publisher(&self) -> Publisher {
        match self {
            Peer::Cceb(s) => Publisher::Cceb(s.backend()),
            Peer::Nchan(n) => Publisher::Nchan { port: n.port, conn: None },
        }
    }

    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        match self {
            Peer::Cceb(s) => s.cpu_seconds(),
            Peer::Nchan(n) => n.pids().into_iter().map(server::cpu_seconds).sum(),
        }
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        match self {
            Peer::Cceb(s) => s.rss_kib(),
            Peer::Nchan(n) => n.pids().into_iter().map(server::rss_kib).sum(),
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Peer::Cceb(s) => s.stop().await,
            Peer::Nchan(n) => n.stop().await,
        }
    }
}

enum Publisher {
    Cceb(Backend),
    /// One keep-alive connection to nginx, opened at the first publish.
    Nchan {
        port: u16,
        conn: Option<BufReader<TcpStream>>,
    },
}

impl Publisher {
    /// Publishes messages `ns`, stamped now. The bridge: one backend-port
    /// request for all of them. nchan's publisher takes one message for one
    /// channel a request: the requests go out pipelined in one write and
    /// their responses are read after (reqwest's per-request work capped
    /// nchan's unicast rate on this machine before nginx was busy).
    async fn publish(&mut self, load: Load, ns: Range<u64>) -> anyhow::Result<()> {
        let t = crate::now_micros();
        let (port, conn) = match self {
            Publisher::Cceb(backend) => {
                return backend.post_events(&Value::Array(ns.map(|n| load.event(n, t)).collect())).await
            }
            Publisher::Nchan { port, conn } => (*port, conn),
        };
        let conn = match conn {
            Some(c) => c,
            None => {
                let s = TcpStream::connect(("127.0.0.1", port)).await?;
                s.set_nodelay(true)?;
                conn.insert(BufReader::new(s))
            }
        };
        let mut out = String::new();
        let k = ns.end - ns.start;
        for n in ns {
            let (channel, body) = load.message(n, t);
            let len = body.len();
            let head = "HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json";
            let _ = write!(out, "POST /pub/{channel} {head}\r\nContent-Length: {len}\r\n\r\n{body}");
        }
        conn.get_mut().write_all(out.as_bytes()).await?;
        let mut line = String::new();
        for _ in 0..k {
            line.clear();
            conn.read_line(&mut line).await?;
            let status = line.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok());
            let mut len = 0;
            loop {
                line.clear();
                if conn.read_line(&mut line).await? == 0 {
                    bail!("nginx closed the publisher's connection");
                }
                if line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        len = value.trim().parse()?;
                    }
                }
            }
            let mut body = vec![0; len];
            conn.read_exact(&mut body).await?;
            if !status.is_some_and(|c| (200..300).contains(&c)) {
                bail!("nchan publisher answered {status:?}: {}", String::from_utf8_lossy(&body));
            }
        }
        Ok(())
    }
}

/// Publishes `load` at `pace`, a task for each of `publishers`, `batch`
/// messages a publish call; returns how many messages were published.
async fn drive(
    publishers: Vec<Publisher>,
    load: Load,
    pace: Pace,
    batch: u64,
    received: &Arc<AtomicU64>,
) -> anyhow::Result<u64> {
    let next = Arc::new(AtomicU64::new(0));
    let published = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = publishers
        .into_iter()
        .map(|mut publisher| {
            let (next, published, received) = (next.clone(), published.clone(), received.clone());
            tokio::spawn(async move {
                loop {
                    let ns = match pace {
                        Pace::Rate { per_s, total } => {
                            let n = next.fetch_add(batch, Ordering::Relaxed);
                            if n >= total {
                                break;
                            }
                            let at = started + Duration::from_secs_f64(n as f64 / per_s);
                            tokio::time::sleep_until(at.into()).await;
                            n..(n + batch).min(total)
                        }
                        Pace::Ahead { window, for_ } => {
                            if started.elapsed() >= for_ {
                                break;
                            }
                            let n = next.fetch_add(batch, Ordering::Relaxed);
                            let due = (n + batch).saturating_sub(window) * load.fanout();
                            let mut moved = (received.load(Ordering::Relaxed), Instant::now());
                            while moved.0 < due {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                let now = received.load(Ordering::Relaxed);
                                if now != moved.0 {
                                    moved = (now, Instant::now());
                                } else if moved.1.elapsed() > Duration::from_secs(10) {
                                    bail!("no delivery for 10 s at {now} of {due}");
                                }
                            }
                            n..n + batch
                        }
                    };
                    let k = ns.end - ns.start;
                    publisher.publish(load, ns).await?;
                    published.fetch_add(k, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(published.load(Ordering::Relaxed))
}

/// A subscriber to open: the URL, and the bridge's `hello` (nchan has none).
struct Dial {
    url: String,
    hello: Option<String>,
}

/// The one frame shape both servers' frames are read as: nchan's message is
/// the payload itself (`timestamp` at the top); the bridge's frame has the
/// payload under `data`, and a `uuid` to ack.
#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    ty: Option<String>,
    uuid: Option<String>,
    timestamp: Option<u64>,
    data: Option<Stamp>,
}

#[derive(Deserialize)]
struct Stamp {
    timestamp: Option<u64>,
}

impl Frame {
    fn sent(&self) -> Option<u64> {
        self.timestamp.or(self.data.as_ref().and_then(|d| d.timestamp))
    }
}

async fn dial(d: Dial) -> anyhow::Result<Ws> {
    // tungstenite's 128 KiB default read buffer is zero-filled before every
    // read: it cost the generator more per frame for nchan (one frame per
    // write) than for the bridge (several), and 1.25 GiB at 10k connections.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(&d.url, Some(config), true).await?;
    let Some(hello) = d.hello else { return Ok(ws) };
    ws.send(Message::text(hello)).await?;
    while let Some(m) = ws.next().await {
        if let Message::Text(t) = m? {
            match serde_json::from_str::<Frame>(&t)?.ty.as_deref() {
                Some("hello_reply") => return Ok(ws),
                Some("error") => bail!("hello refused: {t}"),
                _ => {}
            }
        }
    }
    bail!("closed before hello_reply")
}

/// Opens `dials`, [`PARALLEL`] at a time.
async fn open(dials: Vec<Dial>) -> anyhow::Result<Vec<Ws>> {
    let mut out = Vec::with_capacity(dials.len());
    let mut dials = dials.into_iter().peekable();
    while dials.peek().is_some() {
        let tasks: Vec<_> = dials.by_ref().take(PARALLEL).map(|d| tokio::spawn(dial(d))).collect();
        for t in tasks {
            out.push(t.await??);
        }
    }
    Ok(out)
}

/// Subscribers reading every frame: latency from the stamp in the payload to
/// receipt, and an `ack` for every frame that has a `uuid` when `acks` (the
/// bridge's contract), counted.
struct Subscribers {
    received: Arc<AtomicU64>,
    acks: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Histogram<u64>>>,
}

fn subscribe(conns: Vec<Ws>, acks: bool) -> Subscribers {
    let (received, acked, bytes) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks = conns
        .into_iter()
        .map(|mut ws| {
            let (received, acked, bytes, mut stopped) =
                (received.clone(), acked.clone(), bytes.clone(), stopped.clone());
            tokio::spawn(async move {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
                loop {
                    let next = tokio::select! {
                        next = ws.next() => next,
                        _ = stopped.changed() => break,
                    };
                    let t = match next {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(_)) => continue,
                        _ => break,
                    };
                    let Ok(frame) = serde_json::from_str::<Frame>(&t) else { continue };
                    let Some(sent) = frame.sent() else { continue };
                    let _ = h.record(crate::now_micros().saturating_sub(sent).max(1));
                    received.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(t.len() as u64, Ordering::Relaxed);
                    if let (true, Some(uuid)) = (acks, frame.uuid) {
                        if ws.send(Message::text(format!(r#"{{"type":"ack","uuid":"{uuid}"}}"#))).await.is_err() {
                            break;
                        }
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                h
            })
        })
        .collect();
    Subscribers { received, acks: acked, bytes, stop, tasks }
}

impl Subscribers {
    /// Until `n` frames arrived, or 10 s without one.
    async fn wait_for(&self, n: u64) {
        crate::wait_received(&self.received, n, Duration::MAX).await;
    }

    async fn finish(self) -> anyhow::Result<Histogram<u64>> {
        crate::finish_readers(self.stop, self.tasks).await
    }
}

/// What one broadcast or unicast run measured.
struct Flow {
    delivered: u64,
    expected: u64,
    per_s: f64,
    h: Histogram<u64>,
    /// CPU seconds of the server (nginx: master and worker) and of this tool.
    cpu_server: f64,
    cpu_generator: f64,
    acks: u64,
    bytes: u64,
}

impl Flow {
    fn per_100k(&self, cpu: f64) -> f64 {
        cpu / (self.delivered.max(1) as f64 / 100_000.0)
    }

    fn ms(&self, q: f64) -> f64 {
        self.h.value_at_quantile(q) as f64 / 1000.0
    }
}

/// How both servers are published to: (messages a publish call, publishing tasks).
fn shape(load: Load, pace: Pace) -> (u64, usize) {
    match (load, pace) {
        (_, Pace::Rate { .. }) => (1, 1),
        (Load::Broadcast { .. }, Pace::Ahead { .. }) => (1, 2),
        (Load::Unicast { .. }, Pace::Ahead { .. }) => (100, 4),
    }
}

async fn flow(kind: Kind, cceb: &str, a: &Options, load: Load, pace: Pace) -> anyhow::Result<Flow> {
    let peer = Peer::start(kind, cceb, a).await?;
    let broadcast = matches!(load, Load::Broadcast { .. });
    let conns = open((0..load.subscribers()).map(|i| peer.dial(i, broadcast)).collect()).await?;
    let subs = subscribe(conns, kind == Kind::Cceb);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let me = std::process::id();
    let (cpu0, gen0, started) = (peer.cpu_seconds()?, server::cpu_seconds(me)?, Instant::now());
    let (batch, posters) = shape(load, pace);
    let publishers = (0..posters).map(|_| peer.publisher()).collect();
    let published = drive(publishers, load, pace, batch, &subs.received).await?;
    let expected = published * load.fanout();
    subs.wait_for(expected).await;
    let elapsed = started.elapsed();
    let (cpu_server, cpu_generator) = (peer.cpu_seconds()? - cpu0, server::cpu_seconds(me)? - gen0);
    let delivered = subs.received.load(Ordering::Relaxed);
    let (acks, bytes) = (subs.acks.load(Ordering::Relaxed), subs.bytes.load(Ordering::Relaxed));
    let h = subs.finish().await?;
    peer.stop().await?;
    if delivered < expected {
        eprintln!("peer: {} delivered {delivered} of {expected}", name(kind));
    }
    Ok(Flow {
        delivered,
        expected,
        per_s: delivered as f64 / elapsed.as_secs_f64(),
        h,
        cpu_server,
        cpu_generator,
        acks,
        bytes,
    })
}

/// Connections (bridge: and `hello`s) per second, and server CPU seconds per 10k.
async fn connect(kind: Kind, cceb: &str, a: &Options) -> anyhow::Result<(f64, f64)> {
    let peer = Peer::start(kind, cceb, a).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Dials (the bridge's tokens minted) before the clock starts: nchan's have none.
    let dials = (0..a.peer_connects).map(|i| peer.dial(i, false)).collect();
    let (cpu0, started) = (peer.cpu_seconds()?, Instant::now());
    let conns = open(dials).await?;
    let rate = conns.len() as f64 / started.elapsed().as_secs_f64();
    let cpu = (peer.cpu_seconds()? - cpu0) / (conns.len().max(1) as f64 / 10_000.0);
    drop(conns);
    peer.stop().await?;
    Ok((rate, cpu))
}

/// Server RSS growth per idle connection (its own channel on nchan), bytes.
async fn idle(kind: Kind, cceb: &str, a: &Options) -> anyhow::Result<f64> {
    let peer = Peer::start(kind, cceb, a).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = peer.rss_kib()?;
    let conns = open((0..a.peer_idle).map(|i| peer.dial(i, false)).collect()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = peer.rss_kib()?.saturating_sub(before) as f64 * 1024.0 / conns.len().max(1) as f64;
    drop(conns);
    peer.stop().await?;
    Ok(per)
}

fn name(kind: Kind) -> &'static str {
    match kind {
        Kind::Cceb => "cceb",
        Kind::Nchan => "nchan",
    }
}

/// One line of the table: a figure for each server.
struct Row {
    key: String,
    label: String,
    cceb: f64,
    nchan: f64,
    decimals: usize,
}

fn row(key: &str, label: &str, [cceb, nchan]: [f64; 2], decimals: usize) -> Row {
    Row { key: key.to_owned(), label: label.to_owned(), cceb, nchan, decimals }
}

/// A stage's result, or `None` (told on stderr, counted in `failed`).
fn kept<T>(failed: &mut usize, stage: &str, kind: Kind, r: anyhow::Result<T>) -> Option<T> {
    r.map_err(|e| {
        eprintln!("peer: {stage} on {} failed: {e:#}", name(kind));
        *failed += 1;
    })
    .ok()
}

/// Both servers' figures of `f`; NaN for a run that failed.
fn both<T>(runs: &[Option<T>; 2], f: impl Fn(&T) -> f64) -> [f64; 2] {
    [runs[0].as_ref().map_or(f64::NAN, &f), runs[1].as_ref().map_or(f64::NAN, &f)]
}

pub async fn run(cceb: &str, a: &Options) -> anyhow::Result<()> {
    let version = match std::process::Command::new(&a.nginx).arg("-v").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
        _ => bail!("peer: cannot run `{} -v` (scripts/bench-peer installs nginx and nchan)", a.nginx),
    };
    if !std::path::Path::new(&a.nchan_module).exists() {
        bail!("peer: no nchan module at {} (scripts/bench-peer installs it)", a.nchan_module);
    }
    let most = a.peer_idle.max(a.peer_connects).max(a.peer_subscribers) as u64;
    crate::raise_fd_limit(most + 1024, most + 256)?;
    let subscribers = a.peer_subscribers;
    let (broadcast, unicast) = (Load::Broadcast { subscribers }, Load::Unicast { subscribers });
    let for_ = Duration::from_secs(a.peer_seconds);
    let rate = Pace::Rate { per_s: a.peer_publish_rate as f64, total: a.peer_publish_rate * a.peer_seconds };
    // Max rate: broadcast 10 publishes (10 frames a subscriber) ahead of the
    // deliveries, unicast 4 a subscriber; far from the bridge's 1,000 unacked.
    let ahead = |window| Pace::Ahead { window, for_ };
    // Each scenario on both servers before the next: each pair shares its minutes.
    // A stage that fails is told and left out of the table, not the whole run.
    let mut failed = 0;
    let mut kept = |stage: &str, kind: Kind, r| kept(&mut failed, stage, kind, r);
    let (c, n) = (Kind::Cceb, Kind::Nchan);
    let fixed = [
        kept("broadcast", c, flow(c, cceb, a, broadcast, rate).await),
        kept("broadcast", n, flow(n, cceb, a, broadcast, rate).await),
    ];
    let max = [
        kept("broadcast max", c, flow(c, cceb, a, broadcast, ahead(10)).await),
        kept("broadcast max", n, flow(n, cceb, a, broadcast, ahead(10)).await),
    ];
    let window = 4 * subscribers as u64;
    let uni = [
        kept("unicast", c, flow(c, cceb, a, unicast, ahead(window)).await),
        kept("unicast", n, flow(n, cceb, a, unicast, ahead(window)).await),
    ];
    let connects = [
        self::kept(&mut failed, "connect", c, connect(c, cceb, a).await),
        self::kept(&mut failed, "connect", n, connect(n, cceb, a).await),
    ];
    let idles = [
        self::kept(&mut failed, "idle", c, idle(c, cceb, a).await),
        self::kept(&mut failed, "idle", n, idle(n, cceb, a).await),
    ];

    let mut rows = Vec::new();
    let fixed_label = format!("broadcast {}/s", a.peer_publish_rate * subscribers as u64);
    for (key, label, r) in [("broadcast_fixed", fixed_label.as_str(), &fixed), ("broadcast_max", "broadcast max", &max)]
    {
        let mut add = |k: &str, l: &str, f: &dyn Fn(&Flow) -> f64, decimals| {
            rows.push(row(&format!("{key}_{k}"), &format!("{label}: {l}"), both(r, f), decimals));
        };
        add("per_s", "delivered/s", &|f| f.per_s, 0);
        add("p50_ms", "p50 (ms)", &|f| f.ms(0.5), 2);
        add("p99_ms", "p99 (ms)", &|f| f.ms(0.99), 2);
        add("cpu_s_per_100k", "server CPU-s per 100k", &|f| f.per_100k(f.cpu_server), 3);
        add("generator_cpu_s_per_100k", "generator CPU-s per 100k", &|f| f.per_100k(f.cpu_generator), 3);
    }
    let per_delivery = |f: &Flow, n: u64| n as f64 / f.delivered.max(1) as f64;
    rows.extend([
        row("unicast_per_s", "unicast max: messages/s", both(&uni, |f| f.per_s), 0),
        row("unicast_p99_ms", "unicast max: p99 (ms)", both(&uni, |f| f.ms(0.99)), 2),
        row(
            "unicast_cpu_s_per_100k",
            "unicast max: server CPU-s per 100k",
            both(&uni, |f| f.per_100k(f.cpu_server)),
            3,
        ),
        row(
            "unicast_generator_cpu_s_per_100k",
            "unicast max: generator CPU-s per 100k",
            both(&uni, |f| f.per_100k(f.cpu_generator)),
            3,
        ),
        row("acks_per_delivery", "client frames sent per delivery", both(&uni, |f| per_delivery(f, f.acks)), 2),
        row("bytes_per_frame", "bytes per delivered frame", both(&uni, |f| per_delivery(f, f.bytes)), 0),
        row("connect_per_s", &format!("connects/s (cceb: + hello), {}", a.peer_connects), both(&connects, |c| c.0), 0),
        row("connect_cpu_s_per_10k", "server CPU-s per 10k connects", both(&connects, |c| c.1), 3),
        row("idle_kib_per_conn", &format!("idle KiB per connection, {}", a.peer_idle), both(&idles, |b| b / 1024.0), 2),
    ]);
    print(&rows, &version);
    // null for a run that failed
    let of = |f: &Option<Flow>| f.as_ref().map(|f| [f.delivered, f.expected]);
    let delivered = |r: &[Option<Flow>; 2]| json!({"cceb": of(&r[0]), "nchan": of(&r[1])});
    let mut results = Map::new();
    for r in &rows {
        results.insert(r.key.clone(), json!({"cceb": r.cceb, "nchan": r.nchan, "ratio": ratio(r)}));
    }
    let params = json!({"nginx": version, "subscribers": subscribers, "publish_rate": a.peer_publish_rate,
        "seconds": a.peer_seconds, "connects": a.peer_connects, "idle": a.peer_idle,
        "delivered_of_expected": {"broadcast_fixed": delivered(&fixed), "broadcast_max": delivered(&max), "unicast": delivered(&uni)}});
    println!("{}", json!({"scenario": "peer", "params": params, "results": results}));
    if failed > 0 {
        bail!("peer: {failed} run(s) failed (above); their figures are NaN");
    }
    Ok(())
}

fn ratio(r: &Row) -> Option<f64> {
    (r.nchan != 0.0).then(|| r.cceb / r.nchan)
}

fn print(rows: &[Row], version: &str) {
    println!("\n== peer (cceb against {version} + nchan)");
    println!("  {:<46} {:>12} {:>12} {:>11}", "figure", "cceb", "nchan", "cceb/nchan");
    for r in rows {
        let ratio = ratio(r).map_or("—".to_owned(), |x| format!("{x:.2}"));
        let d = r.decimals;
        println!("  {:<46} {:>12.d$} {:>12.d$} {:>11}", r.label, r.cceb, r.nchan, ratio);
    }
}

/// An nginx of the benchmark's own, loading nchan: a temporary prefix, a free
/// loopback port, a master and one worker.
struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    pid: u32,
    port: u16,
}

impl Nginx {
    async fn start(bin: &str, module: &str, connections: usize) -> anyhow::Result<Nginx> {
        let dir = tempfile::tempdir()?;
        // A root master runs its worker as `nobody`, which must reach the prefix.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let p = dir.path().display();
        // One worker (see BENCHMARKS.md): nchan's cheapest setup, no channel
        // shared between workers through IPC, and the other core left to the
        // generator. The backlog is the bridge's; keepalive_requests keeps the
        // publishers' connections open for the whole run.
        let conf = format!(
            "load_module {module};
daemon off;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections {}; }}
http {{
    access_log off;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        keepalive_requests 1000000;
        location ~ ^/pub/(.+)$ {{ nchan_publisher http; nchan_channel_id $1; }}
        location ~ ^/sub/(.+)$ {{ nchan_subscriber websocket; nchan_channel_id $1; }}
    }}
}}
",
            connections + 1024
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut cmd = Command::new(bin);
        cmd.arg("-p").arg(dir.path()).arg("-c").arg(&conf_path).arg("-e").arg(dir.path().join("error.log"));
        // No kill_on_drop: a SIGKILLed master would leave its worker running.
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        let child = cmd.spawn().with_context(|| format!("starting {bin}"))?;
        let pid = child.id().context("no pid")?;
        let mut nginx = Nginx { child, dir, pid, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if nginx.child.try_wait()?.is_some() {
                let log = std::fs::read_to_string(nginx.dir.path().join("error.log")).unwrap_or_default();
                bail!("nginx exited at start: {log}");
            }
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() && nginx.pids().len() > 1 {
                return Ok(nginx);
            }
            if Instant::now() > deadline {
                bail!("nginx did not listen on {port}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid];
        let Ok(dir) = std::fs::read_dir("/proc") else { return pids };
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // After the parenthesised name: state, then the parent's pid.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(self.pid) {
                pids.push(pid);
            }
        }
        pids
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        self.terminate();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        Ok(())
    }

    /// SIGTERM to the master, which stops its worker before it exits.
    fn terminate(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = std::process::Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.terminate();
    }
}
