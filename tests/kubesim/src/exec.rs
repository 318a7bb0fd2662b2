//! `pods/{name}/exec`: run a command as a local process in the pod's working directory.
//!
//! Contract:
//! * Query (from `PodExecOptions`): `command` (repeated, argv in order), `container`, and the
//!   flags `stdin`, `stdout`, `stderr`, `tty`. Validated before the upgrade (400 Status).
//! * Without `tty` the process gets pipes for the requested streams (others are /dev/null).
//!   With `tty` it runs on a real pseudo-terminal (controlling terminal, own session); its
//!   output goes to stdout (channel 1) and resize events (channel 4) set the window size,
//!   which makes the kernel send SIGWINCH.
//! * The initial empty message goes on the lowest writable channel.
//! * stdin EOF (v5 `[0xFF, 0]`) closes the process's stdin (pipe mode; ignored with a tty).
//! * When the process has exited and its output is fully delivered: status on channel 3, then
//!   Close 1000. If the client goes away first, the process is killed.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::channel::ids;
use crate::query::Query;
use crate::session::{Input, Outcome, Output, Session};
use crate::status::ApiError;

/// Read size for process output (kubectl's own buffers are 32 KiB).
const CHUNK: usize = 32 * 1024;

/// A validated exec (or attach) request.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// argv (exec only).
    pub command: Vec<String>,
    /// Requested container (`None`: the first).
    pub container: Option<String>,
    /// Streams requested.
    pub stdin: bool,
    /// Streams requested.
    pub stdout: bool,
    /// Streams requested.
    pub stderr: bool,
    /// Pseudo-terminal requested.
    pub tty: bool,
}

impl StreamOptions {
    /// Parses and validates the query like kube-apiserver does.
    pub fn parse(query: &Query, needs_command: bool) -> Result<Self, ApiError> {
        let opts = Self {
            command: query.all("command"),
            container: query.get("container").map(str::to_string),
            stdin: query.flag("stdin"),
            stdout: query.flag("stdout"),
            stderr: query.flag("stderr"),
            tty: query.flag("tty"),
        };
        if needs_command && opts.command.is_empty() {
            return Err(ApiError::bad_request(
                "you must specify at least one command for the container",
            ));
        }
        if !opts.stdin && !opts.stdout && !opts.stderr {
            return Err(ApiError::bad_request(
                "you must specify at least 1 of stdin, stdout, stderr",
            ));
        }
        if opts.tty && opts.stderr {
            // The API server ignores stderr with a tty (both go to the terminal).
            return Ok(Self {
                stderr: false,
                ..opts
            });
        }
        Ok(opts)
    }

    /// The lowest channel the server writes on (for the initial empty message).
    /// The channels a SPDY client opens a stream for with these options (the kubelet waits for
    /// all of them): error always, then stdin/stdout/stderr as asked, resize with a TTY.
    pub fn spdy_channels(&self) -> Vec<u8> {
        let mut channels = vec![ids::ERROR];
        for (wanted, channel) in [
            (self.stdin, ids::STDIN),
            (self.stdout, ids::STDOUT),
            (self.stderr && !self.tty, ids::STDERR),
            (self.tty, ids::RESIZE),
        ] {
            if wanted {
                channels.push(channel);
            }
        }
        channels
    }

    pub fn lowest_writable(&self) -> u8 {
        if self.stdout {
            ids::STDOUT
        } else if self.stderr {
            ids::STDERR
        } else {
            ids::ERROR
        }
    }
}

