//! The cross gate: a real bare-metal build for thumbv7em-none-eabihf.
//!
//! rustup here has the host target only and no `rust-src`, so `-Zbuild-std` has no library source.
//! Debian bookworm-security ships a matching pair, `rustc-web` and `rust-web-src` (same version),
//! with their `libstd-rust-web-*` and `libllvm*`. The package lists are refreshed first
//! (`apt-get update`: a machine's lists may know only the main suite, whose compiler is too old),
//! then the newest version offered for both packages is chosen and checked against the
//! workspace's `rust-version` ([`crate::debian`]); it is never pinned in the repo, since the
//! security archive replaces versions over time. The exact `libstd-rust-web-<ver>` and
//! `libllvm<N>` names come from `apt-cache depends`. The packages are fetched with `apt-get
//! download` and unpacked with `dpkg -x` into `<target dir>/cross/debian` (kept and reused while
//! new enough; nothing is installed on the system).
//! rustup's cargo then builds with that compiler (`RUSTC`, `RUSTC_BOOTSTRAP=1` for `-Z` flags,
//! `-Zbuild-std=core`) and links with rustup's `rust-lld`.
//!
//! Built, each on its own so feature unification cannot hide a std/alloc dependency:
//! `tether-core`, `tether-embassy --features defmt,tls`, and the gateway firmware ELF
//! (`tether-gateway --no-default-features --features firmware`), whose flash and RAM use is printed
//! from its section headers and checked against the part (1 MiB flash, 256 KiB RAM).
//!
//! If the packages cannot be fetched the step fails; only `cargo xtask ci --skip-cross` skips it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::debian;
use crate::step::{self, Step};

const TARGET: &str = "thumbv7em-none-eabihf";
/// What the firmware's part offers (memory.x).
const FLASH_BYTES: u64 = 1024 * 1024;
const RAM_BYTES: u64 = 256 * 1024;
const RAM_START: u64 = 0x2000_0000;

/// The cross build as one CI step.
pub(crate) fn step() -> Step {
    Step::new("cross (thumbv7em-none-eabihf, -Zbuild-std=core)", run)
}

