//! The whole chain on loopback: kubesim (TLS + token), the control plane (TLS, agent and user
//! tokens), the agent (dialling the control plane, talking to kubesim), and a kubeconfig from
//! `tether-control-plane kubeconfig` for real kubectl.
//!
//! Every process logs to a file in the cluster's temp dir; when a test panics while a
//! [`Cluster`] is alive, the last lines of every log are printed. Everything is stopped on drop
//! (SIGTERM, then SIGKILL). `TETHER_E2E_KEEP=1` keeps the temp dir.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::process::Signal;

use crate::bins::{Bins, bins};
use crate::https;
use crate::kubectl::{
    KUBECTL_TIMEOUT, Outcome, Running, kubeconfig_yaml, kubectl_command, kubectl_path,
    parse_kubeconfig, run_command,
};
use crate::proc::Proc;
use crate::tls::{TestTls, make_tls};

/// The cluster name the agent token is bound to.
pub const CLUSTER: &str = "c1";
/// The kubectl user.
pub const USER: &str = "alice";
/// The pod every cluster has (`--pod default/demo`).
pub const POD: &str = "demo";
/// How long a process may take to start listening.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent may take to be usable through the control plane.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Log lines printed per process when a test fails.
const TAIL_LINES: usize = 40;

/// Options for [`Cluster::start`].
#[derive(Clone, Debug)]
pub struct ClusterBuilder {
    pods: Vec<String>,
    control_plane: bool,
    agent: bool,
    extra: Extra,
}

/// Extra arguments and environment for the control plane and the agent (e.g. `--wire-mode`).
#[derive(Clone, Debug, Default)]
struct Extra {
    kubesim_args: Vec<String>,
    control_plane_args: Vec<String>,
    agent_args: Vec<String>,
    control_plane_env: Vec<(String, String)>,
    agent_env: Vec<(String, String)>,
}

