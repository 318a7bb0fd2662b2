//! The tunnel task: dial the control plane, upgrade to a WebSocket, run a relay session (a reader
//! and a writer side by side), and reconnect with full-jitter backoff when it ends.

#[cfg(feature = "tls")]
use core::cell::RefCell;
use edge_ws::FrameType;

use embassy_futures::select::{Either, select};
use embassy_time::{Duration, Instant as EmbassyInstant, Timer, with_timeout};
use embedded_io_async::{Read, Write};
use rand_core::{CryptoRng, RngCore};
use tether_core::relay::{Handled, SessionInfo, TransmitError, TunnelError};
use tether_core::wire::{Inbound, Outbound};

use crate::backoff::{Backoff, BackoffConfig};
use crate::gateway::{Gateway, WriterAction};
use crate::io::{Connection, Connector};
use crate::url::ControlPlane;
use crate::ws::{self, HEADER_ROOM, Incoming, WsError};

/// Path of the agent endpoint on a control plane (fixed by the compat protocol).
pub const AGENT_PATH: &str = "/api/v1/clusters/agent/ws";

/// How to reach the control plane and who we are.
#[derive(Clone, Debug)]
pub struct TunnelConfig<'a> {
    /// Where to dial.
    pub control_plane: ControlPlane<'a>,
    /// Agent token (sent as `Authorization: Bearer`).
    pub token: &'a str,
    /// Sent in `register`.
    pub info: SessionInfo,
    /// Reconnect backoff.
    pub backoff: BackoffConfig,
    /// Allow `https://`/`wss://` control planes although the server certificate is not verified
    /// yet (feature `tls`; see [`tls`](crate::tls)). Without it a TLS URL is refused.
    pub tls_insecure: bool,
}

/// The tunnel task's buffers. `rx` holds one whole tunnel message (size it to the relay's
/// `max_message`), `scratch` its decoded data (¾ of `rx` suffices), `tx` one outbound message:
/// [`tx_len`] bytes for buffers of `N` bytes.
pub struct Buffers<'a> {
    /// Inbound message (and the upgrade response head).
    pub rx: &'a mut [u8],
    /// Decoded inbound data.
    pub scratch: &'a mut [u8],
    /// Outbound message.
    pub tx: &'a mut [u8],
    /// TLS record read buffer (feature `tls`, `https://` control planes only:
    /// `tls::TLS_READ_BUF` bytes; empty otherwise).
    pub tls_read: &'a mut [u8],
    /// TLS record write buffer (`tls::TLS_WRITE_BUF` bytes; empty without TLS).
    pub tls_write: &'a mut [u8],
}

/// Transmit buffer that fits any message a relay with `N`-byte buffers sends: a data message of
/// `N` bytes base64-encoded, plus envelope, ids and frame header.
#[must_use]
pub const fn tx_len(n: usize) -> usize {
    tether_core::wire::b64::encoded_len(n + 1) + 2048 + HEADER_ROOM
}

/// Why one connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SessionEnd {
    /// The dial failed.
    Connect(crate::io::ConnectError),
    /// The WebSocket failed (including a refused upgrade).
    Ws(WsError),
    /// The control plane closed the WebSocket.
    Closed(Option<u16>),
    /// The tunnel was silent past the read deadline.
    Dead,
    /// A message could not be encoded into the transmit buffer (a configuration bug).
    TransmitBuffer(usize),
    /// TLS was refused or failed (why).
    Tls(&'static str),
}

/// Runs the tunnel forever: connect, serve, back off, reconnect. `on_end` sees every end of a
/// connection (and whether it had registered) for logs and metrics.
pub async fn run<C, const N: usize, const STREAMS: usize, const RING: usize>(
    gw: &Gateway<N, STREAMS, RING>,
    connector: &mut C,
    config: &TunnelConfig<'_>,
    bufs: Buffers<'_>,
    rng: &mut (impl RngCore + CryptoRng),
    mut on_end: impl FnMut(SessionEnd, bool),
) -> !
where
    C: Connector,
{
    let Buffers {
        rx,
        scratch,
        tx,
        tls_read,
        tls_write,
    } = bufs;
    let mut backoff = Backoff::new(config.backoff);
    loop {
        let mut registered = false;
        let bufs = Buffers {
            rx: &mut *rx,
            scratch: &mut *scratch,
            tx: &mut *tx,
            tls_read: &mut *tls_read,
            tls_write: &mut *tls_write,
        };
        let end = connect_once(gw, connector, config, bufs, rng, &mut registered).await;
        gw.with_relay(|relay| {
            relay.handle_tunnel_lost(crate::now());
            while let Some(event) = relay.poll_event() {
                gw.dispatch(relay, event);
            }
        });
        if registered {
            backoff.reset();
        }
        on_end(end, registered);
        let delay = backoff.next_delay(rng);
        warn!(
            "tunnel ended ({}); reconnecting in {} ms",
            end_text(end),
            delay.as_millis()
        );
        Timer::after(delay).await;
    }
}

