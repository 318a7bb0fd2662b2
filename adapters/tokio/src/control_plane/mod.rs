//! The control-plane runtime: one listener for agents and kubectl users, one task per agent tunnel
//! driving a [`tether_core::gateway::Gateway`], one task per client connection.
//!
//! * `GET /api/v1/clusters/agent/ws` (WebSocket): an agent, authenticated by its bearer token,
//!   which names its cluster. A cluster may have several agents (replicas, rolling updates): every
//!   tunnel keeps its own streams, and new streams go to the newest one whose agent is not
//!   draining (see [`Tunnels`]).
//! * `/clusters/<cluster>/<kube path>`: a kubectl user, authenticated by its bearer token (constant
//!   time, never logged). The request reaches the cluster's agent with `Impersonate-User: <user>` and
//!   without any client-sent `Impersonate-*` or `Authorization`. A WebSocket upgrade is answered 101
//!   only after the agent reports the upstream's 101, echoing its subprotocol; a refusal is answered
//!   with the upstream's status. Other requests stream their response back (chunked).
//! * No agent connected for the cluster: 502 with a Kubernetes `Status`, at once. Bad or missing
//!   token: 401 `Status`.
//! * `/healthz`: 200 `ok`. `/readyz`: 200 `ready`, 503 once shutting down. `/metrics`:
//!   Prometheus text (see [`Metrics`]).
//! * Shutdown ([`ControlPlane::run`]): stop accepting, let live client streams finish within
//!   [`ControlPlaneConfig::shutdown_grace`], then end every tunnel with 1001 (agents redial,
//!   reaching another replica) and what is still live with a clear reason.
//!
//! * `--forward LISTEN=CLUSTER:HOST:PORT` ([`ControlPlaneConfig::forwards`]): TCP connections
//!   accepted on `LISTEN` are carried through the cluster's tunnel to `HOST:PORT` on the agent's
//!   side (`tcp_tunnel_*`); see [`Forward`].
//!
//! Backpressure: each kubectl connection talks to its tunnel task over channels bounded by
//! per-stream credits, on top of the gateway's rings; nothing is dropped.

mod access;
mod client;
mod driver;
pub mod fleet;
mod forward;
pub mod kubeconfig;
mod limits;
mod link;
mod metrics;
mod peer;
pub mod registry;
pub mod revocation;
mod status;
pub mod tls;
mod tunnel;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

pub use crate::buf::Buf;
pub use forward::{Forward, ForwardSpecError};
pub use limits::DEFAULT_MAX_STREAMS_PER_USER;
pub use metrics::Metrics;
pub use status::{status_json, status_response};

use crate::token::{TokenTable, Tokens};
use link::Cmd;

/// Path agents dial.
pub const AGENT_PATH: &str = "/api/v1/clusters/agent/ws";
/// Prefix of kubectl paths: `/clusters/<cluster>/<kube path>`.
pub const CLUSTERS_PREFIX: &str = "/clusters/";

/// Response body type of the control plane's HTTP service.
pub type Body = UnsyncBoxBody<Bytes, io::Error>;

/// How the listener speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS with the self-signed certificate of the state directory (generated on first start).
    SelfSigned,
    /// TLS with the operator's certificate chain and key (PEM files).
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// Plain HTTP: for local use only (kubectl sends no credentials over plain HTTP).
    InsecureHttp,
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// Host name the listener is reached by, for the certificate and the recorded endpoint
    /// (default: the listen IP, or `127.0.0.1` when it is unspecified).
    pub public_host: Option<String>,
    /// Directory for the TLS certificate, the recorded endpoint and user tokens.
    pub state_dir: PathBuf,
    /// Agent tokens; the name is the cluster.
    pub agent_tokens: Tokens,
    /// User tokens; the name is the user (sent as `Impersonate-User`).
    pub user_tokens: Tokens,
    /// User tokens as given, recorded in the state directory for `kubeconfig` (mode 0600).
    pub user_token_pairs: Vec<(String, String)>,
    /// TLS mode.
    pub tls: TlsMode,
    /// TCP forwards (`--forward`), each with its own listener.
    pub forwards: Vec<Forward>,
    /// Whether agents are offered the native wire mode.
    pub wire_mode: crate::wire_mode::WireMode,
    /// After the shutdown signal, how long live client streams may go on.
    pub shutdown_grace: Duration,
    /// Streams and requests one user may have open on one cluster at a time (0: no limit);
    /// beyond it a request is refused with 429 naming the limit.
    pub max_streams_per_user: usize,
    /// The cluster registry (`None`: flags and token files only).
    pub registry: Option<registry::Registry>,
    /// Replicas sharing the fleet through Redis (`None`: this replica alone). An empty
    /// [`fleet::FleetConfig::advertise`] means [`ControlPlane::base_url`].
    pub fleet: Option<fleet::FleetConfig>,
    /// How often live tunnels' registry tokens are checked again: a revoked one's tunnel ends
    /// (default [`revocation::DEFAULT_RECHECK`]).
    pub registry_recheck: Duration,
}

