//! A raw (non-WebSocket) HTTP/1.1 upgrade to the Kubernetes API, such as kubectl's SPDY/3.1
//! `exec`, `attach` and `port-forward`: the request goes out with its method, `Upgrade` token and
//! offered `X-Stream-Protocol-Version`s; after the upstream's 101 the connection is an opaque byte
//! pipe. No SPDY is parsed here: bytes read become binary messages (their boundaries mean
//! nothing), messages written are bytes.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::header::{CONNECTION, CONTENT_LENGTH, HOST, HeaderValue, UPGRADE};
use hyper_util::rt::TokioIo;
use tether_core::relay::RawUpgrade;

use super::upstream::StreamSpec;
use crate::kube::{KubeTarget, headers};

/// The header that offers (request, repeated) and names (101 response) the stream protocol.
pub(crate) const STREAM_PROTOCOL: &str = "X-Stream-Protocol-Version";

/// Most of a refusal's body kept for the client's error.
const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// How long the upstream may take to send a refusal's body.
const REFUSAL_BODY_WAIT: Duration = Duration::from_secs(5);

/// The upgraded connection.
pub(crate) type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

/// Sends the upgrade request of `spec` (whose `raw` is `upgrade`); returns the upgraded
/// connection and the protocol the upstream chose, or the upstream's status and body text on
/// refusal (502 when there was no HTTP answer or the 101 names another protocol).
pub(crate) async fn dial(
    target: &KubeTarget,
    spec: &StreamSpec,
    upgrade: &RawUpgrade,
) -> Result<(Upgraded, Option<String>), (u16, String)> {
    let mut uri = spec.path.clone();
    if !spec.query.is_empty() {
        uri.push('?');
        uri.push_str(&spec.query);
    }
    let mut builder = hyper::Request::builder()
        .method(upgrade.method.as_str())
        .uri(uri)
        .header(HOST, target.authority())
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, upgrade.token.as_str())
        .header(CONTENT_LENGTH, "0");
    for protocol in &spec.protocols {
        builder = builder.header(STREAM_PROTOCOL, protocol.as_str());
    }
    let mut forwarded: Vec<(String, String)> = spec
        .headers
        .iter()
        .filter(|(name, _)| !name.eq_ignore_ascii_case(STREAM_PROTOCOL))
        .cloned()
        .collect();
    headers::with_authorization(&mut forwarded, target.own_token().as_deref());
    for (name, value) in &forwarded {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let request = builder
        .body(Empty::<Bytes>::new())
        .map_err(|e| (400, format!("invalid upstream request: {e}")))?;
    let (mut sender, connection) = super::http::handshake(target).await?;
    // Drives the exchange, then hands the connection over to the upgrade; ends with it.
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| (502, format!("Kubernetes API request failed: {e}")))?;
    let status = response.status();
    if status != hyper::StatusCode::SWITCHING_PROTOCOLS {
        return Err((status.as_u16(), refusal_text(response).await));
    }
    let upgraded_to = response
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok());
    if !upgraded_to.is_some_and(|v| v.trim().eq_ignore_ascii_case(&upgrade.token)) {
        return Err((
            502,
            format!(
                "the Kubernetes API answered 101 with Upgrade {upgraded_to:?}, not {:?}",
                upgrade.token.as_str()
            ),
        ));
    }
    let chosen = response
        .headers()
        .get(STREAM_PROTOCOL)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty());
    let upgraded = hyper::upgrade::on(response).await.map_err(|e| {
        (
            502,
            format!("upgrade of the Kubernetes API connection failed: {e}"),
        )
    })?;
    Ok((TokioIo::new(upgraded), chosen))
}

/// The refusal's body as text (a Kubernetes `Status` as the API sent it), or the reason phrase.
async fn refusal_text(response: hyper::Response<hyper::body::Incoming>) -> String {
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_REFUSAL_BODY).collect();
    let text = match tokio::time::timeout(REFUSAL_BODY_WAIT, body).await {
        Ok(Ok(body)) => String::from_utf8_lossy(&body.to_bytes()).trim().to_string(),
        _ => String::new(),
    };
    if text.is_empty() {
        status.canonical_reason().unwrap_or("refused").to_string()
    } else {
        text
    }
}
