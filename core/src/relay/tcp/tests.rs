//! TCP tunnel scenarios: a driver plays the control plane (feeds `tcp_tunnel_*` envelopes, decodes
//! what the relay transmits) and a fake socket (pops bytes, reports dials and closes).

use std::format;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use super::super::*;
use crate::time::Duration;
use crate::wire::{Base64Str, Envelope, Inbound};

/// Small inline buffers so tunnel data is split into several pieces.
type Buf = heapless::Vec<u8, 16>;
const RING: usize = 8;
type TcpRelay = Relay<Buf, 4, RING>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Sent {
    kind: String,
    request_id: Option<String>,
    data: Option<Vec<u8>>,
    reason: Option<String>,
    error: Option<String>,
    bytes_sent: Option<u64>,
    bytes_received: Option<u64>,
    duration_ms: Option<u64>,
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
        Base64Str(b64).decode_into(&mut out).unwrap().to_vec()
    });
    Sent {
        kind: env.type_name.to_string(),
        request_id: env.request_id.map(|r| r.to_string()),
        data,
        reason: s("reason"),
        error: s("error"),
        bytes_sent: n("bytes_sent"),
        bytes_received: n("bytes_received"),
        duration_ms: n("duration_ms"),
    }
}

fn b64(raw: &[u8]) -> String {
    let mut out = vec![0u8; crate::wire::b64::encoded_len(raw.len())];
    let n = crate::wire::b64::encode(raw, &mut out).unwrap();
    String::from_utf8(out[..n].to_vec()).unwrap()
}

fn start_json(id: &str, host: &str, port: u16) -> String {
    format!(
        r#"{{"type":"tcp_tunnel_start","request_id":"{id}","timestamp":"2026-11-26T10:00:00Z","payload":{{"tunnel_id":"{id}","service_name":"{host}","service_port":{port},"client_addr":"10.0.0.9:5000"}}}}"#
    )
}

fn data_json(id: &str, bytes: &[u8]) -> String {
    format!(
        r#"{{"type":"tcp_tunnel_data","request_id":"{id}","payload":{{"data":"{}"}}}}"#,
        b64(bytes)
    )
}

fn close_json(id: &str) -> String {
    format!(
        r#"{{"type":"tcp_tunnel_close","request_id":"{id}","payload":{{"reason":"client_closed"}}}}"#
    )
}

struct Harness {
    relay: TcpRelay,
    now: Instant,
    scratch: Vec<u8>,
    sent: Vec<Sent>,
    events: Vec<Event>,
    /// Bytes the fake socket received, per tunnel.
    socket: std::collections::BTreeMap<String, Vec<u8>>,
    auto_pop: bool,
}

impl Harness {
    fn new(config: Config) -> Self {
        let mut h = Self {
            relay: Relay::new(config),
            now: Instant::from_secs(1_000),
            scratch: vec![0; 1 << 16],
            sent: Vec::new(),
            events: Vec::new(),
            socket: Default::default(),
            auto_pop: true,
        };
        h.relay
            .start_session(h.now, SessionInfo::new("gw-1", "edge", "0.1.0"));
        h.drive();
        h.feed_other(
            r#"{"type":"register_success","request_id":"r1","payload":{"cluster_id":"c-1"}}"#,
        );
        h.drive();
        h.sent.clear();
        h.events.clear();
        h
    }

    fn feed(&mut self, json: &str) -> Result<Handled<'static>, TunnelError> {
        // Leak the frame: test-only, keeps the borrowed view simple.
        let frame: &'static [u8] = Vec::leak(json.as_bytes().to_vec());
        self.relay
            .handle_tunnel_message(self.now, frame, &mut self.scratch)
    }

    fn feed_other(&mut self, json: &str) {
        assert!(matches!(self.feed(json), Ok(Handled::Other(..))));
    }

    /// Feeds a start and hands it to `start_tcp_tunnel`.
    fn start(&mut self, json: &str) -> Result<(String, String, u16), TunnelError> {
        let Handled::Other(env, Inbound::TcpTunnelStart(start)) = self.feed(json)? else {
            panic!("a tcp_tunnel_start is handed to the adapter");
        };
        let req = self.relay.start_tcp_tunnel(self.now, &env, &start)?;
        Ok((req.tunnel.to_string(), req.host.to_string(), req.port))
    }

    fn open(&mut self, id: &str) {
        let (tunnel, host, port) = self.start(&start_json(id, "echo.local", 7)).unwrap();
        assert_eq!(
            (tunnel.as_str(), host.as_str(), port),
            (id, "echo.local", 7)
        );
        self.relay
            .handle_upstream_started(self.now, id, None)
            .unwrap();
        self.drive();
    }

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
            assert_eq!(m.kind, MessageKind::Binary);
            self.socket
                .entry(id.to_string())
                .or_default()
                .extend_from_slice(&m.payload);
        }
    }

    fn take_sent(&mut self) -> Vec<Sent> {
        core::mem::take(&mut self.sent)
    }

    fn take_events(&mut self) -> Vec<Event> {
        core::mem::take(&mut self.events)
    }
}

