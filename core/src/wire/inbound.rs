//! Messages from the control plane to the agent (catalogue §3b), decoded into borrowed views.
//!
//! Decoding is two steps so a caller can always answer a bad message: [`Envelope::parse`]
//! (fails only when the frame is not a JSON envelope) then [`Envelope::inbound`] (fails with
//! the missing or mistyped field, while the envelope's `request_id` stays available for the
//! `proxy_error`). No payload string is copied: ids, paths and base64 data stay [`JsonStr`]
//! views of the frame.

use crate::wire::b64::Base64Str;
use crate::wire::envelope::{
    Envelope, Extensions, opt_bool, opt_number, opt_object, opt_str, opt_u16, opt_u32, opt_u64,
    req_str,
};
use crate::wire::error::DecodeError;
use crate::wire::headers::Headers;
use crate::wire::json::{JsonNumber, JsonObject, JsonStr, JsonValue};

/// Every inbound type name the decoder knows (long and short forms), in the order used by
/// `protocol_fallback.supported_types`.
pub const INBOUND_TYPE_NAMES: &[&str] = &[
    "register_success",
    "register_in_progress",
    "heartbeat_ack",
    "gateway_hello",
    "ping",
    "pong",
    "proxy_request",
    "proxy_request_chunk",
    "proxy_request_stream_end",
    "proxy_cancel",
    "proxy_response_credit",
    "proxy_stream_data",
    "proxy_websocket_start",
    "ws_start",
    "proxy_websocket_data",
    "ws_data",
    "proxy_websocket_close",
    "ws_close",
    "tcp_tunnel_start",
    "tcp_tunnel_data",
    "tcp_tunnel_close",
    "udp_tunnel_data",
    "error",
];

