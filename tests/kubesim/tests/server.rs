//! The kubesim library in-process (no kubectl): HTTP errors as Status JSON, auth, recording,
//! the WebSocket subprotocols kubectl itself does not use, and the binary's CLI contract.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const TOKEN: &str = "in-process-token";

async fn start() -> kubesim::Handle {
    let config = kubesim::Config::new("127.0.0.1:0".parse().unwrap())
        .pod("default/demo")
        .unwrap()
        .token(TOKEN);
    kubesim::Server::start(config).await.unwrap()
}

/// One HTTP/1.1 request; returns (status, body).
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: kubesim\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

#[tokio::test]
async fn errors_are_status_json_and_auth_is_required() {
    let h = start().await;
    let addr = h.addr();

    let (code, body) = http(addr, "GET", "/api/v1/namespaces/default/pods/demo", &[]).await;
    assert_eq!(code, 401);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["kind"].as_str(), v["reason"].as_str(), v["code"].as_u64()),
        (Some("Status"), Some("Unauthorized"), Some(401))
    );
    let wrong = format!("Bearer {TOKEN}x");
    let (code, _) = http(addr, "GET", "/api", &[("Authorization", wrong.as_str())]).await;
    assert_eq!(code, 401);

    let auth = bearer();
    let auth = [("Authorization", auth.as_str())];
    let (code, body) = http(addr, "GET", "/api/v1/namespaces/default/pods/nope", &auth).await;
    assert_eq!(code, 404);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["message"], "pods \"nope\" not found");
    assert_eq!(v["reason"], "NotFound");

    let (code, _) = http(addr, "GET", "/no/such/path", &auth).await;
    assert_eq!(code, 404);

    let (code, body) = http(
        addr,
        "GET",
        "/api/v1/namespaces/default/pods/demo/exec?command=true&stdout=true",
        &auth,
    )
    .await;
    assert_eq!(code, 400);
    assert!(body.contains("Upgrade request required"), "{body}");

    let (code, body) = http(
        addr,
        "GET",
        "/api/v1/namespaces/default/pods/demo/exec?stdout=true",
        &auth,
    )
    .await;
    assert_eq!(code, 400);
    assert!(body.contains("at least one command"), "{body}");

    // A SPDY upgrade offering no stream protocol kubesim speaks is refused with 403 Forbidden
    // naming what it supports, as the kubelet's handshake does.
    let spdy = [
        ("Authorization", bearer()),
        ("Connection", "Upgrade".to_string()),
        ("Upgrade", "SPDY/3.1".to_string()),
        ("X-Stream-Protocol-Version", "v2.channel.k8s.io".to_string()),
    ];
    let spdy: Vec<(&str, &str)> = spdy.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, body) = http(
        addr,
        "POST",
        "/api/v1/namespaces/default/pods/demo/exec?command=true&stdout=true",
        &spdy,
    )
    .await;
    assert_eq!(code, 403);
    let status = serde_json::from_str::<serde_json::Value>(&body).unwrap();
    assert_eq!(status["reason"], "Forbidden");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("v4.channel.k8s.io"),
        "{body}"
    );

    // Lists and namespaces.
    let (code, body) = http(addr, "GET", "/api/v1/pods", &auth).await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["kind"], "PodList");
    assert_eq!(v["items"][0]["metadata"]["name"], "demo");
    assert_eq!(v["items"][0]["status"]["phase"], "Running");
    let (code, _) = http(addr, "GET", "/api/v1/namespaces/default", &auth).await;
    assert_eq!(code, 200);
    let (code, _) = http(addr, "GET", "/api/v1/namespaces/elsewhere", &auth).await;
    assert_eq!(code, 404);

    // Everything was recorded, including the refused ones, with headers.
    let recorded = h.requests();
    assert_eq!(recorded.len(), 10);
    assert_eq!(recorded[0].header("authorization"), None);
    assert_eq!(recorded[2].header("Authorization"), Some(bearer().as_str()));
    assert_eq!(recorded[6].method, "POST");
    assert_eq!(
        recorded[6].header_all("x-stream-protocol-version"),
        ["v2.channel.k8s.io"]
    );
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn ws_exec(
    addr: std::net::SocketAddr,
    query: &str,
    protocol: Option<&str>,
) -> Result<(Ws, Option<String>), WsError> {
    let mut req = format!("ws://{addr}/api/v1/namespaces/default/pods/demo/exec?{query}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", bearer().parse().unwrap());
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await?;
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_string());
    Ok((ws, chosen))
}

