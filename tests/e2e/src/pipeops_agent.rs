//! A scripted agent that behaves as the incumbent PipeOps agent does (`pipeops-wire.md` §3, §4):
//! it registers with the PipeOps fields and its `k8s_service_token`, offers none of Tether's
//! extensions, and for a `proxy_request` sends the request to the Kubernetes API with the headers
//! it was given, adding no credential of its own (its HTTP transport has no default token). It
//! answers with one buffered `proxy_response`. `proxy_websocket_start`s are only recorded.
//!
//! So a request through it succeeds against a token-checking API server only when the control
//! plane injected `Authorization: Bearer <k8s_service_token>`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::https;
use crate::tls::client_config;

/// What the control plane sent the agent, in order.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `proxy_request` or `proxy_websocket_start`.
    pub kind: String,
    /// The payload as received.
    pub payload: Value,
}

impl Seen {
    /// The values of header `name` in the payload (names compared exactly, as the Go agent
    /// does).
    pub fn header(&self, name: &str) -> Vec<String> {
        match &self.payload["headers"][name] {
            Value::Array(values) => values
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Value::String(v) => vec![v.clone()],
            _ => Vec::new(),
        }
    }
}

/// Where the scripted agent connects and what it talks to.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port` of the control plane (TLS, trusted through `control_plane_ca`).
    pub control_plane: std::net::SocketAddr,
    /// The control plane's CA (PEM).
    pub control_plane_ca: String,
    /// The agent token naming the cluster.
    pub agent_token: String,
    /// The token sent at registration as `k8s_service_token`.
    pub service_token: String,
    /// The Kubernetes API (`https://host:port`) and its CA.
    pub kube_url: String,
    /// The API's CA (PEM).
    pub kube_ca: String,
}

/// A running scripted PipeOps agent; stops when dropped.
pub struct PipeOpsAgent {
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PipeOpsAgent {
    /// Connects, registers and waits for `register_success`, then serves in the background.
    pub async fn start(target: Target) -> Self {
        let url = format!("wss://{}/api/v1/clusters/agent/ws", target.control_plane);
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert(
            "Authorization",
            format!("Bearer {}", target.agent_token).parse().unwrap(),
        );
        let tcp = TcpStream::connect(target.control_plane).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(client_config(&target.control_plane_ca));
        let name = rustls_name(target.control_plane.ip());
        let tls = connector
            .connect(name, tcp)
            .await
            .expect("TLS to the control plane");
        let (mut ws, _) = tokio_tungstenite::client_async(request, tls)
            .await
            .expect("the scripted PipeOps agent connects");
        let register = json!({
            "type": "register",
            "request_id": "req_1700000000000000000_pipeops-1",
            "payload": {
                "agent_id": "pipeops-1",
                "name": "legacy",
                "k8s_version": "v1.32.4",
                "hostname": "node-1",
                "agent_version": "1.9.0",
                "tunnel_port_config": {"kubernetes_api": 6443, "kubelet": 10250, "agent_http": 8080},
                "features": {"supports_streaming": true, "supports_websocket_proxy": true, "supports_response_streaming": true},
                "metadata": {"agent_mode": "vm-agent", "registration_mode": "fresh"},
                "k8s_service_token": target.service_token,
            },
            "timestamp": "2026-12-07T10:00:00Z"
        });
        ws.send(Message::text(register.to_string())).await.unwrap();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .expect("register_success in time")
                .expect("tunnel open")
                .expect("tunnel read");
            if let Message::Text(text) = msg {
                let v: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["type"], "register_success", "{v}");
                assert!(
                    v["payload"]["extensions"]["raw_upgrade"] == true,
                    "the control plane offers its extensions: {v}"
                );
                break;
            }
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                let kind = v["type"].as_str().unwrap_or_default().to_string();
                let id = v["request_id"].clone();
                match kind.as_str() {
                    "ping" => {
                        let pong = json!({"type": "pong", "request_id": id, "payload": {}});
                        let _ = ws.send(Message::text(pong.to_string())).await;
                    }
                    "proxy_request" | "proxy_websocket_start" => {
                        let item = Seen {
                            kind: kind.clone(),
                            payload: v["payload"].clone(),
                        };
                        log.lock().unwrap().push(item.clone());
                        let mut reply = if kind == "proxy_request" {
                            forward(&target, &item).await
                        } else {
                            json!({"type": "proxy_error", "request_id": id, "payload": {"request_id": id, "error": "streams are not scripted"}})
                        };
                        reply["request_id"] = id;
                        let _ = ws.send(Message::text(reply.to_string())).await;
                    }
                    _ => {}
                }
            }
        });
        Self { seen, task }
    }

    /// Everything received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for PipeOpsAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn rustls_name(ip: std::net::IpAddr) -> tokio_rustls::rustls::pki_types::ServerName<'static> {
    tokio_rustls::rustls::pki_types::ServerName::IpAddress(ip.into())
}

/// Sends a `GET` to the API with the `Authorization` the control plane gave (none when it gave
/// none) and returns the buffered `proxy_response`; other methods get 501.
async fn forward(target: &Target, item: &Seen) -> Value {
    let p = &item.payload;
    if p["method"] != "GET" {
        return json!({"type": "proxy_response", "payload": {"status": 501, "headers": {}, "body": ""}});
    }
    let mut url = format!("{}{}", target.kube_url, p["path"].as_str().unwrap_or("/"));
    if let Some(q) = p["query"].as_str().filter(|q| !q.is_empty()) {
        url.push('?');
        url.push_str(q);
    }
    let token = item
        .header("Authorization")
        .first()
        .and_then(|v| v.strip_prefix("Bearer ").map(str::to_string))
        .unwrap_or_default();
    let ca = target.kube_ca.clone();
    let response =
        tokio::task::spawn_blocking(move || https::get(&url, &ca, &token, Duration::from_secs(10)))
            .await
            .unwrap();
    match response {
        Ok(r) => {
            let content_type = r.header("content-type").unwrap_or("application/json");
            json!({"type": "proxy_response", "payload": {
                "status": r.status,
                "headers": {"Content-Type": [content_type]},
                "body": base64::engine::general_purpose::STANDARD.encode(&r.body),
                "encoding": "base64"
            }})
        }
        Err(e) => json!({"type": "proxy_error", "payload": {"error": e}}),
    }
}
