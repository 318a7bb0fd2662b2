//! The agent-side relay: kubectl WebSocket streams between the tunnel and the Kubernetes API.
//!
//! [`Relay`] is sans-IO. The adapter owns the tunnel WebSocket and one upstream WebSocket per
//! stream, and drives the relay:
//!
//! * **Inputs**: [`start_session`](Relay::start_session) once connected;
//!   [`handle_tunnel_message`](Relay::handle_tunnel_message) for every tunnel WebSocket message;
//!   [`handle_tunnel_activity`](Relay::handle_tunnel_activity) for tunnel pongs;
//!   [`handle_upstream_started`](Relay::handle_upstream_started) /
//!   [`handle_upstream_failed`](Relay::handle_upstream_failed) after dialling a stream;
//!   [`handle_upstream_message`](Relay::handle_upstream_message) for every upstream data message;
//!   [`handle_upstream_closed`](Relay::handle_upstream_closed) when an upstream socket is gone;
//!   [`handle_timeout`](Relay::handle_timeout) when [`poll_timeout`](Relay::poll_timeout) passes;
//!   [`handle_tunnel_lost`](Relay::handle_tunnel_lost) when the tunnel connection is gone;
//!   [`start_stream`](Relay::start_stream) / [`close_stream`](Relay::close_stream) to start or
//!   close a stream the way `proxy_websocket_start` / `proxy_websocket_close` would, for WebSocket
//!   upgrades that arrived as `proxy_request` (see the `request` module).
//! * **Outputs**, polled after every input until they return `None`:
//!   [`poll_transmit`](Relay::poll_transmit) (tunnel messages), [`poll_event`](Relay::poll_event)
//!   (what the adapter must do), [`pop_upstream`](Relay::pop_upstream) (messages for an upstream
//!   socket, after [`Event::DataForUpstream`]), and [`poll_timeout`](Relay::poll_timeout).
//!
//! # Stream sequence
//!
//! `proxy_websocket_start` is validated (stream id, Kubernetes API path, query, headers,
//! subprotocols), the stream is registered `Opening`, and the request is returned as
//! [`Handled::Start`]: the relay keeps no borrowed strings, so the adapter dials from that view at
//! once. Data arriving while the dial runs is queued. Then either the upstream answers 101
//! ([`handle_upstream_started`](Relay::handle_upstream_started): stream `Open`, a
//! `proxy_websocket_started` with the negotiated subprotocol goes out if the control plane
//! advertised that extension) or it refuses
//! ([`handle_upstream_failed`](Relay::handle_upstream_failed): `proxy_error` with the message, plus
//! the HTTP status with the `proxy_error_status` extension, then `proxy_websocket_close`). Data
//! flows both ways as whole messages with their kind. Either side may close: the other side gets
//! every queued message first, then the close with its code and reason (code and reason reach the
//! control plane only with the `websocket_close_code` extension). A close from the tunnel is echoed
//! with `proxy_websocket_close` once the upstream reports closed.
//!
//! Pings are answered per hop: the adapter answers the upstream's and the tunnel's WebSocket pings;
//! a ping or pong *data frame* (opcode 9/10) from the tunnel is dropped and counted
//! ([`Stats::control_frames_dropped`]), never relayed. An application `ping` envelope gets `pong`.
//!
//! # Backpressure (never drop)
//!
//! Each stream has a ring per direction (`RING` messages and [`Config::ring_bytes`]).
//! * Upstream to tunnel: a full ring hands the message back ([`SendError::Full`]) and emits
//!   [`Event::StopReadingUpstream`] for that stream only; [`Event::ResumeReadingUpstream`] follows
//!   when the ring has drained below half. Other streams are unaffected.
//! * Tunnel to upstream: compat mode has no per-stream flow control, so a message whose ring is
//!   full is refused with [`TunnelError::Blocked`] *without being consumed* and
//!   [`Event::PauseTunnelReads`] is emitted; the adapter stops reading the tunnel (head-of-line
//!   blocking for every stream, counted in [`Stats::tunnel_pauses`]) and hands the same message in
//!   again after [`Event::ResumeTunnelReads`], which comes once the ring can take it.
//! * Native mode (both ends advertised [`Extensions::native`]): streams travel as binary frames
//!   with per-stream credit (see [`crate::credit`] and the `native` module): the control plane
//!   only sends what the stream's ring can take, so the tunnel is never paused; a stream without
//!   credit waits (counted in [`Stats::credit_stalls`] and [`Stats::credit_blocked_micros`]) while
//!   the others keep flowing.
//! * Scheduling: small messages (at most [`crate::credit::INTERACTIVE_MAX`] bytes: tty input,
//!   resizes) go out before bulk data; streams share the tunnel round-robin within each class.
//!
//! # Bad input
//!
//! Every malformed or refused tunnel message returns a [`TunnelError`], queues a `proxy_error` to
//! the control plane naming the stream (or the message's request id), logs a warning with the
//! stream id, and changes nothing else: other streams, their queued data and their order are
//! untouched. Unknown types are answered with `protocol_fallback` (once per type name) instead of
//! `proxy_error`.
//!
//! # Raw TCP tunnels
//!
//! `tcp_tunnel_start` / `tcp_tunnel_data` / `tcp_tunnel_close` use the same table, rings and events;
//! see [`Relay::start_tcp_tunnel`] and the `tcp` module docs (sequence, splitting, close reasons).

mod config;
mod error;
mod event;
mod native;
mod session;
mod stream;
mod tcp;
mod validate;

#[cfg(test)]
mod tests;

use core::fmt::Write as _;

use heapless::{Deque, String};

use crate::budget::Budget;
use crate::flow::TunnelPause;
use crate::keepalive::Keepalive;
use crate::recent::RecentlyClosed;
use crate::ring::DEFAULT_RING_MESSAGES;
use crate::stream_id::{MAX_STREAM_ID_LEN, StreamId, StreamIdError};
use crate::table::{InsertError, Slot, StreamState, StreamTable};
use crate::time::Instant;
use crate::wire::json::Value;
use crate::wire::{
    CloseFrame, DataFrame, Envelope, Extensions, FrameError, HEARTBEAT_DRAINING, Headers,
    Heartbeat, Inbound, JsonStr, Limits, Outbound, ProtocolFallback, Register, UnixTime,
    WebSocketClose, WebSocketData, WebSocketStart, WireStr,
};

pub use config::{Config, DEFAULT_MAX_MESSAGE};
pub use error::{SendError, TransmitError, TunnelError, UpstreamError};
pub use event::{
    Close, Event, MAX_CLOSE_REASON, MAX_FAILURE_MESSAGE, MAX_SUBPROTOCOL, Message, MessageKind,
    PayloadBuf, Transmit,
};
pub use session::SessionInfo;
pub use tcp::{MAX_TCP_HOST, TcpCloseReason, TcpTunnelRequest};
pub use validate::{
    RequestError, validate_header_name, validate_header_value, validate_path, validate_query,
    validate_subprotocol, validate_subprotocol_list, validate_upgrade,
};

use crate::engine::{self, PushRefused, Window};
use crate::flow::Flow;
use event::truncated;
use session::Session;
use stream::{Failure, StreamData};

/// Replies to tunnel messages (pong, errors, fallbacks) that can wait for `poll_transmit`; when
/// full, tunnel messages are refused with [`TunnelError::Blocked`] until one is sent.
const REPLY_QUEUE: usize = 8;
/// Unknown type names remembered for "one `protocol_fallback` per type".
const FALLBACK_TYPES: usize = 8;
/// Recently freed stream ids whose late messages are dropped quietly instead of answered as
/// unknown.
const RECENTLY_CLOSED: usize = 16;
/// Longest request id echoed in a reply.
const MAX_REPLY_ID: usize = 128;
/// Longest unknown type name echoed in `protocol_fallback`.
const MAX_TYPE_NAME: usize = 64;