fn up(bytes: &[u8]) -> Buf {
    Buf::from_slice(bytes).unwrap()
}

fn sid(s: &str) -> StreamId {
    StreamId::new(s).unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i * 7) as u8)).collect()
}

#[test]
fn start_dial_data_both_ways_then_service_close() {
    let mut h = Harness::new(Config::default());
    h.open("t1");
    // No acknowledgement exists in the catalogue for a TCP start.
    assert!(h.take_sent().is_empty());
    assert_eq!(h.relay.stream_state("t1"), Some(StreamState::Open));
    assert!(h.relay.is_tcp_tunnel("t1"));

    // Control plane -> socket: 40 bytes split into 16-byte pieces, delivered in order.
    let down = pattern(1, 40);
    assert_eq!(h.feed(&data_json("t1", &down)), Ok(Handled::Consumed));
    h.drive();
    assert_eq!(h.socket["t1"], down);

    // Socket -> control plane.
    h.relay
        .handle_upstream_message(h.now, "t1", MessageKind::Binary, up(b"hello"))
        .unwrap();
    h.relay
        .handle_upstream_message(h.now, "t1", MessageKind::Binary, up(b" world"))
        .unwrap();
    h.drive();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|s| s.kind == "tcp_tunnel_data"));
    assert!(sent.iter().all(|s| s.request_id.as_deref() == Some("t1")));
    assert_eq!(sent[0].data.as_deref(), Some(&b"hello"[..]));
    assert_eq!(sent[1].data.as_deref(), Some(&b" world"[..]));

    // The service closes: queued bytes go first, then the close with the counters.
    h.relay
        .handle_upstream_message(h.now, "t1", MessageKind::Binary, up(b"bye"))
        .unwrap();
    h.now += Duration::from_millis(1500);
    h.relay
        .handle_tcp_closed(h.now, "t1", TcpCloseReason::ServiceClosed, "")
        .unwrap();
    h.drive();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0].data.as_deref(), Some(&b"bye"[..]));
    let close = &sent[1];
    assert_eq!(close.kind, "tcp_tunnel_close");
    assert_eq!(close.request_id.as_deref(), Some("t1"));
    assert_eq!(close.reason.as_deref(), Some("service_closed"));
    assert_eq!(close.bytes_sent, Some(14));
    assert_eq!(close.bytes_received, Some(40));
    assert_eq!(close.duration_ms, Some(1500));
    assert_eq!(close.error, None);
    assert_eq!(h.relay.stream_count(), 0);
    // A late message for the finished tunnel is dropped quietly.
    assert_eq!(h.feed(&data_json("t1", b"late")), Ok(Handled::Consumed));
    h.drive();
    assert!(h.take_sent().is_empty());
}

#[test]
fn data_before_the_dial_completes_is_queued_then_delivered() {
    let mut h = Harness::new(Config::default());
    h.start(&start_json("t1", "db", 5432)).unwrap();
    h.feed(&data_json("t1", b"early")).unwrap();
    h.drive();
    assert!(h.socket.is_empty());
    h.relay.handle_upstream_started(h.now, "t1", None).unwrap();
    h.drive();
    assert_eq!(h.socket["t1"], b"early");
}

#[test]
fn dial_failure_reports_connection_failed_with_the_error() {
    let mut h = Harness::new(Config::default());
    h.start(&start_json("t1", "db", 5432)).unwrap();
    h.relay
        .handle_upstream_failed(h.now, "t1", 502, "connection refused")
        .unwrap();
    h.drive();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].kind, "tcp_tunnel_close");
    assert_eq!(sent[0].request_id.as_deref(), Some("t1"));
    assert_eq!(sent[0].reason.as_deref(), Some("connection_failed"));
    assert_eq!(sent[0].error.as_deref(), Some("connection refused"));
    assert_eq!(h.relay.stream_count(), 0);
}

