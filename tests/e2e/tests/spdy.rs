//! kubectl over SPDY/3.1 through the tunnel: what kubectl 1.29 and older always speak, and what
//! 1.30+ falls back to. Both ways SPDY is chosen are run, in both wire modes:
//!
//! * **variables**: `KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false` and
//!   `KUBECTL_PORT_FORWARD_WEBSOCKETS=false`, so kubectl goes straight to `POST` + `Upgrade:
//!   SPDY/3.1`;
//! * **fallback**: kubesim `--no-websocket` refuses the WebSocket upgrade (an API server older
//!   than 1.30) and kubectl retries with SPDY on its own.
//!
//! Each run: exec exit codes and stderr, 20 MiB of stdin checksummed, `cp` of 50 MiB both ways,
//! `exec -it` with a resize, `attach -i`, and `port-forward` with 4 connections moving 20 MiB each
//! way; kubesim's log proves the upstream saw SPDY and no WebSocket got through.

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use tether_e2e::data::{Prng, sha256, sha256_file, write_random_file};
use tether_e2e::kubectl::{Running, run_command};
use tether_e2e::transfer::{cp_round_trip, forward_and_check};
use tether_e2e::{Cluster, POD};

const T: Duration = Duration::from_secs(30);
const MIB: usize = 1024 * 1024;

/// One transfer-heavy run at a time on 2 cores.
static HEAVY: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    Variables,
    Fallback,
}

fn cluster(way: Way, compat: bool) -> Cluster {
    let mut b = Cluster::builder();
    if way == Way::Fallback {
        b = b.kubesim_args(&["--no-websocket"]);
    }
    if compat {
        b = b
            .agent_args(&["--wire-mode", "compat"])
            .control_plane_args(&["--wire-mode", "compat"]);
    }
    b.start()
}

fn kubectl(c: &Cluster, way: Way, args: &[&str]) -> Command {
    let mut cmd = c.kubectl(args);
    if way == Way::Variables {
        cmd.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false");
        cmd.env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false");
    }
    cmd
}

fn every_feature_over_spdy(way: Way, compat: bool) {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster(way, compat);
    let run = |args: &[&str], stdin: Option<&[u8]>| run_command(kubectl(&c, way, args), stdin, T);

    // Exit codes, stdout and stderr apart.
    let ok = run(
        &[
            "exec",
            POD,
            "--",
            "sh",
            "-c",
            "echo out-$((6*7)); echo err >&2",
        ],
        None,
    );
    ok.assert_code(0);
    assert_eq!(ok.stdout_str(), "out-42\n");
    assert_eq!(ok.stderr_str(), "err\n");
    let three = run(
        &["exec", POD, "--", "sh", "-c", "echo partial; exit 3"],
        None,
    );
    three.assert_code(3);
    assert_eq!(three.stdout_str(), "partial\n");
    assert!(
        three
            .stderr_str()
            .contains("command terminated with exit code 3"),
        "{}",
        three.stderr_str()
    );
    run(&["exec", POD, "--", "sh", "-c", "exit 255"], None).assert_code(255);

    // 20 MiB of stdin, checksummed in the pod; stdin EOF reaches the process.
    let input = Prng::new(20).bytes(20 * MIB);
    let sum = run(&["exec", "-i", POD, "--", "sha256sum"], Some(&input));
    sum.assert_code(0);
    assert_eq!(
        sum.stdout_str().split(' ').next(),
        Some(sha256(&input).as_str())
    );
    let empty = run(&["exec", "-i", POD, "--", "wc", "-c"], Some(b""));
    empty.assert_code(0);
    assert_eq!(empty.stdout_str().trim(), "0");

    // cp of 50 MiB both ways (tar through exec).
    let src = c.dir().join("payload.bin");
    write_random_file(&src, 50 * MIB, 50);
    let want = sha256_file(&src);
    let (up, down) = cp_round_trip(&c, &|a| kubectl(&c, way, a), "spdy", &src, &want);
    eprintln!("FIGURE spdy {way:?} compat={compat}: cp 50 MiB up {up:.2} s, down {down:.2} s");

    // attach -i drives the main process.
    let mut a = Running::spawn(kubectl(&c, way, &["attach", "-i", POD]));
    a.send("echo attached-$((40+2))\n");
    a.wait_stdout("attached-42", T);
    a.send("echo to-stderr >&2\n");
    a.wait_stderr("to-stderr", T);
    drop(a);

    // exec -it: the initial size and a resize reach the pod's terminal.
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(tether_e2e::terminal::exec_it_with_resize(kubectl(
            &c,
            way,
            &["exec", "-it", POD, "--", "sh"],
        )));

    // port-forward: 4 connections x 20 MiB each way, every byte checked.
    let (rate, secs) = forward_and_check(&|a| kubectl(&c, way, a), "spdy");
    eprintln!(
        "FIGURE spdy {way:?} compat={compat}: port-forward 4 x 20 MiB each way in {secs:.2} s ({rate:.1} MiB/s)"
    );

    // The upstream saw SPDY, and no WebSocket stream was opened at kubesim.
    let log = c.kubesim_log();
    assert!(log.contains("SPDY/3.1"), "kubesim never saw a SPDY upgrade");
    assert!(log.contains("x-stream-protocol-version"), "{}", tail(&log));
    let websocket_streams = log
        .lines()
        .filter(|l| l.contains("\"upgrade\",\"websocket\"") && l.contains("method=GET"))
        .count();
    match way {
        Way::Variables => assert_eq!(websocket_streams, 0, "kubectl tried WebSocket"),
        // Every WebSocket attempt was refused by kubesim, then retried as SPDY.
        Way::Fallback => assert!(websocket_streams > 0, "kubectl never tried WebSocket first"),
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[test]
fn spdy_by_variables_native() {
    every_feature_over_spdy(Way::Variables, false);
}

#[test]
fn spdy_by_variables_compat() {
    every_feature_over_spdy(Way::Variables, true);
}

#[test]
fn spdy_fallback_native() {
    every_feature_over_spdy(Way::Fallback, false);
}

#[test]
fn spdy_fallback_compat() {
    every_feature_over_spdy(Way::Fallback, true);
}
