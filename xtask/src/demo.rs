//! `cargo xtask demo`: the whole tunnel on this machine, ready for a real kubectl.
//!
//! Builds `tether-control-plane`, `tether-agent` and `kubesim`, then starts on loopback (free
//! ports, TLS everywhere, fresh random tokens, everything under `target/demo/`):
//!
//! 1. kubesim with pod `default/demo`, serving TLS with a certificate from a throwaway CA
//!    (made with the `openssl` command line tool) and requiring a bearer token;
//! 2. the control plane (`serve`), which makes its own self-signed certificate in its state dir;
//! 3. the agent, dialling the control plane (trusting the CA from the printed kubeconfig) and
//!    talking to kubesim with its token and CA.
//!
//! It writes the kubeconfig from `tether-control-plane kubeconfig`, waits until a request goes
//! through the tunnel, and prints the line to paste. Ctrl-C (or SIGTERM/SIGHUP) stops
//! everything: each child runs in its own process group, gets SIGTERM, then SIGKILL after 3 s.
//! If a child dies on its own, the demo stops the others and prints that child's log tail.

use std::io::Read as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::step::{cargo, output, run_status};

const CLUSTER: &str = "demo";
const USER: &str = "demo-user";
const POD: &str = "default/demo";
const GRACE: Duration = Duration::from_secs(3);

/// Runs the demo until a signal arrives.
pub(crate) fn run() -> Result<(), String> {
    // Signals first, so a Ctrl-C during start-up still cleans up.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .map_err(|e| format!("cannot handle signal {signal}: {e}"))?;
    }

    println!("building tether-control-plane, tether-agent and kubesim ...");
    let mut build = cargo();
    build.args([
        "build",
        "-p",
        "tether-control-plane",
        "-p",
        "tether-agent",
        "-p",
        "kubesim",
        "--bins",
    ]);
    run_status(&mut build)?;
    let target = crate::step::target_dir();
    let bin = |name: &str| target.join("debug").join(name);

    let dir = target.join("demo");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    }
    for sub in ["", "pods", "kube-cache"] {
        std::fs::create_dir_all(dir.join(sub))
            .map_err(|e| format!("cannot create {}: {e}", dir.join(sub).display()))?;
    }
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;

    let kube_tls = make_kubesim_certificate(&dir)?;
    let kube_token = random_token()?;
    let agent_token = random_token()?;
    let user_token = random_token()?;
    let kube_token_file = dir.join("kube-token");
    write(&kube_token_file, &kube_token)?;

    let mut children = Children::default();
    let result = start_and_wait(
        &mut children,
        &stop,
        &Setup {
            dir: &dir,
            control_plane: bin("tether-control-plane"),
            agent: bin("tether-agent"),
            kubesim: bin("kubesim"),
            kube_tls: &kube_tls,
            kube_token: &kube_token,
            kube_token_file: &kube_token_file,
            agent_token: &agent_token,
            user_token: &user_token,
        },
    );
    if stop.load(Ordering::Relaxed) {
        println!("\nstopping ...");
    }
    children.stop_all();
    if result.is_ok() {
        println!("stopped; logs are in {}", dir.display());
    }
    result
}

struct Setup<'a> {
    dir: &'a Path,
    control_plane: PathBuf,
    agent: PathBuf,
    kubesim: PathBuf,
    kube_tls: &'a KubeTls,
    kube_token: &'a str,
    kube_token_file: &'a Path,
    agent_token: &'a str,
    user_token: &'a str,
}

