//! The agent library in-process (tunables the CLI does not expose): the tunnel's timers, driven
//! by the core and slept by the adapter (pings, heartbeats, the read deadline that declares a
//! silent tunnel dead), and in-cluster access with ServiceAccount token rotation.

mod support;

use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::Value;
use support::*;
use tether_core::time::Duration as CoreDuration;
use tether_tokio::agent::{Agent, AgentConfig, TunnelTarget};
use tether_tokio::kube::{KubeTarget, Trust};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_heartbeats_and_dead_tunnel_reconnect() {
    let cp_tls = make_tls();
    let cp = ControlPlane::start(&cp_tls).await;
    let tunnel = TunnelTarget::new(
        &cp.url(),
        &Trust::CaPem(cp_tls.ca_pem.clone().into_bytes()),
        AGENT_TOKEN,
    )
    .unwrap();
    let kube = KubeTarget::from_url("http://127.0.0.1:9", None, None).unwrap();
    let mut config = AgentConfig::new(tunnel, kube);
    config.relay.ping_interval = CoreDuration::from_millis(200);
    config.relay.heartbeat_interval = CoreDuration::from_millis(300);
    config.relay.read_deadline = CoreDuration::from_millis(1500);
    let agent = Agent::new(config);
    let metrics = agent.metrics();
    let task = tokio::spawn(agent.run());

    let mut a = cp.accept_registered().await;
    let (mut pings, mut heartbeats) = (0, 0);
    let until = tokio::time::Instant::now() + Duration::from_millis(1600);
    while let Ok(Some(msg)) = tokio::time::timeout_at(until, a.ws.next()).await {
        match msg.unwrap() {
            Message::Ping(_) => pings += 1,
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["type"], "heartbeat", "{v}");
                assert_eq!(v["payload"]["cluster_id"], "cluster-1");
                heartbeats += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pings >= 4, "{pings} pings in 1.6 s at a 200 ms interval");
    assert!(
        heartbeats >= 3,
        "{heartbeats} heartbeats in 1.6 s at 300 ms"
    );
    // While the control plane answered pings, the tunnel stayed up.
    assert_eq!(
        metrics
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // Now the control plane goes silent (reads nothing, so answers no ping): past the read
    // deadline the agent drops the tunnel and dials again.
    let silent_since = tokio::time::Instant::now();
    let b = cp.accept_registered().await;
    let waited = silent_since.elapsed();
    assert!(
        waited >= Duration::from_millis(1000) && waited < Duration::from_secs(5),
        "reconnected after {waited:?}"
    );
    assert_eq!(
        metrics
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    drop((a, b));
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_token_is_reread_when_it_rotates() {
    let files = Files::new();
    let kube_tls = make_tls();
    let cp_tls = make_tls();
    let kube = kubesim(&kube_tls).await;
    let cp = ControlPlane::start(&cp_tls).await;
    // A ServiceAccount directory whose token is not (yet) the one the API accepts.
    files.write("ca.crt", &kube_tls.ca_pem);
    let token_path = files.write("token", "stale-token\n");
    let kube_target = KubeTarget::in_cluster_with(
        "127.0.0.1",
        &kube.addr().port().to_string(),
        files.dir.path(),
    )
    .unwrap();
    let tunnel = TunnelTarget::new(
        &cp.url(),
        &Trust::CaPem(cp_tls.ca_pem.clone().into_bytes()),
        AGENT_TOKEN,
    )
    .unwrap();
    let task = tokio::spawn(Agent::new(AgentConfig::new(tunnel, kube_target)).run());
    let mut a = cp.accept_registered().await;
    let get = |id: &str| {
        serde_json::json!({"type": "proxy_request", "request_id": id,
            "payload": {"method": "GET", "path": "/api/v1/namespaces/default/pods/demo"}})
    };
    a.send(get("before")).await;
    let r = a.recv_skip_heartbeat().await;
    assert_eq!(r["request_id"], "before");
    assert_eq!(r["payload"]["status"], 401, "{r}");

    // The kubelet rotates the token file: the next request uses the new token.
    std::fs::write(&token_path, format!("{KUBE_TOKEN}\n")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&token_path)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(10))
        .unwrap();
    a.send(get("after")).await;
    let r = a.recv_skip_heartbeat().await;
    assert_eq!(r["request_id"], "after");
    assert_eq!(r["payload"]["status"], 200, "{r}");
    task.abort();
}
