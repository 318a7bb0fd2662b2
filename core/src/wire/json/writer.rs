//! JSON writer into a caller-provided buffer.
//!
//! The writer never fails midway: when the buffer runs out it stops storing bytes but keeps
//! counting them, and [`JsonWriter::finish`] reports either the length written or
//! [`BufferTooSmall`] with the exact size the whole document needs. Nesting is expressed with
//! closures ([`JsonWriter::object`], [`JsonWriter::array`]), so brackets and commas always
//! balance and the output is valid JSON whenever it fits.

use base64::Engine as _;

use crate::wire::error::BufferTooSmall;
use crate::wire::json::JsonStr;
use crate::wire::json::reader::JsonValue;

/// Writes one JSON document into a byte buffer. See the module docs.
#[derive(Debug)]
pub struct JsonWriter<'b> {
    buf: &'b mut [u8],
    len: usize,
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl<'b> JsonWriter<'b> {
    /// A writer that starts at the beginning of `buf`.
    pub fn new(buf: &'b mut [u8]) -> Self {
        Self { buf, len: 0 }
    }

    /// Bytes produced so far (may exceed the buffer length).
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `true` while everything produced so far fits the buffer.
    pub fn fits(&self) -> bool {
        self.len <= self.buf.len()
    }

    /// Ends writing: the number of bytes written, or the exact size needed.
    pub fn finish(self) -> Result<usize, BufferTooSmall> {
        if self.fits() {
            Ok(self.len)
        } else {
            Err(BufferTooSmall { needed: self.len })
        }
    }

    /// Appends raw bytes; the caller guarantees they keep the document valid.
    fn put(&mut self, bytes: &[u8]) {
        let end = self.len.saturating_add(bytes.len());
        if let Some(dst) = self.buf.get_mut(self.len..end) {
            dst.copy_from_slice(bytes);
        }
        self.len = end;
    }

    /// Appends `n` bytes produced by `fill` into the buffer slice, if they fit.
    fn put_with(&mut self, n: usize, fill: impl FnOnce(&mut [u8])) {
        let end = self.len.saturating_add(n);
        if let Some(dst) = self.buf.get_mut(self.len..end) {
            fill(dst);
        }
        self.len = end;
    }

    /// Writes `null`.
    pub fn null(&mut self) {
        self.put(b"null");
    }

    /// Writes `true` or `false`.
    pub fn bool(&mut self, v: bool) {
        self.put(if v { b"true" } else { b"false" });
    }

    /// Writes an unsigned integer.
    pub fn u64(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.put(&digits[i..]);
    }

    /// Writes a signed integer.
    pub fn i64(&mut self, v: i64) {
        if v < 0 {
            self.put(b"-");
        }
        self.u64(v.unsigned_abs());
    }

    /// Writes `s` as a JSON string, escaping `"`, `\` and control characters.
    pub fn string(&mut self, s: &str) {
        self.put(b"\"");
        self.escaped(s);
        self.put(b"\"");
    }

    /// Writes bytes as a JSON string, replacing each invalid UTF-8 sequence with U+FFFD (as Go
    /// does when it marshals a non-UTF-8 string, e.g. a raw HTTP header value).
    pub fn string_lossy(&mut self, bytes: &[u8]) {
        self.put(b"\"");
        for chunk in bytes.utf8_chunks() {
            self.escaped(chunk.valid());
            if !chunk.invalid().is_empty() {
                self.put("\u{FFFD}".as_bytes());
            }
        }
        self.put(b"\"");
    }

    /// Writes an already escaped [`JsonStr`] as a string, copying its raw text.
    pub fn json_str(&mut self, s: JsonStr<'_>) {
        self.put(b"\"");
        self.put(s.raw().as_bytes());
        self.put(b"\"");
    }

    /// Writes a [`WireStr`].
    pub fn wire_str(&mut self, s: WireStr<'_>) {
        match s {
            WireStr::Plain(s) => self.string(s),
            WireStr::Json(s) => self.json_str(s),
        }
    }

    /// Re-emits a validated value from the reader (copying its raw text).
    pub fn json_value(&mut self, v: JsonValue<'_>) {
        match v {
            JsonValue::Null => self.null(),
            JsonValue::Bool(b) => self.bool(b),
            JsonValue::Number(n) => self.put(n.raw().as_bytes()),
            JsonValue::String(s) => self.json_str(s),
            JsonValue::Array(a) => self.put(a.raw().as_bytes()),
            JsonValue::Object(o) => self.put(o.raw().as_bytes()),
        }
    }

    fn escaped(&mut self, s: &str) {
        let bytes = s.as_bytes();
        let mut run = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let esc: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x00..=0x1f => b"",
                _ => continue,
            };
            self.put(&bytes[run..i]);
            if esc.is_empty() {
                self.put(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ]);
            } else {
                self.put(esc);
            }
            run = i + 1;
        }
        self.put(&bytes[run..]);
    }

    /// Writes the standard base64 (with padding) of the concatenation of `parts` as a JSON
    /// string, encoding straight into the output buffer (no intermediate copy of the data).
    pub fn base64(&mut self, parts: &[&[u8]]) {
        self.put(b"\"");
        self.base64_unquoted(parts);
        self.put(b"\"");
    }

    /// Writes the base64 of the concatenation of `parts` WITHOUT quotes. Base64 characters
    /// are valid JSON string content; on its own this is for non-JSON output (the writer then
    /// serves as a counting byte sink).
    pub fn base64_unquoted(&mut self, parts: &[&[u8]]) {
        let mut carry = [0u8; 3];
        let mut carried = 0usize;
        for part in parts {
            let mut part: &[u8] = part;
            if carried > 0 {
                let take = (3 - carried).min(part.len());
                carry[carried..carried + take].copy_from_slice(&part[..take]);
                carried += take;
                part = &part[take..];
                if carried < 3 {
                    continue;
                }
                self.base64_aligned(&carry);
            }
            let whole = part.len() - part.len() % 3;
            self.base64_aligned(&part[..whole]);
            let rest = &part[whole..];
            carry[..rest.len()].copy_from_slice(rest);
            carried = rest.len();
        }
        if carried > 0 {
            self.base64_aligned(&carry[..carried]);
        }
    }

    /// Encodes `data` (a multiple of 3 bytes, or the final chunk) into the output.
    fn base64_aligned(&mut self, data: &[u8]) {
        let n = crate::wire::b64::encoded_len(data.len());
        self.put_with(n, |dst| {
            // `dst` is exactly the encoded length, so this cannot fail.
            let _ = base64::engine::general_purpose::STANDARD.encode_slice(data, dst);
        });
    }

    /// Writes an object; `f` writes its members.
    pub fn object(&mut self, f: impl FnOnce(&mut ObjectWriter<'_, 'b>)) {
        self.put(b"{");
        let mut o = ObjectWriter {
            w: self,
            first: true,
        };
        f(&mut o);
        self.put(b"}");
    }

    /// Writes an array; `f` writes its elements.
    pub fn array(&mut self, f: impl FnOnce(&mut ArrayWriter<'_, 'b>)) {
        self.put(b"[");
        let mut a = ArrayWriter {
            w: self,
            first: true,
        };
        f(&mut a);
        self.put(b"]");
    }

    /// Writes a [`Value`] tree.
    pub fn value(&mut self, v: &Value<'_>) {
        match *v {
            Value::Null => self.null(),
            Value::Bool(b) => self.bool(b),
            Value::U64(n) => self.u64(n),
            Value::I64(n) => self.i64(n),
            Value::Str(s) => self.string(s),
            Value::Json(j) => self.json_value(j),
            Value::Object(members) => self.object(|o| {
                for (k, v) in members {
                    o.value(k, v);
                }
            }),
            Value::Array(items) => self.array(|a| {
                for v in items {
                    a.item().value(v);
                }
            }),
        }
    }
}

