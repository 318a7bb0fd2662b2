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
//! * The same session runs on a SPDY/3.1 connection ([`Session::start_spdy`], kubectl's SPDY
//!   executor): each channel is a SPDY stream the client opened (`streamtype` header), data
//!   frames carry the bytes, FIN closes stdin, and the end is FIN on every server stream then
//!   GOAWAY.

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::channel::{Incoming, Protocol, ResizeDecoder, TerminalSize, ids};
use crate::spdy::{self, Decoder, Encoder, FLAG_FIN, Frame};

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

/// How channel data is put on the connection.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// WebSocket messages of the negotiated channel protocol.
    WebSocket,
    /// SPDY data frames on the stream the client opened for each channel (index = channel id);
    /// a channel without a stream discards its output.
    Spdy { streams: [Option<u32>; 5] },
}

impl Framing {
    fn encode(self, protocol: Protocol, channel: u8, data: &[u8]) -> Option<Message> {
        match self {
            Self::WebSocket => Some(protocol.encode(channel, data)),
            Self::Spdy { streams } => {
                let id = (*streams.get(usize::from(channel))?)?;
                let mut frame = Vec::with_capacity(8 + data.len());
                spdy::encode_data(id, 0, data, &mut frame).ok()?;
                Some(Message::Binary(frame.into()))
            }
        }
    }
}

/// The SPDY stream types of the remote-command channels, by channel id.
const SPDY_STREAM_TYPES: [&str; 5] = ["stdin", "stdout", "stderr", "error", "resize"];

/// How long a SPDY client may take to open the streams a session needs.
const SPDY_SETUP: std::time::Duration = std::time::Duration::from_secs(30);

