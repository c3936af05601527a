//! One WebSocket connection to the bridge, and nothing more: connect, `hello`,
//! typed messages both ways, raw frames, close. No task, no retry, no timer;
//! [`crate::Client`] builds its reconnects, acks and retries on it, and tests
//! and the benchmark use it directly.

use cceb_protocol::incoming::{ClientMessage, Hello};
use cceb_protocol::outgoing::{parse_server_message, ErrorData, HelloReply, ServerMessage};
use cceb_protocol::TraceParent;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The socket under a [`Connection`].
pub type WebSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What went wrong on a [`Connection`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The WebSocket failed: connect, handshake, or IO.
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    /// The connection is closed: `code` and `reason` of the bridge's close
    /// frame, `None` and empty when the socket ended without one.
    #[error("closed ({code:?}): {reason}")]
    Closed { code: Option<u16>, reason: String },
    /// The bridge answered `hello` with this `error`, then closed with `code`.
    #[error("hello refused ({code:?}): {}: {}", error.code, error.message)]
    Refused { code: Option<u16>, error: ErrorData },
    /// A frame that is not a server message of the contract (unreadable
    /// text, a binary frame, a `hello_reply` to another uuid). The connection
    /// still works: a client may skip what a newer bridge sends.
    #[error("unexpected frame: {0}")]
    Protocol(String),
}

/// One connection. Reads are cancel-safe: dropping a pending [`Connection::next`]
/// (in `select!`, under a timeout) loses no message.
pub struct Connection {
    ws: WebSocket,
    /// The bridge's close frame, once read: its code (`None` when it carried
    /// none) and reason.
    close: Option<(Option<u16>, String)>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("close", &self.close).finish_non_exhaustive()
    }
}

impl Connection {
    /// Opens the WebSocket at `url` (`ws://…/ws/v1`, as discovery names it).
    pub async fn connect(url: &str) -> Result<Connection, Error> {
        // Frames from the bridge are small; tungstenite's 128 KiB default read
        // buffer is zero-filled before every read and held per connection.
        let config = tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true).await?;
        Ok(Connection::from(ws))
    }

    /// Says `hello` under a fresh uuid and reads until its `hello_reply`.
    /// An `error` instead (a refused token, too many sessions) is followed by
    /// the bridge's close: [`Error::Refused`] with both.
    pub async fn hello(&mut self, hello: &Hello) -> Result<HelloReply, Error> {
        let uuid = crate::new_uuid();
        self.send_text(frame("hello", &uuid, Some(hello))).await?;
        let mut refused: Option<ErrorData> = None;
        loop {
            match self.next().await {
                Ok(ServerMessage::HelloReply { uuid: u, reply }) if u == uuid => return Ok(reply),
                Ok(ServerMessage::HelloReply { uuid: u, .. }) => {
                    return Err(Error::Protocol(format!("hello_reply to {u}, the hello was {uuid}")))
                }
                Ok(ServerMessage::Error { error, .. }) => refused = Some(error),
                Ok(_) | Err(Error::Protocol(_)) => {}
                Err(e) => {
                    return Err(match (refused, e) {
                        (Some(error), Error::Closed { code, .. }) => Error::Refused { code, error },
                        // The socket broke instead of closing: the refusal is still the news.
                        (Some(error), _) => Error::Refused { code: None, error },
                        (None, e) => e,
                    });
                }
            }
        }
    }

    /// Sends a message of the contract.
    pub async fn send(&mut self, msg: &ClientMessage) -> Result<(), Error> {
        self.send_text(encode(msg)).await
    }

    /// Acknowledges the notification `uuid`.
    pub async fn ack(&mut self, uuid: &str) -> Result<(), Error> {
        self.send_text(bare("ack", uuid)).await
    }

    /// Sends the action `action` with `details` (the record's fields,
    /// camelCase) under `uuid`; its `ack` or `error` comes through [`Connection::next`].
    pub async fn action(&mut self, uuid: &str, action: &str, details: &Map<String, Value>) -> Result<(), Error> {
        self.send_text(action_frame(uuid, action, details, None)).await
    }

    /// Sends one text frame as it is, valid or not.
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<(), Error> {
        self.send_frame(Message::text(text.into())).await
    }

    /// Sends one WebSocket frame as it is (binary, ping, close…).
    pub async fn send_frame(&mut self, frame: Message) -> Result<(), Error> {
        let r = self.ws.send(frame).await;
        r.map_err(|e| self.error(e))
    }

    /// The next server message, skipping ping, pong and raw frames (reading
    /// answers the bridge's pings). The bridge's close frame ends it with
    /// [`Error::Closed`], as does every read after.
    pub async fn next(&mut self) -> Result<ServerMessage, Error> {
        loop {
            let frame = self.ws.next().await;
            return match frame {
                Some(Ok(Message::Text(t))) => parse_server_message(&t).map_err(|e| Error::Protocol(unreadable(&t, &e))),
                Some(Ok(Message::Binary(_))) => Err(Error::Protocol("a binary frame".into())),
                Some(Ok(Message::Close(f))) => {
                    self.close =
                        Some(f.map_or((None, String::new()), |f| (Some(u16::from(f.code)), f.reason.to_string())));
                    Err(self.closed())
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Err(e)) => Err(self.error(e)),
                None => Err(self.closed()),
            };
        }
    }

    /// Sends a close frame; the bridge's answer ends [`Connection::next`].
    pub async fn close(&mut self, code: u16, reason: &str) -> Result<(), Error> {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        let r = self.ws.close(Some(frame)).await;
        r.map_err(|e| self.error(e))
    }

    /// The code of the bridge's close frame, once read (`None` before, or
    /// when the frame carried no code).
    pub fn close_code(&self) -> Option<u16> {
        self.close.as_ref().and_then(|c| c.0)
    }

    /// The reason of the bridge's close frame, once read.
    pub fn close_reason(&self) -> Option<&str> {
        self.close.as_ref().map(|c| c.1.as_str())
    }

    /// The socket underneath, for frames the contract does not cover.
    pub fn get_mut(&mut self) -> &mut WebSocket {
        &mut self.ws
    }

    fn closed(&self) -> Error {
        let (code, reason) = self.close.clone().unwrap_or_default();
        Error::Closed { code, reason }
    }

    fn error(&self, e: tungstenite::Error) -> Error {
        match e {
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => self.closed(),
            e => Error::WebSocket(e),
        }
    }
}

