//! Messages from the agent to the control plane (catalogue §3a plus Tether extensions),
//! encoded into caller buffers.
//!
//! [`Outbound`] borrows every field; [`Outbound::encode`] writes the whole envelope in one
//! pass, base64-encoding binary data straight into the output buffer. Only long type names
//! are emitted. Payload members appear in a fixed order, so encodings are byte-for-byte
//! reproducible (the golden tests pin them).

use crate::wire::Extensions;
use crate::wire::error::EncodeError;
use crate::wire::frame::{CloseFrame, DataFrame};
use crate::wire::headers::{HeaderList, write_headers};
use crate::wire::inbound::INBOUND_TYPE_NAMES;
use crate::wire::json::{JsonWriter, ObjectWriter, Value, WireStr};
use crate::wire::timestamp::UnixTime;

/// `tunnel_port_config` of `register`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TunnelPorts {
    /// `kubernetes_api` (PipeOps default 6443).
    pub kubernetes_api: u16,
    /// `kubelet` (default 10250).
    pub kubelet: u16,
    /// `agent_http` (default 8080).
    pub agent_http: u16,
}

impl Default for TunnelPorts {
    fn default() -> Self {
        Self {
            kubernetes_api: 6443,
            kubelet: 10250,
            agent_http: 8080,
        }
    }
}

/// The PipeOps `features` object of `register`: what the agent can do in compat mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Features {
    /// `supports_streaming`
    pub supports_streaming: bool,
    /// `supports_binary_protocol`
    pub supports_binary_protocol: bool,
    /// `supports_compression`
    pub supports_compression: bool,
    /// `supports_websocket_proxy`
    pub supports_websocket_proxy: bool,
    /// `supports_gateway`
    pub supports_gateway: bool,
    /// `supports_response_streaming`
    pub supports_response_streaming: bool,
}

impl Features {
    /// Every flag set, as the PipeOps agent sends.
    pub const ALL: Self = Self {
        supports_streaming: true,
        supports_binary_protocol: true,
        supports_compression: true,
        supports_websocket_proxy: true,
        supports_gateway: true,
        supports_response_streaming: true,
    };
}

/// `register` payload.
#[derive(Debug, Clone, Copy)]
pub struct Register<'a> {
    /// `agent_id`
    pub agent_id: &'a str,
    /// `name`
    pub name: &'a str,
    /// `k8s_version`
    pub k8s_version: &'a str,
    /// `hostname`
    pub hostname: &'a str,
    /// `agent_version`
    pub agent_version: &'a str,
    /// `server_ip`
    pub server_ip: &'a str,
    /// `region`
    pub region: &'a str,
    /// `cloud_provider`
    pub cloud_provider: &'a str,
    /// `tunnel_port_config`
    pub tunnel_ports: TunnelPorts,
    /// `labels` (string values)
    pub labels: &'a [(&'a str, &'a str)],
    /// `server_specs` (free-form)
    pub server_specs: &'a [(&'a str, Value<'a>)],
    /// `features`
    pub features: Features,
    /// `extensions`: the Tether extensions the agent supports (see [`Extensions`]).
    pub extensions: Extensions,
    /// `metadata` (omitted when empty)
    pub metadata: &'a [(&'a str, Value<'a>)],
    /// `cluster_id`, when already known (resume).
    pub cluster_id: Option<&'a str>,
    /// `k8s_service_token`, when shared.
    pub k8s_service_token: Option<&'a str>,
}

/// `heartbeat` `status` of a Tether agent that is shutting down: the control plane routes new
/// streams to another agent of the cluster and leaves this one's live streams alone. Sent only
/// to a control plane that advertised Tether extensions.
pub const HEARTBEAT_DRAINING: &str = "draining";

