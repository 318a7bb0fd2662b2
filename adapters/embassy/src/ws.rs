//! The tunnel's WebSocket client on edge-ws / edge-http: the upgrade request (with the bearer
//! token), masked frames, whole-message reads across fragments, ping/pong and close frames.
//!
//! Reads and writes use separate halves of the connection so the tunnel can be read while it is
//! written; neither side is ever cancelled in the middle of a frame.

use core::fmt::Write as _;

use edge_http::ws::{MAX_BASE64_KEY_LEN, MAX_BASE64_KEY_RESPONSE_LEN, NONCE_LEN};
use edge_http::{Method, RequestHeaders, ResponseHeaders};
use edge_ws::{FrameHeader, FrameType};
use embedded_io_async::{Error as _, Read, Write};
use rand_core::RngCore;

use crate::clock::parse_http_date;

/// Room reserved in front of a payload in a transmit buffer for the frame header (the largest
/// client header: 2 + 8 length bytes + 4 mask bytes).
pub const HEADER_ROOM: usize = 14;

/// Longest control frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL: usize = 125;

/// Why the WebSocket failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum WsError {
    /// The transport failed or closed.
    Io(embedded_io_async::ErrorKind),
    /// The connection ended.
    Eof,
    /// The server answered the upgrade with this status (401/403: bad token).
    Rejected(u16),
    /// The server's answer is not HTTP or not a valid upgrade.
    BadHandshake,
    /// A frame broke the protocol (bad header, unexpected continuation, oversize control frame).
    Protocol,
    /// The request does not fit the buffers (token or host too long).
    TooLong,
}

impl<E: embedded_io_async::Error> From<edge_ws::Error<E>> for WsError {
    fn from(e: edge_ws::Error<E>) -> Self {
        match e {
            edge_ws::Error::Io(e) => Self::Io(e.kind()),
            edge_ws::Error::Incomplete(_) => Self::Eof,
            _ => Self::Protocol,
        }
    }
}

impl<E: embedded_io_async::Error> From<edge_http::io::Error<E>> for WsError {
    fn from(e: edge_http::io::Error<E>) -> Self {
        match e {
            edge_http::io::Error::Io(e) => Self::Io(e.kind()),
            _ => Self::BadHandshake,
        }
    }
}

/// What the upgrade response told us.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Upgraded {
    /// The server's `Date`, in seconds since the Unix epoch, when it sent one.
    pub date: Option<u64>,
}

/// Sends the upgrade request for `path` on `host` with `Authorization: Bearer <token>` and checks
/// the 101 answer (`Sec-WebSocket-Accept` included). `buf` holds the response head.
///
/// # Errors
/// [`WsError::Rejected`] with the status when the server refused; other variants as they say.
pub async fn handshake<R: Read, W: Write>(
    reader: &mut R,
    writer: &mut W,
    host: &str,
    path: &str,
    token: &str,
    rng: &mut impl RngCore,
    buf: &mut [u8],
) -> Result<Upgraded, WsError> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    let mut key = [0u8; MAX_BASE64_KEY_LEN];
    let upgrade = edge_http::ws::upgrade_request_headers(Some(host), None, None, &nonce, &mut key);
    let mut auth = heapless::String::<1024>::new();
    write!(auth, "Bearer {token}").map_err(|_| WsError::TooLong)?;
    let mut request = RequestHeaders::<16>::new();
    request.method = Method::Get;
    request.path = path;
    for (name, value) in upgrade {
        if !name.is_empty() {
            request.headers.set(name, value);
        }
    }
    request.headers.set("Authorization", auth.as_str());
    request.headers.set("User-Agent", "tether-gateway");
    request.send(false, &mut *writer).await?;
    writer.flush().await.map_err(|e| WsError::Io(e.kind()))?;

    let mut response = ResponseHeaders::<24>::new();
    response.receive(buf, &mut *reader, true).await?;
    let mut accept = [0u8; MAX_BASE64_KEY_RESPONSE_LEN];
    if response.code != 101 {
        return Err(WsError::Rejected(response.code));
    }
    if !response.is_ws_upgrade_accepted(&nonce, &mut accept) {
        return Err(WsError::BadHandshake);
    }
    Ok(Upgraded {
        date: response.headers.get("Date").and_then(parse_http_date),
    })
}

