//! Inbound envelope decoder: arbitrary frames must never panic, and every decoded view must
//! be usable (iterate headers, unescape strings, decode base64) without panicking. Also checks
//! JSON reader invariants: unescape length = `unescaped_len`, `eq` agrees with the unescaped
//! text, and re-emitting the payload's raw text re-parses to the same text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_core::wire::json::{self, JsonStr, JsonValue};
use tether_core::wire::{
    Base64Str, CloseFrame, ControlMessage, DataFrame, Envelope, Inbound, UnixTime,
};

fn check_str(s: JsonStr<'_>) {
    let mut buf = [0u8; 4096];
    let n = s.unescaped_len();
    match s.unescape_into(&mut buf) {
        Ok(text) => {
            assert_eq!(text.len(), n);
            assert!(s == *text, "eq through escapes");
            assert!(s.eq_ignore_ascii_case(text));
            assert_eq!(s.chars().count(), text.chars().count());
        }
        Err(e) => assert_eq!(e.needed, n),
    }
}

fn check_b64(d: Base64Str<'_>) {
    let mut buf = [0u8; 4096];
    if let Ok(len) = d.decoded_len() {
        if let Ok(raw) = d.decode_into(&mut buf) {
            assert_eq!(raw.len(), len);
        }
    }
    let _ = DataFrame::decode_json(d, &mut buf);
}

fn walk(v: JsonValue<'_>, depth: usize) {
    match v {
        JsonValue::String(s) => check_str(s),
        JsonValue::Number(n) => {
            let _ = (n.as_u64(), n.as_i64(), n.as_f64());
        }
        JsonValue::Array(a) => {
            for item in a.iter().take(64) {
                if depth < 40 {
                    walk(item, depth + 1);
                }
            }
        }
        JsonValue::Object(o) => {
            for (k, item) in o.iter().take(64) {
                check_str(k);
                if depth < 40 {
                    walk(item, depth + 1);
                }
            }
        }
        JsonValue::Null | JsonValue::Bool(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // The raw reader on its own.
    if let Ok(v) = json::parse(data) {
        walk(v, 0);
    }
    let Ok(env) = Envelope::parse(data) else {
        return;
    };
    check_str(env.type_name);
    // Re-parse the payload's raw text: it must be a valid object with the same text.
    let raw = env.payload.raw();
    let again = json::parse(raw.as_bytes()).expect("payload raw text re-parses");
    assert_eq!(again.as_object().map(|o| o.raw()), Some(raw));
    // The control plane's decoder of agent messages must not panic either.
    let _ = env.agent_message();
    let Ok(msg) = env.inbound() else {
        return;
    };
    let _ = msg.type_name();
    match msg {
        Inbound::ProxyRequest(r) => {
            let _ = r.wants_websocket();
            for (name, values) in r.headers.iter() {
                check_str(name);
                for v in values {
                    check_str(v);
                }
            }
            if let Some(tether_core::wire::Body::Base64(b)) = r.body {
                check_b64(b);
            }
        }
        Inbound::WebSocketStart(s) => {
            for (name, values) in s.headers.iter() {
                check_str(name);
                values.for_each(check_str);
            }
        }
        Inbound::WebSocketData(d) => {
            check_str(d.stream_id);
            check_b64(d.data);
            // decode -> encode (control-plane encoder, echoing the escaped id) -> decode.
            let mut raw = [0u8; 4096];
            if let Ok(frame) = DataFrame::decode_json(d.data, &mut raw) {
                let msg = ControlMessage::WebSocketData {
                    stream_id: d.stream_id.into(),
                    frame,
                };
                let mut enc = [0u8; 16384];
                let n = msg
                    .encode(env.request_id.map(Into::into), UnixTime::EPOCH, &mut enc)
                    .expect("re-encode");
                let Ok((_, Inbound::WebSocketData(again))) = Inbound::decode(&enc[..n]) else {
                    panic!("re-decode");
                };
                assert_eq!(again.stream_id, d.stream_id);
                let mut raw2 = [0u8; 4096];
                assert_eq!(DataFrame::decode_json(again.data, &mut raw2), Ok(frame));
            }
        }
        Inbound::WebSocketClose(c) => {
            // decode -> encode -> decode for the close-code extension.
            let (Some(code), Some(reason)) = (c.code, c.reason) else {
                return;
            };
            let mut buf = [0u8; 4096];
            let Ok(reason) = reason.unescape_into(&mut buf) else {
                return;
            };
            let msg = ControlMessage::WebSocketClose {
                stream_id: c.stream_id.into(),
                close: Some(CloseFrame { code, reason }),
            };
            let mut enc = [0u8; 16384];
            let n = msg
                .encode(None, UnixTime::EPOCH, &mut enc)
                .expect("re-encode");
            let Ok((_, Inbound::WebSocketClose(again))) = Inbound::decode(&enc[..n]) else {
                panic!("re-decode");
            };
            assert_eq!(again.stream_id, c.stream_id);
            assert_eq!(again.code, c.code);
            assert_eq!(again.reason, c.reason);
        }
        Inbound::ProxyRequestChunk { data }
        | Inbound::ProxyStreamData { data }
        | Inbound::TcpTunnelData { data, .. } => check_b64(data),
        _ => {}
    }
});
