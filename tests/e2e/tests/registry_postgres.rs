//! The registry commands against a real PostgreSQL (started here): the same migrations and
//! queries as SQLite's, so `cluster` and `user` behave the same on the database replicas share.

use std::process::Output;

use tether_e2e::bins::bins;
use tether_e2e::cluster::clean_command;
use tether_e2e::services::Postgres;

fn admin(url: &str, args: &[&str]) -> Output {
    clean_command(&bins().control_plane)
        .args(args)
        .args(["--registry", url])
        .output()
        .expect("run tether-control-plane")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn refused(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(needle), "{stderr}");
}

#[test]
fn registry_commands_work_on_postgresql() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path());
    let url = pg.url();

    let token = ok(&admin(url, &["cluster", "add", "prod-eu"]));
    assert!(token.trim().starts_with("tta_"));
    refused(
        &admin(url, &["cluster", "add", "prod-eu"]),
        "already exists",
    );
    ok(&admin(url, &["cluster", "add", "staging"]));
    let kubeconfig = ok(&admin(
        url,
        &[
            "user",
            "add",
            "alice",
            "--grant",
            "prod-eu",
            "--group",
            "dev",
            "--server",
            "https://cp.example",
        ],
    ));
    assert!(kubeconfig.contains("token: \"ttu_"), "{kubeconfig}");
    ok(&admin(url, &["user", "add", "bob"]));
    ok(&admin(
        url,
        &["user", "grant", "bob", "staging", "--group", "ops"],
    ));
    refused(
        &admin(url, &["user", "grant", "bob", "nowhere"]),
        "cluster \"nowhere\" does not exist",
    );

    let clusters = ok(&admin(url, &["cluster", "list"]));
    assert!(
        clusters
            .lines()
            .any(|l| l.starts_with("prod-eu") && l.ends_with("alice")),
        "{clusters}"
    );
    let users = ok(&admin(url, &["user", "list"]));
    assert!(
        users.contains("prod-eu(dev)") && users.contains("staging(ops)"),
        "{users}"
    );

    ok(&admin(url, &["user", "revoke", "alice", "prod-eu"]));
    refused(
        &admin(url, &["user", "revoke", "alice", "prod-eu"]),
        "does not exist",
    );
    let rotated = ok(&admin(url, &["cluster", "rotate-token", "prod-eu"]));
    assert_ne!(rotated.trim(), token.trim());
    ok(&admin(url, &["cluster", "remove", "staging"]));
    let users = ok(&admin(url, &["user", "list"]));
    assert!(!users.contains("staging"), "{users}");
    ok(&admin(url, &["user", "remove", "bob"]));
    refused(
        &admin(url, &["user", "remove", "bob"]),
        "user \"bob\" does not exist",
    );
    // Applying the migrations again on every open changes nothing.
    let clusters = ok(&admin(url, &["cluster", "list"]));
    assert_eq!(clusters.lines().count(), 2, "{clusters}");
}
