//! Throwaway TLS identities (a CA and a server certificate for 127.0.0.1) and client configs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;

/// A server identity signed by a fresh CA, written as PEM files.
#[derive(Clone, Debug)]
pub struct TestTls {
    /// PEM of the CA certificate.
    pub ca_pem: String,
    /// Path of the CA certificate PEM.
    pub ca_path: PathBuf,
    /// Path of the server certificate PEM.
    pub cert_path: PathBuf,
    /// Path of the server private key PEM.
    pub key_path: PathBuf,
}

/// Generates a CA and a server certificate for `127.0.0.1` and `localhost` into `dir`, with file
/// names starting with `name`.
pub fn make_tls(dir: &Path, name: &str) -> TestTls {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("CA certificate");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("server params");
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca).expect("server certificate");
    let tls = TestTls {
        ca_pem: ca.pem(),
        ca_path: dir.join(format!("{name}-ca.crt")),
        cert_path: dir.join(format!("{name}.crt")),
        key_path: dir.join(format!("{name}.key")),
    };
    std::fs::write(&tls.ca_path, &tls.ca_pem).expect("write CA");
    std::fs::write(&tls.cert_path, cert.pem()).expect("write certificate");
    std::fs::write(&tls.key_path, key.serialize_pem()).expect("write key");
    tls
}

/// The ring crypto provider (the process-wide default may be unset or another one).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server config for the identity in `tls` (HTTP/1.1 only).
pub fn server_config(tls: &TestTls) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&tls.cert_path)
        .expect("read certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("parse certificate");
    let key = PrivateKeyDer::from_pem_file(&tls.key_path).expect("read key");
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("TLS identity");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A rustls client config trusting only the CA certificates in `ca_pem`.
pub fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.expect("parse CA PEM"))
            .expect("add CA certificate");
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}
