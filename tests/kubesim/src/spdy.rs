//! Sans-IO SPDY/3 codec: the server-side subset that `kubectl port-forward` needs.
//!
//! kubectl 1.32 tunnels SPDY/3 frames inside WebSocket binary messages
//! (`SPDY/3.1+portforward.k8s.io`). Message boundaries carry no meaning: a frame may be
//! split across messages and one message may hold several frames. This module therefore
//! works on a byte stream:
//!
//! * [`Decoder`] takes bytes in any chunking ([`Decoder::push`]) and yields whole
//!   [`Frame`]s ([`Decoder::next_frame`]). It owns the session's single zlib inflater,
//!   which header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are fed through in order.
//! * [`Encoder`] turns [`Frame`]s into bytes. It owns the session's single zlib deflater
//!   (SYNC_FLUSH after every block), so frames with header blocks must be written to the
//!   peer in exactly the order they were encoded.
//!
//! No I/O, no clocks and no flow control: spdystream (kubectl's SPDY stack) never sends
//! WINDOW_UPDATE, so a peer that enforced the 64 KiB SPDY/3.1 window would stall.
//! Both header-block compressors use the SPDY/3 dictionary [`DICTIONARY`].

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The SPDY/3 zlib dictionary (1423 bytes), as published with the SPDY/3 draft.
pub const DICTIONARY: &[u8; 1423] = include_bytes!("spdy3_dict.bin");

/// Adler-32 of [`DICTIONARY`]: the DICTID a SPDY/3 zlib stream header announces.
pub const DICTIONARY_ADLER32: u32 = 0xE3C6_A7C2;

/// The only protocol version this codec speaks.
pub const VERSION: u16 = 3;

/// Largest payload length a frame can announce (24 bits).
pub const MAX_FRAME_PAYLOAD: usize = 0x00FF_FFFF;

/// Upper bound on one decompressed header block; larger blocks are rejected with
/// [`FrameError::HeaderBlockTooLarge`] (protection against compression bombs).
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;

/// Flag on DATA, SYN_STREAM and SYN_REPLY frames: the sender half-closes the stream.
pub const FLAG_FIN: u8 = 0x01;
/// Flag on SYN_STREAM frames: the stream is unidirectional.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;

/// Control frame type numbers (SPDY/3 §2.6).
pub mod frame_type {
    /// SYN_STREAM.
    pub const SYN_STREAM: u16 = 1;
    /// SYN_REPLY.
    pub const SYN_REPLY: u16 = 2;
    /// RST_STREAM.
    pub const RST_STREAM: u16 = 3;
    /// SETTINGS.
    pub const SETTINGS: u16 = 4;
    /// PING.
    pub const PING: u16 = 6;
    /// GOAWAY.
    pub const GOAWAY: u16 = 7;
    /// HEADERS.
    pub const HEADERS: u16 = 8;
    /// WINDOW_UPDATE.
    pub const WINDOW_UPDATE: u16 = 9;
}

/// RST_STREAM status codes (SPDY/3 §2.4.2).
pub mod rst_status {
    /// PROTOCOL_ERROR.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// INVALID_STREAM.
    pub const INVALID_STREAM: u32 = 2;
    /// REFUSED_STREAM.
    pub const REFUSED_STREAM: u32 = 3;
    /// UNSUPPORTED_VERSION.
    pub const UNSUPPORTED_VERSION: u32 = 4;
    /// CANCEL.
    pub const CANCEL: u32 = 5;
    /// INTERNAL_ERROR.
    pub const INTERNAL_ERROR: u32 = 6;
    /// FLOW_CONTROL_ERROR.
    pub const FLOW_CONTROL_ERROR: u32 = 7;
}

/// GOAWAY status codes (SPDY/3 §2.6.6).
pub mod goaway_status {
    /// OK.
    pub const OK: u32 = 0;
    /// PROTOCOL_ERROR.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// INTERNAL_ERROR.
    pub const INTERNAL_ERROR: u32 = 2;
}

/// An ordered list of SPDY header pairs.
///
/// Names are kept as received (SPDY/3 requires lowercase; spdystream lowercases);
/// several values of one name travel NUL-joined in one value, as on the wire.
/// [`Headers::get`] compares names ASCII-case-insensitively, like Go's `http.Header.Get`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// An empty header list (what SYN_REPLY carries for port-forward).
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// The first value whose name equals `name` ignoring ASCII case.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Appends one pair.
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push((name.into(), value.into()));
    }

    /// The uncompressed SPDY/3 header block: `count(32)` then `len(32) name len(32) value`
    /// per pair, all big-endian.
    pub fn to_block(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            4 + self
                .0
                .iter()
                .map(|(n, v)| 8 + n.len() + v.len())
                .sum::<usize>(),
        );
        out.extend_from_slice(&len_u32(self.0.len()).to_be_bytes());
        for (n, v) in &self.0 {
            out.extend_from_slice(&len_u32(n.len()).to_be_bytes());
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(&len_u32(v.len()).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }

    /// Parses an uncompressed header block (the inverse of [`Headers::to_block`]).
    ///
    /// The block must be consumed exactly; names must be non-empty UTF-8 and values UTF-8.
    pub fn from_block(block: &[u8]) -> Result<Self, FrameError> {
        let mut rest = block;
        let count =
            take_u32(&mut rest).ok_or(FrameError::MalformedHeaderBlock("truncated pair count"))?;
        // Every pair needs at least 8 bytes: bound the allocation by the block size.
        if count as usize > rest.len() / 8 {
            return Err(FrameError::MalformedHeaderBlock(
                "pair count exceeds block size",
            ));
        }
        let mut pairs = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let name = take_string(&mut rest)?;
            if name.is_empty() {
                return Err(FrameError::MalformedHeaderBlock("empty header name"));
            }
            let value = take_string(&mut rest)?;
            pairs.push((name, value));
        }
        if !rest.is_empty() {
            return Err(FrameError::MalformedHeaderBlock(
                "trailing bytes after the last pair",
            ));
        }
        Ok(Self(pairs))
    }
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).expect("header block field longer than 4 GiB")
}

