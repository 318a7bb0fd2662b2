//! Server-side printing: the `meta.k8s.io/v1` Table kubectl asks for with
//! `Accept: application/json;as=Table;v=v1;g=meta.k8s.io` (`kubectl get pods`), so it prints
//! the familiar NAME READY STATUS RESTARTS AGE columns.

use serde_json::{Value, json};

use crate::store::Resource;

/// Whether the `Accept` header asks for a Table.
pub fn wants_table(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|t| {
            let params: Vec<&str> = t.split(';').map(str::trim).collect();
            params.contains(&"as=Table") && params.contains(&"g=meta.k8s.io")
        })
    })
}

fn col(name: &str, format: &str, priority: u8, description: &str) -> Value {
    json!({"name": name, "type": "string", "format": format, "description": description, "priority": priority})
}

fn age(object: &Value, now: u64) -> String {
    let created = object["metadata"]["creationTimestamp"]
        .as_str()
        .and_then(crate::pods::parse_rfc3339)
        .unwrap_or(now);
    human_duration(now.saturating_sub(created))
}

fn row(cells: Vec<Value>, object: &Value) -> Value {
    json!({
        "cells": cells,
        "object": {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": object["metadata"].clone(),
        },
    })
}

fn table(columns: Vec<Value>, rows: Vec<Value>, rv: u64) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": columns,
        "rows": rows,
    })
}

/// A Table of `objects` (rendered pods or ConfigMaps) at resourceVersion `rv`; `now` is the
/// current Unix time in seconds.
pub fn of(resource: Resource, objects: &[Value], now: u64, rv: u64) -> Value {
    match resource {
        Resource::Pods => pods(objects, now, rv),
        Resource::ConfigMaps => configmaps(objects, now, rv),
    }
}

/// A pods Table: NAME READY STATUS RESTARTS AGE (IP NODE with `-o wide`).
fn pods(pods: &[Value], now: u64, rv: u64) -> Value {
    let rows: Vec<Value> = pods
        .iter()
        .map(|p| {
            let statuses = p["status"]["containerStatuses"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let total = p["spec"]["containers"].as_array().map_or(0, Vec::len);
            let ready = statuses.iter().filter(|c| c["ready"] == true).count();
            let status = match p["status"]["phase"].as_str() {
                Some("Running") => "Running",
                Some("Succeeded") => "Completed",
                Some(_) => "Error",
                None => "Terminating",
            };
            row(
                vec![
                    p["metadata"]["name"].clone(),
                    json!(format!("{ready}/{total}")),
                    json!(status),
                    json!("0"),
                    json!(age(p, now)),
                    json!("127.0.0.1"),
                    json!("kubesim"),
                ],
                p,
            )
        })
        .collect();
    table(
        vec![
            col("Name", "name", 0, "Name must be unique within a namespace."),
            col(
                "Ready",
                "",
                0,
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            col(
                "Status",
                "",
                0,
                "The aggregate status of the containers in this pod.",
            ),
            col(
                "Restarts",
                "",
                0,
                "The number of times the containers in this pod have been restarted.",
            ),
            col("Age", "", 0, "Time since the pod was created."),
            col("IP", "", 1, "IP address allocated to the pod."),
            col("Node", "", 1, "Name of the node the pod is assigned to."),
        ],
        rows,
        rv,
    )
}

/// A ConfigMaps Table: NAME DATA AGE.
fn configmaps(maps: &[Value], now: u64, rv: u64) -> Value {
    let rows = maps
        .iter()
        .map(|m| {
            let count = |f: &str| m[f].as_object().map_or(0, serde_json::Map::len);
            row(
                vec![
                    m["metadata"]["name"].clone(),
                    json!(count("data") + count("binaryData")),
                    json!(age(m, now)),
                ],
                m,
            )
        })
        .collect();
    table(
        vec![
            col("Name", "name", 0, "Name must be unique within a namespace."),
            json!({"name": "Data", "type": "integer", "format": "", "description": "Number of keys.", "priority": 0}),
            col("Age", "", 0, "Time since the ConfigMap was created."),
        ],
        rows,
        rv,
    )
}

/// Kubernetes' `HumanDuration` (`45s`, `3m20s`, `2h5m`, `3d4h`, ...).
pub fn human_duration(secs: u64) -> String {
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86_400);
    match secs {
        s if s < 120 => format!("{s}s"),
        _ if m < 10 && secs.is_multiple_of(60) => format!("{m}m"),
        _ if m < 10 => format!("{m}m{}s", secs % 60),
        _ if m < 180 => format!("{m}m"),
        _ if h < 8 && m.is_multiple_of(60) => format!("{h}h"),
        _ if h < 8 => format!("{h}h{}m", m % 60),
        _ if h < 48 => format!("{h}h"),
        _ if h < 192 && h.is_multiple_of(24) => format!("{d}d"),
        _ if h < 192 => format!("{d}d{}h", h % 24),
        _ if d < 730 => format!("{d}d"),
        _ => format!("{}y{}d", d / 365, d % 365),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_accept() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(3600 * 2 + 300), "125m");
        assert_eq!(human_duration(3600 * 3 + 300), "3h5m");
        assert_eq!(human_duration(86_400 * 3 + 3600 * 4), "3d4h");
        assert!(wants_table(Some(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        )));
        assert!(!wants_table(Some("application/json, */*")));
        assert!(!wants_table(None));
    }
}
