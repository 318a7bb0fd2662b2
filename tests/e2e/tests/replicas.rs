//! Two control-plane replicas, one fleet: a PostgreSQL registry and a Redis fleet registry (real
//! servers started here), two clusters whose agents hold their tunnels on different replicas.
//!
//! * kubectl through either replica reaches either cluster (exec with stdin checked by sha256,
//!   `get`, `auth whoami` showing the grant's groups): the replica without the tunnel carries the
//!   request to the one with it.
//! * A user without a grant on a cluster gets 403, through either replica.
//! * One replica SIGKILLed: its agent redials the other within its backoff and exec works again;
//!   a stream that lived on the surviving replica never noticed.
//! * A cluster's token rotated: its agent is disconnected within the recheck interval and
//!   refused; the new token brings it back.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tether_e2e::cluster::{clean_command, spawn_listening};
use tether_e2e::data::{Prng, sha256};
use tether_e2e::kubectl::{Outcome, Running, kubeconfig_yaml, kubectl_command, run_command};
use tether_e2e::proc::Proc;
use tether_e2e::services::{Postgres, Redis};
use tether_e2e::tls::{TestTls, make_tls};
use tether_e2e::{Cluster, POD, bins::bins};

const TIMEOUT: Duration = Duration::from_secs(60);

struct Replica {
    proc: Proc,
    addr: SocketAddr,
}

struct Fleet {
    root: PathBuf,
    registry: String,
    tls: TestTls,
    home: PathBuf,
}

