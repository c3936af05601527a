//! `cceb-bench`: drives a real `cceb serve` process over loopback and reports
//! what it measured. BENCHMARKS.md says how to run it and holds the figures.

mod kafka;
mod peer;
mod redis;
mod server;

use anyhow::{bail, Context};
use cceb_client::cceb_protocol::incoming::Hello;
use cceb_client::cceb_protocol::outgoing::{HelloReply, ServerMessage};
use cceb_client::{Connection, Error};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use redis::Redis;
use serde_json::{json, Map, Value};
use server::{Backend, Server};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Idle,
    Fanout,
    Actions,
    Resume,
    Cluster,
    /// fanout's load (and options) through Kafka, beside the embedded bus; not
    /// part of `all`: it needs a broker (a tansu of its own, or `--brokers`).
    Kafka,
    All,
    /// The bridge and nginx + nchan side by side; not part of `all`.
    Peer,
}

#[derive(Parser)]
#[command(about = "Benchmark a real cceb process")]
struct Args {
    #[arg(value_enum, default_value = "all")]
    scenario: Scenario,
    /// Small sizes: all scenarios in well under a minute (CI smoke test).
    #[arg(long)]
    quick: bool,
    /// The cceb binary to start.
    #[arg(long, default_value = "target/release/cceb")]
    cceb: String,
    /// idle: sessions to open.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// fanout: sessions receiving.
    #[arg(long, default_value_t = 1_000)]
    fanout_sessions: usize,
    /// fanout: events to inject.
    #[arg(long, default_value_t = 500_000)]
    events: usize,
    /// fanout: target events/s (0: as fast as it goes).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// fanout: events per backend-port request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// actions: sessions sending.
    #[arg(long, default_value_t = 200)]
    action_sessions: usize,
    /// actions: actions to send in all.
    #[arg(long, default_value_t = 200_000)]
    actions: usize,
    /// fanout: the receiving sessions are long-lived (every notification
    /// written through the store before the backend port answers).
    #[arg(long)]
    long_lived: bool,
    /// resume: long-lived sessions that disconnect and come back.
    #[arg(long, default_value_t = 1_000)]
    resume_sessions: usize,
    /// resume: notifications waiting in each mailbox (cluster: queued to
    /// each disconnected session to measure Redis memory per notification).
    #[arg(long, default_value_t = 10)]
    waiting: usize,
    /// cluster: node counts to run, each against one embedded node.
    #[arg(long, value_delimiter = ',', default_value = "2,3")]
    nodes: Vec<usize>,
    /// cluster: long-lived sessions, spread over the nodes.
    #[arg(long, default_value_t = 1_000)]
    cluster_sessions: usize,
    /// cluster: events to inject (each posted to a node the agent is not on).
    #[arg(long, default_value_t = 200_000)]
    cluster_events: usize,
    /// cluster: redis-server with `appendonly yes`, `appendfsync everysec`
    /// (default: no persistence, `--save '' --appendonly no`).
    #[arg(long)]
    redis_aof: bool,
    #[command(flatten)]
    peer: peer::Options,
    /// kafka: bootstrap servers of a broker to use (default: a tansu of its own).
    #[arg(long)]
    brokers: Option<String>,
    /// kafka: the tansu binary [default: $CCEB_TOOLS/tansu-0.6-dynostore-libsql/bin/tansu,
    /// CCEB_TOOLS being ~/.cache/cceb-tools unless set, where scripts/test builds it].
    #[arg(long)]
    tansu: Option<std::path::PathBuf>,
    /// kafka: the bridge consumer's `fetch.wait.max.ms` (librdkafka's default
    /// is 500; tansu 0.6 holds every fetch that long, records waiting or not).
    #[arg(long, default_value_t = 1)]
    fetch_wait_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut a = Args::parse();
    if a.quick {
        (a.sessions, a.fanout_sessions, a.events, a.action_sessions, a.actions) = (500, 100, 20_000, 20, 5_000);
        a.resume_sessions = 100;
        (a.nodes, a.cluster_sessions, a.cluster_events) = (vec![2], 100, 5_000);
    }
    let most = [a.sessions, a.fanout_sessions, a.action_sessions, a.resume_sessions, a.cluster_sessions]
        .into_iter()
        .max()
        .unwrap_or_default() as u64;
    raise_fd_limit(most * 2 + 1024, most + 256)?;
    let run = |s| a.scenario == s || a.scenario == Scenario::All;
    if run(Scenario::Idle) {
        idle(&a).await?;
    }
    if run(Scenario::Fanout) {
        fanout(&a).await?;
    }
    if run(Scenario::Actions) {
        actions(&a).await?;
    }
    if run(Scenario::Resume) {
        resume(&a).await?;
    }
    if run(Scenario::Cluster) {
        cluster(&a).await?;
    }
    if a.scenario == Scenario::Peer {
        peer::run(&a.cceb, &a.peer).await?;
    }
    if a.scenario == Scenario::Kafka {
        kafka::kafka(&a).await?;
    }
    Ok(())
}

