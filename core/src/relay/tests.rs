//! Relay scenarios in the quinn `Pair` spirit: a test driver plays the control plane (feeds
//! envelopes, decodes what the relay transmits) and a fake upstream (pops messages, reports dials
//! and closes), with a simulated clock.

use std::collections::BTreeMap;
use std::format;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use super::*;
use crate::ring::Payload;
use crate::time::Duration;
use crate::wire::{Base64Str, DataFrame, Opcode};

/// Owned test buffer (the tokio adapter's shape).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bytes(Vec<u8>);

impl Payload for Bytes {
    fn len(&self) -> usize {
        self.0.len()
    }
}

impl PayloadBuf for Bytes {
    fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.to_vec()))
    }

    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

const RING: usize = 8;
type TestRelay = Relay<Bytes, 4, RING>;

/// One tunnel message the relay sent, decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Sent {
    kind: String,
    request_id: Option<String>,
    stream_id: Option<String>,
    /// Decoded data frame: opcode and payload.
    data: Option<(u8, Vec<u8>)>,
    error: Option<String>,
    status: Option<u64>,
    code: Option<u64>,
    reason: Option<String>,
    protocol: Option<String>,
    unknown_type: Option<String>,
    cluster_id: Option<String>,
}

fn decode_sent(frame: &[u8]) -> Sent {
    let env = Envelope::parse(frame).expect("relay sent an invalid envelope");
    let p = env.payload;
    let s = |k: &str| p.get(k).and_then(|v| v.as_str()).map(|v| v.to_string());
    let n = |k: &str| {
        p.get(k)
            .and_then(|v| v.as_number())
            .and_then(|v| v.as_u64())
    };
    let data = p.get("data").and_then(|v| v.as_str()).map(|b64| {
        let mut out = vec![0u8; 1 << 16];
        let raw = Base64Str(b64)
            .decode_into(&mut out)
            .expect("relay sent bad base64");
        let frame = DataFrame::parse(raw).expect("relay sent a bad data frame");
        let (head, head_len, body) = frame.parts();
        let mut payload = head[1..head_len].to_vec();
        payload.extend_from_slice(body);
        (head[0], payload)
    });
    Sent {
        kind: env.type_name.to_string(),
        request_id: env.request_id.map(|r| r.to_string()),
        stream_id: s("stream_id").or_else(|| s("request_id")),
        data,
        error: s("error"),
        status: n("status"),
        code: n("code"),
        reason: s("reason"),
        protocol: s("protocol"),
        unknown_type: s("unknown_type"),
        cluster_id: s("cluster_id"),
    }
}

fn b64(raw: &[u8]) -> String {
    let mut out = vec![0u8; crate::wire::b64::encoded_len(raw.len())];
    let n = crate::wire::b64::encode(raw, &mut out).unwrap();
    String::from_utf8(out[..n].to_vec()).unwrap()
}

fn start_json(id: &str, path: &str) -> String {
    format!(
        r#"{{"type":"proxy_websocket_start","request_id":"{id}","timestamp":"2026-11-26T10:00:00Z","payload":{{"stream_id":"{id}","method":"GET","path":"{path}","query":"command=sh&stdin=true&stdout=true&tty=true","headers":{{"Authorization":["Bearer t"],"Sec-WebSocket-Protocol":"v5.channel.k8s.io"}},"protocol":"v5.channel.k8s.io,v4.channel.k8s.io"}}}}"#
    )
}

fn data_json(id: &str, opcode: u8, payload: &[u8]) -> String {
    let mut raw = vec![opcode];
    raw.extend_from_slice(payload);
    format!(
        r#"{{"type":"proxy_websocket_data","request_id":"{id}","payload":{{"stream_id":"{id}","data":"{}"}}}}"#,
        b64(&raw)
    )
}

fn close_json(id: &str, code: u16, reason: &str) -> String {
    format!(
        r#"{{"type":"proxy_websocket_close","request_id":"{id}","payload":{{"stream_id":"{id}","code":{code},"reason":"{reason}"}}}}"#
    )
}

fn register_success_json(extensions: bool) -> String {
    let ext = if extensions {
        r#","extensions":{"websocket_started":true,"websocket_close_code":true,"proxy_error_status":true,"raw_upgrade":true,"response_credit":true}"#
    } else {
        ""
    };
    format!(
        r#"{{"type":"register_success","request_id":"r1","payload":{{"cluster_id":"c-42"{ext}}}}}"#
    )
}

/// What a handled message returned, owned.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Start {
        stream: String,
        path: String,
        query: String,
        protocol: Option<String>,
    },
    Consumed,
    Other(String),
}

struct Harness {
    relay: TestRelay,
    now: Instant,
    scratch: Vec<u8>,
    sent: Vec<Sent>,
    events: Vec<Event>,
    /// Messages the fake upstream received, per stream.
    upstream: BTreeMap<String, Vec<(MessageKind, Vec<u8>)>>,
    /// Whether the fake upstream drains on `DataForUpstream`.
    auto_pop: bool,
}

impl Harness {
    fn new(config: Config) -> Self {
        Self {
            relay: Relay::new(config),
            now: Instant::from_secs(1_000),
            scratch: vec![0; 1 << 16],
            sent: Vec::new(),
            events: Vec::new(),
            upstream: BTreeMap::new(),
            auto_pop: true,
        }
    }

    /// A relay registered with a control plane that advertises the extensions, or not.
    fn registered(extensions: bool) -> Self {
        Self::registered_with(Config::default(), extensions)
    }

    fn registered_with(config: Config, extensions: bool) -> Self {
        let mut h = Self::new(config);
        h.relay
            .start_session(h.now, SessionInfo::new("agent-1", "edge", "0.1.0"));
        h.drive();
        assert_eq!(h.take_sent()[0].kind, "register");
        assert_eq!(
            h.feed(&register_success_json(extensions)),
            Ok(Got::Other("register_success".into()))
        );
        h.drive();
        h.sent.clear();
        h.events.clear();
        h
    }

    fn feed(&mut self, json: &str) -> Result<Got, TunnelError> {
        let handled =
            self.relay
                .handle_tunnel_message(self.now, json.as_bytes(), &mut self.scratch)?;
        Ok(match handled {
            Handled::Start(s) => Got::Start {
                stream: s.stream.to_string(),
                path: s.path.to_string(),
                query: s.query.to_string(),
                protocol: s.protocol.map(|p| p.to_string()),
            },
            Handled::Consumed => Got::Consumed,
            Handled::Other(_, inbound) => Got::Other(inbound.type_name().to_string()),
        })
    }

