//! One task per agent tunnel: owns the tunnel WebSocket and the [`Gateway`] state machine, and
//! serves the client tasks of that cluster over channels. No protocol logic lives here: every
//! decision comes from the gateway's events.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use http::{HeaderName, HeaderValue};
use tether_core::gateway::{
    Config, Event, Gateway, Handled, HttpRequest, OpenError, Stats, StreamRequest, TcpOpen,
    TunnelError,
};
use tether_core::relay::{Message, SendError, Transmit, TransmitError};
use tether_core::time::Instant as CoreInstant;
use tether_core::wire::UnixTime;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

use super::State;
use super::link::{CLIENT_WINDOW, Cmd, Link, OpenRequest, OpenStream, OpenTcp, ToClient};
use crate::agent::metrics::RingSampler;
use crate::buf::Buf;
use crate::wire_mode::WireMode;

/// Streams and requests one tunnel carries at once. The gateway's table and rings live on the heap
/// and grow with use (tether-core's `alloc` feature), so the capacity costs nothing until used.
pub(crate) const MAX_STREAMS: usize = 16_384;

/// The gateway of one tunnel.
pub(crate) type Gw = Gateway<Buf, MAX_STREAMS>;

/// Most commands, or tunnel frames, taken in one turn of the tunnel task before it writes again.
const INPUT_BATCH: usize = 64;

/// Starting size of a tunnel's encode and scratch buffers.
const IDLE_BUFFER: usize = 4 * 1024;

/// Tunnel messages queued for the writer task. Kept short: a message queued here is past the
/// gateway's scheduler, so every queued bulk message delays an interactive one behind it.
const WRITE_QUEUE: usize = 4;

/// Response headers never passed to the client: hop-by-hop, and framing the control plane redoes.
const DROPPED_RESPONSE_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "keep-alive",
    "proxy-authenticate",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The HTTP status a client gets when its stream could not even be opened.
fn open_error_status(e: &OpenError) -> u16 {
    match e {
        OpenError::NotRegistered => 502,
        OpenError::TooManyStreams => 503,
        OpenError::Request(_) | OpenError::Method | OpenError::TcpTarget => 400,
        OpenError::UpgradeUnsupported => 501,
        OpenError::TooLarge { .. } | OpenError::PayloadRefused { .. } => 413,
        OpenError::DuplicateStream | OpenError::StreamId(_) | OpenError::Encode(_) => 500,
    }
}

struct LinkState {
    link: Link,
    /// Client messages the gateway refused as full, in order; bounded by the client's credits.
    stash: VecDeque<Message<Buf>>,
    /// The gateway has data for this client but its window was full.
    wants_pop: bool,
    /// The client ended (with this close) while messages were still stashed: the close is handed
    /// to the gateway once the stash drained, so nothing read before it is lost.
    closing: Option<Option<tether_core::relay::Close>>,
}

impl LinkState {
    /// A client just admitted by the gateway: nothing stashed, nothing owed.
    fn new(link: Link) -> Self {
        Self {
            link,
            stash: VecDeque::new(),
            wants_pop: false,
            closing: None,
        }
    }
}

/// Tells a client the gateway refused to open it, with the HTTP status that refusal maps to.
fn refuse(link: &Link, e: &OpenError) {
    let _ = link.tx.send(ToClient::Failed {
        status: open_error_status(e),
        message: e.to_string(),
    });
}

struct Tunnel {
    gw: Box<Gw>,
    cluster: String,
    generation: u64,
    state: Arc<State>,
    links: HashMap<String, LinkState>,
    out: mpsc::Sender<WsMessage>,
    pending_out: Option<WsMessage>,
    /// A tunnel message the gateway refused as `Blocked`, to hand in again on resume.
    pending_in: Option<Vec<u8>>,
    paused: bool,
    registered: bool,
    dead: bool,
    lost: bool,
    base: tokio::time::Instant,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    /// Streams of this tunnel counted in the `streams_active` gauge.
    counted_streams: i64,
    buf: Vec<u8>,
    scratch: Vec<u8>,
    last_stats: Stats,
    /// When the ring gauges were last sampled (a walk over every stream).
    rings: RingSampler,
}

