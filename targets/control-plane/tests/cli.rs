//! The command-line contract: `serve` starts and records its endpoint, `kubeconfig` prints a
//! kubeconfig that parses and points at it, bad configuration is one line and a non-zero exit.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tether-control-plane");

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("TETHER_USER_TOKEN")
        .env_remove("TETHER_AGENT_TOKEN")
        .output()
        .unwrap()
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path, extra: &[&str]) -> Serve {
    let child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir)
        .args([
            "--agent-token",
            "c1=agent-token",
            "--user-token",
            "alice=alice-token",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let serve = Serve(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("endpoint").exists() {
        assert!(
            Instant::now() < deadline,
            "serve did not record its endpoint"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    serve
}

#[test]
fn kubeconfig_parses_and_points_at_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let _serve = serve(dir.path(), &[]);
    let endpoint = std::fs::read_to_string(dir.path().join("endpoint")).unwrap();
    let endpoint = endpoint.trim();
    assert!(endpoint.starts_with("https://127.0.0.1:"), "{endpoint}");

    let out = cli(&[
        "kubeconfig",
        "--state-dir",
        dir.path().to_str().unwrap(),
        "--cluster",
        "c1",
        "--user",
        "alice",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let cluster = &config["clusters"][0];
    assert_eq!(cluster["name"], "c1");
    assert_eq!(
        cluster["cluster"]["server"].as_str().unwrap(),
        format!("{endpoint}/clusters/c1")
    );
    let ca = cluster["cluster"]["certificate-authority-data"]
        .as_str()
        .unwrap();
    assert!(!ca.is_empty());
    assert_eq!(config["users"][0]["name"], "alice");
    assert_eq!(config["users"][0]["user"]["token"], "alice-token");
    assert_eq!(config["current-context"], "c1");
    assert_eq!(config["contexts"][0]["context"]["user"], "alice");

    // --server and an explicit token win.
    let out = cli(&[
        "kubeconfig",
        "--state-dir",
        dir.path().to_str().unwrap(),
        "--cluster",
        "c1",
        "--user",
        "bob",
        "--server",
        "https://cp.example:8443",
        "--user-token",
        "bob=bob-token",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(
        config["clusters"][0]["cluster"]["server"],
        "https://cp.example:8443/clusters/c1"
    );
    assert_eq!(config["users"][0]["user"]["token"], "bob-token");
}

fn one_line_failure(out: &std::process::Output, needle: &str) {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(needle), "{stderr}");
}

#[test]
fn bad_configuration_is_one_line_and_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    one_line_failure(&cli(&["serve", "--state-dir", d]), "--listen");
    one_line_failure(
        &cli(&["serve", "--listen", "nonsense", "--state-dir", d]),
        "--listen",
    );
    one_line_failure(
        &cli(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            d,
            "--forward",
            "1:c1:h:1",
        ]),
        "LISTEN=CLUSTER:HOST:PORT",
    );
    one_line_failure(
        &cli(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            d,
            "--forward",
            "127.0.0.1:0=c1:h:99999",
        ]),
        "PORT is not 1-65535",
    );
    one_line_failure(
        &cli(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            d,
            "--agent-token",
            "c1",
        ]),
        "NAME=TOKEN",
    );
    one_line_failure(
        &cli(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            d,
            "--tls-cert",
            "/nonexistent",
        ]),
        "--tls-key",
    );
    one_line_failure(
        &cli(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            d,
            "--tls-cert",
            "/nonexistent",
            "--tls-key",
            "/nonexistent",
        ]),
        "/nonexistent",
    );
    one_line_failure(
        &cli(&[
            "kubeconfig",
            "--state-dir",
            d,
            "--cluster",
            "c1",
            "--user",
            "alice",
        ]),
        "serve",
    );
    one_line_failure(
        &cli(&[
            "kubeconfig",
            "--state-dir",
            d,
            "--cluster",
            "c1",
            "--user",
            "alice",
            "--server",
            "https://x",
        ]),
        "--user-token",
    );
    let help = cli(&["--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("kubeconfig"));
    let version = cli(&["--version"]);
    assert!(version.status.success());
}
