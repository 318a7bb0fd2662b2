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
//! ```
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
    Serve(Serve),
    /// Print a kubeconfig for a user and cluster of this control plane.
    Kubeconfig(Kubeconfig),
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
        Command::Serve(serve) => run_serve(serve),
        Command::Kubeconfig(k) => run_kubeconfig(&k),
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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
    let tls = match (serve.insecure_http, serve.tls_cert, serve.tls_key) {
        (true, _, _) => TlsMode::InsecureHttp,
        (false, Some(cert), Some(key)) => TlsMode::Files { cert, key },
        _ => TlsMode::SelfSigned,
    };
    let config = ControlPlaneConfig {
        listen,
        public_host,
        state_dir: serve.state_dir,
        agent_tokens,
        user_tokens,
        user_token_pairs: users,
        tls,
        forwards,
        wire_mode: serve.wire_mode,
        shutdown_grace: std::time::Duration::from_secs(serve.shutdown_grace),
        max_streams_per_user: serve.max_streams_per_user,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(8 << 20)
        .build()
        .map_err(|e| Failure::Runtime(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async {
        let cp = ControlPlane::bind(config)
            .await
            .map_err(|e| Failure::Config(e.to_string()))?;
        cp.run(shutdown_signal())
            .await
            .map_err(|e| Failure::Runtime(e.to_string()))
    })
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
    let base = match &k.server {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => kubeconfig::read_endpoint(&k.state_dir).map_err(|_| {
            Failure::Config(format!(
                "no endpoint recorded in {}: run `serve` with this --state-dir first, or pass --server",
                k.state_dir.display()
            ))
        })?,
    };
    let suffix = format!("/clusters/{}", k.cluster);
    let server = if base.ends_with(&suffix) {
        base
    } else {
        format!("{base}{suffix}")
    };
    let token = token_for(k, &k.state_dir)?;
    let ca = if server.starts_with("https://") {
        kubeconfig::read_ca(&k.state_dir)
    } else {
        None
    };
    print!(
        "{}",
        kubeconfig::render(&kubeconfig::KubeconfigSpec {
            cluster: &k.cluster,
            user: &k.user,
            token: &token,
            server: &server,
            ca_pem: ca.as_deref(),
        })
    );
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
