//! One task per relayed stream: dials the Kubernetes API (a WebSocket, a raw upgrade such as
//! SPDY/3.1 through [`raw_upgrade`](super::raw_upgrade), or an allowed TCP target) and moves
//! messages between its socket and the relay's rings through its [`Port`]. No protocol decisions
//! here: the relay says (through the port) when a message must wait, what to write and when to
//! close.

use std::sync::Arc;
use std::time::Duration;

use std::future::Future;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use tether_core::relay::{MessageKind, RawUpgrade};
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use super::driver::Port;
use super::raw_upgrade::{self, Upgraded};
use crate::kube::{KubeStream, KubeTarget, headers};

/// How long the upstream may take to answer the WebSocket upgrade.
pub(crate) const DIAL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to wait for the upstream's close reply after sending ours.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What to dial, owned (copied out of the tunnel message).
#[derive(Debug, Clone)]
pub(crate) struct StreamSpec {
    pub(crate) id: String,
    /// Validated Kubernetes API path.
    pub(crate) path: String,
    /// Validated raw query (may be empty).
    pub(crate) query: String,
    /// Headers already filtered by [`headers::forward_request_headers`].
    pub(crate) headers: Vec<(String, String)>,
    /// Subprotocols to offer, in order (for a raw upgrade: `X-Stream-Protocol-Version`s).
    pub(crate) protocols: Vec<String>,
    /// Dial this raw upgrade instead of a WebSocket.
    pub(crate) raw: Option<RawUpgrade>,
    /// Dial this TCP target (an allowed `tcp_tunnel_start`) instead of the Kubernetes API.
    pub(crate) tcp: Option<(String, u16)>,
}

/// A dialled upstream.
enum Upstream {
    WebSocket(Box<WebSocketStream<KubeStream>>),
    Raw(Upgraded),
    Tcp(tokio::net::TcpStream),
}

/// What a stream task's writing half does next, in order (see [`Port::recv`]).
#[derive(Debug)]
pub(crate) enum ToUpstream {
    /// Write this whole message.
    Message(MessageKind, Bytes),
    /// Close with this code and reason, wait for the reply, report `closed`.
    Close(u16, String),
}

/// Dials, then relays until either side closes. Every outcome is reported through `port`.
pub(crate) async fn run(target: Arc<KubeTarget>, spec: StreamSpec, port: Port, max_message: usize) {
    let dialled = async {
        match (&spec.tcp, &spec.raw) {
            (Some((host, port)), _) => tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map(|tcp| {
                    let _ = tcp.set_nodelay(true);
                    (Upstream::Tcp(tcp), None)
                })
                .map_err(|e| (502, format!("cannot connect to {host}:{port}: {e}"))),
            (None, Some(upgrade)) => raw_upgrade::dial(&target, &spec, upgrade)
                .await
                .map(|(io, p)| (Upstream::Raw(io), p)),
            (None, None) => dial(&target, &spec, max_message)
                .await
                .map(|(ws, p)| (Upstream::WebSocket(Box::new(ws)), p)),
        }
    };
    let upstream = match tokio::time::timeout(DIAL_TIMEOUT, dialled).await {
        Ok(Ok((upstream, subprotocol))) => {
            port.started(subprotocol.as_deref());
            upstream
        }
        Ok(Err((status, message))) => {
            port.failed(status, &message);
            return;
        }
        Err(_) => {
            let message = format!("upstream dial timed out after {}s", DIAL_TIMEOUT.as_secs());
            port.failed(504, &message);
            return;
        }
    };
    let (code, reason) = match upstream {
        Upstream::WebSocket(ws) => relay(*ws, &port).await,
        Upstream::Raw(io) => relay_raw(io, &port).await,
        Upstream::Tcp(tcp) => relay_raw(tcp, &port).await,
    };
    port.closed(code, &reason);
}

/// How the writing half ended.
enum WriterEnd {
    /// Our close frame went out: wait for the upstream's reply.
    SentClose(u16, String),
    /// The session is gone (a close 1001 was sent).
    SessionGone,
    /// Writing failed or the stream had to end: report this.
    Failed(u16, String),
}

/// Moves messages until the stream ends; returns the close code and reason to report.
///
/// Reading and writing run concurrently: a writer blocked on a slow upstream never stops the
/// reader (an upstream that echoes, like `cat`, would otherwise deadlock once both TCP directions
/// are full).
async fn relay(ws: WebSocketStream<KubeStream>, port: &Port) -> (u16, String) {
    let (mut sink, mut source) = ws.split();
    let outcome = {
        let writer = async {
            while let Some(command) = port.recv().await {
                match command {
                    ToUpstream::Message(kind, payload) => {
                        let message = match kind {
                            MessageKind::Binary => Message::Binary(payload),
                            MessageKind::Text => match Utf8Bytes::try_from(payload) {
                                Ok(text) => Message::Text(text),
                                Err(_) => {
                                    // Cannot be sent as a WebSocket text message: end the stream
                                    // rather than alter or drop the bytes.
                                    let reason = "text message is not UTF-8".to_string();
                                    let _ = sink.send(close_message(1007, &reason)).await;
                                    return WriterEnd::Failed(1007, reason);
                                }
                            },
                        };
                        if let Err(e) = sink.send(message).await {
                            return WriterEnd::Failed(1011, format!("upstream write failed: {e}"));
                        }
                    }
                    ToUpstream::Close(code, reason) => {
                        let _ = sink.send(close_message(code, &reason)).await;
                        return WriterEnd::SentClose(code, reason);
                    }
                }
            }
            let _ = sink.send(close_message(1001, "agent session ended")).await;
            WriterEnd::SessionGone
        };
        let reader = async {
            loop {
                let kind = match source.next().await {
                    Some(Ok(Message::Text(text))) => (MessageKind::Text, Bytes::from(text)),
                    Some(Ok(Message::Binary(payload))) => (MessageKind::Binary, payload),
                    // Pings are answered by tungstenite; nothing to relay.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(frame))) => {
                        return frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    }
                    Some(Err(e)) => return Some(read_error(&e)),
                    None => return Some((1011, "upstream connection lost".into())),
                };
                if port.send(kind.0, kind.1).await.is_err() {
                    return Some((1001, "agent session ended".into()));
                }
            }
        };
        settle(writer, reader).await
    };
    // Push out a close reply tungstenite may have queued.
    let _ = sink.flush().await;
    outcome
}

