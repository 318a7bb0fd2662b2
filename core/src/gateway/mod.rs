//! The control-plane side of the tunnel: the mirror of the agent [`Relay`](crate::relay::Relay).
//!
//! [`Gateway`] is sans-IO. The adapter owns the tunnel WebSocket the agent dialled and one client
//! connection (kubectl) per stream, and drives the gateway:
//!
//! * **Inputs**: [`handle_tunnel_message`](Gateway::handle_tunnel_message) for every tunnel message;
//!   [`handle_tunnel_activity`](Gateway::handle_tunnel_activity) for tunnel pongs;
//!   [`open_stream`](Gateway::open_stream) for a client WebSocket upgrade,
//!   [`open_request`](Gateway::open_request) for a plain HTTP request;
//!   [`open_tcp`](Gateway::open_tcp) for a forwarded TCP connection (see [`tcp`]);
//!   [`handle_client_message`](Gateway::handle_client_message) for every client WebSocket data
//!   message; [`handle_client_closed`](Gateway::handle_client_closed) when a client closes or goes
//!   away; [`handle_timeout`](Gateway::handle_timeout) when [`poll_timeout`](Gateway::poll_timeout)
//!   passes; [`handle_tunnel_lost`](Gateway::handle_tunnel_lost) when the tunnel is gone (or replaced).
//! * **Outputs**, polled after every input until they return `None`:
//!   [`poll_transmit`](Gateway::poll_transmit) (tunnel messages), [`poll_event`](Gateway::poll_event)
//!   (what the adapter must do), [`pop_client`](Gateway::pop_client) (messages for a client, after
//!   [`Event::DataForClient`]), and [`poll_timeout`](Gateway::poll_timeout).
//!
//! # Session
//!
//! The agent's `register` is answered with `register_success` naming the cluster the adapter
//! authenticated (the agent's bearer token names it) and advertising the Tether extensions of
//! [`Config::extensions`]; an extension is used only when the agent offered it too.
//! [`Event::Registered`] comes once `register_success` was transmitted; streams can be opened from
//! then on. `heartbeat` is answered with `heartbeat_ack`; a `ping` envelope only counts as activity.
//!
//! # WebSocket streams
//!
//! [`open_stream`](Gateway::open_stream) validates the request (stream id, Kubernetes API path,
//! query, headers, subprotocols), drops every client header the agent must not see (credentials,
//! hop-by-hop, all `Impersonate-*`, see [`is_forwarded`]), sets `Impersonate-User` to the
//! authenticated user, and queues `proxy_websocket_start`. The agent answers with
//! `proxy_websocket_started {stream_id, protocol}` ([`Event::Started`]: answer the client's upgrade
//! with 101 and that subprotocol) or `proxy_error {status}` ([`Event::Failed`]: answer with that
//! status, so kubectl's SPDY fallback sees the upstream's real answer). An agent without the
//! `websocket_started` extension (the PipeOps agent) never acknowledges: the stream is started at
//! once with the first offered subprotocol, as PipeOps control planes do.
//!
//! Data flows both ways as whole messages with their kind. A close from the agent reaches the client
//! as [`Event::Closed`] with the agent's code and reason after every queued message; a close from the
//! client reaches the agent as `proxy_websocket_close` with its code after every queued message.
//! A `proxy_error` on a started stream (a PipeOps agent reporting a broken upstream) makes the
//! following code-less close a 1011 with that error, never a misleading 1000. Ping and pong data
//! frames from the agent are dropped and counted: pings are answered per hop.
//!
//! # HTTP requests
//!
//! [`open_request`](Gateway::open_request) queues a `proxy_request` (body inline, base64) asking for
//! a streamed response. `proxy_response_header` is returned as [`Handled::ResponseHead`], body chunks
//! come out as [`Event::DataForClient`] messages, and [`Event::ResponseEnd`] /
//! [`Event::ResponseAbort`] end it; a buffered `proxy_response` is the three at once. A refusal
//! before the header is [`Event::Failed`]. A client that goes away gets its request cancelled with
//! `proxy_cancel`.
//!
//! # TCP streams
//!
//! [`open_tcp`](Gateway::open_tcp) carries a raw TCP connection as `tcp_tunnel_*` messages, with the
//! same rings, events and backpressure as a WebSocket stream: see [`tcp`].
//!
//! # Backpressure (never drop)
//!
//! Each stream has a ring per direction (`RING` messages and [`Config::ring_bytes`]).
//! * Client to agent: a full ring hands the message back ([`SendError::Full`]) and emits
//!   [`Event::StopReadingClient`] for that stream only, then [`Event::ResumeReadingClient`] once the
//!   ring drained below half.
//! * Agent to client: compat mode has no per-stream flow control, so a message whose ring is full is
//!   refused with [`TunnelError::Blocked`] *without being consumed* and [`Event::PauseTunnelReads`]
//!   is emitted (head-of-line blocking, counted in [`Stats::tunnel_pauses`]); hand the same message
//!   in again after [`Event::ResumeTunnelReads`].
//! * Native mode (both ends advertised [`Extensions::native`]): streams travel as binary frames
//!   with per-stream credit (see [`crate::credit`]): the agent only sends what the stream's ring
//!   can take, so the tunnel is never paused; a stream without credit waits (counted in
//!   [`Stats::credit_stalls`] and [`Stats::credit_blocked_micros`]) while the others keep flowing.
//! * Scheduling: small messages (at most [`crate::credit::INTERACTIVE_MAX`] bytes: tty input,
//!   resizes) go out before bulk data; streams share the tunnel round-robin within each class.
//!
//! # Bad input
//!
//! A malformed or misdirected agent message returns a [`TunnelError`], logs a warning naming the
//! stream or request id, queues an `error` reply to the agent when the message itself was malformed,
//! and changes nothing else: other streams, their queued data and their order are untouched.
//! Messages for a recently finished stream are dropped quietly (a normal race).

mod config;
mod error;
mod event;
mod headers;
mod native;
mod stream;
pub mod tcp;

#[cfg(test)]
mod tests;

use core::fmt::Write as _;

use heapless::{Deque, String};

use crate::budget::Budget;
use crate::flow::TunnelPause;
use crate::keepalive::Keepalive;
use crate::recent::RecentlyClosed;
use crate::relay::{
    Close, MAX_FAILURE_MESSAGE, MAX_SUBPROTOCOL, Message, MessageKind, PayloadBuf, SendError,
    Transmit, TransmitError, validate_path, validate_query, validate_subprotocol_list,
};
use crate::ring::DEFAULT_RING_MESSAGES;
use crate::stream_id::{MAX_STREAM_ID_LEN, StreamId};
use crate::table::{InsertError, Slot, StreamState, StreamTable};
use crate::text::truncated;
use crate::time::Instant;
use crate::wire::{
    AgentMessage, CloseFrame, ControlMessage, DataFrame, Envelope, Extensions, FrameError,
    HEARTBEAT_DRAINING, HeaderList, JsonStr, Limits, UnixTime, WebSocketClose, WebSocketData,
    WireStr,
};

pub use config::Config;
pub use error::{ClientError, OpenError, TunnelError};
pub use event::{Event, Handled, ResponseHead, Stats};
pub use headers::{DROPPED_HEADERS, IMPERSONATE_PREFIX, is_forwarded};
pub use stream::StreamKind;
pub use tcp::TcpOpen;

use crate::engine::{self, PushRefused, Window};
use crate::flow::Flow;
use headers::Forwarded;
use stream::{ClientEnd, Failure, StreamData};

/// Replies owed to the agent (register_success, acks, pongs, errors); when full, tunnel messages are
/// refused with [`TunnelError::Blocked`] until one is sent.
const REPLY_QUEUE: usize = 8;
/// Recently freed stream ids whose late messages are dropped quietly.
const RECENTLY_CLOSED: usize = 64;
/// Longest request id echoed in a reply.
const MAX_REPLY_ID: usize = 128;

/// A client WebSocket upgrade to open as a stream. See [`Gateway::open_stream`].
#[derive(Debug, Clone, Copy)]
pub struct StreamRequest<'a> {
    /// Stream id, unique on this tunnel (1 to 64 bytes, no control characters).
    pub id: &'a str,
    /// Kubernetes API path (checked with [`validate_path`]).
    pub path: &'a str,
    /// Raw query string without `?` (checked with [`validate_query`]); may be empty.
    pub query: &'a str,
    /// The client's request headers; filtered with [`is_forwarded`], names and values validated.
    pub headers: &'a dyn HeaderList,
    /// Subprotocols the client offered, comma separated (its `Sec-WebSocket-Protocol`); may be
    /// empty. For a raw upgrade: its `X-Stream-Protocol-Version`s.
    pub protocols: &'a str,
    /// A raw (non-WebSocket) HTTP/1.1 upgrade such as SPDY/3.1: `(method, Upgrade token)`,
    /// checked with [`validate_upgrade`](crate::relay::validate_upgrade). Only on a tunnel whose
    /// agent offered [`Extensions::raw_upgrade`]. [`Event::Started`] then carries the upstream's
    /// chosen protocol; after it the stream's messages are binary and their boundaries mean
    /// nothing.
    pub upgrade: Option<(&'a str, &'a str)>,
    /// Authenticated user, sent as `Impersonate-User`; `None` sends no impersonation (every
    /// client-sent `Impersonate-*` is dropped either way).
    pub user: Option<&'a str>,
    /// The user's groups, each sent as `Impersonate-Group` after `Impersonate-User` (only with a
    /// user; Kubernetes refuses groups without one).
    pub groups: &'a [&'a str],
}

