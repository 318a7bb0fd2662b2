//! Control-plane counters, exported at `/metrics` in the Prometheus text format.
//!
//! Besides the gateway counters, the families shared with the agent (see
//! [`crate::agent::metrics`]): `tether_streams_active{kind}`, `tether_stream_duration_seconds{kind}`
//! (client task lifetimes), `tether_stream_bytes_total{direction="to_agent"|"to_client"}`,
//! `tether_errors_total{class}`, `tether_blocked_seconds_total{reason}` (summed over tunnels),
//! `tether_ring_messages`/`tether_ring_bytes` (summed over tunnels),
//! `tether_tunnel_reconnects_total` (registrations of a cluster that had registered before) and
//! `tether_wire_mode{mode}` (registered tunnels per mode).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tether_core::gateway::{Stats, TunnelError};

use super::tunnel::Gw;
use crate::agent::metrics::{
    ErrorClass, ErrorCounts, Exposition, PauseClock, StreamKind, StreamLife, StreamStats,
    micros_to_secs, render_blocked, render_bytes, render_rings, render_window, render_wire_mode,
};

/// The class of an agent message the gateway rejected; `None` for "not consumed, hand it in
/// again" (`Blocked`, `ScratchTooSmall`), which are not errors.
#[must_use]
pub(crate) fn gateway_error_class(e: &TunnelError) -> Option<ErrorClass> {
    Some(match e {
        TunnelError::Blocked | TunnelError::ScratchTooSmall { .. } => return None,
        TunnelError::TooLarge { .. } | TunnelError::PayloadRefused { .. } => ErrorClass::TooLarge,
        TunnelError::Decode(_)
        | TunnelError::Frame(_)
        | TunnelError::Native(_)
        | TunnelError::UnknownType => ErrorClass::Decode,
        TunnelError::UnknownStream => ErrorClass::UnknownStream,
        TunnelError::Unexpected | TunnelError::UnexpectedFrame(_) => ErrorClass::Refused,
        TunnelError::Credit(_) | TunnelError::Ack(_) => ErrorClass::Flow,
    })
}

/// What `/metrics` shows of one live tunnel.
#[derive(Clone, Copy, Debug, Default)]
struct TunnelView {
    registered: bool,
    native: bool,
    ring_messages: usize,
    ring_bytes: usize,
    /// Bulk window (extension `native_ack`): bytes in flight and the limit (0 without it).
    in_flight: u64,
    window_limit: u64,
}

/// Process-wide counters; tunnels add their gateway's [`Stats`] deltas.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Registered agent tunnels.
    pub agents_connected: AtomicI64,
    /// Stream and request slots in use in every gateway (`tether_gateway_streams`).
    pub streams_active: AtomicI64,
    streams_opened: AtomicU64,
    requests_opened: AtomicU64,
    streams_failed: AtomicU64,
    bytes_to_agent: AtomicU64,
    bytes_to_client: AtomicU64,
    bad_messages: AtomicU64,
    tunnel_pauses: AtomicU64,
    credit_blocked_micros: AtomicU64,
    /// Requests refused before reaching a tunnel (bad token, no agent, bad request).
    pub refused: AtomicU64,
    tunnel_reconnects: AtomicU64,
    peer_forwarded: AtomicU64,
    streams: Arc<StreamStats>,
    errors: ErrorCounts,
    paused: PauseClock,
    tunnels: Mutex<HashMap<u64, TunnelView>>,
    clusters_seen: Mutex<HashSet<String>>,
}

impl Metrics {
    /// Adds the growth from `before` to `after` of one gateway's counters.
    pub fn add(&self, before: &Stats, after: &Stats) {
        let add = |c: &AtomicU64, a: u64, b: u64| {
            if b > a {
                c.fetch_add(b - a, Ordering::Relaxed);
            }
        };
        add(
            &self.streams_opened,
            before.streams_opened,
            after.streams_opened,
        );
        add(
            &self.requests_opened,
            before.requests_opened,
            after.requests_opened,
        );
        add(
            &self.streams_failed,
            before.streams_failed,
            after.streams_failed,
        );
        add(
            &self.bytes_to_agent,
            before.bytes_to_agent,
            after.bytes_to_agent,
        );
        add(
            &self.bytes_to_client,
            before.bytes_to_client,
            after.bytes_to_client,
        );
        add(&self.bad_messages, before.bad_messages, after.bad_messages);
        add(
            &self.tunnel_pauses,
            before.tunnel_pauses,
            after.tunnel_pauses,
        );
        add(
            &self.credit_blocked_micros,
            before.credit_blocked_micros,
            after.credit_blocked_micros,
        );
    }

