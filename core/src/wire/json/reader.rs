//! Zero-copy, validating JSON reader.
//!
//! [`parse`] validates a whole document in one iterative pass (no recursion, so hostile nesting
//! costs one bit of state per level, bounded by the depth limit) and returns a [`JsonValue`]
//! view of the root. Every view borrows the input: strings are [`JsonStr`]s holding the raw,
//! still-escaped text between the quotes, objects and arrays are iterable [`JsonObject`] /
//! [`JsonArray`] views over their raw text. Because the whole document was validated first,
//! iterating a view cannot fail; views can only be obtained from [`parse`].
//!
//! Cost model: iterating an object or array is linear in its raw length (a member's value is
//! skipped by scanning it). Use [`JsonObject::fields`] to pick several members in one pass.

use core::fmt;

use crate::wire::error::{BufferTooSmall, JsonError};

/// Default nesting limit used by [`parse`].
pub const DEFAULT_MAX_DEPTH: usize = 32;
/// The largest nesting limit [`parse_with_depth`] accepts; larger requests are clamped.
pub const MAX_DEPTH_LIMIT: usize = 128;

/// Parses and validates a complete JSON document (RFC 8259, UTF-8), nesting limited to
/// [`DEFAULT_MAX_DEPTH`]. Leading and trailing whitespace are allowed; anything else after
/// the value is an error.
pub fn parse(src: &[u8]) -> Result<JsonValue<'_>, JsonError> {
    parse_with_depth(src, DEFAULT_MAX_DEPTH)
}

/// Like [`parse`] with an explicit nesting limit (clamped to [`MAX_DEPTH_LIMIT`]). A depth of
/// 0 accepts only scalars; each object or array adds one level.
pub fn parse_with_depth(src: &[u8], max_depth: usize) -> Result<JsonValue<'_>, JsonError> {
    let text = core::str::from_utf8(src).map_err(|e| JsonError::InvalidUtf8 {
        offset: e.valid_up_to(),
    })?;
    let (start, end) = validate(text.as_bytes(), max_depth.min(MAX_DEPTH_LIMIT))?;
    // `validate` guarantees `start..end` is a complete value on char boundaries.
    let raw = text
        .get(start..end)
        .ok_or(JsonError::Malformed { offset: start })?;
    Ok(value_at(raw, 0).map_or(JsonValue::Null, |(v, _)| v))
}

// ---------------------------------------------------------------------------------------------
// Validation

#[derive(Clone, Copy)]
enum Expect {
    /// A value.
    Value,
    /// A value or the `]` of an empty array.
    ValueOrClose,
    /// An object key (string) or the `}` of an empty object.
    KeyOrClose,
    /// An object key after a comma.
    Key,
    /// `,` or the container's closing bracket, or the end of input at depth 0.
    After,
}

fn malformed(offset: usize) -> JsonError {
    JsonError::Malformed { offset }
}

fn skip_ws(s: &[u8], mut pos: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = s.get(pos) {
        pos += 1;
    }
    pos
}

