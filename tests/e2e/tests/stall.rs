//! A kubectl that stops reading, in compat wire mode (where the tunnel reader must pause:
//! the compat protocol has no per-stream flow control). The pause must neither look like a dead
//! tunnel nor last: the stalled stream is closed alone after the pause limit (30 s), the tunnel
//! survives past the 60 s read deadline, requests queued behind the pause are answered, and a
//! checksummed exec works afterwards.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tether_e2e::data::{Prng, sha256};
use tether_e2e::{Cluster, POD};

/// The core's default pause limit.
const PAUSE_LIMIT: Duration = Duration::from_secs(30);

#[test]
fn compat_stalled_exec_reader_is_closed_alone_and_the_tunnel_lives_on() {
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
        cp_log.contains("read nothing for 30 s"),
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