/// A client HTTP request to forward. See [`Gateway::open_request`].
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    /// Request id, unique on this tunnel (same rules as a stream id).
    pub id: &'a str,
    /// Method (an HTTP token).
    pub method: &'a str,
    /// Kubernetes API path (checked with [`validate_path`]).
    pub path: &'a str,
    /// Raw query string without `?`; may be empty.
    pub query: &'a str,
    /// The client's request headers; filtered with [`is_forwarded`], names and values validated.
    pub headers: &'a dyn HeaderList,
    /// Authenticated user, sent as `Impersonate-User`.
    pub user: Option<&'a str>,
    /// The user's groups, as [`StreamRequest::groups`].
    pub groups: &'a [&'a str],
    /// The whole request body (may be empty).
    pub body: &'a [u8],
}

/// A reply owed to the agent, not tied to a live stream.
#[derive(Debug)]
enum Reply {
    RegisterSuccess {
        request_id: String<MAX_REPLY_ID>,
    },
    HeartbeatAck,
    Error {
        request_id: String<MAX_REPLY_ID>,
        error: TunnelError,
    },
}

/// What the tunnel reader waits for after [`TunnelError::Blocked`].
#[derive(Debug)]
enum Blocker {
    Replies,
    Stream { id: StreamId, bytes: usize },
}

#[derive(Debug, Default)]
struct Session {
    cluster_id: String<64>,
    agent_id: String<64>,
    /// `register_success` was transmitted: streams may be opened.
    registered: bool,
    extensions: Extensions,
    owe_registered: bool,
    /// The agent said it is shutting down (heartbeat `status: "draining"`).
    draining: bool,
    owe_draining: bool,
    /// Native stream numbers handed out on this tunnel (never reused).
    last_wire: u32,
    /// Ping and read-deadline timers.
    keepalive: Keepalive,
    /// `Bearer <k8s_service_token>` of an agent that registered without Tether's extensions
    /// (a PipeOps agent): sent as `Authorization` on every request and stream it carries, since
    /// that agent expects the control plane to authenticate for it. Empty otherwise. Never logged.
    upstream_bearer: String<MAX_BEARER>,
}

/// Longest `Authorization: Bearer <k8s_service_token>` value kept for a PipeOps agent.
pub const MAX_BEARER: usize = 4096;

/// The control-plane side of one agent tunnel, for up to `STREAMS` concurrent streams and requests,
/// each with two rings of `RING` messages of type `M`. See the [module docs](self).
///
/// # Memory
///
/// Without tether-core's `alloc` feature everything is inline: about
/// `STREAMS * (2 * RING * size_of::<Message<M>>() + 500)` bytes plus about 10 KiB of session state
/// (box it; 4 KiB of it is a PipeOps agent's bearer token). With `alloc` (std adapters) the table and the rings live on the heap and grow with
/// use, so `STREAMS` is only a limit and an idle tunnel costs a few KiB.
pub struct Gateway<M, const STREAMS: usize, const RING: usize = DEFAULT_RING_MESSAGES> {
    config: Config,
    streams: StreamTable<StreamData<M, RING>, STREAMS>,
    session: Session,
    replies: Deque<Reply, REPLY_QUEUE>,
    recently_closed: RecentlyClosed<RECENTLY_CLOSED>,
    pause: TunnelPause<Blocker>,
    /// The latest `now` handed in: when a pause began.
    clock: Instant,
    budget: Budget,
    /// Bulk bytes in flight on the tunnel, and acks owed (extension `native_ack`).
    window: Window,
    control_cursor: Option<Slot>,
    data_cursor: Option<Slot>,
    event_cursor: Option<Slot>,
    stats: Stats,
}

impl<M: PayloadBuf, const STREAMS: usize, const RING: usize> Gateway<M, STREAMS, RING> {
    /// A gateway for a tunnel the adapter authenticated as cluster `cluster_id` (cut to 64 bytes),
    /// connected at `now`: arms the ping and read-deadline timers and waits for `register`.
    #[must_use]
    pub fn new(config: Config, cluster_id: &str, now: Instant) -> Self {
        Self {
            config,
            streams: StreamTable::new(),
            session: Session {
                cluster_id: truncated(cluster_id.chars()),
                keepalive: Keepalive::armed(now, config.ping_interval, config.read_deadline),
                ..Session::default()
            },
            replies: Deque::new(),
            recently_closed: RecentlyClosed::new(),
            pause: TunnelPause::new(),
            clock: now,
            budget: Budget::new(config.global_bytes),
            window: Window::new(),
            control_cursor: None,
            data_cursor: None,
            event_cursor: None,
            stats: Stats::default(),
        }
    }

    /// The configuration.
    #[must_use]
    pub const fn config(&self) -> &Config {
        &self.config
    }

    /// Counters.
    #[must_use]
    pub const fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether the agent registered (streams may be opened).
    #[must_use]
    pub const fn is_registered(&self) -> bool {
        self.session.registered
    }

    /// Extensions in use on this tunnel (none before registration).
    #[must_use]
    pub const fn extensions(&self) -> Extensions {
        self.session.extensions
    }

    /// Messages and bytes queued in every stream's rings, both directions.
    #[must_use]
    pub fn ring_occupancy(&self) -> crate::ring::RingOccupancy {
        let mut total = crate::ring::RingOccupancy::default();
        for (_, entry) in self.streams.iter() {
            total.add(&entry.value.pipe.to_tunnel);
            total.add(&entry.value.pipe.to_local);
        }
        total
    }

    /// Number of live streams and requests.
    #[must_use]
    pub const fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// State of the live stream `stream`.
    #[must_use]
    pub fn stream_state(&self, stream: &str) -> Option<StreamState> {
        self.streams.get(stream).map(crate::table::Entry::state)
    }

    /// A buffer size for [`poll_transmit`](Self::poll_transmit) and the scratch of the `open_*` and
    /// [`handle_tunnel_message`](Self::handle_tunnel_message) calls that fits any message of
    /// [`Config::max_message`] bytes plus envelope overhead.
    #[must_use]
    pub fn max_transmit_len(&self) -> usize {
        crate::wire::b64::encoded_len(self.config.max_message.saturating_add(1))
            .saturating_add(2048)
    }

    /// Records that the tunnel showed signs of life (a WebSocket ping or pong, or any frame not
    /// handed to [`handle_tunnel_message`](Self::handle_tunnel_message)): pushes the read deadline
    /// and the next ping back (only a quiet agent is pinged).
    pub fn handle_tunnel_activity(&mut self, now: Instant) {
        self.clock = now;
        self.session
            .keepalive
            .heard(now, self.config.read_deadline, self.config.ping_interval);
    }

    // ---------------------------------------------------------------------------------------------
    // Client input

    /// The `Authorization` value a PipeOps agent expects on what it carries, when it sent one.
    fn upstream_bearer(&self) -> Option<&str> {
        let bearer = self.session.upstream_bearer.as_str();
        (!bearer.is_empty()).then_some(bearer)
    }