#[test]
fn dial_timeout_reports_connection_failed_and_abandons_the_dial() {
    let mut h = Harness::new(Config::default());
    h.start(&start_json("t1", "db", 5432)).unwrap();
    h.now += Duration::from_secs(31);
    h.relay.handle_timeout(h.now);
    h.drive();
    let sent = h.take_sent();
    let close = sent.iter().find(|s| s.kind == "tcp_tunnel_close").unwrap();
    assert_eq!(close.reason.as_deref(), Some("connection_failed"));
    assert_eq!(close.error.as_deref(), Some("upstream dial timed out"));
    assert!(h.take_events().iter().any(|e| matches!(
        e, Event::CloseUpstream { stream, .. } if *stream == sid("t1")
    )));
    h.relay
        .handle_tcp_closed(h.now, "t1", TcpCloseReason::ServiceClosed, "")
        .unwrap();
    h.drive();
    assert!(h.take_sent().is_empty(), "one close only");
    assert_eq!(h.relay.stream_count(), 0);
}

#[test]
fn write_error_is_reported_with_its_reason() {
    let mut h = Harness::new(Config::default());
    h.open("t1");
    h.relay
        .handle_tcp_closed(h.now, "t1", TcpCloseReason::WriteError, "broken pipe")
        .unwrap();
    h.drive();
    let sent = h.take_sent();
    assert_eq!(sent[0].reason.as_deref(), Some("write_error"));
    assert_eq!(sent[0].error.as_deref(), Some("broken pipe"));
}

#[test]
fn unknown_tunnel_data_is_answered_with_a_close_and_nothing_else_changes() {
    let mut h = Harness::new(Config::default());
    h.open("t1");
    assert_eq!(
        h.feed(&data_json("nope", b"x")),
        Err(TunnelError::UnknownStream)
    );
    // A close for an unknown tunnel is reported, never answered with a close.
    assert_eq!(h.feed(&close_json("nope")), Err(TunnelError::UnknownStream));
    h.drive();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0].kind, "tcp_tunnel_close");
    assert_eq!(sent[0].request_id.as_deref(), Some("nope"));
    assert_eq!(sent[0].reason.as_deref(), Some("tunnel_not_found"));
    assert_eq!(sent[1].kind, "proxy_error");
    // The live tunnel is untouched.
    h.feed(&data_json("t1", b"ok")).unwrap();
    h.drive();
    assert_eq!(h.socket["t1"], b"ok");
}

#[test]
fn websocket_messages_never_reach_a_tunnel_and_duplicates_are_refused() {
    let mut h = Harness::new(Config::default());
    h.open("t1");
    let ws = r#"{"type":"proxy_websocket_data","request_id":"t1","payload":{"stream_id":"t1","data":"AWhp"}}"#;
    assert_eq!(h.feed(ws), Err(TunnelError::UnknownStream));
    assert_eq!(
        h.start(&start_json("t1", "other", 1)),
        Err(TunnelError::DuplicateStream)
    );
    h.drive();
    let sent = h.take_sent();
    assert!(sent.iter().all(|s| s.kind == "proxy_error"), "{sent:?}");
    assert_eq!(h.relay.stream_state("t1"), Some(StreamState::Open));
    assert!(!h.socket.contains_key("t1"));
}

#[test]
fn refused_starts_are_answered() {
    let mut h = Harness::new(Config::default());
    // No port anywhere.
    let no_port = r#"{"type":"tcp_tunnel_start","request_id":"a","payload":{"tunnel_id":"a"}}"#;
    assert!(h.start(no_port).is_err());
    // A host with characters no host has.
    assert!(h.start(&start_json("b", "evil host\\r\\n", 80)).is_err());
    // Defaults: localhost and the gateway port (the PipeOps agent's target).
    let gw = r#"{"type":"tcp_tunnel_start","request_id":"c","payload":{"gateway_port":8443}}"#;
    assert_eq!(h.start(gw), Ok(("c".into(), "localhost".into(), 8443)));
    h.drive();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(
        sent.iter()
            .all(|s| s.kind == "tcp_tunnel_close"
                && s.reason.as_deref() == Some("connection_failed"))
    );
    // Table full.
    for id in ["d", "e", "f"] {
        h.start(&start_json(id, "h", 1)).unwrap();
    }
    assert_eq!(
        h.start(&start_json("g", "h", 1)),
        Err(TunnelError::TooManyStreams)
    );
    h.drive();
    let sent = h.take_sent();
    assert_eq!(sent[0].request_id.as_deref(), Some("g"));
    assert_eq!(sent[0].reason.as_deref(), Some("connection_failed"));
}