/// Default [`ControlPlaneConfig::shutdown_grace`].
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// Why the control plane's tunnels end when it shuts down.
const SHUTTING_DOWN: &str = "control plane shutting down";

/// Why the control plane could not start.
#[derive(Debug)]
pub enum StartError {
    /// The state directory, a certificate file or the listener failed.
    Io(String, io::Error),
    /// The TLS certificate or key is unusable.
    Tls(String),
    /// The fleet registry (Redis) cannot be joined.
    Fleet(fleet::FleetError),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(what, e) => write!(f, "{what}: {e}"),
            Self::Tls(e) => write!(f, "TLS: {e}"),
            Self::Fleet(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for StartError {}

/// Every registered tunnel of every cluster.
///
/// A cluster may have several agents at once (replicas, or the old and the new one during a
/// rolling update). Each keeps its own streams until it ends; a new stream goes to the newest
/// tunnel whose agent is not draining, so a rolling update moves new work to the new agent while
/// the old one finishes what it carries. Only when every tunnel drains does a new stream go to a
/// draining one (whose agent answers it with a clear 503).
#[derive(Debug, Default)]
pub(crate) struct Tunnels {
    tunnels: Mutex<HashMap<String, Vec<Registered>>>,
}

/// One registered tunnel.
#[derive(Debug)]
struct Registered {
    generation: u64,
    tx: mpsc::UnboundedSender<Cmd>,
    driver: Arc<driver::Driver>,
    draining: bool,
}

impl Tunnels {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Registered>>> {
        self.tunnels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The driver of the tunnel a new stream of `cluster` should take.
    pub(crate) fn get(&self, cluster: &str) -> Option<Arc<driver::Driver>> {
        let tunnels = self.lock();
        let live = tunnels.get(cluster)?.iter().filter(|t| !t.tx.is_closed());
        // Generations grow: the newest is the highest.
        let newest_open = live
            .clone()
            .filter(|t| !t.draining)
            .max_by_key(|t| t.generation);
        newest_open
            .or_else(|| live.max_by_key(|t| t.generation))
            .map(|t| t.driver.clone())
    }

    /// Adds `generation` as a registered tunnel of `cluster`; the cluster's other tunnels stay.
    pub(crate) fn insert(
        &self,
        cluster: &str,
        generation: u64,
        tx: mpsc::UnboundedSender<Cmd>,
        driver: Arc<driver::Driver>,
    ) {
        let mut tunnels = self.lock();
        let list = tunnels.entry(cluster.to_string()).or_default();
        list.retain(|t| !t.tx.is_closed());
        list.push(Registered {
            generation,
            tx,
            driver,
            draining: false,
        });
    }

    /// Marks `cluster`'s tunnel `generation` as draining: no new stream goes to it while the
    /// cluster has a tunnel that is not.
    pub(crate) fn set_draining(&self, cluster: &str, generation: u64) {
        if let Some(t) = self
            .lock()
            .get_mut(cluster)
            .and_then(|l| l.iter_mut().find(|t| t.generation == generation))
        {
            t.draining = true;
        }
    }

    /// Whether `cluster` has a live tunnel here.
    pub(crate) fn holds(&self, cluster: &str) -> bool {
        self.lock()
            .get(cluster)
            .is_some_and(|l| l.iter().any(|t| !t.tx.is_closed()))
    }

    /// Forgets `cluster`'s tunnel `generation`.
    pub(crate) fn remove(&self, cluster: &str, generation: u64) {
        let mut tunnels = self.lock();
        if let Some(list) = tunnels.get_mut(cluster) {
            list.retain(|t| t.generation != generation);
            if list.is_empty() {
                tunnels.remove(cluster);
            }
        }
    }

    /// The command channel of every registered tunnel.
    pub(crate) fn all(&self) -> Vec<mpsc::UnboundedSender<Cmd>> {
        self.lock()
            .values()
            .flatten()
            .map(|t| t.tx.clone())
            .collect()
    }
}

/// State shared by every connection.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) agent_tokens: Tokens,
    pub(crate) user_tokens: Tokens,
    pub(crate) tunnels: Tunnels,
    pub(crate) metrics: Metrics,
    pub(crate) next_id: AtomicU64,
    next_generation: AtomicU64,
    /// Whether agents are offered the native wire mode.
    pub(crate) wire_mode: crate::wire_mode::WireMode,
    /// Shutting down: `/readyz` says 503.
    draining: AtomicBool,
    /// Live streams per (cluster, user).
    pub(crate) user_limits: Arc<limits::UserLimits>,
    /// Clusters, agent tokens, users and grants beyond the flags'.
    pub(crate) registry: Option<registry::Registry>,
    /// The other replicas, when there are.
    pub(crate) fleet: Option<Arc<fleet::Fleet>>,
    /// Live tunnels opened with a registry token.
    pub(crate) registry_tunnels: revocation::RegistryTunnels,
}

/// The bearer token of a request, if it has one.
pub(crate) fn token_of(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(TokenTable::bearer)
}

/// A bound control plane, ready to [`run`](Self::run).
pub struct ControlPlane {
    listener: TcpListener,
    forwards: Vec<(TcpListener, Arc<Forward>)>,
    acceptor: Option<TlsAcceptor>,
    state: Arc<State>,
    shutdown_grace: Duration,
    base_url: String,
    registry_recheck: Duration,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Prepares the state directory and TLS, binds the listener, and records the endpoint and the
    /// user tokens in the state directory (for `kubeconfig`).
    ///
    /// # Errors
    /// [`StartError`] with a one-line reason.
    pub async fn bind(config: ControlPlaneConfig) -> Result<Self, StartError> {
        let dir = &config.state_dir;
        private_dir(dir).map_err(|e| {
            StartError::Io(
                format!("cannot create the state directory {}", dir.display()),
                e,
            )
        })?;
        let host = config.public_host.clone().unwrap_or_else(|| {
            let ip = config.listen.ip();
            if ip.is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                ip.to_string()
            }
        });
        let mut own_cert = None;
        let acceptor = match &config.tls {
            TlsMode::InsecureHttp => None,
            TlsMode::SelfSigned => {
                let (cert, key) =
                    tls::load_or_create_self_signed(dir, Some(&host)).map_err(|e| {
                        StartError::Io(
                            format!(
                                "cannot prepare the self-signed certificate in {}",
                                dir.display()
                            ),
                            e,
                        )
                    })?;
                let config = tls::server_config(&cert, &key).map_err(StartError::Tls)?;
                own_cert = Some(cert);
                Some(config)
            }
            TlsMode::Files { cert, key } => {
                own_cert = std::fs::read(cert).ok();
                Some(tls::reloading_server_config(cert, key).map_err(StartError::Tls)?)
            }
        }
        .map(|c| TlsAcceptor::from(Arc::new(c)));
        // Bound but not yet listening: connections are refused until the state files below
        // exist, so whoever sees the port open can run `kubeconfig` at once.
        let cannot_listen = |e| StartError::Io(format!("cannot listen on {}", config.listen), e);
        let socket = if config.listen.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(cannot_listen)?;
        socket.set_reuseaddr(true).map_err(cannot_listen)?;
        socket.bind(config.listen).map_err(cannot_listen)?;
        let port = socket
            .local_addr()
            .map_err(|e| StartError::Io("cannot read the listen address".into(), e))?
            .port();
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let host_part = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let base_url = format!("{scheme}://{host_part}:{port}");
        kubeconfig::write_endpoint(dir, &base_url)
            .map_err(|e| StartError::Io(format!("cannot write to {}", dir.display()), e))?;
        kubeconfig::write_user_tokens(dir, &config.user_token_pairs)
            .map_err(|e| StartError::Io(format!("cannot write to {}", dir.display()), e))?;
        let fleet = match config.fleet {
            None => None,
            Some(mut fleet) => {
                if fleet.advertise.is_empty() {
                    fleet.advertise.clone_from(&base_url);
                }
                let peer_tls = match (fleet.peer_tls.clone(), own_cert) {
                    (Some(tls), _) => tls,
                    (None, Some(pem)) => {
                        crate::kube::tls::client_config(&crate::kube::tls::Trust::CaPem(pem), None)
                            .map_err(StartError::Tls)?
                    }
                    // Plain HTTP between replicas: only where the listener is plain HTTP too.
                    (None, None) => {
                        crate::kube::tls::client_config(&crate::kube::tls::Trust::PublicRoots, None)
                            .map_err(StartError::Tls)?
                    }
                };
                let fleet = fleet::Fleet::join(fleet, peer_tls)
                    .await
                    .map_err(StartError::Fleet)?;
                tracing::info!(replica = fleet.replica_id(), "joined the fleet");
                Some(fleet)
            }
        };
        let listener = socket.listen(4096).map_err(cannot_listen)?;
        let mut forwards = Vec::new();
        for fwd in &config.forwards {
            let l = TcpListener::bind(fwd.listen).await.map_err(|e| {
                StartError::Io(
                    format!("cannot listen on {} for --forward {fwd}", fwd.listen),
                    e,
                )
            })?;
            forwards.push((l, Arc::new(fwd.clone())));
        }
        if config.agent_tokens.is_empty() && config.registry.is_none() {
            tracing::warn!("no agent token configured: no agent can connect");
        }
        if config.user_tokens.is_empty() && config.registry.is_none() {
            tracing::warn!("no user token configured: every kubectl request gets 401");
        }
        Ok(Self {
            listener,
            forwards,
            acceptor,
            state: Arc::new(State {
                agent_tokens: config.agent_tokens,
                user_tokens: config.user_tokens,
                tunnels: Tunnels::default(),
                metrics: Metrics::default(),
                next_id: AtomicU64::new(1),
                next_generation: AtomicU64::new(1),
                wire_mode: config.wire_mode,
                draining: AtomicBool::new(false),
                user_limits: limits::UserLimits::new(config.max_streams_per_user),
                registry: config.registry,
                fleet,
                registry_tunnels: revocation::RegistryTunnels::default(),
            }),
            registry_recheck: config.registry_recheck,
            shutdown_grace: config.shutdown_grace,
            base_url,
        })
    }

    /// The bound address.
    ///
    /// # Errors
    /// As [`TcpListener::local_addr`].
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The bound address of each forward, in the order of [`ControlPlaneConfig::forwards`].
    ///
    /// # Errors
    /// As [`TcpListener::local_addr`].
    pub fn forward_addrs(&self) -> io::Result<Vec<SocketAddr>> {
        self.forwards.iter().map(|(l, _)| l.local_addr()).collect()
    }

    /// The base URL clients use, e.g. `https://127.0.0.1:8443`.
    #[must_use]
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Serves until `shutdown` completes, then drains: accepts nothing more, `/readyz` says 503,
    /// live client streams get [`ControlPlaneConfig::shutdown_grace`] to finish, then every tunnel
    /// ends with 1001 (agents redial) and what is still live with "control plane shutting down".
    /// Returns when that is done.
    ///
    /// # Errors
    /// Only if accepting fails persistently; single accept errors are logged and retried.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        tracing::info!(url = %self.base_url, "control plane listening");
        let mut forwards = tokio::task::JoinSet::new();
        if let Some(fleet) = &self.state.fleet {
            forwards.spawn(fleet.clone().renew_forever());
        }
        forwards.spawn(revocation::sweep_forever(
            self.state.clone(),
            self.registry_recheck,
        ));
        for (listener, fwd) in self.forwards {
            tracing::info!(forward = %fwd, "forwarding tcp");
            forwards.spawn(forward::serve(listener, fwd, self.state.clone()));
        }
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => {
                    forwards.abort_all();
                    drop(self.listener);
                    drain(&self.state, self.shutdown_grace).await;
                    return Ok(());
                }
                accepted = self.listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // Agents' tunnels and clients share the listener: both get the tunnel tuning.
            crate::socket::tune_tunnel(&tcp);
            let state = self.state.clone();
            let acceptor = self.acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    Some(acceptor) => {
                        let tls =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                                .await;
                        match tls {
                            Ok(Ok(stream)) => serve_connection(stream, state).await,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    }
                    None => serve_connection(tcp, state).await,
                }
            });
        }
    }
}

