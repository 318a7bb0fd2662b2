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

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn registry_commands_add_list_grant_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // The token is alone on stdout, for scripts; what to do with it is on stderr.
    let out = cli(&["cluster", "add", "prod-eu", "--state-dir", d]);
    let token = stdout(&out);
    let token = token.trim();
    assert!(
        token.starts_with("tta_") && !token.contains(char::is_whitespace),
        "{token}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("shown only now"));
    one_line_failure(
        &cli(&["cluster", "add", "prod-eu", "--state-dir", d]),
        "cluster \"prod-eu\" already exists",
    );
    one_line_failure(
        &cli(&["cluster", "add", "a/b", "--state-dir", d]),
        "must be 1-63 characters",
    );
    let rotated = stdout(&cli(&[
        "cluster",
        "rotate-token",
        "prod-eu",
        "--state-dir",
        d,
    ]));
    assert_ne!(rotated.trim(), token);

    // A kubeconfig for a user granted at creation; its token is in it, and nowhere on disk.
    let kubeconfig = stdout(&cli(&[
        "user",
        "add",
        "alice@example.com",
        "--grant",
        "prod-eu",
        "--group",
        "dev",
        "--server",
        "https://cp.example:8443",
        "--state-dir",
        d,
    ]));
    let config: serde_yaml::Value = serde_yaml::from_str(&kubeconfig).unwrap();
    assert_eq!(
        config["clusters"][0]["cluster"]["server"],
        "https://cp.example:8443/clusters/prod-eu"
    );
    let user_token = config["users"][0]["user"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(user_token.starts_with("ttu_"), "{user_token}");
    let db = std::fs::read(dir.path().join("registry.db")).unwrap();
    assert!(!String::from_utf8_lossy(&db).contains(&user_token));

    // A failed grant leaves no user behind.
    one_line_failure(
        &cli(&[
            "user",
            "add",
            "bob",
            "--grant",
            "nope",
            "--server",
            "https://x",
            "--state-dir",
            d,
        ]),
        "cluster \"nope\" does not exist",
    );
    let bob = stdout(&cli(&["user", "add", "bob", "--state-dir", d]));
    assert!(bob.trim().starts_with("ttu_"));
    stdout(&cli(&[
        "user",
        "grant",
        "bob",
        "prod-eu",
        "--group",
        "ops",
        "--group",
        "sre",
        "--state-dir",
        d,
    ]));

    let clusters = stdout(&cli(&["cluster", "list", "--state-dir", d]));
    let row = clusters.lines().find(|l| l.starts_with("prod-eu")).unwrap();
    assert!(row.contains("alice@example.com,bob"), "{clusters}");
    let users = stdout(&cli(&["user", "list", "--state-dir", d]));
    assert!(
        users.contains("prod-eu(dev)") && users.contains("prod-eu(ops sre)"),
        "{users}"
    );

    stdout(&cli(&[
        "user",
        "revoke",
        "bob",
        "prod-eu",
        "--state-dir",
        d,
    ]));
    one_line_failure(
        &cli(&["user", "revoke", "bob", "prod-eu", "--state-dir", d]),
        "does not exist",
    );
    stdout(&cli(&["cluster", "remove", "prod-eu", "--state-dir", d]));
    let users = stdout(&cli(&["user", "list", "--state-dir", d]));
    assert!(!users.contains("prod-eu"), "{users}");
    stdout(&cli(&["user", "remove", "bob", "--state-dir", d]));
    one_line_failure(
        &cli(&["user", "remove", "bob", "--state-dir", d]),
        "user \"bob\" does not exist",
    );
    one_line_failure(&cli(&["cluster", "list"]), "--state-dir");
}
