//! Kubernetes API access for the agent: where the API is, how to trust it, which credential to use,
//! and how to open a connection to it.
//!
//! Three sources, as the CLI offers them: in-cluster ([`KubeTarget::in_cluster`]:
//! `KUBERNETES_SERVICE_HOST`/`_PORT`, the ServiceAccount token file re-read when it rotates, the
//! ServiceAccount CA), a kubeconfig ([`KubeTarget::from_kubeconfig`]), or a URL with optional token
//! and CA files ([`KubeTarget::from_url`]).

pub mod headers;
pub mod kubeconfig;
pub mod tls;

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;

use crate::watched::{Watched, parse_token};

pub use tls::{ClientIdentity, Trust};

/// The ServiceAccount directory mounted into every pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Where the agent's own bearer token comes from.
#[derive(Clone)]
pub enum Credential {
    /// No token of its own: only the control plane's `Authorization` (if any) is sent.
    None,
    /// A fixed token (kubeconfig `token`).
    Token(String),
    /// A token file, re-read whenever its modification time changes (ServiceAccount token
    /// rotation, kubeconfig `tokenFile`, `--kube-token-file`).
    File(Arc<TokenFile>),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Token(_) => f.write_str("Token(<redacted>)"),
            Self::File(t) => write!(f, "File({})", t.path().display()),
        }
    }
}

/// A token file, re-read when it changes (see [`crate::watched`]).
pub type TokenFile = Watched<String>;

/// Opens a token file (one token, white space around it ignored).
///
/// # Errors
/// One line when the file cannot be read or holds no usable token (the token is never part of it).
pub fn open_token_file(path: &Path) -> Result<TokenFile, String> {
    Watched::open(path, parse_token)
}

/// Everything needed to reach one Kubernetes API server.
#[derive(Clone)]
pub struct KubeTarget {
    tls: Option<Arc<rustls::ClientConfig>>,
    host: String,
    port: u16,
    credential: Credential,
}

impl std::fmt::Debug for KubeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTarget")
            .field("url", &self.base_url())
            .field("credential", &self.credential)
            .finish_non_exhaustive()
    }
}

/// A connection to the API server: TLS or (only for `http://` URLs) plain TCP.
pub enum KubeStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for KubeStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for KubeStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Splits `scheme://host[:port][/]` into (tls, host, port). No path, query or user info allowed.
///
/// # Errors
/// One line naming the URL.
pub fn parse_base_url(url: &str) -> Result<(bool, String, u16), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("invalid URL {url:?}: scheme must be https or http")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("invalid URL {url:?}: no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("invalid URL {url:?}: user info is not allowed"));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!("invalid URL {url:?}: a path is not supported"));
    }
    let host = authority.host().to_string();
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok((tls, host, port))
}

impl KubeTarget {
    /// A target from its parts; `trust` and `identity` matter for `https` only.
    ///
    /// # Errors
    /// One line when the URL or the TLS material is unusable.
    pub fn new(
        url: &str,
        trust: &Trust,
        identity: Option<&ClientIdentity>,
        credential: Credential,
    ) -> Result<Self, String> {
        let (is_tls, host, port) = parse_base_url(url)?;
        let tls = if is_tls {
            tls::server_name(&host)?;
            Some(tls::client_config(trust, identity)?)
        } else {
            None
        };
        Ok(Self {
            tls,
            host,
            port,
            credential,
        })
    }

