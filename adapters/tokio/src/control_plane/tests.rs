//! Real sockets on 127.0.0.1: a scripted agent (tokio-tungstenite client speaking compat JSON) and
//! kubectl-like clients against a running control plane.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

use super::*;

const AGENT_TOKEN: &str = "agent-secret-c1";
const USER_TOKEN: &str = "user-secret-alice";
const EXEC_PATH: &str =
    "/clusters/c1/api/v1/namespaces/default/pods/demo/exec?command=sh&stdin=true&stdout=true";

type Ws = WebSocketStream<TcpStream>;

fn config(dir: &std::path::Path, tls: TlsMode) -> ControlPlaneConfig {
    let mut agent_tokens = TokenTable::new();
    agent_tokens.insert("c1", AGENT_TOKEN);
    let mut user_tokens = TokenTable::new();
    user_tokens.insert("alice", USER_TOKEN);
    ControlPlaneConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        public_host: None,
        state_dir: dir.to_path_buf(),
        agent_tokens: Tokens::fixed(agent_tokens),
        user_tokens: Tokens::fixed(user_tokens),
        user_token_pairs: vec![("alice".into(), USER_TOKEN.into())],
        tls,
        forwards: Vec::new(),
        wire_mode: crate::wire_mode::WireMode::Auto,
        shutdown_grace: SHUTDOWN_GRACE,
        max_streams_per_user: 0,
        registry: None,
        fleet: None,
        registry_recheck: super::revocation::DEFAULT_RECHECK,
    }
}