/// A decoded control-plane message. Every variant borrows the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// `register_success`.
    RegisterSuccess(RegisterSuccess<'a>),
    /// `register_in_progress` (payload kept raw; informational).
    RegisterInProgress(JsonObject<'a>),
    /// `heartbeat_ack` (payload kept raw; informational).
    HeartbeatAck(JsonObject<'a>),
    /// `gateway_hello`.
    GatewayHello(GatewayHello),
    /// `ping`: answer `pong` echoing the envelope's request id.
    Ping,
    /// `pong`.
    Pong,
    /// `proxy_request` (§3c).
    ProxyRequest(ProxyRequest<'a>),
    /// `proxy_request_chunk`: a piece of a streamed request body.
    ProxyRequestChunk {
        /// Base64 body bytes (`data`, or `chunk` when `data` is absent).
        data: Base64Str<'a>,
    },
    /// `proxy_request_stream_end`: the streamed request body is complete.
    ProxyRequestStreamEnd,
    /// `proxy_cancel`: abandon the request named by the envelope's request id.
    ProxyCancel,
    /// Tether extension `response_credit`: the control plane's client drained part of the
    /// response of the request named by the envelope's request id; more body may be sent.
    ProxyResponseCredit {
        /// Bytes granted.
        bytes: u32,
        /// Messages (`proxy_response_chunk`s) granted.
        messages: u32,
    },
    /// `proxy_stream_data`: data for an app-service stream.
    ProxyStreamData {
        /// Base64 bytes.
        data: Base64Str<'a>,
    },
    /// `proxy_websocket_start` / `ws_start`.
    WebSocketStart(WebSocketStart<'a>),
    /// `proxy_websocket_data` / `ws_data`.
    WebSocketData(WebSocketData<'a>),
    /// `proxy_websocket_close` / `ws_close`.
    WebSocketClose(WebSocketClose<'a>),
    /// `tcp_tunnel_start`.
    TcpTunnelStart(TcpTunnelStart<'a>),
    /// `tcp_tunnel_data`.
    TcpTunnelData {
        /// `payload.tunnel_id`, when given (else the envelope's request id names the tunnel).
        tunnel_id: Option<JsonStr<'a>>,
        /// Base64 bytes.
        data: Base64Str<'a>,
    },
    /// `tcp_tunnel_close`.
    TcpTunnelClose {
        /// `payload.tunnel_id`, when given.
        tunnel_id: Option<JsonStr<'a>>,
        /// Why, when given.
        reason: Option<JsonStr<'a>>,
    },
    /// `udp_tunnel_data`.
    UdpTunnelData(UdpTunnelData<'a>),
    /// `error`: the control plane reports a failure (e.g. "cluster not found").
    Error {
        /// The message, when given.
        error: Option<JsonStr<'a>>,
    },
    /// Any other type: answer `protocol_fallback` (once per type).
    Unknown {
        /// The type as received.
        type_name: JsonStr<'a>,
    },
}

/// `register_success` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisterSuccess<'a> {
    /// `cluster_id` (required).
    pub cluster_id: JsonStr<'a>,
    /// `cluster_uuid`.
    pub cluster_uuid: Option<JsonStr<'a>>,
    /// `name`.
    pub name: Option<JsonStr<'a>>,
    /// `status`.
    pub status: Option<JsonStr<'a>>,
    /// `tunnel_url`.
    pub tunnel_url: Option<JsonStr<'a>>,
    /// `api_server`.
    pub api_server: Option<JsonStr<'a>>,
    /// `token`.
    pub token: Option<JsonStr<'a>>,
    /// `workspace_id` (a number).
    pub workspace_id: Option<JsonNumber<'a>>,
    /// `gateway_ws_url`: when present the agent moves to this gateway.
    pub gateway_ws_url: Option<JsonStr<'a>>,
    /// Tether extensions the control plane supports (`extensions` object; see [`Extensions`]).
    pub extensions: Extensions,
}

/// `gateway_hello` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct GatewayHello {
    /// `use_yamux`.
    pub use_yamux: bool,
    /// `yamux_config.max_stream_window_size` (bytes).
    pub max_stream_window_size: Option<u64>,
    /// `yamux_config.keep_alive_interval_seconds`.
    pub keep_alive_interval_seconds: Option<u64>,
    /// `yamux_config.connection_timeout_seconds`.
    pub connection_timeout_seconds: Option<u64>,
}

/// A request body carried inline in `proxy_request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// `body` string without `body_encoding: "base64"`: the body is the string's UTF-8 bytes.
    Text(JsonStr<'a>),
    /// `body` string with `body_encoding: "base64"`.
    Base64(Base64Str<'a>),
    /// `body` object or array: the body is this JSON (the raw text may be sent as is).
    Json(JsonValue<'a>),
}

/// `proxy_request` payload (§3c). Absent flags are `false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyRequest<'a> {
    /// `method`.
    pub method: Option<JsonStr<'a>>,
    /// `path`.
    pub path: Option<JsonStr<'a>>,
    /// `query`, the raw query string.
    pub query: Option<JsonStr<'a>>,
    /// `headers`.
    pub headers: Headers<'a>,
    /// `scheme` (`https` selects TLS / `wss` upstream).
    pub scheme: Option<JsonStr<'a>>,
    /// `cluster_id`.
    pub cluster_id: Option<JsonStr<'a>>,
    /// `cluster_uuid`.
    pub cluster_uuid: Option<JsonStr<'a>>,
    /// `agent_id`.
    pub agent_id: Option<JsonStr<'a>>,
    /// Inline body.
    pub body: Option<Body<'a>>,
    /// `body_binary`: the body follows in the next binary frame
    /// (`[u16 BE id length][id][body]`).
    pub body_binary: bool,
    /// `body_size`.
    pub body_size: Option<u64>,
    /// `use_streaming` or `streaming`: the body arrives as `proxy_request_chunk`s.
    pub streaming: bool,
    /// `is_websocket` or `isWebSocket` (see also [`wants_websocket`](Self::wants_websocket)).
    pub is_websocket: bool,
    /// `use_zero_copy` or `useZeroCopy` (ignored by the PipeOps agent).
    pub use_zero_copy: bool,
    /// `head_data` or `headData`: bytes already read from the client (base64 string, raw
    /// string or array of byte numbers), kept raw.
    pub head_data: Option<JsonValue<'a>>,
    /// `protocol`: requested WebSocket subprotocol(s), comma separated.
    pub protocol: Option<JsonStr<'a>>,
    /// `supports_streaming`.
    pub supports_streaming: bool,
    /// `supports_response_streaming`: answer with `proxy_response_header`/`_chunk`/`_end`.
    pub supports_response_streaming: bool,
    /// `deadline` (RFC 3339 string, unparsed).
    pub deadline: Option<JsonStr<'a>>,
    /// `timeout` in milliseconds: a number of milliseconds, or a Go duration string
    /// (`"1m30s"`, `"500ms"`) converted and truncated to milliseconds.
    pub timeout_ms: Option<u64>,
    /// `rate_limit_bps`.
    pub rate_limit_bps: Option<u64>,
    /// `namespace` (service routing).
    pub namespace: Option<JsonStr<'a>>,
    /// `service_name` (service routing).
    pub service_name: Option<JsonStr<'a>>,
    /// `service_port` (service routing).
    pub service_port: Option<u16>,
    /// Tether extension `response_credit`: send the response body only within the credit the
    /// control plane grants with `proxy_response_credit` (none before the first grant).
    pub response_credit: bool,
}

impl ProxyRequest<'_> {
    /// `true` when the request asks for a WebSocket, by the PipeOps agent's rules:
    /// `is_websocket`, a `protocol`, an `Upgrade: websocket` header, or any
    /// `Sec-WebSocket-Key` / `-Version` / `-Protocol` header.
    pub fn wants_websocket(&self) -> bool {
        self.is_websocket
            || self.protocol.is_some()
            || self
                .headers
                .get("upgrade")
                .is_some_and(|mut v| v.any(|s| s.eq_ignore_ascii_case("websocket")))
            || [
                "sec-websocket-key",
                "sec-websocket-version",
                "sec-websocket-protocol",
            ]
            .iter()
            .any(|h| self.headers.contains(h))
    }
}

/// `proxy_websocket_start` / `ws_start` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebSocketStart<'a> {
    /// `stream_id` (required).
    pub stream_id: JsonStr<'a>,
    /// `cluster_uuid`.
    pub cluster_uuid: Option<JsonStr<'a>>,
    /// `method` (ignored by the PipeOps agent: WebSocket dials are GETs).
    pub method: Option<JsonStr<'a>>,
    /// `path`.
    pub path: Option<JsonStr<'a>>,
    /// `query`, raw.
    pub query: Option<JsonStr<'a>>,
    /// `headers`.
    pub headers: Headers<'a>,
    /// `protocol`: requested subprotocol(s), comma separated. For a raw upgrade, the offered
    /// `X-Stream-Protocol-Version`s.
    pub protocol: Option<JsonStr<'a>>,
    /// Tether extension `raw_upgrade`: the HTTP/1.1 `Upgrade` token of a non-WebSocket upgrade
    /// (e.g. `SPDY/3.1`); after the upstream's 101 the stream is an opaque byte pipe.
    pub upgrade: Option<JsonStr<'a>>,
}

/// `proxy_websocket_data` / `ws_data` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebSocketData<'a> {
    /// The stream: `payload.stream_id`, else `payload.request_id`, else the envelope's
    /// `request_id` ([`DecodeError::MissingField`]`("stream_id")` when none is present).
    pub stream_id: JsonStr<'a>,
    /// `data`: base64 of `[opcode][payload]`; decode with
    /// [`DataFrame::decode_json`](super::DataFrame::decode_json).
    pub data: Base64Str<'a>,
    /// `message_type` (app-service streams only).
    pub message_type: Option<u8>,
}

/// `proxy_websocket_close` / `ws_close` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebSocketClose<'a> {
    /// The stream, resolved as for [`WebSocketData::stream_id`].
    pub stream_id: JsonStr<'a>,
    /// Tether extension: `code`, the WebSocket close code.
    pub code: Option<u16>,
    /// Tether extension: `reason`, the close reason.
    pub reason: Option<JsonStr<'a>>,
}

/// `tcp_tunnel_start` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpTunnelStart<'a> {
    /// `tunnel_id`, when given (else the envelope's request id names the tunnel).
    pub tunnel_id: Option<JsonStr<'a>>,
    /// `gateway_name`.
    pub gateway_name: Option<JsonStr<'a>>,
    /// `gateway_namespace`.
    pub gateway_namespace: Option<JsonStr<'a>>,
    /// `gateway_port`.
    pub gateway_port: Option<u16>,
    /// `service_name`.
    pub service_name: Option<JsonStr<'a>>,
    /// `service_namespace`.
    pub service_namespace: Option<JsonStr<'a>>,
    /// `service_port`.
    pub service_port: Option<u16>,
    /// `client_addr`.
    pub client_addr: Option<JsonStr<'a>>,
    /// `stream` (extension `native_tcp`): the native stream number of the tunnel's frames.
    pub stream: Option<u32>,
}

/// `udp_tunnel_data` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpTunnelData<'a> {
    /// `tunnel_id`, when given.
    pub tunnel_id: Option<JsonStr<'a>>,
    /// Base64 datagram.
    pub data: Base64Str<'a>,
    /// `client_addr`.
    pub client_addr: Option<JsonStr<'a>>,
    /// `client_port`.
    pub client_port: Option<u16>,
    /// The whole payload (for the `gateway_*` / `service_*` routing members).
    pub payload: JsonObject<'a>,
}

#[derive(Clone, Copy)]
enum Kind {
    RegisterSuccess,
    RegisterInProgress,
    HeartbeatAck,
    GatewayHello,
    Ping,
    Pong,
    ProxyRequest,
    ProxyRequestChunk,
    ProxyRequestStreamEnd,
    ProxyCancel,
    ProxyResponseCredit,
    ProxyStreamData,
    WsStart,
    WsData,
    WsClose,
    TcpStart,
    TcpData,
    TcpClose,
    UdpData,
    Error,
}

const KINDS: &[(&str, Kind)] = &[
    ("proxy_websocket_data", Kind::WsData),
    ("ws_data", Kind::WsData),
    ("proxy_request", Kind::ProxyRequest),
    ("proxy_request_chunk", Kind::ProxyRequestChunk),
    ("proxy_request_stream_end", Kind::ProxyRequestStreamEnd),
    ("proxy_websocket_start", Kind::WsStart),
    ("ws_start", Kind::WsStart),
    ("proxy_websocket_close", Kind::WsClose),
    ("ws_close", Kind::WsClose),
    ("proxy_cancel", Kind::ProxyCancel),
    ("proxy_response_credit", Kind::ProxyResponseCredit),
    ("proxy_stream_data", Kind::ProxyStreamData),
    ("ping", Kind::Ping),
    ("pong", Kind::Pong),
    ("heartbeat_ack", Kind::HeartbeatAck),
    ("register_success", Kind::RegisterSuccess),
    ("register_in_progress", Kind::RegisterInProgress),
    ("gateway_hello", Kind::GatewayHello),
    ("tcp_tunnel_start", Kind::TcpStart),
    ("tcp_tunnel_data", Kind::TcpData),
    ("tcp_tunnel_close", Kind::TcpClose),
    ("udp_tunnel_data", Kind::UdpData),
    ("error", Kind::Error),
];

impl<'a> Inbound<'a> {
    /// Decodes a whole frame (text, or JSON in a binary frame) with default limits:
    /// [`Envelope::parse`] then [`Envelope::inbound`].
    pub fn decode(frame: &'a [u8]) -> Result<(Envelope<'a>, Self), DecodeError> {
        let env = Envelope::parse(frame)?;
        let msg = env.inbound()?;
        Ok((env, msg))
    }

    /// The wire type name (long form) of this message; `Unknown` yields the received name's
    /// raw text.
    pub fn type_name(&self) -> &'a str {
        match self {
            Self::RegisterSuccess(_) => "register_success",
            Self::RegisterInProgress(_) => "register_in_progress",
            Self::HeartbeatAck(_) => "heartbeat_ack",
            Self::GatewayHello(_) => "gateway_hello",
            Self::Ping => "ping",
            Self::Pong => "pong",
            Self::ProxyRequest(_) => "proxy_request",
            Self::ProxyRequestChunk { .. } => "proxy_request_chunk",
            Self::ProxyRequestStreamEnd => "proxy_request_stream_end",
            Self::ProxyCancel => "proxy_cancel",
            Self::ProxyResponseCredit { .. } => "proxy_response_credit",
            Self::ProxyStreamData { .. } => "proxy_stream_data",
            Self::WebSocketStart(_) => "proxy_websocket_start",
            Self::WebSocketData(_) => "proxy_websocket_data",
            Self::WebSocketClose(_) => "proxy_websocket_close",
            Self::TcpTunnelStart(_) => "tcp_tunnel_start",
            Self::TcpTunnelData { .. } => "tcp_tunnel_data",
            Self::TcpTunnelClose { .. } => "tcp_tunnel_close",
            Self::UdpTunnelData(_) => "udp_tunnel_data",
            Self::Error { .. } => "error",
            Self::Unknown { type_name } => type_name.raw(),
        }
    }
}

