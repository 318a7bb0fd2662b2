//! The end-to-end benchmarks, each against one [`Target`] (a tunnel mode or the direct path).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde::Serialize;
use tether_e2e::data::{Prng, PrngCheck, Sha256Stream};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{
    ATTACH_IDLE, EXEC_CAT, Got, Target, classify, drain, open_many, send, stdin_eof, stdin_msg,
};

/// Stdin message size (kubectl's largest).
pub(crate) const CHUNK: usize = 32 * 1024;
/// Round-trip message size.
pub(crate) const SMALL: usize = 64;
/// Round trips before measuring.
const WARMUP: usize = 200;
/// How long one bulk transfer may take.
const T: Duration = Duration::from_secs(300);

/// A spawned task that is aborted if dropped before it is joined (a failed reader must not
/// leave its writer running into the next benchmark).
struct Task<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> Task<T> {
    fn spawn(f: impl std::future::Future<Output = T> + Send + 'static) -> Self
    where
        T: Send + 'static,
    {
        Self(Some(tokio::spawn(f)))
    }

    async fn join(mut self) -> T {
        self.0.take().expect("joined once").await.expect("task")
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

// ---- 1. bulk -------------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Bulk {
    pub(crate) secs: f64,
    pub(crate) mb_per_s: f64,
}

/// One stream: `mib` MiB of `pattern` (cycled) on stdin in 32 KiB messages, read back on stdout;
/// the sha256 of what came back must be `expect`.
pub(crate) async fn bulk(
    t: &Target,
    pattern: Arc<Vec<u8>>,
    mib: usize,
    expect: &str,
) -> Result<Bulk, String> {
    let total = mib * 1024 * 1024;
    let ws = t.open(EXEC_CAT).await?;
    let (mut tx, mut rx) = ws.split();
    let start = Instant::now();
    let name = t.name;
    let writer = Task::spawn(async move {
        let mut off = 0;
        let mut sent = 0;
        while sent < total {
            let n = CHUNK.min(total - sent);
            send(&mut tx, stdin_msg(&pattern[off..off + n]), name).await?;
            off = (off + n) % pattern.len();
            sent += n;
        }
        send(&mut tx, stdin_eof(), name).await?;
        Ok::<_, String>(tx)
    });
    let mut sha = Sha256Stream::new();
    let read = tokio::time::timeout(T, async {
        while (sha.len() as usize) < total {
            let m = rx.next().await;
            if let Got::Stdout(b) = classify(name, &m)? {
                sha.update(b);
            }
        }
        Ok::<_, String>(())
    })
    .await;
    let secs = start.elapsed().as_secs_f64();
    read.map_err(|_| format!("{name}: bulk timed out after {T:?}"))??;
    if sha.len() as usize != total {
        return Err(format!("{name}: got {} bytes, want {total}", sha.len()));
    }
    let got = sha.hex();
    if got != expect {
        return Err(format!(
            "{name}: sha256 of the echoed data {got}, want {expect}"
        ));
    }
    let tx = writer.join().await?;
    let mut ws = tx.reunite(rx).expect("reunite");
    drain(&mut ws).await;
    Ok(Bulk {
        secs,
        mb_per_s: total as f64 / 1e6 / secs,
    })
}

// ---- 2. latency ----------------------------------------------------------------------------

/// Sorted round-trip times (ns) of `n` 64-byte messages on one exec of `cat` (after a warm-up),
/// `gap` apart.
pub(crate) async fn round_trips(t: &Target, n: usize, gap: Duration) -> Result<Vec<u64>, String> {
    let mut ws = t.open(EXEC_CAT).await?;
    let mut out = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let rtt = one_trip(t.name, &mut ws, i as u8).await?;
        if i >= WARMUP {
            out.push(rtt);
        }
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
    }
    send(&mut ws, stdin_eof(), t.name).await?;
    drain(&mut ws).await;
    out.sort_unstable();
    Ok(out)
}

/// One 64-byte round trip; its time in ns.
async fn one_trip(name: &str, ws: &mut crate::client::Ws, fill: u8) -> Result<u64, String> {
    let start = Instant::now();
    send(ws, stdin_msg(&[fill; SMALL]), name).await?;
    let mut got = 0;
    while got < SMALL {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .map_err(|_| format!("{name}: round trip timed out"))?;
        if let Got::Stdout(b) = classify(name, &m)? {
            if !b.iter().all(|&x| x == fill) {
                return Err(format!("{name}: echo of another message"));
            }
            got += b.len();
        }
    }
    Ok(start.elapsed().as_nanos() as u64)
}

/// The `p`th percentile (nearest rank) of sorted ns values, in µs.
pub(crate) fn pct_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

// ---- 3. many streams -----------------------------------------------------------------------

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Many {
    pub(crate) streams: usize,
    pub(crate) opened: usize,
    /// Streams whose data came back complete, in order, with the right sha256.
    pub(crate) verified: usize,
    pub(crate) open_secs: f64,
    /// From starting all transfers to the last stream verified.
    pub(crate) secs: f64,
    /// Aggregate rate each way (bytes of all streams / secs).
    pub(crate) mb_per_s: f64,
    /// Up to 5 distinct errors.
    pub(crate) errors: Vec<String>,
    /// Peak RSS (`VmHWM`, KiB) of the agent and control plane after the run (tunnel modes).
    pub(crate) agent_peak_kib: Option<u64>,
    pub(crate) control_plane_peak_kib: Option<u64>,
}

/// `n` concurrent execs of `cat`, each writing `bytes` of its own seeded data in 32 KiB messages
/// and reading it back: byte-for-byte (order) and sha256 checked.
pub(crate) async fn many(t: &Target, n: usize, bytes: usize) -> Many {
    let open_start = Instant::now();
    let (streams, open_err) = open_many(t, EXEC_CAT, n, 32, false).await;
    let open_secs = open_start.elapsed().as_secs_f64();
    let opened = streams.len();
    let mut errors: Vec<String> = open_err.into_iter().collect();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(opened);
    for (i, ws) in streams.into_iter().enumerate() {
        let name = t.name;
        tasks.push(tokio::spawn(async move {
            let seed = 0x5EED_0000 + i as u64;
            let (mut tx, mut rx) = ws.split();
            let writer = Task::spawn(async move {
                let mut prng = Prng::new(seed);
                let mut sha = Sha256Stream::new();
                let mut buf = vec![0u8; CHUNK];
                let mut left = bytes;
                while left > 0 {
                    let k = left.min(CHUNK);
                    prng.fill(&mut buf[..k]);
                    sha.update(&buf[..k]);
                    send(&mut tx, stdin_msg(&buf[..k]), name).await?;
                    left -= k;
                }
                send(&mut tx, stdin_eof(), name).await?;
                Ok::<_, String>((tx, sha.hex()))
            });
            let mut check = PrngCheck::new(seed);
            let mut sha = Sha256Stream::new();
            tokio::time::timeout(T, async {
                while (check.len() as usize) < bytes {
                    let m = rx.next().await;
                    if let Got::Stdout(b) = classify(name, &m)? {
                        check.feed(b);
                        sha.update(b);
                    }
                }
                Ok::<_, String>(())
            })
            .await
            .map_err(|_| format!("{name}: stream {i} timed out"))??;
            let (tx, sent_sha) = writer.join().await?;
            if check.len() as usize != bytes {
                return Err(format!("{name}: stream {i}: {} bytes back", check.len()));
            }
            if let Some(at) = check.first_mismatch() {
                return Err(format!(
                    "{name}: stream {i}: data differs (lost or reordered) at byte {at}"
                ));
            }
            if sha.hex() != sent_sha {
                return Err(format!("{name}: stream {i}: sha256 differs"));
            }
            let mut ws = tx.reunite(rx).expect("reunite");
            drain(&mut ws).await;
            Ok(())
        }));
    }
    let mut verified = 0;
    for task in tasks {
        match task.await {
            Ok(Ok(())) => verified += 1,
            Ok(Err(e)) => {
                if errors.len() < 5 && !errors.contains(&e) {
                    errors.push(e);
                }
            }
            Err(e) => errors.push(format!("task: {e}")),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Many {
        streams: n,
        opened,
        verified,
        open_secs,
        secs,
        mb_per_s: (verified * bytes) as f64 / 1e6 / secs,
        errors,
        agent_peak_kib: None,
        control_plane_peak_kib: None,
    }
}

// ---- 4. idle cost --------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Idle {
    pub(crate) wanted: usize,
    /// Streams open (each had its 101 and kubesim's first message) when memory was read.
    pub(crate) reached: usize,
    /// Why fewer than `wanted` were reached.
    pub(crate) error: Option<String>,
    pub(crate) open_secs: f64,
    /// VmRSS (KiB) before opening, with the streams open, and after closing them.
    pub(crate) agent_kib: [Option<u64>; 3],
    pub(crate) control_plane_kib: [Option<u64>; 3],
    /// (with - before) / reached, bytes.
    pub(crate) agent_bytes_per_stream: Option<f64>,
    pub(crate) control_plane_bytes_per_stream: Option<f64>,
}

/// Opens `n` idle attaches and reads the VmRSS of `pids` (agent, control plane) before, with
/// them open and after closing them.
pub(crate) async fn idle(t: &Target, n: usize, pids: [Option<u32>; 2]) -> Idle {
    let rss = |pid: Option<u32>| pid.and_then(|p| tether_e2e::proc::proc_status_kib(p, "VmRSS:"));
    // Warm-up: the first streams allocate buffers and pools that stay.
    let (warm, _) = open_many(t, ATTACH_IDLE, 16, 16, true).await;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = pids.map(rss);
    let start = Instant::now();
    let (streams, error) = open_many(t, ATTACH_IDLE, n, 64, true).await;
    let open_secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let with = pids.map(rss);
    let reached = streams.len();
    drop(streams);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let after = pids.map(rss);
    let per = |i: usize| match (before[i], with[i]) {
        (Some(b), Some(w)) if reached > 0 => Some((w as f64 - b as f64) * 1024.0 / reached as f64),
        _ => None,
    };
    Idle {
        wanted: n,
        reached,
        error: if reached < n {
            Some(error.unwrap_or_else(|| "fewer streams opened, no error seen".into()))
        } else {
            error
        },
        open_secs,
        agent_kib: [before[0], with[0], after[0]],
        control_plane_kib: [before[1], with[1], after[1]],
        agent_bytes_per_stream: per(0),
        control_plane_bytes_per_stream: per(1),
    }
}

// ---- 5. interactive under load -------------------------------------------------------------

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Interactive {
    pub(crate) wanted: usize,
    pub(crate) trips: usize,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) max_us: f64,
    /// Aggregate echo rate of the bulk streams while the trips ran (MB/s each way).
    pub(crate) bulk_mb_per_s: f64,
    /// Why fewer trips than wanted were made.
    pub(crate) note: Option<String>,
}

/// `bulk_streams` execs of `cat` kept saturated (32 KiB messages both ways, readers draining)
/// while one more exec does `trips` 64-byte round trips `gap` apart, for at most `cap`.
pub(crate) async fn interactive(
    t: &Target,
    trips: usize,
    gap: Duration,
    bulk_streams: usize,
    cap: Duration,
) -> Result<Interactive, String> {
    let mut tty = t.open(EXEC_CAT).await?;
    // Warm the interactive stream up before the load starts.
    for i in 0..20u8 {
        one_trip(t.name, &mut tty, i).await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for s in 0..bulk_streams {
        let ws = t.open(EXEC_CAT).await?;
        let (mut tx, mut rx) = ws.split();
        let name = t.name;
        let stop_w = stop.clone();
        load.push(Task::spawn(async move {
            let data = Prng::new(77 + s as u64).bytes(CHUNK);
            while !stop_w.load(Ordering::Relaxed) {
                if tx.send(stdin_msg(&data)).await.is_err() {
                    break;
                }
            }
            let _ = send(&mut tx, stdin_eof(), name).await;
        }));
        let received = received.clone();
        let stop_r = stop.clone();
        load.push(Task::spawn(async move {
            while let Some(Ok(m)) = rx.next().await {
                if let Message::Binary(b) = m {
                    received.fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                if stop_r.load(Ordering::Relaxed) {
                    break;
                }
            }
        }));
    }
    // Let the load fill the pipes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let load_start = Instant::now();
    let bytes0 = received.load(Ordering::Relaxed);
    let mut rtts = Vec::with_capacity(trips);
    let mut note = None;
    for i in 0..trips {
        if load_start.elapsed() > cap {
            note = Some(format!("stopped after {cap:?}: {i} of {trips} round trips"));
            break;
        }
        match one_trip(t.name, &mut tty, i as u8).await {
            Ok(ns) => rtts.push(ns),
            Err(e) => {
                note = Some(format!("round trip {i}: {e}"));
                break;
            }
        }
        tokio::time::sleep(gap).await;
    }
    let secs = load_start.elapsed().as_secs_f64();
    let bulk_mb_per_s = (received.load(Ordering::Relaxed) - bytes0) as f64 / 1e6 / secs;
    stop.store(true, Ordering::Relaxed);
    drop(load);
    let _ = send(&mut tty, stdin_eof(), t.name).await;
    drain(&mut tty).await;
    rtts.sort_unstable();
    if rtts.is_empty() {
        return Err(note.unwrap_or_else(|| "no round trip".into()));
    }
    Ok(Interactive {
        wanted: trips,
        trips: rtts.len(),
        p50_us: pct_us(&rtts, 50.0),
        p99_us: pct_us(&rtts, 99.0),
        max_us: *rtts.last().expect("non-empty") as f64 / 1000.0,
        bulk_mb_per_s,
        note,
    })
}
