//! Native wire mode: binary frames with a fixed 6-byte header.
//!
//! A native frame is one WebSocket *binary* message on the tunnel, used only after both ends
//! advertised [`Extensions::native`](super::Extensions::native). All integers are big-endian.
//!
//! ```text
//! offset 0  kind    u8   1 start, 2 started, 3 data, 4 close, 5 error, 6 credit
//! offset 1  flags   u8   data: bit 0 = BINARY (clear = text). Every other bit, and every
//!                        flag on other kinds, must be 0.
//! offset 2  stream  u32  the stream's number on this tunnel, never 0
//! offset 6  body    kind-specific:
//!   start   : UTF-8 JSON object = exactly the `payload` object of a compat
//!             `proxy_websocket_start` envelope (stream_id, method, path, query, headers,
//!             protocol); see [`encode_start`] and [`decode_start_body`].
//!   started : the negotiated subprotocol, UTF-8, may be empty.
//!   data    : the raw WebSocket message payload (no opcode byte, no base64). May be empty.
//!   close   : code u16, then reason UTF-8 (at most 123 bytes).
//!   error   : status u16 (0 = no HTTP status), then message UTF-8.
//!   credit  : bytes u32, messages u32 (increments granted to the sender); exactly 8 bytes.
//! ```
//!
//! Rules, enforced by [`NativeFrame::decode`]:
//!
//! * A frame longer than the caller's limit is [`NativeError::TooLarge`] (checked first; the
//!   error still names the stream when the header is complete, see [`peek_stream`]).
//! * The first byte must be a known kind ([`is_native`]); JSON text never starts with bytes
//!   1..=7, so a binary message is a native frame iff [`is_native`] says so.
//! * Frames are canonical: every frame `decode` accepts re-encodes ([`NativeFrame::encode`])
//!   to exactly the same bytes. Hence unknown flag bits, stream 0 (or, on an ack, any other), a close reason over 123
//!   bytes, non-UTF-8 text fields and a credit or ack body other than 8 bytes are rejected.
//! * `decode` checks that a start body is UTF-8 but does not parse it; call
//!   [`decode_start_body`] for that. Data payloads are never inspected (a text message's
//!   payload is not checked for UTF-8, as on the compat path).
//!
//! Nothing here allocates; decoding borrows the frame, encoding writes into caller buffers.

use core::fmt;

use crate::wire::envelope::Limits;
use crate::wire::error::{BufferTooSmall, DecodeError, EncodeError};
use crate::wire::headers::{HeaderList, write_headers};
use crate::wire::inbound::{WebSocketStart, websocket_start};
use crate::wire::json::{self, JsonWriter, ObjectWriter, WireStr};

/// Length of the fixed header (kind, flags, stream).
pub const HEADER_LEN: usize = 6;

/// Longest close reason in bytes (RFC 6455 §5.5: 125-byte control payload minus the code).
pub const MAX_CLOSE_REASON: usize = 123;

/// Largest data payload the control plane puts in one native frame of a TCP tunnel (extension
/// `native_tcp`). An agent offers the extension only if it takes frames that large whole.
pub const NATIVE_TCP_PIECE: usize = 64 * 1024;

/// The data frame flag marking a binary message (clear: text).
const FLAG_BINARY: u8 = 0x01;

/// `true` iff `frame` starts like a data frame (its first byte is [`FrameKind::Data`]); says
/// nothing about whether the rest is valid. For adapters that hand data frames over as owned
/// buffers.
pub fn is_data(frame: &[u8]) -> bool {
    frame.first() == Some(&(FrameKind::Data as u8))
}

/// `true` iff the first byte of `frame` is a known frame kind (1..=7).
///
/// JSON (even with leading whitespace) never starts with those bytes, so an adapter can use
/// this to tell native frames from JSON envelopes carried in binary messages. It says nothing
/// about whether the rest of the frame is valid.
pub fn is_native(frame: &[u8]) -> bool {
    frame.first().and_then(|&b| FrameKind::from_u8(b)).is_some()
}

