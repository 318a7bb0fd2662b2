//! When the agent is missing or dies: kubectl gets a clear error at once, a running exec ends
//! with an error instead of hanging, and a restarted agent reconnects and serves again.

use std::time::{Duration, Instant};

use tether_e2e::cluster::READY_TIMEOUT;
use tether_e2e::{Cluster, POD};

/// How fast "at once" is: kubectl itself takes ~0.1 s for the whole failing command.
const AT_ONCE: Duration = Duration::from_secs(5);
/// How long an exec may outlive its SIGKILLed agent. The kernel closes the agent's socket at
/// once, so the control plane sees the tunnel go at once; the 60 s read deadline is only for
/// silent peers and is too long for one test.
const EXEC_END_AFTER_KILL: Duration = Duration::from_secs(15);

fn assert_502_status(c: &Cluster) -> String {
    let r = c
        .api_get(&format!("/api/v1/namespaces/default/pods/{POD}"))
        .expect("the control plane answers");
    assert_eq!(r.status, 502, "agent down must be 502; body: {}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|_| panic!("the 502 body is not a JSON Status: {}", r.text()));
    assert_eq!(v["kind"], "Status", "{v}");
    assert_eq!(v["code"], 502, "{v}");
    assert_eq!(v["status"], "Failure", "{v}");
    let message = v["message"].as_str().unwrap_or_default().to_string();
    assert!(!message.is_empty(), "the Status has no message: {v}");
    message
}

#[test]
fn cluster_without_agent_answers_502_at_once() {
    let c = Cluster::builder().without_agent().start();
    let message = assert_502_status(&c);

    // kubectl gets an answer from the server, quickly, and shows the control plane's message.
    let raw = c.run(&[
        "get",
        "--raw",
        &format!("{}/api/v1/namespaces/default/pods/{POD}", c.server_path()),
    ]);
    assert_eq!(raw.code(), 1, "{}", raw.stderr_str());
    assert!(raw.elapsed < AT_ONCE, "took {:?}", raw.elapsed);
    assert!(
        raw.stderr_str().contains("Error from server") && raw.stderr_str().contains(&message),
        "kubectl should show the Status message {message:?}:\n{}",
        raw.stderr_str()
    );

    for args in [
        &["get", "pods"][..],
        &["exec", POD, "--", "true"][..],
        &["logs", POD][..],
    ] {
        let out = c.run(args);
        assert_eq!(out.code(), 1, "kubectl {args:?}: {}", out.stderr_str());
        assert!(
            out.elapsed < AT_ONCE,
            "kubectl {args:?} took {:?}",
            out.elapsed
        );
        assert!(
            out.stderr_str().contains("Error from server"),
            "kubectl {args:?} should get a server error, not a network failure:\n{}",
            out.stderr_str()
        );
    }
}

#[test]
fn agent_killed_mid_exec_then_restarted_serves_again() {
    let mut c = Cluster::start();
    let mut exec = c.spawn(&[
        "exec",
        POD,
        "--",
        "sh",
        "-c",
        "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.1; done",
    ]);
    exec.wait_stdout("tick-3", Duration::from_secs(15));

    let killed = Instant::now();
    c.kill_agent();
    let deadline = killed + EXEC_END_AFTER_KILL;
    let code = loop {
        if let Some(status) = exec.try_exit() {
            break status.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < deadline,
            "kubectl exec was still running {EXEC_END_AFTER_KILL:?} after the agent was SIGKILLed (the control plane did not end the lost tunnel's streams)\n--- stderr:\n{}",
            exec.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let ended_after = killed.elapsed();
    eprintln!("FIGURE exec ended {ended_after:?} after the agent was SIGKILLed (exit {code})");
    assert_ne!(
        code, 0,
        "an exec cut by a lost tunnel must not look successful"
    );
    assert!(
        !exec.stderr().trim().is_empty(),
        "kubectl should print why the exec ended"
    );

    // Meanwhile the cluster answers 502 at once.
    let down_deadline = Instant::now() + AT_ONCE;
    loop {
        match c.api_get(&format!("/api/v1/namespaces/default/pods/{POD}")) {
            Ok(r) if r.status == 502 => break,
            other => assert!(
                Instant::now() < down_deadline,
                "still no 502 {AT_ONCE:?} after the agent died: {:?}",
                other.map(|r| (r.status, r.text()))
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // A restarted agent reconnects by itself and serves the next exec.
    let restarted = Instant::now();
    c.start_agent();
    let deadline = restarted + READY_TIMEOUT;
    loop {
        let out = c.run(&["exec", POD, "--", "echo", "back-again"]);
        if out.code() == 0 {
            assert_eq!(out.stdout_str(), "back-again\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no exec through the restarted agent within {READY_TIMEOUT:?}: {}",
            out.stderr_str()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "FIGURE restarted agent served an exec {:?} after it was started",
        restarted.elapsed()
    );
}

#[test]
fn control_plane_restart_agent_reconnects_by_itself() {
    let mut c = Cluster::start();
    c.run(&["exec", POD, "--", "true"]).assert_code(0);

    let restarted = Instant::now();
    c.restart_control_plane();
    // The same agent process finds the new control plane on its own (reconnect with backoff).
    let deadline = restarted + READY_TIMEOUT;
    loop {
        let out = c.run(&["exec", POD, "--", "echo", "reconnected"]);
        if out.code() == 0 {
            assert_eq!(out.stdout_str(), "reconnected\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not reconnect to the restarted control plane within {READY_TIMEOUT:?}: {}",
            out.stderr_str()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "FIGURE agent reconnected to a restarted control plane and served an exec {:?} after the restart",
        restarted.elapsed()
    );
    let agent_pid = c.agent().map(|a| a.pid());
    assert!(
        c.agent().is_some_and(|a| a.is_running()),
        "the agent {agent_pid:?} must survive a control-plane restart"
    );
}
