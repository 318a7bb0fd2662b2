//! `tether-control-plane`: the reference Tether control plane. Thin: command line, configuration,
//! logging; everything else is `tether_tokio::control_plane`.
//!
//! ```text
//! tether-control-plane serve --listen ADDR --state-dir DIR
//!                            [--agent-token CLUSTER=TOKEN]... [--user-token USER=TOKEN]...
//!                            [--agent-token-file F] [--user-token-file F]
//!                            [--tls-cert F --tls-key F] [--insecure-http] [--shutdown-grace SECONDS]
//!                            [--forward LISTEN=CLUSTER:HOST:PORT]... [--wire-mode auto|compat]
//! tether-control-plane kubeconfig --state-dir DIR --cluster CLUSTER --user USER [--server URL]
//! tether-control-plane cluster add|list|rotate-token|remove [NAME]   (--state-dir DIR | --registry URL)
//! tether-control-plane user add NAME [--grant CLUSTER [--group G]...] | list | grant USER CLUSTER
//!                      [--group G]... | revoke USER CLUSTER | rotate-token NAME | remove NAME
//! ```
//!
//! The registry (`--registry URL`, default `sqlite://<state-dir>/registry.db`) holds clusters,
//! hashed agent and user tokens, and grants; `serve` reads it beside the token flags. A new token
//! is printed once, alone on stdout (for scripts); what to do with it goes to stderr. `user add
//! --grant` prints a kubeconfig instead, with the token in it.
//!
//! Every flag also reads a `TETHER_*` environment variable (repeatable ones take a comma-separated
//! list). Bad configuration: one line on stderr, exit status 2.
//!
//! `kubeconfig` takes the user's token from `--user-token USER=TOKEN` / `TETHER_USER_TOKEN` when
//! given (the same flag and variable `serve` reads, so one environment serves both), else from the
//! `user-tokens` file `serve` keeps in the state directory (mode 0600, beside the TLS key); with
//! neither it fails with a clear message. The server URL defaults to the endpoint `serve` recorded in
//! the state directory plus `/clusters/<cluster>`.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tether_tokio::wire_mode::WireMode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tether_core::wire::timestamp::UnixTime;
use tether_tokio::control_plane::fleet::FleetConfig;
use tether_tokio::control_plane::registry::Registry;
use tether_tokio::control_plane::{ControlPlane, ControlPlaneConfig, Forward, TlsMode, kubeconfig};
use tether_tokio::token::{TokenTable, Tokens, parse_cluster_table, parse_table};

#[derive(Debug, Parser)]
#[command(
    name = "tether-control-plane",
    version,
    about = "Tether control plane: agents dial in, kubectl users reach their clusters through it"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "TETHER_LOG_FORMAT"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve agents (/api/v1/clusters/agent/ws) and kubectl users (/clusters/<cluster>/...).
    Serve(Box<Serve>),
    /// Print a kubeconfig for a user and cluster of this control plane.
    Kubeconfig(Kubeconfig),
    /// Add, list, re-key or remove clusters in the registry.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Add, list, grant, revoke, re-key or remove users in the registry.
    #[command(subcommand)]
    User(UserCommand),
}

