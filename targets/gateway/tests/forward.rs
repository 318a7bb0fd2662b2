//! The Linux gateway end to end: a control plane forwards local TCP listeners through the tunnel
//! to services next to the gateway (`tcp_tunnel_*`), bytes are checked both ways, and the gateway
//! reconnects when the control plane restarts.
//!
//! The control plane here is scripted (`support`): it speaks the same compat messages that
//! `tether-control-plane serve --forward LISTEN=CLUSTER:HOST:PORT` is specified to send.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{ControlPlane, GatewayProc, Seen, checksum, echo_service, payload, round_trip};
use tokio::io::AsyncWriteExt as _;

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_each_way_through_echo_and_sink_with_equal_checksums() {
    let cp = ControlPlane::start("127.0.0.1:0", Arc::new(Seen::default())).await;
    let _gw = GatewayProc::start(&cp.url());
    cp.wait_registers(1, Duration::from_secs(20)).await;

    let (echo, _e) = echo_service().await;
    let (sink, mut sums) = support::sink_service().await;
    let echo_fwd = cp.forward("127.0.0.1", echo.port()).await;
    let sink_fwd = cp.forward("127.0.0.1", sink.port()).await;

    // Up to the echo and back: 10 MiB each way, in order.
    let up = payload(7, 10 * MIB);
    let started = std::time::Instant::now();
    let back = tokio::time::timeout(
        Duration::from_secs(240),
        round_trip(echo_fwd, &up, up.len()),
    )
    .await
    .expect("echo round trip timed out");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(back.len(), up.len());
    assert_eq!(checksum(&back), checksum(&up), "echoed bytes differ");
    println!(
        "echo: 10 MiB each way in {secs:.2} s ({:.1} MiB/s per direction)",
        10.0 / secs
    );

    // Into the sink: 10 MiB, then EOF; the sink sees exactly the bytes sent.
    let data = payload(11, 10 * MIB);
    let mut s = tokio::net::TcpStream::connect(sink_fwd).await.unwrap();
    for chunk in data.chunks(40 * 1024) {
        s.write_all(chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(240), sums.recv())
        .await
        .expect("sink never finished")
        .unwrap();
    assert_eq!(got, checksum(&data), "sink checksum differs");
    drop(s);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_when_the_control_plane_restarts() {
    let seen = Arc::new(Seen::default());
    let cp = ControlPlane::start("127.0.0.1:0", seen.clone()).await;
    let addr = cp.addr;
    let _gw = GatewayProc::start(&cp.url());
    cp.wait_registers(1, Duration::from_secs(20)).await;
    let (echo, _e) = echo_service().await;
    let fwd = cp.forward("127.0.0.1", echo.port()).await;
    let data = payload(3, 256 * 1024);
    assert_eq!(round_trip(fwd, &data, data.len()).await, data);

    // Restart: the listener and the session go away, then come back on the same port.
    cp.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cp = ControlPlane::start(&addr.to_string(), seen.clone()).await;
    cp.wait_registers(2, Duration::from_secs(20)).await;
    let fwd = cp.forward("127.0.0.1", echo.port()).await;
    let data = payload(4, 256 * 1024);
    assert_eq!(round_trip(fwd, &data, data.len()).await, data);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_failure_is_reported_as_connection_failed() {
    let seen = Arc::new(Seen::default());
    let cp = ControlPlane::start("127.0.0.1:0", seen.clone()).await;
    let _gw = GatewayProc::start(&cp.url());
    cp.wait_registers(1, Duration::from_secs(20)).await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let fwd = cp.forward("127.0.0.1", port).await;
    let mut client = tokio::net::TcpStream::connect(fwd).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::AsyncReadExt::read(&mut client, &mut buf),
    )
    .await
    .expect("the client was never closed");
    assert_eq!(n.unwrap_or(0), 0);
    let closes = seen.closes.lock().unwrap().clone();
    assert_eq!(closes.len(), 1, "{closes:?}");
    assert_eq!(closes[0]["payload"]["reason"], "connection_failed");
    assert!(closes[0]["payload"]["error"].as_str().is_some());
    cp.stop().await;
}
