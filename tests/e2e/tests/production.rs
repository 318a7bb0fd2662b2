//! Day-one production behaviour through real processes: two agents on one token, a rolling
//! update that keeps a live exec, the agent behind an HTTP CONNECT proxy, and token rotation
//! through files without restarts.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use tether_e2e::cluster::{free_addr, random_token};
use tether_e2e::connect_proxy::ConnectProxy;
use tether_e2e::data::{Prng, sha256};
use tether_e2e::{Cluster, POD};

/// Status of a plain `GET path` on an agent's `--metrics-listen` address (`None`: no answer).
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn exec_echo(c: &Cluster, i: usize) {
    let out = c.run(&["exec", POD, "--", "sh", "-c", &format!("echo ok-{i}")]);
    out.assert_code(0);
    assert_eq!(out.stdout_str(), format!("ok-{i}\n"));
}

#[test]
fn rolling_update_keeps_a_live_exec_and_two_agents_share_one_token() {
    let a_metrics = free_addr().to_string();
    let mut c = Cluster::builder()
        .agent_args(&["--metrics-listen", &a_metrics, "--shutdown-grace", "60"])
        .start();
    let a_metrics: SocketAddr = a_metrics.parse().unwrap();
    wait_for("agent A ready", Duration::from_secs(10), || {
        http_status(a_metrics, "/readyz") == Some(200)
    });

    // A live exec on agent A, checksummed end to end.
    let input: Vec<u8> = Prng::new(11)
        .bytes(3 << 20)
        .iter()
        .map(|b| b'a' + b % 26)
        .collect();
    let input = String::from_utf8(input).unwrap();
    let mut live = c.spawn(&["exec", "-i", POD, "--", "sha256sum"]);
    live.send(&input[..input.len() / 2]);

    // Agent B with the same token: both stay registered, nobody is evicted.
    let b_metrics = free_addr();
    let mut b = c.spawn_extra_agent("agent-b", &["--metrics-listen", &b_metrics.to_string()]);
    wait_for("agent B ready", Duration::from_secs(10), || {
        http_status(b_metrics, "/readyz") == Some(200)
    });
    for i in 0..20 {
        exec_echo(&c, i);
    }
    assert_eq!(
        http_status(a_metrics, "/readyz"),
        Some(200),
        "A still registered"
    );

    // The rolling update: SIGTERM the old agent while its exec is live.
    c.signal_agent(Signal::TERM);
    wait_for("agent A not ready", Duration::from_secs(5), || {
        http_status(a_metrics, "/readyz") == Some(503)
    });
    wait_for(
        "the control plane to see A draining",
        Duration::from_secs(5),
        || c.control_plane().unwrap().log().contains("agent draining"),
    );
    // New work goes to B while A drains.
    for i in 20..25 {
        exec_echo(&c, i);
    }
    // A's exec goes on and ends whole.
    live.send(&input[input.len() / 2..]);
    live.close_stdin();
    let (code, _) = live.wait_exit(Duration::from_secs(30));
    assert_eq!(code, 0, "the live exec failed: {}", live.stderr());
    let expected = sha256(input.as_bytes());
    assert_eq!(
        live.stdout().split_whitespace().next(),
        Some(expected.as_str())
    );

    // With nothing live, A exits 0 on its own, well inside its grace period.
    let agent = c.agent().unwrap();
    wait_for("agent A to exit", Duration::from_secs(10), || {
        agent.try_exit().is_some()
    });
    let status = agent.try_exit().unwrap();
    assert!(status.success(), "agent A exited with {status}");
    assert!(
        agent.log().contains("agent drained"),
        "{}",
        agent.log_tail(20)
    );
    exec_echo(&c, 99);
    assert!(b.is_running());
}

#[test]
fn a_drain_past_its_grace_closes_the_live_exec_with_a_reason() {
    let mut c = Cluster::builder()
        .agent_args(&["--shutdown-grace", "1"])
        .start();
    let mut live = c.spawn(&["exec", "-i", POD, "--", "cat"]);
    live.send("before\n");
    live.wait_stdout("before", Duration::from_secs(10));
    c.signal_agent(Signal::TERM);
    let (code, took) = live.wait_exit(Duration::from_secs(15));
    assert_ne!(code, 0, "a cut exec must not look successful");
    assert!(took < Duration::from_secs(15));
    let agent = c.agent().unwrap();
    wait_for("agent to exit", Duration::from_secs(10), || {
        agent.try_exit().is_some()
    });
    assert!(agent.try_exit().unwrap().success());
    assert!(
        agent.log().contains("grace period over"),
        "{}",
        agent.log_tail(20)
    );
}