/// The stream number of a frame whose header is complete (at least [`HEADER_LEN`] bytes, a
/// known kind, a non-zero stream), without checking anything else (not flags, not length, not
/// the body). Lets a caller name the stream of a frame it rejects.
pub fn peek_stream(frame: &[u8]) -> Option<u32> {
    if !is_native(frame) {
        return None;
    }
    let stream = read_u32(frame.get(2..HEADER_LEN)?)?;
    (stream != 0).then_some(stream)
}

/// The kind byte at offset 0.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FrameKind {
    /// Open a WebSocket stream (body: the `proxy_websocket_start` payload object).
    Start = 1,
    /// The upstream accepted the upgrade (body: the negotiated subprotocol).
    Started,
    /// One WebSocket message (body: its payload).
    Data,
    /// Close the stream (body: code and reason).
    Close,
    /// The stream failed (body: HTTP status and message).
    Error,
    /// Flow-control credit for the stream (body: byte and message increments).
    Credit,
    /// Data bytes received on the whole tunnel (stream 0; body: a u64 total).
    Ack,
}

impl FrameKind {
    /// The kind for a byte, if known.
    pub const fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Start,
            2 => Self::Started,
            3 => Self::Data,
            4 => Self::Close,
            5 => Self::Error,
            6 => Self::Credit,
            7 => Self::Ack,
            _ => return None,
        })
    }

    /// The lowercase name (`"start"`, `"started"`, `"data"`, `"close"`, `"error"`, `"credit"`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Started => "started",
            Self::Data => "data",
            Self::Close => "close",
            Self::Error => "error",
            Self::Credit => "credit",
            Self::Ack => "ack",
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a data frame carries a text or a binary WebSocket message (flag bit 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DataKind {
    /// A text message (flag bit 0 clear).
    Text,
    /// A binary message (flag bit 0 set).
    Binary,
}

impl DataKind {
    fn flags(self) -> u8 {
        match self {
            Self::Text => 0,
            Self::Binary => FLAG_BINARY,
        }
    }
}

/// Why a native frame was rejected by [`NativeFrame::decode`] (or [`NativeFrame::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum NativeError {
    /// The frame is shorter than its kind needs: under [`HEADER_LEN`] bytes (or empty).
    TooShort {
        /// Length of the frame.
        len: usize,
    },
    /// The first byte is not a known kind (see [`is_native`]).
    UnknownKind(u8),
    /// Flag bits that the kind does not define are set.
    BadFlags {
        /// The frame's kind.
        kind: FrameKind,
        /// The flags byte as received.
        flags: u8,
    },
    /// The stream number is 0 (on any kind but an ack).
    ZeroStream,
    /// An ack names a stream (its stream number must be 0).
    StreamOnAck,
    /// The frame is longer than the caller's limit.
    TooLarge {
        /// Length of the frame.
        len: usize,
        /// The limit.
        max: usize,
        /// The stream, when the header is complete (as [`peek_stream`]).
        stream: Option<u32>,
    },
    /// The body has the wrong length for its kind: a close or error body under 2 bytes, a
    /// close reason over 123 bytes, a credit body other than 8 bytes.
    BadBody {
        /// The frame's kind.
        kind: FrameKind,
    },
    /// A text field (start body, subprotocol, close reason, error message) is not UTF-8.
    BadUtf8 {
        /// The frame's kind.
        kind: FrameKind,
    },
}

impl fmt::Display for NativeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort { len } => write!(f, "native frame of {len} bytes is too short"),
            Self::UnknownKind(k) => write!(f, "unknown native frame kind {k}"),
            Self::BadFlags { kind, flags } => {
                write!(f, "invalid flags {flags:#04x} on a native {kind} frame")
            }
            Self::ZeroStream => f.write_str("native frame for stream 0"),
            Self::StreamOnAck => f.write_str("native ack frame names a stream"),
            Self::TooLarge { len, max, stream } => {
                write!(
                    f,
                    "native frame of {len} bytes exceeds the limit of {max} bytes"
                )?;
                if let Some(s) = stream {
                    write!(f, " (stream {s})")?;
                }
                Ok(())
            }
            Self::BadBody { kind } => write!(f, "malformed native {kind} body"),
            Self::BadUtf8 { kind } => write!(f, "native {kind} frame text is not UTF-8"),
        }
    }
}

