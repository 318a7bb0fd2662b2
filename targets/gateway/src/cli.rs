//! `tether-gateway` command line (Linux build). Every flag also reads a `TETHER_*` variable.

use std::io::Write as _;

pub(crate) const USAGE: &str =
    "tether-gateway: Tether edge gateway (Linux build of the firmware's tasks)

usage: tether-gateway --control-plane URL --token TOKEN [options]

  --control-plane URL      control plane base URL: http://, ws://, or https://, wss:// with
                           --insecure-skip-tls-verify (TETHER_CONTROL_PLANE)
  --token TOKEN            agent token for this gateway's cluster (TETHER_TOKEN)
  --name NAME              name sent at registration (TETHER_NAME, default: gateway)
  --agent-id ID            agent id sent at registration (TETHER_AGENT_ID, default: the host name)
  --dial-timeout-secs N    TCP dial timeout for tunnels (TETHER_DIAL_TIMEOUT_SECS, default 30)
  --backoff-base-ms N      first reconnect ceiling (TETHER_BACKOFF_BASE_MS, default 500)
  --backoff-cap-ms N       largest reconnect ceiling (TETHER_BACKOFF_CAP_MS, default 60000)
  --log-format text|json   log lines (TETHER_LOG_FORMAT, default text); level from TETHER_LOG
                           (error, warn, info, debug, trace; default info)
  --insecure-skip-tls-verify
                           TLS without verifying the server certificate (the only TLS mode so
                           far) (TETHER_INSECURE_SKIP_TLS_VERIFY=1)
  --print-budget           print the static memory budget and exit
  -h, --help               this help
  -V, --version            version
";

/// Parsed configuration.
#[derive(Debug)]
pub(crate) struct Args {
    pub(crate) control_plane: String,
    pub(crate) token: String,
    pub(crate) name: String,
    pub(crate) agent_id: String,
    pub(crate) hostname: String,
    pub(crate) dial_timeout_secs: u64,
    pub(crate) backoff_base_ms: u64,
    pub(crate) backoff_cap_ms: u64,
    pub(crate) json_logs: bool,
    pub(crate) insecure_skip_tls_verify: bool,
}

/// Prints one clear line and exits with status 2.
pub(crate) fn fail(message: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "tether-gateway: {message}");
    std::process::exit(2)
}

const FLAGS: &[(&str, &str)] = &[
    ("--control-plane", "TETHER_CONTROL_PLANE"),
    ("--token", "TETHER_TOKEN"),
    ("--name", "TETHER_NAME"),
    ("--agent-id", "TETHER_AGENT_ID"),
    ("--dial-timeout-secs", "TETHER_DIAL_TIMEOUT_SECS"),
    ("--backoff-base-ms", "TETHER_BACKOFF_BASE_MS"),
    ("--backoff-cap-ms", "TETHER_BACKOFF_CAP_MS"),
    ("--log-format", "TETHER_LOG_FORMAT"),
];

/// What the command line asks for.
pub(crate) enum Command {
    Run(Args),
    Help,
    Version,
    PrintBudget,
}

pub(crate) fn parse(argv: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut values: Vec<Option<String>> = FLAGS
        .iter()
        .map(|(_, env)| std::env::var(env).ok().filter(|v| !v.is_empty()))
        .collect();
    let mut insecure = std::env::var("TETHER_INSECURE_SKIP_TLS_VERIFY")
        .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "yes"));
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--print-budget" => return Ok(Command::PrintBudget),
            "--insecure-skip-tls-verify" => {
                insecure = true;
                continue;
            }
            _ => {}
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let Some(i) = FLAGS.iter().position(|(f, _)| *f == flag) else {
            return Err(format!("unknown argument {arg:?} (see --help)"));
        };
        let value = match inline {
            Some(v) => v,
            None => it.next().ok_or_else(|| format!("{flag} needs a value"))?,
        };
        values[i] = Some(value);
    }
    let get = |i: usize| values[i].clone();
    let number = |i: usize, default: u64| -> Result<u64, String> {
        get(i).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| format!("{} must be a number, got {v:?}", FLAGS[i].0))
        })
    };
    let control_plane =
        get(0).ok_or("--control-plane URL is required (or TETHER_CONTROL_PLANE)")?;
    let token = get(1).ok_or("--token TOKEN is required (or TETHER_TOKEN)")?;
    let hostname = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".to_owned());
    let json_logs = match get(7).as_deref() {
        None | Some("text") => false,
        Some("json") => true,
        Some(other) => return Err(format!("--log-format must be text or json, got {other:?}")),
    };
    let backoff_base_ms = number(5, 500)?;
    let backoff_cap_ms = number(6, 60_000)?;
    if backoff_base_ms == 0 || backoff_cap_ms < backoff_base_ms {
        return Err("--backoff-base-ms must be positive and at most --backoff-cap-ms".into());
    }
    Ok(Command::Run(Args {
        control_plane,
        token,
        name: get(2).unwrap_or_else(|| "gateway".to_owned()),
        agent_id: get(3).unwrap_or_else(|| hostname.clone()),
        hostname,
        dial_timeout_secs: number(4, 30)?,
        backoff_base_ms,
        backoff_cap_ms,
        json_logs,
        insecure_skip_tls_verify: insecure,
    }))
}

/// A logger for the `log` facade: one line per record on stderr.
struct Logger {
    json: bool,
    level: log::LevelFilter,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let message = record.args().to_string();
        let line = if self.json {
            format!(
                "{{\"ts\":{}.{:03},\"level\":\"{}\",\"target\":\"{}\",\"message\":{}}}\n",
                now.as_secs(),
                now.subsec_millis(),
                record.level(),
                record.target(),
                json_string(&message)
            )
        } else {
            format!(
                "{}.{:03} {:5} {}: {}\n",
                now.as_secs(),
                now.subsec_millis(),
                record.level(),
                record.target(),
                message
            )
        };
        let _ = std::io::stderr().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub(crate) fn init_logging(json: bool) {
    let level = match std::env::var("TETHER_LOG").as_deref() {
        Ok("error") => log::LevelFilter::Error,
        Ok("warn") => log::LevelFilter::Warn,
        Ok("debug") => log::LevelFilter::Debug,
        Ok("trace") => log::LevelFilter::Trace,
        _ => log::LevelFilter::Info,
    };
    let logger = Box::leak(Box::new(Logger { json, level }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
