//! `pods/{name}/portforward` over WebSocket: the pod side of `kubectl port-forward`.
//!
//! Two protocols are served on the same upgrade path:
//!
//! * **SPDY tunnel** (`SPDY/3.1+portforward.k8s.io`, what kubectl 1.32 uses): SPDY/3 frames
//!   as a byte stream inside WS binary messages ([`crate::spdy`]). Every local connection
//!   accepted by kubectl becomes an `error` + `data` stream pair sharing a `requestid`;
//!   the pair is forwarded to `127.0.0.1:<port>`.
//! * **Legacy channels** (`v4.channel.k8s.io`, `v4.base64.channel.k8s.io` or no
//!   subprotocol, with `?ports=P&ports=Q`; used by kube-rs and the Python/JS clients):
//!   port index `i` uses channel `2i` for data and `2i+1` for errors, each channel starts
//!   with the 2-byte little-endian port, and each port is dialled exactly once.
//!
//! "The pod" is this machine: every forward dials `127.0.0.1:<port>`.
//!
//! Buffering contract (both protocols): nothing is ever dropped. Each TCP connection has
//! its own writer with a bounded queue ([`CONN_QUEUE_FRAMES`] messages), so one slow
//! local socket does not stall the others until its queue is full; only then does the
//! session reader wait for it (there is no per-stream flow control in spdystream to
//! push back on one stream alone). TCP→client traffic goes through one bounded queue to
//! the WS writer that all connections share first-come first-served.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::spdy::{self, Decoder, Encoder, FLAG_FIN, Frame, Headers, goaway_status, rst_status};

/// `X-Stream-Protocol-Version` of kubectl's SPDY (fallback) port-forward.
pub const SPDY_STREAM_PROTOCOL: &str = "portforward.k8s.io";

/// Subprotocol of kubectl's tunnelled SPDY port-forward.
pub const SPDY_PORTFORWARD_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
/// Legacy binary channel subprotocol.
pub const V4_BINARY_PROTOCOL: &str = "v4.channel.k8s.io";
/// Legacy base64 (text frame) channel subprotocol.
pub const V4_BASE64_PROTOCOL: &str = "v4.base64.channel.k8s.io";

/// Messages a connection's writer may have queued before the session reader waits for it.
pub const CONN_QUEUE_FRAMES: usize = 64;
/// Messages queued towards the WebSocket writer (shared by all connections).
pub const OUT_QUEUE_FRAMES: usize = 64;
/// Largest chunk read from a target TCP socket into one DATA frame / channel message.
pub const READ_CHUNK: usize = 64 * 1024;
/// How long half of an `error`/`data` pair waits for its partner (kubelet default).
pub const STREAM_PAIR_TIMEOUT: Duration = Duration::from_secs(30);
/// Most ports one legacy request may forward: two channels each, channel ids are one byte.
pub const MAX_LEGACY_PORTS: usize = 128;
/// Bytes of DATA accepted on a data stream whose pair is not complete yet.
const EARLY_DATA_LIMIT: usize = 4 * 1024 * 1024;

/// The outcome of a successful [`negotiate`]: which protocol [`serve`] will speak.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    mode: Mode,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Mode {
    Spdy,
    Channel {
        ports: Vec<u16>,
        subprotocol: Option<&'static str>,
        base64: bool,
    },
}

impl Negotiated {
    /// The value for `Sec-WebSocket-Protocol` in the 101 response; `None` means the
    /// header must be omitted (legacy client that offered no subprotocol).
    pub fn subprotocol(&self) -> Option<&str> {
        match &self.mode {
            Mode::Spdy => Some(SPDY_PORTFORWARD_PROTOCOL),
            Mode::Channel { subprotocol, .. } => *subprotocol,
        }
    }

    /// True for the SPDY tunnel (kubectl), false for the legacy channel protocol.
    pub fn is_spdy(&self) -> bool {
        self.mode == Mode::Spdy
    }

    /// The legacy protocol's ports in channel order (empty for SPDY, whose ports travel
    /// in stream headers).
    pub fn ports(&self) -> &[u16] {
        match &self.mode {
            Mode::Spdy => &[],
            Mode::Channel { ports, .. } => ports,
        }
    }
}

/// Why a port-forward upgrade is refused: answer with [`Refusal::status`] and a
/// `metav1.Status` carrying [`Refusal::message`] instead of 101.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    status: u16,
    message: String,
}