/// Counters for metrics. Monotonic for the life of the relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Stats {
    /// Streams registered by a start.
    pub streams_opened: u64,
    /// Streams finished and freed.
    pub streams_closed: u64,
    /// Times the tunnel reader was paused because a stream's ring toward the upstream (or the reply
    /// queue) was full: head-of-line blocking in compat mode.
    pub tunnel_pauses: u64,
    /// Streams closed because their upstream kept the tunnel paused past the pause limit.
    pub stalled_streams_closed: u64,
    /// Tunnel messages rejected with an error.
    pub bad_messages: u64,
    /// Ping/pong data frames from the tunnel, dropped (pings are answered per hop).
    pub control_frames_dropped: u64,
    /// Messages for a recently closed stream, dropped quietly.
    pub late_messages: u64,
    /// Queued messages discarded because their destination closed first.
    pub discarded_messages: u64,
    /// Times a native stream had data to send and no credit (its consumer on the control plane
    /// was slower than its producer).
    pub credit_stalls: u64,
    /// Total time native streams spent with data to send and no credit, in microseconds.
    pub credit_blocked_micros: u64,
}

/// A validated `proxy_websocket_start`, borrowing the tunnel message. Dial the upstream from it
/// before handing in the next tunnel message, then report with
/// [`Relay::handle_upstream_started`] or [`Relay::handle_upstream_failed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartRequest<'a> {
    /// The stream, registered as `Opening`.
    pub stream: StreamId,
    /// Kubernetes API path, validated by [`validate_path`] (unescape with [`JsonStr::to_str`]).
    pub path: JsonStr<'a>,
    /// Raw query string without `?`, validated by [`validate_query`]; empty when absent.
    pub query: JsonStr<'a>,
    /// Headers to forward, each name and value validated (no CR, LF, NUL).
    pub headers: Headers<'a>,
    /// Offered subprotocols from the `protocol` field, comma separated, validated. More may be
    /// offered in the `Sec-WebSocket-Protocol` header (also validated). For a raw upgrade: the
    /// `X-Stream-Protocol-Version`s to offer.
    pub protocol: Option<JsonStr<'a>>,
    /// A raw (non-WebSocket) upgrade, validated by [`validate_upgrade`]: dial with this method
    /// and `Upgrade` token, report the upstream's 101 with its chosen protocol, then move bytes
    /// (as binary messages whose boundaries mean nothing). `None` for a WebSocket.
    pub upgrade: Option<RawUpgrade>,
}

/// The method and `Upgrade` token of a raw upgrade (see [`StartRequest::upgrade`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawUpgrade {
    /// `GET` or `POST`.
    pub method: heapless::String<8>,
    /// The `Upgrade` token, e.g. `SPDY/3.1`.
    pub token: heapless::String<MAX_UPGRADE_TOKEN>,
}

/// Longest `Upgrade` token a raw upgrade may name.
pub const MAX_UPGRADE_TOKEN: usize = 32;

/// What [`Relay::handle_tunnel_message`] did with a message.
// Borrowed views returned by value, consumed at once; no allocator to box the large variant.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handled<'a> {
    /// A stream start: dial it now.
    Start(StartRequest<'a>),
    /// Consumed; only the `poll_*` outputs may have changed.
    Consumed,
    /// A message the relay does not handle (HTTP `proxy_request`, tunnels, `gateway_hello`,
    /// `register_success` details such as `gateway_ws_url`, `error`, ...): up to the adapter.
    /// Session effects (registration, liveness) were already applied.
    Other(Envelope<'a>, Inbound<'a>),
}

/// What the tunnel reader is waiting for after [`TunnelError::Blocked`].
#[derive(Debug)]
enum Blocker {
    /// A free slot in the reply queue.
    Replies,
    /// Room for `bytes` in the ring toward the upstream of stream `id`.
    Stream { id: StreamId, bytes: usize },
    /// Room for `pieces` messages holding `bytes` in all in the ring toward tunnel `id`.
    Pieces {
        id: StreamId,
        bytes: usize,
        pieces: usize,
    },
}

/// A reply owed to the control plane, not tied to a live stream.
#[derive(Debug)]
enum Reply {
    Pong {
        request_id: String<MAX_REPLY_ID>,
    },
    Error {
        request_id: String<MAX_REPLY_ID>,
        stream: bool,
        error: TunnelError,
    },
    Fallback {
        type_name: String<MAX_TYPE_NAME>,
        request_id: String<MAX_REPLY_ID>,
    },
    /// `tcp_tunnel_close` for a tunnel that has no slot (refused start, unknown tunnel).
    TcpClose {
        tunnel_id: String<MAX_REPLY_ID>,
        reason: &'static str,
        error: &'static str,
    },
}

/// The agent-side relay for up to `STREAMS` concurrent streams, each with two rings of `RING`
/// messages of type `M`. See the [module docs](self) for the driving contract.
///
/// # Memory
///
/// Without tether-core's `alloc` feature everything is inline: about
/// `STREAMS * (2 * RING * size_of::<Message<M>>() + 700)` bytes plus about 4.5 KiB of session and
/// reply state, whether streams are live or not. With a 24-byte owned buffer (`Message<M>` = 32
/// bytes) and the default `RING` of 100 each stream slot costs about 7 KiB; an embedded build
/// storing `heapless::Vec<u8, 512>` with `RING = 4` costs about 4.8 KiB per stream. With `alloc`
/// (std adapters) the table and the rings live on the heap and grow with use: a slot is about
/// 800 bytes plus what its rings hold, and `STREAMS` is only a limit. The
/// `memory_footprint_matches_the_docs` tests pin these figures.
pub struct Relay<M, const STREAMS: usize, const RING: usize = DEFAULT_RING_MESSAGES> {
    config: Config,
    streams: StreamTable<StreamData<M, RING>, STREAMS>,
    session: Session,
    replies: Deque<Reply, REPLY_QUEUE>,
    fallbacks: heapless::Vec<String<MAX_TYPE_NAME>, FALLBACK_TYPES>,
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
    /// The agent is shutting down: said in every heartbeat to a Tether control plane.
    draining: bool,
    stats: Stats,
}

impl Stats {
    /// All counters at zero (as `Default`, usable in `const` contexts).
    pub const ZERO: Self = Self {
        streams_opened: 0,
        streams_closed: 0,
        tunnel_pauses: 0,
        stalled_streams_closed: 0,
        bad_messages: 0,
        control_frames_dropped: 0,
        late_messages: 0,
        discarded_messages: 0,
        credit_stalls: 0,
        credit_blocked_micros: 0,
    };
}