impl core::error::Error for NativeError {}

/// One decoded native frame, borrowing the received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeFrame<'a> {
    /// Open a WebSocket stream. `request` is the JSON payload object, UTF-8 but not parsed
    /// (see [`decode_start_body`]).
    Start {
        /// The stream.
        stream: u32,
        /// The `proxy_websocket_start` payload object, as JSON text.
        request: &'a [u8],
    },
    /// The upstream accepted the upgrade.
    Started {
        /// The stream.
        stream: u32,
        /// The negotiated subprotocol; empty when none.
        subprotocol: &'a str,
    },
    /// One WebSocket message.
    Data {
        /// The stream.
        stream: u32,
        /// Text or binary.
        kind: DataKind,
        /// The message payload (may be empty).
        payload: &'a [u8],
    },
    /// Close the stream.
    Close {
        /// The stream.
        stream: u32,
        /// The close code (not checked against RFC 6455's registry).
        code: u16,
        /// The reason, at most [`MAX_CLOSE_REASON`] bytes.
        reason: &'a str,
    },
    /// The stream failed.
    Error {
        /// The stream.
        stream: u32,
        /// The upstream HTTP status, if any (`Some(0)` is invalid: 0 on the wire is `None`).
        status: Option<u16>,
        /// What went wrong.
        message: &'a str,
    },
    /// Flow-control credit: the receiver of this frame may send that many more bytes and
    /// messages on the stream.
    Credit {
        /// The stream.
        stream: u32,
        /// Byte increment.
        bytes: u32,
        /// Message increment.
        messages: u32,
    },
    /// The sender of this frame received `received` data payload bytes on the tunnel so far.
    /// Tunnel-wide: its stream number is 0.
    Ack {
        /// Total data payload bytes received.
        received: u64,
    },
}

impl<'a> NativeFrame<'a> {
    /// Decodes one native frame (a whole binary WebSocket message).
    ///
    /// Checks, in order: `frame.len() > max_len` → [`NativeError::TooLarge`] (with the stream
    /// when the header is complete); empty → [`NativeError::TooShort`]; unknown first byte →
    /// [`NativeError::UnknownKind`]; under [`HEADER_LEN`] bytes → `TooShort`; undefined flags →
    /// [`NativeError::BadFlags`]; stream 0 → [`NativeError::ZeroStream`]; then the body
    /// ([`NativeError::BadBody`], [`NativeError::BadUtf8`]). Every accepted frame re-encodes
    /// to exactly `frame`.
    pub fn decode(frame: &'a [u8], max_len: usize) -> Result<Self, NativeError> {
        let len = frame.len();
        if len > max_len {
            return Err(NativeError::TooLarge {
                len,
                max: max_len,
                stream: peek_stream(frame),
            });
        }
        let &first = frame.first().ok_or(NativeError::TooShort { len })?;
        let kind = FrameKind::from_u8(first).ok_or(NativeError::UnknownKind(first))?;
        let (Some(&flags), Some(stream), Some(body)) = (
            frame.get(1),
            frame.get(2..HEADER_LEN).and_then(read_u32),
            frame.get(HEADER_LEN..),
        ) else {
            return Err(NativeError::TooShort { len });
        };
        let allowed = if kind == FrameKind::Data {
            FLAG_BINARY
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(NativeError::BadFlags { kind, flags });
        }
        match (kind, stream) {
            (FrameKind::Ack, 0) => {}
            (FrameKind::Ack, _) => return Err(NativeError::StreamOnAck),
            (_, 0) => return Err(NativeError::ZeroStream),
            _ => {}
        }
        let utf8 = |b: &'a [u8]| core::str::from_utf8(b).map_err(|_| NativeError::BadUtf8 { kind });
        let bad = NativeError::BadBody { kind };
        Ok(match kind {
            FrameKind::Start => {
                utf8(body)?;
                Self::Start {
                    stream,
                    request: body,
                }
            }
            FrameKind::Started => Self::Started {
                stream,
                subprotocol: utf8(body)?,
            },
            FrameKind::Data => Self::Data {
                stream,
                kind: if flags & FLAG_BINARY != 0 {
                    DataKind::Binary
                } else {
                    DataKind::Text
                },
                payload: body,
            },
            FrameKind::Close => {
                let (code, rest) = split_u16(body).ok_or(bad)?;
                if rest.len() > MAX_CLOSE_REASON {
                    return Err(bad);
                }
                Self::Close {
                    stream,
                    code,
                    reason: utf8(rest)?,
                }
            }
            FrameKind::Error => {
                let (status, rest) = split_u16(body).ok_or(bad)?;
                Self::Error {
                    stream,
                    status: (status != 0).then_some(status),
                    message: utf8(rest)?,
                }
            }
            FrameKind::Credit => {
                if body.len() != 8 {
                    return Err(bad);
                }
                Self::Credit {
                    stream,
                    bytes: body.get(..4).and_then(read_u32).ok_or(bad)?,
                    messages: body.get(4..).and_then(read_u32).ok_or(bad)?,
                }
            }
            FrameKind::Ack => Self::Ack {
                received: u64::from_be_bytes(body.try_into().map_err(|_| bad)?),
            },
        })
    }