/// Serves one authenticated agent tunnel until it ends. `cmd_tx`/`cmd_rx` is the tunnel's command
/// channel (the tunnel table gets `cmd_tx` once the agent registers).
pub(crate) async fn run<S>(
    ws: WebSocketStream<S>,
    cluster: String,
    generation: u64,
    state: Arc<State>,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    mut cmd_rx: mpsc::UnboundedReceiver<Cmd>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let base = tokio::time::Instant::now();
    let Some(gw) = new_gateway(&cluster, state.wire_mode) else {
        tracing::error!(cluster = %cluster, "cannot allocate the tunnel state");
        return;
    };
    let (sink, mut stream) = ws.split();
    let (out, out_rx) = mpsc::channel(WRITE_QUEUE);
    let writer = tokio::spawn(write_loop(sink, out_rx));
    let mut t = Tunnel {
        gw,
        cluster,
        generation,
        state,
        links: HashMap::new(),
        out,
        pending_out: None,
        pending_in: None,
        paused: false,
        registered: false,
        dead: false,
        lost: false,
        base,
        cmd_tx,
        counted_streams: 0,
        // Both grow to what a message needs (`BufferTooSmall` / `ScratchTooSmall`): an idle
        // tunnel, the common case in a fleet, keeps them small.
        buf: vec![0; IDLE_BUFFER],
        scratch: vec![0; IDLE_BUFFER],
        last_stats: Stats::default(),
        rings: RingSampler::default(),
    };
    tracing::info!(cluster = %t.cluster, "agent tunnel connected");
    loop {
        t.drive();
        if t.dead {
            break;
        }
        let deadline =
            t.gw.poll_timeout()
                .map(|at| t.base + Duration::from_micros(at.as_micros()));
        let out = t.out.clone();
        tokio::select! {
            permit = out.reserve(), if t.pending_out.is_some() => {
                match (permit, t.pending_out.take()) {
                    (Ok(permit), Some(message)) => permit.send(message),
                    _ => t.dead = true,
                }
            }
            cmd = cmd_rx.recv() => {
                // Take every queued command at once: in the gateway's rings messages are
                // scheduled (interactive first); in this channel they are first come, first served.
                let mut next = cmd;
                let mut taken = 0;
                while let Some(cmd) = next {
                    t.handle_cmd(cmd);
                    taken += 1;
                    next = if taken < INPUT_BATCH { cmd_rx.try_recv().ok() } else { None };
                }
                if taken == 0 {
                    t.dead = true;
                }
            }
            message = stream.next(), if !t.paused => {
                // Likewise read every frame already received, so the socket's receive buffer
                // does not become a first-come queue in front of the scheduler.
                t.on_message(message);
                let mut taken = 1;
                while taken < INPUT_BATCH && !t.paused && !t.dead {
                    let Some(message) = stream.next().now_or_never() else {
                        break;
                    };
                    t.on_message(message);
                    taken += 1;
                }
            }
            () = sleep_until(deadline), if deadline.is_some() => {
                let now = t.now();
                t.gw.handle_timeout(now);
            }
        }
    }
    t.lose("the agent's tunnel closed");
    t.drive_metrics();
    t.state.metrics.tunnel_ended(t.generation);
    t.state
        .metrics
        .streams_active
        .fetch_sub(t.counted_streams, Ordering::Relaxed);
    if t.registered {
        t.state.tunnels.remove(&t.cluster, t.generation);
        if let Some(fleet) = t.state.fleet.clone()
            && !t.state.tunnels.holds(&t.cluster)
        {
            let cluster = t.cluster.clone();
            fleet.release(&cluster);
            tokio::spawn(async move { fleet.tunnel_down(&cluster).await });
        }
        t.state
            .metrics
            .agents_connected
            .fetch_sub(1, Ordering::Relaxed);
    }
    tracing::info!(cluster = %t.cluster, "agent tunnel ended");
    drop(t);
    let _ = writer.await;
}

