//! The native wire mode end to end: an agent [`Relay`] and a control-plane [`Gateway`] wired
//! together in memory through two FIFOs of tunnel frames, with consumers (kubectl clients and
//! upstream sockets) that pop only when the test says so. Covers negotiation and fallback,
//! per-stream credit (a stalled consumer stops only its own stream), credit violations, the
//! interactive class, and a randomized no-loss check in both wire modes.

use std::collections::{BTreeMap, VecDeque};
use std::format;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use proptest::prelude::*;

use crate::credit::{CreditError, INTERACTIVE_MAX};
use crate::gateway::{self, Gateway, StreamRequest};
use crate::relay::{self, Close, MessageKind, PayloadBuf, Relay, SendError, SessionInfo};
use crate::ring::Payload;
use crate::time::Instant;
use crate::wire::native::{self, DataKind, FrameKind, NativeFrame};
use crate::wire::{Extensions, UnixTime};

/// Owned test buffer (the tokio adapters' shape).
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

const STREAMS: usize = 4;
const EPOCH: UnixTime = UnixTime::new(0, 0);
const EXEC: &str = "/api/v1/namespaces/default/pods/demo/exec";
const PROTOCOL: &str = "v5.channel.k8s.io";
/// Transmit buffer: fits a compat data envelope of a 70 000-byte message.
const BUF: usize = 1 << 18;
/// Frames a sender may have in flight per direction in [`Pair::pump`] (a bounded socket buffer).
const FIFO_CAP: usize = 64;

type Msg = (MessageKind, Vec<u8>);

/// Direction of a tunnel frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// Agent to control plane.
    ToGateway,
    /// Control plane to agent.
    ToRelay,
}

/// One direction of one stream: its producer, its consumer and what is queued at the receiver.
#[derive(Debug, Default)]
struct Flow {
    /// Every message the producer wrote, in order; `produced[accepted..]` is its backlog, kept
    /// after [`SendError::Full`] and retried (never dropped).
    produced: Vec<Msg>,
    accepted: usize,
    /// Whether the producer ever got [`SendError::Full`].
    saw_full: bool,
    /// What the consumer popped, in order.
    received: Vec<Msg>,
    /// The consumer does not pop while stalled ([`Pair::pump`]).
    stalled: bool,
    /// Native data delivered to the receiving end and not popped yet: (bytes, messages). This is
    /// the receive ring's fill, measured from outside.
    queued: (usize, usize),
    /// Highest `queued` seen.
    max_queued: (usize, usize),
}

impl Flow {
    fn backlog(&self) -> usize {
        self.produced.len() - self.accepted
    }

    fn done(&self) -> bool {
        self.received.len() == self.produced.len()
    }

    fn add_queued(&mut self, len: usize) {
        self.queued.0 += len;
        self.queued.1 += 1;
        self.max_queued.0 = self.max_queued.0.max(self.queued.0);
        self.max_queued.1 = self.max_queued.1.max(self.queued.1);
    }

    fn popped(&mut self, len: usize) {
        // Only native data is counted in; compat data (and injected frames) may leave it at 0.
        if self.queued.1 > 0 {
            self.queued.0 = self.queued.0.saturating_sub(len);
            self.queued.1 -= 1;
        }
    }

    /// Everything produced arrived exactly once, in order, with its kind.
    fn check(&self, what: &str) {
        for (i, (sent, got)) in self.produced.iter().zip(&self.received).enumerate() {
            assert!(
                sent == got,
                "{what}: message {i} differs: sent {:?} of {} bytes, got {:?} of {} bytes",
                sent.0,
                sent.1.len(),
                got.0,
                got.1.len()
            );
        }
        assert_eq!(
            self.received.len(),
            self.produced.len(),
            "{what}: messages produced vs received"
        );
    }
}

#[derive(Debug, Default)]
struct Stream {
    /// Client to upstream (queued at the relay).
    up: Flow,
    /// Upstream to client (queued at the gateway).
    down: Flow,
}

/// A relay and a gateway joined by two in-memory frame FIFOs.
struct Pair<const RING: usize> {
    now: Instant,
    relay: Relay<Bytes, STREAMS, RING>,
    gw: Gateway<Bytes, STREAMS, RING>,
    scratch: Vec<u8>,
    buf: Vec<u8>,
    /// Frames in flight toward the gateway and toward the relay.
    to_gw: VecDeque<Vec<u8>>,
    to_relay: VecDeque<Vec<u8>>,
    /// Tunnel reader paused (compat backpressure) until `ResumeTunnelReads`.
    gw_paused: bool,
    relay_paused: bool,
    /// Every `Blocked` a tunnel reader returned.
    blocked: usize,
    /// Delivered frames, when `record` is set.
    record: bool,
    log: Vec<(Dir, Vec<u8>)>,
    gw_events: Vec<gateway::Event>,
    closes_upstream: Vec<(String, Close)>,
    /// Native stream numbers, from the start frames the relay accepted.
    wires: BTreeMap<u32, String>,
    streams: BTreeMap<String, Stream>,
    /// Move native data with `poll_transmit_owned` / `handle_native_data` (the adapters' path)
    /// instead of the copying calls.
    owned: bool,
}

impl<const RING: usize> Pair<RING> {
    /// Registers a relay with a gateway; asserts both sides see the registration.
    fn new(relay_config: relay::Config, gw_config: gateway::Config) -> Self {
        let now = Instant::from_secs(5);
        let mut relay = Relay::new(relay_config);
        relay.start_session(now, SessionInfo::new("a1", "edge", "0.1.0"));
        let mut p = Self {
            now,
            relay,
            gw: Gateway::new(gw_config, "c1", now),
            scratch: vec![0; BUF],
            buf: vec![0; BUF],
            to_gw: VecDeque::new(),
            to_relay: VecDeque::new(),
            gw_paused: false,
            relay_paused: false,
            blocked: 0,
            record: true,
            log: Vec::new(),
            gw_events: Vec::new(),
            closes_upstream: Vec::new(),
            wires: BTreeMap::new(),
            streams: BTreeMap::new(),
            owned: false,
        };
        p.run();
        assert!(p.gw.is_registered());
        assert!(
            matches!(p.gw_events[..], [gateway::Event::Registered { .. }]),
            "{:?}",
            p.gw_events
        );
        p.gw_events.clear();
        p
    }

    fn native() -> Self {
        Self::with_ring_bytes(1 << 20)
    }

    fn with_ring_bytes(ring_bytes: usize) -> Self {
        Self::with_extensions(ring_bytes, Extensions::ALL)
    }

