//! Named, timed steps that stop at the first failure.

use std::fmt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// One gate: a name for the log and the work to do.
pub(crate) struct Step {
    name: String,
    run: Box<dyn Fn() -> Result<(), String>>,
}

/// The step that failed and why.
#[derive(Debug)]
pub(crate) struct Failure {
    step: String,
    reason: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step `{}` failed: {}", self.step, self.reason)
    }
}

impl Step {
    /// A step running arbitrary code.
    pub(crate) fn new(name: &str, run: impl Fn() -> Result<(), String> + 'static) -> Self {
        Self {
            name: name.to_owned(),
            run: Box::new(run),
        }
    }

    /// A step running `cargo <args>` in the workspace root.
    pub(crate) fn cargo(name: &str, args: &[&str]) -> Self {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        Self::new(name, move || {
            let mut cmd = cargo();
            cmd.args(&args);
            run_status(&mut cmd)
        })
    }
}

/// Runs the steps in order, printing each name and its duration; stops at the first failure.
pub(crate) fn run_all(steps: &[Step]) -> Result<(), Failure> {
    let total = Instant::now();
    for step in steps {
        println!("==> {}", step.name);
        let started = Instant::now();
        let outcome = (step.run)();
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => println!("<== {} ok ({secs:.1} s)", step.name),
            Err(reason) => {
                println!("<== {} FAILED ({secs:.1} s)", step.name);
                return Err(Failure {
                    step: step.name.clone(),
                    reason,
                });
            }
        }
    }
    println!(
        "all {} steps passed in {:.1} s",
        steps.len(),
        total.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo` as invoked by the user (`$CARGO`), started in the workspace root.
///
/// The variables `cargo run` set for xtask itself (`CARGO_PKG_*`, `CARGO_MANIFEST_*`, ...) are
/// removed: build scripts that track them (ring's does) would otherwise see a different
/// environment than a plain `cargo build` and rebuild everything above them each time.
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if is_xtask_only(key) {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Whether `key` is a variable cargo sets only for the xtask process it runs.
fn is_xtask_only(key: &str) -> bool {
    const PREFIXES: [&str; 5] = [
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_BIN_",
        "CARGO_CRATE_",
        "CARGO_PRIMARY_PACKAGE",
    ];
    PREFIXES.iter().any(|p| key.starts_with(p))
}

/// The workspace root: the parent of this crate's manifest directory.
pub(crate) fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Runs `cmd` with inherited output; a non-zero exit is an error naming the command.
pub(crate) fn run_status(cmd: &mut Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} exited with {status}"))
    }
}

/// Runs `cmd` and returns its stdout; a non-zero exit is an error carrying stderr.
pub(crate) fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("{cmd:?} printed non-UTF-8: {e}"))
}
