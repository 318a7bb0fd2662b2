//! The incumbent PipeOps agent against Tether's control plane: it expects the control plane to
//! authenticate its requests with the `k8s_service_token` it registered, since its HTTP path
//! to the API adds no credential. A scripted agent that behaves as documented
//! (`tether_e2e::pipeops_agent`) stands in for it, talking to kubesim, which checks tokens.

use std::time::Duration;

use tether_e2e::pipeops_agent::{PipeOpsAgent, Target};
use tether_e2e::{Cluster, POD};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeops_agent_gets_its_service_token_as_the_bearer() {
    let c = Cluster::builder().without_agent().start();
    let agent = PipeOpsAgent::start(Target {
        control_plane: c.control_plane_addr(),
        control_plane_ca: c.control_plane_ca_pem().to_string(),
        agent_token: c.agent_token().to_string(),
        service_token: c.kube_token().to_string(),
        kube_url: c.kubesim_url(),
        kube_ca: c.kubesim_ca_pem().to_string(),
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let bearer = format!("Bearer {}", c.kube_token());

    // kubectl get through the control plane and the PipeOps agent: kubesim accepts the token
    // the control plane added (without it kubesim answers 401).
    let run = |args: Vec<String>, env: Option<(&'static str, &'static str)>| {
        let mut cmd = c.kubectl(&args.iter().map(String::as_str).collect::<Vec<_>>());
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        tokio::task::spawn_blocking(move || {
            tether_e2e::kubectl::run_command(cmd, None, Duration::from_secs(30))
        })
    };
    let get = run(
        vec![
            "get".into(),
            "pod".into(),
            POD.into(),
            "-o".into(),
            "name".into(),
        ],
        None,
    )
    .await
    .unwrap();
    get.assert_code(0);
    assert_eq!(get.stdout_str().trim(), format!("pod/{POD}"));
    let seen = agent.seen();
    let requests: Vec<_> = seen.iter().filter(|s| s.kind == "proxy_request").collect();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(
            r.header("Authorization"),
            [bearer.as_str()],
            "{:?}",
            r.payload
        );
        assert_eq!(r.header("Impersonate-User"), ["alice"], "{:?}", r.payload);
    }

    // kubectl exec (WebSocket): the stream start carries the bearer too.
    let exec = run(
        vec!["exec".into(), POD.into(), "--".into(), "true".into()],
        None,
    )
    .await
    .unwrap();
    assert_ne!(exec.code(), 0, "the scripted agent does not carry streams");
    let seen = agent.seen();
    let start = seen
        .iter()
        .find(|s| s.kind == "proxy_websocket_start")
        .expect("kubectl exec reached the agent");
    assert_eq!(start.header("Authorization"), [bearer.as_str()]);
    assert!(start.payload.get("upgrade").is_none());

    // kubectl exec over SPDY: a PipeOps agent cannot carry raw upgrades, so it gets a plain
    // request (as before raw upgrades existed), never a start with `upgrade`.
    let spdy = run(
        vec!["exec".into(), POD.into(), "--".into(), "true".into()],
        Some(("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")),
    )
    .await
    .unwrap();
    assert_ne!(spdy.code(), 0);
    let seen = agent.seen();
    let plain = seen
        .iter()
        .rfind(|s| s.kind == "proxy_request")
        .expect("the SPDY exec reached the agent");
    assert_eq!(plain.payload["method"], "POST");
    assert!(plain.payload["path"].as_str().unwrap().ends_with("/exec"));
    assert_eq!(plain.header("Authorization"), [bearer.as_str()]);
    assert!(
        seen.iter().all(|s| s.payload.get("upgrade").is_none()),
        "a PipeOps agent never sees a raw upgrade"
    );

    // The token never reaches the control plane's log.
    let log = std::fs::read_to_string(c.dir().join("control-plane.log")).unwrap_or_default();
    assert!(!log.is_empty(), "control plane log");
    assert!(
        !log.contains(c.kube_token()),
        "the service token was logged"
    );
}