impl<M: PayloadBuf, const STREAMS: usize, const RING: usize> Relay<M, STREAMS, RING> {
    /// A relay with no session and no stream. `const`, so an embedded target can place a relay in a
    /// `static` without building it on the stack first.
    #[must_use]
    pub const fn new(config: Config) -> Self {
        Self {
            config,
            streams: StreamTable::new(),
            session: Session::new(),
            replies: Deque::new(),
            fallbacks: heapless::Vec::new(),
            recently_closed: RecentlyClosed::new(),
            pause: TunnelPause::new(),
            clock: Instant::from_micros(0),
            budget: Budget::new(config.global_bytes),
            window: Window::new(),
            control_cursor: None,
            data_cursor: None,
            event_cursor: None,
            draining: false,
            stats: Stats::ZERO,
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

    /// The extensions this relay offers: [`Config::extensions`], without `native_tcp` when a
    /// TCP data frame of [`NATIVE_TCP_PIECE`](crate::wire::native::NATIVE_TCP_PIECE) bytes
    /// would not fit one `M` or one tunnel message (an embedded agent: compat tunnel data is
    /// split to fit its buffers, native frames cannot be).
    fn offered(&self) -> Extensions {
        use crate::wire::native::{HEADER_LEN, NATIVE_TCP_PIECE};
        let mut ext = self.config.extensions;
        ext.native_tcp &= M::max_len() >= NATIVE_TCP_PIECE
            && self.config.max_message >= NATIVE_TCP_PIECE + HEADER_LEN;
        ext
    }

    /// Extensions in use on this session (none before `register_success`).
    #[must_use]
    pub const fn extensions(&self) -> Extensions {
        self.session.extensions
    }

    /// Messages and bytes queued in every stream's rings, both directions.
    #[must_use]
    pub fn ring_occupancy(&self) -> crate::ring::RingOccupancy {
        let mut total = crate::ring::RingOccupancy::default();
        for (_, entry) in self.streams.iter() {
            total.add(&entry.value.pipe.to_local);
            total.add(&entry.value.pipe.to_tunnel);
        }
        total
    }

    /// Number of live streams.
    #[must_use]
    pub const fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// State of the live stream `stream`.
    #[must_use]
    pub fn stream_state(&self, stream: &str) -> Option<StreamState> {
        self.streams.get(stream).map(crate::table::Entry::state)
    }

    /// A buffer size for [`poll_transmit`](Self::poll_transmit) that fits any message the relay
    /// produces: a data message of [`Config::max_message`] bytes plus envelope overhead.
    #[must_use]
    pub fn max_transmit_len(&self) -> usize {
        // Envelope, type, ids (escaped up to 6 bytes per byte) and timestamp, generously.
        crate::wire::b64::encoded_len(self.config.max_message.saturating_add(1))
            .saturating_add(2048)
    }

    // ---------------------------------------------------------------------------------------------
    // Session

    /// Starts a session on a freshly connected tunnel: queues `register` and arms the ping and
    /// read-deadline timers. Call once per tunnel connection, after
    /// [`handle_tunnel_lost`](Self::handle_tunnel_lost) for the previous one.
    pub fn start_session(&mut self, now: Instant, info: SessionInfo) {
        self.clock = now;
        self.session = Session {
            info,
            register_pending: true,
            keepalive: Keepalive::armed(now, self.config.ping_interval, self.config.read_deadline),
            ..Session::default()
        };
        self.window = Window::new();
        self.fallbacks.clear();
    }

    /// The agent is shutting down: from now on every `heartbeat` says `status: "draining"` to a
    /// control plane that advertised Tether extensions, starting with one sent at once, so it
    /// routes new streams to another agent of the cluster. A PipeOps control plane keeps seeing
    /// `healthy`. Live streams are untouched; refusing new ones is the adapter's choice (see
    /// [`is_draining`](Self::is_draining)). Lasts for the relay's life, across sessions.
    pub fn start_draining(&mut self) {
        if !self.draining {
            info!("draining: telling the control plane to send new streams elsewhere");
        }
        self.draining = true;
        if self.session.registered {
            self.session.heartbeat_pending = true;
        }
    }

    /// Whether [`start_draining`](Self::start_draining) was called.
    #[must_use]
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Records that the tunnel showed signs of life (a WebSocket ping or pong, or any frame the
    /// adapter does not hand to [`handle_tunnel_message`](Self::handle_tunnel_message)): pushes
    /// the read deadline and the next ping back (only a quiet control plane is pinged). Every
    /// handled tunnel message does this too.
    pub fn handle_tunnel_activity(&mut self, now: Instant) {
        self.clock = now;
        self.session
            .keepalive
            .heard(now, self.config.read_deadline, self.config.ping_interval);
    }

    /// The tunnel connection is gone. Every stream is closed: its upstream gets
    /// [`Event::CloseUpstream`] with 1001 (if it has one), queued data is discarded (its sender or
    /// receiver is gone with the tunnel), and nothing more is sent for it. The session ends; call
    /// [`start_session`](Self::start_session) on the next connection.
    pub fn handle_tunnel_lost(&mut self, now: Instant) {
        let _ = now;
        warn!("tunnel lost; closing {} streams", self.streams.len());
        self.session = Session {
            info: core::mem::take(&mut self.session.info),
            ..Session::default()
        };
        self.replies.clear();
        self.pause.clear();
        for slot in self.streams.live_slots() {
            let Some(entry) = self.streams.at_mut(slot) else {
                continue;
            };
            let d = &mut entry.value;
            d.tunnel_gone = true;
            d.tunnel_closed = true;
            d.owe_started = false;
            d.owe_failed = None;
            d.owe_close = None;
            d.pipe.owe_readable = false;
            d.pipe.reading_stopped = false;
            d.pipe.flow = None;
            let discarded = d.pipe.to_tunnel.clear().0 + d.pipe.to_local.clear().0;
            d.owe_close_upstream = d.upstream_alive.then(|| Close::new(1001, "tunnel lost"));
            self.stats.discarded_messages += discarded as u64;
            if entry.state() != StreamState::Closing {
                let _ = self.streams.transition(slot, StreamState::Closing);
            }
            self.settle(slot);
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Tunnel input

    /// Handles one tunnel WebSocket message (a text frame, or JSON in a binary frame).
    ///
    /// `scratch` receives decoded data frames; it must hold [`Config::max_message`] bytes. A data
    /// message is copied out of it into an `M` before this returns.
    ///
    /// # Errors
    /// See [`TunnelError`]: [`Blocked`](TunnelError::Blocked) and
    /// [`ScratchTooSmall`](TunnelError::ScratchTooSmall) leave the message unconsumed (hand it in
    /// again); every other error consumed and rejected it, with a `proxy_error` (or
    /// `protocol_fallback`) queued and nothing else changed.
    pub fn handle_tunnel_message<'a>(
        &mut self,
        now: Instant,
        frame: &'a [u8],
        scratch: &mut [u8],
    ) -> Result<Handled<'a>, TunnelError> {
        self.handle_tunnel_activity(now);
        // Every rejection needs a reply slot; refuse up front rather than lose a reply.
        if self.replies.is_full() {
            return Err(self.block(Blocker::Replies));
        }
        if self.session.extensions.native && crate::wire::native::is_native(frame) {
            return self.handle_native(now, frame);
        }
        // Parse without the size limit so an oversize message can still be answered by stream id.
        let limits = Limits {
            max_len: usize::MAX,
            ..Limits::DEFAULT
        };
        let env = match Envelope::parse_with(frame, &limits) {
            Ok(env) => env,
            Err(e) => return Err(self.reject(None, false, e.into())),
        };
        let inbound = match env.inbound() {
            Ok(inbound) => inbound,
            Err(e) => return Err(self.reject(env.request_id, false, e.into())),
        };
        if frame.len() > self.config.max_message {
            let error = TunnelError::TooLarge {
                len: frame.len(),
                max: self.config.max_message,
            };
            return Err(self.reject_oversize(now, &env, &inbound, error));
        }
        match inbound {
            Inbound::WebSocketStart(start) => self.on_start(now, &env, start),
            Inbound::WebSocketData(data) => self.on_data(now, data, scratch),
            Inbound::WebSocketClose(close) => self.on_close(now, close),
            Inbound::TcpTunnelData { tunnel_id, data } => {
                self.on_tcp_data(now, &env, tunnel_id, data, scratch)
            }
            Inbound::TcpTunnelClose { tunnel_id, reason } => {
                self.on_tcp_close(now, &env, tunnel_id, reason)
            }
            Inbound::Ping => {
                let request_id = env
                    .request_id
                    .map(|id| truncated(id.chars()))
                    .unwrap_or_default();
                self.push_reply(Reply::Pong { request_id });
                Ok(Handled::Consumed)
            }
            Inbound::Pong | Inbound::HeartbeatAck(_) | Inbound::RegisterInProgress(_) => {
                Ok(Handled::Consumed)
            }
            Inbound::RegisterSuccess(ok) => {
                let ours = self.offered();
                let s = &mut self.session;
                s.registered = true;
                s.cluster_id = truncated(ok.cluster_id.chars());
                let theirs = ok.extensions;
                s.extensions = ours.common(theirs);
                if s.extensions.native && s.extensions.native_ack {
                    self.window.enable();
                }
                s.owe_registered = true;
                s.next_heartbeat = Some(now + self.config.heartbeat_interval);
                info!("registered as cluster {}", s.cluster_id.as_str());
                Ok(Handled::Other(env, inbound))
            }
            Inbound::Unknown { type_name } => Err(self.on_unknown_type(&env, type_name)),
            other => Ok(Handled::Other(env, other)),
        }
    }

    fn on_start<'a>(
        &mut self,
        now: Instant,
        env: &Envelope<'a>,
        start: WebSocketStart<'a>,
    ) -> Result<Handled<'a>, TunnelError> {
        let id = match stream_id(start.stream_id) {
            Ok(id) => id,
            Err(e) => return Err(self.reject(env.request_id, false, e.into())),
        };
        let request = StartFields {
            path: start.path,
            query: start.query,
            headers: start.headers,
            protocol: start.protocol,
            method: start.method,
            upgrade: start.upgrade,
        };
        self.open_stream(now, id, request).map(Handled::Start)
    }

    /// Starts stream `stream` without a tunnel message, exactly as a `proxy_websocket_start` with
    /// these fields would: `path`, `query` (raw, without `?`; empty for none), `headers` and the
    /// offered subprotocols `protocol` are validated, the stream is registered `Opening`, and the
    /// request to dial is returned (as [`Handled::Start`] would carry it). For upgrades that
    /// arrived as `proxy_request`, e.g. from [`RequestStart`](crate::request::RequestStart)'s
    /// fields.
    ///
    /// # Errors
    /// [`TunnelError::Blocked`] when the reply queue is full (nothing changed; drain
    /// [`poll_transmit`](Self::poll_transmit)). Otherwise, as for a tunnel start, a refusal
    /// ([`TunnelError::Request`] for an invalid path, query, header or subprotocol,
    /// [`TunnelError::DuplicateStream`], [`TunnelError::TooManyStreams`]) queues a `proxy_error`
    /// naming the stream and changes nothing else: a live stream with the same id is untouched.
    pub fn start_stream<'a>(
        &mut self,
        now: Instant,
        stream: &StreamId,
        path: JsonStr<'a>,
        query: JsonStr<'a>,
        headers: Headers<'a>,
        protocol: Option<JsonStr<'a>>,
    ) -> Result<StartRequest<'a>, TunnelError> {
        self.clock = now;
        // A refusal needs a reply slot; refuse up front rather than lose a reply.
        if self.replies.is_full() {
            return Err(self.block(Blocker::Replies));
        }
        let request = StartFields {
            path: Some(path),
            query: (!query.is_empty()).then_some(query),
            headers,
            protocol,
            method: None,
            upgrade: None,
        };
        self.open_stream(now, stream.clone(), request)
    }

    /// Validates a start and registers its stream `Opening`: shared by `proxy_websocket_start` and
    /// [`start_stream`](Self::start_stream). A reply slot was reserved by the caller.
    fn open_stream<'a>(
        &mut self,
        now: Instant,
        id: StreamId,
        start: StartFields<'a>,
    ) -> Result<StartRequest<'a>, TunnelError> {
        let (path, upgrade) = match check_start(&start, self.config.extensions.raw_upgrade) {
            Ok(checked) => checked,
            Err(e) => return Err(self.reject_stream(&id, e)),
        };
        let data = StreamData::new(self.config.ring_bytes, now + self.config.dial_timeout);
        match self.streams.insert(id.clone(), data) {
            Ok(_) => {}
            Err(InsertError::Duplicate) => {
                return Err(self.reject_stream(&id, TunnelError::DuplicateStream));
            }
            Err(InsertError::Full) => {
                return Err(self.reject_stream(&id, TunnelError::TooManyStreams));
            }
        }
        self.stats.streams_opened += 1;
        self.recently_closed.forget(&id);
        info!("stream {}: start {}", id, path);
        Ok(StartRequest {
            stream: id,
            path,
            query: start.query.unwrap_or(JsonStr::EMPTY),
            headers: start.headers,
            protocol: start.protocol,
            upgrade,
        })
    }

    fn on_data<'a>(
        &mut self,
        now: Instant,
        data: WebSocketData<'_>,
        scratch: &mut [u8],
    ) -> Result<Handled<'a>, TunnelError> {
        let Some(slot) = self.lookup_ws(data.stream_id) else {
            return self.unknown_stream(data.stream_id);
        };
        let frame = match DataFrame::decode_json(data.data, scratch) {
            Ok(frame) => frame,
            Err(FrameError::BufferTooSmall { needed }) => {
                return Err(TunnelError::ScratchTooSmall { needed });
            }
            Err(e) => return Err(self.reject(Some(data.stream_id), true, e.into())),
        };
        match frame {
            DataFrame::Text(payload) => self.push_upstream(now, slot, MessageKind::Text, payload),
            DataFrame::Binary(payload) => {
                self.push_upstream(now, slot, MessageKind::Binary, payload)
            }
            DataFrame::Close(close) => {
                let close =
                    close.map_or_else(|| Close::new(1000, ""), |c| Close::new(c.code, c.reason));
                self.close_from_tunnel(now, slot, close);
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

    fn push_upstream<'a>(
        &mut self,
        now: Instant,
        slot: Slot,
        kind: MessageKind,
        payload: &[u8],
    ) -> Result<Handled<'a>, TunnelError> {
        self.push_upstream_with(now, slot, kind, payload.len(), || M::from_slice(payload))
    }

    /// Queues a message of `len` bytes for the upstream of `slot`; `make` builds its buffer once
    /// it is admitted (a copy, or a share of an owned frame).
    fn push_upstream_with<'a>(
        &mut self,
        now: Instant,
        slot: Slot,
        kind: MessageKind,
        len: usize,
        make: impl FnOnce() -> Option<M>,
    ) -> Result<Handled<'a>, TunnelError> {
        let Some(entry) = self.streams.at_mut(slot) else {
            return Err(TunnelError::UnknownStream);
        };
        if entry.state() == StreamState::Closing {
            // The upstream is closing or gone: nothing can be delivered any more.
            self.stats.discarded_messages += 1;
            debug!("stream {}: data after close discarded", entry.id());
            return Ok(Handled::Consumed);
        }
        let notify = entry.state() == StreamState::Open;
        match entry.value.pipe.push_from_tunnel(kind, len, notify, make) {
            Ok(()) => Ok(Handled::Consumed),
            Err(PushRefused::Full) => {
                let blocker = Blocker::Stream {
                    id: entry.id().clone(),
                    bytes: len,
                };
                Err(self.block(blocker))
            }
            Err(PushRefused::Payload) => {
                let error = TunnelError::PayloadRefused { len };
                let id = entry.id().clone();
                self.close_from_tunnel(now, slot, Close::new(1009, "message too big"));
                Err(self.reject_stream(&id, error))
            }
        }
    }

    fn on_close<'a>(
        &mut self,
        now: Instant,
        close: WebSocketClose<'_>,
    ) -> Result<Handled<'a>, TunnelError> {
        let Some(slot) = self.lookup_ws(close.stream_id) else {
            return self.unknown_stream(close.stream_id);
        };
        let reason = close
            .reason
            .map(|r| truncated(r.chars()))
            .unwrap_or_default();
        let close = Close {
            code: close.code.unwrap_or(1000),
            reason,
        };
        self.close_requested(now, slot, Some(close));
        Ok(Handled::Consumed)
    }

    /// Closes stream `stream` without a tunnel message, exactly as a `proxy_websocket_close` with
    /// `close` (code and reason; `None` for 1000 without a reason) would: the upstream gets every
    /// message already queued for it, then [`Event::CloseUpstream`]; the control plane is sent
    /// `proxy_websocket_close` once the upstream reports closed. A stream already closing is left
    /// as it is. For upgrades that arrived as `proxy_request` and were cancelled.
    ///
    /// # Errors
    /// [`TunnelError::UnknownStream`] (with a `proxy_error` queued) when no WebSocket stream has
    /// that id, unless it closed recently (then `Ok`, counted in [`Stats::late_messages`]). A
    /// close never blocks: with the reply queue full that `proxy_error` is dropped (logged).
    pub fn close_stream(
        &mut self,
        now: Instant,
        stream: &str,
        close: Option<Close>,
    ) -> Result<(), TunnelError> {
        let Some(slot) = self.find_ws(stream) else {
            let late = self.recently_closed.contains(stream);
            return self.unknown(late, truncated(stream.chars())).map(|_| ());
        };
        self.close_requested(now, slot, close);
        Ok(())
    }

    /// A close asked for by the control plane (or on its behalf): shared by
    /// `proxy_websocket_close` and [`close_stream`](Self::close_stream).
    fn close_requested(&mut self, now: Instant, slot: Slot, close: Option<Close>) {
        let close = close.unwrap_or_else(|| Close::new(1000, ""));
        self.close_from_tunnel(now, slot, close);
    }

    fn on_unknown_type(&mut self, env: &Envelope<'_>, type_name: JsonStr<'_>) -> TunnelError {
        let name: String<MAX_TYPE_NAME> = truncated(type_name.chars());
        warn!("unknown message type {}", name.as_str());
        self.stats.bad_messages += 1;
        if !self.fallbacks.contains(&name) {
            // Past FALLBACK_TYPES distinct names every new one is answered, possibly again.
            let _ = self.fallbacks.push(name.clone());
            let request_id = env
                .request_id
                .map(|id| truncated(id.chars()))
                .unwrap_or_default();
            self.push_reply(Reply::Fallback {
                type_name: name,
                request_id,
            });
        }
        TunnelError::UnknownType
    }

    /// A message for a stream that is not live: dropped quietly if the stream closed recently (a
    /// normal race), rejected otherwise.
    fn unknown_stream<'a>(&mut self, id: JsonStr<'_>) -> Result<Handled<'a>, TunnelError> {
        let late = self.recently_closed.contains(&id);
        self.unknown(late, truncated(id.chars()))
    }

    fn unknown<'a>(
        &mut self,
        late: bool,
        id: String<MAX_REPLY_ID>,
    ) -> Result<Handled<'a>, TunnelError> {
        if late {
            self.stats.late_messages += 1;
            debug!("stream {}: late message after close dropped", id.as_str());
            return Ok(Handled::Consumed);
        }
        Err(self.reject_id(id, true, TunnelError::UnknownStream))
    }

    fn reject_oversize(
        &mut self,
        now: Instant,
        env: &Envelope<'_>,
        inbound: &Inbound<'_>,
        error: TunnelError,
    ) -> TunnelError {
        // Data or close for a live stream closes it; a start is refused without touching a live
        // stream that happens to have the same id.
        let (stream, live) = match inbound {
            Inbound::WebSocketData(d) => (Some(d.stream_id), true),
            Inbound::WebSocketClose(c) => (Some(c.stream_id), true),
            Inbound::WebSocketStart(s) => (Some(s.stream_id), false),
            Inbound::TcpTunnelData { tunnel_id, .. }
            | Inbound::TcpTunnelClose { tunnel_id, .. } => {
                let id = tunnel_id.or(env.request_id);
                if let Some(slot) = id.and_then(|id| self.lookup_tcp(id)) {
                    self.abort_tunnel(now, slot, "message too big");
                }
                (id, false)
            }
            Inbound::TcpTunnelStart(s) => (s.tunnel_id.or(env.request_id), false),
            _ => (None, false),
        };
        if let Some(slot) = stream.filter(|_| live).and_then(|id| self.lookup_ws(id)) {
            self.close_from_tunnel(now, slot, Close::new(1009, "message too big"));
        }
        match stream {
            Some(id) => self.reject(Some(id), true, error),
            None => self.reject(env.request_id, false, error),
        }
    }

    fn reject_stream(&mut self, id: &StreamId, error: TunnelError) -> TunnelError {
        warn!("stream {}: rejected: {}", id, error);
        self.stats.bad_messages += 1;
        self.push_reply(Reply::Error {
            request_id: truncated(id.as_str().chars()),
            stream: true,
            error,
        });
        error
    }

    /// Logs `error`, counts it and queues its `proxy_error` (a slot was reserved on entry).
    fn reject(
        &mut self,
        request_id: Option<JsonStr<'_>>,
        stream: bool,
        error: TunnelError,
    ) -> TunnelError {
        let request_id = request_id
            .map(|id| truncated(id.chars()))
            .unwrap_or_default();
        self.reject_id(request_id, stream, error)
    }

    fn reject_id(
        &mut self,
        request_id: String<MAX_REPLY_ID>,
        stream: bool,
        error: TunnelError,
    ) -> TunnelError {
        let what = if stream { "stream" } else { "request" };
        warn!("{} {}: rejected: {}", what, request_id.as_str(), error);
        self.stats.bad_messages += 1;
        self.push_reply(Reply::Error {
            request_id,
            stream,
            error,
        });
        error
    }

    fn push_reply(&mut self, reply: Reply) {
        // Space was checked on entry to handle_tunnel_message, which queues at most one reply.
        if self.replies.push_back(reply).is_err() {
            warn!("reply queue overflow");
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
                e.state() == StreamState::Closing || e.value.pipe.to_local.can_accept(*bytes)
            }),
            Some(Blocker::Pieces { id, bytes, pieces }) => {
                self.streams.get(id.as_str()).is_none_or(|e| {
                    let ring = &e.value.pipe.to_local;
                    e.state() == StreamState::Closing
                        || (ring.len() + pieces <= ring.capacity()
                            && (ring.bytes() + bytes <= ring.byte_budget()
                                || (ring.is_empty() && *pieces == 1)))
                })
            }
        };
        if free {
            self.pause.resume();
            debug!("tunnel reads resumed");
        }
    }

    /// Closes the stream whose upstream kept the tunnel reader paused past the limit: what was
    /// queued for it is discarded (it took nothing for that long), the upstream is closed and the
    /// control plane told why; the reader resumes.
    fn close_pausing_stream(&mut self, now: Instant) {
        let id = match self.pause.blocker() {
            Some(Blocker::Stream { id, .. } | Blocker::Pieces { id, .. }) => id.clone(),
            _ => return,
        };
        let Some(slot) = self.streams.find(id.as_str()) else {
            self.check_unblock();
            return;
        };
        let close = crate::flow::stall_close("upstream", self.config.pause_limit);
        warn!("stream {}: closed: {}", id, close.reason.as_str());
        self.stats.stalled_streams_closed += 1;
        if let Some(entry) = self.streams.at_mut(slot) {
            self.stats.discarded_messages += entry.value.pipe.to_local.clear().0 as u64;
        }
        self.close_from_tunnel(now, slot, close);
        self.check_unblock();
    }

    /// Starts closing `slot` on the tunnel's request: the upstream gets every queued message, then
    /// [`Event::CloseUpstream`]. No-op when already closing.
    fn close_from_tunnel(&mut self, now: Instant, slot: Slot, close: Close) {
        let Some(entry) = self.streams.at_mut(slot) else {
            return;
        };
        let state = entry.state();
        if state == StreamState::Closing {
            return;
        }
        info!("stream {}: closed by control plane ({})", entry.id(), close);
        let close = if Close::is_sendable(close.code) {
            close
        } else {
            Close {
                code: 1000,
                ..close
            }
        };
        let d = &mut entry.value;
        if state == StreamState::Opening {
            self.stats.discarded_messages += d.pipe.to_local.clear().0 as u64;
        }
        // The upstream stays readable until it reports its close: flow notices keep going.
        d.owe_close_upstream = Some(close);
        d.deadline = Some(now + self.config.close_timeout);
        let _ = self.streams.transition(slot, StreamState::Closing);
        self.check_unblock();
    }

    // ---------------------------------------------------------------------------------------------
    // Upstream input

    /// The upstream accepted the stream (HTTP 101) with `subprotocol` negotiated (`None` if none):
    /// the stream becomes `Open`, queued data becomes poppable, and the start is acknowledged with
    /// `proxy_websocket_started` if the control plane advertised that extension.
    ///
    /// # Errors
    /// [`UpstreamError::UnknownStream`], or [`UpstreamError::Transition`] unless the stream is
    /// `Opening` (e.g. the control plane closed it meanwhile: close the upstream connection).
    pub fn handle_upstream_started(
        &mut self,
        now: Instant,
        stream: &str,
        subprotocol: Option<&str>,
    ) -> Result<(), UpstreamError> {
        let _ = now;
        let slot = self
            .streams
            .find(stream)
            .ok_or(UpstreamError::UnknownStream)?;
        self.streams.transition(slot, StreamState::Open)?;
        let ack = self.session.extensions.websocket_started;
        let entry = self
            .streams
            .at_mut(slot)
            .ok_or(UpstreamError::UnknownStream)?;
        let d = &mut entry.value;
        d.deadline = None;
        if let stream::Kind::WebSocket { subprotocol: kept } = &mut d.kind {
            *kept = truncated(subprotocol.unwrap_or_default().chars());
        }
        // Native streams are always acknowledged: the start frame's answer carries the subprotocol.
        d.owe_started = (ack || d.is_native()) && !d.is_tcp();
        d.pipe.owe_readable = !d.pipe.to_local.is_empty();
        info!(
            "stream {}: upstream open, subprotocol {}",
            entry.id(),
            subprotocol.unwrap_or_default()
        );
        Ok(())
    }

    /// The upstream refused or could not be reached: `status` is its HTTP status (or a gateway
    /// status such as 502 when there was none), `message` why. The control plane gets a
    /// `proxy_error` (with `status` if it advertised the extension) then `proxy_websocket_close`;
    /// queued data is discarded.
    ///
    /// # Errors
    /// [`UpstreamError::UnknownStream`].
    pub fn handle_upstream_failed(
        &mut self,
        now: Instant,
        stream: &str,
        status: u16,
        message: &str,
    ) -> Result<(), UpstreamError> {
        let _ = now;
        let slot = self
            .streams
            .find(stream)
            .ok_or(UpstreamError::UnknownStream)?;
        warn!(
            "stream {}: upstream failed with status {}: {}",
            stream, status, message
        );
        let failure = Failure {
            status,
            message: truncated(message.chars()),
        };
        self.upstream_gone(slot, Some(failure), Close::new(1011, "upstream refused"));
        Ok(())
    }

    /// The upstream WebSocket is closed (by the upstream, or after [`Event::CloseUpstream`]) with
    /// `code` and `reason`. Data already queued toward the tunnel is sent, then
    /// `proxy_websocket_close` (with code and reason if the control plane advertised the
    /// extension).
    ///
    /// # Errors
    /// [`UpstreamError::UnknownStream`].
    pub fn handle_upstream_closed(
        &mut self,
        now: Instant,
        stream: &str,
        code: u16,
        reason: &str,
    ) -> Result<(), UpstreamError> {
        let _ = now;
        let slot = self
            .streams
            .find(stream)
            .ok_or(UpstreamError::UnknownStream)?;
        if self.is_tcp_tunnel(stream) {
            let why = if code == 1000 {
                TcpCloseReason::ServiceClosed
            } else {
                TcpCloseReason::ReadError
            };
            return self.handle_tcp_closed(now, stream, why, reason);
        }
        info!("stream {}: upstream closed ({})", stream, code);
        self.upstream_gone(slot, None, Close::new(code, reason));
        Ok(())
    }

    /// The upstream side of `slot` is gone: report to the tunnel (once) and free when settled.
    fn upstream_gone(&mut self, slot: Slot, failure: Option<Failure>, close: Close) {
        let Some(entry) = self.streams.at_mut(slot) else {
            return;
        };
        let state = entry.state();
        let d = &mut entry.value;
        d.upstream_alive = false;
        d.owe_close_upstream = None;
        d.pipe.owe_readable = false;
        d.pipe.reading_stopped = false;
        d.pipe.flow = None;
        d.deadline = None;
        let discarded = d.pipe.to_local.clear().0;
        self.stats.discarded_messages += discarded as u64;
        if !d.tunnel_closed {
            d.tunnel_closed = true;
            d.owe_failed = failure;
            d.owe_close = Some(close);
        }
        if state != StreamState::Closing {
            let _ = self.streams.transition(slot, StreamState::Closing);
        }
        self.settle(slot);
        self.check_unblock();
    }

    /// Queues a message read from the upstream of `stream` for the tunnel.
    ///
    /// # Errors
    /// The message is handed back: [`SendError::Full`] (stop reading this upstream until
    /// [`Event::ResumeReadingUpstream`], then hand it in again), [`SendError::Closed`] (unknown
    /// stream, not yet started, or its tunnel side is closed), [`SendError::TooLarge`].
    pub fn handle_upstream_message(
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
        let state = entry.state();
        let d = &mut entry.value;
        let accepting = match state {
            StreamState::Open => true,
            StreamState::Closing => d.upstream_alive && !d.tunnel_closed,
            StreamState::Opening | StreamState::Closed => false,
        };
        if !accepting {
            return Err(SendError::Closed(payload));
        }
        let (result, stopped) =
            d.pipe
                .queue_toward_tunnel(&mut self.budget, admitted, Message { kind, payload });
        if stopped {
            debug!("stream {}: upstream reads paused", stream);
        }
        result
    }

    /// The next message for the upstream socket of `stream`, oldest first. Call after
    /// [`Event::DataForUpstream`] until `None`.
    pub fn pop_upstream(&mut self, stream: &str) -> Option<Message<M>> {
        let entry = self.streams.get_mut(stream)?;
        let state = entry.state();
        let d = &mut entry.value;
        let deliverable = match state {
            StreamState::Open => true,
            StreamState::Closing => d.upstream_alive,
            StreamState::Opening | StreamState::Closed => false,
        };
        if !deliverable {
            return None;
        }
        let message = d.pipe.pop_local()?;
        self.check_unblock();
        Some(message)
    }

    // ---------------------------------------------------------------------------------------------
    // Timers

    /// Fires every timer due at `now`: ping ([`Event::SendPing`]), heartbeat, the tunnel read
    /// deadline ([`Event::TunnelDead`]), stream dial timeouts (504 to the control plane, the dial
    /// abandoned with [`Event::CloseUpstream`]) and close timeouts.
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
            self.close_pausing_stream(now);
        }
        let s = &mut self.session;
        if s.next_heartbeat.is_some_and(|t| t <= now) {
            s.heartbeat_pending = true;
            s.next_heartbeat = Some(now + self.config.heartbeat_interval);
        }
        if s.keepalive.handle_timeout(now, self.config.ping_interval) {
            warn!("tunnel silent for {}", self.config.read_deadline);
            s.next_heartbeat = None;
        }
        for slot in self.streams.live_slots() {
            let Some(entry) = self.streams.at_mut(slot) else {
                continue;
            };
            if entry.value.deadline.is_none_or(|t| t > now) {
                continue;
            }
            entry.value.deadline = None;
            match entry.state() {
                StreamState::Opening => {
                    warn!("stream {}: upstream dial timed out", entry.id());
                    let failure = Failure {
                        status: 504,
                        message: truncated("upstream dial timed out".chars()),
                    };
                    entry.value.owe_failed = Some(failure);
                    entry.value.owe_close = Some(Close::new(1011, "upstream dial timed out"));
                    entry.value.tunnel_closed = true;
                    entry.value.owe_close_upstream = Some(Close::new(1001, "dial timed out"));
                    entry.value.deadline = Some(now + self.config.close_timeout);
                    let _ = self.streams.transition(slot, StreamState::Closing);
                }
                StreamState::Closing if entry.value.upstream_alive => {
                    warn!(
                        "stream {}: upstream did not report its close in time",
                        entry.id()
                    );
                    self.upstream_gone(slot, None, Close::new(1001, "upstream close timed out"));
                }
                _ => {}
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called; `None` if no timer
    /// runs. Changes after any input.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let streams = self
            .streams
            .iter()
            .filter_map(|(_, e)| e.value.deadline)
            .min();
        let pause = self.pause.limit_at(self.config.pause_limit);
        [self.session.next_timeout(), streams, pause]
            .into_iter()
            .flatten()
            .min()
    }

    // ---------------------------------------------------------------------------------------------
    // Outputs

    /// Adapter events, one per call; call after every input until `None`. Tunnel and session
    /// events come first, then stream events round-robin across streams.
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
                cluster_id: s.cluster_id.clone(),
                extensions: s.extensions,
            });
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
        let d = &mut entry.value;
        if d.pipe.to_local.is_empty()
            && let Some(close) = d.owe_close_upstream.take()
        {
            if d.tunnel_gone {
                d.upstream_alive = false;
            }
            let event = Event::CloseUpstream {
                stream: entry.id().clone(),
                close,
            };
            self.settle(slot);
            return Some(event);
        }
        if core::mem::take(&mut d.pipe.owe_readable) {
            return Some(Event::DataForUpstream(entry.id().clone()));
        }
        match d.pipe.take_flow()? {
            Flow::Stop => Some(Event::StopReadingUpstream(entry.id().clone())),
            Flow::Resume => Some(Event::ResumeReadingUpstream(entry.id().clone())),
        }
    }

    /// Encodes the next tunnel message into `buf` and returns its length, or `None` when nothing is
    /// owed. Order: `register`, replies to bad input and pings, per-stream control (start ack,
    /// `proxy_error` for a refused dial, close once the stream's data is sent) round-robin,
    /// `heartbeat`, then data round-robin across streams, one message per stream per turn. Call
    /// after every input until `None`. `unix_time` stamps the envelope.
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
        if self.session.register_pending {
            let n = self.encode_register(unix_time, buf)?;
            self.session.register_pending = false;
            return Ok(Some(Transmit::Encoded(n)));
        }
        if let Some(reply) = self.replies.front() {
            let n = encode_reply(
                reply,
                self.session.info.agent_version.as_str(),
                unix_time,
                buf,
            )?;
            self.replies.pop_front();
            self.check_unblock();
            return Ok(Some(Transmit::Encoded(n)));
        }
        if let Some(n) = engine::transmit_ack(&mut self.window, buf)? {
            return Ok(Some(Transmit::Encoded(n)));
        }
        for slot in self.streams.slots_after(self.control_cursor) {
            if let Some(n) = self.transmit_control(slot, now, unix_time, buf)? {
                self.control_cursor = Some(slot);
                return Ok(Some(Transmit::Encoded(n)));
            }
        }
        if self.session.heartbeat_pending {
            let n = self.encode_heartbeat(unix_time, buf)?;
            self.session.heartbeat_pending = false;
            return Ok(Some(Transmit::Encoded(n)));
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

    fn transmit_control(
        &mut self,
        slot: Slot,
        now: Instant,
        unix: UnixTime,
        buf: &mut [u8],
    ) -> Result<Option<usize>, TransmitError> {
        let ext = self.session.extensions;
        let Some(entry) = self.streams.at(slot) else {
            return Ok(None);
        };
        if entry.value.is_native() {
            return self.transmit_native_control(slot, buf);
        }
        if entry.value.is_tcp() {
            return self.transmit_tcp_control(slot, now, unix, buf);
        }
        let id = WireStr::Plain(entry.id().as_str());
        let d = &entry.value;
        if d.owe_started {
            let protocol = (!d.subprotocol().is_empty()).then(|| WireStr::Plain(d.subprotocol()));
            let n = Outbound::WebSocketStarted {
                stream_id: id,
                protocol,
            }
            .encode(Some(id), unix, buf)?;
            if let Some(e) = self.streams.at_mut(slot) {
                e.value.owe_started = false;
            }
            return Ok(Some(n));
        }
        if let Some(failure) = &d.owe_failed {
            let mut text = String::<256>::new();
            let _ = write!(
                text,
                "failed to connect to K8s API: {} (status: {})",
                failure.message, failure.status
            );
            let status = ext.proxy_error_status.then_some(failure.status);
            let message = Outbound::ProxyError {
                stream_id: Some(id),
                error: WireStr::Plain(text.as_str()),
                status,
            };
            let n = message.encode(Some(id), unix, buf)?;
            if let Some(e) = self.streams.at_mut(slot) {
                e.value.owe_failed = None;
            }
            return Ok(Some(n));
        }
        if let Some(close) = d.owe_close.as_ref().filter(|_| d.pipe.to_tunnel.is_empty()) {
            let frame = CloseFrame {
                code: close.code,
                reason: close.reason.as_str(),
            };
            let close = ext.websocket_close_code.then_some(frame);
            let n = Outbound::WebSocketClose {
                stream_id: id,
                close,
            }
            .encode(Some(id), unix, buf)?;
            if let Some(e) = self.streams.at_mut(slot) {
                e.value.owe_close = None;
            }
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
        if entry.value.pipe.to_tunnel.is_empty() {
            return Ok(None);
        }
        if entry.value.is_native() {
            return self.transmit_native_data(slot, now, buf, owned);
        }
        let Some(message) = entry.value.pipe.to_tunnel.front() else {
            return Ok(None);
        };
        let bytes = message.payload.as_bytes();
        let frame = match message.kind {
            MessageKind::Text => DataFrame::Text(bytes),
            MessageKind::Binary => DataFrame::Binary(bytes),
        };
        let id = WireStr::Plain(entry.id().as_str());
        let n = if entry.value.is_tcp() {
            Outbound::TcpTunnelData { data: bytes }.encode(Some(id), unix, buf)?
        } else {
            Outbound::WebSocketData {
                stream_id: id,
                frame,
                app_request_id: None,
            }
            .encode(Some(id), unix, buf)?
        };
        let _ = self.sent_front(slot);
        Ok(Some(Transmit::Encoded(n)))
    }

    /// The front message toward the tunnel of `slot` was sent: takes it out (returned) and lets
    /// the upstream be read again once the ring is below half.
    fn sent_front(&mut self, slot: Slot) -> Option<Message<M>> {
        let message = engine::sent_front(&mut self.streams, &mut self.budget, slot)?;
        if let Some(tcp) = self.streams.at_mut(slot).and_then(|e| e.value.tcp_mut()) {
            tcp.bytes_sent += message.payload.len() as u64;
        }
        Some(message)
    }

    fn encode_register(&self, unix: UnixTime, buf: &mut [u8]) -> Result<usize, TransmitError> {
        let info = &self.session.info;
        let mut request_id = String::<MAX_REPLY_ID>::new();
        let _ = write!(
            request_id,
            "req_{}{:09}_{}",
            unix.secs,
            unix.nanos,
            info.agent_id.as_str()
        );
        let register = Register {
            agent_id: info.agent_id.as_str(),
            name: info.name.as_str(),
            k8s_version: info.k8s_version.as_str(),
            hostname: info.hostname.as_str(),
            agent_version: info.agent_version.as_str(),
            server_ip: info.server_ip.as_str(),
            region: info.region.as_str(),
            cloud_provider: info.cloud_provider.as_str(),
            tunnel_ports: crate::wire::TunnelPorts::default(),
            labels: &[],
            server_specs: &[],
            features: crate::wire::Features::ALL,
            extensions: self.offered(),
            metadata: &[],
            cluster_id: info.cluster_id.as_ref().map(String::as_str),
            k8s_service_token: None,
        };
        Ok(Outbound::Register(register).encode(
            Some(WireStr::Plain(request_id.as_str())),
            unix,
            buf,
        )?)
    }

    fn encode_heartbeat(&self, unix: UnixTime, buf: &mut [u8]) -> Result<usize, TransmitError> {
        let info = &self.session.info;
        let metadata = [
            ("agent_version", Value::Str(info.agent_version.as_str())),
            ("k8s_version", Value::Str(info.k8s_version.as_str())),
        ];
        let tether_peer = self.session.extensions != Extensions::NONE;
        let heartbeat = Heartbeat {
            cluster_id: self.session.cluster_id.as_str(),
            agent_id: info.agent_id.as_str(),
            status: if self.draining && tether_peer {
                HEARTBEAT_DRAINING
            } else {
                "healthy"
            },
            tunnel_status: "connected",
            metadata: &metadata,
            extra: &[],
        };
        Ok(Outbound::Heartbeat(heartbeat).encode(None, unix, buf)?)
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

    /// The live WebSocket stream (not TCP tunnel) named by a JSON string.
    fn lookup_ws(&self, id: JsonStr<'_>) -> Option<Slot> {
        let mut buf = [0u8; MAX_STREAM_ID_LEN];
        id.to_str(&mut buf).ok().and_then(|id| self.find_ws(id))
    }

    /// The live WebSocket stream (not TCP tunnel) named `id`.
    fn find_ws(&self, id: &str) -> Option<Slot> {
        self.streams
            .find(id)
            .filter(|slot| self.streams.at(*slot).is_some_and(|e| !e.value.is_tcp()))
    }

    /// The live stream named by a JSON string (escapes allowed).
    fn lookup(&self, id: JsonStr<'_>) -> Option<Slot> {
        let mut buf = [0u8; MAX_STREAM_ID_LEN];
        id.to_str(&mut buf)
            .ok()
            .and_then(|id| self.streams.find(id))
    }
}

/// What a start asks to dial, from a `proxy_websocket_start` or [`Relay::start_stream`].
struct StartFields<'a> {
    path: Option<JsonStr<'a>>,
    query: Option<JsonStr<'a>>,
    headers: Headers<'a>,
    protocol: Option<JsonStr<'a>>,
    method: Option<JsonStr<'a>>,
    upgrade: Option<JsonStr<'a>>,
}

/// Validates everything a start asks to dial; returns the path and, for a raw upgrade (only
/// when `raw_upgrade` is offered), its method and token.
fn check_start<'a>(
    start: &StartFields<'a>,
    raw_upgrade: bool,
) -> Result<(JsonStr<'a>, Option<RawUpgrade>), TunnelError> {
    let path = start
        .path
        .ok_or(TunnelError::Decode(crate::wire::DecodeError::MissingField(
            "path",
        )))?;
    validate_path(path.chars())?;
    if let Some(query) = start.query {
        validate_query(query.chars())?;
    }
    for (name, values) in start.headers.iter() {
        validate_header_name(name.chars())?;
        let is_protocol = name.eq_ignore_ascii_case("Sec-WebSocket-Protocol");
        for value in values {
            validate_header_value(value.chars())?;
            if is_protocol {
                validate_subprotocol_list(value.chars())?;
            }
        }
    }
    if let Some(protocol) = start.protocol {
        validate_subprotocol_list(protocol.chars())?;
    }
    let upgrade = match start.upgrade {
        None => None,
        Some(_) if !raw_upgrade => return Err(RequestError::Upgrade.into()),
        Some(token) => Some(raw_upgrade_of(start.method, token)?),
    };
    Ok((path, upgrade))
}