/// `heartbeat` payload.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat<'a> {
    /// `cluster_id`
    pub cluster_id: &'a str,
    /// `agent_id`
    pub agent_id: &'a str,
    /// `status`: `healthy`, `reconnecting` or `disconnected` (PipeOps), or
    /// [`HEARTBEAT_DRAINING`].
    pub status: &'a str,
    /// `tunnel_status`: `connected` or `disconnected`.
    pub tunnel_status: &'a str,
    /// `metadata` (free-form: agent_version, k8s_nodes, ...).
    pub metadata: &'a [(&'a str, Value<'a>)],
    /// Further top-level payload members (monitoring credentials, `worker_join`, ...).
    pub extra: &'a [(&'a str, Value<'a>)],
}

/// `protocol_fallback` payload.
#[derive(Debug, Clone, Copy)]
pub struct ProtocolFallback<'a> {
    /// `agent_version`
    pub agent_version: &'a str,
    /// `unknown_type`: the type that was not understood, echoed.
    pub unknown_type: WireStr<'a>,
    /// `original_request_id`, when the unknown message had one.
    pub original_request_id: Option<WireStr<'a>>,
}

/// `tcp_tunnel_close` payload.
#[derive(Debug, Clone, Copy)]
pub struct TcpTunnelClose<'a> {
    /// `reason`: e.g. `connection_failed`, `service_closed`, `write_error`.
    pub reason: &'a str,
    /// `bytes_sent`
    pub bytes_sent: Option<u64>,
    /// `bytes_received`
    pub bytes_received: Option<u64>,
    /// `duration_ms`
    pub duration_ms: Option<u64>,
    /// `error`
    pub error: Option<&'a str>,
}

