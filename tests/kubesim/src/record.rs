//! Request recording: every request the server receives, for tests to inspect.

use std::sync::Mutex;

/// One received request (recorded before authentication).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: String,
    /// URL path (not decoded).
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Headers with lowercase names, in arrival order, values verbatim (lossy UTF-8).
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// Builds a record from request parts.
    pub fn from_parts(parts: &hyper::http::request::Parts) -> Self {
        Self {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().map(str::to_string),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
        }
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive), e.g. repeated `Impersonate-Group`.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Headers as a JSON array of `[name, value]`, with the Authorization credential redacted
    /// (this is what the `request` log event carries).
    pub fn headers_json_redacted(&self) -> String {
        let redacted: Vec<(&str, String)> = self
            .headers
            .iter()
            .map(|(n, v)| {
                let v = if n == "authorization" {
                    match v.split_once(' ') {
                        Some((scheme, _)) => format!("{scheme} <redacted>"),
                        None => "<redacted>".to_string(),
                    }
                } else {
                    v.clone()
                };
                (n.as_str(), v)
            })
            .collect();
        serde_json::to_string(&redacted).expect("headers serialise")
    }
}

/// Thread-safe append-only log of requests.
#[derive(Debug, Default)]
pub struct Recorder {
    requests: Mutex<Vec<RecordedRequest>>,
}

impl Recorder {
    /// Appends a request and emits the `request` log event
    /// (fields: `method`, `path`, `query`, `headers` = JSON array of `[name, value]`).
    pub fn record(&self, req: RecordedRequest) {
        tracing::info!(
            method = %req.method,
            path = %req.path,
            query = %req.query.as_deref().unwrap_or(""),
            headers = %req.headers_json_redacted(),
            "request"
        );
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(req);
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> Vec<RecordedRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