/// Validates `s` as one JSON document and returns the byte range of the root value.
fn validate(s: &[u8], max_depth: usize) -> Result<(usize, usize), JsonError> {
    // Bit `i` of `stack` is 1 when the container at depth `i + 1` is an object.
    let mut stack: u128 = 0;
    let mut depth: usize = 0;
    let mut state = Expect::Value;
    let mut pos = skip_ws(s, 0);
    let start = pos;
    loop {
        pos = skip_ws(s, pos);
        let Some(&b) = s.get(pos) else {
            return Err(malformed(pos));
        };
        match state {
            Expect::Value | Expect::ValueOrClose => {
                if matches!(state, Expect::ValueOrClose) && b == b']' {
                    pos += 1;
                    depth -= 1;
                    state = Expect::After;
                    if depth == 0 {
                        break;
                    }
                    continue;
                }
                match b {
                    b'{' | b'[' => {
                        if depth >= max_depth {
                            return Err(JsonError::TooDeep);
                        }
                        let is_obj = b == b'{';
                        if is_obj {
                            stack |= 1 << depth;
                        } else {
                            stack &= !(1 << depth);
                        }
                        depth += 1;
                        pos += 1;
                        state = if is_obj {
                            Expect::KeyOrClose
                        } else {
                            Expect::ValueOrClose
                        };
                        continue;
                    }
                    b'"' => pos = scan_string(s, pos)?,
                    b't' => pos = scan_literal(s, pos, b"true")?,
                    b'f' => pos = scan_literal(s, pos, b"false")?,
                    b'n' => pos = scan_literal(s, pos, b"null")?,
                    b'-' | b'0'..=b'9' => pos = scan_number(s, pos)?,
                    _ => return Err(malformed(pos)),
                }
                if depth == 0 {
                    break;
                }
                state = Expect::After;
            }
            Expect::KeyOrClose | Expect::Key => {
                if matches!(state, Expect::KeyOrClose) && b == b'}' {
                    pos += 1;
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                    state = Expect::After;
                    continue;
                }
                if b != b'"' {
                    return Err(malformed(pos));
                }
                pos = skip_ws(s, scan_string(s, pos)?);
                if s.get(pos) != Some(&b':') {
                    return Err(malformed(pos));
                }
                pos += 1;
                state = Expect::Value;
            }
            Expect::After => {
                let in_obj = stack & (1 << (depth - 1)) != 0;
                match (b, in_obj) {
                    (b',', true) => state = Expect::Key,
                    (b',', false) => state = Expect::Value,
                    (b'}', true) | (b']', false) => {
                        depth -= 1;
                        if depth == 0 {
                            pos += 1;
                            break;
                        }
                    }
                    _ => return Err(malformed(pos)),
                }
                pos += 1;
            }
        }
    }
    let end = pos;
    let rest = skip_ws(s, end);
    if rest != s.len() {
        return Err(malformed(rest));
    }
    Ok((start, end))
}

/// `s[pos]` is `"`; returns the position after the closing quote.
fn scan_string(s: &[u8], mut pos: usize) -> Result<usize, JsonError> {
    pos += 1;
    loop {
        pos = skip_plain(s, pos);
        let Some(&b) = s.get(pos) else {
            return Err(malformed(pos));
        };
        match b {
            b'"' => return Ok(pos + 1),
            b'\\' => match s.get(pos + 1) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => pos += 2,
                Some(b'u') => {
                    let hex = s.get(pos + 2..pos + 6).ok_or(malformed(pos))?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return Err(malformed(pos));
                    }
                    pos += 6;
                }
                _ => return Err(malformed(pos)),
            },
            0x00..=0x1f => return Err(malformed(pos)),
            _ => pos += 1,
        }
    }
}

/// The first index at or after `pos` whose byte can end a plain run inside a string (`"`, `\\` or
/// a control character), or `s.len()`. Eight bytes at a time: strings in tunnel messages are mostly
/// long base64 runs, and a byte-at-a-time scan of them dominated envelope decoding.
fn skip_plain(s: &[u8], mut pos: usize) -> usize {
    while let Some(word) = s
        .get(pos..pos + 8)
        .and_then(|w| <[u8; 8]>::try_from(w).ok())
    {
        if has_special_byte(u64::from_le_bytes(word)) {
            break;
        }
        pos += 8;
    }
    while let Some(&b) = s.get(pos) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            break;
        }
        pos += 1;
    }
    pos
}

/// Whether any byte of `word` is `"`, `\\` or below 0x20 (exact for "any"; SWAR zero-byte test).
fn has_special_byte(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let quote = zero_byte(word ^ (ONES * u64::from(b'"')));
    let backslash = zero_byte(word ^ (ONES * u64::from(b'\\')));
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
    (quote | backslash | control) != 0
}

fn scan_literal(s: &[u8], pos: usize, lit: &[u8]) -> Result<usize, JsonError> {
    if s.get(pos..pos + lit.len()) == Some(lit) {
        Ok(pos + lit.len())
    } else {
        Err(malformed(pos))
    }
}

