//! The agent-side HTTP request relay: `proxy_request` to the Kubernetes API and the streamed answer.
//!
//! [`Requests`] is sans-IO and allocation-free. The adapter owns the HTTP client and one task per
//! request, and drives the table:
//!
//! * **Inputs**: [`handle_request`](Requests::handle_request) for every `proxy_request` (after the
//!   relay handed it back as `Handled::Other`); [`handle_chunk`](Requests::handle_chunk) and
//!   [`handle_stream_end`](Requests::handle_stream_end) for a streamed request body;
//!   [`handle_cancel`](Requests::handle_cancel) for `proxy_cancel`;
//!   [`handle_timeout`](Requests::handle_timeout) when [`poll_timeout`](Requests::poll_timeout)
//!   passes; [`upgrade_started`](Requests::upgrade_started) /
//!   [`upgrade_failed`](Requests::upgrade_failed) for requests that asked for a WebSocket.
//! * **Response encoders**, called as the upstream answers, each checking the request's sequence
//!   (header, chunks, end) and encoding straight into the caller's buffer:
//!   [`encode_response_header`](Requests::encode_response_header),
//!   [`encode_response_chunk`](Requests::encode_response_chunk),
//!   [`encode_response_end`](Requests::encode_response_end),
//!   [`encode_response`](Requests::encode_response) (one buffered `proxy_response`) and
//!   [`encode_response_failed`](Requests::encode_response_failed).
//! * **Outputs**, polled after every input until `None`: [`poll_transmit`](Requests::poll_transmit)
//!   (replies the table owes: errors, timeouts, upgrade outcomes) and
//!   [`poll_event`](Requests::poll_event) (requests whose upstream work must be abandoned).
//!
//! # Request sequence
//!
//! A `proxy_request` is validated (request id, method, Kubernetes API path, query, header names and
//! values, body form) and registered; the adapter sends it upstream at once from the returned
//! [`RequestStart`] view. Its body is inline ([`RequestBody::Inline`]), or arrives in
//! `proxy_request_chunk`s until `proxy_request_stream_end` ([`RequestBody::Streamed`]). The answer
//! goes back as `proxy_response_header`, `proxy_response_chunk`s (at most [`MAX_CHUNK`] bytes each)
//! and `proxy_response_end` when the control plane asked for `supports_response_streaming`, else as
//! one `proxy_response`. A failure before the header becomes a `proxy_response` with a gateway
//! status (502, 504) and the reason as a text body; after the header, `proxy_response_abort`.
//!
//! A request that asks for a WebSocket ([`ProxyRequest::wants_websocket`]) is not sent as HTTP: the
//! adapter starts a relay stream named by the request id with
//! [`Relay::start_stream`](crate::relay::Relay::start_stream) (from the [`RequestStart`]'s path,
//! query, headers and protocol; a cancelled upgrade ends it with
//! [`Relay::close_stream`](crate::relay::Relay::close_stream)), and reports the upstream's answer with
//! [`upgrade_started`](Requests::upgrade_started) (a `101` header with the negotiated subprotocol,
//! then the end) or [`upgrade_failed`](Requests::upgrade_failed) (the upstream's status). Nothing is
//! answered before the upstream did, unlike the PipeOps agent.
//!
//! # Timeouts and cancel
//!
//! A request's deadline is its `deadline` (RFC 3339), else its `timeout`, and then covers the whole
//! exchange; without either, [`Config::header_timeout`] bounds only the wait for the response
//! header, so `logs -f` and watches may stream for as long as the API server keeps them open. A
//! passed deadline answers 504 (or aborts the started response) and emits
//! [`RequestEvent::Abandon`]. `proxy_cancel` frees the request at once: the adapter must drop its
//! upstream work, and any later response call for it fails with
//! [`ResponseError::UnknownRequest`] (nothing more goes out).

#[cfg(test)]
mod tests;

use core::fmt::{self, Write as _};

use heapless::{Deque, String};

use crate::credit::Credit;
use crate::relay::{
    RequestError as ValidateError, validate_header_name, validate_header_value, validate_path,
    validate_query, validate_subprotocol_list,
};
use crate::stream_id::{StreamId, StreamIdError};
use crate::time::{Duration, Instant};
use crate::wire::json::JsonStr;
use crate::wire::{
    Base64Str, Body, EncodeError, Envelope, FrameError, HeaderList, Headers, Outbound,
    ProxyRequest, UnixTime, WireStr,
};

