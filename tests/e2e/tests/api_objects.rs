//! kubectl's object verbs through the tunnel, against kubesim's small API server: `apply` of a
//! ConfigMap and a Pod (created, then configured by a strategic merge patch), `logs -f` of the
//! applied pod, `get -w` while another kubectl runs and deletes a pod, `label`/`-l`, chunked
//! lists, `patch`, and a 10 MiB ConfigMap body up and back; in native and compat mode.

use std::time::Duration;

use tether_e2e::Cluster;
use tether_e2e::data::sha256;

const T: Duration = Duration::from_secs(30);

const OBJECTS: &str = r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  labels: {app: web}
data:
  color: COLOR
---
apiVersion: v1
kind: Pod
metadata:
  name: ticker
  labels: {app: web}
spec:
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.1; done"]
"#;

fn objects_through_the_tunnel(compat: bool) {
    let mut b = Cluster::builder();
    if compat {
        b = b
            .agent_args(&["--wire-mode", "compat"])
            .control_plane_args(&["--wire-mode", "compat"]);
    }
    let c = b.start();
    let manifest = c.dir().join("objects.yaml");

    // apply: created, then configured (a strategic merge patch), unchanged for the pod.
    std::fs::write(&manifest, OBJECTS.replace("COLOR", "blue")).unwrap();
    let apply = c.run(&["apply", "-f", manifest.to_str().unwrap()]);
    apply.assert_code(0);
    assert_eq!(
        apply.stdout_str(),
        "configmap/settings created\npod/ticker created\n"
    );
    std::fs::write(&manifest, OBJECTS.replace("COLOR", "red")).unwrap();
    let again = c.run(&["apply", "-f", manifest.to_str().unwrap()]);
    again.assert_code(0);
    assert_eq!(
        again.stdout_str(),
        "configmap/settings configured\npod/ticker unchanged\n",
        "{}",
        again.stderr_str()
    );
    let color = c.run(&["get", "cm", "settings", "-o", "jsonpath={.data.color}"]);
    assert_eq!(color.stdout_str(), "red");

    // logs -f of the applied pod: its own command's output, as it comes.
    let mut logs = c.spawn(&["logs", "-f", "ticker"]);
    logs.wait_stdout("tick-5\n", T);
    drop(logs);

    // get -w while another client runs and deletes a pod.
    let mut watch = c.spawn(&["get", "pods", "-w"]);
    watch.wait_stdout("ticker", T);
    let run = c.run(&[
        "run",
        "runner",
        "--image=busybox",
        "--",
        "sh",
        "-c",
        "sleep 60",
    ]);
    run.assert_code(0);
    assert_eq!(run.stdout_str(), "pod/runner created\n");
    watch.wait_stdout("runner   1/1     Running", T);
    let delete = c.run(&["delete", "pod", "runner"]);
    delete.assert_code(0);
    assert_eq!(delete.stdout_str(), "pod \"runner\" deleted\n");
    watch.wait_stdout("Terminating", T);
    drop(watch);
    let gone = c.run(&["get", "pod", "runner"]);
    gone.assert_code(1);
    assert!(
        gone.stderr_str().contains("NotFound"),
        "{}",
        gone.stderr_str()
    );

    // Labels and selectors; a chunked list (limit/continue) sees every pod once.
    c.run(&["label", "pod", "ticker", "tier=front"])
        .assert_code(0);
    let selected = c.run(&["get", "pods", "-l", "tier=front", "-o", "name"]);
    assert_eq!(selected.stdout_str(), "pod/ticker\n");
    let chunked = c.run(&["get", "pods", "--chunk-size=1", "-o", "name"]);
    assert_eq!(chunked.stdout_str(), "pod/demo\npod/ticker\n");

    // patch (merge) and a 10 MiB ConfigMap body up and back.
    c.run(&[
        "patch",
        "cm",
        "settings",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"size":"L"}}"#,
    ])
    .assert_code(0);
    let data = c.run(&["get", "cm", "settings", "-o", "jsonpath={.data.size}"]);
    assert_eq!(data.stdout_str(), "L");
    let blob: String = (0..10 * 1024 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let big = c.dir().join("big.yaml");
    std::fs::write(
        &big,
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: big}}\ndata:\n  blob: {blob}\n"
        ),
    )
    .unwrap();
    let create = c.run(&["create", "-f", big.to_str().unwrap()]);
    create.assert_code(0);
    let back = c.run(&["get", "cm", "big", "-o", "jsonpath={.data.blob}"]);
    back.assert_code(0);
    assert_eq!(back.stdout.len(), blob.len());
    assert_eq!(sha256(&back.stdout), sha256(blob.as_bytes()));
    c.run(&["delete", "cm", "big"]).assert_code(0);
}

#[test]
fn object_verbs_through_the_tunnel_native() {
    objects_through_the_tunnel(false);
}

#[test]
fn object_verbs_through_the_tunnel_compat() {
    objects_through_the_tunnel(true);
}