/// Reads until the server's Close; returns the data messages and the close code.
async fn drain(ws: &mut Ws) -> (Vec<Message>, Option<CloseCode>) {
    let mut msgs = Vec::new();
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = ws.next().await {
            match msg.unwrap() {
                Message::Close(frame) => return frame.map(|f| f.code),
                Message::Ping(_) | Message::Pong(_) => {}
                m => msgs.push(m),
            }
        }
        None
    })
    .await
    .expect("session ends");
    (msgs, result)
}

#[tokio::test]
async fn v4_binary_protocol_status_and_close() {
    let h = start().await;
    let (mut ws, chosen) = ws_exec(
        h.addr(),
        "command=sh&command=-c&command=echo+hi%3B+exit+3&stdout=true&stderr=true",
        Some("v4.channel.k8s.io"),
    )
    .await
    .unwrap();
    assert_eq!(chosen.as_deref(), Some("v4.channel.k8s.io"));
    let (msgs, close) = drain(&mut ws).await;
    assert_eq!(close, Some(CloseCode::Normal));
    assert_eq!(
        msgs[0],
        Message::binary(vec![1u8]),
        "initial empty stdout message"
    );
    assert_eq!(msgs[1], Message::binary(b"\x01hi\n".to_vec()));
    let status = msgs.last().unwrap().clone().into_data();
    assert_eq!(status[0], 3);
    assert_eq!(
        std::str::from_utf8(&status[1..]).unwrap(),
        r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: command terminated with exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#
    );
}

#[tokio::test]
async fn v4_base64_protocol_uses_text_frames() {
    let h = start().await;
    let (mut ws, chosen) = ws_exec(
        h.addr(),
        "command=cat&stdin=true&stdout=true",
        Some("bogus, v4.base64.channel.k8s.io"),
    )
    .await
    .unwrap();
    assert_eq!(chosen.as_deref(), Some("v4.base64.channel.k8s.io"));
    ws.send(Message::text("0aGVsbG8=")).await.unwrap(); // "hello"
    let mut got = String::new();
    while !got.contains("aGVsbG8=") {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => got.push_str(t.as_str()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got.starts_with('1'), "{got}");
    // v4 has no stdin close signal: closing the WebSocket ends the session.
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn v1_and_v5_protocols() {
    let h = start().await;
    // channel.k8s.io: nothing on channel 3 for success.
    let (mut ws, chosen) = ws_exec(h.addr(), "command=true&stdout=true", Some("channel.k8s.io"))
        .await
        .unwrap();
    assert_eq!(chosen.as_deref(), Some("channel.k8s.io"));
    let (msgs, close) = drain(&mut ws).await;
    assert_eq!(close, Some(CloseCode::Normal));
    assert!(
        msgs.iter()
            .all(|m| m.clone().into_data().first() != Some(&3)),
        "{msgs:?}"
    );

    // channel.k8s.io: a failure is plain text on channel 3.
    let (mut ws, _) = ws_exec(
        h.addr(),
        "command=sh&command=-c&command=exit+2&stdout=true",
        Some("channel.k8s.io"),
    )
    .await
    .unwrap();
    let (msgs, close) = drain(&mut ws).await;
    assert_eq!(close, Some(CloseCode::Normal));
    assert_eq!(
        msgs.last().unwrap().clone().into_data()[..],
        b"\x03command terminated with non-zero exit code: command terminated with exit code 2"[..]
    );

    // v5: stdin data, the close signal, a ping answered, Success, Close 1000.
    let (mut ws, chosen) = ws_exec(
        h.addr(),
        "command=sh&command=-c&command=sleep+0.3%3B+cat&stdin=true&stdout=true",
        Some("v5.channel.k8s.io"),
    )
    .await
    .unwrap();
    assert_eq!(chosen.as_deref(), Some("v5.channel.k8s.io"));
    ws.send(Message::Ping(b"p1".to_vec().into())).await.unwrap();
    ws.send(Message::binary(b"\x00abc".to_vec())).await.unwrap();
    ws.send(Message::binary(vec![0xff, 0])).await.unwrap();
    let mut pong = false;
    let mut data = Vec::new();
    let close = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = ws.next().await {
            match msg.unwrap() {
                Message::Pong(p) => pong |= &p[..] == b"p1",
                Message::Close(f) => return f.map(|f| f.code),
                m => data.push(m.into_data()),
            }
        }
        None
    })
    .await
    .unwrap();
    assert!(pong, "ping answered");
    assert_eq!(close, Some(CloseCode::Normal));
    assert_eq!(data[0][..], [1u8]);
    assert_eq!(data[1][..], b"\x01abc"[..]);
    assert_eq!(
        data[2][..],
        b"\x03{\"metadata\":{},\"status\":\"Success\"}"[..]
    );

    // An unsupported subprotocol is refused before the upgrade.
    match ws_exec(
        h.addr(),
        "command=true&stdout=true",
        Some("v9.channel.k8s.io"),
    )
    .await
    {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected a refusal, got {:?}", other.map(|x| x.1)),
    }
}

