//! What both listeners allow before a request is served (docs/PROTOCOL.md
//! section 1): the header-read timeout and the connection caps, seen from raw
//! TCP sockets. The limits do not depend on the bus and the backend port
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
/// The header timeout of the tests that must not meet it: longer than `PATIENCE`,
/// so a socket closed within `PATIENCE` was refused, not timed out.
const NEVER_MS: u64 = 60_000;

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

/// One series of the public listener's `/metrics`, read on a connection the
/// bridge closes after the answer: once it is closed its slot is free again.
async fn metric(addr: SocketAddr, series: &str) -> f64 {
    let mut socket = TcpStream::connect(addr).await.expect("connects");
    socket.write_all(get("/metrics", "Connection: close\r\n").as_bytes()).await.expect("sent");
    metric_value(&String::from_utf8(closed(&mut socket).await).expect("utf-8"), series)
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

#[tokio::test]
async fn past_max_connections_a_new_connection_is_closed_at_once_and_counted_until_one_ends() {
    let b = TestBridge::with(|s| {
        s.max_connections = 2;
        s.header_read_timeout_ms = NEVER_MS;
    })
    .await;
    let series = r#"cceb_connections_refused_total{listener="public"}"#;
    let before = metric(b.addr, series).await;
    let (mut one, _) = b.agent("t", "one").await;
    let (mut two, _) = b.agent("t", "two").await;

    let mut third = TcpStream::connect(b.addr).await.expect("the kernel completes the handshake");
    assert!(closed(&mut third).await.is_empty(), "a refused connection gets nothing");
    let upgrade = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(b.ws_url())).await;
    assert!(upgrade.expect("refused at once").is_err(), "a WebSocket client past the cap is refused");
    one.round_trip("one-still-served").await;
    two.round_trip("two-still-served").await;

    one.send(serde_json::json!({"type":"end_session","uuid":"bye"})).await;
    assert_eq!(one.closed().await.0, Some(1000));
    one.socket_closed().await;
    // This read takes the slot `one` gave back.
    assert_eq!(metric(b.addr, series).await - before, 2.0, "each refused connection counted once");
    let (mut three, _) = b.agent("t", "three").await;
    three.round_trip("three-served").await;
    two.round_trip("two-served-still").await;
}

#[tokio::test]
async fn the_backend_port_has_its_own_cap() {
    let b = TestBridge::with(|s| {
        s.backend_max_connections = 2;
        s.header_read_timeout_ms = NEVER_MS;
    })
    .await;
    let series = r#"cceb_connections_refused_total{listener="backend"}"#;
    // The public listener's cap is not the backend port's: /metrics answers there throughout.
    let before = metric(b.addr, series).await;
    let poll = get("/backend/v1/actions?after=0&wait_ms=0", &format!("Authorization: Bearer {ADMIN}\r\n"));
    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut socket = TcpStream::connect(b.backend).await.expect("connects");
        assert_eq!(exchange(&mut socket, &poll).await.0, "HTTP/1.1 200 OK");
        kept.push(socket);
    }

    let mut silent = TcpStream::connect(b.backend).await.expect("the kernel completes the handshake");
    assert!(closed(&mut silent).await.is_empty(), "a refused connection gets nothing");
    let mut asking = TcpStream::connect(b.backend).await.expect("the kernel completes the handshake");
    // The write may already meet the reset; either way nothing comes back.
    let _ = asking.write_all(poll.as_bytes()).await;
    assert!(closed(&mut asking).await.is_empty(), "a refused request gets no answer");
    for socket in &mut kept {
        assert_eq!(exchange(socket, &poll).await.0, "HTTP/1.1 200 OK", "the kept connections are still served");
    }
    assert_eq!(metric(b.addr, series).await - before, 2.0, "each refused connection counted once");

    // The bridge closes this one after answering, which frees its slot before the client sees the close.
    let mut leaving = kept.remove(0);
    let last = get(
        "/backend/v1/actions?after=0&wait_ms=0",
        &format!("Authorization: Bearer {ADMIN}\r\nConnection: close\r\n"),
    );
    leaving.write_all(last.as_bytes()).await.expect("sent");
    assert!(String::from_utf8_lossy(&closed(&mut leaving).await).starts_with("HTTP/1.1 200 OK"));
    let mut next = TcpStream::connect(b.backend).await.expect("connects");
    assert_eq!(exchange(&mut next, &poll).await.0, "HTTP/1.1 200 OK", "a freed slot is taken again");
}