/// Writes the members of an object; obtained from [`JsonWriter::object`].
#[derive(Debug)]
pub struct ObjectWriter<'w, 'b> {
    w: &'w mut JsonWriter<'b>,
    first: bool,
}

impl<'b> ObjectWriter<'_, 'b> {
    /// Writes `"key":` (with a leading comma when needed) and returns the writer for the value,
    /// which the caller MUST then write exactly once.
    pub fn key(&mut self, key: &str) -> &mut JsonWriter<'b> {
        if !self.first {
            self.w.put(b",");
        }
        self.first = false;
        self.w.string(key);
        self.w.put(b":");
        self.w
    }

    /// Like [`key`](Self::key) for a name given as bytes (invalid UTF-8 becomes U+FFFD).
    pub fn key_lossy(&mut self, key: &[u8]) -> &mut JsonWriter<'b> {
        if !self.first {
            self.w.put(b",");
        }
        self.first = false;
        self.w.string_lossy(key);
        self.w.put(b":");
        self.w
    }

    /// `"key":"value"`.
    pub fn str(&mut self, key: &str, value: &str) {
        self.key(key).string(value);
    }

    /// `"key":"value"` from a [`WireStr`].
    pub fn wire_str(&mut self, key: &str, value: WireStr<'_>) {
        self.key(key).wire_str(value);
    }

    /// `"key":"value"` only when `value` is `Some`.
    pub fn opt_wire_str(&mut self, key: &str, value: Option<WireStr<'_>>) {
        if let Some(v) = value {
            self.wire_str(key, v);
        }
    }

    /// `"key":n`.
    pub fn u64(&mut self, key: &str, value: u64) {
        self.key(key).u64(value);
    }

    /// `"key":true|false`.
    pub fn bool(&mut self, key: &str, value: bool) {
        self.key(key).bool(value);
    }

    /// `"key":"<base64 of the concatenated parts>"`.
    pub fn base64(&mut self, key: &str, parts: &[&[u8]]) {
        self.key(key).base64(parts);
    }

    /// `"key":<value>`.
    pub fn value(&mut self, key: &str, value: &Value<'_>) {
        self.key(key).value(value);
    }

    /// `"key":{...}`.
    pub fn object(&mut self, key: &str, f: impl FnOnce(&mut ObjectWriter<'_, 'b>)) {
        self.key(key).object(f);
    }

    /// `"key":[...]`.
    pub fn array(&mut self, key: &str, f: impl FnOnce(&mut ArrayWriter<'_, 'b>)) {
        self.key(key).array(f);
    }
}

