//! TLS acceptor from PEM material (rustls with the ring provider, HTTP/1.1 only).

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::config::TlsPem;

/// Builds an acceptor; the error is one line suitable for the CLI.
///
/// ALPN offers only `http/1.1`: kubesim speaks HTTP/1.1, and kubectl's WebSocket upgrades
/// never use ALPN anyway.
pub fn acceptor(pem: &TlsPem) -> Result<TlsAcceptor, String> {
    let certs = rustls_pemfile::certs(&mut pem.cert_chain.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot read TLS certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("TLS certificate file contains no CERTIFICATE block".to_string());
    }
    let key = rustls_pemfile::private_key(&mut pem.private_key.as_slice())
        .map_err(|e| format!("cannot read TLS key PEM: {e}"))?
        .ok_or_else(|| "TLS key file contains no private key".to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate and key do not form a usable identity: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
