//! Port-forward end to end.
//!
//! * Real kubectl v1.32 (`/usr/bin/kubectl port-forward`) against kubesim with TLS and a
//!   bearer token: the `SPDY/3.1+portforward.k8s.io` WebSocket tunnel, several concurrent
//!   connections with checksummed bulk data both ways, and a forward to a closed port.
//! * The legacy `v4.channel.k8s.io` protocol, driven by a tokio-tungstenite client the way
//!   kube-rs drives it (`?ports=P`, 3-byte port prefixes, binary channel frames).
//! * A scripted SPDY client talking straight to `kubesim::portforward::serve`, for the
//!   protocol corners kubectl does not exercise on demand (PING, RST, refusals, GOAWAY).

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use ring::digest::{Context, SHA256, digest};
use support::Kubesim;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, http};

/// The pod every test forwards to (`--pod` spec for kubesim).
const POD_SPEC: &str = "default/demo";
/// Concurrent local connections in the bulk test.
const CONNECTIONS: usize = 4;
/// Bytes each bulk connection moves in each direction.
const BULK_BYTES: usize = 20 * 1024 * 1024;
/// Chunk size for generating, writing and hashing bulk data.
const CHUNK: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------
// Data helpers
// ---------------------------------------------------------------------------------------

/// Deterministic incompressible bytes: xorshift64, 8 bytes per step.
struct Prng(u64);

impl Prng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Fills `buf` (length a multiple of 8).
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_exact_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            word.copy_from_slice(&self.0.to_le_bytes());
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `len` bytes of [`Prng`] `seed` data and returns their SHA-256 (no shutdown).
async fn send_bulk<W: AsyncWrite + Unpin>(
    w: &mut W,
    seed: u64,
    len: usize,
) -> std::io::Result<String> {
    let mut prng = Prng::new(seed);
    let mut hash = Context::new(&SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK);
        prng.fill(&mut buf);
        hash.update(&buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n;
    }
    Ok(hex(hash.finish().as_ref()))
}

/// Reads to EOF; returns the byte count and SHA-256.
async fn recv_bulk<R: AsyncRead + Unpin>(mut r: R) -> std::io::Result<(usize, String)> {
    let mut hash = Context::new(&SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hex(hash.finish().as_ref())));
        }
        hash.update(&buf[..n]);
        total += n;
    }
}

/// What one side of a bulk connection observed.
#[derive(Debug)]
struct Leg {
    sent_sha: String,
    received: usize,
    received_sha: String,
}

/// A TCP "pod process" on 127.0.0.1:0: for every connection it sends [`BULK_BYTES`] of
/// seeded data (seed 1000 + accept index) while reading until the client's EOF, then
/// closes and reports a [`Leg`]. It closes only after the client's EOF because kubectl
/// tears the whole local connection down as soon as the pod side ends its stream (there
/// is no remote half-close through `kubectl port-forward`).
async fn start_bulk_target() -> (u16, mpsc::UnboundedReceiver<Leg>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for index in 0u64.. {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = sock.into_split();
                let (received, sent) =
                    tokio::join!(recv_bulk(rd), send_bulk(&mut wr, 1000 + index, BULK_BYTES));
                drop(wr);
                let (received, received_sha) = received.expect("target read");
                let _ = tx.send(Leg {
                    sent_sha: sent.expect("target write"),
                    received,
                    received_sha,
                });
            });
        }
    });
    (port, rx)
}

/// A local port that nothing listens on (bound once, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

// ---------------------------------------------------------------------------------------
// kubectl helpers
// ---------------------------------------------------------------------------------------

/// A running `kubectl port-forward` whose "Forwarding from" line has been seen.
struct PortForward {
    child: Child,
    local: u16,
    stdout: Arc<std::sync::Mutex<String>>,
    stderr: tokio::task::JoinHandle<String>,
}