fn take_u32(rest: &mut &[u8]) -> Option<u32> {
    if rest.len() < 4 {
        return None;
    }
    let v = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    *rest = &rest[4..];
    Some(v)
}

fn take_string(rest: &mut &[u8]) -> Result<String, FrameError> {
    let len = take_u32(rest).ok_or(FrameError::MalformedHeaderBlock("truncated length"))? as usize;
    if rest.len() < len {
        return Err(FrameError::MalformedHeaderBlock(
            "string runs past the block",
        ));
    }
    let (s, tail) = rest.split_at(len);
    *rest = tail;
    String::from_utf8(s.to_vec())
        .map_err(|_| FrameError::MalformedHeaderBlock("non-UTF-8 name or value"))
}

/// One decoded SPDY/3 frame.
///
/// Stream ids are 31-bit: encoding masks the top bit away, parsing never sets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Opens a stream (client ids are odd).
    SynStream {
        /// The new stream's id (non-zero).
        stream_id: u32,
        /// Associated stream id (0 = none).
        assoc_stream_id: u32,
        /// Priority, 0 (highest) to 7.
        priority: u8,
        /// Credential slot (unused by spdystream).
        slot: u8,
        /// [`FLAG_FIN`] | [`FLAG_UNIDIRECTIONAL`].
        flags: u8,
        /// The decompressed headers.
        headers: Headers,
    },
    /// Accepts a stream.
    SynReply {
        /// The accepted stream.
        stream_id: u32,
        /// [`FLAG_FIN`].
        flags: u8,
        /// The decompressed headers.
        headers: Headers,
    },
    /// Aborts a stream.
    RstStream {
        /// The aborted stream.
        stream_id: u32,
        /// A [`rst_status`] code (non-zero).
        status: u32,
    },
    /// Session settings: `(flags, id, value)` entries. Ignored by port-forward.
    Settings {
        /// Frame flags (0x01 = clear previously persisted settings).
        flags: u8,
        /// The entries, in wire order.
        entries: Vec<(u8, u32, u32)>,
    },
    /// Keepalive; the receiver echoes pings whose id has the peer's parity.
    Ping {
        /// The ping id (client odd, server even).
        id: u32,
    },
    /// Ends the session.
    GoAway {
        /// Last stream id the sender processed.
        last_good_stream_id: u32,
        /// A [`goaway_status`] code.
        status: u32,
    },
    /// Extra headers for a stream.
    Headers {
        /// The stream.
        stream_id: u32,
        /// [`FLAG_FIN`].
        flags: u8,
        /// The decompressed headers.
        headers: Headers,
    },
    /// Flow-control credit (never enforced here).
    WindowUpdate {
        /// The stream (0 = session).
        stream_id: u32,
        /// Credit in bytes.
        delta: u32,
    },
    /// Stream payload.
    Data {
        /// The stream (non-zero).
        stream_id: u32,
        /// [`FLAG_FIN`] and any other flag bits as received.
        flags: u8,
        /// The payload (at most [`MAX_FRAME_PAYLOAD`] bytes).
        data: Bytes,
    },
    /// A control frame of a type this codec does not know; SPDY/3 says to ignore it.
    Unknown {
        /// The control frame type.
        frame_type: u16,
        /// Its flags.
        flags: u8,
        /// Its raw payload.
        payload: Bytes,
    },
}

impl Frame {
    /// True when the frame carries [`FLAG_FIN`] (DATA, SYN_STREAM, SYN_REPLY, HEADERS).
    pub fn is_fin(&self) -> bool {
        match self {
            Self::Data { flags, .. }
            | Self::SynStream { flags, .. }
            | Self::SynReply { flags, .. }
            | Self::Headers { flags, .. } => flags & FLAG_FIN != 0,
            _ => false,
        }
    }
}

