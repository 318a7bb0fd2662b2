//! Real kubectl v1.32 -> tether-control-plane -> tunnel -> tether-agent -> kubesim: exec (stdout,
//! stderr, stdin, exit codes), `exec -it` with a resize, `attach -i`, `logs -f`, `get pods`.

use std::time::Duration;

use tether_e2e::data::{Prng, sha256};
use tether_e2e::{Cluster, POD, USER};

const T: Duration = Duration::from_secs(15);

#[test]
fn exec_stdout_stderr_stdin_and_exit_codes() {
    let c = Cluster::start();

    // stdout and stderr stay apart; exit 0.
    let ok = c.run(&[
        "exec",
        POD,
        "--",
        "sh",
        "-c",
        "echo out-$((6*7)); echo err-$((1+1)) >&2",
    ]);
    ok.assert_code(0);
    assert_eq!(ok.stdout_str(), "out-42\n");
    assert_eq!(ok.stderr_str(), "err-2\n");

    // Exit 3: the output before it arrives, and kubectl exits 3.
    let three = c.run(&["exec", POD, "--", "sh", "-c", "echo partial; exit 3"]);
    three.assert_code(3);
    assert_eq!(three.stdout_str(), "partial\n");
    assert!(
        three
            .stderr_str()
            .contains("command terminated with exit code 3"),
        "{}",
        three.stderr_str()
    );

    // Exit 255, the largest exit code.
    let max = c.run(&["exec", POD, "--", "sh", "-c", "exit 255"]);
    max.assert_code(255);

    // stdin: 1 MiB of binary data through `cat`, byte for byte.
    let input = Prng::new(7).bytes(1 << 20);
    let echo = c.run_with_stdin(&["exec", "-i", POD, "--", "cat"], &input);
    echo.assert_code(0);
    assert_eq!(echo.stdout.len(), input.len(), "stdin echoed through cat");
    assert_eq!(
        sha256(&echo.stdout),
        sha256(&input),
        "stdin echoed through cat"
    );

    // stdin EOF (the v5 close signal) reaches the process.
    let empty = c.run_with_stdin(&["exec", "-i", POD, "--", "wc", "-c"], b"");
    empty.assert_code(0);
    assert_eq!(empty.stdout_str().trim(), "0");

    // All of it at once: stdin read, stdout, stderr, exit code.
    let mixed = c.run_with_stdin(
        &[
            "exec",
            "-i",
            POD,
            "--",
            "sh",
            "-c",
            "read a; echo \"got:$a\"; echo \"err:$a\" >&2; exit 7",
        ],
        b"hello\n",
    );
    mixed.assert_code(7);
    assert_eq!(mixed.stdout_str(), "got:hello\n");
    assert!(
        mixed.stderr_str().starts_with("err:hello\n"),
        "{}",
        mixed.stderr_str()
    );
}

#[tokio::test]
async fn exec_it_with_terminal_resize() {
    let c = Cluster::start();
    tether_e2e::terminal::exec_it_with_resize(c.kubectl(&["exec", "-it", POD, "--", "sh"])).await;
}

#[test]
fn attach_i_drives_the_main_process() {
    let c = Cluster::start();
    let mut a = c.spawn(&["attach", "-i", POD]);
    a.send("echo attached-$((40+2))\n");
    a.wait_stdout("attached-42", T);
    a.send("echo to-stderr >&2\n");
    a.wait_stderr("to-stderr", T);
    a.send("exit 4\n");
    let (code, _) = a.wait_exit(T);
    assert_eq!(code, 4, "{}", a.stderr());
    assert!(
        a.stderr().contains("command terminated with exit code 4"),
        "{}",
        a.stderr()
    );
}

#[test]
fn logs_follow_streams_lines_as_they_come() {
    let c = Cluster::start();
    let mut driver = c.spawn(&["attach", "-i", POD]);
    driver.send("echo before-1\n");
    driver.wait_stdout("before-1", T);

    let plain = c.run(&["logs", POD]);
    plain.assert_code(0);
    assert_eq!(plain.stdout_str(), "before-1\n");

    // Each line must arrive while the follow is still open: streamed, not buffered to the end.
    let mut follow = c.spawn(&["logs", "-f", POD]);
    follow.wait_stdout("before-1\n", T);
    for i in 0..3 {
        driver.send(&format!("echo after-{i}\n"));
        follow.wait_stdout(&format!("after-{i}\n"), T);
        assert!(follow.try_exit().is_none(), "logs -f ended early");
    }
    // When the main process exits the follow ends by itself, everything delivered in order.
    driver.send("echo last; exit 0\n");
    let (code, _) = follow.wait_exit(T);
    assert_eq!(code, 0, "{}", follow.stderr());
    assert_eq!(
        follow.stdout(),
        "before-1\nafter-0\nafter-1\nafter-2\nlast\n"
    );
    assert_eq!(driver.wait_exit(T).0, 0);
}

#[test]
fn get_pods_and_api_errors_pass_through() {
    let c = Cluster::start();
    let pods = c.run(&["get", "pods"]);
    pods.assert_code(0);
    let line = pods
        .stdout_str()
        .lines()
        .find(|l| l.starts_with(POD))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no {POD} row in:\n{}", pods.stdout_str()));
    assert!(line.contains("Running"), "{line}");

    let phase = c.run(&["get", "pod", POD, "-o", "jsonpath={.status.phase}"]);
    phase.assert_code(0);
    assert_eq!(phase.stdout_str(), "Running");

    let json = c.run(&["get", "pods", "-o", "json"]);
    json.assert_code(0);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("pod list JSON");
    assert_eq!(v["items"][0]["metadata"]["name"], POD, "{v}");

    // The agent reached kubesim with its own token, acting as the kubectl user.
    let log = c.kubesim_log();
    assert!(
        log.contains(&format!("[\"impersonate-user\",\"{USER}\"]")),
        "kubesim saw no Impersonate-User: {USER}"
    );

    // The API server's own errors reach kubectl as they were (404 NotFound Status).
    let missing = c.run(&["get", "pod", "no-such-pod"]);
    missing.assert_code(1);
    assert!(
        missing
            .stderr_str()
            .contains("Error from server (NotFound): pods \"no-such-pod\" not found"),
        "{}",
        missing.stderr_str()
    );
}

/// The harness alone (kubesim, its TLS and token, kubectl): when this fails, the other failures
/// are not the tunnel's.
#[test]
fn baseline_kubectl_straight_to_kubesim() {
    let c = Cluster::builder().without_control_plane().start();
    let out = c.run_direct(&["exec", POD, "--", "sh", "-c", "echo direct; exit 3"]);
    out.assert_code(3);
    assert_eq!(out.stdout_str(), "direct\n");
    let pods = c.run_direct(&["get", "pods", "-o", "name"]);
    pods.assert_code(0);
    assert_eq!(pods.stdout_str(), format!("pod/{POD}\n"));
}