// ---------------------------------------------------------------------------------------
// The binary's command line.

fn kubesim() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubesim"));
    for (k, _) in std::env::vars() {
        if k.starts_with("KUBESIM_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn cli_help_and_version() {
    let help = kubesim().arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--listen <ADDR>",
        "--token <TOKEN>",
        "--tls-cert <F>",
        "--tls-key <F>",
        "--pod <NAMESPACE/NAME>",
        "--log-format",
        "KUBESIM_LISTEN",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
    let version = kubesim().arg("--version").output().unwrap();
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("kubesim {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn cli_bad_configuration_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a pem").unwrap();
    let garbage = garbage.to_str().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "--listen"),
        (vec!["--listen", "nowhere"], "nowhere"),
        (
            vec!["--listen", "127.0.0.1:0", "--pod", "demo"],
            "NAMESPACE/NAME",
        ),
        (
            vec!["--listen", "127.0.0.1:0", "--tls-cert", garbage],
            "--tls-key",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                "/nonexistent.crt",
                "--tls-key",
                garbage,
            ],
            "/nonexistent.crt",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                garbage,
                "--tls-key",
                garbage,
            ],
            "CERTIFICATE",
        ),
        (vec!["--listen", &busy], "cannot listen"),
        (
            vec!["--listen", "127.0.0.1:0", "--log-format", "xml"],
            "xml",
        ),
    ];
    for (args, needle) in cases {
        let out = kubesim().args(&args).stdin(Stdio::null()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("kubesim: "), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn cli_flags_come_from_environment_variables() {
    let mut child = kubesim()
        .env("KUBESIM_LISTEN", "127.0.0.1:0")
        .env("KUBESIM_POD", "default/a team/b:x,y")
        .env("KUBESIM_LOG_FORMAT", "json")
        .env("KUBESIM_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr: std::net::SocketAddr = loop {
        let line = lines.next().expect("kubesim log").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        if v["fields"]["message"] == "listening" {
            break v["fields"]["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let auth = bearer();
    let (code, body) = rt.block_on(http(
        addr,
        "GET",
        "/api/v1/pods",
        &[("Authorization", &auth)],
    ));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(v["items"][1]["spec"]["containers"][1]["name"], "y");
}