#[test]
fn the_agent_reaches_the_control_plane_through_a_connect_proxy() {
    let proxy = ConnectProxy::start(Some(("tether", "pr0xy")));
    let mut c = Cluster::builder()
        .agent_env(
            "HTTPS_PROXY",
            &format!("http://tether:pr0xy@{}", proxy.addr()),
        )
        .agent_env("NO_PROXY", "")
        .start();
    let out = c.run(&["exec", POD, "--", "sh", "-c", "echo via-proxy"]);
    out.assert_code(0);
    assert_eq!(out.stdout_str(), "via-proxy\n");
    let targets = proxy.targets();
    assert_eq!(targets.len(), 1, "{targets:?}");
    let cp = c.server_url().trim_start_matches("https://").to_string();
    assert!(cp.starts_with(&targets[0]), "{targets:?} vs {cp}");

    // Wrong credentials: the agent says the proxy refused, never the password.
    let mut bad = c.spawn_extra_agent(
        "agent-bad-proxy",
        &["--proxy", &format!("http://tether:wrong@{}", proxy.addr())],
    );
    wait_for("the refusal in the log", Duration::from_secs(10), || {
        bad.log().contains("refused CONNECT")
    });
    let log = bad.log();
    assert!(log.contains("407"), "{log}");
    assert!(
        !log.contains("wrong"),
        "the proxy password was logged: {log}"
    );
    assert!(proxy.refused() >= 1);
    bad.stop();
    c.note("proxy test done");
}

#[test]
fn tokens_rotate_through_files_without_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        let tmp = dir.path().join(format!("{name}.new"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    };
    let (agent_1, agent_2) = (random_token("agent-a"), random_token("agent-b"));
    let (user_1, user_2) = (random_token("user-a"), random_token("user-b"));
    let cp_agents = write(
        "cp-agents",
        &format!("# rotated by the test\nc1={agent_1}\n"),
    );
    let cp_users = write("cp-users", &format!("bob={user_1}\n"));
    let agent_token = write("agent-token", &format!("{agent_1}\n"));
    let mut c = Cluster::builder()
        .control_plane_args(&[
            "--agent-token-file",
            cp_agents.to_str().unwrap(),
            "--user-token-file",
            cp_users.to_str().unwrap(),
        ])
        .agent_args(&["--token-file", agent_token.to_str().unwrap()])
        .start();
    let pod = format!("/clusters/c1/api/v1/namespaces/default/pods/{POD}");
    let status = |c: &Cluster, path: &str, token: &str| {
        c.control_plane_get(path, token).map(|r| r.status).unwrap()
    };
    assert_eq!(status(&c, &pod, &user_1), 200);
    assert_eq!(status(&c, &pod, &user_2), 401);

    // Rotate every file; neither process restarts.
    write("cp-agents", &format!("c1={agent_2}\n"));
    write("cp-users", &format!("bob={user_2}\n"));
    write("agent-token", &format!("{agent_2}\n"));
    assert_eq!(
        status(&c, &pod, &user_1),
        401,
        "the old user token still works"
    );
    assert_eq!(status(&c, &pod, &user_2), 200);
    // The agent endpoint: a known token gets as far as "needs a WebSocket upgrade" (400).
    let agent_path = "/api/v1/clusters/agent/ws";
    assert_eq!(status(&c, agent_path, &agent_1), 401);
    assert_eq!(status(&c, agent_path, &agent_2), 400);

    // The agent's next connection uses the new token from its file, same process.
    let pid = c.agent().unwrap().pid();
    c.restart_control_plane();
    c.wait_ready(Duration::from_secs(20));
    assert_eq!(c.agent().unwrap().pid(), pid);
    assert_eq!(status(&c, &pod, &user_2), 200);
}
