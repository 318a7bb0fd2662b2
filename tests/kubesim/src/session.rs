//! Plumbing shared by exec and attach sessions on a remote-command WebSocket.
//!
//! Contract:
//! * Output goes through a bounded queue to one writer task; senders await when it is full
//!   (backpressure, never drops). The writer batches queued messages into one flush.
//! * One reader task decodes client messages: stdin data, the v5 stdin close signal and resize
//!   JSON become [`Input`] events on a bounded queue (awaited, so a process that does not read
//!   its stdin stops the reader). The reader keeps reading control frames, so Pings are
//!   answered (tungstenite queues the Pong and flushes it on the next read or write).
//! * The reader ends when the client closes, the connection drops or a message is malformed;
//!   its task finishing means "the client is gone" (or has acknowledged our Close).
//! * [`Session::finish`] writes the status on channel 3 (per protocol), then Close 1000.

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::channel::{Incoming, Protocol, ResizeDecoder, TerminalSize, ids};

/// Messages queued towards the client.
const OUT_QUEUE: usize = 32;
/// Input events queued towards the process.
const IN_QUEUE: usize = 32;
/// How long to wait for the client's Close reply after ours.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// What the client sent, decoded.
#[derive(Debug)]
pub enum Input {
    /// Bytes for the process's stdin.
    Stdin(Vec<u8>),
    /// The client closed stdin (v5 `[0xFF, 0]`).
    StdinEof,
    /// A terminal resize.
    Resize(TerminalSize),
}

/// How a session ended, for channel 3.
#[derive(Debug)]
pub enum Outcome {
    /// The process exited with this code.
    Exit(u8),
    /// Something other than the process failed (reported as InternalError).
    Internal(String),
}

/// A running remote-command WebSocket session.
pub struct Session {
    protocol: Protocol,
    out: mpsc::Sender<Message>,
    writer: JoinHandle<()>,
    reader: JoinHandle<()>,
}

impl Session {
    /// Splits `ws` into the writer and reader tasks; returns the session and the input queue.
    pub fn start<S>(ws: WebSocketStream<S>, protocol: Protocol) -> (Self, mpsc::Receiver<Input>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sink, stream) = ws.split();
        let (out, out_rx) = mpsc::channel(OUT_QUEUE);
        let (in_tx, in_rx) = mpsc::channel(IN_QUEUE);
        let writer = tokio::spawn(write_loop(sink, out_rx));
        let reader = tokio::spawn(read_loop(stream, protocol, in_tx));
        (
            Self {
                protocol,
                out,
                writer,
                reader,
            },
            in_rx,
        )
    }

    /// The negotiated protocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// A handle for queueing output on `channel`.
    pub fn output(&self, channel: u8) -> Output {
        Output {
            protocol: self.protocol,
            channel,
            out: self.out.clone(),
        }
    }

    /// Resolves when the client has gone (closed, disconnected or sent garbage).
    pub async fn client_gone(&mut self) {
        let _ = (&mut self.reader).await;
    }

    /// Whether the reader has already finished.
    pub fn is_client_gone(&self) -> bool {
        self.reader.is_finished()
    }

    /// Writes the status for `outcome` on channel 3 and Close 1000, then waits (briefly) for
    /// the client's Close reply. Write errors are ignored: the client may already be gone.
    pub async fn finish(mut self, outcome: Outcome) {
        let body = match (&outcome, self.protocol.json_status()) {
            (Outcome::Exit(code), true) => Some(crate::status::exec_exit(*code)),
            (Outcome::Internal(msg), true) => Some(crate::status::exec_internal_error(msg)),
            (Outcome::Exit(0), false) => None,
            // The kubelet's v1 writer sends the Status's message as plain text.
            (Outcome::Exit(code), false) => Some(crate::status::exit_message(*code).into_bytes()),
            (Outcome::Internal(msg), false) => Some(msg.clone().into_bytes()),
        };
        if let Some(body) = body {
            let _ = self.out.send(self.protocol.encode(ids::ERROR, &body)).await;
        }
        let _ = self
            .out
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        drop(self.out);
        let _ = (&mut self.writer).await;
        if tokio::time::timeout(CLOSE_GRACE, &mut self.reader)
            .await
            .is_err()
        {
            self.reader.abort();
        }
    }

    /// Ends without a status (the client is gone).
    pub fn abort(self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// A cloneable sender of output on one channel.
#[derive(Clone)]
pub struct Output {
    protocol: Protocol,
    channel: u8,
    out: mpsc::Sender<Message>,
}

impl Output {
    /// Queues `data` (awaits while the queue is full). `Err` when the client is gone.
    pub async fn send(&self, data: &[u8]) -> Result<(), ClientGone> {
        self.out
            .send(self.protocol.encode(self.channel, data))
            .await
            .map_err(|_| ClientGone)
    }
}

/// The client has gone; output can no longer be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientGone;

async fn write_loop<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    mut rx: mpsc::Receiver<Message>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(msg) = rx.recv().await {
        let mut closing = matches!(msg, Message::Close(_));
        if sink.feed(msg).await.is_err() {
            return;
        }
        while !closing {
            let Ok(msg) = rx.try_recv() else { break };
            closing = matches!(msg, Message::Close(_));
            if sink.feed(msg).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() || closing {
            return;
        }
    }
}

async fn read_loop<S>(
    mut stream: SplitStream<WebSocketStream<S>>,
    protocol: Protocol,
    tx: mpsc::Sender<Input>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut resize = ResizeDecoder::default();
    let mut stdin_open = true;
    while let Some(msg) = stream.next().await {
        let Ok(msg) = msg else { return };
        let event = match protocol.decode(msg) {
            Incoming::Data(ids::STDIN, data) if stdin_open => vec![Input::Stdin(data)],
            Incoming::Data(ids::RESIZE, data) => {
                resize.push(&data).into_iter().map(Input::Resize).collect()
            }
            Incoming::CloseChannel(ids::STDIN) if stdin_open => {
                stdin_open = false;
                vec![Input::StdinEof]
            }
            Incoming::Close => {
                // tungstenite replies to the Close; keep polling until the stream ends so the
                // reply is flushed.
                continue;
            }
            Incoming::Invalid(why) => {
                tracing::warn!(%why, "malformed client message; closing");
                return;
            }
            _ => Vec::new(),
        };
        for e in event {
            // A consumer that stopped listening (process gone) just means we discard input.
            let _ = tx.send(e).await;
        }
    }
}
