//! Dialling the control plane: TCP, TLS (verified unless explicitly turned off), WebSocket upgrade
//! with the agent's bearer token.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::proxy::Proxy;
use crate::kube::{KubeStream, TokenFile, Trust, tls};

/// The path the control plane serves agents on (used when the URL has no path).
pub const AGENT_PATH: &str = "/api/v1/clusters/agent/ws";

/// Handshake timeout (TCP + TLS + upgrade), as the PipeOps agent.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The tunnel socket.
pub type TunnelSocket = WebSocketStream<KubeStream>;

/// The agent's token for the control plane.
#[derive(Clone)]
pub enum TunnelToken {
    /// Given as is (`--token`).
    Fixed(String),
    /// Read from a file at every dial, so a rotated token (a Kubernetes Secret updated in
    /// place) is used from the next connection on without a restart (`--token-file`).
    File(Arc<TokenFile>),
}

impl From<&str> for TunnelToken {
    fn from(token: &str) -> Self {
        Self::Fixed(token.to_string())
    }
}

impl TunnelToken {
    /// The token to send now.
    fn current(&self) -> Result<String, String> {
        match self {
            Self::Fixed(t) => Ok(t.clone()),
            Self::File(f) => f.get().map(|t| (*t).clone()),
        }
    }
}

/// Where and how to dial the control plane.
#[derive(Clone)]
pub struct TunnelTarget {
    url: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    host: String,
    port: u16,
    token: TunnelToken,
    proxy: Option<Proxy>,
}

impl std::fmt::Debug for TunnelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is never printed.
        f.debug_struct("TunnelTarget")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Why a dial failed.
#[derive(Debug)]
pub enum DialError {
    /// The control plane refused the token (HTTP 401 or 403).
    Unauthorized(u16),
    /// Another HTTP status instead of 101.
    Status(u16),
    /// Network, TLS or WebSocket failure (one line).
    Failed(String),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unauthorized(s) => write!(
                f,
                "control plane rejected the agent token (HTTP {s}): check --token / TETHER_TOKEN"
            ),
            Self::Status(s) => write!(
                f,
                "control plane answered HTTP {s} instead of a WebSocket upgrade"
            ),
            Self::Failed(e) => f.write_str(e),
        }
    }
}