impl Fleet {
    /// `tether-control-plane ARGS --registry URL`, its stdout (must succeed).
    fn admin(&self, args: &[&str]) -> String {
        let out = clean_command(&bins().control_plane)
            .args(args)
            .args(["--registry", &self.registry])
            .output()
            .expect("run tether-control-plane");
        assert!(
            out.status.success(),
            "tether-control-plane {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn replica(&self, id: &str, redis: &str, peer_token_file: &Path) -> Replica {
        let state = self.root.join(format!("state-{id}"));
        std::fs::create_dir_all(&state).unwrap();
        let (proc, addr) = spawn_listening(
            &format!("replica-{id}"),
            &self.root.join(format!("replica-{id}.log")),
            |addr| {
                let mut cmd = clean_command(&bins().control_plane);
                cmd.arg("serve").arg("--listen").arg(addr.to_string());
                cmd.arg("--state-dir").arg(&state);
                cmd.args(["--registry", &self.registry]);
                cmd.args(["--redis", redis, "--replica-id", id]);
                cmd.arg("--peer-token-file").arg(peer_token_file);
                cmd.arg("--tls-cert").arg(&self.tls.cert_path);
                cmd.arg("--tls-key").arg(&self.tls.key_path);
                cmd.arg("--peer-ca-file").arg(&self.tls.ca_path);
                cmd.args(["--registry-recheck", "1"]);
                cmd
            },
        );
        Replica { proc, addr }
    }

    /// A kubeconfig for `token` on `cluster` through `replica`.
    fn kubeconfig(&self, name: &str, replica: SocketAddr, cluster: &str, token: &str) -> PathBuf {
        let path = self.root.join(format!("{name}.kubeconfig"));
        let server = format!("https://{replica}/clusters/{cluster}");
        std::fs::write(
            &path,
            kubeconfig_yaml(name, &server, &self.tls.ca_pem, token),
        )
        .unwrap();
        path
    }

    fn kubectl(&self, kubeconfig: &Path, args: &[&str]) -> Command {
        kubectl_command(kubeconfig, &self.home, args)
    }

    fn run(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&[u8]>) -> Outcome {
        run_command(self.kubectl(kubeconfig, args), stdin, TIMEOUT)
    }
}

fn private_key(tls: TestTls) -> TestTls {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&tls.key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    tls
}

/// Runs `get pod` through `kubeconfig` until it answers 200, or fails after `within`.
fn wait_reachable(fleet: &Fleet, kubeconfig: &Path, pod: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let out = fleet.run(kubeconfig, &["get", "pod", pod, "-o", "name"], None);
        if out.code() == 0 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{} not reachable within {within:?}: {}",
            kubeconfig.display(),
            out.stderr_str()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn exec_checked(fleet: &Fleet, kubeconfig: &Path, seed: u64) {
    let input = Prng::new(seed).bytes(1 << 20);
    let out = fleet.run(
        kubeconfig,
        &["exec", "-i", POD, "--", "sha256sum"],
        Some(&input),
    );
    out.assert_code(0);
    assert_eq!(
        out.stdout_str().split_whitespace().next(),
        Some(sha256(&input).as_str()),
        "exec through {} lost or changed bytes",
        kubeconfig.display()
    );
}

#[test]
fn two_replicas_serve_every_cluster_refuse_the_ungranted_and_survive_one_dying() {
    let dir = tempfile::Builder::new()
        .prefix("tether-e2e-fleet-")
        .tempdir()
        .unwrap();
    let root = dir.path().to_path_buf();
    let home = root.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let redis = Redis::start(&root);
    let postgres = Postgres::start(&root);
    let fleet = Fleet {
        registry: postgres.url().to_string(),
        tls: private_key(make_tls(&root, "fleet")),
        home,
        root: root.clone(),
    };

    // The registry: two clusters; alice may reach both (as group dev), bob only c1.
    let c1_token = fleet.admin(&["cluster", "add", "c1"]);
    let c2_token = fleet.admin(&["cluster", "add", "c2"]);
    let alice = fleet.admin(&["user", "add", "alice"]);
    let bob = fleet.admin(&["user", "add", "bob"]);
    fleet.admin(&["user", "grant", "alice", "c1", "--group", "dev"]);
    fleet.admin(&["user", "grant", "alice", "c2", "--group", "dev"]);
    fleet.admin(&["user", "grant", "bob", "c1"]);

    let peer_token = root.join("peer-token");
    std::fs::write(&peer_token, "peer-token-shared-by-the-replicas\n").unwrap();
    let mut a = fleet.replica("a", redis.url(), &peer_token);
    let b = fleet.replica("b", redis.url(), &peer_token);

    // Two clusters (kubesim each, a pod only it has), agents on different replicas; each
    // agent knows both replicas, its own first.
    let mut k1 = Cluster::builder()
        .without_control_plane()
        .without_agent()
        .pod("default/only-in-c1")
        .start();
    let mut k2 = Cluster::builder()
        .without_control_plane()
        .without_agent()
        .pod("default/only-in-c2")
        .start();
    let (url_a, url_b) = (format!("https://{}", a.addr), format!("https://{}", b.addr));
    let ca = fleet.tls.ca_path.clone();
    k1.spawn_agent(&url_a, &c1_token, Some(&ca), &["--control-plane", &url_b]);
    k2.spawn_agent(&url_b, &c2_token, Some(&ca), &["--control-plane", &url_a]);

    let alice_a1 = fleet.kubeconfig("alice-a-c1", a.addr, "c1", &alice);
    let alice_a2 = fleet.kubeconfig("alice-a-c2", a.addr, "c2", &alice);
    let alice_b1 = fleet.kubeconfig("alice-b-c1", b.addr, "c1", &alice);
    let alice_b2 = fleet.kubeconfig("alice-b-c2", b.addr, "c2", &alice);
    for (kubeconfig, pod) in [
        (&alice_a1, "only-in-c1"),
        (&alice_b1, "only-in-c1"),
        (&alice_a2, "only-in-c2"),
        (&alice_b2, "only-in-c2"),
    ] {
        wait_reachable(&fleet, kubeconfig, pod, TIMEOUT);
    }
    // Each cluster's own pod, never the other's: the request reached the right cluster.
    let other = fleet.run(&alice_a2, &["get", "pod", "only-in-c1"], None);
    assert_ne!(other.code(), 0, "c2 has no pod only-in-c1");
    assert!(other.stderr_str().contains("NotFound") || other.stderr_str().contains("not found"));

    // Streams both ways through the hop, and the identity the cluster sees.
    for (i, kubeconfig) in [&alice_a1, &alice_a2, &alice_b1, &alice_b2]
        .into_iter()
        .enumerate()
    {
        exec_checked(&fleet, kubeconfig, 11 + i as u64);
        let whoami = fleet.run(
            kubeconfig,
            &["auth", "whoami", "-o", "jsonpath={.status.userInfo}"],
            None,
        );
        whoami.assert_code(0);
        let who = whoami.stdout_str();
        assert!(
            who.contains(r#""username":"alice""#) && who.contains(r#""dev""#),
            "{who}"
        );
    }
    // Each replica carried the requests for the cluster it does not hold.
    for replica in [a.addr, b.addr] {
        let metrics = tether_e2e::https::get(
            &format!("https://{replica}/metrics"),
            &fleet.tls.ca_pem,
            "",
            TIMEOUT,
        )
        .expect("metrics")
        .text();
        let forwarded: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("tether_peer_forwarded_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        assert!(forwarded >= 3, "{replica} forwarded {forwarded} requests");
    }

    // No grant: 403 through either replica, naming the user and the cluster.
    for replica in [a.addr, b.addr] {
        let bob_c2 = fleet.kubeconfig("bob-c2", replica, "c2", &bob);
        let out = fleet.run(&bob_c2, &["get", "pod", POD], None);
        assert_ne!(out.code(), 0);
        let err = out.stderr_str();
        assert!(
            err.contains("Forbidden") && err.contains("bob") && err.contains("c2"),
            "{err}"
        );
    }
    let bob_b1 = fleet.kubeconfig("bob-b-c1", b.addr, "c1", &bob);
    fleet
        .run(&bob_b1, &["get", "pod", POD], None)
        .assert_code(0);

    // A stream on replica b to cluster c2 (both held by b), live across a's death.
    let mut survivor = Running::spawn(fleet.kubectl(&alice_b2, &["exec", "-i", POD, "--", "cat"]));
    survivor.send("before\n");
    survivor.wait_stdout("before\n", TIMEOUT);

    // Replica a dies: c1's agent redials b, and exec to c1 works again through b.
    let killed = Instant::now();
    a.proc.kill_hard();
    let back = wait_reachable(&fleet, &alice_b1, "only-in-c1", Duration::from_secs(30));
    exec_checked(&fleet, &alice_b1, 99);
    eprintln!(
        "fleet: replica a killed; c1 reachable through b again after {:.2} s",
        killed.elapsed().as_secs_f64().min(back.as_secs_f64())
    );
    let agent_log = k1.agent().map(|p| p.log()).unwrap_or_default();
    assert!(
        agent_log.contains(&format!("wss://{}", b.addr)),
        "c1's agent never dialled b:\n{agent_log}"
    );

    survivor.send("after\n");
    survivor.wait_stdout("before\nafter\n", TIMEOUT);
    survivor.close_stdin();
    let (code, _) = survivor.wait_exit(TIMEOUT);
    assert_eq!(code, 0, "{}", survivor.stderr());

    // A rotated token: c2's agent is disconnected within the recheck and refused from then on;
    // with the new token it is back.
    let rotated = fleet.admin(&["cluster", "rotate-token", "c2"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = fleet.run(&alice_b2, &["get", "pod", POD], None);
        if out.code() != 0 && out.stderr_str().contains("no agent is connected") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "c2's agent still served after its token was rotated: {}",
            out.stderr_str()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let agent_log = k2.agent().map(|p| p.log()).unwrap_or_default();
        if agent_log.contains("agent token revoked")
            && agent_log.contains("rejected the agent token")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{agent_log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    k2.spawn_agent(&url_b, &rotated, Some(&ca), &[]);
    wait_reachable(&fleet, &alice_b2, "only-in-c2", TIMEOUT);
    drop(b);
}