impl PortForward {
    /// Starts `kubectl port-forward pod/demo LOCAL:remote` and waits (max 20 s) until it
    /// listens. LOCAL is chosen by kubectl (`:remote`) and read back from its output.
    async fn start(sim: &Kubesim, remote: u16) -> Self {
        let mut cmd =
            Command::from(sim.kubectl(&["port-forward", "pod/demo", &format!(":{remote}")]));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn kubectl");
        let mut err = child.stderr.take().expect("stderr");
        let stderr = tokio::spawn(async move {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s).await;
            s
        });
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let prefix = "Forwarding from 127.0.0.1:";
        let first = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return Some(line.clone()).filter(|_| rest.contains(&format!("-> {remote}")));
                }
            }
            None
        })
        .await;
        let Ok(Some(line)) = first else {
            let _ = child.start_kill();
            let _ = child.wait().await;
            panic!(
                "kubectl port-forward did not start listening; stderr:\n{}",
                stderr.await.unwrap_or_default()
            );
        };
        let local: u16 = line[prefix.len()..]
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("local port");
        let stdout = Arc::new(std::sync::Mutex::new(format!("{line}\n")));
        let sink = Arc::clone(&stdout);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        Self {
            child,
            local,
            stdout,
            stderr,
        }
    }

    fn local_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.local))
    }

    /// Kills kubectl (it never exits by itself on success) after checking it is alive.
    async fn stop(mut self) -> (String, String) {
        let early_exit = self.child.try_wait().expect("try_wait");
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let stderr = self.stderr.await.unwrap_or_default();
        let stdout = self.stdout.lock().unwrap().clone();
        assert!(
            early_exit.is_none(),
            "kubectl exited early ({early_exit:?}); stdout:\n{stdout}\nstderr:\n{stderr}"
        );
        (stdout, stderr)
    }
}

fn assert_ws_tunnel_used(sim: &Kubesim) {
    let requests = sim.requests();
    let upgrade = requests
        .iter()
        .find(|r| r.path == "/api/v1/namespaces/default/pods/demo/portforward")
        .unwrap_or_else(|| panic!("no portforward request recorded: {requests:?}"));
    assert_eq!(
        upgrade.method, "GET",
        "kubectl fell back to SPDY: {upgrade:?}"
    );
    assert_eq!(
        upgrade.header("sec-websocket-protocol"),
        Some("SPDY/3.1+portforward.k8s.io")
    );
}

// ---------------------------------------------------------------------------------------
// kubectl tests
// ---------------------------------------------------------------------------------------

