//! Checks on what a `proxy_websocket_start` asks the agent to dial: path, query, headers,
//! subprotocols. Anything that could leave the Kubernetes API or inject into the upstream HTTP
//! request is refused.

use core::fmt;

/// Why a start request was refused before any dial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RequestError {
    /// The path is not a Kubernetes API path (see [`validate_path`]).
    Path,
    /// The query contains a byte that is not visible ASCII, or `#`.
    Query,
    /// A header name is not an HTTP token.
    HeaderName,
    /// A header value contains CR, LF, NUL or another control character other than tab.
    HeaderValue,
    /// An offered subprotocol is empty or has a space, control, non-ASCII or `,` character.
    Subprotocol,
    /// A raw upgrade's method is not `GET` or `POST`, or its token is not `name[/version]` of
    /// HTTP tokens, or is `websocket` (that takes the WebSocket path).
    Upgrade,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Path => "invalid path: must be a Kubernetes API path",
            Self::Query => "invalid query: control, space, non-ASCII or '#' character",
            Self::HeaderName => "invalid header name",
            Self::HeaderValue => "invalid header value: control character",
            Self::Subprotocol => "invalid subprotocol name",
            Self::Upgrade => {
                "invalid upgrade: GET or POST with an Upgrade token other than websocket"
            }
        })
    }
}

impl core::error::Error for RequestError {}

/// First path segments the agent dials, exactly or followed by `/...` (`/version` and `/version/`
/// match, `/versionx` does not).
const ROOTS: [&str; 6] = ["api", "apis", "version", "healthz", "readyz", "livez"];

/// Accepts only Kubernetes API paths, stricter than the incumbent's `isValidK8sAPIPath`:
///
/// * every character is visible ASCII (no space, CR, LF, NUL, other controls, or non-ASCII);
/// * no `%` (no percent-decoding tricks), `\`, `?` or `#`, no `..` and no `//` anywhere;
/// * the first segment is `api`, `apis`, `version`, `healthz`, `readyz` or `livez` (the path may
///   end there), or the path starts with `/openapi/`.
///
/// Takes the unescaped characters, so a JSON-escaped `\r\n` is seen as CR LF.
///
/// # Errors
/// [`RequestError::Path`] if any rule is broken.
pub fn validate_path(path: impl IntoIterator<Item = char>) -> Result<(), RequestError> {
    let mut chars = path.into_iter();
    if chars.next() != Some('/') {
        return Err(RequestError::Path);
    }
    let mut root = heapless::String::<8>::new();
    let mut root_done = false;
    let mut prev = '/';
    for c in chars {
        let bad = !c.is_ascii_graphic() || matches!(c, '%' | '\\' | '?' | '#');
        if bad || (prev == '.' && c == '.') || (prev == '/' && c == '/') {
            return Err(RequestError::Path);
        }
        if !root_done {
            if c == '/' {
                root_done = true;
            } else if root.push(c).is_err() {
                return Err(RequestError::Path);
            }
        }
        prev = c;
    }
    let root = root.as_str();
    if ROOTS.contains(&root) || (root == "openapi" && root_done) {
        Ok(())
    } else {
        Err(RequestError::Path)
    }
}

/// Accepts a raw query string (without `?`) made of visible ASCII other than `#`. Percent-escapes
/// are allowed: the query goes to the API server as is.
///
/// # Errors
/// [`RequestError::Query`] otherwise.
pub fn validate_query(query: impl IntoIterator<Item = char>) -> Result<(), RequestError> {
    if query.into_iter().all(|c| c.is_ascii_graphic() && c != '#') {
        Ok(())
    } else {
        Err(RequestError::Query)
    }
}

/// Accepts an RFC 9110 token: header names.
///
/// # Errors
/// [`RequestError::HeaderName`] otherwise.
pub fn validate_header_name(name: impl IntoIterator<Item = char>) -> Result<(), RequestError> {
    let mut empty = true;
    for c in name {
        empty = false;
        if !(c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)) {
            return Err(RequestError::HeaderName);
        }
    }
    if empty {
        Err(RequestError::HeaderName)
    } else {
        Ok(())
    }
}

/// Accepts a raw (non-WebSocket) HTTP/1.1 upgrade: `method` is `GET` or `POST` (kubectl's SPDY
/// requests are `POST`) and `token` is one `Upgrade` protocol, `name` or `name/version` made of
/// HTTP tokens, other than `websocket` (e.g. `SPDY/3.1`).
///
/// # Errors
/// [`RequestError::Upgrade`] otherwise.
pub fn validate_upgrade(method: &str, token: &str) -> Result<(), RequestError> {
    let token_ok = |t: &str| validate_header_name(t.chars()).is_ok();
    let protocol_ok = match token.split_once('/') {
        Some((name, version)) => token_ok(name) && token_ok(version),
        None => token_ok(token) && !token.eq_ignore_ascii_case("websocket"),
    };
    if matches!(method, "GET" | "POST") && protocol_ok {
        Ok(())
    } else {
        Err(RequestError::Upgrade)
    }
}

