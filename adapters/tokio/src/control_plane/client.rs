//! kubectl's side: `/clusters/<cluster>/<kube path>` requests, authenticated with a user token and
//! handed to the cluster's tunnel task as a WebSocket stream or an HTTP request.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tether_core::relay::{Close, Message, MessageKind};
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use super::access::{self, Identity};
use super::driver::{Port, Refused, StreamGuard};
use super::link::{OpenRequest, OpenStream, ToClient};
use super::metrics::Metrics;
use super::status::status_response;
use super::{Body, State};
use crate::agent::metrics::{StreamKind, StreamLife};
use crate::buf::Buf;

/// Largest request body forwarded (the tunnel's message limit, less base64 growth).
const MAX_BODY: usize = 12 << 20;
/// How long to wait for the client's answer to our close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Whether header `name` lists `token` (comma lists and repeated headers, ASCII case ignored).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Whether `headers` ask for a WebSocket upgrade (`Connection: upgrade` and `Upgrade: websocket`).
pub(crate) fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    has_token(headers, header::CONNECTION, "upgrade")
        && has_token(headers, header::UPGRADE, "websocket")
}

/// The `Upgrade` token of a raw (non-WebSocket) HTTP/1.1 upgrade, such as kubectl's `SPDY/3.1`:
/// `Connection: upgrade` and an `Upgrade` that does not name WebSocket.
pub(crate) fn raw_upgrade_token(headers: &HeaderMap) -> Option<String> {
    let token = headers.get(header::UPGRADE)?.to_str().ok()?.trim();
    let raw = has_token(headers, header::CONNECTION, "upgrade")
        && !token.is_empty()
        && !has_token(headers, header::UPGRADE, "websocket");
    raw.then(|| token.to_string())
}

/// The offered `X-Stream-Protocol-Version`s, comma separated, in order.
fn stream_protocols(headers: &HeaderMap) -> String {
    headers
        .get_all(STREAM_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Offers (request) and names (101) the protocol of a raw upgrade.
const STREAM_PROTOCOL: &str = "x-stream-protocol-version";

/// Serves one kubectl request for `cluster` at `kube_path`.
pub(crate) async fn handle(
    state: Arc<State>,
    mut req: Request<Incoming>,
    cluster: &str,
    kube_path: String,
    from_peer: Option<String>,
) -> Response<Body> {
    let Identity { user, groups } = match access::user(&state, req.headers(), cluster).await {
        Ok(identity) => identity,
        Err(refused) => return refused,
    };
    if let Some(fleet) = state.fleet.clone()
        && from_peer.is_none()
        && !state.tunnels.holds(cluster)
    {
        // Another replica may hold the tunnel: it applies the limits and answers.
        match fleet.owner(cluster).await {
            Ok(Some(owner)) => {
                return super::peer::forward(state, &fleet, owner, cluster, req).await;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(cluster, error = %e, "cannot read the fleet registry");
                return status_response(
                    503,
                    &format!(
                        "no agent of cluster \"{cluster}\" is connected to this replica, and the fleet registry cannot be read to find another; try again"
                    ),
                );
            }
        }
    }
    if let Some(peer) = &from_peer {
        tracing::debug!(cluster, user, peer, "request from a peer replica");
    }
    let slot = match state.user_limits.acquire(cluster, &user) {
        Ok(slot) => slot,
        Err(limit) => {
            state.metrics.refused.fetch_add(1, Ordering::Relaxed);
            tracing::info!(cluster, user, limit, "stream refused: per-user limit");
            return status_response(
                429,
                &format!(
                    "user \"{user}\" already has {limit} streams and requests open on cluster \"{cluster}\": the per-user limit (--max-streams-per-user); close some or try again later"
                ),
            );
        }
    };
    let Some(driver) = state.tunnels.get(cluster) else {
        state.metrics.refused.fetch_add(1, Ordering::Relaxed);
        tracing::info!(cluster, user, "no agent connected");
        return status_response(
            502,
            &format!("no agent is connected for cluster \"{cluster}\""),
        );
    };
    let id = format!("cp-{}", state.next_id.fetch_add(1, Ordering::Relaxed));
    let query = req.uri().query().unwrap_or_default().to_string();
    let headers: Vec<(Vec<u8>, Vec<u8>)> = req
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    let websocket_upgrade = is_websocket_upgrade(req.headers());
    let raw_upgrade = raw_upgrade_token(req.headers());
    let kind = if websocket_upgrade || raw_upgrade.is_some() {
        StreamKind::WebSocket
    } else {
        StreamKind::Http
    };
    // Live (`tether_streams_active`, and against the user's limit) until the client task ends.
    let life = Live {
        _life: state.metrics.stream_life(kind),
        _slot: slot,
    };

    if let Some(token) = raw_upgrade {
        let method = req.method().clone();
        let on_upgrade = hyper::upgrade::on(&mut req);
        let open = OpenStream {
            id: id.clone(),
            path: kube_path,
            query,
            protocols: stream_protocols(req.headers()),
            headers: headers
                .into_iter()
                .filter(|(n, _)| !n.eq_ignore_ascii_case(STREAM_PROTOCOL.as_bytes()))
                .collect(),
            upgrade: Some((method.as_str().to_string(), token.clone())),
            user,
            groups,
        };
        let stream = match driver.open_stream(open) {
            Ok(port) => ClientStream::new(port, life),
            Err(refused) => return refuse(&state.metrics, refused),
        };
        return raw(stream, &state.metrics, token, method, on_upgrade).await;
    }
    if websocket_upgrade {
        let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return status_response(400, "WebSocket upgrade without Sec-WebSocket-Key");
        };
        let protocols = req
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        let on_upgrade = hyper::upgrade::on(&mut req);
        let open = OpenStream {
            id: id.clone(),
            path: kube_path,
            query,
            headers,
            protocols,
            upgrade: None,
            user,
            groups,
        };
        let stream = match driver.open_stream(open) {
            Ok(port) => ClientStream::new(port, life),
            Err(refused) => return refuse(&state.metrics, refused),
        };
        websocket(stream, &state.metrics, key, on_upgrade).await
    } else {
        let method = req.method().clone();
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                return status_response(413, &format!("request body refused: {e}"));
            }
        };
        let open = OpenRequest {
            id: id.clone(),
            method: method.as_str().to_string(),
            path: kube_path,
            query,
            headers,
            user,
            groups,
            body,
        };
        let stream = match driver.open_request(open) {
            Ok(port) => ClientStream::new(port, life),
            Err(refused) => return refuse(&state.metrics, refused),
        };
        request(stream, &state.metrics, method).await
    }
}