    /// Runs the outputs until idle, playing the fake upstream.
    fn drive(&mut self) {
        let mut buf = vec![0u8; 1 << 17];
        let unix = UnixTime::new(1_790_000_000, 0);
        loop {
            let mut progressed = false;
            while let Some(n) = self.relay.poll_transmit(self.now, unix, &mut buf).unwrap() {
                self.sent.push(decode_sent(&buf[..n]));
                progressed = true;
            }
            while let Some(event) = self.relay.poll_event() {
                if let Event::DataForUpstream(id) = &event
                    && self.auto_pop
                {
                    self.pop_all(id.as_str());
                }
                self.events.push(event);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
    }

    fn pop_all(&mut self, id: &str) {
        while let Some(m) = self.relay.pop_upstream(id) {
            self.upstream
                .entry(id.to_string())
                .or_default()
                .push((m.kind, m.payload.0));
        }
    }

    /// Starts `id` and reports the upstream open with `v5.channel.k8s.io`.
    fn open(&mut self, id: &str) {
        let got = self
            .feed(&start_json(
                id,
                "/api/v1/namespaces/default/pods/web-0/exec",
            ))
            .unwrap();
        assert!(matches!(got, Got::Start { .. }), "{got:?}");
        self.relay
            .handle_upstream_started(self.now, id, Some("v5.channel.k8s.io"))
            .unwrap();
        self.drive();
    }

    fn take_sent(&mut self) -> Vec<Sent> {
        core::mem::take(&mut self.sent)
    }

    fn take_events(&mut self) -> Vec<Event> {
        core::mem::take(&mut self.events)
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.relay.handle_timeout(self.now);
        self.drive();
    }

    fn received(&self, id: &str) -> Vec<(MessageKind, Vec<u8>)> {
        self.upstream.get(id).cloned().unwrap_or_default()
    }
}

fn sid(s: &str) -> StreamId {
    StreamId::new(s).unwrap()
}

fn data_sent(sent: &[Sent], id: &str) -> Vec<(u8, Vec<u8>)> {
    sent.iter()
        .filter(|s| s.kind == "proxy_websocket_data" && s.stream_id.as_deref() == Some(id))
        .map(|s| s.data.clone().unwrap())
        .collect()
}

// -------------------------------------------------------------------------------------------------
// Sequences

#[test]
fn exec_sequence_start_started_data_close() {
    let mut h = Harness::registered(true);
    // The test control plane advertises the compat extensions only.
    assert_eq!(
        h.relay.extensions(),
        Extensions {
            native: false,
            native_tcp: false,
            native_ack: false,
            ..Extensions::ALL
        }
    );

    let got = h
        .feed(&start_json(
            "exec-1",
            "/api/v1/namespaces/default/pods/web-0/exec",
        ))
        .unwrap();
    assert_eq!(
        got,
        Got::Start {
            stream: "exec-1".into(),
            path: "/api/v1/namespaces/default/pods/web-0/exec".into(),
            query: "command=sh&stdin=true&stdout=true&tty=true".into(),
            protocol: Some("v5.channel.k8s.io,v4.channel.k8s.io".into()),
        }
    );
    assert_eq!(h.relay.stream_state("exec-1"), Some(StreamState::Opening));

    // Early stdin, before the upstream answers: queued, not yet readable.
    assert_eq!(
        h.feed(&data_json("exec-1", 2, b"\x00ls\n")),
        Ok(Got::Consumed)
    );
    h.drive();
    assert!(h.take_events().is_empty());

    h.relay
        .handle_upstream_started(h.now, "exec-1", Some("v5.channel.k8s.io"))
        .unwrap();
    h.drive();
    assert_eq!(h.relay.stream_state("exec-1"), Some(StreamState::Open));
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].kind, "proxy_websocket_started");
    assert_eq!(sent[0].request_id.as_deref(), Some("exec-1"));
    assert_eq!(sent[0].protocol.as_deref(), Some("v5.channel.k8s.io"));
    assert_eq!(h.take_events(), [Event::DataForUpstream(sid("exec-1"))]);
    assert_eq!(
        h.received("exec-1"),
        [(MessageKind::Binary, b"\x00ls\n".to_vec())]
    );

    // Both ways, boundaries and kinds intact.
    h.feed(&data_json("exec-1", 1, b"text stdin")).unwrap();
    h.relay
        .handle_upstream_message(
            h.now,
            "exec-1",
            MessageKind::Binary,
            Bytes(b"\x01file1\n".to_vec()),
        )
        .unwrap();
    h.relay
        .handle_upstream_message(h.now, "exec-1", MessageKind::Text, Bytes(b"hello".to_vec()))
        .unwrap();
    h.relay
        .handle_upstream_message(h.now, "exec-1", MessageKind::Binary, Bytes(Vec::new()))
        .unwrap();
    h.drive();
    assert_eq!(
        h.received("exec-1")[1],
        (MessageKind::Text, b"text stdin".to_vec())
    );
    let sent = h.take_sent();
    assert_eq!(
        data_sent(&sent, "exec-1"),
        [
            (2, b"\x01file1\n".to_vec()),
            (1, b"hello".to_vec()),
            (2, Vec::new())
        ]
    );

    // The upstream closes with 1000 and the exit status already sent: close with code and reason.
    h.relay
        .handle_upstream_message(
            h.now,
            "exec-1",
            MessageKind::Binary,
            Bytes(b"\x03{\"status\":\"Success\"}".to_vec()),
        )
        .unwrap();
    h.relay
        .handle_upstream_closed(h.now, "exec-1", 1000, "done")
        .unwrap();
    h.drive();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(
        sent[0].data.as_ref().unwrap().1,
        b"\x03{\"status\":\"Success\"}"
    );
    assert_eq!(sent[1].kind, "proxy_websocket_close");
    assert_eq!(
        (sent[1].code, sent[1].reason.as_deref()),
        (Some(1000), Some("done"))
    );
    assert_eq!(h.relay.stream_count(), 0);
    assert_eq!(h.relay.stats().streams_closed, 1);

    // The control plane's echo of the close is a late message: dropped quietly.
    assert_eq!(h.feed(&close_json("exec-1", 1000, "")), Ok(Got::Consumed));
    h.drive();
    assert!(h.take_sent().is_empty());
    assert_eq!(h.relay.stats().late_messages, 1);
}

#[test]
fn compat_mode_sends_only_the_pipeops_catalogue() {
    let mut h = Harness::registered(false);
    assert_eq!(h.relay.extensions(), Extensions::NONE);
    h.open("s");
    assert!(
        h.take_sent().is_empty(),
        "no started ack without the extension"
    );
    h.relay
        .handle_upstream_closed(h.now, "s", 1000, "bye")
        .unwrap();
    h.drive();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].kind, "proxy_websocket_close");
    assert_eq!((sent[0].code, sent[0].reason.as_deref()), (None, None));
    assert_eq!(sent[0].stream_id.as_deref(), Some("s"));
}

#[test]
fn extensions_off_in_config_are_not_used() {
    let config = Config {
        extensions: Extensions::NONE,
        ..Config::default()
    };
    let mut h = Harness::registered_with(config, true);
    assert_eq!(h.relay.extensions(), Extensions::NONE);
    h.open("s");
    assert!(h.take_sent().is_empty());
}

fn spdy_start_json(id: &str, method: &str, upgrade: &str) -> String {
    format!(
        r#"{{"type":"proxy_websocket_start","request_id":"{id}","payload":{{"stream_id":"{id}","method":"{method}","path":"/api/v1/namespaces/d/pods/p/exec","query":"command=sh","headers":{{}},"protocol":"v4.channel.k8s.io, v3.channel.k8s.io","upgrade":"{upgrade}"}}}}"#
    )
}

#[test]
fn raw_upgrade_start_is_dialled_with_its_method_and_token() {
    let mut h = Harness::registered(true);
    let json = spdy_start_json("s", "POST", "SPDY/3.1");
    let Handled::Start(req) = h
        .relay
        .handle_tunnel_message(h.now, json.as_bytes(), &mut h.scratch)
        .unwrap()
    else {
        panic!("not started")
    };
    let upgrade = req.upgrade.unwrap();
    assert_eq!(
        (upgrade.method.as_str(), upgrade.token.as_str()),
        ("POST", "SPDY/3.1")
    );
    assert!(req.protocol.unwrap() == "v4.channel.k8s.io, v3.channel.k8s.io");
}