fn scan_digits(s: &[u8], mut pos: usize) -> usize {
    while let Some(b'0'..=b'9') = s.get(pos) {
        pos += 1;
    }
    pos
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
fn scan_number(s: &[u8], mut pos: usize) -> Result<usize, JsonError> {
    if s.get(pos) == Some(&b'-') {
        pos += 1;
    }
    match s.get(pos) {
        Some(b'0') => pos += 1,
        Some(b'1'..=b'9') => pos = scan_digits(s, pos),
        _ => return Err(malformed(pos)),
    }
    if s.get(pos) == Some(&b'.') {
        let after = scan_digits(s, pos + 1);
        if after == pos + 1 {
            return Err(malformed(pos + 1));
        }
        pos = after;
    }
    if let Some(b'e' | b'E') = s.get(pos) {
        pos += 1;
        if let Some(b'+' | b'-') = s.get(pos) {
            pos += 1;
        }
        let after = scan_digits(s, pos);
        if after == pos {
            return Err(malformed(pos));
        }
        pos = after;
    }
    Ok(pos)
}

// ---------------------------------------------------------------------------------------------
// Views over validated text. These helpers assume `raw` is validated; on inconsistent input they
// return `None` rather than panic.

/// Reads the value starting at (or after whitespace from) `pos`; returns it and the end offset.
fn value_at(raw: &str, pos: usize) -> Option<(JsonValue<'_>, usize)> {
    let b = raw.as_bytes();
    let start = skip_ws(b, pos);
    let end = skip_value(b, start)?;
    let text = raw.get(start..end)?;
    let v = match b.get(start)? {
        b'{' => JsonValue::Object(JsonObject { raw: text }),
        b'[' => JsonValue::Array(JsonArray { raw: text }),
        b'"' => JsonValue::String(JsonStr {
            raw: text.get(1..text.len() - 1)?,
        }),
        b't' => JsonValue::Bool(true),
        b'f' => JsonValue::Bool(false),
        b'n' => JsonValue::Null,
        _ => JsonValue::Number(JsonNumber { raw: text }),
    };
    Some((v, end))
}

/// End offset of the (validated) value starting exactly at `pos`.
fn skip_value(b: &[u8], pos: usize) -> Option<usize> {
    match b.get(pos)? {
        b'"' => skip_string(b, pos),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = pos;
            loop {
                match b.get(i)? {
                    b'"' => {
                        i = skip_string(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let mut i = pos;
            while let Some(c) = b.get(i) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                i += 1;
            }
            Some(i)
        }
    }
}

/// `b[pos]` is `"` of a validated string; returns the offset after the closing quote.
fn skip_string(b: &[u8], pos: usize) -> Option<usize> {
    let mut i = pos + 1;
    loop {
        i = skip_plain(b, i);
        match b.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// A borrowed view of a validated JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonValue<'a> {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// A number, kept as its raw text.
    Number(JsonNumber<'a>),
    /// A string, kept escaped.
    String(JsonStr<'a>),
    /// An array.
    Array(JsonArray<'a>),
    /// An object.
    Object(JsonObject<'a>),
}

impl<'a> JsonValue<'a> {
    /// The string view, if this is a string.
    pub fn as_str(&self) -> Option<JsonStr<'a>> {
        match self {
            Self::String(s) => Some(*s),
            _ => None,
        }
    }

    /// The object view, if this is an object.
    pub fn as_object(&self) -> Option<JsonObject<'a>> {
        match self {
            Self::Object(o) => Some(*o),
            _ => None,
        }
    }

    /// The array view, if this is an array.
    pub fn as_array(&self) -> Option<JsonArray<'a>> {
        match self {
            Self::Array(a) => Some(*a),
            _ => None,
        }
    }

    /// The boolean, if this is `true` or `false`.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Self::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The number view, if this is a number.
    pub fn as_number(&self) -> Option<JsonNumber<'a>> {
        match self {
            Self::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// `true` for `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Self::Null)
    }
}

/// A validated JSON number, kept as its raw text (e.g. `200`, `-1.5e3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonNumber<'a> {
    raw: &'a str,
}

impl<'a> JsonNumber<'a> {
    /// The raw text.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// The value as an unsigned integer, if it is one exactly. Accepts integral values written
    /// with a fraction or exponent (`200.0`, `2e2`), as a Go control plane may send numbers
    /// that went through `float64`, provided they are below 2⁵³ when so written.
    pub fn as_u64(&self) -> Option<u64> {
        if let Ok(v) = self.raw.parse::<u64>() {
            return Some(v);
        }
        let f = self.as_f64();
        // Exactly representable integral floats only.
        if (0.0..9_007_199_254_740_992.0).contains(&f) && (f as u64) as f64 == f {
            Some(f as u64)
        } else {
            None
        }
    }

    /// The value as a signed integer, if it is one exactly (same rules as [`as_u64`](Self::as_u64)).
    pub fn as_i64(&self) -> Option<i64> {
        if let Ok(v) = self.raw.parse::<i64>() {
            return Some(v);
        }
        let f = self.as_f64();
        if (-9_007_199_254_740_992.0..9_007_199_254_740_992.0).contains(&f)
            && (f as i64) as f64 == f
        {
            Some(f as i64)
        } else {
            None
        }
    }

    /// The value as the nearest `f64` (infinite when out of range).
    pub fn as_f64(&self) -> f64 {
        self.raw.parse::<f64>().unwrap_or(f64::NAN)
    }
}

/// A validated JSON string, kept as the raw escaped text between its quotes.
///
/// Comparisons ([`PartialEq<str>`], [`eq_ignore_ascii_case`](Self::eq_ignore_ascii_case))
/// and [`chars`](Self::chars) look through escapes, so `"a\u0062"` equals `"ab"`. A `\u`
/// escape of an unpaired UTF-16 surrogate decodes to U+FFFD (as Go's `encoding/json` does).
#[derive(Clone, Copy)]
pub struct JsonStr<'a> {
    raw: &'a str,
}

impl<'a> JsonStr<'a> {
    /// The empty string.
    pub const EMPTY: JsonStr<'static> = JsonStr { raw: "" };

    /// The raw escaped text (without the quotes). Valid JSON string content: writing it
    /// between quotes reproduces the original string.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// `true` when the text contains escapes (so [`as_str`](Self::as_str) is `None`).
    pub fn has_escapes(&self) -> bool {
        self.raw.as_bytes().contains(&b'\\')
    }

    /// The string itself without copying, when it contains no escapes.
    pub fn as_str(&self) -> Option<&'a str> {
        if self.has_escapes() {
            None
        } else {
            Some(self.raw)
        }
    }

    /// `true` for the empty string.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Iterates over the unescaped characters.
    pub fn chars(&self) -> JsonChars<'a> {
        JsonChars {
            rest: self.raw.as_bytes(),
            text: self.raw,
        }
    }

    /// Exact length in bytes of the unescaped UTF-8 string.
    pub fn unescaped_len(&self) -> usize {
        if self.has_escapes() {
            self.chars().map(char::len_utf8).sum()
        } else {
            self.raw.len()
        }
    }

    /// Compares with `other` ignoring ASCII case, through escapes (for HTTP header names).
    pub fn eq_ignore_ascii_case(&self, other: &str) -> bool {
        if !self.has_escapes() {
            return self.raw.eq_ignore_ascii_case(other);
        }
        let mut a = self.chars();
        let mut b = other.chars();
        loop {
            match (a.next(), b.next()) {
                (None, None) => return true,
                (Some(x), Some(y)) if x.eq_ignore_ascii_case(&y) => {}
                _ => return false,
            }
        }
    }

    /// Writes the unescaped string into `buf` and returns it.
    ///
    /// Errors with the exact length needed when `buf` is too small (nothing useful is left in
    /// `buf` then).
    pub fn unescape_into<'b>(&self, buf: &'b mut [u8]) -> Result<&'b str, BufferTooSmall> {
        let needed = self.unescaped_len();
        let out = buf.get_mut(..needed).ok_or(BufferTooSmall { needed })?;
        let mut n = 0;
        for c in self.chars() {
            let w = c.len_utf8();
            if let Some(dst) = out.get_mut(n..n + w) {
                c.encode_utf8(dst);
            }
            n += w;
        }
        core::str::from_utf8(out).map_err(|_| BufferTooSmall { needed })
    }

    /// The string without copying when it has no escapes, else unescaped into `scratch`.
    pub fn to_str<'b>(&self, scratch: &'b mut [u8]) -> Result<&'b str, BufferTooSmall>
    where
        'a: 'b,
    {
        match self.as_str() {
            Some(s) => Ok(s),
            None => self.unescape_into(scratch),
        }
    }
}

