//! The agent end to end, with real processes and sockets on 127.0.0.1: the `tether-agent` binary,
//! kubesim (TLS + token) as the Kubernetes API, and a scripted control plane speaking the compat
//! JSON envelopes.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

struct Setup {
    _files: Files,
    _kube: kubesim::Handle,
    cp: ControlPlane,
    agent: AgentProcess,
}

async fn setup() -> Setup {
    setup_with(&[]).await
}

/// The standard setup with `extra` agent arguments.
async fn setup_with(extra: &[&str]) -> Setup {
    let files = Files::new();
    let kube_tls = make_tls();
    let cp_tls = make_tls();
    let kube = kubesim(&kube_tls).await;
    let cp = ControlPlane::start(&cp_tls).await;
    let args = agent_args(
        &cp.url(),
        &files.write("cp-ca.pem", &cp_tls.ca_pem),
        kube.addr(),
        &files.write("kube-token", &format!("{KUBE_TOKEN}\n")),
        &files.write("kube-ca.pem", &kube_tls.ca_pem),
    );
    let mut args = args;
    args.extend(extra.iter().map(|s| s.to_string()));
    let agent = AgentProcess::spawn(&args);
    Setup {
        _files: files,
        _kube: kube,
        cp,
        agent,
    }
}

fn start(stream: &str, path: &str, query: &str) -> Value {
    json!({
        "type": "proxy_websocket_start",
        "request_id": stream,
        "payload": {
            "stream_id": stream,
            "method": "GET",
            "path": path,
            "query": query,
            "headers": {"Sec-WebSocket-Protocol": ["v5.channel.k8s.io"], "User-Agent": ["kubectl/v1.32.4"]}
        },
        "timestamp": "2026-11-26T10:00:00Z"
    })
}

fn data(stream: &str, opcode: u8, payload: &[u8]) -> Value {
    json!({
        "type": "proxy_websocket_data",
        "request_id": stream,
        "payload": {"stream_id": stream, "data": frame(opcode, payload)},
        "timestamp": "2026-11-26T10:00:00Z"
    })
}

/// Collects what the agent sends for `stream` until its `proxy_websocket_close`: the v5 channel
/// bytes (channel -> bytes) and the close envelope.
async fn collect_stream(a: &mut Agentside, stream: &str) -> (Vec<Vec<u8>>, Value) {
    let mut channels = vec![Vec::new(); 4];
    loop {
        let v = a.recv_skip_heartbeat().await;
        assert_eq!(v["request_id"], stream, "unexpected message {v}");
        match v["type"].as_str().unwrap() {
            "proxy_websocket_data" => {
                let raw = unbase64(&v["payload"]["data"]);
                assert_eq!(raw[0], 2, "kubesim sends binary v5 frames: {raw:?}");
                let channel = raw[1] as usize;
                channels[channel].extend_from_slice(&raw[2..]);
            }
            "proxy_websocket_close" => return (channels, v),
            other => panic!("unexpected {other}: {v}"),
        }
    }
}

/// A free port on 127.0.0.1 (bound then released).
fn free_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A plain HTTP/1.1 GET; the whole response as text.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of a metric in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
        .parse()
        .unwrap()
}

