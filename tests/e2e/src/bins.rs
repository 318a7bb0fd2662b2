//! Locating (and, once per test process, building) the three binaries under test.
//!
//! They are bins of other workspace packages, so Cargo gives no `CARGO_BIN_EXE_*` for them. A
//! `cargo test` at the workspace root builds them into `target/<profile>/` before the tests run;
//! `cargo test -p tether-e2e` does not, so the first test of each test binary runs
//! `cargo build -p tether-control-plane -p tether-agent -p kubesim --bins` (a no-op of ~0.2 s
//! when they are fresh; it waits on the cargo lock like any build while others hold it).
//!
//! * `TETHER_E2E_SKIP_BUILD=1` skips that build (use the binaries as they are).
//! * `TETHER_E2E_BIN_DIR=DIR` takes the binaries from `DIR` (and skips the build).
//!
//! Anything missing fails the test with one line saying what and how to fix it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Package names built for the tests, with their binary names.
const PACKAGES: [(&str, &str); 3] = [
    ("tether-control-plane", "tether-control-plane"),
    ("tether-agent", "tether-agent"),
    ("kubesim", "kubesim"),
];

/// Paths of the binaries under test.
#[derive(Clone, Debug)]
pub struct Bins {
    /// `tether-control-plane`.
    pub control_plane: PathBuf,
    /// `tether-agent`.
    pub agent: PathBuf,
    /// `kubesim`.
    pub kubesim: PathBuf,
}

static BINS: OnceLock<Result<Bins, String>> = OnceLock::new();

/// The binaries, built first if needed; panics with one clear line when that fails.
pub fn bins() -> &'static Bins {
    match BINS.get_or_init(locate) {
        Ok(bins) => bins,
        Err(line) => panic!("{line}"),
    }
}

/// The workspace root (two levels above this package).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("workspace root")
        .to_path_buf()
}

fn locate() -> Result<Bins, String> {
    let explicit = std::env::var_os("TETHER_E2E_BIN_DIR").map(PathBuf::from);
    let dir = match &explicit {
        Some(dir) => dir.clone(),
        None => profile_dir()?,
    };
    let skip = explicit.is_some()
        || std::env::var("TETHER_E2E_SKIP_BUILD").is_ok_and(|v| !v.is_empty() && v != "0");
    if !skip {
        build(&dir)?;
    }
    let path = |bin: &str| {
        let p = dir.join(bin);
        if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "tether-e2e: {} is missing (build it with `cargo build -p {bin} --bins`)",
                p.display()
            ))
        }
    };
    Ok(Bins {
        control_plane: path("tether-control-plane")?,
        agent: path("tether-agent")?,
        kubesim: path("kubesim")?,
    })
}

/// `target/<profile>/`: the directory above the running test executable's `deps/`.
fn profile_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("tether-e2e: cannot find the test executable: {e}"))?;
    exe.parent()
        .filter(|d| d.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            format!(
                "tether-e2e: cannot tell the target dir from {} (set TETHER_E2E_BIN_DIR)",
                exe.display()
            )
        })
}

/// Runs the nested `cargo build` for the profile whose output directory is `dir`.
fn build(dir: &Path) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.arg("build").arg("--quiet").arg("--bins");
    for (package, _) in PACKAGES {
        cmd.args(["-p", package]);
    }
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    // The target dir this test binary lives in (`target/<profile>` -> `target`).
    if let Some(target) = dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    // Cargo sets package variables (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, ...) for this test
    // process; build scripts such as ring's track some of them, so passing them on would make
    // the nested build and the next outer build rebuild each other's dependencies.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let cargo_set = (key.starts_with("CARGO_")
            && !key.starts_with("CARGO_HOME")
            && !key.starts_with("CARGO_TARGET_DIR")
            && !key.starts_with("CARGO_BUILD_")
            && !key.starts_with("CARGO_NET_")
            && !key.starts_with("CARGO_REGISTRIES_")
            && !key.starts_with("CARGO_PROFILE_"))
            || key == "OUT_DIR";
        if cargo_set {
            cmd.env_remove(key);
        }
    }
    cmd.current_dir(workspace_root());
    let out = cmd
        .output()
        .map_err(|e| format!("tether-e2e: cannot run {cargo:?} to build the binaries: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first_error = stderr
        .lines()
        .find(|l| l.starts_with("error"))
        .unwrap_or_else(|| stderr.lines().last().unwrap_or("no output"));
    Err(format!(
        "tether-e2e: `cargo build -p tether-control-plane -p tether-agent -p kubesim --bins` failed: {first_error}"
    ))
}
