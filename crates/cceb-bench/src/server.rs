//! The `cceb serve` process under test: start, read /proc, stop.

use anyhow::{bail, Context};
use cceb_token::{mint_hs256, TokenRequest};
use serde_json::Value;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// At least 32 bytes: shorter HS256 secrets are refused at start.
const SECRET: &str = "cceb-bench-secret-0123456789abcdef";
const ADMIN: &str = "bench-admin";

pub struct Server {
    child: Child,
    /// The embedded store's directory (on disk, so fsync costs what it costs).
    _data: tempfile::TempDir,
    pid: u32,
    addr: String,
    backend: String,
    http: reqwest::Client,
}

/// The backend port of one server (`POST /backend/v1/events`).
#[derive(Clone)]
pub struct Backend {
    http: reqwest::Client,
    url: String,
}

impl Backend {
    pub async fn post_events(&self, body: &Value) -> anyhow::Result<()> {
        let r = self.http.post(&self.url).bearer_auth(ADMIN).json(body).send().await?;
        if r.status().as_u16() != 202 {
            bail!("backend port answered {}: {}", r.status(), r.text().await.unwrap_or_default());
        }
        Ok(())
    }
}

/// User + system CPU seconds process `pid` has used.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// Resident set size of process `pid`, KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

impl Server {
    pub async fn start(bin: &str, env: &[(&str, &str)]) -> anyhow::Result<Server> {
        let data = tempfile::tempdir()?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .env("CCEB_DATA_DIR", data.path())
            .env("CCEB_LISTEN", "127.0.0.1:0")
            .env("CCEB_BACKEND_LISTEN", "127.0.0.1:0")
            .env("CCEB_JWT_HS256_SECRET", SECRET)
            .env("CCEB_ADMIN_TOKEN", ADMIN)
            .env("CCEB_LOG", "warn")
            .env("CCEB_ACTION_RATE_PER_SECOND", "1000000")
            .env("CCEB_ACTION_BURST", "1000000")
            .env("CCEB_EMBEDDED_LOG_CAPACITY", "10000")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child =
            cmd.spawn().with_context(|| format!("starting {bin} (build it with `cargo build --release`)"))?;
        let pid = child.id().context("no pid")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(l) = lines.next_line().await? {
                if l.starts_with("listening on ") {
                    return anyhow::Ok(l);
                }
            }
            bail!("cceb exited before listening")
        })
        .await??;
        // "listening on ADDR (backend port ADDR)", or "listening on ADDR (bus kafka)": no backend port.
        let words: Vec<&str> = line.split_whitespace().collect();
        let addr = words.get(2).context("no address in the listening line")?.to_string();
        let backend = words.get(5).map_or_else(String::new, |b| b.trim_end_matches(')').to_owned());
        Ok(Server { child, _data: data, pid, addr, backend, http: reqwest::Client::new() })
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws/v1", self.addr)
    }

    pub fn token(&self, tenant: &str, agent: &str) -> String {
        let req = TokenRequest {
            tenant_guid: tenant,
            agent_guid: agent,
            ir_instance: "ir-1",
            contact_id: None,
            ttl: Duration::from_secs(3600),
        };
        mint_hs256(SECRET, &req).unwrap_or_default()
    }

    pub async fn post_events(&self, body: &Value) -> anyhow::Result<()> {
        self.backend().post_events(body).await
    }

    /// A handle on the backend port that tasks can own.
    pub fn backend(&self) -> Backend {
        Backend { http: self.http.clone(), url: format!("http://{}/backend/v1/events", self.backend) }
    }

    /// Resident set size of the server, KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.pid)
    }

    /// User + system CPU seconds the server has used.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.pid)
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        Ok(())
    }
}
