//! Standard base64 (RFC 4648 §4, `+/`, with `=` padding) as the compat wire uses it: length
//! math, and decoding of base64 carried in JSON strings.
//!
//! Decoding is strict (canonical padding, no trailing bits, no whitespace), matching Go's
//! `base64.StdEncoding` except that Go also skips `\r`/`\n`, which no agent or control plane
//! emits.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::wire::error::FrameError;
use crate::wire::json::JsonStr;

/// Length of the padded base64 text for `n` input bytes: `4 * ceil(n / 3)`.
///
/// Saturates at `usize::MAX` for inputs that could not exist in memory anyway.
pub const fn encoded_len(n: usize) -> usize {
    match (n / 3).checked_add(!n.is_multiple_of(3) as usize) {
        Some(groups) => groups.saturating_mul(4),
        None => usize::MAX,
    }
}

/// Largest decoded length for `b64_len` bytes of padded base64 text: `3 * (len / 4)`.
/// The exact length also depends on the padding; see [`decoded_len`].
pub const fn decoded_len_max(b64_len: usize) -> usize {
    (b64_len / 4) * 3
}

/// Exact decoded length of padded base64 text, judged from its length and trailing `=`s
/// only (the characters themselves are checked when decoding). `None` when the length is not
/// a multiple of 4.
pub fn decoded_len(b64: &[u8]) -> Option<usize> {
    if !b64.len().is_multiple_of(4) {
        return None;
    }
    let pad = match b64 {
        [.., b'=', b'='] => 2,
        [.., b'='] => 1,
        _ => 0,
    };
    Some(decoded_len_max(b64.len()) - pad)
}

/// Encodes `data` into `out`; returns the encoded length.
pub fn encode(data: &[u8], out: &mut [u8]) -> Result<usize, FrameError> {
    let needed = encoded_len(data.len());
    let dst = out
        .get_mut(..needed)
        .ok_or(FrameError::BufferTooSmall { needed })?;
    STANDARD
        .encode_slice(data, dst)
        .map_err(|_| FrameError::BufferTooSmall { needed })
}

/// Decodes padded base64 `b64` into `out`; returns the decoded length.
///
/// Errors: [`FrameError::BadBase64`] for any non-canonical input,
/// [`FrameError::BufferTooSmall`] (with the exact length) when `out` is too small.
pub fn decode(b64: &[u8], out: &mut [u8]) -> Result<usize, FrameError> {
    let needed = decoded_len(b64).ok_or(FrameError::BadBase64)?;
    let dst = out
        .get_mut(..needed)
        .ok_or(FrameError::BufferTooSmall { needed })?;
    match STANDARD.decode_slice(b64, dst) {
        Ok(n) if n == needed => Ok(n),
        _ => Err(FrameError::BadBase64),
    }
}

/// Base64 text carried in a JSON string (e.g. `payload.data`), still escaped.
///
/// JSON allows any character to be escaped (`"\/"` for `/`, `"\u0041"` for `A`); such strings
/// are decoded through a small stack buffer, so no copy of the whole text is ever needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Base64Str<'a>(pub JsonStr<'a>);

/// Characters unescaped per step on the slow (escaped) path; a multiple of 4.
const CHUNK: usize = 64;

impl<'a> Base64Str<'a> {
    /// The escaped JSON string.
    pub fn json(&self) -> JsonStr<'a> {
        self.0
    }

    /// Exact decoded length (see [`decoded_len`]); [`FrameError::BadBase64`] when the
    /// length is not a multiple of 4 or the text contains non-ASCII characters.
    pub fn decoded_len(&self) -> Result<usize, FrameError> {
        if let Some(s) = self.0.as_str() {
            return decoded_len(s.as_bytes()).ok_or(FrameError::BadBase64);
        }
        let mut len = 0usize;
        let mut last = [0u8; 2];
        for c in self.0.chars() {
            if !c.is_ascii() {
                return Err(FrameError::BadBase64);
            }
            last = [last[1], c as u8];
            len += 1;
        }
        if !len.is_multiple_of(4) {
            return Err(FrameError::BadBase64);
        }
        let pad = match last {
            [b'=', b'='] => 2,
            [_, b'='] => 1,
            _ => 0,
        };
        Ok(decoded_len_max(len) - pad)
    }

    /// Decodes into `out`, returning the decoded bytes.
    pub fn decode_into<'b>(&self, out: &'b mut [u8]) -> Result<&'b [u8], FrameError> {
        let needed = self.decoded_len()?;
        let out = out
            .get_mut(..needed)
            .ok_or(FrameError::BufferTooSmall { needed })?;
        if let Some(s) = self.0.as_str() {
            let n = decode(s.as_bytes(), out)?;
            return Ok(&out[..n]);
        }
        // Escaped: unescape CHUNK characters at a time. Only the last chunk may hold padding.
        let mut chunk = [0u8; CHUNK];
        let mut filled = 0;
        let mut written = 0;
        let mut padded = false;
        let mut chars = self.0.chars().peekable();
        while chars.peek().is_some() {
            for c in chars.by_ref() {
                chunk[filled] = c as u8; // ASCII checked by decoded_len
                filled += 1;
                if filled == CHUNK {
                    break;
                }
            }
            if padded {
                return Err(FrameError::BadBase64);
            }
            padded = chunk[..filled].contains(&b'=');
            let dst = out.get_mut(written..).ok_or(FrameError::BadBase64)?;
            written += decode(&chunk[..filled], dst)?;
            filled = 0;
        }
        if written == needed {
            Ok(&out[..written])
        } else {
            Err(FrameError::BadBase64)
        }
    }
}