impl ClusterBuilder {
    /// Appends arguments to kubesim (e.g. `--no-websocket`).
    pub fn kubesim_args(mut self, args: &[&str]) -> Self {
        self.extra
            .kubesim_args
            .extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Appends arguments to `tether-control-plane serve` (also on restarts).
    pub fn control_plane_args(mut self, args: &[&str]) -> Self {
        self.extra
            .control_plane_args
            .extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Appends arguments to the agent started by [`Cluster::start_agent`].
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.extra
            .agent_args
            .extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Sets an environment variable for the control plane (after the clean-up of
    /// [`clean_command`], so `TETHER_*` variables pass).
    pub fn control_plane_env(mut self, key: &str, value: &str) -> Self {
        self.extra
            .control_plane_env
            .push((key.to_string(), value.to_string()));
        self
    }

    /// Sets an environment variable for the agent (see [`Self::control_plane_env`]).
    pub fn agent_env(mut self, key: &str, value: &str) -> Self {
        self.extra
            .agent_env
            .push((key.to_string(), value.to_string()));
        self
    }

    /// Adds a `--pod NS/NAME` to kubesim (`default/demo` is always there).
    pub fn pod(mut self, spec: &str) -> Self {
        self.pods.push(spec.to_string());
        self
    }

    /// Starts no agent (the control plane has a cluster whose agent is down).
    pub fn without_agent(mut self) -> Self {
        self.agent = false;
        self
    }

    /// Starts only kubesim (tests that play the control plane themselves); no agent either.
    pub fn without_control_plane(mut self) -> Self {
        self.control_plane = false;
        self.agent = false;
        self
    }

    /// Starts the processes; with an agent, waits until requests pass through the tunnel.
    pub fn start(self) -> Cluster {
        Cluster::start_with(self)
    }
}

/// kubesim, the control plane and the agent, with kubeconfigs for kubectl.
pub struct Cluster {
    bins: &'static Bins,
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    home: PathBuf,
    /// kubesim.
    kubesim: Option<Proc>,
    kubesim_addr: SocketAddr,
    kubesim_tls: TestTls,
    kube_token: String,
    kube_token_file: PathBuf,
    direct_kubeconfig: PathBuf,
    /// The control plane.
    control_plane: Option<Proc>,
    cp_addr: Option<SocketAddr>,
    state_dir: PathBuf,
    cp_ca_pem: String,
    cp_ca_file: PathBuf,
    server_url: String,
    kubeconfig: PathBuf,
    agent_token: String,
    user_token: String,
    /// The agent (None when down).
    agent: Option<Proc>,
    agent_starts: u32,
    /// Agents that were stopped, kept for their logs.
    old_agents: Vec<PathBuf>,
    /// Notes printed with the logs on failure.
    notes: Vec<String>,
    /// Extra arguments and environment from the builder.
    extra: Extra,
}

impl Cluster {
    /// kubesim with `default/demo`, the control plane and a connected agent.
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// Options.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            pods: Vec::new(),
            control_plane: true,
            agent: true,
            extra: Extra::default(),
        }
    }

    fn start_with(opts: ClusterBuilder) -> Self {
        kubectl_path();
        let bins = bins();
        let keep = std::env::var("TETHER_E2E_KEEP").is_ok_and(|v| !v.is_empty() && v != "0");
        let dir = tempfile::Builder::new()
            .prefix("tether-e2e-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        let dir = if keep {
            eprintln!("tether-e2e: keeping {}", root.display());
            let _ = dir.keep();
            None
        } else {
            Some(dir)
        };
        let home = root.join("home");
        std::fs::create_dir_all(&home).expect("home dir");
        let pod_tmp = root.join("pods");
        std::fs::create_dir_all(&pod_tmp).expect("pods dir");

        // kubesim: TLS with its own CA, a bearer token.
        let kubesim_tls = make_tls(&root, "kubesim");
        let kube_token = random_token("kube");
        let kube_token_file = root.join("kube-token");
        std::fs::write(&kube_token_file, &kube_token).expect("write kube token");
        let mut pods = vec![format!("default/{POD}")];
        pods.extend(opts.pods.iter().cloned());
        let (kubesim, kubesim_addr) =
            spawn_listening("kubesim", &root.join("kubesim.log"), |addr| {
                let mut cmd = clean_command(&bins.kubesim);
                cmd.arg("--listen").arg(addr.to_string());
                cmd.args(["--token", &kube_token]);
                cmd.arg("--tls-cert").arg(&kubesim_tls.cert_path);
                cmd.arg("--tls-key").arg(&kubesim_tls.key_path);
                for pod in &pods {
                    cmd.args(["--pod", pod]);
                }
                cmd.args(&opts.extra.kubesim_args);
                // Pod working directories live inside this cluster's temp dir.
                cmd.env("TMPDIR", &pod_tmp);
                cmd
            });
        let direct_kubeconfig = root.join("kubesim.kubeconfig");
        std::fs::write(
            &direct_kubeconfig,
            kubeconfig_yaml(
                "kubesim",
                &format!("https://{kubesim_addr}"),
                &kubesim_tls.ca_pem,
                &kube_token,
            ),
        )
        .expect("write kubesim kubeconfig");

        let mut cluster = Self {
            bins,
            dir,
            root: root.clone(),
            home,
            kubesim: Some(kubesim),
            kubesim_addr,
            kubesim_tls,
            kube_token,
            kube_token_file,
            direct_kubeconfig,
            control_plane: None,
            cp_addr: None,
            state_dir: root.join("cp-state"),
            cp_ca_pem: String::new(),
            cp_ca_file: root.join("control-plane-ca.crt"),
            server_url: String::new(),
            kubeconfig: root.join("tether.kubeconfig"),
            agent_token: random_token("agent"),
            user_token: random_token("user"),
            agent: None,
            agent_starts: 0,
            old_agents: Vec::new(),
            notes: Vec::new(),
            extra: opts.extra.clone(),
        };
        if opts.control_plane {
            cluster.start_control_plane();
        }
        if opts.agent {
            cluster.start_agent();
            cluster.wait_ready(READY_TIMEOUT);
        }
        cluster
    }

    fn start_control_plane(&mut self) {
        std::fs::create_dir_all(&self.state_dir).expect("state dir");
        let log = self.root.join("control-plane.log");
        let (cp, addr) = spawn_listening("tether-control-plane", &log, |addr| {
            self.control_plane_command(addr)
        });
        self.control_plane = Some(cp);
        self.cp_addr = Some(addr);
        self.write_kubeconfig(addr);
    }

    fn control_plane_command(&self, addr: SocketAddr) -> Command {
        let mut cmd = clean_command(&self.bins.control_plane);
        cmd.arg("serve");
        cmd.arg("--listen").arg(addr.to_string());
        cmd.arg("--state-dir").arg(&self.state_dir);
        cmd.arg("--agent-token")
            .arg(format!("{CLUSTER}={}", self.agent_token));
        cmd.arg("--user-token")
            .arg(format!("{USER}={}", self.user_token));
        cmd.args(&self.extra.control_plane_args);
        cmd.envs(self.extra.control_plane_env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// SIGKILLs the control plane and starts it again on the same address and state dir; the
    /// kubeconfig it prints then must still be the one kubectl and the agent have.
    pub fn restart_control_plane(&mut self) {
        let addr = self.cp_addr.expect("a control plane");
        if let Some(mut cp) = self.control_plane.take() {
            cp.kill_hard();
        }
        let log = self.root.join("control-plane.log");
        let _ = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, b"---- tether-e2e: restarted ----\n")
            });
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            let mut cp = Proc::spawn(
                "tether-control-plane",
                self.control_plane_command(addr),
                &log,
            );
            let up = loop {
                if is_listening(addr) {
                    break true;
                }
                if cp.try_exit().is_some() || Instant::now() > deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if up {
                self.control_plane = Some(cp);
                break;
            }
            if Instant::now() > deadline {
                self.control_plane = Some(cp);
                self.fail(&format!(
                    "the restarted control plane did not listen on {addr}"
                ));
            }
            // The old socket may linger a moment; try again.
            std::thread::sleep(Duration::from_millis(100));
        }
        let (old_ca, old_server) = (self.cp_ca_pem.clone(), self.server_url.clone());
        self.write_kubeconfig(addr);
        if self.cp_ca_pem != old_ca || self.server_url != old_server {
            self.fail("after a restart the control plane has another certificate or URL: the state dir must keep them");
        }
    }

