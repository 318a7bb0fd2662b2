//! `cargo xtask bench --only agents`: many agents on one control-plane replica.
//!
//! One process simulates `--agents N` agents (default 10 000) on loopback against a real
//! `tether-control-plane` (release build, TLS, clusters and grants in its SQLite registry):
//!
//! 1. The registry gets N clusters, a user and a grant of each cluster to it (through
//!    `tether_tokio`'s registry, the code `cluster add` and `user grant` run).
//! 2. The agents connect (`--concurrency` handshakes at a time): TLS, WebSocket upgrade with the
//!    cluster's token, `register` with Tether's compat extensions, `register_success`. Figure:
//!    agents registered per second.
//! 3. They stay idle `--idle-secs` (default 60): each sends its `heartbeat` every 30 s and, as
//!    the real agent does, pings after its ping interval (20 s) of hearing nothing. Figures: the control plane's RSS (total, and per agent above its RSS before the
//!    first agent) and its CPU over the idle window, read from `/proc`.
//! 4. `--execs M` (default 1 000) exec streams to random clusters, `--exec-concurrency` at a
//!    time: a WebSocket upgrade to `/clusters/<c>/.../exec` as the user; the agent acknowledges
//!    the start and writes its cluster's name on stdout. Figure: time from the client's connect
//!    to that first byte, p50/p99/max; each answer must name the cluster asked for.
//!
//! It raises its file limit (and so the control plane's) to what 2N sockets need. Output:
//! `<out>/scale.md` and `<out>/scale.json`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tether_e2e::bins::bins;
use tether_e2e::cluster::{clean_command, spawn_listening};
use tether_e2e::proc::Proc;
use tether_e2e::tls::client_config;
use tether_tokio::control_plane::registry::Registry;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

struct Args {
    agents: usize,
    execs: usize,
    idle_secs: u64,
    concurrency: usize,
    exec_concurrency: usize,
    out: PathBuf,
}

