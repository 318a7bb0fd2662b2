//! `/metrics` of both sides after real traffic: one `kubectl exec -i` through the tunnel, then the
//! agent's `--metrics-listen` endpoint (plain HTTP) and the control plane's `/metrics` (HTTPS) are
//! scraped and checked for the stream, byte, error, blocking, ring, reconnect and wire-mode
//! families.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tether_e2e::{Cluster, POD, https};

/// Families both sides export.
const FAMILIES: &[&str] = &[
    "tether_streams_active",
    "tether_stream_duration_seconds",
    "tether_stream_bytes_total",
    "tether_errors_total",
    "tether_blocked_seconds_total",
    "tether_ring_messages",
    "tether_ring_bytes",
    "tether_tunnel_reconnects_total",
    "tether_wire_mode",
    "tether_tunnel_in_flight_bytes",
    "tether_tunnel_bulk_limit_bytes",
];

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

/// `GET /metrics` over plain HTTP/1.1 (the agent's endpoint).
fn scrape_agent(addr: SocketAddr) -> Result<String, String> {
    let mut tcp = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        tcp,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw)
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("agent /metrics answered {head:?}"));
    }
    Ok(body.to_string())
}

/// `GET /metrics` of the control plane (same origin as the kubeconfig's server).
fn scrape_control_plane(c: &Cluster) -> Result<String, String> {
    let base = c
        .server_url()
        .strip_suffix(c.server_path())
        .unwrap_or(c.server_url());
    let r = https::get(
        &format!("{base}/metrics"),
        c.control_plane_ca_pem(),
        c.user_token(),
        Duration::from_secs(10),
    )?;
    if r.status != 200 {
        return Err(format!("control plane /metrics answered {}", r.status));
    }
    Ok(r.text())
}

/// The value of the sample `series` (`name` or `name{labels}` exactly as rendered).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Scrapes with `scrape` until `done` holds (streams end asynchronously after kubectl exits).
fn scrape_until(
    what: &str,
    scrape: impl Fn() -> Result<String, String>,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let last = scrape();
        match &last {
            Ok(text) if done(text) => return text.clone(),
            _ if Instant::now() > deadline => {
                panic!("{what} /metrics never settled; last scrape: {last:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn check_side(side: &str, text: &str, directions: [&str; 2]) {
    for family in FAMILIES {
        let help = format!("# HELP {family} ");
        let ty = format!("# TYPE {family} ");
        assert_eq!(
            text.lines().filter(|l| l.starts_with(&help)).count(),
            1,
            "{side}: HELP of {family}\n{text}"
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with(&ty)).count(),
            1,
            "{side}: TYPE of {family}\n{text}"
        );
    }
    for direction in directions {
        let series = format!("tether_stream_bytes_total{{direction=\"{direction}\"}}");
        let v = value(text, &series).unwrap_or_else(|| panic!("{side}: no {series}\n{text}"));
        assert!(v > 0.0, "{side}: {series} is {v}\n{text}");
    }
    let active = value(text, "tether_streams_active{kind=\"websocket\"}");
    assert_eq!(
        active,
        Some(0.0),
        "{side}: websocket streams still live\n{text}"
    );
    let count = value(
        text,
        "tether_stream_duration_seconds_count{kind=\"websocket\"}",
    )
    .unwrap_or(0.0);
    assert!(
        count >= 1.0,
        "{side}: no websocket duration observed\n{text}"
    );
    let inf = value(
        text,
        "tether_stream_duration_seconds_bucket{kind=\"websocket\",le=\"+Inf\"}",
    );
    assert_eq!(
        inf,
        Some(count),
        "{side}: +Inf bucket differs from _count\n{text}"
    );
    let native = value(text, "tether_wire_mode{mode=\"native\"}");
    let compat = value(text, "tether_wire_mode{mode=\"compat\"}");
    let (Some(native), Some(compat)) = (native, compat) else {
        panic!("{side}: tether_wire_mode samples missing\n{text}");
    };
    assert_eq!(
        native + compat,
        1.0,
        "{side}: one connected tunnel in one wire mode\n{text}"
    );
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let v = line.rsplit_once(' ').map(|(_, v)| v).unwrap_or_default();
        assert!(
            v.parse::<f64>().is_ok() || v == "+Inf",
            "{side}: bad sample line {line:?}"
        );
    }
}

/// Starts a cluster whose agent serves metrics (plus `agent_args`), runs one `kubectl exec -i`,
/// and returns both sides' `/metrics` once the stream has ended on both.
fn exec_and_scrape(agent_args: &[&str]) -> (String, String) {
    let agent_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen = agent_metrics.to_string();
    let mut args = vec!["--metrics-listen", listen.as_str()];
    args.extend_from_slice(agent_args);
    let c = Cluster::builder().agent_args(&args).start();

    let out = c.run_with_stdin(&["exec", "-i", POD, "--", "cat"], b"metrics ping\n");
    out.assert_code(0);
    assert_eq!(out.stdout_str(), "metrics ping\n");

    let settled = |text: &str| {
        value(text, "tether_streams_active{kind=\"websocket\"}") == Some(0.0)
            && value(
                text,
                "tether_stream_duration_seconds_count{kind=\"websocket\"}",
            )
            .is_some_and(|n| n >= 1.0)
    };
    let agent = scrape_until("agent", || scrape_agent(agent_metrics), settled);
    let cp = scrape_until("control plane", || scrape_control_plane(&c), settled);
    check_side("agent", &agent, ["to_upstream", "to_tunnel"]);
    check_side("control plane", &cp, ["to_agent", "to_client"]);
    assert_eq!(
        value(&agent, "tether_agent_tunnel_connected"),
        Some(1.0),
        "{agent}"
    );
    assert_eq!(value(&cp, "tether_agents_connected"), Some(1.0), "{cp}");
    (agent, cp)
}

#[test]
fn metrics_after_exec_stream() {
    let (agent, cp) = exec_and_scrape(&[]);
    // Both ends offer native by default: both report it, with a bulk window (256 KiB at
    // least) and nothing left unacknowledged once the stream ended.
    for (side, text) in [("agent", &agent), ("control plane", &cp)] {
        assert_eq!(
            value(text, "tether_wire_mode{mode=\"native\"}"),
            Some(1.0),
            "{side}\n{text}"
        );
        let limit = value(text, "tether_tunnel_bulk_limit_bytes").unwrap_or(0.0);
        assert!(limit >= 262_144.0, "{side}: bulk limit {limit}\n{text}");
    }
}

#[test]
fn metrics_wire_mode_compat() {
    let (agent, cp) = exec_and_scrape(&["--wire-mode", "compat"]);
    for (side, text) in [("agent", &agent), ("control plane", &cp)] {
        assert_eq!(
            value(text, "tether_wire_mode{mode=\"compat\"}"),
            Some(1.0),
            "{side}\n{text}"
        );
        // No acks in compat mode: no window.
        assert_eq!(
            value(text, "tether_tunnel_bulk_limit_bytes"),
            Some(0.0),
            "{side}\n{text}"
        );
    }
}