/// Runs one exec session (started on a WebSocket or SPDY connection) to completion.
pub async fn serve(
    started: (Session, mpsc::Receiver<Input>),
    opts: StreamOptions,
    workdir: PathBuf,
    env: Vec<(String, String)>,
) {
    let (mut session, input) = started;
    let protocol = session.protocol();
    let _ = session.output(opts.lowest_writable()).send(&[]).await;
    let spawned = if opts.tty {
        spawn_tty(&opts, &workdir, &env, &session, input)
    } else {
        spawn_pipes(&opts, &workdir, &env, &session, input)
    };
    let (mut child, pumps) = match spawned {
        Ok(x) => x,
        Err(e) => {
            let msg = format!(
                "error executing command in container: failed to exec {:?}: {e}",
                opts.command[0]
            );
            tracing::info!(%msg, "exec failed");
            session.finish(Outcome::Internal(msg)).await;
            return;
        }
    };
    tracing::info!(command = ?opts.command, tty = opts.tty, protocol = protocol.name(), "exec started");
    let code = tokio::select! {
        status = child.wait() => match status {
            Ok(s) => crate::container::exit_code(s),
            Err(e) => {
                session.finish(Outcome::Internal(format!("wait failed: {e}"))).await;
                return;
            }
        },
        _ = session.client_gone() => {
            tracing::info!("client left; killing exec process");
            crate::container::kill_group(&mut child);
            let _ = child.wait().await;
            session.abort();
            return;
        }
    };
    // Deliver all remaining output before the status.
    let drained = async {
        for p in pumps {
            let _ = p.await;
        }
    };
    tokio::select! {
        _ = drained => {}
        _ = session.client_gone() => {
            session.abort();
            return;
        }
    }
    tracing::info!(code, "exec finished");
    session.finish(Outcome::Exit(code)).await;
}

type Spawned = (tokio::process::Child, Vec<JoinHandle<()>>);

fn spawn_pipes(
    opts: &StreamOptions,
    workdir: &PathBuf,
    env: &[(String, String)],
    session: &Session,
    input: mpsc::Receiver<Input>,
) -> std::io::Result<Spawned> {
    let io = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
    let mut child = tokio::process::Command::new(&opts.command[0])
        .args(&opts.command[1..])
        .current_dir(workdir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(io(opts.stdin))
        .stdout(io(opts.stdout))
        .stderr(io(opts.stderr))
        .kill_on_drop(true)
        .process_group(0)
        .spawn()?;
    let stdin = child.stdin.take();
    tokio::spawn(async move {
        let mut input = input;
        let mut stdin = stdin;
        while let Some(event) = input.recv().await {
            match event {
                Input::Stdin(data) => {
                    if let Some(s) = stdin.as_mut()
                        && (s.write_all(&data).await.is_err() || s.flush().await.is_err())
                    {
                        stdin = None;
                    }
                }
                Input::StdinEof => stdin = None,
                Input::Resize(_) => {}
            }
        }
    });
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(pump(out, session.output(ids::STDOUT))));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(err, session.output(ids::STDERR))));
    }
    Ok((child, pumps))
}

fn spawn_tty(
    opts: &StreamOptions,
    workdir: &PathBuf,
    env: &[(String, String)],
    session: &Session,
    input: mpsc::Receiver<Input>,
) -> std::io::Result<Spawned> {
    let (pty, pts) = pty_process::open().map_err(std::io::Error::other)?;
    pty.resize(pty_process::Size::new(24, 80))
        .map_err(std::io::Error::other)?;
    let mut cmd = pty_process::Command::new(&opts.command[0])
        .args(&opts.command[1..])
        .current_dir(workdir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true);
    if std::env::var_os("TERM").is_none() {
        cmd = cmd.env("TERM", "xterm");
    }
    let child = cmd.spawn(pts).map_err(std::io::Error::other)?;
    let (reader, mut writer) = pty.into_split();
    let want_stdin = opts.stdin;
    tokio::spawn(async move {
        let mut input = input;
        while let Some(event) = input.recv().await {
            match event {
                Input::Stdin(data) if want_stdin => {
                    let written = writer.write_all(&data).await.is_ok();
                    if !written || writer.flush().await.is_err() {
                        break;
                    }
                }
                Input::Resize(size) => {
                    tracing::debug!(?size, "resize");
                    let _ = writer.resize(pty_process::Size::new(size.height, size.width));
                }
                _ => {}
            }
        }
    });
    let pumps = if opts.stdout {
        vec![tokio::spawn(pump(reader, session.output(ids::STDOUT)))]
    } else {
        Vec::new()
    };
    Ok((child, pumps))
}

/// Copies a process output to a channel until EOF (a pty's EIO counts as EOF).
async fn pump(mut src: impl AsyncRead + Unpin, out: Output) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match src.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if out.send(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