/// Why `text` could not be read, with its start (a frame may be megabytes).
fn unreadable(text: &str, why: &str) -> String {
    const SHOWN: usize = 200;
    match text.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{why}: {}…", &text[..end]),
        None => format!("{why}: {text}"),
    }
}

impl From<WebSocket> for Connection {
    fn from(ws: WebSocket) -> Connection {
        Connection { ws, close: None }
    }
}

/// The text of `msg`, as the bridge's parser reads it.
fn encode(msg: &ClientMessage) -> String {
    match msg {
        ClientMessage::Hello { uuid, hello } => frame("hello", uuid, Some(hello)),
        ClientMessage::Action { uuid, action, details, traceparent } => {
            action_frame(uuid, action, details, traceparent.as_ref())
        }
        ClientMessage::Ack { uuid } => bare("ack", uuid),
        ClientMessage::Ping { uuid } => bare("ping", uuid),
        ClientMessage::EndSession { uuid } => bare("end_session", uuid),
    }
}

/// `{"type":…,"uuid":…}`, written by hand: an `ack` follows every
/// notification, and serde costs twenty times more here (debug build).
fn bare(ty: &str, uuid: &str) -> String {
    if uuid.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        return frame::<()>(ty, uuid, None);
    }
    let mut s = String::with_capacity(22 + ty.len() + uuid.len());
    s.push_str("{\"type\":\"");
    s.push_str(ty);
    s.push_str("\",\"uuid\":\"");
    s.push_str(uuid);
    s.push_str("\"}");
    s
}

#[derive(Serialize)]
struct Envelope<'a, T> {
    #[serde(rename = "type")]
    ty: &'a str,
    uuid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a T>,
}

#[derive(Serialize)]
struct ActionData<'a> {
    action: &'a str,
    action_details: &'a Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
}

/// `{"type":…,"uuid":…,"data":…}`, written once, borrowing everything.
fn frame<T: Serialize>(ty: &str, uuid: &str, data: Option<&T>) -> String {
    // Strings, maps and plain structs: serialising into a String cannot fail.
    serde_json::to_string(&Envelope { ty, uuid, data }).unwrap_or_default()
}

fn action_frame(uuid: &str, action: &str, details: &Map<String, Value>, traceparent: Option<&TraceParent>) -> String {
    let traceparent = traceparent.map(TraceParent::to_string);
    frame("action", uuid, Some(&ActionData { action, action_details: details, traceparent }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cceb_protocol::incoming::{ClientInfo, Push};
    use cceb_protocol::parse_client_message;

    #[test]
    fn frames_read_back_as_the_bridge_parses_them() {
        let mut details = Map::new();
        details.insert("interactionId".into(), Value::from("i-\"1\""));
        let hello = Hello {
            token: "t".into(),
            tenant_guid: Some("t1".into()),
            long_lived: true,
            session_key: Some("k".into()),
            auto_accept: true,
            push: Some(Push { provider: "webhook".into(), token: "d".into() }),
            client: Some(ClientInfo { name: Some("n".into()), version: None }),
        };
        for msg in [
            ClientMessage::Hello { uuid: "h".into(), hello },
            ClientMessage::Action {
                uuid: "a".into(),
                action: "BlindTransferEvent".into(),
                details: details.clone(),
                traceparent: None,
            },
            ClientMessage::Action { uuid: "e".into(), action: "X".into(), details: Map::new(), traceparent: None },
            ClientMessage::Action {
                uuid: "t".into(),
                action: "X".into(),
                details: Map::new(),
                traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().ok(),
            },
            ClientMessage::Ack { uuid: "n-\\1".into() },
            ClientMessage::Ping { uuid: "p".into() },
            ClientMessage::EndSession { uuid: "bye".into() },
        ] {
            let text = encode(&msg);
            assert_eq!(parse_client_message(&text).as_ref(), Ok(&msg), "{text}");
        }
        assert_eq!(bare("ack", "u"), r#"{"type":"ack","uuid":"u"}"#);
        assert_eq!(bare("ack", "u"), frame::<()>("ack", "u", None));
    }

    #[test]
    fn an_unreadable_frame_is_shown_by_its_start() {
        assert_eq!(unreadable("{}", "bad"), "bad: {}");
        let long = unreadable(&"é".repeat(10_000), "bad");
        assert_eq!(long.chars().count(), "bad: ".len() + 200 + 1);
    }
}