/// Each session is a socket on both sides; 50k sessions need well over the usual 1024.
/// Raises the open-file limit towards `want`; below `need` the run would
/// fail part-way (the server refusing connections), so it stops here.
fn raise_fd_limit(want: u64, need: u64) -> anyhow::Result<()> {
    let (_, hard) = rlimit::Resource::NOFILE.get()?;
    // Root may raise the hard limit too; the server (our child) inherits both.
    if want > hard && rlimit::Resource::NOFILE.set(want, want).is_ok() {
        return Ok(());
    }
    let soft = want.min(hard);
    rlimit::Resource::NOFILE.set(soft, hard)?;
    if soft < need {
        anyhow::bail!(
            "the open-file limit is {soft} (hard limit) and this run needs {need}: raise it or run fewer sessions"
        );
    }
    if soft < want {
        eprintln!("note: open-file limit is {soft} (hard limit), wanted {want}");
    }
    Ok(())
}

/// `--rate` as reports show it.
fn target_rate(a: &Args) -> String {
    if a.rate == 0 {
        "max".to_owned()
    } else {
        a.rate.to_string()
    }
}

/// p50 / p99 / p99.9 / max of µs samples, in ms.
fn latencies(h: &Histogram<u64>) -> String {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!("{:.2} / {:.2} / {:.2} / {:.2}", ms(0.5), ms(0.99), ms(0.999), h.max() as f64 / 1000.0)
}

fn report(scenario: &str, rows: &[(&str, String)], json: Value) {
    println!("\n== {scenario}");
    for (k, v) in rows {
        println!("  {k:<34} {v}");
    }
    println!("{}", json!({"scenario": scenario, "results": json}));
}

async fn connect_hello(url: &str, hello: Hello) -> anyhow::Result<(Connection, HelloReply)> {
    let mut conn = Connection::connect(url).await?;
    let reply = conn.hello(&hello).await?;
    Ok((conn, reply))
}

/// Opens `n` sessions, `parallel` at a time; agent i is `agent-{i}`.
async fn open_sessions(server: &Server, n: usize, parallel: usize) -> anyhow::Result<Vec<Connection>> {
    let hellos = open_with(server, n, parallel, |_| Hello::default()).await?;
    Ok(hellos.into_iter().map(|(conn, _)| conn).collect())
}

/// Opens `n` sessions with `hello(i)`, its token set to agent i's.
async fn open_with(
    server: &Server,
    n: usize,
    parallel: usize,
    hello: impl Fn(usize) -> Hello,
) -> anyhow::Result<Vec<(Connection, HelloReply)>> {
    open_on(std::slice::from_ref(server), n, parallel, hello).await
}

