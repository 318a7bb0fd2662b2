//! Error types of the wire codecs: one small `Copy` enum per operation.
//!
//! Every error implements [`Display`](core::fmt::Display) and [`core::error::Error`], and
//! `defmt::Format` with the `defmt` feature, so the relay can log it and map it to a
//! `proxy_error` without allocating.

use core::fmt;

/// The caller's output buffer is too small.
///
/// `needed` is the exact number of bytes the whole output needs, so a caller can size a buffer
/// and retry; the encoders compute it by counting the bytes they could not write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BufferTooSmall {
    /// Bytes the complete output needs.
    pub needed: usize,
}

impl fmt::Display for BufferTooSmall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "output buffer too small: {} bytes needed", self.needed)
    }
}

impl core::error::Error for BufferTooSmall {}

/// Why a JSON document was rejected by [`parse`](super::json::parse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum JsonError {
    /// The input is not UTF-8; `offset` is the first bad byte.
    InvalidUtf8 {
        /// Byte offset of the first invalid byte.
        offset: usize,
    },
    /// The input is not valid JSON; `offset` is where the parser gave up.
    Malformed {
        /// Byte offset of the offending byte (or the input length at an unexpected end).
        offset: usize,
    },
    /// Objects and arrays are nested deeper than the limit.
    TooDeep,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidUtf8 { offset } => write!(f, "invalid UTF-8 at byte {offset}"),
            Self::Malformed { offset } => write!(f, "malformed JSON at byte {offset}"),
            Self::TooDeep => f.write_str("JSON nested too deeply"),
        }
    }
}

impl core::error::Error for JsonError {}

/// Why an envelope (or its payload) could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DecodeError {
    /// The frame does not start like a JSON object (after optional whitespace): for a binary
    /// frame this means "not JSON-in-binary" (e.g. a body frame), which callers may ignore.
    NotJson,
    /// The frame starts like JSON but is not valid JSON (see [`JsonError`]); `offset` is where
    /// the parser gave up.
    Malformed {
        /// Byte offset in the frame.
        offset: usize,
    },
    /// The frame is not UTF-8.
    InvalidUtf8 {
        /// Byte offset of the first invalid byte.
        offset: usize,
    },
    /// Objects and arrays are nested deeper than [`Limits::max_depth`](super::Limits).
    TooDeep,
    /// The frame is longer than [`Limits::max_len`](super::Limits).
    TooLarge {
        /// Length of the frame.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A required field is absent (or `null`).
    MissingField(&'static str),
    /// A field has the wrong JSON type (e.g. a number where a string is required).
    WrongType(&'static str),
    /// A numeric field is out of range, or a string field cannot be interpreted
    /// (e.g. `timeout: "soon"`).
    InvalidValue(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotJson => f.write_str("message is not JSON"),
            Self::Malformed { offset } => write!(f, "malformed JSON at byte {offset}"),
            Self::InvalidUtf8 { offset } => write!(f, "invalid UTF-8 at byte {offset}"),
            Self::TooDeep => f.write_str("JSON nested too deeply"),
            Self::TooLarge { len, max } => {
                write!(f, "message of {len} bytes exceeds the limit of {max} bytes")
            }
            Self::MissingField(name) => write!(f, "missing field `{name}`"),
            Self::WrongType(name) => write!(f, "field `{name}` has the wrong type"),
            Self::InvalidValue(name) => write!(f, "field `{name}` has an invalid value"),
        }
    }
}

impl core::error::Error for DecodeError {}

impl From<JsonError> for DecodeError {
    fn from(e: JsonError) -> Self {
        match e {
            JsonError::InvalidUtf8 { offset } => Self::InvalidUtf8 { offset },
            JsonError::Malformed { offset } => Self::Malformed { offset },
            JsonError::TooDeep => Self::TooDeep,
        }
    }
}

/// Why a data frame (`base64([opcode][payload])`) could not be decoded or encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FrameError {
    /// The base64 text is not canonical standard base64 with padding.
    BadBase64,
    /// The decoded frame is empty (no opcode byte).
    Empty,
    /// The opcode byte is not 1, 2, 8, 9 or 10.
    UnknownOpcode(u8),
    /// A close frame's payload is one byte long, or its reason is not UTF-8.
    BadClose,
    /// A close, ping or pong payload is longer than 125 bytes (RFC 6455 §5.5).
    ControlTooLong,
    /// The output buffer is too small; `needed` is the exact size required.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadBase64 => f.write_str("invalid base64"),
            Self::Empty => f.write_str("empty data frame"),
            Self::UnknownOpcode(op) => write!(f, "unknown data frame opcode {op}"),
            Self::BadClose => f.write_str("malformed close payload"),
            Self::ControlTooLong => f.write_str("control frame payload longer than 125 bytes"),
            Self::BufferTooSmall { needed } => {
                write!(f, "output buffer too small: {needed} bytes needed")
            }
        }
    }
}

impl core::error::Error for FrameError {}

impl From<BufferTooSmall> for FrameError {
    fn from(e: BufferTooSmall) -> Self {
        Self::BufferTooSmall { needed: e.needed }
    }
}

/// Why an outbound message could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EncodeError {
    /// The output buffer is too small; `needed` is the exact size of the whole message.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
    },
    /// The timestamp is after 9999-12-31T23:59:59Z or its `nanos` is not below 10⁹.
    TimestampOutOfRange,
    /// A data frame to embed is invalid (e.g. a control payload over 125 bytes or a close
    /// reason that makes it so).
    InvalidFrame(FrameError),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BufferTooSmall { needed } => {
                write!(f, "output buffer too small: {needed} bytes needed")
            }
            Self::TimestampOutOfRange => f.write_str("timestamp out of RFC 3339 range"),
            Self::InvalidFrame(e) => write!(f, "invalid data frame: {e}"),
        }
    }
}

impl core::error::Error for EncodeError {}

impl From<BufferTooSmall> for EncodeError {
    fn from(e: BufferTooSmall) -> Self {
        Self::BufferTooSmall { needed: e.needed }
    }
}

/// Why an RFC 3339 timestamp could not be parsed or formatted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TimestampError {
    /// Not of the form `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`, or a field is out of range.
    Malformed,
    /// Before 1970-01-01T00:00:00Z or after 9999-12-31T23:59:59Z, or `nanos` not below 10⁹.
    OutOfRange,
}

impl fmt::Display for TimestampError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed => f.write_str("malformed RFC 3339 timestamp"),
            Self::OutOfRange => f.write_str("timestamp out of range"),
        }
    }
}

impl core::error::Error for TimestampError {}