/// Why bytes could not be decoded (or a frame encoded). Every decode error is fatal for
/// the session: the header-compression state may be out of step with the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A control frame announced a version other than 3.
    UnsupportedVersion(u16),
    /// A control frame's length does not fit its type.
    InvalidLength {
        /// The control frame type.
        frame_type: u16,
        /// The announced payload length.
        length: usize,
    },
    /// A frame that needs a non-zero stream id carried 0.
    ZeroStreamId {
        /// The control frame type, or `None` for DATA.
        frame_type: Option<u16>,
    },
    /// RST_STREAM with status 0.
    ZeroRstStatus,
    /// The zlib stream asked for a dictionary other than the SPDY/3 one.
    WrongDictionary(u32),
    /// The zlib stream is corrupt (message from the inflater).
    Inflate(String),
    /// A header block decompressed to more than [`MAX_HEADER_BLOCK`] bytes.
    HeaderBlockTooLarge,
    /// The decompressed header block is not a valid pair list.
    MalformedHeaderBlock(&'static str),
    /// Encoding: a payload larger than [`MAX_FRAME_PAYLOAD`].
    PayloadTooLarge(usize),
    /// Encoding: the deflater failed (message from zlib).
    Deflate(String),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnsupportedVersion(v) => write!(f, "unsupported SPDY version {v}"),
            Self::InvalidLength { frame_type, length } => {
                write!(
                    f,
                    "invalid length {length} for control frame type {frame_type}"
                )
            }
            Self::ZeroStreamId {
                frame_type: Some(t),
            } => write!(f, "stream id 0 in control frame type {t}"),
            Self::ZeroStreamId { frame_type: None } => f.write_str("stream id 0 in DATA frame"),
            Self::ZeroRstStatus => f.write_str("RST_STREAM with status 0"),
            Self::WrongDictionary(id) => {
                write!(f, "header block needs unknown zlib dictionary {id:#010x}")
            }
            Self::Inflate(m) => write!(f, "corrupt header compression stream: {m}"),
            Self::HeaderBlockTooLarge => {
                write!(f, "header block larger than {MAX_HEADER_BLOCK} bytes")
            }
            Self::MalformedHeaderBlock(m) => write!(f, "malformed header block: {m}"),
            Self::PayloadTooLarge(n) => {
                write!(f, "frame payload of {n} bytes exceeds 24-bit length")
            }
            Self::Deflate(m) => write!(f, "header compression failed: {m}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Header-block decompressor: one continuous zlib stream for the whole session, primed
/// with [`DICTIONARY`] when the stream asks for it.
pub struct HeaderInflater {
    inner: Decompress,
}

impl fmt::Debug for HeaderInflater {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderInflater")
            .field("total_in", &self.inner.total_in())
            .finish()
    }
}

impl Default for HeaderInflater {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderInflater {
    /// A fresh inflater expecting a zlib (RFC 1950) header on its first block.
    pub fn new() -> Self {
        Self {
            inner: Decompress::new(true),
        }
    }

    /// Inflates exactly one frame's compressed block and returns everything it yields.
    ///
    /// The whole `block` is consumed; the sender ends each block with a SYNC_FLUSH, so
    /// the output is complete. Fails on a foreign dictionary, a corrupt stream or more
    /// than [`MAX_HEADER_BLOCK`] bytes of output.
    pub fn inflate(&mut self, block: &[u8]) -> Result<Vec<u8>, FrameError> {
        let mut out: Vec<u8> =
            Vec::with_capacity(block.len().saturating_mul(4).clamp(64, MAX_HEADER_BLOCK));
        let mut consumed = 0usize;
        loop {
            if out.len() > MAX_HEADER_BLOCK {
                return Err(FrameError::HeaderBlockTooLarge);
            }
            if out.len() == out.capacity() {
                // Room for at most one byte past the limit, so an oversized block is detected.
                out.reserve(out.len().clamp(64, MAX_HEADER_BLOCK + 1 - out.len()));
            }
            let (in0, out0) = (self.inner.total_in(), self.inner.total_out());
            let res =
                self.inner
                    .decompress_vec(&block[consumed..], &mut out, FlushDecompress::Sync);
            let read = usize::try_from(self.inner.total_in() - in0).expect("fits");
            let written = usize::try_from(self.inner.total_out() - out0).expect("fits");
            consumed += read;
            match res {
                Ok(status) => {
                    let output_full = out.len() == out.capacity();
                    if out.len() > MAX_HEADER_BLOCK {
                        return Err(FrameError::HeaderBlockTooLarge);
                    }
                    if consumed == block.len() && !output_full {
                        return Ok(out);
                    }
                    if read == 0 && written == 0 && !output_full {
                        // No progress with input left: the stream has ended or is stuck.
                        let why = if status == Status::StreamEnd {
                            "data after the end of the zlib stream"
                        } else {
                            "inflater made no progress"
                        };
                        return Err(FrameError::Inflate(why.to_owned()));
                    }
                }
                Err(e) => match e.needs_dictionary() {
                    Some(DICTIONARY_ADLER32) => {
                        self.inner
                            .set_dictionary(DICTIONARY)
                            .map_err(|e| FrameError::Inflate(e.to_string()))?;
                    }
                    Some(other) => return Err(FrameError::WrongDictionary(other)),
                    None => return Err(FrameError::Inflate(e.to_string())),
                },
            }
        }
    }
}

/// Header-block compressor: one continuous zlib stream for the whole session (level 9,
/// like Go's spdystream), primed with [`DICTIONARY`], SYNC_FLUSHed after every block.
pub struct HeaderDeflater {
    inner: Compress,
}

impl fmt::Debug for HeaderDeflater {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderDeflater")
            .field("total_in", &self.inner.total_in())
            .finish()
    }
}

impl Default for HeaderDeflater {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDeflater {
    /// A fresh deflater; its first block starts with `78 f9 e3 c6 a7 c2`.
    pub fn new() -> Self {
        let mut inner = Compress::new(Compression::best(), true);
        inner
            .set_dictionary(DICTIONARY)
            .expect("setting the dictionary on a fresh deflater cannot fail");
        Self { inner }
    }

    /// Compresses one uncompressed header block and SYNC_FLUSHes; the result ends with
    /// `00 00 ff ff`. Blocks must reach the peer in the order they were deflated.
    pub fn deflate(&mut self, block: &[u8]) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::with_capacity(block.len() + 64);
        let mut consumed = 0usize;
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.len().max(64));
            }
            let in0 = self.inner.total_in();
            self.inner
                .compress_vec(&block[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| FrameError::Deflate(e.to_string()))?;
            consumed += usize::try_from(self.inner.total_in() - in0).expect("fits");
            // Done once all input is in and the flush did not run out of output room.
            if consumed == block.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

/// Incremental frame parser for the bytes one peer sends.
///
/// Feed bytes in any chunking with [`Decoder::push`], then call [`Decoder::next_frame`]
/// until it returns `Ok(None)` (needs more bytes). After an `Err` the decoder must not be
/// used again: the session is broken.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
    inflater: HeaderInflater,
}

impl Decoder {
    /// An empty decoder with a fresh header inflater.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Number of buffered bytes not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    ///
    /// Header blocks are inflated here, in stream order, so every frame must be pulled
    /// (even those the caller ignores) to keep the zlib state in step with the peer.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < 8 {
            return Ok(None);
        }
        let length = (usize::from(self.buf[5]) << 16)
            | (usize::from(self.buf[6]) << 8)
            | usize::from(self.buf[7]);
        if self.buf.len() < 8 + length {
            // Make room once for the whole frame instead of growing piecemeal.
            self.buf.reserve(8 + length - self.buf.len());
            return Ok(None);
        }
        let head = self.buf.split_to(8);
        let payload = self.buf.split_to(length).freeze();
        let word0 = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let flags = head[4];
        if word0 & 0x8000_0000 == 0 {
            let stream_id = word0 & 0x7FFF_FFFF;
            if stream_id == 0 {
                return Err(FrameError::ZeroStreamId { frame_type: None });
            }
            return Ok(Some(Frame::Data {
                stream_id,
                flags,
                data: payload,
            }));
        }
        let version = u16::try_from((word0 >> 16) & 0x7FFF).expect("15 bits");
        let frame_type = u16::try_from(word0 & 0xFFFF).expect("16 bits");
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        self.control(frame_type, flags, payload).map(Some)
    }

    fn control(&mut self, frame_type: u16, flags: u8, mut p: Bytes) -> Result<Frame, FrameError> {
        use self::frame_type as t;
        let length = p.len();
        let bad_len = || FrameError::InvalidLength { frame_type, length };
        let nonzero = |id: u32| {
            if id == 0 {
                Err(FrameError::ZeroStreamId {
                    frame_type: Some(frame_type),
                })
            } else {
                Ok(id)
            }
        };
        let frame = match frame_type {
            t::SYN_STREAM => {
                if length < 10 {
                    return Err(bad_len());
                }
                let stream_id = nonzero(p.get_u32() & 0x7FFF_FFFF)?;
                let assoc_stream_id = p.get_u32() & 0x7FFF_FFFF;
                let priority = p.get_u8() >> 5;
                let slot = p.get_u8();
                let headers = Headers::from_block(&self.inflater.inflate(&p)?)?;
                Frame::SynStream {
                    stream_id,
                    assoc_stream_id,
                    priority,
                    slot,
                    flags,
                    headers,
                }
            }
            t::SYN_REPLY | t::HEADERS => {
                if length < 4 {
                    return Err(bad_len());
                }
                let stream_id = nonzero(p.get_u32() & 0x7FFF_FFFF)?;
                let headers = Headers::from_block(&self.inflater.inflate(&p)?)?;
                if frame_type == t::SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        flags,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        flags,
                        headers,
                    }
                }
            }
            t::RST_STREAM => {
                if length != 8 {
                    return Err(bad_len());
                }
                let stream_id = nonzero(p.get_u32() & 0x7FFF_FFFF)?;
                let status = p.get_u32();
                if status == 0 {
                    return Err(FrameError::ZeroRstStatus);
                }
                Frame::RstStream { stream_id, status }
            }
            t::SETTINGS => {
                if length < 4 {
                    return Err(bad_len());
                }
                let count = p.get_u32() as usize;
                if count.checked_mul(8) != Some(length - 4) {
                    return Err(bad_len());
                }
                let entries = (0..count)
                    .map(|_| {
                        let w = p.get_u32();
                        (
                            u8::try_from(w >> 24).expect("8 bits"),
                            w & 0x00FF_FFFF,
                            p.get_u32(),
                        )
                    })
                    .collect();
                Frame::Settings { flags, entries }
            }
            t::PING => {
                if length != 4 {
                    return Err(bad_len());
                }
                Frame::Ping { id: p.get_u32() }
            }
            t::GOAWAY => {
                if length != 8 {
                    return Err(bad_len());
                }
                Frame::GoAway {
                    last_good_stream_id: p.get_u32() & 0x7FFF_FFFF,
                    status: p.get_u32(),
                }
            }
            t::WINDOW_UPDATE => {
                if length != 8 {
                    return Err(bad_len());
                }
                Frame::WindowUpdate {
                    stream_id: p.get_u32() & 0x7FFF_FFFF,
                    delta: p.get_u32() & 0x7FFF_FFFF,
                }
            }
            _ => Frame::Unknown {
                frame_type,
                flags,
                payload: p,
            },
        };
        Ok(frame)
    }
}