/// Where the registry is.
#[derive(Debug, Clone, Args)]
struct RegistryArgs {
    /// The state directory `serve` uses: its registry file, recorded endpoint and certificate.
    #[arg(
        long,
        value_name = "DIR",
        env = "TETHER_STATE_DIR",
        required_unless_present = "registry"
    )]
    state_dir: Option<PathBuf>,
    /// Registry database URL: sqlite://FILE?mode=rwc or postgres://USER:PASSWORD@HOST/DB
    /// (default: sqlite in the state directory).
    #[arg(
        long,
        value_name = "URL",
        env = "TETHER_REGISTRY",
        hide_env_values = true
    )]
    registry: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Add a cluster; prints its agent token once.
    Add {
        /// Cluster name: 1-63 characters of A-Z a-z 0-9 . _ -
        name: String,
        #[command(flatten)]
        at: RegistryArgs,
    },
    /// List clusters, their token counts and granted users.
    List {
        #[command(flatten)]
        at: RegistryArgs,
    },
    /// Replace a cluster's agent tokens by a new one, printed once; the old ones stop working.
    RotateToken {
        /// Cluster name.
        name: String,
        #[command(flatten)]
        at: RegistryArgs,
    },
    /// Remove a cluster, its tokens and its grants.
    Remove {
        /// Cluster name.
        name: String,
        #[command(flatten)]
        at: RegistryArgs,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Add a user; prints its token once (or, with --grant, a kubeconfig holding it).
    Add {
        /// User name, sent to the cluster as Impersonate-User.
        name: String,
        /// Grant this cluster at once and print a kubeconfig for it.
        #[arg(long, value_name = "CLUSTER")]
        grant: Option<String>,
        /// Kubernetes group for the grant (Impersonate-Group; repeatable).
        #[arg(long = "group", value_name = "GROUP", requires = "grant")]
        groups: Vec<String>,
        /// Control plane URL for the kubeconfig (default: the one `serve` recorded).
        #[arg(long, value_name = "URL")]
        server: Option<String>,
        #[command(flatten)]
        at: RegistryArgs,
    },
    /// List users and their grants.
    List {
        #[command(flatten)]
        at: RegistryArgs,
    },
    /// Let a user reach a cluster, as the given groups (replaces an existing grant's groups).
    Grant {
        /// User name.
        user: String,
        /// Cluster name.
        cluster: String,
        /// Kubernetes group (Impersonate-Group; repeatable).
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
        #[command(flatten)]
        at: RegistryArgs,
    },
    /// Take a user's access to a cluster away.
    Revoke {
        /// User name.
        user: String,
        /// Cluster name.
        cluster: String,
        #[command(flatten)]
        at: RegistryArgs,
    },
    /// Replace a user's token by a new one, printed once; the old one stops working.
    RotateToken {
        /// User name.
        name: String,
        #[command(flatten)]
        at: RegistryArgs,
    },
    /// Remove a user and its grants.
    Remove {
        /// User name.
        name: String,
        #[command(flatten)]
        at: RegistryArgs,
    },
}