/// Writes the elements of an array; obtained from [`JsonWriter::array`].
#[derive(Debug)]
pub struct ArrayWriter<'w, 'b> {
    w: &'w mut JsonWriter<'b>,
    first: bool,
}

impl<'b> ArrayWriter<'_, 'b> {
    /// Writes the separator and returns the writer for the next element, which the caller
    /// MUST then write exactly once.
    pub fn item(&mut self) -> &mut JsonWriter<'b> {
        if !self.first {
            self.w.put(b",");
        }
        self.first = false;
        self.w
    }
}

/// A string to write: plain text (escaped on output) or an already escaped [`JsonStr`] taken
/// from a decoded message (copied verbatim, e.g. to echo a request id without unescaping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireStr<'a> {
    /// Plain text.
    Plain(&'a str),
    /// Escaped JSON string content.
    Json(JsonStr<'a>),
}

impl WireStr<'_> {
    /// `true` for the empty string.
    pub fn is_empty(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_empty(),
            Self::Json(s) => s.is_empty(),
        }
    }
}

impl<'a> From<&'a str> for WireStr<'a> {
    fn from(s: &'a str) -> Self {
        Self::Plain(s)
    }
}

impl<'a> From<JsonStr<'a>> for WireStr<'a> {
    fn from(s: JsonStr<'a>) -> Self {
        Self::Json(s)
    }
}

/// A JSON value tree built from borrowed parts, for free-form outbound fields (labels,
/// metadata, server specs, monitoring credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// `null`
    Null,
    /// A boolean.
    Bool(bool),
    /// An unsigned integer.
    U64(u64),
    /// A signed integer.
    I64(i64),
    /// A string (escaped on output).
    Str(&'a str),
    /// A validated value from the reader, copied verbatim.
    Json(JsonValue<'a>),
    /// An object of named values, written in order.
    Object(&'a [(&'a str, Self)]),
    /// An array.
    Array(&'a [Self]),
}
