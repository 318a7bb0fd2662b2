//! `kubectl exec` (real kubectl v1.32) against the kubesim binary over TLS with a token.

mod support;

use std::io::Read as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Kubesim, sha256, sha256_file, write_random_file};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[test]
fn exec_stdout_stderr_and_exit_codes() {
    let sim = Kubesim::start(&["default/demo"]);
    let ok = sim.run(&["exec", "demo", "--", "echo", "hi there"]);
    ok.assert_code(0);
    assert_eq!(ok.stdout_str(), "hi there\n");
    assert_eq!(ok.stderr_str(), "");

    let three = sim.run(&[
        "exec",
        "demo",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    three.assert_code(3);
    assert_eq!(three.stdout_str(), "out\n");
    assert_eq!(
        three.stderr_str(),
        "err\ncommand terminated with exit code 3\n"
    );

    let max = sim.run(&["exec", "demo", "--", "sh", "-c", "exit 255"]);
    max.assert_code(255);
    assert!(
        max.stderr_str()
            .contains("command terminated with exit code 255"),
        "{}",
        max.stderr_str()
    );
}

#[test]
fn exec_runs_in_the_pod_working_directory() {
    let sim = Kubesim::builder()
        .pod("default/demo")
        .pod("team-a/web:app,sidecar")
        .env("KUBESIM_TOKEN", support::TEST_TOKEN)
        .start();
    let a = sim.run(&[
        "exec",
        "demo",
        "--",
        "sh",
        "-c",
        "echo x > marker; pwd; echo ${KUBESIM_TOKEN:-no-token} $HOSTNAME",
    ]);
    a.assert_code(0);
    let out = a.stdout_str();
    let (demo_dir, rest) = out.split_once('\n').unwrap();
    assert_eq!(
        rest, "no-token demo\n",
        "kubesim's own settings do not leak into pods"
    );
    assert!(demo_dir.ends_with("/default/demo"), "{demo_dir}");
    assert!(std::path::Path::new(&demo_dir).join("marker").exists());

    // Another pod has its own directory; -c picks the container; the env names it.
    let b = sim.run(&[
        "exec",
        "-n",
        "team-a",
        "web",
        "-c",
        "sidecar",
        "--",
        "sh",
        "-c",
        "pwd; echo $KUBESIM_CONTAINER; test ! -e marker",
    ]);
    b.assert_code(0);
    let out = b.stdout_str();
    let mut lines = out.lines();
    assert!(lines.next().unwrap().ends_with("/team-a/web"), "{out}");
    assert_eq!(lines.next(), Some("sidecar"));

    // Without -c kubectl defaults to the first container and says so.
    let c = sim.run(&[
        "exec",
        "-n",
        "team-a",
        "web",
        "--",
        "sh",
        "-c",
        "echo $KUBESIM_CONTAINER",
    ]);
    c.assert_code(0);
    assert_eq!(c.stdout_str(), "app\n");
    assert!(
        c.stderr_str().contains("Defaulted container \"app\""),
        "{}",
        c.stderr_str()
    );
}

#[test]
fn exec_piped_stdin() {
    let sim = Kubesim::start(&["default/demo"]);
    let out = sim.run_with_stdin(
        &["exec", "-i", "demo", "--", "sh", "-c", "cat; echo done"],
        b"a\nb\n",
    );
    out.assert_code(0);
    assert_eq!(out.stdout_str(), "a\nb\ndone\n");

    // stdin EOF reaches the process even when nothing was written.
    let empty = sim.run_with_stdin(&["exec", "-i", "demo", "--", "wc", "-c"], b"");
    empty.assert_code(0);
    assert_eq!(empty.stdout_str().trim(), "0");
}

#[test]
fn exec_50_mib_stdin_round_trip() {
    let sim = Kubesim::start(&["default/demo"]);
    let path = sim.dir().join("payload.bin");
    write_random_file(&path, 50 << 20, 7);
    let input = std::fs::read(&path).unwrap();
    let expected = sha256_file(&path);
    let started = Instant::now();
    // The pod hashes what it received on stdin and echoes it back on stdout.
    let out = support::run_command(
        sim.kubectl(&[
            "exec",
            "-i",
            "demo",
            "--",
            "sh",
            "-c",
            "tee received.bin; sha256sum received.bin >&2",
        ]),
        Some(&input),
        Duration::from_secs(60),
    );
    out.assert_code(0);
    assert_eq!(out.stdout.len(), input.len(), "stdout length");
    assert_eq!(sha256(&out.stdout), expected, "stdout round trip");
    let stderr = out.stderr_str();
    assert_eq!(
        stderr.split_whitespace().next(),
        Some(expected.as_str()),
        "stdin as the pod saw it: {stderr}"
    );
    eprintln!("50 MiB round trip in {:?}", started.elapsed());
}

#[test]
fn exec_errors_are_kubernetes_errors() {
    let sim = Kubesim::start(&["default/demo"]);
    let missing = sim.run(&["exec", "nope", "--", "true"]);
    missing.assert_code(1);
    assert!(
        missing
            .stderr_str()
            .contains("Error from server (NotFound): pods \"nope\" not found"),
        "{}",
        missing.stderr_str()
    );

    let bad_container = sim.run(&["exec", "demo", "-c", "nope", "--", "true"]);
    bad_container.assert_code(1);
    assert!(
        bad_container
            .stderr_str()
            .contains("container nope is not valid for pod demo"),
        "{}",
        bad_container.stderr_str()
    );

    let no_binary = sim.run(&["exec", "demo", "--", "/nonexistent/tool"]);
    no_binary.assert_code(1);
    assert!(
        no_binary
            .stderr_str()
            .contains("error: Internal error occurred"),
        "{}",
        no_binary.stderr_str()
    );

    // kubectl's SPDY path (WebSockets disabled): exit codes and both output streams.
    let spdy = run_env(
        &sim,
        &[
            "exec",
            "demo",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
        "KUBECTL_REMOTE_COMMAND_WEBSOCKETS",
        "false",
    );
    spdy.assert_code(3);
    assert_eq!(spdy.stdout_str(), "out\n");
    assert!(
        spdy.stderr_str().starts_with("err\n")
            && spdy
                .stderr_str()
                .contains("command terminated with exit code 3"),
        "{}",
        spdy.stderr_str()
    );
}

#[test]
fn no_websocket_makes_kubectl_fall_back_to_spdy() {
    let sim = Kubesim::builder()
        .pod("default/demo")
        .env("KUBESIM_NO_WEBSOCKET", "true")
        .start();
    let out = sim.run_with_stdin(
        &["exec", "-i", "demo", "--", "sh", "-c", "cat; exit 5"],
        b"piped\n",
    );
    out.assert_code(5);
    assert_eq!(out.stdout_str(), "piped\n");
    let requests = sim.requests();
    let exec: Vec<_> = requests
        .iter()
        .filter(|r| r.path.ends_with("/exec"))
        .collect();
    // The WebSocket attempt (refused), then the SPDY retry.
    assert_eq!(exec.len(), 2, "{exec:?}");
    assert_eq!(exec[0].header("upgrade"), Some("websocket"));
    assert_eq!(exec[1].method, "POST");
    assert_eq!(exec[1].header("upgrade"), Some("SPDY/3.1"));
}

fn run_env(sim: &Kubesim, args: &[&str], key: &str, value: &str) -> support::Outcome {
    let mut cmd = sim.kubectl(args);
    cmd.env(key, value);
    support::run_command(cmd, None, support::KUBECTL_TIMEOUT)
}

#[test]
fn requests_are_recorded_with_auth_and_impersonation() {
    let sim = Kubesim::start(&["default/demo"]);
    sim.run(&[
        "exec",
        "--as",
        "alice",
        "--as-group",
        "devs",
        "demo",
        "--",
        "true",
    ])
    .assert_code(0);
    let reqs = sim.requests();
    let exec = reqs
        .iter()
        .find(|r| r.path == "/api/v1/namespaces/default/pods/demo/exec")
        .expect("exec request recorded");
    assert_eq!(exec.method, "GET");
    assert_eq!(exec.header("authorization"), Some("Bearer <redacted>"));
    assert_eq!(exec.header("impersonate-user"), Some("alice"));
    assert_eq!(exec.header("impersonate-group"), Some("devs"));
    assert_eq!(
        exec.header("sec-websocket-protocol"),
        Some("v5.channel.k8s.io")
    );
    assert_eq!(
        exec.query.as_deref(),
        Some("command=true&container=main&stderr=true&stdout=true")
    );
    assert!(reqs.iter().all(|r| r.header("authorization").is_some()));
    let get = reqs
        .iter()
        .find(|r| r.path == "/api/v1/namespaces/default/pods/demo")
        .expect("GET pod recorded");
    assert_eq!(get.header("impersonate-user"), Some("alice"));

    // A wrong token is refused with 401.
    let wrong = support::kubeconfig_yaml(
        sim.server_url(),
        Some(&ca_from_kubeconfig(&sim)),
        Some("wrong-token"),
    );
    let path = sim.dir().join("wrong-kubeconfig");
    std::fs::write(&path, wrong).unwrap();
    let mut cmd = sim.kubectl(&["get", "pod", "demo"]);
    cmd.arg("--kubeconfig").arg(&path);
    let denied = support::run_command(cmd, None, support::KUBECTL_TIMEOUT);
    denied.assert_code(1);
    assert!(
        denied.stderr_str().contains("Unauthorized"),
        "{}",
        denied.stderr_str()
    );
}

fn ca_from_kubeconfig(sim: &Kubesim) -> String {
    use base64::Engine as _;
    let text = std::fs::read_to_string(sim.kubeconfig()).unwrap();
    let b64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority-data: "))
        .unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

/// Collects a pty's output in the background.
fn collect(mut reader: pty_process::OwnedReadPty) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    tokio::spawn(async move {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = reader.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

async fn wait_for(buf: &Arc<Mutex<Vec<u8>>>, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {needle:?}; terminal so far:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn exec_tty_through_a_pseudo_terminal_with_resize() {
    let sim = Kubesim::start(&["default/demo"]);
    let (pty, pts) = pty_process::open().unwrap();
    pty.resize(pty_process::Size::new(33, 91)).unwrap();
    let cmd = tokio::process::Command::from(sim.kubectl(&["exec", "-it", "demo", "--", "sh"]));
    let mut child = pty_process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn(pts)
        .unwrap();
    let (reader, mut writer) = pty.into_split();
    let screen = collect(reader);
    let t = Duration::from_secs(15);

    // The initial size reaches the remote terminal. kubectl sends its initial resize and the
    // first stdin from separate goroutines, so a line typed at once may run before the size is
    // applied: wait for the prompt, then ask until the size shows (or fail at the deadline).
    let text =
        |s: &std::sync::Mutex<Vec<u8>>| String::from_utf8_lossy(&s.lock().unwrap()).into_owned();
    let deadline = Instant::now() + t;
    while !["# ", "$ "].iter().any(|p| text(&screen).contains(p)) {
        assert!(
            Instant::now() < deadline,
            "no shell prompt: {}",
            text(&screen)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writer.write_all(b"tty\n").await.unwrap();
    wait_for(&screen, "/dev/pts/", t).await;
    loop {
        writer.write_all(b"stty size\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        if text(&screen).contains("33 91") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "initial size never arrived: {}",
            text(&screen)
        );
    }

    // A resize of the local terminal reaches it too (SIGWINCH -> channel 4 -> TIOCSWINSZ).
    writer.resize(pty_process::Size::new(40, 120)).unwrap();
    let deadline = Instant::now() + t;
    loop {
        writer.write_all(b"stty size\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        if String::from_utf8_lossy(&screen.lock().unwrap()).contains("40 120") {
            break;
        }
        assert!(Instant::now() < deadline, "resize never arrived");
    }

    // Keystrokes are raw; the exit code comes back through the status.
    writer
        .write_all(b"echo tty-$((6*7)); exit 5\n")
        .await
        .unwrap();
    wait_for(&screen, "tty-42", t).await;
    let status = tokio::time::timeout(t, child.wait())
        .await
        .expect("kubectl exits")
        .unwrap();
    assert_eq!(
        status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&screen.lock().unwrap())
    );
}

#[test]
fn exec_tty_through_script() {
    let sim = Kubesim::start(&["default/demo"]);
    let kubectl = format!(
        "{} --kubeconfig {} --cache-dir {} exec -it demo -- sh",
        support::KUBECTL,
        sim.kubeconfig().display(),
        sim.dir().join("cache").display()
    );
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qec", &kubectl, "/dev/null"]);
    cmd.env("HOME", sim.dir());
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script(1) is installed");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    use std::io::Write as _;
    std::thread::sleep(Duration::from_millis(1500));
    stdin.write_all(b"echo via-$((40+2))\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stdin.write_all(b"exit 9\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "script/kubectl did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    let out = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    assert!(out.contains("via-42"), "{out}");
    assert_eq!(status.code(), Some(9), "{out}");
}

#[test]
fn client_leaving_kills_the_remote_process_group() {
    let sim = Kubesim::start(&["default/demo"]);
    let mut child = sim
        .kubectl(&[
            "exec",
            "demo",
            "--",
            "sh",
            "-c",
            "sleep 300 & echo $!; wait",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let pid: u32 = line.trim().parse().expect("pid of the remote sleep");
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    };
    assert!(alive(pid));
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "remote sleep {pid} survived its client"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn get_pods_prints_a_table() {
    let sim = Kubesim::start(&["default/demo", "team-a/web:app,sidecar"]);
    let out = sim.run(&["get", "pods", "-A"]);
    out.assert_code(0);
    let text = out.stdout_str();
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    );
    assert_eq!(lines[1][..5], ["default", "demo", "1/1", "Running", "0"]);
    assert_eq!(lines[2][..5], ["team-a", "web", "2/2", "Running", "0"]);
    let name = sim.run(&[
        "get",
        "pod",
        "web",
        "-n",
        "team-a",
        "-o",
        "jsonpath={.spec.containers[*].name}",
    ]);
    assert_eq!(name.stdout_str(), "app sidecar");
    let missing = sim.run(&["get", "pod", "nope"]);
    missing.assert_code(1);
    assert!(missing.stderr_str().contains("pods \"nope\" not found"));
}
