//! Test support shared by kubesim's integration tests (and the port-forward tests).
//!
//! Contract (keep stable, other test files depend on it):
//!
//! * [`Kubesim::start`] runs the real `kubesim` binary (`CARGO_BIN_EXE_kubesim`) on
//!   `127.0.0.1:0` with TLS (a fresh CA + server certificate) and a bearer token, and writes
//!   a kubeconfig (`certificate-authority-data`, `token`) into a private temp dir.
//! * [`Kubesim::kubectl`] returns a `std::process::Command` for `/usr/bin/kubectl` with that
//!   kubeconfig, an isolated `--cache-dir` and `HOME`, and no inherited `KUBECONFIG`/`KUBECTL_*`.
//!   Convert with `tokio::process::Command::from(cmd)` in async tests.
//! * [`Kubesim::run`] / [`Kubesim::run_with_stdin`] run kubectl to completion with a timeout
//!   and return an [`Outcome`] (exit code, stdout, stderr).
//! * [`Kubesim::requests`] returns the requests kubesim recorded (parsed from its JSON log).
//! * Every helper fails the test with ONE clear line when `/usr/bin/kubectl` is missing.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;

/// Where the real kubectl v1.32 lives on the project's machines.
pub const KUBECTL: &str = "/usr/bin/kubectl";

/// Default timeout for one kubectl invocation.
pub const KUBECTL_TIMEOUT: Duration = Duration::from_secs(30);

/// The path of the real kubectl; panics with one clear line when it is missing.
pub fn kubectl_path() -> &'static Path {
    let path = Path::new(KUBECTL);
    if !path.exists() {
        panic!("{KUBECTL} is missing: these tests need the real kubectl v1.32 installed there");
    }
    path
}

/// A TLS server identity signed by a throwaway CA, written as PEM files.
pub struct TestTls {
    /// PEM of the CA certificate (goes into `certificate-authority-data`).
    pub ca_pem: String,
    /// Path of the server certificate chain PEM.
    pub cert_path: PathBuf,
    /// Path of the server private key PEM.
    pub key_path: PathBuf,
}

/// Generates a CA and a server certificate for `127.0.0.1` and `localhost` into `dir`.
pub fn make_tls(dir: &Path) -> TestTls {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kubesim test CA");
    let ca_key = KeyPair::generate().expect("ca key");
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca cert");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("server params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kubesim");
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca).expect("server cert");
    let cert_path = dir.join("server.crt");
    let key_path = dir.join("server.key");
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    TestTls {
        ca_pem: ca.pem(),
        cert_path,
        key_path,
    }
}

/// One request kubesim recorded (from its `request` log event).
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Header names are lowercase; values as sent (Authorization is redacted in the log).
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The result of one kubectl run.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Outcome {
    /// The exit code (-1 when killed by a signal).
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    /// Panics with stdout/stderr unless the exit code is `code`.
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            code,
            "unexpected exit code\n--- stdout:\n{}\n--- stderr:\n{}",
            self.stdout_str(),
            self.stderr_str()
        );
        self
    }
}

/// Options for starting kubesim; [`Kubesim::builder`].
pub struct KubesimBuilder {
    pods: Vec<String>,
    tls: bool,
    token: Option<String>,
    envs: Vec<(String, String)>,
}

impl KubesimBuilder {
    /// Adds `--pod SPEC` (`NS/NAME` or `NS/NAME:c1,c2`).
    pub fn pod(mut self, spec: &str) -> Self {
        self.pods.push(spec.to_string());
        self
    }
    /// Serve plain HTTP instead of TLS (kubectl then sends no token).
    pub fn plain_http(mut self) -> Self {
        self.tls = false;
        self
    }
    /// Use this bearer token (default: a fixed test token); `None` disables auth.
    pub fn token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(str::to_string);
        self
    }
    /// Extra environment variable for the kubesim process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }
    /// Starts the binary and waits until it listens.
    pub fn start(self) -> Kubesim {
        kubectl_path();
        let dir = tempfile::Builder::new()
            .prefix("kubesim-test-")
            .tempdir()
            .expect("temp dir");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubesim"));
        cmd.args(["--listen", "127.0.0.1:0", "--log-format", "json"]);
        let tls = self.tls.then(|| make_tls(dir.path()));
        if let Some(tls) = &tls {
            cmd.arg("--tls-cert").arg(&tls.cert_path);
            cmd.arg("--tls-key").arg(&tls.key_path);
        }
        if let Some(token) = &self.token {
            cmd.args(["--token", token]);
        }
        for pod in &self.pods {
            cmd.args(["--pod", pod]);
        }
        for (k, _) in std::env::vars() {
            if k.starts_with("KUBESIM_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("RUST_LOG", "info");
        // Pod directories (and whatever tests write there) live inside this test's temp dir.
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).expect("tmp dir");
        cmd.env("TMPDIR", &tmp);
        cmd.envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kubesim binary");
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let (addr_tx, addr_rx) = mpsc::channel::<SocketAddr>();
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["fields"]["message"] == "listening"
                    && let Some(addr) = v["fields"]["addr"].as_str()
                    && let Ok(addr) = addr.parse()
                {
                    let _ = addr_tx.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "kubesim did not report its listening address; its log:\n{}",
                    lines.lock().unwrap().join("\n")
                );
            }
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server = format!("{scheme}://{addr}");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml(
                &server,
                tls.as_ref().map(|t| t.ca_pem.as_str()),
                self.token.as_deref(),
            ),
        )
        .expect("write kubeconfig");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).expect("home dir");
        Kubesim {
            child,
            addr,
            server,
            token: self.token,
            kubeconfig,
            home,
            lines,
            dir,
        }
    }
}