/// Creates `dir` (and its parents) with mode 0700, or tightens an existing one to 0700: it holds
/// the TLS key and user tokens, whatever the umask.
fn private_dir(dir: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        tracing::debug!(
            dir = %dir.display(),
            "the state directory was mode {mode:03o}; setting it to 700"
        );
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// The shutdown after the listener closed: see [`ControlPlane::run`].
async fn drain(state: &State, grace: Duration) {
    state.draining.store(true, Ordering::Relaxed);
    if let Some(fleet) = &state.fleet {
        // Peers stop sending this replica requests; its agents redial a live replica below.
        fleet.leave().await;
    }
    let live = state.metrics.live_streams();
    tracing::info!(
        live,
        grace_s = grace.as_secs_f64(),
        "shutting down: accepting nothing new, letting live streams finish"
    );
    let deadline = tokio::time::Instant::now() + grace;
    while state.metrics.live_streams() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let live = state.metrics.live_streams();
    if live > 0 {
        tracing::warn!(
            live,
            "shutdown grace period over: closing what is still live"
        );
    }
    let tunnels = state.tunnels.all();
    for tunnel in &tunnels {
        let _ = tunnel.send(Cmd::End {
            reason: SHUTTING_DOWN,
        });
    }
    // Let the tunnel tasks write their close frames, and the client tasks theirs.
    let settle = tokio::time::Instant::now() + Duration::from_secs(2);
    while tunnels.iter().any(|t| !t.is_closed()) && tokio::time::Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!("shut down");
}

async fn serve_connection<S>(io: S, state: Arc<State>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(state, req).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    if let Err(e) = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

async fn route(state: Arc<State>, mut req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return status::text_response(StatusCode::OK, "ok\n");
    }
    if path == "/readyz" {
        return if state.draining.load(Ordering::Relaxed) {
            status::text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: shutting down\n",
            )
        } else {
            status::text_response(StatusCode::OK, "ready\n")
        };
    }
    if path == "/metrics" {
        return status::text_response(StatusCode::OK, state.metrics.render());
    }
    if path == AGENT_PATH {
        return agent(state, req).await;
    }
    let from_peer = match peer::peer_claim(state.fleet.as_deref(), req.headers()) {
        None => None,
        Some(Ok(from)) => Some(from),
        Some(Err(())) => {
            state.metrics.auth_refused();
            tracing::warn!(%path, "request refused: bad peer token");
            return status_response(401, "Unauthorized: bad replica peer token");
        }
    };
    // Never past this point: the agent and the Kubernetes API must not see the fleet's secret.
    req.headers_mut().remove(fleet::PEER_TOKEN_HEADER);
    req.headers_mut().remove(fleet::PEER_FROM_HEADER);
    if let Some(rest) = path.strip_prefix(CLUSTERS_PREFIX) {
        let (cluster, kube) = rest.split_once('/').map_or((rest, ""), |(c, k)| (c, k));
        if !valid_cluster_name(cluster) {
            return status_response(404, "invalid cluster name");
        }
        let cluster = cluster.to_string();
        let kube_path = format!("/{kube}");
        return client::handle(state, req, &cluster, kube_path, from_peer).await;
    }
    status_response(404, "not found: kubectl paths are /clusters/<cluster>/...")
}

