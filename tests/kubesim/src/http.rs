//! HTTP routing: authentication, request recording, and dispatch to discovery, pods, exec,
//! attach, port-forward and logs.
//!
//! Contract:
//! * Every request is recorded first (see [`crate::record`]).
//! * With a token configured, `Authorization: Bearer <token>` is required (constant-time
//!   comparison); otherwise 401 with a Status body.
//! * Routes (GET unless noted): `/version`, `/api`, `/apis`, `/api/v1`, `/api/v1/namespaces`,
//!   `/api/v1/namespaces/{ns}`, `/api/v1/pods`, `/api/v1/namespaces/{ns}/pods`,
//!   `/api/v1/namespaces/{ns}/pods/{name}`, `.../{name}/log`, and the upgrades
//!   `.../{name}/exec|attach|portforward`. Unknown paths: 404 Status.
//! * Upgrades: a WebSocket GET is validated (pod, container, query) and its subprotocol
//!   negotiated; failures get a non-101 Status (kubectl then retries with SPDY). A SPDY
//!   upgrade (kubectl's fallback `POST`) is validated the same way and then refused with 403
//!   Forbidden, as the API server refuses an upgrade it cannot negotiate. A streaming
//!   subresource requested without any upgrade gets 400 "Upgrade request required".

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::mpsc;

use crate::channel::Protocol;
use crate::exec::StreamOptions;
use crate::pods::{Pod, Pods};
use crate::query::Query;
use crate::record::{RecordedRequest, Recorder};
use crate::session::Session;
use crate::status::ApiError;
use crate::store::Resource;

/// Response body type.
pub type Body = BoxBody<Bytes, Infallible>;

/// Shared server state.
pub struct State {
    /// Recorded requests.
    pub recorder: Recorder,
    /// Required bearer token.
    pub token: Option<String>,
    /// The pods' processes.
    pub pods: Pods,
    /// Every stored object (pods, ConfigMaps).
    pub store: Arc<crate::store::Store>,
    /// Address advertised in `/api`.
    pub advertise: String,
    /// Refuse WebSocket upgrades, as an API server older than 1.30 (kubectl falls back to SPDY).
    pub no_websocket: bool,
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(code: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub(crate) fn ok_json(value: &serde_json::Value) -> Response<Body> {
    json_response(
        StatusCode::OK,
        serde_json::to_vec(value).expect("JSON serialises"),
    )
}

/// The response for an [`ApiError`].
pub fn error_response(err: &ApiError) -> Response<Body> {
    json_response(
        StatusCode::from_u16(err.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        err.to_json(),
    )
}

/// Constant-time equality (the length is not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(state: &State, req: &Request<Incoming>) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let prefix = b"Bearer ";
    value.len() > prefix.len()
        && value[..prefix.len()].eq_ignore_ascii_case(prefix)
        && ct_eq(&value[prefix.len()..], token.as_bytes())
}

/// Handles one request (hyper service function).
pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    state.recorder.record(RecordedRequest::from_parts(&parts));
    let req = Request::from_parts(parts, body);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = if authorized(&state, &req) {
        match route(&state, req).await {
            Ok(resp) => resp,
            Err(err) => error_response(&err),
        }
    } else {
        error_response(&ApiError::unauthorized())
    };
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "response");
    Ok(resp)
}

async fn route(state: &Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    let table = crate::table::wants_table(
        req.headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let get_only = |resp: Response<Body>| -> Result<Response<Body>, ApiError> {
        if req.method() == Method::GET || req.method() == Method::HEAD {
            Ok(resp)
        } else {
            Err(ApiError::method_not_allowed())
        }
    };
    match segs.as_slice() {
        ["version"] => get_only(ok_json(&crate::discovery::version())),
        ["api"] => get_only(ok_json(&crate::discovery::api(&state.advertise))),
        ["apis"] => get_only(ok_json(&crate::discovery::apis())),
        ["api", "v1"] => get_only(ok_json(&crate::discovery::api_v1())),
        ["openapi", "v3"] => get_only(ok_json(&crate::discovery::openapi_v3_root())),
        ["openapi", "v3", "api", "v1"] => get_only(ok_json(&crate::discovery::openapi_v3_api_v1())),
        ["healthz" | "livez" | "readyz"] => get_only(Response::new(full("ok"))),
        ["apis", "authentication.k8s.io", "v1"] => {
            get_only(ok_json(&crate::discovery::authentication_v1()))
        }
        ["apis", "authentication.k8s.io", "v1", "selfsubjectreviews"] => {
            if req.method() != Method::POST {
                return Err(ApiError::method_not_allowed());
            }
            let review = crate::discovery::self_subject_review(req.headers());
            Ok(json_response(
                StatusCode::CREATED,
                serde_json::to_vec(&review).expect("JSON serialises"),
            ))
        }
        ["api", "v1", "namespaces"] => get_only(ok_json(&state.pods.namespace_list_json())),
        ["api", "v1", "namespaces", ns] => get_only(ok_json(&state.pods.namespace_json(ns)?)),
        ["api", "v1", plural] if Resource::from_plural(plural).is_some() => {
            let resource = Resource::from_plural(plural).expect("checked");
            crate::objects::collection(state, resource, None, req, table).await
        }
        ["api", "v1", "namespaces", ns, plural] if Resource::from_plural(plural).is_some() => {
            let resource = Resource::from_plural(plural).expect("checked");
            crate::objects::collection(state, resource, Some(ns), req, table).await
        }
        ["api", "v1", "namespaces", ns, plural, name]
            if Resource::from_plural(plural).is_some() =>
        {
            let resource = Resource::from_plural(plural).expect("checked");
            crate::objects::object(state, resource, ns, name, req, table).await
        }
        ["api", "v1", "namespaces", ns, "pods", name, "log"] => {
            if req.method() != Method::GET {
                return Err(ApiError::method_not_allowed());
            }
            let pod = state.pods.get(ns, name)?;
            logs(&pod, &Query::parse(req.uri().query()))
        }
        [
            "api",
            "v1",
            "namespaces",
            ns,
            "pods",
            name,
            sub @ ("exec" | "attach" | "portforward"),
        ] => {
            let pod = state.pods.get(ns, name)?;
            streaming(pod, sub, req, state.no_websocket)
        }
        _ => Err(ApiError::no_route()),
    }
}

fn logs(pod: &Pod, query: &Query) -> Result<Response<Body>, ApiError> {
    let (container, opts) = crate::logs::prepare(pod, query)?;
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    tokio::spawn(crate::logs::stream(container, opts, tx));
    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
    }));
    let mut resp = Response::new(body.boxed());
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(resp)
}

