//! `--forward LISTEN=CLUSTER:HOST:PORT`: TCP connections accepted on `LISTEN` are carried through
//! the tunnel of `CLUSTER` to `HOST:PORT` on the agent's side (`tcp_tunnel_*`). Only sockets live
//! here; the protocol is the gateway's ([`tether_core::gateway::Gateway::open_tcp`]).
//!
//! * No tunnel for the cluster: the connection is closed at once (one log line).
//! * Bytes read go straight into the stream's ring in the gateway; while it is full the socket is
//!   not read (nothing is dropped, and no other stream waits).
//! * Bytes for the socket are popped from the stream's ring as the socket takes them, in order.
//! * Socket EOF: `tcp_tunnel_close {reason: "client_closed"}`; a read error: `client_error`.
//! * The agent's `tcp_tunnel_close`: the bytes before it are written, then the socket is shut
//!   down; a dial failure or any other error is logged with the tunnel id.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tether_core::relay::{Close, Message, MessageKind};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::State;
use super::driver::StreamGuard;
use super::link::{OpenTcp, ToClient};
use crate::agent::metrics::StreamKind;
use crate::buf::Buf;

/// One `--forward LISTEN=CLUSTER:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Where the control plane listens.
    pub listen: SocketAddr,
    /// The cluster whose tunnel carries the connections.
    pub cluster: String,
    /// Host the agent dials (letters, digits and `.-_:[]`).
    pub host: String,
    /// Port the agent dials.
    pub port: u16,
}

/// Why a `--forward` spec is malformed (one line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSpecError(String);

impl fmt::Display for ForwardSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ForwardSpecError {}

impl FromStr for Forward {
    type Err = ForwardSpecError;

    /// `LISTEN=CLUSTER:HOST:PORT`; `LISTEN` is `IP:PORT` or a bare port (on 127.0.0.1), `HOST`
    /// may be a bracketed IPv6 address.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            ForwardSpecError(format!(
                "--forward {spec:?}: {why} (expected LISTEN=CLUSTER:HOST:PORT, e.g. 127.0.0.1:5432=prod:db.default:5432)"
            ))
        };
        let (listen, target) = spec.split_once('=').ok_or_else(|| bad("no '='"))?;
        let listen = match listen.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => match listen.parse::<u16>() {
                Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
                Err(_) => return Err(bad("LISTEN is not IP:PORT or a port")),
            },
        };
        let (cluster, rest) = target.split_once(':').ok_or_else(|| bad("no CLUSTER:"))?;
        if !super::valid_cluster_name(cluster) {
            return Err(bad("invalid CLUSTER name"));
        }
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no :PORT"))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("PORT is not 1-65535"))?;
        let host_ok = !host.is_empty()
            && host.len() <= tether_core::relay::MAX_TCP_HOST
            && host.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']')
            });
        if !host_ok {
            return Err(bad("HOST must be letters, digits and . - _ : [ ]"));
        }
        Ok(Self {
            listen,
            cluster: cluster.to_string(),
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={}:{}:{}",
            self.listen, self.cluster, self.host, self.port
        )
    }
}

/// Accepts connections on `listener` for `fwd` until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, fwd: Arc<Forward>, state: Arc<State>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(forward = %fwd, error = %e, "forward accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(carry(tcp, peer, fwd.clone(), state.clone()));
    }
}

/// Carries one accepted connection through the cluster's tunnel.
async fn carry(tcp: TcpStream, peer: SocketAddr, fwd: Arc<Forward>, state: Arc<State>) {
    let Some(driver) = state.tunnels.get(&fwd.cluster) else {
        state.metrics.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(forward = %fwd, %peer, "no tunnel for cluster {}; connection closed", fwd.cluster);
        return;
    };
    let id = format!("fw-{}", state.next_id.fetch_add(1, Ordering::Relaxed));
    let open = OpenTcp {
        id: id.clone(),
        host: fwd.host.clone(),
        port: fwd.port,
        client_addr: peer.to_string(),
    };
    // Live (`tether_streams_active{kind="tcp"}`) until this task ends.
    let _life = state.metrics.stream_life(StreamKind::Tcp);
    let (port, piece) = match driver.open_tcp(open) {
        Ok(opened) => opened,
        Err(refused) => {
            state.metrics.stream_failed(refused.status);
            tracing::warn!(tunnel = %id, forward = %fwd, %peer, "forward refused: {}", refused.message);
            return;
        }
    };
    let mut guard = StreamGuard { port, close: None };
    let port = &guard.port;
    match port.recv().await {
        Some(ToClient::Started { .. }) => {}
        Some(ToClient::Failed { status, message }) => {
            state.metrics.stream_failed(status);
            tracing::warn!(tunnel = %id, forward = %fwd, %peer, "forward refused: {message}");
            return;
        }
        _ => {
            tracing::warn!(tunnel = %id, forward = %fwd, "the tunnel went away before the forward started");
            return;
        }
    }
    let (mut r, mut w) = tcp.into_split();
    // Socket -> tunnel: returns the client's end (EOF or a read error) for the agent.
    // Bytes per tunnel message: what the agent takes whole (see `Gateway::tcp_piece_len`), at
    // most one byte-pipe read.
    let read_len = piece.min(crate::byte_pipe::READ_CHUNK);
    let reader = async {
        loop {
            let mut buf = BytesMut::with_capacity(read_len);
            match r.read_buf(&mut buf).await {
                Ok(0) => return Close::new(1000, ""),
                Ok(_) => {}
                Err(e) => return Close::new(1011, &e.to_string()),
            }
            port.send(Message {
                kind: MessageKind::Binary,
                payload: Buf(buf.freeze()),
            })
            .await;
        }
    };
    // Tunnel -> socket. Returns once the agent's side ended (or the tunnel went away).
    let writer = async {
        while let Some(item) = port.recv().await {
            match item {
                ToClient::Data(message) => {
                    if let Err(e) = w.write_all(&message.payload.0).await {
                        tracing::info!(tunnel = %id, error = %e, "forwarded socket write failed");
                        return Some(Close::new(1011, &e.to_string()));
                    }
                }
                ToClient::Closed(close) => {
                    if close.code == 1000 {
                        tracing::info!(tunnel = %id, forward = %fwd, reason = %close.reason, "forward closed by the agent's side");
                    } else {
                        tracing::warn!(tunnel = %id, forward = %fwd, reason = %close.reason, "forward closed: {}", close.reason);
                    }
                    let _ = w.shutdown().await;
                    return None;
                }
                _ => {}
            }
        }
        tracing::warn!(tunnel = %id, forward = %fwd, "the tunnel went away; forward closed");
        None
    };
    let close = tokio::select! {
        close = reader => {
            if close.code != 1000 {
                tracing::info!(tunnel = %id, error = %close.reason, "forwarded socket read failed");
            }
            Some(close)
        }
        // The agent's side ended (its close needs no answer), or our write failed.
        close = writer => close,
    };
    guard.close = close;
}
