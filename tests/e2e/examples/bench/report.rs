//! The results table (markdown), the machine description and the criterion figures.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::{Value, json};

use crate::{PathResults, Res, Results};

// Targets (issue 11). Each verdict in the table compares against one of these.
/// Added p99 of a 64 B round trip through the tunnel (native), µs.
const ADDED_P99_US: f64 = 200.0;
/// Interactive p99 under 4 bulk streams (native), ms.
const INTERACTIVE_P99_MS: f64 = 5.0;
/// Agent memory per idle stream, bytes.
const AGENT_IDLE_BYTES: f64 = 2048.0;
/// Control-plane memory per idle stream, bytes.
const CP_IDLE_BYTES: f64 = 4096.0;
/// Control-plane peak RSS for the many-streams run (1 000 × 1 MiB), MiB.
const CP_PEAK_MIB: f64 = 64.0;

/// What the run ran on.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Machine {
    pub(crate) date: String,
    pub(crate) commit: String,
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) ram_gib: f64,
    pub(crate) kernel: String,
    pub(crate) rustc: String,
}

fn cmd(program: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(crate) fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let commit = match cmd("git", &["rev-parse", "--short", "HEAD"]) {
        Some(c) => {
            let dirty = cmd("git", &["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{c} + uncommitted changes")
            } else {
                c
            }
        }
        None => "unknown".into(),
    };
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    Machine {
        date: cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
        commit,
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        ram_gib: mem_kib / 1024.0 / 1024.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        rustc: cmd(&rustc, &["-V"]).unwrap_or_else(|| "unknown".into()),
    }
}

/// The criterion estimates under `dir` for the tether-core wire benches.
pub(crate) fn criterion_rows(dir: &Path) -> Vec<Value> {
    let mut rows = Vec::new();
    let Ok(groups) = std::fs::read_dir(dir) else {
        return rows;
    };
    let mut groups: Vec<String> = groups
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|g| g != "report")
        .collect();
    groups.sort();
    for group in groups {
        for op in ["encode", "decode"] {
            for size in [64usize, 32 * 1024] {
                let f = dir.join(format!("{group}/{op}/{size}/new/estimates.json"));
                let Ok(text) = std::fs::read_to_string(&f) else {
                    continue;
                };
                let v: Value = serde_json::from_str(&text).expect("estimates.json");
                let ns = v["mean"]["point_estimate"].as_f64().expect("mean");
                rows.push(json!({
                    "bench": format!("{group}/{op}"),
                    "payload_bytes": size,
                    "ns_per_message": ns,
                    "gb_per_s": size as f64 / ns,
                }));
            }
        }
    }
    rows
}

/// A figure of one path: `None` not run, `Some(Err)` failed, else the value (if any).
fn get<T>(r: &Option<Res<T>>, f: impl Fn(&T) -> Option<f64>) -> Result<Option<f64>, ()> {
    match r {
        None => Ok(None),
        Some(Err(_)) => Err(()),
        Some(Ok(v)) => Ok(f(v).filter(|x| x.is_finite())),
    }
}

fn show(v: Result<Option<f64>, ()>, digits: usize) -> String {
    match v {
        Ok(Some(x)) => format!("{x:.digits$}"),
        Ok(None) => "—".into(),
        Err(()) => "error".into(),
    }
}

fn ratio(v: Result<Option<f64>, ()>, d: Result<Option<f64>, ()>) -> Option<f64> {
    match (v, d) {
        (Ok(Some(v)), Ok(Some(d))) if d != 0.0 => Some(v / d),
        _ => None,
    }
}

fn diff(v: Result<Option<f64>, ()>, d: Result<Option<f64>, ()>) -> Option<f64> {
    match (v, d) {
        (Ok(Some(v)), Ok(Some(d))) => Some(v - d),
        _ => None,
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "—".into(), f)
}

fn verdict(name: &str, ok: Option<bool>, figure: String) -> String {
    match ok {
        None => format!("{name}: n/a"),
        Some(true) => format!("{name}: pass ({figure})"),
        Some(false) => format!("{name}: **MISS** ({figure})"),
    }
}

struct Table {
    md: String,
}

impl Table {
    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        n: &str,
        figure: &str,
        d: String,
        c: String,
        nat: String,
        cvd: String,
        nvd: String,
        target: &str,
        met: String,
    ) {
        let _ = writeln!(
            self.md,
            "| {n} | {figure} | {d} | {c} | {nat} | {cvd} | {nvd} | {target} | {met} |"
        );
    }
}