#[test]
fn control_plane_close_drains_to_the_socket_then_closes_it_without_echo() {
    let mut h = Harness::new(Config::default());
    h.open("t1");
    h.auto_pop = false;
    h.feed(&data_json("t1", &pattern(3, 20))).unwrap();
    h.relay
        .handle_upstream_message(h.now, "t1", MessageKind::Binary, up(b"unsent"))
        .unwrap();
    h.feed(&close_json("t1")).unwrap();
    h.take_sent();
    h.drive();
    // The queued upstream->tunnel bytes are discarded: the control plane is done.
    assert!(h.take_sent().is_empty());
    assert!(
        !h.take_events()
            .iter()
            .any(|e| matches!(e, Event::CloseUpstream { .. })),
        "the socket gets its bytes before the close"
    );
    h.pop_all("t1");
    h.drive();
    assert_eq!(h.socket["t1"], pattern(3, 20));
    assert!(h.take_events().iter().any(|e| matches!(
        e, Event::CloseUpstream { stream, .. } if *stream == sid("t1")
    )));
    assert!(matches!(
        h.relay
            .handle_upstream_message(h.now, "t1", MessageKind::Binary, up(b"x")),
        Err(SendError::Closed(_))
    ));
    h.relay
        .handle_tcp_closed(h.now, "t1", TcpCloseReason::ServiceClosed, "")
        .unwrap();
    h.drive();
    assert!(
        h.take_sent().is_empty(),
        "no echo of the control plane's close"
    );
    assert_eq!(h.relay.stream_count(), 0);
}

#[test]
fn bad_base64_closes_the_tunnel_with_a_protocol_error() {
    let mut h = Harness::new(Config::default());
    h.open("t1");
    let bad = r#"{"type":"tcp_tunnel_data","request_id":"t1","payload":{"data":"!!!"}}"#;
    assert!(matches!(h.feed(bad), Err(TunnelError::Frame(_))));
    h.drive();
    let sent = h.take_sent();
    assert!(sent.iter().any(|s| s.kind == "proxy_error"));
    let close = sent.iter().find(|s| s.kind == "tcp_tunnel_close").unwrap();
    assert_eq!(close.reason.as_deref(), Some("protocol_error"));
    assert!(
        h.take_events()
            .iter()
            .any(|e| matches!(e, Event::CloseUpstream { .. }))
    );
}

#[test]
fn data_that_can_never_fit_the_ring_closes_the_tunnel() {
    let mut h = Harness::new(Config::default());
    h.open("t1");
    // 8 pieces of 16 bytes fit; 129 bytes need 9.
    assert!(matches!(
        h.feed(&data_json("t1", &pattern(0, 129))),
        Err(TunnelError::TooLarge { len: 129, .. })
    ));
    h.drive();
    let sent = h.take_sent();
    let close = sent.iter().find(|s| s.kind == "tcp_tunnel_close").unwrap();
    assert_eq!(close.reason.as_deref(), Some("protocol_error"));
}