    /// Native, the relay offering `extensions`.
    fn with_extensions(ring_bytes: usize, extensions: Extensions) -> Self {
        let relay = relay::Config {
            ring_bytes,
            extensions,
            ..relay::Config::default()
        };
        let gw = gateway::Config {
            ring_bytes,
            ..gateway::Config::default()
        };
        let p = Self::new(relay, gw);
        assert!(p.relay.is_native() && p.gw.is_native());
        p
    }

    /// Both ends with `ring_bytes`, the relay offering no native mode.
    fn compat(ring_bytes: usize) -> Self {
        let relay = relay::Config {
            ring_bytes,
            extensions: Extensions {
                native: false,
                ..Extensions::ALL
            },
            ..relay::Config::default()
        };
        let gw = gateway::Config {
            ring_bytes,
            ..gateway::Config::default()
        };
        let p = Self::new(relay, gw);
        assert!(!p.relay.is_native() && !p.gw.is_native());
        p
    }

    /// Opens WebSocket stream `id`; the upstream accepts the dial at once. Runs until started.
    fn open(&mut self, id: &str) {
        let req = StreamRequest {
            id,
            path: EXEC,
            query: "command=sh&stdin=true&stdout=true",
            headers: &(),
            protocols: PROTOCOL,
            upgrade: None,
            user: Some("alice"),
            groups: &[],
        };
        self.gw
            .open_stream(self.now, EPOCH, &req, &mut self.scratch)
            .unwrap();
        self.streams.insert(id.to_string(), Stream::default());
        self.run();
        assert!(
            self.gw_events.iter().any(|e| matches!(
                e,
                gateway::Event::Started { stream, .. } if stream.as_str() == id
            )),
            "stream {id} did not start: {:?}",
            self.gw_events
        );
        self.gw_events.clear();
    }

    fn stream(&mut self, id: &str) -> &mut Stream {
        self.streams.get_mut(id).expect("unknown test stream")
    }

    /// The native stream number of `id`.
    fn wire(&self, id: &str) -> u32 {
        self.wires
            .iter()
            .find_map(|(w, s)| (s == id).then_some(*w))
            .expect("not a native stream")
    }

    // ---------------------------------------------------------------------------------------------
    // Producers: write into the backlog, then hand the backlog in until Full.

    fn client_write(&mut self, id: &str, kind: MessageKind, payload: Vec<u8>) {
        self.stream(id).up.produced.push((kind, payload));
        self.flush_client(id);
    }

    fn upstream_write(&mut self, id: &str, kind: MessageKind, payload: Vec<u8>) {
        self.stream(id).down.produced.push((kind, payload));
        self.flush_upstream(id);
    }

    /// Hands the client's backlog to the gateway until it says Full. Returns messages accepted.
    fn flush_client(&mut self, id: &str) -> usize {
        let mut n = 0;
        let flow = &mut self.streams.get_mut(id).expect("unknown test stream").up;
        while let Some((kind, payload)) = flow.produced.get(flow.accepted) {
            let bytes = Bytes(payload.clone());
            match self.gw.handle_client_message(self.now, id, *kind, bytes) {
                Ok(()) => {
                    flow.accepted += 1;
                    n += 1;
                }
                Err(SendError::Full(_)) => {
                    flow.saw_full = true;
                    break;
                }
                Err(e) => panic!("client message on {id} refused: {e:?}"),
            }
        }
        n
    }

    /// Hands the upstream's backlog to the relay until it says Full. Returns messages accepted.
    fn flush_upstream(&mut self, id: &str) -> usize {
        let mut n = 0;
        let flow = &mut self.streams.get_mut(id).expect("unknown test stream").down;
        while let Some((kind, payload)) = flow.produced.get(flow.accepted) {
            let bytes = Bytes(payload.clone());
            match self
                .relay
                .handle_upstream_message(self.now, id, *kind, bytes)
            {
                Ok(()) => {
                    flow.accepted += 1;
                    n += 1;
                }
                Err(SendError::Full(_)) => {
                    flow.saw_full = true;
                    break;
                }
                Err(e) => panic!("upstream message on {id} refused: {e:?}"),
            }
        }
        n
    }

    // ---------------------------------------------------------------------------------------------
    // Consumers

