//! Reaching the control plane through an HTTP proxy with `CONNECT` (enterprise networks that
//! reach the internet only that way).
//!
//! The proxy comes from `--proxy URL`, else `HTTPS_PROXY` (`https`/`wss` control planes) or
//! `HTTP_PROXY` (`http`/`ws`), upper or lower case; `NO_PROXY` names hosts dialled directly.
//! Credentials in the proxy URL (`http://user:pass@proxy:3128`) are sent as `Proxy-Authorization:
//! Basic` and never logged. TLS to the control plane runs inside the tunnel the proxy opens, so
//! it is verified end to end exactly as without a proxy.

use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Largest proxy response head read before giving up.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// An HTTP proxy.
#[derive(Clone)]
pub struct Proxy {
    host: String,
    port: u16,
    /// `Basic` credentials, already encoded.
    authorization: Option<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("auth", &self.authorization.is_some())
            .finish()
    }
}

impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}", self.host, self.port)
    }
}

impl Proxy {
    /// Parses `http://[user:pass@]host[:port]` (port 3128 by default; `https://` proxies are not
    /// supported, a bare `host:port` is taken as `http://`).
    ///
    /// # Errors
    /// One line naming what is wrong (without the credentials).
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = if let Some(rest) = url.strip_prefix("http://") {
            rest
        } else if url.contains("://") {
            return Err("the proxy URL must be http://HOST:PORT".into());
        } else {
            url
        };
        let rest = rest.split('/').next().unwrap_or_default();
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let authority: http::uri::Authority = hostport
            .parse()
            .map_err(|_| "the proxy URL has no valid HOST[:PORT]".to_string())?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err("the proxy URL has no host".into());
        }
        let authorization = userinfo.map(|u| {
            let decoded = percent_decode(u);
            base64::engine::general_purpose::STANDARD.encode(decoded)
        });
        Ok(Self {
            host,
            port: authority.port_u16().unwrap_or(3128),
            authorization,
        })
    }

    /// The proxy for a control plane at `host`: `flag` if given, else the environment
    /// (`HTTPS_PROXY` when `tls`, `HTTP_PROXY` otherwise), unless `NO_PROXY` names `host`.
    ///
    /// # Errors
    /// An unusable proxy URL, as one line naming where it came from.
    pub fn for_target(flag: Option<&str>, tls: bool, host: &str) -> Result<Option<Self>, String> {
        let env = |names: [&str; 2]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
        };
        let (url, source) = match flag {
            Some(url) => (Some(url.to_string()), "--proxy"),
            None if tls => (env(["HTTPS_PROXY", "https_proxy"]), "HTTPS_PROXY"),
            None => (env(["HTTP_PROXY", "http_proxy"]), "HTTP_PROXY"),
        };
        let Some(url) = url else {
            return Ok(None);
        };
        let no_proxy = env(["NO_PROXY", "no_proxy"]).unwrap_or_default();
        if flag.is_none() && bypassed(&no_proxy, host) {
            return Ok(None);
        }
        Self::parse(url.trim())
            .map(Some)
            .map_err(|e| format!("{source}: {e}"))
    }

    /// Connects to the proxy and asks it for a tunnel to `host:port`; the stream then carries
    /// whatever the caller speaks to the target.
    ///
    /// # Errors
    /// One line: the proxy cannot be reached, refused (its status and reason), or answered
    /// something that is not HTTP.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream, String> {
        let attempt = async {
            let mut tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("cannot connect to the proxy {self}: {e}"))?;
            let target = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
            if let Some(auth) = &self.authorization {
                request.push_str(&format!("Proxy-Authorization: Basic {auth}\r\n"));
            }
            request.push_str("\r\n");
            tcp.write_all(request.as_bytes())
                .await
                .map_err(|e| format!("proxy {self}: write failed: {e}"))?;
            let head = read_head(&mut tcp)
                .await
                .map_err(|e| format!("proxy {self}: {e}"))?;
            let (code, reason) = status_of(&head).map_err(|e| format!("proxy {self}: {e}"))?;
            if !(200..300).contains(&code) {
                return Err(format!(
                    "proxy {self} refused CONNECT to {target}: HTTP {code} {reason}"
                ));
            }
            Ok(tcp)
        };
        tokio::time::timeout(timeout, attempt).await.map_err(|_| {
            format!(
                "proxy {self} did not answer CONNECT within {}s",
                timeout.as_secs()
            )
        })?
    }
}

/// Reads a response head up to its blank line, byte by byte so nothing of the tunnel's first
/// bytes is taken.
async fn read_head(tcp: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err("response head too large".into());
        }
        let byte = tcp
            .read_u8()
            .await
            .map_err(|e| format!("connection closed before the response head: {e}"))?;
        head.push(byte);
    }
    Ok(head)
}

/// The status code and reason of an HTTP response head.
fn status_of(head: &[u8]) -> Result<(u16, String), String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => Ok((
            response.code.unwrap_or(0),
            response.reason.unwrap_or_default().to_string(),
        )),
        Ok(httparse::Status::Partial) => Err("incomplete response head".into()),
        Err(e) => Err(format!("answered something that is not HTTP ({e})")),
    }
}

/// Whether `NO_PROXY` (comma-separated: `*`, host names that also cover their subdomains, with
/// or without a leading dot, IP addresses; ports ignored) names `host`.
fn bypassed(no_proxy: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    no_proxy
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            let entry = entry.to_ascii_lowercase();
            let name = match entry.rsplit_once(':') {
                Some((name, port))
                    if port.bytes().all(|b| b.is_ascii_digit()) && !name.contains(':') =>
                {
                    name
                }
                _ => entry.as_str(),
            };
            let name = name.trim_start_matches("*.").trim_start_matches('.');
            host == name || host.ends_with(&format!(".{name}"))
        })
}

fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_parse_with_and_without_credentials() {
        let p = Proxy::parse("http://proxy.corp:8080").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.authorization.is_none()),
            ("proxy.corp", 8080, true)
        );
        let p = Proxy::parse("proxy.corp").unwrap();
        assert_eq!(p.port, 3128);
        let p = Proxy::parse("http://al%40ice:p%3Ass@10.0.0.1:3128/").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(p.authorization.clone().unwrap())
            .unwrap();
        assert_eq!(decoded, b"al@ice:p:ss");
        assert!(
            !format!("{p:?}{p}").contains("ice"),
            "credentials never shown"
        );
        assert!(Proxy::parse("https://proxy:443").is_err());
        assert!(Proxy::parse("http://").is_err());
    }

    #[test]
    fn no_proxy_matches_hosts_domains_and_star() {
        assert!(bypassed("*", "cp.example"));
        assert!(bypassed("localhost, .corp.example", "cp.corp.example"));
        assert!(bypassed("corp.example", "cp.corp.example"));
        assert!(bypassed("corp.example", "corp.example"));
        assert!(bypassed("cp.example:8443", "cp.example"));
        assert!(bypassed("127.0.0.1", "127.0.0.1"));
        assert!(!bypassed("corp.example", "notcorp.example"));
        assert!(!bypassed("", "cp.example"));
        assert!(bypassed("::1", "[::1]"));
    }

    #[test]
    fn status_lines_are_read() {
        assert_eq!(
            status_of(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").unwrap(),
            (407, "Proxy Authentication Required".to_string())
        );
        assert_eq!(
            status_of(b"HTTP/1.0 200 Connection established\r\n\r\n")
                .unwrap()
                .0,
            200
        );
        assert!(status_of(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }
}