fn parse_args() -> Args {
    let mut args = Args {
        agents: 10_000,
        execs: 1_000,
        idle_secs: 60,
        concurrency: 64,
        exec_concurrency: 8,
        out: PathBuf::from("target/bench"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--agents" => args.agents = value().parse().expect("--agents N"),
            "--execs" => args.execs = value().parse().expect("--execs N"),
            "--idle-secs" => args.idle_secs = value().parse().expect("--idle-secs S"),
            "--concurrency" => args.concurrency = value().parse().expect("--concurrency N"),
            "--exec-concurrency" => {
                args.exec_concurrency = value().parse().expect("--exec-concurrency N");
            }
            "--out" => args.out = PathBuf::from(value()),
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// Raises this process's open-file limit (children inherit it) to at least `needed`.
fn raise_nofile(needed: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let current = getrlimit(Resource::Nofile);
    let hard = current.maximum.unwrap_or(u64::MAX);
    // As root the hard limit can rise too; otherwise stay under it.
    let want = needed.max(current.current.unwrap_or(0));
    let raised = Rlimit {
        current: Some(want),
        maximum: Some(want.max(hard)),
    };
    if setrlimit(Resource::Nofile, raised).is_ok() {
        return want;
    }
    let capped = Rlimit {
        current: Some(want.min(hard)),
        maximum: current.maximum,
    };
    let _ = setrlimit(Resource::Nofile, capped);
    getrlimit(Resource::Nofile).current.unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    tether_e2e::proc::proc_status_kib(pid, "VmRSS:").unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn cluster_name(i: usize) -> String {
    format!("c{i:05}")
}

/// One simulated agent: connects, registers, then answers until the process ends.
async fn agent(
    addr: SocketAddr,
    tls: TlsConnector,
    cluster: String,
    token: String,
    registered: Arc<AtomicU64>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), String> {
    let url = format!("wss://{addr}/api/v1/clusters/agent/ws");
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| "token header")?,
    );
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::IpAddress(addr.ip().into());
    let stream = tls.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let (ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(|e| e.to_string())?;
    let (mut tx, mut rx) = ws.split();
    let register = json!({
        "type": "register",
        "request_id": format!("reg-{cluster}"),
        "payload": {
            "agent_id": format!("sim-{cluster}"),
            "name": cluster,
            "k8s_version": "v1.32.4",
            "agent_version": "bench",
            "extensions": {"websocket_started": true, "websocket_close_code": true, "proxy_error_status": true},
        },
    });
    tx.send(Message::text(register.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match rx.next().await {
            Some(Ok(Message::Text(text))) => {
                let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
                if v["type"] == "register_success" {
                    break;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed before register_success".into()),
        }
    }
    registered.fetch_add(1, Ordering::Relaxed);
    // The next agent may start its handshake.
    drop(permit);
    // Heartbeats every 30 s, each agent at its own phase.
    let phase = Duration::from_millis(fastrand::u64(0..30_000));
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + phase, Duration::from_secs(30));
    // Pings as the real agent's relay does: after its ping interval of quiet.
    let ping_interval = std::time::Duration::from_micros(
        tether_core::relay::Config::default()
            .ping_interval
            .as_micros(),
    );
    let mut next_ping = tokio::time::Instant::now() + ping_interval;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next_ping) => {
                next_ping = tokio::time::Instant::now() + ping_interval;
                if tx.send(Message::Ping(Default::default())).await.is_err() {
                    return Err("tunnel lost".into());
                }
            }
            _ = heartbeat.tick() => {
                let beat = json!({"type": "heartbeat", "payload": {
                    "cluster_id": cluster, "agent_id": format!("sim-{cluster}"),
                    "status": "healthy", "tunnel_status": "connected", "metadata": {}}});
                if tx.send(Message::text(beat.to_string())).await.is_err() {
                    return Err("tunnel lost".into());
                }
            }
            msg = rx.next() => {
                next_ping = tokio::time::Instant::now() + ping_interval;
                let text = match msg {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Ping(p))) => {
                        let _ = tx.send(Message::Pong(p)).await;
                        continue;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Err("tunnel closed".into()),
                };
                let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
                let id = v["request_id"].as_str().unwrap_or_default().to_string();
                let replies: Vec<Value> = match v["type"].as_str() {
                    Some("proxy_websocket_start") => {
                        // Binary message, channel 1 (stdout): the cluster's name.
                        let mut data = vec![2u8, 1u8];
                        data.extend_from_slice(cluster.as_bytes());
                        let data = base64::engine::general_purpose::STANDARD.encode(data);
                        vec![
                            json!({"type": "proxy_websocket_started", "request_id": id,
                                   "payload": {"stream_id": id, "protocol": "v5.channel.k8s.io"}}),
                            json!({"type": "proxy_websocket_data", "request_id": id,
                                   "payload": {"stream_id": id, "data": data}}),
                            json!({"type": "proxy_websocket_close", "request_id": id,
                                   "payload": {"stream_id": id, "code": 1000, "reason": ""}}),
                        ]
                    }
                    Some("ping") => vec![json!({"type": "pong", "request_id": id, "payload": {}})],
                    _ => Vec::new(),
                };
                for reply in replies {
                    if tx.send(Message::text(reply.to_string())).await.is_err() {
                        return Err("tunnel lost".into());
                    }
                }
            }
        }
    }
}

/// One exec as a user: seconds from connect to the first stdout byte, and that byte's text.
async fn exec(
    addr: SocketAddr,
    tls: TlsConnector,
    cluster: &str,
    token: &str,
) -> Result<(f64, String), String> {
    let started = Instant::now();
    let url = format!(
        "wss://{addr}/clusters/{cluster}/api/v1/namespaces/default/pods/demo/exec?command=hostname&stdout=true"
    );
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    let h = request.headers_mut();
    h.insert("Authorization", format!("Bearer {token}").parse().unwrap());
    h.insert(
        "Sec-WebSocket-Protocol",
        "v5.channel.k8s.io".parse().unwrap(),
    );
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let stream = tls
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if b.first() == Some(&1) => {
                let secs = started.elapsed().as_secs_f64();
                let text = String::from_utf8_lossy(&b[1..]).into_owned();
                let _ = ws.close(None).await;
                return Ok((secs, text));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed before stdout".into()),
        }
    }
}

