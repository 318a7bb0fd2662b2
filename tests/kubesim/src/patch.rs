//! PATCH bodies as kubectl sends them: JSON merge patch (RFC 7386, `kubectl patch --type merge`)
//! and strategic merge patch (`kubectl apply`, `kubectl patch`, `kubectl label`, `kubectl edit`).
//!
//! Strategic merge, for the fields kubectl touches on pods and ConfigMaps: maps merge key by key
//! (`null` deletes); lists of objects with a known merge key (`containers`, `initContainers`,
//! `env`, `volumes` by `name`; `ports` by `containerPort`; `volumeMounts` by `mountPath`) merge
//! element by element, an element with `"$patch": "delete"` removes its match; every other list
//! is replaced; `$setElementOrder/<list>` orders the merged list; `$retainKeys` keeps only the
//! named keys of its map. Other `$` directives are refused.

use serde_json::{Map, Value};

/// How a PATCH body is to be applied, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json`.
    StrategicMerge,
}

impl PatchType {
    /// The patch type of `content_type`; `None` for one kubesim does not apply (JSON patch,
    /// server-side apply).
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        match content_type.split(';').next().unwrap_or_default().trim() {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::StrategicMerge),
            _ => None,
        }
    }
}

/// Applies `patch` to `target` in place. `Err` names what is not supported.
pub fn apply(target: &mut Value, patch: &Value, kind: PatchType) -> Result<(), String> {
    match kind {
        PatchType::Merge => {
            merge(target, patch);
            Ok(())
        }
        PatchType::StrategicMerge => strategic(target, patch),
    }
}

/// RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let map = target.as_object_mut().expect("made an object");
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The merge key of the list under field `name`, when it is a list kubectl merges by key.
fn merge_key(name: &str) -> Option<&'static str> {
    match name {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets" => Some("name"),
        "ports" => Some("containerPort"),
        "volumeMounts" => Some("mountPath"),
        _ => None,
    }
}

fn strategic(target: &mut Value, patch: &Value) -> Result<(), String> {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let map = target.as_object_mut().expect("made an object");
    let mut orders = Vec::new();
    for (key, value) in patch {
        if let Some(list) = key.strip_prefix("$setElementOrder/") {
            orders.push((list.to_string(), value.clone()));
            continue;
        }
        match key.as_str() {
            "$retainKeys" => {
                let keep: Vec<&str> = value
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                map.retain(|k, _| keep.contains(&k.as_str()) || patch.contains_key(k));
                continue;
            }
            "$patch" if value == "replace" => {
                let mut replaced = patch.clone();
                replaced.remove("$patch");
                *map = replaced;
                return Ok(());
            }
            k if k.starts_with('$') => {
                return Err(format!("strategic merge directive {k} is not supported"));
            }
            _ => {}
        }
        if value.is_null() {
            map.remove(key);
            continue;
        }
        let slot = map.entry(key.clone()).or_insert(Value::Null);
        match (merge_key(key), value) {
            (Some(merge_key), Value::Array(items)) => merge_list(slot, items, merge_key)?,
            (_, Value::Object(_)) => strategic(slot, value)?,
            _ => *slot = value.clone(),
        }
    }
    for (list, order) in orders {
        if let (Some(Value::Array(items)), Some(key), Some(order)) =
            (map.get_mut(&list), merge_key(&list), order.as_array())
        {
            let rank = |item: &Value| {
                order
                    .iter()
                    .position(|o| o.get(key) == item.get(key))
                    .unwrap_or(usize::MAX)
            };
            items.sort_by_key(rank);
        }
    }
    Ok(())
}

fn merge_list(slot: &mut Value, patch: &[Value], key: &str) -> Result<(), String> {
    if !slot.is_array() {
        *slot = Value::Array(Vec::new());
    }
    let items = slot.as_array_mut().expect("made an array");
    for element in patch {
        let id = element.get(key);
        let found = id.and_then(|id| items.iter().position(|i| i.get(key) == Some(id)));
        let delete = element.get("$patch").and_then(Value::as_str) == Some("delete");
        match (found, delete) {
            (Some(i), true) => {
                items.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic(&mut items[i], element)?,
            (None, false) => {
                let mut new = Value::Null;
                strategic(&mut new, element)?;
                items.push(new);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge(&mut doc, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}}));
        let mut doc = json!({"list": [1, 2]});
        merge(&mut doc, &json!({"list": [3]}));
        assert_eq!(doc, json!({"list": [3]}));
    }

    #[test]
    fn strategic_merge_merges_containers_by_name_and_maps_by_key() {
        let mut pod = json!({
            "metadata": {"labels": {"app": "web", "tier": "a"}},
            "spec": {"containers": [
                {"name": "app", "image": "one", "env": [{"name": "A", "value": "1"}]},
                {"name": "side", "image": "s"}
            ]}
        });
        let patch = json!({
            "metadata": {"labels": {"tier": null, "new": "yes"}},
            "spec": {
                "$setElementOrder/containers": [{"name": "side"}, {"name": "app"}],
                "containers": [
                    {"name": "app", "image": "two", "env": [{"name": "B", "value": "2"}]}
                ]
            }
        });
        apply(&mut pod, &patch, PatchType::StrategicMerge).unwrap();
        assert_eq!(
            pod["metadata"]["labels"],
            json!({"app": "web", "new": "yes"})
        );
        let containers = pod["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers[0]["name"], "side");
        assert_eq!(containers[1]["image"], "two");
        assert_eq!(
            containers[1]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])
        );
        let delete = json!({"spec": {"containers": [{"name": "side", "$patch": "delete"}]}});
        apply(&mut pod, &delete, PatchType::StrategicMerge).unwrap();
        assert_eq!(pod["spec"]["containers"].as_array().unwrap().len(), 1);
        // ConfigMap data: a map, merged by key; args (no merge key): replaced.
        let mut cm = json!({"data": {"a": "1", "b": "2"}, "args": ["x", "y"]});
        apply(
            &mut cm,
            &json!({"data": {"b": null, "c": "3"}, "args": ["z"]}),
            PatchType::StrategicMerge,
        )
        .unwrap();
        assert_eq!(cm, json!({"data": {"a": "1", "c": "3"}, "args": ["z"]}));
        assert!(apply(&mut cm, &json!({"$unknown": 1}), PatchType::StrategicMerge).is_err());
    }
}
