//! A small WebSocket client. Reads fail loudly: a connection that ends (or errors) while a
//! test waits for a frame, or for silence, fails the test instead of passing for "nothing
//! arrived".

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{Instance, RECV_TIMEOUT};

/// Where the client puts its token.
#[derive(Clone, Copy, Debug)]
pub enum Auth<'a> {
    /// `Sec-WebSocket-Protocol: <token>` (browser `new WebSocket(url, token)`).
    Subprotocol(&'a str),
    /// `Sec-WebSocket-Protocol: bearer, <token>`.
    BearerSubprotocol(&'a str),
    /// `?token=<token>`.
    Query(&'a str),
    /// `Authorization: Bearer <token>`.
    Header(&'a str),
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Client {
    pub ws: Ws,
    /// The `Sec-WebSocket-Protocol` header of the 101 response.
    pub protocol: Option<String>,
    /// `data` of the `connected` event (set by `connect_ok`).
    pub connected: Value,
}

impl Client {
    /// Opens a WebSocket to `url`; the tungstenite error on refusal.
    pub async fn open(url: &str, auth: Auth<'_>) -> Result<Client, Error> {
        let url = match auth {
            Auth::Query(t) => format!("{url}?token={t}"),
            _ => url.to_string(),
        };
        let mut req = url.into_client_request()?;
        let h = req.headers_mut();
        match auth {
            Auth::Subprotocol(t) => h.insert("Sec-WebSocket-Protocol", HeaderValue::from_str(t).unwrap()),
            Auth::BearerSubprotocol(t) => {
                h.insert("Sec-WebSocket-Protocol", HeaderValue::from_str(&format!("bearer, {t}")).unwrap())
            }
            Auth::Header(t) => h.insert("Authorization", HeaderValue::from_str(&format!("Bearer {t}")).unwrap()),
            Auth::Query(_) => None,
        };
        let (ws, resp) =
            tokio::time::timeout(RECV_TIMEOUT, tokio_tungstenite::connect_async(req)).await.map_err(|_| {
                Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "WebSocket handshake timed out"))
            })??;
        let protocol = resp.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap_or_default().to_string());
        Ok(Client { ws, protocol, connected: Value::Null })
    }

    /// Opens the WebSocket to `inst`; the tungstenite error on refusal.
    pub async fn connect(inst: &Instance, auth: Auth<'_>) -> Result<Client, Error> {
        Client::open(&inst.ws_url(), auth).await
    }

    /// Connects and waits for the `connected` event (the subscription is then confirmed).
    pub async fn connect_ok(inst: &Instance, auth: Auth<'_>) -> Client {
        let c = Client::connect(inst, auth).await.unwrap_or_else(|e| panic!("connect with {auth:?} failed: {e}"));
        c.connected().await
    }

    /// Waits for the `connected` event and keeps its `data`.
    pub async fn connected(mut self) -> Client {
        self.connected = self.expect_event("connected").await;
        self
    }

    /// Next data frame (text, binary or close), skipping ping/pong; `None` only on timeout.
    /// Panics when the connection ends or fails first: that is not silence.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await.ok()? {
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(m)) => return Some(m),
                Some(Err(e)) => panic!("the connection failed while a frame was awaited: {e}"),
                None => panic!("the connection ended while a frame was awaited"),
            }
        }
    }

    pub async fn recv(&mut self) -> Message {
        match self.recv_timeout(RECV_TIMEOUT).await {
            Some(m) => m,
            None => panic!("no frame within {RECV_TIMEOUT:?}"),
        }
    }

    /// Next frame as text (panics on anything else).
    pub async fn recv_text(&mut self) -> String {
        match self.recv().await {
            Message::Text(t) => t.to_string(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    pub async fn recv_json(&mut self) -> Value {
        let t = self.recv_text().await;
        serde_json::from_str(&t).unwrap_or_else(|e| panic!("frame is not JSON ({e}): {t}"))
    }

    /// Next frame must be `{"event": event, ...}`; returns its `data`.
    pub async fn expect_event(&mut self, event: &str) -> Value {
        let v = self.recv_json().await;
        assert_eq!(v["event"], json!(event), "expected event {event:?}, got {v}");
        v["data"].clone()
    }

    /// Asserts that no data frame arrives within `d` and the connection stays open.
    pub async fn expect_silence(&mut self, d: Duration, who: &str) {
        if let Some(m) = self.recv_timeout(d).await {
            panic!("{who}: expected no frame, got {m:?}");
        }
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send(Message::text(v.to_string())).await;
    }

    pub async fn send(&mut self, m: Message) {
        self.ws.send(m).await.expect("send frame");
    }

    /// Sends `{"event": event, "data": data}`.
    pub async fn emit(&mut self, event: &str, data: Value) {
        self.send_json(&json!({"event": event, "data": data})).await;
    }

    /// Sends one chat message to `to` with a client message id and returns the ack's `data`.
    pub async fn chat_acked(&mut self, to: &str, message: Value, cmid: &str) -> Value {
        self.emit(
            "send_chat_message_to_participant",
            json!({"participantId": to, "message": message, "clientMessageId": cmid}),
        )
        .await;
        let ack = self.expect_event("ack").await;
        assert_eq!(ack["clientMessageId"], json!(cmid), "ack: {ack}");
        ack
    }

    /// Waits for a close frame and returns its code (`None` if the stream ended without one).
    pub async fn recv_close(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()??;
            match m {
                Ok(Message::Close(Some(f))) => return Some(u16::from(f.code)),
                Ok(Message::Close(None)) => return Some(1005),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Closes from the client side (code 1000) and drains until the server's close arrives.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(RECV_TIMEOUT, async { while let Some(Ok(_)) = self.ws.next().await {} }).await;
    }
}
