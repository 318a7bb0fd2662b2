//! The control plane's address, from a URL such as `https://cp.example:8443` or `ws://10.0.0.1`.

/// Where the tunnel dials. The path is the agent endpoint unless the URL names another one.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ControlPlane<'a> {
    /// `https`/`wss`: TLS is required.
    pub tls: bool,
    /// Host name or IP literal (IPv6 without brackets).
    pub host: &'a str,
    /// Port (default 443 with TLS, 80 without).
    pub port: u16,
    /// `host[:port]` as written in the URL, for the `Host` header.
    authority: &'a str,
    /// Request path.
    pub path: &'a str,
}

/// Why a URL was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum UrlError {
    /// Not `http`, `https`, `ws` or `wss`.
    Scheme,
    /// No host, or a bad port.
    Authority,
}

impl core::fmt::Display for UrlError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Scheme => {
                "the control plane URL must start with http://, https://, ws:// or wss://"
            }
            Self::Authority => "the control plane URL has no valid host[:port]",
        })
    }
}

impl<'a> ControlPlane<'a> {
    /// Parses `url`. A path of `/` or none becomes the agent endpoint
    /// ([`AGENT_PATH`](crate::tunnel::AGENT_PATH)), as the PipeOps agent does.
    ///
    /// # Errors
    /// [`UrlError`].
    pub fn parse(url: &'a str) -> Result<Self, UrlError> {
        let (scheme, rest) = url.split_once("://").ok_or(UrlError::Scheme)?;
        let tls = match scheme {
            "https" | "wss" => true,
            "http" | "ws" => false,
            _ => return Err(UrlError::Scheme),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let path = if path.is_empty() || path == "/" {
            crate::tunnel::AGENT_PATH
        } else {
            path
        };
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(UrlError::Authority)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| UrlError::Authority)?,
                None if after.is_empty() => default_port,
                None => return Err(UrlError::Authority),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| UrlError::Authority)?),
                None => (authority, default_port),
            }
        };
        if host.is_empty() || port == 0 || authority.contains('@') {
            return Err(UrlError::Authority);
        }
        Ok(Self {
            tls,
            host,
            port,
            authority,
            path,
        })
    }

    /// The `Host` header value.
    #[must_use]
    pub const fn host_header(&self) -> &'a str {
        self.authority
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let cp = ControlPlane::parse("https://cp.example:8443").unwrap();
        assert_eq!(
            (cp.tls, cp.host, cp.port, cp.path, cp.host_header()),
            (
                true,
                "cp.example",
                8443,
                "/api/v1/clusters/agent/ws",
                "cp.example:8443"
            )
        );
        let cp = ControlPlane::parse("ws://127.0.0.1/custom/ws").unwrap();
        assert_eq!(
            (cp.tls, cp.host, cp.port, cp.path),
            (false, "127.0.0.1", 80, "/custom/ws")
        );
        let cp = ControlPlane::parse("wss://[::1]:9/").unwrap();
        assert_eq!((cp.host, cp.port, cp.host_header()), ("::1", 9, "[::1]:9"));
        assert_eq!(ControlPlane::parse("ftp://x"), Err(UrlError::Scheme));
        assert_eq!(ControlPlane::parse("http://:80"), Err(UrlError::Authority));
        assert_eq!(ControlPlane::parse("http://h:x"), Err(UrlError::Authority));
        assert_eq!(ControlPlane::parse("http://u@h"), Err(UrlError::Authority));
    }
}