    /// Runs `tether-control-plane kubeconfig` and keeps what it printed (the control plane's CA
    /// goes to a file for the agent's `--ca-file`).
    fn write_kubeconfig(&mut self, addr: SocketAddr) {
        let mut cmd = clean_command(&self.bins.control_plane);
        cmd.arg("kubeconfig");
        cmd.arg("--state-dir").arg(&self.state_dir);
        cmd.args(["--cluster", CLUSTER, "--user", USER]);
        let out = run_command(cmd, None, Duration::from_secs(15));
        if out.code() != 0 {
            self.fail(&format!(
                "`tether-control-plane kubeconfig --state-dir DIR --cluster {CLUSTER} --user {USER}` exited {}: {}",
                out.code(),
                out.stderr_str().trim()
            ));
        }
        let text = out.stdout_str();
        let fields = parse_kubeconfig(&text);
        let Some(server) = fields.server.clone() else {
            self.fail(&format!(
                "the kubeconfig printed by the control plane has no server:\n{text}"
            ));
        };
        if !server.contains(&addr.port().to_string()) {
            self.fail(&format!(
                "the kubeconfig's server {server} is not the control plane's address {addr}"
            ));
        }
        let Some(ca_pem) = fields.ca_pem.clone() else {
            self.fail(&format!(
                "the kubeconfig printed by the control plane has no certificate-authority-data:\n{text}"
            ));
        };
        std::fs::write(&self.cp_ca_file, &ca_pem).expect("write control-plane CA");
        self.cp_ca_pem = ca_pem;
        self.server_url = server.trim_end_matches('/').to_string();
        // "`kubeconfig` prints a kubeconfig that works as is" (DESIGN.md): it carries the user's
        // token, and the tests use it unchanged.
        if fields.token.as_deref() != Some(self.user_token.as_str()) {
            self.fail(&format!(
                "the kubeconfig printed for --user {USER} does not carry the token given to serve --user-token {USER}=...:\n{text}"
            ));
        }
        let kubeconfig = text;
        std::fs::write(&self.kubeconfig, kubeconfig).expect("write kubeconfig");
    }

