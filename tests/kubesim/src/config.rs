//! Server configuration: listen address, auth token, TLS material and pods.

use std::net::SocketAddr;
use std::path::PathBuf;

/// A pod to simulate: `NAMESPACE/NAME` (one container `main`) or `NAMESPACE/NAME:c1,c2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Container names, in order (the first is kubectl's default).
    pub containers: Vec<String>,
}

impl std::str::FromStr for PodSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (pod, containers) = match s.split_once(':') {
            Some((pod, list)) => (pod, list.split(',').map(str::to_string).collect()),
            None => (s, vec!["main".to_string()]),
        };
        let Some((namespace, name)) = pod.split_once('/') else {
            return Err(format!(
                "invalid pod {s:?}: expected NAMESPACE/NAME or NAMESPACE/NAME:c1,c2"
            ));
        };
        for (what, value) in [("namespace", namespace), ("pod name", name)]
            .into_iter()
            .chain(containers.iter().map(|c| ("container name", c.as_str())))
        {
            if !is_dns_label(value) {
                return Err(format!(
                    "invalid pod {s:?}: {what} {value:?} is not a DNS label (lowercase letters, digits, '-')"
                ));
            }
        }
        Ok(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            containers,
        })
    }
}

/// RFC 1123 subdomain: dot-separated DNS labels, at most 253 characters (ConfigMap names).
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// RFC 1123 label: 1-63 of `[a-z0-9-]`, alphanumeric at both ends.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// PEM-encoded TLS identity.
#[derive(Debug, Clone)]
pub struct TlsPem {
    /// Certificate chain PEM (leaf first).
    pub cert_chain: Vec<u8>,
    /// Private key PEM (PKCS#8, PKCS#1 or SEC1).
    pub private_key: Vec<u8>,
}

/// Everything [`crate::Server::start`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to bind (port 0 picks a free port; see [`crate::Handle::addr`]).
    pub listen: SocketAddr,
    /// Bearer token required on every request (`None`: no authentication).
    pub token: Option<String>,
    /// TLS identity (`None`: plain HTTP).
    pub tls: Option<TlsPem>,
    /// Pods to simulate.
    pub pods: Vec<PodSpec>,
    /// Directory under which pods get their working directories (`None`: a fresh temp dir,
    /// removed when the server stops).
    pub root: Option<PathBuf>,
    /// Refuse WebSocket upgrades (400), as an API server older than 1.30: kubectl falls back
    /// to SPDY for exec, attach, cp and port-forward.
    pub no_websocket: bool,
}

impl Config {
    /// Plain HTTP on `listen`, no token, no pods.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            token: None,
            tls: None,
            pods: Vec::new(),
            root: None,
            no_websocket: false,
        }
    }

    /// Adds a pod from its `NS/NAME[:c1,c2]` spec.
    pub fn pod(mut self, spec: &str) -> Result<Self, String> {
        self.pods.push(spec.parse()?);
        Ok(self)
    }

    /// Requires `token`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Refuses WebSocket upgrades (see [`Config::no_websocket`]).
    pub fn no_websocket(mut self) -> Self {
        self.no_websocket = true;
        self
    }

    /// Serves TLS with this identity.
    pub fn tls(mut self, tls: TlsPem) -> Self {
        self.tls = Some(tls);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_specs() {
        let p: PodSpec = "default/demo".parse().unwrap();
        assert_eq!(p.containers, ["main"]);
        let p: PodSpec = "ns1/web:app,sidecar".parse().unwrap();
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("ns1", "web"));
        assert_eq!(p.containers, ["app", "sidecar"]);
        assert!("demo".parse::<PodSpec>().is_err());
        assert!("a/B".parse::<PodSpec>().is_err());
        assert!("a/b:".parse::<PodSpec>().is_err());
    }
}