    /// The stream number (0 for an ack).
    pub fn stream(&self) -> u32 {
        match *self {
            Self::Ack { .. } => 0,
            Self::Start { stream, .. }
            | Self::Started { stream, .. }
            | Self::Data { stream, .. }
            | Self::Close { stream, .. }
            | Self::Error { stream, .. }
            | Self::Credit { stream, .. } => stream,
        }
    }

    /// The frame's kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Self::Start { .. } => FrameKind::Start,
            Self::Started { .. } => FrameKind::Started,
            Self::Data { .. } => FrameKind::Data,
            Self::Close { .. } => FrameKind::Close,
            Self::Error { .. } => FrameKind::Error,
            Self::Credit { .. } => FrameKind::Credit,
            Self::Ack { .. } => FrameKind::Ack,
        }
    }

    /// The flags byte this frame encodes with.
    fn flags(&self) -> u8 {
        match self {
            Self::Data { kind, .. } => kind.flags(),
            _ => 0,
        }
    }

    /// Checks the rules [`decode`](Self::decode) enforces on fields: stream not 0, a close
    /// reason of at most [`MAX_CLOSE_REASON`] bytes, no `status: Some(0)` (reported as
    /// [`NativeError::BadBody`]), a start request that is UTF-8. A frame that passes encodes
    /// to bytes that decode back to it (given a large enough `max_len`).
    pub fn check(&self) -> Result<(), NativeError> {
        if self.stream() == 0 && !matches!(self, Self::Ack { .. }) {
            return Err(NativeError::ZeroStream);
        }
        let kind = self.kind();
        match *self {
            Self::Start { request, .. } if core::str::from_utf8(request).is_err() => {
                Err(NativeError::BadUtf8 { kind })
            }
            Self::Close { reason, .. } if reason.len() > MAX_CLOSE_REASON => {
                Err(NativeError::BadBody { kind })
            }
            Self::Error {
                status: Some(0), ..
            } => Err(NativeError::BadBody { kind }),
            _ => Ok(()),
        }
    }

    /// Bytes [`encode`](Self::encode) writes: [`HEADER_LEN`] plus the body.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + match self {
                Self::Start { request, .. } => request.len(),
                Self::Started { subprotocol, .. } => subprotocol.len(),
                Self::Data { payload, .. } => payload.len(),
                Self::Close { reason, .. } => 2 + reason.len(),
                Self::Error { message, .. } => 2 + message.len(),
                Self::Credit { .. } | Self::Ack { .. } => 8,
            }
    }

    /// Writes the frame into the start of `buf` and returns its length
    /// ([`encoded_len`](Self::encoded_len)); [`BufferTooSmall`] (with that length) when `buf`
    /// is shorter, in which case `buf` is left untouched.
    ///
    /// Fields are written as given, without validation: call [`check`](Self::check) first for
    /// frames built from untrusted parts (stream 0 or a close reason over 123 bytes encode to
    /// bytes `decode` rejects; `status: Some(0)` encodes as "no status").
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, BufferTooSmall> {
        let n = self.encoded_len();
        let out = buf.get_mut(..n).ok_or(BufferTooSmall { needed: n })?;
        let (head, body) = out.split_at_mut(HEADER_LEN);
        head.copy_from_slice(&header(self.kind(), self.flags(), self.stream()));
        match *self {
            Self::Start { request, .. } => body.copy_from_slice(request),
            Self::Started { subprotocol, .. } => body.copy_from_slice(subprotocol.as_bytes()),
            Self::Data { payload, .. } => body.copy_from_slice(payload),
            Self::Close { code, reason, .. } => {
                let (c, r) = body.split_at_mut(2);
                c.copy_from_slice(&code.to_be_bytes());
                r.copy_from_slice(reason.as_bytes());
            }
            Self::Error {
                status, message, ..
            } => {
                let (s, m) = body.split_at_mut(2);
                s.copy_from_slice(&status.unwrap_or(0).to_be_bytes());
                m.copy_from_slice(message.as_bytes());
            }
            Self::Credit {
                bytes, messages, ..
            } => {
                let (b, m) = body.split_at_mut(4);
                b.copy_from_slice(&bytes.to_be_bytes());
                m.copy_from_slice(&messages.to_be_bytes());
            }
            Self::Ack { received } => body.copy_from_slice(&received.to_be_bytes()),
        }
        Ok(n)
    }
}