/// The answer to a stream the tunnel's gateway would not open.
fn refuse(metrics: &Metrics, refused: Refused) -> Response<Body> {
    metrics.stream_failed(refused.status);
    status_response(refused.status, &refused.message)
}

/// One client stream the tunnel opened: the guard whose port carries it (and frees it when
/// dropped), and its `tether_streams_active` count.
struct ClientStream {
    guard: StreamGuard,
    life: Live,
}

impl ClientStream {
    fn new(port: Port, life: Live) -> Self {
        Self {
            guard: StreamGuard { port, close: None },
            life,
        }
    }

    fn port(&self) -> &Port {
        &self.guard.port
    }
}

/// What a client stream holds while it lives: its `tether_streams_active` count (its duration is
/// observed when dropped) and its slot under the user's limit.
#[derive(Debug)]
struct Live {
    _life: StreamLife,
    _slot: super::limits::UserSlot,
}

/// Waits for the agent's answer to a WebSocket start: 101 (then relays messages) or its status.
async fn websocket(
    stream: ClientStream,
    metrics: &Metrics,
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
) -> Response<Body> {
    let subprotocol = match stream.port().recv().await {
        Some(ToClient::Started { subprotocol }) => subprotocol,
        Some(ToClient::Failed { status, message }) => {
            metrics.stream_failed(status);
            return status_response(status, &message);
        }
        _ => return status_response(502, "the agent tunnel went away"),
    };
    let ClientStream { guard, life } = stream;
    let mut response = Response::new(super::status::full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    match HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        Ok(accept) => h.insert(header::SEC_WEBSOCKET_ACCEPT, accept),
        Err(_) => return status_response(500, "cannot compute Sec-WebSocket-Accept"),
    };
    if !subprotocol.is_empty() {
        match HeaderValue::from_str(&subprotocol) {
            Ok(v) => h.insert(header::SEC_WEBSOCKET_PROTOCOL, v),
            Err(_) => return status_response(502, "the agent reported an invalid subprotocol"),
        };
    }
    tokio::spawn(async move {
        let _life = life;
        match on_upgrade.await {
            Ok(upgraded) => {
                let config = WebSocketConfig::default()
                    .read_buffer_size(crate::socket::STREAM_READ_BUFFER)
                    .max_message_size(Some(16 << 20))
                    .max_frame_size(Some(16 << 20));
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                relay_websocket(ws, guard).await;
            }
            Err(e) => {
                tracing::warn!(stream = %guard.port.id(), error = %e, "client upgrade failed")
            }
        }
    });
    response
}

