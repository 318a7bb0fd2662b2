//! The reverse direction, for a control plane: decode agent messages ([`AgentMessage`], via
//! [`Envelope::agent_message`]) and encode control-plane messages ([`ControlMessage`]).
//!
//! Built from the same pieces as the agent side (envelope, field readers, JSON writer), so
//! every type is decoded and encoded by one codebase and round-trip tests cover both ends.
//! Decoding accepts only long names (the agent never emits short ones); encoding emits long
//! names too (`proxy_websocket_*`).

use crate::wire::b64::Base64Str;
use crate::wire::envelope::{Envelope, Extensions, opt_bool, opt_str, opt_u16, opt_u64, req_str};
use crate::wire::error::{DecodeError, EncodeError};
use crate::wire::frame::{CloseFrame, DataFrame};
use crate::wire::headers::{HeaderList, Headers, write_headers};
use crate::wire::inbound::{UdpTunnelData, WebSocketClose, WebSocketData};
use crate::wire::json::{JsonObject, JsonStr, WireStr};
use crate::wire::outbound::{write_envelope, write_extensions};
use crate::wire::timestamp::UnixTime;

/// A decoded agent message (agent → control plane). Every variant borrows the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentMessage<'a> {
    /// `register`: the ids and extensions, plus the whole payload.
    Register {
        /// `agent_id`.
        agent_id: Option<JsonStr<'a>>,
        /// `cluster_id` (resume).
        cluster_id: Option<JsonStr<'a>>,
        /// Tether extensions the agent supports.
        extensions: Extensions,
        /// The whole payload.
        payload: JsonObject<'a>,
    },
    /// `heartbeat`: status fields plus the whole payload.
    Heartbeat {
        /// `cluster_id`.
        cluster_id: Option<JsonStr<'a>>,
        /// `status`.
        status: Option<JsonStr<'a>>,
        /// The whole payload.
        payload: JsonObject<'a>,
    },
    /// `pong`.
    Pong,
    /// `gateway_hello_ack`.
    GatewayHelloAck {
        /// `use_yamux`.
        use_yamux: bool,
    },
    /// `proxy_response`.
    ProxyResponse {
        /// `status` (required).
        status: u16,
        /// `headers`.
        headers: Headers<'a>,
        /// `body` (base64), when any.
        body: Option<Base64Str<'a>>,
        /// `encoding == "gzip"`.
        gzip: bool,
    },
    /// `proxy_response_header`.
    ProxyResponseHeader {
        /// `status` (required).
        status: u16,
        /// `headers`.
        headers: Headers<'a>,
    },
    /// `proxy_response_chunk`.
    ProxyResponseChunk {
        /// `data` (base64, required).
        data: Base64Str<'a>,
    },
    /// `proxy_response_end`.
    ProxyResponseEnd,
    /// `proxy_response_abort`.
    ProxyResponseAbort {
        /// `error`.
        error: Option<JsonStr<'a>>,
    },
    /// `proxy_error`.
    ProxyError {
        /// `payload.request_id` (the stream id on the kubectl path).
        stream_id: Option<JsonStr<'a>>,
        /// `error`.
        error: Option<JsonStr<'a>>,
        /// Tether extension: upstream HTTP status.
        status: Option<u16>,
    },
    /// Tether extension `proxy_websocket_started`.
    WebSocketStarted {
        /// `stream_id` (required).
        stream_id: JsonStr<'a>,
        /// `protocol`; empty or absent when none was negotiated.
        protocol: Option<JsonStr<'a>>,
    },
    /// `proxy_websocket_data` (stream id resolved as on the agent side).
    WebSocketData(WebSocketData<'a>),
    /// `proxy_websocket_close`.
    WebSocketClose(WebSocketClose<'a>),
    /// `backpressure`.
    Backpressure {
        /// `payload.request_id`.
        request_id: Option<JsonStr<'a>>,
        /// `reason`.
        reason: Option<JsonStr<'a>>,
    },
    /// `protocol_fallback`.
    ProtocolFallback {
        /// `unknown_type`.
        unknown_type: Option<JsonStr<'a>>,
        /// `original_request_id`.
        original_request_id: Option<JsonStr<'a>>,
    },
    /// `tcp_tunnel_data`.
    TcpTunnelData {
        /// `data` (base64, required).
        data: Base64Str<'a>,
    },
    /// `tcp_tunnel_close`.
    TcpTunnelClose {
        /// `reason`.
        reason: Option<JsonStr<'a>>,
        /// `bytes_sent`.
        bytes_sent: Option<u64>,
        /// `bytes_received`.
        bytes_received: Option<u64>,
        /// `duration_ms`.
        duration_ms: Option<u64>,
        /// `error`.
        error: Option<JsonStr<'a>>,
    },
    /// `udp_tunnel_data`.
    UdpTunnelData(UdpTunnelData<'a>),
    /// Any other type.
    Unknown {
        /// The type as received.
        type_name: JsonStr<'a>,
    },
}

impl<'a> Envelope<'a> {
    /// Decodes the payload as an agent message (the control plane's view). Same error rules
    /// as [`inbound`](Self::inbound); unknown types decode to [`AgentMessage::Unknown`].
    pub fn agent_message(&self) -> Result<AgentMessage<'a>, DecodeError> {
        let p = self.payload;
        let t = self.type_name;
        let status = |v| opt_u16(v, "status")?.ok_or(DecodeError::MissingField("status"));
        Ok(if t == "register" {
            let [agent_id, cluster_id] = p.fields(["agent_id", "cluster_id"]);
            AgentMessage::Register {
                agent_id: opt_str(agent_id, "agent_id")?,
                cluster_id: opt_str(cluster_id, "cluster_id")?,
                extensions: Extensions::from_payload(p)?,
                payload: p,
            }
        } else if t == "heartbeat" {
            let [cluster_id, st] = p.fields(["cluster_id", "status"]);
            AgentMessage::Heartbeat {
                cluster_id: opt_str(cluster_id, "cluster_id")?,
                status: opt_str(st, "status")?,
                payload: p,
            }
        } else if t == "pong" {
            AgentMessage::Pong
        } else if t == "gateway_hello_ack" {
            AgentMessage::GatewayHelloAck {
                use_yamux: opt_bool(p.get("use_yamux"), "use_yamux")?,
            }
        } else if t == "proxy_response" {
            let [st, headers, body, encoding] = p.fields(["status", "headers", "body", "encoding"]);
            AgentMessage::ProxyResponse {
                status: status(st)?,
                headers: Headers::from_value(headers)?,
                body: opt_str(body, "body")?.map(Base64Str),
                gzip: opt_str(encoding, "encoding")?.is_some_and(|e| e == "gzip"),
            }
        } else if t == "proxy_response_header" {
            let [st, headers] = p.fields(["status", "headers"]);
            AgentMessage::ProxyResponseHeader {
                status: status(st)?,
                headers: Headers::from_value(headers)?,
            }
        } else if t == "proxy_response_chunk" {
            AgentMessage::ProxyResponseChunk {
                data: Base64Str(req_str(p.get("data"), "data")?),
            }
        } else if t == "proxy_response_end" {
            AgentMessage::ProxyResponseEnd
        } else if t == "proxy_response_abort" {
            AgentMessage::ProxyResponseAbort {
                error: opt_str(p.get("error"), "error")?,
            }
        } else if t == "proxy_error" {
            let [stream_id, error, st] = p.fields(["request_id", "error", "status"]);
            AgentMessage::ProxyError {
                stream_id: opt_str(stream_id, "request_id")?,
                error: opt_str(error, "error")?,
                status: opt_u16(st, "status")?,
            }
        } else if t == "proxy_websocket_started" {
            let [stream_id, protocol] = p.fields(["stream_id", "protocol"]);
            AgentMessage::WebSocketStarted {
                stream_id: req_str(stream_id, "stream_id")?,
                protocol: opt_str(protocol, "protocol")?,
            }
        } else if t == "proxy_websocket_data" || t == "proxy_websocket_close" {
            // Same payloads as the control plane sends; reuse the inbound decoder.
            return match self.inbound()? {
                crate::wire::Inbound::WebSocketData(d) => Ok(AgentMessage::WebSocketData(d)),
                crate::wire::Inbound::WebSocketClose(c) => Ok(AgentMessage::WebSocketClose(c)),
                _ => Err(DecodeError::WrongType("type")),
            };
        } else if t == "backpressure" {
            let [request_id, reason] = p.fields(["request_id", "reason"]);
            AgentMessage::Backpressure {
                request_id: opt_str(request_id, "request_id")?,
                reason: opt_str(reason, "reason")?,
            }
        } else if t == "protocol_fallback" {
            let [unknown_type, original] = p.fields(["unknown_type", "original_request_id"]);
            AgentMessage::ProtocolFallback {
                unknown_type: opt_str(unknown_type, "unknown_type")?,
                original_request_id: opt_str(original, "original_request_id")?,
            }
        } else if t == "tcp_tunnel_data" {
            AgentMessage::TcpTunnelData {
                data: Base64Str(req_str(p.get("data"), "data")?),
            }
        } else if t == "tcp_tunnel_close" {
            let [reason, sent, received, duration, error] = p.fields([
                "reason",
                "bytes_sent",
                "bytes_received",
                "duration_ms",
                "error",
            ]);
            AgentMessage::TcpTunnelClose {
                reason: opt_str(reason, "reason")?,
                bytes_sent: opt_u64(sent, "bytes_sent")?,
                bytes_received: opt_u64(received, "bytes_received")?,
                duration_ms: opt_u64(duration, "duration_ms")?,
                error: opt_str(error, "error")?,
            }
        } else if t == "udp_tunnel_data" {
            return match self.inbound()? {
                crate::wire::Inbound::UdpTunnelData(u) => Ok(AgentMessage::UdpTunnelData(u)),
                _ => Err(DecodeError::WrongType("type")),
            };
        } else {
            AgentMessage::Unknown { type_name: t }
        })
    }
}

/// A control-plane message to encode (control plane → agent), borrowing its data. Covers
/// what a control plane needs to drive the agent; the remaining catalogue types can be added
/// the same way.
#[derive(Debug, Clone, Copy)]
pub enum ControlMessage<'a> {
    /// `register_success` `{cluster_id, gateway_ws_url?, extensions}`.
    RegisterSuccess {
        /// `cluster_id`.
        cluster_id: WireStr<'a>,
        /// `gateway_ws_url`, when the agent should move to a gateway.
        gateway_ws_url: Option<WireStr<'a>>,
        /// Extensions the control plane supports.
        extensions: Extensions,
    },
    /// `heartbeat_ack` `{}`.
    HeartbeatAck,
    /// `ping` `{}`.
    Ping,
    /// `proxy_request` with the commonly used members.
    ProxyRequest {
        /// `method`.
        method: WireStr<'a>,
        /// `path`.
        path: WireStr<'a>,
        /// `query` (omitted when empty).
        query: WireStr<'a>,
        /// `headers`.
        headers: &'a dyn HeaderList,
        /// Body bytes, sent as `body` + `body_encoding: "base64"`.
        body: Option<&'a [u8]>,
        /// `use_streaming`: the body follows as `proxy_request_chunk`s.
        streaming: bool,
        /// `supports_response_streaming`.
        supports_response_streaming: bool,
        /// `timeout` in milliseconds.
        timeout_ms: Option<u64>,
        /// `response_credit`: the body comes back only within granted credit (extension).
        response_credit: bool,
    },
    /// `proxy_request_chunk` `{data}`.
    ProxyRequestChunk {
        /// Body bytes.
        data: &'a [u8],
    },
    /// `proxy_request_stream_end` `{}`.
    ProxyRequestStreamEnd,
    /// `proxy_cancel` `{}`.
    ProxyCancel,
    /// `proxy_response_credit` `{bytes, messages}` (extension `response_credit`): the client
    /// drained that much of the request's response; the agent may send as much more.
    ProxyResponseCredit {
        /// Bytes granted.
        bytes: u32,
        /// Messages granted.
        messages: u32,
    },
    /// `proxy_websocket_start` `{stream_id, method, path, query, headers, protocol?, upgrade?}`.
    WebSocketStart {
        /// The stream.
        stream_id: WireStr<'a>,
        /// `path`.
        path: WireStr<'a>,
        /// `query`.
        query: WireStr<'a>,
        /// `headers`.
        headers: &'a dyn HeaderList,
        /// `protocol`: requested subprotocols, comma separated (for a raw upgrade: the offered
        /// `X-Stream-Protocol-Version`s).
        protocol: Option<WireStr<'a>>,
        /// `method`: `GET` when `None`; a raw upgrade sends its client's (`POST` for SPDY).
        method: Option<WireStr<'a>>,
        /// `upgrade`: the HTTP/1.1 `Upgrade` token of a raw (non-WebSocket) upgrade; only to an
        /// agent that advertised [`Extensions::raw_upgrade`].
        upgrade: Option<WireStr<'a>>,
    },
    /// `proxy_websocket_data` `{stream_id, data}`.
    WebSocketData {
        /// The stream.
        stream_id: WireStr<'a>,
        /// The message.
        frame: DataFrame<'a>,
    },
    /// `proxy_websocket_close` `{stream_id, code?, reason?}`.
    WebSocketClose {
        /// The stream.
        stream_id: WireStr<'a>,
        /// Code and reason (only when the agent advertised the extension).
        close: Option<CloseFrame<'a>>,
    },
    /// `error` `{error}`.
    Error {
        /// Message.
        error: WireStr<'a>,
    },
    /// `tcp_tunnel_start` `{tunnel_id, service_name?, service_port, client_addr?}`: the agent dials
    /// `service_name:service_port` (see [`crate::relay::TcpTunnelRequest`]).
    TcpTunnelStart {
        /// `tunnel_id` (also sent as the envelope's request id by the gateway).
        tunnel_id: WireStr<'a>,
        /// `service_name`: the host to dial (the agent dials `localhost` without one).
        service_name: Option<WireStr<'a>>,
        /// `service_port`: the port to dial.
        service_port: u16,
        /// `client_addr`: who connected on the control plane's side, for the agent's logs.
        client_addr: Option<WireStr<'a>>,
        /// `stream` (extension `native_tcp`): the native stream number the tunnel's frames use.
        stream: Option<u32>,
    },
    /// `tcp_tunnel_data` `{tunnel_id, data}`.
    TcpTunnelData {
        /// `tunnel_id`.
        tunnel_id: WireStr<'a>,
        /// Bytes, sent base64.
        data: &'a [u8],
    },
    /// `tcp_tunnel_close` `{tunnel_id, reason, error?}`.
    TcpTunnelClose {
        /// `tunnel_id`.
        tunnel_id: WireStr<'a>,
        /// `reason`.
        reason: WireStr<'a>,
        /// `error`, when any.
        error: Option<WireStr<'a>>,
    },
}