/// Writes one masked frame whose payload is `buf[HEADER_ROOM..HEADER_ROOM + len]`, masking it in
/// place (`buf` is scratch afterwards). One write for header and payload.
///
/// # Errors
/// [`WsError::Io`].
pub async fn write_frame<W: Write>(
    writer: &mut W,
    frame_type: FrameType,
    buf: &mut [u8],
    len: usize,
    rng: &mut impl RngCore,
) -> Result<(), WsError> {
    let header = FrameHeader {
        frame_type,
        payload_len: len as u64,
        mask_key: Some(rng.next_u32()),
    };
    let mut head = [0u8; HEADER_ROOM];
    let head_len = header.serialize(&mut head).map_err(|_| WsError::Protocol)?;
    let start = HEADER_ROOM - head_len;
    let frame = &mut buf[start..HEADER_ROOM + len];
    frame[..head_len].copy_from_slice(&head[..head_len]);
    header.mask(&mut frame[head_len..], 0);
    writer
        .write_all(frame)
        .await
        .map_err(|e| WsError::Io(e.kind()))?;
    writer.flush().await.map_err(|e| WsError::Io(e.kind()))
}

/// Writes a control frame (ping, pong, close) with a payload of at most [`MAX_CONTROL`] bytes.
///
/// # Errors
/// [`WsError::Io`]; [`WsError::Protocol`] for a payload over 125 bytes.
pub async fn write_control<W: Write>(
    writer: &mut W,
    frame_type: FrameType,
    payload: &[u8],
    rng: &mut impl RngCore,
) -> Result<(), WsError> {
    if payload.len() > MAX_CONTROL {
        return Err(WsError::Protocol);
    }
    let mut buf = [0u8; HEADER_ROOM + MAX_CONTROL];
    buf[HEADER_ROOM..HEADER_ROOM + payload.len()].copy_from_slice(payload);
    write_frame(writer, frame_type, &mut buf, payload.len(), rng).await
}

/// One thing read from the tunnel.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A whole data message (fragments joined), text or binary.
    Message(&'a [u8]),
    /// A data message larger than the buffer: its bytes were read and discarded.
    Oversize(u64),
    /// A ping with its payload (answer with a pong carrying it).
    Ping(heapless::Vec<u8, MAX_CONTROL>),
    /// A pong.
    Pong,
    /// A close frame, with its code if it had one.
    Close(Option<u16>),
}

/// Reads frames until one of [`Incoming`] is complete. Data messages land in `buf`.
///
/// # Errors
/// [`WsError`] for transport errors and protocol violations.
pub async fn read_message<'b, R: Read>(
    reader: &mut R,
    buf: &'b mut [u8],
) -> Result<Incoming<'b>, WsError> {
    let mut len = 0usize;
    let mut in_message = false;
    let mut oversize: u64 = 0;
    loop {
        let header = FrameHeader::recv(&mut *reader).await?;
        match header.frame_type {
            FrameType::Ping | FrameType::Pong | FrameType::Close => {
                if header.payload_len > MAX_CONTROL as u64 {
                    return Err(WsError::Protocol);
                }
                let mut control = [0u8; MAX_CONTROL];
                let payload = header.recv_payload(&mut *reader, &mut control).await?;
                match header.frame_type {
                    FrameType::Ping => {
                        let mut data = heapless::Vec::new();
                        let _ = data.extend_from_slice(payload);
                        return Ok(Incoming::Ping(data));
                    }
                    FrameType::Pong => return Ok(Incoming::Pong),
                    _ => {
                        let code = (payload.len() >= 2)
                            .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                        return Ok(Incoming::Close(code));
                    }
                }
            }
            FrameType::Text(_) | FrameType::Binary(_) if in_message => {
                return Err(WsError::Protocol);
            }
            FrameType::Continue(_) if !in_message => return Err(WsError::Protocol),
            _ => {}
        }
        in_message = true;
        let room = (buf.len() - len) as u64;
        if oversize > 0 || header.payload_len > room {
            // Too large for this gateway: drain it so the next message can be read.
            oversize = oversize.saturating_add(len as u64 + header.payload_len);
            len = 0;
            skip(reader, header.payload_len, buf).await?;
        } else {
            let n = header.payload_len as usize;
            header
                .recv_payload(&mut *reader, &mut buf[len..len + n])
                .await?;
            len += n;
        }
        if header.frame_type.is_final() {
            if oversize > 0 {
                return Ok(Incoming::Oversize(oversize));
            }
            return Ok(Incoming::Message(&buf[..len]));
        }
    }
}

async fn skip<R: Read>(reader: &mut R, mut n: u64, buf: &mut [u8]) -> Result<(), WsError> {
    while n > 0 {
        let chunk = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        reader
            .read_exact(&mut buf[..chunk])
            .await
            .map_err(|e| match e {
                embedded_io_async::ReadExactError::UnexpectedEof => WsError::Eof,
                embedded_io_async::ReadExactError::Other(e) => WsError::Io(e.kind()),
            })?;
        n -= chunk as u64;
    }
    Ok(())
}