impl Refusal {
    /// HTTP status the real API server (via the kubelet) answers: 400 for bad or missing
    /// ports, 403 for unsupported subprotocols.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Human-readable reason, worded like the kubelet's.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

impl std::error::Error for Refusal {}

/// Chooses the port-forward protocol for a WS upgrade.
///
/// `offered` are the client's `Sec-WebSocket-Protocol` values (comma-split; they are
/// trimmed again and empty ones skipped); `query` is the raw query string, if any.
///
/// * [`SPDY_PORTFORWARD_PROTOCOL`] among the offers selects the SPDY tunnel; the query is
///   ignored (kubectl sends none).
/// * Otherwise the first offered of [`V4_BINARY_PROTOCOL`] / [`V4_BASE64_PROTOCOL`], or no
///   offer at all, selects the legacy channel protocol, which needs ports: `ports=` (what
///   clients send to the API server) or `port=` (the kubelet's name), repeatable and
///   comma-separated, each 1..=65535, at most [`MAX_LEGACY_PORTS`]. Missing or bad ports
///   give 400.
/// * Any other offer gives 403 (the kubelet's WebSocket handshake refusal).
pub fn negotiate(offered: &[&str], query: Option<&str>) -> Result<Negotiated, Refusal> {
    let offered: Vec<&str> = offered
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect();
    if offered.contains(&SPDY_PORTFORWARD_PROTOCOL) {
        return Ok(Negotiated { mode: Mode::Spdy });
    }
    let ports = parse_ports(query.unwrap_or(""))?;
    let (subprotocol, base64) = if offered.is_empty() {
        (None, false)
    } else {
        let chosen = offered.iter().find_map(|p| match *p {
            V4_BINARY_PROTOCOL => Some((Some(V4_BINARY_PROTOCOL), false)),
            V4_BASE64_PROTOCOL => Some((Some(V4_BASE64_PROTOCOL), true)),
            _ => None,
        });
        chosen.ok_or_else(|| Refusal {
            status: 403,
            message: format!(
                "requested protocol(s) are not supported: {offered:?}; supports [\"{SPDY_PORTFORWARD_PROTOCOL}\" \"{V4_BINARY_PROTOCOL}\" \"{V4_BASE64_PROTOCOL}\" \"\"]"
            ),
        })?
    };
    Ok(Negotiated {
        mode: Mode::Channel {
            ports,
            subprotocol,
            base64,
        },
    })
}

fn bad_request(message: String) -> Refusal {
    Refusal {
        status: 400,
        message,
    }
}

fn parse_ports(query: &str) -> Result<Vec<u16>, Refusal> {
    let mut ports = Vec::new();
    let mut seen = false;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "ports" && key != "port" {
            continue;
        }
        seen = true;
        let value = percent_decode(value);
        if value.is_empty() {
            return Err(bad_request(
                "query parameter \"port\" cannot be empty".to_owned(),
            ));
        }
        for p in value.split(',') {
            let port: u16 = p.parse().map_err(|_| {
                bad_request(format!(
                    "unable to parse {value:?} as a port: invalid syntax"
                ))
            })?;
            if port == 0 {
                return Err(bad_request(format!("port {value:?} must be > 0")));
            }
            ports.push(port);
        }
    }
    if !seen {
        return Err(bad_request(
            "query parameter \"port\" is required".to_owned(),
        ));
    }
    if ports.len() > MAX_LEGACY_PORTS {
        return Err(bad_request(format!(
            "at most {MAX_LEGACY_PORTS} ports can be forwarded in one request"
        )));
    }
    Ok(ports)
}

/// Decodes `%XX` escapes (and `+` as space); invalid escapes are kept literally.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match (
                    char::from(b[i + 1]).to_digit(16),
                    char::from(b[i + 2]).to_digit(16),
                ) {
                    (Some(h), Some(l)) => {
                        out.push(u8::try_from(h * 16 + l).expect("two hex digits"));
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs one port-forward session on an upgraded WebSocket until it ends.
///
/// The 101 must already have been sent with [`Negotiated::subprotocol`]. The session
/// ends on a WS Close from the client, a SPDY GOAWAY, a transport error, a fatal
/// protocol error (SPDY: GOAWAY PROTOCOL_ERROR is sent first), or (legacy protocol) once
/// every port's target connection has ended. On the way out all target connections are
/// dropped, the session's WS Close is sent (code 1000; after a client Close, the echo of
/// the client's Close) and the transport is flushed and shut down.
pub async fn serve<S>(ws: WebSocketStream<S>, negotiated: Negotiated)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    let (out, out_rx) = mpsc::channel::<Message>(OUT_QUEUE_FRAMES);
    let writer = tokio::spawn(ws_writer(sink, out_rx));
    let (mut stream, peer_closed) = match negotiated.mode {
        Mode::Spdy => SpdySession::new(out.clone()).run(stream).await,
        Mode::Channel { ports, base64, .. } => {
            channel_session(stream, out.clone(), ports, base64).await
        }
    };
    if !peer_closed {
        let close = Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }));
        let _ = tokio::time::timeout(Duration::from_secs(5), out.send(close)).await;
    }
    // With every sender gone the writer closes the sink, which also flushes the echo
    // tungstenite queued for a peer's Close (a Close of our own would be refused then).
    drop(out);
    let sink = match tokio::time::timeout(Duration::from_secs(5), writer).await {
        Ok(Ok(sink)) => sink,
        _ => {
            tracing::warn!("portforward: WebSocket writer did not finish after Close");
            return;
        }
    };
    if !peer_closed {
        // Give the client a moment to answer our Close so the TCP close is clean.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(Ok(msg)) = stream.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    // tungstenite writes its last Close into the transport without flushing it; over TLS
    // that record would be lost on drop. Flush and shut the transport down (close_notify).
    if let Ok(mut ws) = sink.reunite(stream) {
        let io = ws.get_mut();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = io.flush().await;
            let _ = io.shutdown().await;
        })
        .await;
    }
}

