//! The command-line contract: `--help`, `--version`, every flag from a `TETHER_*` variable, and
//! bad configuration as ONE line on stderr with a non-zero exit.

use std::process::{Command, Output};

fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether-agent"));
    cmd.args(args).env_remove("KUBERNETES_SERVICE_HOST");
    for (k, _) in std::env::vars() {
        if k.starts_with("TETHER_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Asserts exit status 2 and exactly one stderr line containing `needle`.
fn one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("tether-agent: "), "{}", lines[0]);
    assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
}

#[test]
fn help_and_version() {
    let out = agent(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--control-plane",
        "--token",
        "--ca-file",
        "--insecure-skip-tls-verify",
        "--kubeconfig",
        "--kube-url",
        "--kube-token-file",
        "--kube-ca-file",
        "--metrics-listen",
        "--log-format",
        "TETHER_CONTROL_PLANE",
        "TETHER_TOKEN",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    let out = agent(&["--version"], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("tether-agent "));
}

#[test]
fn bad_configuration_is_one_line() {
    one_line_error(&agent(&[], &[]), "--control-plane");
    let base = ["--control-plane", "https://127.0.0.1:1", "--token", "t"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    one_line_error(&agent(&base, &[]), "KUBERNETES_SERVICE_HOST");
    one_line_error(
        &agent(&with(&["--kube-token-file", "/x"]), &[]),
        "--kube-url",
    );
    one_line_error(
        &agent(
            &with(&["--kube-url", "https://a", "--kubeconfig", "/k"]),
            &[],
        ),
        "--kubeconfig",
    );
    one_line_error(
        &agent(&with(&["--kubeconfig", "/nonexistent/kubeconfig"]), &[]),
        "/nonexistent/kubeconfig",
    );
    one_line_error(&agent(&with(&["--kube-url", "ftp://a"]), &[]), "scheme");
    one_line_error(
        &agent(
            &with(&[
                "--kube-url",
                "https://a",
                "--ca-file",
                "/c",
                "--insecure-skip-tls-verify",
            ]),
            &[],
        ),
        "--insecure-skip-tls-verify",
    );
    one_line_error(
        &agent(
            &with(&["--kube-url", "https://a", "--ca-file", "/no/ca.pem"]),
            &[],
        ),
        "/no/ca.pem",
    );
    one_line_error(
        &agent(
            &with(&["--kube-url", "https://a", "--metrics-listen", "nope"]),
            &[],
        ),
        "--metrics-listen",
    );
    one_line_error(
        &agent(
            &with(&["--kube-url", "https://a", "--log-format", "xml"]),
            &[],
        ),
        "--log-format",
    );
    one_line_error(
        &agent(
            &[
                "--control-plane",
                "ftp://x",
                "--token",
                "t",
                "--kube-url",
                "https://a",
            ],
            &[],
        ),
        "--control-plane",
    );
}

#[test]
fn flags_come_from_the_environment() {
    // Everything from TETHER_*: the error is about the value given by the environment.
    let env = [
        ("TETHER_CONTROL_PLANE", "https://127.0.0.1:1"),
        ("TETHER_TOKEN", "secret-token"),
        ("TETHER_KUBE_URL", "https://127.0.0.1:2"),
        ("TETHER_CA_FILE", "/from/env/ca.pem"),
    ];
    let out = agent(&[], &env);
    one_line_error(&out, "/from/env/ca.pem");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("secret-token"));
    // Boolean variables accept the usual spellings; false does not conflict with --ca-file.
    let mut env2 = env.to_vec();
    env2.push(("TETHER_INSECURE_SKIP_TLS_VERIFY", "false"));
    one_line_error(&agent(&[], &env2), "/from/env/ca.pem");
    env2.pop();
    env2.push(("TETHER_INSECURE_SKIP_TLS_VERIFY", "1"));
    one_line_error(&agent(&[], &env2), "--insecure-skip-tls-verify");
    // The token is never echoed, even in --help.
    let out = agent(&["--help"], &env);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("secret-token"));
}
