//! Gateway scenarios: a test driver plays the agent (feeds envelopes, decodes what the gateway
//! transmits) and the clients (pops messages, reports closes), with a simulated clock; golden
//! encodings pin the wire; a paired test drives the agent [`Relay`](crate::relay::Relay) and the
//! gateway against each other in memory (the quinn `Pair` idea).

use std::collections::BTreeMap;
use std::format;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use super::*;
use crate::relay::RequestError;
use crate::ring::Payload;
use crate::time::Duration;
use crate::wire::{Base64Str, DataFrame};

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
type TestGateway = Gateway<Bytes, 4, RING>;

const EPOCH: UnixTime = UnixTime::new(0, 0);
const STAMP: &str = "1970-01-01T00:00:00.000000000Z";

/// One tunnel message the gateway sent, decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Sent {
    kind: String,
    request_id: Option<String>,
    stream_id: Option<String>,
    data: Option<(u8, Vec<u8>)>,
    code: Option<u64>,
    reason: Option<String>,
    error: Option<String>,
    raw: String,
}

fn decode_sent(frame: &[u8]) -> Sent {
    let env = Envelope::parse(frame).expect("gateway sent an invalid envelope");
    let p = env.payload;
    let s = |k: &str| p.get(k).and_then(|v| v.as_str()).map(|v| v.to_string());
    let ws = env.type_name != "tcp_tunnel_data";
    let data = p
        .get("data")
        .and_then(|v| v.as_str())
        .filter(|_| ws)
        .map(|b64| {
            let mut out = vec![0u8; 1 << 16];
            let raw = Base64Str(b64).decode_into(&mut out).unwrap();
            let frame = DataFrame::parse(raw).unwrap();
            let (head, head_len, body) = frame.parts();
            let mut payload = head[1..head_len].to_vec();
            payload.extend_from_slice(body);
            (head[0], payload)
        });
    Sent {
        kind: env.type_name.to_string(),
        request_id: env.request_id.map(|r| r.to_string()),
        stream_id: s("stream_id"),
        data,
        code: p
            .get("code")
            .and_then(|v| v.as_number())
            .and_then(|n| n.as_u64()),
        reason: s("reason"),
        error: s("error"),
        raw: String::from_utf8(frame.to_vec()).unwrap(),
    }
}

fn b64(raw: &[u8]) -> String {
    let mut out = vec![0u8; crate::wire::b64::encoded_len(raw.len())];
    let n = crate::wire::b64::encode(raw, &mut out).unwrap();
    String::from_utf8(out[..n].to_vec()).unwrap()
}

fn register_json(extensions: bool) -> String {
    let ext = if extensions {
        r#","extensions":{"websocket_started":true,"websocket_close_code":true,"proxy_error_status":true,"raw_upgrade":true,"response_credit":true}"#
    } else {
        ""
    };
    format!(
        r#"{{"type":"register","request_id":"req_1_a1","payload":{{"agent_id":"a1","name":"edge"{ext}}},"timestamp":"2026-11-26T10:00:00Z"}}"#
    )
}