/// Frame serializer for the bytes this side sends.
///
/// Frames with header blocks share one deflater, so the bytes of every
/// [`Encoder::encode`] call must reach the peer in call order. DATA, RST_STREAM, PING,
/// GOAWAY, SETTINGS and WINDOW_UPDATE frames do not touch compression state and may be
/// encoded by the free functions ([`encode_data`] and friends) anywhere.
#[derive(Debug, Default)]
pub struct Encoder {
    deflater: HeaderDeflater,
}

impl Encoder {
    /// An encoder with a fresh header deflater.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the wire form of `frame` to `out`.
    ///
    /// Fails only for payloads over [`MAX_FRAME_PAYLOAD`] or a deflater failure; `out` is
    /// left unchanged then. Stream ids are masked to 31 bits, priority to 3 bits.
    pub fn encode(&mut self, frame: &Frame, out: &mut Vec<u8>) -> Result<(), FrameError> {
        use self::frame_type as t;
        match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => encode_data(*stream_id, *flags, data, out),
            Frame::SynStream {
                stream_id,
                assoc_stream_id,
                priority,
                slot,
                flags,
                headers,
            } => {
                let block = self.deflater.deflate(&headers.to_block())?;
                let mut p = Vec::with_capacity(10 + block.len());
                p.extend_from_slice(&(stream_id & 0x7FFF_FFFF).to_be_bytes());
                p.extend_from_slice(&(assoc_stream_id & 0x7FFF_FFFF).to_be_bytes());
                p.push((priority & 0x07) << 5);
                p.push(*slot);
                p.extend_from_slice(&block);
                control(t::SYN_STREAM, *flags, &p, out)
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            }
            | Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                let ty = if matches!(frame, Frame::SynReply { .. }) {
                    t::SYN_REPLY
                } else {
                    t::HEADERS
                };
                let block = self.deflater.deflate(&headers.to_block())?;
                let mut p = Vec::with_capacity(4 + block.len());
                p.extend_from_slice(&(stream_id & 0x7FFF_FFFF).to_be_bytes());
                p.extend_from_slice(&block);
                control(ty, *flags, &p, out)
            }
            Frame::RstStream { stream_id, status } => control(
                t::RST_STREAM,
                0,
                &two_words(stream_id & 0x7FFF_FFFF, *status),
                out,
            ),
            Frame::Settings { flags, entries } => {
                let mut p = Vec::with_capacity(4 + 8 * entries.len());
                p.extend_from_slice(&len_u32(entries.len()).to_be_bytes());
                for (f, id, value) in entries {
                    p.extend_from_slice(
                        &((u32::from(*f) << 24) | (id & 0x00FF_FFFF)).to_be_bytes(),
                    );
                    p.extend_from_slice(&value.to_be_bytes());
                }
                control(t::SETTINGS, *flags, &p, out)
            }
            Frame::Ping { id } => control(t::PING, 0, &id.to_be_bytes(), out),
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => control(
                t::GOAWAY,
                0,
                &two_words(last_good_stream_id & 0x7FFF_FFFF, *status),
                out,
            ),
            Frame::WindowUpdate { stream_id, delta } => control(
                t::WINDOW_UPDATE,
                0,
                &two_words(stream_id & 0x7FFF_FFFF, delta & 0x7FFF_FFFF),
                out,
            ),
            Frame::Unknown {
                frame_type,
                flags,
                payload,
            } => control(*frame_type, *flags, payload, out),
        }
    }

    /// Convenience: the bytes of a SYN_REPLY with empty headers (what the kubelet sends).
    pub fn syn_reply(&mut self, stream_id: u32) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        self.encode(
            &Frame::SynReply {
                stream_id,
                flags: 0,
                headers: Headers::new(),
            },
            &mut out,
        )?;
        Ok(out)
    }
}

