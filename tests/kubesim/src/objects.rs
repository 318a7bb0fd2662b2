//! The REST verbs on stored resources (pods, ConfigMaps), as kubectl uses them: LIST (with
//! `limit`/`continue`, selectors, Tables), WATCH (`watch=true`, events as JSON lines, Tables
//! per event), GET, POST (create), PUT (replace, with resourceVersion preconditions), PATCH
//! (merge and strategic merge) and DELETE.
//!
//! Contract: request bodies are JSON (kubectl converts YAML itself), at most [`MAX_BODY`]; a
//! body's namespace must match the URL's. Pods are created and deleted through [`Pods`] (so their
//! processes start and stop); every other change is on the stored object only.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::http::{Body, State, ok_json};
use crate::patch::{self, PatchType};
use crate::pods::Pods;
use crate::query::Query;
use crate::status::ApiError;
use crate::store::{Event, EventType, Filter, Key, ListOptions, Resource};

/// Largest request body accepted (the API server's own limit is 3 MiB per object; kubesim
/// takes more so large bodies can be carried through tunnels in tests).
pub const MAX_BODY: usize = 64 << 20;

/// `/api/v1[/namespaces/NS]/RESOURCE`: LIST, WATCH or POST.
pub async fn collection(
    state: &Arc<State>,
    resource: Resource,
    namespace: Option<&str>,
    req: Request<Incoming>,
    table: bool,
) -> Result<Response<Body>, ApiError> {
    let query = Query::parse(req.uri().query());
    match *req.method() {
        Method::GET | Method::HEAD => {
            let opts = ListOptions {
                labels: query.get("labelSelector").map(str::to_string),
                fields: query.get("fieldSelector").map(str::to_string),
                limit: match query.get("limit") {
                    Some(l) => l
                        .parse()
                        .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
                    None => 0,
                },
                continue_token: query
                    .get("continue")
                    .filter(|c| !c.is_empty())
                    .map(str::to_string),
            };
            if matches!(query.get("watch"), Some("true" | "1")) {
                watch(state, resource, namespace, &opts, &query, table)
            } else {
                list(state, resource, namespace, &opts, table)
            }
        }
        Method::POST => {
            let Some(ns) = namespace else {
                return Err(ApiError::method_not_allowed());
            };
            let body = body_json(req).await?;
            check_namespace(&body, ns)?;
            let created = match resource {
                Resource::Pods => state.pods.create(ns, body)?,
                Resource::ConfigMaps => {
                    let name = body["metadata"]["name"].as_str().unwrap_or_default();
                    if !crate::config::is_dns_subdomain(name) {
                        return Err(ApiError::new(
                            422,
                            "Invalid",
                            format!(
                                "ConfigMap {name:?} is invalid: metadata.name: must be a DNS subdomain"
                            ),
                        ));
                    }
                    let key = key(resource, ns, name);
                    state.store.create(&key, body)?
                }
            };
            Ok(with_status(ok_json(&created), 201))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// `/api/v1/namespaces/NS/RESOURCE/NAME`: GET, PUT, PATCH, DELETE.
pub async fn object(
    state: &Arc<State>,
    resource: Resource,
    ns: &str,
    name: &str,
    req: Request<Incoming>,
    table: bool,
) -> Result<Response<Body>, ApiError> {
    let key = key(resource, ns, name);
    let render = |v: &Value| render(&state.pods, resource, v);
    match req.method().clone() {
        Method::GET | Method::HEAD => {
            let object = render(&state.store.get(&key)?);
            if table {
                let now = crate::pods::unix_now();
                Ok(ok_json(&crate::table::of(
                    resource,
                    &[object],
                    now,
                    state.store.rv(),
                )))
            } else {
                Ok(ok_json(&object))
            }
        }
        Method::PUT => {
            let body = body_json(req).await?;
            check_namespace(&body, ns)?;
            if body["metadata"]["name"].as_str().is_some_and(|n| n != name) {
                return Err(ApiError::bad_request(
                    "the name of the object does not match the name on the URL",
                ));
            }
            let updated = state.store.update(&key, |current| {
                let wanted = body["metadata"]["resourceVersion"].as_str();
                let have = current["metadata"]["resourceVersion"].as_str();
                if wanted.is_some_and(|w| Some(w) != have) {
                    return Err(conflict(resource, name));
                }
                *current = body.clone();
                if let Some(o) = current.as_object_mut() {
                    o.remove("status");
                }
                Ok(())
            })?;
            Ok(ok_json(&render(&updated)))
        }
        Method::PATCH => {
            let content_type = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let Some(kind) = PatchType::from_content_type(&content_type) else {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"
                    ),
                ));
            };
            let body = body_json(req).await?;
            let updated = state.store.update(&key, |current| {
                let wanted = body["metadata"]["resourceVersion"]
                    .as_str()
                    .map(str::to_string);
                let have = current["metadata"]["resourceVersion"]
                    .as_str()
                    .map(str::to_string);
                if wanted.is_some() && wanted != have {
                    return Err(conflict(resource, name));
                }
                patch::apply(current, &body, kind).map_err(ApiError::bad_request)?;
                if let Some(o) = current.as_object_mut() {
                    o.remove("status");
                }
                Ok(())
            })?;
            Ok(ok_json(&render(&updated)))
        }
        Method::DELETE => {
            let deleted = match resource {
                Resource::Pods => state.pods.delete(ns, name)?,
                Resource::ConfigMaps => state.store.delete(&key)?,
            };
            Ok(ok_json(&deleted))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn key(resource: Resource, ns: &str, name: &str) -> Key {
    Key {
        resource,
        namespace: ns.to_string(),
        name: name.to_string(),
    }
}

fn conflict(resource: Resource, name: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            resource.plural()
        ),
    )
}

fn with_status(mut resp: Response<Body>, code: u16) -> Response<Body> {
    *resp.status_mut() = hyper::StatusCode::from_u16(code).expect("valid status");
    resp
}

fn render(pods: &Pods, resource: Resource, object: &Value) -> Value {
    match resource {
        Resource::Pods => pods.render(object),
        Resource::ConfigMaps => object.clone(),
    }
}

fn check_namespace(body: &Value, ns: &str) -> Result<(), ApiError> {
    match body["metadata"]["namespace"].as_str() {
        Some(given) if !given.is_empty() && given != ns => Err(ApiError::bad_request(format!(
            "the namespace of the provided object ({given}) does not match the namespace sent on the request ({ns})"
        ))),
        _ => Ok(()),
    }
}

async fn body_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::new(413, "RequestEntityTooLarge", format!("request body: {e}")))?
        .to_bytes();
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not JSON: {e}")))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(ApiError::bad_request(
            "the request body is not a JSON object",
        ))
    }
}