/// The gateway of a new tunnel, offering the native wire mode per `wire_mode`.
fn new_gateway(cluster: &str, wire_mode: WireMode) -> Option<Box<Gw>> {
    let defaults = Config::default();
    let config = Config {
        extensions: wire_mode.apply(defaults.extensions),
        ..defaults
    };
    Some(Box::new(Gw::new(config, cluster, CoreInstant::ZERO)))
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn write_loop<S>(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, WsMessage>,
    mut rx: mpsc::Receiver<WsMessage>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(message) = rx.recv().await {
        if sink.feed(message).await.is_err() {
            return;
        }
        while let Ok(message) = rx.try_recv() {
            if sink.feed(message).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}

impl Tunnel {
    /// Acts on one item read from the agent's tunnel (`None`: the connection ended).
    fn on_message(&mut self, message: Option<Result<WsMessage, WsError>>) {
        match message {
            Some(Ok(WsMessage::Text(text))) => self.handle_frame(text.as_bytes().to_vec()),
            Some(Ok(WsMessage::Binary(bytes)))
                if self.gw.is_native() && tether_core::wire::native::is_data(&bytes) =>
            {
                let now = self.now();
                match self.gw.handle_native_data(now, Buf(bytes.clone())) {
                    Ok(()) => {}
                    // Only when the reply queue is full: the usual path parks it and pauses.
                    Err(TunnelError::Blocked) => self.handle_frame(bytes.to_vec()),
                    Err(e) => self.state.metrics.tunnel_error(&e),
                }
            }
            Some(Ok(WsMessage::Binary(bytes))) => self.handle_frame(bytes.to_vec()),
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {
                let now = self.now();
                self.gw.handle_tunnel_activity(now);
            }
            Some(Ok(WsMessage::Close(frame))) => {
                tracing::info!(cluster = %self.cluster, ?frame, "agent closed the tunnel");
                self.dead = true;
            }
            Some(Ok(WsMessage::Frame(_))) => {}
            Some(Err(e)) => {
                tracing::warn!(cluster = %self.cluster, error = %e, "agent tunnel failed");
                self.state.metrics.tunnel_failed();
                self.dead = true;
            }
            None => self.dead = true,
        }
    }

    fn now(&self) -> CoreInstant {
        CoreInstant::from_micros(u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX))
    }

    fn unix() -> UnixTime {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        UnixTime::new(since.as_secs(), since.subsec_nanos())
    }

    /// Runs the gateway's outputs until nothing moves.
    fn drive(&mut self) {
        loop {
            let mut progressed = false;
            if self.pending_out.is_none() {
                let now = self.now();
                match self
                    .gw
                    .poll_transmit_owned(now, Self::unix(), &mut self.buf)
                {
                    Ok(Some(Transmit::Data { header, payload })) => {
                        self.pending_out = Some(WsMessage::Binary(Buf::frame(&header, &payload)));
                        progressed = true;
                    }
                    Ok(Some(Transmit::Encoded(n))) => {
                        let bytes = &self.buf[..n];
                        let text = (!tether_core::wire::native::is_native(bytes))
                            .then(|| std::str::from_utf8(bytes).ok())
                            .flatten();
                        self.pending_out = Some(match text {
                            Some(text) => WsMessage::text(text),
                            None => WsMessage::binary(bytes.to_vec()),
                        });
                        progressed = true;
                    }
                    Ok(None) => {}
                    Err(TransmitError::BufferTooSmall { needed }) => {
                        self.buf.resize(needed, 0);
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(cluster = %self.cluster, error = %e, "cannot encode a tunnel message");
                        self.dead = true;
                        return;
                    }
                }
            }
            if let Some(message) = self.pending_out.take() {
                match self.out.try_send(message) {
                    Ok(()) => progressed = true,
                    Err(mpsc::error::TrySendError::Full(message)) => {
                        self.pending_out = Some(message);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        self.dead = true;
                        return;
                    }
                }
            }
            while let Some(event) = self.gw.poll_event() {
                self.handle_event(event);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        self.drive_metrics();
    }

    /// Adds this tunnel's counter growth to the process metrics.
    fn drive_metrics(&mut self) {
        let stats = self.gw.stats();
        self.state.metrics.add(&self.last_stats, &stats);
        self.last_stats = stats;
        let count = i64::try_from(self.gw.stream_count()).unwrap_or(i64::MAX);
        self.state
            .metrics
            .streams_active
            .fetch_add(count - self.counted_streams, Ordering::Relaxed);
        self.counted_streams = count;
        let (cluster, gw) = (&self.cluster, &self.gw);
        let m = &self.state.metrics;
        let rings = self.rings.due();
        m.observe_tunnel(
            self.generation,
            cluster,
            self.registered,
            self.paused,
            gw,
            rings,
        );
    }

    fn handle_event(&mut self, event: Event) {
        match event {
            Event::Registered {
                agent_id,
                extensions,
            } => {
                tracing::info!(
                    cluster = %self.cluster,
                    agent_id = %agent_id,
                    wire = if extensions.native { "native" } else { "compat" },
                    ?extensions,
                    "agent registered"
                );
                if !self.registered {
                    self.registered = true;
                    self.state
                        .metrics
                        .agents_connected
                        .fetch_add(1, Ordering::Relaxed);
                    self.state
                        .tunnels
                        .insert(&self.cluster, self.generation, self.cmd_tx.clone());
                    if let Some(fleet) = self.state.fleet.clone() {
                        let cluster = self.cluster.clone();
                        fleet.hold(&cluster);
                        tokio::spawn(async move { fleet.tunnel_up(&cluster).await });
                    }
                }
            }
            Event::AgentDraining => {
                tracing::info!(
                    cluster = %self.cluster,
                    "agent draining: new streams go to the cluster's other tunnels"
                );
                self.state
                    .tunnels
                    .set_draining(&self.cluster, self.generation);
            }
            Event::SendPing => {
                let _ = self.out.try_send(WsMessage::Ping(Default::default()));
            }
            Event::TunnelDead => {
                tracing::warn!(cluster = %self.cluster, "agent tunnel silent past the read deadline");
                self.state.metrics.tunnel_failed();
                self.dead = true;
            }
            Event::PauseTunnelReads => self.paused = true,
            Event::ResumeTunnelReads => {
                self.paused = false;
                if let Some(frame) = self.pending_in.take() {
                    self.handle_frame(frame);
                }
            }
            Event::Started {
                stream,
                subprotocol,
            } => self.send(
                stream.as_str(),
                ToClient::Started {
                    subprotocol: subprotocol.as_str().to_string(),
                },
                false,
            ),
            Event::Failed {
                stream,
                status,
                message,
            } => self.send(
                stream.as_str(),
                ToClient::Failed {
                    status,
                    message: message.as_str().to_string(),
                },
                true,
            ),
            Event::DataForClient(stream) => self.pop_for(stream.as_str()),
            Event::Closed { stream, close } => {
                self.send(stream.as_str(), ToClient::Closed(close), true);
            }
            Event::ResponseEnd(stream) => self.send(stream.as_str(), ToClient::End, true),
            Event::ResponseAbort { stream, message } => self.send(
                stream.as_str(),
                ToClient::Abort(message.as_str().to_string()),
                true,
            ),
            Event::StopReadingClient(_) => {}
            Event::ResumeReadingClient(stream) => self.feed_stash(stream.as_str()),
        }
    }

    /// Sends `item` to the client of `id`; `last` forgets the link (the stream ended).
    fn send(&mut self, id: &str, item: ToClient, last: bool) {
        if let Some(l) = self.links.get(id) {
            let _ = l.link.tx.send(item);
        }
        if last {
            self.links.remove(id);
        }
    }

    /// Moves messages for client `id` from the gateway to its task, within its window.
    fn pop_for(&mut self, id: &str) {
        let Some(l) = self.links.get_mut(id) else {
            // Nobody to deliver to; the gateway frees the stream when told the client is gone.
            return;
        };
        loop {
            if l.link.shared.to_client_inflight.load(Ordering::Acquire) >= CLIENT_WINDOW {
                l.wants_pop = true;
                return;
            }
            let Some(message) = self.gw.pop_client(id) else {
                l.wants_pop = false;
                return;
            };
            l.link
                .shared
                .to_client_inflight
                .fetch_add(1, Ordering::AcqRel);
            let _ = l.link.tx.send(ToClient::Data(message));
        }
    }

    /// Hands stashed client messages of `id` to the gateway, in order, until it is full again.
    fn feed_stash(&mut self, id: &str) {
        let now = self.now();
        let Some(l) = self.links.get_mut(id) else {
            return;
        };
        while let Some(message) = l.stash.pop_front() {
            match self
                .gw
                .handle_client_message(now, id, message.kind, message.payload)
            {
                Ok(()) => l.link.shared.to_agent.add_permits(1),
                Err(SendError::Full(payload)) => {
                    l.stash.push_front(Message {
                        kind: message.kind,
                        payload,
                    });
                    return;
                }
                Err(_) => l.link.shared.to_agent.add_permits(1),
            }
        }
        if let Some(close) = l.closing.take() {
            self.links.remove(id);
            let _ = self.gw.handle_client_closed(now, id, close);
        }
    }

    fn handle_frame(&mut self, frame: Vec<u8>) {
        let now = self.now();
        loop {
            match self
                .gw
                .handle_tunnel_message(now, &frame, &mut self.scratch)
            {
                Ok(Handled::Consumed) => {}
                Ok(Handled::ResponseHead(head)) => {
                    let mut headers = Vec::new();
                    for (name, values) in head.headers.iter() {
                        let name = name.to_string();
                        if DROPPED_RESPONSE_HEADERS
                            .iter()
                            .any(|d| d.eq_ignore_ascii_case(&name))
                        {
                            continue;
                        }
                        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                            tracing::warn!(stream = %head.stream, "invalid response header name dropped");
                            continue;
                        };
                        for value in values {
                            match HeaderValue::from_str(&value.to_string()) {
                                Ok(value) => headers.push((name.clone(), value)),
                                Err(_) => tracing::warn!(
                                    stream = %head.stream,
                                    header = %name,
                                    "invalid response header value dropped"
                                ),
                            }
                        }
                    }
                    let item = ToClient::Head {
                        status: head.status,
                        headers,
                        gzip: head.gzip,
                    };
                    let id = head.stream.as_str().to_string();
                    self.send(&id, item, false);
                }
                Ok(Handled::Other(env, _)) => {
                    tracing::debug!(cluster = %self.cluster, kind = %env.type_name, "agent message ignored");
                }
                Err(TunnelError::Blocked) => {
                    self.pending_in = Some(frame);
                    self.paused = true;
                }
                Err(TunnelError::ScratchTooSmall { needed }) => {
                    self.scratch.resize(needed, 0);
                    continue;
                }
                // Logged and answered by the gateway; nothing else changed.
                Err(e) => self.state.metrics.tunnel_error(&e),
            }
            return;
        }
    }

    fn handle_cmd(&mut self, cmd: Cmd) {
        let now = self.now();
        match cmd {
            Cmd::OpenStream(open) => self.open_stream(open),
            Cmd::OpenRequest(open) => self.open_request(open),
            Cmd::OpenTcp(open) => self.open_tcp(open),
            Cmd::Message { id, message } => {
                let Some(l) = self.links.get_mut(&id) else {
                    return;
                };
                if !l.stash.is_empty() {
                    l.stash.push_back(message);
                    return;
                }
                match self
                    .gw
                    .handle_client_message(now, &id, message.kind, message.payload)
                {
                    Ok(()) => l.link.shared.to_agent.add_permits(1),
                    Err(SendError::Full(payload)) => l.stash.push_back(Message {
                        kind: message.kind,
                        payload,
                    }),
                    Err(SendError::TooLarge(_)) => {
                        tracing::warn!(stream = %id, "client message larger than the tunnel limit; closing");
                        l.link.shared.to_agent.add_permits(1);
                        let close = tether_core::relay::Close::new(1009, "message too big");
                        let _ = l.link.tx.send(ToClient::Closed(close.clone()));
                        self.links.remove(&id);
                        let _ = self.gw.handle_client_closed(now, &id, Some(close));
                    }
                    Err(SendError::Closed(_)) => l.link.shared.to_agent.add_permits(1),
                }
            }
            Cmd::ClientClosed { id, close } => {
                if let Some(l) = self.links.get_mut(&id)
                    && !l.stash.is_empty()
                {
                    l.closing = Some(close);
                    return;
                }
                self.links.remove(&id);
                let _ = self.gw.handle_client_closed(now, &id, close);
            }
            Cmd::Writable { id } => {
                if self.links.get(&id).is_some_and(|l| l.wants_pop) {
                    self.pop_for(&id);
                }
            }
            Cmd::End { reason } => self.lose_with_close(reason),
        }
    }

    fn open_stream(&mut self, open: OpenStream) {
        if let Some((method, _)) = &open.upgrade
            && !self.gw.extensions().raw_upgrade
        {
            // A PipeOps agent cannot carry the upgrade: what it can do is a plain request.
            tracing::info!(cluster = %self.cluster, stream = %open.id, "agent cannot carry raw upgrades: sent as a plain request");
            let request = OpenRequest {
                id: open.id,
                method: method.clone(),
                path: open.path,
                query: open.query,
                headers: open.headers,
                user: open.user,
                groups: open.groups,
                body: bytes::Bytes::new(),
                link: open.link,
            };
            self.open_request(request);
            return;
        }
        let now = self.now();
        let headers: Vec<(&[u8], &[u8])> = open
            .headers
            .iter()
            .map(|(n, v)| (n.as_slice(), v.as_slice()))
            .collect();
        let groups: Vec<&str> = open.groups.iter().map(String::as_str).collect();
        let req = StreamRequest {
            id: &open.id,
            path: &open.path,
            query: &open.query,
            headers: &headers.as_slice(),
            protocols: &open.protocols,
            upgrade: open.upgrade.as_ref().map(|(m, t)| (m.as_str(), t.as_str())),
            user: Some(&open.user),
            groups: &groups,
        };
        match self
            .gw
            .open_stream(now, Self::unix(), &req, &mut self.scratch)
        {
            Ok(()) => {
                tracing::info!(cluster = %self.cluster, stream = %open.id, user = %open.user, path = %open.path, "stream opened");
                self.links.insert(open.id, LinkState::new(open.link));
            }
            Err(e) => {
                tracing::warn!(cluster = %self.cluster, stream = %open.id, error = %e, "stream refused");
                refuse(&open.link, &e);
            }
        }
    }

    fn open_tcp(&mut self, open: OpenTcp) {
        let now = self.now();
        let req = TcpOpen {
            id: &open.id,
            host: &open.host,
            port: open.port,
            client_addr: Some(&open.client_addr),
        };
        match self.gw.open_tcp(now, Self::unix(), &req, &mut self.scratch) {
            Ok(()) => {
                tracing::info!(cluster = %self.cluster, tunnel = %open.id, client = %open.client_addr, target = %format!("{}:{}", open.host, open.port), "tcp forward opened");
                let piece = self.gw.tcp_piece_len();
                open.link.shared.tcp_read.store(piece, Ordering::Relaxed);
                self.links.insert(open.id, LinkState::new(open.link));
            }
            Err(e) => {
                tracing::warn!(cluster = %self.cluster, tunnel = %open.id, error = %e, "tcp forward refused");
                refuse(&open.link, &e);
            }
        }
    }

    fn open_request(&mut self, open: OpenRequest) {
        let now = self.now();
        let headers: Vec<(&[u8], &[u8])> = open
            .headers
            .iter()
            .map(|(n, v)| (n.as_slice(), v.as_slice()))
            .collect();
        let groups: Vec<&str> = open.groups.iter().map(String::as_str).collect();
        let req = HttpRequest {
            id: &open.id,
            method: &open.method,
            path: &open.path,
            query: &open.query,
            headers: &headers.as_slice(),
            user: Some(&open.user),
            groups: &groups,
            body: &open.body,
        };
        let needed = self
            .gw
            .max_transmit_len()
            .min(tether_core::wire::b64::encoded_len(open.body.len()).saturating_add(64 * 1024));
        if self.scratch.len() < needed {
            self.scratch.resize(needed, 0);
        }
        match self
            .gw
            .open_request(now, Self::unix(), &req, &mut self.scratch)
        {
            Ok(()) => {
                tracing::debug!(cluster = %self.cluster, request = %open.id, user = %open.user, method = %open.method, path = %open.path, "request forwarded");
                self.links.insert(open.id, LinkState::new(open.link));
            }
            Err(e) => {
                tracing::warn!(cluster = %self.cluster, request = %open.id, error = %e, "request refused");
                refuse(&open.link, &e);
            }
        }
    }

    /// Ends every stream with `reason` (once), delivering the gateway's final events.
    fn lose(&mut self, reason: &str) {
        if !self.lost {
            self.lost = true;
            let now = self.now();
            self.gw.handle_tunnel_lost(now, reason);
            while let Some(event) = self.gw.poll_event() {
                self.handle_event(event);
            }
            // Whatever remains for a client that was slow: hand it over regardless of the window.
            let ids: Vec<String> = self.links.keys().cloned().collect();
            for id in ids {
                while let Some(message) = self.gw.pop_client(&id) {
                    if let Some(l) = self.links.get(&id) {
                        let _ = l.link.tx.send(ToClient::Data(message));
                    }
                }
            }
            while let Some(event) = self.gw.poll_event() {
                self.handle_event(event);
            }
            self.links.clear();
        }
    }

    fn lose_with_close(&mut self, reason: &str) {
        self.lose(reason);
        let frame = CloseFrame {
            code: CloseCode::Away,
            reason: reason.into(),
        };
        let _ = self.out.try_send(WsMessage::Close(Some(frame)));
        self.pending_out = None;
        self.dead = true;
    }
}
