//! Golden encodings of every outbound type (fixed timestamp), byte for byte.

use std::string::String;

use crate::wire::error::{EncodeError, FrameError};
use crate::wire::json::{Value, WireStr, parse};
use crate::wire::{
    CloseFrame, DataFrame, Envelope, Extensions, Features, Heartbeat, Inbound, Outbound,
    ProtocolFallback, Register, TcpTunnelClose, TunnelPorts, UnixTime,
};

const TS: UnixTime = UnixTime::new(1_771_409_459, 123_456_789);
const STAMP: &str = "2026-02-18T10:10:59.123456789Z";

fn enc(msg: &Outbound<'_>, id: Option<&str>) -> String {
    let mut buf = [0u8; 4096];
    let n = msg.encode(id.map(WireStr::Plain), TS, &mut buf).unwrap();
    assert_eq!(msg.encoded_len(id.map(WireStr::Plain), TS), Ok(n));
    // Every encoding is valid JSON with the envelope shape.
    let env = Envelope::parse(&buf[..n]).unwrap();
    assert!(env.type_name == msg.type_name());
    assert!(env.timestamp.unwrap() == STAMP);
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

fn golden(msg: Outbound<'_>, id: Option<&str>, payload: &str) {
    let want = match id {
        Some(id) => std::format!(
            r#"{{"type":"{}","request_id":"{id}","payload":{payload},"timestamp":"{STAMP}"}}"#,
            msg.type_name()
        ),
        None => std::format!(
            r#"{{"type":"{}","payload":{payload},"timestamp":"{STAMP}"}}"#,
            msg.type_name()
        ),
    };
    assert_eq!(enc(&msg, id), want);
}

#[test]
fn golden_register() {
    let specs = [("cpu_cores", Value::U64(4)), ("os", Value::Str("linux"))];
    let meta = [
        ("agent_mode", Value::Str("vm-agent")),
        ("registration_mode", Value::Str("fresh")),
    ];
    let labels = [
        ("hostname", "node-1"),
        ("agent.pipeops.io/version", "0.1.0"),
    ];
    let r = Register {
        agent_id: "agent-1",
        name: "prod",
        k8s_version: "v1.31.0",
        hostname: "node-1",
        agent_version: "0.1.0",
        server_ip: "10.0.0.1",
        region: "eu",
        cloud_provider: "aws",
        tunnel_ports: TunnelPorts::default(),
        labels: &labels,
        server_specs: &specs,
        features: Features::ALL,
        extensions: Extensions::ALL,
        metadata: &meta,
        cluster_id: Some("c1"),
        k8s_service_token: None,
    };
    golden(
        Outbound::Register(r),
        Some("req_1_agent-1"),
        concat!(
            r#"{"agent_id":"agent-1","name":"prod","k8s_version":"v1.31.0","hostname":"node-1","#,
            r#""agent_version":"0.1.0","server_ip":"10.0.0.1","region":"eu","cloud_provider":"aws","#,
            r#""tunnel_port_config":{"kubernetes_api":6443,"kubelet":10250,"agent_http":8080},"#,
            r#""labels":{"hostname":"node-1","agent.pipeops.io/version":"0.1.0"},"#,
            r#""server_specs":{"cpu_cores":4,"os":"linux"},"#,
            r#""features":{"supports_streaming":true,"supports_binary_protocol":true,"supports_compression":true,"supports_websocket_proxy":true,"supports_gateway":true,"supports_response_streaming":true},"#,
            r#""extensions":{"websocket_started":true,"websocket_close_code":true,"proxy_error_status":true,"native_frames":true,"raw_upgrade":true,"response_credit":true,"native_tcp":true,"native_ack":true},"#,
            r#""metadata":{"agent_mode":"vm-agent","registration_mode":"fresh"},"cluster_id":"c1"}"#
        ),
    );
}

#[test]
fn golden_heartbeat_pong_hello() {
    let meta = [
        ("k8s_nodes", Value::U64(3)),
        ("is_private", Value::Bool(true)),
    ];
    let join = [("provider", Value::Str("k3s"))];
    let extra = [
        ("prometheus_url", Value::Str("http://p")),
        ("worker_join", Value::Object(&join)),
    ];
    golden(
        Outbound::Heartbeat(Heartbeat {
            cluster_id: "c1",
            agent_id: "a1",
            status: "healthy",
            tunnel_status: "connected",
            metadata: &meta,
            extra: &extra,
        }),
        None,
        r#"{"cluster_id":"c1","agent_id":"a1","status":"healthy","tunnel_status":"connected","metadata":{"k8s_nodes":3,"is_private":true},"prometheus_url":"http://p","worker_join":{"provider":"k3s"}}"#,
    );
    golden(
        Outbound::Pong,
        Some("p1"),
        &std::format!(r#"{{"timestamp":"{STAMP}"}}"#),
    );
    golden(
        Outbound::GatewayHelloAck { use_yamux: false },
        None,
        r#"{"use_yamux":false}"#,
    );
}

#[test]
fn golden_proxy_responses() {
    let headers = [
        ("Content-Type", "application/json"),
        ("Set-Cookie", "a=1"),
        ("set-cookie", "b=\"2\""),
    ];
    golden(
        Outbound::ProxyResponse {
            status: 200,
            headers: &headers,
            body: Some(b"{}"),
            gzip: false,
        },
        Some("r1"),
        r#"{"status":200,"headers":{"Content-Type":["application/json"],"Set-Cookie":["a=1","b=\"2\""]},"body":"e30=","encoding":"base64"}"#,
    );
    golden(
        Outbound::ProxyResponse {
            status: 204,
            headers: &(),
            body: None,
            gzip: false,
        },
        Some("r1"),
        r#"{"status":204,"headers":{}}"#,
    );
    golden(
        Outbound::ProxyResponse {
            status: 200,
            headers: &(),
            body: Some(b"\x1f\x8b"),
            gzip: true,
        },
        Some("r1"),
        r#"{"status":200,"headers":{},"body":"H4s=","encoding":"gzip"}"#,
    );
    let raw: [(&[u8], &[u8]); 1] = [(b"X-Bin", b"a\xffb")];
    golden(
        Outbound::ProxyResponseHeader {
            status: 101,
            headers: &raw,
        },
        Some("r1"),
        "{\"status\":101,\"headers\":{\"X-Bin\":[\"a\u{FFFD}b\"]}}",
    );
    golden(
        Outbound::ProxyResponseChunk { data: b"hello" },
        Some("r1"),
        r#"{"data":"aGVsbG8=","encoding":"base64","size":5}"#,
    );
    golden(Outbound::ProxyResponseEnd, Some("r1"), "{}");
    golden(
        Outbound::ProxyResponseAbort {
            error: "upstream reset".into(),
        },
        Some("r1"),
        r#"{"error":"upstream reset"}"#,
    );
}

#[test]
fn golden_errors_and_fallback() {
    golden(
        Outbound::ProxyError {
            stream_id: None,
            error: "invalid path: must be a Kubernetes API path".into(),
            status: None,
        },
        Some("r1"),
        r#"{"error":"invalid path: must be a Kubernetes API path"}"#,
    );
    golden(
        Outbound::ProxyError {
            stream_id: Some("s1".into()),
            error: "upstream refused".into(),
            status: Some(403),
        },
        Some("s1"),
        r#"{"request_id":"s1","error":"upstream refused","status":403}"#,
    );
    golden(
        Outbound::Backpressure {
            request_id: "s1".into(),
            reason: "channel_full",
        },
        Some("s1"),
        r#"{"request_id":"s1","reason":"channel_full"}"#,
    );
    let names = crate::wire::INBOUND_TYPE_NAMES
        .iter()
        .map(|n| std::format!("\"{n}\""))
        .collect::<std::vec::Vec<_>>()
        .join(",");
    golden(
        Outbound::ProtocolFallback(ProtocolFallback {
            agent_version: "tether/0.1.0",
            unknown_type: "proxy_stream_chunk".into(),
            original_request_id: Some("x".into()),
        }),
        None,
        &std::format!(
            r#"{{"agent_version":"tether/0.1.0","unknown_type":"proxy_stream_chunk","supported_types":[{names}],"fallback_mode":"legacy_proxy","protocol_version":"1.0","timestamp":"{STAMP}","original_request_id":"x"}}"#
        ),
    );
    // An empty request id is omitted, like Go's omitempty.
    let s = enc(&Outbound::ProxyResponseEnd, Some(""));
    assert!(!s.contains("request_id"));
}

#[test]
fn golden_websocket() {
    golden(
        Outbound::WebSocketStarted {
            stream_id: "s1".into(),
            protocol: Some("v5.channel.k8s.io".into()),
        },
        Some("s1"),
        r#"{"stream_id":"s1","protocol":"v5.channel.k8s.io"}"#,
    );
    golden(
        Outbound::WebSocketStarted {
            stream_id: "s1".into(),
            protocol: None,
        },
        Some("s1"),
        r#"{"stream_id":"s1","protocol":""}"#,
    );
    golden(
        Outbound::WebSocketData {
            stream_id: "s1".into(),
            frame: DataFrame::Text(b"hello"),
            app_request_id: None,
        },
        Some("s1"),
        r#"{"stream_id":"s1","data":"AWhlbGxv"}"#,
    );
    golden(
        Outbound::WebSocketData {
            stream_id: "s1".into(),
            frame: DataFrame::Binary(&[1, 2, 3, 4]),
            app_request_id: Some("r9".into()),
        },
        Some("r9"),
        r#"{"request_id":"r9","stream_id":"s1","data":"AgECAwQ=","message_type":2}"#,
    );
    golden(
        Outbound::WebSocketClose {
            stream_id: "s1".into(),
            close: None,
        },
        Some("s1"),
        r#"{"stream_id":"s1"}"#,
    );
    golden(
        Outbound::WebSocketClose {
            stream_id: "s1".into(),
            close: Some(CloseFrame {
                code: 1000,
                reason: "",
            }),
        },
        Some("s1"),
        r#"{"stream_id":"s1","code":1000,"reason":""}"#,
    );
}

#[test]
fn golden_tunnels() {
    golden(
        Outbound::TcpTunnelData { data: b"\x00\xff" },
        Some("t1"),
        r#"{"data":"AP8=","direction":"agent_to_gateway"}"#,
    );
    golden(
        Outbound::TcpTunnelClose(TcpTunnelClose {
            reason: "service_closed",
            bytes_sent: Some(10),
            bytes_received: Some(20),
            duration_ms: Some(30),
            error: Some("eof"),
        }),
        Some("t1"),
        r#"{"reason":"service_closed","bytes_sent":10,"bytes_received":20,"duration_ms":30,"error":"eof"}"#,
    );
    golden(
        Outbound::TcpTunnelClose(TcpTunnelClose {
            reason: "connection_failed",
            bytes_sent: None,
            bytes_received: None,
            duration_ms: None,
            error: None,
        }),
        Some("t1"),
        r#"{"reason":"connection_failed"}"#,
    );
    golden(
        Outbound::UdpTunnelData {
            tunnel_id: "u1".into(),
            data: b"dns",
            client_addr: "10.0.0.9".into(),
            client_port: 5353,
        },
        None,
        r#"{"tunnel_id":"u1","data":"ZG5z","client_addr":"10.0.0.9","client_port":5353,"direction":"agent_to_gateway"}"#,
    );
}

#[test]
fn echoes_escaped_ids_verbatim() {
    let (env, msg) =
        Inbound::decode(br#"{"type":"ws_data","request_id":"s\u00e9","payload":{"data":"AQ=="}}"#)
            .unwrap();
    let Inbound::WebSocketData(d) = msg else {
        panic!()
    };
    let out = Outbound::WebSocketClose {
        stream_id: d.stream_id.into(),
        close: None,
    };
    let mut buf = [0u8; 256];
    let n = out
        .encode(env.request_id.map(WireStr::from), TS, &mut buf)
        .unwrap();
    let s = core::str::from_utf8(&buf[..n]).unwrap();
    assert!(s.contains(r#""request_id":"s\u00e9""#), "{s}");
    assert!(s.contains(r#""stream_id":"s\u00e9""#), "{s}");
    // Plain strings are escaped.
    let out = Outbound::ProxyResponseAbort {
        error: "line\n\"q\"".into(),
    };
    let n = out.encode(None, TS, &mut buf).unwrap();
    let v = parse(&buf[..n]).unwrap().as_object().unwrap();
    let p = v.get("payload").unwrap().as_object().unwrap();
    assert!(p.get("error").unwrap().as_str().unwrap() == "line\n\"q\"");
}

#[test]
fn encode_errors() {
    let msg = Outbound::WebSocketData {
        stream_id: "s".into(),
        frame: DataFrame::Text(b"hello"),
        app_request_id: None,
    };
    let full = enc(&msg, Some("s"));
    for cap in [0, 1, full.len() / 2, full.len() - 1] {
        let mut buf = std::vec![0u8; cap];
        assert_eq!(
            msg.encode(Some("s".into()), TS, &mut buf),
            Err(EncodeError::BufferTooSmall { needed: full.len() })
        );
    }
    let mut buf = [0u8; 512];
    assert_eq!(
        msg.encode(None, UnixTime::new(253_402_300_800, 0), &mut buf),
        Err(EncodeError::TimestampOutOfRange)
    );
    let bad = Outbound::WebSocketData {
        stream_id: "s".into(),
        frame: DataFrame::Ping(&[0; 200]),
        app_request_id: None,
    };
    assert_eq!(
        bad.encode(None, TS, &mut buf),
        Err(EncodeError::InvalidFrame(FrameError::ControlTooLong))
    );
}