/// Runs one port-forward session on a connection upgraded to SPDY/3.1 (kubectl's fallback,
/// `X-Stream-Protocol-Version: portforward.k8s.io`; the 101 is already sent): the same SPDY
/// session as the tunnelled one, on raw bytes. Ends as [`serve`] does, with GOAWAY, then the
/// connection is shut down.
pub async fn serve_spdy(io: crate::upgrade::Upgraded) {
    let (rd, wr) = tokio::io::split(io);
    let (out, out_rx) = mpsc::channel::<Message>(OUT_QUEUE_FRAMES);
    let writer = tokio::spawn(crate::session::raw_write_loop(wr, out_rx));
    let messages = futures_util::stream::unfold(Some(rd), |rd| async move {
        let mut rd = rd?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        match rd.read_buf(&mut buf).await {
            Ok(0) => None,
            Ok(_) => Some((Ok(Message::Binary(buf.freeze())), Some(rd))),
            Err(e) => Some((Err(e), None)),
        }
    });
    let _ = SpdySession::new(out.clone()).run(Box::pin(messages)).await;
    let goaway = spdy::encode_goaway(0, goaway_status::OK);
    let _ = out.send(Message::Binary(goaway.into())).await;
    let _ = out.send(Message::Close(None)).await;
    drop(out);
    if tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .is_err()
    {
        tracing::warn!("portforward: SPDY writer did not finish");
    }
}

type WsSink<S> = SplitSink<WebSocketStream<S>, Message>;
type WsStream<S> = SplitStream<WebSocketStream<S>>;

/// Sends queued messages in order, flushing when the queue runs dry; stops after a
/// Close message, a send error or when every sender is gone, and hands the sink back.
///
/// Callers must not queue a Close after the peer's Close was read: tungstenite has then
/// queued the echo of the peer's Close (the peer's code, 1000 for kubectl) and refuses
/// further frames; closing the sink at the end flushes that echo.
async fn ws_writer<S>(mut sink: WsSink<S>, mut rx: mpsc::Receiver<Message>) -> WsSink<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    'outer: while let Some(mut msg) = rx.recv().await {
        loop {
            if matches!(msg, Message::Close(_)) {
                if let Err(e) = sink.feed(msg).await {
                    tracing::debug!(
                        "portforward: Close not sent ({e}); flushing the close handshake"
                    );
                }
                break 'outer;
            }
            if let Err(e) = sink.feed(msg).await {
                tracing::debug!("portforward: WebSocket write failed: {e}");
                return sink;
            }
            match rx.try_recv() {
                Ok(next) => msg = next,
                Err(_) => break,
            }
        }
        if let Err(e) = sink.flush().await {
            tracing::debug!("portforward: WebSocket flush failed: {e}");
            return sink;
        }
    }
    // Flushes whatever is pending, including a queued Close or Close echo. For a server,
    // tungstenite reports the finished close handshake as an error: nothing to act on.
    let _ = sink.close().await;
    sink
}

// ---------------------------------------------------------------------------------------
// SPDY tunnel
// ---------------------------------------------------------------------------------------

/// Commands for a connection's TCP writer, in stream order.
#[derive(Debug)]
enum ToTarget {
    Data(Bytes),
    /// The client FINed the data stream: shut down the TCP write side.
    Shutdown,
}

/// One half-assembled `requestid` pair.
#[derive(Debug)]
struct PendingPair {
    error_id: Option<u32>,
    data_id: Option<u32>,
    port: u16,
    early: BytesMut,
    early_fin: bool,
    since: Instant,
}

