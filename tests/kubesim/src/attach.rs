//! `pods/{name}/attach`: attach to a container's main process.
//!
//! Contract: query as exec minus `command`. The attacher receives the main process's output
//! from now on (no history; see `pods/log` for that) on the requested channels, and its stdin
//! goes to the main process (shared with other attachers; closing it does not close the main
//! process's stdin). The session ends when the client leaves (the main process keeps running)
//! or when the main process exits: then all its output, the status (exit code, as for exec)
//! and Close 1000. kubesim containers have no tty, so `tty` is ignored.

use std::sync::Arc;

use crate::container::Container;
use crate::exec::StreamOptions;
use crate::session::{Input, Outcome, Session};

/// Runs one attach session to completion.
pub async fn serve(
    started: (Session, tokio::sync::mpsc::Receiver<Input>),
    opts: StreamOptions,
    container: Arc<Container>,
) {
    let (mut session, mut input) = started;
    let _ = session.output(opts.lowest_writable()).send(&[]).await;
    let Some(mut attachment) = container.attach(opts.stdout, opts.stderr) else {
        let code = container.exit_code().unwrap_or(0);
        session.finish(Outcome::Exit(code)).await;
        return;
    };
    let id = attachment.id;
    tracing::info!(container = container.name(), id, "attached");
    let stdout = session.output(crate::channel::ids::STDOUT);
    let stderr = session.output(crate::channel::ids::STDERR);
    let forward = tokio::spawn(async move {
        while let Some((channel, data)) = attachment.output.recv().await {
            let out = if channel == crate::channel::ids::STDOUT {
                &stdout
            } else {
                &stderr
            };
            if out.send(&data).await.is_err() {
                return false;
            }
        }
        true
    });
    let stdin_container = container.clone();
    let want_stdin = opts.stdin;
    let stdin = tokio::spawn(async move {
        while let Some(event) = input.recv().await {
            match event {
                Input::Stdin(data) if want_stdin => {
                    if let Err(e) = stdin_container.write_stdin(&data).await {
                        tracing::debug!(error = %e, "attach stdin write failed");
                    }
                }
                _ => {}
            }
        }
    });
    tokio::pin!(forward);
    let delivered = tokio::select! {
        r = &mut forward => r.unwrap_or(false),
        _ = session.client_gone() => false,
    };
    stdin.abort();
    container.detach(id);
    if !delivered || session.is_client_gone() {
        tracing::info!(container = container.name(), id, "detached");
        session.abort();
        return;
    }
    // The queue closed because the main process exited; its code is published right after.
    let mut exit = container.watch_exit();
    let code = match exit.wait_for(Option::is_some).await {
        Ok(code) => code.unwrap_or(0),
        Err(_) => 0,
    };
    tracing::info!(
        container = container.name(),
        id,
        code,
        "main process exited; attach ends"
    );
    session.finish(Outcome::Exit(code)).await;
}
