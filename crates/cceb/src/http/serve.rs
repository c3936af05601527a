//! The accept loop of both listeners. `axum::serve` has no header timeout, so
//! a socket that sent nothing or half a request head stayed open forever.

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::io;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Which listener, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `/ws/v1`, discovery, health, metrics.
    Public,
    /// The embedded bus's backend port.
    Backend,
}

impl Listener {
    pub fn label(self) -> &'static str {
        match self {
            Listener::Public => "public",
            Listener::Backend => "backend",
        }
    }
}

/// What one listener allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deadline for a complete request head, counted from the first read of a
    /// connection and again whenever a kept-alive connection goes idle.
    pub header_read_timeout: Duration,
}

/// Pause after an accept error that is not the peer's doing (out of file
/// descriptors, mostly): retrying at once would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Serves `app` on `tcp` until `stop` is cancelled; the loop and every
/// connection run on `tasks`.
pub fn spawn(
    tcp: TcpListener,
    listener: Listener,
    app: Router,
    limits: Limits,
    tasks: &TaskTracker,
    stop: CancellationToken,
) {
    let conns = tasks.clone();
    tasks.spawn(accept_loop(tcp, listener, app, limits, conns, stop));
}

async fn accept_loop(
    tcp: TcpListener,
    listener: Listener,
    app: Router,
    limits: Limits,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    loop {
        let socket = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = tcp.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(e) if peer_gone(&e) => continue,
                Err(e) => {
                    tracing::error!(listener = listener.label(), error = %e, "cannot accept connections; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    }
                }
            },
        };
        // Notifications and acks are small frames: Nagle's algorithm would hold them back.
        let _ = socket.set_nodelay(true);
        let io = TokioIo::new(socket);
        let conn = http.serve_connection(io, TowerToHyperService::new(app.clone())).with_upgrades();
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = stop.cancelled() => {
                    // Ends an idle connection at once and a busy one after its response.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                let reason = if e.is_timeout() { "no complete request head in time" } else { "connection error" };
                tracing::debug!(listener = listener.label(), error = %e, "{reason}");
            }
        });
    }
}

/// Accept errors that concern only the one connection that was leaving.
fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
    )
}