pub(crate) fn markdown(r: &Results) -> String {
    let m = &r.machine;
    let mut t = Table { md: String::new() };
    let _ = writeln!(t.md, "# Tether benchmarks\n");
    let _ = writeln!(
        t.md,
        "Run {} at commit {}, {}. Machine: {}, {} cores, {:.1} GiB RAM, Linux {}. Client, kubesim (+ `cat`), control plane and agent share the machine over loopback with TLS.\n",
        m.date, m.commit, m.rustc, m.cpu, m.cores, m.ram_gib, m.kernel
    );
    let _ = writeln!(
        t.md,
        "Paths: **direct** = client straight to kubesim; **compat** = through control plane and agent with {}; **native** = with {}.\n",
        r.compat.config.as_deref().unwrap_or("?"),
        r.native.config.as_deref().unwrap_or("?")
    );
    if !r.wire_mode_flag.iter().all(|&f| f) {
        let _ = writeln!(
            t.md,
            "**Warning**: the binaries do not accept `--wire-mode` (agent {}, control plane {}): the compat and native columns both ran the binaries' default wire mode.\n",
            r.wire_mode_flag[0], r.wire_mode_flag[1]
        );
    }
    t.md.push_str("| # | figure | direct | compat | native | compat vs direct | native vs direct | target | met? |\n");
    t.md.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |\n");
    let (d, c, n) = (&r.direct, &r.compat, &r.native);

    // 1. bulk
    if d.bulk.is_some() || c.bulk.is_some() || n.bulk.is_some() {
        let f = |p: &PathResults| get(&p.bulk, |b| Some(b.mb_per_s));
        let (rc, rn) = (ratio(f(c), f(d)), ratio(f(n), f(d)));
        t.row(
            "1",
            &format!(
                "bulk: 1 stream, {} MiB each way, 32 KiB msgs (MB/s each way)",
                r.mib
            ),
            show(f(d), 1),
            show(f(c), 1),
            show(f(n), 1),
            opt(rc, |x| format!("{x:.2}×")),
            opt(rn, |x| format!("{x:.2}×")),
            "compat ≥ 0.5×, native ≥ 0.8× direct",
            format!(
                "{}; {}",
                verdict(
                    "compat",
                    rc.map(|x| x >= 0.5),
                    opt(rc, |x| format!("{x:.2}×"))
                ),
                verdict(
                    "native",
                    rn.map(|x| x >= 0.8),
                    opt(rn, |x| format!("{x:.2}×"))
                )
            ),
        );
    }
    // 2. latency
    if d.latency.is_some() || c.latency.is_some() || n.latency.is_some() {
        type Pick = fn(&crate::Latency) -> Option<f64>;
        let rows: [(&str, Pick); 3] = [
            ("p50", |l| Some(l.p50_us)),
            ("p99", |l| Some(l.p99_us)),
            ("p99.9", |l| Some(l.p999_us)),
        ];
        for (name, pick) in rows {
            let f = |p: &PathResults| get(&p.latency, pick);
            let (ac, an) = (diff(f(c), f(d)), diff(f(n), f(d)));
            let p99 = name == "p99";
            t.row(
                "2",
                &format!("round trip 64 B, {name} (µs), {} trips", r.round_trips),
                show(f(d), 0),
                show(f(c), 0),
                show(f(n), 0),
                opt(ac, |x| format!("{x:+.0} µs")),
                opt(an, |x| format!("{x:+.0} µs")),
                if p99 {
                    "native added p99 ≤ 200 µs"
                } else {
                    ""
                },
                if p99 {
                    verdict(
                        "native",
                        an.map(|x| x <= ADDED_P99_US),
                        opt(an, |x| format!("{x:+.0} µs")),
                    )
                } else {
                    String::new()
                },
            );
        }
    }
    // 3. many streams
    if d.many.is_some() || c.many.is_some() || n.many.is_some() {
        let secs = |p: &PathResults| get(&p.many, |m| (m.verified > 0).then_some(m.secs));
        let ok = |p: &PathResults| match &p.many {
            Some(Ok(m)) => Some(m.verified == m.streams && m.errors.is_empty()),
            Some(Err(_)) => Some(false),
            None => None,
        };
        let count = |p: &PathResults| match &p.many {
            Some(Ok(m)) => format!("{}/{} verified", m.verified, m.streams),
            Some(Err(_)) => "cluster error".into(),
            None => "—".into(),
        };
        t.row(
            "3",
            &format!(
                "{} concurrent streams × 1 MiB each way: wall time (s)",
                r.streams
            ),
            show(secs(d), 2),
            show(secs(c), 2),
            show(secs(n), 2),
            opt(ratio(secs(c), secs(d)), |x| format!("{x:.2}× the time")),
            opt(ratio(secs(n), secs(d)), |x| format!("{x:.2}× the time")),
            "no loss, no reordering (sha256 + byte order)",
            format!(
                "{}; {}",
                verdict("compat", ok(c), count(c)),
                verdict("native", ok(n), count(n))
            ),
        );
        let rate = |p: &PathResults| get(&p.many, |m| Some(m.mb_per_s));
        t.row(
            "3",
            "… aggregate MB/s each way",
            show(rate(d), 1),
            show(rate(c), 1),
            show(rate(n), 1),
            opt(ratio(rate(c), rate(d)), |x| format!("{x:.2}×")),
            opt(ratio(rate(n), rate(d)), |x| format!("{x:.2}×")),
            "",
            String::new(),
        );
        let mib = |v: Option<u64>| v.map(|k| k as f64 / 1024.0);
        for (name, pick) in [
            (
                "agent",
                (|m: &crate::Many| m.agent_peak_kib) as fn(&crate::Many) -> Option<u64>,
            ),
            ("control plane", |m: &crate::Many| m.control_plane_peak_kib),
        ] {
            let f = |p: &PathResults| get(&p.many, |m| mib(pick(m)));
            let cp = name == "control plane";
            let peak_ok = |p: &PathResults| f(p).ok().flatten().map(|m| m <= CP_PEAK_MIB);
            let peak_fig = |p: &PathResults| show(f(p), 1) + " MiB";
            t.row(
                "3",
                &format!("… peak RSS (VmHWM) of the {name} (MiB)"),
                "—".into(),
                show(f(c), 1),
                show(f(n), 1),
                String::new(),
                String::new(),
                if cp { "≤ 64 MiB" } else { "" },
                if cp {
                    format!(
                        "{}; {}",
                        verdict("compat", peak_ok(c), peak_fig(c)),
                        verdict("native", peak_ok(n), peak_fig(n))
                    )
                } else {
                    String::new()
                },
            );
        }
    }
    // 4. idle
    if c.idle.is_some() || n.idle.is_some() || d.idle.is_some() {
        let reached = |p: &PathResults| get(&p.idle, |i| Some(i.reached as f64));
        t.row(
            "4",
            &format!("idle streams open (of {})", r.idle),
            show(reached(d), 0),
            show(reached(c), 0),
            show(reached(n), 0),
            String::new(),
            String::new(),
            &format!("{}", r.idle),
            String::new(),
        );
        let per = |p: &PathResults| get(&p.idle, |i| i.agent_bytes_per_stream.map(|b| b / 1024.0));
        let ok = |p: &PathResults| match &p.idle {
            Some(Ok(i)) => i
                .agent_bytes_per_stream
                .map(|b| b <= AGENT_IDLE_BYTES && i.reached == i.wanted),
            Some(Err(_)) => Some(false),
            None => None,
        };
        let fig = |p: &PathResults| match &p.idle {
            Some(Ok(i)) => format!(
                "{} KiB{}",
                opt(i.agent_bytes_per_stream, |b| format!("{:.2}", b / 1024.0)),
                if i.reached < i.wanted {
                    format!(", only {} of {} open", i.reached, i.wanted)
                } else {
                    String::new()
                }
            ),
            _ => "error".into(),
        };
        t.row(
            "4",
            "agent memory per idle stream (KiB, VmRSS growth / streams)",
            "—".into(),
            show(per(c), 2),
            show(per(n), 2),
            String::new(),
            String::new(),
            "≤ 2 KiB",
            format!(
                "{}; {}",
                verdict("compat", ok(c), fig(c)),
                verdict("native", ok(n), fig(n))
            ),
        );
        let cp = |p: &PathResults| {
            get(&p.idle, |i| {
                i.control_plane_bytes_per_stream.map(|b| b / 1024.0)
            })
        };
        let cp_ok = |p: &PathResults| cp(p).ok().flatten().map(|k| k * 1024.0 <= CP_IDLE_BYTES);
        let cp_fig = |p: &PathResults| show(cp(p), 2) + " KiB";
        t.row(
            "4",
            "control-plane memory per idle stream (KiB)",
            "—".into(),
            show(cp(c), 2),
            show(cp(n), 2),
            String::new(),
            String::new(),
            "≤ 4 KiB",
            format!(
                "{}; {}",
                verdict("compat", cp_ok(c), cp_fig(c)),
                verdict("native", cp_ok(n), cp_fig(n))
            ),
        );
    }
    // 5. interactive
    if d.interactive.is_some() || c.interactive.is_some() || n.interactive.is_some() {
        for (name, ms) in [("p50", false), ("p99", true)] {
            let f = |p: &PathResults| {
                get(&p.interactive, |i| {
                    Some(if ms { i.p99_us } else { i.p50_us } / 1000.0)
                })
            };
            let an = f(n).ok().flatten();
            t.row(
                "5",
                &format!(
                    "interactive 64 B round trip under load of {} bulk streams, {name} (ms)",
                    crate::LOAD_STREAMS
                ),
                show(f(d), 2),
                show(f(c), 2),
                show(f(n), 2),
                opt(ratio(f(c), f(d)), |x| format!("{x:.1}×")),
                opt(ratio(f(n), f(d)), |x| format!("{x:.1}×")),
                if ms { "native p99 ≤ 5 ms" } else { "" },
                if ms {
                    format!(
                        "{}; compat: {} (head-of-line blocking)",
                        verdict(
                            "native",
                            an.map(|x| x <= INTERACTIVE_P99_MS),
                            opt(an, |x| format!("{x:.2} ms"))
                        ),
                        show(f(c), 2) + " ms"
                    )
                } else {
                    String::new()
                },
            );
        }
        let f = |p: &PathResults| get(&p.interactive, |i| Some(i.bulk_mb_per_s));
        t.row(
            "5",
            "… bulk echo rate meanwhile (MB/s each way, 4 streams)",
            show(f(d), 1),
            show(f(c), 1),
            show(f(n), 1),
            String::new(),
            String::new(),
            "",
            String::new(),
        );
    }
    // 6. core
    if !r.core.is_empty() {
        t.md.push_str(
            "\n| 6. tether-core (criterion, mean) | payload | ns / message | GB/s of payload |\n",
        );
        t.md.push_str("| --- | ---: | ---: | ---: |\n");
        for row in &r.core {
            let _ = writeln!(
                t.md,
                "| {} | {} B | {:.0} | {:.2} |",
                row["bench"].as_str().unwrap_or(""),
                row["payload_bytes"],
                row["ns_per_message"].as_f64().unwrap_or(0.0),
                row["gb_per_s"].as_f64().unwrap_or(0.0)
            );
        }
    }
    // Notes: errors and shortfalls.
    let mut notes = Vec::new();
    for (name, p) in [("direct", d), ("compat", c), ("native", n)] {
        let mut err = |bench: &str, e: &str| notes.push(format!("{name} {bench}: {e}"));
        if let Some(Err(e)) = &p.bulk {
            err("bulk", e);
        }
        if let Some(Err(e)) = &p.latency {
            err("latency", e);
        }
        match &p.many {
            Some(Err(e)) => err("many", e),
            Some(Ok(m)) => {
                if m.opened < m.streams {
                    err(
                        "many",
                        &format!("only {} of {} streams opened", m.opened, m.streams),
                    );
                }
                for e in &m.errors {
                    err("many", e);
                }
            }
            None => {}
        }
        match &p.idle {
            Some(Err(e)) => err("idle", e),
            Some(Ok(i)) => {
                if let Some(e) = &i.error {
                    err(
                        "idle",
                        &format!("{} of {} streams reached; {e}", i.reached, i.wanted),
                    );
                }
            }
            None => {}
        }
        match &p.interactive {
            Some(Err(e)) => err("interactive", e),
            Some(Ok(i)) => {
                if let Some(e) = &i.note {
                    err("interactive", e);
                }
            }
            None => {}
        }
    }
    if !notes.is_empty() {
        t.md.push_str("\nErrors and shortfalls:\n\n");
        for note in notes {
            let _ = writeln!(t.md, "- {}", note.replace('\n', " "));
        }
    }
    t.md
}