/// Starts a plain-HTTP control plane; it stops when the returned sender is dropped.
async fn start(dir: &std::path::Path) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let cp = ControlPlane::bind(config(dir, TlsMode::InsecureHttp))
        .await
        .unwrap();
    let addr = cp.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(cp.run(async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

async fn ws_connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, http::Response<Option<Vec<u8>>>), WsError> {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (name, value) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let tcp = TcpStream::connect(addr).await.map_err(WsError::Io)?;
    tokio_tungstenite::client_async(req, tcp).await
}

/// A scripted agent, registered as cluster c1 with the compat Tether extensions.
async fn agent(addr: SocketAddr) -> Ws {
    agent_with(
        addr,
        json!({"websocket_started": true, "websocket_close_code": true, "proxy_error_status": true}),
    )
    .await
}

/// A scripted agent registered as cluster c1 offering `extensions`.
async fn agent_with(addr: SocketAddr, extensions: Value) -> Ws {
    let (mut ws, _) = ws_connect(
        addr,
        AGENT_PATH,
        &[("Authorization", &format!("Bearer {AGENT_TOKEN}"))],
    )
    .await
    .unwrap();
    let register = json!({
        "type": "register",
        "request_id": "req_1_agent-1",
        "payload": {
            "agent_id": "agent-1",
            "name": "edge",
            "extensions": extensions
        },
        "timestamp": "2026-11-26T10:00:00Z"
    });
    ws.send(WsMessage::text(register.to_string()))
        .await
        .unwrap();
    let ok = recv_json(&mut ws).await;
    assert_eq!(ok["type"], "register_success");
    assert_eq!(ok["request_id"], "req_1_agent-1");
    assert_eq!(ok["payload"]["cluster_id"], "c1");
    assert_eq!(ok["payload"]["extensions"]["websocket_started"], true);
    // The registry is updated once register_success went out; give the task a moment.
    tokio::time::sleep(Duration::from_millis(50)).await;
    ws
}

async fn recv_json(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("timed out waiting for a tunnel message")
            .expect("tunnel closed")
            .expect("tunnel failed");
        match message {
            WsMessage::Text(text) => return serde_json::from_str(&text).unwrap(),
            WsMessage::Binary(bytes) => return serde_json::from_slice(&bytes).unwrap(),
            _ => {}
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text.as_str().unwrap())
        .unwrap()
}

async fn agent_send(ws: &mut Ws, value: Value) {
    ws.send(WsMessage::text(value.to_string())).await.unwrap();
}

fn data(stream: &str, opcode: u8, payload: &[u8]) -> Value {
    let mut raw = vec![opcode];
    raw.extend_from_slice(payload);
    json!({"type": "proxy_websocket_data", "request_id": stream, "payload": {"stream_id": stream, "data": b64(&raw)}})
}

/// Raw HTTP/1.1 exchange; returns the whole response text.
async fn http_raw<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, request: &str) -> String {
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("response timed out")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn get(path: &str, token: Option<&str>) -> String {
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    format!("GET {path} HTTP/1.1\r\nHost: cp\r\n{auth}Connection: close\r\n\r\n")
}

#[tokio::test]
async fn exec_websocket_through_a_scripted_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _stop) = start(dir.path()).await;
    let mut agent = agent(addr).await;

    let kubectl = tokio::spawn(async move {
        ws_connect(
            addr,
            EXEC_PATH,
            &[
                ("Authorization", &format!("Bearer {USER_TOKEN}")),
                ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"),
                ("Impersonate-Group", "system:masters"),
                ("Impersonate-User", "root"),
            ],
        )
        .await
    });

    let start = recv_json(&mut agent).await;
    assert_eq!(start["type"], "proxy_websocket_start");
    let p = &start["payload"];
    let stream = p["stream_id"].as_str().unwrap().to_string();
    assert_eq!(start["request_id"], stream.as_str());
    assert_eq!(p["path"], "/api/v1/namespaces/default/pods/demo/exec");
    assert_eq!(p["query"], "command=sh&stdin=true&stdout=true");
    assert_eq!(p["protocol"], "v5.channel.k8s.io");
    let headers = p["headers"].as_object().unwrap();
    assert_eq!(headers["Impersonate-User"], json!(["alice"]));
    for (name, _) in headers {
        let lower = name.to_ascii_lowercase();
        assert!(lower != "authorization", "user token leaked to the agent");
        assert!(
            lower != "impersonate-group" && lower != "sec-websocket-key",
            "{name} forwarded"
        );
    }

    // No 101 before the agent reports the upstream's.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !kubectl.is_finished(),
        "kubectl got an answer before the upstream did"
    );
    agent_send(
        &mut agent,
        json!({"type": "proxy_websocket_started", "request_id": stream, "payload": {"stream_id": stream, "protocol": "v5.channel.k8s.io"}}),
    )
    .await;
    let (mut kubectl, response) = kubectl.await.unwrap().unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "v5.channel.k8s.io"
    );

    // kubectl -> agent: binary, boundaries kept.
    kubectl
        .send(WsMessage::binary(b"\x00ls\n".to_vec()))
        .await
        .unwrap();
    kubectl.send(WsMessage::binary(Vec::new())).await.unwrap();
    for want in [&b"\x02\x00ls\n"[..], b"\x02"] {
        let m = recv_json(&mut agent).await;
        assert_eq!(m["type"], "proxy_websocket_data");
        assert_eq!(m["payload"]["stream_id"], stream.as_str());
        assert_eq!(unb64(&m["payload"]["data"]), want);
    }

    // agent -> kubectl: kinds and boundaries kept; a ping answered by the control plane.
    agent_send(&mut agent, data(&stream, 2, b"\x01hello\n")).await;
    agent_send(&mut agent, data(&stream, 1, b"text")).await;
    kubectl
        .send(WsMessage::Ping(b"p".to_vec().into()))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(5), kubectl.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            WsMessage::Binary(b) => got.push(("binary", b.to_vec())),
            WsMessage::Text(t) => got.push(("text", t.as_bytes().to_vec())),
            WsMessage::Pong(p) => got.push(("pong", p.to_vec())),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got.contains(&("pong", b"p".to_vec())), "{got:?}");
    got.retain(|(k, _)| *k != "pong");
    assert_eq!(
        got,
        [
            ("binary", b"\x01hello\n".to_vec()),
            ("text", b"text".to_vec())
        ]
    );

    // Close 1000 from the upstream reaches kubectl as 1000.
    agent_send(
        &mut agent,
        json!({"type": "proxy_websocket_close", "request_id": stream, "payload": {"stream_id": stream, "code": 1000, "reason": ""}}),
    )
    .await;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), kubectl.next())
            .await
            .unwrap()
        {
            Some(Ok(WsMessage::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(close.unwrap().code, CloseCode::Normal);
}

fn spdy_exec_request() -> String {
    format!(
        "POST /clusters/c1/api/v1/namespaces/default/pods/demo/exec?command=sh&stdin=true HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {USER_TOKEN}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\nX-Stream-Protocol-Version: v3.channel.k8s.io\r\nContent-Length: 0\r\n\r\n"
    )
}

/// Reads an HTTP response head (to the blank line) from `s`.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("response head in time")
            .unwrap();
        assert_eq!(n, 1, "connection closed in the head: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

#[tokio::test]
async fn spdy_upgrade_is_answered_after_the_upstream_then_carries_bytes_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _stop) = start(dir.path()).await;
    let mut agent = agent_with(addr, json!({"websocket_started": true, "websocket_close_code": true, "proxy_error_status": true, "raw_upgrade": true})).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(spdy_exec_request().as_bytes())
        .await
        .unwrap();

    let start = recv_json(&mut agent).await;
    assert_eq!(start["type"], "proxy_websocket_start");
    let p = &start["payload"];
    let stream = p["stream_id"].as_str().unwrap().to_string();
    assert_eq!(p["method"], "POST");
    assert_eq!(p["upgrade"], "SPDY/3.1");
    assert_eq!(p["protocol"], "v4.channel.k8s.io, v3.channel.k8s.io");
    let names: Vec<String> = p["headers"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.to_ascii_lowercase())
        .collect();
    for dropped in [
        "x-stream-protocol-version",
        "upgrade",
        "connection",
        "authorization",
    ] {
        assert!(
            !names.contains(&dropped.to_string()),
            "{dropped} forwarded: {names:?}"
        );
    }

    agent_send(
        &mut agent,
        json!({"type": "proxy_websocket_started", "request_id": stream, "payload": {"stream_id": stream, "protocol": "v4.channel.k8s.io"}}),
    )
    .await;
    let head = read_head(&mut client).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: spdy/3.1\r\n"), "{head}");
    assert!(
        head.contains("x-stream-protocol-version: v4.channel.k8s.io\r\n"),
        "{head}"
    );

    // Client bytes reach the agent as binary messages, in order, whatever their chunking.
    let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    client.write_all(&sent).await.unwrap();
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let m = recv_json(&mut agent).await;
        assert_eq!(m["type"], "proxy_websocket_data");
        let frame = unb64(&m["payload"]["data"]);
        assert_eq!(frame[0], 2, "binary");
        got.extend_from_slice(&frame[1..]);
    }
    assert_eq!(got, sent);

    // Agent bytes reach the client raw; the upstream's close ends the connection after them.
    agent_send(&mut agent, data(&stream, 2, b"\x80\x03\x00\x02reply")).await;
    agent_send(
        &mut agent,
        json!({"type": "proxy_websocket_close", "request_id": stream, "payload": {"stream_id": stream, "code": 1000, "reason": ""}}),
    )
    .await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
        .await
        .expect("the connection ends")
        .unwrap();
    assert_eq!(rest, b"\x80\x03\x00\x02reply");

    // A refusal reaches the client with the upstream's status.
    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(spdy_exec_request().as_bytes())
        .await
        .unwrap();
    let start = recv_json(&mut agent).await;
    let stream = start["payload"]["stream_id"].as_str().unwrap().to_string();
    agent_send(
        &mut agent,
        json!({"type": "proxy_error", "request_id": stream, "payload": {"request_id": stream, "error": "unable to upgrade connection", "status": 403}}),
    )
    .await;
    let head = read_head(&mut client).await;
    assert!(head.starts_with("http/1.1 403"), "{head}");
}

