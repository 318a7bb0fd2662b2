//! `kubectl attach`, `kubectl cp` and `kubectl logs -f` (real kubectl v1.32) against the
//! kubesim binary over TLS with a token.

mod support;

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Kubesim, sha256_file, write_random_file};

/// A long-running kubectl with piped stdio whose output is collected in the background.
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Running {
    fn spawn(sim: &Kubesim, args: &[&str]) -> Self {
        let mut child = sim
            .kubectl(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        let stdin = child.stdin.take();
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Self {
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    #[track_caller]
    fn wait_stdout(&self, needle: &str) {
        self.wait(needle, || self.stdout());
    }

    #[track_caller]
    fn wait_stderr(&self, needle: &str) {
        self.wait(needle, || self.stderr());
    }

    #[track_caller]
    fn wait(&self, needle: &str, text: impl Fn() -> String) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?}\n--- stdout:\n{}\n--- stderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for exit and returns the exit code.
    #[track_caller]
    fn exit_code(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "kubectl did not exit\n--- stdout:\n{}\n--- stderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

#[test]
fn attach_i_attachers_come_and_go() {
    let sim = Kubesim::start(&["default/demo"]);

    // First attacher: its stdin drives the main `sh`, whose output comes back.
    let mut first = Running::spawn(&sim, &["attach", "-i", "demo"]);
    first.send("echo first-$((40+2))\n");
    first.wait_stdout("first-42");
    drop(first); // kill the attacher; the main process keeps running

    // Output while nobody is attached is only logged, not replayed.
    sim.run(&["exec", "demo", "--", "true"]).assert_code(0);

    // Second attacher sees new output on stdout and stderr, then the main process's exit code.
    let mut second = Running::spawn(&sim, &["attach", "-i", "demo"]);
    second.send("echo second-$((1+1)); echo to-stderr >&2\n");
    second.wait_stdout("second-2");
    second.wait_stderr("to-stderr");
    assert!(
        !second.stdout().contains("first-42"),
        "no replay of history"
    );
    second.send("exit 4\n");
    assert_eq!(second.exit_code(), 4, "{}", second.stderr());
    assert!(
        second
            .stderr()
            .contains("command terminated with exit code 4")
    );

    // The log kept everything; the pod is now Failed.
    let logs = sim.run(&["logs", "demo"]);
    logs.assert_code(0);
    // (stdout and stderr are separate pipes: their relative order is not fixed)
    let mut lines: Vec<String> = logs.stdout_str().lines().map(str::to_string).collect();
    lines.sort();
    assert_eq!(lines, ["first-42", "second-2", "to-stderr"]);
    let phase = sim.run(&["get", "pod", "demo", "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase.stdout_str(), "Failed");
}

#[test]
fn attach_request_carries_the_options() {
    let sim = Kubesim::start(&["default/demo"]);
    let mut a = Running::spawn(&sim, &["attach", "-i", "demo"]);
    a.send("echo ready\n");
    a.wait_stdout("ready");
    let reqs = sim.requests();
    let attach = reqs
        .iter()
        .find(|r| r.path.ends_with("/pods/demo/attach"))
        .expect("attach recorded");
    assert_eq!(
        attach.query.as_deref(),
        Some("container=main&stderr=true&stdin=true&stdout=true")
    );
    a.send("exit 0\n");
    assert_eq!(a.exit_code(), 0, "{}", a.stderr());
}

#[test]
fn cp_50_mib_to_and_from_the_pod() {
    let sim = Kubesim::start(&["default/demo"]);
    let src = sim.dir().join("src.bin");
    write_random_file(&src, 50 << 20, 11);
    let want = sha256_file(&src);
    let pod_dir = sim.dir().join("pod-side");
    std::fs::create_dir(&pod_dir).unwrap();

    // local -> pod (into an existing directory: `test -d`, then `tar -xmf - -C dir`).
    let dest = format!("demo:{}", pod_dir.display());
    let up = support::run_command(
        sim.kubectl(&["cp", src.to_str().unwrap(), &dest]),
        None,
        Duration::from_secs(60),
    );
    up.assert_code(0);
    let in_pod = pod_dir.join("src.bin");
    assert_eq!(sha256_file(&in_pod), want, "copy into the pod");

    // pod -> local (`tar cf -` streamed back).
    let back = sim.dir().join("back.bin");
    let from = format!("demo:{}", in_pod.display());
    let down = support::run_command(
        sim.kubectl(&["cp", &from, back.to_str().unwrap()]),
        None,
        Duration::from_secs(60),
    );
    down.assert_code(0);
    assert_eq!(sha256_file(&back), want, "copy out of the pod");

    // Every cp step is an exec preceded by a GET of the pod.
    let execs: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/exec"))
        .filter_map(|r| r.query)
        .collect();
    assert!(
        execs
            .iter()
            .any(|q| q.starts_with("command=test&command=-d")),
        "{execs:?}"
    );
    assert!(
        execs
            .iter()
            .any(|q| q.starts_with("command=tar&command=-xmf")),
        "{execs:?}"
    );
    assert!(
        execs
            .iter()
            .any(|q| q.starts_with("command=tar&command=cf")),
        "{execs:?}"
    );
}

#[test]
fn logs_follow_sees_lines_appended_later() {
    let sim = Kubesim::start(&["default/demo"]);
    let mut driver = Running::spawn(&sim, &["attach", "-i", "demo"]);
    driver.send("echo before-1\n");
    driver.wait_stdout("before-1");

    let plain = sim.run(&["logs", "demo"]);
    plain.assert_code(0);
    assert_eq!(plain.stdout_str(), "before-1\n");

    let mut follow = Running::spawn(&sim, &["logs", "-f", "demo"]);
    follow.wait_stdout("before-1\n");
    for i in 0..3 {
        driver.send(&format!("echo after-{i}\n"));
        follow.wait_stdout(&format!("after-{i}\n"));
    }
    // When the main process exits the follow ends by itself, with everything delivered.
    driver.send("echo last; exit 0\n");
    assert_eq!(follow.exit_code(), 0, "{}", follow.stderr());
    assert_eq!(
        follow.stdout(),
        "before-1\nafter-0\nafter-1\nafter-2\nlast\n"
    );
    assert_eq!(driver.exit_code(), 0);

    let tail = sim.run(&["logs", "--tail=2", "demo"]);
    tail.assert_code(0);
    assert_eq!(tail.stdout_str(), "after-2\nlast\n");
}