/// Like [`open_with`], agent i's session on `servers[i % servers.len()]`.
async fn open_on(
    servers: &[Server],
    n: usize,
    parallel: usize,
    hello: impl Fn(usize) -> Hello,
) -> anyhow::Result<Vec<(Connection, HelloReply)>> {
    let urls: Vec<String> = servers.iter().map(Server::ws_url).collect();
    let mut out = Vec::with_capacity(n);
    let mut ids = (0..n).peekable();
    while ids.peek().is_some() {
        let chunk: Vec<usize> = ids.by_ref().take(parallel).collect();
        let tasks: Vec<_> = chunk
            .into_iter()
            .map(|i| {
                let server = &servers[i % servers.len()];
                let hello = Hello { token: server.token("tenant-1", &format!("agent-{i}")), ..hello(i) };
                let url = urls[i % urls.len()].clone();
                tokio::spawn(async move { connect_hello(&url, hello).await })
            })
            .collect();
        for t in tasks {
            out.push(t.await??);
        }
    }
    Ok(out)
}

async fn idle(a: &Args) -> anyhow::Result<()> {
    let server = Server::start(&a.cceb, &[]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (base_rss, base_cpu) = (server.rss_kib()?, server.cpu_seconds()?);
    let started = Instant::now();
    let sessions = open_sessions(&server, a.sessions, 256).await?;
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = server.rss_kib()?;
    let per = (rss.saturating_sub(base_rss)) as f64 * 1024.0 / a.sessions as f64;
    let rate = a.sessions as f64 / elapsed.as_secs_f64();
    let cpu = server.cpu_seconds()? - base_cpu;
    report(
        "idle",
        &[
            ("sessions", a.sessions.to_string()),
            ("server RSS before (MiB)", format!("{:.1}", base_rss as f64 / 1024.0)),
            ("server RSS with sessions (MiB)", format!("{:.1}", rss as f64 / 1024.0)),
            ("RSS per idle session (KiB)", format!("{:.2}", per / 1024.0)),
            ("connect+hello rate (/s)", format!("{rate:.0}")),
            ("server CPU for connecting (s)", format!("{cpu:.2}")),
        ],
        json!({"sessions": a.sessions, "rss_base_kib": base_rss, "rss_kib": rss, "bytes_per_session": per, "connect_hello_per_s": rate, "server_cpu_s": cpu}),
    );
    drop(sessions);
    server.stop().await
}

fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Sessions that read every notification, record the time from its post
/// (the event's `state` holds the post time, µs) to receipt, and ack it.
struct Readers {
    received: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Histogram<u64>>>,
}

fn read_and_ack(conns: impl IntoIterator<Item = Connection>) -> Readers {
    let received = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks = conns
        .into_iter()
        .map(|mut conn| {
            let (received, mut stopped) = (received.clone(), stopped.clone());
            tokio::spawn(async move {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
                loop {
                    let next = tokio::select! {
                        next = conn.next() => next,
                        _ = stopped.changed() => break,
                    };
                    match next {
                        Ok(ServerMessage::Notification { uuid, data, .. }) => {
                            let sent: u64 = data["state"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
                            let _ = h.record(now_micros().saturating_sub(sent).max(1));
                            received.fetch_add(1, Ordering::Relaxed);
                            if conn.ack(&uuid).await.is_err() {
                                break;
                            }
                        }
                        Ok(_) | Err(Error::Protocol(_)) => {}
                        Err(_) => break,
                    }
                }
                h
            })
        })
        .collect();
    Readers { received, stop, tasks }
}

impl Readers {
    async fn wait_for(&self, n: u64, timeout: Duration) {
        wait_received(&self.received, n, timeout).await;
    }

    async fn finish(self) -> anyhow::Result<Histogram<u64>> {
        finish_readers(self.stop, self.tasks).await
    }
}

/// Until `received` reaches `n`, or `timeout`, or 10 s without one more.
async fn wait_received(received: &AtomicU64, n: u64, timeout: Duration) {
    let deadline = Instant::now().checked_add(timeout);
    let (mut last, mut moved) = (received.load(Ordering::Relaxed), Instant::now());
    while last < n && deadline.is_none_or(|d| Instant::now() < d) && moved.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = received.load(Ordering::Relaxed);
        if now != last {
            (last, moved) = (now, Instant::now());
        }
    }
}

/// Stops every reader (its connection closed) and merges their histograms.
async fn finish_readers(
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Histogram<u64>>>,
) -> anyhow::Result<Histogram<u64>> {
    let _ = stop.send(true);
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        h.add(t.await?)?;
    }
    Ok(h)
}

