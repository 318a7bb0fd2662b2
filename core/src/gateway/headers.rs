//! Which client headers reach the agent, and the impersonation header the control plane sets.

use crate::relay::{RequestError, validate_header_name, validate_header_value};
use crate::wire::HeaderList;

/// Request headers never forwarded to the agent (compared ignoring ASCII case): hop-by-hop headers,
/// the client's own credentials (the agent authenticates upstream with its own), `Host`, and the
/// WebSocket handshake headers the agent's dialer generates itself. `Sec-WebSocket-Protocol` travels
/// in the start's `protocol` field instead.
pub const DROPPED_HEADERS: &[&str] = &[
    "authorization",
    "connection",
    "content-length",
    "host",
    "http2-settings",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "sec-websocket-accept",
    "sec-websocket-extensions",
    "sec-websocket-key",
    "sec-websocket-protocol",
    "sec-websocket-version",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Prefix of the impersonation headers (`Impersonate-User`, `-Group`, `-Uid`, `-Extra-*`): every
/// client-sent one is dropped; only the control plane sets `Impersonate-User`.
pub const IMPERSONATE_PREFIX: &str = "impersonate-";

/// Whether a client request header named `name` is forwarded to the agent.
#[must_use]
pub fn is_forwarded(name: &[u8]) -> bool {
    let prefix = IMPERSONATE_PREFIX.as_bytes();
    let impersonate =
        name.len() >= prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(prefix);
    !impersonate
        && !DROPPED_HEADERS
            .iter()
            .any(|d| d.as_bytes().eq_ignore_ascii_case(name))
}

/// The client's headers as they reach the agent: [`is_forwarded`] ones in order, then
/// `Impersonate-User: <user>` when a user is given and one `Impersonate-Group` per group (only
/// with a user), then `Authorization: <bearer>` when the agent
/// needs the control plane to authenticate for it (a PipeOps agent's `k8s_service_token`).
#[derive(Clone, Copy)]
pub(crate) struct Forwarded<'a> {
    pub(crate) inner: &'a dyn HeaderList,
    pub(crate) user: Option<&'a str>,
    pub(crate) groups: &'a [&'a str],
    pub(crate) bearer: Option<&'a str>,
}

impl core::fmt::Debug for Forwarded<'_> {
    // The bearer is a credential: never printed.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Forwarded")
            .field("inner", &self.inner)
            .field("user", &self.user)
            .field("groups", &self.groups)
            .field("bearer", &self.bearer.map(|_| "<redacted>"))
            .finish()
    }
}

impl Forwarded<'_> {
    fn groups(&self) -> &[&str] {
        if self.user.is_some() {
            self.groups
        } else {
            &[]
        }
    }

    fn kept(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        (0..self.inner.count())
            .map(|i| self.inner.pair(i))
            .filter(|(name, _)| is_forwarded(name))
    }

    /// Checks every forwarded name and value (and the user) so nothing can inject into the upstream
    /// request.
    pub(crate) fn validate(&self) -> Result<(), RequestError> {
        for (name, value) in self.kept() {
            let name = core::str::from_utf8(name).map_err(|_| RequestError::HeaderName)?;
            let value = core::str::from_utf8(value).map_err(|_| RequestError::HeaderValue)?;
            validate_header_name(name.chars())?;
            validate_header_value(value.chars())?;
        }
        if let Some(user) = self.user {
            if user.is_empty() {
                return Err(RequestError::HeaderValue);
            }
            validate_header_value(user.chars())?;
        }
        for group in self.groups() {
            if group.is_empty() {
                return Err(RequestError::HeaderValue);
            }
            validate_header_value(group.chars())?;
        }
        Ok(())
    }
}

impl HeaderList for Forwarded<'_> {
    fn count(&self) -> usize {
        self.kept().count()
            + usize::from(self.user.is_some())
            + self.groups().len()
            + usize::from(self.bearer.is_some())
    }

    fn pair(&self, i: usize) -> (&[u8], &[u8]) {
        let user = self.user.map(|u| (&b"Impersonate-User"[..], u.as_bytes()));
        let groups = self
            .groups()
            .iter()
            .map(|g| (&b"Impersonate-Group"[..], g.as_bytes()));
        let bearer = self.bearer.map(|b| (&b"Authorization"[..], b.as_bytes()));
        self.kept()
            .chain(user)
            .chain(groups)
            .chain(bearer)
            .nth(i)
            .unwrap_or((&[], &[]))
    }
}