    /// Opens a WebSocket stream for a client upgrade: validates `req`, registers the stream
    /// `Opening` and queues `proxy_websocket_start` (encoded now into `scratch`, stamped with
    /// `unix_time`, kept in an `M` until transmitted). Answer the client after [`Event::Started`] or
    /// [`Event::Failed`].
    ///
    /// # Errors
    /// [`OpenError`]; nothing is registered or queued then.
    pub fn open_stream(
        &mut self,
        now: Instant,
        unix_time: UnixTime,
        req: &StreamRequest<'_>,
        scratch: &mut [u8],
    ) -> Result<(), OpenError> {
        let id = self.check_open(req.id)?;
        validate_path(req.path.chars())?;
        validate_query(req.query.chars())?;
        if !req.protocols.is_empty() {
            validate_subprotocol_list(req.protocols.chars())?;
        }
        if let Some((method, token)) = req.upgrade {
            if !self.session.extensions.raw_upgrade {
                return Err(OpenError::UpgradeUnsupported);
            }
            crate::relay::validate_upgrade(method, token)?;
        }
        let headers = Forwarded {
            inner: req.headers,
            user: req.user,
            groups: req.groups,
            bearer: self.upstream_bearer(),
        };
        headers.validate()?;
        let message = ControlMessage::WebSocketStart {
            stream_id: WireStr::Plain(req.id),
            path: WireStr::Plain(req.path),
            query: WireStr::Plain(req.query),
            headers: &headers,
            protocol: (!req.protocols.is_empty()).then_some(WireStr::Plain(req.protocols)),
            method: req.upgrade.map(|(m, _)| WireStr::Plain(m)),
            upgrade: req.upgrade.map(|(_, t)| WireStr::Plain(t)),
        };
        let native = self.session.extensions.native;
        let (start, wire) = if native {
            self.encode_native_start(&message, scratch)?
        } else {
            (self.encode_start(&message, req.id, unix_time, scratch)?, 0)
        };
        let mut data = StreamData::new(
            StreamKind::WebSocket,
            start,
            self.config.ring_bytes,
            now + self.config.start_timeout,
        );
        if native {
            data.pipe.go_native(wire, self.config.ring_bytes);
        }
        let slot = self.insert(id, data)?;
        if native {
            self.session.last_wire = wire;
        }
        self.stats.streams_opened += 1;
        info!("stream {}: start {}", req.id, req.path);
        if !self.session.extensions.websocket_started && !native {
            // A PipeOps agent never acknowledges: start optimistically with the first offer.
            let first = req.protocols.split(',').next().unwrap_or_default().trim();
            if let Some(entry) = self.streams.at_mut(slot) {
                entry.value.owe_started = Some(truncated(first.chars()));
                entry.value.deadline = None;
            }
            let _ = self.streams.transition(slot, StreamState::Open);
        }
        Ok(())
    }

    /// Opens an HTTP request: validates `req`, registers it `Opening` and queues `proxy_request`
    /// (encoded now into `scratch`, body inline). Answer the client from
    /// [`Handled::ResponseHead`] or [`Event::Failed`].
    ///
    /// # Errors
    /// [`OpenError`]; nothing is registered or queued then.
    pub fn open_request(
        &mut self,
        now: Instant,
        unix_time: UnixTime,
        req: &HttpRequest<'_>,
        scratch: &mut [u8],
    ) -> Result<(), OpenError> {
        let id = self.check_open(req.id)?;
        if crate::relay::validate_header_name(req.method.chars()).is_err() {
            return Err(OpenError::Method);
        }
        validate_path(req.path.chars())?;
        validate_query(req.query.chars())?;
        let headers = Forwarded {
            inner: req.headers,
            user: req.user,
            groups: req.groups,
            bearer: self.upstream_bearer(),
        };
        headers.validate()?;
        let credited = self.session.extensions.response_credit;
        let message = ControlMessage::ProxyRequest {
            method: WireStr::Plain(req.method),
            path: WireStr::Plain(req.path),
            query: WireStr::Plain(req.query),
            headers: &headers,
            body: (!req.body.is_empty()).then_some(req.body),
            streaming: false,
            supports_response_streaming: true,
            timeout_ms: None,
            response_credit: credited,
        };
        let start = self.encode_start(&message, req.id, unix_time, scratch)?;
        let mut data = StreamData::new(
            StreamKind::Request,
            start,
            self.config.ring_bytes,
            now + self.config.start_timeout,
        );
        if credited {
            data.pipe.give_credit(self.config.ring_bytes);
        }
        self.insert(id, data)?;
        self.stats.requests_opened += 1;
        self.stats.bytes_to_agent += req.body.len() as u64;
        debug!("request {}: {} {}", req.id, req.method, req.path);
        Ok(())
    }

    fn check_open(&self, id: &str) -> Result<StreamId, OpenError> {
        if !self.session.registered {
            return Err(OpenError::NotRegistered);
        }
        let id = StreamId::new(id)?;
        if self.streams.find(id.as_str()).is_some() {
            return Err(OpenError::DuplicateStream);
        }
        if self.streams.len() >= STREAMS {
            return Err(OpenError::TooManyStreams);
        }
        Ok(id)
    }

    fn encode_start(
        &self,
        message: &ControlMessage<'_>,
        id: &str,
        unix_time: UnixTime,
        scratch: &mut [u8],
    ) -> Result<M, OpenError> {
        let n = match message.encode(Some(WireStr::Plain(id)), unix_time, scratch) {
            Ok(n) => n,
            Err(crate::wire::EncodeError::BufferTooSmall { needed }) => {
                return Err(OpenError::TooLarge { needed });
            }
            Err(e) => return Err(OpenError::Encode(e)),
        };
        if n > self.max_transmit_len() {
            return Err(OpenError::TooLarge { needed: n });
        }
        M::from_slice(&scratch[..n]).ok_or(OpenError::PayloadRefused { len: n })
    }

    fn insert(&mut self, id: StreamId, data: StreamData<M, RING>) -> Result<Slot, OpenError> {
        let slot = self.streams.insert(id.clone(), data).map_err(|e| match e {
            InsertError::Duplicate => OpenError::DuplicateStream,
            InsertError::Full => OpenError::TooManyStreams,
        })?;
        self.recently_closed.forget(&id);
        Ok(slot)
    }

    /// Queues a message read from the client WebSocket of `stream` for the agent.
    ///
    /// # Errors
    /// The message is handed back: [`SendError::Full`] (stop reading this client until
    /// [`Event::ResumeReadingClient`], then hand it in again), [`SendError::Closed`] (unknown stream,
    /// not a started WebSocket, or its agent side ended), [`SendError::TooLarge`] (over
    /// [`Config::max_message`]; close the client with 1009).
    pub fn handle_client_message(
        &mut self,
        now: Instant,
        stream: &str,
        kind: MessageKind,
        payload: M,
    ) -> Result<(), SendError<M>> {
        let _ = now;
        let len = payload.len();
        if len > self.config.max_message {
            return Err(SendError::TooLarge(payload));
        }
        // One lookup by id (a scan): the slot serves both the budget check and the push.
        let Some(slot) = self.streams.find(stream) else {
            return Err(SendError::Closed(payload));
        };
        let admitted = engine::admits(&self.streams, &mut self.budget, slot, len);
        let Some(entry) = self.streams.at_mut(slot) else {
            return Err(SendError::Closed(payload));
        };
        let open = entry.state() == StreamState::Open;
        let d = &mut entry.value;
        let accepting = open
            && d.kind != StreamKind::Request
            && d.client_alive
            && d.agent_alive
            && d.owe_agent_close.is_none();
        if !accepting {
            return Err(SendError::Closed(payload));
        }
        let (result, stopped) =
            d.pipe
                .queue_toward_tunnel(&mut self.budget, admitted, Message { kind, payload });
        if stopped {
            debug!("stream {}: client reads paused", stream);
        }
        result
    }

    /// The client of `stream` closed (with `close`, its WebSocket close code and reason) or went away
    /// (`None`). Its pending events and queued data are discarded. The agent gets every message
    /// already queued for it, then `proxy_websocket_close` with that code (1001 "client went away"
    /// for `None`), or `proxy_cancel` for a request still running. A stream whose start was not
    /// transmitted yet is dropped without telling the agent. Idempotent for a stream already ended
    /// toward the client.
    ///
    /// # Errors
    /// [`ClientError::UnknownStream`].
    pub fn handle_client_closed(
        &mut self,
        now: Instant,
        stream: &str,
        close: Option<Close>,
    ) -> Result<(), ClientError> {
        let _ = now;
        let slot = self
            .streams
            .find(stream)
            .ok_or(ClientError::UnknownStream)?;
        let Some(entry) = self.streams.at_mut(slot) else {
            return Err(ClientError::UnknownStream);
        };
        let state = entry.state();
        let d = &mut entry.value;
        if !d.client_alive {
            return Ok(());
        }
        d.client_alive = false;
        d.owe_started = None;
        d.owe_failed = None;
        d.owe_client_end = None;
        d.pipe.forget_local();
        d.deadline = None;
        self.stats.discarded_messages += d.pipe.to_local.clear().0 as u64;
        if d.agent_alive {
            if d.start.take().is_some() {
                d.agent_alive = false;
                self.stats.discarded_messages += d.pipe.to_tunnel.clear().0 as u64;
            } else if d.kind != StreamKind::Request {
                let close = close.unwrap_or_else(|| Close::new(1001, "client went away"));
                info!("stream {}: closed by client ({})", stream, close);
                d.owe_agent_close = Some(close);
            } else {
                info!("request {}: client went away; cancelling", stream);
                d.owe_cancel = true;
            }
        }
        if state != StreamState::Closing {
            let _ = self.streams.transition(slot, StreamState::Closing);
        }
        self.settle(slot);
        self.check_unblock();
        Ok(())
    }

