//! Socket options for tunnel connections.

use tokio::net::TcpStream;

/// Unsent bytes the kernel may hold for a tunnel socket before it stops reporting the socket
/// writable (`TCP_NOTSENT_LOWAT`, Linux). Data beyond this waits in the core's per-stream rings,
/// where the scheduler can still put interactive messages ahead of bulk ones, instead of in a
/// first-in-first-out kernel buffer that autotuning grows to megabytes. At loopback speeds this
/// is well under a millisecond of queue, and still enough to keep the link busy.
pub const TUNNEL_NOTSENT_LOWAT: u32 = 64 * 1024;

/// tungstenite's read buffer on a per-stream WebSocket (kubectl's, or the agent's to the
/// Kubernetes API). tungstenite zero-fills its whole read buffer before every read, so its
/// 128 KiB default would make every idle stream cost 128 KiB of resident memory on each side.
/// Larger messages still arrive whole (the buffer grows to fit a frame); only the size of one
/// read call is bounded.
pub const STREAM_READ_BUFFER: usize = 4 * 1024;

/// tungstenite's read buffer on a tunnel connection, at the control plane, where thousands of
/// mostly idle tunnels wait: the 128 KiB default is resident per tunnel (see
/// [`STREAM_READ_BUFFER`]). One TLS record carries at most 16 KiB, so a read never needed more.
pub const TUNNEL_READ_BUFFER: usize = 16 * 1024;

/// tungstenite's write buffer on a tunnel connection (its default is 128 KiB): frames are
/// written to the socket once this much is pending, or at each flush.
pub const TUNNEL_WRITE_BUFFER: usize = 32 * 1024;

/// Sets `TCP_NODELAY` and, on Linux, [`TUNNEL_NOTSENT_LOWAT`] on a tunnel connection. Failures
/// only cost latency, so they are logged and ignored.
///
/// The receive buffer is left to the kernel's autotuning on purpose. A fixed `SO_RCVBUF` also
/// locks it: once a busy reader lets the locked buffer fill, the kernel drops segments inside the
/// window it advertised, the sender's retransmission timer backs off exponentially, and the
/// tunnel went silent past its 60-second read deadline (seen with a 64 KiB buffer, kept in
/// `tests/e2e/tests/flow_control.rs` as the frozen-ends test). It also capped the tunnel at one
/// buffer per round trip on long paths.
pub fn tune_tunnel(tcp: &TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(TUNNEL_NOTSENT_LOWAT) {
        tracing::debug!(error = %e, "cannot set TCP_NOTSENT_LOWAT");
    }
}