    /// The client of `id` pops up to `max` messages.
    fn client_pop(&mut self, id: &str, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(m) = self.gw.pop_client(id) else {
                break;
            };
            let flow = &mut self.stream(id).down;
            flow.popped(m.payload.0.len());
            flow.received.push((m.kind, m.payload.0));
            n += 1;
        }
        n
    }

    /// The upstream of `id` pops up to `max` messages.
    fn upstream_pop(&mut self, id: &str, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(m) = self.relay.pop_upstream(id) else {
                break;
            };
            let flow = &mut self.stream(id).up;
            flow.popped(m.payload.0.len());
            flow.received.push((m.kind, m.payload.0));
            n += 1;
        }
        n
    }

    // ---------------------------------------------------------------------------------------------
    // The tunnel

    /// Moves up to `max` frames the relay owes into the FIFO toward the gateway.
    fn poll_relay(&mut self, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            if self.owned {
                match self
                    .relay
                    .poll_transmit_owned(self.now, EPOCH, &mut self.buf)
                {
                    Ok(Some(relay::Transmit::Encoded(len))) => {
                        self.to_gw.push_back(self.buf[..len].to_vec());
                    }
                    Ok(Some(relay::Transmit::Data { header, payload })) => {
                        self.to_gw.push_back([&header[..], &payload.0].concat());
                    }
                    Ok(None) => break,
                    Err(e) => panic!("relay transmit: {e}"),
                }
                n += 1;
                continue;
            }
            match self.relay.poll_transmit(self.now, EPOCH, &mut self.buf) {
                Ok(Some(len)) => self.to_gw.push_back(self.buf[..len].to_vec()),
                Ok(None) => break,
                Err(e) => panic!("relay transmit: {e}"),
            }
            n += 1;
        }
        n
    }

    /// Moves up to `max` frames the gateway owes into the FIFO toward the relay.
    fn poll_gw(&mut self, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            if self.owned {
                match self.gw.poll_transmit_owned(self.now, EPOCH, &mut self.buf) {
                    Ok(Some(relay::Transmit::Encoded(len))) => {
                        self.to_relay.push_back(self.buf[..len].to_vec());
                    }
                    Ok(Some(relay::Transmit::Data { header, payload })) => {
                        self.to_relay.push_back([&header[..], &payload.0].concat());
                    }
                    Ok(None) => break,
                    Err(e) => panic!("gateway transmit: {e}"),
                }
                n += 1;
                continue;
            }
            match self.gw.poll_transmit(self.now, EPOCH, &mut self.buf) {
                Ok(Some(len)) => self.to_relay.push_back(self.buf[..len].to_vec()),
                Ok(None) => break,
                Err(e) => panic!("gateway transmit: {e}"),
            }
            n += 1;
        }
        n
    }

    /// Hands up to `max` frames from the FIFO to the gateway, in order; a refused (`Blocked`)
    /// frame stays at the front until `ResumeTunnelReads`.
    fn deliver_to_gw(&mut self, max: usize) -> usize {
        let mut n = 0;
        while n < max && !self.gw_paused {
            let Some(frame) = self.to_gw.pop_front() else {
                break;
            };
            let result = if self.owned && self.gw.is_native() && native::is_data(&frame) {
                self.gw
                    .handle_native_data(self.now, Bytes(frame.clone()))
                    .map(|()| gateway::Handled::Consumed)
            } else {
                self.gw
                    .handle_tunnel_message(self.now, &frame, &mut self.scratch)
            };
            match result {
                Ok(_) => {}
                Err(gateway::TunnelError::Blocked) => {
                    self.blocked += 1;
                    self.gw_paused = true;
                    self.to_gw.push_front(frame);
                    self.drain_events();
                    break;
                }
                Err(e) => panic!("gateway refused {}: {e}", describe(&frame)),
            }
            if let Some(NativeFrame::Data {
                stream, payload, ..
            }) = decode_native(&frame)
                && let Some(id) = self.wires.get(&stream).cloned()
            {
                self.stream(&id).down.add_queued(payload.len());
            }
            if self.record {
                self.log.push((Dir::ToGateway, frame));
            }
            n += 1;
            self.drain_events();
        }
        n
    }

    /// Hands up to `max` frames from the FIFO to the relay, in order (see
    /// [`deliver_to_gw`](Self::deliver_to_gw)). A start is dialled and accepted at once.
    fn deliver_to_relay(&mut self, max: usize) -> usize {
        let mut n = 0;
        while n < max && !self.relay_paused {
            let Some(frame) = self.to_relay.pop_front() else {
                break;
            };
            let result = if self.owned && self.relay.is_native() && native::is_data(&frame) {
                self.relay
                    .handle_native_data(self.now, Bytes(frame.clone()))
                    .map(|()| relay::Handled::Consumed)
            } else {
                self.relay
                    .handle_tunnel_message(self.now, &frame, &mut self.scratch)
            };
            let started = match result {
                Ok(relay::Handled::Start(start)) => Some(start.stream.to_string()),
                Ok(_) => None,
                Err(relay::TunnelError::Blocked) => {
                    self.blocked += 1;
                    self.relay_paused = true;
                    self.to_relay.push_front(frame);
                    self.drain_events();
                    break;
                }
                Err(e) => panic!("relay refused {}: {e}", describe(&frame)),
            };
            if let Some(id) = started {
                if let Some(wire) = native::peek_stream(&frame) {
                    self.wires.insert(wire, id.clone());
                }
                self.relay
                    .handle_upstream_started(self.now, &id, Some(PROTOCOL))
                    .unwrap();
            }
            if let Some(NativeFrame::Data {
                stream, payload, ..
            }) = decode_native(&frame)
                && let Some(id) = self.wires.get(&stream).cloned()
            {
                self.stream(&id).up.add_queued(payload.len());
            }
            if self.record {
                self.log.push((Dir::ToRelay, frame));
            }
            n += 1;
            self.drain_events();
        }
        n
    }

    /// Polls both sides' events. Returns how many there were.
    fn drain_events(&mut self) -> usize {
        let mut n = 0;
        while let Some(event) = self.relay.poll_event() {
            n += 1;
            match event {
                relay::Event::PauseTunnelReads => self.relay_paused = true,
                relay::Event::ResumeTunnelReads => self.relay_paused = false,
                relay::Event::CloseUpstream { stream, close } => {
                    // The upstream socket closes at once, echoing the code.
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
        }
        while let Some(event) = self.gw.poll_event() {
            n += 1;
            match &event {
                gateway::Event::PauseTunnelReads => self.gw_paused = true,
                gateway::Event::ResumeTunnelReads => self.gw_paused = false,
                _ => {}
            }
            self.gw_events.push(event);
        }
        n
    }

    /// One round of an adapter that always reads and writes: producers retry their backlogs,
    /// consumers that are not stalled pop everything, each sender fills its FIFO up to
    /// [`FIFO_CAP`] frames, each receiver reads what it may. Returns whether anything moved.
    fn pump(&mut self) -> bool {
        let mut moved = 0;
        let ids: Vec<String> = self.streams.keys().cloned().collect();
        for id in &ids {
            moved += self.flush_client(id) + self.flush_upstream(id);
            if !self.stream(id).down.stalled {
                moved += self.client_pop(id, usize::MAX);
            }
            if !self.stream(id).up.stalled {
                moved += self.upstream_pop(id, usize::MAX);
            }
        }
        moved += self.drain_events();
        let room = FIFO_CAP.saturating_sub(self.to_gw.len());
        moved += self.poll_relay(room);
        let room = FIFO_CAP.saturating_sub(self.to_relay.len());
        moved += self.poll_gw(room);
        moved += self.deliver_to_gw(usize::MAX);
        moved += self.deliver_to_relay(usize::MAX);
        moved += self.drain_events();
        moved > 0
    }

    /// Pumps until nothing moves.
    fn run(&mut self) {
        for _ in 0..1_000_000 {
            if !self.pump() {
                return;
            }
        }
        panic!("the pair never went quiet");
    }

    /// Hands a hand-built frame straight to the relay (not through the FIFO).
    fn inject_to_relay(&mut self, frame: &[u8]) -> Result<(), relay::TunnelError> {
        self.relay
            .handle_tunnel_message(self.now, frame, &mut self.scratch)
            .map(|_| ())
    }

    /// Hands a hand-built frame straight to the gateway (not through the FIFO).
    fn inject_to_gw(&mut self, frame: &[u8]) -> Result<(), gateway::TunnelError> {
        self.gw
            .handle_tunnel_message(self.now, frame, &mut self.scratch)
            .map(|_| ())
    }
}

fn decode_native(frame: &[u8]) -> Option<NativeFrame<'_>> {
    native::is_native(frame)
        .then(|| NativeFrame::decode(frame, usize::MAX).ok())
        .flatten()
}