/// The validated method (`GET` when absent) and token of a raw upgrade.
fn raw_upgrade_of(
    method: Option<JsonStr<'_>>,
    token: JsonStr<'_>,
) -> Result<RawUpgrade, RequestError> {
    fn copy<const N: usize>(
        chars: impl Iterator<Item = char>,
    ) -> Result<heapless::String<N>, RequestError> {
        let mut out = heapless::String::new();
        for c in chars {
            out.push(c).map_err(|_| RequestError::Upgrade)?;
        }
        Ok(out)
    }
    let method = match method {
        Some(m) => copy(m.chars())?,
        None => copy("GET".chars())?,
    };
    let token = copy(token.chars())?;
    validate_upgrade(&method, &token)?;
    Ok(RawUpgrade { method, token })
}

/// A stream id from a JSON string, unescaped and validated.
fn stream_id(id: JsonStr<'_>) -> Result<StreamId, StreamIdError> {
    let mut buf = [0u8; MAX_STREAM_ID_LEN];
    let id = id.to_str(&mut buf).map_err(|_| StreamIdError::TooLong)?;
    StreamId::new(id)
}

fn encode_reply(
    reply: &Reply,
    agent_version: &str,
    unix: UnixTime,
    buf: &mut [u8],
) -> Result<usize, TransmitError> {
    let n = match reply {
        Reply::Pong { request_id } => {
            Outbound::Pong.encode(Some(WireStr::Plain(request_id.as_str())), unix, buf)?
        }
        Reply::Error {
            request_id,
            stream,
            error,
        } => {
            let mut text = String::<192>::new();
            let _ = write!(text, "{error}");
            let id = WireStr::Plain(request_id.as_str());
            let stream_id = (*stream && !request_id.is_empty()).then_some(id);
            let message = Outbound::ProxyError {
                stream_id,
                error: WireStr::Plain(text.as_str()),
                status: None,
            };
            message.encode(Some(id), unix, buf)?
        }
        Reply::Fallback {
            type_name,
            request_id,
        } => {
            let fallback = ProtocolFallback {
                agent_version: if agent_version.is_empty() {
                    "tether"
                } else {
                    agent_version
                },
                unknown_type: WireStr::Plain(type_name.as_str()),
                original_request_id: (!request_id.is_empty())
                    .then_some(WireStr::Plain(request_id.as_str())),
            };
            Outbound::ProtocolFallback(fallback).encode(None, unix, buf)?
        }
        Reply::TcpClose {
            tunnel_id,
            reason,
            error,
        } => {
            let close = crate::wire::TcpTunnelClose {
                reason,
                bytes_sent: None,
                bytes_received: None,
                duration_ms: None,
                error: Some(error),
            };
            let id = WireStr::Plain(tunnel_id.as_str());
            Outbound::TcpTunnelClose(close).encode(Some(id), unix, buf)?
        }
    };
    Ok(n)
}
