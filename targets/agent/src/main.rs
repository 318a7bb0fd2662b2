//! `tether-agent`: the cluster agent. Thin: command line and configuration here, everything else in
//! `tether-tokio` (runtime) and `tether-core` (protocol).
//!
//! ```text
//! tether-agent --control-plane URL (--token TOKEN | --token-file F)
//!              [--ca-file F | --insecure-skip-tls-verify]
//!              [--kubeconfig F | --kube-url URL [--kube-token-file F] [--kube-ca-file F]]
//!              [--metrics-listen ADDR] [--wire-mode auto|compat] [--shutdown-grace SECONDS]
//!              [--proxy URL] (HTTPS_PROXY / HTTP_PROXY / NO_PROXY honoured)
//!              [--allow-tcp HOST:PORT]... [--log-format json|text]
//! ```
//!
//! Every flag also reads a `TETHER_*` environment variable. Bad configuration exits with status 2
//! and one line on stderr. SIGTERM (or Ctrl-C) drains: no new streams, live ones get the grace
//! period, then the agent exits 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tether_tokio::wire_mode::WireMode;

use clap::{Parser, ValueEnum};
use std::sync::Arc;
use std::time::Duration;
use tether_tokio::agent::proxy::Proxy;
use tether_tokio::agent::{Agent, AgentConfig, TunnelTarget, TunnelToken};
use tether_tokio::kube::{KubeTarget, Trust, open_token_file};

/// Log output format.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Tether cluster agent: dials the control plane and relays kubectl streams and Kubernetes API
/// requests to the Kubernetes API.
#[derive(Debug, Parser)]
#[command(name = "tether-agent", version, about, long_about = None)]
struct Cli {
    /// Control plane URL (`https://HOST:PORT`; the agent path /api/v1/clusters/agent/ws is added
    /// when the URL has none). Repeat it (or list URLs comma-separated) for replicas reached
    /// without a load balancer: after a failed dial or a lost tunnel the agent tries the next.
    #[arg(
        long,
        env = "TETHER_CONTROL_PLANE",
        value_name = "URL",
        value_delimiter = ',',
        required = true
    )]
    control_plane: Vec<String>,

    /// Agent token for the control plane (sent as a bearer token, never logged). Prefer
    /// --token-file: a flag is visible to every local user in `ps`.
    #[arg(
        long,
        env = "TETHER_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        required_unless_present = "token_file",
        conflicts_with = "token_file"
    )]
    token: Option<String>,

    /// File holding the agent token (e.g. a mounted Secret); re-read at every dial, so a rotated
    /// token is used from the next connection on without a restart.
    #[arg(long, env = "TETHER_TOKEN_FILE", value_name = "F")]
    token_file: Option<PathBuf>,

    /// HTTP proxy for the tunnel (`http://[user:pass@]HOST:PORT`, HTTP CONNECT). Default:
    /// HTTPS_PROXY (or HTTP_PROXY for an http control plane) unless NO_PROXY names its host.
    #[arg(long, env = "TETHER_PROXY", value_name = "URL", hide_env_values = true)]
    proxy: Option<String>,

    /// A TCP target the control plane may open tunnels to (`--forward` on the control plane),
    /// e.g. `postgres.db.svc:5432`. Repeatable; in TETHER_ALLOW_TCP separate them with commas.
    /// Without any, TCP tunnels are refused.
    #[arg(
        long = "allow-tcp",
        env = "TETHER_ALLOW_TCP",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    allow_tcp: Vec<tether_tokio::agent::TcpTarget>,

    /// Seconds live streams may go on after SIGTERM before they are closed.
    #[arg(
        long,
        env = "TETHER_SHUTDOWN_GRACE",
        value_name = "SECONDS",
        default_value_t = 25
    )]
    shutdown_grace: u64,

    /// CA bundle (PEM) that signed the control plane's certificate (default: public roots).
    #[arg(long, env = "TETHER_CA_FILE", value_name = "F")]
    ca_file: Option<PathBuf>,

    /// Do not verify the control plane's TLS certificate (insecure; for tests only). The
    /// environment variable takes true/false, 1/0, yes/no, on/off.
    #[arg(
        long,
        env = "TETHER_INSECURE_SKIP_TLS_VERIFY",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::FalseyValueParser::new()
    )]
    insecure_skip_tls_verify: bool,

    /// Reach the Kubernetes API through this kubeconfig's current context (default: in-cluster).
    #[arg(
        long,
        env = "TETHER_KUBECONFIG",
        value_name = "F",
        conflicts_with = "kube_url"
    )]
    kubeconfig: Option<PathBuf>,

    /// Kubernetes API URL (`https://HOST:PORT`).
    #[arg(long, env = "TETHER_KUBE_URL", value_name = "URL")]
    kube_url: Option<String>,

    /// File holding the bearer token for --kube-url (re-read when it changes).
    #[arg(
        long,
        env = "TETHER_KUBE_TOKEN_FILE",
        value_name = "F",
        requires = "kube_url"
    )]
    kube_token_file: Option<PathBuf>,

    /// CA bundle (PEM) for --kube-url (default: public roots).
    #[arg(
        long,
        env = "TETHER_KUBE_CA_FILE",
        value_name = "F",
        requires = "kube_url"
    )]
    kube_ca_file: Option<PathBuf>,

    /// Serve /metrics (Prometheus) and /healthz on this address.
    #[arg(long, env = "TETHER_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,

    /// Wire modes offered to the control plane: `auto` offers native (binary frames, per-stream
    /// credit) and falls back to compat when the control plane does not take it; `compat` never
    /// offers native.
    #[arg(
        long,
        value_name = "MODE",
        env = "TETHER_WIRE_MODE",
        default_value = "auto"
    )]
    wire_mode: WireMode,

    /// Log format.
    #[arg(long, env = "TETHER_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// Prints one line and returns the configuration-error status.