/// A forwarded connection (complete pair).
#[derive(Debug)]
struct Conn {
    data_id: u32,
    error_id: u32,
    /// `None` once the client FINed the data stream or the target stopped accepting.
    to_target: Option<mpsc::Sender<ToTarget>>,
    task: AbortHandle,
}

#[derive(Clone, Debug)]
enum Slot {
    Pending(String),
    Active(u64),
}

struct SpdySession {
    out: mpsc::Sender<Message>,
    encoder: Encoder,
    last_stream_id: u32,
    pending: HashMap<String, PendingPair>,
    streams: HashMap<u32, Slot>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    done_tx: mpsc::UnboundedSender<u64>,
    done_rx: mpsc::UnboundedReceiver<u64>,
}

enum Flow {
    Continue,
    End,
}

impl SpdySession {
    fn new(out: mpsc::Sender<Message>) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            out,
            encoder: Encoder::new(),
            last_stream_id: 0,
            pending: HashMap::new(),
            streams: HashMap::new(),
            conns: HashMap::new(),
            next_conn: 0,
            done_tx,
            done_rx,
        }
    }

    /// Reads the tunnel until it ends; returns the read half and whether the peer closed
    /// the WebSocket (so no Close answer needs awaiting).
    async fn run<St, E>(mut self, mut stream: St) -> (St, bool)
    where
        St: futures_util::Stream<Item = Result<Message, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut decoder = Decoder::new();
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let peer_closed = 'session: loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(Ok(Message::Binary(bytes))) => {
                        decoder.push(&bytes);
                        loop {
                            match decoder.next_frame() {
                                Ok(Some(frame)) => {
                                    if let Flow::End = self.handle(frame).await {
                                        break 'session false;
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    tracing::warn!("portforward: bad SPDY frame, ending session: {e}");
                                    let goaway = spdy::encode_goaway(self.last_stream_id, goaway_status::PROTOCOL_ERROR);
                                    let _ = self.out.send(Message::Binary(goaway.into())).await;
                                    break 'session false;
                                }
                            }
                        }
                    }
                    Some(Ok(Message::Text(_))) => {
                        tracing::warn!("portforward: text message in a SPDY tunnel, ending session");
                        break 'session false;
                    }
                    Some(Ok(Message::Close(_))) => break 'session true,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::debug!("portforward: WebSocket read failed: {e}");
                        break 'session true;
                    }
                    None => break 'session true,
                },
                Some(id) = self.done_rx.recv() => self.forget_conn(id),
                _ = sweep.tick(), if !self.pending.is_empty() => self.expire_pending().await,
            }
        };
        for conn in self.conns.values() {
            conn.task.abort();
        }
        (stream, peer_closed)
    }

    async fn send(&self, bytes: Vec<u8>) {
        // Fails only once the writer is gone, i.e. the session is over anyway.
        let _ = self.out.send(Message::Binary(bytes.into())).await;
    }

    async fn reset(&self, stream_id: u32, status: u32) {
        self.send(spdy::encode_rst_stream(stream_id, status)).await;
    }

    async fn handle(&mut self, frame: Frame) -> Flow {
        match frame {
            Frame::SynStream {
                stream_id,
                flags,
                headers,
                ..
            } => self.syn_stream(stream_id, flags, &headers).await,
            Frame::Data {
                stream_id,
                flags,
                data,
            } => self.data(stream_id, flags & FLAG_FIN != 0, data).await,
            Frame::RstStream { stream_id, status } => {
                tracing::debug!("portforward: client reset stream {stream_id} ({status})");
                self.client_reset(stream_id);
            }
            Frame::Ping { id } => {
                if !id.is_multiple_of(2) {
                    self.send(spdy::encode_ping(id)).await;
                }
            }
            Frame::GoAway { .. } => return Flow::End,
            Frame::SynReply { .. }
            | Frame::Settings { .. }
            | Frame::Headers { .. }
            | Frame::WindowUpdate { .. }
            | Frame::Unknown { .. } => {}
        }
        Flow::Continue
    }

    async fn syn_stream(&mut self, stream_id: u32, flags: u8, headers: &Headers) {
        if stream_id.is_multiple_of(2) || stream_id <= self.last_stream_id {
            tracing::warn!("portforward: invalid client stream id {stream_id}");
            self.reset(stream_id, rst_status::PROTOCOL_ERROR).await;
            return;
        }
        self.last_stream_id = stream_id;
        let Some((is_data, port, request_id)) = stream_params(stream_id, headers) else {
            tracing::warn!("portforward: refusing stream {stream_id} with headers {headers:?}");
            self.reset(stream_id, rst_status::REFUSED_STREAM).await;
            return;
        };
        let pair = self
            .pending
            .entry(request_id.clone())
            .or_insert_with(|| PendingPair {
                error_id: None,
                data_id: None,
                port,
                early: BytesMut::new(),
                early_fin: false,
                since: Instant::now(),
            });
        let role = if is_data {
            &mut pair.data_id
        } else {
            &mut pair.error_id
        };
        if role.is_some() {
            tracing::warn!("portforward: duplicate stream for request {request_id}");
            self.reset(stream_id, rst_status::PROTOCOL_ERROR).await;
            return;
        }
        *role = Some(stream_id);
        if is_data {
            // The data stream's port is the one forwarded (as in the kubelet).
            pair.port = port;
            pair.early_fin |= flags & FLAG_FIN != 0;
        }
        let complete = pair.error_id.is_some() && pair.data_id.is_some();
        self.streams
            .insert(stream_id, Slot::Pending(request_id.clone()));
        // Reply before anything else can be written on this stream.
        match self.encoder.syn_reply(stream_id) {
            Ok(bytes) => self.send(bytes).await,
            Err(e) => tracing::error!("portforward: cannot encode SYN_REPLY: {e}"),
        }
        if complete {
            let pair = self.pending.remove(&request_id).expect("present");
            self.start_conn(pair);
        }
    }

    fn start_conn(&mut self, pair: PendingPair) {
        let (Some(data_id), Some(error_id)) = (pair.data_id, pair.error_id) else {
            unreachable!("start_conn needs a complete pair")
        };
        let id = self.next_conn;
        self.next_conn += 1;
        let (tx, rx) = mpsc::channel(CONN_QUEUE_FRAMES);
        // The queue is fresh, so these cannot fail for lack of room.
        if !pair.early.is_empty() {
            let _ = tx.try_send(ToTarget::Data(pair.early.freeze()));
        }
        let to_target = if pair.early_fin {
            let _ = tx.try_send(ToTarget::Shutdown);
            None
        } else {
            Some(tx)
        };
        let task = tokio::spawn(forward_spdy_conn(
            pair.port,
            data_id,
            error_id,
            rx,
            self.out.clone(),
            self.done_tx.clone(),
            id,
        ));
        tracing::debug!(
            "portforward: connection {id} (streams {error_id}/{data_id}) -> 127.0.0.1:{}",
            pair.port
        );
        self.streams.insert(data_id, Slot::Active(id));
        self.streams.insert(error_id, Slot::Active(id));
        self.conns.insert(
            id,
            Conn {
                data_id,
                error_id,
                to_target,
                task: task.abort_handle(),
            },
        );
    }

    async fn data(&mut self, stream_id: u32, fin: bool, data: Bytes) {
        match self.streams.get(&stream_id).cloned() {
            Some(Slot::Active(id)) => {
                let Some(conn) = self.conns.get_mut(&id) else {
                    return;
                };
                if conn.data_id != stream_id {
                    return; // The error stream is write-only for us; the client only FINs it.
                }
                let Some(tx) = conn.to_target.clone() else {
                    return;
                };
                let mut open = true;
                if !data.is_empty() {
                    // Backpressure: waits only when this connection's queue is full.
                    open = tx.send(ToTarget::Data(data)).await.is_ok();
                }
                if fin && open {
                    let _ = tx.send(ToTarget::Shutdown).await;
                }
                if (fin || !open)
                    && let Some(conn) = self.conns.get_mut(&id)
                {
                    conn.to_target = None;
                }
            }
            Some(Slot::Pending(request_id)) => {
                let Some(pair) = self.pending.get_mut(&request_id) else {
                    return;
                };
                if pair.data_id != Some(stream_id) {
                    return;
                }
                if pair.early.len() + data.len() > EARLY_DATA_LIMIT {
                    tracing::warn!(
                        "portforward: too much data before stream pair {request_id} completed"
                    );
                    self.drop_pending(&request_id).await;
                    return;
                }
                pair.early.extend_from_slice(&data);
                pair.early_fin |= fin;
            }
            None => tracing::debug!("portforward: DATA for unknown stream {stream_id} ignored"),
        }
    }

    fn client_reset(&mut self, stream_id: u32) {
        match self.streams.get(&stream_id).cloned() {
            Some(Slot::Active(id)) => {
                if let Some(conn) = self.conns.get(&id) {
                    conn.task.abort();
                }
                self.forget_conn(id);
            }
            Some(Slot::Pending(request_id)) => {
                if let Some(pair) = self.pending.remove(&request_id) {
                    for id in [pair.data_id, pair.error_id].into_iter().flatten() {
                        self.streams.remove(&id);
                    }
                }
            }
            None => {}
        }
    }

    fn forget_conn(&mut self, id: u64) {
        if let Some(conn) = self.conns.remove(&id) {
            self.streams.remove(&conn.data_id);
            self.streams.remove(&conn.error_id);
        }
    }

    async fn drop_pending(&mut self, request_id: &str) {
        if let Some(pair) = self.pending.remove(request_id) {
            for id in [pair.error_id, pair.data_id].into_iter().flatten() {
                self.streams.remove(&id);
                self.reset(id, rst_status::CANCEL).await;
            }
        }
    }

    async fn expire_pending(&mut self) {
        let expired: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.since.elapsed() >= STREAM_PAIR_TIMEOUT)
            .map(|(k, _)| k.clone())
            .collect();
        for request_id in expired {
            tracing::warn!(
                "portforward: timed out waiting for the stream pair of request {request_id}"
            );
            self.drop_pending(&request_id).await;
        }
    }
}

