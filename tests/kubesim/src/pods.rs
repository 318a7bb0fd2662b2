//! The pods: their working directories, their containers' main processes, and the live part
//! of their Kubernetes JSON (status), over the user-visible objects in [`crate::store`].
//!
//! Contract: each pod gets its own working directory `<root>/<namespace>/<name>/` (the cwd of
//! every process started in it); container logs live beside it in
//! `<root>/<namespace>/<name>.logs/<container>.log`. Processes run on this machine, so an
//! absolute path such as `/tmp/x` (e.g. in `kubectl cp`) is a real path of this machine.
//! Phase is `Running` while any main process runs, then `Succeeded` (all exited 0) or `Failed`.
//!
//! Pods from the configuration run `sh` reading stdin in each container. A pod created through
//! the API (`kubectl apply`, `create`, `run`) runs each container's `command` + `args` (or `args`
//! alone, or `sh` without either); images are ignored. Deleting a pod kills its processes at once
//! (no grace period) and removes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::config::PodSpec;
use crate::container::Container;
use crate::status::ApiError;
use crate::store::{Key, Resource, Store};

/// A running (or finished) pod: its processes.
pub struct Pod {
    /// Namespace, name and container names.
    pub spec: PodSpec,
    /// The working directory of its processes.
    pub dir: PathBuf,
    containers: Vec<Arc<Container>>,
}

impl Pod {
    /// Its containers, in spec order.
    pub fn containers(&self) -> &[Arc<Container>] {
        &self.containers
    }

    /// The container named `name`, or the only one when `name` is empty.
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

    /// The environment of a process in container `container` of `spec`.
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

    /// The `status` of the pod, created at `created` (RFC 3339).
    fn status_json(&self, created: &Value) -> Value {
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
            "phase": self.phase(),
            "podIP": "127.0.0.1",
            "hostIP": "127.0.0.1",
            "startTime": created,
            "containerStatuses": statuses,
        })
    }

    fn kill(&self) {
        for c in &self.containers {
            c.kill();
        }
    }
}

/// The pods' processes, beside their objects in the store.
pub struct Pods {
    running: Mutex<BTreeMap<(String, String), Arc<Pod>>>,
    store: Arc<Store>,
    started: String,
    root: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Pods {
    /// Starts the configured pods under `root` (a fresh temp dir for `None`) and records them
    /// in `store`.
    pub fn start(
        specs: &[PodSpec],
        root: Option<&Path>,
        store: Arc<Store>,
    ) -> std::io::Result<Self> {
        let (root, temp) = match root {
            Some(r) => (r.to_path_buf(), None),
            None => {
                let t = tempfile::Builder::new().prefix("kubesim-pods-").tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let pods = Self {
            running: Mutex::new(BTreeMap::new()),
            store,
            started: now_rfc3339(),
            root,
            _temp: temp,
        };
        for spec in specs {
            let containers: Vec<Value> = spec
                .containers
                .iter()
                .map(|c| json!({"name": c, "image": "kubesim/sh", "stdin": true}))
                .collect();
            let object = json!({
                "metadata": {"name": spec.name},
                "spec": {"containers": containers, "restartPolicy": "Never"},
            });
            pods.create(&spec.namespace, object).map_err(|e| {
                std::io::Error::other(format!(
                    "pod {}/{}: {}",
                    spec.namespace, spec.name, e.message
                ))
            })?;
        }
        Ok(pods)
    }

    /// Where pods' working directories are.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Arc<Pod>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The running pod `namespace/name`.
    pub fn get(&self, namespace: &str, name: &str) -> Result<Arc<Pod>, ApiError> {
        self.running()
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| ApiError::not_found("pods", name))
    }

    /// `object` (a pod from the store) with its live status and node.
    pub fn render(&self, object: &Value) -> Value {
        let mut object = object.clone();
        let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        if let Ok(pod) = self.get(ns, name) {
            object["status"] = pod.status_json(&object["metadata"]["creationTimestamp"]);
            object["spec"]["nodeName"] = json!("kubesim");
        }
        object
    }

    /// Creates a pod in `namespace` from `object` (a Pod as kubectl sends it) and starts its
    /// processes; returns it as stored. `metadata.generateName` picks a free name.
    pub fn create(&self, namespace: &str, mut object: Value) -> Result<Value, ApiError> {
        let name = pod_name(&object, |candidate| self.get(namespace, candidate).is_err())?;
        let containers = container_commands(&object)?;
        let spec = PodSpec {
            namespace: namespace.to_string(),
            name: name.clone(),
            containers: containers.iter().map(|(n, _)| n.clone()).collect(),
        };
        let key = Key {
            resource: Resource::Pods,
            namespace: namespace.to_string(),
            name: name.clone(),
        };
        if self.store.get(&key).is_ok() {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("pods \"{name}\" already exists"),
            ));
        }
        let pod = self
            .spawn(&spec, &containers)
            .map_err(|e| ApiError::new(500, "InternalError", format!("cannot start pod: {e}")))?;
        object["metadata"]["name"] = json!(name);
        if let Some(status) = object.as_object_mut() {
            status.remove("status");
        }
        match self.store.create(&key, object) {
            Ok(created) => {
                self.running().insert((namespace.to_string(), name), pod);
                Ok(self.render(&created))
            }
            Err(e) => {
                pod.kill();
                Err(e)
            }
        }
    }

