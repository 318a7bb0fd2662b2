//! Agent metrics (Prometheus text format) and the `--metrics-listen` HTTP endpoint serving
//! `/metrics`, `/healthz` (the process answers) and `/readyz` (the tunnel is registered and the
//! agent is not draining: 200, else 503 with the reason).
//!
//! Also the building blocks both runtimes share (the control plane's `/metrics` uses them too):
//! stream gauges and duration histograms per `StreamKind`, error counters per `ErrorClass`,
//! a `PauseClock` for time the tunnel reader spent paused, and an `Exposition` writer that
//! emits every family's `# HELP` and `# TYPE` exactly once.

use std::collections::HashMap;
use std::fmt::{Display, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tether_core::relay::{Stats, TunnelError};
use tether_core::request::RequestStats;
use tokio::net::TcpListener;

use super::AgentRelay;

// -------------------------------------------------------------------------------------------------
// Shared building blocks

/// What a stream carries: the `kind` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamKind {
    /// A relayed WebSocket (exec, attach, port-forward, watch over WebSocket).
    WebSocket,
    /// A plain HTTP request and its response.
    Http,
    /// A raw TCP forward.
    Tcp,
}

impl StreamKind {
    const ALL: [Self; 3] = [Self::WebSocket, Self::Http, Self::Tcp];

