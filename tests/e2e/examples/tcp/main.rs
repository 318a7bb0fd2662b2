//! `cargo xtask bench --only tcp`: raw TCP through `--forward` and the cluster agent
//! (`--allow-tcp`), beside the direct path in the same run, once per wire mode.
//!
//! * Throughput: iperf3 (Debian's, `-J`), one stream, `--secs` (10) each, client to server:
//!   Gbit/s, the ratio to direct, and CPU seconds per GB of the control plane and the agent
//!   (user + system from `/proc`, over the run) with their peak RSS.
//! * Latency: `--round-trips` (5 000) 64-byte round trips to an echo server: p50/p99 and the
//!   added p50 over direct.
//!
//! Writes `<out>/tcp.md` and `<out>/tcp.json`.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether_e2e::cluster::free_addr;
use tether_e2e::{CLUSTER, Cluster};

struct Args {
    secs: u64,
    round_trips: usize,
    out: std::path::PathBuf,
}

fn parse_args() -> Args {
    let mut args = Args {
        secs: 10,
        round_trips: 5_000,
        out: "target/bench".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--secs" => args.secs = value().parse().expect("--secs S"),
            "--round-trips" => args.round_trips = value().parse().expect("--round-trips N"),
            "--out" => args.out = value().into(),
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// An echo server on a free port, one thread per connection.
fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = conn.set_nodelay(true);
                let mut w = conn.try_clone().unwrap();
                let mut r = conn;
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 || w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// An iperf3 server on a free port; killed on drop.
struct Iperf(std::process::Child, u16);

impl Iperf {
    fn start() -> Self {
        let port = free_addr().port();
        let mut child = Command::new("iperf3")
            .args([
                "-s",
                "-p",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--forceflush",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 (Debian's iperf3) is needed for the raw TCP bench");
        // Ready once it says so. (A probe connection would be taken for a test's control
        // connection, and its reset can fail the next real client.)
        let stdout = child.stdout.take().expect("iperf3 stdout");
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        let ready = lines.any(|l| l.is_ok_and(|l| l.contains("Server listening")));
        assert!(ready, "iperf3 -s did not listen");
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self(child, port)
    }
}

impl Drop for Iperf {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// iperf3 -c to `addr` for `secs`: (bits per second received, bytes received).
fn iperf(addr: SocketAddr, secs: u64) -> (f64, f64) {
    let out = Command::new("iperf3")
        .args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-t", &secs.to_string(), "-J"])
        .output()
        .expect("run iperf3 -c");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let received = &v["end"]["sum_received"];
    let (bps, bytes) = (
        received["bits_per_second"].as_f64(),
        received["bytes"].as_f64(),
    );
    match (bps, bytes) {
        (Some(bps), Some(bytes)) => (bps, bytes),
        _ => panic!(
            "iperf3 to {addr} failed: {}",
            String::from_utf8_lossy(&out.stdout)
        ),
    }
}

/// `n` 64-byte round trips to `addr`: sorted microseconds.
fn round_trips(addr: SocketAddr, n: usize) -> Vec<f64> {
    let mut conn = TcpStream::connect(addr).expect("connect for round trips");
    conn.set_nodelay(true).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    // Warm up the path (the tunnel's stream opens on the first byte).
    for _ in 0..50 {
        conn.write_all(&msg).unwrap();
        conn.read_exact(&mut back).unwrap();
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        conn.write_all(&msg).unwrap();
        conn.read_exact(&mut back).unwrap();
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    assert_eq!(back, msg);
    out.sort_by(f64::total_cmp);
    out
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Row {
    path: String,
    gbit: f64,
    cpu_per_gb: Option<(f64, f64)>,
    rss_mib: Option<(f64, f64)>,
    p50: f64,
    p99: f64,
}

fn main() {
    let args = parse_args();
    let iperf_server = Iperf::start();
    let echo_port = echo_server();
    let direct_iperf: SocketAddr = ([127, 0, 0, 1], iperf_server.1).into();
    let direct_echo: SocketAddr = ([127, 0, 0, 1], echo_port).into();

    let mut rows = Vec::new();
    let (gbit, _) = iperf(direct_iperf, args.secs);
    let rt = round_trips(direct_echo, args.round_trips);
    rows.push(Row {
        path: "direct".into(),
        gbit: gbit / 1e9,
        cpu_per_gb: None,
        rss_mib: None,
        p50: pct(&rt, 50.0),
        p99: pct(&rt, 99.0),
    });
    println!(
        "tcp: direct {:.2} Gbit/s, 64 B p50 {:.0} us",
        gbit / 1e9,
        pct(&rt, 50.0)
    );

    for mode in ["compat", "auto"] {
        let (fwd_iperf, fwd_echo) = (free_addr(), free_addr());
        let forwards = [
            format!("{fwd_iperf}={CLUSTER}:127.0.0.1:{}", iperf_server.1),
            format!("{fwd_echo}={CLUSTER}:127.0.0.1:{echo_port}"),
        ];
        let allows = [
            format!("127.0.0.1:{}", iperf_server.1),
            format!("127.0.0.1:{echo_port}"),
        ];
        let mut c = Cluster::builder()
            .control_plane_args(&[
                "--wire-mode",
                mode,
                "--forward",
                &forwards[0],
                "--forward",
                &forwards[1],
            ])
            .agent_args(&[
                "--wire-mode",
                mode,
                "--allow-tcp",
                &allows[0],
                "--allow-tcp",
                &allows[1],
            ])
            .start();
        let agent = c.agent().map(|p| p.pid()).expect("agent");
        let cp = c.control_plane().map(|p| p.pid()).expect("control plane");
        let (a0, c0) = (
            tether_e2e::proc::cpu_seconds(agent),
            tether_e2e::proc::cpu_seconds(cp),
        );
        let (bps, bytes) = iperf(fwd_iperf, args.secs);
        let gb = bytes / 1e9;
        let cpu = (
            (tether_e2e::proc::cpu_seconds(cp) - c0) / gb,
            (tether_e2e::proc::cpu_seconds(agent) - a0) / gb,
        );
        let rss = |pid: u32| {
            tether_e2e::proc::proc_status_kib(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0
        };
        let rss_mib = (rss(cp), rss(agent));
        let rt = round_trips(fwd_echo, args.round_trips);
        let name = if mode == "auto" { "native" } else { "compat" };
        println!(
            "tcp: {name} {:.2} Gbit/s ({:.2}x), CPU-s/GB cp {:.2} agent {:.2}, 64 B p50 {:.0} us",
            bps / 1e9,
            bps / 1e9 / rows[0].gbit,
            cpu.0,
            cpu.1,
            pct(&rt, 50.0)
        );
        rows.push(Row {
            path: format!("through the agent, {name}"),
            gbit: bps / 1e9,
            cpu_per_gb: Some(cpu),
            rss_mib: Some(rss_mib),
            p50: pct(&rt, 50.0),
            p99: pct(&rt, 99.0),
        });
        drop(c);
    }
    report(&args, &rows);
}

fn machine() -> String {
    format!("{}, Linux loopback", tether_e2e::proc::machine_line())
}

fn report(args: &Args, rows: &[Row]) {
    let direct = &rows[0];
    let mut md = format!(
        "# Raw TCP through the cluster agent\n\nWritten by `cargo xtask bench --only tcp \
         --publish` (`tests/e2e/examples/tcp/`). Machine: {}. iperf3 {} s, one stream, \
         client to server; 64-byte round trips: {} on one connection. Every path in the same \
         run: direct is iperf3 / the echo server on 127.0.0.1; through the agent is the control \
         plane's `--forward` to the agent's `--allow-tcp` target, with TLS on the tunnel.\n\n\
         | path | Gbit/s | vs direct | CPU-s per GB (control plane / agent) | peak RSS MiB (control plane / agent) | 64 B p50 us | p99 us | added p50 us |\n\
         |---|---|---|---|---|---|---|---|\n",
        machine(),
        args.secs,
        args.round_trips
    );
    for r in rows {
        let cpu = r
            .cpu_per_gb
            .map_or("—".to_string(), |(c, a)| format!("{c:.2} / {a:.2}"));
        let rss = r
            .rss_mib
            .map_or("—".to_string(), |(c, a)| format!("{c:.1} / {a:.1}"));
        md.push_str(&format!(
            "| {} | {:.2} | {:.2}x | {cpu} | {rss} | {:.0} | {:.0} | {:.0} |\n",
            r.path,
            r.gbit,
            r.gbit / direct.gbit,
            r.p50,
            r.p99,
            r.p50 - direct.p50
        ));
    }
    md.push_str(
        "\nTargets (issue 11): >= 0.5x direct, <= 1 CPU-s per GB and <= 32 MiB RSS per end, \
         added p50 of a 64 B round trip <= 200 us.\n",
    );
    std::fs::create_dir_all(&args.out).unwrap();
    std::fs::write(args.out.join("tcp.md"), &md).unwrap();
    let json: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"path": r.path, "gbit_per_s": r.gbit, "ratio": r.gbit / direct.gbit,
                   "cpu_s_per_gb": r.cpu_per_gb.map(|(c, a)| json!({"control_plane": c, "agent": a})),
                   "peak_rss_mib": r.rss_mib.map(|(c, a)| json!({"control_plane": c, "agent": a})),
                   "rtt_us": {"p50": r.p50, "p99": r.p99}})
        })
        .collect();
    std::fs::write(
        args.out.join("tcp.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    print!("{md}");
}
