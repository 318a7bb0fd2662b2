//! Which request headers from the control plane reach the Kubernetes API, and which response
//! headers go back.
//!
//! Names and values were already validated by tether-core (no CR, LF, NUL; names are tokens); this
//! module only decides what passes.

/// Hop-by-hop headers (RFC 9110 §7.6.1 and the usual extras): never forwarded either way. `Host` is
/// also dropped toward the API (the agent sets its own).
const HOP_BY_HOP: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

/// Whether lowercase header `name` is hop-by-hop ([`HOP_BY_HOP`]): for other proxies of the
/// adapter (the control plane's replica-to-replica hop).
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// Request headers for the Kubernetes API, from the control plane's `headers`.
///
/// Dropped: hop-by-hop headers and every name listed in `Connection`, `Host`, `Content-Length`
/// (the agent frames the body itself), and every `Sec-WebSocket-*` header (the agent's own
/// WebSocket handshake sets key, version, extensions and the offered subprotocols). `Authorization`
/// is kept here; [`with_authorization`] decides the credential. Everything else passes, including
/// `Impersonate-*`, `Accept`, `User-Agent`, `Kubectl-*` and repeated headers in order.
pub fn forward_request_headers<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
) -> Vec<(String, String)> {
    let connection_listed: Vec<String> = headers
        .clone()
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !s.is_empty())
        .collect();
    headers
        .into_iter()
        .filter(|(name, _)| {
            let lower = name.to_ascii_lowercase();
            !(HOP_BY_HOP.contains(&lower.as_str())
                || lower == "host"
                || lower == "content-length"
                || lower.starts_with("sec-websocket-")
                || connection_listed.contains(&lower))
        })
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// Makes sure the request carries exactly one credential: the control plane's `Authorization` when
/// it sent one (any case), else `Bearer <own_token>` when the agent has a token, else none.
pub fn with_authorization(headers: &mut Vec<(String, String)>, own_token: Option<&str>) {
    let mut seen = false;
    headers.retain(|(n, _)| {
        if n.eq_ignore_ascii_case("authorization") {
            // Keep the first one only: two credentials would be ambiguous.
            let keep = !seen;
            seen = true;
            keep
        } else {
            true
        }
    });
    if !seen && let Some(token) = own_token {
        headers.push(("Authorization".to_string(), format!("Bearer {token}")));
    }
}

/// Response headers to send back: hop-by-hop headers and names listed in `Connection` dropped.
pub fn forward_response_headers<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])> + Clone,
) -> Vec<(String, Vec<u8>)> {
    let connection_listed: Vec<String> = headers
        .clone()
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    headers
        .into_iter()
        .filter(|(name, _)| {
            let lower = name.to_ascii_lowercase();
            !(HOP_BY_HOP.contains(&lower.as_str()) || connection_listed.contains(&lower))
        })
        .map(|(n, v)| (n.to_string(), v.to_vec()))
        .collect()
}

/// The subprotocols to offer upstream: the `protocol` field's list first, then every
/// `Sec-WebSocket-Protocol` value, comma-split, trimmed, de-duplicated, in order.
pub fn offered_subprotocols<'a>(
    protocol: Option<&str>,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let from_headers = headers
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-protocol"))
        .map(|(_, v)| v);
    for list in protocol.into_iter().chain(from_headers) {
        for item in list.split(',').map(|s| s.trim_matches([' ', '\t'])) {
            if !item.is_empty() && !out.iter().any(|o| o == item) {
                out.push(item.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(h: &[(String, String)]) -> Vec<&str> {
        h.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn hop_by_hop_and_websocket_headers_are_stripped() {
        let input = [
            ("Connection", "Upgrade, X-Secret-Hop"),
            ("Upgrade", "websocket"),
            ("Host", "control-plane.example"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Proxy-Authorization", "Basic eA=="),
            ("TE", "trailers"),
            ("Content-Length", "12"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"),
            ("sec-websocket-extensions", "permessage-deflate"),
            ("X-Secret-Hop", "1"),
            ("Impersonate-User", "alice"),
            ("Impersonate-Group", "dev"),
            ("Impersonate-Group", "ops"),
            ("Impersonate-Extra-Scopes", "view"),
            ("Authorization", "Bearer from-control-plane"),
            ("Accept", "application/json"),
            ("User-Agent", "kubectl/v1.32.4"),
            ("Kubectl-Command", "kubectl exec"),
        ];
        let out = forward_request_headers(input);
        assert_eq!(
            names(&out),
            [
                "Impersonate-User",
                "Impersonate-Group",
                "Impersonate-Group",
                "Impersonate-Extra-Scopes",
                "Authorization",
                "Accept",
                "User-Agent",
                "Kubectl-Command"
            ]
        );
        assert_eq!(out[2].1, "ops");
    }

    #[test]
    fn control_plane_authorization_wins_else_own_token() {
        let mut h = forward_request_headers([("authorization", "Bearer cp"), ("Accept", "*/*")]);
        with_authorization(&mut h, Some("own"));
        assert_eq!(
            h,
            [
                ("authorization".to_string(), "Bearer cp".to_string()),
                ("Accept".to_string(), "*/*".to_string())
            ]
        );
        let mut h = forward_request_headers([("Accept", "*/*")]);
        with_authorization(&mut h, Some("own"));
        assert_eq!(
            h[1],
            ("Authorization".to_string(), "Bearer own".to_string())
        );
        let mut h = forward_request_headers([("Accept", "*/*")]);
        with_authorization(&mut h, None);
        assert_eq!(h.len(), 1);
        // Two credentials: only the first is kept.
        let mut h =
            forward_request_headers([("Authorization", "Bearer a"), ("AUTHORIZATION", "Bearer b")]);
        with_authorization(&mut h, Some("own"));
        assert_eq!(h, [("Authorization".to_string(), "Bearer a".to_string())]);
    }

    #[test]
    fn response_headers_drop_hop_by_hop() {
        let input: [(&str, &[u8]); 4] = [
            ("Content-Type", b"application/json"),
            ("Transfer-Encoding", b"chunked"),
            ("Connection", b"close"),
            ("Audit-Id", b"42"),
        ];
        let out = forward_response_headers(input);
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["Content-Type", "Audit-Id"]);
    }

    #[test]
    fn subprotocols_are_merged_in_order() {
        let out = offered_subprotocols(
            Some("v5.channel.k8s.io, v4.channel.k8s.io"),
            [
                ("Sec-WebSocket-Protocol", "v4.channel.k8s.io,channel.k8s.io"),
                ("Accept", "x"),
            ],
        );
        assert_eq!(
            out,
            ["v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io"]
        );
        assert!(offered_subprotocols(None, []).is_empty());
    }
}
