//! The Linux gateway behind the real `tether-control-plane`:
//!
//! ```text
//! tether-control-plane serve --listen ADDR --state-dir DIR --agent-token edge=TOKEN --insecure-http
//!                            --forward ECHO_LISTEN=edge:127.0.0.1:ECHO_PORT
//!                            --forward SINK_LISTEN=edge:127.0.0.1:SINK_PORT
//! tether-gateway --control-plane http://ADDR --token TOKEN
//! ```
//!
//! 10 MiB each way through the echo, 10 MiB into the sink, equal checksums, then the control plane
//! is restarted and the gateway must reconnect and forward again. A control plane that refuses
//! `--forward` fails the test.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{GatewayProc, TOKEN, checksum, echo_service, payload, round_trip, sink_service};
use tokio::io::AsyncWriteExt as _;

const MIB: usize = 1024 * 1024;

/// `target/<profile>/` of this test executable.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable under target/<profile>/deps")
        .to_path_buf()
}

/// The control plane binary, built first unless `TETHER_E2E_SKIP_BUILD` is set.
fn control_plane_bin() -> PathBuf {
    let skip = std::env::var("TETHER_E2E_SKIP_BUILD").is_ok_and(|v| !v.is_empty() && v != "0");
    if !skip {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--bins", "-p", "tether-control-plane"])
            .status()
            .expect("cannot run cargo");
        assert!(status.success(), "cannot build tether-control-plane");
    }
    let bin = profile_dir().join("tether-control-plane");
    assert!(bin.is_file(), "{} is missing", bin.display());
    bin
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

struct ControlPlaneProc {
    child: tokio::process::Child,
}

impl ControlPlaneProc {
    fn start(bin: &Path, listen: SocketAddr, state: &Path, forwards: &[String]) -> Self {
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args(["serve", "--listen", &listen.to_string(), "--state-dir"])
            .arg(state)
            .args(["--agent-token", &format!("edge={TOKEN}"), "--insecure-http"]);
        for f in forwards {
            cmd.args(["--forward", f]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start tether-control-plane");
        Self { child }
    }

    /// `Some(stderr)` when the process exited within `within` (a refused configuration).
    async fn exited(&mut self, within: Duration) -> Option<String> {
        let status = tokio::time::timeout(within, self.child.wait()).await.ok()?;
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut e, &mut err).await;
        }
        Some(format!("{status:?}: {err}"))
    }
}

/// Whether 4 bytes come back through the echo forward (the tunnel may not be up yet).
async fn probe(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf)
            .await
            .ok()?;
        (&buf == b"ping").then_some(())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

async fn wait_listening(addr: SocketAddr) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_forwards_through_the_real_control_plane_and_survives_its_restart() {
    let bin = control_plane_bin();
    let state = tempfile::tempdir().unwrap();
    let (echo, _e) = echo_service().await;
    let (sink, mut sums) = sink_service().await;
    let listen = free_addr();
    let echo_fwd = free_addr();
    let sink_fwd = free_addr();
    let forwards = [
        format!("{echo_fwd}=edge:127.0.0.1:{}", echo.port()),
        format!("{sink_fwd}=edge:127.0.0.1:{}", sink.port()),
    ];
    let mut cp = ControlPlaneProc::start(&bin, listen, state.path(), &forwards);
    if let Some(out) = cp.exited(Duration::from_secs(2)).await {
        panic!(
            "tether-control-plane refused to serve with --forward: {}",
            out.trim()
        );
    }
    wait_listening(listen).await;
    let _gw = GatewayProc::start(&format!("http://{listen}"));
    wait_listening(echo_fwd).await;

    // 10 MiB up to the echo and back.
    let up = payload(21, 10 * MIB);
    let back = tokio::time::timeout(Duration::from_secs(300), async {
        // The forward may be up before the gateway registered: retry until bytes come back.
        loop {
            if probe(echo_fwd).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        round_trip(echo_fwd, &up, up.len()).await
    })
    .await
    .expect("echo timed out");
    assert_eq!(checksum(&back), checksum(&up));

    // 10 MiB into the sink.
    let data = payload(22, 10 * MIB);
    let mut s = tokio::net::TcpStream::connect(sink_fwd).await.unwrap();
    for chunk in data.chunks(40 * 1024) {
        s.write_all(chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(300), sums.recv())
        .await
        .expect("sink never finished")
        .unwrap();
    assert_eq!(got, checksum(&data));

    // Restart the control plane: the gateway reconnects and forwarding works again.
    drop(cp);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _cp = ControlPlaneProc::start(&bin, listen, state.path(), &forwards);
    wait_listening(echo_fwd).await;
    let again = payload(23, 256 * 1024);
    let back = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if probe(echo_fwd).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        round_trip(echo_fwd, &again, again.len()).await
    })
    .await
    .expect("no forwarding after the control plane restarted");
    assert_eq!(back, again);
}

/// The real control plane serves TLS by default (self-signed certificate in its state dir): the
/// gateway's embedded-tls 1.3 client connects with `--insecure-skip-tls-verify` and registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_the_real_control_plane_over_tls() {
    let bin = control_plane_bin();
    let state = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let mut cp = tokio::process::Command::new(&bin)
        .args(["serve", "--listen", &listen.to_string(), "--state-dir"])
        .arg(state.path())
        .args(["--agent-token", &format!("edge={TOKEN}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot start tether-control-plane");
    wait_listening(listen).await;
    let mut gw = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
        .args([
            "--control-plane",
            &format!("https://{listen}"),
            "--token",
            TOKEN,
        ])
        .arg("--insecure-skip-tls-verify")
        .env("TETHER_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot start tether-gateway");
    let mut log = String::new();
    let mut stderr = gw.stderr.take().unwrap();
    let registered = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut stderr, &mut buf)
                .await
                .unwrap();
            assert!(n > 0, "the gateway exited: {log}");
            log.push_str(&String::from_utf8_lossy(&buf[..n]));
            if log.contains("registered as cluster edge") {
                return;
            }
        }
    })
    .await;
    let _ = cp.start_kill();
    assert!(registered.is_ok(), "no registration over TLS: {log}");
}
