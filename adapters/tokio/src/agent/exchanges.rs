//! The HTTP side of the agent's driver: requests started from `proxy_request`, their request
//! bodies fed to the request task, their responses relayed under the control plane's credit.
//! Runs under the driver's lock like the rest of [`Core`]; encoded responses go to the writer's
//! queue in order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tether_core::relay::TunnelError;
use tether_core::request::{RequestBody, RequestStart, ResponseError};
use tether_core::wire::Body;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::Shared;
use super::driver::{Core, header_pairs, json_string, stream_spec};
use super::http::{self, AbortOnDrop, BodyGate, FromHttp, HttpSpec};
use super::metrics::StreamKind;
use crate::kube::headers;
use crate::tunnel_driver::unix_now;

/// Request body chunks queued per request task (beyond this tunnel reading pauses).
const BODY_QUEUE: usize = 16;

/// Largest response body buffered for a client that did not ask for streamed responses.
const MAX_BUFFERED_RESPONSE: usize = 8 << 20;

struct Buffered {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// One HTTP request in flight.
pub(crate) struct HttpHandle {
    _task: AbortOnDrop,
    /// Where the streamed request body goes, until `proxy_request_stream_end`.
    pub(super) body: Option<mpsc::Sender<Bytes>>,
    buffered: Option<Buffered>,
    /// Response body read while the control plane's credit for it was used up
    /// (`response_credit`), in order; the task does not read more meanwhile.
    stash: VecDeque<Bytes>,
    /// The response ended while `stash` still held body: end it once that is out.
    ended: bool,
    /// Stops and resumes the task's reading of the response body.
    gate: Arc<BodyGate>,
}

impl Core {
    pub(super) fn start_request(&mut self, shared: &Shared, start: RequestStart<'_>) {
        let id = start.id.as_str().to_string();
        if start.websocket {
            let now = shared.now();
            let started = self.relay.start_stream(
                now,
                &start.id,
                start.path,
                start.query,
                start.headers,
                start.protocol,
            );
            match started {
                Ok(s) => {
                    let spec =
                        stream_spec(s.stream.as_str(), s.path, s.query, s.headers, s.protocol);
                    self.spawn_stream(shared, spec, true);
                }
                Err(e) => {
                    let status = match e {
                        TunnelError::DuplicateStream => 409,
                        TunnelError::TooManyStreams | TunnelError::Blocked => 503,
                        _ => 400,
                    };
                    let _ = self.requests.upgrade_failed(&id, status, &e.to_string());
                }
            }
            return;
        }
        let header_pairs = header_pairs(start.headers);
        let headers = headers::forward_request_headers(
            header_pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        );
        let (body, body_tx) = match start.body {
            RequestBody::None => (http::RequestBody::Empty, None),
            RequestBody::Inline(b) => (http::RequestBody::Full(Some(self.inline_body(b))), None),
            RequestBody::Streamed => {
                let (tx, rx) = mpsc::channel(BODY_QUEUE);
                (http::RequestBody::Stream(rx), Some(tx))
            }
        };
        let Some(reports) = self.reports.clone() else {
            return;
        };
        let spec = HttpSpec {
            id: id.clone(),
            method: start.method,
            path: json_string(start.path),
            query: json_string(start.query),
            headers,
            body,
        };
        let gate = Arc::new(BodyGate::default());
        let run = http::run(shared.kube.clone(), spec, reports, gate.clone());
        let task = tokio::spawn(shared.metrics.timed(StreamKind::Http, run));
        self.http.insert(
            id,
            HttpHandle {
                _task: AbortOnDrop::new(task),
                body: body_tx,
                buffered: None,
                stash: VecDeque::new(),
                ended: false,
                gate,
            },
        );
    }

    fn inline_body(&mut self, body: Body<'_>) -> Bytes {
        match body {
            Body::Text(s) => Bytes::from(json_string(s)),
            Body::Json(v) => {
                let raw = match v {
                    tether_core::wire::json::JsonValue::Object(o) => o.raw(),
                    tether_core::wire::json::JsonValue::Array(a) => a.raw(),
                    _ => "",
                };
                Bytes::copy_from_slice(raw.as_bytes())
            }
            Body::Base64(b) => match b.decode_into(&mut self.scratch) {
                Ok(bytes) => Bytes::copy_from_slice(bytes),
                Err(e) => {
                    // The wire decoder accepted the envelope; a bad body is the sender's bug.
                    warn!("inline request body is not valid base64 ({e}); sending it empty");
                    Bytes::new()
                }
            },
        }
    }