    /// In-cluster: `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, the ServiceAccount
    /// CA and token (re-read when it rotates).
    ///
    /// # Errors
    /// One line when not running in a pod (variables missing) or the ServiceAccount files are
    /// unreadable.
    pub fn in_cluster() -> Result<Self, String> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            "not running in a cluster (KUBERNETES_SERVICE_HOST is not set): pass --kubeconfig or --kube-url".to_string()
        })?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        Self::in_cluster_with(&host, &port, Path::new(SERVICE_ACCOUNT_DIR))
    }

    /// In-cluster access to `host:port` with the ServiceAccount files (`ca.crt`, `token`) under
    /// `dir`; what [`in_cluster`](Self::in_cluster) uses with the pod's environment.
    ///
    /// # Errors
    /// One line when the ServiceAccount files are unreadable or the address is invalid.
    pub fn in_cluster_with(host: &str, port: &str, dir: &Path) -> Result<Self, String> {
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let ca_path = dir.join("ca.crt");
        let ca = std::fs::read(&ca_path)
            .map_err(|e| format!("cannot read {}: {e}", ca_path.display()))?;
        let token = open_token_file(&dir.join("token"))?;
        Self::new(
            &format!("https://{host}:{port}"),
            &Trust::CaPem(ca),
            None,
            Credential::File(Arc::new(token)),
        )
    }

    /// From the current context of the kubeconfig at `path`.
    ///
    /// # Errors
    /// One line naming what is wrong.
    pub fn from_kubeconfig(path: &Path) -> Result<Self, String> {
        let k = kubeconfig::load(path)?;
        let trust = if k.insecure {
            Trust::Insecure
        } else {
            match &k.ca {
                Some(src) => Trust::CaPem(src.load()?),
                None => Trust::PublicRoots,
            }
        };
        let identity = match &k.client_cert {
            Some((cert, key)) => Some(ClientIdentity {
                cert_pem: cert.load()?,
                key_pem: key.load()?,
            }),
            None => None,
        };
        let credential = match (&k.token, &k.token_file) {
            (Some(t), _) => Credential::Token(t.clone()),
            (None, Some(f)) => Credential::File(Arc::new(open_token_file(f)?)),
            (None, None) => Credential::None,
        };
        Self::new(&k.server, &trust, identity.as_ref(), credential)
            .map_err(|e| format!("kubeconfig {}: {e}", path.display()))
    }

    /// `url` with an optional token file (re-read when it changes) and CA file (else the public
    /// roots).
    ///
    /// # Errors
    /// One line naming what is wrong.
    pub fn from_url(
        url: &str,
        token_file: Option<&Path>,
        ca_file: Option<&Path>,
    ) -> Result<Self, String> {
        let trust = match ca_file {
            Some(p) => Trust::CaPem(
                std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?,
            ),
            None => Trust::PublicRoots,
        };
        let credential = match token_file {
            Some(p) => Credential::File(Arc::new(open_token_file(p)?)),
            None => Credential::None,
        };
        Self::new(url, &trust, None, credential)
    }

    /// `https://host:port` (or `http://`).
    #[must_use]
    pub fn base_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }

    /// `wss://host:port` (or `ws://`), for WebSocket dials.
    #[must_use]
    pub fn ws_base_url(&self) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }

    /// `host:port` for the `Host` header.
    #[must_use]
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The agent's own bearer token, read now (a rotated file is picked up). `None` when it has
    /// none or the file became unreadable (logged, without the token).
    #[must_use]
    pub fn own_token(&self) -> Option<String> {
        match &self.credential {
            Credential::None => None,
            Credential::Token(t) => Some(t.clone()),
            Credential::File(f) => match f.get() {
                Ok(t) => Some((*t).clone()),
                Err(e) => {
                    tracing::warn!("{e}");
                    None
                }
            },
        }
    }

    /// Opens a connection (TCP, then TLS with verification unless configured otherwise).
    ///
    /// # Errors
    /// The I/O or TLS error.
    pub async fn connect(&self) -> std::io::Result<KubeStream> {
        let tcp = TcpStream::connect((
            self.host.trim_start_matches('[').trim_end_matches(']'),
            self.port,
        ))
        .await?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(KubeStream::Plain(tcp)),
            Some(config) => {
                let name = tls::server_name(&self.host).map_err(std::io::Error::other)?;
                let tls = TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await?;
                Ok(KubeStream::Tls(Box::new(tls)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::SystemTime;

    #[test]
    fn base_urls() {
        assert_eq!(
            parse_base_url("https://10.0.0.1:6443").unwrap(),
            (true, "10.0.0.1".to_string(), 6443)
        );
        assert_eq!(
            parse_base_url("http://localhost/").unwrap(),
            (false, "localhost".to_string(), 80)
        );
        assert_eq!(
            parse_base_url("https://kubernetes.default.svc").unwrap().2,
            443
        );
        assert!(parse_base_url("ftp://x").is_err());
        assert!(parse_base_url("https://u:p@x").is_err());
        assert!(parse_base_url("https://x/prefix").is_err());
    }

    #[test]
    fn token_file_is_reread_when_it_changes() {
        let dir = tempdir();
        let path = dir.join("token");
        std::fs::write(&path, "first\n").unwrap();
        let f = open_token_file(&path).unwrap();
        assert_eq!(*f.get().unwrap(), "first");
        // Rotate: new contents and a different modification time.
        std::fs::write(&path, "second").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(*f.get().unwrap(), "second");
        // Emptied (a rotation caught half-way): the last good token stays in use.
        std::fs::write(&path, "").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + std::time::Duration::from_secs(5))
            .unwrap();
        assert_eq!(*f.get().unwrap(), "second");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn in_cluster_needs_the_service_env() {
        // Only meaningful outside a pod; the variables are not set by the test harness.
        if std::env::var("KUBERNETES_SERVICE_HOST").is_err() {
            let e = KubeTarget::in_cluster().unwrap_err();
            assert!(e.contains("KUBERNETES_SERVICE_HOST"), "{e}");
        }
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tether-kube-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
