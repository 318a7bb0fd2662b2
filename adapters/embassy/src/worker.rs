//! A stream worker: dials the TCP target of a tunnel the relay registered, then moves bytes
//! between the socket and the relay's rings until either side closes. One worker per stream slot;
//! each owns a connector (and so its socket buffers).

use embassy_futures::select::{Either, select};
use embedded_io_async::{Read, Write};
use tether_core::relay::{MessageKind, SendError, TcpCloseReason};
use tether_core::stream_id::StreamId;

use crate::gateway::{Buf, Cmd, Gateway, WorkerSlot};
use crate::io::{Connection, Connector, error_text};

/// Why serving a socket ended.
enum Served {
    /// The relay asked for the close (`CloseUpstream`).
    CloseRequested,
    /// The socket ended or failed.
    Socket(TcpCloseReason, &'static str),
}

/// Runs worker `index` forever. Spawn one per stream slot (`0..STREAMS`), each with its own
/// connector.
pub async fn run_worker<C, const N: usize, const STREAMS: usize, const RING: usize>(
    gw: &Gateway<N, STREAMS, RING>,
    index: usize,
    connector: &mut C,
) -> !
where
    C: Connector,
{
    let slot = &gw.workers[index];
    loop {
        if slot.cmds.receive().await != Cmd::Dial {
            continue; // stale notice for a finished stream
        }
        let (stream, host, port) = slot.assignment.lock(|a| {
            let a = a.borrow();
            (a.stream.clone(), a.host.clone(), a.port)
        });
        let Some(stream) = stream else { continue };
        debug!("stream {}: dialling {}:{}", stream, host.as_str(), port);
        let dialled = select(
            connector.connect(host.as_str(), port),
            close_requested(slot),
        )
        .await;
        let outcome = match dialled {
            Either::First(Ok(mut conn)) => {
                let started = gw
                    .with_relay(|r| r.handle_upstream_started(crate::now(), stream.as_str(), None));
                gw.kick();
                let served = if started.is_ok() {
                    serve(gw, slot, &stream, &mut conn).await
                } else {
                    Served::CloseRequested
                };
                conn.close().await;
                Ok(served)
            }
            Either::First(Err(e)) => Err(e.0),
            Either::Second(()) => Ok(Served::CloseRequested),
        };
        // Free the worker before the relay frees the stream slot, so a new start finds a worker.
        slot.assignment.lock(|a| a.borrow_mut().stream = None);
        while slot.cmds.try_receive().is_ok() {}
        gw.with_relay(|r| {
            let now = crate::now();
            let id = stream.as_str();
            let _ = match outcome {
                Err(error) => {
                    warn!("stream {}: dial failed: {}", stream, error);
                    r.handle_upstream_failed(now, id, 502, error)
                }
                Ok(Served::CloseRequested) => {
                    r.handle_tcp_closed(now, id, TcpCloseReason::ServiceClosed, "")
                }
                Ok(Served::Socket(reason, error)) => r.handle_tcp_closed(now, id, reason, error),
            };
        });
        gw.kick();
    }
}

async fn close_requested(slot: &WorkerSlot) {
    while slot.cmds.receive().await != Cmd::Close {}
}

async fn serve<Conn: Connection, const N: usize, const STREAMS: usize, const RING: usize>(
    gw: &Gateway<N, STREAMS, RING>,
    slot: &WorkerSlot,
    stream: &StreamId,
    conn: &mut Conn,
) -> Served {
    let (mut reader, mut writer) = conn.split();
    let read = read_socket(gw, slot, stream, &mut reader);
    let write = write_socket(gw, slot, stream, &mut writer);
    match select(read, write).await {
        Either::First(served) | Either::Second(served) => served,
    }
}

/// Socket to relay. Holds at most one message the relay refused, until it resumes this stream.
async fn read_socket<R: Read, const N: usize, const STREAMS: usize, const RING: usize>(
    gw: &Gateway<N, STREAMS, RING>,
    slot: &WorkerSlot,
    stream: &StreamId,
    reader: &mut R,
) -> Served {
    loop {
        let mut buf = Buf::<N>::new();
        let _ = buf.resize(N, 0);
        let n = match reader.read(&mut buf).await {
            Ok(0) => return Served::Socket(TcpCloseReason::ServiceClosed, ""),
            Ok(n) => n,
            Err(e) => {
                let kind = embedded_io_async::Error::kind(&e);
                return Served::Socket(TcpCloseReason::ReadError, error_text(kind));
            }
        };
        buf.truncate(n);
        let mut pending = buf;
        loop {
            let message = pending;
            let result = gw.with_relay(|r| {
                r.handle_upstream_message(
                    crate::now(),
                    stream.as_str(),
                    MessageKind::Binary,
                    message,
                )
            });
            match result {
                Ok(()) => {
                    gw.kick();
                    break;
                }
                Err(SendError::Full(m)) => {
                    pending = m;
                    gw.kick();
                    slot.resume.wait().await;
                }
                Err(_) => {
                    // The control plane is done with this stream: stop reading, wait for the close.
                    return core::future::pending::<Served>().await;
                }
            }
        }
    }
}

/// Relay to socket, in order; the close comes after the last message was written.
async fn write_socket<W: Write, const N: usize, const STREAMS: usize, const RING: usize>(
    gw: &Gateway<N, STREAMS, RING>,
    slot: &WorkerSlot,
    stream: &StreamId,
    writer: &mut W,
) -> Served {
    loop {
        match slot.cmds.receive().await {
            Cmd::Data => loop {
                let message = gw.with_relay(|r| r.pop_upstream(stream.as_str()));
                let Some(message) = message else { break };
                gw.kick();
                if let Err(e) = writer.write_all(&message.payload).await {
                    let kind = embedded_io_async::Error::kind(&e);
                    return Served::Socket(TcpCloseReason::WriteError, error_text(kind));
                }
            },
            Cmd::Close => return Served::CloseRequested,
            Cmd::Dial => {}
        }
        if let Err(e) = writer.flush().await {
            let kind = embedded_io_async::Error::kind(&e);
            return Served::Socket(TcpCloseReason::WriteError, error_text(kind));
        }
    }
}
