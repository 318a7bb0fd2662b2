//! Real Redis and PostgreSQL servers for the fleet tests, started on free loopback ports in a
//! temporary directory and stopped on drop. Not found: the test fails saying what to install
//! (`.ci/run` installs both from Debian's packages).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cluster::spawn_listening;
use crate::proc::Proc;

/// A `redis-server` without persistence.
pub struct Redis {
    proc: Proc,
    url: String,
}

impl Redis {
    /// Starts one, logging to `dir/redis.log`.
    pub fn start(dir: &Path) -> Self {
        let bin = find(&["/usr/bin/redis-server", "/usr/local/bin/redis-server"]).unwrap_or_else(|| {
            panic!("tether-e2e: redis-server not found: install Debian's redis-server (.ci/run does)")
        });
        let (proc, addr) = spawn_listening("redis-server", &dir.join("redis.log"), |addr| {
            let mut cmd = Command::new(&bin);
            cmd.args(["--bind", "127.0.0.1", "--port", &addr.port().to_string()]);
            cmd.args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ]);
            cmd.arg("--dir").arg(dir);
            cmd
        });
        Self {
            proc,
            url: format!("redis://{addr}"),
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's log.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

/// A PostgreSQL server with one superuser, `tether`, trusted on loopback.
pub struct Postgres {
    proc: Proc,
    url: String,
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// Initialises a cluster in a temporary directory and starts it. As root (CI), the server
    /// runs as the `postgres` user (through `setpriv`), since PostgreSQL refuses to run as root.
    pub fn start(log_dir: &Path) -> Self {
        let bin_dir = postgres_bin_dir().unwrap_or_else(|| {
            panic!("tether-e2e: PostgreSQL server not found under /usr/lib/postgresql: install Debian's postgresql (.ci/run does)")
        });
        let dir = tempfile::Builder::new()
            .prefix("tether-e2e-pg-")
            .tempdir()
            .expect("temp dir");
        let data = dir.path().join("data");
        let as_root = is_root();
        if as_root {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown postgres failed");
        }
        let run = |program: &Path| {
            if as_root {
                // setpriv execs the program itself: signals and kills reach the server.
                let mut cmd = Command::new("setpriv");
                cmd.args([
                    "--reuid",
                    "postgres",
                    "--regid",
                    "postgres",
                    "--init-groups",
                    "--",
                ])
                .arg(program);
                cmd
            } else {
                Command::new(program)
            }
        };
        let init = run(&bin_dir.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "tether", "--no-sync"])
            .output()
            .expect("initdb");
        assert!(
            init.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let socket_dir = dir.path().to_path_buf();
        let (proc, addr) = spawn_listening("postgres", &log_dir.join("postgres.log"), |addr| {
            let mut cmd = run(&bin_dir.join("postgres"));
            cmd.arg("-D").arg(&data);
            cmd.args(["-h", "127.0.0.1", "-p", &addr.port().to_string()]);
            cmd.arg("-k").arg(&socket_dir);
            cmd.args(["-c", "fsync=off", "-c", "max_connections=200"]);
            cmd
        });
        let url = format!("postgres://tether@{addr}/postgres");
        // Listening is not yet accepting logins while it recovers; wait for a real answer.
        wait_accepting(addr);
        Self {
            proc,
            url,
            _dir: dir,
        }
    }

    /// `postgres://tether@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's log.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}

fn wait_accepting(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let psql = find(&["/usr/bin/psql", "/usr/local/bin/psql"]);
    let Some(psql) = psql else {
        std::thread::sleep(Duration::from_secs(1));
        return;
    };
    while Instant::now() < deadline {
        let ok = Command::new(&psql)
            .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
            .args(["-U", "tether", "-d", "postgres", "-c", "select 1"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("tether-e2e: PostgreSQL on {addr} did not accept logins within 30 s");
}

fn find(paths: &[&str]) -> Option<PathBuf> {
    paths.iter().map(PathBuf::from).find(|p| p.exists())
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding a server.
fn postgres_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next().map(|uid| uid == "0"))
            .unwrap_or(false)
    })
}