/// Largest body slice one `proxy_response_chunk` carries (as the PipeOps agent: 32 KiB).
pub const MAX_CHUNK: usize = 32 * 1024;

/// Replies the table can owe at once; when full, [`Requests::handle_request`] refuses with
/// [`RequestError::Blocked`] until [`Requests::poll_transmit`] sent one.
const REPLY_QUEUE: usize = 16;
/// Abandon events the table can owe at once (a timeout beyond this waits for the next call).
const EVENT_QUEUE: usize = 16;
/// Longest reason kept for a reply.
const MAX_REASON: usize = 160;

/// Methods the agent sends to the Kubernetes API.
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Tunables of a [`Requests`] table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Config {
    /// Longest wait for the response header of a request without its own `timeout` or `deadline`
    /// (default 2 min, the PipeOps default). Once the header is out the response may stream on.
    pub header_timeout: Duration,
    /// Upper bound for a request's own `timeout` or `deadline` (default 24 h).
    pub max_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(120),
            max_timeout: Duration::from_secs(24 * 3600),
        }
    }
}

/// Why a `proxy_request` (or one of its follow-up messages) was refused. Each refusal of a request
/// queued an answer to the control plane (see [`status`](Self::status)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RequestError {
    /// Not consumed: the reply queue is full. Drain [`Requests::poll_transmit`] and hand the same
    /// message in again.
    Blocked,
    /// The envelope has no usable `request_id`.
    RequestId(StreamIdError),
    /// A live request already has this id (the live one is untouched).
    Duplicate,
    /// Every request slot is taken.
    TooMany,
    /// The method is not one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS.
    Method,
    /// Path, query, header or subprotocol refused (see [`crate::relay::RequestError`]).
    Invalid(ValidateError),
    /// `body_binary` bodies (the next binary frame) are not supported; use base64 or chunks.
    BinaryBody,
    /// A request chunk, end or cancel names no live request.
    UnknownRequest,
    /// A chunk or end arrived for a request whose body is not streamed, or already ended.
    NotStreaming,
    /// A chunk's base64 is invalid (the request was aborted).
    Chunk(FrameError),
}

impl RequestError {
    /// The HTTP status the control plane is answered with.
    #[must_use]
    pub const fn status(&self) -> u16 {
        match self {
            Self::Blocked | Self::TooMany => 503,
            Self::Duplicate => 409,
            Self::Method => 405,
            Self::BinaryBody => 501,
            Self::UnknownRequest => 404,
            Self::RequestId(_) | Self::Invalid(_) | Self::NotStreaming | Self::Chunk(_) => 400,
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Blocked => f.write_str("request table busy; message not consumed"),
            Self::RequestId(e) => write!(f, "invalid request_id: {e}"),
            Self::Duplicate => f.write_str("duplicate request_id: a request with this id is live"),
            Self::TooMany => f.write_str("too many concurrent requests on this agent (its per-cluster limit); try again later"),
            Self::Method => f.write_str("unsupported method"),
            Self::Invalid(e) => write!(f, "{e}"),
            Self::BinaryBody => {
                f.write_str("body_binary is not supported: send the body in base64 or chunks")
            }
            Self::UnknownRequest => f.write_str("unknown request id"),
            Self::NotStreaming => f.write_str("request body is not streamed, or already ended"),
            Self::Chunk(e) => write!(f, "invalid request chunk: {e}"),
        }
    }
}

impl core::error::Error for RequestError {}

/// Why a response encoder refused. Nothing was written or changed unless stated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ResponseError {
    /// No live request has this id (cancelled, timed out or finished): drop the upstream work.
    UnknownRequest,
    /// The call does not fit the request's sequence (a chunk before the header, a second header,
    /// a streamed call for a buffered request or the reverse, a response for a WebSocket upgrade).
    Sequence,
    /// Encoding failed (buffer too small: retry with a larger one).
    Encode(EncodeError),
}

impl From<EncodeError> for ResponseError {
    fn from(e: EncodeError) -> Self {
        Self::Encode(e)
    }
}

impl fmt::Display for ResponseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownRequest => f.write_str("no live request with this id"),
            Self::Sequence => f.write_str("response call out of sequence"),
            Self::Encode(e) => write!(f, "cannot encode response: {e:?}"),
        }
    }
}

impl core::error::Error for ResponseError {}