fn two_words(a: u32, b: u32) -> [u8; 8] {
    let mut w = [0u8; 8];
    w[..4].copy_from_slice(&a.to_be_bytes());
    w[4..].copy_from_slice(&b.to_be_bytes());
    w
}

fn length_bytes(len: usize) -> Result<[u8; 3], FrameError> {
    if len > MAX_FRAME_PAYLOAD {
        return Err(FrameError::PayloadTooLarge(len));
    }
    let [_, a, b, c] = len_u32(len).to_be_bytes();
    Ok([a, b, c])
}

fn control(
    frame_type: u16,
    flags: u8,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let len = length_bytes(payload.len())?;
    out.reserve(8 + payload.len());
    out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    out.extend_from_slice(&frame_type.to_be_bytes());
    out.push(flags);
    out.extend_from_slice(&len);
    out.extend_from_slice(payload);
    Ok(())
}

/// Appends a DATA frame (8-byte header + `data`) to `out`; `flags` is usually 0 or
/// [`FLAG_FIN`]. Fails if `data` exceeds [`MAX_FRAME_PAYLOAD`].
pub fn encode_data(
    stream_id: u32,
    flags: u8,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    out.reserve(8 + data.len());
    write_data_header(stream_id, flags, data.len(), out)?;
    out.extend_from_slice(data);
    Ok(())
}

