//! A `redis-server` of the benchmark's own: free port, temporary directory,
//! no RDB snapshots; the append-only file only when asked. Spoken to with a
//! few inline commands over TCP, so the tool needs no Redis client.

use anyhow::{bail, Context};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

pub struct Redis {
    child: Child,
    _dir: tempfile::TempDir,
    pid: u32,
    port: u16,
}

/// Whether `redis-server` is on the PATH.
pub fn available() -> bool {
    std::process::Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Redis {
    /// `aof`: `appendonly yes`, `appendfsync everysec`; otherwise no persistence at all.
    pub async fn start(aof: bool) -> anyhow::Result<Redis> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let port_arg = port.to_string();
        let mut args = vec!["--port", &port_arg, "--bind", "127.0.0.1", "--save", "", "--daemonize", "no"];
        args.extend(["--maxmemory-policy", "noeviction", "--loglevel", "warning"]);
        if aof {
            args.extend(["--appendonly", "yes", "--appendfsync", "everysec"]);
        } else {
            args.extend(["--appendonly", "no"]);
        }
        let mut cmd = Command::new("redis-server");
        cmd.args(&args).arg("--dir").arg(dir.path()).stdout(Stdio::null()).stderr(Stdio::inherit()).kill_on_drop(true);
        let child = cmd.spawn().context("starting redis-server")?;
        let pid = child.id().context("no pid")?;
        let redis = Redis { child, _dir: dir, pid, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match redis.command("PING").await {
                Ok(r) if r.contains("PONG") => return Ok(redis),
                _ if Instant::now() > deadline => bail!("redis-server on port {port} did not answer PING"),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        crate::server::cpu_seconds(self.pid)
    }

    /// `INFO memory`'s `used_memory`, bytes.
    pub async fn used_memory(&self) -> anyhow::Result<u64> {
        let info = self.command("INFO memory").await?;
        let line = info.lines().find_map(|l| l.strip_prefix("used_memory:")).context("no used_memory")?;
        Ok(line.trim().parse()?)
    }

    /// Zeroes the command statistics (`CONFIG RESETSTAT`).
    pub async fn reset_stats(&self) -> anyhow::Result<()> {
        self.command("CONFIG RESETSTAT").await.map(drop)
    }

    /// `INFO commandstats`: (command, calls, µs spent) for each command run
    /// since the last [`Redis::reset_stats`], most time first.
    pub async fn command_stats(&self) -> anyhow::Result<Vec<(String, u64, u64)>> {
        let info = self.command("INFO commandstats").await?;
        let mut out = Vec::new();
        for line in info.lines() {
            let Some((name, rest)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
            let field = |k: &str| {
                rest.split(',').find_map(|f| f.strip_prefix(k)?.strip_prefix('=')?.parse::<u64>().ok()).unwrap_or(0)
            };
            out.push((name.to_owned(), field("calls"), field("usec")));
        }
        out.sort_by_key(|(_, _, usec)| std::cmp::Reverse(*usec));
        Ok(out)
    }

    /// One inline command; the reply's text (a simple string, or a bulk string's body).
    async fn command(&self, cmd: &str) -> anyhow::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await?;
        s.write_all(format!("{cmd}\r\n").as_bytes()).await?;
        let mut r = BufReader::new(s);
        let mut first = String::new();
        r.read_line(&mut first).await?;
        match first.as_bytes().first() {
            Some(b'+') => Ok(first[1..].trim_end().to_owned()),
            Some(b'$') => {
                let len: usize = first[1..].trim_end().parse()?;
                let mut body = vec![0; len];
                r.read_exact(&mut body).await?;
                Ok(String::from_utf8(body)?)
            }
            _ => bail!("redis answered {first:?}"),
        }
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        Ok(())
    }
}