/// `(is_data, port, requestid)` from a SYN_STREAM, or `None` if the kubelet would refuse
/// it. A missing `requestid` is derived from the stream id like the kubelet does.
fn stream_params(stream_id: u32, headers: &Headers) -> Option<(bool, u16, String)> {
    let is_data = match headers.get("streamtype")? {
        "data" => true,
        "error" => false,
        _ => return None,
    };
    let port: u16 = headers.get("port")?.parse().ok().filter(|p| *p != 0)?;
    let request_id = match headers.get("requestid") {
        Some(r) if !r.is_empty() => r.to_owned(),
        _ if is_data => i64::from(stream_id).saturating_sub(2).to_string(),
        _ => stream_id.to_string(),
    };
    Some((is_data, port, request_id))
}

/// Go-style text for a dial error, as the kubelet writes it on the error stream.
fn dial_error_text(port: u16, e: &std::io::Error) -> String {
    let why = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect: connection refused".to_owned(),
        _ => e.to_string(),
    };
    format!("error forwarding port {port} to pod: dial tcp4 127.0.0.1:{port}: {why}")
}

fn data_message(stream_id: u32, flags: u8, payload: &[u8]) -> Message {
    let mut buf = Vec::with_capacity(8 + payload.len());
    spdy::encode_data(stream_id, flags, payload, &mut buf).expect("payload within 24-bit length");
    Message::Binary(buf.into())
}