#[tokio::test]
async fn refused_upstream_gives_kubectl_its_status_and_client_close_reaches_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _stop) = start(dir.path()).await;
    let mut agent = agent(addr).await;
    let auth = format!("Bearer {USER_TOKEN}");

    let kubectl = tokio::spawn({
        let auth = auth.clone();
        async move {
            ws_connect(
                addr,
                EXEC_PATH,
                &[
                    ("Authorization", &auth),
                    ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"),
                ],
            )
            .await
        }
    });
    let start = recv_json(&mut agent).await;
    let stream = start["payload"]["stream_id"].as_str().unwrap().to_string();
    agent_send(
        &mut agent,
        json!({"type": "proxy_error", "request_id": stream, "payload": {"request_id": stream, "error": "pods \"demo\" is forbidden", "status": 403}}),
    )
    .await;
    agent_send(&mut agent, json!({"type": "proxy_websocket_close", "request_id": stream, "payload": {"stream_id": stream}})).await;
    match kubectl.await.unwrap() {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), 403);
            let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
            assert!(
                body.contains("\"kind\":\"Status\"") && body.contains("forbidden"),
                "{body}"
            );
        }
        other => panic!("expected HTTP 403, got {other:?}"),
    }

    // A kubectl close is passed to the agent with its code.
    let kubectl = tokio::spawn(async move {
        ws_connect(
            addr,
            EXEC_PATH,
            &[
                ("Authorization", &auth),
                ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"),
            ],
        )
        .await
    });
    let start = recv_json(&mut agent).await;
    let stream = start["payload"]["stream_id"].as_str().unwrap().to_string();
    agent_send(
        &mut agent,
        json!({"type": "proxy_websocket_started", "request_id": stream, "payload": {"stream_id": stream, "protocol": "v5.channel.k8s.io"}}),
    )
    .await;
    let (mut kubectl, _) = kubectl.await.unwrap().unwrap();
    kubectl.close(None).await.unwrap();
    let close = recv_json(&mut agent).await;
    assert_eq!(close["type"], "proxy_websocket_close");
    assert_eq!(close["payload"]["stream_id"], stream.as_str());
    assert_eq!(close["payload"]["code"], 1000);
}

