//! The gateway's static memory: every capacity is a constant, so RAM use is known at build time.
//!
//! RAM is about: the relay (`STREAMS` times two rings of `RING` slots of `N` bytes plus slot
//! overhead, plus per-stream state), the tunnel buffers (rx, scratch, tx), the socket buffers
//! (tunnel, and one pair per stream), the network stack, the task futures and the stack.
//! `build.rs` prints the estimate and the most streams that fit 256 KiB; [`STATIC_RAM`] is the
//! exact figure for the big items (with `size_of`), checked against the budget at compile time on
//! the firmware; `cargo xtask cross` prints the linked sizes.
#![allow(dead_code)]

include!("budget_consts.rs");

#[cfg(feature = "firmware")]
pub(crate) use firmware::*;
#[cfg(not(feature = "firmware"))]
pub(crate) use host::*;

use tether_embassy::Gateway;

/// The gateway state type of this build.
pub(crate) type GatewayState = Gateway<N, STREAMS, RING>;

/// Decoded data of one tunnel message.
pub(crate) const SCRATCH_LEN: usize = scratch_len(RX_LEN);
/// One outbound message.
pub(crate) const TX_LEN: usize = tx_len(N);
/// Per-ring byte budget: the ring can fill its slots.
pub(crate) const RING_BYTES: usize = RING * N;
/// Budget of all rings toward the tunnel together: every ring can fill (the slots bound memory
/// here, not bytes).
pub(crate) const GLOBAL_BYTES: usize = STREAMS * RING_BYTES;

/// Bytes of the big static items: the gateway (relay, rings, mailboxes), the tunnel buffers and
/// every socket buffer.
pub(crate) const STATIC_RAM: usize = core::mem::size_of::<GatewayState>()
    + RX_LEN
    + SCRATCH_LEN
    + TX_LEN
    + TUNNEL_SOCKET_BUF * 2
    + STREAMS * STREAM_SOCKET_BUF * 2
    + TLS_RAM;

/// TLS record buffers (feature `tls`).
#[cfg(feature = "tls")]
pub(crate) const TLS_RAM: usize =
    tether_embassy::tls::TLS_READ_BUF + tether_embassy::tls::TLS_WRITE_BUF;
#[cfg(not(feature = "tls"))]
pub(crate) const TLS_RAM: usize = 0;

#[cfg(feature = "firmware")]
const _: () = assert!(
    STATIC_RAM + PLATFORM_RAM + STREAMS * STREAM_TASK_RAM + STACK_RESERVE <= RAM_BUDGET,
    "the gateway's static RAM does not fit the part: lower STREAMS, RING or N"
);

// The relay's tx buffer formula must match the adapter's.
const _: () = assert!(TX_LEN == tether_embassy::tunnel::tx_len(N));