/// One forwarded connection: dial, then pump both ways until the target's EOF has been
/// reported (DATA FIN on both streams) and the client's side has ended (data FIN or the
/// queue closing). Reports `id` on `done` when finished.
async fn forward_spdy_conn(
    port: u16,
    data_id: u32,
    error_id: u32,
    rx: mpsc::Receiver<ToTarget>,
    out: mpsc::Sender<Message>,
    done: mpsc::UnboundedSender<u64>,
    id: u64,
) {
    match TcpStream::connect(("127.0.0.1", port)).await {
        Err(e) => {
            let text = dial_error_text(port, &e);
            tracing::debug!("portforward: {text}");
            let _ = out.send(data_message(error_id, 0, text.as_bytes())).await;
            let _ = out.send(data_message(error_id, FLAG_FIN, b"")).await;
            let _ = out.send(data_message(data_id, FLAG_FIN, b"")).await;
        }
        Ok(tcp) => {
            let _ = tcp.set_nodelay(true);
            let (rd, wr) = tcp.into_split();
            let to_client = async {
                pump_target_to_spdy(rd, data_id, &out).await;
                // Target EOF (or error): half-close the data stream, end the error stream.
                let _ = out.send(data_message(data_id, FLAG_FIN, b"")).await;
                let _ = out.send(data_message(error_id, FLAG_FIN, b"")).await;
            };
            tokio::join!(to_client, write_to_target(wr, rx));
        }
    }
    let _ = done.send(id);
}

async fn pump_target_to_spdy(mut rd: OwnedReadHalf, data_id: u32, out: &mpsc::Sender<Message>) {
    loop {
        // Read straight behind a reserved DATA header: one allocation, no copy.
        let mut buf = vec![0u8; 8 + READ_CHUNK];
        let n = match rd.read(&mut buf[8..]).await {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("portforward: target read failed: {e}");
                return;
            }
        };
        buf.truncate(8 + n);
        let mut head = Vec::with_capacity(8);
        spdy::write_data_header(data_id, 0, n, &mut head).expect("chunk within 24-bit length");
        buf[..8].copy_from_slice(&head);
        if out.send(Message::Binary(buf.into())).await.is_err() {
            return;
        }
    }
}

