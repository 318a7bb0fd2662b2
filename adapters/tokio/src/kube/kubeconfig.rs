//! The subset of a kubeconfig file the agent needs: the current context's cluster (server, CA,
//! `insecure-skip-tls-verify`) and user (token, tokenFile, client certificate).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// Where a PEM comes from: inline (`*-data`, base64) or a file (relative to the kubeconfig).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PemSource {
    /// Decoded `*-data` bytes.
    Data(Vec<u8>),
    /// A file path, already resolved against the kubeconfig's directory.
    File(PathBuf),
}

impl PemSource {
    /// The PEM bytes.
    ///
    /// # Errors
    /// One line naming the file that cannot be read.
    pub fn load(&self) -> Result<Vec<u8>, String> {
        match self {
            Self::Data(d) => Ok(d.clone()),
            Self::File(p) => {
                std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
            }
        }
    }
}

/// What the current context of a kubeconfig says, resolved.
#[derive(Clone, PartialEq, Eq)]
pub struct KubeconfigTarget {
    /// Cluster `server` URL.
    pub server: String,
    /// Cluster CA, when given.
    pub ca: Option<PemSource>,
    /// `insecure-skip-tls-verify: true`.
    pub insecure: bool,
    /// User `token`.
    pub token: Option<String>,
    /// User `tokenFile`, resolved.
    pub token_file: Option<PathBuf>,
    /// User client certificate and key, when both are given.
    pub client_cert: Option<(PemSource, PemSource)>,
}

impl std::fmt::Debug for KubeconfigTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeconfigTarget")
            .field("server", &self.server)
            .field("ca", &self.ca.is_some())
            .field("insecure", &self.insecure)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("client_cert", &self.client_cert.is_some())
            .finish()
    }
}

#[derive(Deserialize)]
struct File {
    #[serde(rename = "current-context", default)]
    current_context: Option<String>,
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    #[serde(default)]
    users: Vec<NamedUser>,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    context: Context,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: User,
}

#[derive(Deserialize)]
struct Cluster {
    server: String,
    #[serde(rename = "certificate-authority", default)]
    ca_file: Option<String>,
    #[serde(rename = "certificate-authority-data", default)]
    ca_data: Option<String>,
    #[serde(rename = "insecure-skip-tls-verify", default)]
    insecure: bool,
}

#[derive(Deserialize)]
struct Context {
    cluster: String,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize, Default)]
struct User {
    #[serde(default)]
    token: Option<String>,
    #[serde(rename = "tokenFile", default)]
    token_file: Option<String>,
    #[serde(rename = "client-certificate", default)]
    cert_file: Option<String>,
    #[serde(rename = "client-certificate-data", default)]
    cert_data: Option<String>,
    #[serde(rename = "client-key", default)]
    key_file: Option<String>,
    #[serde(rename = "client-key-data", default)]
    key_data: Option<String>,
}

/// Reads and resolves the kubeconfig at `path`.
///
/// # Errors
/// One line naming the file and what is missing or malformed.
pub fn load(path: &Path) -> Result<KubeconfigTarget, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    parse(&text, dir).map_err(|e| format!("kubeconfig {}: {e}", path.display()))
}

