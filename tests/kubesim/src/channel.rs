//! The Kubernetes remote-command WebSocket channel protocols (reference §1.1, §1.4, §1.12).
//!
//! Contract: every data message is `[channel][payload]` (binary), or for the base64 variants a
//! text message `'0'+channel` followed by standard base64 of the payload. v4 and v5 carry a JSON
//! Status on channel 3; v1 writes nothing on success and plain text on failure; only v5 has the
//! `[0xFF, channel]` close signal.

use base64::Engine as _;
use tokio_tungstenite::tungstenite::Message;

/// Channel ids.
pub mod ids {
    /// stdin (client to server).
    pub const STDIN: u8 = 0;
    /// stdout (server to client).
    pub const STDOUT: u8 = 1;
    /// stderr (server to client).
    pub const STDERR: u8 = 2;
    /// error / status (server to client).
    pub const ERROR: u8 = 3;
    /// terminal resize JSON stream (client to server).
    pub const RESIZE: u8 = 4;
    /// v5 close signal prefix.
    pub const CLOSE: u8 = 255;
}

/// A negotiated remote-command subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `v5.channel.k8s.io`: binary, JSON status, close signal.
    V5,
    /// `v4.channel.k8s.io`: binary, JSON status.
    V4,
    /// `v4.base64.channel.k8s.io`: text/base64, JSON status.
    V4Base64,
    /// `channel.k8s.io` (or no subprotocol): binary, plain-text errors.
    V1,
    /// `base64.channel.k8s.io`: text/base64, plain-text errors.
    V1Base64,
}

/// Subprotocol names accepted for exec and attach, in server preference order.
/// The one remote-command protocol kubesim speaks over SPDY (`X-Stream-Protocol-Version`), as
/// the kubelet does: status as JSON on the error stream, resize stream with a TTY.
pub const SPDY_PROTOCOL: &str = "v4.channel.k8s.io";

pub const SUPPORTED: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];

/// A message received from the client, decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// Data on a channel.
    Data(u8, Vec<u8>),
    /// v5 close signal for a channel.
    CloseChannel(u8),
    /// Nothing to act on (empty message, ping/pong, unknown).
    Ignore,
    /// The client sent a Close frame.
    Close,
    /// Malformed input; the connection should be closed.
    Invalid(String),
}

impl Protocol {
    /// Looks up a subprotocol by its exact name.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "v5.channel.k8s.io" => Self::V5,
            "v4.channel.k8s.io" => Self::V4,
            "v4.base64.channel.k8s.io" => Self::V4Base64,
            "channel.k8s.io" => Self::V1,
            "base64.channel.k8s.io" => Self::V1Base64,
            _ => return None,
        })
    }

    /// Picks the first offered protocol this server supports. No offer at all means
    /// `channel.k8s.io` without echoing a subprotocol (`Ok((V1, None))`), as the kubelet does.
    /// `None` when protocols were offered but none is supported.
    pub fn negotiate(offered: &[&str]) -> Option<(Self, Option<&'static str>)> {
        if offered.iter().all(|p| p.is_empty()) {
            return Some((Self::V1, None));
        }
        offered.iter().find_map(|p| {
            let proto = Self::from_name(p)?;
            Some((proto, Some(proto.name())))
        })
    }

    /// The subprotocol name.
    pub fn name(self) -> &'static str {
        match self {
            Self::V5 => "v5.channel.k8s.io",
            Self::V4 => "v4.channel.k8s.io",
            Self::V4Base64 => "v4.base64.channel.k8s.io",
            Self::V1 => "channel.k8s.io",
            Self::V1Base64 => "base64.channel.k8s.io",
        }
    }

    /// Whether data travels as base64 text messages.
    pub fn is_base64(self) -> bool {
        matches!(self, Self::V4Base64 | Self::V1Base64)
    }

    /// Whether channel 3 carries a JSON Status (v4, v5) rather than plain text (v1).
    pub fn json_status(self) -> bool {
        matches!(self, Self::V5 | Self::V4 | Self::V4Base64)
    }

    /// Whether the client can half-close a channel with `[0xFF, ch]`.
    pub fn has_close_signal(self) -> bool {
        self == Self::V5
    }

    /// Encodes one server-to-client message.
    pub fn encode(self, channel: u8, data: &[u8]) -> Message {
        if self.is_base64() {
            let mut text = String::with_capacity(1 + data.len().div_ceil(3) * 4);
            text.push(char::from(b'0' + channel));
            base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
            Message::text(text)
        } else {
            let mut buf = Vec::with_capacity(1 + data.len());
            buf.push(channel);
            buf.extend_from_slice(data);
            Message::binary(buf)
        }
    }

    /// Decodes one client-to-server message.
    pub fn decode(self, msg: Message) -> Incoming {
        let (channel, data) = match msg {
            Message::Close(_) => return Incoming::Close,
            Message::Binary(b) if !self.is_base64() => {
                let Some((&ch, rest)) = b.split_first() else {
                    return Incoming::Ignore;
                };
                (ch, rest.to_vec())
            }
            Message::Text(t) if self.is_base64() => {
                let t = t.as_str();
                let Some(first) = t.bytes().next() else {
                    return Incoming::Ignore;
                };
                if !first.is_ascii_digit() {
                    return Incoming::Invalid(format!("invalid channel prefix {first:#x}"));
                }
                match base64::engine::general_purpose::STANDARD.decode(&t[1..]) {
                    Ok(data) => (first - b'0', data),
                    Err(e) => return Incoming::Invalid(format!("invalid base64: {e}")),
                }
            }
            Message::Binary(_) | Message::Text(_) => {
                return Incoming::Invalid("unexpected message type".to_string());
            }
            _ => return Incoming::Ignore,
        };
        if channel == ids::CLOSE && self.has_close_signal() {
            return match data.as_slice() {
                [ch] if *ch <= ids::RESIZE => Incoming::CloseChannel(*ch),
                _ => Incoming::Invalid("malformed close signal".to_string()),
            };
        }
        if data.is_empty() {
            return Incoming::Ignore;
        }
        Incoming::Data(channel, data)
    }
}

