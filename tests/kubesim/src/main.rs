//! The `kubesim` binary: `kubesim --listen ADDR [--token TOKEN] [--tls-cert F --tls-key F] [--no-websocket]
//! [--pod NAMESPACE/NAME]...`; every flag can also come from a `KUBESIM_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use kubesim::{Config, PodSpec, Server, TlsPem};

/// A Kubernetes API simulator that real kubectl accepts: discovery, pods, exec, attach,
/// port-forward and logs. Pods run as local processes in per-pod working directories.
#[derive(Parser, Debug)]
#[command(name = "kubesim", version, about)]
struct Cli {
    /// Address to listen on, e.g. 127.0.0.1:6443 (port 0 picks a free port).
    #[arg(long, env = "KUBESIM_LISTEN", value_name = "ADDR")]
    listen: SocketAddr,
    /// Bearer token every request must carry (kubectl only sends it over https).
    #[arg(
        long,
        env = "KUBESIM_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// TLS certificate chain (PEM); requires --tls-key. Without both, plain HTTP.
    #[arg(long, env = "KUBESIM_TLS_CERT", value_name = "F", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); requires --tls-cert.
    #[arg(long, env = "KUBESIM_TLS_KEY", value_name = "F", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A pod: NAMESPACE/NAME (one container "main") or NAMESPACE/NAME:c1,c2. Repeatable;
    /// in KUBESIM_POD separate pods with spaces.
    #[arg(
        long = "pod",
        env = "KUBESIM_POD",
        value_name = "NAMESPACE/NAME",
        value_delimiter = ' '
    )]
    pods: Vec<PodSpec>,
    /// Refuse WebSocket upgrades as an API server older than 1.30 does, so kubectl falls back
    /// to SPDY.
    #[arg(long, env = "KUBESIM_NO_WEBSOCKET")]
    no_websocket: bool,
    /// Log format on stderr.
    #[arg(long, env = "KUBESIM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            eprintln!("kubesim: {}", one_line(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    init_logging(cli.log_format);
    let config = match config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kubesim: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kubesim: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

/// Clap's error as one line: its first paragraph (no usage, no tips), lines joined.
fn one_line(text: &str) -> String {
    let first = text.split("\n\n").next().unwrap_or(text);
    let joined: Vec<&str> = first
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    joined.join(" ").trim_start_matches("error: ").to_string()
}

fn config(cli: &Cli) -> Result<Config, String> {
    let mut config = Config::new(cli.listen);
    config.token = cli.token.clone().filter(|t| !t.is_empty());
    config.no_websocket = cli.no_websocket;
    if let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).map_err(|e| format!("cannot read {what} {}: {e}", p.display()))
        };
        config.tls = Some(TlsPem {
            cert_chain: read(cert, "--tls-cert")?,
            private_key: read(key, "--tls-key")?,
        });
    }
    config.pods = cli.pods.clone();
    Ok(config)
}

async fn run(config: Config) -> ExitCode {
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let handle = match Server::start(config).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("kubesim: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %handle.addr(), url = %format!("{scheme}://{}", handle.addr()), "listening");
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kubesim: cannot install signal handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    handle.shutdown();
    ExitCode::SUCCESS
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
