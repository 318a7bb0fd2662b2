//! The object store behind the API: pods and ConfigMaps as JSON, with one resourceVersion
//! counter, LIST pagination, selectors and watches.
//!
//! Contract:
//! * Every write (create, update, delete) takes the next resourceVersion, stamps it on the
//!   object (`metadata.resourceVersion`) and records an event (`ADDED`, `MODIFIED`, `DELETED`).
//! * [`Store::list`] returns objects sorted by namespace then name, filtered by namespace,
//!   label selector (`k=v`, `k!=v`, `k`, `!k`, comma = and) and field selector
//!   (`metadata.name`, `metadata.namespace`, `=`/`==`/`!=`), `limit` at a time with an opaque
//!   `continue` token and `remainingItemCount`; the list's resourceVersion is the store's.
//! * [`Store::watch`] replays the events after a resourceVersion (the last [`HISTORY`] are
//!   kept; older is `410 Gone`, as the API server answers, and kubectl relists) and then
//!   delivers new ones in order.
//! * Pods live here as their user-visible part; the runtime (processes, status) is in
//!   [`crate::pods`], which renders status on read.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::status::ApiError;

/// Events kept for watches that start from an older resourceVersion.
pub const HISTORY: usize = 1000;

/// A resource kubesim stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// `pods`.
    Pods,
    /// `configmaps`.
    ConfigMaps,
}

impl Resource {
    /// From the URL segment.
    pub fn from_plural(plural: &str) -> Option<Self> {
        match plural {
            "pods" => Some(Self::Pods),
            "configmaps" => Some(Self::ConfigMaps),
            _ => None,
        }
    }

    /// The URL segment, as in errors (`pods "x" not found`).
    pub fn plural(self) -> &'static str {
        match self {
            Self::Pods => "pods",
            Self::ConfigMaps => "configmaps",
        }
    }

    /// The `kind` of one object.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Pods => "Pod",
            Self::ConfigMaps => "ConfigMap",
        }
    }
}

/// Where an object lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// Its resource.
    pub resource: Resource,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// A watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Deleted (the object as it was last).
    Deleted,
}

impl EventType {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change.
#[derive(Debug, Clone)]
pub struct Event {
    /// The resourceVersion the change took.
    pub rv: u64,
    /// Which object.
    pub key: Key,
    /// What happened.
    pub kind: EventType,
    /// The object after the change (before it, for a delete).
    pub object: Value,
}

/// A page of a LIST.
#[derive(Debug)]
pub struct Page {
    /// The objects.
    pub items: Vec<Value>,
    /// The store's resourceVersion at the time of the list.
    pub rv: u64,
    /// The token for the next page, when there is one.
    pub next: Option<String>,
    /// Objects after this page.
    pub remaining: usize,
}

/// Every event from now on, in resourceVersion order.
pub type Live = broadcast::Receiver<Arc<Event>>;

/// What to list.
#[derive(Debug, Default, Clone)]
pub struct ListOptions {
    /// `labelSelector`.
    pub labels: Option<String>,
    /// `fieldSelector`.
    pub fields: Option<String>,
    /// `limit` (0: everything).
    pub limit: usize,
    /// `continue`.
    pub continue_token: Option<String>,
}

struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Event>>,
    next_uid: u64,
}