fn end_text(end: SessionEnd) -> &'static str {
    match end {
        SessionEnd::Connect(e) => e.0,
        SessionEnd::Ws(WsError::Rejected(401 | 403)) => "upgrade refused: bad token",
        SessionEnd::Ws(WsError::Rejected(_)) => "upgrade refused",
        SessionEnd::Ws(WsError::Io(kind)) => crate::io::error_text(kind),
        SessionEnd::Ws(_) => "websocket error",
        SessionEnd::Closed(_) => "closed by the control plane",
        SessionEnd::Dead => "tunnel silent past the read deadline",
        SessionEnd::TransmitBuffer(_) => "transmit buffer too small",
        SessionEnd::Tls(why) => why,
    }
}

async fn connect_once<C: Connector, const N: usize, const STREAMS: usize, const RING: usize>(
    gw: &Gateway<N, STREAMS, RING>,
    connector: &mut C,
    config: &TunnelConfig<'_>,
    bufs: Buffers<'_>,
    rng: &mut (impl RngCore + CryptoRng),
    registered: &mut bool,
) -> SessionEnd {
    let cp = &config.control_plane;
    if cp.tls && !cfg!(feature = "tls") {
        return SessionEnd::Tls("this build has no TLS (feature `tls`): use http:// or ws://");
    }
    if cp.tls && !config.tls_insecure {
        return SessionEnd::Tls("TLS without server certificate verification was not allowed");
    }
    info!("dialling control plane {}:{}", cp.host, cp.port);
    let mut conn = match with_timeout(HANDSHAKE_TIMEOUT, connector.connect(cp.host, cp.port)).await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return SessionEnd::Connect(e),
        Err(_) => return SessionEnd::Connect(crate::io::ConnectError("connect timed out")),
    };
    let Buffers {
        rx,
        scratch,
        tx,
        tls_read,
        tls_write,
    } = bufs;
    let end = {
        let (mut reader, mut writer) = conn.split();
        if cp.tls {
            #[cfg(feature = "tls")]
            {
                let (reader, writer) = (RefCell::new(reader), RefCell::new(writer));
                let open = crate::tls::open(&reader, &writer, cp.host, rng, tls_read, tls_write);
                match with_timeout(HANDSHAKE_TIMEOUT, open).await {
                    Ok(Ok(mut tls)) => {
                        let (mut reader, mut writer) = tls.split();
                        session(
                            gw,
                            &mut reader,
                            &mut writer,
                            config,
                            rx,
                            scratch,
                            tx,
                            rng,
                            registered,
                        )
                        .await
                    }
                    Ok(Err(_)) => SessionEnd::Tls("TLS handshake failed"),
                    Err(_) => SessionEnd::Tls("TLS handshake timed out"),
                }
            }
            #[cfg(not(feature = "tls"))]
            {
                let _ = (tls_read, tls_write, &mut reader, &mut writer);
                SessionEnd::Tls("this build has no TLS")
            }
        } else {
            session(
                gw,
                &mut reader,
                &mut writer,
                config,
                rx,
                scratch,
                tx,
                rng,
                registered,
            )
            .await
        }
    };
    conn.close().await;
    end
}

