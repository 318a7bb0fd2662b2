//! A scripted control plane: a WebSocket server (TLS or plain) that accepts the agent's tunnel and
//! lets a test speak the PipeOps envelope protocol to it message by message.
//!
//! Frames from the agent are decoded by a reader task: `proxy_websocket_data`,
//! `proxy_websocket_started` and `proxy_websocket_close` go to the stream they name (when the test
//! opened it with [`AgentSession::open_stream`]); everything else (and data for streams the test
//! did not open) goes to the control queue ([`AgentSession::recv_control`]). Every frame is also
//! recorded ([`AgentSession::seen`]) so tests can check what the agent sent, and nothing else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::tls::{TestTls, server_config};

/// The agent-to-control-plane message types of the PipeOps catalogue (pipeops-wire.md §3a).
pub const PIPEOPS_AGENT_TYPES: [&str; 17] = [
    "register",
    "heartbeat",
    "pong",
    "gateway_hello_ack",
    "proxy_response",
    "proxy_error",
    "proxy_response_header",
    "proxy_response_chunk",
    "proxy_response_end",
    "proxy_response_abort",
    "proxy_websocket_data",
    "proxy_websocket_close",
    "backpressure",
    "protocol_fallback",
    "tcp_tunnel_data",
    "tcp_tunnel_close",
    "udp_tunnel_data",
];

/// The path agents dial on a control plane.
pub const AGENT_PATH: &str = "/api/v1/clusters/agent/ws";

/// Kind of a WebSocket frame received from the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// Text message.
    Text,
    /// Binary message.
    Binary,
    /// Ping control frame.
    Ping,
    /// Pong control frame.
    Pong,
    /// Close frame.
    Close,
}

/// One frame the agent sent, as recorded.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Frame kind.
    pub frame: FrameKind,
    /// The envelope's `type` (None if not a JSON envelope).
    pub type_name: Option<String>,
    /// For `proxy_websocket_data`: the opcode byte of the decoded data.
    pub opcode: Option<u8>,
    /// Size of the frame.
    pub len: usize,
}

/// A decoded envelope from the agent.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The frame it came in.
    pub frame: FrameKind,
    /// The parsed JSON (Null when unparseable).
    pub json: Value,
    /// The raw text (lossy for binary frames).
    pub raw: String,
}

impl Envelope {
    /// `type`.
    pub fn type_name(&self) -> &str {
        self.json["type"].as_str().unwrap_or("")
    }
    /// Top-level `request_id`.
    pub fn request_id(&self) -> Option<&str> {
        self.json["request_id"].as_str()
    }
    /// `payload[key]` as a string.
    pub fn payload_str(&self, key: &str) -> Option<&str> {
        self.json["payload"][key].as_str()
    }
    /// The stream or request this envelope names: top-level `request_id`, else
    /// `payload.request_id`, else `payload.stream_id`.
    pub fn target(&self) -> Option<&str> {
        self.request_id()
            .filter(|s| !s.is_empty())
            .or_else(|| self.payload_str("request_id").filter(|s| !s.is_empty()))
            .or_else(|| self.payload_str("stream_id").filter(|s| !s.is_empty()))
    }
}

/// What the agent sent for one stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// `proxy_websocket_started` (Tether extension) with its subprotocol.
    Started(Option<String>),
    /// `proxy_websocket_data`: the opcode byte and the message.
    Data(u8, Vec<u8>),
    /// `proxy_websocket_close` (code and reason with the extension).
    Close(Option<u16>, Option<String>),
}

/// A listening scripted control plane.
pub struct ScriptedControlPlane {
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    addr: SocketAddr,
}

impl ScriptedControlPlane {
    /// Binds 127.0.0.1 on a free port; TLS with `tls`' identity when given.
    pub async fn bind(tls: Option<&TestTls>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        Self {
            listener,
            acceptor: tls.map(|t| tokio_rustls::TlsAcceptor::from(server_config(t))),
            addr,
        }
    }

    /// The URL to give the agent's `--control-plane`: `https://ADDR` or `ws://ADDR`.
    pub fn url(&self) -> String {
        match self.acceptor {
            Some(_) => format!("https://{}", self.addr),
            None => format!("ws://{}", self.addr),
        }
    }

