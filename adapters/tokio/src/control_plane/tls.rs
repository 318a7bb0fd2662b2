//! TLS for the control plane's listener: a self-signed certificate generated once into the state
//! directory and reused on restart, or the operator's own certificate files, re-read when they
//! change (a renewed certificate is served from the next handshake on, no restart).

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

use crate::watched::Watched;

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
    let key = certified_key(cert_pem, key_pem)?;
    Ok(config_with(Arc::new(FixedCert(Arc::new(key)))))
}

/// One certificate, always.
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A server configuration that serves the operator's certificate files, re-read whenever either
/// changes (see [`CertFiles`]).
///
/// # Errors
/// A clear message when a file cannot be read, the key is readable by others, or the pair does
/// not fit.
pub fn reloading_server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    Ok(config_with(Arc::new(CertFiles::open(cert, key)?)))
}

fn config_with(resolver: Arc<dyn ResolvesServerCert>) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// A certificate chain and its key, from PEM, checked to belong together.
fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot read the TLS certificate: {e}"))?;
    if certs.is_empty() {
        return Err("the TLS certificate file holds no certificate".into());
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("cannot read the TLS key: {e}"))?
        .ok_or("the TLS key file holds no private key")?;
    CertifiedKey::from_der(certs, key, &rustls::crypto::ring::default_provider())
        .map_err(|e| format!("the TLS certificate and key do not fit: {e}"))
}

/// Refuses a private key file that every local user may read (mode `o+r`), with the line that
/// fixes it.
///
/// # Errors
/// One line naming the file and its mode.
pub fn check_key_file_mode(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o004 != 0 {
        return Err(format!(
            "the TLS key {} is readable by every user (mode {mode:03o}); \
             restrict it first: chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

fn read_pem(bytes: &[u8]) -> Result<Vec<u8>, String> {
    if bytes.is_empty() {
        Err("empty".into())
    } else {
        Ok(bytes.to_vec())
    }
}

/// The operator's certificate and key files, re-read when either changes: the next handshake
/// after a renewal gets the new certificate. A pair that does not fit (the certificate renewed,
/// the key not yet written) keeps the previous one in service, logged once per change.
pub struct CertFiles {
    cert: Watched<Vec<u8>>,
    key: Watched<Vec<u8>>,
    current: Mutex<Served>,
}

/// The PEM versions last tried (certificate, key), and what is served.
type Served = (Arc<Vec<u8>>, Arc<Vec<u8>>, Arc<CertifiedKey>);

impl std::fmt::Debug for CertFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertFiles")
            .field("cert", &self.cert.path())
            .field("key", &self.key.path())
            .finish_non_exhaustive()
    }
}

impl CertFiles {
    /// Reads both files once; they must fit together now.
    ///
    /// # Errors
    /// As [`reloading_server_config`].
    pub fn open(cert: &Path, key: &Path) -> Result<Self, String> {
        check_key_file_mode(key)?;
        let cert = Watched::open(cert, read_pem)?;
        let key = Watched::open(key, read_pem)?;
        let (c, k) = (cert.get()?, key.get()?);
        let served = Arc::new(certified_key(&c, &k)?);
        Ok(Self {
            cert,
            key,
            current: Mutex::new((c, k, served)),
        })
    }

    /// What to serve now, re-reading the files if they changed.
    fn served(&self) -> Arc<CertifiedKey> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let (Ok(c), Ok(k)) = (self.cert.get(), self.key.get())
            && !(Arc::ptr_eq(&c, &current.0) && Arc::ptr_eq(&k, &current.1))
        {
            match certified_key(&c, &k) {
                Ok(fresh) => {
                    tracing::info!(cert = %self.cert.path().display(), "serving the renewed TLS certificate");
                    current.2 = Arc::new(fresh);
                }
                Err(e) => tracing::warn!(
                    cert = %self.cert.path().display(),
                    "{e}; still serving the previous certificate"
                ),
            }
            current.0 = c;
            current.1 = k;
        }
        current.2.clone()
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.served())
    }
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

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn put(path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = path.with_extension("new");
        fs::write(&tmp, text).unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn operator_certificates_are_reloaded_and_a_mismatch_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_file, key_file) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let (a_cert, a_key) = pair("a.example");
        put(&cert_file, &a_cert);
        put(&key_file, &a_key);
        let files = CertFiles::open(&cert_file, &key_file).unwrap();
        let der = |pem: &str| {
            rustls_pemfile::certs(&mut pem.as_bytes())
                .next()
                .unwrap()
                .unwrap()
        };
        assert_eq!(files.served().cert[0], der(&a_cert));
        let (b_cert, b_key) = pair("b.example");
        put(&cert_file, &b_cert);
        put(&key_file, &b_key);
        assert_eq!(files.served().cert[0], der(&b_cert));
        // Renewed certificate, key not yet written: the working pair stays in service.
        put(&cert_file, &a_cert);
        assert_eq!(files.served().cert[0], der(&b_cert));
        put(&key_file, &a_key);
        assert_eq!(files.served().cert[0], der(&a_cert));
    }

    #[test]
    fn a_key_readable_by_everyone_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair("a.example");
        let (cert_file, key_file) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        fs::write(&cert_file, cert).unwrap();
        fs::write(&key_file, key).unwrap();
        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o644)).unwrap();
        let err = CertFiles::open(&cert_file, &key_file).unwrap_err();
        assert!(
            err.contains("readable by every user") && err.contains("chmod 600"),
            "{err}"
        );
        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o640)).unwrap();
        CertFiles::open(&cert_file, &key_file).unwrap();
    }
}