    /// (Re)starts the agent against the control plane (SIGKILLs a running one first).
    pub fn start_agent(&mut self) {
        let addr = self.cp_addr.expect("a control plane");
        let url = format!("https://{addr}");
        let ca = self.cp_ca_file.clone();
        let token = self.agent_token.clone();
        let extra = self.extra.agent_args.clone();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        self.spawn_agent(&url, &token, Some(&ca), &extra);
    }

    /// Starts an agent dialling `url` with `token` (and `--ca-file ca` when given), pointed at
    /// kubesim; `extra` arguments are appended. Replaces (SIGKILLs) a running agent.
    pub fn spawn_agent(&mut self, url: &str, token: &str, ca: Option<&Path>, extra: &[&str]) {
        if let Some(mut old) = self.agent.take() {
            old.kill_hard();
            self.old_agents.push(old.log_path().to_path_buf());
        }
        self.agent_starts += 1;
        let log = self.root.join(format!("agent-{}.log", self.agent_starts));
        let cmd = self.agent_command(url, token, ca, extra);
        self.agent = Some(Proc::spawn("tether-agent", cmd, &log));
    }

    /// A further agent of this cluster (same token, `extra` appended), beside the one
    /// [`Cluster::agent`] holds: for replicas and rolling updates. Its log is `NAME.log`.
    pub fn spawn_extra_agent(&self, name: &str, extra: &[&str]) -> Proc {
        let addr = self.cp_addr.expect("a control plane");
        let cmd = self.agent_command(
            &format!("https://{addr}"),
            &self.agent_token,
            Some(&self.cp_ca_file),
            extra,
        );
        Proc::spawn(name, cmd, &self.root.join(format!("{name}.log")))
    }

    /// The command line of an agent dialling `url`: `--token token` unless `extra` has
    /// `--token-file`, `--ca-file ca` when given, kubesim as its API, then `extra`.
    fn agent_command(&self, url: &str, token: &str, ca: Option<&Path>, extra: &[&str]) -> Command {
        let mut cmd = clean_command(&self.bins.agent);
        cmd.args(["--control-plane", url]);
        if !extra.contains(&"--token-file") {
            cmd.args(["--token", token]);
        }
        if let Some(ca) = ca {
            cmd.arg("--ca-file").arg(ca);
        }
        cmd.arg("--kube-url")
            .arg(format!("https://{}", self.kubesim_addr));
        cmd.arg("--kube-token-file").arg(&self.kube_token_file);
        cmd.arg("--kube-ca-file").arg(&self.kubesim_tls.ca_path);
        cmd.args(extra);
        cmd.envs(self.extra.agent_env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// SIGKILLs the agent (its log is kept for failure output).
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill_hard();
            self.old_agents.push(agent.log_path().to_path_buf());
        }
    }