/// Posts `events` presence events to `backend` in `batch`-event requests at
/// `rate` events/s (0: as fast as it goes), round-robin over `agents`, each
/// stamped with its request's time.
async fn post(backend: Backend, agents: Vec<usize>, events: usize, batch: usize, rate: u64) -> anyhow::Result<()> {
    paced(events, batch, rate, |range, t| {
        let body: Vec<Value> = range
            .map(|i| {
                let agent = format!("agent-{}", agents[i % agents.len()]);
                json!({"record":"AgentPresenceEvent","value":{"tenantGuid":"tenant-1","agentGuid": agent,"state": t}})
            })
            .collect();
        let backend = &backend;
        async move { backend.post_events(&Value::Array(body)).await }
    })
    .await
}

/// Calls `send` with event indexes `batch` at a time and the batch's time
/// stamp (µs), each call awaited before the next, at `rate` events/s (0: as
/// fast as it goes).
async fn paced<F: std::future::Future<Output = anyhow::Result<()>>>(
    events: usize,
    batch: usize,
    rate: u64,
    mut send: impl FnMut(std::ops::Range<usize>, String) -> F,
) -> anyhow::Result<()> {
    let per_batch = Duration::from_secs_f64(if rate == 0 { 0.0 } else { batch as f64 / rate as f64 });
    let mut sent = 0;
    let mut next_at = Instant::now();
    while sent < events {
        let n = batch.min(events - sent);
        send(sent..sent + n, now_micros().to_string()).await?;
        sent += n;
        if !per_batch.is_zero() {
            next_at += per_batch;
            tokio::time::sleep_until(next_at.into()).await;
        }
    }
    Ok(())
}

async fn fanout(a: &Args) -> anyhow::Result<()> {
    let server = Server::start(&a.cceb, &[]).await?;
    let long_lived = a.long_lived;
    let sessions = open_with(&server, a.fanout_sessions, 256, |_| Hello { long_lived, ..Hello::default() }).await?;
    let readers = read_and_ack(sessions.into_iter().map(|(conn, _)| conn));
    let (cpu0, started) = (server.cpu_seconds()?, Instant::now());
    let agents: Vec<usize> = (0..a.fanout_sessions).collect();
    post(server.backend(), agents, a.events, a.batch, a.rate).await?;
    readers.wait_for(a.events as u64, Duration::from_secs(120)).await;
    let elapsed = started.elapsed();
    let cpu = server.cpu_seconds()? - cpu0;
    server.stop().await?;
    let got = readers.received.load(Ordering::Relaxed);
    let h = readers.finish().await?;
    let rate = got as f64 / elapsed.as_secs_f64();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let cpu_per_100k = cpu / (got.max(1) as f64 / 100_000.0);
    let target = target_rate(a);
    report(
        "fanout",
        &[
            ("sessions", a.fanout_sessions.to_string()),
            ("long-lived", a.long_lived.to_string()),
            ("target rate (/s)", target.clone()),
            ("delivered+acked", format!("{got} of {}", a.events)),
            ("notifications/s", format!("{rate:.0}")),
            ("latency p50/p99/p99.9/max (ms)", latencies(&h)),
            ("server CPU s per 100k", format!("{cpu_per_100k:.2}")),
        ],
        json!({"sessions": a.fanout_sessions, "long_lived": a.long_lived, "target_rate": target, "delivered": got, "events": a.events,
               "per_s": rate, "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999), "max_ms": h.max() as f64 / 1000.0,
               "server_cpu_s_per_100k": cpu_per_100k}),
    );
    Ok(())
}

