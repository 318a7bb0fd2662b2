//! Agent metrics (Prometheus text format) and the `--metrics-listen` HTTP endpoint serving
//! `/metrics` and `/healthz`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tether_core::relay::Stats;
use tether_core::request::RequestStats;
use tokio::net::TcpListener;

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

    /// The Prometheus text exposition of every counter.
    #[must_use]
    pub fn render(&self) -> String {
        let r = self.relay();
        let q = *self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
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
        metric(
            "tether_agent_tunnel_connected",
            "gauge",
            "1 when the tunnel is up and registered.",
            u64::from(self.connected.load(Ordering::Relaxed)),
        );
        out
    }
}

/// Binds `addr` and serves `/metrics` and `/healthz` in a background task; returns the bound
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
        (_, "/metrics" | "/healthz") => (
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
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
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