    /// Waits until `GET pod` passes through control plane, tunnel and agent (HTTP 200).
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.api_get(&format!("/api/v1/namespaces/default/pods/{POD}")) {
                Ok(r) if r.status == 200 => return,
                Ok(r) => format!("HTTP {} {}", r.status, r.text().trim()),
                Err(e) => e,
            };
            if let Some(agent) = self.agent.as_mut()
                && let Some(status) = agent.try_exit()
            {
                self.fail(&format!(
                    "the agent exited ({status}) before it was connected"
                ));
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "the agent was not usable through the control plane within {timeout:?}; last answer: {last}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The control plane's address (panics without one).
    pub fn control_plane_addr(&self) -> SocketAddr {
        self.cp_addr.expect("a control plane")
    }

    /// A raw `GET` of `path` on the control plane itself (not below `/clusters/…`) with `token`.
    pub fn control_plane_get(&self, path: &str, token: &str) -> Result<https::Response, String> {
        let addr = self.cp_addr.expect("a control plane");
        https::get(
            &format!("https://{addr}{path}"),
            &self.cp_ca_pem,
            token,
            Duration::from_secs(10),
        )
    }

    /// A raw `GET` through the control plane (`path` is appended to the kubeconfig's server).
    pub fn api_get(&self, path: &str) -> Result<https::Response, String> {
        https::get(
            &format!("{}{path}", self.server_url),
            &self.cp_ca_pem,
            &self.user_token,
            Duration::from_secs(10),
        )
    }

    /// A raw `GET` straight to kubesim.
    pub fn kubesim_get(&self, path: &str) -> Result<https::Response, String> {
        https::get(
            &format!("https://{}{path}", self.kubesim_addr),
            &self.kubesim_tls.ca_pem,
            &self.kube_token,
            Duration::from_secs(10),
        )
    }

    /// kubectl through the tunnel (the control plane's kubeconfig).
    pub fn kubectl(&self, args: &[&str]) -> Command {
        kubectl_command(&self.kubeconfig, &self.home, args)
    }

    /// kubectl straight to kubesim (for comparisons).
    pub fn kubectl_direct(&self, args: &[&str]) -> Command {
        kubectl_command(&self.direct_kubeconfig, &self.home.join("direct"), args)
    }

    /// Runs kubectl through the tunnel with empty stdin.
    pub fn run(&self, args: &[&str]) -> Outcome {
        run_command(self.kubectl(args), None, KUBECTL_TIMEOUT)
    }

    /// Runs kubectl through the tunnel with `stdin`.
    pub fn run_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Outcome {
        run_command(self.kubectl(args), Some(stdin), KUBECTL_TIMEOUT)
    }

    /// Runs kubectl straight to kubesim.
    pub fn run_direct(&self, args: &[&str]) -> Outcome {
        run_command(self.kubectl_direct(args), None, KUBECTL_TIMEOUT)
    }

    /// Starts a long-running kubectl through the tunnel.
    pub fn spawn(&self, args: &[&str]) -> Running {
        Running::spawn(self.kubectl(args))
    }

    /// The cluster's private temp dir (payload files go here).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The kubeconfig for kubectl through the tunnel.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// kubectl's `--cache-dir` and HOME for the tunnel kubeconfig.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// `https://127.0.0.1:PORT` of kubesim.
    pub fn kubesim_url(&self) -> String {
        format!("https://{}", self.kubesim_addr)
    }

    /// kubesim's bearer token.
    pub fn kube_token(&self) -> &str {
        &self.kube_token
    }

    /// kubesim's CA certificate (PEM).
    pub fn kubesim_ca_pem(&self) -> &str {
        &self.kubesim_tls.ca_pem
    }

    /// The control plane's CA certificate (PEM), as in its kubeconfig.
    pub fn control_plane_ca_pem(&self) -> &str {
        &self.cp_ca_pem
    }

    /// The kubectl user's bearer token for the control plane.
    pub fn user_token(&self) -> &str {
        &self.user_token
    }

    /// The kubeconfig's server URL (`https://127.0.0.1:PORT/clusters/c1`).
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The path part of the server URL (`/clusters/c1`): `kubectl get --raw PATH` ignores the
    /// server's path, so raw paths need it in front.
    pub fn server_path(&self) -> &str {
        let rest = self
            .server_url
            .split_once("://")
            .map_or(self.server_url.as_str(), |(_, r)| r);
        rest.find('/').map_or("", |i| &rest[i..])
    }

    /// kubesim's log so far (every request is logged with its headers).
    pub fn kubesim_log(&self) -> String {
        self.kubesim.as_ref().map(Proc::log).unwrap_or_default()
    }

    /// The agent token bound to [`CLUSTER`].
    pub fn agent_token(&self) -> &str {
        &self.agent_token
    }

    /// The running agent.
    pub fn agent(&mut self) -> Option<&mut Proc> {
        self.agent.as_mut()
    }

    /// The control plane.
    pub fn control_plane(&mut self) -> Option<&mut Proc> {
        self.control_plane.as_mut()
    }

    /// Records a note printed with the logs if the test fails.
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Prints the last lines of every process log to stderr.
    pub fn print_logs(&self) {
        eprintln!("==== tether-e2e: logs in {}", self.root.display());
        for note in &self.notes {
            eprintln!("note: {note}");
        }
        for path in &self.old_agents {
            print_tail("tether-agent (stopped)", path);
        }
        for proc in [&self.agent, &self.control_plane, &self.kubesim]
            .into_iter()
            .flatten()
        {
            eprintln!(
                "---- {} (pid {}), last {TAIL_LINES} lines of {}:\n{}",
                proc.name(),
                proc.pid(),
                proc.log_path().display(),
                proc.log_tail(TAIL_LINES)
            );
        }
    }

    /// Panics with `line` (the logs are printed by drop).
    #[track_caller]
    fn fail(&self, line: &str) -> ! {
        panic!("tether-e2e: {line}");
    }

    /// Sends `signal` to the agent.
    pub fn signal_agent(&mut self, signal: Signal) {
        if let Some(agent) = &mut self.agent {
            agent.signal(signal);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        for proc in [
            self.agent.as_mut(),
            self.control_plane.as_mut(),
            self.kubesim.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            proc.stop();
        }
        drop(self.dir.take());
    }
}

fn print_tail(name: &str, path: &Path) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    eprintln!(
        "---- {name}, last {TAIL_LINES} lines of {}:\n{}",
        path.display(),
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    );
}

/// A command for one of the binaries with a clean environment for it: no inherited `TETHER_*`
/// (but `TETHER_LOG`), `KUBESIM_*` or in-cluster variables; `RUST_LOG=info` unless set.
pub fn clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && ((k.starts_with("TETHER_") && k != "TETHER_LOG")
                || k.starts_with("KUBESIM_")
                || k.starts_with("KUBERNETES_SERVICE_"))
        {
            cmd.env_remove(k);
        }
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    // Log files, not terminals: no colour codes.
    cmd.env("NO_COLOR", "1");
    cmd
}

