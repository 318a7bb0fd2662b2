//! The servers the fleet tests start themselves (Redis and PostgreSQL, from Debian's packages),
//! installed when this machine lacks them.

use std::path::Path;
use std::process::Command;

use crate::step::Step;

/// Debian packages and the file that shows each is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("redis-server", "/usr/bin/redis-server"),
    ("postgresql", "/usr/lib/postgresql"),
];

/// The CI step: nothing when both are present; `apt-get install` as root otherwise.
pub(crate) fn step() -> Step {
    Step::new(
        "services (redis-server, postgresql for the fleet e2e)",
        ensure,
    )
}

fn ensure() -> Result<(), String> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, marker)| !has_server(marker))
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        println!("services: redis-server and PostgreSQL are installed");
        return Ok(());
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Err(format!(
            "the fleet e2e needs Debian's {}: install them (apt-get install {}) or run as root",
            missing.join(" and "),
            missing.join(" ")
        ));
    }
    println!("services: installing {}", missing.join(" "));
    let install = |update: bool| -> bool {
        if update {
            let _ = Command::new("apt-get").args(["update", "-q"]).status();
        }
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if install(false) || install(true) {
        Ok(())
    } else {
        Err(format!("apt-get install {} failed", missing.join(" ")))
    }
}

fn has_server(marker: &str) -> bool {
    let path = Path::new(marker);
    if marker == "/usr/lib/postgresql" {
        // A server, not only the client: some version's bin/postgres.
        return std::fs::read_dir(path).is_ok_and(|versions| {
            versions
                .flatten()
                .any(|v| v.path().join("bin/postgres").exists())
        });
    }
    path.exists()
}