/// How a request's body reaches the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestBody<'a> {
    /// No body.
    None,
    /// The whole body is in the `proxy_request` (text, base64 or JSON).
    Inline(Body<'a>),
    /// The body follows in `proxy_request_chunk`s, ended by `proxy_request_stream_end`.
    Streamed,
}

/// A validated `proxy_request`, borrowing the tunnel message. Send it upstream (or, for
/// [`websocket`](Self::websocket), start it with [`Relay::start_stream`](crate::relay::Relay::start_stream)) before
/// handing in the next tunnel message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestStart<'a> {
    /// The request id (the envelope's `request_id`).
    pub id: StreamId,
    /// The HTTP method (one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS; GET when absent).
    pub method: &'static str,
    /// Kubernetes API path, validated (unescape with [`JsonStr::to_str`]).
    pub path: JsonStr<'a>,
    /// Raw query without `?`, validated; empty when absent.
    pub query: JsonStr<'a>,
    /// Headers as sent by the control plane, each name and value validated. The adapter filters
    /// hop-by-hop headers and chooses credentials.
    pub headers: Headers<'a>,
    /// The body.
    pub body: RequestBody<'a>,
    /// The request asks for a WebSocket upgrade: relay it as a stream (see the module docs).
    pub websocket: bool,
    /// Offered subprotocols (`protocol` field), validated; WebSocket requests only.
    pub protocol: Option<JsonStr<'a>>,
    /// Answer with `proxy_response_header`/`_chunk`/`_end` (else one `proxy_response`).
    pub streaming_response: bool,
}

/// Something the adapter must act on. Poll with [`Requests::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RequestEvent {
    /// The request timed out: drop its upstream work; its answer was already queued.
    Abandon(StreamId),
}

/// What [`Requests::handle_cancel`] freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Cancelled {
    /// An HTTP request: drop its upstream work.
    Request,
    /// A WebSocket upgrade: close its relay stream too (e.g. with a `proxy_websocket_close` for
    /// the same id).
    Upgrade,
    /// No live request had this id.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the upstream's response header.
    Waiting,
    /// Header sent, body streaming.
    Streaming,
}

#[derive(Debug)]
struct Entry {
    id: StreamId,
    phase: Phase,
    /// Body still arriving in chunks.
    body_open: bool,
    streaming: bool,
    upgrade: bool,
    /// Deadline for the whole exchange (`timeout`/`deadline`), or for the header only.
    deadline: Option<Instant>,
    deadline_covers_all: bool,
    /// Extension `response_credit`: what the control plane granted for the body (send side);
    /// `None`: no limit.
    credit: Option<Credit>,
}

#[derive(Debug)]
enum Reply {
    /// A whole `proxy_response` with a text body (refusals, gateway errors, upgrade failures).
    Response {
        id: String<64>,
        status: u16,
        reason: String<MAX_REASON>,
    },
    /// `proxy_error` for a message without a usable request id.
    Error { reason: String<MAX_REASON> },
    /// `proxy_response_abort`.
    Abort {
        id: String<64>,
        reason: String<MAX_REASON>,
    },
    /// `proxy_response_header` 101 with the subprotocol, then (as [`Reply::End`]) the end.
    Upgraded {
        id: String<64>,
        subprotocol: String<64>,
    },
    /// `proxy_response_end`.
    End { id: String<64> },
}

/// Counters for metrics. Monotonic for the life of the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RequestStats {
    /// Requests accepted (HTTP and upgrades).
    pub started: u64,
    /// Requests finished (answered, failed, cancelled or timed out).
    pub finished: u64,
    /// Requests refused before any upstream work.
    pub refused: u64,
    /// Requests cancelled by `proxy_cancel`.
    pub cancelled: u64,
    /// Requests that timed out.
    pub timed_out: u64,
}

/// The table of up to `N` live `proxy_request`s. See the [module docs](self).
#[derive(Debug)]
pub struct Requests<const N: usize> {
    config: Config,
    entries: heapless::Vec<Entry, N>,
    replies: Deque<Reply, REPLY_QUEUE>,
    events: Deque<RequestEvent, EVENT_QUEUE>,
    stats: RequestStats,
}

impl<const N: usize> Default for Requests<N> {
    fn default() -> Self {
        Self::new(Config::default())
    }
}

fn cut<const M: usize>(s: &str) -> String<M> {
    let mut out = String::new();
    for c in s.chars() {
        if out.push(c).is_err() {
            break;
        }
    }
    out
}

