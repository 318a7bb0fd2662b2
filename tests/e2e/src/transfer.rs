//! Bulk transfers checked byte for byte: `kubectl cp` both ways and `kubectl port-forward` with
//! concurrent connections, each run with a `kubectl` the caller builds (through the tunnel or
//! straight to kubesim, WebSocket or SPDY).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::data::{Prng, PrngCheck, mib_per_s, sha256_file};
use crate::kubectl::{Running, run_command};
use crate::{Cluster, POD};

const MIB: usize = 1024 * 1024;
/// Concurrent port-forward connections.
pub const CONNECTIONS: usize = 4;
/// Bytes per connection per direction.
pub const PF_BYTES: usize = 20 * MIB;

/// `kubectl cp` both ways with `kubectl` built by `make`; returns (up, down) seconds.
pub fn cp_round_trip(
    c: &Cluster,
    make: &dyn Fn(&[&str]) -> std::process::Command,
    label: &str,
    src: &std::path::Path,
    want: &str,
) -> (f64, f64) {
    let pod_dir = c.dir().join(format!("pod-side-{label}"));
    std::fs::create_dir(&pod_dir).unwrap();
    let dest = format!("{POD}:{}", pod_dir.display());
    let t = Instant::now();
    let up = run_command(
        make(&["cp", src.to_str().unwrap(), &dest]),
        None,
        Duration::from_secs(50),
    );
    let up_s = t.elapsed().as_secs_f64();
    up.assert_code(0);
    let in_pod = pod_dir.join(src.file_name().unwrap());
    assert_eq!(sha256_file(&in_pod), want, "{label}: copy into the pod");

    let back = c.dir().join(format!("back-{label}.bin"));
    let from = format!("{POD}:{}", in_pod.display());
    let t = Instant::now();
    let down = run_command(
        make(&["cp", &from, back.to_str().unwrap()]),
        None,
        Duration::from_secs(50),
    );
    let down_s = t.elapsed().as_secs_f64();
    down.assert_code(0);
    assert_eq!(sha256_file(&back), want, "{label}: copy out of the pod");
    let _ = std::fs::remove_file(&back);
    let _ = std::fs::remove_file(&in_pod);
    (up_s, down_s)
}

/// What one side of a connection received, checked against the stream it should be.
#[derive(Debug)]
pub struct Received {
    index: u64,
    bytes: u64,
    first_mismatch: Option<u64>,
}

/// Sends `PF_BYTES` of `Prng(seed)` in 64 KiB writes; returns the stream on success.
fn send_stream(mut w: TcpStream, seed: u64) -> std::io::Result<TcpStream> {
    let mut prng = Prng::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = PF_BYTES;
    while left > 0 {
        let n = left.min(buf.len());
        prng.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n;
    }
    Ok(w)
}

/// Reads `r` to the end, checking it against `Prng(seed)`.
fn receive_stream(r: &mut TcpStream, seed: u64) -> std::io::Result<PrngCheck> {
    let mut check = PrngCheck::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf)? {
            0 => return Ok(check),
            n => check.feed(&buf[..n]),
        }
    }
}

/// A TCP target in the "pod": each connection sends an 8-byte index, then `Prng(index)`; the
/// target checks what it receives and, at the same time, sends `PF_BYTES` of
/// `Prng(1000 + index)`, half-closing only after the upload ended (kubectl port-forward closes
/// the local connection as soon as the pod side ends its stream, even while the upload runs).
fn start_target() -> (u16, mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut head = [0u8; 8];
                if conn.read_exact(&mut head).is_err() {
                    return;
                }
                let index = u64::from_le_bytes(head);
                let writer = conn.try_clone().unwrap();
                let sender = std::thread::spawn(move || send_stream(writer, 1000 + index));
                let check = receive_stream(&mut conn, index);
                if let Ok(Ok(writer)) = sender.join() {
                    let _ = writer.shutdown(Shutdown::Write);
                }
                let (bytes, first_mismatch) = match &check {
                    Ok(c) => (c.len(), c.first_mismatch()),
                    Err(_) => (0, Some(0)),
                };
                let _ = tx.send(Received {
                    index,
                    bytes,
                    first_mismatch,
                });
            });
        }
    });
    (port, rx)
}

/// Runs `CONNECTIONS` concurrent connections through `local_port`; returns what each client
/// received and the wall time.
fn run_connections(local_port: u16) -> (Vec<Received>, f64) {
    let t = Instant::now();
    let handles: Vec<_> = (0..CONNECTIONS as u64)
        .map(|index| {
            std::thread::spawn(move || {
                let mut conn = TcpStream::connect(("127.0.0.1", local_port)).expect("connect");
                conn.set_read_timeout(Some(Duration::from_secs(40))).ok();
                let mut writer = conn.try_clone().unwrap();
                let upload = std::thread::spawn(move || {
                    writer.write_all(&index.to_le_bytes())?;
                    send_stream(writer, index)?.shutdown(Shutdown::Write)
                });
                let check = receive_stream(&mut conn, 1000 + index)
                    .unwrap_or_else(|e| panic!("connection {index}: download failed: {e}"));
                upload
                    .join()
                    .expect("upload thread")
                    .unwrap_or_else(|e| panic!("connection {index}: upload failed: {e}"));
                Received {
                    index,
                    bytes: check.len(),
                    first_mismatch: check.first_mismatch(),
                }
            })
        })
        .collect();
    let legs = handles
        .into_iter()
        .map(|h| h.join().expect("connection thread"))
        .collect();
    (legs, t.elapsed().as_secs_f64())
}

/// The local port from kubectl's "Forwarding from 127.0.0.1:PORT -> REMOTE".
fn forwarded_port(pf: &mut Running) -> u16 {
    pf.wait_stdout("Forwarding from 127.0.0.1:", Duration::from_secs(20));
    let out = pf.stdout();
    out.split("Forwarding from 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the local port from {out:?}"))
}

/// Port-forwards with `kubectl` from `make`, runs the connections, checks every byte both ways
/// and returns the throughput in MiB/s (both directions together) and the wall time.
pub fn forward_and_check(
    make: &dyn Fn(&[&str]) -> std::process::Command,
    label: &str,
) -> (f64, f64) {
    let (target_port, results) = start_target();
    let remote = format!(":{target_port}");
    let mut pf = Running::spawn(make(&["port-forward", &format!("pod/{POD}"), &remote]));
    let local = forwarded_port(&mut pf);
    let (downloads, secs) = run_connections(local);
    let mut uploads: Vec<Received> = (0..CONNECTIONS)
        .map(|_| {
            results
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("{label}: the target did not see every upload end"))
        })
        .collect();
    uploads.sort_by_key(|r| r.index);
    for (direction, list) in [("pod -> local", &downloads), ("local -> pod", &uploads)] {
        assert_eq!(list.len(), CONNECTIONS, "{label}: {direction}: {list:?}");
        for r in list.iter() {
            assert_eq!(
                (r.bytes, r.first_mismatch),
                (PF_BYTES as u64, None),
                "{label}: connection {} {direction}: (bytes received, first differing byte)",
                r.index
            );
        }
    }
    assert!(
        pf.try_exit().is_none(),
        "{label}: kubectl port-forward exited:\n{}",
        pf.stderr()
    );
    let total = (2 * CONNECTIONS * PF_BYTES) as u64;
    (mib_per_s(total, secs), secs)
}
