//! A container's long-running main process (`sh` reading stdin, or the pod's command), its log
//! file, and the attach fan-out.
//!
//! Contract:
//! * The main process starts with the pod, in the pod's working directory, with piped stdin,
//!   stdout and stderr. It is not restarted when it exits.
//! * Everything it writes (stdout and stderr, interleaved as read) is appended to the container
//!   log file, then delivered to every current attacher that asked for that stream. A slow
//!   attacher slows the main process (bounded queues, awaited sends); bytes are never dropped.
//! * Attachers may come and go. Output written while nobody is attached is only logged.
//! * Attachers share the main process's stdin; an attacher closing its stdin does not close it.
//! * On exit, every attacher's queue is closed after the last output chunk, then the exit code
//!   (128+signal for a signal) is published.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::sync::{mpsc, oneshot, watch};

use crate::channel::ids;

/// Queue depth (chunks) between the main process and one attacher.
const ATTACH_QUEUE: usize = 16;
/// Read size for the main process's pipes.
const CHUNK: usize = 32 * 1024;

struct Attacher {
    id: u64,
    stdout: bool,
    stderr: bool,
    tx: mpsc::Sender<(u8, Bytes)>,
}

/// One attach registration: output chunks `(channel, bytes)` arrive on `output`.
pub struct Attachment {
    /// Registration id, for [`Container::detach`].
    pub id: u64,
    /// Output of the main process; closed when it exits (after the last chunk).
    pub output: mpsc::Receiver<(u8, Bytes)>,
}

/// A running (or finished) container main process.
pub struct Container {
    name: String,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    attachers: Mutex<Vec<Attacher>>,
    next_id: AtomicU64,
    log_path: PathBuf,
    log_len: watch::Sender<u64>,
    exit: watch::Sender<Option<u8>>,
    kill: Mutex<Option<oneshot::Sender<()>>>,
    started_at: String,
}

impl Container {
    /// Starts `argv` (`sh` when empty) for container `name` in `workdir`, logging to
    /// `log_path`.
    pub fn start(
        name: &str,
        workdir: &Path,
        log_path: PathBuf,
        env: &[(String, String)],
        argv: &[String],
    ) -> std::io::Result<std::sync::Arc<Self>> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let (program, args) = argv
            .split_first()
            .map_or(("sh", &[][..]), |(p, a)| (p.as_str(), a));
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .current_dir(workdir)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()?;
        let (kill_tx, kill_rx) = oneshot::channel();
        let this = std::sync::Arc::new(Self {
            name: name.to_string(),
            stdin: tokio::sync::Mutex::new(child.stdin.take()),
            attachers: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            log_path,
            log_len: watch::Sender::new(0),
            exit: watch::Sender::new(None),
            kill: Mutex::new(Some(kill_tx)),
            started_at: crate::pods::now_rfc3339(),
        });
        let log = std::sync::Arc::new(tokio::sync::Mutex::new(tokio::fs::File::from_std(log_file)));
        let out = tokio::spawn(pump(
            this.clone(),
            log.clone(),
            child.stdout.take(),
            ids::STDOUT,
        ));
        let err = tokio::spawn(pump(this.clone(), log, child.stderr.take(), ids::STDERR));
        let me = this.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                _ = kill_rx => {
                    kill_group(&mut child);
                    child.wait().await
                }
            };
            let _ = out.await;
            let _ = err.await;
            let code = status.map(exit_code).unwrap_or(1);
            *me.stdin.lock().await = None;
            tracing::info!(container = %me.name, code, "main process exited");
            // Clear and publish under the lock so `attach` cannot register in between.
            let mut attachers = me.attachers.lock().unwrap_or_else(|e| e.into_inner());
            attachers.clear();
            me.exit.send_replace(Some(code));
        });
        Ok(this)
    }

    /// Container name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// When the main process started (RFC 3339).
    pub fn started_at(&self) -> &str {
        &self.started_at
    }

    /// Registers an attacher; `None` when the main process has already exited.
    pub fn attach(&self, stdout: bool, stderr: bool) -> Option<Attachment> {
        let mut attachers = self.attachers.lock().unwrap_or_else(|e| e.into_inner());
        if self.exit.borrow().is_some() {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, output) = mpsc::channel(ATTACH_QUEUE);
        attachers.push(Attacher {
            id,
            stdout,
            stderr,
            tx,
        });
        Some(Attachment { id, output })
    }

    /// Removes an attacher (its queue closes).
    pub fn detach(&self, id: u64) {
        self.attachers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|a| a.id != id);
    }

    /// Writes to the main process's stdin (shared by all attachers).
    pub async fn write_stdin(&self, data: &[u8]) -> std::io::Result<()> {
        let mut stdin = self.stdin.lock().await;
        match stdin.as_mut() {
            Some(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }

    /// The exit code, once the main process has exited and its output is delivered.
    pub fn exit_code(&self) -> Option<u8> {
        *self.exit.borrow()
    }

    /// Watches the exit code.
    pub fn watch_exit(&self) -> watch::Receiver<Option<u8>> {
        self.exit.subscribe()
    }

    /// The log file (everything the main process wrote).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Watches the number of bytes in the log file.
    pub fn watch_log_len(&self) -> watch::Receiver<u64> {
        self.log_len.subscribe()
    }

    /// Kills the main process (used on shutdown).
    pub fn kill(&self) {
        if let Some(tx) = self.kill.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills `child` and its process group (the child leads its own group: `process_group(0)`
/// for pipes, `setsid` for a pty), so grandchildren such as `sleep` in `sh -c` go too.
pub fn kill_group(child: &mut tokio::process::Child) {
    if let Some(pid) = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32))
    {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    let _ = child.start_kill();
}

/// Maps an exit status to a container exit code (128+signal when killed).
pub fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => (code & 0xff) as u8,
        (None, Some(sig)) => (128 + sig).min(255) as u8,
        (None, None) => 1,
    }
}

async fn pump(
    container: std::sync::Arc<Container>,
    log: std::sync::Arc<tokio::sync::Mutex<tokio::fs::File>>,
    pipe: Option<impl AsyncRead + Unpin>,
    channel: u8,
) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        {
            let mut log = log.lock().await;
            if let Err(e) = log.write_all(&chunk).await {
                tracing::warn!(container = %container.name, error = %e, "cannot write container log");
            }
            let _ = log.flush().await;
            container.log_len.send_modify(|len| *len += n as u64);
        }
        let targets: Vec<(u64, mpsc::Sender<(u8, Bytes)>)> = container
            .attachers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|a| match channel {
                ids::STDOUT => a.stdout,
                _ => a.stderr,
            })
            .map(|a| (a.id, a.tx.clone()))
            .collect();
        for (id, tx) in targets {
            if tx.send((channel, chunk.clone())).await.is_err() {
                container.detach(id);
            }
        }
    }
}
