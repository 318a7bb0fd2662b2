//! Tether's sans-IO protocol core.
//!
//! No I/O, no clock, no allocation: inputs go in through `handle_*` calls with the current
//! [`Instant`](time::Instant) passed in, outputs come out through `poll_*` calls into caller
//! buffers. Capacities are const generics; errors are small `Copy` enums per operation.
//!
//! * [`relay`]: the agent-side stream relay state machine ([`relay::Relay`]).
//! * [`wire`]: compat wire codecs (JSON envelopes, base64 data frames).
//! * [`table`]: fixed-capacity stream table and the stream lifecycle.
//! * [`ring`]: bounded per-stream message rings that hand back instead of dropping.
//! * [`stream_id`]: validated stream ids.
//! * [`time`]: caller-supplied [`Instant`](time::Instant) and [`Duration`](time::Duration).
//!
//! Logging goes through the `defmt` or `log` feature (at most one); without either it compiles out.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

// This mod MUST go first, so that the others see its macros.
#[macro_use]
mod fmt;

mod engine;
mod flow;
mod keepalive;
mod recent;
mod text;

#[cfg(test)]
mod native_tests;

// Tests only: the library itself never links std or alloc.
#[cfg(test)]
extern crate std;

pub mod budget;
pub mod credit;
pub mod gateway;
pub mod relay;
pub mod request;
pub mod ring;
pub mod stream_id;
pub mod table;
pub mod time;
pub mod wire;