/// The store; cheap to share behind an `Arc`.
pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<Event>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store at resourceVersion 1.
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                next_uid: 1,
            }),
            events: broadcast::channel(4096).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.lock().rv
    }

    /// The object at `key`.
    pub fn get(&self, key: &Key) -> Result<Value, ApiError> {
        self.lock()
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(key.resource.plural(), &key.name))
    }

    /// Creates `object` at `key`: sets kind, apiVersion, name, namespace, uid,
    /// creationTimestamp and resourceVersion. `409 AlreadyExists` when the name is taken.
    pub fn create(&self, key: &Key, mut object: Value) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        if inner.objects.contains_key(key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{}\" already exists", key.resource.plural(), key.name),
            ));
        }
        let uid = format!("00000000-0000-4000-9000-{:012x}", inner.next_uid);
        inner.next_uid += 1;
        inner.rv += 1;
        let rv = inner.rv;
        object["kind"] = json!(key.resource.kind());
        object["apiVersion"] = json!("v1");
        let meta = &mut object["metadata"];
        if !meta.is_object() {
            *meta = json!({});
        }
        meta["name"] = json!(key.name);
        meta["namespace"] = json!(key.namespace);
        meta["uid"] = json!(uid);
        meta["creationTimestamp"] = json!(crate::pods::now_rfc3339());
        meta["resourceVersion"] = json!(rv.to_string());
        if let Some(m) = meta.as_object_mut() {
            m.remove("generateName");
        }
        inner.objects.insert(key.clone(), object.clone());
        self.record(&mut inner, key, EventType::Added, object.clone());
        Ok(object)
    }

    /// Changes the object at `key` with `change` (which may refuse), keeping its identity
    /// (name, namespace, uid, creationTimestamp) and taking a new resourceVersion.
    pub fn update(
        &self,
        key: &Key,
        change: impl FnOnce(&mut Value) -> Result<(), ApiError>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let Some(old) = inner.objects.get(key).cloned() else {
            return Err(ApiError::not_found(key.resource.plural(), &key.name));
        };
        let mut object = old.clone();
        change(&mut object)?;
        object["kind"] = old["kind"].clone();
        object["apiVersion"] = old["apiVersion"].clone();
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        for field in ["name", "namespace", "uid", "creationTimestamp"] {
            object["metadata"][field] = old["metadata"][field].clone();
        }
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.objects.insert(key.clone(), object.clone());
        self.record(&mut inner, key, EventType::Modified, object.clone());
        Ok(object)
    }

    /// Deletes the object at `key`; returns it as it was.
    pub fn delete(&self, key: &Key) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let Some(mut object) = inner.objects.remove(key) else {
            return Err(ApiError::not_found(key.resource.plural(), &key.name));
        };
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(&mut inner, key, EventType::Deleted, object.clone());
        Ok(object)
    }

    fn record(&self, inner: &mut Inner, key: &Key, kind: EventType, object: Value) {
        let event = Arc::new(Event {
            rv: inner.rv,
            key: key.clone(),
            kind,
            object,
        });
        if inner.history.len() == HISTORY {
            inner.history.pop_front();
        }
        inner.history.push_back(event.clone());
        // Sent under the lock, so subscribers see events in resourceVersion order.
        let _ = self.events.send(event);
    }

    /// A page of `resource` objects in `namespace` (all namespaces for `None`).
    pub fn list(
        &self,
        resource: Resource,
        namespace: Option<&str>,
        opts: &ListOptions,
    ) -> Result<Page, ApiError> {
        let filter = Filter::new(resource, namespace, opts)?;
        let after = match &opts.continue_token {
            Some(token) => Some(decode_continue(token)?),
            None => None,
        };
        let inner = self.lock();
        let matching: Vec<(&Key, &Value)> = inner
            .objects
            .iter()
            .filter(|(k, v)| filter.matches(k, v))
            .filter(|(k, _)| {
                after
                    .as_ref()
                    .is_none_or(|(ns, name)| (&k.namespace, &k.name) > (ns, name))
            })
            .collect();
        let take = if opts.limit == 0 {
            matching.len()
        } else {
            opts.limit.min(matching.len())
        };
        let remaining = matching.len() - take;
        let next = (remaining > 0).then(|| {
            let (k, _) = matching[take - 1];
            encode_continue(&k.namespace, &k.name)
        });
        Ok(Page {
            items: matching[..take].iter().map(|(_, v)| (*v).clone()).collect(),
            rv: inner.rv,
            next,
            remaining,
        })
    }

    /// The events after `from` that `filter` matches, then a receiver of every later event
    /// (filter those with [`Filter::matches`]). `410 Gone` when `from` is older than the
    /// kept history.
    pub fn watch(&self, from: u64, filter: &Filter) -> Result<(Vec<Arc<Event>>, Live), ApiError> {
        let inner = self.lock();
        let rx = self.events.subscribe();
        let oldest = inner.history.front().map_or(inner.rv, |e| e.rv - 1);
        if from < oldest {
            return Err(ApiError::new(
                410,
                "Expired",
                format!("too old resource version: {from} ({oldest})"),
            ));
        }
        let replay = inner
            .history
            .iter()
            .filter(|e| e.rv > from && filter.matches(&e.key, &e.object))
            .cloned()
            .collect();
        Ok((replay, rx))
    }
}

/// Which objects a LIST or watch selects.
#[derive(Debug, Clone)]
pub struct Filter {
    resource: Resource,
    namespace: Option<String>,
    labels: Vec<(String, Op, Option<String>)>,
    fields: Vec<(String, Op, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Exists,
    Absent,
}

impl Filter {
    /// Parses the selectors of `opts`; `400` for one kubesim cannot evaluate.
    pub fn new(
        resource: Resource,
        namespace: Option<&str>,
        opts: &ListOptions,
    ) -> Result<Self, ApiError> {
        let mut labels = Vec::new();
        for term in opts.labels.iter().flat_map(|s| s.split(',')) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            labels.push(match split_term(term) {
                Some((k, op, v)) => (k, op, Some(v)),
                None if term.starts_with('!') => (term[1..].to_string(), Op::Absent, None),
                None if is_label_key(term) => (term.to_string(), Op::Exists, None),
                None => {
                    return Err(ApiError::bad_request(format!(
                        "unable to parse requirement: {term:?} (kubesim supports =, ==, !=, key and !key)"
                    )));
                }
            });
        }
        let mut fields = Vec::new();
        for term in opts.fields.iter().flat_map(|s| s.split(',')) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let Some((k, op, v)) = split_term(term) else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector {term:?}"
                )));
            };
            if !matches!(k.as_str(), "metadata.name" | "metadata.namespace") {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {k}"
                )));
            }
            fields.push((k, op, v));
        }
        Ok(Self {
            resource,
            namespace: namespace.map(str::to_string),
            labels,
            fields,
        })
    }

    /// Whether the object `object` at `key` is selected.
    pub fn matches(&self, key: &Key, object: &Value) -> bool {
        if key.resource != self.resource {
            return false;
        }
        if self
            .namespace
            .as_ref()
            .is_some_and(|ns| *ns != key.namespace)
        {
            return false;
        }
        let label = |k: &str| object["metadata"]["labels"][k].as_str().map(str::to_string);
        let labels_ok = self.labels.iter().all(|(k, op, v)| match op {
            Op::Eq => label(k) == *v,
            Op::Ne => label(k) != *v,
            Op::Exists => label(k).is_some(),
            Op::Absent => label(k).is_none(),
        });
        let fields_ok = self.fields.iter().all(|(k, op, v)| {
            let actual = if k == "metadata.name" {
                &key.name
            } else {
                &key.namespace
            };
            (actual == v) == (*op == Op::Eq)
        });
        labels_ok && fields_ok
    }
}