fn display<const M: usize>(v: impl fmt::Display) -> String<M> {
    // Writes as much as fits; `heapless::String` refuses the rest.
    struct Cut<'s, const M: usize>(&'s mut String<M>);
    impl<const M: usize> fmt::Write for Cut<'_, M> {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            for c in s.chars() {
                if self.0.push(c).is_err() {
                    break;
                }
            }
            Ok(())
        }
    }
    let mut out = String::new();
    let _ = write!(Cut(&mut out), "{v}");
    out
}

impl<const N: usize> Requests<N> {
    /// An empty table.
    #[must_use]
    pub fn new(config: Config) -> Self {
        Self {
            config,
            entries: heapless::Vec::new(),
            replies: Deque::new(),
            events: Deque::new(),
            stats: RequestStats::default(),
        }
    }

    /// Counters.
    #[must_use]
    pub const fn stats(&self) -> RequestStats {
        self.stats
    }

    /// Number of live requests.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `true` when no request is live.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `true` when `id` names a live request.
    #[must_use]
    pub fn contains(&self, id: &str) -> bool {
        self.find(id).is_some()
    }

    fn find(&self, id: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.id.as_str() == id)
    }

    fn remove(&mut self, index: usize) {
        self.entries.swap_remove(index);
        self.stats.finished += 1;
    }

    /// Every live request is gone with its tunnel: forget them all (their upstream work must be
    /// dropped by the adapter) and the replies owed on the old tunnel.
    pub fn handle_tunnel_lost(&mut self) {
        self.stats.finished += self.entries.len() as u64;
        self.entries.clear();
        self.replies.clear();
        self.events.clear();
    }

    /// Validates and registers a `proxy_request`. `unix` is the current wall-clock time (to read a
    /// `deadline`).
    ///
    /// # Errors
    /// [`RequestError::Blocked`] leaves the message unconsumed (drain
    /// [`poll_transmit`](Self::poll_transmit) and retry). Every other error consumed the message and
    /// queued its answer: a `proxy_response` with [`RequestError::status`] and the reason as text
    /// (or a `proxy_error` when there is no usable request id). No live request is touched.
    pub fn handle_request<'a>(
        &mut self,
        now: Instant,
        unix: UnixTime,
        env: &Envelope<'a>,
        req: &ProxyRequest<'a>,
    ) -> Result<RequestStart<'a>, RequestError> {
        if self.replies.is_full() {
            return Err(RequestError::Blocked);
        }
        let id = match request_id(env.request_id) {
            Ok(id) => id,
            Err(e) => {
                let e = RequestError::RequestId(e);
                warn!("proxy_request refused: {}", e);
                self.refuse(None, e);
                return Err(e);
            }
        };
        if let Err(e) = self.check(req) {
            warn!("request {}: refused: {}", id, e);
            self.refuse(Some(&id), e);
            return Err(e);
        }
        if self.find(id.as_str()).is_some() {
            let e = RequestError::Duplicate;
            warn!("request {}: refused: {}", id, e);
            // The live request keeps its id; the answer names it, as the control plane expects.
            self.refuse(Some(&id), e);
            return Err(e);
        }
        if self.entries.is_full() {
            let e = RequestError::TooMany;
            warn!("request {}: refused: {}", id, e);
            self.refuse(Some(&id), e);
            return Err(e);
        }
        let websocket = req.wants_websocket();
        let own = self.own_deadline(now, unix, req);
        let (deadline, covers_all) = match own {
            Some(t) => (Some(t), true),
            None if websocket => (None, false), // the relay bounds the dial
            None => (Some(now + self.config.header_timeout), false),
        };
        let body = if req.streaming && !websocket {
            RequestBody::Streamed
        } else {
            req.body.map_or(RequestBody::None, RequestBody::Inline)
        };
        let entry = Entry {
            id: id.clone(),
            phase: Phase::Waiting,
            body_open: matches!(body, RequestBody::Streamed),
            streaming: req.supports_response_streaming,
            upgrade: websocket,
            deadline,
            deadline_covers_all: covers_all,
            credit: req.response_credit.then_some(Credit::ZERO),
        };
        // Cannot fail: fullness was checked above.
        let _ = self.entries.push(entry);
        self.stats.started += 1;
        let method = method_of(req).unwrap_or("GET");
        let path = req.path.unwrap_or(JsonStr::EMPTY);
        info!("request {}: {} {}", id, method, path);
        Ok(RequestStart {
            id,
            method,
            path,
            query: req.query.unwrap_or(JsonStr::EMPTY),
            headers: req.headers,
            body,
            websocket,
            protocol: req.protocol.filter(|_| websocket),
            streaming_response: req.supports_response_streaming,
        })
    }

    fn own_deadline(
        &self,
        now: Instant,
        unix: UnixTime,
        req: &ProxyRequest<'_>,
    ) -> Option<Instant> {
        let max = self.config.max_timeout;
        if let Some(d) = req.deadline {
            let mut buf = [0u8; 64];
            if let Some(at) = d
                .to_str(&mut buf)
                .ok()
                .and_then(|s| UnixTime::parse_rfc3339(s).ok())
            {
                let left = micros(at).saturating_sub(micros(unix));
                return Some(now + Duration::from_micros(left).min(max));
            }
        }
        req.timeout_ms
            .filter(|ms| *ms > 0)
            .map(|ms| now + Duration::from_millis(ms).min(max))
    }

    fn check(&self, req: &ProxyRequest<'_>) -> Result<(), RequestError> {
        if req.body_binary {
            return Err(RequestError::BinaryBody);
        }
        if method_of(req).is_none() {
            return Err(RequestError::Method);
        }
        let path = req.path.ok_or(RequestError::Invalid(ValidateError::Path))?;
        validate_path(path.chars()).map_err(RequestError::Invalid)?;
        if let Some(q) = req.query {
            validate_query(q.chars()).map_err(RequestError::Invalid)?;
        }
        for (name, values) in req.headers.iter() {
            validate_header_name(name.chars()).map_err(RequestError::Invalid)?;
            for v in values {
                validate_header_value(v.chars()).map_err(RequestError::Invalid)?;
            }
        }
        if let Some(p) = req.protocol {
            validate_subprotocol_list(p.chars()).map_err(RequestError::Invalid)?;
        }
        Ok(())
    }

    fn refuse(&mut self, id: Option<&StreamId>, e: RequestError) {
        self.stats.refused += 1;
        let reason = display(e);
        let reply = match id {
            Some(id) => Reply::Response {
                id: cut(id.as_str()),
                status: e.status(),
                reason,
            },
            None => Reply::Error { reason },
        };
        // A slot was checked on entry.
        let _ = self.replies.push_back(reply);
    }

    /// Decodes a `proxy_request_chunk` for request `id` into `scratch` and returns the bytes to
    /// append to its upstream body. `scratch` must hold the decoded chunk.
    ///
    /// # Errors
    /// [`RequestError::UnknownRequest`] (dropped; a cancelled or finished request's late chunk),
    /// [`RequestError::NotStreaming`] (dropped), [`RequestError::Chunk`]: bad base64 (or scratch
    /// too small, a caller bug); the request is then aborted: its answer is queued and
    /// [`RequestEvent::Abandon`] follows.
    pub fn handle_chunk<'s>(
        &mut self,
        now: Instant,
        id: &str,
        data: Base64Str<'_>,
        scratch: &'s mut [u8],
    ) -> Result<&'s [u8], RequestError> {
        let _ = now;
        let index = self.find(id).ok_or(RequestError::UnknownRequest)?;
        if !self.entries[index].body_open {
            return Err(RequestError::NotStreaming);
        }
        if self.replies.is_full() {
            return Err(RequestError::Blocked);
        }
        match data.decode_into(scratch) {
            Ok(bytes) => Ok(bytes),
            Err(e) => {
                let e = RequestError::Chunk(e);
                warn!("request {}: aborted: {}", id, e);
                self.fail(index, 400, display(e));
                Err(e)
            }
        }
    }

    /// `proxy_request_stream_end`: the body of `id` is complete (close the upstream body).
    ///
    /// # Errors
    /// [`RequestError::UnknownRequest`], [`RequestError::NotStreaming`]; nothing changed.
    pub fn handle_stream_end(&mut self, id: &str) -> Result<(), RequestError> {
        let index = self.find(id).ok_or(RequestError::UnknownRequest)?;
        let entry = &mut self.entries[index];
        if !entry.body_open {
            return Err(RequestError::NotStreaming);
        }
        entry.body_open = false;
        Ok(())
    }

    /// `proxy_cancel`: frees `id` at once. Nothing is sent for it any more.
    pub fn handle_cancel(&mut self, id: &str) -> Cancelled {
        let Some(index) = self.find(id) else {
            return Cancelled::Unknown;
        };
        let upgrade = self.entries[index].upgrade;
        info!("request {}: cancelled", id);
        self.remove(index);
        self.stats.cancelled += 1;
        if upgrade {
            Cancelled::Upgrade
        } else {
            Cancelled::Request
        }
    }

    /// Answers request `index` with a failure and frees it (queues the reply, emits no event).
    fn fail(&mut self, index: usize, status: u16, reason: String<MAX_REASON>) {
        let entry = &self.entries[index];
        let id = cut(entry.id.as_str());
        let reply = if entry.phase == Phase::Waiting {
            Reply::Response { id, status, reason }
        } else {
            Reply::Abort { id, reason }
        };
        let _ = self.replies.push_back(reply);
        let abandon = RequestEvent::Abandon(entry.id.clone());
        let _ = self.events.push_back(abandon);
        self.remove(index);
    }

    // ---------------------------------------------------------------------------------------------
    // WebSocket upgrades

    /// The upstream accepted WebSocket request `id` with `subprotocol`: a `proxy_response_header`
    /// 101 (`Upgrade`, `Connection`, `Sec-WebSocket-Protocol`) then `proxy_response_end` are queued.
    /// Stream data flows as `proxy_websocket_data` named by the same id.
    ///
    /// # Errors
    /// [`ResponseError::UnknownRequest`] (cancelled: close the stream),
    /// [`ResponseError::Sequence`] if `id` is not an upgrade.
    pub fn upgrade_started(
        &mut self,
        id: &str,
        subprotocol: Option<&str>,
    ) -> Result<(), ResponseError> {
        let index = self.find(id).ok_or(ResponseError::UnknownRequest)?;
        if !self.entries[index].upgrade {
            return Err(ResponseError::Sequence);
        }
        let reply = Reply::Upgraded {
            id: cut(id),
            subprotocol: cut(subprotocol.unwrap_or_default()),
        };
        let _ = self.replies.push_back(reply);
        self.remove(index);
        Ok(())
    }

    /// The upstream refused WebSocket request `id` (or it could not be relayed): a `proxy_response`
    /// with `status` and `message` is queued, so the client sees the real status.
    ///
    /// # Errors
    /// [`ResponseError::UnknownRequest`], [`ResponseError::Sequence`] if `id` is not an upgrade.
    pub fn upgrade_failed(
        &mut self,
        id: &str,
        status: u16,
        message: &str,
    ) -> Result<(), ResponseError> {
        let index = self.find(id).ok_or(ResponseError::UnknownRequest)?;
        if !self.entries[index].upgrade {
            return Err(ResponseError::Sequence);
        }
        let reply = Reply::Response {
            id: cut(id),
            status,
            reason: cut(message),
        };
        let _ = self.replies.push_back(reply);
        self.remove(index);
        Ok(())
    }

    // ---------------------------------------------------------------------------------------------
    // Responses

    fn http_entry(&mut self, id: &str, streaming: bool) -> Result<usize, ResponseError> {
        let index = self.find(id).ok_or(ResponseError::UnknownRequest)?;
        let e = &self.entries[index];
        if e.upgrade || e.streaming != streaming {
            return Err(ResponseError::Sequence);
        }
        Ok(index)
    }

    /// `true` when request `id` is answered in pieces (`supports_response_streaming`); `None` when
    /// it is not live.
    #[must_use]
    pub fn is_streaming(&self, id: &str) -> Option<bool> {
        self.find(id).map(|i| self.entries[i].streaming)
    }

    /// Encodes `proxy_response_header` for streaming request `id`. Without its own timeout the
    /// request has no deadline from now on.
    ///
    /// # Errors
    /// [`ResponseError`]; on error nothing changed.
    pub fn encode_response_header(
        &mut self,
        id: &str,
        status: u16,
        headers: &dyn HeaderList,
        unix: UnixTime,
        buf: &mut [u8],
    ) -> Result<usize, ResponseError> {
        let index = self.http_entry(id, true)?;
        if self.entries[index].phase != Phase::Waiting {
            return Err(ResponseError::Sequence);
        }
        let n = Outbound::ProxyResponseHeader { status, headers }.encode(
            Some(WireStr::Plain(id)),
            unix,
            buf,
        )?;
        let e = &mut self.entries[index];
        e.phase = Phase::Streaming;
        if !e.deadline_covers_all {
            e.deadline = None;
        }
        Ok(n)
    }

    /// Whether request `id` may send a body chunk now: always, unless the control plane asked for
    /// `response_credit` and its grants are used up (then wait for
    /// [`handle_credit`](Self::handle_credit); stop reading the upstream meanwhile). `false` for
    /// an unknown request.
    #[must_use]
    pub fn may_send_chunk(&self, id: &str) -> bool {
        self.find(id)
            .is_some_and(|i| self.entries[i].credit.is_none_or(|c| c.can_send()))
    }

    /// A `proxy_response_credit` for request `id`: `bytes` and `messages` more may be sent.
    /// Returns whether the request is live (a grant for a finished one is a normal race).
    pub fn handle_credit(&mut self, now: Instant, id: &str, bytes: u32, messages: u32) -> bool {
        let Some(index) = self.find(id) else {
            return false;
        };
        if let Some(credit) = self.entries[index].credit.as_mut() {
            let _ = credit.on_grant(now, bytes, messages);
        }
        true
    }

    /// Encodes one `proxy_response_chunk` of at most [`MAX_CHUNK`] bytes from the front of `data`
    /// for request `id`; returns `(bytes of data consumed, message length)`. Call again with the
    /// rest, each time only when [`may_send_chunk`](Self::may_send_chunk) (the chunk takes one
    /// message and its bytes of credit).
    ///
    /// # Errors
    /// [`ResponseError`] ([`Sequence`](ResponseError::Sequence) before the header); nothing changed.
    pub fn encode_response_chunk(
        &mut self,
        id: &str,
        data: &[u8],
        unix: UnixTime,
        buf: &mut [u8],
    ) -> Result<(usize, usize), ResponseError> {
        let index = self.http_entry(id, true)?;
        if self.entries[index].phase != Phase::Streaming {
            return Err(ResponseError::Sequence);
        }
        let take = data.len().min(MAX_CHUNK);
        let n = Outbound::ProxyResponseChunk {
            data: &data[..take],
        }
        .encode(Some(WireStr::Plain(id)), unix, buf)?;
        if let Some(credit) = self.entries[index].credit.as_mut() {
            credit.on_sent(take);
        }
        Ok((take, n))
    }

    /// Encodes `proxy_response_end` for request `id` and frees it.
    ///
    /// # Errors
    /// [`ResponseError`] ([`Sequence`](ResponseError::Sequence) before the header); nothing changed.
    pub fn encode_response_end(
        &mut self,
        id: &str,
        unix: UnixTime,
        buf: &mut [u8],
    ) -> Result<usize, ResponseError> {
        let index = self.http_entry(id, true)?;
        if self.entries[index].phase != Phase::Streaming {
            return Err(ResponseError::Sequence);
        }
        let n = Outbound::ProxyResponseEnd.encode(Some(WireStr::Plain(id)), unix, buf)?;
        self.remove(index);
        Ok(n)
    }

    /// Encodes the whole `proxy_response` of buffered (non-streaming) request `id` and frees it.
    ///
    /// # Errors
    /// [`ResponseError`]; nothing changed.
    pub fn encode_response(
        &mut self,
        id: &str,
        status: u16,
        headers: &dyn HeaderList,
        body: &[u8],
        unix: UnixTime,
        buf: &mut [u8],
    ) -> Result<usize, ResponseError> {
        let index = self.http_entry(id, false)?;
        let n = Outbound::ProxyResponse {
            status,
            headers,
            body: (!body.is_empty()).then_some(body),
            gzip: false,
        }
        .encode(Some(WireStr::Plain(id)), unix, buf)?;
        self.remove(index);
        Ok(n)
    }

    /// The upstream exchange of request `id` failed with `message`: before the header, a
    /// `proxy_response` with `status` (502 unreachable, 504 timed out, ...) and the message as a
    /// text body; after it, `proxy_response_abort`. The request is freed.
    ///
    /// # Errors
    /// [`ResponseError`]; nothing changed.
    pub fn encode_response_failed(
        &mut self,
        id: &str,
        status: u16,
        message: &str,
        unix: UnixTime,
        buf: &mut [u8],
    ) -> Result<usize, ResponseError> {
        let index = self.find(id).ok_or(ResponseError::UnknownRequest)?;
        let e = &self.entries[index];
        if e.upgrade {
            return Err(ResponseError::Sequence);
        }
        let reply = if e.phase == Phase::Waiting {
            Reply::Response {
                id: cut(id),
                status,
                reason: cut(message),
            }
        } else {
            Reply::Abort {
                id: cut(id),
                reason: cut(message),
            }
        };
        let n = encode_reply(&reply, unix, buf)?;
        warn!("request {}: failed: {}", id, message);
        self.remove(index);
        Ok(n)
    }

    // ---------------------------------------------------------------------------------------------
    // Timers and outputs

    /// When [`handle_timeout`](Self::handle_timeout) should next be called; `None` if no timer runs.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.entries.iter().filter_map(|e| e.deadline).min()
    }

    /// Fails every request whose deadline passed at `now`: 504 before the header, abort after;
    /// each emits [`RequestEvent::Abandon`].
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.entries.len() {
            let due = self.entries[i].deadline.is_some_and(|t| t <= now);
            if due && !self.replies.is_full() && !self.events.is_full() {
                warn!("request {}: timed out", self.entries[i].id);
                self.stats.timed_out += 1;
                self.fail(i, 504, cut("upstream request timed out"));
                // `fail` swapped the last entry into `i`: look at it again.
            } else {
                i += 1;
            }
        }
    }

    /// The next event, or `None`.
    pub fn poll_event(&mut self) -> Option<RequestEvent> {
        self.events.pop_front()
    }

    /// Encodes the next owed reply into `buf`, or `None` when nothing is owed.
    ///
    /// # Errors
    /// [`EncodeError`]: nothing was consumed (retry with a larger buffer).
    pub fn poll_transmit(
        &mut self,
        unix: UnixTime,
        buf: &mut [u8],
    ) -> Result<Option<usize>, EncodeError> {
        let Some(reply) = self.replies.front() else {
            return Ok(None);
        };
        let n = encode_reply(reply, unix, buf)?;
        let next = match self.replies.pop_front() {
            Some(Reply::Upgraded { id, .. }) => Some(Reply::End { id }),
            _ => None,
        };
        if let Some(next) = next {
            // A slot was just freed.
            let _ = self.replies.push_front(next);
        }
        Ok(Some(n))
    }
}

