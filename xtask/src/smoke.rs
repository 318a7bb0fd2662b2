//! The no_std smoke binary: built alone, checked for std/alloc symbols, run, measured.

use std::process::Command;

use crate::step::{self, Step};

const PACKAGE: &str = "tether-nostd-smoke";
const PROFILE: &str = "smoke";

/// Build, inspect and run the smoke binary.
pub(crate) fn step() -> Step {
    Step::new("no_std smoke binary", run)
}

fn run() -> Result<(), String> {
    // Alone: building it with std crates would unify their features into its graph.
    step::run_status(step::cargo().args(["build", "-p", PACKAGE, "--profile", PROFILE]))?;
    let bin = step::target_dir().join(PROFILE).join(PACKAGE);

    let symbols = step::output(Command::new("nm").arg("--demangle").arg(&bin))?;
    let leaked: Vec<&str> = symbols
        .lines()
        .filter(|l| l.contains(" std::") || l.contains(" alloc::"))
        .take(5)
        .collect();
    if !leaked.is_empty() {
        return Err(format!("the smoke binary links std/alloc code: {leaked:?}"));
    }

    let status = Command::new(&bin)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if !status.success() {
        return Err(format!("{} exited with {status}", bin.display()));
    }

    let bytes = std::fs::metadata(&bin).map_err(|e| e.to_string())?.len();
    let sizes = step::output(Command::new("size").arg(&bin)).unwrap_or_default();
    println!("smoke binary: {} ({bytes} bytes on disk)", bin.display());
    print!("{sizes}");
    Ok(())
}
