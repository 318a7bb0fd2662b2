//! The kubeconfig `tether-control-plane kubeconfig` prints, and the state files it reads.

use std::fs;
use std::io;
use std::path::Path;

use base64::Engine as _;

use super::tls;

/// File in the state directory where `serve` records its base URL (`https://host:port`).
pub const ENDPOINT_FILE: &str = "endpoint";
/// File in the state directory where `serve` records the user tokens it accepts (`USER=TOKEN` per
/// line, mode 0600), so `kubeconfig` can print a working kubeconfig without the token being passed
/// again. It holds nothing the operator did not give `serve`, and sits beside the TLS key.
pub const USER_TOKENS_FILE: &str = "user-tokens";

/// What a kubeconfig needs.
#[derive(Debug, Clone)]
pub struct KubeconfigSpec<'a> {
    /// The cluster name (the `<cluster>` of `/clusters/<cluster>/...`).
    pub cluster: &'a str,
    /// The user name (kubeconfig user and context entry).
    pub user: &'a str,
    /// The user's bearer token.
    pub token: &'a str,
    /// Server URL, e.g. `https://127.0.0.1:8443/clusters/c1`.
    pub server: &'a str,
    /// PEM of the certificate to trust (the self-signed one), if any.
    pub ca_pem: Option<&'a [u8]>,
}

/// A kubeconfig (YAML) with one cluster, one user and one current context named after the
/// cluster. All strings are written as JSON strings, which YAML reads as quoted scalars.
#[must_use]
pub fn render(spec: &KubeconfigSpec<'_>) -> String {
    let q = |s: &str| serde_json::Value::from(s).to_string();
    let ca = spec.ca_pem.map_or_else(String::new, |pem| {
        format!(
            "\n    certificate-authority-data: {}",
            base64::engine::general_purpose::STANDARD.encode(pem)
        )
    });
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    server: {server}{ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: {cluster}\n  context:\n    cluster: {cluster}\n    user: {user}\ncurrent-context: {cluster}\n",
        cluster = q(spec.cluster),
        server = q(spec.server),
        user = q(spec.user),
        token = q(spec.token),
    )
}

/// The base URL `serve` recorded in `state_dir`.
///
/// # Errors
/// The file is missing (serve never ran with this state directory) or unreadable.
pub fn read_endpoint(state_dir: &Path) -> io::Result<String> {
    Ok(fs::read_to_string(state_dir.join(ENDPOINT_FILE))?
        .trim()
        .to_string())
}

/// Records the base URL in `state_dir`.
///
/// # Errors
/// The file cannot be written.
pub fn write_endpoint(state_dir: &Path, base_url: &str) -> io::Result<()> {
    write_whole(
        &state_dir.join(ENDPOINT_FILE),
        format!("{base_url}\n").as_bytes(),
    )
}

/// Writes `bytes` to `path` so that a reader sees the old file or the whole new one, never a
/// partial one (`kubeconfig` and scripts poll for these files while `serve` starts): a private
/// (0600) temporary file in the same directory, renamed over `path`.
fn write_whole(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    io::Write::write_all(&mut options.open(&tmp)?, bytes)?;
    fs::rename(&tmp, path)
}

/// Records the user tokens `serve` accepts (mode 0600).
///
/// # Errors
/// The file cannot be written.
pub fn write_user_tokens(state_dir: &Path, tokens: &[(String, String)]) -> io::Result<()> {
    let mut text = String::new();
    for (user, token) in tokens {
        text.push_str(user);
        text.push('=');
        text.push_str(token);
        text.push('\n');
    }
    write_whole(&state_dir.join(USER_TOKENS_FILE), text.as_bytes())
}

/// The token `serve` recorded for `user`, if any.
///
/// # Errors
/// The file exists but cannot be read.
pub fn read_user_token(state_dir: &Path, user: &str) -> io::Result<Option<String>> {
    let text = match fs::read_to_string(state_dir.join(USER_TOKENS_FILE)) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(text.lines().find_map(|line| {
        let (u, t) = line.split_once('=')?;
        (u == user).then(|| t.to_string())
    }))
}

/// The PEM of the self-signed certificate in `state_dir`, if one was generated.
#[must_use]
pub fn read_ca(state_dir: &Path) -> Option<Vec<u8>> {
    fs::read(tls::cert_path(state_dir)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_round_trips_state() {
        let yaml = render(&KubeconfigSpec {
            cluster: "c1",
            user: "alice",
            token: "t0k\"en",
            server: "https://127.0.0.1:8443/clusters/c1",
            ca_pem: Some(b"PEM"),
        });
        assert!(yaml.contains("server: \"https://127.0.0.1:8443/clusters/c1\""));
        assert!(yaml.contains("certificate-authority-data: UEVN"));
        assert!(yaml.contains("token: \"t0k\\\"en\""));
        assert!(yaml.contains("current-context: \"c1\""));

        let dir = tempfile::tempdir().unwrap();
        write_endpoint(dir.path(), "https://x:1").unwrap();
        assert_eq!(read_endpoint(dir.path()).unwrap(), "https://x:1");
        assert_eq!(read_user_token(dir.path(), "alice").unwrap(), None);
        write_user_tokens(dir.path(), &[("alice".into(), "a=b".into())]).unwrap();
        assert_eq!(
            read_user_token(dir.path(), "alice").unwrap().as_deref(),
            Some("a=b")
        );
        assert_eq!(read_user_token(dir.path(), "bob").unwrap(), None);
    }
}
