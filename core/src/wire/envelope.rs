//! The compat envelope `{"type","request_id","payload","timestamp"}` and the field readers
//! shared by the message decoders.

use crate::wire::error::DecodeError;
use crate::wire::json::{self, JsonNumber, JsonObject, JsonStr, JsonValue};

/// Limits applied while decoding an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Limits {
    /// Largest accepted frame in bytes ([`DecodeError::TooLarge`] above).
    pub max_len: usize,
    /// Deepest accepted nesting of objects and arrays, the envelope itself counting as one
    /// ([`DecodeError::TooDeep`] beyond); clamped to [`json::MAX_DEPTH_LIMIT`].
    pub max_depth: usize,
}

impl Limits {
    /// 16 MiB (the design's largest tunnel message) and depth 32.
    pub const DEFAULT: Self = Self {
        max_len: 16 * 1024 * 1024,
        max_depth: json::DEFAULT_MAX_DEPTH,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A decoded envelope: a borrowed view of one tunnel message (text frame, or JSON in a binary
/// frame).
///
/// Field rules (as Go's `encoding/json` applies them to the PipeOps struct): `type` is a
/// required string; `request_id` and `timestamp` are optional strings (`null` = absent);
/// `payload` is an optional object (`null` or absent = `{}`). Other members are ignored. Keys
/// match exactly; for duplicate keys the last one wins. The timestamp is NOT validated here;
/// see [`UnixTime::parse_rfc3339`](super::UnixTime::parse_rfc3339).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The message type, e.g. `proxy_websocket_data`.
    pub type_name: JsonStr<'a>,
    /// The envelope's request id, when present and not empty-null.
    pub request_id: Option<JsonStr<'a>>,
    /// The raw timestamp string, when present.
    pub timestamp: Option<JsonStr<'a>>,
    /// The payload object (empty when absent).
    pub payload: JsonObject<'a>,
}

impl<'a> Envelope<'a> {
    /// Decodes the envelope of `frame` with [`Limits::DEFAULT`].
    ///
    /// Errors: [`DecodeError::NotJson`] when the frame does not start (after whitespace) with
    /// `{`, [`DecodeError::Malformed`] / [`DecodeError::InvalidUtf8`] /
    /// [`DecodeError::TooDeep`] / [`DecodeError::TooLarge`] for invalid input, and
    /// [`DecodeError::MissingField`] / [`DecodeError::WrongType`] for the envelope's own fields.
    /// The payload is only checked to be an object; decode it with
    /// [`inbound`](Self::inbound).
    pub fn parse(frame: &'a [u8]) -> Result<Self, DecodeError> {
        Self::parse_with(frame, &Limits::DEFAULT)
    }

    /// Like [`parse`](Self::parse) with explicit limits.
    pub fn parse_with(frame: &'a [u8], limits: &Limits) -> Result<Self, DecodeError> {
        if frame.len() > limits.max_len {
            return Err(DecodeError::TooLarge {
                len: frame.len(),
                max: limits.max_len,
            });
        }
        let first = frame
            .iter()
            .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
        if first != Some(&b'{') {
            return Err(DecodeError::NotJson);
        }
        let root = json::parse_with_depth(frame, limits.max_depth)?;
        let obj = root.as_object().ok_or(DecodeError::NotJson)?;
        let [type_name, request_id, payload, timestamp] =
            obj.fields(["type", "request_id", "payload", "timestamp"]);
        Ok(Self {
            type_name: req_str(type_name, "type")?,
            request_id: opt_str(request_id, "request_id")?,
            timestamp: opt_str(timestamp, "timestamp")?,
            payload: opt_object(payload, "payload")?.unwrap_or(JsonObject::EMPTY),
        })
    }
}

/// Tether extensions a peer advertises, as the `extensions` object of `register_success`
/// (control plane to agent) and of `register` (agent to control plane):
///
/// ```json
/// "extensions": {"websocket_started": true, "websocket_close_code": true, "proxy_error_status": true, "native_frames": true, "raw_upgrade": true, "response_credit": true, "native_tcp": true, "native_ack": true}
/// ```
///
/// A missing object or member means "not supported" (a PipeOps peer sends none). Unknown
/// members are ignored so later extensions can be added; a known member that is not a
/// boolean is [`DecodeError::WrongType`]`("extensions")`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Extensions {
    /// `proxy_websocket_started {stream_id, protocol}` acknowledges an upstream 101 with its
    /// negotiated subprotocol.
    pub websocket_started: bool,
    /// `proxy_websocket_close` carries `code` (u16) and `reason`.
    pub websocket_close_code: bool,
    /// `proxy_error` carries `status`, the upstream HTTP status that refused a request.
    pub proxy_error_status: bool,
    /// Binary native frames (see [`wire::native`](crate::wire::native)) with per-stream
    /// credit once both ends advertise it. Member `"native_frames"`.
    pub native: bool,
    /// `proxy_websocket_start` may carry `upgrade` (an HTTP/1.1 upgrade other than WebSocket,
    /// e.g. SPDY/3.1, with its `method`); the stream is then an opaque byte pipe after the
    /// upstream's 101. Member `"raw_upgrade"`.
    pub raw_upgrade: bool,
    /// `proxy_request` may carry `response_credit: true`: the agent then sends the response body
    /// only within credit the control plane grants (`proxy_response_credit`), so a client that
    /// stops reading holds only its own request. Member `"response_credit"`.
    pub response_credit: bool,
    /// On a native tunnel, `tcp_tunnel_start` may carry `stream` (a native stream number): the
    /// tunnel's bytes, credit and close then travel as native frames instead of base64 JSON.
    /// Member `"native_tcp"`.
    pub native_tcp: bool,
    /// On a native tunnel, each end acknowledges the data bytes it received with native `ack`
    /// frames, so the other keeps only what the path needs in flight (see
    /// `crate::engine::window`). Member `"native_ack"`.
    pub native_ack: bool,
}

impl Extensions {
    /// No extension (what a PipeOps peer supports).
    pub const NONE: Self = Self {
        websocket_started: false,
        websocket_close_code: false,
        proxy_error_status: false,
        native: false,
        raw_upgrade: false,
        response_credit: false,
        native_tcp: false,
        native_ack: false,
    };
    /// Every extension this version knows.
    pub const ALL: Self = Self {
        websocket_started: true,
        websocket_close_code: true,
        proxy_error_status: true,
        native: true,
        raw_upgrade: true,
        response_credit: true,
        native_tcp: true,
        native_ack: true,
    };