/// Renders a kubeconfig for `server` (optional CA PEM and token); context namespace `default`.
pub fn kubeconfig_yaml(server: &str, ca_pem: Option<&str>, token: Option<&str>) -> String {
    let mut out =
        String::from("apiVersion: v1\nkind: Config\nclusters:\n- name: kubesim\n  cluster:\n");
    out.push_str(&format!("    server: {server}\n"));
    if let Some(ca) = ca_pem {
        let b64 = base64::engine::general_purpose::STANDARD.encode(ca);
        out.push_str(&format!("    certificate-authority-data: {b64}\n"));
    }
    out.push_str("users:\n- name: kubesim\n  user:\n");
    match token {
        Some(token) => out.push_str(&format!("    token: {token}\n")),
        None => out.push_str("    {}\n"),
    }
    out.push_str(
        "contexts:\n- name: kubesim\n  context:\n    cluster: kubesim\n    user: kubesim\n    namespace: default\ncurrent-context: kubesim\n",
    );
    out
}

/// A running `kubesim` child process plus its kubeconfig; killed on drop.
pub struct Kubesim {
    child: Child,
    addr: SocketAddr,
    server: String,
    token: Option<String>,
    kubeconfig: PathBuf,
    home: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
}

/// The token [`Kubesim::start`] uses.
pub const TEST_TOKEN: &str = "kubesim-test-token-8f2c";

impl Kubesim {
    /// Starts kubesim with TLS, token [`TEST_TOKEN`] and the given `--pod` specs.
    pub fn start(pods: &[&str]) -> Self {
        pods.iter().fold(Self::builder(), |b, p| b.pod(p)).start()
    }

    /// A builder with TLS on and token [`TEST_TOKEN`].
    pub fn builder() -> KubesimBuilder {
        KubesimBuilder {
            pods: Vec::new(),
            tls: true,
            token: Some(TEST_TOKEN.to_string()),
            envs: Vec::new(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// `https://127.0.0.1:PORT` (or `http://` with [`KubesimBuilder::plain_http`]).
    pub fn server_url(&self) -> &str {
        &self.server
    }
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }
    /// A private temp dir (removed on drop) for test files such as 50 MiB payloads.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A kubectl command with the isolated kubeconfig, cache dir and HOME, plus `args`.
    pub fn kubectl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(kubectl_path());
        for (k, _) in std::env::vars() {
            if k.starts_with("KUBECTL_") || k == "KUBECONFIG" {
                cmd.env_remove(k);
            }
        }
        cmd.env("HOME", &self.home);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd.arg("--cache-dir").arg(self.dir.path().join("cache"));
        cmd.args(args);
        cmd
    }

    /// Runs kubectl with empty stdin; see [`run_command`].
    pub fn run(&self, args: &[&str]) -> Outcome {
        run_command(self.kubectl(args), None, KUBECTL_TIMEOUT)
    }

    /// Runs kubectl with `stdin` piped in; see [`run_command`].
    pub fn run_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Outcome {
        run_command(self.kubectl(args), Some(stdin), KUBECTL_TIMEOUT)
    }

    /// Every request kubesim has recorded so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| parse_request(line))
            .collect()
    }

    /// kubesim's raw log lines (JSON) so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Kubesim {
    /// SIGTERM (kubesim then kills its pods' processes), SIGKILL after 3 s.
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_request(line: &str) -> Option<Recorded> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let f = &v["fields"];
    if f["message"] != "request" {
        return None;
    }
    let headers: Vec<(String, String)> = serde_json::from_str(f["headers"].as_str()?).ok()?;
    Some(Recorded {
        method: f["method"].as_str()?.to_string(),
        path: f["path"].as_str()?.to_string(),
        query: f["query"]
            .as_str()
            .filter(|q| !q.is_empty())
            .map(str::to_string),
        headers,
    })
}

/// Runs `cmd` to completion, feeding `stdin` (or an empty stdin) and collecting output.
/// Kills it and panics with its output after `timeout`.
pub fn run_command(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Outcome {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn command");
    let input = stdin.map(<[u8]>::to_vec).unwrap_or_default();
    let mut child_stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        let _ = child_stdin.write_all(&input);
    });
    let out = reader_thread(child.stdout.take().expect("stdout"));
    let err = reader_thread(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out.join().unwrap_or_default();
            let stderr = err.join().unwrap_or_default();
            panic!(
                "{cmd:?} timed out after {timeout:?}\n--- stdout:\n{}\n--- stderr:\n{}",
                String::from_utf8_lossy(&stdout[..stdout.len().min(4096)]),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = writer.join();
    Outcome {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Reads a pipe to the end on a thread.
pub fn reader_thread<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Writes `len` bytes of deterministic pseudo-random data to `path`.
pub fn write_random_file(path: &Path, len: usize, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create file"));
    let mut x = seed | 1;
    let mut left = len;
    let mut chunk = vec![0u8; 1 << 16];
    while left > 0 {
        for b in chunk.iter_mut() {
            // xorshift64*: fast, non-compressible enough for transfer tests.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8;
        }
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n]).expect("write file");
        left -= n;
    }
    f.flush().expect("flush file");
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest as _;
    let mut f = std::fs::File::open(path).expect("open file");
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).expect("read file");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

/// Hex SHA-256 of bytes.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex(&sha2::Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