/// 4 concurrent connections through one `kubectl port-forward`, 20 MiB each way each,
/// checked by SHA-256 on both ends; reports the aggregate throughput.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_port_forward_bulk_four_connections() {
    let sim = Kubesim::start(&[POD_SPEC]);
    let (remote, mut legs) = start_bulk_target().await;
    let mut pf = PortForward::start(&sim, remote).await;
    let started = Instant::now();
    let clients: Vec<_> = (0..CONNECTIONS as u64)
        .map(|i| {
            let addr = pf.local_addr();
            tokio::spawn(async move {
                let sock = TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let (rd, mut wr) = sock.into_split();
                let upload = async {
                    let sha = send_bulk(&mut wr, i, BULK_BYTES).await?;
                    wr.shutdown().await?; // kubectl turns this into DATA FIN.
                    Ok::<_, std::io::Error>(sha)
                };
                let (sent, received) = tokio::join!(upload, recv_bulk(rd));
                let (received, received_sha) =
                    received.map_err(|e| format!("connection {i} read: {e}"))?;
                let sent_sha = sent.map_err(|e| format!("connection {i} write: {e}"))?;
                Ok::<_, String>(Leg {
                    sent_sha,
                    received,
                    received_sha,
                })
            })
        })
        .collect();
    let mut client_legs = Vec::new();
    let mut failures = Vec::new();
    // One deadline for the whole transfer (it normally takes a second or two).
    let deadline = tokio::time::Instant::from_std(started + Duration::from_secs(25));
    for c in clients {
        match tokio::time::timeout_at(deadline, c).await {
            Ok(Ok(Ok(leg))) => client_legs.push(leg),
            Ok(Ok(Err(e))) => failures.push(e),
            Ok(Err(e)) => failures.push(format!("client task: {e}")),
            Err(_) => failures.push("bulk transfer timed out".to_owned()),
        }
    }
    if !failures.is_empty() {
        let _ = pf.child.start_kill();
        let stderr = pf.stderr.await.unwrap_or_default();
        let stdout = pf.stdout.lock().unwrap().clone();
        panic!("{failures:?}\nkubectl stdout:\n{stdout}\nkubectl stderr:\n{stderr}");
    }
    let mut target_legs = Vec::new();
    for _ in 0..CONNECTIONS {
        target_legs.push(
            tokio::time::timeout(Duration::from_secs(10), legs.recv())
                .await
                .expect("target leg")
                .expect("leg"),
        );
    }
    let elapsed = started.elapsed();
    let (stdout, stderr) = pf.stop().await;

    for leg in client_legs.iter().chain(&target_legs) {
        assert_eq!(
            leg.received, BULK_BYTES,
            "short transfer: {leg:?}\nkubectl stderr:\n{stderr}"
        );
    }
    let mut up_sent: Vec<_> = client_legs.iter().map(|l| l.sent_sha.clone()).collect();
    let mut up_received: Vec<_> = target_legs.iter().map(|l| l.received_sha.clone()).collect();
    let mut down_sent: Vec<_> = target_legs.iter().map(|l| l.sent_sha.clone()).collect();
    let mut down_received: Vec<_> = client_legs.iter().map(|l| l.received_sha.clone()).collect();
    for v in [
        &mut up_sent,
        &mut up_received,
        &mut down_sent,
        &mut down_received,
    ] {
        v.sort();
    }
    assert_eq!(up_sent, up_received, "client->pod data corrupted");
    assert_eq!(down_sent, down_received, "pod->client data corrupted");
    let handled = stdout
        .matches(&format!("Handling connection for {}", pf_local(&stdout)))
        .count();
    assert_eq!(handled, CONNECTIONS, "kubectl stdout:\n{stdout}");
    assert!(
        !stderr.contains("error"),
        "kubectl reported errors:\n{stderr}"
    );
    assert_ws_tunnel_used(&sim);

    let mib = (2 * CONNECTIONS * BULK_BYTES) as f64 / (1024.0 * 1024.0);
    eprintln!(
        "port-forward: {mib:.0} MiB over {CONNECTIONS} connections in {:.2}s = {:.1} MiB/s aggregate (both directions)",
        elapsed.as_secs_f64(),
        mib / elapsed.as_secs_f64()
    );
}

/// The local port from kubectl's "Forwarding from 127.0.0.1:PORT -> R" line.
fn pf_local(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("Forwarding from 127.0.0.1:"))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default()
        .to_owned()
}

/// A forward to a port nobody listens on: the error stream carries the dial error,
/// kubectl 1.32 logs "an error occurred forwarding", drops the tunnel and exits 1 with
/// "lost connection to pod".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_port_forward_to_closed_port_fails() {
    let sim = Kubesim::start(&[POD_SPEC]);
    let remote = closed_port();
    let mut pf = PortForward::start(&sim, remote).await;
    let local = pf.local;
    let mut sock = TcpStream::connect(pf.local_addr())
        .await
        .expect("connect to kubectl");
    // kubectl closes the local connection without forwarding anything.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(20), sock.read(&mut buf))
        .await
        .expect("local socket stays open");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "unexpected data from a closed port: {read:?}"
    );
    let status = tokio::time::timeout(Duration::from_secs(20), pf.child.wait())
        .await
        .expect("kubectl keeps running after the forwarding error")
        .expect("wait");
    let stderr = pf.stderr.await.unwrap_or_default();
    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!("an error occurred forwarding {local} -> {remote}")),
        "stderr:\n{stderr}"
    );
    assert!(stderr.contains("connection refused"), "stderr:\n{stderr}");
    assert!(
        stderr.contains("error: lost connection to pod"),
        "stderr:\n{stderr}"
    );
    assert_ws_tunnel_used(&sim);
}