/// A message from the agent to the control plane, borrowing all its data.
#[derive(Debug, Clone, Copy)]
pub enum Outbound<'a> {
    /// `register`.
    Register(Register<'a>),
    /// `heartbeat` (sent without request id).
    Heartbeat(Heartbeat<'a>),
    /// `pong` `{timestamp}` answering `ping`; echo the ping's request id.
    Pong,
    /// `gateway_hello_ack` `{use_yamux}`.
    GatewayHelloAck {
        /// Whether the agent starts yamux.
        use_yamux: bool,
    },
    /// `proxy_response` `{status, headers, body?, encoding?}`: a complete response.
    ProxyResponse {
        /// HTTP status.
        status: u16,
        /// Response headers.
        headers: &'a dyn HeaderList,
        /// Body bytes (base64-encoded on the wire), when any.
        body: Option<&'a [u8]>,
        /// `true` when `body` is gzip-compressed (`encoding: "gzip"`, else `"base64"`).
        gzip: bool,
    },
    /// `proxy_response_header` `{status, headers}`: start of a streamed response.
    ProxyResponseHeader {
        /// HTTP status.
        status: u16,
        /// Response headers.
        headers: &'a dyn HeaderList,
    },
    /// `proxy_response_chunk` `{data, encoding: "base64", size}`.
    ProxyResponseChunk {
        /// Body bytes.
        data: &'a [u8],
    },
    /// `proxy_response_end` `{}`.
    ProxyResponseEnd,
    /// `proxy_response_abort` `{error}`.
    ProxyResponseAbort {
        /// Why.
        error: WireStr<'a>,
    },
    /// `proxy_error` `{request_id?, error, status?}`.
    ProxyError {
        /// The stream id for the kubectl path (`payload.request_id`), when any.
        stream_id: Option<WireStr<'a>>,
        /// Message.
        error: WireStr<'a>,
        /// Tether extension (`proxy_error_status`): the upstream HTTP status that refused.
        status: Option<u16>,
    },
    /// Tether extension `proxy_websocket_started` `{stream_id, protocol}`: the upstream
    /// answered 101; `protocol` is the negotiated subprotocol (`""` when none).
    WebSocketStarted {
        /// The stream.
        stream_id: WireStr<'a>,
        /// Negotiated subprotocol, if any.
        protocol: Option<WireStr<'a>>,
    },
    /// `proxy_websocket_data` `{stream_id, data}` (plus `request_id` and `message_type` for
    /// app-service streams).
    WebSocketData {
        /// The stream.
        stream_id: WireStr<'a>,
        /// The message; encoded as base64 of `[opcode][payload]`.
        frame: DataFrame<'a>,
        /// App-service streams: the request id to repeat in the payload (adds
        /// `message_type`, the opcode).
        app_request_id: Option<WireStr<'a>>,
    },
    /// `proxy_websocket_close` `{stream_id}`, plus `code` and `reason` with the
    /// `websocket_close_code` extension.
    WebSocketClose {
        /// The stream.
        stream_id: WireStr<'a>,
        /// Close code and reason (only when the control plane advertised the extension).
        close: Option<CloseFrame<'a>>,
    },
    /// `backpressure` `{request_id, reason}`.
    Backpressure {
        /// The stream/request.
        request_id: WireStr<'a>,
        /// Why, e.g. `channel_full`.
        reason: &'a str,
    },
    /// `protocol_fallback`, answering an unknown type.
    ProtocolFallback(ProtocolFallback<'a>),
    /// `tcp_tunnel_data` `{data, direction: "agent_to_gateway"}`.
    TcpTunnelData {
        /// Bytes.
        data: &'a [u8],
    },
    /// `tcp_tunnel_close`.
    TcpTunnelClose(TcpTunnelClose<'a>),
    /// `udp_tunnel_data` `{tunnel_id, data, client_addr, client_port, direction}`.
    UdpTunnelData {
        /// Tunnel.
        tunnel_id: WireStr<'a>,
        /// Datagram.
        data: &'a [u8],
        /// Client address.
        client_addr: WireStr<'a>,
        /// Client port.
        client_port: u16,
    },
}

impl Outbound<'_> {
    /// The wire type name.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Register(_) => "register",
            Self::Heartbeat(_) => "heartbeat",
            Self::Pong => "pong",
            Self::GatewayHelloAck { .. } => "gateway_hello_ack",
            Self::ProxyResponse { .. } => "proxy_response",
            Self::ProxyResponseHeader { .. } => "proxy_response_header",
            Self::ProxyResponseChunk { .. } => "proxy_response_chunk",
            Self::ProxyResponseEnd => "proxy_response_end",
            Self::ProxyResponseAbort { .. } => "proxy_response_abort",
            Self::ProxyError { .. } => "proxy_error",
            Self::WebSocketStarted { .. } => "proxy_websocket_started",
            Self::WebSocketData { .. } => "proxy_websocket_data",
            Self::WebSocketClose { .. } => "proxy_websocket_close",
            Self::Backpressure { .. } => "backpressure",
            Self::ProtocolFallback(_) => "protocol_fallback",
            Self::TcpTunnelData { .. } => "tcp_tunnel_data",
            Self::TcpTunnelClose(_) => "tcp_tunnel_close",
            Self::UdpTunnelData { .. } => "udp_tunnel_data",
        }
    }

    /// Encodes the envelope `{"type","request_id","payload","timestamp"}` into `buf` and
    /// returns its length.
    ///
    /// `request_id` is omitted when `None` or empty (Go's `omitempty`). `now` becomes the
    /// RFC 3339 `timestamp` (UTC, nine fraction digits). Binary data is base64-encoded
    /// straight into `buf`.
    ///
    /// Errors: [`EncodeError::BufferTooSmall`] with the exact size of the whole message
    /// (nothing useful is left in `buf`; retry with a larger one),
    /// [`EncodeError::TimestampOutOfRange`], and [`EncodeError::InvalidFrame`] for a
    /// `WebSocketData` frame whose control payload exceeds 125 bytes.
    pub fn encode(
        &self,
        request_id: Option<WireStr<'_>>,
        now: UnixTime,
        buf: &mut [u8],
    ) -> Result<usize, EncodeError> {
        if let Self::WebSocketData { frame, .. } = self {
            frame.check().map_err(EncodeError::InvalidFrame)?;
        }
        write_envelope(self.type_name(), request_id, now, buf, |p, stamp| {
            self.payload(p, stamp)
        })
    }

    /// The exact length [`encode`](Self::encode) would produce (computed by a counting pass;
    /// nothing is stored).
    pub fn encoded_len(
        &self,
        request_id: Option<WireStr<'_>>,
        now: UnixTime,
    ) -> Result<usize, EncodeError> {
        match self.encode(request_id, now, &mut []) {
            Err(EncodeError::BufferTooSmall { needed }) => Ok(needed),
            other => other,
        }
    }

    fn payload(&self, p: &mut ObjectWriter<'_, '_>, stamp: &str) {
        match *self {
            Self::Register(ref r) => register(p, r),
            Self::Heartbeat(ref h) => {
                p.str("cluster_id", h.cluster_id);
                p.str("agent_id", h.agent_id);
                p.str("status", h.status);
                p.str("tunnel_status", h.tunnel_status);
                p.value("metadata", &Value::Object(h.metadata));
                for (k, v) in h.extra {
                    p.value(k, v);
                }
            }
            Self::Pong => p.str("timestamp", stamp),
            Self::GatewayHelloAck { use_yamux } => p.bool("use_yamux", use_yamux),
            Self::ProxyResponse {
                status,
                headers,
                body,
                gzip,
            } => {
                p.u64("status", status.into());
                write_headers(p.key("headers"), headers);
                if let Some(body) = body {
                    p.base64("body", &[body]);
                    p.str("encoding", if gzip { "gzip" } else { "base64" });
                }
            }
            Self::ProxyResponseHeader { status, headers } => {
                p.u64("status", status.into());
                write_headers(p.key("headers"), headers);
            }
            Self::ProxyResponseChunk { data } => {
                p.base64("data", &[data]);
                p.str("encoding", "base64");
                p.u64("size", data.len() as u64);
            }
            Self::ProxyResponseEnd => {}
            Self::ProxyResponseAbort { error } => p.wire_str("error", error),
            Self::ProxyError {
                stream_id,
                error,
                status,
            } => {
                p.opt_wire_str("request_id", stream_id);
                p.wire_str("error", error);
                if let Some(status) = status {
                    p.u64("status", status.into());
                }
            }
            Self::WebSocketStarted {
                stream_id,
                protocol,
            } => {
                p.wire_str("stream_id", stream_id);
                p.wire_str("protocol", protocol.unwrap_or(WireStr::Plain("")));
            }
            Self::WebSocketData {
                stream_id,
                frame,
                app_request_id,
            } => {
                p.opt_wire_str("request_id", app_request_id);
                p.wire_str("stream_id", stream_id);
                let (head, head_len, body) = frame.parts();
                p.base64("data", &[&head[..head_len], body]);
                if app_request_id.is_some() {
                    p.u64("message_type", frame.opcode() as u64);
                }
            }
            Self::WebSocketClose { stream_id, close } => {
                p.wire_str("stream_id", stream_id);
                if let Some(c) = close {
                    p.u64("code", c.code.into());
                    p.str("reason", c.reason);
                }
            }
            Self::Backpressure { request_id, reason } => {
                p.wire_str("request_id", request_id);
                p.str("reason", reason);
            }
            Self::ProtocolFallback(ref f) => {
                p.str("agent_version", f.agent_version);
                p.wire_str("unknown_type", f.unknown_type);
                p.array("supported_types", |a| {
                    for name in INBOUND_TYPE_NAMES {
                        a.item().string(name);
                    }
                });
                p.str("fallback_mode", "legacy_proxy");
                p.str("protocol_version", "1.0");
                p.str("timestamp", stamp);
                p.opt_wire_str("original_request_id", f.original_request_id);
            }
            Self::TcpTunnelData { data } => {
                p.base64("data", &[data]);
                p.str("direction", "agent_to_gateway");
            }
            Self::TcpTunnelClose(ref c) => {
                p.str("reason", c.reason);
                if let Some(n) = c.bytes_sent {
                    p.u64("bytes_sent", n);
                }
                if let Some(n) = c.bytes_received {
                    p.u64("bytes_received", n);
                }
                if let Some(n) = c.duration_ms {
                    p.u64("duration_ms", n);
                }
                if let Some(e) = c.error {
                    p.str("error", e);
                }
            }
            Self::UdpTunnelData {
                tunnel_id,
                data,
                client_addr,
                client_port,
            } => {
                p.wire_str("tunnel_id", tunnel_id);
                p.base64("data", &[data]);
                p.wire_str("client_addr", client_addr);
                p.u64("client_port", client_port.into());
                p.str("direction", "agent_to_gateway");
            }
        }
    }
}

