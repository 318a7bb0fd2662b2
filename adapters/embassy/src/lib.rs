//! Tether's embassy adapter: binds the sans-IO [`tether_core`] relay to embassy-sync, embassy-time
//! and any `embedded-io-async` transport. This is the edge gateway's runtime; `no_std`, no alloc.
//!
//! # Tasks
//!
//! * The **tunnel** ([`tunnel::run`]) dials the control plane, upgrades to a WebSocket (edge-http /
//!   edge-ws: bearer token, masked frames, ping/pong, close), runs one relay session per
//!   connection and reconnects with full-jitter backoff ([`backoff`], 0.5 s doubling to 60 s,
//!   randomness from the caller's RNG). Inside a session a reader hands every tunnel message to
//!   the relay (pausing while the relay is full: compat mode's head-of-line blocking) and a writer
//!   drains the relay: events go to the workers, transmits to the WebSocket, timers fire.
//! * One **worker** per stream slot ([`worker::run_worker`]) dials a TCP tunnel's target when the
//!   relay registers it and moves bytes between the socket and the relay's rings, stopping reading
//!   when the relay says its ring is full.
//!
//! Tasks meet in a [`Gateway`]: the relay behind a blocking mutex (held only for synchronous relay
//! calls), one embassy-sync channel of commands per worker, and signals. Bytes never travel in
//! channels: they wait in the relay's per-stream rings, whose sizes are the `Gateway`'s const
//! parameters, so the whole RAM budget is static. The adapter takes no protocol decision of its
//! own: what to send, when to close, what is an error, all comes from the relay.
//!
//! embassy `#[task]`s cannot be generic, so the binary wraps [`tunnel::run`] and
//! [`worker::run_worker`] in tasks of its concrete types (see `targets/gateway`).
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

// This mod MUST go first, so that the others see its macros.
#[macro_use]
mod fmt;

pub mod backoff;
pub mod clock;
mod gateway;
pub mod io;
#[cfg(feature = "tls")]
pub mod tls;
pub mod tunnel;
pub mod url;
pub mod worker;
pub mod ws;

pub use gateway::{Buf, Gateway};

/// The relay's clock: embassy-time's monotonic instant.
#[must_use]
pub fn now() -> tether_core::time::Instant {
    tether_core::time::Instant::from_micros(embassy_time::Instant::now().as_micros())
}
