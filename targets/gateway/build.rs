//! Prints the gateway's static memory budget; for the firmware, also sets up memory.x and the
//! linker scripts (cortex-m-rt's link.x, defmt's defmt.x).

use std::env;
use std::fs;
use std::path::PathBuf;

include!("src/budget_consts.rs");

/// `size_of` of the relay's slot and per-stream state on a 32-bit target, from the layout of
/// `tether_core::relay` (a message is its buffer, its length and its kind; a stream holds two rings,
/// its id, close and failure texts and flags). The firmware checks the exact figure at compile
/// time; this estimate is for the printout and the "most streams" answer.
fn stream_bytes(ring: usize, n: usize, word: usize) -> usize {
    let message = (n + word + 1).div_ceil(word) * word;
    let ring_bytes = ring * message + 5 * word;
    2 * ring_bytes + 600
}

fn total(streams: usize, ring: usize, n: usize, rx: usize, tsock: usize, ssock: usize) -> usize {
    let word = 4;
    let relay = streams * stream_bytes(ring, n, word) + 4700;
    let workers = streams * (440 + STREAM_TASK_RAM);
    relay
        + workers
        + rx
        + scratch_len(rx)
        + tx_len(n)
        + 2 * tsock
        + streams * 2 * ssock
        + PLATFORM_RAM
}

fn main() {
    println!("cargo:rerun-if-changed=src/budget_consts.rs");
    println!("cargo:rerun-if-changed=memory.x");
    let firmware_build = env::var_os("CARGO_FEATURE_FIRMWARE").is_some();
    // TLS record buffers (tether_embassy::tls::TLS_READ_BUF + TLS_WRITE_BUF).
    let tls = if env::var_os("CARGO_FEATURE_TLS").is_some() {
        16_640 + 4096
    } else {
        0
    };
    if firmware_build {
        let out = PathBuf::from(env::var_os("OUT_DIR").unwrap());
        fs::copy("memory.x", out.join("memory.x")).unwrap();
        println!("cargo:rustc-link-search={}", out.display());
        println!("cargo:rustc-link-arg-bins=--nmagic");
        println!("cargo:rustc-link-arg-bins=-Tlink.x");
        println!("cargo:rustc-link-arg-bins=-Tdefmt.x");
    }
    use firmware as f;
    let ram = |streams: usize| {
        total(
            streams,
            f::RING,
            f::N,
            f::RX_LEN,
            f::TUNNEL_SOCKET_BUF,
            f::STREAM_SOCKET_BUF,
        ) + tls
    };
    let most = (1..=256)
        .take_while(|s| ram(*s) + STACK_RESERVE <= RAM_BUDGET)
        .last()
        .unwrap_or(0);
    let per_stream =
        stream_bytes(f::RING, f::N, 4) + 440 + STREAM_TASK_RAM + 2 * f::STREAM_SOCKET_BUF;
    let line = format!(
        "firmware RAM budget: {} streams x (2 rings x {} slots x {} B + state + task + 2 x {} B \
         socket) = {} B/stream; + tunnel rx {} + scratch {} + tx {} + socket 2 x {} + platform {} \
         + tls {} => static ~{} B, + {} B stack, of {} B; most streams that fit: {}",
        f::STREAMS,
        f::RING,
        f::N,
        f::STREAM_SOCKET_BUF,
        per_stream,
        f::RX_LEN,
        scratch_len(f::RX_LEN),
        tx_len(f::N),
        f::TUNNEL_SOCKET_BUF,
        PLATFORM_RAM,
        tls,
        ram(f::STREAMS),
        STACK_RESERVE,
        RAM_BUDGET,
        most
    );
    // Shown by cargo when it builds the firmware; `cargo xtask cross` repeats it.
    if firmware_build {
        println!("cargo:warning={line}");
    }
    fs::write(
        PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("budget.txt"),
        &line,
    )
    .unwrap();
}