    /// Accepts the agent's tunnel (one WebSocket upgrade).
    pub async fn accept(&self, timeout: Duration) -> AgentSession {
        let (tcp, _) = tokio::time::timeout(timeout, self.listener.accept())
            .await
            .unwrap_or_else(|_| panic!("the agent did not connect within {timeout:?}"))
            .expect("accept");
        tcp.set_nodelay(true).ok();
        match &self.acceptor {
            Some(acceptor) => {
                let tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
                    .await
                    .expect("TLS handshake timed out")
                    .expect("TLS handshake with the agent");
                AgentSession::upgrade(tls).await
            }
            None => AgentSession::upgrade(tcp).await,
        }
    }
}

type Streams = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<StreamEvent>>>>;

/// One agent connection.
pub struct AgentSession {
    /// The request path of the upgrade.
    pub path: String,
    /// The `Authorization` header of the upgrade.
    pub authorization: Option<String>,
    out: mpsc::UnboundedSender<Message>,
    control: mpsc::UnboundedReceiver<Envelope>,
    stash: Vec<Envelope>,
    streams: Streams,
    seen: Arc<Mutex<Vec<Seen>>>,
    closed: Arc<Mutex<Option<String>>>,
}

impl AgentSession {
    // The handshake callback's error type is tungstenite's HTTP response.
    #[allow(clippy::result_large_err)]
    async fn upgrade<S>(io: S) -> Self
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let head = Arc::new(Mutex::new((String::new(), None::<String>)));
        let sink = Arc::clone(&head);
        let callback = move |req: &Request, resp: Response| {
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            *sink.lock().unwrap() = (req.uri().path().to_string(), auth);
            Ok(resp)
        };
        let config = WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let ws = tokio_tungstenite::accept_hdr_async_with_config(io, callback, Some(config))
            .await
            .expect("WebSocket upgrade from the agent");
        let (path, authorization) = head.lock().unwrap().clone();
        let (mut write, mut read) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let (control_tx, control) = mpsc::unbounded_channel();
        let streams: Streams = Arc::default();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let closed: Arc<Mutex<Option<String>>> = Arc::default();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if write.send(m).await.is_err() {
                    break;
                }
            }
            let _ = write.close().await;
        });
        let (streams2, seen2, closed2) =
            (Arc::clone(&streams), Arc::clone(&seen), Arc::clone(&closed));
        tokio::spawn(async move {
            let why = loop {
                let msg = match read.next().await {
                    None => break "connection ended".to_string(),
                    Some(Err(e)) => break format!("read error: {e}"),
                    Some(Ok(m)) => m,
                };
                let (frame, bytes) = match &msg {
                    Message::Text(t) => (FrameKind::Text, t.as_bytes().to_vec()),
                    Message::Binary(b) => (FrameKind::Binary, b.to_vec()),
                    Message::Ping(p) => (FrameKind::Ping, p.to_vec()),
                    Message::Pong(p) => (FrameKind::Pong, p.to_vec()),
                    Message::Close(c) => {
                        seen2.lock().unwrap().push(Seen {
                            frame: FrameKind::Close,
                            type_name: None,
                            opcode: None,
                            len: 0,
                        });
                        break format!("close frame {c:?}");
                    }
                    Message::Frame(_) => continue,
                };
                if matches!(frame, FrameKind::Ping | FrameKind::Pong) {
                    seen2.lock().unwrap().push(Seen {
                        frame,
                        type_name: None,
                        opcode: None,
                        len: bytes.len(),
                    });
                    continue;
                }
                let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let env = Envelope {
                    frame,
                    raw: String::from_utf8_lossy(&bytes).into_owned(),
                    json,
                };
                let type_name = env.json["type"].as_str().map(str::to_string);
                let mut seen_entry = Seen {
                    frame,
                    type_name: type_name.clone(),
                    opcode: None,
                    len: bytes.len(),
                };
                let stream_id = env
                    .payload_str("stream_id")
                    .or_else(|| env.request_id())
                    .map(str::to_string);
                let event = match type_name.as_deref() {
                    Some("proxy_websocket_data") => {
                        let raw = env
                            .payload_str("data")
                            .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok());
                        match raw {
                            Some(raw) if !raw.is_empty() => {
                                seen_entry.opcode = Some(raw[0]);
                                Some(StreamEvent::Data(raw[0], raw[1..].to_vec()))
                            }
                            _ => None,
                        }
                    }
                    Some("proxy_websocket_started") => Some(StreamEvent::Started(
                        env.payload_str("protocol").map(str::to_string),
                    )),
                    Some("proxy_websocket_close") => Some(StreamEvent::Close(
                        env.json["payload"]["code"]
                            .as_u64()
                            .and_then(|c| u16::try_from(c).ok()),
                        env.payload_str("reason").map(str::to_string),
                    )),
                    _ => None,
                };
                seen2.lock().unwrap().push(seen_entry);
                let routed = match (&event, &stream_id) {
                    (Some(event), Some(id)) => {
                        let streams = streams2.lock().unwrap();
                        streams
                            .get(id)
                            .is_some_and(|tx| tx.send(event.clone()).is_ok())
                    }
                    _ => false,
                };
                if !routed && control_tx.send(env).is_err() {
                    break "control queue dropped".to_string();
                }
            };
            *closed2.lock().unwrap() = Some(why);
            // Wake every stream reader.
            streams2.lock().unwrap().clear();
        });
        Self {
            path,
            authorization,
            out,
            control,
            stash: Vec::new(),
            streams,
            seen,
            closed,
        }
    }

    /// Sends a raw text frame.
    pub fn send_text(&self, text: impl Into<String>) {
        let _ = self.out.send(Message::text(text.into()));
    }

    /// Sends a raw binary frame.
    pub fn send_binary(&self, bytes: Vec<u8>) {
        let _ = self.out.send(Message::Binary(Bytes::from(bytes)));
    }

    /// Sends `{"type","request_id","payload","timestamp"}` as a text frame.
    pub fn send_envelope(&self, type_name: &str, request_id: Option<&str>, payload: Value) {
        self.send_text(envelope(type_name, request_id, payload).to_string());
    }

    /// Why the connection ended, if it has.
    pub fn closed(&self) -> Option<String> {
        self.closed.lock().unwrap().clone()
    }

    /// Every frame recorded so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The next control message (anything not routed to a stream), within `timeout`.
    pub async fn recv_control(&mut self, timeout: Duration) -> Option<Envelope> {
        if !self.stash.is_empty() {
            return Some(self.stash.remove(0));
        }
        tokio::time::timeout(timeout, self.control.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits for the first control message matching `pred`; others are kept for later
    /// [`recv_control`](Self::recv_control) calls. Panics with what arrived meanwhile on timeout.
    pub async fn wait_control(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Envelope) -> bool,
    ) -> Envelope {
        if let Some(i) = self.stash.iter().position(&pred) {
            return self.stash.remove(i);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let got = tokio::time::timeout_at(deadline, self.control.recv()).await;
            match got {
                Ok(Some(env)) if pred(&env) => return env,
                Ok(Some(env)) => self.stash.push(env),
                Ok(None) | Err(_) => {
                    let others: Vec<String> = self
                        .stash
                        .iter()
                        .map(|e| crate::kubectl::clip(&e.raw).chars().take(300).collect())
                        .collect();
                    panic!(
                        "no {what} from the agent within {timeout:?} (connection: {}); other messages meanwhile: {others:#?}",
                        self.closed().unwrap_or_else(|| "open".into())
                    );
                }
            }
        }
    }

    /// Removes and returns the stashed control messages.
    pub fn take_stash(&mut self) -> Vec<Envelope> {
        std::mem::take(&mut self.stash)
    }

    /// Waits for the agent's `register` and answers `register_success` (cluster `c1`), with the
    /// Tether extensions advertised or not. Returns the `register` envelope.
    pub async fn register(&mut self, extensions: bool) -> Envelope {
        let reg = self
            .wait_control("register", Duration::from_secs(15), |e| {
                e.type_name() == "register"
            })
            .await;
        let mut payload = json!({
            "cluster_id": crate::cluster::CLUSTER,
            "cluster_uuid": "00000000-0000-4000-8000-0000000000c1",
            "name": crate::cluster::CLUSTER,
            "status": "registered",
        });
        if extensions {
            payload["extensions"] = json!({
                "websocket_started": true,
                "websocket_close_code": true,
                "proxy_error_status": true,
            });
        }
        self.send_envelope("register_success", reg.request_id(), payload);
        reg
    }

    /// Registers a stream id so its events are routed to the returned handle; call before
    /// sending the start.
    pub fn open_stream(&self, id: &str) -> ScriptedStream {
        let (tx, rx) = mpsc::unbounded_channel();
        self.streams.lock().unwrap().insert(id.to_string(), tx);
        ScriptedStream {
            tx: StreamSender {
                id: id.to_string(),
                out: self.out.clone(),
                short_names: false,
            },
            rx,
        }
    }

    /// `proxy_websocket_start` for an exec of `command` on pod `default/demo` with the v5 channel
    /// subprotocol (stdin, stdout and stderr on), carrying `headers`.
    pub fn start_exec(&self, id: &str, command: &[&str], headers: Value) {
        self.send_envelope(
            "proxy_websocket_start",
            Some(id),
            exec_start_payload(id, command, headers),
        );
    }
}

