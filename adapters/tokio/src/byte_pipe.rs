//! An upgraded connection used as an opaque byte pipe (a raw upgrade such as SPDY/3.1): reads
//! become binary messages whose boundaries mean nothing, messages are written whole.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Most bytes one read takes, so one message toward the tunnel.
pub const READ_CHUNK: usize = 64 * 1024;

/// Reads up to [`READ_CHUNK`] bytes; `None` at end of stream.
pub async fn read_chunk(
    io: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<Option<Bytes>> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    match io.read_buf(&mut buf).await? {
        0 => Ok(None),
        _ => Ok(Some(buf.freeze())),
    }
}

/// Writes `bytes` whole and flushes them.
pub async fn write_chunk(
    io: &mut (impl tokio::io::AsyncWrite + Unpin),
    bytes: &[u8],
) -> std::io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}