/// A frame, shortened for a panic message.
fn describe(frame: &[u8]) -> String {
    match decode_native(frame) {
        Some(f) => format!("native {} frame for stream {}", f.kind(), f.stream()),
        None => String::from_utf8_lossy(&frame[..frame.len().min(300)]).into_owned(),
    }
}

/// A native data frame.
fn data_frame(stream: u32, kind: DataKind, payload: &[u8]) -> Vec<u8> {
    let frame = NativeFrame::Data {
        stream,
        kind,
        payload,
    };
    let mut out = vec![0; frame.encoded_len()];
    let n = frame.encode(&mut out).unwrap();
    assert_eq!(n, out.len());
    out
}

/// A payload of `len` bytes that names its stream and sequence number (so reordering, loss and
/// duplication all show).
fn payload(tag: u8, seq: usize, len: usize) -> Vec<u8> {
    let mut v = vec![tag ^ (seq as u8); len];
    let head = [tag, (seq >> 16) as u8, (seq >> 8) as u8, seq as u8];
    let n = len.min(head.len());
    v[..n].copy_from_slice(&head[..n]);
    v
}

fn kind_of(binary: bool) -> MessageKind {
    if binary {
        MessageKind::Binary
    } else {
        MessageKind::Text
    }
}

// -------------------------------------------------------------------------------------------------
// 1. Negotiation

/// A few messages each way, both kinds, including an empty one and one over a ring's byte budget.
fn round_trip<const RING: usize>(p: &mut Pair<RING>, id: &str) {
    let up: [(MessageKind, &[u8]); 3] = [
        (MessageKind::Text, b"ls -l\n"),
        (MessageKind::Binary, b"\x00\x01\xff\xfe"),
        (MessageKind::Binary, b""),
    ];
    let big = payload(7, 1, 70_000);
    let down: [(MessageKind, &[u8]); 3] = [
        (MessageKind::Binary, b"\x01total 0\n"),
        (MessageKind::Text, b"{\"status\":\"Success\"}"),
        (MessageKind::Binary, &big),
    ];
    for (kind, m) in up {
        p.client_write(id, kind, m.to_vec());
    }
    for (kind, m) in down {
        p.upstream_write(id, kind, m.to_vec());
    }
    p.run();
    let s = p.stream(id);
    s.up.check("client -> upstream");
    s.down.check("upstream -> client");
    assert_eq!(s.up.received.len(), 3);
    assert_eq!(s.down.received.len(), 3);
}

