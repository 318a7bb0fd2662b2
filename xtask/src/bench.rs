//! `cargo xtask bench`: the benchmarks of issues 5, 11 and 14.
//!
//! 1. Builds the release binaries (control plane, agent, kubesim) and the end-to-end bench
//!    client (`tests/e2e/examples/bench/`).
//! 2. Runs the tether-core criterion benches (`core/benches/wire.rs`: envelope and data-frame
//!    encode/decode), unless `--skip-core` (or `--only` without `core`).
//! 3. Runs the bench client: kubesim, control plane and agent as processes on loopback, once per
//!    wire mode (`--wire-mode compat`, `--wire-mode auto` = native), each figure beside the
//!    direct path (client straight to kubesim) in the same run: 1 bulk, 2 latency, 3 many
//!    streams, 4 idle cost, 5 interactive under load. It prints the table and writes
//!    `<target dir>/bench/results.md`, `results.json` and `results.png`.
//! 4. With `--publish`, copies those three files into `docs/benchmarks/`.
//!
//! Passed to the client: `--mib N` (bench 1), `--round-trips N` (2), `--streams N` (3),
//! `--idle N` (4), `--interactive N` (5), `--only LIST` (e.g. `bulk,latency`; names: bulk,
//! latency, many, idle, interactive, core, and the two below).
//!
//! Two benches have an example and outputs of their own, published beside the others:
//!
//! * `tcp` (`tests/e2e/examples/tcp/`; in every run unless `--only` leaves it out): raw TCP
//!   through `--forward` and the cluster agent against direct, with iperf3 and 64-byte round
//!   trips: `tcp.md`, `tcp.json`. Passed to it: `--secs S`, `--tcp-round-trips N`.
//! * `agents` (`tests/e2e/examples/agents/`; only with `--only agents`): 10 000 simulated
//!   agents against one control plane: `scale.md`, `scale.json`. Passed to it: `--agents N`,
//!   `--execs N`, `--idle-secs S`.

use crate::step::{Step, run_status, target_dir, workspace_root};