fn register(p: &mut ObjectWriter<'_, '_>, r: &Register<'_>) {
    p.str("agent_id", r.agent_id);
    p.str("name", r.name);
    p.str("k8s_version", r.k8s_version);
    p.str("hostname", r.hostname);
    p.str("agent_version", r.agent_version);
    p.str("server_ip", r.server_ip);
    p.str("region", r.region);
    p.str("cloud_provider", r.cloud_provider);
    p.object("tunnel_port_config", |o| {
        o.u64("kubernetes_api", r.tunnel_ports.kubernetes_api.into());
        o.u64("kubelet", r.tunnel_ports.kubelet.into());
        o.u64("agent_http", r.tunnel_ports.agent_http.into());
    });
    p.object("labels", |o| {
        for (k, v) in r.labels {
            o.str(k, v);
        }
    });
    p.value("server_specs", &Value::Object(r.server_specs));
    let f = r.features;
    p.object("features", |o| {
        o.bool("supports_streaming", f.supports_streaming);
        o.bool("supports_binary_protocol", f.supports_binary_protocol);
        o.bool("supports_compression", f.supports_compression);
        o.bool("supports_websocket_proxy", f.supports_websocket_proxy);
        o.bool("supports_gateway", f.supports_gateway);
        o.bool("supports_response_streaming", f.supports_response_streaming);
    });
    write_extensions(p, &r.extensions);
    if !r.metadata.is_empty() {
        p.value("metadata", &Value::Object(r.metadata));
    }
    if let Some(id) = r.cluster_id {
        p.str("cluster_id", id);
    }
    if let Some(t) = r.k8s_service_token {
        p.str("k8s_service_token", t);
    }
}