fn split_term(term: &str) -> Option<(String, Op, String)> {
    for (sep, op) in [("!=", Op::Ne), ("==", Op::Eq), ("=", Op::Eq)] {
        if let Some((k, v)) = term.split_once(sep) {
            return Some((k.trim().to_string(), op, v.trim().to_string()));
        }
    }
    None
}

fn is_label_key(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn encode_continue(namespace: &str, name: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&json!([namespace, name])).expect("JSON"))
}

fn decode_continue(token: &str) -> Result<(String, String), ApiError> {
    let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let (ns, name): (String, String) = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    Ok((ns, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        Key {
            resource: Resource::ConfigMaps,
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[test]
    fn writes_take_resource_versions_and_record_events() {
        let store = Store::new();
        let a = store
            .create(&key("a"), json!({"data": {"x": "1"}}))
            .unwrap();
        assert_eq!(a["metadata"]["resourceVersion"], "2");
        assert_eq!(a["kind"], "ConfigMap");
        assert_eq!(store.create(&key("a"), json!({})).unwrap_err().code, 409);
        let filter = Filter::new(
            Resource::ConfigMaps,
            Some("default"),
            &ListOptions::default(),
        )
        .unwrap();
        let (_, mut rx) = store.watch(store.rv(), &filter).unwrap();
        let b = store
            .update(&key("a"), |o| {
                o["data"]["x"] = json!("2");
                o["metadata"]["uid"] = json!("forged");
                Ok(())
            })
            .unwrap();
        assert_eq!(b["metadata"]["uid"], a["metadata"]["uid"]);
        assert_eq!(b["metadata"]["resourceVersion"], "3");
        store.delete(&key("a")).unwrap();
        let first = rx.try_recv().unwrap();
        assert_eq!((first.kind, first.rv), (EventType::Modified, 3));
        assert_eq!(rx.try_recv().unwrap().kind, EventType::Deleted);
        // A watch from rv 2 replays both changes.
        let (replay, _) = store.watch(2, &filter).unwrap();
        assert_eq!(replay.len(), 2);
        assert_eq!(store.get(&key("a")).unwrap_err().code, 404);
    }

    #[test]
    fn lists_page_with_continue_and_select_by_label_and_field() {
        let store = Store::new();
        for (i, name) in ["c", "a", "b", "d", "e"].iter().enumerate() {
            let tier = if i % 2 == 0 { "x" } else { "y" };
            store
                .create(&key(name), json!({"metadata": {"labels": {"tier": tier}}}))
                .unwrap();
        }
        let mut opts = ListOptions {
            limit: 2,
            ..ListOptions::default()
        };
        let mut names = Vec::new();
        loop {
            let page = store.list(Resource::ConfigMaps, None, &opts).unwrap();
            names.extend(page.items.iter().map(|i| i["metadata"]["name"].clone()));
            match page.next {
                Some(next) => {
                    assert_eq!(page.remaining, 5 - names.len());
                    opts.continue_token = Some(next);
                }
                None => break,
            }
        }
        assert_eq!(names, ["a", "b", "c", "d", "e"]);
        let select = |labels: &str, fields: &str| {
            let opts = ListOptions {
                labels: Some(labels.into()),
                fields: Some(fields.into()),
                ..ListOptions::default()
            };
            let page = store
                .list(Resource::ConfigMaps, Some("default"), &opts)
                .unwrap();
            page.items
                .iter()
                .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(select("tier=x", ""), ["b", "c", "e"]);
        assert_eq!(select("tier!=x", "metadata.name!=a"), ["d"]);
        assert_eq!(select("", "metadata.name=e"), ["e"]);
        assert_eq!(select("!tier", ""), Vec::<String>::new());
        assert!(
            store
                .list(
                    Resource::ConfigMaps,
                    None,
                    &ListOptions {
                        continue_token: Some("%%".into()),
                        ..ListOptions::default()
                    }
                )
                .is_err()
        );
    }
}