    fn label(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::Http => "http",
            Self::Tcp => "tcp",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds (seconds) of the stream duration histogram buckets; `+Inf` is implied.
pub(crate) const DURATION_BUCKETS: [f64; 7] = [0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0];

/// A Prometheus histogram of durations with [`DURATION_BUCKETS`].
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    /// Observations per bucket, not cumulative; the last slot is `(3600, +Inf)`.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = DURATION_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Live streams and stream durations, per kind.
#[derive(Debug, Default)]
pub(crate) struct StreamStats {
    active: [AtomicI64; 3],
    durations: [Histogram; 3],
}

impl StreamStats {
    /// Streams of every kind live now.
    pub(crate) fn live(&self) -> i64 {
        self.active.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }
    /// Counts a stream of `kind` as live until the returned guard is dropped, which records its
    /// duration.
    pub(crate) fn start(self: &Arc<Self>, kind: StreamKind) -> StreamLife {
        self.active[kind.index()].fetch_add(1, Ordering::Relaxed);
        StreamLife {
            stats: self.clone(),
            kind,
            since: Instant::now(),
        }
    }

    pub(crate) fn render(&self, out: &mut Exposition) {
        out.header(
            "tether_streams_active",
            "gauge",
            "Streams live right now, by kind.",
        );
        for kind in StreamKind::ALL {
            let v = self.active[kind.index()].load(Ordering::Relaxed);
            out.sample("tether_streams_active", &[("kind", kind.label())], v);
        }
        out.header(
            "tether_stream_duration_seconds",
            "histogram",
            "How long streams lived, observed when they end, by kind.",
        );
        for kind in StreamKind::ALL {
            out.histogram(
                "tether_stream_duration_seconds",
                ("kind", kind.label()),
                &self.durations[kind.index()],
            );
        }
    }
}

/// One live stream (see [`StreamStats::start`]).
#[derive(Debug)]
pub(crate) struct StreamLife {
    stats: Arc<StreamStats>,
    kind: StreamKind,
    since: Instant,
}

impl Drop for StreamLife {
    fn drop(&mut self) {
        let i = self.kind.index();
        self.stats.active[i].fetch_sub(1, Ordering::Relaxed);
        self.stats.durations[i].observe(self.since.elapsed());
    }
}

/// Error classes: the `class` label of `tether_errors_total`.
///
/// The first five split the rejected tunnel messages (`bad_message`): see [`relay_error_class`]
/// and `control_plane::metrics::gateway_error_class`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// A tunnel message that does not parse: bad JSON, bad frame, unknown type, bad stream id.
    Decode,
    /// A tunnel message (or its data) over the size limit.
    TooLarge,
    /// A tunnel message for a stream that does not exist.
    UnknownStream,
    /// A well-formed tunnel message refused: duplicate stream, no free slot, forbidden request,
    /// message not fitting the stream's state, a native frame of the wrong direction.
    Refused,
    /// Native mode flow control violated: data for a stream whose sender had no credit left.
    Flow,
    /// An upstream dial or exchange failed (agent: the Kubernetes API; control plane: the agent
    /// reported a 502/504).
    Upstream,
    /// A token was refused.
    Auth,
    /// The tunnel could not be dialled, or its connection failed.
    Tunnel,
}

impl ErrorClass {
    const ALL: [Self; 8] = [
        Self::Decode,
        Self::TooLarge,
        Self::UnknownStream,
        Self::Refused,
        Self::Flow,
        Self::Upstream,
        Self::Auth,
        Self::Tunnel,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Decode => "decode",
            Self::TooLarge => "too_large",
            Self::UnknownStream => "unknown_stream",
            Self::Refused => "refused",
            Self::Flow => "flow",
            Self::Upstream => "upstream",
            Self::Auth => "auth",
            Self::Tunnel => "tunnel",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How often the ring gauges may walk every stream's rings: they are sampled after a step of
/// the session (or tunnel) task at most this often, and at the latest on its next timer (the
/// tunnel ping), instead of on every message.
pub(crate) const RING_SAMPLE: Duration = Duration::from_millis(100);

/// When the ring gauges were last sampled.
#[derive(Debug, Default)]
pub(crate) struct RingSampler(Option<Instant>);

impl RingSampler {
    /// Whether to sample now (and if so, the clock restarts).
    pub(crate) fn due(&mut self) -> bool {
        let now = Instant::now();
        if self
            .0
            .is_some_and(|last| now.duration_since(last) < RING_SAMPLE)
        {
            return false;
        }
        self.0 = Some(now);
        true
    }
}

/// The class of a tunnel message the relay rejected; `None` for "not consumed, hand it in again"
/// (`Blocked`, `ScratchTooSmall`), which are not errors.
#[must_use]
pub(crate) fn relay_error_class(e: &TunnelError) -> Option<ErrorClass> {
    Some(match e {
        TunnelError::Blocked | TunnelError::ScratchTooSmall { .. } => return None,
        TunnelError::TooLarge { .. } | TunnelError::PayloadRefused { .. } => ErrorClass::TooLarge,
        TunnelError::Decode(_)
        | TunnelError::Frame(_)
        | TunnelError::Native(_)
        | TunnelError::UnknownType
        | TunnelError::StreamId(_) => ErrorClass::Decode,
        TunnelError::UnknownStream => ErrorClass::UnknownStream,
        TunnelError::DuplicateStream
        | TunnelError::TooManyStreams
        | TunnelError::Request(_)
        | TunnelError::UnexpectedFrame(_) => ErrorClass::Refused,
        TunnelError::Credit(_) | TunnelError::Ack(_) => ErrorClass::Flow,
    })
}

/// Counters per [`ErrorClass`].
#[derive(Debug, Default)]
pub(crate) struct ErrorCounts([AtomicU64; 8]);

impl ErrorCounts {
    pub(crate) fn add(&self, class: ErrorClass, n: u64) {
        self.0[class.index()].fetch_add(n, Ordering::Relaxed);
    }

    /// Renders `tether_errors_total`; `extra(class)` is added to the stored count (counters kept
    /// elsewhere).
    pub(crate) fn render(&self, out: &mut Exposition, extra: impl Fn(ErrorClass) -> u64) {
        out.header(
            "tether_errors_total",
            "counter",
            "Errors by class: rejected tunnel messages (decode, too_large, unknown_stream, refused, flow), upstream, auth, tunnel.",
        );
        for class in ErrorClass::ALL {
            let v = self.0[class.index()].load(Ordering::Relaxed) + extra(class);
            out.sample("tether_errors_total", &[("class", class.label())], v);
        }
    }
}

/// Total time tunnel readers spent paused, keyed per tunnel (the agent has one: key 0).
#[derive(Debug, Default)]
pub(crate) struct PauseClock {
    since: Mutex<HashMap<u64, Instant>>,
    total_micros: AtomicU64,
}

impl PauseClock {
    /// Records whether tunnel `key`'s reader is paused now; repeated calls are harmless.
    pub(crate) fn set(&self, key: u64, paused: bool) {
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        if paused {
            since.entry(key).or_insert_with(Instant::now);
        } else if let Some(t) = since.remove(&key) {
            let micros = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.total_micros.fetch_add(micros, Ordering::Relaxed);
        }
    }

    /// Seconds paused so far, including pauses still in progress.
    pub(crate) fn seconds(&self) -> f64 {
        let since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        let ongoing: u128 = since.values().map(|t| t.elapsed().as_micros()).sum();
        let total = u128::from(self.total_micros.load(Ordering::Relaxed)) + ongoing;
        micros_to_secs(u64::try_from(total).unwrap_or(u64::MAX))
    }
}

/// Microseconds as (fractional) seconds.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn micros_to_secs(micros: u64) -> f64 {
    micros as f64 / 1e6
}

/// Renders `tether_blocked_seconds_total`.
pub(crate) fn render_blocked(out: &mut Exposition, tunnel_paused: f64, credit: f64) {
    out.header(
        "tether_blocked_seconds_total",
        "counter",
        "Seconds spent blocked: tunnel_paused = tunnel reader paused (head-of-line blocking), credit = stream time with data queued but no credit.",
    );
    out.sample(
        "tether_blocked_seconds_total",
        &[("reason", "tunnel_paused")],
        tunnel_paused,
    );
    out.sample(
        "tether_blocked_seconds_total",
        &[("reason", "credit")],
        credit,
    );
}

/// Renders `tether_ring_messages` and `tether_ring_bytes`.
pub(crate) fn render_rings(out: &mut Exposition, messages: usize, bytes: usize) {
    out.single(
        "tether_ring_messages",
        "gauge",
        "Messages queued in the protocol core's stream rings.",
        messages,
    );
    out.single(
        "tether_ring_bytes",
        "gauge",
        "Payload bytes queued in the protocol core's stream rings.",
        bytes,
    );
}

/// Renders `tether_tunnel_in_flight_bytes` and `tether_tunnel_bulk_limit_bytes` (the bulk
/// window of the native tunnels, extension `native_ack`).
pub(crate) fn render_window(out: &mut Exposition, in_flight: u64, limit: u64) {
    out.single(
        "tether_tunnel_in_flight_bytes",
        "gauge",
        "Data bytes sent on native tunnels and not yet acknowledged by the other end.",
        in_flight,
    );
    out.single(
        "tether_tunnel_bulk_limit_bytes",
        "gauge",
        "Limit on bulk bytes in flight on native tunnels (twice the measured bandwidth-delay product).",
        limit,
    );
}

/// Renders `tether_wire_mode`.
pub(crate) fn render_wire_mode(out: &mut Exposition, native: u64, compat: u64, help: &str) {
    out.header("tether_wire_mode", "gauge", help);
    out.sample("tether_wire_mode", &[("mode", "native")], native);
    out.sample("tether_wire_mode", &[("mode", "compat")], compat);
}

/// Renders `tether_stream_bytes_total`.
pub(crate) fn render_bytes(out: &mut Exposition, help: &str, directions: [(&str, u64); 2]) {
    out.header("tether_stream_bytes_total", "counter", help);
    for (direction, v) in directions {
        out.sample("tether_stream_bytes_total", &[("direction", direction)], v);
    }
}

/// A Prometheus text exposition being written.
#[derive(Debug, Default)]
pub(crate) struct Exposition {
    out: String,
}

impl Exposition {
    /// `# HELP` and `# TYPE` of a family; write its samples next.
    pub(crate) fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample.
    pub(crate) fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family with one unlabelled sample.
    pub(crate) fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.header(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The `_bucket` (cumulative, with `+Inf`), `_sum` and `_count` samples of one histogram.
    pub(crate) fn histogram(&mut self, name: &str, label: (&str, &str), h: &Histogram) {
        let mut cumulative = 0;
        let bucket = format!("{name}_bucket");
        for (i, le) in DURATION_BUCKETS.iter().enumerate() {
            cumulative += h.buckets[i].load(Ordering::Relaxed);
            let le = le.to_string();
            self.sample(&bucket, &[label, ("le", &le)], cumulative);
        }
        // `+Inf` is the count, so the buckets never disagree with it.
        let count = h.count.load(Ordering::Relaxed);
        self.sample(&bucket, &[label, ("le", "+Inf")], count);
        let sum = micros_to_secs(h.sum_micros.load(Ordering::Relaxed));
        self.sample(&format!("{name}_sum"), &[label], sum);
        self.sample(&format!("{name}_count"), &[label], count);
    }

    pub(crate) fn finish(self) -> String {
        self.out
    }
}

/// Checks `text` is a valid Prometheus text exposition as written here: every line a comment or
/// `name{labels} value` with a float value, every family with one `# HELP` and one `# TYPE`
/// before its samples, every sample belonging to a declared family.
#[cfg(test)]
pub(crate) fn check_exposition(text: &str) -> Result<(), String> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut help: HashMap<String, usize> = HashMap::new();
    let mut kinds: HashMap<String, String> = HashMap::new();
    let mut types: HashMap<String, usize> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            if !valid_name(name) {
                return Err(bad("bad family name"));
            }
            *help.entry(name.to_string()).or_default() += 1;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (Some(name), Some(kind), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad("bad TYPE line"));
            };
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(bad("bad type"));
            }
            if help.get(name).copied().unwrap_or(0) == 0 {
                return Err(bad("TYPE before HELP"));
            }
            *types.entry(name.to_string()).or_default() += 1;
            kinds.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| bad("no value"))?;
        let ok_value = value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value);
        if !ok_value {
            return Err(bad("value is not a float"));
        }
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .ok_or_else(|| bad("unclosed labels"))?;
                for pair in labels.split(',') {
                    let (k, v) = pair.split_once('=').ok_or_else(|| bad("bad label"))?;
                    if !valid_name(k) || k.contains(':') {
                        return Err(bad("bad label name"));
                    }
                    let inner = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .ok_or_else(|| bad("unquoted label value"))?;
                    if inner.contains(['"', '\\', '\n']) {
                        return Err(bad("unescaped label value"));
                    }
                }
                name
            }
            None => series,
        };
        if !valid_name(name) {
            return Err(bad("bad metric name"));
        }
        let family = [name, ""]
            .into_iter()
            .chain(
                ["_bucket", "_sum", "_count"]
                    .into_iter()
                    .filter_map(|s| name.strip_suffix(s)),
            )
            .find(|f| !f.is_empty() && kinds.contains_key(*f))
            .ok_or_else(|| bad("sample of an undeclared family"))?;
        if family != name && kinds[family] != "histogram" && kinds[family] != "summary" {
            return Err(bad("suffixed sample of a non-histogram family"));
        }
    }
    for (name, n) in &help {
        if *n != 1 || types.get(name) != Some(&1) {
            return Err(format!(
                "family {name}: {n} HELP, {:?} TYPE lines",
                types.get(name)
            ));
        }
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------------
// The agent's metrics

/// Counters of one agent. The relay's and the request table's own counters are copied in after
/// every step of the session task; the adapter adds byte counts, reconnects and dial failures.
#[derive(Debug, Default)]
pub struct Metrics {
    relay: Mutex<Stats>,
    requests: Mutex<RequestStats>,
    /// Payload bytes written to upstream WebSockets (tunnel to Kubernetes).
    pub bytes_to_upstream: AtomicU64,
    /// Payload bytes queued for the tunnel from upstream WebSockets (Kubernetes to tunnel).
    pub bytes_to_tunnel: AtomicU64,
    /// HTTP response body bytes relayed to the tunnel.
    pub response_bytes: AtomicU64,
    /// Tunnel connections lost after being established.
    pub reconnects: AtomicU64,
    /// Failed tunnel dials (network, TLS, HTTP status).
    pub dial_failures: AtomicU64,
    /// Dials refused with 401/403.
    pub auth_failures: AtomicU64,
    /// Upstream dials or exchanges that failed.
    pub upstream_errors: AtomicU64,
    /// Whether a tunnel is up and registered.
    pub connected: AtomicBool,
    /// Whether the agent is shutting down (SIGTERM): no new streams, live ones finishing.
    pub draining: AtomicBool,
    /// Tunnel connections lost after the control plane accepted the registration.
    pub tunnel_reconnects: AtomicU64,
    streams: Arc<StreamStats>,
    errors: ErrorCounts,
    paused: PauseClock,
    ring_messages: AtomicU64,
    ring_bytes: AtomicU64,
    window_in_flight: AtomicU64,
    window_limit: AtomicU64,
    native: AtomicBool,
}

impl Metrics {
    /// Records the relay's counters.
    pub fn set_relay(&self, stats: Stats) {
        *self.relay.lock().unwrap_or_else(|p| p.into_inner()) = stats;
    }

    /// Records the request table's counters.
    pub fn set_requests(&self, stats: RequestStats) {
        *self.requests.lock().unwrap_or_else(|p| p.into_inner()) = stats;
    }

    /// The relay's counters as last recorded.
    pub fn relay(&self) -> Stats {
        *self.relay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the relay's counters, ring occupancy and wire mode, and whether the session has
    /// stopped reading the tunnel (`paused`, timed for `tether_blocked_seconds_total`). Called after
    /// every step of the session task.
    pub(crate) fn observe_relay(&self, relay: &AgentRelay, paused: bool, rings: bool) {
        self.set_relay(relay.stats());
        self.paused.set(0, paused);
        self.native.store(relay.is_native(), Ordering::Relaxed);
        if !rings {
            return;
        }
        let ring = relay.ring_occupancy();
        let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        self.ring_messages
            .store(as_u64(ring.messages), Ordering::Relaxed);
        self.ring_bytes.store(as_u64(ring.bytes), Ordering::Relaxed);
        let (in_flight, limit) = relay.bulk_window();
        let native = relay.is_native() && relay.extensions().native_ack;
        self.window_in_flight.store(in_flight, Ordering::Relaxed);
        self.window_limit
            .store(if native { limit } else { 0 }, Ordering::Relaxed);
    }

    /// The session ended: tunnel reading is no longer paused; `registered` says whether the control
    /// plane had accepted it (then it counts as a reconnect); `failed` whether it ended by a
    /// failure (read/write error, silence) rather than the control plane's close.
    /// Ready (for a Kubernetes readiness probe) while the tunnel is registered and the agent is
    /// not draining; otherwise why not.
    ///
    /// # Errors
    /// The reason, one line.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Relaxed) {
            Err("draining (shutting down)")
        } else if !self.connected.load(Ordering::Relaxed) {
            Err("the tunnel is not registered with the control plane")
        } else {
            Ok(())
        }
    }

    pub(crate) fn session_ended(&self, registered: bool, failed: bool) {
        self.paused.set(0, false);
        self.ring_messages.store(0, Ordering::Relaxed);
        self.ring_bytes.store(0, Ordering::Relaxed);
        self.window_in_flight.store(0, Ordering::Relaxed);
        self.window_limit.store(0, Ordering::Relaxed);
        if registered {
            self.tunnel_reconnects.fetch_add(1, Ordering::Relaxed);
        }
        if failed {
            self.errors.add(ErrorClass::Tunnel, 1);
        }
    }

    /// A tunnel dial failed (not refused for the token: see `auth_failures`).
    pub(crate) fn tunnel_dial_failed(&self) {
        self.errors.add(ErrorClass::Tunnel, 1);
    }

    /// Counts a tunnel message the relay rejected, by class.
    pub(crate) fn tunnel_error(&self, e: &TunnelError) {
        if let Some(class) = relay_error_class(e) {
            self.errors.add(class, 1);
        }
    }

    /// Counts a stream of `kind` as live until the guard is dropped.
    pub(crate) fn stream_life(&self, kind: StreamKind) -> StreamLife {
        self.streams.start(kind)
    }

    /// `fut`, counted as a live stream of `kind` until it completes or is dropped.
    pub(crate) fn timed<F: Future>(
        &self,
        kind: StreamKind,
        fut: F,
    ) -> impl Future<Output = F::Output> + use<F> {
        let life = self.stream_life(kind);
        async move {
            let out = fut.await;
            drop(life);
            out
        }
    }

    /// The Prometheus text exposition of every counter.
    #[must_use]
    pub fn render(&self) -> String {
        let r = self.relay();
        let q = *self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = Exposition::default();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            out.single(name, kind, help, value);
        };
        metric(
            "tether_agent_streams_opened_total",
            "counter",
            "WebSocket streams started.",
            r.streams_opened,
        );
        metric(
            "tether_agent_streams_closed_total",
            "counter",
            "WebSocket streams finished.",
            r.streams_closed,
        );
        metric(
            "tether_agent_streams_open",
            "gauge",
            "WebSocket streams live.",
            r.streams_opened.saturating_sub(r.streams_closed),
        );
        metric(
            "tether_agent_bytes_to_upstream_total",
            "counter",
            "Payload bytes relayed from the tunnel to Kubernetes WebSockets.",
            load(&self.bytes_to_upstream),
        );
        metric(
            "tether_agent_bytes_to_tunnel_total",
            "counter",
            "Payload bytes relayed from Kubernetes WebSockets to the tunnel.",
            load(&self.bytes_to_tunnel),
        );
        metric(
            "tether_agent_response_bytes_total",
            "counter",
            "HTTP response body bytes relayed to the tunnel.",
            load(&self.response_bytes),
        );
        metric(
            "tether_agent_tunnel_pauses_total",
            "counter",
            "Times tunnel reading paused because a stream was full (head-of-line blocking).",
            r.tunnel_pauses,
        );
        metric(
            "tether_agent_bad_messages_total",
            "counter",
            "Tunnel messages rejected as malformed or refused.",
            r.bad_messages,
        );
        metric(
            "tether_agent_discarded_messages_total",
            "counter",
            "Queued messages discarded because their destination closed first.",
            r.discarded_messages,
        );
        metric(
            "tether_agent_upstream_errors_total",
            "counter",
            "Kubernetes API dials or exchanges that failed.",
            load(&self.upstream_errors),
        );
        metric(
            "tether_agent_requests_started_total",
            "counter",
            "proxy_requests accepted.",
            q.started,
        );
        metric(
            "tether_agent_requests_refused_total",
            "counter",
            "proxy_requests refused before any upstream work.",
            q.refused,
        );
        metric(
            "tether_agent_requests_cancelled_total",
            "counter",
            "proxy_requests cancelled by the control plane.",
            q.cancelled,
        );
        metric(
            "tether_agent_requests_timed_out_total",
            "counter",
            "proxy_requests that timed out.",
            q.timed_out,
        );
        metric(
            "tether_agent_reconnects_total",
            "counter",
            "Tunnel connections lost after being established.",
            load(&self.reconnects),
        );
        metric(
            "tether_agent_dial_failures_total",
            "counter",
            "Failed dials of the control plane.",
            load(&self.dial_failures),
        );
        metric(
            "tether_agent_auth_failures_total",
            "counter",
            "Dials refused by the control plane with 401 or 403.",
            load(&self.auth_failures),
        );
        let connected = self.connected.load(Ordering::Relaxed);
        metric(
            "tether_agent_tunnel_connected",
            "gauge",
            "1 when the tunnel is up and registered.",
            u64::from(connected),
        );
        metric(
            "tether_agent_draining",
            "gauge",
            "1 while the agent shuts down: it takes no new streams and lets live ones finish.",
            u64::from(self.draining.load(Ordering::Relaxed)),
        );
        metric(
            "tether_tunnel_reconnects_total",
            "counter",
            "Tunnel connections lost after the control plane accepted the registration.",
            load(&self.tunnel_reconnects),
        );
        self.streams.render(&mut out);
        render_bytes(
            &mut out,
            "Stream payload bytes: to_upstream = tunnel to Kubernetes WebSockets, to_tunnel = Kubernetes WebSockets to the tunnel.",
            [
                ("to_upstream", load(&self.bytes_to_upstream)),
                ("to_tunnel", load(&self.bytes_to_tunnel)),
            ],
        );
        self.errors.render(&mut out, |class| match class {
            ErrorClass::Upstream => load(&self.upstream_errors),
            ErrorClass::Auth => load(&self.auth_failures),
            _ => 0,
        });
        render_blocked(
            &mut out,
            self.paused.seconds(),
            micros_to_secs(r.credit_blocked_micros),
        );
        render_rings(
            &mut out,
            usize::try_from(load(&self.ring_messages)).unwrap_or(usize::MAX),
            usize::try_from(load(&self.ring_bytes)).unwrap_or(usize::MAX),
        );
        render_window(
            &mut out,
            load(&self.window_in_flight),
            load(&self.window_limit),
        );
        let native = connected && self.native.load(Ordering::Relaxed);
        render_wire_mode(
            &mut out,
            u64::from(native),
            u64::from(connected && !native),
            "1 for the wire mode of the connected tunnel (both 0 while disconnected).",
        );
        out.finish()
    }
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` in a background task; returns the bound
/// address.
///
/// # Errors
/// One line when the address cannot be bound.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr, String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on --metrics-listen {addr}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("cannot read the metrics address: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&req, &metrics)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn answer<B>(req: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        ("GET", "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") => match metrics.readiness() {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        (_, "/metrics" | "/healthz" | "/readyz") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_registered_and_not_draining() {
        let m = Metrics::default();
        let status = |m: &Metrics| {
            let req = Request::get("/readyz").body(()).unwrap();
            answer(&req, m).status()
        };
        assert!(m.readiness().unwrap_err().contains("not registered"));
        assert_eq!(status(&m), StatusCode::SERVICE_UNAVAILABLE);
        m.connected.store(true, Ordering::Relaxed);
        assert_eq!(m.readiness(), Ok(()));
        assert_eq!(status(&m), StatusCode::OK);
        m.draining.store(true, Ordering::Relaxed);
        assert!(m.readiness().unwrap_err().contains("draining"));
        assert_eq!(status(&m), StatusCode::SERVICE_UNAVAILABLE);
        assert!(m.render().contains("tether_agent_draining 1"));
    }

    #[test]
    fn render_shows_relay_and_adapter_counters() {
        let m = Metrics::default();
        m.set_relay(Stats {
            streams_opened: 3,
            streams_closed: 1,
            tunnel_pauses: 2,
            ..Stats::default()
        });
        m.bytes_to_tunnel.store(1234, Ordering::Relaxed);
        m.reconnects.store(5, Ordering::Relaxed);
        let text = m.render();
        for line in [
            "tether_agent_streams_opened_total 3",
            "tether_agent_streams_closed_total 1",
            "tether_agent_streams_open 2",
            "tether_agent_tunnel_pauses_total 2",
            "tether_agent_bytes_to_tunnel_total 1234",
            "tether_agent_reconnects_total 5",
            "tether_agent_tunnel_connected 0",
            "# TYPE tether_agent_bytes_to_upstream_total counter",
            "tether_stream_bytes_total{direction=\"to_tunnel\"} 1234",
            "tether_stream_bytes_total{direction=\"to_upstream\"} 0",
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
    fn render_is_valid_prometheus_text() {
        let m = Metrics::default();
        m.connected.store(true, Ordering::Relaxed);
        m.upstream_errors.store(2, Ordering::Relaxed);
        m.tunnel_error(&TunnelError::UnknownStream);
        m.tunnel_error(&TunnelError::Blocked);
        m.session_ended(true, true);
        m.paused.set(0, true);
        drop(m.stream_life(StreamKind::WebSocket));
        let _live = m.stream_life(StreamKind::Http);
        let text = m.render();
        check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        for family in [
            "tether_streams_active",
            "tether_stream_duration_seconds",
            "tether_stream_bytes_total",
            "tether_errors_total",
            "tether_blocked_seconds_total",
            "tether_ring_messages",
            "tether_ring_bytes",
            "tether_tunnel_reconnects_total",
            "tether_wire_mode",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family} missing\n{text}"
            );
        }
        for line in [
            "tether_streams_active{kind=\"websocket\"} 0",
            "tether_streams_active{kind=\"http\"} 1",
            "tether_streams_active{kind=\"tcp\"} 0",
            "tether_stream_duration_seconds_bucket{kind=\"websocket\",le=\"0.01\"} 1",
            "tether_stream_duration_seconds_bucket{kind=\"websocket\",le=\"+Inf\"} 1",
            "tether_stream_duration_seconds_count{kind=\"websocket\"} 1",
            "tether_stream_duration_seconds_count{kind=\"http\"} 0",
            "tether_errors_total{class=\"unknown_stream\"} 1",
            "tether_errors_total{class=\"upstream\"} 2",
            "tether_errors_total{class=\"tunnel\"} 1",
            "tether_errors_total{class=\"decode\"} 0",
            "tether_tunnel_reconnects_total 1",
            "tether_wire_mode{mode=\"compat\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        for ms in [5, 50, 500, 5_000, 7_200_000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut out = Exposition::default();
        out.header("x_seconds", "histogram", "x.");
        out.histogram("x_seconds", ("kind", "k"), &h);
        let text = out.finish();
        check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let counts: Vec<u64> = text
            .lines()
            .filter(|l| l.starts_with("x_seconds_bucket"))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
            .collect();
        assert_eq!(counts, [1, 2, 3, 4, 4, 4, 4, 5], "{text}");
        assert!(text.contains("x_seconds_count{kind=\"k\"} 5"), "{text}");
        assert!(
            text.contains("x_seconds_sum{kind=\"k\"} 7205.555"),
            "{text}"
        );
    }

    #[test]
    fn pause_clock_counts_ongoing_and_finished_pauses() {
        let c = PauseClock::default();
        assert!(c.seconds() == 0.0);
        c.set(1, true);
        c.set(1, true);
        std::thread::sleep(Duration::from_millis(20));
        let ongoing = c.seconds();
        assert!(ongoing >= 0.02, "{ongoing}");
        c.set(1, false);
        c.set(1, false);
        let done = c.seconds();
        assert!(done >= ongoing, "{done}");
        std::thread::sleep(Duration::from_millis(5));
        assert!(c.seconds() == done);
    }

    #[test]
    fn checker_rejects_bad_text() {
        let ok = "# HELP a A.\n# TYPE a counter\na 1\n";
        assert!(check_exposition(ok).is_ok());
        for bad in [
            "a 1\n",
            "# HELP a A.\n# TYPE a counter\na one\n",
            "# HELP a A.\n# TYPE a counter\n# HELP a A.\n# TYPE a counter\na 1\n",
            "# HELP a A.\n# TYPE a counter\na{k=v} 1\n",
            "# HELP a A.\n# TYPE a counter\na_sum 1\n",
            "# HELP a A.\na 1\n",
        ] {
            assert!(check_exposition(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn relay_errors_map_to_classes() {
        assert_eq!(relay_error_class(&TunnelError::Blocked), None);
        assert_eq!(
            relay_error_class(&TunnelError::ScratchTooSmall { needed: 1 }),
            None
        );
        assert_eq!(
            relay_error_class(&TunnelError::TooLarge { len: 2, max: 1 }),
            Some(ErrorClass::TooLarge)
        );
        assert_eq!(
            relay_error_class(&TunnelError::UnknownType),
            Some(ErrorClass::Decode)
        );
        assert_eq!(
            relay_error_class(&TunnelError::UnknownStream),
            Some(ErrorClass::UnknownStream)
        );
        assert_eq!(
            relay_error_class(&TunnelError::TooManyStreams),
            Some(ErrorClass::Refused)
        );
    }

    #[test]
    fn routes() {
        let m = Metrics::default();
        let get = |path: &str| Request::get(path).body(()).unwrap();
        assert_eq!(answer(&get("/metrics"), &m).status(), StatusCode::OK);
        assert_eq!(answer(&get("/healthz"), &m).status(), StatusCode::OK);
        assert_eq!(answer(&get("/other"), &m).status(), StatusCode::NOT_FOUND);
        let post = Request::post("/metrics").body(()).unwrap();
        assert_eq!(answer(&post, &m).status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
