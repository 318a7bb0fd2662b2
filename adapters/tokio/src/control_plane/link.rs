//! What a client task asks of a tunnel's driver (the stream to open) and what it gets back, and the
//! one command the server sends a tunnel task.

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use tether_core::relay::{Close, Message};

use crate::buf::Buf;

/// What a client task takes from its [`Port`](super::driver::Port): data popped from the stream's
/// ring, and the notices around it (at most one start, one terminal).
#[derive(Debug)]
pub(crate) enum ToClient {
    /// WebSocket or raw upgrade: the upstream answered 101 with this subprotocol (raw upgrade:
    /// `X-Stream-Protocol-Version`; empty: none).
    Started { subprotocol: String },
    /// The stream or request failed before it started: answer with this status.
    Failed { status: u16, message: String },
    /// Request: the response head.
    Head {
        status: u16,
        headers: Vec<(HeaderName, HeaderValue)>,
        gzip: bool,
    },
    /// A message (WebSocket) or body chunk (request).
    Data(Message<Buf>),
    /// WebSocket: close the client with this code and reason.
    Closed(Close),
    /// Request: the body is complete.
    End,
    /// Request: the body broke off.
    Abort(String),
}

impl ToClient {
    /// Whether this comes before the stream's data (a start or its refusal).
    pub(crate) fn is_start(&self) -> bool {
        matches!(
            self,
            Self::Started { .. } | Self::Head { .. } | Self::Failed { .. }
        )
    }
}

/// A WebSocket stream, or a raw upgrade, to open.
#[derive(Debug)]
pub(crate) struct OpenStream {
    pub(crate) id: String,
    pub(crate) path: String,
    pub(crate) query: String,
    pub(crate) headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Offered subprotocols (raw upgrade: `X-Stream-Protocol-Version`s), comma separated.
    pub(crate) protocols: String,
    /// A raw upgrade: its method and `Upgrade` token. On a tunnel whose agent cannot carry it (a
    /// PipeOps agent) it goes out as a plain request and the client gets its response
    /// ([`ToClient::Head`]).
    pub(crate) upgrade: Option<(String, String)>,
    pub(crate) user: String,
    pub(crate) groups: Vec<String>,
}

/// An HTTP request to forward.
#[derive(Debug)]
pub(crate) struct OpenRequest {
    pub(crate) id: String,
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: String,
    pub(crate) headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub(crate) user: String,
    pub(crate) groups: Vec<String>,
    pub(crate) body: Bytes,
}

/// A forwarded TCP connection to carry to `host:port` on the agent's side.
#[derive(Debug)]
pub(crate) struct OpenTcp {
    pub(crate) id: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) client_addr: String,
}

/// Server -> tunnel task.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// End the tunnel now: every stream on it closes with `reason` (the control plane's
    /// shutdown grace ran out, or the agent's token was revoked).
    End { reason: &'static str },
}