fn list(
    state: &Arc<State>,
    resource: Resource,
    namespace: Option<&str>,
    opts: &ListOptions,
    table: bool,
) -> Result<Response<Body>, ApiError> {
    let page = state.store.list(resource, namespace, opts)?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|o| render(&state.pods, resource, o))
        .collect();
    let mut list = if table {
        crate::table::of(resource, &items, crate::pods::unix_now(), page.rv)
    } else {
        json!({
            "kind": format!("{}List", resource.kind()),
            "apiVersion": "v1",
            "metadata": {"resourceVersion": page.rv.to_string()},
            "items": items,
        })
    };
    if let Some(next) = page.next {
        list["metadata"]["continue"] = json!(next);
        list["metadata"]["remainingItemCount"] = json!(page.remaining);
    }
    Ok(ok_json(&list))
}

fn watch(
    state: &Arc<State>,
    resource: Resource,
    namespace: Option<&str>,
    opts: &ListOptions,
    query: &Query,
    table: bool,
) -> Result<Response<Body>, ApiError> {
    let filter = Filter::new(resource, namespace, opts)?;
    let from = match query.get("resourceVersion") {
        None | Some("" | "0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    // Without a resourceVersion a watch starts with the current objects, as ADDED events, then
    // every change after the resourceVersion of that list (none lost in between).
    let (initial, from) = match from {
        None => {
            let all = ListOptions {
                limit: 0,
                continue_token: None,
                ..opts.clone()
            };
            let page = state.store.list(resource, namespace, &all)?;
            (page.items, page.rv)
        }
        Some(rv) => (Vec::new(), rv),
    };
    let (replay, live) = state.store.watch(from, &filter)?;
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let state = state.clone();
    tokio::spawn(async move {
        let feed = async {
            for object in initial {
                let line = event_line(&state, resource, "ADDED", &object, table);
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            for event in replay {
                if !send_event(&state, &tx, resource, &event, table).await {
                    return;
                }
            }
            follow(&state, &tx, live, &filter, resource, table).await;
        };
        match timeout {
            Some(t) => {
                let _ = tokio::time::timeout(t, feed).await;
            }
            None => feed.await,
        }
    });
    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
    }));
    let mut resp = Response::new(body.boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// Sends live events until the client goes away. A watcher that fell too far behind is ended
/// (it relists), as the API server does.
async fn follow(
    state: &Arc<State>,
    tx: &mpsc::Sender<Bytes>,
    mut live: broadcast::Receiver<Arc<Event>>,
    filter: &Filter,
    resource: Resource,
    table: bool,
) {
    loop {
        let event = match live.recv().await {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => {
                return;
            }
        };
        if filter.matches(&event.key, &event.object)
            && !send_event(state, tx, resource, &event, table).await
        {
            return;
        }
    }
}

async fn send_event(
    state: &Arc<State>,
    tx: &mpsc::Sender<Bytes>,
    resource: Resource,
    event: &Event,
    table: bool,
) -> bool {
    let object = match event.kind {
        // A deleted pod is gone from the runtime: send it as it was.
        EventType::Deleted => event.object.clone(),
        _ => render(&state.pods, resource, &event.object),
    };
    let line = event_line(state, resource, event.kind.name(), &object, table);
    tx.send(line).await.is_ok()
}

fn event_line(
    state: &Arc<State>,
    resource: Resource,
    kind: &str,
    object: &Value,
    table: bool,
) -> Bytes {
    let object = if table {
        let rv = object["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| state.store.rv());
        crate::table::of(
            resource,
            std::slice::from_ref(object),
            crate::pods::unix_now(),
            rv,
        )
    } else {
        object.clone()
    };
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("JSON");
    line.push(b'\n');
    Bytes::from(line)
}