/// The 6-byte header of a data frame, for callers that send header and payload as separate
/// slices (vectored writes). `stream` should not be 0.
pub fn data_header(stream: u32, kind: DataKind) -> [u8; HEADER_LEN] {
    header(FrameKind::Data, kind.flags(), stream)
}

/// Writes a data frame's header into `buf[..HEADER_LEN]` so the caller can copy the
/// `payload_len`-byte payload into `buf[HEADER_LEN..n]` itself, where `n` (returned) is the
/// whole frame's length, `HEADER_LEN + payload_len`.
///
/// [`BufferTooSmall`] (with `n`) when `buf` cannot hold the whole frame; `buf` is then left
/// untouched. `stream` should not be 0.
pub fn encode_data_header(
    buf: &mut [u8],
    stream: u32,
    kind: DataKind,
    payload_len: usize,
) -> Result<usize, BufferTooSmall> {
    let n = HEADER_LEN.saturating_add(payload_len);
    if buf.len() < n {
        return Err(BufferTooSmall { needed: n });
    }
    let head = buf
        .get_mut(..HEADER_LEN)
        .ok_or(BufferTooSmall { needed: n })?;
    head.copy_from_slice(&data_header(stream, kind));
    Ok(n)
}

/// A `proxy_websocket_start` request to send as a native start frame: the same members as
/// [`ControlMessage::WebSocketStart`](super::ControlMessage::WebSocketStart) (build one from
/// that with [`StartRequest::from_control`]).
#[derive(Debug, Clone, Copy)]
pub struct StartRequest<'a> {
    /// `stream_id`: the compat stream id (the native stream number travels in the header).
    pub stream_id: WireStr<'a>,
    /// `path`.
    pub path: WireStr<'a>,
    /// `query`.
    pub query: WireStr<'a>,
    /// `headers`.
    pub headers: &'a dyn HeaderList,
    /// `protocol`: requested subprotocols, comma separated.
    pub protocol: Option<WireStr<'a>>,
    /// `method` (`GET` when `None`).
    pub method: Option<WireStr<'a>>,
    /// `upgrade`: the token of a raw (non-WebSocket) upgrade.
    pub upgrade: Option<WireStr<'a>>,
}