fn encode_reply(reply: &Reply, unix: UnixTime, buf: &mut [u8]) -> Result<usize, EncodeError> {
    match reply {
        Reply::Response { id, status, reason } => Outbound::ProxyResponse {
            status: *status,
            headers: &[("Content-Type", "text/plain; charset=utf-8")],
            body: Some(reason.as_bytes()),
            gzip: false,
        }
        .encode(Some(WireStr::Plain(id.as_str())), unix, buf),
        Reply::Error { reason } => Outbound::ProxyError {
            stream_id: None,
            error: WireStr::Plain(reason.as_str()),
            status: None,
        }
        .encode(None, unix, buf),
        Reply::Abort { id, reason } => Outbound::ProxyResponseAbort {
            error: WireStr::Plain(reason.as_str()),
        }
        .encode(Some(WireStr::Plain(id.as_str())), unix, buf),
        Reply::Upgraded { id, subprotocol } => {
            let with = [
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Protocol", subprotocol.as_str()),
            ];
            let headers: &[(&str, &str)] = if subprotocol.is_empty() {
                &with[..2]
            } else {
                &with
            };
            Outbound::ProxyResponseHeader {
                status: 101,
                headers: &headers,
            }
            .encode(Some(WireStr::Plain(id.as_str())), unix, buf)
        }
        Reply::End { id } => {
            Outbound::ProxyResponseEnd.encode(Some(WireStr::Plain(id.as_str())), unix, buf)
        }
    }
}

fn micros(t: UnixTime) -> u64 {
    t.secs
        .saturating_mul(1_000_000)
        .saturating_add(u64::from(t.nanos / 1_000))
}

fn method_of(req: &ProxyRequest<'_>) -> Option<&'static str> {
    let Some(m) = req.method else {
        return Some("GET");
    };
    METHODS
        .iter()
        .copied()
        .find(|name| m == *name || (m.eq_ignore_ascii_case(name) && !m.has_escapes()))
}

fn request_id(id: Option<JsonStr<'_>>) -> Result<StreamId, StreamIdError> {
    let id = id.ok_or(StreamIdError::Empty)?;
    let mut buf = [0u8; crate::stream_id::MAX_STREAM_ID_LEN];
    let s = id.to_str(&mut buf).map_err(|_| StreamIdError::TooLong)?;
    StreamId::new(s)
}