async fn actions(a: &Args) -> anyhow::Result<()> {
    let server = Server::start(&a.cceb, &[]).await?;
    let sessions = open_sessions(&server, a.action_sessions, 256).await?;
    let per_session = a.actions / a.action_sessions.max(1);
    let (cpu0, started) = (server.cpu_seconds()?, Instant::now());
    let tasks: Vec<_> = sessions
        .into_iter()
        .enumerate()
        .map(|(s, mut conn)| {
            tokio::spawn(async move {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
                for n in 0..per_session {
                    let uuid = format!("s{s}-a{n}");
                    let details = Map::from_iter([
                        ("interactionId".to_owned(), Value::from(format!("i-{n}"))),
                        ("state".to_owned(), Value::from("wrapup")),
                        ("channel".to_owned(), Value::from("VOICE")),
                    ]);
                    let t = Instant::now();
                    conn.action(&uuid, "UpdateInteractionEvent", &details).await.context("send")?;
                    loop {
                        match conn.next().await {
                            Ok(ServerMessage::Ack { uuid: u }) if u == uuid => break,
                            Ok(ServerMessage::Error { error, .. }) => bail!("action refused: {}", error.message),
                            Ok(_) | Err(Error::Protocol(_)) => continue,
                            Err(e) => bail!("closed: {e}"),
                        }
                    }
                    let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                }
                anyhow::Ok(h)
            })
        })
        .collect();
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        h.add(t.await??)?;
    }
    let elapsed = started.elapsed();
    let cpu = server.cpu_seconds()? - cpu0;
    server.stop().await?;
    let done = h.len();
    let rate = done as f64 / elapsed.as_secs_f64();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    report(
        "actions",
        &[
            ("sessions", a.action_sessions.to_string()),
            ("acked actions", done.to_string()),
            ("acked actions/s", format!("{rate:.0}")),
            (
                "ack latency p50/p99/p99.9/max (ms)",
                format!("{:.2} / {:.2} / {:.2} / {:.2}", ms(0.5), ms(0.99), ms(0.999), h.max() as f64 / 1000.0),
            ),
            ("server CPU s per 100k", format!("{:.2}", cpu / (done.max(1) as f64 / 100_000.0))),
        ],
        json!({"sessions": a.action_sessions, "acked": done, "per_s": rate, "p50_ms": ms(0.5), "p99_ms": ms(0.99),
               "p999_ms": ms(0.999), "max_ms": h.max() as f64 / 1000.0, "server_cpu_s": cpu}),
    );
    Ok(())
}

/// Reads notifications until `n` arrived, acking each.
async fn drain(conn: &mut Connection, n: usize) -> anyhow::Result<()> {
    let mut got = 0;
    while got < n {
        match conn.next().await {
            Ok(ServerMessage::Notification { uuid, .. }) => {
                conn.ack(&uuid).await?;
                got += 1;
            }
            Ok(_) | Err(Error::Protocol(_)) => continue,
            Err(e) => bail!("closed while draining: {e}"),
        }
    }
    Ok(())
}