impl ControlMessage<'_> {
    /// The wire type name.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::RegisterSuccess { .. } => "register_success",
            Self::HeartbeatAck => "heartbeat_ack",
            Self::Ping => "ping",
            Self::ProxyRequest { .. } => "proxy_request",
            Self::ProxyRequestChunk { .. } => "proxy_request_chunk",
            Self::ProxyRequestStreamEnd => "proxy_request_stream_end",
            Self::ProxyCancel => "proxy_cancel",
            Self::ProxyResponseCredit { .. } => "proxy_response_credit",
            Self::WebSocketStart { .. } => "proxy_websocket_start",
            Self::WebSocketData { .. } => "proxy_websocket_data",
            Self::WebSocketClose { .. } => "proxy_websocket_close",
            Self::Error { .. } => "error",
            Self::TcpTunnelStart { .. } => "tcp_tunnel_start",
            Self::TcpTunnelData { .. } => "tcp_tunnel_data",
            Self::TcpTunnelClose { .. } => "tcp_tunnel_close",
        }
    }

    /// Encodes the envelope into `buf`; same contract as
    /// [`Outbound::encode`](super::Outbound::encode).
    pub fn encode(
        &self,
        request_id: Option<WireStr<'_>>,
        now: UnixTime,
        buf: &mut [u8],
    ) -> Result<usize, EncodeError> {
        if let Self::WebSocketData { frame, .. } = self {
            frame.check().map_err(EncodeError::InvalidFrame)?;
        }
        write_envelope(self.type_name(), request_id, now, buf, |p, _| match *self {
            Self::RegisterSuccess {
                cluster_id,
                gateway_ws_url,
                extensions,
            } => {
                p.wire_str("cluster_id", cluster_id);
                p.opt_wire_str("gateway_ws_url", gateway_ws_url);
                write_extensions(p, &extensions);
            }
            Self::HeartbeatAck | Self::Ping | Self::ProxyRequestStreamEnd | Self::ProxyCancel => {}
            Self::ProxyResponseCredit { bytes, messages } => {
                p.u64("bytes", bytes.into());
                p.u64("messages", messages.into());
            }
            Self::ProxyRequest {
                method,
                path,
                query,
                headers,
                body,
                streaming,
                supports_response_streaming,
                timeout_ms,
                response_credit,
            } => {
                p.wire_str("method", method);
                p.wire_str("path", path);
                if !query.is_empty() {
                    p.wire_str("query", query);
                }
                write_headers(p.key("headers"), headers);
                if let Some(body) = body {
                    p.base64("body", &[body]);
                    p.str("body_encoding", "base64");
                }
                if streaming {
                    p.bool("use_streaming", true);
                }
                if supports_response_streaming {
                    p.bool("supports_response_streaming", true);
                }
                if let Some(ms) = timeout_ms {
                    p.u64("timeout", ms);
                }
                if response_credit {
                    p.bool("response_credit", true);
                }
            }
            Self::ProxyRequestChunk { data } => p.base64("data", &[data]),
            Self::WebSocketStart { .. } => {
                if let Some(start) = super::native::StartRequest::from_control(self) {
                    super::native::write_start_payload(p, &start);
                }
            }
            Self::WebSocketData { stream_id, frame } => {
                p.wire_str("stream_id", stream_id);
                let (head, head_len, body) = frame.parts();
                p.base64("data", &[&head[..head_len], body]);
            }
            Self::WebSocketClose { stream_id, close } => {
                p.wire_str("stream_id", stream_id);
                if let Some(c) = close {
                    p.u64("code", c.code.into());
                    p.str("reason", c.reason);
                }
            }
            Self::Error { error } => p.wire_str("error", error),
            Self::TcpTunnelStart {
                tunnel_id,
                service_name,
                service_port,
                client_addr,
                stream,
            } => {
                p.wire_str("tunnel_id", tunnel_id);
                p.opt_wire_str("service_name", service_name);
                p.u64("service_port", service_port.into());
                p.opt_wire_str("client_addr", client_addr);
                if let Some(stream) = stream {
                    p.u64("stream", stream.into());
                }
            }
            Self::TcpTunnelData { tunnel_id, data } => {
                p.wire_str("tunnel_id", tunnel_id);
                p.base64("data", &[data]);
            }
            Self::TcpTunnelClose {
                tunnel_id,
                reason,
                error,
            } => {
                p.wire_str("tunnel_id", tunnel_id);
                p.wire_str("reason", reason);
                p.opt_wire_str("error", error);
            }
        })
    }
}
