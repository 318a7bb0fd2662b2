//! `cargo xtask bench`: the benchmarks of issue 5 that exist today (compat wire mode).
//!
//! 1. Builds the release binaries (control plane, agent, kubesim) and the end-to-end bench
//!    client (`tests/e2e/examples/bench.rs`).
//! 2. Runs the tether-core criterion benches (`core/benches/wire.rs`: envelope and data-frame
//!    encode/decode), unless `--skip-core`.
//! 3. Runs the bench client: kubesim, control plane and agent as processes on loopback; bulk
//!    (256 MiB each way through an exec of `cat`, sha256 checked) and latency (10 000 round
//!    trips of 64 bytes), each beside the direct path (client straight to kubesim) in the same
//!    run. It prints the table and writes `target/bench/results.md` and `results.json`.
//!
//! `--mib N` and `--round-trips N` are passed to the client (e.g. for a quick run).

use std::path::PathBuf;

use crate::step::{Step, run_status, workspace_root};

pub(crate) fn steps(args: &[String]) -> Vec<Step> {
    let skip_core = args.iter().any(|a| a == "--skip-core");
    let mut client_args: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if matches!(a.as_str(), "--mib" | "--round-trips") {
            client_args.push(a.clone());
            client_args.push(it.next().cloned().unwrap_or_default());
        }
    }
    let mut steps = vec![
        Step::cargo(
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
        ),
        Step::cargo(
            "build bench client",
            &[
                "build",
                "--release",
                "-p",
                "tether-e2e",
                "--example",
                "bench",
            ],
        ),
    ];
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
    steps.push(Step::new("end-to-end benches", move || {
        let target = target_dir();
        let release = target.join("release");
        let out = target.join("bench");
        let mut cmd = std::process::Command::new(release.join("examples/bench"));
        cmd.current_dir(workspace_root())
            .env("TETHER_E2E_BIN_DIR", &release)
            .arg("--out")
            .arg(&out)
            .arg("--criterion")
            .arg(target.join("criterion"))
            .args(&client_args);
        run_status(&mut cmd)
    }));
    steps
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                workspace_root().join(p)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"))
}
