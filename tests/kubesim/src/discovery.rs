//! API discovery documents: `/version`, `/api`, `/apis`, `/api/v1` (legacy discovery, which
//! kubectl falls back to when the aggregated-discovery `Accept` is answered with plain JSON).

use serde_json::{Value, json};

/// `GET /version`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.4",
        "gitCommit": "kubesim",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.23.6",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `GET /api`; `server_address` is advertised in `serverAddressByClientCIDRs`.
pub fn api(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

/// `GET /apis`: `authentication.k8s.io`, for `kubectl auth whoami`.
pub fn apis() -> Value {
    let v1 = json!({"groupVersion": "authentication.k8s.io/v1", "version": "v1"});
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": "authentication.k8s.io", "versions": [v1], "preferredVersion": v1},
    ]})
}

/// `GET /apis/authentication.k8s.io/v1`.
pub fn authentication_v1() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "authentication.k8s.io/v1",
        "resources": [
            {"name": "selfsubjectreviews", "singularName": "selfsubjectreview", "namespaced": false,
             "kind": "SelfSubjectReview", "verbs": ["create"]},
        ],
    })
}

/// `POST /apis/authentication.k8s.io/v1/selfsubjectreviews` (`kubectl auth whoami`): who the
/// request acts as. With `Impersonate-User` that user and its `Impersonate-Group`s (what the API
/// server reports for an impersonated request its token may impersonate); else kubesim's admin.
pub fn self_subject_review(headers: &hyper::HeaderMap) -> Value {
    let user = headers
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let groups: Vec<&str> = headers
        .get_all("impersonate-group")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let (username, groups) = match user {
        Some(user) => {
            let mut groups = groups;
            groups.push("system:authenticated");
            (user, groups)
        }
        None => (
            "kubesim-admin".to_string(),
            vec!["system:masters", "system:authenticated"],
        ),
    };
    json!({
        "kind": "SelfSubjectReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "status": {"userInfo": {"username": username, "groups": groups}},
    })
}

/// `GET /api/v1`: pods (with their streaming subresources), ConfigMaps, namespaces.
pub fn api_v1() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "v1",
        "resources": [
            {"name": "namespaces", "singularName": "namespace", "namespaced": false, "kind": "Namespace",
             "verbs": ["get", "list"], "shortNames": ["ns"]},
            {"name": "configmaps", "singularName": "configmap", "namespaced": true, "kind": "ConfigMap",
             "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"], "shortNames": ["cm"]},
            {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
             "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"], "shortNames": ["po"], "categories": ["all"]},
            {"name": "pods/attach", "singularName": "", "namespaced": true, "kind": "PodAttachOptions",
             "verbs": ["create", "get"]},
            {"name": "pods/exec", "singularName": "", "namespaced": true, "kind": "PodExecOptions",
             "verbs": ["create", "get"]},
            {"name": "pods/log", "singularName": "", "namespaced": true, "kind": "Pod", "verbs": ["get"]},
            {"name": "pods/portforward", "singularName": "", "namespaced": true, "kind": "PodPortForwardOptions",
             "verbs": ["create", "get"]},
        ],
    })
}

/// `GET /openapi/v3`: the index kubectl reads before `apply`/`create` to learn whether the
/// server validates fields itself (`fieldValidation`); only `api/v1` is listed.
pub fn openapi_v3_root() -> Value {
    json!({"paths": {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=kubesim1"}}})
}

/// `GET /openapi/v3/api/v1`: just enough of the spec for kubectl's query-parameter check: a
/// PATCH operation per stored kind that takes `fieldValidation` (so kubectl asks the server to
/// validate, with `fieldValidation=Strict`, instead of downloading schemas to validate itself).
/// No schemas: kubectl then computes strategic merge patches from its built-in types.
pub fn openapi_v3_api_v1() -> Value {
    let op = |kind: &str| {
        json!({
            "patch": {
                "operationId": format!("patchCoreV1Namespaced{kind}"),
                "parameters": [
                    {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
                    {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": {"group": "", "version": "v1", "kind": kind},
            }
        })
    };
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (kubesim)", "version": "v1.32.4"},
        "paths": {
            "/api/v1/namespaces/{namespace}/pods/{name}": op("Pod"),
            "/api/v1/namespaces/{namespace}/configmaps/{name}": op("ConfigMap"),
        },
        "components": {"schemas": {}},
    })
}