#[allow(clippy::too_many_arguments)]
async fn session<R: Read, W: Write, const N: usize, const STREAMS: usize, const RING: usize>(
    gw: &Gateway<N, STREAMS, RING>,
    reader: &mut R,
    writer: &mut W,
    config: &TunnelConfig<'_>,
    rx: &mut [u8],
    scratch: &mut [u8],
    tx: &mut [u8],
    rng: &mut impl RngCore,
    registered: &mut bool,
) -> SessionEnd {
    let cp = &config.control_plane;
    let handshake = ws::handshake(
        reader,
        writer,
        cp.host_header(),
        cp.path,
        config.token,
        rng,
        rx,
    );
    let upgraded = match with_timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => return SessionEnd::Ws(e),
        Err(_) => return SessionEnd::Ws(WsError::Io(embedded_io_async::ErrorKind::TimedOut)),
    };
    if let Some(date) = upgraded.date {
        gw.learn_unix_time(date);
    }
    info!("tunnel up");
    gw.tunnel_resume.reset();
    gw.with_relay(|relay| relay.start_session(crate::now(), config.info.clone()));
    gw.kick();
    let end = {
        let read = read_loop(gw, reader, rx, scratch);
        let write = write_loop(gw, writer, tx, rng, registered);
        match select(read, write).await {
            Either::First(end) | Either::Second(end) => end,
        }
    };
    // Close the WebSocket properly where it still stands: echo the control plane's close code,
    // or say why we leave (best effort: the connection is dropped next anyway).
    let code = match end {
        SessionEnd::Closed(code) => Some(code.unwrap_or(1000)),
        SessionEnd::Dead => Some(1001),
        SessionEnd::TransmitBuffer(_) => Some(1011),
        SessionEnd::Connect(_) | SessionEnd::Ws(_) | SessionEnd::Tls(_) => None,
    };
    if let Some(code) = code {
        let payload = code.to_be_bytes();
        let close = ws::write_control(writer, FrameType::Close, &payload, rng);
        let _ = with_timeout(CLOSE_TIMEOUT, close).await;
    }
    end
}

/// Reads tunnel messages and hands them to the relay, pausing while the relay is full.
async fn read_loop<R: Read, const N: usize, const STREAMS: usize, const RING: usize>(
    gw: &Gateway<N, STREAMS, RING>,
    reader: &mut R,
    rx: &mut [u8],
    scratch: &mut [u8],
) -> SessionEnd {
    loop {
        let message = match ws::read_message(reader, rx).await {
            Ok(Incoming::Message(m)) => m,
            Ok(Incoming::Oversize(len)) => {
                warn!(
                    "tunnel message of {} bytes exceeds this gateway's buffer; skipped",
                    len
                );
                gw.with_relay(|r| r.handle_tunnel_activity(crate::now()));
                continue;
            }
            Ok(Incoming::Ping(payload)) => {
                gw.with_relay(|r| r.handle_tunnel_activity(crate::now()));
                gw.owe_pong(payload);
                continue;
            }
            Ok(Incoming::Pong) => {
                gw.with_relay(|r| r.handle_tunnel_activity(crate::now()));
                continue;
            }
            Ok(Incoming::Close(code)) => return SessionEnd::Closed(code),
            Err(e) => return SessionEnd::Ws(e),
        };
        loop {
            let blocked = gw.with_relay(|relay| {
                let now = crate::now();
                match relay.handle_tunnel_message(now, message, scratch) {
                    Err(TunnelError::Blocked) => true,
                    Err(TunnelError::ScratchTooSmall { needed }) => {
                        error!(
                            "scratch buffer too small ({} bytes needed); message dropped",
                            needed
                        );
                        false
                    }
                    Err(_) => false, // answered by the relay
                    Ok(Handled::Consumed) => false,
                    Ok(Handled::Start(start)) => {
                        // WebSocket upstreams are a cluster agent's job; a gateway carries TCP.
                        let _ = relay.handle_upstream_failed(
                            now,
                            start.stream.as_str(),
                            501,
                            "this gateway carries TCP tunnels only",
                        );
                        false
                    }
                    Ok(Handled::Other(env, Inbound::TcpTunnelStart(start))) => {
                        if let Ok(req) = relay.start_tcp_tunnel(now, &env, &start)
                            && !gw.assign(&req.tunnel, req.host.as_str(), req.port)
                        {
                            let _ = relay.handle_upstream_failed(
                                now,
                                req.tunnel.as_str(),
                                503,
                                "no free stream worker",
                            );
                        }
                        false
                    }
                    Ok(Handled::Other(_, Inbound::GatewayHello(_))) => {
                        gw.owe_hello_ack();
                        false
                    }
                    Ok(Handled::Other(_, Inbound::Error { error })) => {
                        if let Some(error) = error {
                            warn!("control plane error: {}", error);
                        }
                        false
                    }
                    Ok(Handled::Other(_, other)) => {
                        debug!("ignored {}", other.type_name());
                        false
                    }
                }
            });
            gw.kick();
            if !blocked {
                break;
            }
            gw.tunnel_resume.wait().await;
        }
    }
}