/// The incumbent runs a goroutine per `tcp_tunnel_data` and reorders; here every byte arrives
/// in order in both directions, through full rings, tunnel pauses and upstream pauses.
#[test]
fn ordering_is_preserved_both_ways_through_backpressure() {
    let config = Config {
        ring_bytes: 100,
        ..Config::default()
    };
    let mut h = Harness::new(config);
    h.open("t1");
    h.open("t2");
    h.auto_pop = false;
    let mut expect_down: std::collections::BTreeMap<&str, Vec<u8>> = Default::default();
    let mut pending: Option<String> = None;
    let mut up_backlog: Vec<(usize, Buf)> = Vec::new();
    let mut expect_up: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut got_up: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let ids = ["t1", "t2"];
    let mut seq = 0u8;
    for round in 0..400usize {
        let which = round % 2;
        // The control plane sends 1..48 bytes, unless the reader is paused on a refused message.
        let frame = match pending.take() {
            Some(f) => f,
            None => {
                let chunk = pattern(seq, 1 + (round * 13) % 48);
                seq = seq.wrapping_add(1);
                expect_down.entry(ids[which]).or_default().extend(&chunk);
                data_json(ids[which], &chunk)
            }
        };
        match h.feed(&frame) {
            Ok(Handled::Consumed) => {}
            Err(TunnelError::Blocked) => pending = Some(frame),
            other => panic!("{other:?}"),
        }
        // The socket produces bytes; refused messages wait in order.
        let chunk = pattern(seq ^ 0x55, 1 + (round * 5) % 16);
        expect_up[which].extend(&chunk);
        up_backlog.push((which, up(&chunk)));
        let mut keep = Vec::new();
        let mut blocked = [false; 2];
        for (w, m) in up_backlog.drain(..) {
            if blocked[w] {
                keep.push((w, m));
                continue;
            }
            match h
                .relay
                .handle_upstream_message(h.now, ids[w], MessageKind::Binary, m)
            {
                Ok(()) => {}
                Err(SendError::Full(m)) => {
                    blocked[w] = true;
                    keep.push((w, m));
                }
                Err(e) => panic!("{e}"),
            }
        }
        up_backlog = keep;
        // Drain sometimes: the socket writes, the tunnel writer sends.
        if round % 7 == 0 {
            h.pop_all("t1");
            h.pop_all("t2");
        }
        if round % 4 != 1 {
            h.drive();
            for s in h.take_sent() {
                let w = ids
                    .iter()
                    .position(|i| Some(*i) == s.request_id.as_deref())
                    .unwrap();
                got_up[w].extend(s.data.unwrap());
            }
        }
    }
    // Drain everything.
    for _ in 0..200 {
        if let Some(frame) = pending.take()
            && h.feed(&frame) == Err(TunnelError::Blocked)
        {
            pending = Some(frame);
        }
        let backlog = core::mem::take(&mut up_backlog);
        for (w, m) in backlog {
            if let Err(SendError::Full(m)) =
                h.relay
                    .handle_upstream_message(h.now, ids[w], MessageKind::Binary, m)
            {
                up_backlog.push((w, m));
            }
        }
        h.pop_all("t1");
        h.pop_all("t2");
        h.drive();
        for s in h.take_sent() {
            let w = ids
                .iter()
                .position(|i| Some(*i) == s.request_id.as_deref())
                .unwrap();
            got_up[w].extend(s.data.unwrap());
        }
    }
    assert!(pending.is_none() && up_backlog.is_empty());
    assert!(
        h.relay.stats().tunnel_pauses > 0,
        "the test must exercise pauses"
    );
    assert_eq!(h.socket["t1"], expect_down["t1"]);
    assert_eq!(h.socket["t2"], expect_down["t2"]);
    assert_eq!(got_up, expect_up);
}

#[test]
fn tunnel_lost_closes_every_tunnel_socket_and_sends_nothing() {
    let mut h = Harness::new(Config::default());
    h.open("t1");
    h.relay
        .handle_upstream_message(h.now, "t1", MessageKind::Binary, up(b"queued"))
        .unwrap();
    h.relay.handle_tunnel_lost(h.now);
    h.drive();
    assert!(h.take_sent().is_empty());
    assert!(h.take_events().iter().any(|e| matches!(
        e, Event::CloseUpstream { stream, .. } if *stream == sid("t1")
    )));
    // With the tunnel gone the slot is freed at once; the socket's later report is refused.
    assert_eq!(h.relay.stream_count(), 0);
    assert_eq!(
        h.relay
            .handle_tcp_closed(h.now, "t1", TcpCloseReason::ServiceClosed, ""),
        Err(UpstreamError::UnknownStream)
    );
}

#[test]
fn tunnels_and_websocket_streams_share_the_table_independently() {
    let mut h = Harness::new(Config::default());
    h.open("t1");
    let ws_start = r#"{"type":"proxy_websocket_start","request_id":"w1","payload":{"stream_id":"w1","path":"/api/v1/namespaces/default/pods/p/exec"}}"#;
    assert!(matches!(h.feed(ws_start), Ok(Handled::Start(_))));
    h.relay.handle_upstream_started(h.now, "w1", None).unwrap();
    h.drive();
    assert!(!h.relay.is_tcp_tunnel("w1"));
    // Data for each reaches only its own upstream, with its own message type out.
    h.feed(&data_json("t1", b"tcp")).unwrap();
    h.relay
        .handle_upstream_message(h.now, "w1", MessageKind::Text, up(b"ws"))
        .unwrap();
    h.relay
        .handle_upstream_message(h.now, "t1", MessageKind::Binary, up(b"tcp-up"))
        .unwrap();
    h.drive();
    assert_eq!(h.socket["t1"], b"tcp");
    let kinds: Vec<String> = h.take_sent().into_iter().map(|s| s.kind).collect();
    assert!(
        kinds.contains(&"proxy_websocket_data".to_string()),
        "{kinds:?}"
    );
    assert!(kinds.contains(&"tcp_tunnel_data".to_string()), "{kinds:?}");
    // A tunnel close does not touch the WebSocket stream, and the reverse.
    h.feed(&close_json("t1")).unwrap();
    h.drive();
    assert_eq!(h.relay.stream_state("w1"), Some(StreamState::Open));
    assert!(
        h.relay
            .handle_tcp_closed(h.now, "w1", TcpCloseReason::ServiceClosed, "")
            .is_err()
    );
}
