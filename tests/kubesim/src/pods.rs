//! The pod store: pods from the configuration, their working directories, their containers'
//! main processes, and their Kubernetes JSON (Pod, PodList, Namespace, NamespaceList).
//!
//! Contract: each pod gets its own working directory `<root>/<namespace>/<name>/` (the cwd of
//! every process started in it); container logs live beside it in
//! `<root>/<namespace>/<name>.logs/<container>.log`. Processes run on this machine, so an
//! absolute path such as `/tmp/x` (e.g. in `kubectl cp`) is a real path of this machine.
//! Phase is `Running` while any main process runs, then `Succeeded` (all exited 0) or `Failed`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};

use crate::config::PodSpec;
use crate::container::Container;
use crate::status::ApiError;

/// One simulated pod.
pub struct Pod {
    /// Where it came from.
    pub spec: PodSpec,
    /// Working directory of every process in the pod.
    pub dir: PathBuf,
    uid: String,
    created: String,
    created_unix: u64,
    containers: Vec<Arc<Container>>,
}

impl Pod {
    /// Creation time, Unix seconds.
    pub fn created_unix(&self) -> u64 {
        self.created_unix
    }

    /// The pod's containers, in spec order.
    pub fn containers(&self) -> &[Arc<Container>] {
        &self.containers
    }

    /// The named container. Without a name (kubectl always sends one; other clients may
    /// not) the only container, or 400 when there are several, as kube-apiserver answers.
    pub fn container(&self, name: Option<&str>) -> Result<&Arc<Container>, ApiError> {
        match name.filter(|n| !n.is_empty()) {
            None if self.containers.len() == 1 => Ok(&self.containers[0]),
            None => {
                let names: Vec<&str> = self.containers.iter().map(|c| c.name()).collect();
                Err(ApiError::bad_request(format!(
                    "a container name must be specified for pod {}, choose one of: [{}]",
                    self.spec.name,
                    names.join(" ")
                )))
            }
            Some(n) => self
                .containers
                .iter()
                .find(|c| c.name() == n)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "container {n} is not valid for pod {}",
                        self.spec.name
                    ))
                }),
        }
    }

    /// `Running`, `Succeeded` or `Failed`.
    pub fn phase(&self) -> &'static str {
        let codes: Vec<Option<u8>> = self.containers.iter().map(|c| c.exit_code()).collect();
        if codes.iter().any(Option::is_none) {
            "Running"
        } else if codes.iter().all(|c| *c == Some(0)) {
            "Succeeded"
        } else {
            "Failed"
        }
    }

    /// The complete environment for processes started in this pod: kubesim's own environment
    /// without its `KUBESIM_*` settings (the token must not leak into pods), plus `HOSTNAME`,
    /// (non-UTF-8 variables are dropped)
    /// `KUBESIM_NAMESPACE`, `KUBESIM_POD` and `KUBESIM_CONTAINER`. Spawn with `env_clear()`.
    pub fn env(spec: &PodSpec, container: &str) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| !k.starts_with("KUBESIM_") && k != "HOSTNAME")
            .collect();
        env.extend([
            ("HOSTNAME".to_string(), spec.name.clone()),
            ("KUBESIM_NAMESPACE".to_string(), spec.namespace.clone()),
            ("KUBESIM_POD".to_string(), spec.name.clone()),
            ("KUBESIM_CONTAINER".to_string(), container.to_string()),
        ]);
        env
    }

    /// The Pod object kubectl accepts (reference §2.5), with container statuses.
    pub fn to_json(&self) -> Value {
        let containers: Vec<Value> = self
            .containers
            .iter()
            .map(|c| json!({"name": c.name(), "image": "kubesim/sh", "stdin": true}))
            .collect();
        let statuses: Vec<Value> = self
            .containers
            .iter()
            .map(|c| {
                let state = match c.exit_code() {
                    None => json!({"running": {"startedAt": c.started_at()}}),
                    Some(code) => json!({"terminated": {
                        "exitCode": code,
                        "reason": if code == 0 { "Completed" } else { "Error" },
                        "startedAt": c.started_at(),
                    }}),
                };
                json!({
                    "name": c.name(),
                    "ready": c.exit_code().is_none(),
                    "started": c.exit_code().is_none(),
                    "restartCount": 0,
                    "image": "kubesim/sh",
                    "imageID": "",
                    "state": state,
                })
            })
            .collect();
        json!({
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {
                "name": self.spec.name,
                "namespace": self.spec.namespace,
                "uid": self.uid,
                "resourceVersion": "1",
                "creationTimestamp": self.created,
            },
            "spec": {"containers": containers, "restartPolicy": "Never", "nodeName": "kubesim"},
            "status": {
                "phase": self.phase(),
                "podIP": "127.0.0.1",
                "hostIP": "127.0.0.1",
                "startTime": self.created,
                "containerStatuses": statuses,
            },
        })
    }
}

