//! End-to-end benchmarks of issue 5 (run by `cargo xtask bench`): a kubectl-free client opens a
//! `v5.channel.k8s.io` exec of `cat` on `default/demo`, once through the control plane and the
//! tunnel (compat wire mode) and once straight to kubesim (the direct path), in the same run:
//!
//! 1. bulk: one stream, N MiB (default 256) pushed on stdin (channel 0) in 32 KiB messages and
//!    read back on stdout (channel 1), sha256 checked; MB/s of each path and their ratio;
//! 2. latency: R (default 10 000) round trips of 64-byte messages; p50/p99/p99.9 of each path and
//!    the added latency (tunnel minus direct, percentile by percentile).
//!
//! With `--criterion DIR` it also tabulates the tether-core criterion benches found there
//! (`cargo bench -p tether-core --bench wire`). Writes `results.md` and `results.json` to `--out`.
//!
//! ```sh
//! TETHER_E2E_BIN_DIR=target/release cargo run --release -p tether-e2e --example bench -- \
//!     --out target/bench [--mib 256] [--round-trips 10000] [--criterion target/criterion]
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tether_e2e::Cluster;
use tether_e2e::data::{Prng, Sha256Stream};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// Stdin message size (kubectl's largest).
const CHUNK: usize = 32 * 1024;
/// Round-trip message size.
const SMALL: usize = 64;
/// Round trips before measuring.
const WARMUP: usize = 200;
/// The data pattern cycled through by the bulk writer.
const PATTERN: usize = 8 * 1024 * 1024;
const EXEC: &str =
    "/api/v1/namespaces/default/pods/demo/exec?command=cat&stdin=true&stdout=true&stderr=true";
const T: Duration = Duration::from_secs(120);

struct Args {
    out: PathBuf,
    mib: usize,
    round_trips: usize,
    criterion: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        out: PathBuf::from("target/bench"),
        mib: 256,
        round_trips: 10_000,
        criterion: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--out" => a.out = val().into(),
            "--mib" => a.mib = val().parse().expect("--mib N"),
            "--round-trips" => a.round_trips = val().parse().expect("--round-trips N"),
            "--criterion" => a.criterion = Some(val().into()),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Where to open execs: base URL (`https://HOST:PORT[/prefix]`), CA, bearer token.
struct Target {
    name: &'static str,
    base: String,
    ca_pem: String,
    token: String,
}

async fn open_exec(t: &Target) -> Ws {
    let url = format!("{}{EXEC}", t.base.replacen("https://", "wss://", 1));
    let authority = url["wss://".len()..]
        .split('/')
        .next()
        .expect("authority")
        .to_string();
    let mut req = url.as_str().into_client_request().expect("request");
    let h = req.headers_mut();
    h.insert(
        "Authorization",
        format!("Bearer {}", t.token).parse().expect("header"),
    );
    h.insert(
        "Sec-WebSocket-Protocol",
        "v5.channel.k8s.io".parse().expect("header"),
    );
    let tcp = TcpStream::connect(&authority).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let connector = TlsConnector::from(tether_e2e::tls::client_config(&t.ca_pem));
    let name = ServerName::try_from("127.0.0.1").expect("server name");
    let tls = connector.connect(name, tcp).await.expect("TLS");
    let (ws, resp) = tokio_tungstenite::client_async(req, tls)
        .await
        .unwrap_or_else(|e| panic!("{}: exec upgrade failed: {e}", t.name));
    let proto = resp
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok());
    assert_eq!(proto, Some("v5.channel.k8s.io"), "{}: subprotocol", t.name);
    ws
}

/// Reads until the exec's status (channel 3) or the close, ignoring the rest.
async fn drain(ws: &mut Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Binary(b) if b.first() == Some(&3) => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
    })
    .await;
    let _ = ws.close(None).await;
}

struct Bulk {
    secs: f64,
    mb_s: f64,
}