impl TunnelTarget {
    /// Validates the control-plane URL (`https`/`wss`, or plain `http`/`ws`), builds its TLS
    /// configuration from `trust`, and keeps `token` for the `Authorization` header. A URL without a
    /// path gets [`AGENT_PATH`].
    ///
    /// # Errors
    /// One line naming what is wrong.
    pub fn new(url: &str, trust: &Trust, token: impl Into<TunnelToken>) -> Result<Self, String> {
        let token = token.into();
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("invalid --control-plane URL {url:?}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https" | "wss") => true,
            Some("http" | "ws") => false,
            _ => {
                return Err(format!(
                    "invalid --control-plane URL {url:?}: scheme must be https, wss, http or ws"
                ));
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("invalid --control-plane URL {url:?}: no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "invalid --control-plane URL {url:?}: user info is not allowed"
            ));
        }
        if let TunnelToken::Fixed(token) = &token
            && (token.is_empty() || token.chars().any(|c| c.is_control() || c == ' '))
        {
            return Err("invalid --token: empty or contains spaces or control characters".into());
        }
        let host = authority.host().to_string();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("" | "/") => AGENT_PATH.to_string(),
            Some(p) => p.to_string(),
        };
        let scheme = if tls { "wss" } else { "ws" };
        let url = format!("{scheme}://{}{path}", authority.as_str());
        let tls = if tls {
            tls::server_name(&host)?;
            Some(tls::client_config(trust, None)?)
        } else {
            None
        };
        Ok(Self {
            url,
            tls,
            host,
            port,
            token,
            proxy: None,
        })
    }

    /// Dials through `proxy` (HTTP `CONNECT`), or directly with `None`.
    #[must_use]
    pub fn with_proxy(mut self, proxy: Option<Proxy>) -> Self {
        self.proxy = proxy;
        self
    }

    /// The proxy dials go through, if any.
    #[must_use]
    pub fn proxy(&self) -> Option<&Proxy> {
        self.proxy.as_ref()
    }

    /// The control plane's host (for choosing a proxy: see [`Proxy::for_target`]).
    #[must_use]
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The WebSocket URL dialled.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `true` when the tunnel is plain text (`http`/`ws`).
    #[must_use]
    pub fn is_plaintext(&self) -> bool {
        self.tls.is_none()
    }

    /// Dials and upgrades, within [`HANDSHAKE_TIMEOUT`]. `max_message` bounds inbound messages.
    ///
    /// # Errors
    /// [`DialError`].
    pub async fn dial(&self, max_message: usize) -> Result<TunnelSocket, DialError> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.dial_inner(max_message)).await {
            Ok(r) => r,
            Err(_) => Err(DialError::Failed(format!(
                "handshake with {} timed out after {}s",
                self.url,
                HANDSHAKE_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn dial_inner(&self, max_message: usize) -> Result<TunnelSocket, DialError> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let tcp = match &self.proxy {
            Some(proxy) => proxy
                .connect(host, self.port, HANDSHAKE_TIMEOUT)
                .await
                .map_err(DialError::Failed)?,
            None => TcpStream::connect((host, self.port))
                .await
                .map_err(|e| DialError::Failed(format!("cannot connect to {}: {e}", self.url)))?,
        };
        crate::socket::tune_tunnel(&tcp);
        let stream = match &self.tls {
            None => KubeStream::Plain(tcp),
            Some(config) => {
                let name = tls::server_name(&self.host).map_err(DialError::Failed)?;
                let tls = TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| DialError::Failed(format!("TLS with {} failed: {e}", self.url)))?;
                KubeStream::Tls(Box::new(tls))
            }
        };
        let mut request = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| DialError::Failed(format!("invalid request: {e}")))?;
        let token = self.token.current().map_err(DialError::Failed)?;
        let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| DialError::Failed("token is not a valid header value".into()))?;
        request.headers_mut().insert("Authorization", bearer);
        let config = WebSocketConfig::default()
            .write_buffer_size(crate::socket::TUNNEL_WRITE_BUFFER)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                if status == 401 || status == 403 {
                    Err(DialError::Unauthorized(status))
                } else {
                    Err(DialError::Status(status))
                }
            }
            Err(e) => Err(DialError::Failed(format!(
                "WebSocket upgrade with {} failed: {e}",
                self.url
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_the_agent_path_and_ws_scheme() {
        let t = TunnelTarget::new("https://cp.example:8443", &Trust::PublicRoots, "tok").unwrap();
        assert_eq!(t.url(), "wss://cp.example:8443/api/v1/clusters/agent/ws");
        assert!(!t.is_plaintext());
        let t = TunnelTarget::new("http://127.0.0.1:9000/", &Trust::PublicRoots, "tok").unwrap();
        assert_eq!(t.url(), "ws://127.0.0.1:9000/api/v1/clusters/agent/ws");
        assert!(t.is_plaintext());
        let t = TunnelTarget::new("wss://cp/custom/ws", &Trust::PublicRoots, "tok").unwrap();
        assert_eq!(t.url(), "wss://cp/custom/ws");
        assert!(TunnelTarget::new("ftp://cp", &Trust::PublicRoots, "tok").is_err());
        assert!(TunnelTarget::new("https://u:p@cp", &Trust::PublicRoots, "tok").is_err());
        assert!(TunnelTarget::new("https://cp", &Trust::PublicRoots, "").is_err());
        assert!(TunnelTarget::new("https://cp", &Trust::PublicRoots, "a\nb").is_err());
        // The token never shows in Debug output.
        let t = TunnelTarget::new("https://cp", &Trust::PublicRoots, "s3cret").unwrap();
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
