//! TLS for the control plane's listener: a self-signed certificate generated once into the state
//! directory and reused on restart, or the operator's own certificate files.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;

/// File name of the self-signed certificate (PEM) in the state directory.
pub const CERT_FILE: &str = "tls.crt";
/// File name of its private key (PEM, mode 0600) in the state directory.
pub const KEY_FILE: &str = "tls.key";

/// Path of the self-signed certificate in `state_dir`.
#[must_use]
pub fn cert_path(state_dir: &Path) -> PathBuf {
    state_dir.join(CERT_FILE)
}

/// The certificate and key PEM of `state_dir`, generating them first if either is missing.
///
/// A new certificate is self-signed, valid for `localhost`, `127.0.0.1`, `::1` and `host` (the
/// listen host, when it is a name or a specific address), with an ECDSA P-256 key. An existing pair
/// is reused as is (delete both files to get a new one, e.g. after changing the listen host).
///
/// # Errors
/// The state directory cannot be created, read or written, or generation failed.
pub fn load_or_create_self_signed(
    state_dir: &Path,
    host: Option<&str>,
) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let cert_file = state_dir.join(CERT_FILE);
    let key_file = state_dir.join(KEY_FILE);
    if cert_file.exists() && key_file.exists() {
        return Ok((fs::read(&cert_file)?, fs::read(&key_file)?));
    }
    fs::create_dir_all(state_dir)?;
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Some(host) = host.filter(|h| !h.is_empty() && !names.iter().any(|n| n == h)) {
        names.push(host.to_string());
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(io::Error::other)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tether-control-plane");
    let key = rcgen::KeyPair::generate().map_err(io::Error::other)?;
    let cert = params.self_signed(&key).map_err(io::Error::other)?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    write_private(&key_file, key_pem.as_bytes())?;
    fs::write(&cert_file, cert_pem.as_bytes())?;
    tracing::info!(path = %cert_file.display(), "generated a self-signed TLS certificate");
    Ok((cert_pem.into_bytes(), key_pem.into_bytes()))
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options.open(path)?.write_all(bytes)
}

/// A rustls server configuration (TLS 1.2 and 1.3, ring provider, ALPN `http/1.1`) from PEM.
///
/// # Errors
/// A clear message when the PEM holds no certificate, no private key, or a key that does not match.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<rustls::ServerConfig, String> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot read the TLS certificate: {e}"))?;
    if certs.is_empty() {
        return Err("the TLS certificate file holds no certificate".into());
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("cannot read the TLS key: {e}"))?
        .ok_or("the TLS key file holds no private key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the TLS certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = load_or_create_self_signed(dir.path(), Some("cp.example")).unwrap();
        let (cert2, key2) = load_or_create_self_signed(dir.path(), Some("other")).unwrap();
        assert_eq!((&cert, &key), (&cert2, &key2));
        server_config(&cert, &key).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(server_config(b"", &key).is_err());
    }
}