#[derive(Debug, Args)]
struct Serve {
    /// Address to listen on, e.g. 0.0.0.0:8443 or localhost:8443.
    #[arg(long, value_name = "ADDR", env = "TETHER_LISTEN")]
    listen: String,
    /// Directory for the self-signed certificate, the recorded endpoint and user tokens.
    #[arg(long, value_name = "DIR", env = "TETHER_STATE_DIR")]
    state_dir: PathBuf,
    /// An agent token and the cluster it names (repeatable).
    #[arg(
        long,
        value_name = "CLUSTER=TOKEN",
        env = "TETHER_AGENT_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    agent_token: Vec<String>,
    /// A user token and the user it names, sent upstream as Impersonate-User (repeatable).
    #[arg(
        long,
        value_name = "USER=TOKEN",
        env = "TETHER_USER_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    user_token: Vec<String>,
    /// File of CLUSTER=TOKEN lines (a mounted Secret, say), re-read when it changes: rotated or
    /// added agent tokens take effect without a restart.
    #[arg(long, value_name = "F", env = "TETHER_AGENT_TOKEN_FILE")]
    agent_token_file: Option<PathBuf>,
    /// File of USER=TOKEN lines, re-read when it changes.
    #[arg(long, value_name = "F", env = "TETHER_USER_TOKEN_FILE")]
    user_token_file: Option<PathBuf>,
    /// Seconds live client streams may go on after SIGTERM before they are closed.
    #[arg(
        long,
        value_name = "SECONDS",
        env = "TETHER_SHUTDOWN_GRACE",
        default_value_t = 25
    )]
    shutdown_grace: u64,
    /// Streams and requests one user may have open on one cluster at a time (0: no limit);
    /// beyond it kubectl gets 429 naming this limit.
    #[arg(
        long,
        value_name = "N",
        env = "TETHER_MAX_STREAMS_PER_USER",
        default_value_t = tether_tokio::control_plane::DEFAULT_MAX_STREAMS_PER_USER
    )]
    max_streams_per_user: usize,
    /// TLS certificate chain (PEM) instead of the self-signed one; re-read when it changes.
    #[arg(long, value_name = "F", env = "TETHER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "F", env = "TETHER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve plain HTTP (local use only: kubectl sends no credentials over plain HTTP).
    #[arg(long, env = "TETHER_INSECURE_HTTP", conflicts_with_all = ["tls_cert", "tls_key"])]
    insecure_http: bool,
    /// Carry TCP connections accepted on LISTEN (IP:PORT or a port on 127.0.0.1) through the
    /// tunnel of CLUSTER to HOST:PORT on the agent's side (repeatable).
    #[arg(
        long,
        value_name = "LISTEN=CLUSTER:HOST:PORT",
        env = "TETHER_FORWARD",
        value_delimiter = ','
    )]
    forward: Vec<String>,
    /// Registry database URL: sqlite://FILE?mode=rwc or postgres://USER:PASSWORD@HOST/DB
    /// (default: sqlite://<state-dir>/registry.db, created on first start).
    #[arg(
        long,
        value_name = "URL",
        env = "TETHER_REGISTRY",
        hide_env_values = true
    )]
    registry: Option<String>,
    /// Seconds between rechecks of live agents' registry tokens: an agent whose token was rotated
    /// away or whose cluster was removed is disconnected within this.
    #[arg(
        long,
        value_name = "SECONDS",
        env = "TETHER_REGISTRY_RECHECK",
        default_value_t = 30
    )]
    registry_recheck: u64,
    /// Redis URL of the fleet registry shared by this control plane's replicas
    /// (redis://HOST:PORT): which replica holds which cluster's tunnel. Needs a peer token.
    #[arg(
        long,
        value_name = "URL",
        env = "TETHER_REDIS",
        hide_env_values = true,
        requires = "peer_token_file"
    )]
    redis: Option<String>,
    /// This replica's id in the fleet (default: the host name).
    #[arg(long, value_name = "ID", env = "TETHER_REPLICA_ID")]
    replica_id: Option<String>,
    /// URL other replicas reach this one at (default: the URL it records, from --listen).
    #[arg(long, value_name = "URL", env = "TETHER_ADVERTISE")]
    advertise: Option<String>,
    /// File holding the token every replica shares for replica-to-replica requests (at least 16
    /// characters; a mounted Secret, say).
    #[arg(long, value_name = "F", env = "TETHER_PEER_TOKEN_FILE")]
    peer_token_file: Option<PathBuf>,
    /// CA bundle (PEM) that other replicas' certificates chain to (default: exactly this
    /// replica's own certificate, for replicas that share one).
    #[arg(
        long,
        value_name = "F",
        env = "TETHER_PEER_CA_FILE",
        requires = "redis"
    )]
    peer_ca_file: Option<PathBuf>,
    /// Wire modes offered to agents: `auto` offers native (binary frames, per-stream credit) and
    /// falls back to compat for agents that do not take it; `compat` never offers native.
    #[arg(
        long,
        value_name = "MODE",
        env = "TETHER_WIRE_MODE",
        default_value = "auto"
    )]
    wire_mode: WireMode,
}