impl PartialEq<str> for JsonStr<'_> {
    fn eq(&self, other: &str) -> bool {
        if !self.has_escapes() {
            return self.raw == other;
        }
        self.chars().eq(other.chars())
    }
}

impl PartialEq<&str> for JsonStr<'_> {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

impl PartialEq for JsonStr<'_> {
    fn eq(&self, other: &Self) -> bool {
        if self.raw == other.raw {
            return true;
        }
        self.chars().eq(other.chars())
    }
}

impl Eq for JsonStr<'_> {}

impl fmt::Debug for JsonStr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.raw)
    }
}

/// Displays the unescaped string.
impl fmt::Display for JsonStr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_str() {
            Some(s) => f.write_str(s),
            None => self.chars().try_for_each(|c| fmt::Write::write_char(f, c)),
        }
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for JsonStr<'_> {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "\"{=str}\"", self.raw)
    }
}

/// Iterator over the unescaped characters of a [`JsonStr`].
#[derive(Debug, Clone)]
pub struct JsonChars<'a> {
    rest: &'a [u8],
    text: &'a str,
}

fn hex4(b: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in b.get(..4)? {
        v = v * 16 + (c as char).to_digit(16)?;
    }
    Some(v)
}

impl Iterator for JsonChars<'_> {
    type Item = char;

    fn next(&mut self) -> Option<char> {
        let (&first, _) = self.rest.split_first()?;
        if first != b'\\' {
            // Next char of the UTF-8 text: find it through the `str` to stay safe.
            let offset = self.text.len() - self.rest.len();
            let c = self.text.get(offset..)?.chars().next()?;
            self.rest = self.rest.get(c.len_utf8()..)?;
            return Some(c);
        }
        let esc = *self.rest.get(1)?;
        let simple = match esc {
            b'"' => Some('"'),
            b'\\' => Some('\\'),
            b'/' => Some('/'),
            b'b' => Some('\u{8}'),
            b'f' => Some('\u{c}'),
            b'n' => Some('\n'),
            b'r' => Some('\r'),
            b't' => Some('\t'),
            _ => None,
        };
        if let Some(c) = simple {
            self.rest = self.rest.get(2..)?;
            return Some(c);
        }
        // \uXXXX, possibly a surrogate pair.
        let hi = hex4(self.rest.get(2..)?)?;
        self.rest = self.rest.get(6..)?;
        if (0xD800..0xDC00).contains(&hi) {
            if let (Some(b"\\u"), Some(lo)) =
                (self.rest.get(..2), self.rest.get(2..).and_then(hex4))
                && (0xDC00..0xE000).contains(&lo)
            {
                self.rest = self.rest.get(6..)?;
                let c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                return Some(char::from_u32(c).unwrap_or('\u{FFFD}'));
            }
            return Some('\u{FFFD}');
        }
        Some(char::from_u32(hi).unwrap_or('\u{FFFD}'))
    }
}

