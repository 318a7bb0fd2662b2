//! The committed agent manifests (`deploy/manifests/`, rendered from the Helm chart and checked
//! against it by `cargo xtask ci`) grant exactly what the agent uses and run it as the runtime
//! expects.
//!
//! What the agent calls: every request it forwards carries its ServiceAccount token and the
//! control plane's `Impersonate-User` (`tether_core::gateway::headers`), so the API server
//! authorizes the user, not the agent. Impersonating a user needs `impersonate` on `users`;
//! a user named `system:serviceaccount:NS:NAME` needs it on `serviceaccounts`; group grants
//! (`Impersonate-Group`) need it on `groups`. The agent reads nothing else from the API itself.

use std::collections::BTreeSet;

use serde_yaml::Value;

fn documents() -> Vec<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/manifests/tether-agent.yaml"
    );
    let text = std::fs::read_to_string(path).expect("deploy/manifests/tether-agent.yaml");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

#[test]
fn the_cluster_role_grants_impersonation_and_nothing_else() {
    let docs = documents();
    let roles = of_kind(&docs, "ClusterRole");
    assert_eq!(roles.len(), 1, "one ClusterRole");
    assert!(of_kind(&docs, "Role").is_empty(), "no namespaced Role");
    let rules = roles[0]["rules"].as_sequence().expect("rules");
    assert_eq!(rules.len(), 1, "{rules:?}");
    let rule = &rules[0];
    assert_eq!(strings(&rule["apiGroups"]), BTreeSet::from([String::new()]));
    assert_eq!(
        strings(&rule["verbs"]),
        BTreeSet::from(["impersonate".to_string()])
    );
    let expected: BTreeSet<String> = ["users", "groups", "serviceaccounts"]
        .map(String::from)
        .into();
    assert_eq!(strings(&rule["resources"]), expected);
    assert!(rule.get("resourceNames").is_none());

    // Bound to the ServiceAccount the Deployment runs as.
    let binding = of_kind(&docs, "ClusterRoleBinding")[0];
    assert_eq!(binding["roleRef"]["name"], roles[0]["metadata"]["name"]);
    let account = &binding["subjects"][0];
    assert_eq!(account["kind"], "ServiceAccount");
    let deployment = of_kind(&docs, "Deployment")[0];
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        account["name"]
    );
}

#[test]
fn the_deployment_runs_locked_down_with_probes_and_a_token_file() {
    let docs = documents();
    let deployment = of_kind(&docs, "Deployment")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(
        strings(&sc["capabilities"]["drop"]),
        BTreeSet::from(["ALL".to_string()])
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(container["resources"]["requests"]["memory"].is_string());
    let args = strings(&container["args"]);
    let token_file = args
        .iter()
        .find_map(|a| a.strip_prefix("--token-file="))
        .expect("the token comes from a file, not a flag or variable");
    assert!(!args.iter().any(|a| a.starts_with("--token=")));
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| token_file.starts_with(m["mountPath"].as_str().unwrap()))
        .expect("the token file is on a mounted volume");
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert!(
        volume["secret"]["secretName"].is_string(),
        "the token volume is a Secret"
    );
    // Rolling updates start the new agent before the old one drains.
    assert_eq!(
        deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let drain: u64 = args
        .iter()
        .find_map(|a| a.strip_prefix("--shutdown-grace="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(grace > drain, "the kubelet must wait out the agent's drain");
    assert_eq!(of_kind(&docs, "PodDisruptionBudget").len(), 1);
    assert!(of_kind(&docs, "Secret").is_empty(), "no token is committed");
}
