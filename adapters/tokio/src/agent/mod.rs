//! The agent runtime: dials the control plane, runs one session per connection on tether-core's
//! [`tether_core::relay::Relay`] (WebSocket streams) and
//! [`tether_core::request::Requests`] (HTTP requests), and reconnects with full-jitter
//! backoff.
//!
//! Contract:
//! * Every connection sends `register` first and runs the core's timers (ping every 10 s,
//!   heartbeat every 30 s once registered, 60 s of silence = dead tunnel); the adapter only sleeps,
//!   reads and writes.
//! * A lost connection closes every stream (upstreams get close 1001) and abandons every request;
//!   the next dial waits a full-jitter delay (0.5 s doubling to 60 s, reset once a session
//!   registered).
//! * A 401 or 403 from the control plane is logged once, in one line, and retried every
//!   [`AgentConfig::unauthorized_retry`] (default: about the backoff cap), never in a hot loop.
//! * Tokens are never logged.
//! * Shutdown ([`Agent::run_until`]): the agent stops taking new streams (503 to the control
//!   plane, which a Tether control plane learns from a `draining` heartbeat and stops sending),
//!   lets live ones finish within [`AgentConfig::shutdown_grace`], then closes what is left with
//!   1001 and a clear reason, and exits. `/readyz` is 503 from the first moment.

mod driver;
mod exchanges;
mod http;
pub mod metrics;
pub mod proxy;
mod raw_upgrade;
mod session;
pub mod tunnel;
mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tether_core::relay::{Config as RelayConfig, Relay, SessionInfo};
use tether_core::request::{Config as RequestConfig, Requests};
use tether_core::time::Instant;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::kube::KubeTarget;

pub use crate::buf::Buf;
pub use metrics::Metrics;
pub use tunnel::{DialError, TunnelTarget, TunnelToken};

/// Default time live streams get to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// Default delay before retrying a dial the control plane refused with 401/403: the backoff cap.
pub const UNAUTHORIZED_RETRY: Duration = Duration::from_secs(60);

/// Concurrent WebSocket streams per agent. The relay's table and rings live on the heap and grow
/// with use (tether-core's `alloc` feature), so the capacity costs nothing until streams open.
pub const MAX_STREAMS: usize = 16_384;
/// Concurrent HTTP requests per agent.
pub const MAX_REQUESTS: usize = 256;

/// The relay the agent runs: [`MAX_STREAMS`] streams, default ring of 100 messages.
pub type AgentRelay = Relay<Buf, MAX_STREAMS>;
/// The request table the agent runs.
pub type AgentRequests = Requests<MAX_REQUESTS>;

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The control plane.
    pub tunnel: TunnelTarget,
    /// Other replicas of the control plane: after a failed dial or a lost tunnel the agent dials
    /// the next one (`tunnel`, then these, then `tunnel` again), so a replica that dies costs its
    /// agents one backoff delay.
    pub alternates: Vec<TunnelTarget>,
    /// The Kubernetes API.
    pub kube: KubeTarget,
    /// Where to serve `/metrics` and `/healthz`, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Relay tunables (timers, rings, message limit).
    pub relay: RelayConfig,
    /// Request tunables.
    pub requests: RequestConfig,
    /// `agent_id` sent in `register` and `heartbeat`.
    pub agent_id: String,
    /// `name` sent in `register`.
    pub name: String,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// Delay before retrying after a 401/403.
    pub unauthorized_retry: Duration,
    /// After a shutdown signal, how long live streams may go on before they are closed.
    pub shutdown_grace: Duration,
    /// TCP targets a `tcp_tunnel_start` may dial (`--allow-tcp HOST:PORT`); empty refuses every
    /// TCP tunnel. Hosts compare without ASCII case.
    pub allow_tcp: Vec<TcpTarget>,
}