fn start_and_wait(children: &mut Children, stop: &AtomicBool, s: &Setup<'_>) -> Result<(), String> {
    let kubesim_addr = free_addr()?;
    // Secrets go in the environment (every flag has a variable), not on command lines `ps` shows.
    let mut cmd = command(&s.kubesim);
    cmd.arg("--listen").arg(kubesim_addr.to_string());
    cmd.args(["--pod", POD]).env("KUBESIM_TOKEN", s.kube_token);
    cmd.arg("--tls-cert").arg(&s.kube_tls.cert);
    cmd.arg("--tls-key").arg(&s.kube_tls.key);
    cmd.env("TMPDIR", s.dir.join("pods"));
    children.spawn("kubesim", cmd, &s.dir.join("kubesim.log"))?;
    children.wait_listening("kubesim", kubesim_addr, stop)?;

    let cp_addr = free_addr()?;
    let state_dir = s.dir.join("control-plane-state");
    let mut cmd = command(&s.control_plane);
    cmd.arg("serve").arg("--listen").arg(cp_addr.to_string());
    cmd.arg("--state-dir").arg(&state_dir);
    cmd.env("TETHER_AGENT_TOKEN", format!("{CLUSTER}={}", s.agent_token));
    cmd.env("TETHER_USER_TOKEN", format!("{USER}={}", s.user_token));
    children.spawn("control plane", cmd, &s.dir.join("control-plane.log"))?;
    children.wait_listening("control plane", cp_addr, stop)?;

    // The kubeconfig exactly as the control plane prints it.
    let mut cmd = command(&s.control_plane);
    cmd.arg("kubeconfig").arg("--state-dir").arg(&state_dir);
    cmd.args(["--cluster", CLUSTER, "--user", USER]);
    let kubeconfig = output(&mut cmd)?;
    let ca_pem = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority-data:"))
        .map(|v| v.trim().trim_matches('"'))
        .and_then(base64_decode)
        .ok_or("the control plane's kubeconfig has no certificate-authority-data")?;
    let kubeconfig_path = s.dir.join("kubeconfig");
    write(&kubeconfig_path, &kubeconfig)?;
    let cp_ca = s.dir.join("control-plane-ca.crt");
    std::fs::write(&cp_ca, &ca_pem).map_err(|e| format!("{}: {e}", cp_ca.display()))?;

    let mut cmd = command(&s.agent);
    cmd.arg("--control-plane").arg(format!("https://{cp_addr}"));
    cmd.env("TETHER_TOKEN", s.agent_token);
    cmd.arg("--ca-file").arg(&cp_ca);
    cmd.arg("--kube-url").arg(format!("https://{kubesim_addr}"));
    cmd.arg("--kube-token-file").arg(s.kube_token_file);
    cmd.arg("--kube-ca-file").arg(&s.kube_tls.ca);
    children.spawn("agent", cmd, &s.dir.join("agent.log"))?;

    let kubectl = find_kubectl();
    if let Some(kubectl) = &kubectl {
        wait_through_tunnel(
            children,
            stop,
            kubectl,
            &kubeconfig_path,
            &s.dir.join("kube-cache"),
        )?;
    }
    if stop.load(Ordering::Relaxed) {
        return Ok(());
    }

    println!();
    println!(
        "tether demo is up (Ctrl-C stops it); logs in {}:",
        s.dir.display()
    );
    println!("  kubesim        https://{kubesim_addr}   pod {POD}");
    println!("  control plane  https://{cp_addr}   cluster {CLUSTER}, user {USER}");
    println!(
        "  agent          {}",
        if kubectl.is_some() {
            "connected (a request went through the tunnel)"
        } else {
            "started (kubectl not found, connection not checked)"
        }
    );
    println!();
    println!("paste this in another terminal:");
    println!();
    println!(
        "    KUBECONFIG={} kubectl exec -it demo -- sh",
        kubeconfig_path.display()
    );
    println!();

    while !stop.load(Ordering::Relaxed) {
        children.check_alive()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Polls `kubectl get pod demo` through the control plane until it works (30 s).
fn wait_through_tunnel(
    children: &mut Children,
    stop: &AtomicBool,
    kubectl: &Path,
    kubeconfig: &Path,
    cache: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while !stop.load(Ordering::Relaxed) {
        children.check_alive()?;
        let out = Command::new(kubectl)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(cache)
            .args(["get", "pod", "demo", "-o", "name", "--request-timeout=5s"])
            .env_remove("KUBECONFIG")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", kubectl.display()))?;
        if out.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if Instant::now() > deadline {
            return Err(format!(
                "the agent did not become usable through the control plane within 30 s: {last}\n{}",
                children.tail("agent")
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = last;
    Ok(())
}

/// A command for one of the demo's binaries without inherited `TETHER_*`, `KUBESIM_*` or
/// in-cluster variables (the demo sets what it means).
fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if let Some(key) = key.to_str()
            && (key.starts_with("TETHER_")
                || key.starts_with("KUBESIM_")
                || key.starts_with("KUBERNETES_SERVICE_"))
        {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn find_kubectl() -> Option<PathBuf> {
    let fixed = PathBuf::from("/usr/bin/kubectl");
    if fixed.is_file() {
        return Some(fixed);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("kubectl"))
            .find(|p| p.is_file())
    })
}

/// The demo's children, each in its own process group with its output in a log file.
#[derive(Default)]
struct Children {
    list: Vec<(String, Child, PathBuf)>,
}

impl Children {
    fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> Result<(), String> {
        let file = std::fs::File::create(log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = file
            .try_clone()
            .map_err(|e| format!("cannot share {}: {e}", log.display()))?;
        // Own process group: a terminal's Ctrl-C reaches only the demo, which then stops each
        // group as a whole (a simulated pod's processes included).
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        self.list.push((name.to_string(), child, log.to_path_buf()));
        Ok(())
    }

    fn wait_listening(
        &mut self,
        name: &str,
        addr: SocketAddr,
        stop: &AtomicBool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !stop.load(Ordering::Relaxed) {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "{name} did not listen on {addr} within 20 s\n{}",
                    self.tail(name)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// An error with the log tail of the first child that has exited.
    fn check_alive(&mut self) -> Result<(), String> {
        let mut dead = None;
        for (name, child, _) in &mut self.list {
            if let Ok(Some(status)) = child.try_wait() {
                dead = Some((name.clone(), status));
                break;
            }
        }
        match dead {
            Some((name, status)) => Err(format!("{name} exited ({status})\n{}", self.tail(&name))),
            None => Ok(()),
        }
    }

    /// The last 20 lines of `name`'s log.
    fn tail(&self, name: &str) -> String {
        let Some((_, _, log)) = self.list.iter().find(|(n, _, _)| n == name) else {
            return String::new();
        };
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(log) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "last lines of {}:\n{}",
            log.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    /// SIGTERM to every group (newest first), SIGKILL to what is left after the grace period.
    fn stop_all(&mut self) {
        for (_, child, _) in self.list.iter_mut().rev() {
            if matches!(child.try_wait(), Ok(None)) {
                signal_group(child.id(), "TERM");
            }
        }
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline
            && self
                .list
                .iter_mut()
                .any(|(_, c, _)| matches!(c.try_wait(), Ok(None)))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        for (name, child, _) in &mut self.list {
            // Whatever is still in the group goes now, even if the leader has exited.
            signal_group(child.id(), "KILL");
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!("{name} did not stop within {GRACE:?}; killed");
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        self.list.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// `kill -s SIGNAL -- -PGID` (std cannot send signals other than SIGKILL to a child).
fn signal_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// kubesim's TLS files: a throwaway CA and a server certificate for 127.0.0.1.
struct KubeTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// Makes [`KubeTls`] with the `openssl` tool and our own minimal configs (nothing read from the
/// system's openssl.cnf).
fn make_kubesim_certificate(dir: &Path) -> Result<KubeTls, String> {
    let tls = dir.join("kubesim-tls");
    std::fs::create_dir_all(&tls).map_err(|e| format!("{}: {e}", tls.display()))?;
    write(
        &tls.join("ca.cnf"),
        "[req]\ndistinguished_name = dn\nx509_extensions = v3_ca\nprompt = no\n[dn]\nCN = tether demo kubesim CA\n[v3_ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n",
    )?;
    write(
        &tls.join("server.cnf"),
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = kubesim\n[v3_server]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1,DNS:localhost\nauthorityKeyIdentifier = keyid\n",
    )?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let openssl = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&tls)
            .output()
            .map_err(|e| {
                format!("the demo needs the openssl tool for kubesim's certificate: {e}")
            })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {} failed: {}",
                args.first().unwrap_or(&""),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    let mut args = vec!["req", "-x509", "-new", "-config", "ca.cnf", "-days", "7"];
    args.extend(ec);
    args.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(&args)?;
    let mut args = vec!["req", "-new", "-config", "server.cnf"];
    args.extend(ec);
    args.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(&args)?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "7",
        "-extfile",
        "server.cnf",
        "-extensions",
        "v3_server",
        "-out",
        "server.crt",
    ])?;
    Ok(KubeTls {
        ca: tls.join("ca.crt"),
        cert: tls.join("server.crt"),
        key: tls.join("server.key"),
    })
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// A free loopback port.
fn free_addr() -> Result<SocketAddr, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// 32 hex characters from /dev/urandom.
fn random_token() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Standard base64 (padding optional) to bytes; None on any invalid character.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::base64_decode;

    #[test]
    fn base64_decodes_standard_padding() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8h").unwrap(), b"hello!");
        assert_eq!(base64_decode("aGk").unwrap(), b"hi");
        assert_eq!(base64_decode("a$b"), None);
    }
}