fn machine() -> String {
    format!("{}, Linux loopback", tether_e2e::proc::machine_line())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = parse_args();
    let limit = raise_nofile(2 * args.agents as u64 + 4096);
    println!("agents: open-file limit {limit}");
    let dir = tempfile::Builder::new()
        .prefix("tether-bench-agents-")
        .tempdir()
        .expect("temp dir");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();

    // 1. The registry.
    let t = Instant::now();
    let registry = Registry::open(&Registry::sqlite_url(&state))
        .await
        .expect("registry");
    let user_token = registry.add_user("bench").await.expect("user");
    let mut tokens = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        let name = cluster_name(i);
        tokens.push(registry.add_cluster(&name).await.expect("cluster"));
        registry.grant("bench", &name, &[]).await.expect("grant");
    }
    drop(registry);
    let populate_s = t.elapsed().as_secs_f64();
    println!(
        "agents: registry of {} clusters and grants in {populate_s:.1} s",
        args.agents
    );

    // 2. The control plane.
    let log = dir.path().join("control-plane.log");
    let (cp, addr): (Proc, SocketAddr) = spawn_listening("tether-control-plane", &log, |addr| {
        let mut cmd = clean_command(&bins().control_plane);
        cmd.arg("serve").arg("--listen").arg(addr.to_string());
        cmd.arg("--state-dir").arg(&state);
        cmd.env("TETHER_LOG", "warn");
        cmd
    });
    let pid = cp.pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(pid);
    let ca =
        std::fs::read_to_string(state.join("tls.crt")).expect("the control plane's certificate");
    let tls = TlsConnector::from(client_config(&ca));

    // 3. Connect.
    let registered = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let connect_started = Instant::now();
    for (i, token) in tokens.into_iter().enumerate() {
        let (tls, registered, failed, gate) = (
            tls.clone(),
            registered.clone(),
            failed.clone(),
            gate.clone(),
        );
        let cluster = cluster_name(i);
        let permit = gate.clone().acquire_owned().await.unwrap();
        tokio::spawn(async move {
            let end = agent(addr, tls, cluster.clone(), token, registered, permit).await;
            if !FINISHED.load(Ordering::Relaxed) {
                failed.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = end {
                    eprintln!("agent {cluster}: {e}");
                }
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while registered.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < args.agents as u64 {
        assert!(
            Instant::now() < deadline,
            "agents did not all register within 10 min"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    let connected = registered.load(Ordering::Relaxed);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "agents failed to connect; control plane log: {}",
        log.display()
    );
    println!(
        "agents: {connected} registered in {connect_s:.1} s ({:.0}/s)",
        connected as f64 / connect_s
    );

    // 4. Idle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu0 = tether_e2e::proc::cpu_seconds(pid);
    let idle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let idle_cpu =
        (tether_e2e::proc::cpu_seconds(pid) - cpu0) / idle_started.elapsed().as_secs_f64();
    let rss_idle = rss_kib(pid);
    let per_agent_kib = (rss_idle.saturating_sub(rss_before)) as f64 / connected as f64;
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "agents lost their tunnels while idle"
    );
    println!(
        "agents: idle {:.1} s: control plane CPU {:.2} % of a core, RSS {:.1} MiB ({per_agent_kib:.1} KiB per agent)",
        idle_started.elapsed().as_secs_f64(),
        idle_cpu * 100.0,
        rss_idle as f64 / 1024.0
    );

    // 5. Execs to random clusters.
    let gate = Arc::new(tokio::sync::Semaphore::new(args.exec_concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let execs_started = Instant::now();
    for _ in 0..args.execs {
        let cluster = cluster_name(fastrand::usize(0..args.agents));
        let (tls, token, gate) = (tls.clone(), user_token.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let got = exec(addr, tls, &cluster, &token).await;
            (cluster, got)
        });
    }
    let mut latencies = Vec::with_capacity(args.execs);
    while let Some(done) = tasks.join_next().await {
        let (cluster, got) = done.expect("exec task");
        let (secs, text) = got.unwrap_or_else(|e| panic!("exec to {cluster}: {e}"));
        assert_eq!(text, cluster, "the exec reached another cluster's agent");
        latencies.push(secs * 1000.0);
    }
    let execs_s = execs_started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(0.0),
    );
    let rss_peak = tether_e2e::proc::proc_status_kib(pid, "VmHWM:").unwrap_or(0);
    println!(
        "agents: {} execs in {execs_s:.1} s: first byte p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms; control plane peak RSS {:.1} MiB",
        latencies.len(),
        rss_peak as f64 / 1024.0
    );

    write_report(
        &args,
        &Report {
            machine: machine(),
            agents: connected,
            populate_s,
            connect_s,
            rss_before_kib: rss_before,
            rss_idle_kib: rss_idle,
            rss_peak_kib: rss_peak,
            per_agent_kib,
            idle_cpu_pct: idle_cpu * 100.0,
            idle_s: idle_started.elapsed().as_secs_f64(),
            execs: latencies.len(),
            exec_p50_ms: p50,
            exec_p99_ms: p99,
            exec_max_ms: max,
        },
    );
    FINISHED.store(true, Ordering::Relaxed);
    drop(cp);
}

/// Set once the figures are taken: agents losing their tunnel to the control plane's stop are
/// not failures.
static FINISHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

struct Report {
    machine: String,
    agents: u64,
    populate_s: f64,
    connect_s: f64,
    rss_before_kib: u64,
    rss_idle_kib: u64,
    rss_peak_kib: u64,
    per_agent_kib: f64,
    idle_cpu_pct: f64,
    idle_s: f64,
    execs: usize,
    exec_p50_ms: f64,
    exec_p99_ms: f64,
    exec_max_ms: f64,
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn write_report(args: &Args, r: &Report) {
    std::fs::create_dir_all(&args.out).expect("out dir");
    let rate = r.agents as f64 / r.connect_s;
    let rss_mib = r.rss_idle_kib as f64 / 1024.0;
    let md = format!(
        "| figure | value | target |\n|---|---|---|\n\
         | agents connected (TLS, WebSocket, register) | {agents} | 10 000 |\n\
         | connect rate | {rate:.0} agents/s ({connect:.1} s for all, {conc} handshakes at a time) | |\n\
         | control-plane RSS, all connected and idle | {rss_mib:.1} MiB (before the first agent: {before:.1} MiB) | <= 1 GiB: {v_rss} |\n\
         | memory per agent (RSS growth / agents) | {per:.1} KiB | <= 100 KiB: {v_per} |\n\
         | control-plane CPU while idle ({idle:.0} s, heartbeats every 30 s, pings) | {cpu:.2} % of one core | <= 5 %: {v_cpu} |\n\
         | exec first byte on a random cluster, p50 / p99 / max ({execs} execs, {ec} at a time) | {p50:.2} / {p99:.2} / {max:.2} ms | p99 <= 50 ms: {v_exec} |\n\
         | control-plane peak RSS | {peak:.1} MiB | |\n\
         | registry populated ({agents} clusters, {agents} grants, SQLite) | {pop:.1} s | |\n",
        agents = r.agents,
        connect = r.connect_s,
        conc = args.concurrency,
        before = r.rss_before_kib as f64 / 1024.0,
        v_rss = verdict(rss_mib <= 1024.0),
        per = r.per_agent_kib,
        v_per = verdict(r.per_agent_kib <= 100.0),
        idle = r.idle_s,
        cpu = r.idle_cpu_pct,
        v_cpu = verdict(r.idle_cpu_pct <= 5.0),
        execs = r.execs,
        ec = args.exec_concurrency,
        p50 = r.exec_p50_ms,
        p99 = r.exec_p99_ms,
        max = r.exec_max_ms,
        v_exec = verdict(r.exec_p99_ms <= 50.0),
        peak = r.rss_peak_kib as f64 / 1024.0,
        pop = r.populate_s,
    );
    let md = format!(
        "# Scale: agents on one control-plane replica\n\n\
         Written by `cargo xtask bench --only agents --publish` \
         (`tests/e2e/examples/agents/`). Machine: {machine}.\n\n\
         One `tether-control-plane serve` (release build, TLS with its self-signed certificate, the \
         default SQLite registry in its state directory holding every cluster, agent token hash \
         and grant) and one load-generator process holding every simulated agent, both on this \
         machine. Each simulated agent does what a Tether agent does at rest: TLS, the WebSocket \
         upgrade with its cluster's token (looked up in the registry), `register` with Tether's \
         compat extensions, a `heartbeat` every 30 s, a ping after 20 s of hearing nothing. An \
         exec is a real WebSocket upgrade to `/clusters/<c>/.../exec` as a registry user with a \
         grant on every cluster; the agent acknowledges the start and writes its cluster's name, \
         which the client checks. CPU and RSS are the control plane's own, from `/proc`.\n\n\
         Replicas share the fleet through **Redis** (which replica holds which cluster's tunnel, \
         under leases); a user's request reaching a replica without the tunnel is carried to the \
         one with it. Design, failure cases and the profile behind these figures: \
         [docs/fleet.md](../fleet.md).\n\n{md}",
        machine = r.machine
    );
    std::fs::write(args.out.join("scale.md"), &md).expect("write scale.md");
    let json = json!({
        "machine": r.machine,
        "agents": r.agents,
        "connect_s": r.connect_s,
        "connect_per_s": rate,
        "rss_before_kib": r.rss_before_kib,
        "rss_idle_kib": r.rss_idle_kib,
        "rss_peak_kib": r.rss_peak_kib,
        "per_agent_kib": r.per_agent_kib,
        "idle_cpu_pct": r.idle_cpu_pct,
        "idle_s": r.idle_s,
        "execs": r.execs,
        "exec_first_byte_ms": {"p50": r.exec_p50_ms, "p99": r.exec_p99_ms, "max": r.exec_max_ms},
        "registry_populate_s": r.populate_s,
    });
    std::fs::write(
        args.out.join("scale.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .expect("write scale.json");
    print!("{md}");
}