/// `cargo xtask cross`.
pub(crate) fn run() -> Result<(), String> {
    let cross = step::target_dir().join("cross");
    let started = Instant::now();
    let needed = step::workspace_rust_version()?;
    let toolchain = debian_toolchain(&cross, &needed)?;
    println!(
        "cross: Debian {} at {} (workspace rust-version {needed}; ready in {:.1} s)",
        toolchain.version,
        toolchain.dir.display(),
        started.elapsed().as_secs_f64()
    );
    let toolchain = toolchain.dir;
    let lld = rust_lld()?;
    let builds: [(&str, &[&str]); 3] = [
        ("tether-core", &["-p", "tether-core"]),
        (
            "tether-embassy",
            &["-p", "tether-embassy", "--features", "defmt,tls"],
        ),
        (
            "tether-gateway firmware",
            &[
                "-p",
                "tether-gateway",
                "--no-default-features",
                "--features",
                "firmware",
            ],
        ),
    ];
    for (name, args) in builds {
        let t = Instant::now();
        let mut cmd = step::cargo();
        cmd.args(["build", "--release", "-Zbuild-std=core", "--target", TARGET])
            .arg("--target-dir")
            .arg(cross.join("build"))
            .args(args)
            .env("RUSTC", toolchain.join("usr/bin/rustc"))
            .env(
                "LD_LIBRARY_PATH",
                toolchain.join("usr/lib/x86_64-linux-gnu"),
            )
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_THUMBV7EM_NONE_EABIHF_LINKER", &lld)
            .env("DEFMT_LOG", "info")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTC_WRAPPER");
        step::run_status(&mut cmd).map_err(|e| format!("{name}: {e}"))?;
        println!(
            "cross: {name} built for {TARGET} in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    let elf = cross
        .join("build")
        .join(TARGET)
        .join("release/tether-gateway");
    report_sizes(&elf)?;
    if let Some(budget) = budget_line(&cross.join("build").join(TARGET)) {
        println!("cross: {budget}");
    }
    println!("cross: total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// An unpacked Debian toolchain.
struct Toolchain {
    /// The root the packages were unpacked into (`usr/bin/rustc` below it).
    dir: PathBuf,
    /// What its rustc says of itself (`rustc 1.96.0 (…)`), with the Debian version fetched.
    version: String,
}

/// The unpacked Debian toolchain: the cached one while it is at least `needed`, otherwise the
/// newest the archive offers, fetched and unpacked.
fn debian_toolchain(cache: &Path, needed: &str) -> Result<Toolchain, String> {
    let dir = cache.join("debian");
    let marker = dir.join(".complete");
    if marker.is_file() && dir.join("usr/bin/rustc").is_file() {
        let rustc = rustc_version(&dir)?;
        if debian::upstream_version(rustc.trim_start_matches("rustc "))
            >= debian::upstream_version(needed)
        {
            println!("cross: reusing {}", dir.display());
            let fetched = fs::read_to_string(&marker).unwrap_or_default();
            let version = match fetched.lines().next().filter(|l| !l.contains(' ')) {
                Some(debian_version) => format!("{rustc} (Debian {debian_version})"),
                None => rustc,
            };
            return Ok(Toolchain { dir, version });
        }
        println!("cross: the cached {rustc} is older than rust-version {needed}; fetching anew");
    }
    let (debian_version, packages) = resolve_packages(needed)?;
    println!(
        "cross: chose rustc-web {debian_version}; fetching {}",
        packages.join(" ")
    );
    let debs = cache.join("debs");
    if debs.exists() {
        fs::remove_dir_all(&debs).map_err(|e| format!("cannot clear {}: {e}", debs.display()))?;
    }
    fs::create_dir_all(&debs).map_err(|e| format!("cannot create {}: {e}", debs.display()))?;
    let mut download = Command::new("apt-get");
    download.arg("download").args(&packages).current_dir(&debs);
    step::run_status(&mut download).map_err(|e| {
        format!(
            "cannot download the Debian toolchain ({e}); the cross build needs Debian's \
             package archive (skip it only with `cargo xtask ci --skip-cross`)"
        )
    })?;
    let partial = cache.join("debian.partial");
    if partial.exists() {
        fs::remove_dir_all(&partial)
            .map_err(|e| format!("cannot clear {}: {e}", partial.display()))?;
    }
    fs::create_dir_all(&partial).map_err(|e| e.to_string())?;
    for entry in fs::read_dir(&debs).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            step::run_status(Command::new("dpkg").arg("-x").arg(&path).arg(&partial))?;
        }
    }
    if !partial.join("usr/bin/rustc").is_file()
        || !partial
            .join("usr/lib/rustlib/src/rust/library/core")
            .is_dir()
    {
        return Err(format!(
            "the unpacked packages in {} lack rustc or the library source",
            partial.display()
        ));
    }
    let version = format!("{} (Debian {debian_version})", rustc_version(&partial)?);
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    }
    fs::rename(&partial, &dir).map_err(|e| e.to_string())?;
    // The Debian version, then what was fetched.
    fs::write(
        &marker,
        format!("{debian_version}\n{}\n", packages.join(" ")),
    )
    .map_err(|e| e.to_string())?;
    let _ = fs::remove_dir_all(&debs);
    Ok(Toolchain { dir, version })
}

/// `rustc --version` of the toolchain unpacked at `dir`.
fn rustc_version(dir: &Path) -> Result<String, String> {
    let out = step::output(
        Command::new(dir.join("usr/bin/rustc"))
            .arg("--version")
            .env("LD_LIBRARY_PATH", dir.join("usr/lib/x86_64-linux-gnu")),
    )?;
    Ok(out.trim().to_owned())
}

/// The Debian version chosen, and the packages to download: `rustc-web`, `rust-web-src`,
/// `libstd-rust-web-dev` and `libstd-rust-web-<ver>` pinned to it (one source package), and the
/// `libllvm<N>` it depends on. The package lists are refreshed first.
fn resolve_packages(needed: &str) -> Result<(String, Vec<String>), String> {
    println!("cross: refreshing the package lists (apt-get update)");
    if let Err(e) = step::run_status(Command::new("apt-get").args(["update", "-qq"])) {
        // Choose from the lists as they are; a too-old choice then fails with its own line.
        println!("cross: apt-get update failed ({e}); choosing from the lists as they are");
    }
    let madison = |package: &str| {
        step::output(Command::new("apt-cache").args(["madison", package]))
            .map_err(|e| format!("cannot ask apt-cache for {package}: {e}"))
    };
    let version = debian::choose(&madison("rustc-web")?, &madison("rust-web-src")?, needed)
        .map_err(|e| {
            format!("{e} (skip the cross build only with `cargo xtask ci --skip-cross`)")
        })?;
    let pinned = |package: &str| format!("{package}={version}");
    let missing = |what: &str| {
        format!(
            "apt-cache depends names no {what} for rustc-web {version}; cannot fetch its library"
        )
    };
    let dev = depends(&pinned("rustc-web"))
        .into_iter()
        .find(|d| d == "libstd-rust-web-dev")
        .ok_or_else(|| missing("libstd-rust-web-dev"))?;
    let std = depends(&pinned(&dev))
        .into_iter()
        .find(|d| d.starts_with("libstd-rust-web-") && *d != dev)
        .ok_or_else(|| missing("libstd-rust-web-<version>"))?;
    let llvm = depends(&pinned(&std))
        .into_iter()
        .find(|d| d.starts_with("libllvm"))
        .ok_or_else(|| missing("libllvm"))?;
    let packages = vec![
        pinned("rustc-web"),
        pinned("rust-web-src"),
        pinned(&dev),
        pinned(&std),
        llvm,
    ];
    Ok((version, packages))
}

/// Direct `Depends:` of `package` per `apt-cache depends` (empty when unknown).
fn depends(package: &str) -> Vec<String> {
    let Ok(out) = Command::new("apt-cache")
        .args(["depends", package])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|d| d.trim_matches(|c| c == '<' || c == '>').to_owned())
        .collect()
}

