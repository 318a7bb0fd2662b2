//! Both directions through one codebase: every outbound type decodes as an [`AgentMessage`],
//! every [`ControlMessage`] decodes as an [`Inbound`].

use crate::wire::error::DecodeError;
use crate::wire::json::{Value, WireStr};
use crate::wire::{
    AgentMessage, Body, CloseFrame, ControlMessage, DataFrame, Envelope, Extensions, Features,
    Heartbeat, Inbound, Outbound, ProtocolFallback, Register, TcpTunnelClose, TunnelPorts,
    UnixTime,
};

const TS: UnixTime = UnixTime::new(1_771_409_459, 123_456_789);

fn agent<'b>(msg: &Outbound<'_>, id: &str, buf: &'b mut [u8]) -> AgentMessage<'b> {
    let n = msg.encode(Some(WireStr::Plain(id)), TS, buf).unwrap();
    Envelope::parse(&buf[..n]).unwrap().agent_message().unwrap()
}

fn control<'b>(msg: &ControlMessage<'_>, id: &str, buf: &'b mut [u8]) -> Inbound<'b> {
    let n = msg.encode(Some(WireStr::Plain(id)), TS, buf).unwrap();
    let (env, inbound) = Inbound::decode(&buf[..n]).unwrap();
    assert_eq!(inbound.type_name(), msg.type_name());
    assert!(env.request_id.unwrap() == id);
    inbound
}