/// Writes a whole envelope: `type`, `request_id` (omitted when `None` or empty), the payload
/// written by `payload` (which also receives the formatted timestamp), `timestamp`.
pub(crate) fn write_envelope(
    type_name: &str,
    request_id: Option<WireStr<'_>>,
    now: UnixTime,
    buf: &mut [u8],
    payload: impl FnOnce(&mut ObjectWriter<'_, '_>, &str),
) -> Result<usize, EncodeError> {
    let stamp = now
        .to_rfc3339()
        .map_err(|_| EncodeError::TimestampOutOfRange)?;
    let stamp = core::str::from_utf8(&stamp).unwrap_or_default();
    let mut w = JsonWriter::new(buf);
    w.object(|o| {
        o.str("type", type_name);
        if let Some(id) = request_id.filter(|id| !id.is_empty()) {
            o.wire_str("request_id", id);
        }
        o.object("payload", |p| payload(p, stamp));
        o.str("timestamp", stamp);
    });
    Ok(w.finish()?)
}

/// Writes `"extensions":{...}` (see [`Extensions`]).
pub(crate) fn write_extensions(p: &mut ObjectWriter<'_, '_>, e: &Extensions) {
    p.object("extensions", |o| {
        o.bool("websocket_started", e.websocket_started);
        o.bool("websocket_close_code", e.websocket_close_code);
        o.bool("proxy_error_status", e.proxy_error_status);
        o.bool("native_frames", e.native);
        o.bool("raw_upgrade", e.raw_upgrade);
        o.bool("response_credit", e.response_credit);
        o.bool("native_tcp", e.native_tcp);
        o.bool("native_ack", e.native_ack);
    });
}
