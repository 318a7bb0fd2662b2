//! End-to-end benchmarks of issue 5 (run by `cargo xtask bench`). kubesim, `tether-control-plane`
//! and `tether-agent` run as processes on loopback (the [`Cluster`] of the end-to-end tests); a
//! kubectl-free client opens `v5.channel.k8s.io` execs of `cat` (and attaches) on `default/demo`
//! through the tunnel, once per wire mode (**compat**: agent and control plane started with
//! `--wire-mode compat`; **native**: `--wire-mode auto`), and straight to kubesim (**direct**),
//! in the same run:
//!
//! 1. `bulk`: one stream, N MiB (256) each way in 32 KiB messages, sha256 checked: MB/s.
//! 2. `latency`: R (10 000) round trips of 64 bytes: p50/p99/p99.9 and the added latency.
//! 3. `many`: S (1 000) concurrent streams of 1 MiB each way, each its own seeded data, checked
//!    byte for byte (no loss, no reordering) and by sha256: wall time; peak RSS (`VmHWM`) of the
//!    agent and the control plane.
//! 4. `idle`: I (10 000) idle attaches kept open: VmRSS growth of the agent (and control plane)
//!    per stream.
//! 5. `interactive`: 64-byte round trips of one stream, 2 ms apart, while 4 streams of `cat` are
//!    kept saturated both ways: p50/p99.
//!
//! With `--criterion DIR` it also tabulates the tether-core criterion benches (6). Writes the
//! table to stdout, `results.md`, `results.json` and PNG plots to `--out`.
//!
//! ```sh
//! TETHER_E2E_BIN_DIR=target/release cargo run --release -p tether-e2e --example bench -- \
//!     --out target/bench [--mib 256] [--round-trips 10000] [--streams 1000] [--idle 10000] \
//!     [--interactive 2000] [--only bulk,latency,many,idle,interactive] [--criterion DIR]
//! ```

mod benches;
mod client;
mod plot;
mod report;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tether_e2e::Cluster;
use tether_e2e::data::{Prng, Sha256Stream};

use benches::{Bulk, Idle, Interactive, Many};
use client::Target;

/// The data pattern cycled through by the bulk writer.
const PATTERN: usize = 8 * 1024 * 1024;
/// Bytes each way per stream in bench 3.
const MANY_BYTES: usize = 1024 * 1024;
/// Saturating streams in bench 5.
const LOAD_STREAMS: usize = 4;
/// Time between interactive round trips ("typing").
const TYPING_GAP: Duration = Duration::from_millis(2);
/// Longest interactive phase per path.
const INTERACTIVE_CAP: Duration = Duration::from_secs(40);

pub(crate) const ALL: [&str; 5] = ["bulk", "latency", "many", "idle", "interactive"];

pub(crate) struct Args {
    pub(crate) out: PathBuf,
    pub(crate) mib: usize,
    pub(crate) round_trips: usize,
    pub(crate) streams: usize,
    pub(crate) idle: usize,
    pub(crate) interactive: usize,
    pub(crate) only: Vec<String>,
    pub(crate) criterion: Option<PathBuf>,
}

impl Args {
    fn wants(&self, bench: &str) -> bool {
        self.only.iter().any(|b| b == bench)
    }
}

fn args() -> Args {
    let mut a = Args {
        out: PathBuf::from("target/bench"),
        mib: 256,
        round_trips: 10_000,
        streams: 1000,
        idle: 10_000,
        interactive: 2000,
        only: ALL.iter().map(|s| s.to_string()).collect(),
        criterion: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--out" => a.out = val().into(),
            "--mib" => a.mib = val().parse().expect("--mib N"),
            "--round-trips" => a.round_trips = val().parse().expect("--round-trips N"),
            "--streams" => a.streams = val().parse().expect("--streams N"),
            "--idle" => a.idle = val().parse().expect("--idle N"),
            "--interactive" => a.interactive = val().parse().expect("--interactive N"),
            "--only" => {
                a.only = val()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                for b in &a.only {
                    assert!(
                        ALL.contains(&b.as_str()) || b == "core",
                        "--only: unknown bench {b} (known: {})",
                        ALL.join(",")
                    );
                }
            }
            "--criterion" => a.criterion = Some(val().into()),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// A tunnel wire mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Compat,
    Native,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Compat => "compat",
            Self::Native => "native",
        }
    }

    /// The `--wire-mode` value.
    fn flag(self) -> &'static str {
        match self {
            Self::Compat => "compat",
            Self::Native => "auto",
        }
    }
}

