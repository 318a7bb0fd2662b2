//! HTTP headers on the wire: `{"Name": ["v1", "v2"]}` (or `{"Name": "v"}` inbound).

use crate::wire::envelope::opt_object;
use crate::wire::error::DecodeError;
use crate::wire::json::{ArrayIter, JsonObject, JsonStr, JsonValue};

/// A borrowed, validated header map from a decoded payload. Each value is a string or an
/// array of strings (`null` = no values). Iteration yields the members in document order,
/// without allocating; names are compared case-insensitively by [`get`](Self::get).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers<'a> {
    obj: JsonObject<'a>,
}

impl<'a> Headers<'a> {
    /// No headers.
    pub const EMPTY: Headers<'static> = Headers {
        obj: JsonObject::EMPTY,
    };

    /// Validates an optional `headers` payload member (absent or `null` = empty).
    pub fn from_value(v: Option<JsonValue<'a>>) -> Result<Self, DecodeError> {
        const F: &str = "headers";
        let Some(obj) = opt_object(v, F)? else {
            return Ok(Headers::EMPTY);
        };
        for (_, value) in obj.iter() {
            match value {
                JsonValue::Null | JsonValue::String(_) => {}
                JsonValue::Array(a) => {
                    if !a.iter().all(|v| matches!(v, JsonValue::String(_))) {
                        return Err(DecodeError::WrongType(F));
                    }
                }
                _ => return Err(DecodeError::WrongType(F)),
            }
        }
        Ok(Self { obj })
    }

    /// The underlying object.
    pub fn as_object(&self) -> JsonObject<'a> {
        self.obj
    }

    /// `true` when there are no members.
    pub fn is_empty(&self) -> bool {
        self.obj.is_empty()
    }

    /// Iterates over `(name, values)` in document order.
    pub fn iter(&self) -> HeadersIter<'a> {
        HeadersIter {
            inner: self.obj.iter(),
        }
    }

    /// Values of the first member whose name equals `name` ignoring ASCII case.
    pub fn get(&self, name: &str) -> Option<HeaderValues<'a>> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// `true` when a member named `name` (ignoring ASCII case) exists.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

impl<'a> IntoIterator for Headers<'a> {
    type Item = (JsonStr<'a>, HeaderValues<'a>);
    type IntoIter = HeadersIter<'a>;
    fn into_iter(self) -> HeadersIter<'a> {
        self.iter()
    }
}

/// Iterator over the members of [`Headers`].
#[derive(Debug, Clone)]
pub struct HeadersIter<'a> {
    inner: crate::wire::json::ObjectIter<'a>,
}

impl<'a> Iterator for HeadersIter<'a> {
    type Item = (JsonStr<'a>, HeaderValues<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let (name, value) = self.inner.next()?;
        let values = match value {
            JsonValue::String(s) => HeaderValues::One(Some(s)),
            JsonValue::Array(a) => HeaderValues::Many(a.iter()),
            _ => HeaderValues::One(None),
        };
        Some((name, values))
    }
}

/// The values of one header: an iterator of escaped strings.
#[derive(Debug, Clone)]
pub enum HeaderValues<'a> {
    /// A single string value (or none, for `null`).
    One(Option<JsonStr<'a>>),
    /// An array of strings.
    Many(ArrayIter<'a>),
}

impl<'a> Iterator for HeaderValues<'a> {
    type Item = JsonStr<'a>;

    fn next(&mut self) -> Option<JsonStr<'a>> {
        match self {
            Self::One(v) => v.take(),
            // Validated to hold only strings; anything else ends the iteration.
            Self::Many(it) => it.next().and_then(|v| v.as_str()),
        }
    }
}

/// Outbound headers: any list of `(name, value)` pairs. Encoders write them as Go's
/// `http.Header` JSON, `{"Name": ["v1", "v2"]}`, grouping repeated names (ignoring ASCII case,
/// spelled as first seen, values in list order). Non-UTF-8 bytes become U+FFFD.
///
/// Implemented for `()` (no headers), arrays and slice references of `(&str, &str)` and
/// `(&[u8], &[u8])` pairs; pass e.g. `&[("Content-Type", "text/plain")]` or `&pairs_slice`.
pub trait HeaderList: core::fmt::Debug {
    /// Number of pairs.
    fn count(&self) -> usize;
    /// Pair `i` (`i < count()`) as `(name, value)` bytes.
    fn pair(&self, i: usize) -> (&[u8], &[u8]);
}

/// No headers.
impl HeaderList for () {
    fn count(&self) -> usize {
        0
    }
    fn pair(&self, _: usize) -> (&[u8], &[u8]) {
        (&[], &[])
    }
}

fn str_pair<'s>(list: &'s [(&str, &str)], i: usize) -> (&'s [u8], &'s [u8]) {
    list.get(i)
        .map_or((&[][..], &[][..]), |(n, v)| (n.as_bytes(), v.as_bytes()))
}

fn byte_pair<'s>(list: &'s [(&[u8], &[u8])], i: usize) -> (&'s [u8], &'s [u8]) {
    list.get(i).map_or((&[][..], &[][..]), |(n, v)| (*n, *v))
}

impl HeaderList for &[(&str, &str)] {
    fn count(&self) -> usize {
        self.len()
    }
    fn pair(&self, i: usize) -> (&[u8], &[u8]) {
        str_pair(self, i)
    }
}

impl HeaderList for &[(&[u8], &[u8])] {
    fn count(&self) -> usize {
        self.len()
    }
    fn pair(&self, i: usize) -> (&[u8], &[u8]) {
        byte_pair(self, i)
    }
}

impl<const N: usize> HeaderList for [(&str, &str); N] {
    fn count(&self) -> usize {
        N
    }
    fn pair(&self, i: usize) -> (&[u8], &[u8]) {
        str_pair(self, i)
    }
}

impl<const N: usize> HeaderList for [(&[u8], &[u8]); N] {
    fn count(&self) -> usize {
        N
    }
    fn pair(&self, i: usize) -> (&[u8], &[u8]) {
        byte_pair(self, i)
    }
}

/// Writes `list` as a header object (see [`HeaderList`]). Quadratic in the number of pairs,
/// which is small for HTTP responses, and allocation-free.
pub(crate) fn write_headers(w: &mut crate::wire::json::JsonWriter<'_>, list: &dyn HeaderList) {
    let n = list.count();
    w.object(|o| {
        for i in 0..n {
            let (name, _) = list.pair(i);
            if (0..i).any(|j| list.pair(j).0.eq_ignore_ascii_case(name)) {
                continue;
            }
            let key = o.key_lossy(name);
            key.array(|a| {
                for j in i..n {
                    let (other, value) = list.pair(j);
                    if other.eq_ignore_ascii_case(name) {
                        a.item().string_lossy(value);
                    }
                }
            });
        }
    });
}