async fn resume(a: &Args) -> anyhow::Result<()> {
    let server = Server::start(&a.cceb, &[]).await?;
    let (k, waiting) = (a.resume_sessions, a.waiting);
    let opened = open_with(&server, k, 256, |_| Hello { long_lived: true, ..Hello::default() }).await?;
    let mut keys = Vec::with_capacity(k);
    for (conn, reply) in opened {
        keys.push(reply.session_key.context("no session key")?);
        drop(conn);
    }
    // Every mailbox gets `waiting` notifications while nobody is connected.
    for round in 0..waiting {
        let body: Vec<Value> = (0..k)
            .map(|i| json!({"record":"AgentPresenceEvent","value":{"tenantGuid":"tenant-1","agentGuid": format!("agent-{i}"),"state": format!("r{round}")}}))
            .collect();
        for chunk in body.chunks(a.batch.max(1)) {
            server.post_events(&Value::Array(chunk.to_vec())).await?;
        }
    }
    let (cpu0, started) = (server.cpu_seconds()?, Instant::now());
    let url = server.ws_url();
    let tasks: Vec<_> = keys
        .into_iter()
        .enumerate()
        .map(|(i, key)| {
            // The stored key: the session comes back with its mailbox.
            let hello = Hello {
                token: server.token("tenant-1", &format!("agent-{i}")),
                session_key: Some(key),
                ..Hello::default()
            };
            let url = url.clone();
            tokio::spawn(async move {
                let (mut conn, reply) = connect_hello(&url, hello).await?;
                if !reply.resumed {
                    bail!("session {i} was not resumed");
                }
                let hello_at = started.elapsed();
                drain(&mut conn, waiting).await?;
                anyhow::Ok((hello_at, started.elapsed(), conn))
            })
        })
        .collect();
    let (mut last_hello, mut last_drained) = (Duration::ZERO, Duration::ZERO);
    let mut conns = Vec::with_capacity(k);
    for t in tasks {
        let (h, d, conn) = t.await??;
        (last_hello, last_drained) = (last_hello.max(h), last_drained.max(d));
        conns.push(conn);
    }
    let cpu = server.cpu_seconds()? - cpu0;
    drop(conns);
    server.stop().await?;
    let rate = k as f64 / last_hello.as_secs_f64();
    report(
        "resume",
        &[
            ("long-lived sessions", k.to_string()),
            ("waiting notifications each", waiting.to_string()),
            ("all resumed after (ms)", format!("{:.0}", last_hello.as_secs_f64() * 1000.0)),
            ("all mailboxes drained after (ms)", format!("{:.0}", last_drained.as_secs_f64() * 1000.0)),
            ("resume rate (/s)", format!("{rate:.0}")),
            ("server CPU (s)", format!("{cpu:.2}")),
        ],
        json!({"sessions": k, "waiting": waiting, "resumed_ms": last_hello.as_secs_f64() * 1000.0,
               "drained_ms": last_drained.as_secs_f64() * 1000.0, "resume_per_s": rate, "server_cpu_s": cpu}),
    );
    Ok(())
}

/// One run of the cluster scenario's load: on `nodes` bridges sharing one
/// Redis, or (`embedded`) on one bridge with the embedded store, the
/// generator shaped the same either way.
struct ClusterRun {
    delivered: u64,
    per_s: f64,
    h: Histogram<u64>,
    /// CPU seconds of the bridges and of redis-server during the load.
    cpu_bridges: f64,
    cpu_redis: f64,
    /// Redis `used_memory` growth per long-lived session, per queued notification.
    bytes_per_session: f64,
    bytes_per_queued: f64,
    /// Redis commands during the load: (name, calls, µs in Redis), most time first.
    commands: Vec<(String, u64, u64)>,
}

