//! Runs real tether-core code in a `#![no_std]`, `#![no_main]` binary linked without std or alloc:
//! if the core (or a dependency) needed either, this would not link. Exits 0 when every check
//! passes, otherwise with the number of the first failing check.
#![no_std]
#![no_main]

use tether_core::relay::{Config, Event, Handled, MessageKind, Relay, SessionInfo};
use tether_core::ring::{Full, Ring};
use tether_core::time::{Duration, Instant};
use tether_core::wire::{DataFrame, Envelope, Inbound, Outbound, UnixTime, WireStr};

type Buf = heapless::Vec<u8, 256>;

// SAFETY: `abort` is libc's `void abort(void)`: no arguments, never returns, callable from any
// state. This crate links libc (build.rs) and cannot `forbid(unsafe_code)` because of this
// declaration and the `no_mangle` entry points below.
unsafe extern "C" {
    fn abort() -> !;
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: see the declaration of `abort`.
    unsafe { abort() }
}

/// The prebuilt host `core` is compiled with unwinding and names this symbol; nothing unwinds
/// here (panic = "abort"), so it is never called.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

/// Called by glibc's startup code.
#[unsafe(no_mangle)]
extern "C" fn main(_argc: i32, _argv: *const *const u8) -> i32 {
    match run() {
        Ok(()) => 0,
        Err(check) => check,
    }
}

/// `Err(n)` unless `ok`.
fn check(ok: bool, n: i32) -> Result<(), i32> {
    if ok { Ok(()) } else { Err(n) }
}

fn run() -> Result<(), i32> {
    let unix = UnixTime::new(1_790_000_000, 0);
    let mut buf = [0u8; 4096];
    let mut scratch = [0u8; 1024];

    // 1. Encode an envelope and decode it back.
    let id = WireStr::Plain("p-1");
    let n = Outbound::Pong
        .encode(Some(id), unix, &mut buf)
        .map_err(|_| 1)?;
    let env = Envelope::parse(&buf[..n]).map_err(|_| 2)?;
    check(
        env.type_name == "pong" && env.request_id.is_some_and(|r| r == "p-1"),
        3,
    )?;

    // 2. Decode an inbound data message and its base64 frame ("AWhp" = text "hi").
    let msg = br#"{"type":"ws_data","payload":{"stream_id":"s","data":"AWhp"}}"#;
    let env = Envelope::parse(msg).map_err(|_| 4)?;
    let Ok(Inbound::WebSocketData(data)) = env.inbound() else {
        return Err(5);
    };
    let frame = DataFrame::decode_json(data.data, &mut scratch).map_err(|_| 6)?;
    check(frame == DataFrame::Text(b"hi"), 7)?;

    // 3. A ring: bounded, hands back, FIFO.
    let mut ring: Ring<Buf, 2> = Ring::new(1024);
    for byte in [1u8, 2] {
        ring.push(Buf::from_slice(&[byte]).map_err(|_| 8)?)
            .map_err(|_| 8)?;
    }
    let refused = ring.push(Buf::from_slice(&[3]).map_err(|_| 9)?);
    check(
        matches!(refused, Err(Full(ref m)) if m.as_slice() == [3]),
        9,
    )?;
    check(ring.pop().is_some_and(|m| m.as_slice() == [1]), 10)?;

    // 4. A relay: register, start, started, data both ways, close.
    let mut now = Instant::from_secs(1);
    let mut relay: Relay<Buf, 2, 4> = Relay::new(Config::default());
    relay.start_session(now, SessionInfo::new("agent-1", "smoke", "0.1.0"));
    let n = relay
        .poll_transmit(now, unix, &mut buf)
        .map_err(|_| 11)?
        .ok_or(11)?;
    check(
        Envelope::parse(&buf[..n]).is_ok_and(|e| e.type_name == "register"),
        12,
    )?;
    let ok = br#"{"type":"register_success","payload":{"cluster_id":"c1","extensions":{"websocket_started":true,"websocket_close_code":true}}}"#;
    relay
        .handle_tunnel_message(now, ok, &mut scratch)
        .map_err(|_| 13)?;
    check(
        matches!(relay.poll_event(), Some(Event::Registered { .. })),
        14,
    )?;

    let start = br#"{"type":"proxy_websocket_start","payload":{"stream_id":"s","path":"/api/v1/namespaces/default/pods/p/exec","protocol":"v5.channel.k8s.io"}}"#;
    let handled = relay
        .handle_tunnel_message(now, start, &mut scratch)
        .map_err(|_| 15)?;
    check(
        matches!(handled, Handled::Start(ref s) if s.stream == "s"),
        16,
    )?;
    relay
        .handle_upstream_started(now, "s", Some("v5.channel.k8s.io"))
        .map_err(|_| 17)?;
    let n = relay
        .poll_transmit(now, unix, &mut buf)
        .map_err(|_| 18)?
        .ok_or(18)?;
    check(
        Envelope::parse(&buf[..n]).is_ok_and(|e| e.type_name == "proxy_websocket_started"),
        19,
    )?;

    relay
        .handle_tunnel_message(now, msg, &mut scratch)
        .map_err(|_| 20)?;
    check(
        matches!(relay.poll_event(), Some(Event::DataForUpstream(ref s)) if *s == "s"),
        21,
    )?;
    let m = relay.pop_upstream("s").ok_or(22)?;
    check(
        m.kind == MessageKind::Text && m.payload.as_slice() == b"hi",
        23,
    )?;

    let out = Buf::from_slice(b"\x01out").map_err(|_| 24)?;
    relay
        .handle_upstream_message(now, "s", MessageKind::Binary, out)
        .map_err(|_| 24)?;
    let n = relay
        .poll_transmit(now, unix, &mut buf)
        .map_err(|_| 25)?
        .ok_or(25)?;
    let env = Envelope::parse(&buf[..n]).map_err(|_| 26)?;
    let Ok(Inbound::WebSocketData(data)) = env.inbound() else {
        return Err(27);
    };
    let frame = DataFrame::decode_json(data.data, &mut scratch).map_err(|_| 28)?;
    check(frame == DataFrame::Binary(b"\x01out"), 29)?;

    now += Duration::from_millis(5);
    relay
        .handle_upstream_closed(now, "s", 1000, "")
        .map_err(|_| 30)?;
    let n = relay
        .poll_transmit(now, unix, &mut buf)
        .map_err(|_| 31)?
        .ok_or(31)?;
    check(
        Envelope::parse(&buf[..n]).is_ok_and(|e| e.type_name == "proxy_websocket_close"),
        32,
    )?;
    check(relay.stream_count() == 0, 33)?;
    check(
        matches!(relay.poll_transmit(now, unix, &mut buf), Ok(None)),
        34,
    )?;
    Ok(())
}