/// A bench with its own example: its `--only` name, its flags (as given to xtask, and as the
/// example takes them), its output files.
struct Extra {
    name: &'static str,
    flags: &'static [(&'static str, &'static str)],
    outputs: [&'static str; 2],
    /// Part of a run without `--only`.
    by_default: bool,
}

const EXTRAS: [Extra; 2] = [
    Extra {
        name: "tcp",
        flags: &[("--secs", "--secs"), ("--tcp-round-trips", "--round-trips")],
        outputs: ["tcp.md", "tcp.json"],
        by_default: true,
    },
    Extra {
        name: "agents",
        flags: &[
            ("--agents", "--agents"),
            ("--execs", "--execs"),
            ("--idle-secs", "--idle-secs"),
        ],
        outputs: ["scale.md", "scale.json"],
        by_default: false,
    },
];

/// The bench client's own names (and `core`, the criterion benches).
const CLIENT: [&str; 6] = ["bulk", "latency", "many", "idle", "interactive", "core"];

pub(crate) fn steps(args: &[String]) -> Vec<Step> {
    let mut skip_core = args.iter().any(|a| a == "--skip-core");
    let publish = args.iter().any(|a| a == "--publish");
    let mut client_args: Vec<String> = Vec::new();
    let mut extra_args: Vec<Vec<String>> = vec![Vec::new(); EXTRAS.len()];
    let mut only: Option<Vec<String>> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let extra_flag = EXTRAS.iter().enumerate().find_map(|(i, e)| {
            e.flags
                .iter()
                .find(|(given, _)| given == a)
                .map(|(_, taken)| (i, *taken))
        });
        if let Some((i, taken)) = extra_flag {
            extra_args[i].push(taken.to_string());
            extra_args[i].push(it.next().cloned().unwrap_or_default());
            continue;
        }
        if a == "--only" {
            let value = it.next().cloned().unwrap_or_default();
            let names: Vec<String> = value.split(',').map(str::to_owned).collect();
            let client: Vec<&str> = names
                .iter()
                .map(String::as_str)
                .filter(|b| CLIENT.contains(b))
                .collect();
            if !client.contains(&"core") {
                skip_core = true;
            }
            if !client.is_empty() {
                client_args.push(a.clone());
                client_args.push(client.join(","));
            }
            only = Some(names);
            continue;
        }
        if matches!(
            a.as_str(),
            "--mib" | "--round-trips" | "--streams" | "--idle" | "--interactive"
        ) {
            let value = it.next().cloned().unwrap_or_default();
            client_args.push(a.clone());
            client_args.push(value);
        }
    }
    let wanted = |extra: &Extra| {
        only.as_ref()
            .map_or(extra.by_default, |o| o.iter().any(|b| b == extra.name))
    };
    let client = only
        .as_ref()
        .is_none_or(|o| o.iter().any(|b| CLIENT.contains(&b.as_str())));
    let mut steps = vec![Step::cargo(
        "build release binaries",
        &[
            "build",
            "--release",
            "-p",
            "tether-control-plane",
            "-p",
            "tether-agent",
            "-p",
            "kubesim",
            "--bins",
        ],
    )];
    let mut examples: Vec<&str> = EXTRAS
        .iter()
        .filter(|e| wanted(e))
        .map(|e| e.name)
        .collect();
    if client {
        examples.insert(0, "bench");
    }
    for example in examples {
        steps.push(Step::cargo(
            &format!("build the {example} bench"),
            &[
                "build",
                "--release",
                "-p",
                "tether-e2e",
                "--example",
                example,
            ],
        ));
    }
    if skip_core || !client {
        println!("==> core criterion benches SKIPPED");
    } else {
        steps.push(Step::cargo(
            "core criterion benches",
            &[
                "bench",
                "-p",
                "tether-core",
                "--bench",
                "wire",
                "--",
                "--warm-up-time",
                "1",
                "--measurement-time",
                "3",
            ],
        ));
    }
    if client {
        steps.push(Step::new("end-to-end benches", move || {
            let target = target_dir();
            let release = target.join("release");
            let out = target.join("bench");
            let mut cmd = std::process::Command::new(release.join("examples/bench"));
            cmd.current_dir(workspace_root())
                .env("TETHER_E2E_BIN_DIR", &release)
                .arg("--out")
                .arg(&out)
                .args(&client_args);
            // Without this run's criterion figures, none (not stale ones from an earlier run).
            if !skip_core {
                cmd.arg("--criterion").arg(target.join("criterion"));
            }
            run_status(&mut cmd)
        }));
        if publish {
            steps.push(publish_step(
                "publish to docs/benchmarks",
                &["results.md", "results.json", "results.png"],
            ));
        }
    }
    for (extra, args) in EXTRAS.iter().zip(extra_args) {
        if !wanted(extra) {
            continue;
        }
        let name = extra.name;
        steps.push(Step::new(&format!("{name} bench"), move || {
            let target = target_dir();
            let release = target.join("release");
            let mut cmd = std::process::Command::new(release.join("examples").join(name));
            cmd.current_dir(workspace_root())
                .env("TETHER_E2E_BIN_DIR", &release)
                .arg("--out")
                .arg(target.join("bench"))
                .args(&args);
            run_status(&mut cmd)
        }));
        if publish {
            steps.push(publish_step(
                &format!("publish the {name} bench to docs/benchmarks"),
                &extra.outputs,
            ));
        }
    }
    steps
}

/// Copies `files` from `<target dir>/bench/` into `docs/benchmarks/`.
fn publish_step(name: &str, files: &'static [&'static str]) -> Step {
    Step::new(name, move || {
        let from = target_dir().join("bench");
        let to = workspace_root().join("docs/benchmarks");
        for file in files {
            std::fs::copy(from.join(file), to.join(file))
                .map_err(|e| format!("copy {file} to {}: {e}", to.display()))?;
            println!("    {}", to.join(file).display());
        }
        Ok(())
    })
}
