//! Test support: TLS material, kubesim in-process, a scripted control plane speaking the compat
//! JSON envelopes, and the real `tether-agent` binary as a child process.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

pub const AGENT_TOKEN: &str = "agent-token-for-tests";
pub const KUBE_TOKEN: &str = "kube-token-for-tests";

/// A CA and a server certificate for 127.0.0.1/localhost, as PEM.
pub struct Tls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn make_tls() -> Tls {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tether test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    Tls {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A temp dir with the files the agent reads.
pub struct Files {
    pub dir: tempfile::TempDir,
}

impl Files {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

/// kubesim over TLS with a token and pod default/demo.
pub async fn kubesim(tls: &Tls) -> kubesim::Handle {
    let config = kubesim::Config::new("127.0.0.1:0".parse().unwrap())
        .pod("default/demo")
        .unwrap()
        .token(KUBE_TOKEN)
        .tls(kubesim::TlsPem {
            cert_chain: tls.cert_pem.clone().into_bytes(),
            private_key: tls.key_pem.clone().into_bytes(),
        });
    kubesim::Server::start(config).await.unwrap()
}

pub type CpSocket = WebSocketStream<tokio_rustls::server::TlsStream<TcpStream>>;

/// A scripted control plane: TLS listener; each `accept` takes one agent connection.
pub struct ControlPlane {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    pub addr: SocketAddr,
}

impl ControlPlane {
    pub async fn start(tls: &Tls) -> Self {
        let certs = rustls_pemfile_certs(&tls.cert_pem);
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(pem_body(&tls.key_pem, "PRIVATE KEY")),
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        Self {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            addr,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// `true` when a TCP connection arrives within `within`.
    pub async fn connects_within(&self, within: Duration) -> bool {
        tokio::time::timeout(within, self.listener.accept())
            .await
            .is_ok()
    }

    /// Accepts one TCP+TLS connection and answers its upgrade with `status` (101 = accept).
    /// Returns the request path and Authorization header seen, and the socket when accepted.
    pub async fn accept_with(
        &self,
        status: u16,
        within: Duration,
    ) -> (String, Option<String>, Option<CpSocket>) {
        let (tcp, _) = tokio::time::timeout(within, self.listener.accept())
            .await
            .expect("the agent did not connect in time")
            .unwrap();
        let tls = self.acceptor.accept(tcp).await.unwrap();
        let seen = Arc::new(Mutex::new((String::new(), None::<String>)));
        let seen2 = seen.clone();
        #[allow(clippy::result_large_err)] // the signature tungstenite requires
        let callback = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            *seen2.lock().unwrap() = (req.uri().path().to_string(), auth);
            if status == 101 {
                Ok(resp)
            } else {
                let mut e = ErrorResponse::new(Some("denied".to_string()));
                *e.status_mut() =
                    tokio_tungstenite::tungstenite::http::StatusCode::from_u16(status).unwrap();
                Err(e)
            }
        };
        let ws = tokio_tungstenite::accept_hdr_async(tls, callback)
            .await
            .ok();
        let (path, auth) = seen.lock().unwrap().clone();
        (path, auth, ws)
    }

    /// Accepts an agent, checks its path and token, reads `register` and answers
    /// `register_success` with every Tether extension.
    pub async fn accept_registered(&self) -> Agentside {
        let (path, auth, ws) = self.accept_with(101, Duration::from_secs(20)).await;
        assert_eq!(path, "/api/v1/clusters/agent/ws");
        assert_eq!(auth.as_deref(), Some(&*format!("Bearer {AGENT_TOKEN}")));
        let mut a = Agentside { ws: ws.unwrap() };
        let register = a.recv().await;
        assert_eq!(register["type"], "register", "{register}");
        assert!(register["request_id"].as_str().unwrap().starts_with("req_"));
        a.send(json!({
            "type": "register_success",
            "request_id": register["request_id"],
            "payload": {
                "cluster_id": "cluster-1",
                "extensions": {"websocket_started": true, "websocket_close_code": true, "proxy_error_status": true}
            },
            "timestamp": "2026-11-26T10:00:00Z"
        }))
        .await;
        a
    }
}

fn pem_body(pem: &str, label: &str) -> Vec<u8> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin).unwrap() + begin.len();
    let stop = pem.find(&end).unwrap();
    let b64: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    vec![rustls::pki_types::CertificateDer::from(pem_body(
        pem,
        "CERTIFICATE",
    ))]
}

/// The control plane's end of one agent connection.
pub struct Agentside {
    pub ws: CpSocket,
}

impl Agentside {
    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    /// The next JSON envelope (pings and pongs skipped), within 20 s.
    pub async fn recv(&mut self) -> Value {
        self.try_recv(Duration::from_secs(20))
            .await
            .expect("no message from the agent in time")
    }