/// Writes queued client bytes to the target; `Shutdown` half-closes it. Ends on
/// shutdown, write error, or when the session drops the queue.
async fn write_to_target(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<ToTarget>) {
    while let Some(cmd) = rx.recv().await {
        match cmd {
            ToTarget::Data(bytes) => {
                if let Err(e) = wr.write_all(&bytes).await {
                    tracing::debug!("portforward: target write failed: {e}");
                    return;
                }
            }
            ToTarget::Shutdown => {
                let _ = wr.shutdown().await;
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Legacy v4 channel protocol
// ---------------------------------------------------------------------------------------

fn channel_message(base64: bool, channel: u8, payload: &[u8]) -> Message {
    if base64 {
        let mut text = String::with_capacity(1 + payload.len().div_ceil(3) * 4);
        text.push(char::from(b'0' + channel));
        BASE64.encode_string(payload, &mut text);
        Message::Text(text.into())
    } else {
        let mut buf = Vec::with_capacity(1 + payload.len());
        buf.push(channel);
        buf.extend_from_slice(payload);
        Message::Binary(buf.into())
    }
}

/// Splits a client message into `(channel, payload)`; `None` for empty or undecodable.
fn parse_channel_message(base64: bool, msg: Message) -> Option<(u8, Bytes)> {
    match (base64, msg) {
        (false, Message::Binary(b)) if !b.is_empty() => Some((b[0], b.slice(1..))),
        (true, Message::Text(t)) if !t.is_empty() => {
            let channel = t.as_bytes()[0].checked_sub(b'0')?;
            BASE64
                .decode(&t.as_bytes()[1..])
                .ok()
                .map(|d| (channel, Bytes::from(d)))
        }
        _ => None,
    }
}

async fn channel_session<S>(
    mut stream: WsStream<S>,
    out: mpsc::Sender<Message>,
    ports: Vec<u16>,
    base64: bool,
) -> (WsStream<S>, bool)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Every channel opens with the port, little-endian (data channel first, as wsstream).
    for (i, port) in ports.iter().enumerate() {
        let data_ch = u8::try_from(2 * i).expect("at most MAX_LEGACY_PORTS ports");
        for ch in [data_ch, data_ch + 1] {
            let _ = out
                .send(channel_message(base64, ch, &port.to_le_bytes()))
                .await;
        }
    }
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<usize>();
    let mut senders = Vec::with_capacity(ports.len());
    let mut tasks = Vec::with_capacity(ports.len());
    for (i, port) in ports.iter().copied().enumerate() {
        let (tx, rx) = mpsc::channel(CONN_QUEUE_FRAMES);
        senders.push(Some(tx));
        let (out, done) = (out.clone(), done_tx.clone());
        let data_ch = u8::try_from(2 * i).expect("at most MAX_LEGACY_PORTS ports");
        tasks.push(tokio::spawn(async move {
            forward_channel_port(port, data_ch, base64, rx, out).await;
            let _ = done.send(i);
        }));
    }
    let mut remaining = ports.len();
    let peer_closed = loop {
        if remaining == 0 {
            break false;
        }
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Close(_))) | None => break true,
                Some(Err(e)) => {
                    tracing::debug!("portforward: WebSocket read failed: {e}");
                    break true;
                }
                Some(Ok(msg)) => {
                    let Some((ch, payload)) = parse_channel_message(base64, msg) else { continue };
                    let index = usize::from(ch / 2);
                    if !ch.is_multiple_of(2) || payload.is_empty() {
                        continue; // Error channels are server->client only.
                    }
                    if let Some(slot) = senders.get_mut(index)
                        && let Some(tx) = slot
                        && tx.send(ToTarget::Data(payload)).await.is_err()
                    {
                        *slot = None;
                    }
                }
            },
            Some(_) = done_rx.recv() => remaining -= 1,
        }
    };
    for task in &tasks {
        task.abort();
    }
    (stream, peer_closed)
}