/// Cluster names: 1 to 63 characters of `A-Za-z0-9._-`.
fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// An agent's tunnel upgrade.
async fn agent(state: Arc<State>, mut req: Request<Incoming>) -> Response<Body> {
    let Some(access::Agent {
        cluster,
        registry_hash,
    }) = access::agent(&state, req.headers()).await
    else {
        state.metrics.auth_refused();
        tracing::warn!("agent connection refused: missing or unknown agent token");
        return status_response(401, "Unauthorized: a valid bearer agent token is required");
    };
    if !client::is_websocket_upgrade(req.headers()) {
        return status_response(400, "the agent endpoint takes a WebSocket upgrade");
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return status_response(400, "WebSocket upgrade without Sec-WebSocket-Key");
    };
    let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) else {
        return status_response(400, "bad Sec-WebSocket-Key");
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let generation = state.next_generation.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let config = WebSocketConfig::default()
                    .write_buffer_size(crate::socket::TUNNEL_WRITE_BUFFER)
                    .read_buffer_size(crate::socket::TUNNEL_READ_BUFFER)
                    .max_message_size(Some(40 << 20))
                    .max_frame_size(Some(40 << 20));
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                let (tx, rx) = mpsc::unbounded_channel();
                if let Some(hash) = registry_hash {
                    state.registry_tunnels.insert(generation, hash, tx.clone());
                }
                tunnel::run(ws, cluster, generation, state.clone(), tx, rx).await;
                state.registry_tunnels.remove(generation);
            }
            Err(e) => {
                state.metrics.tunnel_failed();
                tracing::warn!(cluster, error = %e, "agent upgrade failed");
            }
        }
    });
    let mut response = Response::new(status::full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

#[cfg(test)]
mod tests;