    /// The extensions both `self` and `other` offer: what a tunnel uses once registered.
    #[must_use]
    pub const fn common(self, other: Self) -> Self {
        Self {
            websocket_started: self.websocket_started && other.websocket_started,
            websocket_close_code: self.websocket_close_code && other.websocket_close_code,
            proxy_error_status: self.proxy_error_status && other.proxy_error_status,
            native: self.native && other.native,
            raw_upgrade: self.raw_upgrade && other.raw_upgrade,
            response_credit: self.response_credit && other.response_credit,
            native_tcp: self.native_tcp && other.native_tcp,
            native_ack: self.native_ack && other.native_ack,
        }
    }

    /// Reads the `extensions` member of a payload.
    pub fn from_payload(payload: JsonObject<'_>) -> Result<Self, DecodeError> {
        const F: &str = "extensions";
        let Some(obj) = opt_object(payload.get(F), F)? else {
            return Ok(Self::NONE);
        };
        let [a, b, c, d, e, f, g, h] = obj.fields([
            "websocket_started",
            "websocket_close_code",
            "proxy_error_status",
            "native_frames",
            "raw_upgrade",
            "response_credit",
            "native_tcp",
            "native_ack",
        ]);
        Ok(Self {
            websocket_started: opt_bool(a, F)?,
            websocket_close_code: opt_bool(b, F)?,
            proxy_error_status: opt_bool(c, F)?,
            native: opt_bool(d, F)?,
            raw_upgrade: opt_bool(e, F)?,
            response_credit: opt_bool(f, F)?,
            native_tcp: opt_bool(g, F)?,
            native_ack: opt_bool(h, F)?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Field readers. `null` counts as absent everywhere (Go marshals nil maps and slices as null).

fn present(v: Option<JsonValue<'_>>) -> Option<JsonValue<'_>> {
    v.filter(|v| !v.is_null())
}

/// An optional string.
pub(crate) fn opt_str<'a>(
    v: Option<JsonValue<'a>>,
    name: &'static str,
) -> Result<Option<JsonStr<'a>>, DecodeError> {
    match present(v) {
        None => Ok(None),
        Some(JsonValue::String(s)) => Ok(Some(s)),
        Some(_) => Err(DecodeError::WrongType(name)),
    }
}

/// A required string.
pub(crate) fn req_str<'a>(
    v: Option<JsonValue<'a>>,
    name: &'static str,
) -> Result<JsonStr<'a>, DecodeError> {
    opt_str(v, name)?.ok_or(DecodeError::MissingField(name))
}

/// An optional object.
pub(crate) fn opt_object<'a>(
    v: Option<JsonValue<'a>>,
    name: &'static str,
) -> Result<Option<JsonObject<'a>>, DecodeError> {
    match present(v) {
        None => Ok(None),
        Some(JsonValue::Object(o)) => Ok(Some(o)),
        Some(_) => Err(DecodeError::WrongType(name)),
    }
}

/// An optional boolean flag (`false` when absent).
pub(crate) fn opt_bool(v: Option<JsonValue<'_>>, name: &'static str) -> Result<bool, DecodeError> {
    match present(v) {
        None => Ok(false),
        Some(JsonValue::Bool(b)) => Ok(b),
        Some(_) => Err(DecodeError::WrongType(name)),
    }
}

/// An optional number.
pub(crate) fn opt_number<'a>(
    v: Option<JsonValue<'a>>,
    name: &'static str,
) -> Result<Option<JsonNumber<'a>>, DecodeError> {
    match present(v) {
        None => Ok(None),
        Some(JsonValue::Number(n)) => Ok(Some(n)),
        Some(_) => Err(DecodeError::WrongType(name)),
    }
}

/// An optional non-negative integer ([`DecodeError::InvalidValue`] if fractional or negative).
pub(crate) fn opt_u64(
    v: Option<JsonValue<'_>>,
    name: &'static str,
) -> Result<Option<u64>, DecodeError> {
    opt_number(v, name)?
        .map(|n| n.as_u64().ok_or(DecodeError::InvalidValue(name)))
        .transpose()
}

/// An optional `u32`.
pub(crate) fn opt_u32(
    v: Option<JsonValue<'_>>,
    name: &'static str,
) -> Result<Option<u32>, DecodeError> {
    opt_u64(v, name)?
        .map(|n| u32::try_from(n).map_err(|_| DecodeError::InvalidValue(name)))
        .transpose()
}

/// An optional `u16` (ports, status and close codes).
pub(crate) fn opt_u16(
    v: Option<JsonValue<'_>>,
    name: &'static str,
) -> Result<Option<u16>, DecodeError> {
    opt_u64(v, name)?
        .map(|n| u16::try_from(n).map_err(|_| DecodeError::InvalidValue(name)))
        .transpose()
}