impl<'a> Envelope<'a> {
    /// Decodes the payload as a control-plane message according to `type`.
    ///
    /// Unknown types decode to [`Inbound::Unknown`] (never an error). Errors name the
    /// offending field: [`DecodeError::MissingField`] for an absent required field,
    /// [`DecodeError::WrongType`] / [`DecodeError::InvalidValue`] for a present field of the
    /// wrong JSON type or out of range. Base64 data is NOT decoded here (see
    /// [`Base64Str`]).
    pub fn inbound(&self) -> Result<Inbound<'a>, DecodeError> {
        let Some(kind) = KINDS
            .iter()
            .find(|(name, _)| self.type_name == *name)
            .map(|(_, k)| *k)
        else {
            return Ok(Inbound::Unknown {
                type_name: self.type_name,
            });
        };
        let p = self.payload;
        Ok(match kind {
            Kind::RegisterSuccess => Inbound::RegisterSuccess(register_success(p)?),
            Kind::RegisterInProgress => Inbound::RegisterInProgress(p),
            Kind::HeartbeatAck => Inbound::HeartbeatAck(p),
            Kind::GatewayHello => Inbound::GatewayHello(gateway_hello(p)?),
            Kind::Ping => Inbound::Ping,
            Kind::Pong => Inbound::Pong,
            Kind::ProxyRequest => Inbound::ProxyRequest(proxy_request(p)?),
            Kind::ProxyRequestChunk => {
                let [data, chunk] = p.fields(["data", "chunk"]);
                let data = match opt_str(data, "data")? {
                    Some(d) => d,
                    None => req_str(chunk, "data")?,
                };
                Inbound::ProxyRequestChunk {
                    data: Base64Str(data),
                }
            }
            Kind::ProxyRequestStreamEnd => Inbound::ProxyRequestStreamEnd,
            Kind::ProxyCancel => Inbound::ProxyCancel,
            Kind::ProxyResponseCredit => {
                let [bytes, messages] = p.fields(["bytes", "messages"]);
                let field = |v, name| -> Result<u32, DecodeError> {
                    let n = opt_u64(v, name)?.ok_or(DecodeError::MissingField(name))?;
                    u32::try_from(n).map_err(|_| DecodeError::InvalidValue(name))
                };
                Inbound::ProxyResponseCredit {
                    bytes: field(bytes, "bytes")?,
                    messages: field(messages, "messages")?,
                }
            }
            Kind::ProxyStreamData => Inbound::ProxyStreamData {
                data: Base64Str(req_str(p.get("data"), "data")?),
            },
            Kind::WsStart => Inbound::WebSocketStart(websocket_start(p)?),
            Kind::WsData => {
                let [stream_id, request_id, data, message_type] =
                    p.fields(["stream_id", "request_id", "data", "message_type"]);
                Inbound::WebSocketData(WebSocketData {
                    stream_id: self.stream_id(stream_id, request_id)?,
                    data: Base64Str(req_str(data, "data")?),
                    message_type: opt_u64(message_type, "message_type")?
                        .map(|t| {
                            u8::try_from(t).map_err(|_| DecodeError::InvalidValue("message_type"))
                        })
                        .transpose()?,
                })
            }
            Kind::WsClose => {
                let [stream_id, request_id, code, reason] =
                    p.fields(["stream_id", "request_id", "code", "reason"]);
                Inbound::WebSocketClose(WebSocketClose {
                    stream_id: self.stream_id(stream_id, request_id)?,
                    code: opt_u16(code, "code")?,
                    reason: opt_str(reason, "reason")?,
                })
            }
            Kind::TcpStart => Inbound::TcpTunnelStart(tcp_tunnel_start(p)?),
            Kind::TcpData => {
                let [tunnel_id, data] = p.fields(["tunnel_id", "data"]);
                Inbound::TcpTunnelData {
                    tunnel_id: opt_str(tunnel_id, "tunnel_id")?,
                    data: Base64Str(req_str(data, "data")?),
                }
            }
            Kind::TcpClose => {
                let [tunnel_id, reason] = p.fields(["tunnel_id", "reason"]);
                Inbound::TcpTunnelClose {
                    tunnel_id: opt_str(tunnel_id, "tunnel_id")?,
                    reason: opt_str(reason, "reason")?,
                }
            }
            Kind::UdpData => {
                let [tunnel_id, data, client_addr, client_port] =
                    p.fields(["tunnel_id", "data", "client_addr", "client_port"]);
                Inbound::UdpTunnelData(UdpTunnelData {
                    tunnel_id: opt_str(tunnel_id, "tunnel_id")?,
                    data: Base64Str(req_str(data, "data")?),
                    client_addr: opt_str(client_addr, "client_addr")?,
                    client_port: opt_u16(client_port, "client_port")?,
                    payload: p,
                })
            }
            Kind::Error => Inbound::Error {
                error: opt_str(p.get("error"), "error")?,
            },
        })
    }

    /// `payload.stream_id` > `payload.request_id` > envelope `request_id`.
    fn stream_id(
        &self,
        stream_id: Option<JsonValue<'a>>,
        request_id: Option<JsonValue<'a>>,
    ) -> Result<JsonStr<'a>, DecodeError> {
        opt_str(stream_id, "stream_id")?
            .or(opt_str(request_id, "stream_id")?)
            .or(self.request_id)
            .ok_or(DecodeError::MissingField("stream_id"))
    }
}

