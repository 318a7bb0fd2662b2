//! `cargo xtask bench`: the benchmarks of issue 5.
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
//! `--only agents` (alone or in the list) runs the fleet bench instead of or beside those
//! (`tests/e2e/examples/agents/`): 10 000 simulated agents against one control plane; it writes
//! `scale.md` and `scale.json`, published as `docs/benchmarks/scale.md` and `scale.json`.
//! Passed to it: `--agents N`, `--execs N`, `--idle-secs S`.
//!
//! Passed to the client: `--mib N` (bench 1), `--round-trips N` (2), `--streams N` (3),
//! `--idle N` (4), `--interactive N` (5), `--only LIST` (e.g. `bulk,latency`; names: bulk,
//! latency, many, idle, interactive, core).

use crate::step::{Step, run_status, target_dir, workspace_root};

pub(crate) fn steps(args: &[String]) -> Vec<Step> {
    let mut skip_core = args.iter().any(|a| a == "--skip-core");
    let publish = args.iter().any(|a| a == "--publish");
    let mut client_args: Vec<String> = Vec::new();
    let mut agents_args: Vec<String> = Vec::new();
    let mut agents = false;
    let mut others = true;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if matches!(a.as_str(), "--agents" | "--execs" | "--idle-secs") {
            agents_args.push(a.clone());
            agents_args.push(it.next().cloned().unwrap_or_default());
            continue;
        }
        if a == "--only" {
            let value = it.next().cloned().unwrap_or_default();
            agents = value.split(',').any(|b| b == "agents");
            let rest: Vec<&str> = value.split(',').filter(|b| *b != "agents").collect();
            others = !rest.is_empty();
            if !rest.contains(&"core") {
                skip_core = true;
            }
            if others {
                client_args.push(a.clone());
                client_args.push(rest.join(","));
            }
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
    if others {
        steps.push(Step::cargo(
            "build bench client",
            &[
                "build",
                "--release",
                "-p",
                "tether-e2e",
                "--example",
                "bench",
            ],
        ));
    }
    if agents {
        steps.push(Step::cargo(
            "build agents bench",
            &[
                "build",
                "--release",
                "-p",
                "tether-e2e",
                "--example",
                "agents",
            ],
        ));
    }
    if skip_core {
        println!("==> core criterion benches SKIPPED (--skip-core)");
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
    if agents {
        steps.push(Step::new(
            "agents bench (one control plane, many agents)",
            move || {
                let target = target_dir();
                let release = target.join("release");
                let mut cmd = std::process::Command::new(release.join("examples/agents"));
                cmd.current_dir(workspace_root())
                    .env("TETHER_E2E_BIN_DIR", &release)
                    .arg("--out")
                    .arg(target.join("bench"))
                    .args(&agents_args);
                run_status(&mut cmd)
            },
        ));
        if publish {
            steps.push(Step::new(
                "publish the agents bench to docs/benchmarks",
                || {
                    let from = target_dir().join("bench");
                    let to = workspace_root().join("docs/benchmarks");
                    for file in ["scale.md", "scale.json"] {
                        std::fs::copy(from.join(file), to.join(file))
                            .map_err(|e| format!("copy {file} to {}: {e}", to.display()))?;
                        println!("    {}", to.join(file).display());
                    }
                    Ok(())
                },
            ));
        }
    }
    if !others {
        return steps;
    }
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
        steps.push(Step::new("publish to docs/benchmarks", || {
            let from = target_dir().join("bench");
            let to = workspace_root().join("docs/benchmarks");
            for file in ["results.md", "results.json", "results.png"] {
                std::fs::copy(from.join(file), to.join(file))
                    .map_err(|e| format!("copy {file} to {}: {e}", to.display()))?;
                println!("    {}", to.join(file).display());
            }
            Ok(())
        }));
    }
    steps
}