#[test]
fn raw_upgrade_refusals_name_the_stream() {
    // A bad method or token, or `websocket` as a raw upgrade: refused, nothing registered.
    for (method, token) in [
        ("PUT", "SPDY/3.1"),
        ("POST", "websocket"),
        ("POST", "SPDY/3.1\\r\\nX: y"),
    ] {
        let mut h = Harness::registered(true);
        let e = h.feed(&spdy_start_json("s", method, token));
        assert_eq!(
            e,
            Err(TunnelError::Request(RequestError::Upgrade)),
            "{method} {token}"
        );
        h.drive();
        let sent = h.take_sent();
        assert_eq!(sent[0].kind, "proxy_error");
        assert_eq!(sent[0].stream_id.as_deref(), Some("s"));
        assert_eq!(h.relay.stream_count(), 0);
    }
    // An agent configured without the extension refuses every raw upgrade.
    let config = Config {
        extensions: Extensions {
            raw_upgrade: false,
            ..Extensions::ALL
        },
        ..Config::default()
    };
    let mut h = Harness::registered_with(config, true);
    assert_eq!(
        h.feed(&spdy_start_json("s", "POST", "SPDY/3.1")),
        Err(TunnelError::Request(RequestError::Upgrade))
    );
}

#[test]
fn upstream_refusal_reports_status_then_close() {
    for extensions in [true, false] {
        let mut h = Harness::registered(extensions);
        h.feed(&start_json("s", "/api/v1/namespaces/x/pods/y/exec"))
            .unwrap();
        h.feed(&data_json("s", 2, b"early")).unwrap();
        h.relay
            .handle_upstream_failed(h.now, "s", 403, "pods \"y\" is forbidden")
            .unwrap();
        h.drive();
        let sent = h.take_sent();
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!(sent[0].kind, "proxy_error");
        assert_eq!(sent[0].request_id.as_deref(), Some("s"));
        assert_eq!(sent[0].stream_id.as_deref(), Some("s"));
        assert!(sent[0].error.as_deref().unwrap().contains("forbidden"));
        assert!(sent[0].error.as_deref().unwrap().contains("403"));
        assert_eq!(sent[0].status, extensions.then_some(403));
        assert_eq!(sent[1].kind, "proxy_websocket_close");
        assert_eq!(h.relay.stream_count(), 0);
        assert_eq!(h.relay.stats().discarded_messages, 1);
        assert!(h.received("s").is_empty());
    }
}

#[test]
fn close_from_control_plane_drains_then_closes_upstream_then_echoes() {
    let mut h = Harness::registered(true);
    h.open("s");
    h.take_sent();
    h.auto_pop = false;
    h.feed(&data_json("s", 2, b"one")).unwrap();
    h.feed(&data_json("s", 2, b"two")).unwrap();
    h.feed(&close_json("s", 4000, "user left")).unwrap();
    h.drive();
    // The upstream first learns there is data; the close waits until it is popped.
    assert_eq!(h.take_events(), [Event::DataForUpstream(sid("s"))]);
    assert_eq!(h.relay.stream_state("s"), Some(StreamState::Closing));
    h.pop_all("s");
    h.drive();
    assert_eq!(h.received("s").len(), 2);
    assert_eq!(
        h.take_events(),
        [Event::CloseUpstream {
            stream: sid("s"),
            close: Close::new(4000, "user left")
        }]
    );
    // Final upstream output while closing still reaches the control plane, before the echo.
    h.relay
        .handle_upstream_message(h.now, "s", MessageKind::Binary, Bytes(b"bye".to_vec()))
        .unwrap();
    h.relay
        .handle_upstream_closed(h.now, "s", 4000, "user left")
        .unwrap();
    h.drive();
    let sent = h.take_sent();
    assert_eq!(
        sent.iter().map(|s| s.kind.as_str()).collect::<Vec<_>>(),
        ["proxy_websocket_data", "proxy_websocket_close"]
    );
    assert_eq!(sent[1].code, Some(4000));
    assert_eq!(h.relay.stream_count(), 0);
}

#[test]
fn close_data_frame_closes_with_its_code() {
    let mut h = Harness::registered(true);
    h.open("s");
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"normal");
    h.feed(&data_json("s", 8, &close)).unwrap();
    h.drive();
    assert_eq!(
        h.take_events(),
        [Event::CloseUpstream {
            stream: sid("s"),
            close: Close::new(1000, "normal")
        }]
    );
}

#[test]
fn unsendable_close_codes_become_1000() {
    let mut h = Harness::registered(true);
    h.open("s");
    h.take_events();
    h.feed(&close_json("s", 1005, "no status")).unwrap();
    h.drive();
    assert_eq!(
        h.take_events(),
        [Event::CloseUpstream {
            stream: sid("s"),
            close: Close::new(1000, "no status")
        }]
    );
    assert!(Close::is_sendable(4000) && !Close::is_sendable(1006) && !Close::is_sendable(999));
}

#[test]
fn ping_pong_data_frames_are_dropped_and_ping_envelope_answered() {
    let mut h = Harness::registered(true);
    h.open("s");
    h.take_sent();
    h.feed(&data_json("s", 9, b"p")).unwrap();
    h.feed(&data_json("s", 10, b"p")).unwrap();
    h.feed(r#"{"type":"ping","request_id":"p-7","payload":{}}"#)
        .unwrap();
    h.drive();
    assert!(h.received("s").is_empty());
    assert_eq!(h.relay.stats().control_frames_dropped, 2);
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].kind.as_str(), sent[0].request_id.as_deref()),
        ("pong", Some("p-7"))
    );
}

#[test]
fn data_is_scheduled_round_robin_across_streams() {
    let mut h = Harness::registered(true);
    h.open("a");
    h.open("b");
    h.take_sent();
    for i in 0..3u8 {
        h.relay
            .handle_upstream_message(h.now, "a", MessageKind::Binary, Bytes(vec![b'a', i]))
            .unwrap();
        h.relay
            .handle_upstream_message(h.now, "b", MessageKind::Binary, Bytes(vec![b'b', i]))
            .unwrap();
    }
    h.drive();
    let order: Vec<u8> = h
        .take_sent()
        .iter()
        .map(|s| s.data.as_ref().unwrap().1[0])
        .collect();
    assert_eq!(order, b"ababab");
}

// -------------------------------------------------------------------------------------------------
// Backpressure

#[test]
fn full_ring_toward_tunnel_hands_message_back_and_pauses_only_that_upstream() {
    let mut h = Harness::registered(true);
    h.open("s");
    h.open("other");
    h.take_sent();
    h.take_events();
    for i in 0..RING {
        h.relay
            .handle_upstream_message(h.now, "s", MessageKind::Binary, Bytes(vec![i as u8]))
            .unwrap();
    }
    let refused = h
        .relay
        .handle_upstream_message(h.now, "s", MessageKind::Binary, Bytes(vec![99]));
    assert_eq!(refused, Err(SendError::Full(Bytes(vec![99]))));
    // The other stream still takes data.
    h.relay
        .handle_upstream_message(h.now, "other", MessageKind::Text, Bytes(b"x".to_vec()))
        .unwrap();
    assert_eq!(
        h.relay.poll_event(),
        Some(Event::StopReadingUpstream(sid("s")))
    );
    assert_eq!(h.relay.poll_event(), None);
    h.drive();
    assert!(
        h.take_events()
            .contains(&Event::ResumeReadingUpstream(sid("s")))
    );
    // Hand the refused message in again: nothing lost, order kept.
    h.relay
        .handle_upstream_message(h.now, "s", MessageKind::Binary, Bytes(vec![99]))
        .unwrap();
    h.drive();
    let got: Vec<u8> = data_sent(&h.take_sent(), "s")
        .iter()
        .map(|d| d.1[0])
        .collect();
    let mut want: Vec<u8> = (0..RING as u8).collect();
    want.push(99);
    assert_eq!(got, want);
}