fn streaming(
    pod: Arc<Pod>,
    sub: &str,
    req: Request<Incoming>,
    no_websocket: bool,
) -> Result<Response<Body>, ApiError> {
    let websocket = crate::upgrade::is_websocket(req.headers());
    let spdy = !websocket && crate::upgrade::is_spdy(req.headers());
    let allowed = if websocket {
        req.method() == Method::GET
    } else {
        req.method() == Method::GET || req.method() == Method::POST
    };
    if !allowed {
        return Err(ApiError::method_not_allowed());
    }
    if websocket && no_websocket {
        return Err(ApiError::bad_request(
            "WebSocket upgrades are not supported by this server (an API server older than 1.30): use SPDY",
        ));
    }
    let query = Query::parse(req.uri().query());
    let offered = crate::upgrade::offered_protocols(req.headers());
    let offered: Vec<&str> = offered.iter().map(String::as_str).collect();

    if sub == "portforward" {
        if pod.phase() != "Running" {
            return Err(ApiError::bad_request(format!(
                "pod {} is not running",
                pod.spec.name
            )));
        }
        if spdy {
            let chosen = crate::upgrade::negotiate_stream_protocol(
                req.headers(),
                &[crate::portforward::SPDY_STREAM_PROTOCOL],
            )?;
            return Ok(crate::upgrade::upgrade_spdy(
                req,
                chosen,
                crate::portforward::serve_spdy,
            ));
        }
        if !websocket {
            return Err(refuse_non_upgrade());
        }
        let negotiated = crate::portforward::negotiate(&offered, req.uri().query())
            .map_err(|r| refusal(r.status(), r.message()))?;
        let subprotocol = negotiated.subprotocol().map(str::to_string);
        return crate::upgrade::upgrade(req, subprotocol.as_deref(), move |ws| {
            crate::portforward::serve(ws, negotiated)
        });
    }

    let opts = StreamOptions::parse(&query, sub == "exec")?;
    let container = pod.container(opts.container.as_deref())?.clone();
    if container.exit_code().is_some() {
        return Err(ApiError::bad_request(format!(
            "container {} is not running in pod {}",
            container.name(),
            pod.spec.name
        )));
    }
    let is_exec = sub == "exec";
    let channels = opts.spdy_channels();
    let dir = pod.dir.clone();
    let env = Pod::env(&pod.spec, container.name());
    let run = move |started| async move {
        if is_exec {
            crate::exec::serve(started, opts, dir, env).await;
        } else {
            crate::attach::serve(started, opts, container).await;
        }
    };
    if spdy {
        let chosen = crate::upgrade::negotiate_stream_protocol(
            req.headers(),
            &[crate::channel::SPDY_PROTOCOL],
        )?;
        return Ok(crate::upgrade::upgrade_spdy(
            req,
            chosen,
            move |io| async move {
                match Session::start_spdy(io, &channels).await {
                    Ok(started) => run(started).await,
                    Err(e) => tracing::warn!(error = %e, "SPDY session setup failed"),
                }
            },
        ));
    }
    if !websocket {
        return Err(refuse_non_upgrade());
    }
    let Some((protocol, subprotocol)) = Protocol::negotiate(&offered) else {
        return Err(ApiError::forbidden(format!(
            "unable to upgrade connection: none of the offered WebSocket subprotocols [{}] is supported (supported: {})",
            offered.join(", "),
            crate::channel::SUPPORTED.join(", ")
        )));
    };
    crate::upgrade::upgrade(req, subprotocol, move |ws| {
        run(Session::start(ws, protocol))
    })
}

fn refuse_non_upgrade() -> ApiError {
    ApiError::bad_request("Upgrade request required")
}

fn refusal(code: u16, message: &str) -> ApiError {
    let reason = match code {
        400 => "BadRequest",
        403 => "Forbidden",
        404 => "NotFound",
        _ => "InternalError",
    };
    ApiError::new(code, reason, message)
}