impl<'a> StartRequest<'a> {
    /// The request of a [`ControlMessage::WebSocketStart`](super::ControlMessage::WebSocketStart);
    /// `None` for every other message.
    pub fn from_control(msg: &super::ControlMessage<'a>) -> Option<Self> {
        match *msg {
            super::ControlMessage::WebSocketStart {
                stream_id,
                path,
                query,
                headers,
                protocol,
                method,
                upgrade,
            } => Some(Self {
                stream_id,
                path,
                query,
                headers,
                protocol,
                method,
                upgrade,
            }),
            _ => None,
        }
    }
}

/// Writes a whole start frame: the header for `stream`, then the JSON payload object byte for
/// byte as [`ControlMessage::WebSocketStart`](super::ControlMessage::WebSocketStart) writes it
/// as its envelope's `payload` (`stream_id`, `method: "GET"`, `path`, `query`, `headers`,
/// `protocol` when any). Returns the frame's length, or [`EncodeError::BufferTooSmall`] with
/// the exact size needed. `stream` should not be 0.
pub fn encode_start(
    buf: &mut [u8],
    stream: u32,
    start: &StartRequest<'_>,
) -> Result<usize, EncodeError> {
    let (head, rest) = if buf.len() >= HEADER_LEN {
        let (h, r) = buf.split_at_mut(HEADER_LEN);
        (Some(h), r)
    } else {
        (None, &mut [][..])
    };
    let mut w = JsonWriter::new(rest);
    w.object(|p| write_start_payload(p, start));
    let body = w.len();
    let n = HEADER_LEN.saturating_add(body);
    match (head, w.finish()) {
        (Some(h), Ok(_)) => {
            h.copy_from_slice(&header(FrameKind::Start, 0, stream));
            Ok(n)
        }
        _ => Err(EncodeError::BufferTooSmall { needed: n }),
    }
}

/// Writes the members of a start payload, shared by the compat envelope and the native frame.
pub(crate) fn write_start_payload(p: &mut ObjectWriter<'_, '_>, start: &StartRequest<'_>) {
    p.wire_str("stream_id", start.stream_id);
    match start.method {
        Some(method) => p.wire_str("method", method),
        None => p.str("method", "GET"),
    }
    p.wire_str("path", start.path);
    p.wire_str("query", start.query);
    write_headers(p.key("headers"), start.headers);
    p.opt_wire_str("protocol", start.protocol);
    p.opt_wire_str("upgrade", start.upgrade);
}

/// Parses a start frame's body (the `request` of [`NativeFrame::Start`]) exactly as the
/// payload of a compat `proxy_websocket_start` envelope, with the default nesting limit
/// ([`Limits::DEFAULT`]).
///
/// Errors: [`DecodeError::NotJson`] when the body is valid JSON but not an object, the JSON
/// errors ([`DecodeError::Malformed`], [`DecodeError::InvalidUtf8`], [`DecodeError::TooDeep`]),
/// then the payload's field errors (e.g. [`DecodeError::MissingField`]`("stream_id")`).
pub fn decode_start_body(body: &[u8]) -> Result<WebSocketStart<'_>, DecodeError> {
    let root = json::parse_with_depth(body, Limits::DEFAULT.max_depth)?;
    let obj = root.as_object().ok_or(DecodeError::NotJson)?;
    websocket_start(obj)
}

/// How stream number `stream` is named in logs and error replies: `#17`.
pub(crate) fn stream_name<const N: usize>(stream: u32) -> heapless::String<N> {
    let mut name = heapless::String::new();
    let _ = core::fmt::write(&mut name, format_args!("#{stream}"));
    name
}

fn header(kind: FrameKind, flags: u8, stream: u32) -> [u8; HEADER_LEN] {
    let s = stream.to_be_bytes();
    [kind as u8, flags, s[0], s[1], s[2], s[3]]
}

fn read_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

fn split_u16(b: &[u8]) -> Option<(u16, &[u8])> {
    let (head, rest) = b.split_first_chunk::<2>()?;
    Some((u16::from_be_bytes(*head), rest))
}
