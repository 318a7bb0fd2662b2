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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_any_size() {
        let big = vec![7u8; 1 << 20];
        let b = Buf::from_slice(&big).unwrap();
        assert_eq!(Payload::len(&b), 1 << 20);
        assert_eq!(b.as_bytes(), &big[..]);
        assert!(Payload::is_empty(&Buf::default()));
    }
}