/// All pods, plus the temporary root that holds their directories.
pub struct Pods {
    pods: Vec<Arc<Pod>>,
    started: String,
    root: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Pods {
    /// Creates directories and starts every container's main process. Must run inside a
    /// tokio runtime. `root = None` uses a fresh temporary directory.
    pub fn start(specs: &[PodSpec], root: Option<&Path>) -> std::io::Result<Self> {
        let (root, temp) = match root {
            Some(r) => (r.to_path_buf(), None),
            None => {
                let t = tempfile::Builder::new().prefix("kubesim-pods-").tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let mut pods = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            if pods
                .iter()
                .any(|p: &Arc<Pod>| p.spec.namespace == spec.namespace && p.spec.name == spec.name)
            {
                return Err(std::io::Error::other(format!(
                    "pod {}/{} is configured twice",
                    spec.namespace, spec.name
                )));
            }
            let dir = root.join(&spec.namespace).join(&spec.name);
            let logs = root
                .join(&spec.namespace)
                .join(format!("{}.logs", spec.name));
            std::fs::create_dir_all(&dir)?;
            std::fs::create_dir_all(&logs)?;
            let containers = spec
                .containers
                .iter()
                .map(|c| {
                    Container::start(c, &dir, logs.join(format!("{c}.log")), &Pod::env(spec, c))
                })
                .collect::<std::io::Result<Vec<_>>>()?;
            pods.push(Arc::new(Pod {
                spec: spec.clone(),
                dir,
                uid: format!("00000000-0000-4000-8000-{:012x}", i + 1),
                created: now_rfc3339(),
                created_unix: unix_now(),
                containers,
            }));
        }
        Ok(Self {
            pods,
            started: now_rfc3339(),
            root,
            _temp: temp,
        })
    }

    /// Root directory of all pod directories.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Looks a pod up.
    pub fn get(&self, namespace: &str, name: &str) -> Result<Arc<Pod>, ApiError> {
        self.pods
            .iter()
            .find(|p| p.spec.namespace == namespace && p.spec.name == name)
            .cloned()
            .ok_or_else(|| ApiError::not_found("pods", name))
    }

    /// Pods in `namespace` (all namespaces for `None`).
    pub fn list(&self, namespace: Option<&str>) -> Vec<Arc<Pod>> {
        self.pods
            .iter()
            .filter(|p| namespace.is_none_or(|ns| p.spec.namespace == ns))
            .cloned()
            .collect()
    }

    /// `default` plus every namespace that has a pod, sorted.
    pub fn namespaces(&self) -> Vec<String> {
        let mut ns: Vec<String> = self.pods.iter().map(|p| p.spec.namespace.clone()).collect();
        ns.push("default".to_string());
        ns.sort();
        ns.dedup();
        ns
    }

    /// A PodList.
    pub fn list_json(&self, namespace: Option<&str>) -> Value {
        let items: Vec<Value> = self.list(namespace).iter().map(|p| p.to_json()).collect();
        json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items})
    }

    /// A Namespace, or 404.
    pub fn namespace_json(&self, name: &str) -> Result<Value, ApiError> {
        if self.namespaces().iter().any(|n| n == name) {
            Ok(namespace_json(name, &self.started))
        } else {
            Err(ApiError::not_found("namespaces", name))
        }
    }

    /// A NamespaceList.
    pub fn namespace_list_json(&self) -> Value {
        let items: Vec<Value> = self
            .namespaces()
            .iter()
            .map(|n| namespace_json(n, &self.started))
            .collect();
        json!({"kind": "NamespaceList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items})
    }

    /// Kills every main process.
    pub fn shutdown(&self) {
        for pod in &self.pods {
            for c in &pod.containers {
                c.kill();
            }
        }
    }
}

fn namespace_json(name: &str, created: &str) -> Value {
    json!({
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {"name": name, "resourceVersion": "1", "creationTimestamp": created},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// The current Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The current UTC time as RFC 3339 (`2026-11-26T14:31:02Z`).
pub fn now_rfc3339() -> String {
    rfc3339(unix_now())
}

fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_703_462), "2026-11-26T14:31:02Z");
    }
}