    /// The next JSON envelope within `within`, or `None`.
    pub async fn try_recv(&mut self, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match msg {
                Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Binary(b))) => return Some(serde_json::from_slice(&b).unwrap()),
                Some(Ok(_)) => continue,
                other => panic!("tunnel ended: {other:?}"),
            }
        }
    }

    /// The next envelope that is not a heartbeat.
    pub async fn recv_skip_heartbeat(&mut self) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] != "heartbeat" {
                return v;
            }
        }
    }
}

/// base64 of `[opcode][payload]`.
pub fn frame(opcode: u8, payload: &[u8]) -> String {
    let mut raw = vec![opcode];
    raw.extend_from_slice(payload);
    base64::engine::general_purpose::STANDARD.encode(raw)
}

pub fn unbase64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("base64 string"))
        .unwrap()
}

/// The agent binary as a child process; stderr lines are collected. Killed on drop.
pub struct AgentProcess {
    child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl AgentProcess {
    pub fn spawn(args: &[String]) -> Self {
        Self::spawn_with_log(args, "info")
    }

    /// With `TETHER_LOG` set to `filter`.
    pub fn spawn_with_log(args: &[String], filter: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tether-agent"))
            .args(args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("TETHER_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, lines }
    }

    pub fn logs(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard agent arguments: control plane with its CA, kubesim by URL with token and CA files.
pub fn agent_args(
    cp_url: &str,
    cp_ca: &Path,
    kube: SocketAddr,
    kube_token: &Path,
    kube_ca: &Path,
) -> Vec<String> {
    [
        "--control-plane",
        cp_url,
        "--token",
        AGENT_TOKEN,
        "--ca-file",
        cp_ca.to_str().unwrap(),
        "--kube-url",
        &format!("https://{kube}"),
        "--kube-token-file",
        kube_token.to_str().unwrap(),
        "--kube-ca-file",
        kube_ca.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A plain-HTTP stand-in for the Kubernetes API that shows what the agent sent:
/// `/api/echo` answers 200 with JSON `{method, path, query, headers: [[name, value]], body}`
/// (body as a string), `/api/hang` never answers (and counts how many such requests are live:
/// a dropped connection ends one).
pub struct EchoApi {
    pub addr: SocketAddr,
    pub hanging: Arc<std::sync::atomic::AtomicUsize>,
}

impl EchoApi {
    pub async fn start() -> Self {
        use http_body_util::BodyExt as _;
        use std::sync::atomic::{AtomicUsize, Ordering};

        struct Live(Arc<AtomicUsize>);
        impl Drop for Live {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hanging = Arc::new(AtomicUsize::new(0));
        let counter = hanging.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let counter = counter.clone();
                            async move {
                                if req.uri().path() == "/api/hang" {
                                    counter.fetch_add(1, Ordering::SeqCst);
                                    let _live = Live(counter);
                                    tokio::time::sleep(Duration::from_secs(3600)).await;
                                }
                                let method = req.method().to_string();
                                let path = req.uri().path().to_string();
                                let query = req.uri().query().map(str::to_string);
                                let headers: Vec<(String, String)> = req
                                    .headers()
                                    .iter()
                                    .map(|(n, v)| {
                                        (n.to_string(), v.to_str().unwrap_or("").to_string())
                                    })
                                    .collect();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let v = json!({
                                    "method": method, "path": path, "query": query,
                                    "headers": headers,
                                    "body": String::from_utf8_lossy(&body),
                                });
                                let resp = hyper::Response::builder()
                                    .status(200)
                                    .header("Content-Type", "application/json")
                                    .header("Connection", "close")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(
                                        v.to_string(),
                                    )))
                                    .unwrap();
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self { addr, hanging }
    }
}