/// Moves messages between the client WebSocket and the tunnel task until either side ends.
async fn relay_websocket<S>(ws: WebSocketStream<S>, mut guard: StreamGuard)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let port = &guard.port;
    // Client -> agent. Returns the client's close, `None` when it went away without one.
    let reader = async move {
        while let Some(message) = stream.next().await {
            let (kind, payload) = match message {
                Ok(WsMessage::Text(text)) => (MessageKind::Text, Bytes::from(text)),
                Ok(WsMessage::Binary(bytes)) => (MessageKind::Binary, bytes),
                Ok(WsMessage::Close(frame)) => {
                    return Some(frame.map_or_else(
                        || Close::new(1000, ""),
                        |f| Close::new(f.code.into(), &f.reason),
                    ));
                }
                // Pings are answered by the WebSocket layer while we read.
                Ok(_) => continue,
                Err(_) => return None,
            };
            port.send(Message {
                kind,
                payload: Buf(payload),
            })
            .await;
        }
        None
    };
    // Agent -> client. Returns when the agent side ended (a close was sent to the client).
    let writer = async {
        while let Some(item) = port.recv().await {
            match item {
                ToClient::Data(message) => {
                    let ws_message = match message.kind {
                        MessageKind::Binary => WsMessage::Binary(message.payload.0),
                        MessageKind::Text => match String::from_utf8(message.payload.0.to_vec()) {
                            Ok(text) => WsMessage::text(text),
                            Err(e) => {
                                WsMessage::text(String::from_utf8_lossy(e.as_bytes()).into_owned())
                            }
                        },
                    };
                    if sink.send(ws_message).await.is_err() {
                        return;
                    }
                }
                ToClient::Closed(close) => {
                    let _ = sink.send(WsMessage::Close(close_frame(&close))).await;
                    return;
                }
                _ => {}
            }
        }
        // The tunnel went away without a close for us: never let that look like success.
        let frame = CloseFrame {
            code: CloseCode::Error,
            reason: "the agent tunnel went away".into(),
        };
        let _ = sink.send(WsMessage::Close(Some(frame))).await;
    };
    let mut reader = std::pin::pin!(reader);
    let mut writer = std::pin::pin!(writer);
    let close = tokio::select! {
        close = &mut reader => Some(close.unwrap_or_else(|| Close::new(1001, "client went away"))),
        () = &mut writer => {
            // Let the client answer our close; its answer (or silence) ends the stream.
            let _ = tokio::time::timeout(CLOSE_GRACE, &mut reader).await;
            None
        }
    };
    guard.close = close;
}

/// The close frame that tells the client `close`: the upstream's own code when it may travel on the
/// wire; 1005 ("no status") as a close frame without a code, as the upstream sent it; codes that
/// must never be sent (1006 abnormal closure, 1015 TLS failure, out of range) as 1011 with the
/// reason, so the client never mistakes a broken stream for success.
fn close_frame(close: &Close) -> Option<CloseFrame> {
    let code = match close.code {
        1005 => return None,
        c @ (1000..=1003 | 1007..=1014 | 3000..=4999) => c,
        _ => 1011,
    };
    Some(CloseFrame {
        code: CloseCode::from(code),
        reason: close.reason.as_str().into(),
    })
}