/// Latency percentiles (µs).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Latency {
    pub(crate) trips: usize,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
}

pub(crate) type Res<T> = Result<T, String>;

/// Everything measured on one path.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct PathResults {
    /// How the tunnel was configured (tunnel modes), e.g. `--wire-mode compat`.
    pub(crate) config: Option<String>,
    /// Log lines of agent/control plane that mention the wire mode (what was negotiated).
    pub(crate) wire_log: Vec<String>,
    pub(crate) bulk: Option<Res<Bulk>>,
    pub(crate) latency: Option<Res<Latency>>,
    pub(crate) many: Option<Res<Many>>,
    pub(crate) idle: Option<Res<Idle>>,
    pub(crate) interactive: Option<Res<Interactive>>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Results {
    pub(crate) machine: report::Machine,
    pub(crate) mib: usize,
    pub(crate) round_trips: usize,
    pub(crate) streams: usize,
    pub(crate) idle: usize,
    pub(crate) interactive: usize,
    pub(crate) bulk_sha256: String,
    pub(crate) direct: PathResults,
    pub(crate) compat: PathResults,
    pub(crate) native: PathResults,
    pub(crate) core: Vec<serde_json::Value>,
    /// Whether the binaries accept `--wire-mode` (else both tunnel columns ran the default).
    pub(crate) wire_mode_flag: [bool; 2],
}

/// Whether `bin [sub] --help` mentions `--wire-mode`.
fn has_wire_flag(bin: &std::path::Path, sub: &[&str]) -> bool {
    std::process::Command::new(bin)
        .args(sub)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--wire-mode"))
        .unwrap_or(false)
}

/// Raises the soft open-files limit to the hard one (children inherit it).
fn raise_nofile() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    let _ = setrlimit(Resource::Nofile, l);
    getrlimit(Resource::Nofile).current
}

struct Env {
    flags: [bool; 2],
    rt: tokio::runtime::Runtime,
}

impl Env {
    /// A fresh cluster for `mode` (a panic while starting is an `Err`).
    fn cluster(&self, mode: Mode) -> Result<Cluster, String> {
        // One client opens every stream as one user: 1 000 and 10 000 streams are the point of
        // benches 3 and 4, so the per-user limit (default 128) is lifted.
        let mut b = Cluster::builder().control_plane_args(&["--max-streams-per-user", "0"]);
        if self.flags[0] {
            b = b.agent_args(&["--wire-mode", mode.flag()]);
        }
        if self.flags[1] {
            b = b.control_plane_args(&["--wire-mode", mode.flag()]);
        }
        std::panic::catch_unwind(AssertUnwindSafe(|| b.start())).map_err(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("cluster did not start: {msg}")
        })
    }
}

fn tunnel(c: &Cluster, mode: Mode) -> Target {
    Target::new(
        mode.name(),
        c.server_url(),
        c.control_plane_ca_pem(),
        c.user_token(),
    )
}

fn direct(c: &Cluster) -> Target {
    Target::new(
        "direct",
        &c.kubesim_url(),
        c.kubesim_ca_pem(),
        c.kube_token(),
    )
}

fn pids(c: &mut Cluster) -> [Option<u32>; 2] {
    [
        c.agent().map(|p| p.pid()),
        c.control_plane().map(|p| p.pid()),
    ]
}

