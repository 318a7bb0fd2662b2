//! TLS on the tunnel (feature `tls`): embedded-tls 1.3 over any [`Connection`](crate::io::Connection),
//! no alloc.
//!
//! The session reads and writes the tunnel at the same time, so the TLS connection is split
//! (embedded-tls's `split` needs a `Clone` socket): [`Duplex`] is that socket, a pair of shared
//! references to the connection's read and write halves. After the handshake the TLS reader only
//! ever reads and the TLS writer only ever writes, so the two never contend for a half.
//!
//! **Certificate verification is not done yet**: the handshake uses embedded-tls's
//! `UnsecureProvider` (encryption without server authentication), so a deployment must opt in with
//! `TunnelConfig::tls_insecure` (the agent's `--insecure-skip-tls-verify`). Verification needs
//! embedded-tls's `rustpki` provider and a CA in flash.

use core::cell::RefCell;

use embedded_io_async::{ErrorKind, ErrorType, Read, Write};
use embedded_tls::{
    Aes128GcmSha256, CryptoRng, TlsConfig, TlsConnection, TlsContext, TlsError, UnsecureProvider,
};
use rand_core::RngCore;

/// Largest TLS record a server may send (16 KiB of data plus overhead): the record read buffer.
pub const TLS_READ_BUF: usize = 16_640;
/// A comfortable record write buffer (records are split to fit it).
pub const TLS_WRITE_BUF: usize = 4096;

/// A `Clone` socket over the two halves of one connection (see the module docs).
pub struct Duplex<'a, R, W> {
    reader: &'a RefCell<R>,
    writer: &'a RefCell<W>,
}

impl<R, W> Clone for Duplex<'_, R, W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<R, W> Copy for Duplex<'_, R, W> {}

impl<'a, R, W> Duplex<'a, R, W> {
    /// The socket over `reader` and `writer`.
    pub const fn new(reader: &'a RefCell<R>, writer: &'a RefCell<W>) -> Self {
        Self { reader, writer }
    }
}

impl<R, W> ErrorType for Duplex<'_, R, W> {
    type Error = ErrorKind;
}

// A half is borrowed across the await by design: one task owns each clone, the reader clone only
// reads and the writer clone only writes (see the module docs); a conflict is reported, not a panic.
#[allow(clippy::await_holding_refcell_ref)]
impl<R: Read, W> Read for Duplex<'_, R, W> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        let mut reader = self.reader.try_borrow_mut().map_err(|_| ErrorKind::Other)?;
        reader
            .read(buf)
            .await
            .map_err(|e| embedded_io_async::Error::kind(&e))
    }
}

#[allow(clippy::await_holding_refcell_ref)]
impl<R, W: Write> Write for Duplex<'_, R, W> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        let mut writer = self.writer.try_borrow_mut().map_err(|_| ErrorKind::Other)?;
        writer
            .write(buf)
            .await
            .map_err(|e| embedded_io_async::Error::kind(&e))
    }

    async fn flush(&mut self) -> Result<(), ErrorKind> {
        let mut writer = self.writer.try_borrow_mut().map_err(|_| ErrorKind::Other)?;
        writer
            .flush()
            .await
            .map_err(|e| embedded_io_async::Error::kind(&e))
    }
}

/// The TLS connection type of the tunnel.
pub type Tls<'a, R, W> = TlsConnection<'a, Duplex<'a, R, W>, Aes128GcmSha256>;

/// Runs the TLS 1.3 handshake with `server_name` (SNI) over the two halves, **without verifying
/// the server's certificate** (see the module docs). Split the result for the session.
///
/// # Errors
/// The handshake failed.
pub async fn open<'a, R: Read, W: Write, G: RngCore + CryptoRng>(
    reader: &'a RefCell<R>,
    writer: &'a RefCell<W>,
    server_name: &str,
    rng: &mut G,
    read_buf: &'a mut [u8],
    write_buf: &'a mut [u8],
) -> Result<Tls<'a, R, W>, TlsError> {
    let mut tls = TlsConnection::new(Duplex::new(reader, writer), read_buf, write_buf);
    let config = TlsConfig::new().with_server_name(server_name);
    let provider = UnsecureProvider::new::<Aes128GcmSha256>(&mut *rng);
    tls.open(TlsContext::new(&config, provider)).await?;
    Ok(tls)
}
