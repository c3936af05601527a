//! What both listeners allow before a request is served (docs/PROTOCOL.md
//! section 1): the header-read timeout, seen from raw TCP sockets. The limits do not depend on the bus and the backend port
//! exists only on the embedded one, so `scripts/test` runs this module on the
//! embedded bus only.

use crate::support::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The header timeout of the tests that wait for it.
const HEADER_TIMEOUT: Duration = Duration::from_millis(300);

fn with_header_timeout(s: &mut cceb::Settings) {
    s.header_read_timeout_ms = HEADER_TIMEOUT.as_millis() as u64;
}

/// Reads until the bridge closes `socket` (end of stream or reset); returns
/// what came before. Panics if it stays open for `PATIENCE`.
async fn closed(socket: &mut TcpStream) -> Vec<u8> {
    let deadline = Instant::now() + PATIENCE;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut chunk)).await {
            Err(_) => panic!("the bridge kept the connection open for {PATIENCE:?}; it sent {got:?}"),
            Ok(Ok(0) | Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends a request and reads its response (the connection stays open);
/// returns the status line and the body.
async fn exchange(socket: &mut TcpStream, request: &str) -> (String, String) {
    socket.write_all(request.as_bytes()).await.expect("the request is sent");
    let deadline = Instant::now() + PATIENCE;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return (head.lines().next().unwrap_or_default().to_owned(), body.to_owned());
            }
        }
        match tokio::time::timeout_at(deadline, socket.read(&mut chunk)).await.expect("the bridge answers in time") {
            Ok(0) | Err(_) => panic!("the connection closed before the response was complete: {text:?}"),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: cceb\r\n{extra}\r\n")
}

/// Opens a socket, optionally sends `bytes`, and expects it closed after the header timeout with no answer.
async fn closed_after_the_header_timeout(addr: SocketAddr, bytes: &str) {
    let started = Instant::now();
    let mut socket = TcpStream::connect(addr).await.expect("connects");
    socket.write_all(bytes.as_bytes()).await.expect("sent");
    let got = closed(&mut socket).await;
    assert!(got.is_empty(), "an incomplete request head gets no answer: {:?}", String::from_utf8_lossy(&got));
    assert!(started.elapsed() >= HEADER_TIMEOUT, "closed after {:?}, before the timeout", started.elapsed());
}

#[tokio::test]
async fn a_socket_that_sends_nothing_is_closed_after_the_header_timeout() {
    let b = TestBridge::with(with_header_timeout).await;
    closed_after_the_header_timeout(b.addr, "").await;
}

#[tokio::test]
async fn a_socket_that_sends_half_a_request_head_is_closed_after_the_header_timeout() {
    let b = TestBridge::with(with_header_timeout).await;
    closed_after_the_header_timeout(b.addr, "GET /ws/v1 HTTP/1.1\r\nHost: cceb\r\nUpgrade: webs").await;
}

#[tokio::test]
async fn a_request_head_trickled_byte_by_byte_is_closed_at_the_deadline_all_the_same() {
    let b = TestBridge::with(with_header_timeout).await;
    let started = Instant::now();
    let mut socket = TcpStream::connect(b.addr).await.expect("connects");
    socket.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").await.expect("sent");
    // One byte every 50 ms: the connection is never idle, yet the head is never complete.
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut sent = 0;
    let ended = tokio::time::timeout(PATIENCE, async {
        let mut one = [0u8; 1];
        loop {
            tokio::select! {
                read = socket.read(&mut one) => return read.map_or(0, |n| n),
                _ = tick.tick() => {
                    if socket.write_all(b"a").await.is_err() {
                        return 0;
                    }
                    sent += 1;
                }
            }
        }
    })
    .await;
    assert_eq!(ended, Ok(0), "closed without an answer");
    assert!(started.elapsed() >= HEADER_TIMEOUT, "closed after {:?}, before the timeout", started.elapsed());
    assert!(sent >= 3, "the client kept sending ({sent} bytes)");
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_header_timeout() {
    let b = TestBridge::with(with_header_timeout).await;
    let mut socket = TcpStream::connect(b.addr).await.expect("connects");
    let (status, body) = exchange(&mut socket, &get("/healthz", "")).await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "ok"));
    let idle = Instant::now();
    assert!(closed(&mut socket).await.is_empty());
    assert!(idle.elapsed() >= HEADER_TIMEOUT, "closed after {:?} idle, before the timeout", idle.elapsed());
}

#[tokio::test]
async fn the_backend_port_closes_silent_and_half_sent_connections_after_the_header_timeout() {
    let b = TestBridge::with(with_header_timeout).await;
    tokio::join!(
        closed_after_the_header_timeout(b.backend, ""),
        closed_after_the_header_timeout(b.backend, "POST /backend/v1/events HTTP/1.1\r\nAuthorization: Bea"),
    );
}
