use std::vec::Vec;

use crate::wire::error::{DecodeError, FrameError};
use crate::wire::{
    Body, DataFrame, Envelope, Extensions, Inbound, Limits, WebSocketClose, WebSocketData,
};

fn decode(src: &str) -> Result<Inbound<'_>, DecodeError> {
    Inbound::decode(src.as_bytes()).map(|(_, m)| m)
}

#[test]
fn envelope_fields() {
    let src = r#" {"type":"ping","request_id":"r\u002d1","payload":null,"timestamp":"2026-02-18T10:10:59.123456789+01:00","extra":[1]} "#;
    let env = Envelope::parse(src.as_bytes()).unwrap();
    assert!(env.type_name == "ping");
    assert!(env.request_id.unwrap() == "r-1");
    assert!(env.payload.is_empty());
    assert!(env.timestamp.unwrap().as_str().is_some());
    assert_eq!(env.inbound(), Ok(Inbound::Ping));
    // JSON in a binary frame is the same bytes; whitespace and no payload are fine.
    let env = Envelope::parse(b"\n{\"type\":\"pong\"}").unwrap();
    assert_eq!(env.request_id, None);
    assert_eq!(env.inbound(), Ok(Inbound::Pong));
}

#[test]
fn envelope_errors() {
    assert_eq!(Envelope::parse(b""), Err(DecodeError::NotJson));
    assert_eq!(Envelope::parse(b"\x00\x02ab"), Err(DecodeError::NotJson));
    assert_eq!(Envelope::parse(b"[1]"), Err(DecodeError::NotJson));
    assert_eq!(Envelope::parse(b"\"x\""), Err(DecodeError::NotJson));
    assert_eq!(
        Envelope::parse(br#"{"type":"ping""#),
        Err(DecodeError::Malformed { offset: 14 })
    );
    assert_eq!(
        Envelope::parse(b"{\"type\":\"\xff\"}"),
        Err(DecodeError::InvalidUtf8 { offset: 9 })
    );
    assert_eq!(
        Envelope::parse(br#"{"payload":{}}"#),
        Err(DecodeError::MissingField("type"))
    );
    assert_eq!(
        Envelope::parse(br#"{"type":null}"#),
        Err(DecodeError::MissingField("type"))
    );
    assert_eq!(
        Envelope::parse(br#"{"type":1}"#),
        Err(DecodeError::WrongType("type"))
    );
    assert_eq!(
        Envelope::parse(br#"{"type":"ping","request_id":7}"#),
        Err(DecodeError::WrongType("request_id"))
    );
    assert_eq!(
        Envelope::parse(br#"{"type":"ping","payload":[]}"#),
        Err(DecodeError::WrongType("payload"))
    );
    let limits = Limits {
        max_len: 16,
        max_depth: 2,
    };
    assert_eq!(
        Envelope::parse_with(br#"{"type":"ping","x":1}"#, &limits),
        Err(DecodeError::TooLarge { len: 21, max: 16 })
    );
    let limits = Limits {
        max_len: 100,
        max_depth: 2,
    };
    assert!(Envelope::parse_with(br#"{"type":"p","payload":{}}"#, &limits).is_ok());
    assert_eq!(
        Envelope::parse_with(br#"{"type":"p","payload":{"a":[]}}"#, &limits),
        Err(DecodeError::TooDeep)
    );
}

#[test]
fn unknown_type_is_a_value() {
    let (env, msg) =
        Inbound::decode(br#"{"type":"proxy_stream_chunk","request_id":"abc"}"#).unwrap();
    match msg {
        Inbound::Unknown { type_name } => assert!(type_name == "proxy_stream_chunk"),
        other => panic!("{other:?}"),
    }
    assert!(env.request_id.unwrap() == "abc");
    assert_eq!(msg.type_name(), "proxy_stream_chunk");
    // Type names match exactly, through escapes.
    assert_eq!(decode(r#"{"type":"PING"}"#).unwrap().type_name(), "PING");
    assert_eq!(decode(r#"{"type":"p\u0069ng"}"#), Ok(Inbound::Ping));
}

#[test]
fn websocket_start() {
    let src = r#"{"type":"proxy_websocket_start","request_id":"s1","timestamp":"2026-02-18T10:10:59.123456789+01:00",
 "payload":{"stream_id":"s1","cluster_uuid":"cu","method":"GET",
            "path":"/api/v1/namespaces/default/pods/web-0/exec",
            "query":"command=sh&stdin=true&stdout=true&stderr=true&tty=true&container=app",
            "headers":{"Authorization":["Bearer tok"],"Sec-WebSocket-Protocol":["v5.channel.k8s.io","v4.channel.k8s.io"],"X-One":"single","X-Null":null},
            "protocol":"v4.channel.k8s.io"}}"#;
    let Inbound::WebSocketStart(s) = decode(src).unwrap() else {
        panic!()
    };
    assert!(s.stream_id == "s1");
    assert!(s.path.unwrap() == "/api/v1/namespaces/default/pods/web-0/exec");
    assert!(s.protocol.unwrap() == "v4.channel.k8s.io");
    let names: Vec<std::string::String> =
        s.headers.iter().map(|(n, _)| std::format!("{n}")).collect();
    assert_eq!(
        names,
        ["Authorization", "Sec-WebSocket-Protocol", "X-One", "X-Null"]
    );
    let protos: Vec<_> = s.headers.get("sec-websocket-protocol").unwrap().collect();
    assert_eq!(protos.len(), 2);
    assert!(protos[1] == "v4.channel.k8s.io");
    assert_eq!(s.headers.get("x-one").unwrap().count(), 1);
    assert_eq!(s.headers.get("x-null").unwrap().count(), 0);
    assert!(s.headers.get("missing").is_none());
    // The short name decodes the same way.
    let short = src.replace("proxy_websocket_start", "ws_start");
    assert_eq!(decode(&short).unwrap(), Inbound::WebSocketStart(s));
    // stream_id is required for start.
    assert_eq!(
        decode(r#"{"type":"ws_start","request_id":"s1","payload":{"path":"/api"}}"#),
        Err(DecodeError::MissingField("stream_id"))
    );
    assert_eq!(
        decode(r#"{"type":"ws_start","payload":{"stream_id":"s","headers":{"A":1}}}"#),
        Err(DecodeError::WrongType("headers"))
    );
    assert_eq!(
        decode(r#"{"type":"ws_start","payload":{"stream_id":"s","headers":{"A":["x",2]}}}"#),
        Err(DecodeError::WrongType("headers"))
    );
    assert_eq!(
        decode(r#"{"type":"ws_start","payload":{"stream_id":"s","headers":"A"}}"#),
        Err(DecodeError::WrongType("headers"))
    );
}

#[test]
fn websocket_data_and_close() {
    let mut buf = [0u8; 64];
    for name in ["proxy_websocket_data", "ws_data"] {
        let src = std::format!(
            r#"{{"type":"{name}","request_id":"s1","payload":{{"stream_id":"s1","data":"AWhlbGxv"}}}}"#
        );
        let Inbound::WebSocketData(d) = decode(&src).unwrap() else {
            panic!()
        };
        assert!(d.stream_id == "s1");
        assert_eq!(d.data.decoded_len(), Ok(6));
        assert_eq!(
            DataFrame::decode_json(d.data, &mut buf),
            Ok(DataFrame::Text(b"hello"))
        );
    }
    // Stream id fallbacks: payload.request_id, then the envelope's request_id.
    let WebSocketData { stream_id, .. } = match decode(
        r#"{"type":"ws_data","request_id":"env","payload":{"request_id":"app","data":"AQ=="}}"#,
    ) {
        Ok(Inbound::WebSocketData(d)) => d,
        other => panic!("{other:?}"),
    };
    assert!(stream_id == "app");
    let Ok(Inbound::WebSocketData(d)) = decode(
        r#"{"type":"ws_data","request_id":"env","payload":{"data":"AQ==","message_type":2}}"#,
    ) else {
        panic!()
    };
    assert!(d.stream_id == "env");
    assert_eq!(d.message_type, Some(2));
    // Missing stream id anywhere.
    assert_eq!(
        decode(r#"{"type":"ws_data","payload":{"data":"AQ=="}}"#),
        Err(DecodeError::MissingField("stream_id"))
    );
    assert_eq!(
        decode(r#"{"type":"ws_data","payload":{"stream_id":"s"}}"#),
        Err(DecodeError::MissingField("data"))
    );
    assert_eq!(
        decode(r#"{"type":"ws_data","payload":{"stream_id":5,"data":"AQ=="}}"#),
        Err(DecodeError::WrongType("stream_id"))
    );
    assert_eq!(
        decode(
            r#"{"type":"ws_data","payload":{"stream_id":"s","data":"AQ==","message_type":300}}"#
        ),
        Err(DecodeError::InvalidValue("message_type"))
    );
    // Bad base64 and unknown opcodes surface when the data is decoded.
    let Ok(Inbound::WebSocketData(d)) =
        decode(r#"{"type":"ws_data","payload":{"stream_id":"s","data":"AWhl!Gxv"}}"#)
    else {
        panic!()
    };
    assert_eq!(
        DataFrame::decode_json(d.data, &mut buf),
        Err(FrameError::BadBase64)
    );
    let Ok(Inbound::WebSocketData(d)) =
        decode(r#"{"type":"ws_data","payload":{"stream_id":"s","data":"B2hlbGxv"}}"#)
    else {
        panic!()
    };
    assert_eq!(
        DataFrame::decode_json(d.data, &mut buf),
        Err(FrameError::UnknownOpcode(7))
    );

    // Close, plain and with the Tether code/reason extension.
    for name in ["proxy_websocket_close", "ws_close"] {
        let src = std::format!(r#"{{"type":"{name}","payload":{{"stream_id":"s1"}}}}"#);
        assert!(matches!(
            decode(&src),
            Ok(Inbound::WebSocketClose(WebSocketClose {
                code: None,
                reason: None,
                ..
            }))
        ));
    }
    let Ok(Inbound::WebSocketClose(c)) =
        decode(r#"{"type":"ws_close","payload":{"stream_id":"s1","code":1000,"reason":"done"}}"#)
    else {
        panic!()
    };
    assert_eq!(c.code, Some(1000));
    assert!(c.reason.unwrap() == "done");
    assert_eq!(
        decode(r#"{"type":"ws_close","payload":{"stream_id":"s1","code":70000}}"#),
        Err(DecodeError::InvalidValue("code"))
    );
    assert_eq!(
        decode(r#"{"type":"ws_close","payload":{"stream_id":"s1","code":"1000"}}"#),
        Err(DecodeError::WrongType("code"))
    );
}

#[test]
fn escaped_base64_data_decodes_through_escapes() {
    let mut buf = [0u8; 512];
    // `\/` and `\u0041` escapes inside base64, across several internal chunks.
    let payload: Vec<u8> = (0..200u8).collect();
    let mut b64 = [0u8; 300];
    let n = crate::wire::b64::encode(&payload, &mut b64).unwrap();
    let text = core::str::from_utf8(&b64[..n]).unwrap();
    let escaped = text.replace('/', "\\/").replace('A', "\\u0041");
    let src = std::format!(r#"{{"type":"tcp_tunnel_data","payload":{{"data":"{escaped}"}}}}"#);
    let Ok(Inbound::TcpTunnelData { data, tunnel_id }) = decode(&src) else {
        panic!()
    };
    assert_eq!(tunnel_id, None);
    assert_eq!(data.decoded_len(), Ok(200));
    assert_eq!(data.decode_into(&mut buf).unwrap(), &payload[..]);
    assert_eq!(
        data.decode_into(&mut buf[..199]),
        Err(FrameError::BufferTooSmall { needed: 200 })
    );
    // Padding in the middle is rejected even when it ends an internal chunk.
    let mid = std::format!("{}{}", "\\u0041".repeat(62), "Q==AAAA");
    let src = std::format!(r#"{{"type":"tcp_tunnel_data","payload":{{"data":"{mid}"}}}}"#);
    let Ok(Inbound::TcpTunnelData { data, .. }) = decode(&src) else {
        panic!()
    };
    assert_eq!(data.decode_into(&mut buf), Err(FrameError::BadBase64));
    let src = r#"{"type":"tcp_tunnel_data","payload":{"data":"\u00e9AAA"}}"#;
    let Ok(Inbound::TcpTunnelData { data, .. }) = decode(src) else {
        panic!()
    };
    assert_eq!(data.decoded_len(), Err(FrameError::BadBase64));
}

#[test]
fn proxy_request() {
    let src = r#"{"type":"proxy_request","request_id":"r1","payload":{
        "method":"POST","path":"/api/v1/namespaces/x/pods","query":"a=b&c=d",
        "headers":{"Content-Type":["application/json"],"Upgrade":"websocket"},
        "scheme":"https","cluster_id":"c","cluster_uuid":"u","agent_id":"ag",
        "body":"eyJ9","body_encoding":"base64","body_binary":false,"body_size":2,
        "streaming":true,"isWebSocket":true,"useZeroCopy":true,"headData":"AAE=",
        "protocol":"v5.channel.k8s.io","supports_streaming":true,"supports_response_streaming":true,
        "deadline":"2026-02-18T10:10:59Z","timeout":"1m30.5s","rate_limit_bps":1000,
        "namespace":"ns","service_name":"svc","service_port":8080}}"#;
    let Inbound::ProxyRequest(r) = decode(src).unwrap() else {
        panic!()
    };
    assert!(r.method.unwrap() == "POST");
    assert!(r.query.unwrap() == "a=b&c=d");
    assert!(matches!(r.body, Some(Body::Base64(b)) if b.decoded_len() == Ok(3)));
    assert_eq!(r.body_size, Some(2));
    assert!(r.streaming && r.is_websocket && r.use_zero_copy && r.supports_response_streaming);
    assert!(!r.body_binary);
    assert_eq!(r.timeout_ms, Some(90_500));
    assert_eq!(r.service_port, Some(8080));
    assert_eq!(r.rate_limit_bps, Some(1000));
    assert!(r.head_data.is_some());
    assert!(r.wants_websocket());

    let minimal = r#"{"type":"proxy_request","request_id":"r2","payload":{"path":"/version","body":{"a":[1]},"timeout":30000}}"#;
    let Inbound::ProxyRequest(r) = decode(minimal).unwrap() else {
        panic!()
    };
    assert!(matches!(r.body, Some(Body::Json(v)) if v.as_object().is_some()));
    assert_eq!(r.timeout_ms, Some(30_000));
    assert!(r.headers.is_empty());
    assert!(!r.wants_websocket());
    let text = r#"{"type":"proxy_request","payload":{"body":"raw text","headers":{"sec-websocket-key":"k"}}}"#;
    let Inbound::ProxyRequest(r) = decode(text).unwrap() else {
        panic!()
    };
    assert!(matches!(r.body, Some(Body::Text(t)) if t == "raw text"));
    assert!(r.wants_websocket());

    for (bad, err) in [
        (r#""timeout":"soon""#, DecodeError::InvalidValue("timeout")),
        (r#""timeout":-1"#, DecodeError::InvalidValue("timeout")),
        (r#""timeout":true"#, DecodeError::WrongType("timeout")),
        (r#""body":5"#, DecodeError::WrongType("body")),
        (
            r#""service_port":65536"#,
            DecodeError::InvalidValue("service_port"),
        ),
        (
            r#""service_port":80.5"#,
            DecodeError::InvalidValue("service_port"),
        ),
        (r#""streaming":"yes""#, DecodeError::WrongType("streaming")),
        (r#""head_data":1"#, DecodeError::WrongType("head_data")),
        (r#""path":["/"]"#, DecodeError::WrongType("path")),
    ] {
        let src = std::format!(r#"{{"type":"proxy_request","payload":{{{bad}}}}}"#);
        assert_eq!(decode(&src), Err(err), "{bad}");
    }
}

#[test]
fn go_durations() {
    use crate::wire::inbound::go_duration_nanos as d;
    assert_eq!(d("0"), Some(0));
    assert_eq!(d("300ms"), Some(300_000_000));
    assert_eq!(d("1.5h"), Some(5_400_000_000_000));
    assert_eq!(d("2h45m"), Some(9_900_000_000_000));
    assert_eq!(d("1µs"), Some(1_000));
    assert_eq!(d("1μs"), Some(1_000));
    assert_eq!(d("1us1ns"), Some(1_001));
    assert_eq!(d(".5s"), Some(500_000_000));
    assert_eq!(d("+10s"), Some(10_000_000_000));
    for bad in [
        "",
        "5",
        "s",
        "1x",
        "-1s",
        ".s",
        "1.2.3s",
        "99999999999999999999999999999999999999999h",
    ] {
        assert_eq!(d(bad), None, "{bad}");
    }
}

#[test]
fn other_inbound_types() {
    let rs = r#"{"type":"register_success","request_id":"req_1","payload":{"cluster_id":"c1","cluster_uuid":"u1","name":"n","status":"active","tunnel_url":"t","api_server":"a","token":"tk","workspace_id":42,"gateway_ws_url":"wss://gw/ws","extensions":{"websocket_started":true,"proxy_error_status":true,"future":{"x":1}}}}"#;
    let Inbound::RegisterSuccess(r) = decode(rs).unwrap() else {
        panic!()
    };
    assert!(r.cluster_id == "c1");
    assert_eq!(r.workspace_id.unwrap().as_u64(), Some(42));
    assert!(r.gateway_ws_url.unwrap() == "wss://gw/ws");
    assert_eq!(
        r.extensions,
        Extensions {
            websocket_started: true,
            websocket_close_code: false,
            proxy_error_status: true,
            native: false,
            raw_upgrade: false,
            response_credit: false,
            native_tcp: false,
            native_ack: false,
        }
    );
    let Inbound::RegisterSuccess(r) =
        decode(r#"{"type":"register_success","payload":{"cluster_id":"c"}}"#).unwrap()
    else {
        panic!()
    };
    assert_eq!(r.extensions, Extensions::NONE);
    assert_eq!(
        decode(r#"{"type":"register_success","payload":{}}"#),
        Err(DecodeError::MissingField("cluster_id"))
    );
    assert_eq!(
        decode(
            r#"{"type":"register_success","payload":{"cluster_id":"c","extensions":{"websocket_started":1}}}"#
        ),
        Err(DecodeError::WrongType("extensions"))
    );
    assert!(matches!(
        decode(r#"{"type":"register_in_progress","payload":{"message":"wait"}}"#),
        Ok(Inbound::RegisterInProgress(p)) if p.get("message").is_some()
    ));
    assert!(
        matches!(decode(r#"{"type":"heartbeat_ack"}"#), Ok(Inbound::HeartbeatAck(p)) if p.is_empty())
    );
    let Inbound::GatewayHello(h) = decode(r#"{"type":"gateway_hello","payload":{"use_yamux":true,"yamux_config":{"max_stream_window_size":262144,"keep_alive_interval_seconds":30,"connection_timeout_seconds":30}}}"#).unwrap() else {
        panic!()
    };
    assert!(h.use_yamux);
    assert_eq!(h.max_stream_window_size, Some(262_144));
    assert_eq!(h.keep_alive_interval_seconds, Some(30));
    assert!(matches!(
        decode(r#"{"type":"proxy_request_chunk","payload":{"chunk":"AAEC"}}"#),
        Ok(Inbound::ProxyRequestChunk { data }) if data.decoded_len() == Ok(3)
    ));
    assert!(matches!(
        decode(r#"{"type":"proxy_request_chunk","payload":{"data":"AAEC","chunk":"x"}}"#),
        Ok(Inbound::ProxyRequestChunk { data }) if data.json() == "AAEC"
    ));
    assert_eq!(
        decode(r#"{"type":"proxy_request_chunk","payload":{}}"#),
        Err(DecodeError::MissingField("data"))
    );
    assert_eq!(
        decode(r#"{"type":"proxy_request_stream_end","request_id":"r"}"#),
        Ok(Inbound::ProxyRequestStreamEnd)
    );
    assert_eq!(
        decode(r#"{"type":"proxy_cancel","request_id":"r"}"#),
        Ok(Inbound::ProxyCancel)
    );
    assert!(matches!(
        decode(r#"{"type":"proxy_stream_data","payload":{"data":"AA=="}}"#),
        Ok(Inbound::ProxyStreamData { .. })
    ));
    let Inbound::TcpTunnelStart(t) = decode(r#"{"type":"tcp_tunnel_start","request_id":"t1","payload":{"tunnel_id":"t1","gateway_name":"g","gateway_namespace":"gn","gateway_port":443,"service_name":"s","service_namespace":"sn","service_port":80,"client_addr":"1.2.3.4:5"}}"#).unwrap() else {
        panic!()
    };
    assert_eq!((t.gateway_port, t.service_port), (Some(443), Some(80)));
    assert!(t.client_addr.unwrap() == "1.2.3.4:5");
    assert!(matches!(
        decode(r#"{"type":"tcp_tunnel_close","payload":{"reason":"client_closed"}}"#),
        Ok(Inbound::TcpTunnelClose { reason: Some(r), .. }) if r == "client_closed"
    ));
    let Inbound::UdpTunnelData(u) = decode(r#"{"type":"udp_tunnel_data","payload":{"tunnel_id":"u","data":"AAAA","client_addr":"1.2.3.4","client_port":53,"service_port":53}}"#).unwrap() else {
        panic!()
    };
    assert_eq!(u.client_port, Some(53));
    assert!(u.payload.get("service_port").is_some());
    assert!(matches!(
        decode(r#"{"type":"error","payload":{"error":"cluster not found"}}"#),
        Ok(Inbound::Error { error: Some(e) }) if e == "cluster not found"
    ));
    assert_eq!(
        decode(r#"{"type":"error"}"#),
        Ok(Inbound::Error { error: None })
    );
}

#[test]
fn every_catalogue_name_decodes() {
    for name in crate::wire::INBOUND_TYPE_NAMES {
        let src = std::format!(
            r#"{{"type":"{name}","request_id":"r","payload":{{"stream_id":"s","cluster_id":"c","data":"AQ==","bytes":1,"messages":1}}}}"#
        );
        let msg = decode(&src).unwrap();
        assert!(!matches!(msg, Inbound::Unknown { .. }), "{name}");
        let long = match *name {
            "ws_start" => "proxy_websocket_start",
            "ws_data" => "proxy_websocket_data",
            "ws_close" => "proxy_websocket_close",
            n => n,
        };
        assert_eq!(msg.type_name(), long);
    }
}
