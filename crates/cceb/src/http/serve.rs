//! The accept loop of both listeners. `axum::serve` has no header timeout and
//! no connection cap, so a socket that sent nothing or half a request head
//! stayed open forever; this loop bounds both.
//!
//! Each accepted socket takes a slot of its listener before any HTTP is read.
//! The slot lives inside the socket's IO type, so it travels with the socket
//! through the WebSocket upgrade and is given back when the socket closes.

use crate::metrics::Listener;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics::Counter;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What one listener allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deadline for a complete request head, counted from the first read of a
    /// connection and again whenever a kept-alive connection goes idle.
    pub header_read_timeout: Duration,
    /// Connections open at once, upgraded ones included.
    pub max_connections: usize,
}

/// A refusal is logged at most this often per listener; the counter has them all.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);
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
    refused: Counter,
    tasks: &TaskTracker,
    stop: CancellationToken,
) {
    let conns = tasks.clone();
    tasks.spawn(accept_loop(tcp, listener, app, limits, refused, conns, stop));
}

async fn accept_loop(
    tcp: TcpListener,
    listener: Listener,
    app: Router,
    limits: Limits,
    refused: Counter,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let mut last_refusal_log: Option<Instant> = None;
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused.increment(1);
            // A reset leaves no TIME_WAIT behind for a socket that was never served.
            let _ = socket.set_zero_linger();
            drop(socket);
            if last_refusal_log.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY) {
                last_refusal_log = Some(Instant::now());
                tracing::warn!(
                    listener = listener.label(),
                    max_connections = limits.max_connections,
                    "connection limit reached; refusing new connections"
                );
            }
            continue;
        };
        // Notifications and acks are small frames: Nagle's algorithm would hold them back.
        let _ = socket.set_nodelay(true);
        let io = TokioIo::new(Slotted { slot: Some(slot), io: socket });
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

/// A socket holding its listener's slot.
struct Slotted {
    /// Declared before `io`, so dropping frees the slot before the socket
    /// closes: a client that saw the close and reconnects at once finds it free.
    slot: Option<OwnedSemaphorePermit>,
    io: TcpStream,
}

impl AsyncRead for Slotted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Slotted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// The bridge is ending the connection (hyper shuts the socket down before
    /// dropping it): the slot is free from here, for the reason given at `slot`.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.slot = None;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
