//! One task per agent tunnel: reads the tunnel WebSocket into the tunnel's [`Driver`], fires its
//! timers, and keeps the tunnel table in step. A second task writes what the driver's gateway
//! schedules. No protocol logic lives here: every decision comes from the gateway.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::{FutureExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;

use super::State;
use super::driver::Driver;
use super::link::Cmd;
use crate::tunnel_driver::write_loop;

pub(crate) use super::driver::Gw;

/// Most tunnel frames read in one turn before the tunnel task looks at its commands and timers.
const INPUT_BATCH: usize = 64;

/// Serves one authenticated agent tunnel until it ends. `cmd_tx`/`cmd_rx` is the tunnel's command
/// channel (the tunnel table gets `cmd_tx` once the agent registers).
pub(crate) async fn run<S>(
    ws: WebSocketStream<S>,
    cluster: String,
    generation: u64,
    state: Arc<State>,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    mut cmd_rx: mpsc::UnboundedReceiver<Cmd>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let driver = Driver::new(cluster.clone(), generation, state.clone());
    let (sink, mut stream) = ws.split();
    let writer = {
        let driver = driver.clone();
        tokio::spawn(async move { write_loop(sink, &*driver).await })
    };
    tracing::info!(cluster = %cluster, "agent tunnel connected");
    loop {
        let turn = driver.turn();
        if turn.dead {
            break;
        }
        if turn.registered_now {
            state
                .metrics
                .agents_connected
                .fetch_add(1, Ordering::Relaxed);
            state
                .tunnels
                .insert(&cluster, generation, cmd_tx.clone(), driver.clone());
            if let Some(fleet) = state.fleet.clone() {
                let cluster = cluster.clone();
                fleet.hold(&cluster);
                tokio::spawn(async move { fleet.tunnel_up(&cluster).await });
            }
        }
        if !turn.paused && turn.parked {
            // Hand the refused message in before anything read after it.
            driver.on_resume();
            continue;
        }
        let reading = !turn.paused && !turn.parked;
        tokio::select! {
            cmd = cmd_rx.recv() => match cmd {
                Some(Cmd::End { reason }) => driver.end(reason),
                None => driver.end("the control plane dropped the tunnel"),
            },
            message = stream.next(), if reading => {
                // Read every frame already received, so the socket's receive buffer does not
                // become a first-come queue in front of the scheduler.
                let mut more = driver.on_message(message);
                let mut taken = 1;
                while more && taken < INPUT_BATCH {
                    let Some(message) = stream.next().now_or_never() else {
                        break;
                    };
                    more = driver.on_message(message);
                    taken += 1;
                }
            }
            () = sleep_until(turn.deadline), if turn.deadline.is_some() => driver.on_timeout(),
            () = driver.control_wanted() => {}
        }
    }
    driver.lose("the agent's tunnel closed");
    driver.finish();
    state.metrics.tunnel_ended(generation);
    if driver.registered() {
        state.tunnels.remove(&cluster, generation);
        if let Some(fleet) = state.fleet.clone()
            && !state.tunnels.holds(&cluster)
        {
            let cluster = cluster.clone();
            fleet.release(&cluster);
            tokio::spawn(async move { fleet.tunnel_down(&cluster).await });
        }
        state
            .metrics
            .agents_connected
            .fetch_sub(1, Ordering::Relaxed);
    }
    tracing::info!(cluster = %cluster, "agent tunnel ended");
    let _ = writer.await;
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