#[test]
fn full_ring_toward_upstream_blocks_tunnel_until_drained_nothing_lost() {
    let mut h = Harness::registered(true);
    h.open("s");
    h.auto_pop = false;
    h.take_events();
    let mut next = 0u32;
    let mut blocked = 0;
    // The fake upstream is slow: it drains only every 20 tunnel messages.
    while next < 100 {
        let msg = data_json("s", 2, &next.to_be_bytes());
        match h.feed(&msg) {
            Ok(Got::Consumed) => next += 1,
            Err(TunnelError::Blocked) => {
                blocked += 1;
                h.drive();
                assert!(h.take_events().contains(&Event::PauseTunnelReads));
                // Paused: the same message is refused again until the upstream drains.
                assert_eq!(h.feed(&msg), Err(TunnelError::Blocked));
                h.pop_all("s");
                h.drive();
                assert!(h.take_events().contains(&Event::ResumeTunnelReads));
            }
            other => panic!("{other:?}"),
        }
    }
    h.pop_all("s");
    let got: Vec<u32> = h
        .received("s")
        .iter()
        .map(|m| u32::from_be_bytes(m.1[..4].try_into().unwrap()))
        .collect();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    assert!(blocked > 0);
    assert_eq!(h.relay.stats().tunnel_pauses, blocked);
    // Blocked messages were not errors: nothing was sent back.
    assert!(h.take_sent().iter().all(|s| s.kind != "proxy_error"));
}

#[test]
fn an_upstream_that_keeps_the_tunnel_paused_is_closed_alone_and_the_pause_is_not_silence() {
    let mut h = Harness::registered(true);
    h.open("s");
    h.open("t");
    h.auto_pop = false;
    h.take_events();
    let mut i = 0u32;
    let refused = loop {
        let msg = data_json("s", 2, &i.to_be_bytes());
        match h.feed(&msg) {
            Ok(_) => i += 1,
            Err(TunnelError::Blocked) => break msg,
            Err(e) => panic!("{e:?}"),
        }
    };
    h.drive();
    assert!(h.take_events().contains(&Event::PauseTunnelReads));
    let paused_at = h.now;
    // Silent past the read deadline while paused: not dead; the limit has not passed yet.
    h.now = paused_at + Duration::from_secs(29);
    h.relay.handle_timeout(h.now);
    h.drive();
    let events = h.take_events();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::TunnelDead | Event::ResumeTunnelReads)),
        "{events:?}"
    );
    h.now = paused_at + Duration::from_secs(30);
    h.relay.handle_timeout(h.now);
    h.drive();
    let events = h.take_events();
    assert!(events.contains(&Event::ResumeTunnelReads), "{events:?}");
    let closing = format!("{events:?}");
    assert!(
        closing.contains("CloseUpstream") && closing.contains("1008"),
        "{closing}"
    );
    assert_eq!(h.relay.stats().stalled_streams_closed, 1);
    // The refused message is dropped quietly; t still flows.
    assert!(h.feed(&refused).is_ok());
    h.feed(&data_json("t", 2, b"ok")).unwrap();
    h.pop_all("t");
    assert_eq!(
        h.received("t").last().map(|m| m.1.clone()),
        Some(b"ok".to_vec())
    );

    // With a long limit, a reader paused far past the read deadline still never declares the
    // tunnel dead.
    let config = Config {
        pause_limit: Duration::from_secs(600),
        ..Config::default()
    };
    let mut h = Harness::registered_with(config, true);
    h.open("s");
    h.auto_pop = false;
    let mut i = 0u32;
    while h.feed(&data_json("s", 2, &i.to_be_bytes())).is_ok() {
        i += 1;
    }
    let start = h.now;
    for secs in [30, 61, 90, 150] {
        h.now = start + Duration::from_secs(secs);
        h.relay.handle_timeout(h.now);
        h.drive();
        assert!(
            !h.take_events().contains(&Event::TunnelDead),
            "dead at {secs} s while paused"
        );
    }
}

#[test]
fn close_from_control_plane_keeps_a_paused_upstream_resumable() {
    let mut h = Harness::registered(true);
    h.open("s");
    h.take_events();
    for i in 0..RING {
        h.relay
            .handle_upstream_message(h.now, "s", MessageKind::Binary, Bytes(vec![i as u8]))
            .unwrap();
    }
    assert_eq!(
        h.relay.poll_event(),
        Some(Event::StopReadingUpstream(sid("s")))
    );
    h.feed(&close_json("s", 1000, "")).unwrap();
    h.drive();
    // The upstream must be read again to see its close frame.
    assert!(
        h.take_events()
            .contains(&Event::ResumeReadingUpstream(sid("s")))
    );
    assert_eq!(data_sent(&h.take_sent(), "s").len(), RING);
}

#[test]
fn byte_budget_blocks_before_message_count() {
    let config = Config {
        ring_bytes: 10,
        ..Config::default()
    };
    let mut h = Harness::registered_with(config, true);
    h.open("s");
    h.auto_pop = false;
    h.feed(&data_json("s", 2, &[1; 6])).unwrap();
    assert_eq!(
        h.feed(&data_json("s", 2, &[2; 6])),
        Err(TunnelError::Blocked)
    );
    h.relay
        .handle_upstream_message(h.now, "s", MessageKind::Binary, Bytes(vec![0; 6]))
        .unwrap();
    assert!(matches!(
        h.relay
            .handle_upstream_message(h.now, "s", MessageKind::Binary, Bytes(vec![0; 6])),
        Err(SendError::Full(_))
    ));
}

// -------------------------------------------------------------------------------------------------
// Timers and session

#[test]
fn timers_ping_heartbeat_read_deadline() {
    let mut h = Harness::new(Config::default());
    let t0 = h.now;
    assert_eq!(h.relay.poll_timeout(), None);
    h.relay
        .start_session(t0, SessionInfo::new("agent-1", "edge", "0.1.0"));
    assert_eq!(h.relay.poll_timeout(), Some(t0 + Duration::from_secs(20)));
    h.drive();
    let register = h.take_sent();
    assert_eq!(register[0].kind, "register");
    assert!(
        register[0]
            .request_id
            .as_deref()
            .unwrap()
            .starts_with("req_")
    );
    h.feed(&register_success_json(true)).unwrap();
    h.drive();
    assert_eq!(
        h.take_events(),
        [Event::Registered {
            cluster_id: truncated("c-42".chars()),
            extensions: Extensions {
                native: false,
                native_tcp: false,
                native_ack: false,
                ..Extensions::ALL
            }
        }]
    );

    // A quiet control plane is pinged 20 s after it was last heard from (register_success).
    h.advance(Duration::from_secs(20));
    assert_eq!(h.take_events(), [Event::SendPing]);
    h.advance(Duration::from_secs(10));
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].kind.as_str(), sent[0].cluster_id.as_deref()),
        ("heartbeat", Some("c-42"))
    );
    assert!(!h.take_events().contains(&Event::SendPing));
    // Its answer (a pong, a heartbeat_ack) defers the next ping.
    h.relay.handle_tunnel_activity(h.now);
    h.advance(Duration::from_secs(19));
    assert!(!h.take_events().contains(&Event::SendPing));
    h.advance(Duration::from_secs(1));
    assert!(h.take_events().contains(&Event::SendPing));

    // Activity at t0+60 pushes the deadline to t0+120.
    h.advance(Duration::from_secs(10));
    h.relay.handle_tunnel_activity(h.now);
    h.advance(Duration::from_secs(50));
    assert!(!h.take_events().contains(&Event::TunnelDead));
    h.advance(Duration::from_secs(10));
    assert!(h.take_events().contains(&Event::TunnelDead));
    assert_eq!(h.relay.poll_timeout(), None);
}