#[derive(Debug, Args)]
struct Kubeconfig {
    /// The state directory `serve` uses.
    #[arg(long, value_name = "DIR", env = "TETHER_STATE_DIR")]
    state_dir: PathBuf,
    /// Cluster (as named by its agent token).
    #[arg(long, value_name = "CLUSTER", env = "TETHER_CLUSTER")]
    cluster: String,
    /// User (as named by its user token).
    #[arg(long, value_name = "USER", env = "TETHER_USER")]
    user: String,
    /// Control plane URL (default: the one `serve` recorded); `/clusters/<cluster>` is appended.
    #[arg(long, value_name = "URL", env = "TETHER_SERVER")]
    server: Option<String>,
    /// The user's token, as given to `serve` (default: read from the state directory).
    #[arg(
        long,
        value_name = "USER=TOKEN",
        env = "TETHER_USER_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    user_token: Vec<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if !e.use_stderr() {
                // --help, --version
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.render().to_string();
            let line: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("tether-control-plane: {}", line.join(" "));
            return ExitCode::from(2);
        }
    };
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve(serve) => run_serve(*serve),
        Command::Kubeconfig(k) => run_kubeconfig(&k),
        Command::Cluster(c) => run_registry(|rt| rt.block_on(cluster_command(c))),
        Command::User(u) => run_registry(|rt| rt.block_on(user_command(u))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(message)) => {
            eprintln!("tether-control-plane: error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("tether-control-plane: error: {message}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    /// Bad configuration: exit 2.
    Config(String),
    /// Failure while running: exit 1.
    Runtime(String),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TETHER_LOG")
        // PostgreSQL's notices ("relation already exists, skipping" at every start) are not news.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `NAME=TOKEN` pairs, checked.
fn parse_pairs(flag: &str, values: &[String]) -> Result<Vec<(String, String)>, Failure> {
    values
        .iter()
        .map(|v| match v.split_once('=') {
            Some((name, token)) if !name.trim().is_empty() && !token.trim().is_empty() => {
                Ok((name.trim().to_string(), token.trim().to_string()))
            }
            // Never echo the value: it holds a token.
            _ => Err(Failure::Config(format!(
                "{flag} takes NAME=TOKEN with both parts non-empty"
            ))),
        })
        .collect()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn resolve_listen(listen: &str) -> Result<(SocketAddr, Option<String>), Failure> {
    if let Ok(addr) = listen.parse::<SocketAddr>() {
        return Ok((addr, None));
    }
    let bad = || Failure::Config(format!("--listen {listen:?} is not HOST:PORT"));
    let (host, _) = listen.rsplit_once(':').ok_or_else(bad)?;
    let addr = listen
        .to_socket_addrs()
        .map_err(|_| bad())?
        .next()
        .ok_or_else(bad)?;
    Ok((addr, Some(host.trim_matches(['[', ']']).to_string())))
}

fn run_serve(serve: Serve) -> Result<(), Failure> {
    let forwards = serve
        .forward
        .iter()
        .map(|spec| spec.parse::<Forward>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::Config(e.to_string()))?;
    let (listen, public_host) = resolve_listen(&serve.listen)?;
    let agents = parse_pairs("--agent-token", &serve.agent_token)?;
    let users = parse_pairs("--user-token", &serve.user_token)?;
    if let Some((cluster, _)) = agents.iter().find(|(c, _)| !valid_name(c)) {
        return Err(Failure::Config(format!(
            "--agent-token: cluster name {cluster:?} must be 1-63 characters of A-Z a-z 0-9 . _ -"
        )));
    }
    let mut agent_tokens = TokenTable::new();
    for (cluster, token) in &agents {
        agent_tokens.insert(cluster.clone(), token);
    }
    let mut user_tokens = TokenTable::new();
    for (user, token) in &users {
        user_tokens.insert(user.clone(), token);
    }
    let mut agent_tokens = Tokens::fixed(agent_tokens);
    if let Some(f) = &serve.agent_token_file {
        agent_tokens = agent_tokens
            .with_file(f, parse_cluster_table)
            .map_err(|e| Failure::Config(format!("--agent-token-file: {e}")))?;
    }
    let mut user_tokens = Tokens::fixed(user_tokens);
    if let Some(f) = &serve.user_token_file {
        user_tokens = user_tokens
            .with_file(f, parse_table)
            .map_err(|e| Failure::Config(format!("--user-token-file: {e}")))?;
    }
    let tls = match (
        serve.insecure_http,
        serve.tls_cert.clone(),
        serve.tls_key.clone(),
    ) {
        (true, _, _) => TlsMode::InsecureHttp,
        (false, Some(cert), Some(key)) => TlsMode::Files { cert, key },
        _ => TlsMode::SelfSigned,
    };
    let config = ControlPlaneConfig {
        listen,
        public_host,
        state_dir: serve.state_dir.clone(),
        agent_tokens,
        user_tokens,
        user_token_pairs: users,
        tls,
        forwards,
        wire_mode: serve.wire_mode,
        shutdown_grace: std::time::Duration::from_secs(serve.shutdown_grace),
        max_streams_per_user: serve.max_streams_per_user,
        registry: None,
        fleet: fleet_config(&serve)?,
        registry_recheck: std::time::Duration::from_secs(serve.registry_recheck.max(1)),
    };
    let registry_url = serve.registry;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(8 << 20)
        .build()
        .map_err(|e| Failure::Runtime(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async {
        let mut config = config;
        std::fs::create_dir_all(&config.state_dir).map_err(|e| {
            Failure::Config(format!(
                "cannot create the state directory {}: {e}",
                config.state_dir.display()
            ))
        })?;
        let url = registry_url
            .clone()
            .unwrap_or_else(|| Registry::sqlite_url(&config.state_dir));
        config.registry = Some(
            Registry::open(&url)
                .await
                .map_err(|e| Failure::Config(e.to_string()))?,
        );
        let cp = ControlPlane::bind(config)
            .await
            .map_err(|e| Failure::Config(e.to_string()))?;
        cp.run(shutdown_signal())
            .await
            .map_err(|e| Failure::Runtime(e.to_string()))
    })
}

/// The fleet settings of `serve`, checked.
fn fleet_config(serve: &Serve) -> Result<Option<FleetConfig>, Failure> {
    let Some(redis_url) = serve.redis.clone() else {
        if serve.peer_token_file.is_some() || serve.replica_id.is_some() {
            return Err(Failure::Config(
                "--peer-token-file and --replica-id need --redis".into(),
            ));
        }
        return Ok(None);
    };
    let file = serve
        .peer_token_file
        .as_ref()
        .ok_or_else(|| Failure::Config("--redis needs --peer-token-file".into()))?;
    let peer_token = std::fs::read_to_string(file)
        .map_err(|e| Failure::Config(format!("--peer-token-file {}: {e}", file.display())))?
        .trim()
        .to_string();
    if peer_token.len() < 16 || peer_token.chars().any(|c| c.is_control() || c == ' ') {
        return Err(Failure::Config(
            "--peer-token-file must hold one token of at least 16 characters, without spaces"
                .into(),
        ));
    }
    let replica_id = match &serve.replica_id {
        Some(id) => id.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| {
                Failure::Config("cannot read the host name: pass --replica-id".into())
            })?,
    };
    if !valid_name(&replica_id) {
        return Err(Failure::Config(format!(
            "--replica-id {replica_id:?} must be 1-63 characters of A-Z a-z 0-9 . _ -"
        )));
    }
    let peer_tls = match &serve.peer_ca_file {
        None => None,
        Some(f) => {
            let pem = std::fs::read(f)
                .map_err(|e| Failure::Config(format!("--peer-ca-file {}: {e}", f.display())))?;
            Some(
                tether_tokio::kube::tls::client_config(
                    &tether_tokio::kube::tls::Trust::CaPem(pem),
                    None,
                )
                .map_err(|e| Failure::Config(format!("--peer-ca-file: {e}")))?,
            )
        }
    };
    Ok(Some(FleetConfig {
        redis_url,
        replica_id,
        advertise: serve.advertise.clone().unwrap_or_default(),
        peer_token,
        peer_tls,
    }))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}

fn run_kubeconfig(k: &Kubeconfig) -> Result<(), Failure> {
    if !valid_name(&k.cluster) {
        return Err(Failure::Config(format!(
            "--cluster {:?} must be 1-63 characters of A-Z a-z 0-9 . _ -",
            k.cluster
        )));
    }
    let target = KubeconfigTarget::resolve(Some(&k.state_dir), k.server.as_deref(), &k.cluster)?;
    let token = token_for(k, &k.state_dir)?;
    print!("{}", target.render(&k.cluster, &k.user, &token));
    Ok(())
}

/// Where a kubeconfig for `cluster` points: `server` (or the endpoint `serve` recorded in
/// `state_dir`) plus `/clusters/<cluster>`, and the state directory's certificate to trust.
struct KubeconfigTarget {
    server: String,
    ca: Option<Vec<u8>>,
}

impl KubeconfigTarget {
    fn resolve(
        state_dir: Option<&Path>,
        server: Option<&str>,
        cluster: &str,
    ) -> Result<Self, Failure> {
        let base = match (server, state_dir) {
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            (None, Some(dir)) => kubeconfig::read_endpoint(dir).map_err(|_| {
                Failure::Config(format!(
                    "no endpoint recorded in {}: run `serve` with this --state-dir first, or pass --server",
                    dir.display()
                ))
            })?,
            (None, None) => {
                return Err(Failure::Config(
                    "--server URL is needed for the kubeconfig (or --state-dir of `serve`)".into(),
                ));
            }
        };
        let suffix = format!("/clusters/{cluster}");
        let server = if base.ends_with(&suffix) {
            base
        } else {
            format!("{base}{suffix}")
        };
        let ca = match state_dir {
            Some(dir) if server.starts_with("https://") => kubeconfig::read_ca(dir),
            _ => None,
        };
        Ok(Self { server, ca })
    }

    fn render(&self, cluster: &str, user: &str, token: &str) -> String {
        kubeconfig::render(&kubeconfig::KubeconfigSpec {
            cluster,
            user,
            token,
            server: &self.server,
            ca_pem: self.ca.as_deref(),
        })
    }
}

/// Runs a registry command on a small runtime of its own.
fn run_registry(
    f: impl FnOnce(&tokio::runtime::Runtime) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Runtime(format!("cannot start the runtime: {e}")))?;
    f(&runtime)
}

async fn open_registry(at: &RegistryArgs) -> Result<Registry, Failure> {
    let url = match (&at.registry, &at.state_dir) {
        (Some(url), _) => url.clone(),
        (None, Some(dir)) => {
            if !dir.is_dir() {
                return Err(Failure::Config(format!(
                    "the state directory {} does not exist: pass the --state-dir `serve` uses",
                    dir.display()
                )));
            }
            Registry::sqlite_url(dir)
        }
        (None, None) => {
            return Err(Failure::Config(
                "--state-dir DIR or --registry URL is required".into(),
            ));
        }
    };
    Registry::open(&url).await.map_err(registry_failure)
}

fn registry_failure(e: tether_tokio::control_plane::registry::RegistryError) -> Failure {
    use tether_tokio::control_plane::registry::RegistryError;
    match e {
        RegistryError::Database(_) => Failure::Runtime(e.to_string()),
        _ => Failure::Config(e.to_string()),
    }
}

/// `unix` seconds as an RFC 3339 UTC time to the second (the core's timestamp writer).
fn when(unix: i64) -> String {
    let stamp = u64::try_from(unix)
        .ok()
        .and_then(|secs| UnixTime::new(secs, 0).to_rfc3339().ok());
    match stamp {
        // `YYYY-MM-DDTHH:MM:SS` of `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
        Some(stamp) => format!("{}Z", String::from_utf8_lossy(&stamp[..19])),
        None => format!("@{unix}"),
    }
}

async fn cluster_command(command: ClusterCommand) -> Result<(), Failure> {
    match command {
        ClusterCommand::Add { name, at } => {
            let registry = open_registry(&at).await?;
            let token = registry
                .add_cluster(&name)
                .await
                .map_err(registry_failure)?;
            println!("{token}");
            eprintln!(
                "cluster {name:?} added. Its agent token is above, shown only now (the registry keeps a hash).\nRun the agent with: tether-agent --control-plane <this control plane's URL> --token <the token>"
            );
        }
        ClusterCommand::List { at } => {
            let registry = open_registry(&at).await?;
            let clusters = registry.clusters().await.map_err(registry_failure)?;
            println!("{:<32} {:>6}  {:<20} USERS", "NAME", "TOKENS", "CREATED");
            for c in clusters {
                println!(
                    "{:<32} {:>6}  {:<20} {}",
                    c.name,
                    c.tokens,
                    when(c.created_at),
                    c.users.join(",")
                );
            }
        }
        ClusterCommand::RotateToken { name, at } => {
            let registry = open_registry(&at).await?;
            let token = registry
                .rotate_cluster_token(&name)
                .await
                .map_err(registry_failure)?;
            println!("{token}");
            eprintln!(
                "cluster {name:?} has a new agent token (above, shown only now); the old one is refused from the agent's next connection on"
            );
        }
        ClusterCommand::Remove { name, at } => {
            let registry = open_registry(&at).await?;
            registry
                .remove_cluster(&name)
                .await
                .map_err(registry_failure)?;
            eprintln!("cluster {name:?} removed, with its tokens and grants");
        }
    }
    Ok(())
}

async fn user_command(command: UserCommand) -> Result<(), Failure> {
    match command {
        UserCommand::Add {
            name,
            grant,
            groups,
            server,
            at,
        } => {
            let registry = open_registry(&at).await?;
            // What the kubeconfig needs is checked before anything is created.
            let target = grant
                .as_deref()
                .map(|cluster| {
                    KubeconfigTarget::resolve(at.state_dir.as_deref(), server.as_deref(), cluster)
                })
                .transpose()?;
            let token = registry.add_user(&name).await.map_err(registry_failure)?;
            match grant.zip(target) {
                Some((cluster, target)) => {
                    if let Err(e) = registry.grant(&name, &cluster, &groups).await {
                        // No half-made user: the token was never shown.
                        let _ = registry.remove_user(&name).await;
                        return Err(registry_failure(e));
                    }
                    print!("{}", target.render(&cluster, &name, &token));
                    eprintln!(
                        "user {name:?} added and granted cluster {cluster:?}. The kubeconfig above holds its token, shown only now."
                    );
                }
                None => {
                    println!("{token}");
                    eprintln!(
                        "user {name:?} added. Its token is above, shown only now. Grant it clusters with `user grant {name} CLUSTER`, then `kubeconfig --cluster CLUSTER --user {name} --user-token {name}=<the token>`"
                    );
                }
            }
        }
        UserCommand::List { at } => {
            let registry = open_registry(&at).await?;
            let users = registry.users().await.map_err(registry_failure)?;
            println!("{:<32} {:<20} GRANTS", "NAME", "CREATED");
            for u in users {
                let grants: Vec<String> = u
                    .grants
                    .iter()
                    .map(|(c, g)| {
                        if g.is_empty() {
                            c.clone()
                        } else {
                            format!("{c}({})", g.join(" "))
                        }
                    })
                    .collect();
                println!(
                    "{:<32} {:<12} {}",
                    u.name,
                    when(u.created_at),
                    grants.join(",")
                );
            }
        }
        UserCommand::Grant {
            user,
            cluster,
            groups,
            at,
        } => {
            let registry = open_registry(&at).await?;
            registry
                .grant(&user, &cluster, &groups)
                .await
                .map_err(registry_failure)?;
            eprintln!(
                "user {user:?} may reach cluster {cluster:?}{}",
                if groups.is_empty() {
                    String::new()
                } else {
                    format!(" as groups {}", groups.join(", "))
                }
            );
        }
        UserCommand::Revoke { user, cluster, at } => {
            let registry = open_registry(&at).await?;
            registry
                .revoke(&user, &cluster)
                .await
                .map_err(registry_failure)?;
            eprintln!(
                "user {user:?} may no longer reach cluster {cluster:?}: its next request there gets 403"
            );
        }
        UserCommand::RotateToken { name, at } => {
            let registry = open_registry(&at).await?;
            let token = registry
                .rotate_user_token(&name)
                .await
                .map_err(registry_failure)?;
            println!("{token}");
            eprintln!(
                "user {name:?} has a new token (above, shown only now); the old one is refused from now on"
            );
        }
        UserCommand::Remove { name, at } => {
            let registry = open_registry(&at).await?;
            registry
                .remove_user(&name)
                .await
                .map_err(registry_failure)?;
            eprintln!("user {name:?} removed, with its grants");
        }
    }
    Ok(())
}

fn token_for(k: &Kubeconfig, state_dir: &Path) -> Result<String, Failure> {
    let given = parse_pairs("--user-token", &k.user_token)?;
    if let Some((_, token)) = given.into_iter().find(|(u, _)| *u == k.user) {
        return Ok(token);
    }
    match kubeconfig::read_user_token(state_dir, &k.user) {
        Ok(Some(token)) => Ok(token),
        Ok(None) => Err(Failure::Config(format!(
            "no token for user {:?}: pass --user-token {}=TOKEN (or TETHER_USER_TOKEN), as given to serve",
            k.user, k.user
        ))),
        Err(e) => Err(Failure::Config(format!(
            "cannot read the user tokens in {}: {e}",
            state_dir.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_print_as_rfc3339_utc() {
        assert_eq!(super::when(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::when(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::when(1_796_647_096), "2026-12-07T12:38:16Z");
    }
}