async fn bulk(t: &Target, pattern: &[u8], mib: usize, expect: &str) -> Bulk {
    let total = mib * 1024 * 1024;
    let ws = open_exec(t).await;
    let (mut tx, mut rx) = ws.split();
    let start = Instant::now();
    let pattern = pattern.to_vec();
    let writer = tokio::spawn(async move {
        let mut off = 0;
        let mut sent = 0;
        while sent < total {
            let n = CHUNK.min(total - sent);
            let mut m = Vec::with_capacity(n + 1);
            m.push(0);
            m.extend_from_slice(&pattern[off..off + n]);
            off = (off + n) % pattern.len();
            sent += n;
            tx.send(Message::binary(m)).await.expect("send stdin");
        }
        tx.send(Message::binary(vec![0xFF, 0]))
            .await
            .expect("stdin EOF");
        tx
    });
    let mut sha = Sha256Stream::new();
    let read = tokio::time::timeout(T, async {
        while (sha.len() as usize) < total {
            match rx.next().await {
                Some(Ok(Message::Binary(b))) => match b.first() {
                    Some(1) => sha.update(&b[1..]),
                    Some(2) => panic!("{}: stderr: {:?}", t.name, String::from_utf8_lossy(&b)),
                    Some(3) => panic!(
                        "{}: early status: {:?}",
                        t.name,
                        String::from_utf8_lossy(&b)
                    ),
                    _ => {}
                },
                Some(Ok(Message::Close(c))) => panic!("{}: closed early: {c:?}", t.name),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("{}: read error: {e}", t.name),
                None => panic!("{}: stream ended early", t.name),
            }
        }
    })
    .await;
    let secs = start.elapsed().as_secs_f64();
    read.unwrap_or_else(|_| panic!("{}: bulk timed out", t.name));
    assert_eq!(sha.len() as usize, total, "{}: length", t.name);
    assert_eq!(sha.hex(), expect, "{}: sha256 of the echoed data", t.name);
    let tx = writer.await.expect("writer");
    let mut ws = tx.reunite(rx).expect("reunite");
    drain(&mut ws).await;
    Bulk {
        secs,
        mb_s: total as f64 / 1e6 / secs,
    }
}

