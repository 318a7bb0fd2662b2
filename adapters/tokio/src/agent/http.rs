//! One task per `proxy_request`: the HTTP/1.1 exchange with the Kubernetes API (hyper over
//! rustls), the response streamed back to the session as it arrives. Dropping (aborting) the task
//! drops the connection: that is how `proxy_cancel` and timeouts really cancel.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use crate::kube::{KubeTarget, headers};

/// A request to send, owned (copied out of the tunnel message).
#[derive(Debug)]
pub(crate) struct HttpSpec {
    pub(crate) id: String,
    pub(crate) method: &'static str,
    pub(crate) path: String,
    pub(crate) query: String,
    /// Headers already filtered by [`headers::forward_request_headers`].
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: RequestBody,
}

/// The request body: none, whole, or streamed from `proxy_request_chunk`s (ends when the sender is
/// dropped at `proxy_request_stream_end`).
#[derive(Debug)]
pub(crate) enum RequestBody {
    Empty,
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Stream(rx) => rx.poll_recv(cx).map(|d| d.map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Full(d) => d.is_none(),
            Self::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            Self::Stream(_) => SizeHint::default(),
        }
    }
}

/// Aborts the wrapped task when dropped, unless [`detach`](Self::detach)ed.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    pub(crate) fn new(task: tokio::task::JoinHandle<()>) -> Self {
        Self(Some(task))
    }

    /// Lets the task run to its end on its own.
    pub(crate) fn detach(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// What a request task reports to the session, in order: `Header`, `Chunk`s, then `End` (or
/// `Failed` at any point).
#[derive(Debug)]
pub(crate) enum FromHttp {
    /// The HTTP response header.
    Header {
        id: String,
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
    },
    /// A piece of the HTTP response body.
    Chunk { id: String, data: Bytes },
    /// The HTTP response is complete.
    End { id: String },
    /// The HTTP exchange failed.
    Failed {
        id: String,
        status: u16,
        message: String,
    },
}

/// Stops and resumes a request task's reading of its response body (the control plane's credit
/// for it is used up, or granted again).
#[derive(Debug, Default)]
pub(crate) struct BodyGate {
    /// Do not read the response body.
    pub(crate) paused: std::sync::atomic::AtomicBool,
    /// Wakes the task when `paused` is cleared.
    pub(crate) resume: tokio::sync::Notify,
}

/// Sends the request and reports `Header`, `Chunk`s, then `End` (or `Failed`).
/// While `ctl.paused` (the control plane's credit for the body is used up) the body is not read.
pub(crate) async fn run(
    target: Arc<KubeTarget>,
    spec: HttpSpec,
    events: mpsc::Sender<FromHttp>,
    ctl: Arc<BodyGate>,
) {
    let id = spec.id.clone();
    let outcome = exchange(&target, spec, &events, &ctl).await;
    let event = match outcome {
        Ok(()) => FromHttp::End { id },
        Err((status, message)) => FromHttp::Failed {
            id,
            status,
            message,
        },
    };
    let _ = events.send(event).await;
}

/// A connection to the Kubernetes API, HTTP/1.1 handshake done: the request sender and the
/// connection future to drive; 502 with the reason when either step fails.
pub(crate) async fn handshake<B>(
    target: &KubeTarget,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<B>,
        hyper::client::conn::http1::Connection<TokioIo<crate::kube::KubeStream>, B>,
    ),
    (u16, String),
>
where
    B: Body + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = target
        .connect()
        .await
        .map_err(|e| (502, format!("cannot reach the Kubernetes API: {e}")))?;
    hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| {
            (
                502,
                format!("HTTP handshake with the Kubernetes API failed: {e}"),
            )
        })
}

async fn exchange(
    target: &KubeTarget,
    spec: HttpSpec,
    events: &mpsc::Sender<FromHttp>,
    ctl: &BodyGate,
) -> Result<(), (u16, String)> {
    let mut uri = spec.path;
    if !spec.query.is_empty() {
        uri.push('?');
        uri.push_str(&spec.query);
    }
    let mut builder = hyper::Request::builder()
        .method(spec.method)
        .uri(uri)
        .header(hyper::header::HOST, target.authority());
    let mut forwarded = spec.headers;
    headers::with_authorization(&mut forwarded, target.own_token().as_deref());
    for (name, value) in &forwarded {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let request = builder
        .body(spec.body)
        .map_err(|e| (400, format!("invalid upstream request: {e}")))?;
    let (mut sender, connection) = handshake(target).await?;
    // Owned by this task: aborting the task closes the connection.
    let _connection = AbortOnDrop::new(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| (502, format!("Kubernetes API request failed: {e}")))?;
    let (parts, mut body) = response.into_parts();
    let pairs: Vec<(&str, &[u8])> = parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect();
    let headers = headers::forward_response_headers(pairs.iter().copied());
    let header = FromHttp::Header {
        id: spec.id.clone(),
        status: parts.status.as_u16(),
        headers,
    };
    if events.send(header).await.is_err() {
        return Ok(());
    }
    loop {
        if ctl.paused.load(std::sync::atomic::Ordering::Acquire) {
            ctl.resume.notified().await;
            continue;
        }
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|e| (502, format!("Kubernetes API response failed: {e}")))?;
        if let Ok(data) = frame.into_data()
            && !data.is_empty()
        {
            let chunk = FromHttp::Chunk {
                id: spec.id.clone(),
                data,
            };
            if events.send(chunk).await.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}
