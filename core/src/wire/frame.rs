//! Data frames: one WebSocket message as `[opcode byte][payload]`, carried in
//! `payload.data` as standard base64 with padding (`"hello"` as text is `AWhlbGxv`).
//!
//! Opcodes are the WebSocket ones: 1 text, 2 binary, 8 close (payload empty, or a big-endian
//! `u16` code followed by a UTF-8 reason), 9 ping, 10 pong. Anything else is
//! [`FrameError::UnknownOpcode`]. Close, ping and pong payloads are limited to 125 bytes as
//! on a WebSocket. Text payloads are NOT checked for UTF-8 here (the PipeOps agent sends
//! non-UTF-8 text frames); use [`DataFrame::text`] where it matters.

use crate::wire::b64::{self, Base64Str};
use crate::wire::error::{BufferTooSmall, FrameError};

/// Largest close/ping/pong payload (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A data-frame opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum Opcode {
    /// Text message.
    Text = 1,
    /// Binary message.
    Binary = 2,
    /// Close.
    Close = 8,
    /// Ping.
    Ping = 9,
    /// Pong.
    Pong = 10,
}

impl TryFrom<u8> for Opcode {
    type Error = FrameError;

    fn try_from(b: u8) -> Result<Self, FrameError> {
        Ok(match b {
            1 => Self::Text,
            2 => Self::Binary,
            8 => Self::Close,
            9 => Self::Ping,
            10 => Self::Pong,
            other => return Err(FrameError::UnknownOpcode(other)),
        })
    }
}

/// Code and reason of a close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CloseFrame<'a> {
    /// Close status code (not range-checked: the relay decides what to forward).
    pub code: u16,
    /// UTF-8 reason, possibly empty.
    pub reason: &'a str,
}

/// One WebSocket message, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DataFrame<'a> {
    /// Text message (bytes as received; see module docs).
    Text(&'a [u8]),
    /// Binary message.
    Binary(&'a [u8]),
    /// Close, with or without code and reason.
    Close(Option<CloseFrame<'a>>),
    /// Ping.
    Ping(&'a [u8]),
    /// Pong.
    Pong(&'a [u8]),
}

impl<'a> DataFrame<'a> {
    /// The opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            Self::Text(_) => Opcode::Text,
            Self::Binary(_) => Opcode::Binary,
            Self::Close(_) => Opcode::Close,
            Self::Ping(_) => Opcode::Ping,
            Self::Pong(_) => Opcode::Pong,
        }
    }

    /// The text payload as `&str`, for a text frame whose payload is UTF-8.
    pub fn text(&self) -> Option<&'a str> {
        match self {
            Self::Text(b) => core::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// Parses raw (already base64-decoded) `[opcode][payload]` bytes.
    pub fn parse(raw: &'a [u8]) -> Result<Self, FrameError> {
        let (&op, payload) = raw.split_first().ok_or(FrameError::Empty)?;
        let frame = match Opcode::try_from(op)? {
            Opcode::Text => Self::Text(payload),
            Opcode::Binary => Self::Binary(payload),
            Opcode::Ping => Self::Ping(payload),
            Opcode::Pong => Self::Pong(payload),
            Opcode::Close => match payload {
                [] => Self::Close(None),
                [_] => return Err(FrameError::BadClose),
                [hi, lo, reason @ ..] => Self::Close(Some(CloseFrame {
                    code: u16::from_be_bytes([*hi, *lo]),
                    reason: core::str::from_utf8(reason).map_err(|_| FrameError::BadClose)?,
                })),
            },
        };
        frame.check()?;
        Ok(frame)
    }

    /// Checks the control payload limit.
    pub fn check(&self) -> Result<(), FrameError> {
        match self {
            Self::Text(_) | Self::Binary(_) => Ok(()),
            _ if self.payload_len() > MAX_CONTROL_PAYLOAD => Err(FrameError::ControlTooLong),
            _ => Ok(()),
        }
    }

    /// Length of the payload (for close: 2 + reason length, or 0).
    pub fn payload_len(&self) -> usize {
        match self {
            Self::Text(b) | Self::Binary(b) | Self::Ping(b) | Self::Pong(b) => b.len(),
            Self::Close(None) => 0,
            Self::Close(Some(c)) => 2 + c.reason.len(),
        }
    }

    /// Length of the raw frame: 1 + [`payload_len`](Self::payload_len).
    pub fn raw_len(&self) -> usize {
        1 + self.payload_len()
    }

    /// Length of the base64 text of the frame.
    pub fn encoded_len(&self) -> usize {
        b64::encoded_len(self.raw_len())
    }

    /// The frame as up to three byte slices whose concatenation is the raw frame, for
    /// encoding without copying: `(header, body)` where `header[..header_len]` holds the
    /// opcode (and a close code).
    pub fn parts(&self) -> ([u8; 3], usize, &'a [u8]) {
        let op = self.opcode() as u8;
        match self {
            Self::Text(b) | Self::Binary(b) | Self::Ping(b) | Self::Pong(b) => ([op, 0, 0], 1, b),
            Self::Close(None) => ([op, 0, 0], 1, &[]),
            Self::Close(Some(c)) => {
                let [hi, lo] = c.code.to_be_bytes();
                ([op, hi, lo], 3, c.reason.as_bytes())
            }
        }
    }

    /// Writes the raw frame into `out`; returns its length.
    pub fn write_raw(&self, out: &mut [u8]) -> Result<usize, BufferTooSmall> {
        let needed = self.raw_len();
        let out = out.get_mut(..needed).ok_or(BufferTooSmall { needed })?;
        let (head, head_len, body) = self.parts();
        out[..head_len].copy_from_slice(&head[..head_len]);
        out[head_len..].copy_from_slice(body);
        Ok(needed)
    }

    /// Encodes the frame as base64 into `out` (no intermediate copy); returns the length,
    /// which is [`encoded_len`](Self::encoded_len).
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, FrameError> {
        self.check()?;
        let mut w = crate::wire::json::JsonWriter::new(out);
        let (head, head_len, body) = self.parts();
        w.base64_unquoted(&[&head[..head_len], body]);
        Ok(w.finish()?)
    }

    /// Decodes the base64 `data` of a decoded message (e.g. [`WebSocketData::data`]) into
    /// `out` and parses the frame, which borrows `out`. Size `out` with
    /// [`Base64Str::decoded_len`].
    ///
    /// [`WebSocketData::data`]: crate::wire::WebSocketData::data
    pub fn decode_json(data: Base64Str<'_>, out: &'a mut [u8]) -> Result<Self, FrameError> {
        let raw = data.decode_into(out)?;
        Self::parse(raw)
    }

    /// Decodes base64 `b64` into `out` and parses the frame, which borrows `out`.
    pub fn decode(b64_text: &[u8], out: &'a mut [u8]) -> Result<Self, FrameError> {
        let n = b64::decode(b64_text, out)?;
        Self::parse(&out[..n])
    }
}
