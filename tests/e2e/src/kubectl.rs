//! Running the real kubectl v1.32 and reading its results; kubeconfig files.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
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
    assert!(
        path.exists(),
        "{KUBECTL} is missing: the end-to-end tests need the real kubectl v1.32 installed there"
    );
    path
}

/// A kubectl command with `kubeconfig`, an isolated cache dir and HOME under `home`, no inherited
/// `KUBECONFIG`/`KUBECTL_*`, and `args`.
pub fn kubectl_command(kubeconfig: &Path, home: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(kubectl_path());
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && (k.starts_with("KUBECTL_") || k == "KUBECONFIG")
        {
            cmd.env_remove(k);
        }
    }
    cmd.env("HOME", home);
    cmd.arg("--kubeconfig").arg(kubeconfig);
    cmd.arg("--cache-dir").arg(home.join("kube-cache"));
    cmd.args(args);
    cmd
}

/// The result of one kubectl run.
#[derive(Debug)]
pub struct Outcome {
    /// How it exited.
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: Vec<u8>,
    /// Everything on stderr.
    pub stderr: Vec<u8>,
    /// Wall time.
    pub elapsed: Duration,
}

impl Outcome {
    /// The exit code (-1 when killed by a signal).
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
    /// stdout as text (lossy).
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// stderr as text (lossy).
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
            clip(&self.stdout_str()),
            clip(&self.stderr_str())
        );
        self
    }
}

/// At most the first 4 KiB of `s`, for messages.
pub fn clip(s: &str) -> &str {
    let mut end = s.len().min(4096);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Runs `cmd` to completion, feeding `stdin` (or an empty stdin) and collecting output.
/// Kills it and panics with its output after `timeout`.
pub fn run_command(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Outcome {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn command");
    let input = stdin.map(<[u8]>::to_vec).unwrap_or_default();
    let mut child_stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        let _ = child_stdin.write_all(&input);
    });
    let out = reader_thread(child.stdout.take().expect("stdout"));
    let err = reader_thread(child.stderr.take().expect("stderr"));
    let deadline = started + timeout;
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
                clip(&String::from_utf8_lossy(&stdout)),
                clip(&String::from_utf8_lossy(&stderr))
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = started.elapsed();
    let _ = writer.join();
    Outcome {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed,
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

/// Collects a pipe into a shared buffer on a thread.
pub fn collect<R: Read + Send + 'static>(mut r: R) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 16 * 1024];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

/// A long-running kubectl with piped stdio whose output is collected in the background; killed
/// on drop.
pub struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    started: Instant,
}

impl Running {
    /// Spawns `cmd` with piped stdio.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        let stdin = child.stdin.take();
        let stdout = collect(child.stdout.take().expect("stdout"));
        let stderr = collect(child.stderr.take().expect("stderr"));
        Self {
            child,
            stdin,
            stdout,
            stderr,
            started: Instant::now(),
        }
    }

    /// Writes `text` to its stdin.
    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin.write_all(text.as_bytes()).expect("write to kubectl");
        stdin.flush().expect("flush kubectl stdin");
    }

    /// Closes its stdin.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits until stdout contains `needle`.
    #[track_caller]
    pub fn wait_stdout(&mut self, needle: &str, timeout: Duration) {
        self.wait_for(needle, timeout, true);
    }

    /// Waits until stderr contains `needle`.
    #[track_caller]
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) {
        self.wait_for(needle, timeout, false);
    }

    #[track_caller]
    fn wait_for(&mut self, needle: &str, timeout: Duration, stdout: bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = if stdout { self.stdout() } else { self.stderr() };
            if text.contains(needle) {
                return;
            }
            let exited = self.child.try_wait().ok().flatten();
            assert!(
                Instant::now() < deadline && exited.is_none(),
                "waiting for {needle:?} on {}: {}\n--- stdout:\n{}\n--- stderr:\n{}",
                if stdout { "stdout" } else { "stderr" },
                match exited {
                    Some(status) => format!("kubectl exited ({status})"),
                    None => format!("timed out after {timeout:?}"),
                },
                clip(&self.stdout()),
                clip(&self.stderr())
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the exit; returns the exit code (-1 for a signal) and the time since spawn.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> (i32, Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait kubectl") {
                return (status.code().unwrap_or(-1), self.started.elapsed());
            }
            assert!(
                Instant::now() < deadline,
                "kubectl did not exit within {timeout:?}\n--- stdout:\n{}\n--- stderr:\n{}",
                clip(&self.stdout()),
                clip(&self.stderr())
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Renders a kubeconfig for `server` with a CA (PEM) and a bearer token; namespace `default`.
pub fn kubeconfig_yaml(name: &str, server: &str, ca_pem: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {name}
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {name}
  user:
    token: {token}
contexts:
- name: {name}
  context:
    cluster: {name}
    user: {name}
    namespace: default
current-context: {name}
"
    )
}

/// The fields of a kubeconfig the tests need (first cluster and user; plain line scan, enough for
/// the flat YAML that kubeconfig generators print).
#[derive(Clone, Debug, Default)]
pub struct KubeconfigFields {
    /// `server:`.
    pub server: Option<String>,
    /// `certificate-authority-data:`, decoded.
    pub ca_pem: Option<String>,
    /// `token:`.
    pub token: Option<String>,
    /// `insecure-skip-tls-verify: true` is present.
    pub insecure: bool,
}

/// Scans a kubeconfig for [`KubeconfigFields`].
pub fn parse_kubeconfig(text: &str) -> KubeconfigFields {
    let mut out = KubeconfigFields::default();
    let value = |line: &str, key: &str| -> Option<String> {
        let rest = line.trim().trim_start_matches("- ").strip_prefix(key)?;
        let v = rest.trim().trim_matches('"').trim_matches('\'');
        (!v.is_empty()).then(|| v.to_string())
    };
    for line in text.lines() {
        if out.server.is_none() {
            out.server = value(line, "server:");
        }
        if out.ca_pem.is_none()
            && let Some(b64) = value(line, "certificate-authority-data:")
        {
            out.ca_pem = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .ok()
                .map(|b| String::from_utf8_lossy(&b).into_owned());
        }
        if out.token.is_none() {
            out.token = value(line, "token:");
        }
        if value(line, "insecure-skip-tls-verify:").as_deref() == Some("true") {
            out.insecure = true;
        }
    }
    out
}