/// Resolves kubeconfig `text`; relative file paths are taken from `dir`.
///
/// # Errors
/// One line saying what is missing or malformed.
pub fn parse(text: &str, dir: &Path) -> Result<KubeconfigTarget, String> {
    let file: File = serde_yaml::from_str(text).map_err(|e| format!("invalid YAML: {e}"))?;
    let current = file
        .current_context
        .filter(|c| !c.is_empty())
        .ok_or("no current-context")?;
    let context = file
        .contexts
        .iter()
        .find(|c| c.name == current)
        .map(|c| &c.context)
        .ok_or_else(|| format!("context {current:?} not found"))?;
    let cluster = file
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)
        .map(|c| &c.cluster)
        .ok_or_else(|| format!("cluster {:?} not found", context.cluster))?;
    let user = match &context.user {
        Some(name) if !name.is_empty() => Some(
            file.users
                .iter()
                .find(|u| &u.name == name)
                .map(|u| &u.user)
                .ok_or_else(|| format!("user {name:?} not found"))?,
        ),
        _ => None,
    };
    let resolve = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        }
    };
    let source = |data: &Option<String>, file: &Option<String>, what: &str| {
        if let Some(d) = data.as_ref().filter(|d| !d.is_empty()) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(d.trim())
                .map_err(|_| format!("{what}-data is not valid base64"))?;
            return Ok::<_, String>(Some(PemSource::Data(bytes)));
        }
        Ok(file
            .as_ref()
            .filter(|f| !f.is_empty())
            .map(|f| PemSource::File(resolve(f))))
    };
    if cluster.server.is_empty() {
        return Err(format!("cluster {:?} has no server", context.cluster));
    }
    let ca = source(&cluster.ca_data, &cluster.ca_file, "certificate-authority")?;
    let (token, token_file, client_cert) = match user {
        None => (None, None, None),
        Some(u) => {
            let cert = source(&u.cert_data, &u.cert_file, "client-certificate")?;
            let key = source(&u.key_data, &u.key_file, "client-key")?;
            let client_cert = match (cert, key) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => return Err("client certificate given without its key, or the reverse".into()),
            };
            (
                u.token.clone().filter(|t| !t.is_empty()),
                u.token_file
                    .as_deref()
                    .filter(|f| !f.is_empty())
                    .map(resolve),
                client_cert,
            )
        }
    };
    Ok(KubeconfigTarget {
        server: cluster.server.clone(),
        ca,
        insecure: cluster.insecure,
        token,
        token_file,
        client_cert,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
apiVersion: v1
kind: Config
current-context: sim
clusters:
- name: other
  cluster:
    server: https://other.invalid:6443
- name: simcluster
  cluster:
    server: https://127.0.0.1:8443
    certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==
contexts:
- name: elsewhere
  context:
    cluster: other
    user: nobody
- name: sim
  context:
    cluster: simcluster
    user: admin
    namespace: default
users:
- name: nobody
  user:
    token: wrong
- name: admin
  user:
    token: s3cret
"#;

    #[test]
    fn current_context_picks_cluster_and_user() {
        let t = parse(CONFIG, Path::new("/etc/kube")).unwrap();
        assert_eq!(t.server, "https://127.0.0.1:8443");
        assert_eq!(
            t.ca,
            Some(PemSource::Data(b"-----BEGIN CERTIFICATE-----\n".to_vec()))
        );
        assert_eq!(t.token.as_deref(), Some("s3cret"));
        assert!(!t.insecure);
        assert_eq!(t.token_file, None);
        // The token never shows in Debug output.
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn files_resolve_against_the_kubeconfig_directory() {
        let text = r#"
current-context: c
clusters:
- name: k
  cluster:
    server: https://10.0.0.1
    certificate-authority: certs/ca.crt
    insecure-skip-tls-verify: true
contexts:
- name: c
  context: {cluster: k, user: u}
users:
- name: u
  user:
    tokenFile: /var/run/token
    client-certificate: client.crt
    client-key: /abs/client.key
"#;
        let t = parse(text, Path::new("/home/me/.kube")).unwrap();
        assert_eq!(
            t.ca,
            Some(PemSource::File(PathBuf::from(
                "/home/me/.kube/certs/ca.crt"
            )))
        );
        assert!(t.insecure);
        assert_eq!(t.token, None);
        assert_eq!(t.token_file, Some(PathBuf::from("/var/run/token")));
        assert_eq!(
            t.client_cert,
            Some((
                PemSource::File(PathBuf::from("/home/me/.kube/client.crt")),
                PemSource::File(PathBuf::from("/abs/client.key"))
            ))
        );
    }

    #[test]
    fn errors_name_what_is_missing() {
        let no_ctx = "clusters: []\ncontexts: []\nusers: []\n";
        assert_eq!(
            parse(no_ctx, Path::new(".")).unwrap_err(),
            "no current-context"
        );
        let bad_ctx = "current-context: x\ncontexts: []\n";
        assert_eq!(
            parse(bad_ctx, Path::new(".")).unwrap_err(),
            "context \"x\" not found"
        );
        let bad_cluster = "current-context: x\ncontexts:\n- name: x\n  context: {cluster: gone}\n";
        assert_eq!(
            parse(bad_cluster, Path::new(".")).unwrap_err(),
            "cluster \"gone\" not found"
        );
        let bad_b64 = "current-context: x\ncontexts:\n- name: x\n  context: {cluster: k}\nclusters:\n- name: k\n  cluster: {server: 'https://a', certificate-authority-data: '%%%'}\n";
        assert_eq!(
            parse(bad_b64, Path::new(".")).unwrap_err(),
            "certificate-authority-data is not valid base64"
        );
        assert!(
            parse("clusters: [unclosed", Path::new("."))
                .unwrap_err()
                .starts_with("invalid YAML")
        );
    }
}
