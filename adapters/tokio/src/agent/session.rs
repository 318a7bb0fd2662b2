//! One session on a connected tunnel: the session task reads the tunnel into the driver, hands
//! the request tasks' reports in and fires the cores' timers; the writer task writes what the
//! driver schedules. No protocol decision is taken here.

use std::sync::Arc;

use futures_util::{FutureExt as _, StreamExt as _};
use tether_core::relay::SessionInfo;
use tokio::sync::mpsc;

use super::Drain;
use super::driver::{BodyWait, Driver};
use super::tunnel::TunnelSocket;
use crate::tunnel_driver::write_loop;

/// Request task reports queued for the session (beyond this the tasks wait).
const REPORT_QUEUE: usize = 64;
/// Tunnel messages (or reports) taken in one turn before the session looks at its other inputs.
const INPUT_BATCH: usize = 64;
/// How long the writer may take to write what is owed once the session ended.
const WRITER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a session ended.
#[derive(Debug)]
pub(crate) struct SessionEnd {
    /// The control plane accepted the registration during this session.
    pub(crate) registered: bool,
    /// One line.
    pub(crate) reason: String,
}

/// Runs one session on a connected tunnel until it ends; then the driver has been told the
/// tunnel is lost.
///
/// Once `drain` is signalled the relay tells the control plane it drains, new streams and
/// requests get 503, and the session ends (closing the tunnel with 1001) as soon as nothing is
/// live, or when the grace period runs out, after closing what is left with 1001.
pub(crate) async fn run(
    driver: &Arc<Driver>,
    ws: TunnelSocket,
    info: SessionInfo,
    drain: &mut Drain,
) -> SessionEnd {
    let (sink, mut source) = ws.split();
    let (reports_tx, mut reports) = mpsc::channel(REPORT_QUEUE);
    driver.start_session(info, drain.requested(), reports_tx);
    let writer = {
        let driver = driver.clone();
        tokio::spawn(async move { write_loop(sink, &*driver).await })
    };
    let mut body_wait: Option<BodyWait> = None;
    let reason = loop {
        let turn = driver.turn();
        if let Some(reason) = turn.dead {
            driver.end(None);
            break reason;
        }
        if drain.requested() && turn.idle {
            let reason = "agent drained: nothing live, shutting down";
            driver.end(Some(reason));
            break reason.to_string();
        }
        if turn.body_wait.is_some() {
            body_wait = turn.body_wait;
        }
        let grace_over = drain.deadline();
        tokio::select! {
            message = source.next(), if turn.reading => {
                // Read every frame already received, so the socket's receive buffer does not
                // become a first-come queue in front of the relay's scheduler.
                let mut more = driver.on_message(message);
                let mut taken = 1;
                while more && taken < INPUT_BATCH {
                    let Some(message) = source.next().now_or_never() else {
                        break;
                    };
                    more = driver.on_message(message);
                    taken += 1;
                }
            }
            report = reports.recv(), if turn.reports => {
                let mut next = report;
                let mut taken = 0;
                while let Some(report) = next {
                    driver.on_report(report);
                    taken += 1;
                    next = if taken < INPUT_BATCH { reports.try_recv().ok() } else { None };
                }
            }
            () = sleep_until(turn.deadline) => driver.on_timeout(),
            () = wait_body(&mut body_wait) => {
                body_wait = None;
                driver.on_body_room();
            }
            () = sleep_until(turn.body_deadline), if turn.body_deadline.is_some() => {
                body_wait = None;
                driver.on_body_overdue();
            }
            () = drain.signalled() => driver.start_draining(drain.grace()),
            () = sleep_until(grace_over) => {
                driver.end_everything();
                break super::driver::GRACE_OVER.to_string();
            }
            () = driver.control_wanted() => {}
        }
    };
    // The writer sends what is owed (and the close frame, if any), then ends; a socket that takes
    // nothing is not waited for long.
    let abort = writer.abort_handle();
    if tokio::time::timeout(WRITER_GRACE, writer).await.is_err() {
        abort.abort();
    }
    let registered = driver.lose();
    SessionEnd { registered, reason }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn wait_body(wait: &mut Option<BodyWait>) {
    match wait {
        Some(w) => w.await,
        None => std::future::pending().await,
    }
}