    /// Records the state of tunnel `generation` (of `cluster`) after a step of its task: whether
    /// the agent registered, whether the task stopped reading the tunnel, the wire mode, and the
    /// gateway's rings when `rings` (see [`RingSampler`](crate::agent::metrics::RingSampler)).
    /// The first registration of a cluster seen registered before counts as a reconnect.
    pub(crate) fn observe_tunnel(
        &self,
        generation: u64,
        cluster: &str,
        registered: bool,
        paused: bool,
        gw: &Gw,
        rings: bool,
    ) {
        self.paused.set(generation, paused);
        let native = gw.is_native();
        let ring = rings.then(|| gw.ring_occupancy());
        let newly_registered = {
            let mut tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
            let view = tunnels.entry(generation).or_default();
            let newly = registered && !view.registered;
            view.registered = registered;
            view.native = native;
            if let Some(ring) = ring {
                view.ring_messages = ring.messages;
                view.ring_bytes = ring.bytes;
                let (in_flight, limit) = gw.bulk_window();
                let acked = native && gw.extensions().native_ack;
                view.in_flight = in_flight;
                view.window_limit = if acked { limit } else { 0 };
            }
            newly
        };
        if newly_registered {
            let mut seen = self.clusters_seen.lock().unwrap_or_else(|p| p.into_inner());
            if !seen.insert(cluster.to_string()) {
                self.tunnel_reconnects.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Tunnel `generation` ended: forget its rings and mode, stop timing its pause.
    pub(crate) fn tunnel_ended(&self, generation: u64) {
        self.paused.set(generation, false);
        self.tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&generation);
    }

    /// Counts an agent message the gateway rejected, by class.
    pub(crate) fn tunnel_error(&self, e: &TunnelError) {
        if let Some(class) = gateway_error_class(e) {
            self.errors.add(class, 1);
        }
    }

    /// An agent tunnel failed (read error, silence past the deadline, upgrade failure).
    pub(crate) fn tunnel_failed(&self) {
        self.errors.add(ErrorClass::Tunnel, 1);
    }

    /// A bearer token (user or agent) was refused.
    /// A user's request was carried to the replica holding its cluster's tunnel.
    pub(crate) fn peer_forwarded(&self) {
        self.peer_forwarded.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn auth_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.errors.add(ErrorClass::Auth, 1);
    }

    /// A stream or request failed with `status` before starting: 502 and 504 are upstream (dial)
    /// failures reported by the agent.
    pub(crate) fn stream_failed(&self, status: u16) {
        if matches!(status, 502 | 504) {
            self.errors.add(ErrorClass::Upstream, 1);
        }
    }

    /// Counts a client stream of `kind` as live until the guard is dropped.
    pub(crate) fn stream_life(&self, kind: StreamKind) -> StreamLife {
        self.streams.start(kind)
    }

    /// Client streams and requests of every kind live now.
    pub(crate) fn live_streams(&self) -> i64 {
        self.streams.live()
    }

    /// The Prometheus text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = Exposition::default();
        let g = |a: &AtomicI64| a.load(Ordering::Relaxed);
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.single(
            "tether_agents_connected",
            "gauge",
            "Registered agent tunnels.",
            g(&self.agents_connected),
        );
        out.single(
            "tether_gateway_streams",
            "gauge",
            "Stream and request slots in use in all gateways.",
            g(&self.streams_active),
        );
        out.single(
            "tether_peer_forwarded_total",
            "counter",
            "User requests carried to the replica holding their cluster's tunnel.",
            c(&self.peer_forwarded),
        );
        out.single(
            "tether_websocket_streams_total",
            "counter",
            "WebSocket streams opened.",
            c(&self.streams_opened),
        );
        out.single(
            "tether_http_requests_total",
            "counter",
            "HTTP requests forwarded.",
            c(&self.requests_opened),
        );
        out.single(
            "tether_streams_failed_total",
            "counter",
            "Streams and requests that failed before starting.",
            c(&self.streams_failed),
        );
        out.single(
            "tether_bytes_to_agent_total",
            "counter",
            "Payload bytes sent toward agents.",
            c(&self.bytes_to_agent),
        );
        out.single(
            "tether_bytes_to_client_total",
            "counter",
            "Payload bytes sent toward clients.",
            c(&self.bytes_to_client),
        );
        out.single(
            "tether_agent_bad_messages_total",
            "counter",
            "Agent messages rejected.",
            c(&self.bad_messages),
        );
        out.single(
            "tether_tunnel_pauses_total",
            "counter",
            "Tunnel read pauses (head-of-line blocking).",
            c(&self.tunnel_pauses),
        );
        out.single(
            "tether_refused_requests_total",
            "counter",
            "Client requests refused before reaching an agent.",
            c(&self.refused),
        );
        out.single(
            "tether_tunnel_reconnects_total",
            "counter",
            "Agent registrations for a cluster that had registered before (agent reconnects, including replacements of a live tunnel).",
            c(&self.tunnel_reconnects),
        );
        self.streams.render(&mut out);
        render_bytes(
            &mut out,
            "Stream payload bytes (WebSocket and TCP data, HTTP bodies): to_agent = clients to agents, to_client = agents to clients.",
            [
                ("to_agent", c(&self.bytes_to_agent)),
                ("to_client", c(&self.bytes_to_client)),
            ],
        );
        self.errors.render(&mut out, |_| 0);
        render_blocked(
            &mut out,
            self.paused.seconds(),
            micros_to_secs(c(&self.credit_blocked_micros)),
        );
        let tunnels: Vec<TunnelView> = self
            .tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .copied()
            .collect();
        render_rings(
            &mut out,
            tunnels.iter().map(|t| t.ring_messages).sum(),
            tunnels.iter().map(|t| t.ring_bytes).sum(),
        );
        render_window(
            &mut out,
            tunnels.iter().map(|t| t.in_flight).sum(),
            tunnels.iter().map(|t| t.window_limit).sum(),
        );
        let registered = tunnels.iter().filter(|t| t.registered);
        let native = registered.clone().filter(|t| t.native).count() as u64;
        let compat = registered.filter(|t| !t.native).count() as u64;
        render_wire_mode(
            &mut out,
            native,
            compat,
            "Registered agent tunnels per wire mode.",
        );
        out.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::metrics::check_exposition;

    #[test]
    fn render_is_valid_prometheus_text() {
        let m = Metrics::default();
        m.add(
            &Stats::default(),
            &Stats {
                bytes_to_agent: 10,
                bytes_to_client: 20,
                tunnel_pauses: 1,
                ..Stats::default()
            },
        );
        m.tunnel_error(&TunnelError::Unexpected);
        m.tunnel_error(&TunnelError::Blocked);
        m.auth_refused();
        m.stream_failed(502);
        m.stream_failed(403);
        drop(m.stream_life(StreamKind::Tcp));
        let _live = m.stream_life(StreamKind::WebSocket);
        let text = m.render();
        check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        for line in [
            "tether_agents_connected 0",
            "tether_tunnel_pauses_total 1",
            "tether_refused_requests_total 1",
            "tether_streams_active{kind=\"websocket\"} 1",
            "tether_streams_active{kind=\"tcp\"} 0",
            "tether_stream_duration_seconds_count{kind=\"tcp\"} 1",
            "tether_stream_bytes_total{direction=\"to_agent\"} 10",
            "tether_stream_bytes_total{direction=\"to_client\"} 20",
            "tether_errors_total{class=\"refused\"} 1",
            "tether_errors_total{class=\"auth\"} 1",
            "tether_errors_total{class=\"upstream\"} 1",
            "tether_errors_total{class=\"decode\"} 0",
            "tether_blocked_seconds_total{reason=\"credit\"} 0",
            "tether_ring_messages 0",
            "tether_tunnel_reconnects_total 0",
            "tether_wire_mode{mode=\"native\"} 0",
            "tether_wire_mode{mode=\"compat\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn pauses_are_timed_per_tunnel_and_end_with_it() {
        let m = Metrics::default();
        m.paused.set(1, true);
        m.paused.set(2, true);
        std::thread::sleep(std::time::Duration::from_millis(10));
        m.tunnel_ended(1);
        m.tunnel_ended(2);
        let s = m.paused.seconds();
        assert!(s >= 0.02, "{s}");
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(m.paused.seconds() == s);
    }

    #[test]
    fn gateway_errors_map_to_classes() {
        assert_eq!(gateway_error_class(&TunnelError::Blocked), None);
        assert_eq!(
            gateway_error_class(&TunnelError::PayloadRefused { len: 1 }),
            Some(ErrorClass::TooLarge)
        );
        assert_eq!(
            gateway_error_class(&TunnelError::UnknownType),
            Some(ErrorClass::Decode)
        );
        assert_eq!(
            gateway_error_class(&TunnelError::UnknownStream),
            Some(ErrorClass::UnknownStream)
        );
    }
}