/// Waits for the agent's answer to a raw upgrade: the upstream's 101 (answered with `Upgrade:
/// token`, `Connection: Upgrade` and the chosen `X-Stream-Protocol-Version`; then bytes move both
/// ways), its refusal status, or (an agent that cannot carry upgrades) a plain response.
async fn raw(
    stream: ClientStream,
    metrics: &Metrics,
    token: String,
    method: Method,
    on_upgrade: hyper::upgrade::OnUpgrade,
) -> Response<Body> {
    let subprotocol = match stream.port().recv().await {
        Some(ToClient::Started { subprotocol }) => subprotocol,
        Some(ToClient::Failed { status, message }) => {
            metrics.stream_failed(status);
            return status_response(status, &message);
        }
        Some(ToClient::Head {
            status,
            headers,
            gzip,
        }) => {
            return head_response(stream, method, status, headers, gzip);
        }
        _ => return status_response(502, "the agent tunnel went away"),
    };
    let ClientStream { guard, life } = stream;
    let mut response = Response::new(super::status::full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    let Ok(upgrade) = HeaderValue::from_str(&token) else {
        return status_response(400, "invalid Upgrade header");
    };
    h.insert(header::UPGRADE, upgrade);
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if !subprotocol.is_empty() {
        match HeaderValue::from_str(&subprotocol) {
            Ok(v) => h.insert(STREAM_PROTOCOL, v),
            Err(_) => return status_response(502, "the agent reported an invalid stream protocol"),
        };
    }
    tokio::spawn(async move {
        let _life = life;
        match on_upgrade.await {
            Ok(upgraded) => relay_raw(TokioIo::new(upgraded), guard).await,
            Err(e) => {
                tracing::warn!(stream = %guard.port.id(), error = %e, "client upgrade failed")
            }
        }
    });
    response
}

/// Moves the bytes of a raw upgrade between the client and the tunnel task until either side
/// ends. The client ending its connection closes the stream with 1000; the agent's close ends
/// the client's connection once every byte before it was written (an abnormal close is logged:
/// a byte pipe cannot tell the client why).
async fn relay_raw<S>(io: S, mut guard: StreamGuard)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let port = &guard.port;
    let id = port.id();
    // Client -> agent. Returns the client's end: 1000 at end of stream, `None` on an error.
    let reader = async move {
        loop {
            let payload = match crate::byte_pipe::read_chunk(&mut rd).await {
                Ok(Some(payload)) => payload,
                Ok(None) => return Some(Close::new(1000, "")),
                Err(_) => return None,
            };
            port.send(Message {
                kind: MessageKind::Binary,
                payload: Buf(payload),
            })
            .await;
        }
    };
    // Agent -> client. Returns when the agent side ended (the client's write half is shut).
    let writer = async {
        while let Some(item) = port.recv().await {
            match item {
                ToClient::Data(message)
                    if crate::byte_pipe::write_chunk(&mut wr, &message.payload.0)
                        .await
                        .is_err() =>
                {
                    return;
                }
                ToClient::Closed(close) => {
                    if close.code != 1000 {
                        tracing::warn!(stream = %id, code = close.code, reason = %close.reason.as_str(), "upgraded stream ended abnormally");
                    }
                    let _ = wr.shutdown().await;
                    return;
                }
                _ => {}
            }
        }
        tracing::warn!(stream = %id, "the agent tunnel went away; ending the upgraded connection");
        let _ = wr.shutdown().await;
    };
    let mut reader = std::pin::pin!(reader);
    let mut writer = std::pin::pin!(writer);
    let close = tokio::select! {
        close = &mut reader => Some(close.unwrap_or_else(|| Close::new(1001, "client went away"))),
        () = &mut writer => {
            // The client ends its side after ours; its end (or silence) ends the stream.
            let _ = tokio::time::timeout(CLOSE_GRACE, &mut reader).await;
            None
        }
    };
    guard.close = close;
}

/// Waits for the agent's response head, then streams the body (chunked) to the client.
async fn request(stream: ClientStream, metrics: &Metrics, method: Method) -> Response<Body> {
    let (status, headers, gzip) = match stream.port().recv().await {
        Some(ToClient::Head {
            status,
            headers,
            gzip,
        }) => (status, headers, gzip),
        Some(ToClient::Failed { status, message }) => {
            metrics.stream_failed(status);
            return status_response(status, &message);
        }
        _ => return status_response(502, "the agent tunnel went away"),
    };
    head_response(stream, method, status, headers, gzip)
}

/// The response to a request whose head arrived: status and headers now, the body streamed.
fn head_response(
    stream: ClientStream,
    method: Method,
    status: u16,
    headers: Vec<(http::HeaderName, HeaderValue)>,
    gzip: bool,
) -> Response<Body> {
    let ClientStream { guard, life } = stream;
    let Ok(status) = StatusCode::from_u16(status) else {
        return status_response(502, "the agent reported an invalid status");
    };
    let body = ResponseStream {
        guard,
        _life: life,
        done: false,
    };
    let body = if method == Method::HEAD {
        super::status::full(Bytes::new())
    } else {
        StreamBody::new(body).boxed_unsync()
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    for (name, value) in headers {
        h.append(name, value);
    }
    if gzip && !h.contains_key(header::CONTENT_ENCODING) {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

/// A response body popped from the stream's ring as hyper takes it; ends the stream (cancels the
/// request) when dropped early.
struct ResponseStream {
    guard: StreamGuard,
    /// The request counts as live until its body is done with.
    _life: Live,
    done: bool,
}

impl futures_util::Stream for ResponseStream {
    type Item = Result<Frame<Bytes>, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            return match self.guard.port.poll_recv(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(ToClient::Data(message))) => {
                    if message.payload.0.is_empty() {
                        continue;
                    }
                    Poll::Ready(Some(Ok(Frame::data(message.payload.0))))
                }
                Poll::Ready(Some(ToClient::End)) => {
                    self.done = true;
                    Poll::Ready(None)
                }
                Poll::Ready(Some(ToClient::Abort(message))) => {
                    self.done = true;
                    Poll::Ready(Some(Err(io::Error::other(message))))
                }
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) => {
                    self.done = true;
                    Poll::Ready(Some(Err(io::Error::other("the agent tunnel went away"))))
                }
            };
        }
    }
}
