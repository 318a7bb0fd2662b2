//! What travels between a client connection task and its tunnel task: commands one way, results
//! the other, with per-stream credits so neither direction can grow without bound.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use tether_core::relay::{Close, Message};
use tokio::sync::{Semaphore, mpsc};

use crate::buf::Buf;

/// Messages a stream may have in flight per direction between its client task and its tunnel task,
/// on top of the gateway's own rings.
pub(crate) const CLIENT_WINDOW: usize = 4;

/// Credits shared by a client task and its tunnel task.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Data items sent to the client task and not yet written to the client. The tunnel task stops
    /// popping at [`CLIENT_WINDOW`]; the client task sends [`Cmd::Writable`] when it drops below.
    pub(crate) to_client_inflight: AtomicUsize,
    /// One permit per client message the tunnel task may hold; returned when the gateway takes it.
    pub(crate) to_agent: Semaphore,
    /// Most bytes one read of a forwarded TCP socket may take: set by the tunnel task when it
    /// opens the stream ([`Gateway::tcp_piece_len`](tether_core::gateway::Gateway::tcp_piece_len)).
    pub(crate) tcp_read: AtomicUsize,
}

impl Shared {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            to_client_inflight: AtomicUsize::new(0),
            to_agent: Semaphore::new(CLIENT_WINDOW),
            tcp_read: AtomicUsize::new(tether_core::gateway::tcp::COMPAT_TCP_PIECE),
        })
    }
}

/// The tunnel task's handle on one client.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) tx: mpsc::UnboundedSender<ToClient>,
    pub(crate) shared: Arc<Shared>,
}

/// Tunnel task -> client task. Data is bounded by the credits; every other item comes at most once
/// or twice per stream.
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
    pub(crate) link: Link,
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
    pub(crate) link: Link,
}

/// A forwarded TCP connection to carry to `host:port` on the agent's side.
#[derive(Debug)]
pub(crate) struct OpenTcp {
    pub(crate) id: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) client_addr: String,
    pub(crate) link: Link,
}

/// Client task (or server) -> tunnel task.
#[derive(Debug)]
pub(crate) enum Cmd {
    OpenStream(OpenStream),
    OpenRequest(OpenRequest),
    OpenTcp(OpenTcp),
    /// A client WebSocket message (or bytes read from a forwarded socket); holds one `to_agent`
    /// permit (already forgotten).
    Message {
        id: String,
        message: Message<Buf>,
    },
    /// The client closed (with its close frame) or went away (`None`).
    ClientClosed {
        id: String,
        close: Option<Close>,
    },
    /// The client task drained below the window: pop more for it.
    Writable {
        id: String,
    },
    /// End the tunnel now: every stream on it closes with `reason` (the control plane's
    /// shutdown grace ran out).
    End {
        reason: &'static str,
    },
}

/// Sends [`Cmd::ClientClosed`] when dropped, so a client task that ends in any way (error, panic,
/// client gone, finished) frees its stream. Harmless for a stream that already ended.
#[derive(Debug)]
pub(crate) struct StreamGuard {
    pub(crate) id: String,
    pub(crate) cmd: mpsc::UnboundedSender<Cmd>,
    pub(crate) close: Option<Close>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::ClientClosed {
            id: std::mem::take(&mut self.id),
            close: self.close.take(),
        });
    }
}