/// A validated JSON object. Iterating yields `(key, value)` in document order, duplicates
/// included; [`get`](Self::get) and [`fields`](Self::fields) return the LAST duplicate, as
/// Go's `encoding/json` does when it decodes into a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonObject<'a> {
    raw: &'a str,
}

impl<'a> JsonObject<'a> {
    /// An empty object (`{}`).
    pub const EMPTY: JsonObject<'static> = JsonObject { raw: "{}" };

    /// The raw JSON text, braces included.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// Iterates over the members.
    pub fn iter(&self) -> ObjectIter<'a> {
        ObjectIter {
            raw: self.raw,
            pos: 1,
        }
    }

    /// `true` when the object has no members.
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    /// The value of the last member named `key` (exact, through escapes).
    pub fn get(&self, key: &str) -> Option<JsonValue<'a>> {
        self.iter()
            .filter(|(k, _)| *k == *key)
            .last()
            .map(|(_, v)| v)
    }

    /// Looks up several keys in one pass: element `i` of the result is the value of the last
    /// member named `keys[i]`.
    pub fn fields<const N: usize>(&self, keys: [&str; N]) -> [Option<JsonValue<'a>>; N] {
        let mut out = [None; N];
        for (k, v) in self.iter() {
            if let Some(i) = keys.iter().position(|want| k == *want)
                && let Some(slot) = out.get_mut(i)
            {
                *slot = Some(v);
            }
        }
        out
    }
}