    /// The next message for the client of `stream`, oldest first. Call after
    /// [`Event::DataForClient`] until `None`.
    pub fn pop_client(&mut self, stream: &str) -> Option<Message<M>> {
        let entry = self.streams.get_mut(stream)?;
        let opening = entry.state() == StreamState::Opening;
        let d = &mut entry.value;
        if !d.client_alive || opening {
            return None;
        }
        let message = d.pipe.pop_local()?;
        self.stats.bytes_to_client += message.payload.len() as u64;
        self.check_unblock();
        Some(message)
    }

    // ---------------------------------------------------------------------------------------------
    // Tunnel input

    /// Handles one tunnel WebSocket message from the agent (a text frame, or JSON in a binary frame).
    ///
    /// `scratch` receives decoded data; it must hold [`Config::max_message`] bytes. Data is copied
    /// out of it into an `M` before this returns.
    ///
    /// # Errors
    /// See [`TunnelError`]: [`Blocked`](TunnelError::Blocked) and
    /// [`ScratchTooSmall`](TunnelError::ScratchTooSmall) leave the message unconsumed (hand it in
    /// again); every other error consumed and rejected it, logged, and changed nothing else.
    pub fn handle_tunnel_message<'a>(
        &mut self,
        now: Instant,
        frame: &'a [u8],
        scratch: &mut [u8],
    ) -> Result<Handled<'a>, TunnelError> {
        self.handle_tunnel_activity(now);
        if self.replies.is_full() {
            return Err(self.block(Blocker::Replies));
        }
        if self.session.extensions.native && crate::wire::native::is_native(frame) {
            return self.handle_native(now, frame);
        }
        let limits = Limits {
            max_len: usize::MAX,
            ..Limits::DEFAULT
        };
        let env = match Envelope::parse_with(frame, &limits) {
            Ok(env) => env,
            Err(e) => return Err(self.reject(None, e.into(), true)),
        };
        let message = match env.agent_message() {
            Ok(m) => m,
            Err(e) => return Err(self.reject(env.request_id, e.into(), true)),
        };
        if frame.len() > self.config.max_message {
            let error = TunnelError::TooLarge {
                len: frame.len(),
                max: self.config.max_message,
            };
            return Err(self.reject_oversize(&env, &message, error));
        }
        match message {
            AgentMessage::Register {
                agent_id,
                extensions,
                payload,
                ..
            } => {
                let ours = self.config.extensions;
                let s = &mut self.session;
                s.agent_id = agent_id.map(|a| truncated(a.chars())).unwrap_or_default();
                s.extensions = ours.common(extensions);
                if s.extensions.native && s.extensions.native_ack {
                    self.window.enable();
                }
                let s = &mut self.session;
                s.upstream_bearer.clear();
                if extensions == Extensions::NONE {
                    let token = payload.get("k8s_service_token").and_then(|v| v.as_str());
                    if let Some(token) = token.filter(|t| !t.is_empty()) {
                        match bearer_of(token) {
                            Some(bearer) => s.upstream_bearer = bearer,
                            None => warn!(
                                "agent {}: k8s_service_token unusable (too long or not a header value); requests go without it",
                                s.agent_id.as_str()
                            ),
                        }
                    }
                }
                let request_id = reply_id(env.request_id);
                info!(
                    "agent {} registering as cluster {}",
                    s.agent_id.as_str(),
                    s.cluster_id.as_str()
                );
                self.push_reply(Reply::RegisterSuccess { request_id });
                Ok(Handled::Consumed)
            }
            AgentMessage::Heartbeat { status, .. } => {
                let draining = status.is_some_and(|st| st == HEARTBEAT_DRAINING);
                let s = &mut self.session;
                if draining && !s.draining {
                    info!("agent {} is draining", s.agent_id.as_str());
                    s.draining = true;
                    s.owe_draining = true;
                }
                self.push_reply(Reply::HeartbeatAck);
                Ok(Handled::Consumed)
            }
            AgentMessage::Pong => Ok(Handled::Consumed),
            AgentMessage::Unknown { type_name } if type_name == "ping" => {
                // Liveness only (already recorded); agents ping with WebSocket control frames.
                Ok(Handled::Consumed)
            }
            AgentMessage::Unknown { type_name } => {
                warn!("agent sent unknown message type {}", type_name);
                Err(self.reject(env.request_id, TunnelError::UnknownType, true))
            }
            AgentMessage::WebSocketStarted {
                stream_id,
                protocol,
            } => self.on_started(stream_id, protocol),
            AgentMessage::ProxyError {
                stream_id,
                error,
                status,
            } => Ok(self.on_proxy_error(stream_id.or(env.request_id), error, status)),
            AgentMessage::WebSocketData(data) => self.on_data(now, data, scratch),
            AgentMessage::WebSocketClose(close) => self.on_close(close),
            AgentMessage::ProxyResponseHeader { status, headers } => {
                let id = self.request_id(&env)?;
                self.on_response_head(id, status, headers, false, None, scratch)
            }
            AgentMessage::ProxyResponse {
                status,
                headers,
                body,
                gzip,
            } => {
                let id = self.request_id(&env)?;
                self.on_response_head(id, status, headers, gzip, Some(body), scratch)
            }
            AgentMessage::ProxyResponseChunk { data } => {
                let id = self.request_id(&env)?;
                self.on_chunk(id, data, scratch)
            }
            AgentMessage::ProxyResponseEnd => {
                let id = self.request_id(&env)?;
                self.on_response_end(id, ClientEnd::ResponseEnd)
            }
            AgentMessage::ProxyResponseAbort { error } => {
                let id = self.request_id(&env)?;
                let message = error.map(|e| truncated(e.chars())).unwrap_or_default();
                self.on_response_end(id, ClientEnd::Abort(message))
            }
            AgentMessage::TcpTunnelData { data } => self.on_tcp_data(&env, data, scratch),
            AgentMessage::TcpTunnelClose { reason, error, .. } => {
                self.on_tcp_close(&env, reason, error)
            }
            other => {
                debug!("agent message {} left to the adapter", env.type_name);
                Ok(Handled::Other(env, other))
            }
        }
    }

    /// The envelope's request id of a response message (required).
    fn request_id<'a>(&mut self, env: &Envelope<'a>) -> Result<JsonStr<'a>, TunnelError> {
        match env.request_id {
            Some(id) => Ok(id),
            None => {
                let error =
                    TunnelError::Decode(crate::wire::DecodeError::MissingField("request_id"));
                Err(self.reject(None, error, true))
            }
        }
    }

    fn on_started<'a>(
        &mut self,
        id: JsonStr<'_>,
        protocol: Option<JsonStr<'_>>,
    ) -> Result<Handled<'a>, TunnelError> {
        let Some(slot) = self.lookup(id) else {
            return self.unknown_stream(id);
        };
        let subprotocol: String<MAX_SUBPROTOCOL> =
            protocol.map(|p| truncated(p.chars())).unwrap_or_default();
        self.started_at(slot, subprotocol)
    }

    /// The agent acknowledged the start of `slot` with `subprotocol`.
    fn started_at<'a>(
        &mut self,
        slot: Slot,
        subprotocol: String<MAX_SUBPROTOCOL>,
    ) -> Result<Handled<'a>, TunnelError> {
        let Some(entry) = self.streams.at_mut(slot) else {
            return Err(TunnelError::UnknownStream);
        };
        let name = truncated(entry.id().as_str().chars());
        if entry.value.kind != StreamKind::WebSocket {
            return Err(self.reject_named(name, TunnelError::Unexpected, false));
        }
        match entry.state() {
            StreamState::Opening => {}
            // The client went away meanwhile: our close is queued or sent.
            StreamState::Closing => return Ok(Handled::Consumed),
            _ => return Err(self.reject_named(name, TunnelError::Unexpected, false)),
        }
        let d = &mut entry.value;
        info!(
            "stream {}: started, subprotocol {}",
            name.as_str(),
            subprotocol.as_str()
        );
        d.owe_started = Some(subprotocol);
        d.deadline = None;
        d.pipe.owe_readable = !d.pipe.to_local.is_empty();
        let _ = self.streams.transition(slot, StreamState::Open);
        Ok(Handled::Consumed)
    }

    fn on_proxy_error<'a>(
        &mut self,
        id: Option<JsonStr<'_>>,
        error: Option<JsonStr<'_>>,
        status: Option<u16>,
    ) -> Handled<'a> {
        let message: String<MAX_FAILURE_MESSAGE> =
            error.map(|e| truncated(e.chars())).unwrap_or_default();
        let Some(slot) = id.and_then(|id| self.lookup(id)) else {
            if id.is_some_and(|id| self.recently_closed.contains(&id)) {
                self.stats.late_messages += 1;
            } else {
                warn!(
                    "agent reported an error for {}: {}",
                    id.unwrap_or(JsonStr::EMPTY),
                    message.as_str()
                );
            }
            return Handled::Consumed;
        };
        self.agent_error_at(slot, message, status);
        Handled::Consumed
    }

    /// The agent reported an error for `slot`: fails the stream before its start, or makes its
    /// coming close an error.
    fn agent_error_at(
        &mut self,
        slot: Slot,
        message: String<MAX_FAILURE_MESSAGE>,
        status: Option<u16>,
    ) {
        let Some(entry) = self.streams.at_mut(slot) else {
            return;
        };
        let state = entry.state();
        warn!(
            "stream {}: agent error (status {}): {}",
            entry.id(),
            status.unwrap_or(502),
            message.as_str()
        );
        let d = &mut entry.value;
        if !d.client_alive {
            return;
        }
        let head_sent = state != StreamState::Opening;
        if !head_sent {
            d.owe_failed = Some(Failure {
                status: status.unwrap_or(502),
                message,
            });
            d.start = None;
            d.deadline = None;
            d.agent_alive = false;
            d.owe_agent_close = None;
            d.owe_cancel = false;
            self.stats.discarded_messages += d.pipe.to_tunnel.clear().0 as u64;
            self.stats.streams_failed += 1;
            let _ = self.streams.transition(slot, StreamState::Closing);
            self.settle(slot);
        } else if d.owe_client_end.is_none() {
            // Started: the agent's close follows; make sure it does not read as success.
            d.owe_client_end = Some(match d.kind {
                StreamKind::WebSocket | StreamKind::Tcp => {
                    ClientEnd::Close(Close::new(1011, message.as_str()))
                }
                StreamKind::Request => ClientEnd::Abort(message),
            });
            if d.kind == StreamKind::Request {
                d.agent_alive = false;
                if state != StreamState::Closing {
                    let _ = self.streams.transition(slot, StreamState::Closing);
                }
                self.settle(slot);
            }
        }
    }

    fn on_data<'a>(
        &mut self,
        now: Instant,
        data: WebSocketData<'_>,
        scratch: &mut [u8],
    ) -> Result<Handled<'a>, TunnelError> {
        let _ = now;
        let Some(slot) = self.lookup(data.stream_id) else {
            return self.unknown_stream(data.stream_id);
        };
        if self
            .streams
            .at(slot)
            .is_some_and(|e| e.value.kind != StreamKind::WebSocket)
        {
            return Err(self.reject(Some(data.stream_id), TunnelError::Unexpected, false));
        }
        let frame = match DataFrame::decode_json(data.data, scratch) {
            Ok(frame) => frame,
            Err(FrameError::BufferTooSmall { needed }) => {
                return Err(TunnelError::ScratchTooSmall { needed });
            }
            Err(e) => return Err(self.reject(Some(data.stream_id), e.into(), true)),
        };
        match frame {
            DataFrame::Text(payload) => self.push_client(slot, MessageKind::Text, payload),
            DataFrame::Binary(payload) => self.push_client(slot, MessageKind::Binary, payload),
            DataFrame::Close(close) => {
                let close =
                    close.map_or_else(|| Close::new(1000, ""), |c| Close::new(c.code, c.reason));
                self.agent_closed(slot, Some(close));
                Ok(Handled::Consumed)
            }
            DataFrame::Ping(_) | DataFrame::Pong(_) => {
                self.stats.control_frames_dropped += 1;
                debug!(
                    "stream {}: ping/pong data frame dropped (answered per hop)",
                    data.stream_id
                );
                Ok(Handled::Consumed)
            }
        }
    }

    /// Queues agent data for the client of `slot` (Blocked when its ring cannot take it).
    fn push_client<'a>(
        &mut self,
        slot: Slot,
        kind: MessageKind,
        payload: &[u8],
    ) -> Result<Handled<'a>, TunnelError> {
        self.push_client_with(slot, kind, payload.len(), || M::from_slice(payload))
    }

    /// Queues agent data of `len` bytes for the client of `slot`; `make` builds its buffer once
    /// it is admitted (a copy, or a share of an owned frame).
    fn push_client_with<'a>(
        &mut self,
        slot: Slot,
        kind: MessageKind,
        len: usize,
        make: impl FnOnce() -> Option<M>,
    ) -> Result<Handled<'a>, TunnelError> {
        let Some(entry) = self.streams.at_mut(slot) else {
            return Err(TunnelError::UnknownStream);
        };
        let opening = entry.state() == StreamState::Opening;
        let d = &mut entry.value;
        if !d.client_alive || d.owe_client_end.is_some() || !d.agent_alive {
            self.stats.discarded_messages += 1;
            debug!("stream {}: data for an ended client discarded", entry.id());
            return Ok(Handled::Consumed);
        }
        match d.pipe.push_from_tunnel(kind, len, !opening, make) {
            Ok(()) => Ok(Handled::Consumed),
            Err(PushRefused::Full) => {
                let blocker = Blocker::Stream {
                    id: entry.id().clone(),
                    bytes: len,
                };
                Err(self.block(blocker))
            }
            Err(PushRefused::Payload) => {
                let id = entry.id().clone();
                let error = TunnelError::PayloadRefused { len };
                warn!("stream {}: rejected: {}", id, error);
                self.stats.bad_messages += 1;
                self.close_both(slot, Close::new(1009, "message too big"));
                Err(error)
            }
        }
    }

    fn on_close<'a>(&mut self, close: WebSocketClose<'_>) -> Result<Handled<'a>, TunnelError> {
        let Some(slot) = self.lookup(close.stream_id) else {
            return self.unknown_stream(close.stream_id);
        };
        let code_close = close.code.map(|code| {
            let reason = close.reason.unwrap_or(JsonStr::EMPTY);
            Close {
                code,
                reason: truncated(reason.chars()),
            }
        });
        self.agent_closed(slot, code_close);
        Ok(Handled::Consumed)
    }

    /// The agent ended the WebSocket stream of `slot` (close code `None`: the PipeOps agent's
    /// code-less close, read as 1000 unless an error came first).
    fn agent_closed(&mut self, slot: Slot, close: Option<Close>) {
        let Some(entry) = self.streams.at_mut(slot) else {
            return;
        };
        let state = entry.state();
        let stream = entry.id().clone();
        let d = &mut entry.value;
        if !d.agent_alive {
            return;
        }
        d.agent_alive = false;
        d.start = None;
        d.owe_agent_close = None;
        d.pipe.reading_stopped = false;
        d.pipe.flow = None;
        d.deadline = None;
        self.stats.discarded_messages += d.pipe.to_tunnel.clear().0 as u64;
        if d.client_alive {
            if state == StreamState::Opening {
                let (status, message) = match &close {
                    Some(c) if !c.reason.is_empty() => (502, c.reason.as_str()),
                    _ => (502, "the agent closed the stream before it started"),
                };
                d.owe_failed = Some(Failure {
                    status,
                    message: truncated(message.chars()),
                });
                self.stats.streams_failed += 1;
            } else if d.owe_client_end.is_none() {
                let close = close.unwrap_or_else(|| Close::new(1000, ""));
                info!("stream {}: closed by agent ({})", stream, close);
                d.owe_client_end = Some(ClientEnd::Close(close));
            }
        }
        if state != StreamState::Closing {
            let _ = self.streams.transition(slot, StreamState::Closing);
        }
        self.settle(slot);
        self.check_unblock();
    }

    /// `proxy_response_header` (`buffered == false`) or a whole `proxy_response`.
    #[allow(clippy::too_many_arguments)]
    fn on_response_head<'a>(
        &mut self,
        id: JsonStr<'a>,
        status: u16,
        headers: crate::wire::Headers<'a>,
        gzip: bool,
        buffered: Option<Option<crate::wire::Base64Str<'_>>>,
        scratch: &mut [u8],
    ) -> Result<Handled<'a>, TunnelError> {
        let Some(slot) = self.lookup(id) else {
            return self.unknown_stream(id);
        };
        let Some(entry) = self.streams.at(slot) else {
            return Err(TunnelError::UnknownStream);
        };
        if entry.value.kind != StreamKind::Request {
            return Err(self.reject(Some(id), TunnelError::Unexpected, false));
        }
        let stream = entry.id().clone();
        match entry.state() {
            StreamState::Opening => {}
            StreamState::Closing if !entry.value.client_alive => {
                self.stats.late_messages += 1;
                return Ok(Handled::Consumed);
            }
            _ => return Err(self.reject(Some(id), TunnelError::Unexpected, false)),
        }
        // A buffered response: decode its body first so a bad one changes nothing.
        let body = match buffered.flatten() {
            None => None,
            Some(b64) => match b64.decode_into(scratch) {
                Ok([]) => None,
                Ok(bytes) => match M::from_slice(bytes) {
                    Some(m) => Some(m),
                    None => {
                        let error = TunnelError::PayloadRefused { len: bytes.len() };
                        return Err(self.reject(Some(id), error, false));
                    }
                },
                Err(FrameError::BufferTooSmall { needed }) => {
                    return Err(TunnelError::ScratchTooSmall { needed });
                }
                Err(e) => return Err(self.reject(Some(id), e.into(), true)),
            },
        };
        let _ = self.streams.transition(slot, StreamState::Open);
        let Some(entry) = self.streams.at_mut(slot) else {
            return Err(TunnelError::UnknownStream);
        };
        let d = &mut entry.value;
        d.deadline = None;
        debug!("request {}: response {}", stream, status);
        if let Some(payload) = body {
            // The ring is empty (nothing comes before a header), which takes any one message.
            if d.pipe
                .to_local
                .push(Message {
                    kind: MessageKind::Binary,
                    payload,
                })
                .is_ok()
            {
                d.pipe.owe_readable = true;
            }
        }
        if buffered.is_some() {
            d.owe_client_end = Some(ClientEnd::ResponseEnd);
            d.agent_alive = false;
            let _ = self.streams.transition(slot, StreamState::Closing);
        }
        Ok(Handled::ResponseHead(ResponseHead {
            stream,
            status,
            headers,
            gzip,
        }))
    }

    fn on_chunk<'a>(
        &mut self,
        id: JsonStr<'_>,
        data: crate::wire::Base64Str<'_>,
        scratch: &mut [u8],
    ) -> Result<Handled<'a>, TunnelError> {
        let Some(slot) = self.lookup(id) else {
            return self.unknown_stream(id);
        };
        let Some(entry) = self.streams.at(slot) else {
            return Err(TunnelError::UnknownStream);
        };
        if entry.value.kind != StreamKind::Request || entry.state() == StreamState::Opening {
            return Err(self.reject(Some(id), TunnelError::Unexpected, false));
        }
        let bytes = match data.decode_into(scratch) {
            Ok(bytes) => bytes,
            Err(FrameError::BufferTooSmall { needed }) => {
                return Err(TunnelError::ScratchTooSmall { needed });
            }
            Err(e) => return Err(self.reject(Some(id), e.into(), true)),
        };
        if bytes.is_empty() {
            return Ok(Handled::Consumed);
        }
        if let Some(entry) = self.streams.at_mut(slot)
            && entry.value.pipe.credited
            && entry.value.agent_alive
            && let Err(e) = entry.value.pipe.credit.on_received(bytes.len())
        {
            self.close_both(slot, Close::new(1008, "flow control violated"));
            return Err(self.reject(Some(id), TunnelError::Credit(e), true));
        }
        self.push_client(slot, MessageKind::Binary, bytes)
    }

    fn on_response_end<'a>(
        &mut self,
        id: JsonStr<'_>,
        end: ClientEnd,
    ) -> Result<Handled<'a>, TunnelError> {
        let Some(slot) = self.lookup(id) else {
            return self.unknown_stream(id);
        };
        let Some(entry) = self.streams.at_mut(slot) else {
            return Err(TunnelError::UnknownStream);
        };
        if entry.value.kind != StreamKind::Request {
            return Err(self.reject(Some(id), TunnelError::Unexpected, false));
        }
        let state = entry.state();
        let d = &mut entry.value;
        if !d.agent_alive {
            self.stats.late_messages += 1;
            return Ok(Handled::Consumed);
        }
        d.agent_alive = false;
        d.start = None;
        d.owe_cancel = false;
        d.deadline = None;
        if d.client_alive {
            if state == StreamState::Opening {
                // Ended before any header: a failure for the client.
                let message = match &end {
                    ClientEnd::Abort(m) if !m.is_empty() => m.clone(),
                    _ => truncated("the agent ended the request without a response".chars()),
                };
                warn!(
                    "request {}: failed before its header: {}",
                    id,
                    message.as_str()
                );
                d.owe_failed = Some(Failure {
                    status: 502,
                    message,
                });
                self.stats.streams_failed += 1;
            } else if d.owe_client_end.is_none() {
                d.owe_client_end = Some(end);
            }
        }
        if state != StreamState::Closing {
            let _ = self.streams.transition(slot, StreamState::Closing);
        }
        self.settle(slot);
        Ok(Handled::Consumed)
    }

    /// A message for a stream that is not live: dropped quietly if it finished recently (a normal
    /// race), rejected otherwise.
    fn unknown_stream<'a>(&mut self, id: JsonStr<'_>) -> Result<Handled<'a>, TunnelError> {
        if self.recently_closed.contains(&id) {
            self.stats.late_messages += 1;
            debug!("stream {}: late message after close dropped", id);
            return Ok(Handled::Consumed);
        }
        Err(self.reject(Some(id), TunnelError::UnknownStream, false))
    }

    fn reject_oversize(
        &mut self,
        env: &Envelope<'_>,
        message: &AgentMessage<'_>,
        error: TunnelError,
    ) -> TunnelError {
        let stream = match message {
            AgentMessage::WebSocketData(d) => Some(d.stream_id),
            AgentMessage::WebSocketClose(c) => Some(c.stream_id),
            AgentMessage::ProxyResponse { .. } | AgentMessage::ProxyResponseChunk { .. } => {
                env.request_id
            }
            AgentMessage::TcpTunnelData { .. } => tcp::tunnel_id(env),
            _ => None,
        };
        if let Some(slot) = stream.and_then(|id| self.lookup(id)) {
            self.close_both(slot, Close::new(1009, "message too big"));
        }
        self.reject(stream.or(env.request_id), error, true)
    }

    /// Ends `slot` on both sides with `close` (requests: aborted and cancelled).
    fn close_both(&mut self, slot: Slot, close: Close) {
        let Some(entry) = self.streams.at_mut(slot) else {
            return;
        };
        let state = entry.state();
        let d = &mut entry.value;
        self.stats.discarded_messages += d.pipe.to_tunnel.clear().0 as u64;
        if d.client_alive && d.owe_client_end.is_none() {
            if state == StreamState::Opening {
                d.owe_failed = Some(Failure {
                    status: 502,
                    message: truncated(close.reason.chars()),
                });
            } else {
                d.owe_client_end = Some(match d.kind {
                    StreamKind::WebSocket | StreamKind::Tcp => ClientEnd::Close(close.clone()),
                    StreamKind::Request => ClientEnd::Abort(truncated(close.reason.chars())),
                });
            }
        }
        if d.agent_alive {
            if d.start.take().is_some() {
                d.agent_alive = false;
            } else if d.kind != StreamKind::Request {
                d.owe_agent_close = Some(close);
            } else {
                d.owe_cancel = true;
            }
        }
        d.deadline = None;
        d.pipe.flow = None;
        d.pipe.reading_stopped = false;
        if state != StreamState::Closing {
            let _ = self.streams.transition(slot, StreamState::Closing);
        }
        self.settle(slot);
        self.check_unblock();
    }

    /// Logs `error`, counts it and, for a malformed message, queues an `error` reply (a reply slot
    /// was reserved on entry).
    fn reject(&mut self, id: Option<JsonStr<'_>>, error: TunnelError, reply: bool) -> TunnelError {
        self.reject_named(reply_id(id), error, reply)
    }

    /// [`reject`](Self::reject) for a message named by `request_id`.
    fn reject_named(
        &mut self,
        request_id: String<MAX_REPLY_ID>,
        error: TunnelError,
        reply: bool,
    ) -> TunnelError {
        warn!(
            "agent message for {} rejected: {}",
            request_id.as_str(),
            error
        );
        self.stats.bad_messages += 1;
        if reply {
            self.push_reply(Reply::Error { request_id, error });
        }
        error
    }

    fn push_reply(&mut self, reply: Reply) {
        // Space was checked on entry to handle_tunnel_message, which queues at most one reply.
        if self.replies.push_back(reply).is_err() {
            error!("reply queue overflow");
        }
    }

    fn block(&mut self, blocker: Blocker) -> TunnelError {
        if self.pause.block(blocker, self.clock) {
            self.stats.tunnel_pauses += 1;
            debug!("tunnel reads paused");
        }
        TunnelError::Blocked
    }

    /// Lifts a tunnel pause once what it waits for is available.
    fn check_unblock(&mut self) {
        let free = match self.pause.blocker() {
            None => return,
            Some(Blocker::Replies) => !self.replies.is_full(),
            Some(Blocker::Stream { id, bytes }) => self.streams.get(id.as_str()).is_none_or(|e| {
                !e.value.client_alive
                    || e.value.owe_client_end.is_some()
                    || e.value.pipe.to_local.can_accept(*bytes)
            }),
        };
        if free {
            self.pause.resume();
            debug!("tunnel reads resumed");
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Tunnel loss and timers

    /// The tunnel connection is gone (or replaced by a newer one from the same cluster): every
    /// stream ends. A stream not started yet gets [`Event::Failed`] with 502 and `reason`; a started
    /// WebSocket gets every message already queued for its client, then [`Event::Closed`] with 1011
    /// and `reason` (never 1000: the client must not mistake it for success); a running request gets
    /// [`Event::ResponseAbort`]. Nothing more is transmitted; the gateway is done and is dropped with
    /// its tunnel once its events are polled.
    pub fn handle_tunnel_lost(&mut self, now: Instant, reason: &str) {
        let _ = now;
        warn!(
            "tunnel of cluster {} lost ({}); ending {} streams",
            self.session.cluster_id.as_str(),
            reason,
            self.streams.len()
        );
        self.session.registered = false;
        self.session.keepalive.stop();
        self.replies.clear();
        self.pause.clear();
        for slot in self.streams.live_slots() {
            let Some(entry) = self.streams.at_mut(slot) else {
                continue;
            };
            let state = entry.state();
            let d = &mut entry.value;
            self.stats.discarded_messages += d.pipe.to_tunnel.clear().0 as u64;
            d.start = None;
            d.owe_agent_close = None;
            d.owe_cancel = false;
            d.deadline = None;
            d.pipe.flow = None;
            d.pipe.reading_stopped = false;
            if d.client_alive && d.agent_alive {
                if state == StreamState::Opening {
                    d.owe_failed = Some(Failure {
                        status: 502,
                        message: truncated(reason.chars()),
                    });
                    self.stats.streams_failed += 1;
                } else if d.owe_client_end.is_none() {
                    d.owe_client_end = Some(match d.kind {
                        StreamKind::WebSocket | StreamKind::Tcp => {
                            ClientEnd::Close(Close::new(1011, reason))
                        }
                        StreamKind::Request => ClientEnd::Abort(truncated(reason.chars())),
                    });
                }
            }
            d.agent_alive = false;
            if state != StreamState::Closing {
                let _ = self.streams.transition(slot, StreamState::Closing);
            }
            self.settle(slot);
        }
    }

    /// Fires every timer due at `now`: ping ([`Event::SendPing`]), the tunnel read deadline
    /// ([`Event::TunnelDead`]; never while the reader is paused: a tunnel we do not read is not
    /// silent), stream start timeouts ([`Event::Failed`] with 504; the agent gets a close or cancel
    /// for it), and the pause limit: the stream that kept the reader paused for
    /// [`Config::pause_limit`] is closed on both sides with a reason, alone.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock = now;
        let c = &self.config;
        let overdue = self.pause.on_timeout(
            now,
            c.pause_limit,
            &mut self.session.keepalive,
            c.read_deadline,
        );
        if overdue {
            self.close_pausing_stream();
        }
        let s = &mut self.session;
        if s.keepalive.handle_timeout(now, self.config.ping_interval) {
            warn!(
                "tunnel of cluster {} silent for {}",
                s.cluster_id.as_str(),
                self.config.read_deadline
            );
        }
        for slot in self.streams.live_slots() {
            let Some(entry) = self.streams.at_mut(slot) else {
                continue;
            };
            if entry.value.deadline.is_none_or(|t| t > now) {
                continue;
            }
            entry.value.deadline = None;
            if entry.state() == StreamState::Opening && entry.value.client_alive {
                warn!(
                    "stream {}: the agent did not answer its start in time",
                    entry.id()
                );
                entry.value.owe_failed = Some(Failure {
                    status: 504,
                    message: truncated("the agent did not answer in time".chars()),
                });
                self.stats.streams_failed += 1;
                let d = &mut entry.value;
                if d.start.take().is_some() {
                    d.agent_alive = false;
                } else if d.kind != StreamKind::Request {
                    d.owe_agent_close = Some(Close::new(1001, "start timed out"));
                } else {
                    d.owe_cancel = true;
                }
                let _ = self.streams.transition(slot, StreamState::Closing);
                self.settle(slot);
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called; `None` if no timer runs.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let streams = self
            .streams
            .iter()
            .filter_map(|(_, e)| e.value.deadline)
            .min();
        let pause = self.pause.limit_at(self.config.pause_limit);
        [self.session.keepalive.next_timeout(), streams, pause]
            .into_iter()
            .flatten()
            .min()
    }

    /// Closes the stream whose client kept the tunnel reader paused past the limit (its queued
    /// messages still reach it, then the close or abort); the reader resumes.
    fn close_pausing_stream(&mut self) {
        let Some(Blocker::Stream { id, .. }) = self.pause.blocker() else {
            return;
        };
        let id = id.clone();
        let Some(slot) = self.streams.find(id.as_str()) else {
            self.check_unblock();
            return;
        };
        let close = crate::flow::stall_close("client", self.config.pause_limit);
        warn!("stream {}: closed: {}", id, close.reason.as_str());
        self.stats.stalled_streams_closed += 1;
        self.close_both(slot, close);
    }

    // ---------------------------------------------------------------------------------------------
    // Outputs

    /// Adapter events, one per call; call after every input until `None`. Tunnel and session events
    /// come first, then stream events round-robin across streams (per stream in the order documented
    /// on [`Event`]).
    pub fn poll_event(&mut self) -> Option<Event> {
        if let Some(flow) = self.pause.take_notice() {
            return Some(match flow {
                Flow::Stop => Event::PauseTunnelReads,
                Flow::Resume => Event::ResumeTunnelReads,
            });
        }
        let s = &mut self.session;
        if s.keepalive.take_dead() {
            return Some(Event::TunnelDead);
        }
        if core::mem::take(&mut s.owe_registered) {
            return Some(Event::Registered {
                agent_id: s.agent_id.clone(),
                extensions: s.extensions,
            });
        }
        if core::mem::take(&mut s.owe_draining) {
            return Some(Event::AgentDraining);
        }
        if s.keepalive.take_ping() {
            return Some(Event::SendPing);
        }
        for slot in self.streams.slots_after(self.event_cursor) {
            if let Some(event) = self.stream_event(slot) {
                self.event_cursor = Some(slot);
                return Some(event);
            }
        }
        None
    }

    fn stream_event(&mut self, slot: Slot) -> Option<Event> {
        let entry = self.streams.at_mut(slot)?;
        let d = &entry.value;
        // Checked before the id is copied: `poll_event` asks every stream once per drain, and
        // most have nothing to say.
        let owes = d.client_alive
            && (d.owe_started.is_some()
                || d.owe_failed.is_some()
                || (d.pipe.owe_readable && !d.pipe.to_local.is_empty())
                || (d.pipe.to_local.is_empty() && d.owe_client_end.is_some())
                || d.pipe.flow.is_some());
        if !owes {
            return None;
        }
        let stream = entry.id().clone();
        let d = &mut entry.value;
        if let Some(subprotocol) = d.owe_started.take() {
            return Some(Event::Started {
                stream,
                subprotocol,
            });
        }
        if let Some(failure) = d.owe_failed.take() {
            d.client_alive = false;
            self.stats.discarded_messages += d.pipe.to_local.clear().0 as u64;
            self.settle(slot);
            return Some(Event::Failed {
                stream,
                status: failure.status,
                message: failure.message,
            });
        }
        if core::mem::take(&mut d.pipe.owe_readable) && !d.pipe.to_local.is_empty() {
            return Some(Event::DataForClient(stream));
        }
        if d.pipe.to_local.is_empty()
            && let Some(end) = d.owe_client_end.take()
        {
            d.client_alive = false;
            self.settle(slot);
            return Some(match end {
                ClientEnd::Close(close) => Event::Closed { stream, close },
                ClientEnd::ResponseEnd => Event::ResponseEnd(stream),
                ClientEnd::Abort(message) => Event::ResponseAbort { stream, message },
            });
        }
        match d.pipe.take_flow()? {
            Flow::Stop => Some(Event::StopReadingClient(stream)),
            Flow::Resume => Some(Event::ResumeReadingClient(stream)),
        }
    }

    /// Encodes the next tunnel message into `buf` and returns its length, or `None` when nothing is
    /// owed. Order: replies (`register_success`, acks, pongs, errors), then per-stream control (the
    /// start, a close once the stream's data is sent, a cancel) round-robin, then data round-robin
    /// across streams, one message per stream per turn. Call after every input until `None`.
    /// `unix_time` stamps the envelope.
    ///
    /// # Errors
    /// [`TransmitError`]: nothing was consumed; with
    /// [`BufferTooSmall`](TransmitError::BufferTooSmall) retry with a buffer of `needed` bytes
    /// ([`max_transmit_len`](Self::max_transmit_len) always fits).
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        unix_time: UnixTime,
        buf: &mut [u8],
    ) -> Result<Option<usize>, TransmitError> {
        Ok(self
            .next_transmit(now, unix_time, buf, false)?
            .map(|t| match t {
                Transmit::Encoded(n) => n,
                Transmit::Data { .. } => unreachable!("a copying transmit never yields Data"),
            }))
    }

    /// [`poll_transmit`](Self::poll_transmit) without copying payloads: a native data message
    /// comes out as [`Transmit::Data`], its header and its buffer as queued (send the header
    /// followed by the payload as one binary message); everything else is encoded into `buf` as
    /// [`Transmit::Encoded`]. Same order and the same errors.
    ///
    /// # Errors
    /// As [`poll_transmit`](Self::poll_transmit).
    pub fn poll_transmit_owned(
        &mut self,
        now: Instant,
        unix_time: UnixTime,
        buf: &mut [u8],
    ) -> Result<Option<Transmit<M>>, TransmitError> {
        self.next_transmit(now, unix_time, buf, true)
    }

    fn next_transmit(
        &mut self,
        now: Instant,
        unix_time: UnixTime,
        buf: &mut [u8],
        owned: bool,
    ) -> Result<Option<Transmit<M>>, TransmitError> {
        if let Some(reply) = self.replies.front() {
            let n = self.encode_reply(reply, unix_time, buf)?;
            if let Some(Reply::RegisterSuccess { .. }) = self.replies.pop_front()
                && !self.session.registered
            {
                self.session.registered = true;
                self.session.owe_registered = true;
            }
            self.check_unblock();
            return Ok(Some(Transmit::Encoded(n)));
        }
        if let Some(n) = engine::transmit_ack(&mut self.window, buf)? {
            return Ok(Some(Transmit::Encoded(n)));
        }
        for slot in self.streams.slots_after(self.control_cursor) {
            if let Some(n) = self.transmit_control(slot, unix_time, buf)? {
                self.control_cursor = Some(slot);
                return Ok(Some(Transmit::Encoded(n)));
            }
        }
        // Interactive messages (small ones) first, then everything, round-robin both times.
        for interactive in [true, false] {
            for slot in self.streams.slots_after(self.data_cursor) {
                if interactive && !self.is_interactive(slot) {
                    continue;
                }
                if let Some(t) = self.transmit_data(slot, now, unix_time, buf, owned)? {
                    self.data_cursor = Some(slot);
                    return Ok(Some(t));
                }
            }
        }
        Ok(None)
    }

    fn encode_reply(
        &self,
        reply: &Reply,
        unix: UnixTime,
        buf: &mut [u8],
    ) -> Result<usize, TransmitError> {
        let n = match reply {
            Reply::RegisterSuccess { request_id } => ControlMessage::RegisterSuccess {
                cluster_id: WireStr::Plain(self.session.cluster_id.as_str()),
                gateway_ws_url: None,
                extensions: self.config.extensions,
            }
            .encode(Some(WireStr::Plain(request_id.as_str())), unix, buf)?,
            Reply::HeartbeatAck => ControlMessage::HeartbeatAck.encode(None, unix, buf)?,
            Reply::Error { request_id, error } => {
                let mut text = String::<192>::new();
                let _ = write!(text, "{error}");
                ControlMessage::Error {
                    error: WireStr::Plain(text.as_str()),
                }
                .encode(Some(WireStr::Plain(request_id.as_str())), unix, buf)?
            }
        };
        Ok(n)
    }

    fn transmit_control(
        &mut self,
        slot: Slot,
        unix: UnixTime,
        buf: &mut [u8],
    ) -> Result<Option<usize>, TransmitError> {
        let ext = self.session.extensions;
        let Some(entry) = self.streams.at_mut(slot) else {
            return Ok(None);
        };
        let stream = entry.id().clone();
        let d = &mut entry.value;
        if let Some(start) = &d.start {
            let bytes = start.as_bytes();
            let dst = buf
                .get_mut(..bytes.len())
                .ok_or(TransmitError::BufferTooSmall {
                    needed: bytes.len(),
                })?;
            dst.copy_from_slice(bytes);
            let n = bytes.len();
            d.start = None;
            return Ok(Some(n));
        }
        if d.is_native() {
            return self.transmit_native_control(slot, buf);
        }
        let id = WireStr::Plain(stream.as_str());
        if let Some(close) = d
            .owe_agent_close
            .as_ref()
            .filter(|_| d.pipe.to_tunnel.is_empty())
        {
            let n = if d.kind == StreamKind::Tcp {
                tcp::close_message(id, close).encode(Some(id), unix, buf)?
            } else {
                let frame = CloseFrame {
                    code: close.code,
                    reason: close.reason.as_str(),
                };
                ControlMessage::WebSocketClose {
                    stream_id: id,
                    close: ext.websocket_close_code.then_some(frame),
                }
                .encode(Some(id), unix, buf)?
            };
            d.owe_agent_close = None;
            d.agent_alive = false;
            self.settle(slot);
            return Ok(Some(n));
        }
        let receiving = d.client_alive && d.agent_alive && d.owe_client_end.is_none();
        if let Some(grant) = d
            .pipe
            .credit
            .grant_due()
            .filter(|_| d.pipe.credited && receiving && !d.owe_cancel)
        {
            let n = ControlMessage::ProxyResponseCredit {
                bytes: grant.bytes,
                messages: grant.messages,
            }
            .encode(Some(id), unix, buf)?;
            d.pipe.credit.on_granted(grant);
            return Ok(Some(n));
        }
        if d.owe_cancel {
            let n = ControlMessage::ProxyCancel.encode(Some(id), unix, buf)?;
            d.owe_cancel = false;
            d.agent_alive = false;
            self.settle(slot);
            return Ok(Some(n));
        }
        Ok(None)
    }

    fn transmit_data(
        &mut self,
        slot: Slot,
        now: Instant,
        unix: UnixTime,
        buf: &mut [u8],
        owned: bool,
    ) -> Result<Option<Transmit<M>>, TransmitError> {
        let Some(entry) = self.streams.at(slot) else {
            return Ok(None);
        };
        if entry.value.start.is_some() || entry.value.pipe.to_tunnel.is_empty() {
            return Ok(None);
        }
        if entry.value.is_native() {
            return self.transmit_native_data(slot, now, buf, owned);
        }
        let Some(message) = entry.value.pipe.to_tunnel.front() else {
            return Ok(None);
        };
        let bytes = message.payload.as_bytes();
        let id = WireStr::Plain(entry.id().as_str());
        let n = if entry.value.kind == StreamKind::Tcp {
            ControlMessage::TcpTunnelData {
                tunnel_id: id,
                data: bytes,
            }
            .encode(Some(id), unix, buf)?
        } else {
            let frame = match message.kind {
                MessageKind::Text => DataFrame::Text(bytes),
                MessageKind::Binary => DataFrame::Binary(bytes),
            };
            ControlMessage::WebSocketData {
                stream_id: id,
                frame,
            }
            .encode(Some(id), unix, buf)?
        };
        self.stats.bytes_to_agent += bytes.len() as u64;
        let _ = self.sent_front(slot);
        Ok(Some(Transmit::Encoded(n)))
    }

    /// The front message toward the agent of `slot` was sent: takes it out (returned) and lets
    /// the client be read again once the ring is below half.
    fn sent_front(&mut self, slot: Slot) -> Option<Message<M>> {
        engine::sent_front(&mut self.streams, &mut self.budget, slot)
    }

    // ---------------------------------------------------------------------------------------------
    // Helpers

    /// Frees `slot` if it is closing and owes nothing to either side.
    fn settle(&mut self, slot: Slot) {
        let done = self
            .streams
            .at(slot)
            .is_some_and(|e| e.state() == StreamState::Closing && e.value.is_settled());
        if !done {
            return;
        }
        if let Ok(Some(entry)) = self.streams.transition(slot, StreamState::Closed) {
            debug!("stream {}: freed", entry.id());
            if entry.value.pipe.budget_stopped {
                self.budget.on_unstopped();
            }
            self.recently_closed.remember(entry.id().clone());
            self.stats.streams_closed += 1;
            self.check_unblock();
        }
    }

    /// The live stream named by a JSON string (escapes allowed).
    fn lookup(&self, id: JsonStr<'_>) -> Option<Slot> {
        let mut buf = [0u8; MAX_STREAM_ID_LEN];
        id.to_str(&mut buf)
            .ok()
            .and_then(|id| self.streams.find(id))
    }
}

fn reply_id(id: Option<JsonStr<'_>>) -> String<MAX_REPLY_ID> {
    id.map(|id| truncated(id.chars())).unwrap_or_default()
}

/// `Bearer <token>` for a registered `k8s_service_token`, when it fits and is a valid header value.
fn bearer_of(token: crate::wire::JsonStr<'_>) -> Option<String<MAX_BEARER>> {
    let mut bearer = String::new();
    bearer.push_str("Bearer ").ok()?;
    for c in token.chars() {
        bearer.push(c).ok()?;
    }
    crate::relay::validate_header_value(bearer.chars()).ok()?;
    Some(bearer)
}
