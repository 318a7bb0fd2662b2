//! Stream ids: the string the control plane names a kubectl stream with.

use core::fmt;

/// Longest accepted stream id, in bytes.
pub const MAX_STREAM_ID_LEN: usize = 64;

/// A validated stream id: 1 to [`MAX_STREAM_ID_LEN`] bytes of UTF-8 without control characters.
///
/// Ids are compared byte for byte. Construct with [`StreamId::new`] (or `TryFrom<&str>`).
#[derive(Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct StreamId(heapless::String<MAX_STREAM_ID_LEN>);

/// Why a string is not a valid [`StreamId`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum StreamIdError {
    /// The id is empty.
    Empty,
    /// The id is longer than [`MAX_STREAM_ID_LEN`] bytes.
    TooLong,
    /// The id contains a control character (CR, LF, NUL, DEL, ...).
    ControlChar,
}

impl fmt::Display for StreamIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "stream id is empty",
            Self::TooLong => "stream id is longer than 64 bytes",
            Self::ControlChar => "stream id contains a control character",
        })
    }
}

impl core::error::Error for StreamIdError {}

impl StreamId {
    /// Validates `id` and copies it.
    ///
    /// # Errors
    /// [`StreamIdError`] says which rule `id` breaks.
    pub fn new(id: &str) -> Result<Self, StreamIdError> {
        if id.is_empty() {
            return Err(StreamIdError::Empty);
        }
        if id.len() > MAX_STREAM_ID_LEN {
            return Err(StreamIdError::TooLong);
        }
        if id.chars().any(char::is_control) {
            return Err(StreamIdError::ControlChar);
        }
        let mut s = heapless::String::new();
        // Cannot fail: the length was checked above.
        s.push_str(id).map_err(|_| StreamIdError::TooLong)?;
        Ok(Self(s))
    }

    /// The id as a string slice.
    #[must_use]
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl TryFrom<&str> for StreamId {
    type Error = StreamIdError;
    fn try_from(id: &str) -> Result<Self, StreamIdError> {
        Self::new(id)
    }
}

impl PartialEq<str> for StreamId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for StreamId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl AsRef<str> for StreamId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_printable_ids() {
        assert_eq!(StreamId::new("exec-7f3a").unwrap().as_str(), "exec-7f3a");
        assert!(StreamId::new("ström ☃").is_ok());
        assert!(StreamId::new(&"a".repeat(64)).is_ok());
        assert_eq!(StreamId::try_from("x").unwrap(), "x");
    }

    #[test]
    fn rejects_bad_ids() {
        assert_eq!(StreamId::new(""), Err(StreamIdError::Empty));
        assert_eq!(StreamId::new(&"a".repeat(65)), Err(StreamIdError::TooLong));
        for bad in ["a\rb", "a\nb", "a\0b", "tab\t", "del\u{7f}", "c1\u{85}"] {
            assert_eq!(
                StreamId::new(bad),
                Err(StreamIdError::ControlChar),
                "{bad:?}"
            );
        }
    }
}