fn fail(message: &str) -> ExitCode {
    eprintln!("tether-agent: {message}");
    ExitCode::from(2)
}

/// A clap error as one line: its message with the usage block cut and lines joined.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let head = text.split("\n\nUsage:").next().unwrap_or(&text);
    let head = head
        .split("\n\nFor more information")
        .next()
        .unwrap_or(head);
    let joined: Vec<&str> = head
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    joined.join(" ").trim_start_matches("error: ").to_string()
}

fn build(cli: &Cli) -> Result<AgentConfig, String> {
    // Checked here, not by clap: clap counts TETHER_INSECURE_SKIP_TLS_VERIFY=false as given.
    if cli.insecure_skip_tls_verify && cli.ca_file.is_some() {
        return Err("--ca-file cannot be used with --insecure-skip-tls-verify".into());
    }
    let trust = if cli.insecure_skip_tls_verify {
        Trust::Insecure
    } else if let Some(f) = &cli.ca_file {
        Trust::CaPem(
            std::fs::read(f).map_err(|e| format!("cannot read --ca-file {}: {e}", f.display()))?,
        )
    } else {
        Trust::PublicRoots
    };
    let token = match (&cli.token, &cli.token_file) {
        (_, Some(f)) => TunnelToken::File(Arc::new(
            open_token_file(f).map_err(|e| format!("--token-file: {e}"))?,
        )),
        (Some(t), None) => TunnelToken::from(t.as_str()),
        (None, None) => return Err("one of --token or --token-file is required".into()),
    };
    let mut tunnels = Vec::new();
    for url in &cli.control_plane {
        let tunnel = TunnelTarget::new(url, &trust, token.clone())?;
        let proxy = Proxy::for_target(cli.proxy.as_deref(), !tunnel.is_plaintext(), tunnel.host())?;
        tunnels.push(tunnel.with_proxy(proxy));
    }
    let tunnel = tunnels.remove(0);
    let kube = if let Some(k) = &cli.kubeconfig {
        KubeTarget::from_kubeconfig(k)?
    } else if let Some(url) = &cli.kube_url {
        KubeTarget::from_url(
            url,
            cli.kube_token_file.as_deref(),
            cli.kube_ca_file.as_deref(),
        )
        .map_err(|e| format!("--kube-url: {e}"))?
    } else {
        KubeTarget::in_cluster()?
    };
    let mut config = AgentConfig::new(tunnel, kube);
    config.alternates = tunnels;
    config.metrics_listen = cli.metrics_listen;
    config.shutdown_grace = Duration::from_secs(cli.shutdown_grace);
    config.allow_tcp = cli.allow_tcp.clone();
    config.relay.extensions = cli.wire_mode.apply(config.relay.extensions);
    Ok(config)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TETHER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                _ => fail(&one_line(&e)),
            };
        }
    };
    let config = match build(&cli) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(async move {
        match Agent::new(config).run_until(shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        }
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