/// The next message that is not a data frame of stream `skip` (whose stdout is kept).
async fn recv_other(a: &mut Agentside, skip: &str, stdout: &mut Vec<u8>) -> Value {
    loop {
        let v = a.recv_skip_heartbeat().await;
        if v["type"] == "proxy_websocket_data" && v["request_id"] == skip {
            let raw = unbase64(&v["payload"]["data"]);
            assert_eq!(raw[1], 1, "only stdout expected: {raw:?}");
            stdout.extend_from_slice(&raw[2..]);
            continue;
        }
        return v;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_round_trip_keeps_bytes_status_and_close_code() {
    let s = setup().await;
    let mut a = s.cp.accept_registered().await;

    // Stdin bytes go through whole, the exit status and the close code come back.
    let stream = "exec-1";
    a.send(start(
        stream,
        "/api/v1/namespaces/default/pods/demo/exec",
        "command=sh&command=-c&command=cat%3B%20exit%203&stdin=true&stdout=true&stderr=true",
    ))
    .await;
    let started = a.recv_skip_heartbeat().await;
    assert_eq!(started["type"], "proxy_websocket_started", "{started}");
    assert_eq!(started["payload"]["protocol"], "v5.channel.k8s.io");

    let mut payload = vec![0u8]; // stdin channel
    let binary: Vec<u8> = (0u8..=255)
        .chain(b"\nhello tether\n".iter().copied())
        .collect();
    payload.extend_from_slice(&binary);
    a.send(data(stream, 2, &payload)).await;
    a.send(data(stream, 2, &[255, 0])).await; // v5: close stdin

    let (channels, close) = collect_stream(&mut a, stream).await;
    assert_eq!(
        channels[1], binary,
        "stdout must be the stdin bytes, intact"
    );
    let status: Value = serde_json::from_slice(&channels[3]).unwrap();
    assert_eq!(status["status"], "Failure", "{status}");
    assert_eq!(status["reason"], "NonZeroExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "3");
    assert_eq!(close["payload"]["code"], 1000, "{close}");
    drop(s.agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_streams_get_errors_and_others_are_untouched() {
    let s = setup().await;
    let mut a = s.cp.accept_registered().await;

    // A long-lived stream that must survive the bad input around it.
    a.send(start(
        "live",
        "/api/v1/namespaces/default/pods/demo/exec",
        "command=cat&stdin=true&stdout=true",
    ))
    .await;
    assert_eq!(
        a.recv_skip_heartbeat().await["type"],
        "proxy_websocket_started"
    );

    let mut live_stdout = Vec::new();
    // Outside the Kubernetes API: refused before any dial.
    a.send(start("bad-path", "/etc/passwd", "")).await;
    let e = recv_other(&mut a, "live", &mut live_stdout).await;
    assert_eq!(e["type"], "proxy_error", "{e}");
    assert_eq!(e["request_id"], "bad-path");

    // The upstream refuses (no such pod): its HTTP status comes back, then the close.
    a.send(start(
        "no-pod",
        "/api/v1/namespaces/default/pods/nope/exec",
        "command=true&stdout=true",
    ))
    .await;
    let e = recv_other(&mut a, "live", &mut live_stdout).await;
    assert_eq!(e["type"], "proxy_error", "{e}");
    assert_eq!(e["payload"]["status"], 404, "{e}");
    let c = recv_other(&mut a, "live", &mut live_stdout).await;
    assert_eq!(c["type"], "proxy_websocket_close");
    assert_eq!(c["request_id"], "no-pod");

    // Bad base64 for the live stream is answered, and the stream still works after it.
    a.send(json!({"type": "proxy_websocket_data", "request_id": "live",
                  "payload": {"stream_id": "live", "data": "!!!"}}))
        .await;
    let e = recv_other(&mut a, "live", &mut live_stdout).await;
    assert_eq!(e["type"], "proxy_error", "{e}");
    a.send(data("live", 2, b"\0still here\n")).await;
    a.send(data("live", 2, &[255, 0])).await;
    let (channels, close) = collect_stream(&mut a, "live").await;
    live_stdout.extend_from_slice(&channels[1]);
    assert_eq!(live_stdout, b"still here\n");
    assert_eq!(close["payload"]["code"], 1000);

    // Raw TCP tunnels reach beyond the Kubernetes API: without --allow-tcp, refused with a
    // clear close naming the target and the flag.
    a.send(json!({"type": "tcp_tunnel_start", "request_id": "t1",
                  "payload": {"tunnel_id": "t1", "service_name": "db",
                              "service_namespace": "default", "service_port": 5432}}))
        .await;
    let c = a.recv_skip_heartbeat().await;
    assert_eq!(c["type"], "tcp_tunnel_close", "{c}");
    assert_eq!(c["payload"]["reason"], "connection_failed", "{c}");
    assert!(
        c["payload"]["error"]
            .as_str()
            .unwrap()
            .contains("TCP to db:5432 is not allowed on this agent (--allow-tcp)"),
        "{c}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_requests_get_pod_and_stream_logs_until_cancelled() {
    let s = setup().await;
    let mut a = s.cp.accept_registered().await;

    // A buffered GET.
    a.send(json!({"type": "proxy_request", "request_id": "get-1",
                  "payload": {"method": "GET", "path": "/api/v1/namespaces/default/pods/demo",
                              "headers": {"Accept": ["application/json"]}}}))
        .await;
    let r = a.recv_skip_heartbeat().await;
    assert_eq!(r["type"], "proxy_response", "{r}");
    assert_eq!(r["request_id"], "get-1");
    assert_eq!(r["payload"]["status"], 200);
    let pod: Value = serde_json::from_slice(&unbase64(&r["payload"]["body"])).unwrap();
    assert_eq!(pod["metadata"]["name"], "demo");

    // A streamed `logs -f`.
    a.send(json!({"type": "proxy_request", "request_id": "logs-1",
                  "payload": {"method": "GET", "path": "/api/v1/namespaces/default/pods/demo/log",
                              "query": "follow=true", "supports_response_streaming": true}}))
        .await;
    let h = a.recv_skip_heartbeat().await;
    assert_eq!(h["type"], "proxy_response_header", "{h}");
    assert_eq!(h["payload"]["status"], 200);

    // Make the container log something: attach to its main process and type a command.
    a.send(start(
        "attach-1",
        "/api/v1/namespaces/default/pods/demo/attach",
        "container=main&stdin=true&stdout=true",
    ))
    .await;
    assert_eq!(
        a.recv_skip_heartbeat().await["type"],
        "proxy_websocket_started"
    );
    a.send(data("attach-1", 2, b"\0echo first-log-line\n"))
        .await;
    let mut log = Vec::new();
    while !String::from_utf8_lossy(&log).contains("first-log-line") {
        let v = a.recv_skip_heartbeat().await;
        match (
            v["type"].as_str().unwrap(),
            v["request_id"].as_str().unwrap(),
        ) {
            ("proxy_response_chunk", "logs-1") => log.extend(unbase64(&v["payload"]["data"])),
            ("proxy_websocket_data", "attach-1") => {}
            other => panic!("unexpected {other:?}: {v}"),
        }
    }

    // proxy_cancel really cancels: later log output is not relayed for that request.
    a.send(json!({"type": "proxy_cancel", "request_id": "logs-1", "payload": {}}))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.send(data("attach-1", 2, b"\0echo second-log-line\n"))
        .await;
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Some(v) = a.try_recv(until - tokio::time::Instant::now()).await {
        assert_ne!(
            v["request_id"], "logs-1",
            "cancelled request still answered: {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_proxy_request_is_answered_only_after_the_upstream() {
    let s = setup().await;
    let mut a = s.cp.accept_registered().await;
    a.send(json!({"type": "proxy_request", "request_id": "up-1",
                  "payload": {"method": "GET", "path": "/api/v1/namespaces/default/pods/demo/exec",
                              "query": "command=echo&command=via-request&stdout=true",
                              "headers": {"Upgrade": ["websocket"], "Connection": ["Upgrade"],
                                          "Sec-WebSocket-Protocol": ["v5.channel.k8s.io"]},
                              "is_websocket": true, "supports_response_streaming": true}}))
        .await;
    let mut saw_header = false;
    let mut stdout = Vec::new();
    loop {
        let v = a.recv_skip_heartbeat().await;
        assert_eq!(v["request_id"], "up-1", "{v}");
        match v["type"].as_str().unwrap() {
            "proxy_response_header" => {
                assert_eq!(v["payload"]["status"], 101);
                assert_eq!(
                    v["payload"]["headers"]["Sec-WebSocket-Protocol"][0],
                    "v5.channel.k8s.io"
                );
                saw_header = true;
            }
            "proxy_response_end" | "proxy_websocket_started" => {}
            "proxy_websocket_data" => {
                assert!(saw_header, "data before the 101 answer");
                let raw = unbase64(&v["payload"]["data"]);
                if raw[1] == 1 {
                    stdout.extend_from_slice(&raw[2..]);
                }
            }
            "proxy_websocket_close" => break,
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(saw_header);
    assert_eq!(stdout, b"via-request\n");

    // A refused upgrade is answered with the upstream's status, not a made-up 200.
    a.send(json!({"type": "proxy_request", "request_id": "up-2",
                  "payload": {"path": "/api/v1/namespaces/default/pods/nope/exec",
                              "query": "command=true&stdout=true", "is_websocket": true,
                              "protocol": "v5.channel.k8s.io"}}))
        .await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let v = a.recv_skip_heartbeat().await;
        if v["type"] == "proxy_response" {
            statuses.push(v["payload"]["status"].clone());
        }
    }
    assert_eq!(statuses, [json!(404)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_is_one_line_and_no_hot_loop() {
    let files = Files::new();
    let cp_tls = make_tls();
    let cp = ControlPlane::start(&cp_tls).await;
    let args = agent_args(
        &cp.url(),
        &files.write("cp-ca.pem", &cp_tls.ca_pem),
        "127.0.0.1:9".parse().unwrap(),
        &files.write("kube-token", KUBE_TOKEN),
        &files.write("kube-ca.pem", &cp_tls.ca_pem),
    );
    let agent = AgentProcess::spawn(&args);
    let (_, auth, ws) = cp.accept_with(401, Duration::from_secs(20)).await;
    assert!(ws.is_none());
    assert_eq!(auth.as_deref(), Some(&*format!("Bearer {AGENT_TOKEN}")));
    // No second attempt for a good while (the retry waits about the backoff cap).
    assert!(
        !cp.connects_within(Duration::from_secs(4)).await,
        "the agent retried a 401 within 4 s"
    );
    let logs = agent.logs();
    let lines: Vec<&String> = logs.iter().filter(|l| l.contains("HTTP 401")).collect();
    assert_eq!(lines.len(), 1, "expected one line about the 401: {logs:#?}");
    assert!(
        lines[0].contains("rejected the agent token"),
        "{}",
        lines[0]
    );
    assert!(
        logs.iter()
            .all(|l| !l.contains(AGENT_TOKEN) && !l.contains(KUBE_TOKEN)),
        "a token was logged: {logs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_control_plane_drops_the_socket() {
    let s = setup().await;
    let a = s.cp.accept_registered().await;
    // Drop the TCP connection without a close handshake.
    drop(a);
    let started = tokio::time::Instant::now();
    let mut b = s.cp.accept_registered().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "reconnect took {:?}",
        started.elapsed()
    );
    // The new session works.
    b.send(json!({"type": "ping", "request_id": "p1", "payload": {}}))
        .await;
    let pong = b.recv_skip_heartbeat().await;
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong["request_id"], "p1");
    assert!(
        s.agent.logs().iter().any(|l| l.contains("tunnel lost")),
        "{:#?}",
        s.agent.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabytes_both_ways_arrive_intact_and_in_order() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;

    let metrics_addr = free_addr();
    let s = setup_with(&["--metrics-listen", &metrics_addr.to_string()]).await;
    let mut a = s.cp.accept_registered().await;
    // The process reads nothing for 2 s: stdin backs up through kubesim into the agent.
    a.send(start(
        "big",
        "/api/v1/namespaces/default/pods/demo/exec",
        "command=sh&command=-c&command=sleep%202%3B%20cat&stdin=true&stdout=true",
    ))
    .await;
    assert_eq!(
        a.recv_skip_heartbeat().await["type"],
        "proxy_websocket_started"
    );

    // 300 messages of 32 KiB (9.6 MiB): far beyond the rings (100 messages, 1 MiB) and the
    // agent's queues, so every pause path runs. The control plane writes and reads at once.
    const MESSAGES: usize = 300;
    const SIZE: usize = 32 * 1024;
    let expected: Vec<u8> = (0..MESSAGES * SIZE)
        .map(|i| (i % 251) as u8 ^ (i / SIZE) as u8)
        .collect();
    let (mut sink, mut source) = a.ws.split();
    let to_send = expected.clone();
    let writer = tokio::spawn(async move {
        for chunk in to_send.chunks(SIZE) {
            let mut payload = vec![0u8];
            payload.extend_from_slice(chunk);
            sink.send(Message::text(data("big", 2, &payload).to_string()))
                .await
                .unwrap();
        }
        sink.send(Message::text(data("big", 2, &[255, 0]).to_string()))
            .await
            .unwrap();
        sink
    });
    // Then the control plane reads nothing for a while: the agent's writes to the tunnel back up,
    // and everything behind them (upstream reads, the echoing process, kubesim) must wait.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut stdout = Vec::new();
    let close = loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), source.next())
            .await
            .expect("stalled")
            .unwrap()
            .unwrap();
        let Message::Text(text) = msg else { continue };
        let v: Value = serde_json::from_str(&text).unwrap();
        match v["type"].as_str().unwrap() {
            "heartbeat" => {}
            "proxy_websocket_data" => {
                let raw = unbase64(&v["payload"]["data"]);
                if raw[1] == 1 {
                    stdout.extend_from_slice(&raw[2..]);
                }
            }
            "proxy_websocket_close" => break v,
            other => panic!("unexpected {other}: {v}"),
        }
    };
    let _ = writer.await.unwrap();
    assert_eq!(stdout.len(), expected.len());
    assert!(stdout == expected, "bytes were lost or reordered");
    // The test is only meaningful if the tunnel reader really had to wait for a full stream.
    let metrics = http_get(metrics_addr, "/metrics").await;
    assert!(
        metric(&metrics, "tether_agent_tunnel_pauses_total") > 0,
        "no tunnel pause happened; the test did not exercise backpressure:\n{metrics}"
    );
    assert_eq!(
        metric(&metrics, "tether_agent_bytes_to_upstream_total"),
        (MESSAGES * (SIZE + 1) + 2) as u64,
        "{metrics}"
    );
    assert_eq!(close["payload"]["code"], 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfig_and_metrics_endpoint() {
    let files = Files::new();
    let kube_tls = make_tls();
    let cp_tls = make_tls();
    let kube = kubesim(&kube_tls).await;
    let cp = ControlPlane::start(&cp_tls).await;
    let ca_path = files.write("kube-ca.pem", &kube_tls.ca_pem);
    let kubeconfig = files.write(
        "kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: sim\nclusters:\n- name: sim\n  cluster:\n    server: https://{}\n    certificate-authority: {}\ncontexts:\n- name: sim\n  context: {{cluster: sim, user: me}}\nusers:\n- name: me\n  user: {{token: {KUBE_TOKEN}}}\n",
            kube.addr(),
            ca_path.display()
        ),
    );
    let metrics_addr = free_addr();
    let args: Vec<String> = [
        "--control-plane",
        &cp.url(),
        "--token",
        AGENT_TOKEN,
        "--ca-file",
        files.write("cp-ca.pem", &cp_tls.ca_pem).to_str().unwrap(),
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--metrics-listen",
        &metrics_addr.to_string(),
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let agent = AgentProcess::spawn(&args);
    let mut a = cp.accept_registered().await;
    a.send(start(
        "m1",
        "/api/v1/namespaces/default/pods/demo/exec",
        "command=echo&command=metered&stdout=true",
    ))
    .await;
    assert_eq!(
        a.recv_skip_heartbeat().await["type"],
        "proxy_websocket_started"
    );
    let (channels, _) = collect_stream(&mut a, "m1").await;
    assert_eq!(channels[1], b"metered\n");

    let get = |path: &'static str| http_get(metrics_addr, path);
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    let metrics = get("/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    let value = |name: &str| metric(&metrics, name);
    assert_eq!(value("tether_agent_streams_opened_total"), 1);
    assert_eq!(value("tether_agent_streams_closed_total"), 1);
    assert!(value("tether_agent_bytes_to_tunnel_total") >= b"metered\n".len() as u64);
    assert_eq!(value("tether_agent_tunnel_connected"), 1);
    // JSON logs: one object per line.
    let logs = agent.logs();
    assert!(!logs.is_empty());
    for line in &logs {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
}

struct EchoSetup {
    _files: Files,
    api: EchoApi,
    cp: ControlPlane,
    _agent: AgentProcess,
}

/// The agent with `--kube-url http://<echo api>` and a token file.
async fn echo_setup() -> EchoSetup {
    let files = Files::new();
    let cp_tls = make_tls();
    let api = EchoApi::start().await;
    let cp = ControlPlane::start(&cp_tls).await;
    let args: Vec<String> = [
        "--control-plane",
        &cp.url(),
        "--token",
        AGENT_TOKEN,
        "--ca-file",
        files.write("cp-ca.pem", &cp_tls.ca_pem).to_str().unwrap(),
        "--kube-url",
        &format!("http://{}", api.addr),
        "--kube-token-file",
        files.write("kube-token", KUBE_TOKEN).to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let agent = AgentProcess::spawn(&args);
    EchoSetup {
        _files: files,
        api,
        cp,
        _agent: agent,
    }
}

fn echoed(r: &Value) -> Value {
    assert_eq!(r["type"], "proxy_response", "{r}");
    assert_eq!(r["payload"]["status"], 200, "{r}");
    serde_json::from_slice(&unbase64(&r["payload"]["body"])).unwrap()
}

fn header<'a>(echo: &'a Value, name: &str) -> Vec<&'a str> {
    echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == name)
        .map(|h| h[1].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_headers_and_credentials_reach_the_api() {
    let s = echo_setup().await;
    let mut a = s.cp.accept_registered().await;

    // Inline base64 body; hop-by-hop headers dropped, impersonation kept, the control plane's
    // credential used.
    a.send(json!({"type": "proxy_request", "request_id": "post-1",
                  "payload": {"method": "POST", "path": "/api/echo", "query": "dryRun=All",
                              "headers": {"Impersonate-User": ["alice"], "Impersonate-Group": ["dev", "ops"],
                                          "Connection": ["X-Hop"], "X-Hop": ["1"], "Keep-Alive": ["5"],
                                          "Authorization": ["Bearer from-control-plane"],
                                          "Content-Type": ["application/json"]},
                              "body": "eyJhIjoxfQ==", "body_encoding": "base64"}}))
    .await;
    let echo = echoed(&a.recv_skip_heartbeat().await);
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/api/echo");
    assert_eq!(echo["query"], "dryRun=All");
    assert_eq!(echo["body"], "{\"a\":1}");
    assert_eq!(header(&echo, "impersonate-user"), ["alice"]);
    assert_eq!(header(&echo, "impersonate-group"), ["dev", "ops"]);
    assert!(header(&echo, "x-hop").is_empty(), "{echo}");
    assert!(header(&echo, "keep-alive").is_empty(), "{echo}");
    assert_eq!(
        header(&echo, "authorization"),
        ["Bearer from-control-plane"]
    );
    assert_eq!(header(&echo, "content-length"), ["7"]);

    // Streamed body in chunks; no Authorization from the control plane: the agent's own token.
    a.send(json!({"type": "proxy_request", "request_id": "put-1",
                  "payload": {"method": "PUT", "path": "/api/echo", "use_streaming": true}}))
        .await;
    for piece in ["first ", "second ", "third"] {
        use base64::Engine as _;
        let data = base64::engine::general_purpose::STANDARD.encode(piece);
        a.send(json!({"type": "proxy_request_chunk", "request_id": "put-1", "payload": {"data": data}}))
            .await;
    }
    a.send(json!({"type": "proxy_request_stream_end", "request_id": "put-1", "payload": {}}))
        .await;
    let echo = echoed(&a.recv_skip_heartbeat().await);
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["body"], "first second third");
    assert_eq!(
        header(&echo, "authorization"),
        [format!("Bearer {KUBE_TOKEN}").as_str()]
    );

    // A path outside the Kubernetes API is refused without reaching it.
    a.send(json!({"type": "proxy_request", "request_id": "evil",
                  "payload": {"method": "GET", "path": "/../../etc/passwd"}}))
        .await;
    let r = a.recv_skip_heartbeat().await;
    assert_eq!(r["type"], "proxy_response", "{r}");
    assert_eq!(r["payload"]["status"], 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeouts_and_cancels_drop_the_upstream() {
    use std::sync::atomic::Ordering;

    let s = echo_setup().await;
    let mut a = s.cp.accept_registered().await;
    let wait_hanging = |n: usize| {
        let hanging = s.api.hanging.clone();
        async move {
            let until = tokio::time::Instant::now() + Duration::from_secs(5);
            while hanging.load(Ordering::SeqCst) != n {
                assert!(
                    tokio::time::Instant::now() < until,
                    "expected {n} live upstream requests, saw {}",
                    hanging.load(Ordering::SeqCst)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // Timeout: 504, and the upstream request is abandoned.
    a.send(json!({"type": "proxy_request", "request_id": "slow-1",
                  "payload": {"path": "/api/hang", "timeout": 700}}))
        .await;
    wait_hanging(1).await;
    let r = a.recv_skip_heartbeat().await;
    assert_eq!(r["type"], "proxy_response", "{r}");
    assert_eq!(r["request_id"], "slow-1");
    assert_eq!(r["payload"]["status"], 504);
    wait_hanging(0).await;

    // Cancel: nothing more is answered, and the upstream request is dropped.
    a.send(json!({"type": "proxy_request", "request_id": "slow-2",
                  "payload": {"path": "/api/hang", "supports_response_streaming": true}}))
        .await;
    wait_hanging(1).await;
    a.send(json!({"type": "proxy_cancel", "request_id": "slow-2", "payload": {}}))
        .await;
    wait_hanging(0).await;
    if let Some(v) = a.try_recv(Duration::from_millis(500)).await {
        assert_ne!(v["request_id"], "slow-2", "cancelled request answered: {v}");
    }
}

/// A streamed request body the Kubernetes API does not take stops only that request: once its
/// 16-chunk queue and the socket to the API are full the agent stops reading the tunnel, and after
/// the pause limit (30 s) that request alone fails with 504 and reading resumes, well before the
/// 60 s read deadline would have declared the whole tunnel dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_nobody_reads_fails_that_request_alone() {
    use base64::Engine as _;
    use std::sync::atomic::Ordering;

    let s = echo_setup().await;
    let mut a = s.cp.accept_registered().await;
    a.send(json!({"type": "proxy_request", "request_id": "stall-1",
                  "payload": {"method": "PUT", "path": "/api/hang", "use_streaming": true}}))
        .await;
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.api.hanging.load(Ordering::SeqCst) != 1 {
        assert!(
            tokio::time::Instant::now() < until,
            "the upstream never saw the request"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 10 MiB: more than the API's socket and the agent's body queue hold. A send may block once
    // the agent stops reading; it goes on when the agent reads again.
    let chunk = base64::engine::general_purpose::STANDARD.encode(vec![b'x'; 64 * 1024]);
    let started = tokio::time::Instant::now();
    for _ in 0..160 {
        a.send(
            json!({"type": "proxy_request_chunk", "request_id": "stall-1",
                      "payload": {"data": chunk}}),
        )
        .await;
    }
    let r = loop {
        let r = a
            .try_recv(Duration::from_secs(45))
            .await
            .expect("no answer for the stalled request before the read deadline");
        if r["type"] != "heartbeat" {
            break r;
        }
    };
    assert_eq!(r["type"], "proxy_response", "{r}");
    assert_eq!(r["request_id"], "stall-1", "{r}");
    assert_eq!(r["payload"]["status"], 504, "{r}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(25) && waited < Duration::from_secs(55),
        "failed after {waited:?}, not at the 30 s pause limit"
    );
    // The same tunnel serves the next request.
    a.send(json!({"type": "proxy_request", "request_id": "after",
                  "payload": {"method": "POST", "path": "/api/echo", "body": "b2s=", "body_encoding": "base64"}}))
        .await;
    let echo = echoed(&a.recv_skip_heartbeat().await);
    assert_eq!(echo["body"], "ok");
    // One warning for that request, and the tunnel was never lost.
    let logs = s._agent.logs();
    let warned = logs
        .iter()
        .filter(|l| l.contains("stopped taking the request body") && l.contains("stall-1"))
        .count();
    assert_eq!(warned, 1, "{logs:#?}");
    assert!(
        !logs.iter().any(|l| l.contains("tunnel lost")),
        "the tunnel was lost: {logs:#?}"
    );
}