// ---------------------------------------------------------------------------------------
// Legacy v4 channel protocol (kube-rs style client)
// ---------------------------------------------------------------------------------------

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The CA PEM from the kubeconfig's `certificate-authority-data`.
fn kubeconfig_ca(sim: &Kubesim) -> Option<Vec<u8>> {
    let text = std::fs::read_to_string(sim.kubeconfig()).expect("read kubeconfig");
    let b64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority-data:"))?;
    Some(
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .expect("CA base64"),
    )
}

/// Opens the kubesim connection (TLS with the kubeconfig CA when the URL is https).
async fn connect_sim(sim: &Kubesim) -> Box<dyn Io> {
    let url = sim.server_url();
    let hostport = url.split("://").nth(1).expect("server url");
    let tcp = TcpStream::connect(hostport).await.expect("connect kubesim");
    if !url.starts_with("https://") {
        return Box::new(tcp);
    }
    let ca = kubeconfig_ca(sim).expect("https kubeconfig has a CA");
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let config = tokio_rustls::rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name =
        tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    Box::new(tls)
}

/// A WS upgrade request for `.../pods/demo/portforward?{query}` offering `protocols`.
fn portforward_request(sim: &Kubesim, query: &str, protocols: Option<&str>) -> http::Request<()> {
    let ws_url = sim.server_url().replacen("http", "ws", 1);
    let mut req = format!("{ws_url}/api/v1/namespaces/default/pods/demo/portforward?{query}")
        .into_client_request()
        .expect("request");
    if let Some(token) = sim.token() {
        req.headers_mut().insert(
            "Authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    if let Some(p) = protocols {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().expect("header"));
    }
    req
}

/// One TCP echo connection at a time on 127.0.0.1:0.
async fn start_echo_target() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = sock.into_split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    port
}

/// kube-rs style: offer `v4.channel.k8s.io` with `?ports=P`, expect the 3-byte port
/// prefixes on channels 0 and 1, move 1 MiB through an echo server, close with 1000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_v4_channel_port_forward_echo() {
    let sim = Kubesim::start(&[POD_SPEC]);
    let port = start_echo_target().await;
    let req = portforward_request(&sim, &format!("ports={port}"), Some("v4.channel.k8s.io"));
    let (ws, resp) = tokio_tungstenite::client_async(req, connect_sim(&sim).await)
        .await
        .expect("WS upgrade");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("v4.channel.k8s.io")
    );
    let (mut tx, mut rx) = ws.split();

    let [lo, hi] = port.to_le_bytes();
    for ch in [0u8, 1] {
        let msg = tokio::time::timeout(Duration::from_secs(10), rx.next())
            .await
            .expect("port prefix")
            .expect("open")
            .expect("ok");
        assert_eq!(
            msg,
            Message::Binary(vec![ch, lo, hi].into()),
            "port prefix of channel {ch}"
        );
    }

    let mut payload = vec![0u8; 1024 * 1024];
    Prng::new(7).fill(&mut payload);
    let expected = hex(digest(&SHA256, &payload).as_ref());
    let sender = tokio::spawn(async move {
        for chunk in payload.chunks(32 * 1024) {
            let mut m = Vec::with_capacity(1 + chunk.len());
            m.push(0u8);
            m.extend_from_slice(chunk);
            tokio::time::timeout(Duration::from_secs(20), tx.send(Message::Binary(m.into())))
                .await
                .expect("timed out sending")
                .expect("send data");
        }
        tx
    });
    let mut echoed = Vec::new();
    while echoed.len() < 1024 * 1024 {
        let msg = tokio::time::timeout(Duration::from_secs(20), rx.next())
            .await
            .expect("echo data")
            .expect("open")
            .expect("ok");
        match msg {
            Message::Binary(b) if b.first() == Some(&0) => echoed.extend_from_slice(&b[1..]),
            Message::Binary(b) if b.first() == Some(&1) => {
                panic!("error channel: {}", String::from_utf8_lossy(&b[1..]))
            }
            other => panic!("unexpected message {other:?}"),
        }
    }
    assert_eq!(echoed.len(), 1024 * 1024);
    assert_eq!(
        hex(digest(&SHA256, &echoed).as_ref()),
        expected,
        "echoed data differs"
    );

    let mut tx = sender.await.expect("sender");
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    tx.send(Message::Close(Some(bye)))
        .await
        .expect("send close");
    let mut seen = Vec::new();
    let close = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = rx.next().await {
            match msg {
                Ok(Message::Close(frame)) => return frame,
                other => seen.push(format!("{other:?}")),
            }
        }
        None
    })
    .await
    .expect("server Close");
    assert_eq!(
        close.map(|f| f.code),
        Some(CloseCode::Normal),
        "before the Close: {seen:?}"
    );
}