#[test]
fn native_is_negotiated_when_both_offer_it() {
    let mut p = Pair::<8>::native();
    assert!(p.relay.is_native());
    assert!(p.gw.is_native());
    assert!(p.relay.extensions().native && p.gw.extensions().native);
    // Registration itself is JSON both ways, and the agent offers the native mode in it.
    assert!(p.log.iter().all(|(_, f)| f.first() == Some(&b'{')));
    let register = String::from_utf8(p.log[0].1.clone()).unwrap();
    assert!(register.contains(r#""native_frames":true"#), "{register}");
    p.log.clear();

    p.open("s1");
    round_trip(&mut p, "s1");
    let wire = p.wire("s1");

    // Every stream frame on the tunnel was native: start, started, credit, data; no JSON stream
    // message at all.
    for (dir, frame) in &p.log {
        assert!(
            native::is_native(frame),
            "{dir:?}: JSON frame on a native tunnel: {}",
            describe(frame)
        );
        let f = NativeFrame::decode(frame, usize::MAX).unwrap();
        if f.kind() != FrameKind::Ack {
            assert_eq!(f.stream(), wire);
        }
    }
    let data = |want: Dir| -> Vec<Msg> {
        p.log
            .iter()
            .filter(|(dir, _)| *dir == want)
            .filter_map(|(_, f)| match NativeFrame::decode(f, usize::MAX).unwrap() {
                NativeFrame::Data { kind, payload, .. } => Some((
                    match kind {
                        DataKind::Text => MessageKind::Text,
                        DataKind::Binary => MessageKind::Binary,
                    },
                    payload.to_vec(),
                )),
                _ => None,
            })
            .collect()
    };
    // The data frames themselves carry the messages, kinds in the flags.
    assert_eq!(data(Dir::ToRelay), p.streams["s1"].up.produced);
    assert_eq!(data(Dir::ToGateway), p.streams["s1"].down.produced);
    let kinds = |dir: Dir| -> Vec<FrameKind> {
        let mut k: Vec<FrameKind> = p
            .log
            .iter()
            .filter(|(d, _)| *d == dir)
            .map(|(_, f)| NativeFrame::decode(f, usize::MAX).unwrap().kind())
            .collect();
        k.dedup();
        k
    };
    assert!(kinds(Dir::ToRelay).starts_with(&[FrameKind::Start, FrameKind::Credit]));
    assert!(kinds(Dir::ToGateway).starts_with(&[FrameKind::Credit, FrameKind::Started]));
    assert_eq!(
        p.relay.stats().tunnel_pauses + p.gw.stats().tunnel_pauses,
        0
    );
}

// -------------------------------------------------------------------------------------------------
// 2. Fallback

/// A stream round-trips on a tunnel that must be compat: every frame is JSON.
fn compat_round_trip(relay_config: relay::Config, gw_config: gateway::Config) {
    let mut p = Pair::<8>::new(relay_config, gw_config);
    assert!(!p.relay.is_native(), "relay negotiated native");
    assert!(!p.gw.is_native(), "gateway negotiated native");
    p.open("s1");
    round_trip(&mut p, "s1");
    assert!(p.wires.is_empty(), "a native start went out");
    for (dir, frame) in &p.log {
        assert_eq!(
            frame.first(),
            Some(&b'{'),
            "{dir:?}: not JSON: {}",
            describe(frame)
        );
    }
    let data = |dir: Dir| {
        p.log
            .iter()
            .filter(|(d, f)| {
                *d == dir && String::from_utf8_lossy(f).contains(r#""type":"proxy_websocket_data""#)
            })
            .count()
    };
    assert_eq!(data(Dir::ToRelay), 3);
    assert_eq!(data(Dir::ToGateway), 3);
}

#[test]
fn falls_back_to_compat_against_a_compat_only_peer() {
    let no_native = Extensions {
        native: false,
        ..Extensions::ALL
    };
    // (a) The agent does not offer native frames.
    compat_round_trip(
        relay::Config {
            extensions: no_native,
            ..relay::Config::default()
        },
        gateway::Config::default(),
    );
    // (b) The control plane does not advertise them.
    compat_round_trip(
        relay::Config::default(),
        gateway::Config {
            extensions: no_native,
            ..gateway::Config::default()
        },
    );

    // (c) A PipeOps control plane: register_success without any extensions.
    let now = Instant::from_secs(5);
    let mut relay = Relay::<Bytes, STREAMS, 8>::new(relay::Config::default());
    let mut buf = vec![0u8; BUF];
    let mut scratch = vec![0u8; BUF];
    relay.start_session(now, SessionInfo::new("a1", "edge", "0.1.0"));
    let n = relay.poll_transmit(now, EPOCH, &mut buf).unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains(r#""native_frames":true"#));
    let ok = br#"{"type":"register_success","request_id":"r1","payload":{"cluster_id":"c-42"}}"#;
    assert!(matches!(
        relay.handle_tunnel_message(now, ok, &mut scratch),
        Ok(relay::Handled::Other(..))
    ));
    assert!(!relay.is_native());
    assert_eq!(relay.extensions(), Extensions::NONE);
    let start = format!(
        r#"{{"type":"proxy_websocket_start","request_id":"s1","payload":{{"stream_id":"s1","method":"GET","path":"{EXEC}","query":"","headers":{{}},"protocol":"{PROTOCOL}"}}}}"#
    );
    assert!(matches!(
        relay.handle_tunnel_message(now, start.as_bytes(), &mut scratch),
        Ok(relay::Handled::Start(_))
    ));
    relay
        .handle_upstream_started(now, "s1", Some(PROTOCOL))
        .unwrap();
    relay
        .handle_upstream_message(now, "s1", MessageKind::Binary, Bytes(b"\x01hi".to_vec()))
        .unwrap();
    let mut frames = Vec::new();
    while let Some(n) = relay.poll_transmit(now, EPOCH, &mut buf).unwrap() {
        frames.push(String::from_utf8(buf[..n].to_vec()).expect("compat frames are JSON text"));
    }
    // No start ack for a PipeOps control plane; the data is a JSON envelope.
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert!(
        frames[0].contains(r#""type":"proxy_websocket_data""#),
        "{frames:?}"
    );
    // A native-looking binary message is not taken for a native frame on a compat tunnel.
    let frame = data_frame(1, DataKind::Binary, b"x");
    let refused = relay.handle_tunnel_message(now, &frame, &mut scratch);
    assert!(
        matches!(refused, Err(e) if e != relay::TunnelError::Blocked),
        "{refused:?}"
    );
}

// -------------------------------------------------------------------------------------------------
// 3. A stalled consumer stalls only its stream

const STALL_RING_BYTES: usize = 256 << 10;
/// A's messages do not divide the ring budget: the overshoot by less than one message shows.
const A_LEN: usize = 40_000;
const A_MESSAGES: usize = 64;
const B_LEN: usize = 32 << 10;
const B_MESSAGES: usize = (10 << 20) / B_LEN;

/// Streams A and B; A's client stalled, A's upstream with a backlog of 64 messages, B with
/// `b_messages` of 32 KiB each way. Runs until quiet.
fn stall_scenario(p: &mut Pair<8>, b_messages: usize) {
    p.record = false;
    p.open("A");
    p.open("B");
    p.stream("A").down.stalled = true;
    for i in 0..A_MESSAGES {
        p.upstream_write("A", MessageKind::Binary, payload(b'A', i, A_LEN));
    }
    assert!(p.stream("A").down.saw_full, "A's upstream never got Full");
    for i in 0..b_messages {
        let kind = kind_of(i % 3 != 0);
        p.client_write("B", kind, payload(b'b', i, B_LEN));
        p.upstream_write("B", kind, payload(b'B', i, B_LEN));
    }
    p.run();
}

#[test]
fn stalled_consumer_stalls_only_its_stream() {
    let mut p = Pair::<8>::with_ring_bytes(STALL_RING_BYTES);
    stall_scenario(&mut p, B_MESSAGES);

    // B moved 10 MiB each way, every byte in order, while A stalled.
    p.streams["B"].up.check("B client -> upstream");
    p.streams["B"].down.check("B upstream -> client");
    assert_eq!(p.streams["B"].down.received.len(), B_MESSAGES);
    // The tunnel reader never paused.
    assert_eq!(p.gw.stats().tunnel_pauses, 0);
    assert_eq!(p.relay.stats().tunnel_pauses, 0);
    assert_eq!(p.blocked, 0);
    // A's producer was held back by credit and its ring at the gateway stayed bounded.
    let a = &p.streams["A"].down;
    assert!(a.received.is_empty());
    assert!(a.backlog() > 0, "A's upstream was never held back");
    assert!(
        a.max_queued.0 <= STALL_RING_BYTES + A_LEN,
        "A queued {} bytes at the gateway, over {} + one message",
        a.max_queued.0,
        STALL_RING_BYTES
    );
    assert!(
        a.max_queued.0 > STALL_RING_BYTES,
        "A's window was not used up ({} bytes)",
        a.max_queued.0
    );
    assert!(a.max_queued.1 <= 8);
    assert!(p.relay.stats().credit_stalls > 0);

    // A's client drains: everything its upstream produced arrives, in order.
    p.stream("A").down.stalled = false;
    p.run();
    p.streams["A"].down.check("A upstream -> client");
    assert_eq!(p.streams["A"].down.received.len(), A_MESSAGES);
    assert_eq!(
        p.gw.stats().tunnel_pauses + p.relay.stats().tunnel_pauses,
        0
    );
}

/// The same scenario in compat mode: A's full ring at the gateway pauses the whole tunnel, so B
/// cannot complete while A is stalled (head-of-line blocking: why the native mode exists). B
/// moves 2 MiB each way here, not 10 (base64 in a debug build is slow); it is stuck either way.
#[test]
fn compat_stalled_consumer_blocks_every_stream() {
    let mut p = Pair::<8>::compat(STALL_RING_BYTES);
    stall_scenario(&mut p, B_MESSAGES / 5);

    assert!(p.gw.stats().tunnel_pauses > 0);
    assert!(p.gw_paused, "the gateway's tunnel reader should be paused");
    assert!(p.blocked > 0);
    let b = &p.streams["B"].down;
    assert!(!b.done(), "B completed through a paused tunnel");
    // The other direction is not blocked.
    p.streams["B"].up.check("B client -> upstream");

    // A's client drains: the tunnel resumes and everything arrives.
    p.stream("A").down.stalled = false;
    p.run();
    p.streams["A"].down.check("A upstream -> client");
    p.streams["B"].down.check("B upstream -> client");
    assert!(!p.gw_paused);
}

// -------------------------------------------------------------------------------------------------
// 4. No loss under random stalls

#[derive(Clone, Debug)]
enum Op {
    ClientWrite {
        s: usize,
        len: usize,
        binary: bool,
    },
    UpstreamWrite {
        s: usize,
        len: usize,
        binary: bool,
    },
    ClientPop {
        s: usize,
        n: usize,
    },
    UpstreamPop {
        s: usize,
        n: usize,
    },
    /// Poll up to `n` frames into the FIFO and deliver up to `n`.
    Transmit {
        to_gw: bool,
        n: usize,
    },
    Stall {
        client: bool,
        s: usize,
        on: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![0usize..64, 0usize..2048, 0usize..70_000];
    prop_oneof![
        3 => (0usize..4, len.clone(), any::<bool>())
            .prop_map(|(s, len, binary)| Op::ClientWrite { s, len, binary }),
        3 => (0usize..4, len, any::<bool>())
            .prop_map(|(s, len, binary)| Op::UpstreamWrite { s, len, binary }),
        2 => (0usize..4, 1usize..8).prop_map(|(s, n)| Op::ClientPop { s, n }),
        2 => (0usize..4, 1usize..8).prop_map(|(s, n)| Op::UpstreamPop { s, n }),
        4 => (any::<bool>(), 1usize..12).prop_map(|(to_gw, n)| Op::Transmit { to_gw, n }),
        1 => (any::<bool>(), 0usize..4, any::<bool>())
            .prop_map(|(client, s, on)| Op::Stall { client, s, on }),
    ]
}

const PROP_RING_BYTES: usize = 128 << 10;
const PROP_MAX_LEN: usize = 70_000;

fn no_loss(native: bool, owned: bool, streams: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut p = if native {
        Pair::<8>::with_ring_bytes(PROP_RING_BYTES)
    } else {
        Pair::<8>::compat(PROP_RING_BYTES)
    };
    p.record = false;
    p.owned = owned;
    let ids: Vec<String> = (0..streams).map(|i| format!("s{i}")).collect();
    for id in &ids {
        p.open(id);
    }
    let mut seq = 0usize;
    for op in ops {
        match *op {
            Op::ClientWrite { s, len, binary } => {
                seq += 1;
                let id = &ids[s % streams];
                p.client_write(id, kind_of(binary), payload(b'c', seq, len));
            }
            Op::UpstreamWrite { s, len, binary } => {
                seq += 1;
                let id = &ids[s % streams];
                p.upstream_write(id, kind_of(binary), payload(b'u', seq, len));
            }
            Op::ClientPop { s, n } => {
                let id = &ids[s % streams];
                if !p.stream(id).down.stalled {
                    p.client_pop(id, n);
                }
            }
            Op::UpstreamPop { s, n } => {
                let id = &ids[s % streams];
                if !p.stream(id).up.stalled {
                    p.upstream_pop(id, n);
                }
            }
            Op::Transmit { to_gw: true, n } => {
                p.poll_relay(n);
                p.deliver_to_gw(n);
            }
            Op::Transmit { to_gw: false, n } => {
                p.poll_gw(n);
                p.deliver_to_relay(n);
            }
            Op::Stall { client, s, on } => {
                let st = p.stream(&ids[s % streams]);
                if client {
                    st.down.stalled = on;
                } else {
                    st.up.stalled = on;
                }
            }
        }
        p.drain_events();
        if native {
            // Credit bounds every receive ring: its byte budget plus less than one message.
            for (id, st) in &p.streams {
                for (what, f) in [("up", &st.up), ("down", &st.down)] {
                    prop_assert!(
                        f.queued.0 < PROP_RING_BYTES + PROP_MAX_LEN && f.queued.1 <= 8,
                        "{id} {what}: {:?} queued",
                        f.queued
                    );
                }
            }
        }
    }
    for st in p.streams.values_mut() {
        st.up.stalled = false;
        st.down.stalled = false;
    }
    p.run();
    for (id, st) in &p.streams {
        prop_assert_eq!(st.up.backlog(), 0, "{} client backlog left", id);
        prop_assert_eq!(st.down.backlog(), 0, "{} upstream backlog left", id);
        prop_assert!(st.up.done() && st.down.done(), "{} incomplete", id);
        st.up.check(&format!("{id} client -> upstream"));
        st.down.check(&format!("{id} upstream -> client"));
    }
    prop_assert!(p.to_gw.is_empty() && p.to_relay.is_empty());
    if native {
        prop_assert_eq!(p.gw.stats().tunnel_pauses, 0);
        prop_assert_eq!(p.relay.stats().tunnel_pauses, 0);
        prop_assert_eq!(p.blocked, 0);
    }
    prop_assert_eq!(p.gw.stats().bad_messages + p.relay.stats().bad_messages, 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn no_loss_under_random_stalls(
        streams in 1usize..=4,
        ops in proptest::collection::vec(op(), 1..250),
    ) {
        no_loss(true, false, streams, &ops)?;
    }

    /// The same through the calls the adapters use: owned transmit, owned data frames in.
    #[test]
    fn no_loss_under_random_stalls_owned_buffers(
        streams in 1usize..=4,
        ops in proptest::collection::vec(op(), 1..250),
    ) {
        no_loss(true, true, streams, &ops)?;
    }

    #[test]
    fn no_loss_under_random_stalls_compat(
        streams in 1usize..=4,
        ops in proptest::collection::vec(op(), 1..250),
    ) {
        no_loss(false, false, streams, &ops)?;
    }
}

// -------------------------------------------------------------------------------------------------
// 5. Credit violations

#[test]
fn credit_violation_ends_only_that_stream() {
    const RING_BYTES: usize = 64 << 10;
    // Frames are injected past the senders: without acks, which would report bytes the
    // senders never sent.
    let no_acks = Extensions {
        native_ack: false,
        ..Extensions::ALL
    };
    let mut p = Pair::<8>::with_extensions(RING_BYTES, no_acks);
    for id in ["A", "B", "C", "D"] {
        p.open(id);
    }
    // A's number, from the start frame the gateway transmitted.
    let wire_a = p
        .log
        .iter()
        .filter(|(dir, _)| *dir == Dir::ToRelay)
        .find_map(|(_, f)| match NativeFrame::decode(f, usize::MAX) {
            Ok(NativeFrame::Start { stream, request }) => {
                let start = native::decode_start_body(request).unwrap();
                (start.stream_id.chars().collect::<String>() == "A").then_some(stream)
            }
            _ => None,
        })
        .expect("A's start frame");
    assert_eq!(wire_a, p.wire("A"));

    // A, by bytes: the whole byte window in one message is allowed (credit goes to 0), one more
    // byte is not.
    let full = data_frame(wire_a, DataKind::Binary, &vec![1; RING_BYTES]);
    p.inject_to_relay(&full).unwrap();
    let over = data_frame(wire_a, DataKind::Binary, b"x");
    assert_eq!(
        p.inject_to_relay(&over),
        Err(relay::TunnelError::Credit(CreditError { len: 1 }))
    );
    // C, by messages: RING messages are allowed, one more is not.
    let wire_c = p.wire("C");
    for _ in 0..8 {
        p.inject_to_relay(&data_frame(wire_c, DataKind::Text, b"c"))
            .unwrap();
    }
    assert_eq!(
        p.inject_to_relay(&data_frame(wire_c, DataKind::Text, b"c")),
        Err(relay::TunnelError::Credit(CreditError { len: 1 }))
    );
    // D toward the gateway: the agent sends past the client's window.
    let wire_d = p.wire("D");
    p.inject_to_gw(&data_frame(wire_d, DataKind::Binary, &vec![2; RING_BYTES]))
        .unwrap();
    assert_eq!(
        p.inject_to_gw(&data_frame(wire_d, DataKind::Binary, b"yz")),
        Err(gateway::TunnelError::Credit(CreditError { len: 2 }))
    );
    p.run();

    // A's and C's upstreams were closed with 1008 (after the data sent within credit).
    let closed: Vec<(&str, u16)> = p
        .closes_upstream
        .iter()
        .map(|(id, c)| (id.as_str(), c.code))
        .collect();
    assert!(closed.contains(&("A", 1008)), "{closed:?}");
    assert!(closed.contains(&("C", 1008)), "{closed:?}");
    assert!(!closed.iter().any(|(id, _)| *id == "B"), "{closed:?}");
    assert_eq!(p.streams["A"].up.received.len(), 1);
    assert_eq!(p.streams["C"].up.received.len(), 8);
    // Their clients were told, and D's client got the 1008.
    let client_close = |id: &str| {
        p.gw_events.iter().find_map(|e| match e {
            gateway::Event::Closed { stream, close } if stream.as_str() == id => {
                Some(close.clone())
            }
            _ => None,
        })
    };
    for id in ["A", "C"] {
        let close = client_close(id).unwrap_or_else(|| panic!("{id}'s client not closed"));
        // The relay's proxy_error (1011 with the violation) comes ahead of its 1008 close.
        assert!(
            (close.code == 1008 || close.code == 1011)
                && close.reason.contains("flow control violated"),
            "{id}: {close:?}"
        );
    }
    assert_eq!(client_close("D").map(|c| c.code), Some(1008));
    assert!(client_close("B").is_none());
    assert_eq!(p.relay.stream_count(), 1);
    assert_eq!(p.gw.stream_count(), 1);

    // B still flows both ways.
    for i in 0..20 {
        p.client_write("B", MessageKind::Binary, payload(b'b', i, 10_000));
        p.upstream_write("B", MessageKind::Text, payload(b'B', i, 10_000));
    }
    p.run();
    p.streams["B"].up.check("B client -> upstream");
    p.streams["B"].down.check("B upstream -> client");
    assert_eq!(p.streams["B"].up.received.len(), 20);
    assert_eq!(
        p.gw.stats().tunnel_pauses + p.relay.stats().tunnel_pauses,
        0
    );
}

// -------------------------------------------------------------------------------------------------
// 6. Interactive messages overtake bulk

impl<const RING: usize> Pair<RING> {
    /// Polls the gateway one frame at a time (into the FIFO, so nothing is lost) until a data frame
    /// comes out; returns its stream number.
    fn next_data_from_gw(&mut self) -> u32 {
        loop {
            assert_eq!(self.poll_gw(1), 1, "no data frame transmitted");
            let frame = self.to_relay.back().unwrap();
            if let Some(NativeFrame::Data { stream, .. }) = decode_native(frame) {
                return stream;
            }
        }
    }

    /// [`next_data_from_gw`](Self::next_data_from_gw) for the relay.
    fn next_data_from_relay(&mut self) -> u32 {
        loop {
            assert_eq!(self.poll_relay(1), 1, "no data frame transmitted");
            let frame = self.to_gw.back().unwrap();
            if let Some(NativeFrame::Data { stream, .. }) = decode_native(frame) {
                return stream;
            }
        }
    }
}

#[test]
fn interactive_messages_overtake_bulk() {
    let mut p = Pair::<64>::with_ring_bytes(2 << 20);
    p.open("A");
    p.open("B");
    let (wire_a, wire_b) = (p.wire("A"), p.wire("B"));
    // B sent last, so plain round-robin would serve A next.
    p.client_write("B", MessageKind::Binary, b"\x00x".to_vec());
    p.upstream_write("B", MessageKind::Binary, b"\x01x".to_vec());
    p.run();
    assert_eq!(p.streams["B"].up.received.len(), 1);
    assert_eq!(p.streams["B"].down.received.len(), 1);

    for i in 0..50 {
        p.client_write("A", MessageKind::Binary, payload(b'a', i, 32 << 10));
        p.upstream_write("A", MessageKind::Binary, payload(b'A', i, 32 << 10));
    }
    assert_eq!(
        p.streams["A"].up.backlog(),
        0,
        "A's 50 messages fit its ring"
    );
    assert_eq!(p.streams["A"].down.backlog(), 0);
    let tty = b"\x00resize:80".to_vec();
    assert!(tty.len() <= INTERACTIVE_MAX);
    p.client_write("B", MessageKind::Binary, tty.clone());
    p.upstream_write("B", MessageKind::Binary, tty);

    assert_eq!(
        p.next_data_from_gw(),
        wire_b,
        "the gateway sent bulk before the 10-byte message"
    );
    assert_eq!(
        p.next_data_from_relay(),
        wire_b,
        "the relay sent bulk before the 10-byte message"
    );
    // Then the bulk follows, and everything arrives.
    assert_eq!(p.next_data_from_gw(), wire_a);
    assert_eq!(p.next_data_from_relay(), wire_a);
    p.run();
    for id in ["A", "B"] {
        p.streams[id].up.check(id);
        p.streams[id].down.check(id);
    }
}

/// Three streams of bulk data at once: what the gateway has in flight on the tunnel (in the
/// FIFO that stands for kernel buffers) stays within its bulk window, plus the one message a
/// small unacknowledged rest lets through; an interactive message sent meanwhile waits behind
/// no more than that; and everything arrives.
#[test]
fn the_bulk_window_bounds_what_waits_in_front_of_an_interactive_message() {
    const MSG: usize = 32 << 10;
    let mut p = Pair::<64>::with_ring_bytes(2 << 20);
    assert!(p.gw.extensions().native_ack);
    for id in ["A", "B", "C", "T"] {
        p.open(id);
    }
    let wire_t = p.wire("T");
    for i in 0..60 {
        for id in ["A", "B", "C"] {
            p.client_write(id, MessageKind::Binary, payload(b'a', i, MSG));
        }
    }
    let fifo_bytes = |p: &Pair<64>| -> usize {
        p.to_relay
            .iter()
            .filter(|f| native::is_data(f))
            .map(|f| f.len() - native::HEADER_LEN)
            .sum()
    };
    let bound = |p: &Pair<64>| p.gw.bulk_window().1 as usize + 64 * 1024 + MSG;
    let mut worst = 0;
    let mut behind_tty = None;
    for round in 0..10_000 {
        if round == 3 {
            p.client_write("T", MessageKind::Binary, b"\x00ls\n".to_vec());
        }
        let room = FIFO_CAP.saturating_sub(p.to_relay.len());
        p.poll_gw(room);
        let queued = fifo_bytes(&p);
        assert!(
            queued <= bound(&p),
            "{queued} bytes in flight, bound {}",
            bound(&p)
        );
        worst = worst.max(queued);
        if behind_tty.is_none()
            && let Some(at) = p
                .to_relay
                .iter()
                .position(|f| native::peek_stream(f) == Some(wire_t) && native::is_data(f))
        {
            let ahead: usize = p.to_relay.iter().take(at).map(Vec::len).sum();
            behind_tty = Some(ahead);
        }
        if !p.pump() {
            break;
        }
    }
    assert!(worst > 0);
    let ahead = behind_tty.expect("the interactive message was sent");
    assert!(
        ahead <= bound(&p),
        "{ahead} bytes ahead of the interactive message"
    );
    for id in ["A", "B", "C", "T"] {
        p.streams[id].up.check(id);
    }
    assert_eq!(p.gw.bulk_window().0, 0, "everything sent was acknowledged");
}

// -------------------------------------------------------------------------------------------------
// 7. The shared budget toward the tunnel

/// Every client writes 1 MiB while the tunnel carries nothing: together they queue no more than
/// twice the shared budget (plus one message per stream), every stream still queues something,
/// and once the tunnel moves everything arrives, in order, and every paused client is resumed.
#[test]
fn shared_budget_caps_what_all_streams_queue_toward_the_tunnel() {
    const GLOBAL: usize = 512 << 10;
    const MSG: usize = 32 << 10;
    let relay = relay::Config::default();
    let gw = gateway::Config {
        global_bytes: GLOBAL,
        ..gateway::Config::default()
    };
    let mut p = Pair::<64>::new(relay, gw);
    let ids: Vec<String> = (0..STREAMS).map(|i| format!("s{i}")).collect();
    for id in &ids {
        p.open(id);
    }
    for (n, id) in ids.iter().enumerate() {
        for k in 0..32 {
            p.stream(id)
                .up
                .produced
                .push((MessageKind::Binary, payload(b'u', n * 100 + k, MSG)));
        }
    }
    // The clients write as long as the gateway takes it; nothing is transmitted.
    for _ in 0..4 {
        for id in &ids {
            p.flush_client(id);
        }
    }
    let queued = p.gw.ring_occupancy().bytes;
    assert!(
        queued <= 2 * GLOBAL + STREAMS * MSG,
        "{queued} bytes queued toward the agent, budget {GLOBAL}"
    );
    assert!(
        queued < STREAMS * (1 << 20),
        "the per-stream rings alone would take 1 MiB each"
    );
    for id in &ids {
        let flow = &p.stream(id).up;
        assert!(flow.accepted > 0, "{id} queued nothing");
        assert!(flow.saw_full, "{id} was never refused");
    }
    // Now the tunnel moves: everything arrives, and every stopped client was resumed.
    p.run();
    for id in &ids {
        let flow = &p.stream(id).up;
        assert_eq!(flow.received, flow.produced, "{id}");
    }
    for id in &ids {
        let stops = p
            .gw_events
            .iter()
            .filter(|e| matches!(e, gateway::Event::StopReadingClient(s) if s.as_str() == id))
            .count();
        let resumes = p
            .gw_events
            .iter()
            .filter(|e| matches!(e, gateway::Event::ResumeReadingClient(s) if s.as_str() == id))
            .count();
        assert_eq!(stops, resumes, "{id}: every stop is followed by a resume");
    }
}

#[test]
fn a_draining_agent_tells_a_tether_control_plane_once_and_keeps_its_streams() {
    let mut p = Pair::<8>::native();
    p.open("s1");
    assert!(!p.relay.is_draining());
    p.relay.start_draining();
    assert!(p.relay.is_draining());
    p.run();
    let draining = |p: &Pair<8>| {
        p.gw_events
            .iter()
            .filter(|e| matches!(e, gateway::Event::AgentDraining))
            .count()
    };
    assert_eq!(draining(&p), 1, "{:?}", p.gw_events);
    // The live stream still carries data both ways.
    round_trip(&mut p, "s1");
    // Later heartbeats say draining again; the control plane hears of it only once.
    p.now += relay::Config::default().heartbeat_interval;
    p.relay.handle_timeout(p.now);
    p.run();
    assert_eq!(draining(&p), 1, "{:?}", p.gw_events);
}

#[test]
fn a_pipeops_control_plane_never_sees_the_draining_status() {
    // A control plane that advertises no extension (as PipeOps) gets `healthy`.
    let gw = gateway::Config {
        extensions: Extensions::NONE,
        ..gateway::Config::default()
    };
    let mut p = Pair::<8>::new(relay::Config::default(), gw);
    p.relay.start_draining();
    p.now += relay::Config::default().heartbeat_interval;
    p.relay.handle_timeout(p.now);
    p.run();
    let heartbeats: Vec<String> = p
        .log
        .iter()
        .filter(|(dir, f)| matches!(dir, Dir::ToGateway) && describe(f).contains("heartbeat"))
        .map(|(_, f)| describe(f))
        .collect();
    assert!(!heartbeats.is_empty(), "no heartbeat sent");
    assert!(
        heartbeats.iter().all(|h| !h.contains("draining")),
        "{heartbeats:?}"
    );
    assert!(
        !p.gw_events
            .iter()
            .any(|e| matches!(e, gateway::Event::AgentDraining))
    );
}
