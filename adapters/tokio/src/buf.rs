//! The owned message buffer the core's rings hold on the tokio side (agent relay and control-plane
//! gateway alike): a `bytes::Bytes`, so a message read from a socket reaches the tunnel encoder,
//! and a decoded tunnel message reaches its socket, without another copy.

use bytes::Bytes;
use tether_core::relay::PayloadBuf;
use tether_core::ring::Payload;

/// A message payload held by the relay's and the gateway's rings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Buf(pub Bytes);

impl Payload for Buf {
    fn len(&self) -> usize {
        self.0.len()
    }
}

impl PayloadBuf for Buf {
    fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self(Bytes::copy_from_slice(bytes)))
    }

    fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Shares the buffer (no copy).
    fn sliced(self, start: usize) -> Option<Self> {
        (start <= self.0.len()).then(|| Self(self.0.slice(start..)))
    }
}

impl Buf {
    /// One contiguous message from a native frame header and its payload (the one copy a
    /// WebSocket message needs).
    #[must_use]
    pub fn frame(header: &[u8], payload: &Self) -> Bytes {
        let mut frame = bytes::BytesMut::with_capacity(header.len() + payload.0.len());
        frame.extend_from_slice(header);
        frame.extend_from_slice(&payload.0);
        frame.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliced_shares_and_checks_bounds() {
        let b = Buf(Bytes::from_static(b"headerpayload"));
        let tail = b.clone().sliced(6).unwrap();
        assert_eq!(tail.as_bytes(), b"payload");
        assert_eq!(tail.0.as_ptr(), b.0[6..].as_ptr());
        assert!(b.clone().sliced(13).unwrap().as_bytes().is_empty());
        assert_eq!(b.sliced(14), None);
        assert_eq!(
            &Buf::frame(b"ab", &Buf(Bytes::from_static(b"cd")))[..],
            b"abcd"
        );
    }

    #[test]
    fn holds_any_size() {
        let big = vec![7u8; 1 << 20];
        let b = Buf::from_slice(&big).unwrap();
        assert_eq!(Payload::len(&b), 1 << 20);
        assert_eq!(b.as_bytes(), &big[..]);
        assert!(Payload::is_empty(&Buf::default()));
    }
}