/// A frame that cannot be written for this long means a dead (or wedged) control plane: the writer
/// would otherwise never get back to the relay's timers.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Dialling the control plane and the WebSocket upgrade, each (DESIGN: 30 s).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the farewell close frame may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// One frame write, bounded by [`WRITE_TIMEOUT`].
async fn timed(write: impl Future<Output = Result<(), WsError>>) -> Result<(), SessionEnd> {
    match with_timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SessionEnd::Ws(e)),
        Err(_) => Err(SessionEnd::Dead),
    }
}

/// Drains the relay (events, then tunnel messages) whenever kicked or a timer is due.
async fn write_loop<W: Write, const N: usize, const STREAMS: usize, const RING: usize>(
    gw: &Gateway<N, STREAMS, RING>,
    writer: &mut W,
    tx: &mut [u8],
    rng: &mut impl RngCore,
    registered: &mut bool,
) -> SessionEnd {
    let body_room = tx.len().saturating_sub(HEADER_ROOM);
    loop {
        let mut ping = false;
        let mut dead = false;
        let mut progressed = false;
        gw.with_relay(|relay| {
            while let Some(event) = relay.poll_event() {
                progressed = true;
                match gw.dispatch(relay, event) {
                    WriterAction::None => {}
                    WriterAction::Registered => *registered = true,
                    WriterAction::Ping => ping = true,
                    WriterAction::Dead => dead = true,
                }
            }
        });
        if dead {
            return SessionEnd::Dead;
        }
        if let Some(payload) = gw.take_pong()
            && let Err(e) = timed(ws::write_control(writer, FrameType::Pong, &payload, rng)).await
        {
            return e;
        }
        if ping && let Err(e) = timed(ws::write_control(writer, FrameType::Ping, &[], rng)).await {
            return e;
        }
        if gw.take_hello_ack() {
            let unix = gw.unix_now();
            let ack = Outbound::GatewayHelloAck { use_yamux: false };
            if let Ok(n) = ack.encode(None, unix, &mut tx[HEADER_ROOM..])
                && let Err(e) =
                    timed(ws::write_frame(writer, FrameType::Text(false), tx, n, rng)).await
            {
                return e;
            }
        }
        let unix = gw.unix_now();
        let sent = gw.with_relay(|relay| {
            relay.poll_transmit(
                crate::now(),
                unix,
                &mut tx[HEADER_ROOM..HEADER_ROOM + body_room],
            )
        });
        match sent {
            Ok(Some(n)) => {
                // Native frames (once negotiated) are binary messages; JSON envelopes are text.
                let body = &tx[HEADER_ROOM..HEADER_ROOM + n];
                let kind = if tether_core::wire::native::is_native(body) {
                    FrameType::Binary(false)
                } else {
                    FrameType::Text(false)
                };
                if let Err(e) = timed(ws::write_frame(writer, kind, tx, n, rng)).await {
                    return e;
                }
                continue;
            }
            Ok(None) => {}
            Err(TransmitError::BufferTooSmall { needed }) => {
                error!("transmit buffer too small: {} bytes needed", needed);
                return SessionEnd::TransmitBuffer(needed);
            }
            Err(TransmitError::Encode(_)) => {
                error!("cannot encode a tunnel message");
                return SessionEnd::TransmitBuffer(0);
            }
        }
        if progressed {
            continue;
        }
        let deadline = gw.with_relay(|relay| relay.poll_timeout());
        let wake = deadline.map_or(EmbassyInstant::MAX, |t| {
            EmbassyInstant::from_micros(t.as_micros())
        });
        if wake > EmbassyInstant::now()
            && let Either::First(()) = select(gw.kick.wait(), Timer::at(wake)).await
        {
            continue;
        }
        gw.with_relay(|relay| relay.handle_timeout(crate::now()));
    }
}