async fn round_trips(t: &Target, n: usize) -> Vec<u64> {
    let mut ws = open_exec(t).await;
    let mut msg = vec![0u8; SMALL + 1];
    let mut out = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        msg[1..].fill(i as u8);
        let start = Instant::now();
        ws.send(Message::binary(msg.clone())).await.expect("send");
        let mut got = 0;
        while got < SMALL {
            match tokio::time::timeout(T, ws.next())
                .await
                .expect("round trip timed out")
            {
                Some(Ok(Message::Binary(b))) if b.first() == Some(&1) => {
                    assert!(b[1..].iter().all(|&x| x == i as u8), "{}: echo", t.name);
                    got += b.len() - 1;
                }
                Some(Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("{}: unexpected {other:?}", t.name),
            }
        }
        if i >= WARMUP {
            out.push(start.elapsed().as_nanos() as u64);
        }
    }
    ws.send(Message::binary(vec![0xFF, 0])).await.expect("EOF");
    drain(&mut ws).await;
    out.sort_unstable();
    out
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

/// The criterion estimates under `dir` for the tether-core wire benches.
fn criterion_rows(dir: &Path) -> Vec<Value> {
    let mut rows = Vec::new();
    for group in ["envelope", "data_frame"] {
        for op in ["encode", "decode"] {
            for size in [64usize, 32 * 1024] {
                let f = dir.join(format!("{group}/{op}/{size}/new/estimates.json"));
                let Ok(text) = std::fs::read_to_string(&f) else {
                    continue;
                };
                let v: Value = serde_json::from_str(&text).expect("estimates.json");
                let ns = v["mean"]["point_estimate"].as_f64().expect("mean");
                rows.push(json!({
                    "bench": format!("{group}/{op}"),
                    "payload_bytes": size,
                    "ns_per_message": ns,
                    "gb_per_s": size as f64 / ns,
                }));
            }
        }
    }
    rows
}

fn main() {
    let a = args();
    std::fs::create_dir_all(&a.out).expect("out dir");
    let c = Cluster::start();
    let tunnel = Target {
        name: "compat",
        base: c.server_url().to_string(),
        ca_pem: c.control_plane_ca_pem().to_string(),
        token: c.user_token().to_string(),
    };
    let direct = Target {
        name: "direct",
        base: c.kubesim_url(),
        ca_pem: c.kubesim_ca_pem().to_string(),
        token: c.kube_token().to_string(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let pattern = Prng::new(5).bytes(PATTERN);
    let total = a.mib * 1024 * 1024;
    let mut sha = Sha256Stream::new();
    let mut left = total;
    while left > 0 {
        let n = left.min(PATTERN);
        sha.update(&pattern[..n]);
        left -= n;
    }
    let expect = sha.hex();

    eprintln!("bench: bulk {} MiB each way, direct", a.mib);
    let bd = rt.block_on(bulk(&direct, &pattern, a.mib, &expect));
    eprintln!("bench: bulk direct {:.1} MB/s; compat", bd.mb_s);
    let bc = rt.block_on(bulk(&tunnel, &pattern, a.mib, &expect));
    eprintln!("bench: bulk compat {:.1} MB/s", bc.mb_s);
    eprintln!("bench: {} round trips, direct", a.round_trips);
    let ld = rt.block_on(round_trips(&direct, a.round_trips));
    eprintln!("bench: {} round trips, compat", a.round_trips);
    let lc = rt.block_on(round_trips(&tunnel, a.round_trips));
    drop(c);

    let ps = [50.0, 99.0, 99.9];
    let lat = |v: &[u64]| ps.map(|p| pct(v, p));
    let (d, t) = (lat(&ld), lat(&lc));
    let core = a
        .criterion
        .as_deref()
        .map(criterion_rows)
        .unwrap_or_default();

    let mut md = String::new();
    md.push_str("| figure | compat | direct | ratio / added | target |\n");
    md.push_str("| --- | ---: | ---: | ---: | --- |\n");
    md.push_str(&format!(
        "| 1. bulk, 1 stream, {} MiB each way, 32 KiB msgs (MB/s) | {:.1} | {:.1} | {:.2} of direct | compat >= 0.5, native >= 0.8 |\n",
        a.mib,
        bc.mb_s,
        bd.mb_s,
        bc.mb_s / bd.mb_s
    ));
    for (i, p) in ps.iter().enumerate() {
        md.push_str(&format!(
            "| 2. round trip 64 B, p{p} (µs), {} trips | {:.0} | {:.0} | +{:.0} µs | added p99 <= 300 µs (native) |\n",
            a.round_trips,
            t[i],
            d[i],
            t[i] - d[i]
        ));
    }
    if !core.is_empty() {
        md.push_str(
            "\n| 6. tether-core (criterion, mean) | payload | ns / message | GB/s of payload |\n",
        );
        md.push_str("| --- | ---: | ---: | ---: |\n");
        for r in &core {
            md.push_str(&format!(
                "| {} | {} B | {:.0} | {:.2} |\n",
                r["bench"].as_str().unwrap_or(""),
                r["payload_bytes"],
                r["ns_per_message"].as_f64().unwrap_or(0.0),
                r["gb_per_s"].as_f64().unwrap_or(0.0)
            ));
        }
    }
    let results = json!({
        "bulk": {
            "mib_each_way": a.mib,
            "message_bytes": CHUNK,
            "sha256": expect,
            "compat": {"secs": bc.secs, "mb_per_s": bc.mb_s},
            "direct": {"secs": bd.secs, "mb_per_s": bd.mb_s},
            "ratio": bc.mb_s / bd.mb_s,
        },
        "latency": {
            "round_trips": a.round_trips,
            "message_bytes": SMALL,
            "percentiles": ps,
            "compat_us": t,
            "direct_us": d,
            "added_us": [t[0] - d[0], t[1] - d[1], t[2] - d[2]],
        },
        "core": core,
        "skipped": ["3 many streams", "4 idle cost", "5 interactive under load", "native mode (not implemented)"],
    });
    std::fs::write(a.out.join("results.md"), &md).expect("write results.md");
    std::fs::write(
        a.out.join("results.json"),
        serde_json::to_string_pretty(&results).expect("json"),
    )
    .expect("write results.json");
    println!("\n{md}");
    println!("written: {}/results.md, results.json", a.out.display());
}