/// A terminal size from the resize channel (`{"Width":W,"Height":H}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct TerminalSize {
    /// Columns.
    #[serde(rename = "Width")]
    pub width: u16,
    /// Rows.
    #[serde(rename = "Height")]
    pub height: u16,
}

/// Parses the resize channel as a stream of concatenated JSON objects, across message
/// boundaries (like kube-apiserver's `json.Decoder`).
#[derive(Debug, Default)]
pub struct ResizeDecoder {
    buf: Vec<u8>,
}

impl ResizeDecoder {
    /// Feeds bytes; returns every complete size. Garbage resets the stream.
    pub fn push(&mut self, data: &[u8]) -> Vec<TerminalSize> {
        self.buf.extend_from_slice(data);
        let mut sizes = Vec::new();
        let mut stream =
            serde_json::Deserializer::from_slice(&self.buf).into_iter::<TerminalSize>();
        let mut consumed = 0;
        let mut reset = false;
        loop {
            match stream.next() {
                None => break,
                Some(Ok(size)) => sizes.push(size),
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(_)) => {
                    reset = true;
                    break;
                }
            }
            consumed = stream.byte_offset();
        }
        if reset {
            self.buf.clear();
        } else {
            self.buf.drain(..consumed);
        }
        sizes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        assert_eq!(
            Protocol::negotiate(&["v5.channel.k8s.io"]),
            Some((Protocol::V5, Some("v5.channel.k8s.io")))
        );
        assert_eq!(
            Protocol::negotiate(&["bogus", "v4.channel.k8s.io"]),
            Some((Protocol::V4, Some("v4.channel.k8s.io")))
        );
        assert_eq!(Protocol::negotiate(&[]), Some((Protocol::V1, None)));
        assert!(Protocol::negotiate(&["SPDY/3.1+portforward.k8s.io"]).is_none());
    }

    #[test]
    fn framing_round_trip() {
        let m = Protocol::V4Base64.encode(1, b"hi");
        assert_eq!(m, Message::text("1aGk="));
        assert_eq!(
            Protocol::V4Base64.decode(Message::text("0aGk=")),
            Incoming::Data(0, b"hi".to_vec())
        );
        assert_eq!(
            Protocol::V5.decode(Message::binary(vec![255, 0])),
            Incoming::CloseChannel(0)
        );
        assert!(matches!(
            Protocol::V5.decode(Message::binary(vec![255, 0, 1])),
            Incoming::Invalid(_)
        ));
        assert!(matches!(
            Protocol::V5.decode(Message::text("0abc")),
            Incoming::Invalid(_)
        ));
        assert_eq!(
            Protocol::V5.decode(Message::binary(vec![1])),
            Incoming::Ignore
        );
    }

    #[test]
    fn resize_stream_spans_messages() {
        let mut d = ResizeDecoder::default();
        assert!(d.push(br#"{"Width":100,"#).is_empty());
        assert_eq!(
            d.push(b"\"Height\":30}\n{\"Width\":1,\"Height\":2}"),
            [
                TerminalSize {
                    width: 100,
                    height: 30
                },
                TerminalSize {
                    width: 1,
                    height: 2
                }
            ]
        );
    }
}
