//! The no_std gate: build each no_std crate against a sysroot holding only `core` and
//! `compiler_builtins`.
//!
//! A `#![no_std]` attribute alone proves little: a dependency with its `std` feature on, or an
//! `extern crate alloc`, still compiles against the full host sysroot. Here the sysroot has no
//! `std` and no `alloc`, so either fails with E0463 ("can't find crate"). Each crate is built on
//! its own (`-p`) so workspace feature unification cannot hide a violation, with an explicit
//! `--target` so build scripts and proc-macros still use the real sysroot.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::step::{self, Step};

/// Each no_std crate with the feature sets it must build with.
const NO_STD_CRATES: &[(&str, &[&str])] = &[
    ("tether-core", &[]),
    ("tether-core", &["log"]),
    ("tether-core", &["defmt"]),
    ("tether-embassy", &[]),
];

/// One step per (crate, features) pair.
pub(crate) fn steps() -> Vec<Step> {
    NO_STD_CRATES
        .iter()
        .map(|(krate, features)| {
            let name = if features.is_empty() {
                format!("nostd {krate}")
            } else {
                format!("nostd {krate} --features {}", features.join(","))
            };
            Step::new(&name, move || build(krate, features))
        })
        .collect()
}

fn build(krate: &str, features: &[&str]) -> Result<(), String> {
    let host = host_triple()?;
    let sysroot = fake_sysroot(&host)?;
    let mut flags = std::env::var("RUSTFLAGS").unwrap_or_default();
    if !flags.is_empty() {
        flags.push(' ');
    }
    flags.push_str(&format!("--sysroot={}", sysroot.display()));
    let mut cmd = step::cargo();
    cmd.args(["build", "-p", krate, "--target", &host, "--target-dir"])
        .arg(step::target_dir().join("nostd-check"))
        .env("RUSTFLAGS", flags)
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    step::run_status(&mut cmd)
}

fn host_triple() -> Result<String, String> {
    let info = step::output(Command::new("rustc").arg("-vV"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .ok_or_else(|| "`rustc -vV` printed no host line".to_owned())
}

/// Builds `<target dir>/fake-sysroot`: the real sysroot's `bin/` plus only the core-level rlibs.
fn fake_sysroot(host: &str) -> Result<PathBuf, String> {
    let real =
        PathBuf::from(step::output(Command::new("rustc").args(["--print", "sysroot"]))?.trim());
    let fake = step::target_dir().join("fake-sysroot");
    if fake.exists() {
        fs::remove_dir_all(&fake).map_err(|e| format!("cannot clear {}: {e}", fake.display()))?;
    }
    let real_lib = real.join("lib/rustlib").join(host).join("lib");
    let fake_lib = fake.join("lib/rustlib").join(host).join("lib");
    fs::create_dir_all(&fake_lib)
        .map_err(|e| format!("cannot create {}: {e}", fake_lib.display()))?;
    link(&real.join("bin"), &fake.join("bin"))?;
    let keep = [
        "libcore-",
        "libcompiler_builtins-",
        "librustc_std_workspace_core-",
    ];
    let mut kept = 0;
    for entry in
        fs::read_dir(&real_lib).map_err(|e| format!("cannot read {}: {e}", real_lib.display()))?
    {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if keep.iter().any(|k| name.starts_with(k)) {
            link(&entry.path(), &fake_lib.join(&*name))?;
            kept += 1;
        }
    }
    if kept < keep.len() {
        return Err(format!(
            "{} lacks core rlibs (found {kept})",
            real_lib.display()
        ));
    }
    Ok(fake)
}

fn link(from: &Path, to: &Path) -> Result<(), String> {
    std::os::unix::fs::symlink(from, to)
        .map_err(|e| format!("cannot link {} -> {}: {e}", to.display(), from.display()))
}