async fn cluster_run(a: &Args, nodes: usize, embedded: bool) -> anyhow::Result<ClusterRun> {
    let redis = if embedded { None } else { Some(Redis::start(a.redis_aof).await?) };
    let mut servers = Vec::new();
    for k in 0..if embedded { 1 } else { nodes } {
        let env: Vec<(String, String)> = match &redis {
            None => vec![],
            Some(r) => vec![
                ("CCEB_STORE".into(), "redis".into()),
                ("CCEB_REDIS_URL".into(), r.url()),
                ("CCEB_REDIS_PREFIX".into(), "bench".into()),
                ("CCEB_NODE_ID".into(), format!("node-{k}")),
            ],
        };
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        servers.push(Server::start(&a.cceb, &env).await?);
    }
    // Every node sees the others (one heartbeat, 1 s by default).
    tokio::time::sleep(Duration::from_millis(if embedded { 300 } else { 1_500 })).await;
    let used = || async {
        match &redis {
            Some(r) => r.used_memory().await,
            None => Ok(0),
        }
    };
    let k = a.cluster_sessions;
    let m0 = used().await?;
    // Agent i on node i % nodes.
    let sessions = open_on(&servers, k, 256, |_| Hello { long_lived: true, ..Hello::default() }).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m1 = used().await?;
    let readers = read_and_ack(sessions.into_iter().map(|(conn, _)| conn));
    let cpu = |servers: &[Server]| -> anyhow::Result<(f64, f64)> {
        let bridges = servers.iter().map(Server::cpu_seconds).sum::<anyhow::Result<f64>>()?;
        Ok((bridges, redis.as_ref().map_or(Ok(0.0), Redis::cpu_seconds)?))
    };
    if let Some(r) = &redis {
        r.reset_stats().await?;
    }
    let (cpu0, started) = (cpu(&servers)?, Instant::now());
    // One poster per node: poster p posts, to node p, the events of the agents
    // on node p - 1, so every notification crosses nodes. The embedded run
    // has the same posters, all posting to its one node.
    let posters: Vec<_> = (0..nodes)
        .map(|p| {
            let group = (p + nodes - 1) % nodes;
            let agents: Vec<usize> = (0..k).filter(|i| i % nodes == group).collect();
            let events = a.cluster_events / nodes + usize::from(p < a.cluster_events % nodes);
            let backend = servers[p % servers.len()].backend();
            tokio::spawn(post(backend, agents, events, a.batch, a.rate / nodes as u64))
        })
        .collect();
    for p in posters {
        p.await??;
    }
    readers.wait_for(a.cluster_events as u64, Duration::from_secs(120)).await;
    let elapsed = started.elapsed();
    let cpu1 = cpu(&servers)?;
    let commands = match &redis {
        Some(r) => r.command_stats().await?,
        None => vec![],
    };
    let delivered = readers.received.load(Ordering::Relaxed);
    let h = readers.finish().await?;
    if delivered != a.cluster_events as u64 {
        // Long-lived sessions lose nothing: fewer is a broken bridge (or tool), not a slow one.
        let on = if embedded { "one embedded node".to_owned() } else { format!("{nodes} nodes") };
        bail!("cluster: {delivered} of {} notifications delivered on {on}", a.cluster_events);
    }
    // Every session is detached now; each gets `waiting` notifications queued.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m2 = used().await?;
    let queued = k * a.waiting;
    if !embedded {
        let agents: Vec<usize> = (0..k).collect();
        post(servers[0].backend(), agents, queued, a.batch, 0).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let m3 = used().await?;
    for s in servers {
        s.stop().await?;
    }
    if let Some(r) = redis {
        r.stop().await?;
    }
    let per = |a: u64, b: u64, n: usize| (b as f64 - a as f64) / n.max(1) as f64;
    Ok(ClusterRun {
        delivered,
        per_s: delivered as f64 / elapsed.as_secs_f64(),
        h,
        cpu_bridges: cpu1.0 - cpu0.0,
        cpu_redis: cpu1.1 - cpu0.1,
        bytes_per_session: per(m0, m1, k),
        bytes_per_queued: per(m2, m3, queued),
        commands,
    })
}

async fn cluster(a: &Args) -> anyhow::Result<()> {
    if !redis::available() {
        eprintln!("cluster: redis-server is not on the PATH; skipped");
        return Ok(());
    }
    let persistence = if a.redis_aof { "appendonly yes, appendfsync everysec" } else { "save '', appendonly no" };
    for &nodes in &a.nodes {
        if nodes < 2 {
            bail!("cluster: --nodes must be at least 2 (a notification has to cross nodes)");
        }
        // The same load on one embedded node, then on the cluster, in the same minutes.
        let base = cluster_run(a, nodes, true).await?;
        let c = cluster_run(a, nodes, false).await?;
        let per_100k = |cpu: f64, n: u64| cpu / (n.max(1) as f64 / 100_000.0);
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let lat = |h: &Histogram<u64>| {
            format!("{:.2} / {:.2} / {:.2} / {:.2}", ms(h, 0.5), ms(h, 0.99), ms(h, 0.999), h.max() as f64 / 1000.0)
        };
        let (bridges, redis_cpu) = (per_100k(c.cpu_bridges, c.delivered), per_100k(c.cpu_redis, c.delivered));
        let base_cpu = per_100k(base.cpu_bridges, base.delivered);
        let target = target_rate(a);
        // The five costliest: calls and µs of Redis time per notification.
        let commands = |c: &ClusterRun| {
            let n = c.delivered.max(1) as f64;
            let top = c.commands.iter().take(5);
            top.map(|(name, calls, usec)| format!("{name} {:.2}× {:.1} µs", *calls as f64 / n, *usec as f64 / n))
                .collect::<Vec<_>>()
                .join(", ")
        };
        report(
            "cluster",
            &[
                ("nodes", nodes.to_string()),
                ("redis persistence", persistence.to_owned()),
                ("long-lived sessions", a.cluster_sessions.to_string()),
                ("target rate (/s)", target.clone()),
                ("cluster: delivered+acked", format!("{} of {}", c.delivered, a.cluster_events)),
                ("cluster: notifications/s", format!("{:.0}", c.per_s)),
                ("cluster: p50/p99/p99.9/max (ms)", lat(&c.h)),
                ("cluster: CPU s per 100k (bridges)", format!("{bridges:.2}")),
                ("cluster: CPU s per 100k (redis)", format!("{redis_cpu:.2}")),
                ("cluster: CPU s per 100k (all)", format!("{:.2}", bridges + redis_cpu)),
                ("embedded: delivered+acked", format!("{} of {}", base.delivered, a.cluster_events)),
                ("embedded: notifications/s", format!("{:.0}", base.per_s)),
                ("embedded: p50/p99/p99.9/max (ms)", lat(&base.h)),
                ("embedded: CPU s per 100k", format!("{base_cpu:.2}")),
                ("Redis hop: extra CPU s per 100k", format!("{:.2}", bridges + redis_cpu - base_cpu)),
                ("Redis bytes per long-lived session", format!("{:.0}", c.bytes_per_session)),
                ("Redis bytes per queued notif.", format!("{:.0}", c.bytes_per_queued)),
                ("Redis commands per notification", commands(&c)),
            ],
            json!({"nodes": nodes, "redis_aof": a.redis_aof, "sessions": a.cluster_sessions, "events": a.cluster_events,
                   "target_rate": target, "batch": a.batch,
                   "cluster": {"delivered": c.delivered, "per_s": c.per_s, "p50_ms": ms(&c.h, 0.5), "p99_ms": ms(&c.h, 0.99),
                               "p999_ms": ms(&c.h, 0.999), "max_ms": c.h.max() as f64 / 1000.0,
                               "cpu_s_per_100k_bridges": bridges, "cpu_s_per_100k_redis": redis_cpu},
                   "embedded": {"delivered": base.delivered, "per_s": base.per_s, "p50_ms": ms(&base.h, 0.5),
                                "p99_ms": ms(&base.h, 0.99), "p999_ms": ms(&base.h, 0.999), "max_ms": base.h.max() as f64 / 1000.0,
                                "cpu_s_per_100k": base_cpu},
                   "extra_cpu_s_per_100k": bridges + redis_cpu - base_cpu,
                   "redis_bytes_per_session": c.bytes_per_session, "redis_bytes_per_queued_notification": c.bytes_per_queued,
                   "redis_commands": c.commands.iter().map(|(name, calls, usec)| json!({"command": name, "calls": calls, "usec": usec})).collect::<Vec<_>>()}),
        );
    }
    Ok(())
}
