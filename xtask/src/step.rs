//! Named, timed steps that stop at the first failure.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
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
///
/// With `--target-dir DIR` given to xtask, every cargo it starts builds into `DIR`
/// (`CARGO_TARGET_DIR`), so the steps and [`target_dir`] agree.
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    if let Some(dir) = TARGET_DIR_OPTION.get() {
        cmd.env("CARGO_TARGET_DIR", dir);
    }
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

/// xtask's own `--target-dir DIR`, set once by `main` before any step runs.
static TARGET_DIR_OPTION: OnceLock<OsString> = OnceLock::new();

/// Takes `--target-dir DIR` / `--target-dir=DIR` out of `args` and makes it the target dir of
/// every cargo started from here on; a relative `CARGO_TARGET_DIR` is made absolute the same way.
/// Both are read relative to where the user stood, as cargo reads them (the steps run in the
/// workspace root). Call once, first.
pub(crate) fn init_target_dir(args: &mut Vec<String>) -> Result<(), String> {
    let dir = match split_target_dir_option(args)? {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
            Some(dir) if dir.is_relative() => dir,
            _ => return Ok(()),
        },
    };
    let dir = std::env::current_dir()
        .map_err(|e| format!("cannot read the current directory: {e}"))?
        .join(dir);
    TARGET_DIR_OPTION
        .set(dir.into_os_string())
        .map_err(|_| "the target dir was set twice".to_owned())
}

/// Removes `--target-dir DIR` / `--target-dir=DIR` from `args`, returning `DIR`.
fn split_target_dir_option(args: &mut Vec<String>) -> Result<Option<String>, String> {
    let Some(at) = args
        .iter()
        .position(|a| a == "--target-dir" || a.starts_with("--target-dir="))
    else {
        return Ok(None);
    };
    let flag = args.remove(at);
    let dir = match flag.strip_prefix("--target-dir=") {
        Some(dir) => dir.to_owned(),
        None if at < args.len() => args.remove(at),
        None => return Err("--target-dir needs a directory".to_owned()),
    };
    if args.iter().any(|a| a.starts_with("--target-dir")) {
        return Err("--target-dir given twice".to_owned());
    }
    Ok(Some(dir))
}

/// Cargo's real target directory for this workspace (`cargo metadata`'s `target_directory`):
/// honours `CARGO_TARGET_DIR`, xtask's `--target-dir` and `build.target-dir` in cargo's config.
/// Every step that reads or writes build outputs finds them below it. Panics with one clear line
/// if cargo cannot tell (no step can run then anyway).
pub(crate) fn target_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| metadata_target_dir(&mut cargo()).unwrap_or_else(|e| panic!("xtask: {e}")))
}

/// The workspace's `rust-version` (the minimum rustc any of its crates accepts), from
/// `cargo metadata`: the highest one a workspace package declares.
pub(crate) fn workspace_rust_version() -> Result<String, String> {
    let meta = metadata(&mut cargo())?;
    meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["rust_version"].as_str())
        .max_by_key(|v| crate::debian::upstream_version(v))
        .map(str::to_owned)
        .ok_or_else(|| "no workspace package declares a rust-version".to_owned())
}

/// `target_directory` as reported by `cmd` (a `cargo` command, given its environment).
fn metadata_target_dir(cmd: &mut Command) -> Result<PathBuf, String> {
    metadata(cmd)?["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| "`cargo metadata` reported no target_directory".to_owned())
}

/// `cargo metadata --format-version 1 --no-deps`, parsed.
fn metadata(cmd: &mut Command) -> Result<serde_json::Value, String> {
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    let text = output(cmd)?;
    serde_json::from_str(&text).map_err(|e| format!("`cargo metadata` printed bad JSON: {e}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cargo_without_target_dir() -> Command {
        let mut cmd = cargo();
        cmd.env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR");
        cmd
    }

    #[test]
    fn target_dir_is_cargos_own_by_default() {
        let dir = metadata_target_dir(&mut cargo_without_target_dir()).unwrap();
        assert_eq!(dir, workspace_root().join("target"));
    }

    #[test]
    fn target_dir_follows_cargo_target_dir() {
        let elsewhere = std::env::temp_dir().join("xtask-target-dir-test");
        let mut cmd = cargo_without_target_dir();
        cmd.env("CARGO_TARGET_DIR", &elsewhere);
        assert_eq!(metadata_target_dir(&mut cmd).unwrap(), elsewhere);
    }

    #[test]
    fn relative_cargo_target_dir_is_taken_from_the_workspace_root() {
        let mut cmd = cargo_without_target_dir();
        cmd.env("CARGO_TARGET_DIR", "some/where");
        assert_eq!(
            metadata_target_dir(&mut cmd).unwrap(),
            workspace_root().join("some/where")
        );
    }

    #[test]
    fn target_dir_option_is_taken_out_of_the_arguments() {
        let mut args: Vec<String> = ["ci", "--target-dir=/tmp/t", "--skip-cross"]
            .map(String::from)
            .into();
        assert_eq!(
            split_target_dir_option(&mut args).unwrap().unwrap(),
            "/tmp/t"
        );
        assert_eq!(args, ["ci", "--skip-cross"]);

        let mut args: Vec<String> = ["--target-dir", "out", "ci"].map(String::from).into();
        assert_eq!(split_target_dir_option(&mut args).unwrap().unwrap(), "out");
        assert_eq!(args, ["ci"]);

        let mut args: Vec<String> = ["ci"].map(String::from).into();
        assert_eq!(split_target_dir_option(&mut args).unwrap(), None);

        let mut args: Vec<String> = ["ci", "--target-dir"].map(String::from).into();
        let err = split_target_dir_option(&mut args).unwrap_err();
        assert!(err.contains("needs a directory"), "{err}");

        let mut args: Vec<String> = ["--target-dir=a", "--target-dir=b"]
            .map(String::from)
            .into();
        let err = split_target_dir_option(&mut args).unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn the_workspace_rust_version_is_read_from_cargo() {
        let v = workspace_rust_version().unwrap();
        assert!(crate::debian::upstream_version(&v) >= (1, 88, 0), "{v}");
    }
}