    fn spawn(
        &self,
        spec: &PodSpec,
        containers: &[(String, Vec<String>)],
    ) -> std::io::Result<Arc<Pod>> {
        let dir = self.root.join(&spec.namespace).join(&spec.name);
        let logs = self
            .root
            .join(&spec.namespace)
            .join(format!("{}.logs", spec.name));
        // A pod created again under a deleted one's name starts with empty logs.
        let _ = std::fs::remove_dir_all(&logs);
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(&logs)?;
        let containers = containers
            .iter()
            .map(|(c, argv)| {
                Container::start(
                    c,
                    &dir,
                    logs.join(format!("{c}.log")),
                    &Pod::env(spec, c),
                    argv,
                )
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Arc::new(Pod {
            spec: spec.clone(),
            dir,
            containers,
        }))
    }

    /// Deletes pod `namespace/name`: its processes are killed and it is gone; returns it as it
    /// was last.
    pub fn delete(&self, namespace: &str, name: &str) -> Result<Value, ApiError> {
        let key = Key {
            resource: Resource::Pods,
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        let rendered = self.render(&self.store.get(&key)?);
        let deleted = self.store.delete(&key)?;
        if let Some(pod) = self
            .running()
            .remove(&(namespace.to_string(), name.to_string()))
        {
            pod.kill();
        }
        let mut gone = rendered;
        gone["metadata"]["resourceVersion"] = deleted["metadata"]["resourceVersion"].clone();
        Ok(gone)
    }

    /// Namespaces that have pods, and `default`.
    pub fn namespaces(&self) -> Vec<String> {
        let mut ns: Vec<String> = self.running().keys().map(|(n, _)| n.clone()).collect();
        ns.push("default".to_string());
        ns.sort();
        ns.dedup();
        ns
    }

    /// `GET namespaces/NAME`.
    pub fn namespace_json(&self, name: &str) -> Result<Value, ApiError> {
        if self.namespaces().iter().any(|n| n == name) {
            Ok(namespace_json(name, &self.started))
        } else {
            Err(ApiError::not_found("namespaces", name))
        }
    }

    /// `GET namespaces`.
    pub fn namespace_list_json(&self) -> Value {
        let items: Vec<Value> = self
            .namespaces()
            .iter()
            .map(|n| namespace_json(n, &self.started))
            .collect();
        json!({"kind": "NamespaceList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items})
    }

    /// Kills every process.
    pub fn shutdown(&self) {
        for pod in self.running().values() {
            pod.kill();
        }
    }
}

/// `metadata.name`, or `generateName` plus a suffix `free` accepts; each a DNS label.
fn pod_name(object: &Value, free: impl Fn(&str) -> bool) -> Result<String, ApiError> {
    let meta = &object["metadata"];
    let name = match (meta["name"].as_str(), meta["generateName"].as_str()) {
        (Some(name), _) if !name.is_empty() => name.to_string(),
        (_, Some(prefix)) if !prefix.is_empty() => (0..u32::MAX)
            .map(|i| format!("{prefix}{:05x}", (i.wrapping_mul(2_654_435_761)) & 0xfffff))
            .find(|n| free(n))
            .unwrap_or_default(),
        _ => {
            return Err(ApiError::new(
                422,
                "Invalid",
                "Pod \"\" is invalid: metadata.name: Required value: name or generateName is required",
            ));
        }
    };
    if !crate::config::is_dns_label(&name) {
        return Err(ApiError::new(
            422,
            "Invalid",
            format!("Pod \"{name}\" is invalid: metadata.name: must be a DNS label"),
        ));
    }
    Ok(name)
}

/// Each container's name and argv (`command` then `args`; empty: `sh`).
fn container_commands(object: &Value) -> Result<Vec<(String, Vec<String>)>, ApiError> {
    let invalid = |why: String| ApiError::new(422, "Invalid", format!("Pod is invalid: {why}"));
    let containers = object["spec"]["containers"]
        .as_array()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| invalid("spec.containers: Required value".into()))?;
    let strings = |v: &Value, field: &str| -> Result<Vec<String>, ApiError> {
        match v {
            Value::Null => Ok(Vec::new()),
            Value::Array(items) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| invalid(format!("{field}: must be strings")))
                })
                .collect(),
            _ => Err(invalid(format!("{field}: must be a list"))),
        }
    };
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for c in containers {
        let name = c["name"].as_str().unwrap_or_default().to_string();
        if !crate::config::is_dns_label(&name) {
            return Err(invalid(format!(
                "spec.containers.name: {name:?} must be a DNS label"
            )));
        }
        if out.iter().any(|(n, _)| *n == name) {
            return Err(invalid(format!(
                "spec.containers.name: Duplicate value: {name:?}"
            )));
        }
        let mut argv = strings(&c["command"], "command")?;
        argv.extend(strings(&c["args"], "args")?);
        out.push((name, argv));
    }
    Ok(out)
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

/// Seconds since the epoch of an RFC 3339 UTC time as [`now_rfc3339`] writes it.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
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
        assert_eq!(
            super::parse_rfc3339("2026-11-26T14:31:02Z"),
            Some(1_795_703_462)
        );
        assert_eq!(super::parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(super::parse_rfc3339("yesterday"), None);
    }
}
