//! The replica-to-replica hop: a user's request for a cluster whose tunnel another replica
//! holds, carried there whole (HTTP/1.1, body streamed both ways; upgrades spliced as bytes once
//! both sides have switched protocols).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::fleet::{Fleet, Owner, PEER_FROM_HEADER, PEER_TOKEN_HEADER};
use super::status::status_response;
use super::{Body, State};

/// Dial and handshake bound for a peer.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether request header `name` (lowercase) is not carried to the peer: hop-by-hop ones (an
/// upgrade's `Connection` and `Upgrade` are set again below), `Host`, and a client's own claim to
/// be a peer.
fn is_dropped(name: &str) -> bool {
    crate::kube::headers::is_hop_by_hop(name)
        || matches!(name, "host" | PEER_TOKEN_HEADER | PEER_FROM_HEADER)
}

/// Carries `req` for `cluster` to `owner` and answers with what the owner answered. A peer that
/// cannot be reached gets the user a 502 that names it.
pub(crate) async fn forward(
    state: Arc<State>,
    fleet: &Fleet,
    owner: Owner,
    cluster: &str,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let upgrade = req.headers().get(header::UPGRADE).cloned();
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let unreachable = |e: String| {
        tracing::warn!(cluster, replica = %owner.replica, url = %owner.url, error = %e, "peer replica unreachable");
        status_response(
            502,
            &format!(
                "the replica holding cluster \"{cluster}\"'s tunnel ({}) cannot be reached: {e}; its agent reconnects to a live replica within its backoff",
                owner.replica
            ),
        )
    };
    let mut sender = match dial(fleet, &owner.url).await {
        Ok(sender) => sender,
        Err(e) => return unreachable(e),
    };
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let mut out = Request::builder().method(parts.method.clone()).uri(path);
    for (name, value) in &parts.headers {
        if !is_dropped(name.as_str()) {
            out = out.header(name, value);
        }
    }
    let authority = owner
        .url
        .split_once("://")
        .map_or(owner.url.as_str(), |(_, rest)| rest)
        .trim_end_matches('/');
    out = out
        .header(header::HOST, authority)
        .header(PEER_TOKEN_HEADER, fleet.peer_token())
        .header(PEER_FROM_HEADER, fleet.replica_id());
    if let Some(token) = &upgrade {
        out = out
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, token);
    }
    let body: Body = body.map_err(io::Error::other).boxed_unsync();
    let Ok(out) = out.body(body) else {
        return status_response(
            400,
            "request cannot be carried to the replica holding the cluster",
        );
    };
    let mut resp = match sender.send_request(out).await {
        Ok(resp) => resp,
        Err(e) => return unreachable(e.to_string()),
    };
    state.metrics.peer_forwarded();
    tracing::debug!(cluster, replica = %owner.replica, status = resp.status().as_u16(), "request carried to the replica holding the tunnel");
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let (Some(client_upgrade), true) = (client_upgrade, upgrade.is_some()) else {
            return status_response(502, "the replica switched protocols unasked");
        };
        let peer_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, peer_upgrade) {
                Ok((client, peer)) => {
                    let mut client = TokioIo::new(client);
                    let mut peer = TokioIo::new(peer);
                    // Bytes move as they come, both ways; each side's end reaches the other.
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut peer).await;
                }
                Err(e) => tracing::debug!(error = %e, "forwarded upgrade failed"),
            }
        });
    }
    let (mut parts, body) = resp.into_parts();
    if parts.status != StatusCode::SWITCHING_PROTOCOLS {
        for name in [
            "connection",
            "keep-alive",
            "transfer-encoding",
            "trailer",
            "upgrade",
        ] {
            parts.headers.remove(name);
        }
    }
    Response::from_parts(parts, body.map_err(io::Error::other).boxed_unsync())
}

type Sender = hyper::client::conn::http1::SendRequest<Body>;

/// One HTTP/1.1 connection to the peer at base URL `url` (TLS for `https`).
async fn dial(fleet: &Fleet, url: &str) -> Result<Sender, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(format!("unusable peer URL {url:?}"));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let uri: http::Uri = format!("http://{authority}")
        .parse()
        .map_err(|e| format!("unusable peer URL {url:?}: {e}"))?;
    let host = uri.host().unwrap_or_default().to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let connect = async {
        let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        if tls {
            let name = crate::kube::tls::server_name(&host)?;
            let stream = TlsConnector::from(fleet.peer_tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            handshake(stream).await
        } else {
            handshake(tcp).await
        }
    };
    tokio::time::timeout(DIAL_TIMEOUT, connect)
        .await
        .map_err(|_| format!("no answer within {} s", DIAL_TIMEOUT.as_secs()))?
}

async fn handshake<S>(io: S) -> Result<Sender, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "peer connection ended with an error");
        }
    });
    Ok(sender)
}

/// Whether a request claims to come from a peer, and if so whether the claim holds: `None` for
/// a user's own request, `Some(Ok(from))` for a verified peer, `Some(Err(()))` for a bad token.
pub(crate) fn peer_claim(
    fleet: Option<&Fleet>,
    headers: &http::HeaderMap,
) -> Option<Result<String, ()>> {
    let token = headers.get(PEER_TOKEN_HEADER)?;
    let from = headers
        .get(PEER_FROM_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string();
    Some(match fleet {
        Some(fleet) if fleet.is_peer(token.as_bytes()) => Ok(from),
        _ => Err(()),
    })
}