/// Moves bytes of a raw upgrade (or a TCP tunnel) until it ends; returns the close code and reason to report: 1000
/// when the upstream ended the connection, our own close when we ended it, 1011 on an error.
/// Each read becomes one binary message; each message is written whole and flushed.
async fn relay_raw<S>(io: S, port: &Port) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let writer = async {
        while let Some(command) = port.recv().await {
            match command {
                ToUpstream::Message(_, payload) => {
                    if let Err(e) = crate::byte_pipe::write_chunk(&mut wr, &payload).await {
                        return WriterEnd::Failed(1011, format!("upstream write failed: {e}"));
                    }
                }
                ToUpstream::Close(code, reason) => {
                    let _ = wr.shutdown().await;
                    return WriterEnd::SentClose(code, reason);
                }
            }
        }
        let _ = wr.shutdown().await;
        WriterEnd::SessionGone
    };
    let reader = async {
        loop {
            let payload = match crate::byte_pipe::read_chunk(&mut rd).await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => return None,
                Err(e) => return Some((1011, format!("upstream read failed: {e}"))),
            };
            if port.send(MessageKind::Binary, payload).await.is_err() {
                return Some((1001, "agent session ended".into()));
            }
        }
    };
    settle(writer, reader).await
}

/// Runs a stream's writing and reading halves to the end; returns the close to report.
///
/// `reader` yields the upstream's close (`None`: ended without a code). After the writer sent our
/// close the upstream gets [`CLOSE_WAIT`] to answer before our own close is reported.
async fn settle(
    writer: impl Future<Output = WriterEnd>,
    reader: impl Future<Output = Option<(u16, String)>>,
) -> (u16, String) {
    tokio::pin!(writer, reader);
    let mut sent: Option<(u16, String)> = None;
    let close_wait = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(close_wait);
    loop {
        tokio::select! {
            end = &mut writer, if sent.is_none() => match end {
                WriterEnd::SentClose(code, reason) => {
                    close_wait.as_mut().reset(tokio::time::Instant::now() + CLOSE_WAIT);
                    sent = Some((code, reason));
                }
                WriterEnd::SessionGone => break (1001, "agent session ended".to_string()),
                WriterEnd::Failed(code, reason) => break (code, reason),
            },
            got = &mut reader => {
                // A close from the upstream wins; without a code (or after an error while
                // closing) report our own close, else a normal close (1005 may not travel).
                break match (got, sent) {
                    (Some(c), None) => c,
                    (Some(c), Some(_)) if c.0 < 1005 || c.0 > 1006 => c,
                    (_, Some(ours)) => ours,
                    (None, None) => (1000, String::new()),
                };
            }
            () = &mut close_wait, if sent.is_some() => {
                break sent.take().unwrap_or((1001, String::new()));
            }
        }
    }
}

fn read_error(e: &WsError) -> (u16, String) {
    match e {
        WsError::Capacity(_) => (1009, "upstream message too large".into()),
        other => (1011, format!("upstream read failed: {other}")),
    }
}

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

/// Dials the upstream WebSocket; on refusal returns its HTTP status and a message (502 when there
/// was no HTTP answer).
async fn dial(
    target: &KubeTarget,
    spec: &StreamSpec,
    max_message: usize,
) -> Result<(WebSocketStream<KubeStream>, Option<String>), (u16, String)> {
    let mut url = format!("{}{}", target.ws_base_url(), spec.path);
    if !spec.query.is_empty() {
        url.push('?');
        url.push_str(&spec.query);
    }
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| (400, format!("invalid upstream request: {e}")))?;
    let mut forwarded = spec.headers.clone();
    headers::with_authorization(&mut forwarded, target.own_token().as_deref());
    for (name, value) in &forwarded {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| (400, format!("invalid header name {name:?}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| (400, format!("invalid value for header {name}")))?;
        request.headers_mut().append(name, value);
    }
    if !spec.protocols.is_empty() {
        let offered = HeaderValue::from_str(&spec.protocols.join(", "))
            .map_err(|_| (400, "invalid subprotocol list".to_string()))?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", offered);
    }
    let stream = target
        .connect()
        .await
        .map_err(|e| (502, format!("cannot reach the Kubernetes API: {e}")))?;
    let config = WebSocketConfig::default()
        .read_buffer_size(crate::socket::STREAM_READ_BUFFER)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
        Ok((ws, response)) => {
            let subprotocol = response
                .headers()
                .get("Sec-WebSocket-Protocol")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            Ok((ws, subprotocol))
        }
        Err(WsError::Http(response)) => {
            let status = response.status();
            let body = response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).trim().to_string())
                .filter(|b| !b.is_empty());
            let message =
                body.unwrap_or_else(|| status.canonical_reason().unwrap_or("refused").to_string());
            Err((status.as_u16(), message))
        }
        Err(e) => Err((502, format!("WebSocket upgrade failed: {e}"))),
    }
}
