//! A kubectl that stops reading.
//!
//! * An exec reader in compat wire mode, where the tunnel reader must pause (compat WebSocket
//!   streams have no per-stream flow control): the pause neither looks like a dead tunnel nor
//!   lasts; the stalled stream is closed alone after the pause limit (30 s), the tunnel survives
//!   past the 60 s read deadline, requests queued behind the pause are answered, and a
//!   checksummed exec works afterwards.
//! * A `kubectl logs` reader in either mode: responses are credited (`response_credit`), so the
//!   stall holds only that request; the rest of the cluster does not notice, and when the reader
//!   resumes every byte arrives.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tether_e2e::data::{Prng, sha256};
use tether_e2e::{Cluster, POD};

/// One stall test at a time: they are long and move hundreds of MiB.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The core's default pause limit.
const PAUSE_LIMIT: Duration = Duration::from_secs(30);

#[test]
fn compat_stalled_exec_reader_is_closed_alone_and_the_tunnel_lives_on() {
    let _one = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Cluster::builder()
        .agent_args(&["--wire-mode", "compat"])
        .control_plane_args(&["--wire-mode", "compat"])
        .start();
    // A kubectl whose stdout nobody reads: once the pipe is full it stops reading its stream,
    // the control plane's ring for it fills and the tunnel reader pauses.
    let mut stalled = c.kubectl(&["exec", POD, "--", "cat", "/dev/zero"]);
    let mut stalled = stalled
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl");
    let stalled_at = Instant::now();
    std::thread::sleep(Duration::from_secs(3));

    // A request behind the pause is answered once the stalled stream is closed, not lost.
    let t = Instant::now();
    let get = c.run(&["get", "pod", POD, "-o", "name"]);
    let waited = t.elapsed();
    get.assert_code(0);
    assert_eq!(get.stdout_str().trim(), format!("pod/{POD}"));
    eprintln!(
        "FIGURE compat stall: get pod behind a stalled stream answered in {:.1} s",
        waited.as_secs_f64()
    );
    assert!(
        stalled_at.elapsed() < PAUSE_LIMIT + Duration::from_secs(15),
        "the pause outlived its limit: get pod answered {:.1} s after the stall began",
        stalled_at.elapsed().as_secs_f64()
    );

    // Past the 60 s read deadline: the tunnel was never declared dead, and an exec works.
    let since = stalled_at.elapsed();
    if since < Duration::from_secs(65) {
        std::thread::sleep(Duration::from_secs(65) - since);
    }
    let input = Prng::new(65).bytes(1 << 20);
    let sum = c.run_with_stdin(&["exec", "-i", POD, "--", "sha256sum"], &input);
    sum.assert_code(0);
    assert_eq!(
        sum.stdout_str().split(' ').next(),
        Some(sha256(&input).as_str())
    );

    let cp_log = c.control_plane().expect("control plane").log();
    assert!(
        cp_log.contains("stalled: the client took nothing for 30 s"),
        "no stalled-stream close in the control plane log"
    );
    assert!(
        !cp_log.contains("silent past the read deadline"),
        "the pause was taken for silence"
    );
    let agent_log = c.agent().expect("agent").log();
    assert_eq!(
        agent_log
            .matches("registered with the control plane")
            .count(),
        1,
        "the agent had to reconnect"
    );
    let _ = stalled.kill();
    let _ = stalled.wait();
}

/// 200 MiB of log lines, written once, then the pod idles.
const BIG_LOG: usize = 200 << 20;

/// A `kubectl logs` of 200 MiB whose reader stalls 70 s: with response credit (both wire modes)
/// only that request waits; another request is answered at once, an exec works past the 60 s
/// read deadline, and when the reader resumes every byte arrives.
fn stalled_logs_reader(compat: bool) {
    let _one = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = Cluster::builder();
    if compat {
        b = b
            .agent_args(&["--wire-mode", "compat"])
            .control_plane_args(&["--wire-mode", "compat"]);
    }
    let mut c = b.start();
    let script = format!("yes 0123456789abcdef | head -c {BIG_LOG}; touch written; sleep 3600");
    c.run(&[
        "run",
        "big",
        "--image=busybox",
        "--command",
        "--",
        "sh",
        "-c",
        &script,
    ])
    .assert_code(0);
    // Wait until the whole log is written.
    c.run(&[
        "exec",
        "big",
        "--",
        "sh",
        "-c",
        "for i in $(seq 600); do [ -f written ] && exit 0; sleep 0.1; done; exit 1",
    ])
    .assert_code(0);

    let mut logs = c.kubectl(&["logs", "big"]);
    let mut logs = logs
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl logs");
    let stalled_at = Instant::now();
    std::thread::sleep(Duration::from_secs(3));

    // Another request while the reader stalls: answered at once.
    let t = Instant::now();
    let get = c.run(&["get", "pod", POD, "-o", "name"]);
    let took = t.elapsed();
    get.assert_code(0);
    eprintln!(
        "FIGURE stalled logs reader (compat={compat}): get pod answered in {:.0} ms",
        took.as_secs_f64() * 1000.0
    );
    assert!(
        took < Duration::from_secs(2),
        "get pod waited {took:?} behind a stalled reader"
    );

    // Past the 60 s read deadline: the tunnel lives, an exec round-trips a checksum.
    let since = stalled_at.elapsed();
    if since < Duration::from_secs(70) {
        std::thread::sleep(Duration::from_secs(70) - since);
    }
    let input = Prng::new(70).bytes(1 << 20);
    let sum = c.run_with_stdin(&["exec", "-i", POD, "--", "sha256sum"], &input);
    sum.assert_code(0);
    assert_eq!(
        sum.stdout_str().split(' ').next(),
        Some(sha256(&input).as_str())
    );

    // The reader resumes: every byte of the log arrives, in order.
    let mut out = logs.stdout.take().expect("stdout");
    let mut got = Vec::with_capacity(BIG_LOG);
    std::io::Read::read_to_end(&mut out, &mut got).expect("read the log");
    let status = logs.wait().expect("kubectl logs exits");
    assert!(status.success(), "kubectl logs failed after the stall");
    let want: Vec<u8> = b"0123456789abcdef\n"
        .iter()
        .copied()
        .cycle()
        .take(BIG_LOG)
        .collect();
    assert_eq!(got.len(), BIG_LOG, "log bytes after the stall");
    assert_eq!(sha256(&got), sha256(&want), "the log arrived altered");
    let cp_log = c.control_plane().expect("control plane").log();
    assert!(!cp_log.contains("silent past the read deadline"));
    assert!(
        !cp_log.contains("stalled:"),
        "the stalled request was closed instead of held"
    );
}

#[test]
fn stalled_logs_reader_holds_only_its_request_native() {
    stalled_logs_reader(false);
}

#[test]
fn stalled_logs_reader_holds_only_its_request_compat() {
    stalled_logs_reader(true);
}
