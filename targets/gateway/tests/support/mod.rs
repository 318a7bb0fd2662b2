//! Test support: a scripted control plane that speaks the compat protocol (register, heartbeat,
//! `tcp_tunnel_start` / `tcp_tunnel_data` / `tcp_tunnel_close`) and forwards local TCP listeners
//! through the gateway, the way `tether-control-plane serve --forward` is specified to; local echo
//! and sink services; the gateway process.

#![allow(dead_code, unreachable_pub, clippy::result_large_err)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

pub const TOKEN: &str = "edge-token";

/// FNV-1a 64: a checksum for the byte streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fnv(pub u64, pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325, 0)
    }
}

impl Fnv {
    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self.1 += bytes.len() as u64;
    }
}

/// Deterministic test bytes.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn checksum(bytes: &[u8]) -> Fnv {
    let mut f = Fnv::default();
    f.update(bytes);
    f
}

/// A TCP echo service.
pub async fn echo_service() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

/// A TCP sink: reports the checksum of everything each connection sent, at its EOF.
pub async fn sink_service() -> (SocketAddr, mpsc::UnboundedReceiver<Fnv>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut sum = Fnv::default();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => sum.update(&buf[..n]),
                    }
                }
                let _ = tx.send(sum);
            });
        }
    });
    (addr, rx)
}

type WsSink =
    futures_util::stream::SplitSink<tokio_tungstenite::WebSocketStream<TcpStream>, Message>;

/// Bytes (or EOF) toward each forwarded client, by tunnel id.
type Tunnels = HashMap<String, mpsc::UnboundedSender<Option<Vec<u8>>>>;

/// What the scripted control plane saw.
#[derive(Default)]
pub struct Seen {
    pub registers: AtomicUsize,
    pub closes: std::sync::Mutex<Vec<Value>>,
}

/// A scripted control plane: accepts one gateway at a time on `addr`, forwards local listeners.
pub struct ControlPlane {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    accept: JoinHandle<()>,
    /// The live session's tasks, aborted on `stop`.
    sessions: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Sends a tunnel request to the live session.
    open_tx: Arc<Mutex<Option<mpsc::UnboundedSender<OpenTunnel>>>>,
    next_id: Arc<AtomicUsize>,
}

struct OpenTunnel {
    id: String,
    host: String,
    port: u16,
    to_client: mpsc::UnboundedSender<Option<Vec<u8>>>,
    from_client: mpsc::UnboundedReceiver<Option<Vec<u8>>>,
}

