use std::format;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use super::*;
use crate::wire::Inbound;

type Table = Requests<4>;

const T0: Instant = Instant::from_secs(100);
const UNIX: UnixTime = UnixTime::new(1_780_000_000, 0);

fn start<'a>(t: &mut Table, frame: &'a [u8]) -> Result<RequestStart<'a>, RequestError> {
    let env = Envelope::parse(frame).unwrap();
    let Inbound::ProxyRequest(req) = env.inbound().unwrap() else {
        panic!("not a proxy_request");
    };
    t.handle_request(T0, UNIX, &env, &req)
}

fn request(id: &str, payload: &str) -> Vec<u8> {
    format!(r#"{{"type":"proxy_request","request_id":"{id}","payload":{payload}}}"#).into_bytes()
}

fn jstr(src: &'static [u8]) -> JsonStr<'static> {
    crate::wire::json::parse(src).unwrap().as_str().unwrap()
}

fn json(buf: &[u8]) -> serde_json::Value {
    serde_json::from_slice(buf).unwrap()
}

fn drain(t: &mut Table) -> Vec<serde_json::Value> {
    let mut out = vec![];
    let mut buf = vec![0u8; 4096];
    while let Some(n) = t.poll_transmit(UNIX, &mut buf).unwrap() {
        out.push(json(&buf[..n]));
    }
    out
}

fn b64(v: &serde_json::Value) -> Vec<u8> {
    let text = v.as_str().unwrap().as_bytes();
    let mut out = vec![0u8; text.len()];
    let n = crate::wire::b64::decode(text, &mut out).unwrap();
    out.truncate(n);
    out
}

#[test]
fn streamed_response_in_sequence() {
    let mut t = Table::default();
    let f = request(
        "r1",
        r#"{"method":"GET","path":"/api/v1/namespaces/default/pods/demo/log","query":"follow=true","supports_response_streaming":true}"#,
    );
    let s = start(&mut t, &f).unwrap();
    assert_eq!(s.id.as_str(), "r1");
    assert_eq!(s.method, "GET");
    assert_eq!(s.path, "/api/v1/namespaces/default/pods/demo/log");
    assert_eq!(s.query, "follow=true");
    assert!(s.streaming_response && !s.websocket);
    assert_eq!(s.body, RequestBody::None);

    let mut buf = vec![0u8; 200_000];
    // A chunk before the header is out of sequence and writes nothing.
    assert_eq!(
        t.encode_response_chunk("r1", b"x", UNIX, &mut buf),
        Err(ResponseError::Sequence)
    );
    let n = t
        .encode_response_header("r1", 200, &[("Content-Type", "text/plain")], UNIX, &mut buf)
        .unwrap();
    let v = json(&buf[..n]);
    assert_eq!(v["type"], "proxy_response_header");
    assert_eq!(v["request_id"], "r1");
    assert_eq!(v["payload"]["status"], 200);
    assert_eq!(v["payload"]["headers"]["Content-Type"][0], "text/plain");
    assert_eq!(
        t.encode_response_header("r1", 200, &(), UNIX, &mut buf),
        Err(ResponseError::Sequence)
    );
    // Without its own timeout the request streams on with no deadline once the header is out.
    assert_eq!(t.poll_timeout(), None);

    let body: Vec<u8> = (0..MAX_CHUNK + 10).map(|i| (i % 251) as u8).collect();
    let (used, n) = t
        .encode_response_chunk("r1", &body, UNIX, &mut buf)
        .unwrap();
    assert_eq!(used, MAX_CHUNK);
    let v = json(&buf[..n]);
    assert_eq!(v["type"], "proxy_response_chunk");
    assert_eq!(b64(&v["payload"]["data"]), body[..MAX_CHUNK]);
    assert_eq!(v["payload"]["size"], MAX_CHUNK);
    let (used, n) = t
        .encode_response_chunk("r1", &body[MAX_CHUNK..], UNIX, &mut buf)
        .unwrap();
    assert_eq!(used, 10);
    assert_eq!(b64(&json(&buf[..n])["payload"]["data"]), body[MAX_CHUNK..]);
    let n = t.encode_response_end("r1", UNIX, &mut buf).unwrap();
    assert_eq!(json(&buf[..n])["type"], "proxy_response_end");
    assert!(t.is_empty());
    assert_eq!(
        t.encode_response_chunk("r1", b"late", UNIX, &mut buf),
        Err(ResponseError::UnknownRequest)
    );
    assert!(drain(&mut t).is_empty());
}

#[test]
fn buffered_response_is_one_message() {
    let mut t = Table::default();
    let f = request("r2", r#"{"path":"/api/v1/namespaces/default/pods/demo"}"#);
    let s = start(&mut t, &f).unwrap();
    assert_eq!(s.method, "GET");
    assert!(!s.streaming_response);
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        t.encode_response_header("r2", 200, &(), UNIX, &mut buf),
        Err(ResponseError::Sequence)
    );
    let n = t
        .encode_response(
            "r2",
            200,
            &[("Content-Type", "application/json")],
            b"{\"kind\":\"Pod\"}",
            UNIX,
            &mut buf,
        )
        .unwrap();
    let v = json(&buf[..n]);
    assert_eq!(v["type"], "proxy_response");
    assert_eq!(v["payload"]["status"], 200);
    assert_eq!(b64(&v["payload"]["body"]), b"{\"kind\":\"Pod\"}");
    assert!(t.is_empty());
}

#[test]
fn bad_requests_are_answered_and_touch_nothing() {
    let mut t = Table::default();
    let live = request(
        "live",
        r#"{"path":"/api/v1/pods","supports_response_streaming":true}"#,
    );
    start(&mut t, &live).unwrap();
    let cases: [(&str, &str, u16); 7] = [
        ("p1", r#"{"path":"/etc/passwd"}"#, 400),
        ("p2", r#"{"path":"/api/../secret"}"#, 400),
        (
            "p3",
            r#"{"path":"/api/v1/pods","query":"a=b\r\nX: y"}"#,
            400,
        ),
        (
            "p4",
            r#"{"path":"/api/v1/pods","headers":{"X-A":["ok\r\nInjected: 1"]}}"#,
            400,
        ),
        ("p5", r#"{"path":"/api/v1/pods","method":"TRACE"}"#, 405),
        ("p6", r#"{"path":"/api/v1/pods","body_binary":true}"#, 501),
        ("live", r#"{"path":"/api/v1/pods"}"#, 409),
    ];
    for (id, payload, status) in cases {
        let f = request(id, payload);
        let e = start(&mut t, &f).unwrap_err();
        assert_eq!(e.status(), status, "{id}: {e}");
        let out = drain(&mut t);
        assert_eq!(out.len(), 1, "{id}");
        assert_eq!(out[0]["type"], "proxy_response");
        assert_eq!(out[0]["request_id"], id);
        assert_eq!(out[0]["payload"]["status"], status);
        assert_eq!(
            String::from_utf8(b64(&out[0]["payload"]["body"])).unwrap(),
            e.to_string()
        );
    }
    // No request id: a proxy_error.
    let f = br#"{"type":"proxy_request","payload":{"path":"/api"}}"#;
    assert!(matches!(start(&mut t, f), Err(RequestError::RequestId(_))));
    let out = drain(&mut t);
    assert_eq!(out[0]["type"], "proxy_error");
    // The live request is untouched and still streams.
    assert_eq!(t.len(), 1);
    let mut buf = vec![0u8; 4096];
    t.encode_response_header("live", 200, &(), UNIX, &mut buf)
        .unwrap();
}

#[test]
fn streamed_body_chunks_and_end() {
    let mut t = Table::default();
    let f = request(
        "b1",
        r#"{"method":"POST","path":"/api/v1/namespaces/default/pods","use_streaming":true,"supports_response_streaming":true}"#,
    );
    let s = start(&mut t, &f).unwrap();
    assert_eq!(s.body, RequestBody::Streamed);
    let mut scratch = [0u8; 64];
    let data = Base64Str(jstr(br#""aGVsbG8=""#));
    assert_eq!(
        t.handle_chunk(T0, "b1", data, &mut scratch).unwrap(),
        b"hello"
    );
    assert_eq!(t.handle_stream_end("b1"), Ok(()));
    assert_eq!(
        t.handle_chunk(T0, "b1", data, &mut scratch),
        Err(RequestError::NotStreaming)
    );
    assert_eq!(t.handle_stream_end("b1"), Err(RequestError::NotStreaming));
    assert_eq!(
        t.handle_chunk(T0, "nope", data, &mut scratch),
        Err(RequestError::UnknownRequest)
    );
    assert!(drain(&mut t).is_empty());
    assert_eq!(t.poll_event(), None);

    // Bad base64 aborts the request: 400 answered, upstream work abandoned.
    let f = request(
        "b2",
        r#"{"method":"PUT","path":"/api/v1/x","streaming":true}"#,
    );
    start(&mut t, &f).unwrap();
    let bad = Base64Str(jstr(br#""!!!""#));
    assert!(matches!(
        t.handle_chunk(T0, "b2", bad, &mut scratch),
        Err(RequestError::Chunk(_))
    ));
    let out = drain(&mut t);
    assert_eq!(out[0]["payload"]["status"], 400);
    assert_eq!(out[0]["request_id"], "b2");
    assert_eq!(
        t.poll_event(),
        Some(RequestEvent::Abandon(StreamId::new("b2").unwrap()))
    );
    assert!(!t.contains("b2"));
}

#[test]
fn cancel_really_cancels() {
    let mut t = Table::default();
    let f = request(
        "c1",
        r#"{"path":"/api/v1/pods","watch":"1","supports_response_streaming":true}"#,
    );
    start(&mut t, &f).unwrap();
    let mut buf = vec![0u8; 4096];
    t.encode_response_header("c1", 200, &(), UNIX, &mut buf)
        .unwrap();
    assert_eq!(t.handle_cancel("c1"), Cancelled::Request);
    assert_eq!(t.handle_cancel("c1"), Cancelled::Unknown);
    assert_eq!(
        t.encode_response_chunk("c1", b"more", UNIX, &mut buf),
        Err(ResponseError::UnknownRequest)
    );
    assert_eq!(
        t.encode_response_end("c1", UNIX, &mut buf),
        Err(ResponseError::UnknownRequest)
    );
    assert!(drain(&mut t).is_empty());
    assert_eq!(t.stats().cancelled, 1);
}

#[test]
fn timeouts_answer_504_or_abort() {
    let mut t = Table::default();
    // Default: only the header wait is bounded.
    let f = request(
        "t1",
        r#"{"path":"/api/v1/pods","supports_response_streaming":true}"#,
    );
    start(&mut t, &f).unwrap();
    let due = t.poll_timeout().unwrap();
    assert_eq!(due, T0 + Config::default().header_timeout);
    t.handle_timeout(due);
    let out = drain(&mut t);
    assert_eq!(out[0]["type"], "proxy_response");
    assert_eq!(out[0]["payload"]["status"], 504);
    assert_eq!(
        t.poll_event(),
        Some(RequestEvent::Abandon(StreamId::new("t1").unwrap()))
    );

    // Own timeout: covers the whole exchange, so an open stream is aborted.
    let f = request(
        "t2",
        r#"{"path":"/api/v1/pods","timeout":1500,"supports_response_streaming":true}"#,
    );
    start(&mut t, &f).unwrap();
    let mut buf = vec![0u8; 4096];
    t.encode_response_header("t2", 200, &(), UNIX, &mut buf)
        .unwrap();
    assert_eq!(t.poll_timeout(), Some(T0 + Duration::from_millis(1500)));
    t.handle_timeout(T0 + Duration::from_millis(1499));
    assert!(drain(&mut t).is_empty());
    t.handle_timeout(T0 + Duration::from_millis(1500));
    let out = drain(&mut t);
    assert_eq!(out[0]["type"], "proxy_response_abort");
    assert_eq!(out[0]["request_id"], "t2");
    assert!(t.is_empty());
    assert_eq!(t.stats().timed_out, 2);

    // A deadline in wall-clock time.
    let f = request(
        "t3",
        r#"{"path":"/api/v1/pods","deadline":"2026-05-28T20:26:50Z"}"#,
    );
    start(&mut t, &f).unwrap();
    let deadline = UnixTime::parse_rfc3339("2026-05-28T20:26:50Z").unwrap();
    let left = deadline.secs - UNIX.secs;
    assert_eq!(t.poll_timeout(), Some(T0 + Duration::from_secs(left)));
}

#[test]
fn websocket_request_becomes_a_stream_answered_after_upstream() {
    let mut t = Table::default();
    let f = request(
        "w1",
        r#"{"method":"GET","path":"/api/v1/namespaces/default/pods/demo/exec","query":"command=sh&stdin=true","headers":{"Upgrade":["websocket"],"Sec-WebSocket-Protocol":["v5.channel.k8s.io"]},"protocol":"v5.channel.k8s.io"}"#,
    );
    let s = start(&mut t, &f).unwrap();
    assert!(s.websocket);
    // Nothing is answered before the upstream did.
    assert!(drain(&mut t).is_empty());
    // The relay stream (`Relay::start_stream`) is started from these fields, named by the id.
    assert_eq!(s.id.as_str(), "w1");
    assert_eq!(s.path, "/api/v1/namespaces/default/pods/demo/exec");
    assert_eq!(s.query, "command=sh&stdin=true");
    assert_eq!(s.protocol.unwrap(), "v5.channel.k8s.io");
    assert!(s.headers.contains("sec-websocket-protocol"));
    let mut buf = vec![0u8; 4096];
    // HTTP response calls do not apply to an upgrade.
    assert_eq!(
        t.encode_response_header("w1", 200, &(), UNIX, &mut buf),
        Err(ResponseError::Sequence)
    );
    t.upgrade_started("w1", Some("v5.channel.k8s.io")).unwrap();
    let out = drain(&mut t);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0]["type"], "proxy_response_header");
    assert_eq!(out[0]["payload"]["status"], 101);
    assert_eq!(
        out[0]["payload"]["headers"]["Sec-WebSocket-Protocol"][0],
        "v5.channel.k8s.io"
    );
    assert_eq!(out[1]["type"], "proxy_response_end");
    assert_eq!(out[1]["request_id"], "w1");

    // A refused upgrade carries the upstream's status.
    let f = request(
        "w2",
        r#"{"path":"/api/v1/namespaces/default/pods/nope/exec","is_websocket":true}"#,
    );
    start(&mut t, &f).unwrap();
    t.upgrade_failed("w2", 404, "pods \"nope\" not found")
        .unwrap();
    let out = drain(&mut t);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["payload"]["status"], 404);
    assert_eq!(
        t.upgrade_failed("w2", 404, "again"),
        Err(ResponseError::UnknownRequest)
    );

    // Cancelling an upgrade says so, so the relay stream can be closed.
    let f = request("w3", r#"{"path":"/api/v1/x/exec","is_websocket":true}"#);
    start(&mut t, &f).unwrap();
    assert_eq!(t.handle_cancel("w3"), Cancelled::Upgrade);
}

#[test]
fn table_full_and_tunnel_lost() {
    let mut t = Table::default();
    for i in 0..4 {
        let f = request(&format!("f{i}"), r#"{"path":"/api"}"#);
        start(&mut t, &f).unwrap();
    }
    let f = request("f4", r#"{"path":"/api"}"#);
    assert_eq!(start(&mut t, &f).unwrap_err(), RequestError::TooMany);
    assert_eq!(drain(&mut t)[0]["payload"]["status"], 503);
    t.handle_tunnel_lost();
    assert!(t.is_empty());
    assert_eq!(t.poll_timeout(), None);
    start(&mut t, &f).unwrap();
}

#[test]
fn failure_before_and_after_header() {
    let mut t = Table::default();
    let mut buf = vec![0u8; 4096];
    let f = request(
        "e1",
        r#"{"path":"/api","supports_response_streaming":true}"#,
    );
    start(&mut t, &f).unwrap();
    let n = t
        .encode_response_failed("e1", 502, "connection refused", UNIX, &mut buf)
        .unwrap();
    let v = json(&buf[..n]);
    assert_eq!(v["type"], "proxy_response");
    assert_eq!(v["payload"]["status"], 502);
    assert_eq!(b64(&v["payload"]["body"]), b"connection refused");
    let f = request(
        "e2",
        r#"{"path":"/api","supports_response_streaming":true}"#,
    );
    start(&mut t, &f).unwrap();
    t.encode_response_header("e2", 200, &(), UNIX, &mut buf)
        .unwrap();
    let n = t
        .encode_response_failed("e2", 502, "reset", UNIX, &mut buf)
        .unwrap();
    let v = json(&buf[..n]);
    assert_eq!(v["type"], "proxy_response_abort");
    assert_eq!(v["payload"]["error"], "reset");
    assert!(t.is_empty());
}

#[test]
fn response_credit_bounds_the_body_until_granted() {
    let mut t = Table::default();
    let f = request(
        "r1",
        r#"{"method":"GET","path":"/api/v1/namespaces/default/pods/demo/log","supports_response_streaming":true,"response_credit":true}"#,
    );
    start(&mut t, &f).unwrap();
    let plain = request(
        "r2",
        r#"{"method":"GET","path":"/api/v1/pods","supports_response_streaming":true}"#,
    );
    start(&mut t, &plain).unwrap();
    let mut buf = vec![0u8; 4096];
    for id in ["r1", "r2"] {
        t.encode_response_header(id, 200, &(), UNIX, &mut buf)
            .unwrap();
    }
    // No grant yet: r1 must wait; a request without the extension never does.
    assert!(!t.may_send_chunk("r1"));
    assert!(t.may_send_chunk("r2"));
    assert!(t.handle_credit(T0, "r1", 25, 2));
    assert!(t.may_send_chunk("r1"));
    t.encode_response_chunk("r1", &[1; 20], UNIX, &mut buf)
        .unwrap();
    assert!(t.may_send_chunk("r1"), "5 bytes and 1 message left");
    t.encode_response_chunk("r1", &[1; 10], UNIX, &mut buf)
        .unwrap();
    assert!(!t.may_send_chunk("r1"), "credit used up");
    assert!(t.handle_credit(T0, "r1", 100, 10));
    assert!(t.may_send_chunk("r1"));
    assert!(!t.handle_credit(T0, "gone", 1, 1));
    assert!(!t.may_send_chunk("gone"));
}
