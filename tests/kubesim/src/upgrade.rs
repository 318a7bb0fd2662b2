//! HTTP/1.1 upgrade handling: recognising WebSocket and SPDY upgrade requests, the 101
//! response, and handing the upgraded connection to a WebSocket session.
//!
//! Contract: a WebSocket upgrade is answered `101` with `Upgrade: websocket`,
//! `Connection: Upgrade`, the RFC 6455 `Sec-WebSocket-Accept` and, when one was negotiated,
//! `Sec-WebSocket-Protocol` (no extensions). Refusals are ordinary responses with a
//! Kubernetes Status body (see `crate::http`).

use std::future::Future;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::status::ApiError;

/// The upgraded connection type every WebSocket session runs on.
pub type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// `Connection: upgrade` + `Upgrade: websocket`.
pub fn is_websocket(headers: &HeaderMap) -> bool {
    has_token(headers, header::CONNECTION, "upgrade")
        && has_token(headers, header::UPGRADE, "websocket")
}

/// `Upgrade: SPDY/3.1` (kubectl's fallback path).
pub fn is_spdy(headers: &HeaderMap) -> bool {
    has_token(headers, header::UPGRADE, "spdy/3.1")
}

/// The comma-separated values of header `name` in order, over repeated headers, trimmed and
/// without empty ones.
fn list(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The offered subprotocols, in order (comma lists and repeated headers both allowed).
pub fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    list(headers, "sec-websocket-protocol")
}

/// Checks the handshake headers and returns the `Sec-WebSocket-Accept` value.
pub fn accept_key(headers: &HeaderMap) -> Result<String, ApiError> {
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        != Some("13")
    {
        return Err(ApiError::bad_request(
            "unsupported or missing Sec-WebSocket-Version (need 13)",
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| ApiError::bad_request("missing Sec-WebSocket-Key"))?;
    Ok(derive_accept_key(key.as_bytes()))
}

/// The offered `X-Stream-Protocol-Version`s of a SPDY upgrade, in order.
pub fn offered_stream_protocols(headers: &HeaderMap) -> Vec<String> {
    list(headers, "x-stream-protocol-version")
}

/// Picks the first offered SPDY stream protocol that is `supported` (as the kubelet's
/// `httpstream.Handshake` does); `Err` is the 403 the kubelet answers, naming what it accepts.
pub fn negotiate_stream_protocol(
    headers: &HeaderMap,
    supported: &[&'static str],
) -> Result<&'static str, ApiError> {
    let offered = offered_stream_protocols(headers);
    offered
        .iter()
        .find_map(|o| supported.iter().find(|s| **s == o.as_str()).copied())
        .ok_or_else(|| {
            ApiError::forbidden(format!(
                "unable to upgrade connection: none of the offered stream protocols [{}] is supported (supported: {})",
                offered.join(", "),
                supported.join(", ")
            ))
        })
}

/// Answers `req` with the SPDY/3.1 101 naming `protocol` and runs `session` on the upgraded
/// connection in a new task.
pub fn upgrade_spdy<B, F, Fut>(
    req: Request<Incoming>,
    protocol: &'static str,
    session: F,
) -> Response<B>
where
    B: Default,
    F: FnOnce(Upgraded) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut resp = Response::new(B::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        "x-stream-protocol-version",
        HeaderValue::from_static(protocol),
    );
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => session(TokioIo::new(upgraded)).await,
            Err(e) => tracing::warn!(error = %e, "SPDY upgrade failed"),
        }
    });
    resp
}

/// Answers `req` with 101 and runs `session` on the upgraded WebSocket in a new task.
pub fn upgrade<B, F, Fut>(
    req: Request<Incoming>,
    subprotocol: Option<&str>,
    session: F,
) -> Result<Response<B>, ApiError>
where
    B: Default,
    F: FnOnce(WebSocketStream<Upgraded>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let accept = accept_key(req.headers())?;
    let mut resp = Response::new(B::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    if let Some(p) = subprotocol {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(p).map_err(|_| ApiError::bad_request("invalid subprotocol"))?,
        );
    }
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                session(ws).await;
            }
            Err(e) => tracing::warn!(error = %e, "upgrade failed"),
        }
    });
    Ok(resp)
}
