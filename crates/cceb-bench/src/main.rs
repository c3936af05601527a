//! `cceb-bench`: drives a real `cceb serve` process over loopback and reports
//! what it measured. BENCHMARKS.md says how to run it and holds the figures.

mod server;

use anyhow::{bail, Context};
use cceb_client::cceb_protocol::incoming::Hello;
use cceb_client::cceb_protocol::outgoing::{HelloReply, ServerMessage};
use cceb_client::{Connection, Error};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use server::Server;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Idle,
    Fanout,
    Actions,
    Resume,
    All,
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
    /// resume: notifications waiting in each mailbox.
    #[arg(long, default_value_t = 10)]
    waiting: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut a = Args::parse();
    if a.quick {
        (a.sessions, a.fanout_sessions, a.events, a.action_sessions, a.actions) = (500, 100, 20_000, 20, 5_000);
        a.resume_sessions = 100;
    }
    raise_fd_limit(a.sessions.max(a.fanout_sessions) as u64 * 2 + 1024)?;
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
    Ok(())
}

/// Each session is a socket on both sides; 50k sessions need well over the usual 1024.
fn raise_fd_limit(want: u64) -> anyhow::Result<()> {
    let (_, hard) = rlimit::Resource::NOFILE.get()?;
    // Root may raise the hard limit too; the server (our child) inherits both.
    if want > hard && rlimit::Resource::NOFILE.set(want, want).is_ok() {
        return Ok(());
    }
    let soft = want.min(hard);
    rlimit::Resource::NOFILE.set(soft, hard)?;
    if soft < want {
        eprintln!("note: open-file limit is {soft} (hard limit), wanted {want}");
    }
    Ok(())
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
    let url = server.ws_url();
    let mut out = Vec::with_capacity(n);
    let mut ids = (0..n).peekable();
    while ids.peek().is_some() {
        let chunk: Vec<usize> = ids.by_ref().take(parallel).collect();
        let tasks: Vec<_> = chunk
            .into_iter()
            .map(|i| {
                let hello = Hello { token: server.token("tenant-1", &format!("agent-{i}")), ..hello(i) };
                let url = url.clone();
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

async fn fanout(a: &Args) -> anyhow::Result<()> {
    let server = Server::start(&a.cceb, &[]).await?;
    let long_lived = a.long_lived;
    let sessions = open_with(&server, a.fanout_sessions, 256, |_| Hello { long_lived, ..Hello::default() }).await?;
    let sessions = sessions.into_iter().map(|(conn, _)| conn);
    let received = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for mut conn in sessions {
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            loop {
                match conn.next().await {
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
        }));
    }
    let (cpu0, started) = (server.cpu_seconds()?, Instant::now());
    let per_batch = Duration::from_secs_f64(if a.rate == 0 { 0.0 } else { a.batch as f64 / a.rate as f64 });
    let mut sent = 0;
    let mut next_at = Instant::now();
    while sent < a.events {
        let n = a.batch.min(a.events - sent);
        let t = now_micros().to_string();
        let body: Vec<Value> = (sent..sent + n)
            .map(|i| {
                let agent = format!("agent-{}", i % a.fanout_sessions);
                json!({"record":"AgentPresenceEvent","value":{"tenantGuid":"tenant-1","agentGuid": agent,"state": t}})
            })
            .collect();
        server.post_events(&Value::Array(body)).await?;
        sent += n;
        if !per_batch.is_zero() {
            next_at += per_batch;
            tokio::time::sleep_until(next_at.into()).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while received.load(Ordering::Relaxed) < a.events as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let cpu = server.cpu_seconds()? - cpu0;
    server.stop().await?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for r in readers {
        h.add(r.await?)?;
    }
    let got = received.load(Ordering::Relaxed);
    let rate = got as f64 / elapsed.as_secs_f64();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let cpu_per_100k = cpu / (got.max(1) as f64 / 100_000.0);
    let target = if a.rate == 0 { "max".to_owned() } else { a.rate.to_string() };
    report(
        "fanout",
        &[
            ("sessions", a.fanout_sessions.to_string()),
            ("long-lived", a.long_lived.to_string()),
            ("target rate (/s)", target.clone()),
            ("delivered+acked", format!("{got} of {}", a.events)),
            ("notifications/s", format!("{rate:.0}")),
            (
                "latency p50/p99/p99.9/max (ms)",
                format!("{:.2} / {:.2} / {:.2} / {:.2}", ms(0.5), ms(0.99), ms(0.999), h.max() as f64 / 1000.0),
            ),
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