/// Dials one legacy port and pumps it until the target's EOF (there is no half-close in
/// this protocol); a dial error is reported as text on the port's error channel.
async fn forward_channel_port(
    port: u16,
    data_ch: u8,
    base64: bool,
    rx: mpsc::Receiver<ToTarget>,
    out: mpsc::Sender<Message>,
) {
    let tcp = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(tcp) => tcp,
        Err(e) => {
            let text = dial_error_text(port, &e);
            let _ = out
                .send(channel_message(base64, data_ch + 1, text.as_bytes()))
                .await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let (mut rd, wr) = tcp.into_split();
    let writer = tokio::spawn(write_to_target(wr, rx));
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if out
                    .send(channel_message(base64, data_ch, &buf[..n]))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Err(e) => {
                tracing::debug!("portforward: target read failed: {e}");
                break;
            }
        }
    }
    writer.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiate_prefers_spdy_tunnel() {
        let n = negotiate(
            &["v4.channel.k8s.io", " SPDY/3.1+portforward.k8s.io "],
            None,
        )
        .unwrap();
        assert!(n.is_spdy());
        assert_eq!(n.subprotocol(), Some(SPDY_PORTFORWARD_PROTOCOL));
        assert!(n.ports().is_empty());
    }

    #[test]
    fn negotiate_legacy_variants() {
        let n = negotiate(&["v4.channel.k8s.io"], Some("ports=8080&ports=9090")).unwrap();
        assert!(!n.is_spdy());
        assert_eq!(n.subprotocol(), Some(V4_BINARY_PROTOCOL));
        assert_eq!(n.ports(), &[8080, 9090]);
        let n = negotiate(
            &["x.k8s.io", "v4.base64.channel.k8s.io", "v4.channel.k8s.io"],
            Some("ports=1%2C2"),
        )
        .unwrap();
        assert_eq!(n.subprotocol(), Some(V4_BASE64_PROTOCOL));
        assert_eq!(n.ports(), &[1, 2]);
        let n = negotiate(&[], Some("port=80,81&timeout=3")).unwrap();
        assert_eq!(n.subprotocol(), None);
        assert_eq!(n.ports(), &[80, 81]);
        let n = negotiate(&[""], Some("ports=65535")).unwrap();
        assert_eq!(n.subprotocol(), None);
        assert_eq!(n.ports(), &[65535]);
    }

    #[test]
    fn negotiate_refusals() {
        let many_ports = format!("ports={}", vec!["80"; 129].join(","));
        let cases: &[(&[&str], Option<&str>, u16, &str)] = &[
            (&["v4.channel.k8s.io"], None, 400, "is required"),
            (
                &["v4.channel.k8s.io"],
                Some("container=x"),
                400,
                "is required",
            ),
            (
                &["v4.channel.k8s.io"],
                Some("ports="),
                400,
                "cannot be empty",
            ),
            (
                &["v4.channel.k8s.io"],
                Some("ports=http"),
                400,
                "unable to parse",
            ),
            (
                &["v4.channel.k8s.io"],
                Some("ports=65536"),
                400,
                "unable to parse",
            ),
            (&["v4.channel.k8s.io"], Some("ports=0"), 400, "must be > 0"),
            (
                &["v5.channel.k8s.io"],
                Some("ports=80"),
                403,
                "not supported",
            ),
            (
                &["SPDY/3.1+exec.k8s.io"],
                Some("ports=80"),
                403,
                "not supported",
            ),
            (&[], Some(&many_ports), 400, "at most 128 ports"),
        ];
        for (offered, query, status, text) in cases {
            let r = negotiate(offered, *query).unwrap_err();
            assert_eq!(r.status(), *status, "{offered:?} {query:?}: {r}");
            assert!(r.message().contains(text), "{offered:?} {query:?}: {r}");
        }
    }

    #[test]
    fn stream_params_like_the_kubelet() {
        let h = |pairs: &[(&str, &str)]| {
            Headers(
                pairs
                    .iter()
                    .map(|(a, b)| ((*a).into(), (*b).into()))
                    .collect(),
            )
        };
        assert_eq!(
            stream_params(
                1,
                &h(&[("streamtype", "error"), ("port", "80"), ("requestid", "7")])
            ),
            Some((false, 80, "7".into()))
        );
        assert_eq!(
            stream_params(3, &h(&[("streamType", "data"), ("Port", "80")])),
            Some((true, 80, "1".into()))
        );
        assert_eq!(
            stream_params(1, &h(&[("streamtype", "error"), ("port", "80")])),
            Some((false, 80, "1".into()))
        );
        assert_eq!(
            stream_params(1, &h(&[("streamtype", "stdin"), ("port", "80")])),
            None
        );
        assert_eq!(
            stream_params(1, &h(&[("streamtype", "data"), ("port", "0")])),
            None
        );
        assert_eq!(stream_params(1, &h(&[("streamtype", "data")])), None);
    }

    #[test]
    fn channel_messages_round_trip() {
        assert_eq!(
            channel_message(false, 1, &[0x50, 0x1f]),
            Message::Binary(vec![1, 0x50, 0x1f].into())
        );
        assert_eq!(
            channel_message(true, 1, &[0x50, 0x1f]),
            Message::Text("1UB8=".into())
        );
        let back = parse_channel_message(true, channel_message(true, 2, b"hello")).unwrap();
        assert_eq!(back, (2, Bytes::from_static(b"hello")));
        let back = parse_channel_message(false, channel_message(false, 0, b"hi")).unwrap();
        assert_eq!(back, (0, Bytes::from_static(b"hi")));
        assert_eq!(
            parse_channel_message(false, Message::Binary(Bytes::new())),
            None
        );
        assert_eq!(
            parse_channel_message(true, Message::Text("0!!".into())),
            None
        );
    }
}
