//! What the adapter needs from a network: dial a host and port, get a connection whose read and
//! write halves can be used at the same time. Implemented over embassy-net `TcpSocket` by the
//! firmware and over std/tokio TCP (through `embedded-io-adapters`) on Linux.

use embedded_io_async::{Read, Write};

/// An established byte stream.
#[allow(async_fn_in_trait)]
pub trait Connection {
    /// The transport's error type.
    type Error: embedded_io_async::Error;
    /// Read half.
    type Reader<'a>: Read<Error = Self::Error>
    where
        Self: 'a;
    /// Write half.
    type Writer<'a>: Write<Error = Self::Error>
    where
        Self: 'a;

    /// Both halves, usable concurrently.
    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);

    /// Closes the connection gracefully (best effort; the connection is dropped after this).
    async fn close(&mut self);
}

/// Why a dial failed, as a short text for logs and `tcp_tunnel_close.error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ConnectError(pub &'static str);

/// Dials connections. One connector per concurrent connection (an embassy-net socket needs its
/// own buffers): the tunnel has one, every stream worker has one.
#[allow(async_fn_in_trait)]
pub trait Connector {
    /// The connection type.
    type Connection<'a>: Connection
    where
        Self: 'a;

    /// Opens a TCP connection to `host:port` (a name or an IP literal).
    async fn connect(
        &mut self,
        host: &str,
        port: u16,
    ) -> Result<Self::Connection<'_>, ConnectError>;
}

/// A short text for an I/O error kind (logs and close reasons carry no transport details).
#[must_use]
pub fn error_text(kind: embedded_io_async::ErrorKind) -> &'static str {
    use embedded_io_async::ErrorKind as K;
    match kind {
        K::NotFound => "not found",
        K::PermissionDenied => "permission denied",
        K::ConnectionRefused => "connection refused",
        K::ConnectionReset => "connection reset",
        K::ConnectionAborted => "connection aborted",
        K::NotConnected => "not connected",
        K::AddrInUse => "address in use",
        K::AddrNotAvailable => "address not available",
        K::BrokenPipe => "broken pipe",
        K::TimedOut => "timed out",
        K::Interrupted => "interrupted",
        K::Unsupported => "unsupported",
        K::OutOfMemory => "out of memory",
        K::WriteZero => "write zero",
        _ => "i/o error",
    }
}