#[test]
fn every_outbound_type_decodes_on_the_control_plane() {
    let mut buf = [0u8; 4096];
    let mut out = [0u8; 64];
    let labels = [("a", "b")];
    let r = Register {
        agent_id: "ag",
        name: "n",
        k8s_version: "v",
        hostname: "h",
        agent_version: "0.1",
        server_ip: "ip",
        region: "r",
        cloud_provider: "c",
        tunnel_ports: TunnelPorts::default(),
        labels: &labels,
        server_specs: &[],
        features: Features::ALL,
        extensions: Extensions::ALL,
        metadata: &[],
        cluster_id: None,
        k8s_service_token: Some("tok"),
    };
    let AgentMessage::Register {
        agent_id,
        cluster_id,
        extensions,
        payload,
    } = agent(&Outbound::Register(r), "req", &mut buf)
    else {
        panic!()
    };
    assert!(agent_id.unwrap() == "ag");
    assert_eq!(cluster_id, None);
    assert_eq!(extensions, Extensions::ALL);
    assert!(payload.get("k8s_service_token").is_some());

    let meta = [("k8s_pods", Value::U64(9))];
    let hb = Outbound::Heartbeat(Heartbeat {
        cluster_id: "c",
        agent_id: "a",
        status: "healthy",
        tunnel_status: "connected",
        metadata: &meta,
        extra: &[],
    });
    assert!(
        matches!(agent(&hb, "", &mut buf), AgentMessage::Heartbeat { status: Some(s), .. } if s == "healthy")
    );
    assert_eq!(agent(&Outbound::Pong, "p", &mut buf), AgentMessage::Pong);
    assert_eq!(
        agent(&Outbound::GatewayHelloAck { use_yamux: true }, "", &mut buf),
        AgentMessage::GatewayHelloAck { use_yamux: true }
    );
    let headers = [("Content-Type", "text/plain"), ("X", "1"), ("x", "2")];
    let AgentMessage::ProxyResponse {
        status,
        headers: h,
        body,
        gzip,
    } = agent(
        &Outbound::ProxyResponse {
            status: 200,
            headers: &headers,
            body: Some(b"hi"),
            gzip: false,
        },
        "r",
        &mut buf,
    )
    else {
        panic!()
    };
    assert_eq!((status, gzip), (200, false));
    assert_eq!(h.get("x").unwrap().count(), 2);
    assert_eq!(body.unwrap().decode_into(&mut out).unwrap(), b"hi");
    assert!(matches!(
        agent(&Outbound::ProxyResponseHeader { status: 101, headers: &() }, "r", &mut buf),
        AgentMessage::ProxyResponseHeader { status: 101, headers } if headers.is_empty()
    ));
    let AgentMessage::ProxyResponseChunk { data } = agent(
        &Outbound::ProxyResponseChunk { data: b"abc" },
        "r",
        &mut buf,
    ) else {
        panic!()
    };
    assert_eq!(data.decode_into(&mut out).unwrap(), b"abc");
    assert_eq!(
        agent(&Outbound::ProxyResponseEnd, "r", &mut buf),
        AgentMessage::ProxyResponseEnd
    );
    assert!(matches!(
        agent(&Outbound::ProxyResponseAbort { error: "x".into() }, "r", &mut buf),
        AgentMessage::ProxyResponseAbort { error: Some(e) } if e == "x"
    ));
    assert!(matches!(
        agent(
            &Outbound::ProxyError { stream_id: Some("s".into()), error: "no".into(), status: Some(403) },
            "s",
            &mut buf
        ),
        AgentMessage::ProxyError { stream_id: Some(s), error: Some(e), status: Some(403) } if s == "s" && e == "no"
    ));
    assert!(matches!(
        agent(
            &Outbound::WebSocketStarted { stream_id: "s".into(), protocol: Some("v5.channel.k8s.io".into()) },
            "s",
            &mut buf
        ),
        AgentMessage::WebSocketStarted { stream_id, protocol: Some(p) } if stream_id == "s" && p == "v5.channel.k8s.io"
    ));
    let AgentMessage::WebSocketData(d) = agent(
        &Outbound::WebSocketData {
            stream_id: "s".into(),
            frame: DataFrame::Binary(b"\x01out"),
            app_request_id: None,
        },
        "s",
        &mut buf,
    ) else {
        panic!()
    };
    assert!(d.stream_id == "s");
    assert_eq!(
        DataFrame::decode_json(d.data, &mut out),
        Ok(DataFrame::Binary(b"\x01out"))
    );
    let AgentMessage::WebSocketClose(c) = agent(
        &Outbound::WebSocketClose {
            stream_id: "s".into(),
            close: Some(CloseFrame {
                code: 1011,
                reason: "err",
            }),
        },
        "s",
        &mut buf,
    ) else {
        panic!()
    };
    assert_eq!(c.code, Some(1011));
    assert!(matches!(
        agent(&Outbound::Backpressure { request_id: "s".into(), reason: "channel_full" }, "s", &mut buf),
        AgentMessage::Backpressure { reason: Some(r), .. } if r == "channel_full"
    ));
    assert!(matches!(
        agent(
            &Outbound::ProtocolFallback(ProtocolFallback {
                agent_version: "t",
                unknown_type: "zz".into(),
                original_request_id: None,
            }),
            "",
            &mut buf
        ),
        AgentMessage::ProtocolFallback { unknown_type: Some(u), original_request_id: None } if u == "zz"
    ));
    let AgentMessage::TcpTunnelData { data } =
        agent(&Outbound::TcpTunnelData { data: b"tcp" }, "t", &mut buf)
    else {
        panic!()
    };
    assert_eq!(data.decode_into(&mut out).unwrap(), b"tcp");
    assert!(matches!(
        agent(
            &Outbound::TcpTunnelClose(TcpTunnelClose {
                reason: "service_closed",
                bytes_sent: Some(1),
                bytes_received: Some(2),
                duration_ms: Some(3),
                error: None,
            }),
            "t",
            &mut buf
        ),
        AgentMessage::TcpTunnelClose {
            bytes_sent: Some(1),
            bytes_received: Some(2),
            duration_ms: Some(3),
            error: None,
            ..
        }
    ));
    let AgentMessage::UdpTunnelData(u) = agent(
        &Outbound::UdpTunnelData {
            tunnel_id: "u".into(),
            data: b"dg",
            client_addr: "1.2.3.4".into(),
            client_port: 9,
        },
        "",
        &mut buf,
    ) else {
        panic!()
    };
    assert_eq!(u.client_port, Some(9));
    assert_eq!(u.data.decode_into(&mut out).unwrap(), b"dg");

    let env = Envelope::parse(br#"{"type":"proxy_response","payload":{}}"#).unwrap();
    assert_eq!(
        env.agent_message(),
        Err(DecodeError::MissingField("status"))
    );
    let env = Envelope::parse(br#"{"type":"mystery"}"#).unwrap();
    assert!(
        matches!(env.agent_message(), Ok(AgentMessage::Unknown { type_name }) if type_name == "mystery")
    );
}

#[test]
fn every_control_message_decodes_on_the_agent() {
    let mut buf = [0u8; 4096];
    let mut out = [0u8; 64];
    let Inbound::RegisterSuccess(r) = control(
        &ControlMessage::RegisterSuccess {
            cluster_id: "c1".into(),
            gateway_ws_url: Some("wss://gw".into()),
            extensions: Extensions::ALL,
        },
        "req",
        &mut buf,
    ) else {
        panic!()
    };
    assert!(r.cluster_id == "c1");
    assert_eq!(r.extensions, Extensions::ALL);
    assert_eq!(
        control(&ControlMessage::HeartbeatAck, "h", &mut buf).type_name(),
        "heartbeat_ack"
    );
    assert_eq!(control(&ControlMessage::Ping, "p", &mut buf), Inbound::Ping);
    let headers = [("Accept", "application/json")];
    let Inbound::ProxyRequest(p) = control(
        &ControlMessage::ProxyRequest {
            method: "POST".into(),
            path: "/api/v1/pods".into(),
            query: "watch=1".into(),
            headers: &headers,
            body: Some(b"{}"),
            streaming: true,
            supports_response_streaming: true,
            timeout_ms: Some(1500),
            response_credit: true,
        },
        "r",
        &mut buf,
    ) else {
        panic!()
    };
    assert!(p.method.unwrap() == "POST" && p.query.unwrap() == "watch=1");
    assert!(p.streaming && p.supports_response_streaming && p.response_credit);
    assert_eq!(p.timeout_ms, Some(1500));
    let Some(Body::Base64(b)) = p.body else {
        panic!()
    };
    assert_eq!(b.decode_into(&mut out).unwrap(), b"{}");
    assert!(p.headers.get("accept").is_some());
    let Inbound::ProxyRequestChunk { data } = control(
        &ControlMessage::ProxyRequestChunk { data: b"c" },
        "r",
        &mut buf,
    ) else {
        panic!()
    };
    assert_eq!(data.decode_into(&mut out).unwrap(), b"c");
    assert_eq!(
        control(&ControlMessage::ProxyRequestStreamEnd, "r", &mut buf),
        Inbound::ProxyRequestStreamEnd
    );
    assert_eq!(
        control(&ControlMessage::ProxyCancel, "r", &mut buf),
        Inbound::ProxyCancel
    );
    assert_eq!(
        control(
            &ControlMessage::ProxyResponseCredit {
                bytes: 1 << 20,
                messages: 100
            },
            "r",
            &mut buf
        ),
        Inbound::ProxyResponseCredit {
            bytes: 1 << 20,
            messages: 100
        }
    );
    let Inbound::WebSocketStart(s) = control(
        &ControlMessage::WebSocketStart {
            stream_id: "s".into(),
            path: "/api/v1/namespaces/d/pods/p/exec".into(),
            query: "command=sh".into(),
            headers: &[("Sec-WebSocket-Protocol", "v5.channel.k8s.io")],
            protocol: None,
            method: None,
            upgrade: None,
        },
        "s",
        &mut buf,
    ) else {
        panic!()
    };
    assert!(s.stream_id == "s" && s.method.unwrap() == "GET");
    assert!(s.upgrade.is_none());
    assert!(
        s.headers
            .get("sec-websocket-protocol")
            .unwrap()
            .next()
            .unwrap()
            == "v5.channel.k8s.io"
    );
    let Inbound::WebSocketData(d) = control(
        &ControlMessage::WebSocketData {
            stream_id: "s".into(),
            frame: DataFrame::Close(Some(CloseFrame {
                code: 1000,
                reason: "",
            })),
        },
        "s",
        &mut buf,
    ) else {
        panic!()
    };
    assert_eq!(
        DataFrame::decode_json(d.data, &mut out),
        Ok(DataFrame::Close(Some(CloseFrame {
            code: 1000,
            reason: ""
        })))
    );
    let Inbound::WebSocketClose(c) = control(
        &ControlMessage::WebSocketClose {
            stream_id: "s".into(),
            close: None,
        },
        "s",
        &mut buf,
    ) else {
        panic!()
    };
    assert_eq!((c.code, c.reason), (None, None));
    let n = ControlMessage::Error {
        error: "cluster not found".into(),
    }
    .encode(None, TS, &mut buf)
    .unwrap();
    assert!(matches!(
        Inbound::decode(&buf[..n]),
        Ok((_, Inbound::Error { error: Some(e) })) if e == "cluster not found"
    ));
    let mut buf2 = [0u8; 1024];
    // A raw upgrade carries its method, token and offered protocols.
    let Inbound::WebSocketStart(raw) = control(
        &ControlMessage::WebSocketStart {
            stream_id: "s".into(),
            path: "/api/v1/namespaces/d/pods/p/exec".into(),
            query: "command=sh".into(),
            headers: &[("X-A", "b")],
            protocol: Some("v4.channel.k8s.io, v3.channel.k8s.io".into()),
            method: Some("POST".into()),
            upgrade: Some("SPDY/3.1".into()),
        },
        "s",
        &mut buf2,
    ) else {
        panic!()
    };
    assert!(raw.method.unwrap() == "POST" && raw.upgrade.unwrap() == "SPDY/3.1");
    assert!(raw.protocol.unwrap() == "v4.channel.k8s.io, v3.channel.k8s.io");
}

fn control_golden(msg: &ControlMessage<'_>, id: &str, payload: &str) {
    let mut buf = [0u8; 1024];
    let n = msg.encode(Some(WireStr::Plain(id)), TS, &mut buf).unwrap();
    let want = std::format!(
        r#"{{"type":"{}","request_id":"{id}","payload":{payload},"timestamp":"2026-02-18T10:10:59.123456789Z"}}"#,
        msg.type_name()
    );
    assert_eq!(core::str::from_utf8(&buf[..n]).unwrap(), want);
}

#[test]
fn golden_tcp_tunnel_control_messages() {
    control_golden(
        &ControlMessage::TcpTunnelStart {
            tunnel_id: "t1".into(),
            service_name: Some("db.local".into()),
            service_port: 5432,
            client_addr: Some("127.0.0.1:50000".into()),
            stream: None,
        },
        "t1",
        r#"{"tunnel_id":"t1","service_name":"db.local","service_port":5432,"client_addr":"127.0.0.1:50000"}"#,
    );
    control_golden(
        &ControlMessage::TcpTunnelStart {
            tunnel_id: "t2".into(),
            service_name: None,
            service_port: 80,
            client_addr: None,
            stream: None,
        },
        "t2",
        r#"{"tunnel_id":"t2","service_port":80}"#,
    );
    control_golden(
        &ControlMessage::TcpTunnelStart {
            tunnel_id: "t3".into(),
            service_name: None,
            service_port: 80,
            client_addr: None,
            stream: Some(7),
        },
        "t3",
        r#"{"tunnel_id":"t3","service_port":80,"stream":7}"#,
    );
    control_golden(
        &ControlMessage::TcpTunnelData {
            tunnel_id: "t1".into(),
            data: b"hello",
        },
        "t1",
        r#"{"tunnel_id":"t1","data":"aGVsbG8="}"#,
    );
    control_golden(
        &ControlMessage::TcpTunnelClose {
            tunnel_id: "t1".into(),
            reason: "client_closed".into(),
            error: None,
        },
        "t1",
        r#"{"tunnel_id":"t1","reason":"client_closed"}"#,
    );
    control_golden(
        &ControlMessage::TcpTunnelClose {
            tunnel_id: "t1".into(),
            reason: "client_error".into(),
            error: Some("reset by peer".into()),
        },
        "t1",
        r#"{"tunnel_id":"t1","reason":"client_error","error":"reset by peer"}"#,
    );
}

#[test]
fn tcp_tunnel_control_messages_decode_on_the_agent() {
    let mut buf = [0u8; 1024];
    let mut out = [0u8; 64];
    let Inbound::TcpTunnelStart(s) = control(
        &ControlMessage::TcpTunnelStart {
            tunnel_id: "t1".into(),
            service_name: Some("db".into()),
            service_port: 5432,
            client_addr: Some("10.0.0.1:1".into()),
            stream: Some(4_000_000_000),
        },
        "t1",
        &mut buf,
    ) else {
        panic!()
    };
    assert!(s.tunnel_id.unwrap() == "t1" && s.service_name.unwrap() == "db");
    assert_eq!(s.stream, Some(4_000_000_000));
    assert_eq!(s.service_port, Some(5432));
    assert!(s.client_addr.unwrap() == "10.0.0.1:1");
    let Inbound::TcpTunnelData { tunnel_id, data } = control(
        &ControlMessage::TcpTunnelData {
            tunnel_id: "t1".into(),
            data: b"\x00\xffxy",
        },
        "t1",
        &mut buf,
    ) else {
        panic!()
    };
    assert!(tunnel_id.unwrap() == "t1");
    assert_eq!(data.decode_into(&mut out).unwrap(), b"\x00\xffxy");
    let Inbound::TcpTunnelClose { tunnel_id, reason } = control(
        &ControlMessage::TcpTunnelClose {
            tunnel_id: "t1".into(),
            reason: "client_closed".into(),
            error: None,
        },
        "t1",
        &mut buf,
    ) else {
        panic!()
    };
    assert!(tunnel_id.unwrap() == "t1" && reason.unwrap() == "client_closed");
}