fn started_json(id: &str, protocol: &str) -> String {
    format!(
        r#"{{"type":"proxy_websocket_started","request_id":"{id}","payload":{{"stream_id":"{id}","protocol":"{protocol}"}}}}"#
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

fn close_json(id: &str, code: Option<u16>) -> String {
    let code = code
        .map(|c| format!(r#","code":{c},"reason":"done""#))
        .unwrap_or_default();
    format!(
        r#"{{"type":"proxy_websocket_close","request_id":"{id}","payload":{{"stream_id":"{id}"{code}}}}}"#
    )
}

fn error_json(id: &str, status: Option<u16>) -> String {
    let status = status
        .map(|s| format!(r#","status":{s}"#))
        .unwrap_or_default();
    format!(
        r#"{{"type":"proxy_error","request_id":"{id}","payload":{{"request_id":"{id}","error":"failed to connect to K8s API: forbidden"{status}}}}}"#
    )
}

const EXEC: &str = "/api/v1/namespaces/default/pods/demo/exec";

/// kubectl's upgrade headers, with impersonation it must not be able to choose.
const KUBECTL_HEADERS: [(&str, &str); 8] = [
    ("Authorization", "Bearer user-secret"),
    ("Connection", "Upgrade"),
    ("Impersonate-Group", "system:masters"),
    ("impersonate-user", "root"),
    ("Sec-WebSocket-Key", "Zm0czECq55kLy7wb63qLqw=="),
    ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"),
    ("User-Agent", "kubectl/v1.32.4"),
    ("Kubectl-Command", "kubectl exec"),
];

struct Harness {
    gw: TestGateway,
    now: Instant,
    scratch: Vec<u8>,
    sent: Vec<Sent>,
    events: Vec<Event>,
    /// What each client received.
    client: BTreeMap<String, Vec<(MessageKind, Vec<u8>)>>,
    auto_pop: bool,
}

impl Harness {
    fn new() -> Self {
        Self::with_config(Config::default())
    }

    fn with_config(config: Config) -> Self {
        let now = Instant::from_secs(1_000);
        Self {
            gw: Gateway::new(config, "c1", now),
            now,
            scratch: vec![0; 1 << 16],
            sent: Vec::new(),
            events: Vec::new(),
            client: BTreeMap::new(),
            auto_pop: true,
        }
    }

    fn registered(extensions: bool) -> Self {
        let mut h = Self::new();
        assert_eq!(h.feed(&register_json(extensions)), Ok(Got::Consumed));
        h.drive();
        assert_eq!(h.take_sent()[0].kind, "register_success");
        assert!(matches!(h.take_events()[..], [Event::Registered { .. }]));
        h
    }

    fn feed(&mut self, json: &str) -> Result<Got, TunnelError> {
        let handled =
            self.gw
                .handle_tunnel_message(self.now, json.as_bytes(), &mut self.scratch)?;
        Ok(match handled {
            Handled::Consumed => Got::Consumed,
            Handled::ResponseHead(h) => Got::Head {
                stream: h.stream.to_string(),
                status: h.status,
                headers: h
                    .headers
                    .iter()
                    .flat_map(|(n, v)| {
                        let n = n.to_string();
                        v.map(move |v| (n.clone(), v.to_string()))
                    })
                    .collect(),
            },
            Handled::Other(env, _) => Got::Other(env.type_name.to_string()),
        })
    }

    fn drive(&mut self) {
        let mut buf = vec![0u8; 1 << 17];
        loop {
            let mut progressed = false;
            while let Some(n) = self.gw.poll_transmit(self.now, EPOCH, &mut buf).unwrap() {
                self.sent.push(decode_sent(&buf[..n]));
                progressed = true;
            }
            while let Some(event) = self.gw.poll_event() {
                if let Event::DataForClient(id) = &event
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
        while let Some(m) = self.gw.pop_client(id) {
            self.client
                .entry(id.to_string())
                .or_default()
                .push((m.kind, m.payload.0));
        }
    }

    fn open(&mut self, id: &str) -> Result<(), OpenError> {
        let req = StreamRequest {
            id,
            path: EXEC,
            query: "command=sh&stdin=true&stdout=true",
            headers: &KUBECTL_HEADERS,
            protocols: "v5.channel.k8s.io",
            upgrade: None,
            user: Some("alice"),
            groups: &[],
        };
        let r = self
            .gw
            .open_stream(self.now, EPOCH, &req, &mut self.scratch);
        self.drive();
        r
    }

    /// Opens `id` and acknowledges it as the agent would.
    fn open_started(&mut self, id: &str) {
        self.open(id).unwrap();
        assert_eq!(
            self.feed(&started_json(id, "v5.channel.k8s.io")),
            Ok(Got::Consumed)
        );
        self.drive();
        self.sent.clear();
        self.events.clear();
    }

    fn request(&mut self, id: &str) -> Result<(), OpenError> {
        let req = HttpRequest {
            id,
            method: "GET",
            path: "/api/v1/namespaces/default/pods/demo/log",
            query: "follow=true",
            headers: &[("Accept", "application/json"), ("Impersonate-Uid", "0")],
            user: Some("alice"),
            groups: &[],
            body: b"",
        };
        let r = self
            .gw
            .open_request(self.now, EPOCH, &req, &mut self.scratch);
        self.drive();
        r
    }

    fn client_send(
        &mut self,
        id: &str,
        kind: MessageKind,
        payload: &[u8],
    ) -> Result<(), SendError<Bytes>> {
        let r = self
            .gw
            .handle_client_message(self.now, id, kind, Bytes(payload.to_vec()));
        self.drive();
        r
    }

    fn take_sent(&mut self) -> Vec<Sent> {
        core::mem::take(&mut self.sent)
    }

    fn take_events(&mut self) -> Vec<Event> {
        core::mem::take(&mut self.events)
    }

    fn received(&self, id: &str) -> Vec<(MessageKind, Vec<u8>)> {
        self.client.get(id).cloned().unwrap_or_default()
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Got {
    Consumed,
    Head {
        stream: String,
        status: u16,
        headers: Vec<(String, String)>,
    },
    Other(String),
}

fn sid(s: &str) -> StreamId {
    StreamId::new(s).unwrap()
}

fn s<const N: usize>(text: &str) -> heapless::String<N> {
    truncated(text.chars())
}

// -------------------------------------------------------------------------------------------------
// Golden encodings

#[test]
fn golden_register_success_advertises_extensions() {
    let mut h = Harness::new();
    h.feed(&register_json(true)).unwrap();
    h.drive();
    assert_eq!(
        h.sent[0].raw,
        format!(
            r#"{{"type":"register_success","request_id":"req_1_a1","payload":{{"cluster_id":"c1","extensions":{{"websocket_started":true,"websocket_close_code":true,"proxy_error_status":true,"native_frames":true,"raw_upgrade":true,"response_credit":true,"native_tcp":true,"native_ack":true}}}},"timestamp":"{STAMP}"}}"#
        )
    );
    // The test agent offers the compat extensions only.
    assert_eq!(
        h.events,
        [Event::Registered {
            agent_id: s("a1"),
            extensions: Extensions {
                native: false,
                native_tcp: false,
                native_ack: false,
                ..Extensions::ALL
            }
        }]
    );
    assert!(h.gw.is_registered());
}

#[test]
fn golden_websocket_start_filters_headers_and_impersonates() {
    let mut h = Harness::registered(true);
    h.open("s1").unwrap();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].raw,
        format!(
            r#"{{"type":"proxy_websocket_start","request_id":"s1","payload":{{"stream_id":"s1","method":"GET","path":"{EXEC}","query":"command=sh&stdin=true&stdout=true","headers":{{"User-Agent":["kubectl/v1.32.4"],"Kubectl-Command":["kubectl exec"],"Impersonate-User":["alice"]}},"protocol":"v5.channel.k8s.io"}},"timestamp":"{STAMP}"}}"#
        )
    );
}

#[test]
fn golden_raw_upgrade_start_carries_method_token_and_protocols() {
    let mut h = Harness::registered(true);
    let spdy = StreamRequest {
        id: "s1",
        path: EXEC,
        query: "command=sh&stdin=true&stdout=true",
        headers: &KUBECTL_HEADERS,
        protocols: "v4.channel.k8s.io, v3.channel.k8s.io",
        upgrade: Some(("POST", "SPDY/3.1")),
        user: Some("alice"),
        groups: &[],
    };
    h.gw.open_stream(h.now, EPOCH, &spdy, &mut h.scratch)
        .unwrap();
    h.drive();
    let sent = h.take_sent();
    assert_eq!(
        sent[0].raw,
        format!(
            r#"{{"type":"proxy_websocket_start","request_id":"s1","payload":{{"stream_id":"s1","method":"POST","path":"{EXEC}","query":"command=sh&stdin=true&stdout=true","headers":{{"User-Agent":["kubectl/v1.32.4"],"Kubectl-Command":["kubectl exec"],"Impersonate-User":["alice"]}},"protocol":"v4.channel.k8s.io, v3.channel.k8s.io","upgrade":"SPDY/3.1"}},"timestamp":"{STAMP}"}}"#
        )
    );
    // The agent's 101 names the chosen X-Stream-Protocol-Version.
    h.feed(
        r#"{"type":"proxy_websocket_started","payload":{"stream_id":"s1","protocol":"v4.channel.k8s.io"}}"#,
    )
    .unwrap();
    h.drive();
    assert!(h.events.contains(&Event::Started {
        stream: sid("s1"),
        subprotocol: s("v4.channel.k8s.io"),
    }));
    // WebSocket is not a raw upgrade; neither is a method other than GET or POST.
    for upgrade in [
        ("GET", "websocket"),
        ("PUT", "SPDY/3.1"),
        ("POST", "SPDY 3.1"),
    ] {
        let bad = StreamRequest {
            id: "s2",
            upgrade: Some(upgrade),
            ..spdy
        };
        assert_eq!(
            h.gw.open_stream(h.now, EPOCH, &bad, &mut h.scratch),
            Err(OpenError::Request(RequestError::Upgrade)),
            "{upgrade:?}"
        );
    }
}

#[test]
fn raw_upgrade_is_refused_on_a_pipeops_tunnel() {
    let mut h = Harness::registered(false);
    let spdy = StreamRequest {
        id: "s1",
        path: EXEC,
        query: "command=sh",
        headers: &KUBECTL_HEADERS,
        protocols: "v4.channel.k8s.io",
        upgrade: Some(("POST", "SPDY/3.1")),
        user: Some("alice"),
        groups: &[],
    };
    assert_eq!(
        h.gw.open_stream(h.now, EPOCH, &spdy, &mut h.scratch),
        Err(OpenError::UpgradeUnsupported)
    );
    h.drive();
    assert!(h.take_sent().is_empty());
}

fn register_with_token(extensions: &str) -> String {
    format!(
        r#"{{"type":"register","request_id":"req_1_a1","payload":{{"agent_id":"a1","name":"edge","k8s_service_token":"sa.jwt-TOKEN"{extensions}}}}}"#
    )
}

#[test]
fn pipeops_agent_gets_its_service_token_as_bearer() {
    let mut h = Harness::new();
    h.feed(&register_with_token("")).unwrap();
    h.drive();
    h.take_sent();
    h.request("r1").unwrap();
    h.open("s1").unwrap();
    let sent = h.take_sent();
    assert_eq!(sent[0].kind, "proxy_request");
    assert!(
        sent[0]
            .raw
            .contains(r#""Impersonate-User":["alice"],"Authorization":["Bearer sa.jwt-TOKEN"]"#),
        "{}",
        sent[0].raw
    );
    assert_eq!(sent[1].kind, "proxy_websocket_start");
    assert!(
        sent[1]
            .raw
            .contains(r#""Authorization":["Bearer sa.jwt-TOKEN"]"#),
        "{}",
        sent[1].raw
    );
    // The credential never shows in a debug print of the forwarded headers.
    let headers = Forwarded {
        inner: &KUBECTL_HEADERS,
        user: None,
        groups: &[],
        bearer: Some("Bearer sa.jwt-TOKEN"),
    };
    assert!(!format!("{headers:?}").contains("TOKEN"));
}

#[test]
fn tether_agent_never_receives_a_service_token() {
    // An agent offering Tether's extensions authenticates upstream itself.
    let mut h = Harness::new();
    h.feed(&register_with_token(
        r#","extensions":{"websocket_started":true}"#,
    ))
    .unwrap();
    h.drive();
    h.take_sent();
    h.request("r1").unwrap();
    h.open("s1").unwrap();
    for sent in h.take_sent() {
        assert!(!sent.raw.contains("TOKEN"), "{}", sent.raw);
        assert!(!sent.raw.contains("Authorization"), "{}", sent.raw);
    }
    // A token with a line break is never put in a header.
    let mut h = Harness::new();
    h.feed(&register_with_token("").replace("sa.jwt-TOKEN", r"a\r\nX-Evil: 1"))
        .unwrap();
    h.drive();
    h.take_sent();
    h.request("r1").unwrap();
    let sent = h.take_sent();
    assert!(!sent[0].raw.contains("Authorization"), "{}", sent[0].raw);
}

#[test]
fn golden_data_close_cancel_request() {
    let mut h = Harness::registered(true);
    h.open_started("s1");
    h.client_send("s1", MessageKind::Binary, b"\x00ls\n")
        .unwrap();
    h.gw.handle_client_closed(h.now, "s1", Some(Close::new(1000, "bye")))
        .unwrap();
    h.drive();
    let sent = h.take_sent();
    assert_eq!(
        sent[0].raw,
        format!(
            r#"{{"type":"proxy_websocket_data","request_id":"s1","payload":{{"stream_id":"s1","data":"AgBscwo="}},"timestamp":"{STAMP}"}}"#
        )
    );
    assert_eq!(
        sent[1].raw,
        format!(
            r#"{{"type":"proxy_websocket_close","request_id":"s1","payload":{{"stream_id":"s1","code":1000,"reason":"bye"}},"timestamp":"{STAMP}"}}"#
        )
    );

    h.request("r1").unwrap();
    let sent = h.take_sent();
    assert_eq!(
        sent[0].raw,
        format!(
            r#"{{"type":"proxy_request","request_id":"r1","payload":{{"method":"GET","path":"/api/v1/namespaces/default/pods/demo/log","query":"follow=true","headers":{{"Accept":["application/json"],"Impersonate-User":["alice"]}},"supports_response_streaming":true,"response_credit":true}},"timestamp":"{STAMP}"}}"#
        )
    );
    // The whole window is granted at once.
    assert_eq!(
        sent[1].raw,
        format!(
            r#"{{"type":"proxy_response_credit","request_id":"r1","payload":{{"bytes":1048576,"messages":{RING}}},"timestamp":"{STAMP}"}}"#
        )
    );
    h.gw.handle_client_closed(h.now, "r1", None).unwrap();
    h.drive();
    assert_eq!(
        h.take_sent()[0].raw,
        format!(
            r#"{{"type":"proxy_cancel","request_id":"r1","payload":{{}},"timestamp":"{STAMP}"}}"#
        )
    );
}

// -------------------------------------------------------------------------------------------------
// WebSocket streams

#[test]
fn websocket_start_started_data_both_ways_close_1000() {
    let mut h = Harness::registered(true);
    h.open("s1").unwrap();
    assert_eq!(h.gw.stream_state("s1"), Some(StreamState::Opening));
    assert_eq!(h.take_sent()[0].kind, "proxy_websocket_start");
    assert!(h.take_events().is_empty(), "no 101 before the agent's ack");

    h.feed(&started_json("s1", "v5.channel.k8s.io")).unwrap();
    h.drive();
    assert_eq!(
        h.take_events(),
        [Event::Started {
            stream: sid("s1"),
            subprotocol: s("v5.channel.k8s.io")
        }]
    );

    // Agent -> client: boundaries and kinds kept.
    h.feed(&data_json("s1", 2, b"\x01hello")).unwrap();
    h.feed(&data_json("s1", 1, b"text")).unwrap();
    h.feed(&data_json("s1", 2, b"")).unwrap();
    h.drive();
    assert_eq!(
        h.received("s1"),
        [
            (MessageKind::Binary, b"\x01hello".to_vec()),
            (MessageKind::Text, b"text".to_vec()),
            (MessageKind::Binary, Vec::new()),
        ]
    );
    assert_eq!(h.take_events(), [Event::DataForClient(sid("s1"))]);

    // Client -> agent.
    h.client_send("s1", MessageKind::Binary, b"\x00id\n")
        .unwrap();
    let sent = h.take_sent();
    assert_eq!(sent[0].data, Some((2, b"\x00id\n".to_vec())));

    // Agent pings are not relayed.
    h.feed(&data_json("s1", 9, b"p")).unwrap();
    assert_eq!(h.gw.stats().control_frames_dropped, 1);

    // Close 1000 from the upstream reaches the client as 1000.
    h.feed(&close_json("s1", Some(1000))).unwrap();
    h.drive();
    assert_eq!(
        h.take_events(),
        [Event::Closed {
            stream: sid("s1"),
            close: Close::new(1000, "done")
        }]
    );
    assert_eq!(h.gw.stream_count(), 0);
    // A late message for it is dropped quietly.
    assert_eq!(h.feed(&data_json("s1", 2, b"late")), Ok(Got::Consumed));
    assert_eq!(h.gw.stats().late_messages, 1);
}

#[test]
fn refused_upstream_reports_its_status() {
    let mut h = Harness::registered(true);
    h.open("s1").unwrap();
    h.take_sent();
    h.feed(&error_json("s1", Some(403))).unwrap();
    h.feed(&close_json("s1", None)).unwrap();
    h.drive();
    assert_eq!(
        h.take_events(),
        [Event::Failed {
            stream: sid("s1"),
            status: 403,
            message: s("failed to connect to K8s API: forbidden"),
        }]
    );
    assert_eq!(h.gw.stream_count(), 0);
    assert!(h.take_sent().is_empty(), "nothing owed to the agent");
    // Without a status (PipeOps agent) it is 502.
    h.open("s2").unwrap();
    h.feed(&error_json("s2", None)).unwrap();
    h.drive();
    assert!(matches!(
        h.take_events()[..],
        [Event::Failed { status: 502, .. }]
    ));
}

#[test]
fn pipeops_agent_starts_optimistically_and_never_reports_false_success() {
    let mut h = Harness::registered(false);
    assert_eq!(h.gw.extensions(), Extensions::NONE);
    let req = StreamRequest {
        id: "s1",
        path: EXEC,
        query: "",
        headers: &(),
        protocols: "v5.channel.k8s.io, v4.channel.k8s.io",
        upgrade: None,
        user: None,
        groups: &[],
    };
    h.gw.open_stream(h.now, EPOCH, &req, &mut h.scratch)
        .unwrap();
    h.drive();
    assert_eq!(
        h.take_events(),
        [Event::Started {
            stream: sid("s1"),
            subprotocol: s("v5.channel.k8s.io")
        }]
    );
    // A broken upstream: error, then a code-less close. The client sees 1011, not 1000.
    h.feed(&error_json("s1", None)).unwrap();
    h.feed(&close_json("s1", None)).unwrap();
    h.drive();
    assert_eq!(
        h.take_events(),
        [Event::Closed {
            stream: sid("s1"),
            close: Close::new(1011, "failed to connect to K8s API: forbidden")
        }]
    );
    // Client closes go out without code (extension not negotiated).
    h.open("s2").unwrap();
    h.take_events();
    h.take_sent();
    h.gw.handle_client_closed(h.now, "s2", Some(Close::new(1000, "")))
        .unwrap();
    h.drive();
    let sent = h.take_sent();
    assert_eq!(sent[0].kind, "proxy_websocket_close");
    assert_eq!(sent[0].code, None);
}

#[test]
fn client_close_flushes_queued_data_first_and_frees() {
    let mut h = Harness::registered(true);
    h.open_started("s1");
    // Queue without transmitting in between: push directly.
    for i in 0..3u8 {
        h.gw.handle_client_message(h.now, "s1", MessageKind::Binary, Bytes(vec![i]))
            .unwrap();
    }
    h.gw.handle_client_closed(h.now, "s1", Some(Close::new(1000, "")))
        .unwrap();
    h.drive();
    let kinds: Vec<_> = h.take_sent().iter().map(|s| s.kind.clone()).collect();
    assert_eq!(
        kinds,
        [
            "proxy_websocket_data",
            "proxy_websocket_data",
            "proxy_websocket_data",
            "proxy_websocket_close"
        ]
    );
    assert_eq!(h.gw.stream_count(), 0);
    assert!(h.take_events().is_empty(), "the client is gone: no events");
    // The agent's echo is a late message.
    assert_eq!(h.feed(&close_json("s1", Some(1000))), Ok(Got::Consumed));
}

#[test]
fn client_gone_before_start_sent_tells_the_agent_nothing() {
    let mut h = Harness::registered(true);
    let req = StreamRequest {
        id: "s1",
        path: EXEC,
        query: "",
        headers: &(),
        protocols: "",
        upgrade: None,
        user: Some("alice"),
        groups: &[],
    };
    h.gw.open_stream(h.now, EPOCH, &req, &mut h.scratch)
        .unwrap();
    h.gw.handle_client_closed(h.now, "s1", None).unwrap();
    h.drive();
    assert!(h.take_sent().is_empty());
    assert_eq!(h.gw.stream_count(), 0);
}

// -------------------------------------------------------------------------------------------------
// HTTP requests

#[test]
fn streamed_response_header_chunks_end() {
    let mut h = Harness::registered(true);
    h.request("r1").unwrap();
    h.take_sent();
    let head = r#"{"type":"proxy_response_header","request_id":"r1","payload":{"status":200,"headers":{"Content-Type":["text/plain"]}}}"#;
    assert_eq!(
        h.feed(head),
        Ok(Got::Head {
            stream: "r1".into(),
            status: 200,
            headers: vec![("Content-Type".into(), "text/plain".into())],
        })
    );
    for chunk in [&b"line 1\n"[..], b"line 2\n"] {
        let json = format!(
            r#"{{"type":"proxy_response_chunk","request_id":"r1","payload":{{"data":"{}","encoding":"base64","size":{}}}}}"#,
            b64(chunk),
            chunk.len()
        );
        h.feed(&json).unwrap();
    }
    h.feed(r#"{"type":"proxy_response_end","request_id":"r1","payload":{}}"#)
        .unwrap();
    h.drive();
    assert_eq!(
        h.received("r1"),
        [
            (MessageKind::Binary, b"line 1\n".to_vec()),
            (MessageKind::Binary, b"line 2\n".to_vec())
        ]
    );
    assert_eq!(
        h.take_events(),
        [
            Event::DataForClient(sid("r1")),
            Event::ResponseEnd(sid("r1"))
        ]
    );
    assert_eq!(h.gw.stream_count(), 0);
}

fn chunk_json(id: &str, chunk: &[u8]) -> String {
    format!(
        r#"{{"type":"proxy_response_chunk","request_id":"{id}","payload":{{"data":"{}","encoding":"base64","size":{}}}}}"#,
        b64(chunk),
        chunk.len()
    )
}

#[test]
fn a_stalled_response_reader_holds_only_its_request_with_response_credit() {
    let mut h = Harness::registered(true);
    h.open_started("s1");
    h.request("r1").unwrap();
    let sent = h.take_sent();
    let grant = sent
        .iter()
        .find(|s| s.kind == "proxy_response_credit")
        .expect("the window is granted at once");
    assert_eq!(grant.request_id.as_deref(), Some("r1"));
    h.feed(r#"{"type":"proxy_response_header","request_id":"r1","payload":{"status":200}}"#)
        .unwrap();
    h.auto_pop = false;
    // The client reads nothing: the agent fills the window; the tunnel is never paused.
    for i in 0..RING as u8 {
        h.feed(&chunk_json("r1", &[i; 10])).unwrap();
    }
    h.drive();
    assert!(!h.take_events().contains(&Event::PauseTunnelReads));
    // Other streams flow meanwhile.
    h.feed(&data_json("s1", 2, b"other")).unwrap();
    h.pop_all("s1");
    assert_eq!(h.received("s1"), [(MessageKind::Binary, b"other".to_vec())]);
    // Nothing more is granted until the client reads; then a quarter of the window comes back.
    assert!(
        h.take_sent()
            .iter()
            .all(|s| s.kind != "proxy_response_credit")
    );
    h.pop_all("r1");
    h.drive();
    let sent = h.take_sent();
    assert!(
        sent.iter().any(|s| s.kind == "proxy_response_credit"),
        "{sent:?}"
    );
    assert_eq!(h.received("r1").len(), RING);
    // An agent that sends past its credit loses that request, nothing else.
    h.auto_pop = false;
    let granted = RING; // what the grant after the drain gave back, at most
    let mut refused = None;
    for i in 0..=granted {
        if let Err(e) = h.feed(&chunk_json("r1", &[i as u8; 10])) {
            refused = Some(e);
            break;
        }
    }
    assert!(
        matches!(refused, Some(TunnelError::Credit(_))),
        "{refused:?}"
    );
    h.drive();
    assert!(!h.take_events().contains(&Event::PauseTunnelReads));
    assert!(h.take_sent().iter().any(|s| s.kind == "proxy_cancel"));
}

#[test]
fn buffered_response_and_refused_request() {
    let mut h = Harness::registered(true);
    h.request("r1").unwrap();
    let json = format!(
        r#"{{"type":"proxy_response","request_id":"r1","payload":{{"status":404,"headers":{{}},"body":"{}","encoding":"base64"}}}}"#,
        b64(b"{\"kind\":\"Status\"}")
    );
    assert!(matches!(h.feed(&json), Ok(Got::Head { status: 404, .. })));
    h.drive();
    assert_eq!(
        h.received("r1"),
        [(MessageKind::Binary, b"{\"kind\":\"Status\"}".to_vec())]
    );
    assert_eq!(
        h.take_events(),
        [
            Event::DataForClient(sid("r1")),
            Event::ResponseEnd(sid("r1"))
        ]
    );

    h.request("r2").unwrap();
    h.feed(&error_json("r2", None)).unwrap();
    h.drive();
    assert!(matches!(
        h.take_events()[..],
        [Event::Failed { status: 502, .. }]
    ));

    h.request("r3").unwrap();
    h.feed(r#"{"type":"proxy_response_header","request_id":"r3","payload":{"status":200}}"#)
        .unwrap();
    h.feed(
        r#"{"type":"proxy_response_abort","request_id":"r3","payload":{"error":"upstream reset"}}"#,
    )
    .unwrap();
    h.drive();
    assert_eq!(
        h.take_events(),
        [Event::ResponseAbort {
            stream: sid("r3"),
            message: s("upstream reset")
        }]
    );
    assert_eq!(h.gw.stream_count(), 0);
}

// -------------------------------------------------------------------------------------------------
// Bad input, limits, flow control

#[test]
fn bad_agent_input_is_rejected_and_other_streams_flow() {
    let mut h = Harness::registered(true);
    h.open_started("s1");
    h.open_started("s2");
    h.feed(&data_json("s1", 2, b"one")).unwrap();

    assert!(matches!(h.feed("{not json"), Err(TunnelError::Decode(_))));
    assert_eq!(
        h.feed(r#"{"type":"proxy_websocket_data","request_id":"s2","payload":{"stream_id":"s2","data":"!!!"}}"#),
        Err(TunnelError::Frame(FrameError::BadBase64))
    );
    assert_eq!(
        h.feed(&data_json("s2", 7, b"x")),
        Err(TunnelError::Frame(FrameError::UnknownOpcode(7)))
    );
    assert_eq!(
        h.feed(&data_json("nope", 2, b"x")),
        Err(TunnelError::UnknownStream)
    );
    assert_eq!(
        h.feed(r#"{"type":"proxy_response_chunk","request_id":"s1","payload":{"data":"AA=="}}"#),
        Err(TunnelError::Unexpected)
    );
    assert_eq!(
        h.feed(r#"{"type":"bogus","payload":{}}"#),
        Err(TunnelError::UnknownType)
    );
    h.feed(&data_json("s1", 2, b"two")).unwrap();
    h.feed(&data_json("s2", 2, b"three")).unwrap();
    h.drive();
    assert_eq!(
        h.received("s1"),
        [
            (MessageKind::Binary, b"one".to_vec()),
            (MessageKind::Binary, b"two".to_vec())
        ]
    );
    assert_eq!(h.received("s2"), [(MessageKind::Binary, b"three".to_vec())]);
    let errors: Vec<_> = h
        .take_sent()
        .into_iter()
        .filter(|s| s.kind == "error")
        .map(|s| s.error.unwrap())
        .collect();
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert_eq!(h.gw.stats().bad_messages, 6);
    assert_eq!(h.gw.stream_count(), 2);
}

#[test]
fn oversize_message_closes_only_its_stream() {
    let mut h = Harness::new();
    h.gw = Gateway::new(
        Config {
            max_message: 256,
            ..Config::default()
        },
        "c1",
        h.now,
    );
    h.feed(&register_json(true)).unwrap();
    h.drive();
    h.open_started("s1");
    h.open_started("s2");
    assert!(matches!(
        h.feed(&data_json("s1", 2, &[7u8; 300])),
        Err(TunnelError::TooLarge { .. })
    ));
    h.feed(&data_json("s2", 2, b"fine")).unwrap();
    h.drive();
    assert!(h.take_events().contains(&Event::Closed {
        stream: sid("s1"),
        close: Close::new(1009, "message too big")
    }));
    assert!(
        h.take_sent()
            .iter()
            .any(|s| s.kind == "proxy_websocket_close" && s.code == Some(1009))
    );
    assert_eq!(h.received("s2"), [(MessageKind::Binary, b"fine".to_vec())]);
}

#[test]
fn full_client_ring_pauses_the_tunnel_without_loss() {
    let mut h = Harness::registered(true);
    h.open_started("s1");
    h.auto_pop = false;
    for i in 0..RING as u8 {
        h.feed(&data_json("s1", 2, &[i])).unwrap();
    }
    let refused = data_json("s1", 2, &[RING as u8]);
    assert_eq!(h.feed(&refused), Err(TunnelError::Blocked));
    h.drive();
    assert_eq!(
        h.take_events(),
        [Event::PauseTunnelReads, Event::DataForClient(sid("s1"))]
    );
    h.pop_all("s1");
    h.drive();
    assert_eq!(h.take_events(), [Event::ResumeTunnelReads]);
    h.feed(&refused).unwrap();
    h.pop_all("s1");
    let got: Vec<u8> = h.received("s1").iter().map(|(_, p)| p[0]).collect();
    assert_eq!(got, (0..=RING as u8).collect::<Vec<_>>());
    assert_eq!(h.gw.stats().tunnel_pauses, 1);
}

#[test]
fn a_stream_that_keeps_the_tunnel_paused_is_closed_alone_and_the_pause_is_not_silence() {
    let mut h = Harness::registered(true);
    h.open_started("s1");
    h.open_started("s2");
    h.auto_pop = false;
    for i in 0..RING as u8 {
        h.feed(&data_json("s1", 2, &[i])).unwrap();
    }
    let refused = data_json("s1", 2, &[RING as u8]);
    assert_eq!(h.feed(&refused), Err(TunnelError::Blocked));
    h.drive();
    assert!(h.take_events().contains(&Event::PauseTunnelReads));
    let paused_at = h.now;
    assert_eq!(
        h.gw.poll_timeout()
            .map(|t| t <= paused_at + Duration::from_secs(30)),
        Some(true)
    );

    // 29 s: still paused, nothing closed.
    h.now = paused_at + Duration::from_secs(29);
    h.gw.handle_timeout(h.now);
    h.drive();
    assert!(
        !h.take_events()
            .iter()
            .any(|e| matches!(e, Event::ResumeTunnelReads | Event::TunnelDead))
    );
    // 30 s: s1 alone is closed on both sides with a reason; reading resumes.
    h.now = paused_at + Duration::from_secs(30);
    h.gw.handle_timeout(h.now);
    h.drive();
    let events = h.take_events();
    assert!(events.contains(&Event::ResumeTunnelReads), "{events:?}");
    let sent = h.take_sent();
    let close = sent
        .iter()
        .find(|s| s.kind == "proxy_websocket_close")
        .expect("the agent is told");
    assert_eq!(
        (close.stream_id.as_deref(), close.code),
        (Some("s1"), Some(1008))
    );
    assert!(
        close.reason.as_deref().unwrap().contains("stalled"),
        "{close:?}"
    );
    assert_eq!(h.gw.stats().stalled_streams_closed, 1);
    // The refused message, handed in again, is dropped quietly; s2 flows.
    assert!(h.feed(&refused).is_ok());
    h.feed(&data_json("s2", 2, b"still here")).unwrap();
    h.pop_all("s2");
    assert_eq!(
        h.received("s2"),
        [(MessageKind::Binary, b"still here".to_vec())]
    );
    // s1's client still gets what was queued, then the close with the reason.
    h.pop_all("s1");
    h.drive();
    assert_eq!(h.received("s1").len(), RING);
    assert!(h.take_events().iter().any(|e| matches!(e,
        Event::Closed { stream, close } if *stream == sid("s1") && close.code == 1008)));
}

#[test]
fn a_paused_reader_never_declares_the_tunnel_dead() {
    let config = Config {
        pause_limit: Duration::from_secs(600),
        ..Config::default()
    };
    let mut h = Harness::with_config(config);
    h.feed(&register_json(true)).unwrap();
    h.drive();
    h.open_started("s1");
    h.auto_pop = false;
    for i in 0..RING as u8 {
        h.feed(&data_json("s1", 2, &[i])).unwrap();
    }
    assert_eq!(h.feed(&data_json("s1", 2, b"x")), Err(TunnelError::Blocked));
    let start = h.now;
    for s in (10..=120).step_by(10) {
        h.now = start + Duration::from_secs(s);
        h.gw.handle_timeout(h.now);
        h.drive();
        assert!(
            !h.take_events().contains(&Event::TunnelDead),
            "dead at {s} s while paused"
        );
    }
    // Once reading resumes, silence counts again.
    h.pop_all("s1");
    h.drive();
    h.now += Duration::from_secs(61);
    h.gw.handle_timeout(h.now);
    h.drive();
    assert!(h.take_events().contains(&Event::TunnelDead));
}

#[test]
fn full_agent_ring_stops_reading_that_client_only() {
    let mut h = Harness::registered(true);
    h.open_started("s1");
    let mut refused = None;
    for i in 0..=RING as u8 {
        if let Err(e) =
            h.gw.handle_client_message(h.now, "s1", MessageKind::Binary, Bytes(vec![i]))
        {
            refused = Some(e);
            break;
        }
    }
    assert!(matches!(refused, Some(SendError::Full(Bytes(ref b))) if b[..] == [RING as u8]));
    assert_eq!(h.gw.poll_event(), Some(Event::StopReadingClient(sid("s1"))));
    h.drive();
    assert_eq!(h.take_events(), [Event::ResumeReadingClient(sid("s1"))]);
    assert_eq!(h.take_sent().len(), RING);
}

#[test]
fn open_errors() {
    let mut h = Harness::new();
    assert_eq!(h.open("s1"), Err(OpenError::NotRegistered));
    let mut h = Harness::registered(true);
    h.open("s1").unwrap();
    assert_eq!(h.open("s1"), Err(OpenError::DuplicateStream));
    let bad_path = StreamRequest {
        id: "s2",
        path: "/api/../etc/passwd",
        query: "",
        headers: &(),
        protocols: "",
        upgrade: None,
        user: None,
        groups: &[],
    };
    assert_eq!(
        h.gw.open_stream(h.now, EPOCH, &bad_path, &mut h.scratch),
        Err(OpenError::Request(RequestError::Path))
    );
    let injected = StreamRequest {
        id: "s2",
        path: EXEC,
        query: "",
        headers: &[("X-Evil", "a\r\nHost: x")],
        protocols: "",
        upgrade: None,
        user: None,
        groups: &[],
    };
    assert_eq!(
        h.gw.open_stream(h.now, EPOCH, &injected, &mut h.scratch),
        Err(OpenError::Request(RequestError::HeaderValue))
    );
    let bad_user = StreamRequest {
        user: Some("eve\nImpersonate-Group: x"),
        groups: &[],
        headers: &(),
        ..injected
    };
    assert_eq!(
        h.gw.open_stream(h.now, EPOCH, &bad_user, &mut h.scratch),
        Err(OpenError::Request(RequestError::HeaderValue))
    );
    for id in ["s2", "s3", "s4"] {
        h.open(id).unwrap();
    }
    assert_eq!(h.open("s5"), Err(OpenError::TooManyStreams));
}

#[test]
fn tunnel_lost_ends_every_stream_with_an_error() {
    let mut h = Harness::registered(true);
    h.open_started("s1");
    h.open("s2").unwrap();
    h.request("r1").unwrap();
    h.feed(r#"{"type":"proxy_response_header","request_id":"r1","payload":{"status":200}}"#)
        .unwrap();
    h.auto_pop = false;
    h.feed(&data_json("s1", 2, b"last words")).unwrap();
    h.drive();
    h.take_events();
    h.take_sent();
    h.gw.handle_tunnel_lost(h.now, "replaced by a newer agent connection");
    h.auto_pop = true;
    // The client was told DataForClient before and pops what is left.
    h.pop_all("s1");
    h.drive();
    let events = h.take_events();
    assert!(events.contains(&Event::Closed {
        stream: sid("s1"),
        close: Close::new(1011, "replaced by a newer agent connection")
    }));
    assert!(events.contains(&Event::Failed {
        stream: sid("s2"),
        status: 502,
        message: s("replaced by a newer agent connection")
    }));
    assert!(events.contains(&Event::ResponseAbort {
        stream: sid("r1"),
        message: s("replaced by a newer agent connection")
    }));
    assert_eq!(
        h.received("s1"),
        [(MessageKind::Binary, b"last words".to_vec())]
    );
    assert!(h.take_sent().is_empty());
    assert_eq!(h.gw.stream_count(), 0);
    assert!(!h.gw.is_registered());
}

#[test]
fn timers_ping_read_deadline_start_timeout() {
    let mut h = Harness::registered(true);
    h.open("s1").unwrap();
    h.take_sent();
    // A quiet agent is pinged after 25 s.
    h.now += Duration::from_secs(25);
    h.gw.handle_timeout(h.now);
    h.drive();
    assert_eq!(h.take_events(), [Event::SendPing]);
    // The start unanswered for 45 s fails; the agent heard from at 45 s is not pinged at 69 s.
    h.now += Duration::from_secs(20);
    h.gw.handle_tunnel_activity(h.now);
    h.gw.handle_timeout(h.now);
    h.drive();
    let events = h.take_events();
    assert!(events.contains(&Event::Failed {
        stream: sid("s1"),
        status: 504,
        message: s("the agent did not answer in time")
    }));
    let sent = h.take_sent();
    assert_eq!(sent[0].kind, "proxy_websocket_close");
    assert_eq!(h.gw.stream_count(), 0);
    h.now += Duration::from_secs(24);
    h.gw.handle_timeout(h.now);
    h.drive();
    assert!(!h.take_events().contains(&Event::SendPing));
    h.now += Duration::from_secs(1);
    h.gw.handle_timeout(h.now);
    h.drive();
    assert!(h.take_events().contains(&Event::SendPing));
    h.now += Duration::from_secs(36);
    h.gw.handle_timeout(h.now);
    h.drive();
    assert!(h.take_events().contains(&Event::TunnelDead));
}

#[test]
fn heartbeat_is_acknowledged() {
    let mut h = Harness::registered(true);
    h.feed(r#"{"type":"heartbeat","payload":{"cluster_id":"c1","status":"healthy"}}"#)
        .unwrap();
    h.drive();
    assert_eq!(h.take_sent()[0].kind, "heartbeat_ack");
    assert_eq!(
        h.feed(r#"{"type":"protocol_fallback","payload":{"unknown_type":"x"}}"#),
        Ok(Got::Other("protocol_fallback".into()))
    );
}

// -------------------------------------------------------------------------------------------------
// Pair: the agent relay and the gateway against each other, in memory.

mod pair {
    use super::*;
    use crate::relay::{self, Relay, SessionInfo};

    type AgentRelay = Relay<Bytes, 4, RING>;

    struct Pair {
        now: Instant,
        relay: AgentRelay,
        gw: TestGateway,
        scratch: Vec<u8>,
        /// What the fake kube-apiserver received per stream.
        upstream: BTreeMap<String, Vec<(MessageKind, Vec<u8>)>>,
        /// Upstream dials the relay asked for: (stream, path, offered protocol).
        dials: Vec<(String, String, Option<String>)>,
        closes_upstream: Vec<(String, Close)>,
        /// TCP dials the relay asked for: (tunnel, host, port).
        tcp_dials: Vec<(String, String, u16)>,
        client: BTreeMap<String, Vec<(MessageKind, Vec<u8>)>>,
        events: Vec<Event>,
        /// Every tunnel frame, both ways, in order.
        frames: Vec<Vec<u8>>,
    }

    impl Pair {
        fn new() -> Self {
            Self::with_extensions(Extensions::ALL)
        }

        /// A pair whose agent offers `extensions` (the control plane offers them all).
        fn with_extensions(extensions: Extensions) -> Self {
            let now = Instant::from_secs(5);
            let config = relay::Config {
                extensions,
                ..relay::Config::default()
            };
            let mut relay = AgentRelay::new(config);
            relay.start_session(now, SessionInfo::new("a1", "edge", "0.1.0"));
            let mut p = Self {
                now,
                relay,
                gw: Gateway::new(Config::default(), "c1", now),
                scratch: vec![0; 1 << 16],
                upstream: BTreeMap::new(),
                dials: Vec::new(),
                closes_upstream: Vec::new(),
                tcp_dials: Vec::new(),
                client: BTreeMap::new(),
                events: Vec::new(),
                frames: Vec::new(),
            };
            p.run();
            p
        }

        /// Tunnel frames that are native data frames, and those that are `tcp_tunnel_data`.
        fn tcp_framing(&self) -> (usize, usize) {
            let native = self
                .frames
                .iter()
                .filter(|f| crate::wire::native::is_data(f))
                .count();
            let compat = self
                .frames
                .iter()
                .filter(|f| f.windows(17).any(|w| w == b"\"tcp_tunnel_data\""))
                .count();
            (native, compat)
        }

        /// Moves messages both ways until nothing moves.
        fn run(&mut self) {
            let mut buf = vec![0u8; 1 << 17];
            loop {
                let mut moved = false;
                // Agent -> control plane.
                while let Some(n) = self.relay.poll_transmit(self.now, EPOCH, &mut buf).unwrap() {
                    let frame = buf[..n].to_vec();
                    self.frames.push(frame.clone());
                    match self
                        .gw
                        .handle_tunnel_message(self.now, &frame, &mut self.scratch)
                    {
                        Ok(_) => {}
                        Err(e) => {
                            panic!("gateway refused {}: {e}", String::from_utf8_lossy(&frame))
                        }
                    }
                    moved = true;
                }
                // Control plane -> agent.
                while let Some(n) = self.gw.poll_transmit(self.now, EPOCH, &mut buf).unwrap() {
                    let frame = buf[..n].to_vec();
                    self.frames.push(frame.clone());
                    let handled = self
                        .relay
                        .handle_tunnel_message(self.now, &frame, &mut self.scratch)
                        .unwrap_or_else(|e| {
                            panic!("relay refused {}: {e}", String::from_utf8_lossy(&frame))
                        });
                    match handled {
                        relay::Handled::Start(start) => self.dials.push((
                            start.stream.to_string(),
                            start.path.to_string(),
                            start.protocol.map(|p| p.to_string()),
                        )),
                        relay::Handled::Other(env, crate::wire::Inbound::TcpTunnelStart(start)) => {
                            let req = self.relay.start_tcp_tunnel(self.now, &env, &start).unwrap();
                            self.tcp_dials.push((
                                req.tunnel.to_string(),
                                req.host.to_string(),
                                req.port,
                            ));
                        }
                        _ => {}
                    }
                    moved = true;
                }
                while let Some(event) = self.relay.poll_event() {
                    match event {
                        relay::Event::DataForUpstream(id) => {
                            while let Some(m) = self.relay.pop_upstream(id.as_str()) {
                                self.upstream
                                    .entry(id.to_string())
                                    .or_default()
                                    .push((m.kind, m.payload.0));
                            }
                        }
                        relay::Event::CloseUpstream { stream, close } => {
                            self.relay
                                .handle_upstream_closed(
                                    self.now,
                                    stream.as_str(),
                                    close.code,
                                    &close.reason,
                                )
                                .unwrap();
                            self.closes_upstream.push((stream.to_string(), close));
                        }
                        _ => {}
                    }
                    moved = true;
                }
                while let Some(event) = self.gw.poll_event() {
                    if let Event::DataForClient(id) = &event {
                        while let Some(m) = self.gw.pop_client(id.as_str()) {
                            self.client
                                .entry(id.to_string())
                                .or_default()
                                .push((m.kind, m.payload.0));
                        }
                    }
                    self.events.push(event);
                    moved = true;
                }
                if !moved {
                    break;
                }
            }
        }
    }

    #[test]
    fn start_started_data_both_ways_close_1000() {
        let mut p = Pair::new();
        assert!(p.gw.is_registered());
        assert_eq!(p.relay.extensions(), Extensions::ALL);
        assert_eq!(p.gw.extensions(), Extensions::ALL);
        assert!(matches!(p.events[..], [Event::Registered { .. }]));
        p.events.clear();

        let req = StreamRequest {
            id: "s1",
            path: EXEC,
            query: "command=sh&stdin=true&stdout=true",
            headers: &KUBECTL_HEADERS,
            protocols: "v5.channel.k8s.io",
            upgrade: None,
            user: Some("alice"),
            groups: &[],
        };
        p.gw.open_stream(p.now, EPOCH, &req, &mut p.scratch)
            .unwrap();
        p.run();
        assert_eq!(
            p.dials,
            [(
                "s1".to_string(),
                EXEC.to_string(),
                Some("v5.channel.k8s.io".to_string())
            )]
        );
        assert!(p.events.is_empty(), "no 101 before the upstream's");

        p.relay
            .handle_upstream_started(p.now, "s1", Some("v5.channel.k8s.io"))
            .unwrap();
        p.run();
        assert_eq!(
            p.events,
            [Event::Started {
                stream: sid("s1"),
                subprotocol: s("v5.channel.k8s.io")
            }]
        );
        p.events.clear();

        // kubectl -> apiserver: stdin on channel 0.
        p.gw.handle_client_message(
            p.now,
            "s1",
            MessageKind::Binary,
            Bytes(b"\x00echo hi\n".to_vec()),
        )
        .unwrap();
        p.run();
        assert_eq!(
            p.upstream["s1"],
            [(MessageKind::Binary, b"\x00echo hi\n".to_vec())]
        );

        // apiserver -> kubectl: stdout, then the status on channel 3, then close 1000.
        for m in [&b"\x01hi\n"[..], b"\x03{\"status\":\"Success\"}"] {
            p.relay
                .handle_upstream_message(p.now, "s1", MessageKind::Binary, Bytes(m.to_vec()))
                .unwrap();
        }
        p.relay
            .handle_upstream_closed(p.now, "s1", 1000, "")
            .unwrap();
        p.run();
        assert_eq!(
            p.client["s1"],
            [
                (MessageKind::Binary, b"\x01hi\n".to_vec()),
                (
                    MessageKind::Binary,
                    b"\x03{\"status\":\"Success\"}".to_vec()
                )
            ]
        );
        assert_eq!(
            p.events,
            [
                Event::DataForClient(sid("s1")),
                Event::Closed {
                    stream: sid("s1"),
                    close: Close::new(1000, "")
                }
            ]
        );
        assert_eq!(p.gw.stream_count(), 0);
        assert_eq!(p.relay.stream_count(), 0);
    }

    #[test]
    fn refused_upstream_and_client_close() {
        let mut p = Pair::new();
        let req = |id| StreamRequest {
            id,
            path: EXEC,
            query: "",
            headers: &(),
            protocols: "v5.channel.k8s.io",
            upgrade: None,
            user: Some("alice"),
            groups: &[],
        };
        p.gw.open_stream(p.now, EPOCH, &req("s1"), &mut p.scratch)
            .unwrap();
        p.run();
        p.relay
            .handle_upstream_failed(p.now, "s1", 403, "pods \"demo\" is forbidden")
            .unwrap();
        p.run();
        assert!(matches!(p.events[1..], [Event::Failed { status: 403, .. }]));
        assert_eq!((p.gw.stream_count(), p.relay.stream_count()), (0, 0));

        p.events.clear();
        p.gw.open_stream(p.now, EPOCH, &req("s2"), &mut p.scratch)
            .unwrap();
        p.run();
        p.relay
            .handle_upstream_started(p.now, "s2", Some("v5.channel.k8s.io"))
            .unwrap();
        p.run();
        p.gw.handle_client_message(
            p.now,
            "s2",
            MessageKind::Binary,
            Bytes(b"\xff\x00".to_vec()),
        )
        .unwrap();
        p.gw.handle_client_closed(p.now, "s2", Some(Close::new(1000, "")))
            .unwrap();
        p.run();
        assert_eq!(
            p.upstream["s2"],
            [(MessageKind::Binary, b"\xff\x00".to_vec())]
        );
        assert_eq!(
            p.closes_upstream,
            [("s2".to_string(), Close::new(1000, ""))]
        );
        assert_eq!((p.gw.stream_count(), p.relay.stream_count()), (0, 0));
    }

    #[test]
    fn tcp_through_the_agent_relay_on_native_frames() {
        let p = tcp_through_the_agent_relay(Extensions::ALL);
        assert!(p.relay.extensions().native_tcp && p.gw.extensions().native_tcp);
        let (native, compat) = p.tcp_framing();
        assert!(native >= 3, "tunnel bytes travel as native data frames");
        assert_eq!(compat, 0, "no base64 JSON for tunnel bytes");
    }

    #[test]
    fn tcp_through_the_agent_relay_in_compat_frames() {
        for extensions in [
            Extensions {
                native_tcp: false,
                ..Extensions::ALL
            },
            Extensions::NONE,
        ] {
            let p = tcp_through_the_agent_relay(extensions);
            assert!(!p.gw.extensions().native_tcp);
            let (native, compat) = p.tcp_framing();
            assert_eq!(native, 0, "{extensions:?}");
            assert!(compat >= 3, "{extensions:?}");
        }
    }

    /// Data both ways, a client close, a dial failure and a service close through a pair whose
    /// agent offers `extensions`.
    fn tcp_through_the_agent_relay(extensions: Extensions) -> Pair {
        let mut p = Pair::with_extensions(extensions);
        p.events.clear();
        let open = |id| TcpOpen {
            id,
            host: "db.internal",
            port: 5432,
            client_addr: Some("127.0.0.1:40000"),
        };
        p.gw.open_tcp(p.now, EPOCH, &open("t1"), &mut p.scratch)
            .unwrap();
        p.run();
        assert_eq!(
            p.tcp_dials,
            [("t1".to_string(), "db.internal".to_string(), 5432)]
        );
        assert!(p.relay.is_tcp_tunnel("t1"));
        p.relay.handle_upstream_started(p.now, "t1", None).unwrap();
        // Client -> service, in order.
        for chunk in [&b"SELECT "[..], b"1;"] {
            p.gw.handle_client_message(p.now, "t1", MessageKind::Binary, Bytes(chunk.to_vec()))
                .unwrap();
        }
        p.run();
        let up: Vec<u8> = p.upstream["t1"]
            .iter()
            .flat_map(|(_, b)| b.clone())
            .collect();
        assert_eq!(up, b"SELECT 1;");
        // Service -> client.
        p.relay
            .handle_upstream_message(p.now, "t1", MessageKind::Binary, Bytes(b"1 row".to_vec()))
            .unwrap();
        p.run();
        assert_eq!(p.client["t1"], [(MessageKind::Binary, b"1 row".to_vec())]);
        // Client EOF: the relay closes the service socket; both sides free the tunnel.
        p.gw.handle_client_closed(p.now, "t1", Some(Close::new(1000, "")))
            .unwrap();
        p.run();
        assert_eq!(p.closes_upstream.len(), 1);
        assert_eq!(p.closes_upstream[0].0, "t1");
        assert_eq!((p.gw.stream_count(), p.relay.stream_count()), (0, 0));

        // The agent cannot dial: the client is closed with its error.
        p.events.clear();
        p.gw.open_tcp(p.now, EPOCH, &open("t2"), &mut p.scratch)
            .unwrap();
        p.run();
        p.relay
            .handle_upstream_failed(p.now, "t2", 502, "connection refused")
            .unwrap();
        p.run();
        let closed = p.events.iter().find_map(|e| match e {
            Event::Closed { stream, close } if stream.as_str() == "t2" => Some(close.clone()),
            _ => None,
        });
        let closed = closed.expect("the client of t2 is closed");
        assert_eq!(closed.code, 1011);
        assert!(closed.reason.starts_with("connection_failed"), "{closed:?}");
        assert!(closed.reason.contains("connection refused"), "{closed:?}");
        assert_eq!((p.gw.stream_count(), p.relay.stream_count()), (0, 0));

        // The service closes: its last bytes, then a clean close.
        p.events.clear();
        p.gw.open_tcp(p.now, EPOCH, &open("t3"), &mut p.scratch)
            .unwrap();
        p.run();
        p.relay.handle_upstream_started(p.now, "t3", None).unwrap();
        p.relay
            .handle_upstream_message(p.now, "t3", MessageKind::Binary, Bytes(b"bye".to_vec()))
            .unwrap();
        p.relay
            .handle_tcp_closed(p.now, "t3", relay::TcpCloseReason::ServiceClosed, "")
            .unwrap();
        p.run();
        assert_eq!(p.client["t3"], [(MessageKind::Binary, b"bye".to_vec())]);
        assert_eq!(
            p.events[1..],
            [
                Event::DataForClient(sid("t3")),
                Event::Closed {
                    stream: sid("t3"),
                    close: Close::new(1000, "service_closed")
                }
            ]
        );
        assert_eq!((p.gw.stream_count(), p.relay.stream_count()), (0, 0));
        p
    }
}

// -------------------------------------------------------------------------------------------------
// Raw TCP streams

mod tcp {
    use super::*;

    fn tcp_data_json(id: &str, payload: &[u8]) -> String {
        format!(
            r#"{{"type":"tcp_tunnel_data","request_id":"{id}","payload":{{"data":"{}","direction":"agent_to_gateway"}}}}"#,
            b64(payload)
        )
    }

    fn tcp_close_json(id: &str, reason: &str, error: Option<&str>) -> String {
        let error = error
            .map(|e| format!(r#","error":"{e}""#))
            .unwrap_or_default();
        format!(
            r#"{{"type":"tcp_tunnel_close","request_id":"{id}","payload":{{"reason":"{reason}"{error}}}}}"#
        )
    }

    fn open_tcp(h: &mut Harness, id: &str) -> Result<(), OpenError> {
        let req = TcpOpen {
            id,
            host: "127.0.0.1",
            port: 5432,
            client_addr: Some("127.0.0.1:40000"),
        };
        let r = h.gw.open_tcp(h.now, EPOCH, &req, &mut h.scratch);
        h.drive();
        r
    }

    /// The raw payload of a `tcp_tunnel_data` the gateway sent.
    fn tcp_bytes(sent: &Sent) -> Vec<u8> {
        let env = Envelope::parse(sent.raw.as_bytes()).unwrap();
        let b = env.payload.get("data").unwrap().as_str().unwrap();
        let mut out = vec![0u8; 1 << 16];
        Base64Str(b).decode_into(&mut out).unwrap().to_vec()
    }

    #[test]
    fn golden_tcp_start_and_started_at_once() {
        let mut h = Harness::registered(true);
        open_tcp(&mut h, "t1").unwrap();
        let sent = h.take_sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(
            sent[0].raw,
            format!(
                r#"{{"type":"tcp_tunnel_start","request_id":"t1","payload":{{"tunnel_id":"t1","service_name":"127.0.0.1","service_port":5432,"client_addr":"127.0.0.1:40000"}},"timestamp":"{STAMP}"}}"#
            )
        );
        assert_eq!(
            h.take_events(),
            [Event::Started {
                stream: sid("t1"),
                subprotocol: s("")
            }]
        );
        assert_eq!(h.gw.stream_state("t1"), Some(StreamState::Open));
    }

    #[test]
    fn tcp_open_errors() {
        let mut h = Harness::new();
        assert_eq!(open_tcp(&mut h, "t1"), Err(OpenError::NotRegistered));
        let mut h = Harness::registered(false);
        for (host, port) in [("", 80), ("a b", 80), ("x", 0), ("evil\"host", 1)] {
            let req = TcpOpen {
                id: "t1",
                host,
                port,
                client_addr: None,
            };
            assert_eq!(
                h.gw.open_tcp(h.now, EPOCH, &req, &mut h.scratch),
                Err(OpenError::TcpTarget)
            );
        }
        assert_eq!(h.gw.stream_count(), 0);
        open_tcp(&mut h, "t1").unwrap();
        assert_eq!(open_tcp(&mut h, "t1"), Err(OpenError::DuplicateStream));
    }

    #[test]
    fn tcp_data_both_ways_in_order_then_client_eof() {
        let mut h = Harness::registered(true);
        open_tcp(&mut h, "t1").unwrap();
        h.take_sent();
        h.take_events();
        h.client_send("t1", MessageKind::Binary, b"hello ").unwrap();
        h.client_send("t1", MessageKind::Binary, b"world").unwrap();
        let sent = h.take_sent();
        assert!(sent.iter().all(|s| s.kind == "tcp_tunnel_data"));
        let bytes: Vec<u8> = sent.iter().flat_map(tcp_bytes).collect();
        assert_eq!(bytes, b"hello world");
        assert_eq!(
            sent[0].raw,
            format!(
                r#"{{"type":"tcp_tunnel_data","request_id":"t1","payload":{{"tunnel_id":"t1","data":"aGVsbG8g"}},"timestamp":"{STAMP}"}}"#
            )
        );
        assert_eq!(h.feed(&tcp_data_json("t1", b"back")), Ok(Got::Consumed));
        assert_eq!(h.feed(&tcp_data_json("t1", b" again")), Ok(Got::Consumed));
        h.drive();
        assert_eq!(
            h.received("t1"),
            [
                (MessageKind::Binary, b"back".to_vec()),
                (MessageKind::Binary, b" again".to_vec())
            ]
        );
        // EOF from the client: queued bytes first, then the close.
        h.gw.handle_client_message(h.now, "t1", MessageKind::Binary, Bytes(b"last".to_vec()))
            .unwrap();
        h.gw.handle_client_closed(h.now, "t1", Some(Close::new(1000, "")))
            .unwrap();
        h.drive();
        let sent = h.take_sent();
        assert_eq!(
            sent.iter().map(|s| s.kind.as_str()).collect::<Vec<_>>(),
            ["tcp_tunnel_data", "tcp_tunnel_close"]
        );
        assert_eq!(tcp_bytes(&sent[0]), b"last");
        assert_eq!(sent[1].reason.as_deref(), Some("client_closed"));
        assert_eq!(h.gw.stream_count(), 0);
    }

    #[test]
    fn tcp_dial_failure_closes_the_client_with_the_agents_error() {
        let mut h = Harness::registered(true);
        open_tcp(&mut h, "t1").unwrap();
        h.take_events();
        h.take_sent();
        let json = tcp_close_json("t1", "connection_failed", Some("connection refused"));
        assert_eq!(h.feed(&json), Ok(Got::Consumed));
        h.drive();
        assert_eq!(
            h.take_events(),
            [Event::Closed {
                stream: sid("t1"),
                close: Close::new(1011, "connection_failed: connection refused")
            }]
        );
        assert!(
            h.take_sent().is_empty(),
            "never answer a close with a close"
        );
        assert_eq!(h.gw.stream_count(), 0);
        // A late message for it is dropped quietly.
        assert_eq!(h.feed(&tcp_data_json("t1", b"x")), Ok(Got::Consumed));
    }

    #[test]
    fn tcp_service_close_delivers_queued_bytes_first() {
        let mut h = Harness::registered(true);
        open_tcp(&mut h, "t1").unwrap();
        h.take_events();
        h.auto_pop = false;
        assert_eq!(h.feed(&tcp_data_json("t1", b"tail")), Ok(Got::Consumed));
        assert_eq!(
            h.feed(&tcp_close_json("t1", "service_closed", None)),
            Ok(Got::Consumed)
        );
        h.drive();
        assert_eq!(h.take_events(), [Event::DataForClient(sid("t1"))]);
        h.pop_all("t1");
        h.drive();
        assert_eq!(h.received("t1"), [(MessageKind::Binary, b"tail".to_vec())]);
        assert_eq!(
            h.take_events(),
            [Event::Closed {
                stream: sid("t1"),
                close: Close::new(1000, "service_closed")
            }]
        );
    }

    #[test]
    fn tcp_backpressure_both_ways_never_drops() {
        let mut h = Harness::registered(true);
        open_tcp(&mut h, "t1").unwrap();
        h.take_events();
        h.take_sent();
        // Toward the agent: fill the ring without transmitting.
        let mut refused = None;
        for i in 0..=RING {
            let r = h.gw.handle_client_message(
                h.now,
                "t1",
                MessageKind::Binary,
                Bytes(vec![i as u8; 10]),
            );
            if let Err(SendError::Full(b)) = r {
                refused = Some((i, b));
                break;
            }
        }
        let (i, payload) = refused.expect("the ring fills up");
        assert_eq!(i, RING);
        assert_eq!(h.gw.poll_event(), Some(Event::StopReadingClient(sid("t1"))));
        h.drive();
        let resumed = h.take_events();
        assert!(resumed.contains(&Event::ResumeReadingClient(sid("t1"))));
        h.client_send("t1", MessageKind::Binary, &payload.0)
            .unwrap();
        let sent: Vec<Vec<u8>> = h.take_sent().iter().map(tcp_bytes).collect();
        assert_eq!(sent.len(), RING + 1);
        for (n, b) in sent.iter().enumerate() {
            assert_eq!(b, &vec![n as u8; 10]);
        }
        // Toward the client: a full ring pauses the tunnel, the refused message is not consumed.
        h.auto_pop = false;
        for i in 0..RING {
            assert_eq!(h.feed(&tcp_data_json("t1", &[i as u8])), Ok(Got::Consumed));
        }
        let blocked = tcp_data_json("t1", &[RING as u8]);
        assert_eq!(h.feed(&blocked), Err(TunnelError::Blocked));
        h.drive();
        assert!(h.take_events().contains(&Event::PauseTunnelReads));
        h.pop_all("t1");
        h.drive();
        assert!(h.take_events().contains(&Event::ResumeTunnelReads));
        assert_eq!(h.feed(&blocked), Ok(Got::Consumed));
        h.pop_all("t1");
        let got: Vec<u8> = h.received("t1").into_iter().flat_map(|(_, b)| b).collect();
        assert_eq!(got, (0..=RING as u8).collect::<Vec<_>>());
    }

    #[test]
    fn tcp_tunnel_lost_closes_with_an_error_and_bad_data_closes_both_sides() {
        let mut h = Harness::registered(true);
        open_tcp(&mut h, "t1").unwrap();
        open_tcp(&mut h, "t2").unwrap();
        h.take_events();
        h.take_sent();
        let bad = r#"{"type":"tcp_tunnel_data","request_id":"t2","payload":{"data":"!!"}}"#;
        assert!(h.feed(bad).is_err());
        h.drive();
        let sent = h.take_sent();
        assert!(
            sent.iter().any(
                |s| s.kind == "tcp_tunnel_close" && s.reason.as_deref() == Some("client_error")
            )
        );
        assert!(h.take_events().contains(&Event::Closed {
            stream: sid("t2"),
            close: Close::new(1002, "invalid tcp_tunnel_data")
        }));
        h.gw.handle_tunnel_lost(h.now, "agent gone");
        h.drive();
        assert_eq!(
            h.take_events(),
            [Event::Closed {
                stream: sid("t1"),
                close: Close::new(1011, "agent gone")
            }]
        );
        assert_eq!(h.gw.stream_count(), 0);
    }
}

#[test]
fn groups_follow_the_user_and_are_checked() {
    let mut h = Harness::registered(true);
    let req = StreamRequest {
        id: "s1",
        path: EXEC,
        query: "command=sh",
        headers: &[("Impersonate-Group", "system:masters")],
        protocols: "v5.channel.k8s.io",
        upgrade: None,
        user: Some("alice"),
        groups: &["dev", "system:authenticated"],
    };
    h.gw.open_stream(h.now, EPOCH, &req, &mut h.scratch)
        .unwrap();
    h.drive();
    let sent = h.take_sent();
    assert!(
        sent[0].raw.contains(
            r#""headers":{"Impersonate-User":["alice"],"Impersonate-Group":["dev","system:authenticated"]}"#
        ),
        "{}",
        sent[0].raw
    );
    // Groups go only with a user: Kubernetes refuses them alone, and no user means no
    // impersonation at all.
    let anonymous = StreamRequest {
        id: "s2",
        user: None,
        ..req
    };
    h.gw.open_stream(h.now, EPOCH, &anonymous, &mut h.scratch)
        .unwrap();
    h.drive();
    let sent = h.take_sent();
    assert!(!sent[0].raw.contains("Impersonate"), "{}", sent[0].raw);
    for group in ["", "dev\r\nHost: x"] {
        let bad = StreamRequest {
            id: "s3",
            groups: &[group],
            ..req
        };
        assert_eq!(
            h.gw.open_stream(h.now, EPOCH, &bad, &mut h.scratch),
            Err(OpenError::Request(RequestError::HeaderValue))
        );
    }
}