impl<'a> IntoIterator for JsonObject<'a> {
    type Item = (JsonStr<'a>, JsonValue<'a>);
    type IntoIter = ObjectIter<'a>;
    fn into_iter(self) -> ObjectIter<'a> {
        self.iter()
    }
}

/// Iterator over the members of a [`JsonObject`].
#[derive(Debug, Clone)]
pub struct ObjectIter<'a> {
    raw: &'a str,
    pos: usize,
}

impl<'a> Iterator for ObjectIter<'a> {
    type Item = (JsonStr<'a>, JsonValue<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.raw.as_bytes();
        let mut pos = skip_ws(b, self.pos);
        if b.get(pos) == Some(&b',') {
            pos = skip_ws(b, pos + 1);
        }
        if b.get(pos) != Some(&b'"') {
            self.pos = b.len();
            return None;
        }
        let key_end = skip_string(b, pos)?;
        let key = JsonStr {
            raw: self.raw.get(pos + 1..key_end - 1)?,
        };
        let colon = skip_ws(b, key_end);
        let (value, end) = value_at(self.raw, colon + 1)?;
        self.pos = end;
        Some((key, value))
    }
}

/// A validated JSON array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonArray<'a> {
    raw: &'a str,
}

impl<'a> JsonArray<'a> {
    /// The raw JSON text, brackets included.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// Iterates over the elements.
    pub fn iter(&self) -> ArrayIter<'a> {
        ArrayIter {
            raw: self.raw,
            pos: 1,
        }
    }

    /// `true` when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }
}

impl<'a> IntoIterator for JsonArray<'a> {
    type Item = JsonValue<'a>;
    type IntoIter = ArrayIter<'a>;
    fn into_iter(self) -> ArrayIter<'a> {
        self.iter()
    }
}

/// Iterator over the elements of a [`JsonArray`].
#[derive(Debug, Clone)]
pub struct ArrayIter<'a> {
    raw: &'a str,
    pos: usize,
}

impl<'a> Iterator for ArrayIter<'a> {
    type Item = JsonValue<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.raw.as_bytes();
        let mut pos = skip_ws(b, self.pos);
        if b.get(pos) == Some(&b',') {
            pos += 1;
        }
        let start = skip_ws(b, pos);
        if matches!(b.get(start), None | Some(b']')) {
            self.pos = b.len();
            return None;
        }
        let (value, end) = value_at(self.raw, start)?;
        self.pos = end;
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::skip_plain;
    use proptest::prelude::*;
    use std::vec::Vec;

    fn naive(s: &[u8], pos: usize) -> usize {
        (pos..s.len())
            .find(|&i| s[i] == b'"' || s[i] == b'\\' || s[i] < 0x20)
            .unwrap_or(s.len())
    }

    #[test]
    fn every_special_byte_at_every_lane_stops_the_scan() {
        for special in (0u8..0x20).chain([b'"', b'\\']) {
            for at in 0..24 {
                let mut s = [b'A'; 24];
                s[at] = special;
                assert_eq!(skip_plain(&s, 0), at, "byte {special:#x} at {at}");
            }
        }
        // Bytes next to the special ones, and UTF-8, are plain.
        let plain: Vec<u8> = [0x20, 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xa2, 0xdc, 0xff].repeat(3);
        assert_eq!(skip_plain(&plain, 0), plain.len());
    }

    proptest! {
        #[test]
        fn matches_the_byte_at_a_time_scan(
            s in prop::collection::vec(
                prop_oneof![
                    8 => any::<u8>().prop_map(|b| b | 0x20),
                    1 => prop::sample::select(&[b'"', b'\\', 0x00, 0x1f, 0x20, 0x22, 0x5c][..]),
                ],
                0..80,
            ),
            start in 0usize..80,
        ) {
            let start = start.min(s.len());
            prop_assert_eq!(skip_plain(&s, start), naive(&s, start));
        }
    }
}
