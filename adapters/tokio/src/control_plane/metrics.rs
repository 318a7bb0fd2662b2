//! Control-plane counters, exported at `/metrics` in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use tether_core::gateway::Stats;

/// Process-wide counters; tunnels add their gateway's [`Stats`] deltas.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Registered agent tunnels.
    pub agents_connected: AtomicI64,
    /// Live streams and requests (all tunnels).
    pub streams_active: AtomicI64,
    streams_opened: AtomicU64,
    requests_opened: AtomicU64,
    streams_failed: AtomicU64,
    bytes_to_agent: AtomicU64,
    bytes_to_client: AtomicU64,
    bad_messages: AtomicU64,
    tunnel_pauses: AtomicU64,
    /// Requests refused before reaching a tunnel (bad token, no agent, bad request).
    pub refused: AtomicU64,
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
    }

    /// The Prometheus text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let g = |a: &AtomicI64| a.load(Ordering::Relaxed).to_string();
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        metric(
            "tether_agents_connected",
            "gauge",
            "Registered agent tunnels.",
            g(&self.agents_connected),
        );
        metric(
            "tether_streams_active",
            "gauge",
            "Live streams and requests.",
            g(&self.streams_active),
        );
        metric(
            "tether_websocket_streams_total",
            "counter",
            "WebSocket streams opened.",
            c(&self.streams_opened),
        );
        metric(
            "tether_http_requests_total",
            "counter",
            "HTTP requests forwarded.",
            c(&self.requests_opened),
        );
        metric(
            "tether_streams_failed_total",
            "counter",
            "Streams and requests that failed before starting.",
            c(&self.streams_failed),
        );
        metric(
            "tether_bytes_to_agent_total",
            "counter",
            "Payload bytes sent toward agents.",
            c(&self.bytes_to_agent),
        );
        metric(
            "tether_bytes_to_client_total",
            "counter",
            "Payload bytes sent toward clients.",
            c(&self.bytes_to_client),
        );
        metric(
            "tether_agent_bad_messages_total",
            "counter",
            "Agent messages rejected.",
            c(&self.bad_messages),
        );
        metric(
            "tether_tunnel_pauses_total",
            "counter",
            "Tunnel read pauses (head-of-line blocking).",
            c(&self.tunnel_pauses),
        );
        metric(
            "tether_refused_requests_total",
            "counter",
            "Client requests refused before reaching an agent.",
            c(&self.refused),
        );
        out
    }
}