/// The payload of an exec start for pod `default/demo`.
pub fn exec_start_payload(id: &str, command: &[&str], headers: Value) -> Value {
    json!({
        "stream_id": id,
        "cluster_uuid": "00000000-0000-4000-8000-0000000000c1",
        "method": "GET",
        "path": format!("/api/v1/namespaces/default/pods/{}/exec", crate::cluster::POD),
        "query": exec_query(command),
        "headers": headers,
        "protocol": "v5.channel.k8s.io",
    })
}

/// `command=..&command=..&container=main&stderr=true&stdin=true&stdout=true` (URL-encoded).
pub fn exec_query(command: &[&str]) -> String {
    let mut q: Vec<String> = command
        .iter()
        .map(|c| format!("command={}", url_encode(c)))
        .collect();
    q.extend(
        ["container=main", "stderr=true", "stdin=true", "stdout=true"]
            .iter()
            .map(|s| s.to_string()),
    );
    q.join("&")
}

/// Percent-encodes everything but unreserved characters.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A PipeOps envelope.
pub fn envelope(type_name: &str, request_id: Option<&str>, payload: Value) -> Value {
    let mut v = json!({
        "type": type_name,
        "payload": payload,
        "timestamp": rfc3339_now(),
    });
    if let Some(id) = request_id {
        v["request_id"] = json!(id);
    }
    v
}