/// Appends only the 8-byte DATA header for a payload of `len` bytes, for callers that
/// append the payload themselves. Fails if `len` exceeds [`MAX_FRAME_PAYLOAD`].
pub fn write_data_header(
    stream_id: u32,
    flags: u8,
    len: usize,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let len = length_bytes(len)?;
    out.extend_from_slice(&(stream_id & 0x7FFF_FFFF).to_be_bytes());
    out.push(flags);
    out.extend_from_slice(&len);
    Ok(())
}

/// The 16 bytes of RST_STREAM `stream_id` with `status` (a [`rst_status`] code).
pub fn encode_rst_stream(stream_id: u32, status: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    control(
        frame_type::RST_STREAM,
        0,
        &two_words(stream_id & 0x7FFF_FFFF, status),
        &mut out,
    )
    .expect("fixed size");
    out
}

/// The 12 bytes of PING `id` (also the echo of a received PING).
pub fn encode_ping(id: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    control(frame_type::PING, 0, &id.to_be_bytes(), &mut out).expect("fixed size");
    out
}

/// The 16 bytes of GOAWAY with `last_good_stream_id` and `status` (a [`goaway_status`]).
pub fn encode_goaway(last_good_stream_id: u32, status: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    control(
        frame_type::GOAWAY,
        0,
        &two_words(last_good_stream_id & 0x7FFF_FFFF, status),
        &mut out,
    )
    .expect("fixed size");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn adler32(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &x in data {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        (b << 16) | a
    }

    /// kubectl 1.32's first two SYN_STREAMs of a session, as observed on the wire (§3.3).
    const KUBECTL_SYN_1: &str = "80030001 00000040 00000001 00000000 0000
        78f9e3c6a7c2 02253a703a2b294a4dcc851625aca9a0808614cb45a024cc6a68616061c0c0c0c0590489c74c50fa663400000000ffff";
    const KUBECTL_SYN_3: &str =
        "80030001 00000018 00000003 00000000 0000 c2aa1b54102512a119000000ffff";

    fn kubectl_headers(kind: &str) -> Headers {
        Headers(vec![
            ("streamtype".into(), kind.into()),
            ("port".into(), "18080".into()),
            ("requestid".into(), "0".into()),
        ])
    }

    fn syn(id: u32, headers: Headers) -> Frame {
        Frame::SynStream {
            stream_id: id,
            assoc_stream_id: 0,
            priority: 0,
            slot: 0,
            flags: 0,
            headers,
        }
    }

    #[test]
    fn spdy_dictionary_is_the_published_one() {
        assert_eq!(DICTIONARY.len(), 1423);
        assert_eq!(adler32(DICTIONARY), DICTIONARY_ADLER32);
        assert!(DICTIONARY.starts_with(b"\0\0\0\x07options"));
    }

    #[test]
    fn spdy_decodes_observed_kubectl_syn_streams() {
        let mut d = Decoder::new();
        d.push(&hex(KUBECTL_SYN_1));
        d.push(&hex(KUBECTL_SYN_3));
        assert_eq!(
            d.next_frame().unwrap(),
            Some(syn(1, kubectl_headers("error")))
        );
        assert_eq!(
            d.next_frame().unwrap(),
            Some(syn(3, kubectl_headers("data")))
        );
        assert_eq!(d.next_frame().unwrap(), None);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn spdy_decodes_observed_kubectl_control_frames() {
        let mut d = Decoder::new();
        d.push(&hex(
            "80030003 00000008 00000007 00000005  80030006 00000004 00000001",
        ));
        assert_eq!(
            d.next_frame().unwrap(),
            Some(Frame::RstStream {
                stream_id: 7,
                status: rst_status::CANCEL
            })
        );
        assert_eq!(d.next_frame().unwrap(), Some(Frame::Ping { id: 1 }));
        assert_eq!(d.next_frame().unwrap(), None);
    }

    #[test]
    fn spdy_observed_python_syn_replies_decode() {
        // What the reference Python server sent; a client inflater must accept it, so ours must too.
        let mut d = Decoder::new();
        d.push(&hex(
            "80030002 00000014 00000001 78f9e3c6a7c202a6230600000000ffff",
        ));
        d.push(&hex("80030002 0000000c 00000003 020100000000ffff"));
        for id in [1, 3] {
            assert_eq!(
                d.next_frame().unwrap(),
                Some(Frame::SynReply {
                    stream_id: id,
                    flags: 0,
                    headers: Headers::new()
                })
            );
        }
    }

    #[test]
    fn spdy_our_syn_replies_inflate_with_a_separate_inflater() {
        let mut enc = Encoder::new();
        let first = enc.syn_reply(1).unwrap();
        let second = enc.syn_reply(3).unwrap();
        // Control header, stream id, then a zlib header with FDICT and the SPDY dictionary id.
        assert_eq!(&first[..4], &[0x80, 0x03, 0x00, 0x02]);
        assert_eq!(&first[8..12], &[0, 0, 0, 1]);
        assert_eq!(&first[12..18], &hex("78f9e3c6a7c2")[..]);
        assert!(first.ends_with(&[0, 0, 0xff, 0xff]));
        assert!(second.ends_with(&[0, 0, 0xff, 0xff]));
        assert_ne!(
            &second[12..14],
            &[0x78, 0xf9],
            "later blocks carry no zlib header"
        );
        // A fresh inflater, fed frame by frame, exactly like spdystream's.
        let mut inf = HeaderInflater::new();
        assert_eq!(inf.inflate(&first[12..]).unwrap(), vec![0, 0, 0, 0]);
        assert_eq!(inf.inflate(&second[12..]).unwrap(), vec![0, 0, 0, 0]);
    }

    #[test]
    fn spdy_parses_byte_by_byte_and_packed() {
        let mut wire = hex(KUBECTL_SYN_1);
        wire.extend(hex(KUBECTL_SYN_3));
        encode_data(3, 0, b"hello", &mut wire).unwrap();
        encode_data(1, FLAG_FIN, b"", &mut wire).unwrap();
        wire.extend(encode_ping(5));
        let expected = vec![
            syn(1, kubectl_headers("error")),
            syn(3, kubectl_headers("data")),
            Frame::Data {
                stream_id: 3,
                flags: 0,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::new(),
            },
            Frame::Ping { id: 5 },
        ];
        for chunk in [1usize, 3, 7, 13, wire.len()] {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                d.push(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, expected, "chunk size {chunk}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn spdy_rejects_malformed_frames() {
        let cases: &[(&str, FrameError)] = &[
            (
                "80020006 00000004 00000001",
                FrameError::UnsupportedVersion(2),
            ),
            (
                "80030006 00000005 00000001 00",
                FrameError::InvalidLength {
                    frame_type: 6,
                    length: 5,
                },
            ),
            (
                "80030003 00000004 00000001",
                FrameError::InvalidLength {
                    frame_type: 3,
                    length: 4,
                },
            ),
            (
                "80030003 00000008 00000001 00000000",
                FrameError::ZeroRstStatus,
            ),
            (
                "80030003 00000008 00000000 00000005",
                FrameError::ZeroStreamId {
                    frame_type: Some(3),
                },
            ),
            (
                "80030007 00000004 00000001",
                FrameError::InvalidLength {
                    frame_type: 7,
                    length: 4,
                },
            ),
            (
                "80030004 00000008 00000002 00000000",
                FrameError::InvalidLength {
                    frame_type: 4,
                    length: 8,
                },
            ),
            (
                "80030001 00000008 00000001 00000000",
                FrameError::InvalidLength {
                    frame_type: 1,
                    length: 8,
                },
            ),
            (
                "00000000 00000001 ff",
                FrameError::ZeroStreamId { frame_type: None },
            ),
        ];
        for (wire, want) in cases {
            let mut d = Decoder::new();
            d.push(&hex(wire));
            assert_eq!(d.next_frame().unwrap_err(), *want, "{wire}");
        }
    }

    #[test]
    fn spdy_rejects_bad_header_blocks() {
        // A zlib stream without the SPDY dictionary: 78 9c + empty stored/fixed block is fine
        // zlib but a wrong-dictionary stream must be refused.
        let mut c = Compress::new(Compression::best(), true);
        c.set_dictionary(b"not the spdy dictionary").unwrap();
        let mut block = Vec::with_capacity(64);
        c.compress_vec(&[0, 0, 0, 0], &mut block, FlushCompress::Sync)
            .unwrap();
        let mut inf = HeaderInflater::new();
        assert!(matches!(
            inf.inflate(&block),
            Err(FrameError::WrongDictionary(_))
        ));
        // Garbage is a corrupt stream.
        assert!(matches!(
            HeaderInflater::new().inflate(&[0x12, 0x34, 0x56]),
            Err(FrameError::Inflate(_))
        ));
        // Well-compressed but malformed pair lists.
        for raw in [
            &[0u8, 0, 0][..],
            &[0, 0, 0, 1, 0, 0, 0, 9, b'a'],
            &[0, 0, 0, 0, 7],
            &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        ] {
            let mut d = HeaderDeflater::new();
            let mut inf = HeaderInflater::new();
            let got = Headers::from_block(&inf.inflate(&d.deflate(raw).unwrap()).unwrap());
            assert!(
                matches!(got, Err(FrameError::MalformedHeaderBlock(_))),
                "{raw:?}"
            );
        }
        // A compression bomb is cut off.
        let bomb = vec![0u8; MAX_HEADER_BLOCK + 1];
        let compressed = HeaderDeflater::new().deflate(&bomb).unwrap();
        assert_eq!(
            HeaderInflater::new().inflate(&compressed).map(|v| v.len()),
            Err(FrameError::HeaderBlockTooLarge)
        );
    }

    #[test]
    fn spdy_encodes_fixed_frames_bytewise() {
        assert_eq!(encode_ping(1), hex("80030006 00000004 00000001"));
        assert_eq!(
            encode_rst_stream(7, rst_status::CANCEL),
            hex("80030003 00000008 00000007 00000005")
        );
        assert_eq!(
            encode_goaway(0, 0),
            hex("80030007 00000008 00000000 00000000")
        );
        let mut out = Vec::new();
        encode_data(3, FLAG_FIN, b"", &mut out).unwrap();
        assert_eq!(out, hex("00000003 01000000"));
        assert_eq!(
            encode_data(1, 0, &vec![0; MAX_FRAME_PAYLOAD + 1], &mut Vec::new()),
            Err(FrameError::PayloadTooLarge(MAX_FRAME_PAYLOAD + 1))
        );
    }

    fn arb_headers() -> impl Strategy<Value = Headers> {
        proptest::collection::vec(("[a-z][a-z0-9-]{0,12}", "[ -~\u{0}]{0,24}"), 0..6)
            .prop_map(Headers)
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let id = 1u32..=0x7FFF_FFFF;
        prop_oneof![
            (
                id.clone(),
                0u32..=0x7FFF_FFFF,
                0u8..8,
                any::<u8>(),
                0u8..4,
                arb_headers()
            )
                .prop_map(
                    |(stream_id, assoc_stream_id, priority, slot, flags, headers)| {
                        Frame::SynStream {
                            stream_id,
                            assoc_stream_id,
                            priority,
                            slot,
                            flags,
                            headers,
                        }
                    }
                ),
            (id.clone(), 0u8..2, arb_headers()).prop_map(|(stream_id, flags, headers)| {
                Frame::SynReply {
                    stream_id,
                    flags,
                    headers,
                }
            }),
            (id.clone(), 0u8..2, arb_headers()).prop_map(|(stream_id, flags, headers)| {
                Frame::Headers {
                    stream_id,
                    flags,
                    headers,
                }
            }),
            (id.clone(), 1u32..=u32::MAX)
                .prop_map(|(stream_id, status)| Frame::RstStream { stream_id, status }),
            (
                any::<u8>(),
                proptest::collection::vec((any::<u8>(), 0u32..=0xFF_FFFF, any::<u32>()), 0..4)
            )
                .prop_map(|(flags, entries)| Frame::Settings { flags, entries }),
            any::<u32>().prop_map(|id| Frame::Ping { id }),
            (0u32..=0x7FFF_FFFF, any::<u32>()).prop_map(|(last_good_stream_id, status)| {
                Frame::GoAway {
                    last_good_stream_id,
                    status,
                }
            }),
            (0u32..=0x7FFF_FFFF, 0u32..=0x7FFF_FFFF)
                .prop_map(|(stream_id, delta)| Frame::WindowUpdate { stream_id, delta }),
            (
                id,
                any::<u8>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(stream_id, flags, d)| Frame::Data {
                    stream_id,
                    flags,
                    data: Bytes::from(d)
                }),
            (
                10u16..=0xFFFF,
                any::<u8>(),
                proptest::collection::vec(any::<u8>(), 0..40)
            )
                .prop_map(|(frame_type, flags, p)| Frame::Unknown {
                    frame_type,
                    flags,
                    payload: Bytes::from(p)
                }),
        ]
    }

    proptest! {
        /// Any frame sequence survives encode -> arbitrary re-chunking -> parse, with one
        /// deflater and one inflater spanning the whole sequence.
        #[test]
        fn spdy_round_trip(frames in proptest::collection::vec(arb_frame(), 1..12), chunk in 1usize..64) {
            let mut enc = Encoder::new();
            let mut wire = Vec::new();
            for f in &frames {
                enc.encode(f, &mut wire).unwrap();
            }
            let mut dec = Decoder::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                dec.push(piece);
                while let Some(f) = dec.next_frame().unwrap() {
                    got.push(f);
                }
            }
            prop_assert_eq!(got, frames);
            prop_assert_eq!(dec.buffered(), 0);
        }
    }
}