impl ControlPlane {
    /// Listens on `addr` (port 0: any).
    pub async fn start(addr: &str, seen: Arc<Seen>) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sessions: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let open_tx: Arc<Mutex<Option<mpsc::UnboundedSender<OpenTunnel>>>> = Arc::default();
        let accept = {
            let sessions = sessions.clone();
            let open_tx = open_tx.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let check =
                        |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                            let auth = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default();
                            if req.uri().path() != "/api/v1/clusters/agent/ws"
                                || auth != format!("Bearer {TOKEN}")
                            {
                                let mut e = ErrorResponse::new(None);
                                *e.status_mut() =
                                    tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
                                return Err(e);
                            }
                            Ok(resp)
                        };
                    let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
                        continue;
                    };
                    let (tx, rx) = mpsc::unbounded_channel();
                    *open_tx.lock().await = Some(tx);
                    let task = tokio::spawn(session(ws, rx, seen.clone()));
                    sessions.lock().await.push(task);
                }
            })
        };
        Self {
            addr,
            seen,
            accept,
            sessions,
            open_tx,
            next_id: Arc::new(AtomicUsize::new(1)),
        }
    }

    /// The URL a gateway dials.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops listening and drops every session (a control-plane restart).
    pub async fn stop(self) {
        self.accept.abort();
        for s in self.sessions.lock().await.drain(..) {
            s.abort();
        }
        let _ = self.accept.await;
    }

    /// Waits until a gateway has registered `n` times in all.
    pub async fn wait_registers(&self, n: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.seen.registers.load(Ordering::SeqCst) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway registered {} times, expected {n}",
                self.seen.registers.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `--forward`: a local listener whose connections become tunnels to `host:port` through the
    /// gateway. Returns the listener's address.
    pub async fn forward(&self, host: &str, port: u16) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open_tx = self.open_tx.clone();
        let next_id = self.next_id.clone();
        let host = host.to_owned();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let id = format!("tun-{}", next_id.fetch_add(1, Ordering::SeqCst));
                let (to_client, mut client_rx) = mpsc::unbounded_channel::<Option<Vec<u8>>>();
                let (client_tx, from_client) = mpsc::unbounded_channel::<Option<Vec<u8>>>();
                let Some(open) = open_tx.lock().await.clone() else {
                    continue;
                };
                let _ = open.send(OpenTunnel {
                    id,
                    host: host.clone(),
                    port,
                    to_client,
                    from_client,
                });
                let (mut r, mut w) = client.into_split();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    loop {
                        match r.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                let _ = client_tx.send(None);
                                return;
                            }
                            Ok(n) => {
                                if client_tx.send(Some(buf[..n].to_vec())).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
                tokio::spawn(async move {
                    while let Some(Some(bytes)) = client_rx.recv().await {
                        if w.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }
}

fn envelope(kind: &str, request_id: &str, payload: Value) -> Message {
    let v = json!({
        "type": kind,
        "request_id": request_id,
        "payload": payload,
        "timestamp": "2026-11-26T15:00:00Z",
    });
    Message::Text(v.to_string().into())
}

async fn session(
    ws: tokio_tungstenite::WebSocketStream<TcpStream>,
    mut opens: mpsc::UnboundedReceiver<OpenTunnel>,
    seen: Arc<Seen>,
) {
    let (sink, mut stream) = ws.split();
    let sink: Arc<Mutex<WsSink>> = Arc::new(Mutex::new(sink));
    let tunnels: Arc<Mutex<Tunnels>> = Arc::default();
    let mut pumps: Vec<JoinHandle<()>> = Vec::new();
    let (done_tx, mut done_rx) = oneshot::channel::<()>();
    let mut done_tx = Some(done_tx);
    loop {
        tokio::select! {
            open = opens.recv() => {
                let Some(open) = open else { continue };
                tunnels.lock().await.insert(open.id.clone(), open.to_client.clone());
                let start = envelope("tcp_tunnel_start", &open.id, json!({
                    "tunnel_id": open.id,
                    "service_name": open.host,
                    "service_port": open.port,
                    "client_addr": "127.0.0.1:1",
                }));
                if sink.lock().await.send(start).await.is_err() { break }
                let sink = sink.clone();
                let mut from_client = open.from_client;
                let id = open.id.clone();
                pumps.push(tokio::spawn(async move {
                    while let Some(chunk) = from_client.recv().await {
                        let msg = match chunk {
                            Some(bytes) => envelope("tcp_tunnel_data", &id, json!({
                                "tunnel_id": id, "data": STANDARD.encode(bytes),
                            })),
                            None => envelope("tcp_tunnel_close", &id, json!({
                                "tunnel_id": id, "reason": "client_closed",
                            })),
                        };
                        if sink.lock().await.send(msg).await.is_err() { return }
                    }
                }));
            }
            msg = stream.next() => {
                let Some(Ok(msg)) = msg else { break };
                let text = match msg {
                    Message::Text(t) => t.to_string(),
                    Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
                    _ => continue,
                };
                let v: Value = serde_json::from_str(&text).expect("gateway sent bad JSON");
                let kind = v["type"].as_str().unwrap_or_default().to_owned();
                let rid = v["request_id"].as_str().unwrap_or_default().to_owned();
                match kind.as_str() {
                    "register" => {
                        seen.registers.fetch_add(1, Ordering::SeqCst);
                        let ok = envelope("register_success", &rid, json!({"cluster_id": "edge-1"}));
                        if sink.lock().await.send(ok).await.is_err() { break }
                    }
                    "heartbeat" => {
                        let ack = envelope("heartbeat_ack", "", json!({}));
                        if sink.lock().await.send(ack).await.is_err() { break }
                    }
                    "tcp_tunnel_data" => {
                        let data = STANDARD.decode(v["payload"]["data"].as_str().unwrap()).unwrap();
                        if let Some(c) = tunnels.lock().await.get(&rid) {
                            let _ = c.send(Some(data));
                        }
                    }
                    "tcp_tunnel_close" => {
                        seen.closes.lock().unwrap().push(v.clone());
                        if let Some(c) = tunnels.lock().await.remove(&rid) {
                            let _ = c.send(None);
                        }
                    }
                    _ => {}
                }
            }
            _ = &mut done_rx => break,
        }
    }
    drop(done_tx.take());
    for p in pumps {
        p.abort();
    }
}

/// The gateway process (killed on drop).
pub struct GatewayProc {
    pub child: tokio::process::Child,
}

impl GatewayProc {
    pub fn start(control_plane: &str) -> Self {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
            .args([
                "--control-plane",
                control_plane,
                "--token",
                TOKEN,
                "--backoff-base-ms",
                "100",
                "--backoff-cap-ms",
                "400",
            ])
            .env(
                "TETHER_LOG",
                std::env::var("TETHER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start tether-gateway");
        Self { child }
    }
}

/// Sends `data` through `addr` and reads back `expect_back` bytes (echo), concurrently.
pub async fn round_trip(addr: SocketAddr, data: &[u8], expect_back: usize) -> Vec<u8> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(48 * 1024) {
            w.write_all(chunk).await.unwrap();
        }
        w
    });
    let mut back = Vec::with_capacity(expect_back);
    let mut buf = vec![0u8; 64 * 1024];
    while back.len() < expect_back {
        let n = r.read(&mut buf).await.unwrap();
        assert!(n > 0, "EOF after {} of {expect_back} bytes", back.len());
        back.extend_from_slice(&buf[..n]);
    }
    drop(writer.await.unwrap());
    back
}