/// rustup's `rust-lld` (Debian's rustlib has none).
fn rust_lld() -> Result<PathBuf, String> {
    let sysroot = step::output(Command::new("rustc").args(["--print", "sysroot"]))?;
    let info = step::output(Command::new("rustc").arg("-vV"))?;
    let host = info
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .ok_or("`rustc -vV` printed no host line")?;
    let lld = PathBuf::from(sysroot.trim())
        .join("lib/rustlib")
        .join(host)
        .join("bin/rust-lld");
    if lld.is_file() {
        Ok(lld)
    } else {
        Err(format!("{} is missing", lld.display()))
    }
}

/// A section of an ELF32 file.
struct Section {
    name: String,
    kind: u32,
    flags: u32,
    addr: u64,
    size: u64,
}

const SHT_NOBITS: u32 = 8;
const SHF_ALLOC: u32 = 2;

/// Section headers of a little-endian ELF32 file.
fn sections(bytes: &[u8]) -> Result<Vec<Section>, String> {
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&1) || bytes.get(5) != Some(&1) {
        return Err("not a little-endian ELF32 file".into());
    }
    let bad = || "truncated ELF header".to_owned();
    let shoff = u32_at(0x20).ok_or_else(bad)? as usize;
    let shentsize = usize::from(u16_at(0x2e).ok_or_else(bad)?);
    let shnum = usize::from(u16_at(0x30).ok_or_else(bad)?);
    let shstrndx = usize::from(u16_at(0x32).ok_or_else(bad)?);
    let header = |i: usize| -> Option<(u32, u32, u32, u32, u32, u32)> {
        let o = shoff + i * shentsize;
        Some((
            u32_at(o)?,
            u32_at(o + 4)?,
            u32_at(o + 8)?,
            u32_at(o + 12)?,
            u32_at(o + 16)?,
            u32_at(o + 20)?,
        ))
    };
    let (_, _, _, _, str_off, _) = header(shstrndx).ok_or_else(bad)?;
    let mut out = Vec::new();
    for i in 0..shnum {
        let (name, kind, flags, addr, _, size) = header(i).ok_or_else(bad)?;
        let start = str_off as usize + name as usize;
        let end = bytes[start..]
            .iter()
            .position(|b| *b == 0)
            .map_or(start, |n| start + n);
        out.push(Section {
            name: String::from_utf8_lossy(&bytes[start..end]).into_owned(),
            kind,
            flags,
            addr: u64::from(addr),
            size: u64::from(size),
        });
    }
    Ok(out)
}

/// Prints the firmware's flash and RAM use and checks them against the part.
fn report_sizes(elf: &Path) -> Result<(), String> {
    let bytes = fs::read(elf).map_err(|e| format!("cannot read {}: {e}", elf.display()))?;
    let mut flash = 0u64;
    let mut ram = 0u64;
    let mut lines = Vec::new();
    for s in sections(&bytes)? {
        if s.flags & SHF_ALLOC == 0 || s.size == 0 {
            continue;
        }
        let in_ram = s.addr >= RAM_START;
        // Initialised RAM (.data) also occupies flash (its load image).
        if !in_ram || s.kind != SHT_NOBITS {
            flash += s.size;
        }
        if in_ram {
            ram += s.size;
        }
        lines.push(format!(
            "  {:<16} {:>8} B at {:#010x}{}",
            s.name,
            s.size,
            s.addr,
            if in_ram { " (RAM)" } else { "" }
        ));
    }
    println!("cross: firmware {}", elf.display());
    for l in &lines {
        println!("{l}");
    }
    println!(
        "cross: firmware flash {flash} B of {FLASH_BYTES} B ({:.1}%), static RAM {ram} B of \
         {RAM_BYTES} B ({:.1}%), {} B left for the stack",
        flash as f64 * 100.0 / FLASH_BYTES as f64,
        ram as f64 * 100.0 / RAM_BYTES as f64,
        RAM_BYTES.saturating_sub(ram)
    );
    if flash > FLASH_BYTES || ram > RAM_BYTES {
        return Err("the firmware does not fit the part".into());
    }
    Ok(())
}

/// The budget line the gateway's build script wrote (newest build).
fn budget_line(target_dir: &Path) -> Option<String> {
    let build = target_dir.join("release/build");
    let newest = fs::read_dir(build)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("tether-gateway-")
        })
        .map(|e| e.path().join("out/budget.txt"))
        .filter(|p| p.is_file())
        .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok())?;
    fs::read_to_string(newest).ok()
}