#[test]
fn dial_timeout_fails_with_504_and_abandons_dial() {
    let mut h = Harness::registered(true);
    h.feed(&start_json("s", "/api/v1/namespaces/x/pods/y/attach"))
        .unwrap();
    h.drive();
    h.advance(Duration::from_secs(29));
    assert!(h.take_sent().is_empty());
    h.advance(Duration::from_secs(1));
    let sent: Vec<Sent> = h
        .take_sent()
        .into_iter()
        .filter(|s| s.kind != "heartbeat")
        .collect();
    assert_eq!(
        sent.iter().map(|s| s.kind.as_str()).collect::<Vec<_>>(),
        ["proxy_error", "proxy_websocket_close"]
    );
    assert_eq!(sent[0].status, Some(504));
    let events: Vec<Event> = h
        .take_events()
        .into_iter()
        .filter(|e| *e != Event::SendPing)
        .collect();
    assert!(
        matches!(&events[..], [Event::CloseUpstream { stream, .. }] if *stream == "s"),
        "{events:?}"
    );
    // A late 101 for the abandoned dial is refused; the failure report frees the slot.
    assert!(matches!(
        h.relay.handle_upstream_started(h.now, "s", None),
        Err(UpstreamError::Transition(_))
    ));
    h.relay
        .handle_upstream_failed(h.now, "s", 499, "dial cancelled")
        .unwrap();
    h.drive();
    assert!(h.take_sent().is_empty(), "no second error or close");
    assert_eq!(h.relay.stream_count(), 0);
}

#[test]
fn close_timeout_frees_a_stream_whose_upstream_never_reports() {
    let mut h = Harness::registered(true);
    h.open("s");
    h.take_sent();
    h.feed(&close_json("s", 1000, "")).unwrap();
    h.drive();
    h.advance(Duration::from_secs(10));
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].kind.as_str(), sent[0].code),
        ("proxy_websocket_close", Some(1001))
    );
    assert_eq!(h.relay.stream_count(), 0);
}