/// A running remote-command WebSocket session.
pub struct Session {
    protocol: Protocol,
    framing: Framing,
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
                framing: Framing::WebSocket,
                out,
                writer,
                reader,
            },
            in_rx,
        )
    }

    /// Runs the session on an upgraded SPDY/3.1 connection (`X-Stream-Protocol-Version`
    /// `v4.channel.k8s.io`): waits until the client opened a stream for every channel in
    /// `channels` (answering each SYN_STREAM with SYN_REPLY), then reads and writes as
    /// [`start`](Self::start). `Err` when the client gave up, misbehaved or took longer than
    /// 30 s.
    pub async fn start_spdy<S>(
        io: S,
        channels: &[u8],
    ) -> Result<(Self, mpsc::Receiver<Input>), String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(io);
        let mut decoder = Decoder::new();
        let mut encoder = Encoder::new();
        let mut streams = [None; 5];
        let setup = async {
            while channels.iter().any(|&c| streams[usize::from(c)].is_none()) {
                let frame = match decoder.next_frame().map_err(|e| e.to_string())? {
                    Some(frame) => frame,
                    None => {
                        let mut buf = [0u8; 4096];
                        let n = rd.read(&mut buf).await.map_err(|e| e.to_string())?;
                        if n == 0 {
                            return Err("client left before opening its streams".to_string());
                        }
                        decoder.push(&buf[..n]);
                        continue;
                    }
                };
                match frame {
                    Frame::SynStream {
                        stream_id, headers, ..
                    } => {
                        let kind = headers.get("streamtype").unwrap_or_default();
                        let Some(channel) = SPDY_STREAM_TYPES.iter().position(|t| *t == kind)
                        else {
                            return Err(format!("unexpected SPDY stream type {kind:?}"));
                        };
                        streams[channel] = Some(stream_id);
                        let reply = encoder.syn_reply(stream_id).map_err(|e| e.to_string())?;
                        wr.write_all(&reply).await.map_err(|e| e.to_string())?;
                        wr.flush().await.map_err(|e| e.to_string())?;
                    }
                    Frame::Ping { id } if id % 2 == 1 => {
                        wr.write_all(&spdy::encode_ping(id))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    Frame::GoAway { .. } => return Err("client sent GOAWAY".to_string()),
                    _ => {}
                }
            }
            Ok(())
        };
        tokio::time::timeout(SPDY_SETUP, setup)
            .await
            .map_err(|_| "client did not open its SPDY streams within 30s".to_string())??;
        let (out, out_rx) = mpsc::channel(OUT_QUEUE);
        let (in_tx, in_rx) = mpsc::channel(IN_QUEUE);
        let writer = tokio::spawn(raw_write_loop(wr, out_rx));
        let reader = tokio::spawn(spdy_read_loop(rd, decoder, streams, out.clone(), in_tx));
        Ok((
            Self {
                protocol: Protocol::V4,
                framing: Framing::Spdy { streams },
                out,
                writer,
                reader,
            },
            in_rx,
        ))
    }

    /// The negotiated protocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// A handle for queueing output on `channel`.
    pub fn output(&self, channel: u8) -> Output {
        Output {
            protocol: self.protocol,
            framing: self.framing,
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
            let _ = self.output(ids::ERROR).send(&body).await;
        }
        if let Framing::Spdy { streams } = self.framing {
            // FIN every stream the server writes, then GOAWAY (as the kubelet does).
            let mut end = Vec::new();
            let written = [ids::STDOUT, ids::STDERR, ids::ERROR];
            for id in written.iter().filter_map(|&c| streams[usize::from(c)]) {
                let _ = spdy::encode_data(id, FLAG_FIN, &[], &mut end);
            }
            let last = streams.iter().flatten().max().copied().unwrap_or(0);
            end.extend_from_slice(&spdy::encode_goaway(last, spdy::goaway_status::OK));
            let _ = self.out.send(Message::Binary(end.into())).await;
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
    framing: Framing,
    channel: u8,
    out: mpsc::Sender<Message>,
}

impl Output {
    /// Queues `data` (awaits while the queue is full). `Err` when the client is gone.
    pub async fn send(&self, data: &[u8]) -> Result<(), ClientGone> {
        let Some(message) = self.framing.encode(self.protocol, self.channel, data) else {
            return Ok(());
        };
        self.out.send(message).await.map_err(|_| ClientGone)
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

/// Writes queued SPDY bytes (binary messages) to the raw connection, flushing when the queue runs
/// dry; a Close message flushes and shuts the connection down.
pub(crate) async fn raw_write_loop<W>(mut wr: W, mut rx: mpsc::Receiver<Message>)
where
    W: AsyncWrite + Unpin,
{
    while let Some(msg) = rx.recv().await {
        let mut next = Some(msg);
        while let Some(msg) = next.take() {
            match msg {
                Message::Binary(bytes) if wr.write_all(&bytes).await.is_err() => return,
                Message::Close(_) => {
                    let _ = wr.flush().await;
                    let _ = wr.shutdown().await;
                    return;
                }
                _ => {}
            }
            next = rx.try_recv().ok();
        }
        if wr.flush().await.is_err() {
            return;
        }
    }
}

/// Decodes the client's SPDY frames after setup: stdin data and FIN, resize JSON, pings (echoed).
/// Ends at GOAWAY, end of stream, a read error or a malformed frame.
async fn spdy_read_loop<R>(
    mut rd: R,
    mut decoder: Decoder,
    streams: [Option<u32>; 5],
    out: mpsc::Sender<Message>,
    tx: mpsc::Sender<Input>,
) where
    R: AsyncRead + Unpin,
{
    let stream = |channel: u8| streams[usize::from(channel)];
    let mut resize = ResizeDecoder::default();
    let mut stdin_open = true;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let frame = match decoder.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    decoder.push(&buf[..n]);
                    continue;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "malformed SPDY frame; closing");
                return;
            }
        };
        let events = match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } if Some(stream_id) == stream(ids::STDIN) && stdin_open => {
                let mut events = Vec::new();
                if !data.is_empty() {
                    events.push(Input::Stdin(data.to_vec()));
                }
                if flags & FLAG_FIN != 0 {
                    stdin_open = false;
                    events.push(Input::StdinEof);
                }
                events
            }
            Frame::Data {
                stream_id, data, ..
            } if Some(stream_id) == stream(ids::RESIZE) => {
                resize.push(&data).into_iter().map(Input::Resize).collect()
            }
            Frame::Ping { id } if id % 2 == 1 => {
                let _ = out
                    .send(Message::Binary(spdy::encode_ping(id).into()))
                    .await;
                Vec::new()
            }
            Frame::GoAway { .. } => return,
            _ => Vec::new(),
        };
        for e in events {
            let _ = tx.send(e).await;
        }
    }
}