    /// A request task's report.
    pub(super) fn on_http(&mut self, shared: &Shared, report: FromHttp) {
        match report {
            FromHttp::Header {
                id,
                status,
                headers,
            } => match self.requests.is_streaming(&id) {
                Some(true) => {
                    let unix = unix_now();
                    let pairs: Vec<(&[u8], &[u8])> = headers
                        .iter()
                        .map(|(n, v)| (n.as_bytes(), v.as_slice()))
                        .collect();
                    let list: &[(&[u8], &[u8])] = &pairs;
                    let r = self.requests.encode_response_header(
                        &id,
                        status,
                        &list,
                        unix,
                        &mut self.txbuf,
                    );
                    self.response_written(&id, r.map(|n| (0, n)));
                }
                Some(false) => {
                    if let Some(h) = self.http.get_mut(&id) {
                        h.buffered = Some(Buffered {
                            status,
                            headers,
                            body: Vec::new(),
                        });
                    }
                }
                None => {
                    self.http.remove(&id);
                }
            },
            FromHttp::Chunk { id, data } => {
                shared
                    .metrics
                    .response_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                if let Some(b) = self.http.get_mut(&id).and_then(|h| h.buffered.as_mut()) {
                    if b.body.len() + data.len() > MAX_BUFFERED_RESPONSE {
                        let unix = unix_now();
                        let r = self.requests.encode_response_failed(
                            &id,
                            502,
                            "response too large for a buffered proxy_response; ask for supports_response_streaming",
                            unix,
                            &mut self.txbuf,
                        );
                        self.http.remove(&id);
                        self.response_written(&id, r.map(|n| (0, n)));
                    } else {
                        b.body.extend_from_slice(&data);
                    }
                    return;
                }
                if let Some(h) = self.http.get_mut(&id)
                    && !h.stash.is_empty()
                {
                    h.stash.push_back(data);
                    return;
                }
                self.send_body(&id, data);
            }
            FromHttp::End { id } => {
                if let Some(h) = self.http.get_mut(&id)
                    && !h.stash.is_empty()
                {
                    h.ended = true;
                    return;
                }
                let unix = unix_now();
                let buffered = self.http.remove(&id).and_then(|h| h.buffered);
                let r = match buffered {
                    Some(b) => {
                        let pairs: Vec<(&[u8], &[u8])> = b
                            .headers
                            .iter()
                            .map(|(n, v)| (n.as_bytes(), v.as_slice()))
                            .collect();
                        let list: &[(&[u8], &[u8])] = &pairs;
                        self.requests.encode_response(
                            &id,
                            b.status,
                            &list,
                            &b.body,
                            unix,
                            &mut self.txbuf,
                        )
                    }
                    None => self
                        .requests
                        .encode_response_end(&id, unix, &mut self.txbuf),
                };
                self.response_written(&id, r.map(|n| (0, n)));
            }
            FromHttp::Failed {
                id,
                status,
                message,
            } => {
                shared
                    .metrics
                    .upstream_errors
                    .fetch_add(1, Ordering::Relaxed);
                self.http.remove(&id);
                let unix = unix_now();
                let r = self.requests.encode_response_failed(
                    &id,
                    status,
                    &message,
                    unix,
                    &mut self.txbuf,
                );
                self.response_written(&id, r.map(|n| (0, n)));
            }
        }
    }

    /// Sends `data` as response chunks of request `id` while its credit allows; what does not
    /// fit is stashed and the task stops reading the body until the next grant.
    fn send_body(&mut self, id: &str, data: Bytes) {
        let mut at = 0;
        while at < data.len() {
            if !self.requests.may_send_chunk(id) {
                debug!(request = id, "response credit used up: body paused");
                if let Some(h) = self.http.get_mut(id) {
                    h.gate.paused.store(true, Ordering::Release);
                    h.stash.push_front(data.slice(at..));
                }
                return;
            }
            let unix = unix_now();
            let r = self
                .requests
                .encode_response_chunk(id, &data[at..], unix, &mut self.txbuf);
            let used = match &r {
                Ok((used, _)) => *used,
                Err(_) => data.len() - at,
            };
            if !self.response_written(id, r) {
                return;
            }
            at += used;
        }
    }

    /// After a grant: sends what request `id` stashed as its credit allows; once the stash is
    /// empty the task reads on (or the response ends, if it already did).
    pub(super) fn drain_stash(&mut self, id: &str) {
        loop {
            // Out of credit again (what did not fit went back to the front): wait for the next
            // grant.
            if !self.requests.may_send_chunk(id) {
                return;
            }
            let Some(chunk) = self.http.get_mut(id).and_then(|h| h.stash.pop_front()) else {
                break;
            };
            self.send_body(id, chunk);
        }
        let Some(h) = self.http.get_mut(id) else {
            return;
        };
        if h.ended {
            self.http.remove(id);
            let unix = unix_now();
            let r = self.requests.encode_response_end(id, unix, &mut self.txbuf);
            self.response_written(id, r.map(|n| (0, n)));
        } else if self.requests.may_send_chunk(id) {
            h.gate.paused.store(false, Ordering::Release);
            h.gate.resume.notify_one();
        }
    }

    /// Queues an encoded response message; returns whether the request is still live.
    pub(super) fn response_written(
        &mut self,
        id: &str,
        result: Result<(usize, usize), ResponseError>,
    ) -> bool {
        match result {
            Ok((_, n)) => {
                self.push_txbuf(n);
                true
            }
            Err(ResponseError::UnknownRequest) => {
                // Cancelled or timed out: stop its upstream work.
                self.http.remove(id);
                false
            }
            Err(e) => {
                warn!(request = id, "cannot relay the response: {e}");
                self.http.remove(id);
                false
            }
        }
    }
}