fn register_success(p: JsonObject<'_>) -> Result<RegisterSuccess<'_>, DecodeError> {
    let [
        cluster_id,
        cluster_uuid,
        name,
        status,
        tunnel_url,
        api_server,
        token,
        workspace_id,
        gateway_ws_url,
    ] = p.fields([
        "cluster_id",
        "cluster_uuid",
        "name",
        "status",
        "tunnel_url",
        "api_server",
        "token",
        "workspace_id",
        "gateway_ws_url",
    ]);
    Ok(RegisterSuccess {
        cluster_id: req_str(cluster_id, "cluster_id")?,
        cluster_uuid: opt_str(cluster_uuid, "cluster_uuid")?,
        name: opt_str(name, "name")?,
        status: opt_str(status, "status")?,
        tunnel_url: opt_str(tunnel_url, "tunnel_url")?,
        api_server: opt_str(api_server, "api_server")?,
        token: opt_str(token, "token")?,
        workspace_id: opt_number(workspace_id, "workspace_id")?,
        gateway_ws_url: opt_str(gateway_ws_url, "gateway_ws_url")?,
        extensions: Extensions::from_payload(p)?,
    })
}

fn gateway_hello(p: JsonObject<'_>) -> Result<GatewayHello, DecodeError> {
    let [use_yamux, config] = p.fields(["use_yamux", "yamux_config"]);
    let mut hello = GatewayHello {
        use_yamux: opt_bool(use_yamux, "use_yamux")?,
        ..GatewayHello::default()
    };
    if let Some(c) = opt_object(config, "yamux_config")? {
        let [window, keep_alive, timeout] = c.fields([
            "max_stream_window_size",
            "keep_alive_interval_seconds",
            "connection_timeout_seconds",
        ]);
        hello.max_stream_window_size = opt_u64(window, "max_stream_window_size")?;
        hello.keep_alive_interval_seconds = opt_u64(keep_alive, "keep_alive_interval_seconds")?;
        hello.connection_timeout_seconds = opt_u64(timeout, "connection_timeout_seconds")?;
    }
    Ok(hello)
}

/// The first present of two alternative names.
fn either<'a>(a: Option<JsonValue<'a>>, b: Option<JsonValue<'a>>) -> Option<JsonValue<'a>> {
    a.filter(|v| !v.is_null()).or(b)
}

fn proxy_request(p: JsonObject<'_>) -> Result<ProxyRequest<'_>, DecodeError> {
    let [
        method,
        path,
        query,
        headers,
        scheme,
        cluster_id,
        cluster_uuid,
        agent_id,
        body,
        body_encoding,
        body_binary,
        body_size,
        use_streaming,
        streaming,
        is_websocket,
        is_websocket_camel,
        use_zero_copy,
        use_zero_copy_camel,
        head_data,
        head_data_camel,
        protocol,
        supports_streaming,
        supports_response_streaming,
        deadline,
        timeout,
        rate_limit_bps,
        namespace,
        service_name,
        service_port,
        response_credit,
    ] = p.fields([
        "method",
        "path",
        "query",
        "headers",
        "scheme",
        "cluster_id",
        "cluster_uuid",
        "agent_id",
        "body",
        "body_encoding",
        "body_binary",
        "body_size",
        "use_streaming",
        "streaming",
        "is_websocket",
        "isWebSocket",
        "use_zero_copy",
        "useZeroCopy",
        "head_data",
        "headData",
        "protocol",
        "supports_streaming",
        "supports_response_streaming",
        "deadline",
        "timeout",
        "rate_limit_bps",
        "namespace",
        "service_name",
        "service_port",
        "response_credit",
    ]);
    let base64 = opt_str(body_encoding, "body_encoding")?.is_some_and(|e| e == "base64");
    let body = match body.filter(|v| !v.is_null()) {
        None => None,
        Some(JsonValue::String(s)) if base64 => Some(Body::Base64(Base64Str(s))),
        Some(JsonValue::String(s)) => Some(Body::Text(s)),
        Some(v @ (JsonValue::Object(_) | JsonValue::Array(_))) => Some(Body::Json(v)),
        Some(_) => return Err(DecodeError::WrongType("body")),
    };
    let head_data = match either(head_data, head_data_camel).filter(|v| !v.is_null()) {
        None => None,
        Some(v @ (JsonValue::String(_) | JsonValue::Array(_))) => Some(v),
        Some(_) => return Err(DecodeError::WrongType("head_data")),
    };
    Ok(ProxyRequest {
        method: opt_str(method, "method")?,
        path: opt_str(path, "path")?,
        query: opt_str(query, "query")?,
        headers: Headers::from_value(headers)?,
        scheme: opt_str(scheme, "scheme")?,
        cluster_id: opt_str(cluster_id, "cluster_id")?,
        cluster_uuid: opt_str(cluster_uuid, "cluster_uuid")?,
        agent_id: opt_str(agent_id, "agent_id")?,
        body,
        body_binary: opt_bool(body_binary, "body_binary")?,
        body_size: opt_u64(body_size, "body_size")?,
        streaming: opt_bool(use_streaming, "use_streaming")? || opt_bool(streaming, "streaming")?,
        is_websocket: opt_bool(is_websocket, "is_websocket")?
            || opt_bool(is_websocket_camel, "isWebSocket")?,
        use_zero_copy: opt_bool(use_zero_copy, "use_zero_copy")?
            || opt_bool(use_zero_copy_camel, "useZeroCopy")?,
        head_data,
        protocol: opt_str(protocol, "protocol")?,
        supports_streaming: opt_bool(supports_streaming, "supports_streaming")?,
        supports_response_streaming: opt_bool(
            supports_response_streaming,
            "supports_response_streaming",
        )?,
        deadline: opt_str(deadline, "deadline")?,
        timeout_ms: timeout_ms(timeout)?,
        rate_limit_bps: opt_u64(rate_limit_bps, "rate_limit_bps")?,
        namespace: opt_str(namespace, "namespace")?,
        service_name: opt_str(service_name, "service_name")?,
        service_port: opt_u16(service_port, "service_port")?,
        response_credit: opt_bool(response_credit, "response_credit")?,
    })
}

pub(crate) fn websocket_start(p: JsonObject<'_>) -> Result<WebSocketStart<'_>, DecodeError> {
    let [
        stream_id,
        cluster_uuid,
        method,
        path,
        query,
        headers,
        protocol,
        upgrade,
    ] = p.fields([
        "stream_id",
        "cluster_uuid",
        "method",
        "path",
        "query",
        "headers",
        "protocol",
        "upgrade",
    ]);
    Ok(WebSocketStart {
        stream_id: req_str(stream_id, "stream_id")?,
        cluster_uuid: opt_str(cluster_uuid, "cluster_uuid")?,
        method: opt_str(method, "method")?,
        path: opt_str(path, "path")?,
        query: opt_str(query, "query")?,
        headers: Headers::from_value(headers)?,
        protocol: opt_str(protocol, "protocol")?,
        upgrade: opt_str(upgrade, "upgrade")?,
    })
}

fn tcp_tunnel_start(p: JsonObject<'_>) -> Result<TcpTunnelStart<'_>, DecodeError> {
    let [
        tunnel_id,
        gateway_name,
        gateway_namespace,
        gateway_port,
        service_name,
        service_namespace,
        service_port,
        client_addr,
        stream,
    ] = p.fields([
        "tunnel_id",
        "gateway_name",
        "gateway_namespace",
        "gateway_port",
        "service_name",
        "service_namespace",
        "service_port",
        "client_addr",
        "stream",
    ]);
    Ok(TcpTunnelStart {
        tunnel_id: opt_str(tunnel_id, "tunnel_id")?,
        gateway_name: opt_str(gateway_name, "gateway_name")?,
        gateway_namespace: opt_str(gateway_namespace, "gateway_namespace")?,
        gateway_port: opt_u16(gateway_port, "gateway_port")?,
        service_name: opt_str(service_name, "service_name")?,
        service_namespace: opt_str(service_namespace, "service_namespace")?,
        service_port: opt_u16(service_port, "service_port")?,
        client_addr: opt_str(client_addr, "client_addr")?,
        stream: opt_u32(stream, "stream")?,
    })
}

/// `timeout`: milliseconds as a number, or a Go duration string.
fn timeout_ms(v: Option<JsonValue<'_>>) -> Result<Option<u64>, DecodeError> {
    const F: &str = "timeout";
    match v.filter(|v| !v.is_null()) {
        None => Ok(None),
        Some(JsonValue::Number(n)) => {
            let ms = n.as_f64();
            if ms.is_finite() && ms >= 0.0 {
                // Saturating float-to-int conversion, truncating any fraction.
                Ok(Some(ms as u64))
            } else {
                Err(DecodeError::InvalidValue(F))
            }
        }
        Some(JsonValue::String(s)) => {
            let mut buf = [0u8; 64];
            let text = s
                .to_str(&mut buf)
                .map_err(|_| DecodeError::InvalidValue(F))?;
            go_duration_nanos(text)
                .map(|ns| Some((ns / 1_000_000).min(u128::from(u64::MAX)) as u64))
                .ok_or(DecodeError::InvalidValue(F))
        }
        Some(_) => Err(DecodeError::WrongType(F)),
    }
}

/// Parses a non-negative Go duration (`"300ms"`, `"1.5h"`, `"2h45m"`, `"0"`) into nanoseconds.
pub(crate) fn go_duration_nanos(s: &str) -> Option<u128> {
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Some(0);
    }
    if s.is_empty() {
        return None;
    }
    let mut rest = s.as_bytes();
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.iter().take_while(|c| c.is_ascii_digit()).count();
        let (int, tail) = rest.split_at(int_len);
        let (frac, tail) = match tail.split_first() {
            Some((b'.', t)) => {
                let n = t.iter().take_while(|c| c.is_ascii_digit()).count();
                t.split_at(n)
            }
            _ => (&[][..], tail),
        };
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        let unit_len = tail
            .iter()
            .take_while(|c| !c.is_ascii_digit() && **c != b'.')
            .count();
        let (unit, tail) = tail.split_at(unit_len);
        let scale: u128 = match unit {
            b"ns" => 1,
            // "us", "µs" (U+00B5) and "μs" (U+03BC)
            b"us" | [0xC2, 0xB5, b's'] | [0xCE, 0xBC, b's'] => 1_000,
            b"ms" => 1_000_000,
            b"s" => 1_000_000_000,
            b"m" => 60_000_000_000,
            b"h" => 3_600_000_000_000,
            _ => return None,
        };
        let mut whole: u128 = 0;
        for &c in int {
            whole = whole.checked_mul(10)?.checked_add(u128::from(c - b'0'))?;
        }
        total = total.checked_add(whole.checked_mul(scale)?)?;
        // Fraction: at most 30 digits matter for u128 math.
        let mut num: u128 = 0;
        let mut den: u128 = 1;
        for &c in frac.iter().take(30) {
            num = num * 10 + u128::from(c - b'0');
            den *= 10;
        }
        total = total.checked_add(num.checked_mul(scale)? / den)?;
        rest = tail;
    }
    Some(total)
}