#[tokio::test]
async fn no_agent_is_502_at_once_and_bad_token_is_401() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _stop) = start(dir.path()).await;
    let begin = Instant::now();
    let response = http_raw(
        TcpStream::connect(addr).await.unwrap(),
        &get("/clusters/c1/api/v1/pods", Some(USER_TOKEN)),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 502"), "{response}");
    assert!(
        response.contains("\"kind\":\"Status\"") && response.contains("no agent is connected"),
        "{response}"
    );
    assert!(begin.elapsed() < Duration::from_secs(2));

    for token in [None, Some("wrong"), Some(AGENT_TOKEN)] {
        let response = http_raw(
            TcpStream::connect(addr).await.unwrap(),
            &get("/clusters/c1/api", token),
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 401"), "{response}");
        assert!(
            response.contains("\"reason\":\"Unauthorized\""),
            "{response}"
        );
    }
    // Agents need an agent token.
    match ws_connect(
        addr,
        AGENT_PATH,
        &[("Authorization", &format!("Bearer {USER_TOKEN}"))],
    )
    .await
    {
        Err(WsError::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    let health = http_raw(
        TcpStream::connect(addr).await.unwrap(),
        &get("/healthz", None),
    )
    .await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let metrics = http_raw(
        TcpStream::connect(addr).await.unwrap(),
        &get("/metrics", None),
    )
    .await;
    assert!(metrics.contains("tether_agents_connected 0"), "{metrics}");
}

#[tokio::test]
async fn http_request_streams_the_response_with_impersonation() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _stop) = start(dir.path()).await;
    let mut agent = agent(addr).await;
    let request = format!(
        "GET /clusters/c1/api/v1/namespaces/default/pods/demo/log?follow=true HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {USER_TOKEN}\r\nImpersonate-Group: system:masters\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    let client =
        tokio::spawn(
            async move { http_raw(TcpStream::connect(addr).await.unwrap(), &request).await },
        );
    let req = recv_json(&mut agent).await;
    assert_eq!(req["type"], "proxy_request");
    let id = req["request_id"].as_str().unwrap().to_string();
    let p = &req["payload"];
    assert_eq!(p["method"], "GET");
    assert_eq!(p["path"], "/api/v1/namespaces/default/pods/demo/log");
    assert_eq!(p["query"], "follow=true");
    assert_eq!(p["supports_response_streaming"], true);
    assert_eq!(p["headers"]["Impersonate-User"], json!(["alice"]));
    assert_eq!(p["headers"]["accept"], json!(["application/json"]));
    let names: Vec<String> = p["headers"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.to_ascii_lowercase())
        .collect();
    assert!(
        !names.contains(&"impersonate-group".to_string())
            && !names.contains(&"authorization".to_string()),
        "{names:?}"
    );

    agent_send(
        &mut agent,
        json!({"type": "proxy_response_header", "request_id": id, "payload": {"status": 200, "headers": {"Content-Type": ["text/plain"], "Content-Length": ["999"]}}}),
    )
    .await;
    for line in ["line 1\n", "line 2\n"] {
        agent_send(
            &mut agent,
            json!({"type": "proxy_response_chunk", "request_id": id, "payload": {"data": b64(line.as_bytes()), "encoding": "base64", "size": line.len()}}),
        )
        .await;
    }
    agent_send(
        &mut agent,
        json!({"type": "proxy_response_end", "request_id": id, "payload": {}}),
    )
    .await;
    let response = client.await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked"), "{response}");
    assert!(
        lower.contains("content-type: text/plain") && !lower.contains("content-length: 999"),
        "{response}"
    );
    assert!(
        response.contains("line 1\n") && response.contains("line 2\n"),
        "{response}"
    );
    assert!(response.ends_with("0\r\n\r\n"), "{response:?}");
}

/// The close frame `ws` receives next (other messages skipped); panics after 5 s or on anything
/// but a clean close.
async fn next_close(ws: &mut Ws) -> tokio_tungstenite::tungstenite::protocol::CloseFrame {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no close frame within 5 s")
        {
            Some(Ok(WsMessage::Close(frame))) => return frame.expect("a close frame with a code"),
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
}

/// Sends a GET through the control plane and answers it as `agent` (which must be the tunnel it
/// reaches); returns the response text.
async fn get_answered_by(addr: SocketAddr, agent: &mut Ws, body: &str) -> String {
    let client = tokio::spawn(async move {
        http_raw(
            TcpStream::connect(addr).await.unwrap(),
            &get("/clusters/c1/version", Some(USER_TOKEN)),
        )
        .await
    });
    let req = recv_json(agent).await;
    assert_eq!(req["type"], "proxy_request", "{req}");
    let id = req["request_id"].as_str().unwrap().to_string();
    agent_send(
        agent,
        json!({"type": "proxy_response", "request_id": id, "payload": {"status": 200, "headers": {}, "body": b64(body.as_bytes()), "encoding": "base64"}}),
    )
    .await;
    client.await.unwrap()
}

#[tokio::test]
async fn a_second_agent_of_a_cluster_takes_new_streams_and_leaves_the_first_ones_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _stop) = start(dir.path()).await;
    let mut old = agent(addr).await;
    let (mut kubectl, stream) = open_exec(addr, &mut old).await;

    // A second agent with the same token: no eviction, both stay registered.
    let mut new = agent(addr).await;
    // The exec on the old tunnel still carries data.
    agent_send(&mut old, data(&stream, 2, b"\x01still here")).await;
    let got = tokio::time::timeout(Duration::from_secs(5), kubectl.next())
        .await
        .expect("the old tunnel's stream went quiet")
        .unwrap()
        .unwrap();
    assert_eq!(got.into_data().as_ref(), b"\x01still here");

    // New requests go to the newest tunnel.
    let response = get_answered_by(addr, &mut new, "from-new").await;
    assert!(response.contains("from-new"), "{response}");

    // The new agent drains (as on SIGTERM): new requests go back to the old one.
    agent_send(
        &mut new,
        json!({"type": "heartbeat", "payload": {"cluster_id": "c1", "agent_id": "agent-2", "status": "draining", "tunnel_status": "connected"}}),
    )
    .await;
    assert_eq!(recv_json(&mut new).await["type"], "heartbeat_ack");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let response = get_answered_by(addr, &mut old, "from-old").await;
    assert!(response.contains("from-old"), "{response}");

    // The old one goes away: only its stream ends; the draining one is all the cluster has, so
    // it gets new requests again (its agent answers them as it can).
    drop(old);
    let close = next_close(&mut kubectl).await;
    assert!(close.reason.contains("tunnel"), "{}", close.reason);
    let response = get_answered_by(addr, &mut new, "from-draining").await;
    assert!(response.contains("from-draining"), "{response}");
}

fn tls_client(cert_pem: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &cert_pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn self_signed_certificate_is_generated_once_and_served_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut first_pem = None;
    for _ in 0..2 {
        let cp = ControlPlane::bind(config(dir.path(), TlsMode::SelfSigned))
            .await
            .unwrap();
        let addr = cp.local_addr().unwrap();
        assert!(cp.base_url().starts_with("https://127.0.0.1:"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(cp.run(async move {
            let _ = stopped.await;
        }));
        let pem = std::fs::read(dir.path().join(tls::CERT_FILE)).unwrap();
        if let Some(first) = &first_pem {
            assert_eq!(first, &pem, "certificate changed across restarts");
        }
        let trusted = first_pem.get_or_insert(pem).clone();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tls_client(&trusted).connect(name, tcp).await.unwrap();
        let response = http_raw(tls, &get("/healthz", None)).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        drop(stop);
        task.await.unwrap().unwrap();
    }
    let endpoint = kubeconfig::read_endpoint(dir.path()).unwrap();
    assert!(endpoint.starts_with("https://127.0.0.1:"), "{endpoint}");
    assert_eq!(
        kubeconfig::read_user_token(dir.path(), "alice")
            .unwrap()
            .as_deref(),
        Some(USER_TOKEN)
    );
}

#[test]
fn gateway_size_is_as_documented() {
    // The gateway docs promise about half a MiB for 64 streams of 100-message rings.
    let size = std::mem::size_of::<tunnel::Gw>();
    assert!(size < 1 << 20, "gateway is {size} bytes");
}

/// Opens an exec stream through `agent` and returns kubectl's socket and the stream id.
async fn open_exec(addr: SocketAddr, agent: &mut Ws) -> (Ws, String) {
    let kubectl = tokio::spawn(async move {
        ws_connect(
            addr,
            EXEC_PATH,
            &[
                ("Authorization", &format!("Bearer {USER_TOKEN}")),
                ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"),
            ],
        )
        .await
    });
    let start = recv_json(agent).await;
    let stream = start["payload"]["stream_id"].as_str().unwrap().to_string();
    agent_send(
        agent,
        json!({"type": "proxy_websocket_started", "request_id": stream, "payload": {"stream_id": stream, "protocol": "v5.channel.k8s.io"}}),
    )
    .await;
    (kubectl.await.unwrap().unwrap().0, stream)
}

fn chunk(i: usize) -> Vec<u8> {
    let mut v = vec![u8::try_from(i % 251).unwrap(); 32 * 1024];
    v[..8].copy_from_slice(&(i as u64).to_be_bytes());
    v
}

#[tokio::test]
async fn no_loss_and_no_reordering_under_backpressure_both_ways() {
    const N: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let (addr, _stop) = start(dir.path()).await;
    let mut agent = agent(addr).await;
    let (kubectl, stream) = open_exec(addr, &mut agent).await;
    let (mut k_tx, mut k_rx) = kubectl.split();

    // kubectl -> agent: 6.4 MiB while the agent does not read for a while.
    let sender = tokio::spawn(async move {
        for i in 0..N {
            k_tx.send(WsMessage::binary(chunk(i))).await.unwrap();
        }
        k_tx
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = 0;
    while got < N {
        let m = recv_json(&mut agent).await;
        assert_eq!(m["type"], "proxy_websocket_data", "{m}");
        let raw = unb64(&m["payload"]["data"]);
        assert_eq!(raw[0], 2);
        assert_eq!(raw[1..], chunk(got)[..], "message {got} lost or reordered");
        got += 1;
    }
    let _k_tx = sender.await.unwrap();

    // agent -> kubectl: 6.4 MiB while kubectl does not read for a while.
    let (mut a_tx, mut a_rx) = agent.split();
    let stream2 = stream.clone();
    let writer = tokio::spawn(async move {
        for i in 0..N {
            a_tx.send(WsMessage::text(data(&stream2, 2, &chunk(i)).to_string()))
                .await
                .unwrap();
        }
        a_tx
    });
    // Keep the agent side reading (pings, errors) so nothing stalls there.
    let drain = tokio::spawn(async move {
        let mut other = Vec::new();
        while let Some(Ok(m)) = a_rx.next().await {
            if let WsMessage::Text(t) = m {
                other.push(t.to_string());
            }
        }
        other
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..N {
        let m = loop {
            match tokio::time::timeout(Duration::from_secs(10), k_rx.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
            {
                WsMessage::Binary(b) => break b,
                WsMessage::Ping(_) | WsMessage::Pong(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(m[..], chunk(i)[..], "message {i} lost or reordered");
    }
    let a_tx = writer.await.unwrap();
    drop(a_tx);
    drain.abort();
    // The slow kubectl made the compat tunnel pause (head-of-line blocking), visibly.
    let metrics = http_raw(
        TcpStream::connect(addr).await.unwrap(),
        &get("/metrics", None),
    )
    .await;
    let pauses: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tether_tunnel_pauses_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(pauses > 0, "{metrics}");
}

// -------------------------------------------------------------------------------------------------
// --forward

/// Starts a plain-HTTP control plane with `forwards`; returns its address and the forwards'.
async fn start_forwarding(
    dir: &std::path::Path,
    forwards: &[&str],
) -> (
    SocketAddr,
    Vec<SocketAddr>,
    tokio::sync::oneshot::Sender<()>,
) {
    let mut config = config(dir, TlsMode::InsecureHttp);
    config.forwards = forwards.iter().map(|f| f.parse().unwrap()).collect();
    let cp = ControlPlane::bind(config).await.unwrap();
    let addr = cp.local_addr().unwrap();
    let fwd = cp.forward_addrs().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(cp.run(async move {
        let _ = stopped.await;
    }));
    (addr, fwd, stop)
}

/// What the scripted agent saw of one tunnel.
#[derive(Debug, Default)]
struct TcpSeen {
    start: Option<Value>,
    received: usize,
    close: Option<Value>,
}

/// A scripted agent that answers `tcp_tunnel_start` by echoing every byte back, or (for target
/// port 1) with `tcp_tunnel_close {reason: "connection_failed"}`. Returns what it saw once a
/// `tcp_tunnel_close` came from the control plane (or after a refused dial).
async fn echo_agent(ws: &mut Ws) -> TcpSeen {
    let mut seen = TcpSeen::default();
    loop {
        let m = recv_json(ws).await;
        let id = m["request_id"].as_str().unwrap().to_string();
        match m["type"].as_str().unwrap() {
            "tcp_tunnel_start" => {
                let refuse = m["payload"]["service_port"] == 1;
                seen.start = Some(m);
                if refuse {
                    let close = json!({"type": "tcp_tunnel_close", "request_id": id, "payload": {"reason": "connection_failed", "error": "dial tcp 127.0.0.1:1: connection refused", "duration_ms": 1}});
                    agent_send(ws, close).await;
                    return seen;
                }
            }
            "tcp_tunnel_data" => {
                assert_eq!(m["payload"]["tunnel_id"], id.as_str());
                let bytes = unb64(&m["payload"]["data"]);
                seen.received += bytes.len();
                let back = json!({"type": "tcp_tunnel_data", "request_id": id, "payload": {"data": b64(&bytes), "direction": "agent_to_gateway"}});
                agent_send(ws, back).await;
            }
            "tcp_tunnel_close" => {
                seen.close = Some(m);
                return seen;
            }
            other => panic!("unexpected {other}"),
        }
    }
}

#[test]
fn forward_specs_parse_or_fail_with_one_line() {
    let f: Forward = "127.0.0.1:9000=prod:db.default:5432".parse().unwrap();
    assert_eq!(f.listen, "127.0.0.1:9000".parse::<SocketAddr>().unwrap());
    assert_eq!(
        (f.cluster.as_str(), f.host.as_str(), f.port),
        ("prod", "db.default", 5432)
    );
    let f: Forward = "9000=prod:[::1]:80".parse().unwrap();
    assert_eq!(f.listen, "127.0.0.1:9000".parse::<SocketAddr>().unwrap());
    assert_eq!(f.host, "[::1]");
    for bad in [
        "",
        "127.0.0.1:9000",
        "nope=prod:db:5432",
        "9000=prod",
        "9000=prod:db",
        "9000=prod:db:0",
        "9000=prod:db:http",
        "9000=pr/od:db:80",
        "9000=prod::80",
        "9000=prod:d b:80",
    ] {
        let e = bad.parse::<Forward>().unwrap_err().to_string();
        assert!(
            e.starts_with("--forward ") && !e.contains('\n'),
            "{bad}: {e}"
        );
    }
}

#[tokio::test]
async fn forward_carries_tcp_through_a_scripted_agent_losslessly() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, fwd, _stop) = start_forwarding(dir.path(), &["127.0.0.1:0=c1:echo.local:7"]).await;
    let mut agent = agent(addr).await;
    let agent_task = tokio::spawn(async move {
        let seen = echo_agent(&mut agent).await;
        (seen, agent)
    });

    // 2 MiB with a pattern, written while reading the echo back.
    let data: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let s = TcpStream::connect(fwd[0]).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in to_send.chunks(50_000) {
            w.write_all(chunk).await.unwrap();
        }
        w
    });
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(30), r.read_exact(&mut back))
        .await
        .expect("echo timed out")
        .unwrap();
    assert!(back == data, "bytes lost or reordered");
    // EOF: the agent gets tcp_tunnel_close {reason: client_closed}.
    let w = writer.await.unwrap();
    drop(w);
    drop(r);
    let (seen, _agent) = tokio::time::timeout(Duration::from_secs(10), agent_task)
        .await
        .unwrap()
        .unwrap();
    let start = seen.start.unwrap();
    let p = &start["payload"];
    assert_eq!(p["service_name"], "echo.local");
    assert_eq!(p["service_port"], 7);
    assert_eq!(p["tunnel_id"], start["request_id"]);
    assert!(p["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(seen.received, data.len());
    let close = seen.close.unwrap();
    assert_eq!(close["payload"]["reason"], "client_closed");
}

#[tokio::test]
async fn forward_dial_failure_and_missing_tunnel_close_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, fwd, _stop) = start_forwarding(
        dir.path(),
        &["127.0.0.1:0=c1:127.0.0.1:1", "127.0.0.1:0=other:db:5432"],
    )
    .await;
    // No tunnel for cluster "other": closed at once.
    let mut s = TcpStream::connect(fwd[1]).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("not closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // No tunnel for c1 yet either.
    let mut s = TcpStream::connect(fwd[0]).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("not closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    // The agent cannot dial: the accepted connection is closed.
    let mut agent = agent(addr).await;
    let agent_task = tokio::spawn(async move { echo_agent(&mut agent).await });
    let mut s = TcpStream::connect(fwd[0]).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("not closed after the failed dial");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let seen = agent_task.await.unwrap();
    assert_eq!(seen.start.unwrap()["payload"]["service_port"], 1);
}

/// A client that writes a lot and then closes while the agent is not reading: every byte read
/// before the EOF still reaches the agent, then `tcp_tunnel_close`.
#[tokio::test]
async fn forward_eof_after_backpressure_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, fwd, _stop) = start_forwarding(dir.path(), &["127.0.0.1:0=c1:sink.local:9"]).await;
    let mut agent = agent(addr).await;
    let data: Vec<u8> = (0..6 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let to_send = data.clone();
    let client = tokio::spawn(async move {
        let mut s = TcpStream::connect(fwd[0]).await.unwrap();
        s.write_all(&to_send).await.unwrap();
        s.shutdown().await.unwrap();
        // Keep the socket until the control plane closes it.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    let start = recv_json(&mut agent).await;
    assert_eq!(start["type"], "tcp_tunnel_start");
    // Let the client fill every buffer on the way while the agent does not read.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut got = Vec::with_capacity(data.len());
    loop {
        let m = recv_json(&mut agent).await;
        match m["type"].as_str().unwrap() {
            "tcp_tunnel_data" => got.extend_from_slice(&unb64(&m["payload"]["data"])),
            "tcp_tunnel_close" => {
                assert_eq!(m["payload"]["reason"], "client_closed");
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(got.len(), data.len(), "bytes lost before the close");
    assert!(got == data, "bytes reordered");
    let _ = tokio::time::timeout(Duration::from_secs(5), client).await;
}

#[test]
fn the_state_directory_is_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("a/b");
    private_dir(&fresh).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&fresh), 0o700);
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    private_dir(&open).unwrap();
    assert_eq!(mode(&open), 0o700);
}

#[tokio::test]
async fn shutdown_lets_a_live_stream_run_its_grace_then_ends_it_and_the_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::bind(ControlPlaneConfig {
        shutdown_grace: Duration::from_millis(1500),
        ..config(dir.path(), TlsMode::InsecureHttp)
    })
    .await
    .unwrap();
    let addr = cp.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(cp.run(async move {
        let _ = stopped.await;
    }));
    let mut agent = agent(addr).await;
    let (mut kubectl, stream) = open_exec(addr, &mut agent).await;
    let ready = http_raw(
        TcpStream::connect(addr).await.unwrap(),
        &get("/readyz", None),
    )
    .await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    let asked = Instant::now();
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Nothing new is accepted...
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    // ...but the live stream still carries data during the grace period.
    agent_send(&mut agent, data(&stream, 2, b"\x01during grace")).await;
    let got = tokio::time::timeout(Duration::from_secs(2), kubectl.next())
        .await
        .expect("the live stream stopped at the shutdown signal")
        .unwrap()
        .unwrap();
    assert_eq!(got.into_data().as_ref(), b"\x01during grace");

    // Past the grace, the stream ends with the reason and the tunnel with 1001.
    let close = next_close(&mut kubectl).await;
    assert!(
        asked.elapsed() >= Duration::from_millis(1400),
        "closed before the grace ran out"
    );
    assert!(close.reason.contains("shutting down"), "{}", close.reason);
    let tunnel_close = next_close(&mut agent).await;
    assert_eq!(tunnel_close.code, CloseCode::Away);
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("run did not return after the drain")
        .unwrap()
        .unwrap();
}