/// `proxy_websocket_data` text for stream `id`: base64 of `[opcode][payload]`.
pub fn data_envelope(type_name: &str, id: &str, opcode: u8, payload: &[u8]) -> String {
    let mut raw = Vec::with_capacity(payload.len() + 1);
    raw.push(opcode);
    raw.extend_from_slice(payload);
    envelope(
        type_name,
        Some(id),
        json!({
            "stream_id": id,
            "data": base64::engine::general_purpose::STANDARD.encode(&raw),
        }),
    )
    .to_string()
}

/// Sends on one stream of a scripted session (cloneable; see [`ScriptedStream::sender`]).
#[derive(Clone)]
pub struct StreamSender {
    id: String,
    out: mpsc::UnboundedSender<Message>,
    short_names: bool,
}

/// One stream of a scripted session: what the agent sends for it, and (through `Deref`) a
/// [`StreamSender`].
pub struct ScriptedStream {
    tx: StreamSender,
    rx: mpsc::UnboundedReceiver<StreamEvent>,
}

impl std::ops::Deref for ScriptedStream {
    type Target = StreamSender;
    fn deref(&self) -> &StreamSender {
        &self.tx
    }
}

/// What an exec stream produced, collected by [`ScriptedStream::collect`].
#[derive(Clone, Debug, Default)]
pub struct ExecOutput {
    /// `proxy_websocket_started` protocol, if any came.
    pub started: Option<Option<String>>,
    /// Channel 1.
    pub stdout: Vec<u8>,
    /// Channel 2.
    pub stderr: Vec<u8>,
    /// Channel 3 (the status JSON).
    pub status: Vec<u8>,
    /// Opcodes of the data messages received, in order (deduplicated runs).
    pub opcodes: Vec<u8>,
    /// The close, if it came: (code, reason) or a close data frame's code.
    pub close: Option<(Option<u16>, Option<String>)>,
}