/// The legacy protocol's refusals reach the client as non-101 answers: no ports -> 400,
/// an unsupported subprotocol -> 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_port_forward_refusals() {
    let sim = Kubesim::start(&[POD_SPEC]);
    for (query, protocol, status) in [
        ("", "v4.channel.k8s.io", 400),
        ("ports=80", "v5.channel.k8s.io", 403),
    ] {
        let req = portforward_request(&sim, query, Some(protocol));
        match tokio_tungstenite::client_async(req, connect_sim(&sim).await).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), status, "{query:?} {protocol}")
            }
            other => panic!(
                "{query:?} {protocol}: expected HTTP {status}, got {:?}",
                other.map(|(_, r)| r.status())
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// In-process sessions: scripted clients straight against `portforward::serve`
// ---------------------------------------------------------------------------------------

mod scripted {
    use super::*;
    use futures_util::stream::{SplitSink, SplitStream};
    use kubesim::portforward::{self, negotiate};
    use kubesim::spdy::{Decoder, Encoder, FLAG_FIN, Frame, Headers, rst_status};
    use tokio::io::DuplexStream;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    type Ws = WebSocketStream<DuplexStream>;

    /// A client WebSocket connected to a `serve` session for `offered` + `query`.
    async fn session(offered: &[&str], query: Option<&str>) -> Ws {
        let negotiated = negotiate(offered, query).expect("negotiate");
        let (client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let ws = WebSocketStream::from_raw_socket(server, Role::Server, None).await;
            portforward::serve(ws, negotiated).await;
        });
        WebSocketStream::from_raw_socket(client, Role::Client, None).await
    }

    /// A SPDY/3 client over the tunnel: one deflater and one inflater for the session.
    pub(super) struct SpdyClient {
        tx: SplitSink<Ws, Message>,
        rx: SplitStream<Ws>,
        enc: Encoder,
        dec: Decoder,
    }

    impl SpdyClient {
        pub(super) async fn connect() -> Self {
            let (tx, rx) = session(&["SPDY/3.1+portforward.k8s.io"], None)
                .await
                .split();
            Self {
                tx,
                rx,
                enc: Encoder::new(),
                dec: Decoder::new(),
            }
        }

        /// Sends `frames` packed into ONE WebSocket message.
        pub(super) async fn send(&mut self, frames: &[Frame]) {
            let mut wire = Vec::new();
            for f in frames {
                self.enc.encode(f, &mut wire).expect("encode");
            }
            self.send_message(wire).await;
        }

        /// One binary message; panics after 10 s (a session that stopped reading).
        async fn send_message(&mut self, bytes: Vec<u8>) {
            tokio::time::timeout(
                Duration::from_secs(10),
                self.tx.send(Message::Binary(bytes.into())),
            )
            .await
            .expect("timed out sending: the session stopped reading")
            .expect("send");
        }

        /// Sends `frames` split into WebSocket messages of `chunk` bytes.
        pub(super) async fn send_split(&mut self, frames: &[Frame], chunk: usize) {
            let mut wire = Vec::new();
            for f in frames {
                self.enc.encode(f, &mut wire).expect("encode");
            }
            for piece in wire.chunks(chunk) {
                self.send_message(piece.to_vec()).await;
            }
        }

        /// The next frame from the server (10 s timeout); `Err` carries a Close instead.
        pub(super) async fn next(&mut self) -> Result<Frame, Option<CloseFrame>> {
            loop {
                if let Some(frame) = self
                    .dec
                    .next_frame()
                    .expect("server sent a malformed frame")
                {
                    return Ok(frame);
                }
                let msg = tokio::time::timeout(Duration::from_secs(10), self.rx.next())
                    .await
                    .expect("timed out waiting for the server");
                match msg {
                    Some(Ok(Message::Binary(b))) => self.dec.push(&b),
                    Some(Ok(Message::Close(frame))) => return Err(frame),
                    Some(Ok(other)) => panic!("unexpected message {other:?}"),
                    Some(Err(e)) => panic!("WebSocket error {e}"),
                    None => return Err(None),
                }
            }
        }

        pub(super) async fn frame(&mut self) -> Frame {
            self.next().await.expect("server closed the session")
        }

        /// Collects DATA on `stream_id` until its FIN; any other frame in between fails.
        pub(super) async fn read_stream(&mut self, stream_id: u32) -> Vec<u8> {
            let mut out = Vec::new();
            loop {
                match self.frame().await {
                    Frame::Data {
                        stream_id: id,
                        flags,
                        data,
                    } if id == stream_id => {
                        out.extend_from_slice(&data);
                        if flags & FLAG_FIN != 0 {
                            return out;
                        }
                    }
                    other => panic!("expected DATA on {stream_id}, got {other:?}"),
                }
            }
        }
    }

    pub(super) fn syn(stream_id: u32, kind: &str, port: u16, request_id: u32) -> Frame {
        let mut headers = Headers::new();
        headers.push("streamtype", kind);
        headers.push("port", port.to_string());
        headers.push("requestid", request_id.to_string());
        Frame::SynStream {
            stream_id,
            assoc_stream_id: 0,
            priority: 0,
            slot: 0,
            flags: 0,
            headers,
        }
    }

    pub(super) fn data(stream_id: u32, fin: bool, bytes: &[u8]) -> Frame {
        Frame::Data {
            stream_id,
            flags: if fin { FLAG_FIN } else { 0 },
            data: Bytes::copy_from_slice(bytes),
        }
    }

    fn reply(stream_id: u32) -> Frame {
        Frame::SynReply {
            stream_id,
            flags: 0,
            headers: Headers::new(),
        }
    }

    /// An echo target that reports on `ended` when a connection's target side closed.
    async fn echo_with_end_signal() -> (u16, mpsc::UnboundedReceiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let (mut rd, mut wr) = sock.into_split();
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                    let _ = tx.send(());
                });
            }
        });
        (port, rx)
    }

    use bytes::Bytes;

    /// PING echo, refused streams, dial errors, packed and split frames, data before the
    /// pair is complete, client RST, and GOAWAY ending the session with Close 1000.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spdy_scripted_session_protocol_corners() {
        let (echo, mut ended) = echo_with_end_signal().await;
        let closed = closed_port();
        let mut c = SpdyClient::connect().await;

        // PING with a client (odd) id is echoed; a server-parity id is not.
        c.send(&[Frame::Ping { id: 2 }, Frame::Ping { id: 1 }])
            .await;
        assert_eq!(c.frame().await, Frame::Ping { id: 1 });

        // A stream without a valid streamtype is refused before any reply.
        let mut bad = syn(1, "stdin", echo, 9);
        if let Frame::SynStream { headers, .. } = &mut bad {
            headers.0.retain(|(n, _)| n != "requestid");
        }
        c.send(&[bad]).await;
        assert_eq!(
            c.frame().await,
            Frame::RstStream {
                stream_id: 1,
                status: rst_status::REFUSED_STREAM
            }
        );

        // Dial error, pair packed in one message: replies, error text, FIN error, FIN data.
        c.send(&[
            syn(3, "error", closed, 0),
            data(3, true, b""),
            syn(5, "data", closed, 0),
        ])
        .await;
        assert_eq!(c.frame().await, reply(3));
        assert_eq!(c.frame().await, reply(5));
        let text = String::from_utf8(c.read_stream(3).await).expect("utf8");
        assert!(
            text.contains(&format!("127.0.0.1:{closed}")) && text.contains("connection refused"),
            "{text}"
        );
        assert_eq!(c.read_stream(5).await, b"");

        // Echo, with the SYN_STREAMs split into 3-byte messages.
        c.send_split(
            &[
                syn(7, "error", echo, 1),
                data(7, true, b""),
                syn(9, "data", echo, 1),
            ],
            3,
        )
        .await;
        assert_eq!(c.frame().await, reply(7));
        assert_eq!(c.frame().await, reply(9));
        c.send_split(&[data(9, false, b"hello "), data(9, true, b"world")], 5)
            .await;
        assert_eq!(c.read_stream(9).await, b"hello world");
        assert_eq!(c.read_stream(7).await, b"");
        tokio::time::timeout(Duration::from_secs(5), ended.recv())
            .await
            .expect("target closed")
            .expect("signal");

        // Data stream first, with data, before its error stream completes the pair.
        c.send(&[syn(11, "data", echo, 2), data(11, false, b"early ")])
            .await;
        assert_eq!(c.frame().await, reply(11));
        c.send(&[syn(13, "error", echo, 2), data(11, true, b"bird")])
            .await;
        assert_eq!(c.frame().await, reply(13));
        assert_eq!(c.read_stream(11).await, b"early bird");
        assert_eq!(c.read_stream(13).await, b"");
        tokio::time::timeout(Duration::from_secs(5), ended.recv())
            .await
            .expect("target closed")
            .expect("signal");

        // A client RST on the data stream closes the target connection.
        c.send(&[
            syn(15, "error", echo, 3),
            syn(17, "data", echo, 3),
            data(17, false, b"x"),
        ])
        .await;
        assert_eq!(c.frame().await, reply(15));
        assert_eq!(c.frame().await, reply(17));
        assert_eq!(c.frame().await, data(17, false, b"x"));
        c.send(&[Frame::RstStream {
            stream_id: 17,
            status: rst_status::CANCEL,
        }])
        .await;
        tokio::time::timeout(Duration::from_secs(5), ended.recv())
            .await
            .expect("RST closes the target")
            .expect("signal");

        // Stream ids must increase.
        c.send(&[syn(5, "error", echo, 4)]).await;
        assert_eq!(
            c.frame().await,
            Frame::RstStream {
                stream_id: 5,
                status: rst_status::PROTOCOL_ERROR
            }
        );

        // GOAWAY ends the session with a normal Close.
        c.send(&[Frame::GoAway {
            last_good_stream_id: 0,
            status: 0,
        }])
        .await;
        loop {
            match c.next().await {
                Ok(Frame::Data {
                    stream_id: 15,
                    flags,
                    ..
                }) if flags & FLAG_FIN != 0 => continue,
                Ok(other) => panic!("unexpected frame after GOAWAY: {other:?}"),
                Err(close) => {
                    assert_eq!(close.map(|f| f.code), Some(CloseCode::Normal));
                    break;
                }
            }
        }
    }

    /// A target that does not read must not hold up other connections: 8 MiB queued for
    /// a stalled target (more than the kernel buffers) while an echo on a second
    /// connection still answers; afterwards the stalled target gets every byte.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spdy_slow_connection_does_not_stall_others() {
        const STALLED_BYTES: usize = 8 * 1024 * 1024;
        let (echo, _ended) = echo_with_end_signal().await;
        let stall = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stall_port = stall.local_addr().expect("addr").port();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let stalled = tokio::spawn(async move {
            let (sock, _) = stall.accept().await.expect("accept");
            let _ = release_rx.await;
            recv_bulk(sock).await.expect("stalled target read")
        });

        let mut c = SpdyClient::connect().await;
        c.send(&[
            syn(1, "error", stall_port, 0),
            data(1, true, b""),
            syn(3, "data", stall_port, 0),
        ])
        .await;
        assert_eq!(c.frame().await, reply(1));
        assert_eq!(c.frame().await, reply(3));
        let mut payload = vec![0u8; STALLED_BYTES];
        Prng::new(99).fill(&mut payload);
        let expected = hex(digest(&SHA256, &payload).as_ref());
        for chunk in payload.chunks(256 * 1024) {
            c.send(&[data(3, false, chunk)]).await;
        }
        c.send(&[data(3, true, b"")]).await;

        let started = Instant::now();
        c.send(&[
            syn(5, "error", echo, 1),
            data(5, true, b""),
            syn(7, "data", echo, 1),
            data(7, true, b"ping"),
        ])
        .await;
        assert_eq!(c.frame().await, reply(5));
        assert_eq!(c.frame().await, reply(7));
        assert_eq!(c.read_stream(7).await, b"ping");
        assert_eq!(c.read_stream(5).await, b"");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "echo took {:?}",
            started.elapsed()
        );

        release_tx.send(()).expect("release");
        let (n, sha) = tokio::time::timeout(Duration::from_secs(20), stalled)
            .await
            .expect("stalled target")
            .expect("join");
        assert_eq!(n, STALLED_BYTES);
        assert_eq!(sha, expected);
    }

    /// Legacy base64 variant: text frames `'0'+ch` + base64, port prefixes, data, and a
    /// Close 1000 once the only target connection has ended; a dial error goes to the
    /// error channel before the Close.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn legacy_base64_and_server_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.expect("accept");
            sock.write_all(b"hello").await.expect("write");
        });
        let b64 = base64::engine::general_purpose::STANDARD;
        let (mut tx, mut rx) = session(
            &["v4.base64.channel.k8s.io"],
            Some(&format!("ports={port}")),
        )
        .await
        .split();
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(10), rx.next())
                .await
                .expect("message")
                .expect("open")
                .expect("ok")
        };
        for ch in ['0', '1'] {
            assert_eq!(
                next().await,
                Message::Text(format!("{ch}{}", b64.encode(port.to_le_bytes())).into())
            );
        }
        assert_eq!(
            next().await,
            Message::Text(format!("0{}", b64.encode(b"hello")).into())
        );
        match next().await {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
            other => panic!("expected Close 1000, got {other:?}"),
        }
        let _ = tx.close().await;

        let closed = closed_port();
        let (_tx, mut rx) = session(&["v4.channel.k8s.io"], Some(&format!("ports={closed}")))
            .await
            .split();
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(10), rx.next())
                .await
                .expect("message")
                .expect("open")
                .expect("ok")
        };
        let [lo, hi] = closed.to_le_bytes();
        assert_eq!(next().await, Message::Binary(vec![0, lo, hi].into()));
        assert_eq!(next().await, Message::Binary(vec![1, lo, hi].into()));
        match next().await {
            Message::Binary(b) if b.first() == Some(&1) => {
                let text = String::from_utf8_lossy(&b[1..]).into_owned();
                assert!(text.contains("connection refused"), "{text}");
            }
            other => panic!("expected an error-channel message, got {other:?}"),
        }
        match next().await {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
            other => panic!("expected Close 1000, got {other:?}"),
        }
    }
}
