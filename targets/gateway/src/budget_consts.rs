// Capacities of the two gateway builds: plain consts only, because build.rs includes this file too
// (to print the budget) and build scripts do not see the crate's features.

/// RAM of the part the firmware targets (memory.x).
pub(crate) const RAM_BUDGET: usize = 256 * 1024;
/// Static RAM the constants below do not size, measured on the linked firmware: the Ethernet DMA
/// packet queue (4 + 4 frames, 12.3 KiB), embassy-net's stack resources (5.6 KiB), the executor,
/// the main and tunnel task futures and the HAL.
pub(crate) const PLATFORM_RAM: usize = 19 * 1024;
/// Static RAM per stream besides its rings and socket buffers, measured on the linked firmware
/// (17 088 B per added stream in all): its worker task's future (3.3 KiB) and its TCP socket's
/// state.
pub(crate) const STREAM_TASK_RAM: usize = 3600;
/// Stack kept free: the deepest path measured in the firmware's disassembly (a tunnel start: the
/// relay builds a stream slot, ~9.6 KiB, then moves it into the table, ~8.9 KiB) with margin.
pub(crate) const STACK_RESERVE: usize = 24 * 1024;

/// The firmware (thumbv7em, 256 KiB of RAM).
#[allow(dead_code)]
pub(crate) mod firmware {
    /// Concurrent streams (TCP tunnels).
    pub(crate) const STREAMS: usize = 8;
    /// Messages per ring (two rings per stream).
    pub(crate) const RING: usize = 8;
    /// Bytes per message (the relay's inline buffer).
    pub(crate) const N: usize = 512;
    /// Largest tunnel WebSocket message (`Config::max_message`): the rx buffer.
    pub(crate) const RX_LEN: usize = 8 * 1024;
    /// Socket buffer (each direction) of the tunnel connection.
    pub(crate) const TUNNEL_SOCKET_BUF: usize = 4 * 1024;
    /// Socket buffer (each direction) of each stream's connection.
    pub(crate) const STREAM_SOCKET_BUF: usize = 2 * 1024;
}

/// The Linux build: same code, roomier constants.
#[allow(dead_code)]
pub(crate) mod host {
    pub(crate) const STREAMS: usize = 16;
    pub(crate) const RING: usize = 32;
    pub(crate) const N: usize = 8 * 1024;
    pub(crate) const RX_LEN: usize = 1024 * 1024;
    pub(crate) const TUNNEL_SOCKET_BUF: usize = 0;
    pub(crate) const STREAM_SOCKET_BUF: usize = 0;
}

/// Decoded data of one tunnel message of `rx` bytes (base64 is 4/3 of it).
#[allow(dead_code)]
pub(crate) const fn scratch_len(rx: usize) -> usize {
    rx / 4 * 3 + 4
}

/// One outbound message with `n`-byte buffers: a data message base64-encoded, plus envelope and
/// frame header (as `tether_embassy::tunnel::tx_len`).
#[allow(dead_code)]
pub(crate) const fn tx_len(n: usize) -> usize {
    (n + 1).div_ceil(3) * 4 + 2048 + 14
}