impl ExecOutput {
    /// The exit code from the v5 status (0 for Success, the ExitCode cause otherwise).
    pub fn exit_code(&self) -> Option<i64> {
        let v: Value = serde_json::from_slice(&self.status).ok()?;
        match v["status"].as_str()? {
            "Success" => Some(0),
            _ => v["details"]["causes"]
                .as_array()?
                .iter()
                .find(|c| c["reason"] == "ExitCode")
                .and_then(|c| c["message"].as_str())
                .and_then(|m| m.parse().ok()),
        }
    }
}

impl StreamSender {
    /// The stream id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Sends one data message `[opcode][payload]`.
    pub fn send(&self, opcode: u8, payload: &[u8]) {
        let name = if self.short_names {
            "ws_data"
        } else {
            "proxy_websocket_data"
        };
        let _ = self.out.send(Message::text(data_envelope(
            name, &self.id, opcode, payload,
        )));
    }

    /// stdin bytes: a binary message `[0][bytes]`.
    pub fn stdin(&self, bytes: &[u8]) {
        let mut m = Vec::with_capacity(bytes.len() + 1);
        m.push(0);
        m.extend_from_slice(bytes);
        self.send(2, &m);
    }

    /// The v5 stdin close signal `[0xFF, 0]`.
    pub fn close_stdin(&self) {
        self.send(2, &[0xFF, 0]);
    }

    /// `proxy_websocket_close` (or `ws_close`) for this stream.
    pub fn close(&self, code: Option<u16>) {
        let name = if self.short_names {
            "ws_close"
        } else {
            "proxy_websocket_close"
        };
        let mut payload = json!({ "stream_id": self.id });
        if let Some(code) = code {
            payload["code"] = json!(code);
            payload["reason"] = json!("");
        }
        let _ = self.out.send(Message::text(
            envelope(name, Some(&self.id), payload).to_string(),
        ));
    }
}

impl ScriptedStream {
    /// A sender for this stream that can live in another task.
    pub fn sender(&self) -> StreamSender {
        self.tx.clone()
    }

    /// Use the short names `ws_data` / `ws_close` for what this handle sends.
    pub fn use_short_names(&mut self) {
        self.tx.short_names = true;
    }

    /// The next event, within `timeout` (None on timeout or when the session ended).
    pub async fn next(&mut self, timeout: Duration) -> Option<StreamEvent> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Collects channel data until the stream is closed (a `proxy_websocket_close` or a close
    /// data frame) or `timeout` passes; `on_stdout` sees stdout chunks as they come.
    pub async fn collect(
        &mut self,
        timeout: Duration,
        mut on_stdout: impl FnMut(&[u8]),
    ) -> ExecOutput {
        let mut out = ExecOutput::default();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ev = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) | Err(_) => return out,
            };
            match ev {
                StreamEvent::Started(p) => out.started = Some(p),
                StreamEvent::Close(code, reason) => {
                    out.close = Some((code, reason));
                    return out;
                }
                StreamEvent::Data(op, payload) => {
                    if out.opcodes.last() != Some(&op) {
                        out.opcodes.push(op);
                    }
                    if op == 8 {
                        let code = (payload.len() >= 2)
                            .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                        let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default())
                            .into_owned();
                        out.close = Some((code, Some(reason)));
                        // A close data frame may be followed by proxy_websocket_close; both end
                        // the stream for the caller.
                        return out;
                    }
                    let Some((&ch, data)) = payload.split_first() else {
                        continue;
                    };
                    match ch {
                        1 => {
                            on_stdout(data);
                            out.stdout.extend_from_slice(data);
                        }
                        2 => out.stderr.extend_from_slice(data),
                        3 => out.status.extend_from_slice(data),
                        _ => {}
                    }
                }
            }
        }
    }
}

/// An RFC 3339 UTC timestamp with nanoseconds (what the PipeOps agent writes).
pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        now.subsec_nanos()
    )
}