#[test]
fn tunnel_lost_closes_every_upstream() {
    let mut h = Harness::registered(true);
    h.open("a");
    h.open("b");
    h.feed(&start_json("c", "/api/v1/namespaces/x/pods/y/exec"))
        .unwrap();
    h.relay
        .handle_upstream_message(h.now, "a", MessageKind::Binary, Bytes(b"unsent".to_vec()))
        .unwrap();
    h.take_sent();
    h.take_events();
    h.relay.handle_tunnel_lost(h.now);
    h.drive();
    assert!(h.take_sent().is_empty());
    let closed: Vec<_> = h
        .take_events()
        .into_iter()
        .map(|e| match e {
            Event::CloseUpstream { stream, close } => (stream.to_string(), close.code),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        closed,
        [("a".into(), 1001), ("b".into(), 1001), ("c".into(), 1001)]
    );
    assert_eq!(h.relay.stream_count(), 0);
    assert_eq!(h.relay.poll_timeout(), None);
}

// -------------------------------------------------------------------------------------------------
// Bad input: every class gets its typed error and a proxy_error, and a concurrent stream's data
// keeps flowing intact.

/// FNV-1a over every message, boundaries included.
fn checksum(messages: &[(u8, Vec<u8>)]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (op, m) in messages {
        for b in [*op].iter().chain(&(m.len() as u32).to_be_bytes()).chain(m) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

#[test]
fn every_bad_input_class_is_rejected_and_isolated() {
    let config = Config {
        max_message: 4096,
        ..Config::default()
    };
    let mut h = Harness::registered_with(config, true);
    h.open("good");
    h.open("victim");
    h.take_sent();
    h.take_events();

    let oversize = data_json("victim", 2, &[7; 4096]);
    let long_id = "x".repeat(65);
    let cases: Vec<(&str, String, TunnelError, Option<&str>)> = vec![
        ("malformed JSON", r#"{"type":"proxy_websocket_data","payload":{"#.into(), TunnelError::Decode(crate::wire::DecodeError::Malformed { offset: 0 }), None),
        ("not JSON", "hello".into(), TunnelError::Decode(crate::wire::DecodeError::NotJson), None),
        (
            "bad base64",
            r#"{"type":"proxy_websocket_data","payload":{"stream_id":"good","data":"!!!!"}}"#.into(),
            TunnelError::Frame(FrameError::BadBase64),
            Some("good"),
        ),
        ("unknown opcode", data_json("good", 7, b"x"), TunnelError::Frame(FrameError::UnknownOpcode(7)), Some("good")),
        ("empty frame", r#"{"type":"ws_data","payload":{"stream_id":"good","data":""}}"#.into(), TunnelError::Frame(FrameError::Empty), Some("good")),
        ("unknown stream", data_json("nobody", 2, b"x"), TunnelError::UnknownStream, Some("nobody")),
        ("unknown stream close", close_json("nobody", 1000, ""), TunnelError::UnknownStream, Some("nobody")),
        ("duplicate start", start_json("good", "/api/v1/namespaces/x/pods/y/exec"), TunnelError::DuplicateStream, Some("good")),
        ("path outside the API", start_json("p1", "/metrics"), TunnelError::Request(RequestError::Path), Some("p1")),
        ("path traversal", start_json("p2", "/api/../../etc/passwd"), TunnelError::Request(RequestError::Path), Some("p2")),
        ("percent in path", start_json("p3", "/api/v1/%2e%2e"), TunnelError::Request(RequestError::Path), Some("p3")),
        ("escaped CRLF in path", start_json("p4", r"/api/v1\r\nHost: x"), TunnelError::Request(RequestError::Path), Some("p4")),
        (
            "header injection",
            r#"{"type":"proxy_websocket_start","payload":{"stream_id":"h1","path":"/api/v1/pods","headers":{"X-A":["ok\r\nEvil: 1"]}}}"#.into(),
            TunnelError::Request(RequestError::HeaderValue),
            Some("h1"),
        ),
        (
            "header name injection",
            r#"{"type":"proxy_websocket_start","payload":{"stream_id":"h2","path":"/api/v1/pods","headers":{"X-A\nB":"v"}}}"#.into(),
            TunnelError::Request(RequestError::HeaderName),
            Some("h2"),
        ),
        (
            "query injection",
            r#"{"type":"proxy_websocket_start","payload":{"stream_id":"q1","path":"/api/v1/pods","query":"a=1\r\nX: y"}}"#.into(),
            TunnelError::Request(RequestError::Query),
            Some("q1"),
        ),
        (
            "subprotocol injection",
            r#"{"type":"proxy_websocket_start","payload":{"stream_id":"q2","path":"/api/v1/pods","protocol":"v5.channel.k8s.io\r\nX: y"}}"#.into(),
            TunnelError::Request(RequestError::Subprotocol),
            Some("q2"),
        ),
        (
            "missing stream id",
            r#"{"type":"proxy_websocket_start","request_id":"r-9","payload":{"path":"/api/v1/pods"}}"#.into(),
            TunnelError::Decode(crate::wire::DecodeError::MissingField("stream_id")),
            Some("r-9"),
        ),
        (
            "stream id too long",
            format!(r#"{{"type":"proxy_websocket_start","request_id":"r-10","payload":{{"stream_id":"{long_id}","path":"/api/v1/pods"}}}}"#),
            TunnelError::StreamId(StreamIdError::TooLong),
            Some("r-10"),
        ),
        (
            "stream id with control char",
            r#"{"type":"proxy_websocket_start","request_id":"r-11","payload":{"stream_id":"a\u0007b","path":"/api/v1/pods"}}"#.into(),
            TunnelError::StreamId(StreamIdError::ControlChar),
            Some("r-11"),
        ),
        ("oversize", oversize.clone(), TunnelError::TooLarge { len: oversize.len(), max: 4096 }, Some("victim")),
    ];

    let mut sent_good: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut seq = 0u32;
    let mut good_message = |h: &mut Harness| {
        // Data both ways on the good stream between every bad message.
        let payload: Vec<u8> = seq
            .to_be_bytes()
            .iter()
            .copied()
            .chain((0..seq % 50).map(|i| i as u8))
            .collect();
        h.feed(&data_json("good", 2, &payload)).unwrap();
        h.relay
            .handle_upstream_message(h.now, "good", MessageKind::Binary, Bytes(payload.clone()))
            .unwrap();
        sent_good.push((2, payload));
        seq += 1;
    };

    for (name, message, want, reply_id) in &cases {
        good_message(&mut h);
        let got = h.feed(message);
        match (got, want) {
            // Offsets depend on the input; compare the class.
            (
                Err(TunnelError::Decode(crate::wire::DecodeError::Malformed { .. })),
                TunnelError::Decode(crate::wire::DecodeError::Malformed { .. }),
            ) => {}
            (got, want) => assert_eq!(got, Err(*want), "{name}"),
        }
        good_message(&mut h);
        h.drive();
        let errors: Vec<Sent> = h
            .sent
            .iter()
            .filter(|s| s.kind == "proxy_error")
            .cloned()
            .collect();
        h.sent.retain(|s| s.kind != "proxy_error");
        assert_eq!(errors.len(), 1, "{name}: {errors:?}");
        assert_eq!(errors[0].request_id.as_deref(), *reply_id, "{name}");
        assert!(
            !errors[0].error.as_deref().unwrap_or_default().is_empty(),
            "{name}"
        );
        assert_eq!(
            h.relay.stream_state("good"),
            Some(StreamState::Open),
            "{name}"
        );
    }
    // Unknown type: protocol_fallback once per type name, no proxy_error.
    for _ in 0..2 {
        good_message(&mut h);
        assert_eq!(
            h.feed(r#"{"type":"teleport","request_id":"t-1","payload":{}}"#),
            Err(TunnelError::UnknownType)
        );
    }
    h.drive();
    let fallbacks: Vec<Sent> = h
        .sent
        .iter()
        .filter(|s| s.kind == "protocol_fallback")
        .cloned()
        .collect();
    assert_eq!(fallbacks.len(), 1);
    assert_eq!(fallbacks[0].unknown_type.as_deref(), Some("teleport"));
    assert!(h.sent.iter().all(|s| s.kind != "proxy_error"));

    // The oversize message closed only its own stream, with 1009.
    assert!(h.events.iter().any(|e| matches!(e, Event::CloseUpstream { stream, close } if *stream == "victim" && close.code == 1009)));

    // The good stream's data arrived whole, in order, both ways.
    let upstream: Vec<(u8, Vec<u8>)> = h
        .received("good")
        .into_iter()
        .map(|(k, m)| (Opcode::from(k) as u8, m))
        .collect();
    assert_eq!(upstream.len(), sent_good.len());
    assert_eq!(checksum(&upstream), checksum(&sent_good));
    assert_eq!(upstream, sent_good);
    let tunnel = data_sent(&h.sent, "good");
    assert_eq!(checksum(&tunnel), checksum(&sent_good));
    assert_eq!(tunnel, sent_good);
    assert_eq!(h.relay.stats().bad_messages, cases.len() as u64 + 2);
}

#[test]
fn duplicate_start_leaves_the_live_stream_untouched() {
    let mut h = Harness::registered(true);
    h.open("s");
    h.relay
        .handle_upstream_message(h.now, "s", MessageKind::Text, Bytes(b"queued".to_vec()))
        .unwrap();
    assert_eq!(
        h.feed(&start_json("s", "/api/v1/namespaces/x/pods/y/exec")),
        Err(TunnelError::DuplicateStream)
    );
    assert_eq!(h.relay.stream_state("s"), Some(StreamState::Open));
    h.drive();
    let sent = h.take_sent();
    assert!(sent.iter().any(|s| s.kind == "proxy_websocket_data"));
    assert!(sent.iter().all(|s| s.kind != "proxy_websocket_close"));
    assert!(
        h.take_events()
            .iter()
            .all(|e| !matches!(e, Event::CloseUpstream { .. }))
    );
}

#[test]
fn too_many_streams_is_refused() {
    let mut h = Harness::registered(true);
    for i in 0..4 {
        h.open(&format!("s{i}"));
    }
    assert_eq!(
        h.feed(&start_json("s4", "/api/v1/pods")),
        Err(TunnelError::TooManyStreams)
    );
    assert_eq!(h.relay.stream_count(), 4);
}

#[test]
fn reply_queue_full_blocks_instead_of_dropping_replies() {
    let mut h = Harness::registered(true);
    let mut refused = 0;
    for _ in 0..REPLY_QUEUE {
        assert_eq!(
            h.feed(&data_json("nobody", 2, b"x")),
            Err(TunnelError::UnknownStream)
        );
    }
    if h.feed(&data_json("nobody", 2, b"x")) == Err(TunnelError::Blocked) {
        refused += 1;
    }
    assert_eq!(refused, 1);
    h.drive();
    assert_eq!(h.take_sent().len(), REPLY_QUEUE);
    assert!(h.take_events().contains(&Event::ResumeTunnelReads));
    assert_eq!(
        h.feed(&data_json("nobody", 2, b"x")),
        Err(TunnelError::UnknownStream)
    );
}

#[test]
fn small_transmit_buffer_keeps_the_message() {
    let mut h = Harness::registered(true);
    h.open("s");
    h.take_sent();
    h.relay
        .handle_upstream_message(h.now, "s", MessageKind::Binary, Bytes(vec![1; 100]))
        .unwrap();
    let unix = UnixTime::new(1_790_000_000, 0);
    let mut small = [0u8; 16];
    let Err(TransmitError::BufferTooSmall { needed }) =
        h.relay.poll_transmit(h.now, unix, &mut small)
    else {
        panic!("expected BufferTooSmall");
    };
    let mut buf = vec![0u8; needed];
    assert_eq!(
        h.relay.poll_transmit(h.now, unix, &mut buf),
        Ok(Some(needed))
    );
    assert_eq!(decode_sent(&buf).data.unwrap().1, vec![1; 100]);
    assert!(h.relay.max_transmit_len() >= needed);
}

#[test]
fn upstream_calls_for_unknown_streams_are_typed_errors() {
    let mut h = Harness::registered(true);
    assert_eq!(
        h.relay.handle_upstream_started(h.now, "x", None),
        Err(UpstreamError::UnknownStream)
    );
    assert_eq!(
        h.relay.handle_upstream_closed(h.now, "x", 1000, ""),
        Err(UpstreamError::UnknownStream)
    );
    assert_eq!(
        h.relay.handle_upstream_failed(h.now, "x", 500, ""),
        Err(UpstreamError::UnknownStream)
    );
    assert_eq!(
        h.relay
            .handle_upstream_message(h.now, "x", MessageKind::Text, Bytes(vec![1])),
        Err(SendError::Closed(Bytes(vec![1])))
    );
    // Before the upstream is open, upstream data has nowhere to go.
    h.feed(&start_json("s", "/api/v1/pods")).unwrap();
    assert!(matches!(
        h.relay
            .handle_upstream_message(h.now, "s", MessageKind::Text, Bytes(vec![1])),
        Err(SendError::Closed(_))
    ));
    assert_eq!(h.relay.pop_upstream("s"), None);
}

#[test]
#[cfg(not(feature = "alloc"))]
fn memory_footprint_matches_the_docs() {
    use core::mem::size_of;
    // Owned-buffer adapter shape: 24-byte handle, default ring of 100 messages, inline.
    assert_eq!(size_of::<Message<Bytes>>(), 32);
    let ring = size_of::<crate::ring::Ring<Message<Bytes>, 100>>();
    assert!(ring <= 100 * 32 + 48, "{ring}");
    let slot = size_of::<Option<crate::table::Entry<StreamData<Bytes, 100>>>>();
    assert!(slot <= 7 * 1024 + 64, "{slot}");
    let relay = size_of::<Relay<Bytes, 64, 100>>();
    assert!(relay <= 455 * 1024, "{relay}");
    // Embedded shape: inline 512-byte buffers, 4-message rings.
    let embedded = size_of::<Option<crate::table::Entry<StreamData<heapless::Vec<u8, 512>, 4>>>>();
    assert!(embedded <= 5 * 1024, "{embedded}");
    std::println!(
        "ring {ring} B, tokio slot {slot} B, relay(64) {relay} B, embedded slot {embedded} B"
    );
}

#[test]
#[cfg(feature = "alloc")]
fn memory_footprint_matches_the_docs() {
    use core::mem::size_of;
    // Heap storage: a ring is a handle until it holds something, a slot is its entry.
    let ring = size_of::<crate::ring::Ring<Message<Bytes>, 100>>();
    assert!(ring <= 48, "{ring}");
    let slot = size_of::<Option<crate::table::Entry<StreamData<Bytes, 100>>>>();
    assert!(slot <= 832, "{slot}");
    // The table is a handle too: capacity costs nothing until streams open.
    let relay = size_of::<Relay<Bytes, 16_384, 100>>();
    assert!(relay <= 5 * 1024, "{relay}");
    std::println!("ring {ring} B, slot {slot} B, relay(16384) {relay} B");
}

mod interleavings {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        /// The control plane sends a message of `len` bytes to stream `s`.
        Down(usize, usize),
        /// Upstream `s` produces a message of `len` bytes.
        Up(usize, usize),
        /// Upstream `s` accepts up to `n` messages.
        Pop(usize, usize),
        /// The tunnel writer sends up to `n` messages.
        Transmit(usize),
        /// A bad message arrives.
        Bad(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..2usize, 0..300usize).prop_map(|(s, l)| Op::Down(s, l)),
            (0..2usize, 0..300usize).prop_map(|(s, l)| Op::Up(s, l)),
            (0..2usize, 0..5usize).prop_map(|(s, n)| Op::Pop(s, n)),
            (0..6usize).prop_map(Op::Transmit),
            (0..4usize).prop_map(Op::Bad),
        ]
    }

    const IDS: [&str; 2] = ["a", "b"];

    fn payload(stream: usize, seq: u32, len: usize) -> Vec<u8> {
        let mut p = vec![stream as u8];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend((0..len).map(|i| (i as u32 ^ seq) as u8));
        p
    }

    struct World {
        h: Harness,
        /// Frame the tunnel reader holds after `Blocked`, and its stream.
        held: Option<(usize, String)>,
        /// Message each upstream reader holds after `Full`.
        up_held: [Option<Bytes>; 2],
        down_seq: [u32; 2],
        up_seq: [u32; 2],
        down_sent: [Vec<Vec<u8>>; 2],
        up_sent: [Vec<Vec<u8>>; 2],
        buf: Vec<u8>,
    }

    impl World {
        fn retry_held(&mut self) -> bool {
            if let Some((s, frame)) = self.held.take() {
                match self.h.feed(&frame) {
                    Ok(_) => {}
                    Err(TunnelError::Blocked) => {
                        self.held = Some((s, frame));
                        return false;
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
            true
        }

        fn retry_up(&mut self, s: usize) -> bool {
            if let Some(m) = self.up_held[s].take() {
                match self.h.relay.handle_upstream_message(
                    self.h.now,
                    IDS[s],
                    MessageKind::Binary,
                    m,
                ) {
                    Ok(()) => {}
                    Err(SendError::Full(m)) => {
                        self.up_held[s] = Some(m);
                        return false;
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
            true
        }

        fn pop(&mut self, s: usize, n: usize) {
            for _ in 0..n {
                let Some(m) = self.h.relay.pop_upstream(IDS[s]) else {
                    break;
                };
                self.h
                    .upstream
                    .entry(IDS[s].to_string())
                    .or_default()
                    .push((m.kind, m.payload.0));
            }
        }

        fn transmit(&mut self, n: usize) {
            let unix = UnixTime::new(1_790_000_000, 0);
            for _ in 0..n {
                match self
                    .h
                    .relay
                    .poll_transmit(self.h.now, unix, &mut self.buf)
                    .unwrap()
                {
                    Some(len) => self.h.sent.push(decode_sent(&self.buf[..len])),
                    None => break,
                }
            }
            while self.h.relay.poll_event().is_some() {}
        }

        fn apply(&mut self, op: Op) {
            match op {
                Op::Down(s, len) => {
                    if !self.retry_held() {
                        return; // paused: the reader does not read further
                    }
                    let p = payload(s, self.down_seq[s], len);
                    self.down_seq[s] += 1;
                    self.down_sent[s].push(p.clone());
                    let frame = data_json(IDS[s], 2, &p);
                    match self.h.feed(&frame) {
                        Ok(Got::Consumed) => {}
                        Err(TunnelError::Blocked) => self.held = Some((s, frame)),
                        other => panic!("{other:?}"),
                    }
                }
                Op::Up(s, len) => {
                    if !self.retry_up(s) {
                        return;
                    }
                    let p = payload(s, self.up_seq[s], len);
                    self.up_seq[s] += 1;
                    self.up_sent[s].push(p.clone());
                    match self.h.relay.handle_upstream_message(
                        self.h.now,
                        IDS[s],
                        MessageKind::Binary,
                        Bytes(p),
                    ) {
                        Ok(()) => {}
                        Err(SendError::Full(m)) => self.up_held[s] = Some(m),
                        Err(e) => panic!("{e:?}"),
                    }
                }
                Op::Pop(s, n) => self.pop(s, n),
                Op::Transmit(n) => self.transmit(n),
                Op::Bad(kind) => {
                    if self.held.is_some() {
                        return;
                    }
                    let bad = match kind {
                        0 => data_json("ghost", 2, b"x"),
                        1 => r#"{"type":"proxy_websocket_data","payload":{"stream_id":"a","data":"%%%%"}}"#.into(),
                        2 => data_json("b", 3, b"x"),
                        _ => start_json("a", "/api/v1/x"),
                    };
                    let r = self.h.feed(&bad);
                    assert!(
                        matches!(r, Err(e) if e != TunnelError::Blocked)
                            || r == Err(TunnelError::Blocked)
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any interleaving of both directions, slow readers, a slow tunnel writer and bad input:
        /// every message reaches its side exactly once, in order, with its bytes intact.
        #[test]
        fn relay_never_loses_or_reorders(ops in proptest::collection::vec(op(), 0..300)) {
            let config = Config { ring_bytes: 1024, ..Config::default() };
            let mut h = Harness::registered_with(config, true);
            h.open("a");
            h.open("b");
            h.auto_pop = false;
            h.sent.clear();
            let mut w = World {
                h,
                held: None,
                up_held: [None, None],
                down_seq: [0; 2],
                up_seq: [0; 2],
                down_sent: [Vec::new(), Vec::new()],
                up_sent: [Vec::new(), Vec::new()],
                buf: vec![0; 1 << 16],
            };
            for op in ops {
                w.apply(op);
            }
            // Drain: readers and writer keep going until everything is through.
            for _ in 0..1000 {
                w.pop(0, usize::MAX);
                w.pop(1, usize::MAX);
                w.transmit(usize::MAX);
                let done = w.retry_held() & w.retry_up(0) & w.retry_up(1);
                if done && w.held.is_none() && w.up_held.iter().all(Option::is_none) {
                    w.pop(0, usize::MAX);
                    w.pop(1, usize::MAX);
                    w.transmit(usize::MAX);
                    break;
                }
            }
            for (s, id) in IDS.into_iter().enumerate() {
                let down: Vec<Vec<u8>> = w.h.received(id).into_iter().map(|m| m.1).collect();
                prop_assert_eq!(&down, &w.down_sent[s]);
                let up: Vec<Vec<u8>> = data_sent(&w.h.sent, id).into_iter().map(|m| m.1).collect();
                prop_assert_eq!(&up, &w.up_sent[s]);
                prop_assert_eq!(w.h.relay.stream_state(id), Some(StreamState::Open));
            }
        }
    }
}

// -------------------------------------------------------------------------------------------------
// Direct entry points (WebSocket upgrades that arrived as `proxy_request`)

/// The borrowed start fields of a `proxy_websocket_start` (as a `RequestStart` would carry them).
fn start_fields(json: &str) -> WebSocketStart<'_> {
    let env = Envelope::parse(json.as_bytes()).unwrap();
    let Inbound::WebSocketStart(start) = env.inbound().unwrap() else {
        panic!("not a start");
    };
    start
}

impl Harness {
    fn start_direct(&mut self, id: &str, path: &str) -> Result<Got, TunnelError> {
        let json = start_json("ignored", path);
        let f = start_fields(&json);
        let s = self.relay.start_stream(
            self.now,
            &sid(id),
            f.path.unwrap(),
            f.query.unwrap(),
            f.headers,
            f.protocol,
        )?;
        assert!(s.headers.contains("authorization"));
        Ok(Got::Start {
            stream: s.stream.to_string(),
            path: s.path.to_string(),
            query: s.query.to_string(),
            protocol: s.protocol.map(|p| p.to_string()),
        })
    }
}

#[test]
fn start_stream_registers_like_a_tunnel_start() {
    let mut h = Harness::registered(true);
    let path = "/api/v1/namespaces/default/pods/web-0/exec";
    let direct = h.start_direct("up-1", path).unwrap();
    let tunnel = h.feed(&start_json("t-1", path)).unwrap();
    let expected = |stream: &str| Got::Start {
        stream: stream.into(),
        path: path.into(),
        query: "command=sh&stdin=true&stdout=true&tty=true".into(),
        protocol: Some("v5.channel.k8s.io,v4.channel.k8s.io".into()),
    };
    assert_eq!(direct, expected("up-1"));
    assert_eq!(tunnel, expected("t-1"));
    assert_eq!(h.relay.stream_state("up-1"), Some(StreamState::Opening));
    assert_eq!(h.relay.stats().streams_opened, 2);
    // From there it is an ordinary stream: opened, data both ways.
    h.relay
        .handle_upstream_started(h.now, "up-1", Some("v5.channel.k8s.io"))
        .unwrap();
    h.feed(&data_json("up-1", 2, b"ls\n")).unwrap();
    h.drive();
    assert_eq!(h.received("up-1").len(), 1);
    let sent = h.take_sent();
    assert!(
        sent.iter()
            .any(|s| s.kind == "proxy_websocket_started" && s.stream_id.as_deref() == Some("up-1"))
    );
    assert!(sent.iter().all(|s| s.kind != "proxy_error"));
}

#[test]
fn start_stream_refuses_an_invalid_path_with_its_typed_error() {
    let mut h = Harness::registered(true);
    assert_eq!(
        h.start_direct("up-1", "/etc/passwd"),
        Err(TunnelError::Request(RequestError::Path))
    );
    assert_eq!(h.relay.stream_state("up-1"), None);
    assert_eq!(h.relay.stream_count(), 0);
    assert_eq!(h.relay.stats().bad_messages, 1);
    h.drive();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].kind, "proxy_error");
    assert_eq!(sent[0].stream_id.as_deref(), Some("up-1"));
}

#[test]
fn start_stream_duplicate_leaves_the_live_stream_untouched() {
    let mut h = Harness::registered(true);
    h.open("s");
    h.take_sent();
    h.relay
        .handle_upstream_message(h.now, "s", MessageKind::Text, Bytes(b"queued".to_vec()))
        .unwrap();
    assert_eq!(
        h.start_direct("s", "/api/v1/namespaces/x/pods/y/exec"),
        Err(TunnelError::DuplicateStream)
    );
    assert_eq!(h.relay.stream_state("s"), Some(StreamState::Open));
    h.drive();
    let sent = h.take_sent();
    assert_eq!(data_sent(&sent, "s"), [(1, b"queued".to_vec())]);
    assert!(sent.iter().any(|s| s.kind == "proxy_error"));
    assert!(sent.iter().all(|s| s.kind != "proxy_websocket_close"));
    assert!(
        h.take_events()
            .iter()
            .all(|e| !matches!(e, Event::CloseUpstream { .. }))
    );
}

#[test]
fn close_stream_drains_then_closes_upstream_then_echoes() {
    let mut h = Harness::registered(true);
    h.start_direct("s", "/api/v1/namespaces/default/pods/web-0/exec")
        .unwrap();
    h.relay
        .handle_upstream_started(h.now, "s", Some("v5.channel.k8s.io"))
        .unwrap();
    h.drive();
    h.take_sent();
    h.take_events();
    h.auto_pop = false;
    h.feed(&data_json("s", 2, b"one")).unwrap();
    h.feed(&data_json("s", 2, b"two")).unwrap();
    h.relay.close_stream(h.now, "s", None).unwrap();
    h.drive();
    // The queued data goes first; the close waits until it is popped.
    assert_eq!(h.take_events(), [Event::DataForUpstream(sid("s"))]);
    assert_eq!(h.relay.stream_state("s"), Some(StreamState::Closing));
    h.pop_all("s");
    h.drive();
    assert_eq!(
        h.received("s"),
        [
            (MessageKind::Binary, b"one".to_vec()),
            (MessageKind::Binary, b"two".to_vec())
        ]
    );
    assert_eq!(
        h.take_events(),
        [Event::CloseUpstream {
            stream: sid("s"),
            close: Close::new(1000, "")
        }]
    );
    // Closing again is a no-op; the echo follows the upstream's close.
    h.relay
        .close_stream(h.now, "s", Some(Close::new(4000, "again")))
        .unwrap();
    h.relay
        .handle_upstream_closed(h.now, "s", 1000, "")
        .unwrap();
    h.drive();
    let sent = h.take_sent();
    assert_eq!(
        sent.iter().map(|s| s.kind.as_str()).collect::<Vec<_>>(),
        ["proxy_websocket_close"]
    );
    assert_eq!(h.relay.stream_count(), 0);
    // Once gone, a late close is dropped quietly; a never-known stream is a typed error.
    assert_eq!(h.relay.close_stream(h.now, "s", None), Ok(()));
    assert_eq!(
        h.relay.close_stream(h.now, "nobody", None),
        Err(TunnelError::UnknownStream)
    );
    h.drive();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].kind, "proxy_error");
    assert_eq!(sent[0].stream_id.as_deref(), Some("nobody"));
}

#[test]
fn close_stream_with_code_and_reason() {
    let mut h = Harness::registered(true);
    h.open("s");
    h.relay
        .close_stream(h.now, "s", Some(Close::new(4000, "user left")))
        .unwrap();
    h.drive();
    assert!(h.take_events().contains(&Event::CloseUpstream {
        stream: sid("s"),
        close: Close::new(4000, "user left")
    }));
}
