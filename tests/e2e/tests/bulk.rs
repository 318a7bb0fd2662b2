//! Bulk transfers through the tunnel, with checksums and timings compared to kubectl talking
//! straight to kubesim: `kubectl cp` of 50 MiB both ways, and `kubectl port-forward` with four
//! concurrent connections moving 20 MiB each way.
//!
//! The figures are printed with `eprintln!`; `cargo test -p tether-e2e --test bulk --
//! --nocapture` shows them. The two tests take a lock so their timings do not share the CPUs.

use std::sync::Mutex;

use tether_e2e::Cluster;
use tether_e2e::data::{sha256_file, write_random_file};
use tether_e2e::transfer::{CONNECTIONS, PF_BYTES, cp_round_trip, forward_and_check};

/// One heavy test at a time, so the timings mean something on 2 cores.
static HEAVY: Mutex<()> = Mutex::new(());

const MIB: usize = 1024 * 1024;
/// Size of the `kubectl cp` payload.
const CP_BYTES: usize = 50 * MIB;
/// Peak RSS the agent may reach while copying 50 MiB (bounded rings: it must stream, not hold
/// the file; holding it base64-encoded alone would take ~67 MiB).
const MAX_AGENT_PEAK_MIB: u64 = 96;

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn cp_50_mib_both_ways_through_the_tunnel() {
    let _heavy = heavy();
    let mut c = Cluster::start();
    let src = c.dir().join("payload.bin");
    write_random_file(&src, CP_BYTES, 11);
    let want = sha256_file(&src);
    let rss_before = c.agent().and_then(|a| a.peak_rss_kib()).unwrap_or(0);

    let (up, down) = cp_round_trip(&c, &|a| c.kubectl(a), "tunnel", &src, &want);
    let agent_peak = c.agent().and_then(|a| a.peak_rss_kib()).unwrap_or(0);
    let cp_peak = c
        .control_plane()
        .and_then(|p| p.peak_rss_kib())
        .unwrap_or(0);
    let (up_direct, down_direct) =
        cp_round_trip(&c, &|a| c.kubectl_direct(a), "direct", &src, &want);

    let mib = (CP_BYTES / MIB) as f64;
    eprintln!(
        "FIGURE cp {mib} MiB to pod:   tunnel {up:.2} s ({:.1} MiB/s), straight to kubesim {up_direct:.2} s ({:.1} MiB/s), ratio {:.2}x",
        mib / up,
        mib / up_direct,
        up / up_direct
    );
    eprintln!(
        "FIGURE cp {mib} MiB from pod: tunnel {down:.2} s ({:.1} MiB/s), straight to kubesim {down_direct:.2} s ({:.1} MiB/s), ratio {:.2}x",
        mib / down,
        mib / down_direct,
        down / down_direct
    );
    eprintln!(
        "FIGURE agent peak RSS (VmHWM): {:.1} MiB after the cp (was {:.1} MiB after start); control plane peak {:.1} MiB",
        agent_peak as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        cp_peak as f64 / 1024.0
    );
    assert!(agent_peak > 0, "could not read the agent's VmHWM");
    assert!(
        agent_peak / 1024 <= MAX_AGENT_PEAK_MIB,
        "the agent's peak RSS reached {} MiB while copying {mib} MiB (limit {MAX_AGENT_PEAK_MIB} MiB): it buffers instead of streaming",
        agent_peak / 1024
    );
}

#[test]
fn port_forward_four_connections_20_mib_each_way() {
    let _heavy = heavy();
    let c = Cluster::start();
    let (tunnel, tunnel_s) = forward_and_check(&|a| c.kubectl(a), "tunnel");
    let (direct, direct_s) = forward_and_check(&|a| c.kubectl_direct(a), "direct");
    eprintln!(
        "FIGURE port-forward {CONNECTIONS} x {} MiB each way: tunnel {tunnel_s:.2} s ({tunnel:.1} MiB/s both ways), straight to kubesim {direct_s:.2} s ({direct:.1} MiB/s), ratio {:.2}x",
        PF_BYTES / MIB,
        tunnel_s / direct_s
    );
}
