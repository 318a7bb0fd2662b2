//! `kubectl exec -it` on a real pseudo-terminal: the initial size and a resize must reach the
//! pod's terminal, keystrokes are raw, and the exit code comes back.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const T: Duration = Duration::from_secs(15);

/// Collects a pty's output in the background.
fn collect_pty(mut reader: pty_process::OwnedReadPty) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    tokio::spawn(async move {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = reader.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

fn screen(buf: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap()).into_owned()
}

async fn wait_screen(buf: &Arc<Mutex<Vec<u8>>>, needle: &str) {
    let deadline = Instant::now() + T;
    while !screen(buf).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {needle:?}; terminal so far:\n{}",
            screen(buf)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `kubectl` (an `exec -it ... -- sh`) on a 33x91 pty, checks the size reaches the pod,
/// resizes to 40x120 and checks again, runs a command and exits 3.
pub async fn exec_it_with_resize(kubectl: Command) {
    let cmd = tokio::process::Command::from(kubectl);
    let (pty, pts) = pty_process::open().expect("open a pty");
    pty.resize(pty_process::Size::new(33, 91)).expect("size");
    let mut child = pty_process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn(pts)
        .expect("spawn kubectl on a pty");
    let (reader, mut writer) = pty.into_split();
    let out = collect_pty(reader);

    // The initial size reaches the remote terminal, which is a real tty. kubectl sends its
    // initial resize and the first stdin from separate goroutines, so a line typed at once may be
    // run before the size is applied: wait for the shell's prompt, then ask until the size shows
    // (an initial resize that never arrives still fails the test).
    let deadline = Instant::now() + T;
    while !["# ", "$ "]
        .iter()
        .any(|prompt| screen(&out).contains(prompt))
    {
        assert!(
            Instant::now() < deadline,
            "no shell prompt: {}",
            screen(&out)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writer.write_all(b"tty\n").await.unwrap();
    wait_screen(&out, "/dev/pts/").await;
    let deadline = Instant::now() + T;
    loop {
        writer.write_all(b"stty size\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        if screen(&out).contains("33 91") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the initial terminal size never reached the pod; terminal so far:\n{}",
            screen(&out)
        );
    }

    // A resize of the local terminal reaches it too (SIGWINCH -> channel 4 -> TIOCSWINSZ).
    writer.resize(pty_process::Size::new(40, 120)).unwrap();
    let deadline = Instant::now() + T;
    loop {
        writer.write_all(b"stty size\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        if screen(&out).contains("40 120") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resize never reached the remote terminal:\n{}",
            screen(&out)
        );
    }

    // Keystrokes are raw; the exit code comes back through the status.
    writer
        .write_all(b"echo tty-$((6*7)); exit 3\n")
        .await
        .unwrap();
    wait_screen(&out, "tty-42").await;
    let status = tokio::time::timeout(T, child.wait())
        .await
        .expect("kubectl exits")
        .unwrap();
    assert_eq!(status.code(), Some(3), "{}", screen(&out));
}