/// Accepts a header value without control characters other than horizontal tab (so no CR, LF or
/// NUL: no header injection).
///
/// # Errors
/// [`RequestError::HeaderValue`] otherwise.
pub fn validate_header_value(value: impl IntoIterator<Item = char>) -> Result<(), RequestError> {
    if value.into_iter().any(|c| c.is_control() && c != '\t') {
        Err(RequestError::HeaderValue)
    } else {
        Ok(())
    }
}

/// Accepts a subprotocol name: non-empty visible ASCII without `,` (the list separator). Looser
/// than RFC 6455's token because Kubernetes itself offers `SPDY/3.1+portforward.k8s.io`.
///
/// # Errors
/// [`RequestError::Subprotocol`] otherwise.
pub fn validate_subprotocol(name: impl IntoIterator<Item = char>) -> Result<(), RequestError> {
    let mut empty = true;
    for c in name {
        empty = false;
        if !c.is_ascii_graphic() || c == ',' {
            return Err(RequestError::Subprotocol);
        }
    }
    if empty {
        Err(RequestError::Subprotocol)
    } else {
        Ok(())
    }
}

/// Accepts a comma-separated list of subprotocols (a `protocol` field or a `Sec-WebSocket-Protocol`
/// header value): each item, trimmed of spaces and tabs, must pass [`validate_subprotocol`].
///
/// # Errors
/// [`RequestError::Subprotocol`] otherwise (including an empty item).
pub fn validate_subprotocol_list(list: impl IntoIterator<Item = char>) -> Result<(), RequestError> {
    // Per item: nothing seen yet, inside the name, or trailing blanks after it.
    #[derive(PartialEq)]
    enum At {
        Start,
        Name,
        Trailing,
    }
    let mut at = At::Start;
    for c in list {
        match (c, &at) {
            (',', At::Name | At::Trailing) => at = At::Start,
            (' ' | '\t', At::Start | At::Trailing) => {}
            (' ' | '\t', At::Name) => at = At::Trailing,
            (c, At::Start | At::Name) if c.is_ascii_graphic() && c != ',' => at = At::Name,
            _ => return Err(RequestError::Subprotocol),
        }
    }
    if at == At::Start {
        Err(RequestError::Subprotocol)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_paths_pass() {
        for p in [
            "/api",
            "/apis",
            "/api/v1/namespaces/default/pods/web-0/exec",
            "/apis/apps/v1/deployments",
            "/version",
            "/version/",
            "/healthz",
            "/healthz/etcd",
            "/readyz",
            "/livez",
            "/openapi/v3",
        ] {
            assert_eq!(validate_path(p.chars()), Ok(()), "{p}");
        }
    }

    #[test]
    fn other_paths_fail() {
        for p in [
            "",
            "/",
            "api/v1",
            "/apix",
            "/versionx",
            "/openapi",
            "/metrics",
            "/api/v1/../../etc/passwd",
            "/api/v1/%2e%2e/x",
            "/api\\v1",
            "/api//v1",
            "/api/v1\r\nHost: evil",
            "/api/v1\0",
            "/api/v1 x",
            "/api/v1?x=1",
            "/api/v1#frag",
            "/api/v1/ström",
        ] {
            assert_eq!(validate_path(p.chars()), Err(RequestError::Path), "{p:?}");
        }
    }

    #[test]
    fn queries() {
        assert_eq!(validate_query("".chars()), Ok(()));
        assert_eq!(
            validate_query("command=sh&command=echo%20hi&stdin=true&tty=true".chars()),
            Ok(())
        );
        for q in ["a=b\r\nX: y", "a=b c", "a=\0", "a#b"] {
            assert_eq!(validate_query(q.chars()), Err(RequestError::Query), "{q:?}");
        }
    }

    #[test]
    fn headers_and_subprotocols() {
        assert_eq!(validate_header_name("Authorization".chars()), Ok(()));
        assert_eq!(validate_header_value("Bearer abc.def".chars()), Ok(()));
        assert_eq!(validate_header_value("a\tb".chars()), Ok(()));
        for n in ["", "Bad Name", "X\r\nEvil", "X:"] {
            assert_eq!(
                validate_header_name(n.chars()),
                Err(RequestError::HeaderName),
                "{n:?}"
            );
        }
        for v in ["a\r\nX-Evil: 1", "a\nb", "a\0b", "a\rb"] {
            assert_eq!(
                validate_header_value(v.chars()),
                Err(RequestError::HeaderValue),
                "{v:?}"
            );
        }
        assert_eq!(validate_subprotocol("v5.channel.k8s.io".chars()), Ok(()));
        assert_eq!(
            validate_subprotocol("SPDY/3.1+portforward.k8s.io".chars()),
            Ok(())
        );
        for sp in ["", "a b", "a,b", "a\r\nb"] {
            assert_eq!(
                validate_subprotocol(sp.chars()),
                Err(RequestError::Subprotocol),
                "{sp:?}"
            );
        }
        for list in [
            "v5.channel.k8s.io",
            "v5.channel.k8s.io, v4.channel.k8s.io",
            " a ,b\t",
        ] {
            assert_eq!(validate_subprotocol_list(list.chars()), Ok(()), "{list:?}");
        }
        for list in ["", " ", "a,", ",a", "a,,b", "a b", "a\r\n,b"] {
            assert_eq!(
                validate_subprotocol_list(list.chars()),
                Err(RequestError::Subprotocol),
                "{list:?}"
            );
        }
    }
}
