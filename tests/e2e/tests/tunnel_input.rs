//! The agent against scripted control planes (tether_e2e::scripted), talking to kubesim:
//!
//! * bad input at the tunnel, each answered with its own clear error while a concurrent exec
//!   carrying a checksummed stream is not disturbed;
//! * a control plane that speaks only the PipeOps catalogue (no extensions advertised) drives
//!   execs end to end, and the agent sends it nothing outside that catalogue.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tether_e2e::Cluster;
use tether_e2e::data::{Prng, Sha256Stream};
use tether_e2e::scripted::{
    AGENT_PATH, AgentSession, Envelope, FrameKind, PIPEOPS_AGENT_TYPES, ScriptedControlPlane,
    StreamEvent, data_envelope, envelope, exec_start_payload,
};
use tether_e2e::tls::make_tls;

const T: Duration = Duration::from_secs(15);
/// Stdin chunk on the checksummed stream (kubectl's largest).
const CHUNK: usize = 32 * 1024;
/// Chunks sent between two bad messages.
const CHUNKS_PER_STEP: usize = 8;
/// Base64 characters of the oversize message's data (the envelope is just over 17 MiB; the
/// largest tunnel message is 16 MiB).
const OVERSIZE_B64: usize = 17 * 1024 * 1024;

/// Starts kubesim, an agent dialling `cp`, and accepts its tunnel.
async fn agent_on(
    cp: &ScriptedControlPlane,
    ca: Option<&std::path::Path>,
) -> (Cluster, AgentSession) {
    let mut c = Cluster::builder().without_control_plane().start();
    let token = c.agent_token().to_string();
    c.spawn_agent(&cp.url(), &token, ca, &[]);
    let session = cp.accept(T).await;
    assert_eq!(
        session.path, AGENT_PATH,
        "the agent must dial the control plane's agent path"
    );
    assert_eq!(
        session.authorization.as_deref(),
        Some(format!("Bearer {token}").as_str()),
        "the agent must present its token as a bearer token"
    );
    (c, session)
}

fn kube_headers(c: &Cluster) -> Value {
    json!({
        "Authorization": [format!("Bearer {}", c.kube_token())],
        "Sec-WebSocket-Protocol": ["v5.channel.k8s.io"],
    })
}

/// One bad message and the reply it must get.
struct Case {
    name: &'static str,
    message: String,
    /// `proxy_error` naming this id (None: no id to name), or `protocol_fallback`.
    expect: Expect,
}