/// A free loopback port (bound and released; [`spawn_listening`] retries on a lost race).
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
}

/// Spawns `make(addr)` on a free port and waits until it accepts TCP connections; retries on
/// another port when the process exits saying the address is in use; panics with its log tail
/// when it exits otherwise or never listens.
pub fn spawn_listening(
    name: &str,
    log: &Path,
    make: impl Fn(SocketAddr) -> Command,
) -> (Proc, SocketAddr) {
    for _attempt in 0..3 {
        let addr = free_addr();
        let mut proc = Proc::spawn(name, make(addr), log);
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            if is_listening(addr) {
                return (proc, addr);
            }
            if let Some(status) = proc.try_exit() {
                let tail = proc.log_tail(20);
                if tail.to_ascii_lowercase().contains("in use") {
                    break;
                }
                panic!(
                    "tether-e2e: {name} exited ({status}) before listening on {addr}; last log lines ({}):\n{tail}",
                    log.display()
                );
            }
            if Instant::now() > deadline {
                let tail = proc.log_tail(20);
                panic!(
                    "tether-e2e: {name} did not listen on {addr} within {LISTEN_TIMEOUT:?}; last log lines ({}):\n{tail}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("tether-e2e: {name}: no free port after 3 attempts");
}

/// Whether something listens on `addr`. On loopback a connect to a port nobody listens on can,
/// rarely, pick that same port as its source and connect to itself (TCP simultaneous open):
/// that is not a listener, and would let a test go on before its process is up.
fn is_listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200))
        .is_ok_and(|probe| probe.local_addr().ok() != probe.peer_addr().ok())
}

/// A random token with a readable prefix.
pub fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 16];
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ u64::from(std::process::id()).rotate_left(32)
        ^ (prefix.len() as u64).wrapping_mul(0x9E37_79B9);
    let counter = TOKENS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    crate::data::Prng::new(seed ^ counter.wrapping_mul(0xA24B_AED4_963E_E407)).fill(&mut bytes);
    format!("{prefix}-{}", crate::data::hex(&bytes))
}

static TOKENS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