/// One `--allow-tcp HOST:PORT` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpTarget {
    /// Host name or address, as the control plane names it.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl std::str::FromStr for TcpTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("invalid TCP target {s:?}: expected HOST:PORT"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("invalid TCP target {s:?}: the port must be 1-65535"))?;
        let valid = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c));
        if !valid {
            return Err(format!("invalid TCP target {s:?}: bad host {host:?}"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

impl TcpTarget {
    /// Whether a tunnel to `host:port` matches this entry.
    #[must_use]
    pub fn allows(&self, host: &str, port: u16) -> bool {
        self.port == port
            && self
                .host
                .eq_ignore_ascii_case(host.trim_start_matches('[').trim_end_matches(']'))
    }
}

impl AgentConfig {
    /// Defaults for everything but the two targets; `agent_id` and `name` are the host name.
    #[must_use]
    pub fn new(tunnel: TunnelTarget, kube: KubeTarget) -> Self {
        let host = hostname();
        Self {
            tunnel,
            alternates: Vec::new(),
            kube,
            metrics_listen: None,
            relay: RelayConfig::default(),
            requests: RequestConfig::default(),
            agent_id: host.clone(),
            name: host,
            backoff: Backoff::TUNNEL,
            unauthorized_retry: UNAUTHORIZED_RETRY,
            shutdown_grace: SHUTDOWN_GRACE,
            allow_tcp: Vec::new(),
        }
    }
}

/// The machine's host name (`HOSTNAME`, `/etc/hostname`), or `tether-agent`.
#[must_use]
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tether-agent".to_string())
}

/// State shared by the session and its tasks.
pub(crate) struct Shared {
    pub(crate) kube: Arc<KubeTarget>,
    pub(crate) metrics: Arc<Metrics>,
    /// `--allow-tcp`.
    pub(crate) allow_tcp: Vec<TcpTarget>,
    epoch: tokio::time::Instant,
}

impl Shared {
    /// The core's clock: microseconds since the agent started.
    pub(crate) fn now(&self) -> Instant {
        let micros = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        Instant::from_micros(micros)
    }

    /// A core instant as a tokio deadline.
    pub(crate) fn deadline(&self, t: Instant) -> tokio::time::Instant {
        self.epoch + Duration::from_micros(t.as_micros())
    }
}

/// A shutdown request and its grace period, as the session sees them.
pub(crate) struct Drain {
    /// Resolves once shutdown is asked for; `None` once it has.
    signal: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    grace: Duration,
    /// When what is still live gets closed (set when the signal came).
    deadline: Option<tokio::time::Instant>,
}

impl Drain {
    fn new(signal: impl Future<Output = ()> + Send + 'static, grace: Duration) -> Self {
        Self {
            signal: Some(Box::pin(signal)),
            grace,
            deadline: None,
        }
    }

    /// Whether shutdown was asked for.
    pub(crate) fn requested(&self) -> bool {
        self.signal.is_none()
    }

    /// Completes when shutdown is asked for (once; pending forever after).
    pub(crate) async fn signalled(&mut self) {
        match &mut self.signal {
            Some(signal) => {
                signal.await;
                self.signal = None;
                self.deadline = Some(tokio::time::Instant::now() + self.grace);
            }
            None => std::future::pending().await,
        }
    }

    /// When the grace period ends, once shutdown was asked for.
    pub(crate) fn deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline
    }

    /// The grace period.
    pub(crate) fn grace(&self) -> Duration {
        self.grace
    }
}

/// A configured agent.
pub struct Agent {
    config: AgentConfig,
    metrics: Arc<Metrics>,
}

impl Agent {
    /// An agent that has not dialled yet.
    #[must_use]
    pub fn new(config: AgentConfig) -> Self {
        Self {
            config,
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// Its counters.
    #[must_use]
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves metrics (if configured), then dials, runs and redials forever.
    ///
    /// # Errors
    /// Only a startup failure (the metrics address cannot be bound), as one line.
    pub async fn run(self) -> Result<Infallible, String> {
        self.run_until(std::future::pending()).await?;
        unreachable!("the agent never drains without a shutdown signal")
    }

    /// As [`run`](Self::run) until `shutdown` completes; then drains (see the module docs) and
    /// returns once nothing is live or [`AgentConfig::shutdown_grace`] ran out. Not connected at
    /// that moment: returns at once.
    ///
    /// # Errors
    /// Only a startup failure (the metrics address cannot be bound), as one line.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), String> {
        let Self { config, metrics } = self;
        let mut drain = Drain::new(shutdown, config.shutdown_grace);
        if let Some(addr) = config.metrics_listen {
            let bound = metrics::serve(addr, metrics.clone()).await?;
            info!(addr = %bound, "serving /metrics and /healthz");
        }
        if config.tunnel.is_plaintext() {
            warn!(
                url = config.tunnel.url(),
                "the tunnel is not encrypted (http/ws URL)"
            );
        }
        let relay_config = config.relay;
        // The relay is large (every ring inline): build it on a thread with a big stack so no
        // copy of it ever sits on a tokio worker's stack.
        let (relay, requests) = std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn(move || {
                (
                    Box::new(AgentRelay::new(relay_config)),
                    Box::new(AgentRequests::new(config.requests)),
                )
            })
            .map_err(|e| format!("cannot start: {e}"))?
            .join()
            .map_err(|_| "cannot build the relay".to_string())?;
        let shared = Shared {
            kube: Arc::new(config.kube.clone()),
            metrics: metrics.clone(),
            allow_tcp: config.allow_tcp.clone(),
            epoch: tokio::time::Instant::now(),
        };
        let max_inbound = relay.config().max_message.saturating_mul(2);
        let driver = driver::Driver::new(relay, requests, shared);
        let mut backoff = config.backoff.clone();
        let mut unauthorized_logged = false;
        match config.tunnel.proxy() {
            Some(proxy) => info!(
                url = config.tunnel.url(),
                kube = %config.kube.base_url(),
                %proxy,
                "tether agent starting (through an HTTP proxy)"
            ),
            None => {
                info!(url = config.tunnel.url(), kube = %config.kube.base_url(), "tether agent starting")
            }
        }
        let targets: Vec<&TunnelTarget> = std::iter::once(&config.tunnel)
            .chain(&config.alternates)
            .collect();
        let mut next = 0;
        loop {
            let target = targets[next % targets.len()];
            next = (next + 1) % targets.len();
            let dialled = tokio::select! {
                dialled = target.dial(max_inbound) => dialled,
                () = drain.signalled() => {
                    info!("shutting down (no tunnel was up)");
                    return Ok(());
                }
            };
            let delay = match dialled {
                Ok(ws) => {
                    unauthorized_logged = false;
                    info!(url = target.url(), "tunnel connected");
                    let info =
                        SessionInfo::new(&config.agent_id, &config.name, env!("CARGO_PKG_VERSION"));
                    let end = session::run(&driver, ws, info, &mut drain).await;
                    metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                    metrics.session_ended(end.registered, session_failed(&end.reason));
                    if drain.requested() {
                        info!("shut down: {}", end.reason);
                        return Ok(());
                    }
                    if end.registered {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    warn!(
                        "tunnel lost: {}; reconnecting in {:.1}s",
                        end.reason,
                        delay.as_secs_f64()
                    );
                    delay
                }
                Err(DialError::Unauthorized(status)) => {
                    metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
                    metrics.dial_failures.fetch_add(1, Ordering::Relaxed);
                    let delay = jittered(config.unauthorized_retry);
                    if !unauthorized_logged {
                        error!(
                            "{}; retrying every ~{}s",
                            DialError::Unauthorized(status),
                            config.unauthorized_retry.as_secs()
                        );
                        unauthorized_logged = true;
                    }
                    delay
                }
                Err(e) => {
                    metrics.dial_failures.fetch_add(1, Ordering::Relaxed);
                    metrics.tunnel_dial_failed();
                    let delay = backoff.next_delay();
                    warn!(
                        url = target.url(),
                        "cannot open the tunnel: {e}; retrying in {:.1}s",
                        delay.as_secs_f64()
                    );
                    delay
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = drain.signalled() => {
                    info!("shutting down (no tunnel was up)");
                    return Ok(());
                }
            }
        }
    }
}

/// Whether a session ended by a failure (tunnel read or write error, connection dropped, silence)
/// rather than by the control plane's close frame: counted as `tether_errors_total{class="tunnel"}`.
fn session_failed(reason: &str) -> bool {
    !reason.starts_with("control plane closed the tunnel")
}

/// A delay in `[d/2, d]`: slow, but agents refused together do not return together.
fn jittered(d: Duration) -> Duration {
    let half = d / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(fastrand::u64(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_tcp_targets_parse_and_match_exactly() {
        let t: TcpTarget = "Postgres.db.svc:5432".parse().unwrap();
        assert!(t.allows("postgres.db.svc", 5432));
        assert!(!t.allows("postgres.db.svc", 5433));
        assert!(!t.allows("postgres.db.svc.evil", 5432));
        let v6: TcpTarget = "[::1]:80".parse().unwrap();
        assert!(v6.allows("::1", 80) && v6.allows("[::1]", 80));
        for bad in ["nohost", ":80", "h:0", "h:99999", "h /x:80", "h:port"] {
            assert!(bad.parse::<TcpTarget>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unauthorized_retry_is_slow() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(60));
            assert!(d >= Duration::from_secs(30) && d <= Duration::from_secs(60));
        }
    }
}