enum Expect {
    Error(Option<&'static str>),
    Fallback(&'static str),
}

/// A valid `proxy_websocket_data` for `id` that is too large: a binary message on channel 0
/// (stdin) of zeros, written as text directly (base64 and serde_json over megabytes of random
/// data take seconds in an unoptimized test).
fn oversize_data(id: &str) -> String {
    // "AgAA" is base64 of [2, 0, 0] (opcode binary, channel 0, a zero), "AAAA" of three zeros.
    let data = format!("AgAA{}", "A".repeat(OVERSIZE_B64));
    format!(
        r#"{{"type":"proxy_websocket_data","request_id":"{id}","payload":{{"stream_id":"{id}","data":"{data}"}}}}"#
    )
}

fn is_reply(e: &Envelope) -> bool {
    matches!(e.type_name(), "proxy_error" | "protocol_fallback")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_leaves_other_streams_alone() {
    let cp = ScriptedControlPlane::bind(None).await;
    let (mut c, mut s) = agent_on(&cp, None).await;
    s.register(true).await;
    let headers = kube_headers(&c);

    // The checksummed stream: `cat` echoes stdin, hashed on both sides.
    let mut good = s.open_stream("good");
    s.start_exec("good", &["cat"], headers.clone());
    match good.next(T).await {
        Some(StreamEvent::Started(p)) => {
            assert_eq!(
                p.as_deref(),
                Some("v5.channel.k8s.io"),
                "negotiated subprotocol"
            )
        }
        other => panic!("expected proxy_websocket_started for the good stream, got {other:?}"),
    }
    // The victim of the oversize message: another `cat`, idle.
    let mut victim = s.open_stream("victim");
    s.start_exec("victim", &["cat"], headers.clone());
    assert!(
        matches!(victim.next(T).await, Some(StreamEvent::Started(_))),
        "victim stream did not start"
    );

    let sender = good.sender();
    let collector = tokio::spawn(async move {
        let mut hash = Sha256Stream::new();
        let out = good
            .collect(Duration::from_secs(50), |chunk| hash.update(chunk))
            .await;
        (good, out, hash)
    });

    let start_json = |id: &str, path: &str| {
        let mut p = exec_start_payload(id, &["true"], headers.clone());
        p["path"] = json!(path);
        envelope("proxy_websocket_start", Some(id), p).to_string()
    };
    let mut header_injection = exec_start_payload("h1", &["true"], headers.clone());
    header_injection["headers"]["X-Evil"] = json!(["ok\r\nInjected: 1"]);
    let cases = vec![
        Case {
            name: "malformed JSON",
            message: r#"{"type":"proxy_websocket_data","payload":{"#.into(),
            expect: Expect::Error(None),
        },
        Case {
            name: "bad base64",
            message: r#"{"type":"proxy_websocket_data","request_id":"good","payload":{"stream_id":"good","data":"!!!!"}}"#.into(),
            expect: Expect::Error(Some("good")),
        },
        Case {
            name: "unknown type",
            message: envelope("teleport", Some("t-1"), json!({})).to_string(),
            expect: Expect::Fallback("teleport"),
        },
        Case {
            name: "unknown stream id",
            message: data_envelope("proxy_websocket_data", "nobody", 2, b"\x00hello"),
            expect: Expect::Error(Some("nobody")),
        },
        Case {
            name: "duplicate start",
            message: start_json("good", "/api/v1/namespaces/default/pods/demo/exec"),
            expect: Expect::Error(Some("good")),
        },
        Case {
            name: "path outside the API",
            message: start_json("p1", "/metrics"),
            expect: Expect::Error(Some("p1")),
        },
        Case {
            name: "path traversal",
            message: start_json("p2", "/api/../../etc/passwd"),
            expect: Expect::Error(Some("p2")),
        },
        Case {
            name: "header injection",
            message: envelope("proxy_websocket_start", Some("h1"), header_injection).to_string(),
            expect: Expect::Error(Some("h1")),
        },
        Case {
            name: "oversize message",
            message: oversize_data("victim"),
            expect: Expect::Error(Some("victim")),
        },
    ];

    let mut prng = Prng::new(5);
    let mut sent = Sha256Stream::new();
    let mut send_chunks = |n: usize| {
        for _ in 0..n {
            let chunk = prng.bytes(CHUNK);
            sent.update(&chunk);
            sender.stdin(&chunk);
        }
    };
    for case in &cases {
        send_chunks(CHUNKS_PER_STEP);
        s.send_text(case.message.clone());
        let started = Instant::now();
        send_chunks(CHUNKS_PER_STEP);
        let reply = s.wait_control(case.name, T, is_reply).await;
        // (an upper bound: the reply may have been queued while the chunks were encoded)
        let took = started.elapsed();
        match case.expect {
            Expect::Error(id) => {
                assert_eq!(
                    reply.type_name(),
                    "proxy_error",
                    "{}: expected proxy_error, got {}",
                    case.name,
                    reply.raw
                );
                if let Some(id) = id {
                    assert_eq!(
                        reply.target(),
                        Some(id),
                        "{}: the error must name {id}: {}",
                        case.name,
                        reply.raw
                    );
                }
                let error = reply.payload_str("error").unwrap_or_default();
                assert!(
                    !error.trim().is_empty(),
                    "{}: empty error: {}",
                    case.name,
                    reply.raw
                );
                eprintln!("{:>22}: proxy_error in {took:?}: {error}", case.name);
            }
            Expect::Fallback(t) => {
                assert_eq!(
                    reply.type_name(),
                    "protocol_fallback",
                    "{}: expected protocol_fallback, got {}",
                    case.name,
                    reply.raw
                );
                assert_eq!(reply.payload_str("unknown_type"), Some(t), "{}", reply.raw);
                assert!(
                    reply.json["payload"]["supported_types"].is_array(),
                    "{}",
                    reply.raw
                );
                eprintln!("{:>22}: protocol_fallback in {took:?}", case.name);
            }
        }
    }
    // The oversize message closed only its own stream.
    let victim_closed = loop {
        match victim.next(T).await {
            Some(StreamEvent::Close(code, _)) => break Some(code),
            Some(StreamEvent::Data(8, p)) => {
                break Some((p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])));
            }
            Some(_) => continue,
            None => break None,
        }
    };
    assert!(
        victim_closed.is_some(),
        "the stream of the oversize message was not closed"
    );

    // The good stream is intact: finish it and compare checksums both ways.
    send_chunks(CHUNKS_PER_STEP);
    let sent_len = sent.len();
    let sent_hash = sent.hex();
    sender.close_stdin();
    let (_good, out, echoed) = collector.await.expect("collector");
    assert!(
        out.close.is_some(),
        "the good stream did not finish (no close); stderr {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.exit_code(),
        Some(0),
        "status {:?}",
        String::from_utf8_lossy(&out.status)
    );
    assert_eq!(echoed.len(), sent_len, "bytes echoed on the good stream");
    assert_eq!(
        echoed.hex(),
        sent_hash,
        "the good stream's bytes were disturbed"
    );
    assert!(s.closed().is_none(), "the tunnel closed: {:?}", s.closed());
    // Nothing else was refused: every error belonged to a bad message.
    while let Some(extra) = s.recv_control(Duration::from_millis(200)).await {
        assert!(
            !is_reply(&extra),
            "an error nobody asked for: {}",
            extra.raw
        );
    }

    // Each refusal was logged with the stream id it named.
    let log = c.agent().expect("agent").log();
    for id in ["nobody", "p1", "p2", "h1", "victim"] {
        assert!(log.contains(id), "the agent's log never names stream {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeops_control_plane_without_extensions_drives_exec() {
    let dir = tempfile::tempdir().unwrap();
    let tls = make_tls(dir.path(), "scripted-cp");
    let cp = ScriptedControlPlane::bind(Some(&tls)).await;
    let (c, mut s) = agent_on(&cp, Some(&tls.ca_path)).await;
    let register = s.register(false).await;
    assert!(
        register.json["payload"].is_object(),
        "register payload: {}",
        register.raw
    );
    let headers = kube_headers(&c);

    // An application ping is answered with pong echoing its request id.
    s.send_envelope("ping", Some("ping-1"), json!({}));
    let pong = s.wait_control("pong", T, |e| e.type_name() == "pong").await;
    assert_eq!(pong.request_id(), Some("ping-1"), "{}", pong.raw);

    // Exec with the long names: stdin, stdout, stderr and exit code 3.
    let mut one = s.open_stream("compat-1");
    s.start_exec(
        "compat-1",
        &[
            "sh",
            "-c",
            "read line; echo \"got:$line\"; echo to-err >&2; exit 3",
        ],
        headers.clone(),
    );
    one.stdin(b"hello\n");
    one.close_stdin();
    let out = one.collect(T, |_| {}).await;
    assert_eq!(
        out.started, None,
        "proxy_websocket_started is not in the PipeOps catalogue"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got:hello\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-err\n");
    assert_eq!(
        out.exit_code(),
        Some(3),
        "status {:?}",
        String::from_utf8_lossy(&out.status)
    );
    assert!(out.close.is_some(), "the stream was not closed");
    assert!(
        out.opcodes.iter().all(|op| *op == 2 || *op == 8),
        "v5 channel data must stay binary (opcode 2): {:?}",
        out.opcodes
    );

    // Exec with the short names the PipeOps gateway sends (ws_start / ws_data / ws_close).
    let mut two = s.open_stream("compat-2");
    two.use_short_names();
    s.send_envelope(
        "ws_start",
        Some("compat-2"),
        exec_start_payload("compat-2", &["cat"], headers.clone()),
    );
    let payload = Prng::new(3).bytes(256 * 1024);
    for chunk in payload.chunks(CHUNK) {
        two.stdin(chunk);
    }
    let mut echoed = Vec::new();
    let deadline = Instant::now() + T;
    while echoed.len() < payload.len() {
        assert!(
            Instant::now() < deadline,
            "echo stalled at {} bytes",
            echoed.len()
        );
        match two.next(T).await {
            Some(StreamEvent::Data(2, m)) if m.first() == Some(&1) => {
                echoed.extend_from_slice(&m[1..])
            }
            Some(StreamEvent::Data(..)) => {}
            other => panic!("compat-2: unexpected {other:?}"),
        }
    }
    assert_eq!(echoed, payload, "ws_data round trip");
    // ws_close from the control plane: the agent closes the upstream and confirms.
    two.close(None);
    let closed = loop {
        match two.next(T).await {
            Some(StreamEvent::Close(..)) => break true,
            Some(_) => continue,
            None => break false,
        }
    };
    assert!(closed, "no proxy_websocket_close after ws_close");

    // Let a heartbeat or two go by, then check everything the agent sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = s.seen();
    let mut bad = Vec::new();
    for frame in &seen {
        match frame.frame {
            FrameKind::Text => match frame.type_name.as_deref() {
                Some(t) if PIPEOPS_AGENT_TYPES.contains(&t) => {}
                other => bad.push(format!("text frame of type {other:?}")),
            },
            FrameKind::Ping | FrameKind::Pong => {}
            kind => bad.push(format!(
                "{kind:?} frame ({} bytes, type {:?})",
                frame.len, frame.type_name
            )),
        }
    }
    assert!(
        bad.is_empty(),
        "the agent sent things outside the PipeOps catalogue: {bad:#?}"
    );
    let mut types: Vec<&str> = seen.iter().filter_map(|f| f.type_name.as_deref()).collect();
    types.sort();
    types.dedup();
    eprintln!("compat: the agent sent only {types:?}");
    assert!(s.closed().is_none(), "the tunnel closed: {:?}", s.closed());
}