/// Agent and control-plane log lines about the wire mode.
fn wire_log(c: &mut Cluster) -> Vec<String> {
    let mut lines = Vec::new();
    for log in [
        c.agent().map(|p| p.log()),
        c.control_plane().map(|p| p.log()),
    ]
    .into_iter()
    .flatten()
    {
        lines.extend(
            log.lines()
                .filter(|l| {
                    let l = l.to_ascii_lowercase();
                    l.contains("wire") || l.contains("native")
                })
                .take(3)
                .map(str::to_string),
        );
    }
    lines
}

fn latency(sorted: &[u64]) -> Latency {
    Latency {
        trips: sorted.len(),
        p50_us: benches::pct_us(sorted, 50.0),
        p99_us: benches::pct_us(sorted, 99.0),
        p999_us: benches::pct_us(sorted, 99.9),
    }
}

fn main() {
    let a = args();
    std::fs::create_dir_all(&a.out).expect("out dir");
    let nofile = raise_nofile();
    eprintln!("bench: open-files limit {nofile:?}");
    let bins = tether_e2e::bins::bins();
    let flags = [
        has_wire_flag(&bins.agent, &[]),
        has_wire_flag(&bins.control_plane, &["serve"]),
    ];
    if !flags.iter().all(|&f| f) {
        eprintln!(
            "bench: WARNING: --wire-mode not supported (agent {}, control plane {}): compat and native columns both run the binaries' default mode",
            flags[0], flags[1]
        );
    }
    let env = Env {
        flags,
        rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime"),
    };

    let pattern = Arc::new(Prng::new(5).bytes(PATTERN));
    let mut sha = Sha256Stream::new();
    let mut left = a.mib * 1024 * 1024;
    while left > 0 {
        let n = left.min(PATTERN);
        sha.update(&pattern[..n]);
        left -= n;
    }
    let expect = sha.hex();

    let mut direct_r = PathResults::default();
    let mut modes = [PathResults::default(), PathResults::default()];
    for (mi, mode) in [Mode::Compat, Mode::Native].into_iter().enumerate() {
        let r = &mut modes[mi];
        r.config = Some(if flags.iter().all(|&f| f) {
            format!("--wire-mode {}", mode.flag())
        } else {
            "default (--wire-mode not supported by the binaries)".into()
        });
        let first = mode == Mode::Compat;
        // 1, 2, 5 share a cluster.
        if a.wants("bulk") || a.wants("latency") || a.wants("interactive") {
            match env.cluster(mode) {
                Err(e) => {
                    eprintln!("bench: {}: {e}", mode.name());
                    r.bulk = a.wants("bulk").then(|| Err(e.clone()));
                    r.latency = a.wants("latency").then(|| Err(e.clone()));
                    r.interactive = a.wants("interactive").then(|| Err(e.clone()));
                }
                Ok(mut c) => {
                    let (t, d) = (tunnel(&c, mode), direct(&c));
                    if a.wants("bulk") {
                        if first {
                            eprintln!("bench 1: bulk {} MiB, direct", a.mib);
                            direct_r.bulk = Some(env.rt.block_on(benches::bulk(
                                &d,
                                pattern.clone(),
                                a.mib,
                                &expect,
                            )));
                            eprintln!("  {:?}", direct_r.bulk);
                        }
                        eprintln!("bench 1: bulk {} MiB, {}", a.mib, mode.name());
                        r.bulk = Some(env.rt.block_on(benches::bulk(
                            &t,
                            pattern.clone(),
                            a.mib,
                            &expect,
                        )));
                        eprintln!("  {:?}", r.bulk);
                    }
                    if a.wants("latency") {
                        if first {
                            eprintln!("bench 2: {} round trips, direct", a.round_trips);
                            direct_r.latency = Some(
                                env.rt
                                    .block_on(benches::round_trips(
                                        &d,
                                        a.round_trips,
                                        Duration::ZERO,
                                    ))
                                    .map(|v| latency(&v)),
                            );
                            eprintln!("  {:?}", direct_r.latency);
                        }
                        eprintln!("bench 2: {} round trips, {}", a.round_trips, mode.name());
                        r.latency = Some(
                            env.rt
                                .block_on(benches::round_trips(&t, a.round_trips, Duration::ZERO))
                                .map(|v| latency(&v)),
                        );
                        eprintln!("  {:?}", r.latency);
                    }
                    if a.wants("interactive") {
                        let run = |t: &Target| {
                            env.rt.block_on(benches::interactive(
                                t,
                                a.interactive,
                                TYPING_GAP,
                                LOAD_STREAMS,
                                INTERACTIVE_CAP,
                            ))
                        };
                        if first {
                            eprintln!("bench 5: interactive under load, direct");
                            direct_r.interactive = Some(run(&d));
                            eprintln!("  {:?}", direct_r.interactive);
                        }
                        eprintln!("bench 5: interactive under load, {}", mode.name());
                        r.interactive = Some(run(&t));
                        eprintln!("  {:?}", r.interactive);
                    }
                    r.wire_log = wire_log(&mut c);
                }
            }
        }
        if a.wants("many") {
            r.many = Some(env.cluster(mode).map(|mut c| {
                if first {
                    eprintln!("bench 3: {} streams x 1 MiB, direct", a.streams);
                    let m = env
                        .rt
                        .block_on(benches::many(&direct(&c), a.streams, MANY_BYTES));
                    eprintln!("  {m:?}");
                    direct_r.many = Some(Ok(m));
                }
                eprintln!("bench 3: {} streams x 1 MiB, {}", a.streams, mode.name());
                let [agent, cp] = pids(&mut c);
                // VmHWM is a high-water mark: read it before any direct run would matter (the
                // direct run does not touch agent or control plane).
                let mut m =
                    env.rt
                        .block_on(benches::many(&tunnel(&c, mode), a.streams, MANY_BYTES));
                m.agent_peak_kib =
                    agent.and_then(|p| tether_e2e::proc::proc_status_kib(p, "VmHWM:"));
                m.control_plane_peak_kib =
                    cp.and_then(|p| tether_e2e::proc::proc_status_kib(p, "VmHWM:"));
                eprintln!("  {m:?}");
                m
            }));
        }
        if a.wants("idle") {
            r.idle = Some(env.cluster(mode).map(|mut c| {
                if first {
                    eprintln!("bench 4: {} idle streams, direct", a.idle);
                    let i = env
                        .rt
                        .block_on(benches::idle(&direct(&c), a.idle, [None, None]));
                    eprintln!("  {i:?}");
                    direct_r.idle = Some(Ok(i));
                    // Let kubesim and the client settle before the tunnel run.
                    std::thread::sleep(Duration::from_secs(1));
                }
                eprintln!("bench 4: {} idle streams, {}", a.idle, mode.name());
                let p = pids(&mut c);
                let i = env.rt.block_on(benches::idle(&tunnel(&c, mode), a.idle, p));
                eprintln!("  {i:?}");
                i
            }));
        }
    }
    let [compat, native] = modes;
    let core = a
        .criterion
        .as_deref()
        .map(report::criterion_rows)
        .unwrap_or_default();
    let results = Results {
        machine: report::machine(),
        mib: a.mib,
        round_trips: a.round_trips,
        streams: a.streams,
        idle: a.idle,
        interactive: a.interactive,
        bulk_sha256: expect,
        direct: direct_r,
        compat,
        native,
        core,
        wire_mode_flag: flags,
    };
    let md = report::markdown(&results);
    std::fs::write(a.out.join("results.md"), &md).expect("write results.md");
    std::fs::write(
        a.out.join("results.json"),
        serde_json::to_string_pretty(&results).expect("json"),
    )
    .expect("write results.json");
    let pngs = plot::plots(&results, &a.out);
    println!("\n{md}");
    println!(
        "written: {}/results.md, results.json{}",
        a.out.display(),
        pngs.iter().map(|p| format!(", {p}")).collect::<String>()
    );
}
