//! Native frames: every kind, every error, the start body against the compat payload, and
//! property tests (round trip, canonical decoding, never panics).

use std::string::{String, ToString};
use std::vec::Vec;

use proptest::prelude::*;

use crate::wire::HeaderList;
use crate::wire::error::{BufferTooSmall, DecodeError, EncodeError};
use crate::wire::json::WireStr;
use crate::wire::native::{
    HEADER_LEN, MAX_CLOSE_REASON, StartRequest, data_header, decode_start_body, encode_data_header,
    encode_start, is_native, peek_stream,
};
use crate::wire::{
    ControlMessage, DataKind, Envelope, FrameKind, Inbound, NativeError, NativeFrame, UnixTime,
};

const MAX: usize = 1 << 16;

fn enc(f: &NativeFrame<'_>) -> Vec<u8> {
    let mut buf = [0u8; 512];
    let n = f.encode(&mut buf).unwrap();
    assert_eq!(n, f.encoded_len());
    assert_eq!(f.check(), Ok(()));
    buf[..n].to_vec()
}

fn dec(b: &[u8]) -> Result<NativeFrame<'_>, NativeError> {
    NativeFrame::decode(b, MAX)
}

/// Encodes, compares with `golden`, decodes back, checks kind and stream.
fn golden(f: NativeFrame<'_>, golden: &[u8]) {
    let bytes = enc(&f);
    assert_eq!(bytes, golden);
    assert_eq!(dec(&bytes), Ok(f));
    assert!(is_native(&bytes));
    assert_eq!(peek_stream(&bytes), Some(f.stream()));
    assert_eq!(bytes[0], f.kind() as u8);
}

#[test]
fn every_kind_golden() {
    golden(
        NativeFrame::Start {
            stream: 1,
            request: br#"{"stream_id":"s"}"#,
        },
        b"\x01\x00\x00\x00\x00\x01{\"stream_id\":\"s\"}",
    );
    golden(
        NativeFrame::Started {
            stream: 0x0102_0304,
            subprotocol: "v5.channel.k8s.io",
        },
        b"\x02\x00\x01\x02\x03\x04v5.channel.k8s.io",
    );
    golden(
        NativeFrame::Started {
            stream: 7,
            subprotocol: "",
        },
        b"\x02\x00\x00\x00\x00\x07",
    );
    golden(
        NativeFrame::Data {
            stream: 2,
            kind: DataKind::Text,
            payload: b"hello",
        },
        b"\x03\x00\x00\x00\x00\x02hello",
    );
    golden(
        NativeFrame::Data {
            stream: u32::MAX,
            kind: DataKind::Binary,
            payload: &[0, 1, 0xff],
        },
        b"\x03\x01\xff\xff\xff\xff\x00\x01\xff",
    );
    golden(
        NativeFrame::Data {
            stream: 3,
            kind: DataKind::Binary,
            payload: b"",
        },
        b"\x03\x01\x00\x00\x00\x03",
    );
    golden(
        NativeFrame::Close {
            stream: 4,
            code: 1000,
            reason: "bye",
        },
        b"\x04\x00\x00\x00\x00\x04\x03\xe8bye",
    );
    golden(
        NativeFrame::Close {
            stream: 4,
            code: 1005,
            reason: "",
        },
        b"\x04\x00\x00\x00\x00\x04\x03\xed",
    );
    golden(
        NativeFrame::Error {
            stream: 5,
            status: Some(403),
            message: "forbidden",
        },
        b"\x05\x00\x00\x00\x00\x05\x01\x93forbidden",
    );
    golden(
        NativeFrame::Error {
            stream: 5,
            status: None,
            message: "",
        },
        b"\x05\x00\x00\x00\x00\x05\x00\x00",
    );
    golden(
        NativeFrame::Credit {
            stream: 6,
            bytes: 65536,
            messages: 16,
        },
        b"\x06\x00\x00\x00\x00\x06\x00\x01\x00\x00\x00\x00\x00\x10",
    );
}

#[test]
fn kind_display_and_bytes() {
    let all = [
        (FrameKind::Start, "start"),
        (FrameKind::Started, "started"),
        (FrameKind::Data, "data"),
        (FrameKind::Close, "close"),
        (FrameKind::Error, "error"),
        (FrameKind::Credit, "credit"),
        (FrameKind::Ack, "ack"),
    ];
    for (i, (k, name)) in all.into_iter().enumerate() {
        assert_eq!(k as u8 as usize, i + 1);
        assert_eq!(FrameKind::from_u8(k as u8), Some(k));
        assert_eq!(k.to_string(), name);
    }
    assert_eq!(FrameKind::from_u8(0), None);
    assert_eq!(FrameKind::from_u8(8), None);
}

#[test]
fn is_native_and_peek_stream() {
    assert!(!is_native(b""));
    assert!(!is_native(b"{\"type\":\"ping\"}"));
    assert!(!is_native(b" {}"));
    assert!(!is_native(&[0]));
    assert!(!is_native(&[8, 0, 0, 0, 0, 1]));
    for k in 1..=7u8 {
        assert!(is_native(&[k]));
    }
    assert_eq!(peek_stream(&[3, 0, 0, 0, 1]), None);
    assert_eq!(peek_stream(&[3, 0, 0, 0, 0, 0]), None);
    assert_eq!(peek_stream(&[9, 0, 0, 0, 0, 1]), None);
    // Flags are not checked.
    assert_eq!(peek_stream(&[3, 0xff, 0, 0, 1, 0, 9]), Some(256));
}

#[test]
fn error_too_large_is_checked_first_and_names_the_stream() {
    let f = b"\x03\x01\x00\x00\x00\x09abcd";
    assert_eq!(
        NativeFrame::decode(f, 9),
        Err(NativeError::TooLarge {
            len: 10,
            max: 9,
            stream: Some(9)
        })
    );
    assert_eq!(NativeFrame::decode(f, 10).unwrap().stream(), 9);
    // Even when the rest is garbage.
    assert_eq!(
        NativeFrame::decode(&[0xff; 8], 4),
        Err(NativeError::TooLarge {
            len: 8,
            max: 4,
            stream: None
        })
    );
    assert_eq!(
        NativeFrame::decode(&[3, 0, 0], 2),
        Err(NativeError::TooLarge {
            len: 3,
            max: 2,
            stream: None
        })
    );
}

#[test]
fn error_too_short_and_unknown_kind() {
    assert_eq!(dec(b""), Err(NativeError::TooShort { len: 0 }));
    for len in 1..HEADER_LEN {
        let f = [3u8, 0, 0, 0, 0, 1];
        assert_eq!(dec(&f[..len]), Err(NativeError::TooShort { len }));
    }
    assert_eq!(dec(b"{}"), Err(NativeError::UnknownKind(b'{')));
    assert_eq!(dec(&[0, 0, 0, 0, 0, 1]), Err(NativeError::UnknownKind(0)));
    assert_eq!(dec(&[8]), Err(NativeError::UnknownKind(8)));
}

#[test]
fn ack_is_tunnel_wide_with_an_eight_byte_total() {
    let ack = NativeFrame::Ack {
        received: 0x0102_0304_0506_0708,
    };
    let mut buf = [0u8; 14];
    assert_eq!(ack.encode(&mut buf), Ok(14));
    assert_eq!(buf, [7, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(dec(&buf), Ok(ack));
    assert_eq!(ack.stream(), 0);
    assert_eq!(ack.check(), Ok(()));
    // An ack naming a stream, or with a body other than 8 bytes, is not canonical.
    let mut named = buf;
    named[5] = 1;
    assert_eq!(dec(&named), Err(NativeError::StreamOnAck));
    assert_eq!(
        dec(&buf[..13]),
        Err(NativeError::BadBody {
            kind: FrameKind::Ack
        })
    );
    assert_eq!(peek_stream(&buf), None);
}

#[test]
fn error_bad_flags() {
    for k in 1..=6u8 {
        let kind = FrameKind::from_u8(k).unwrap();
        for flags in [1u8, 2, 0x80, 0xff] {
            if kind == FrameKind::Data && flags == 1 {
                continue;
            }
            let f = [k, flags, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
            assert_eq!(
                dec(&f),
                Err(NativeError::BadFlags { kind, flags }),
                "{kind} {flags}"
            );
        }
    }
}

#[test]
fn error_zero_stream() {
    for k in 1..=6u8 {
        assert_eq!(
            dec(&[k, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(NativeError::ZeroStream)
        );
    }
    let f = NativeFrame::Data {
        stream: 0,
        kind: DataKind::Text,
        payload: b"",
    };
    assert_eq!(f.check(), Err(NativeError::ZeroStream));
}

#[test]
fn error_bad_body() {
    let close = FrameKind::Close;
    let error = FrameKind::Error;
    let credit = FrameKind::Credit;
    assert_eq!(
        dec(b"\x04\x00\x00\x00\x00\x01"),
        Err(NativeError::BadBody { kind: close })
    );
    assert_eq!(
        dec(b"\x04\x00\x00\x00\x00\x01\x03"),
        Err(NativeError::BadBody { kind: close })
    );
    assert_eq!(
        dec(b"\x05\x00\x00\x00\x00\x01"),
        Err(NativeError::BadBody { kind: error })
    );
    assert_eq!(
        dec(b"\x05\x00\x00\x00\x00\x01\x00"),
        Err(NativeError::BadBody { kind: error })
    );
    for len in [0usize, 1, 4, 7, 9, 16] {
        let mut f = std::vec![6u8, 0, 0, 0, 0, 1];
        f.resize(HEADER_LEN + len, 0);
        assert_eq!(dec(&f), Err(NativeError::BadBody { kind: credit }), "{len}");
    }
    // Close reason: 123 bytes fine, 124 not.
    let mut f = std::vec![4u8, 0, 0, 0, 0, 1, 0x03, 0xe8];
    f.extend(core::iter::repeat_n(b'r', MAX_CLOSE_REASON));
    assert!(matches!(dec(&f), Ok(NativeFrame::Close { reason, .. }) if reason.len() == 123));
    f.push(b'r');
    assert_eq!(dec(&f), Err(NativeError::BadBody { kind: close }));
    let long = "r".repeat(124);
    let c = NativeFrame::Close {
        stream: 1,
        code: 1000,
        reason: &long,
    };
    assert_eq!(c.check(), Err(NativeError::BadBody { kind: close }));
    let e = NativeFrame::Error {
        stream: 1,
        status: Some(0),
        message: "",
    };
    assert_eq!(e.check(), Err(NativeError::BadBody { kind: error }));
}

#[test]
fn error_bad_utf8() {
    for (k, body) in [
        (1u8, &b"{\"a\":\"\xff\"}"[..]),
        (2, b"\xc3"),
        (4, b"\x03\xe8\xff"),
        (5, b"\x00\x00\xed\xa0\x80"),
    ] {
        let mut f = std::vec![k, 0, 0, 0, 0, 1];
        f.extend_from_slice(body);
        let kind = FrameKind::from_u8(k).unwrap();
        assert_eq!(dec(&f), Err(NativeError::BadUtf8 { kind }), "{kind}");
    }
    // Text data payloads are not checked.
    assert!(dec(b"\x03\x00\x00\x00\x00\x01\xff").is_ok());
    let s = NativeFrame::Start {
        stream: 1,
        request: b"\xff",
    };
    assert_eq!(
        s.check(),
        Err(NativeError::BadUtf8 {
            kind: FrameKind::Start
        })
    );
}

#[test]
fn errors_display() {
    let cases: [(NativeError, &str); 8] = [
        (
            NativeError::TooShort { len: 3 },
            "native frame of 3 bytes is too short",
        ),
        (NativeError::UnknownKind(9), "unknown native frame kind 9"),
        (
            NativeError::BadFlags {
                kind: FrameKind::Close,
                flags: 1,
            },
            "invalid flags 0x01 on a native close frame",
        ),
        (NativeError::ZeroStream, "native frame for stream 0"),
        (
            NativeError::TooLarge {
                len: 10,
                max: 9,
                stream: None,
            },
            "native frame of 10 bytes exceeds the limit of 9 bytes",
        ),
        (
            NativeError::TooLarge {
                len: 10,
                max: 9,
                stream: Some(4),
            },
            "native frame of 10 bytes exceeds the limit of 9 bytes (stream 4)",
        ),
        (
            NativeError::BadBody {
                kind: FrameKind::Credit,
            },
            "malformed native credit body",
        ),
        (
            NativeError::BadUtf8 {
                kind: FrameKind::Started,
            },
            "native started frame text is not UTF-8",
        ),
    ];
    for (e, s) in cases {
        assert_eq!(e.to_string(), s);
        let _: &dyn core::error::Error = &e;
    }
}

#[test]
fn encode_buffer_too_small() {
    let f = NativeFrame::Data {
        stream: 1,
        kind: DataKind::Binary,
        payload: b"abc",
    };
    let mut buf = [0xaau8; 8];
    assert_eq!(f.encode(&mut buf), Err(BufferTooSmall { needed: 9 }));
    assert_eq!(buf, [0xaa; 8]);
    let mut buf = [0u8; 9];
    assert_eq!(f.encode(&mut buf), Ok(9));
}

#[test]
fn data_header_in_place() {
    let payload = b"payload";
    let mut buf = [0u8; 32];
    let n = encode_data_header(&mut buf, 42, DataKind::Binary, payload.len()).unwrap();
    assert_eq!(n, HEADER_LEN + payload.len());
    buf[HEADER_LEN..n].copy_from_slice(payload);
    let f = NativeFrame::Data {
        stream: 42,
        kind: DataKind::Binary,
        payload,
    };
    assert_eq!(&buf[..n], &enc(&f)[..]);
    assert_eq!(dec(&buf[..n]), Ok(f));
    assert_eq!(&data_header(42, DataKind::Binary)[..], &buf[..HEADER_LEN]);
    assert_eq!(data_header(1, DataKind::Text), [3, 0, 0, 0, 0, 1]);
    let mut small = [0u8; 12];
    assert_eq!(
        encode_data_header(&mut small, 1, DataKind::Text, 7),
        Err(BufferTooSmall { needed: 13 })
    );
    assert_eq!(small, [0; 12]);
}

fn start_msg<'a>(headers: &'a dyn HeaderList, protocol: Option<&'a str>) -> ControlMessage<'a> {
    ControlMessage::WebSocketStart {
        stream_id: "s-1".into(),
        path: "/api/v1/namespaces/d/pods/p/exec".into(),
        query: "command=sh&stdin=true".into(),
        headers,
        protocol: protocol.map(WireStr::from),
        method: None,
        upgrade: None,
    }
}

#[test]
fn start_body_is_the_compat_payload() {
    let headers: &[(&str, &str)] = &[
        ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"),
        ("Authorization", "Bearer \"x\""),
    ];
    for protocol in [None, Some("v5.channel.k8s.io,v4.channel.k8s.io")] {
        let msg = start_msg(&headers, protocol);
        let req = StartRequest::from_control(&msg).unwrap();
        let mut buf = [0u8; 1024];
        let n = encode_start(&mut buf, 77, &req).unwrap();
        let frame = &buf[..n];

        // The header, and a valid frame.
        let NativeFrame::Start { stream, request } = dec(frame).unwrap() else {
            panic!()
        };
        assert_eq!(stream, 77);
        assert_eq!(&frame[..HEADER_LEN], &[1, 0, 0, 0, 0, 77]);

        // Byte for byte the compat envelope's payload object.
        let mut compat = [0u8; 1024];
        let m = msg
            .encode(Some("s-1".into()), UnixTime::new(0, 0), &mut compat)
            .unwrap();
        let env = Envelope::parse(&compat[..m]).unwrap();
        assert_eq!(request, env.payload.raw().as_bytes());

        // Same fields through both decoders.
        let s = decode_start_body(request).unwrap();
        let Ok(Inbound::WebSocketStart(c)) = env.inbound() else {
            panic!()
        };
        assert_eq!(s, c);
        assert!(s.stream_id == "s-1");
        assert!(s.method.unwrap() == "GET");
        assert!(s.path.unwrap() == "/api/v1/namespaces/d/pods/p/exec");
        assert!(s.query.unwrap() == "command=sh&stdin=true");
        let auth = s.headers.get("authorization").unwrap().next().unwrap();
        assert!(auth == "Bearer \"x\"");
        match protocol {
            None => assert_eq!(s.protocol, None),
            Some(p) => assert!(s.protocol.unwrap() == p),
        }

        // Exact sizes on too-small buffers, including below the header.
        for short in [0, 3, HEADER_LEN, n - 1] {
            let mut small = std::vec![0u8; short];
            assert_eq!(
                encode_start(&mut small, 77, &req),
                Err(EncodeError::BufferTooSmall { needed: n })
            );
        }
    }
    assert!(StartRequest::from_control(&ControlMessage::Ping).is_none());
}

#[test]
fn start_body_errors() {
    assert_eq!(decode_start_body(b"[]"), Err(DecodeError::NotJson));
    assert_eq!(decode_start_body(b"\"x\""), Err(DecodeError::NotJson));
    assert!(matches!(
        decode_start_body(b"{"),
        Err(DecodeError::Malformed { .. })
    ));
    assert!(matches!(
        decode_start_body(b""),
        Err(DecodeError::Malformed { .. })
    ));
    assert!(matches!(
        decode_start_body(b"{\"a\":\"\xff\"}"),
        Err(DecodeError::InvalidUtf8 { .. })
    ));
    assert_eq!(
        decode_start_body(b"{\"path\":\"/\"}"),
        Err(DecodeError::MissingField("stream_id"))
    );
    assert_eq!(
        decode_start_body(b"{\"stream_id\":1}"),
        Err(DecodeError::WrongType("stream_id"))
    );
    let deep = "[".repeat(200);
    let body = std::format!("{{\"stream_id\":\"s\",\"x\":{deep}");
    assert!(decode_start_body(body.as_bytes()).is_err());
}

// ---------------------------------------------------------------------------------------------
// Properties.

#[derive(Debug, Clone)]
enum Parts {
    Start(u32, String),
    Started(u32, String),
    Data(u32, bool, Vec<u8>),
    Close(u32, u16, String),
    Error(u32, u16, String),
    Credit(u32, u32, u32),
}

fn parts() -> impl Strategy<Value = Parts> {
    let stream = 1..=u32::MAX;
    let text = "[a-z0-9é€😀 \"{}:,]{0,40}";
    prop_oneof![
        (stream.clone(), text).prop_map(|(s, t)| Parts::Start(s, t)),
        (stream.clone(), text).prop_map(|(s, t)| Parts::Started(s, t)),
        (
            stream.clone(),
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(s, b, d)| Parts::Data(s, b, d)),
        (stream.clone(), any::<u16>(), "[a-zé€😀 ]{0,30}")
            .prop_map(|(s, c, r)| Parts::Close(s, c, r)),
        (stream.clone(), any::<u16>(), text).prop_map(|(s, c, m)| Parts::Error(s, c, m)),
        (stream, any::<u32>(), any::<u32>()).prop_map(|(s, b, m)| Parts::Credit(s, b, m)),
    ]
}

fn frame(p: &Parts) -> NativeFrame<'_> {
    match p {
        Parts::Start(stream, t) => NativeFrame::Start {
            stream: *stream,
            request: t.as_bytes(),
        },
        Parts::Started(stream, t) => NativeFrame::Started {
            stream: *stream,
            subprotocol: t,
        },
        Parts::Data(stream, binary, d) => NativeFrame::Data {
            stream: *stream,
            kind: if *binary {
                DataKind::Binary
            } else {
                DataKind::Text
            },
            payload: d,
        },
        Parts::Close(stream, code, r) => {
            let mut end = r.len().min(MAX_CLOSE_REASON);
            while !r.is_char_boundary(end) {
                end -= 1;
            }
            NativeFrame::Close {
                stream: *stream,
                code: *code,
                reason: &r[..end],
            }
        }
        Parts::Error(stream, status, m) => NativeFrame::Error {
            stream: *stream,
            status: (*status != 0).then_some(*status),
            message: m,
        },
        Parts::Credit(stream, bytes, messages) => NativeFrame::Credit {
            stream: *stream,
            bytes: *bytes,
            messages: *messages,
        },
    }
}

/// Byte soup biased toward valid headers.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        (
            0u8..=7,
            prop::sample::select(&[0u8, 1, 2, 0x80][..]),
            prop::sample::select(&[0u32, 1, 0xffff_ffff][..]),
            prop::collection::vec(any::<u8>(), 0..140),
        )
            .prop_map(|(k, f, s, body)| {
                let mut v = std::vec![k, f];
                v.extend_from_slice(&s.to_be_bytes());
                v.extend(body);
                v
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn native_round_trip(p in parts()) {
        let f = frame(&p);
        prop_assert_eq!(f.check(), Ok(()));
        let mut buf = [0u8; 512];
        let n = f.encode(&mut buf).unwrap();
        prop_assert_eq!(n, f.encoded_len());
        prop_assert!(is_native(&buf[..n]));
        prop_assert_eq!(peek_stream(&buf[..n]), Some(f.stream()));
        prop_assert_eq!(NativeFrame::decode(&buf[..n], n), Ok(f));
        if n > 0 {
            let too_large = NativeFrame::decode(&buf[..n], n - 1);
            prop_assert_eq!(
                too_large,
                Err(NativeError::TooLarge { len: n, max: n - 1, stream: Some(f.stream()) })
            );
        }
        if let NativeFrame::Data { stream, kind, payload } = f {
            let mut head = [0u8; 512];
            let m = encode_data_header(&mut head, stream, kind, payload.len()).unwrap();
            head[HEADER_LEN..m].copy_from_slice(payload);
            prop_assert_eq!(&head[..m], &buf[..n]);
        }
    }

    #[test]
    fn native_decode_is_canonical_and_never_panics(b in bytes(), max in 0usize..200) {
        match NativeFrame::decode(&b, max) {
            Ok(f) => {
                prop_assert!(b.len() <= max);
                prop_assert!(is_native(&b));
                prop_assert_eq!(f.check(), Ok(()));
                prop_assert_eq!(f.encoded_len(), b.len());
                let mut buf = [0u8; 256];
                let n = f.encode(&mut buf).unwrap();
                prop_assert_eq!(&buf[..n], &b[..]);
                if let NativeFrame::Start { request, .. } = f {
                    let _ = decode_start_body(request);
                }
            }
            Err(NativeError::TooLarge { len, max: m, stream }) => {
                prop_assert_eq!((len, m), (b.len(), max));
                prop_assert_eq!(stream, peek_stream(&b));
            }
            Err(_) => {}
        }
    }

    #[test]
    fn start_round_trip(
        stream in 1..=u32::MAX,
        id in "[a-z0-9-]{1,20}",
        path in "/[a-z0-9/é\"\\\\]{0,30}",
        query in "[a-z=&%0-9]{0,20}",
        hv in "[ -~é]{0,20}",
        protocol in prop::option::of("[a-z0-9.,]{1,20}"),
        upgrade in prop::option::of(("(GET|POST)", "[A-Za-z0-9]{1,8}/[0-9.]{1,4}")),
    ) {
        let headers: &[(&str, &str)] = &[("X-A", hv.as_str())];
        let req = StartRequest {
            stream_id: id.as_str().into(),
            path: path.as_str().into(),
            query: query.as_str().into(),
            headers: &headers,
            protocol: protocol.as_deref().map(WireStr::from),
            method: upgrade.as_ref().map(|(m, _)| WireStr::from(m.as_str())),
            upgrade: upgrade.as_ref().map(|(_, t)| WireStr::from(t.as_str())),
        };
        let mut buf = [0u8; 1024];
        let n = encode_start(&mut buf, stream, &req).unwrap();
        let f = NativeFrame::decode(&buf[..n], n).unwrap();
        prop_assert_eq!(f.stream(), stream);
        let NativeFrame::Start { request, .. } = f else { panic!() };
        let s = decode_start_body(request).unwrap();
        let mut scratch = [0u8; 256];
        prop_assert_eq!(s.stream_id.to_str(&mut scratch).unwrap(), id.as_str());
        prop_assert_eq!(s.path.unwrap().to_str(&mut scratch).unwrap(), path.as_str());
        prop_assert_eq!(s.query.unwrap().to_str(&mut scratch).unwrap(), query.as_str());
        let v = s.headers.get("x-a").unwrap().next().unwrap();
        prop_assert_eq!(v.to_str(&mut scratch).unwrap(), hv.as_str());
        prop_assert_eq!(
            s.protocol.map(|p| p.raw().to_string()),
            protocol
        );
        let method = upgrade.as_ref().map_or("GET", |(m, _)| m.as_str());
        prop_assert_eq!(s.method.map(|m| m.raw().to_string()), Some(method.to_string()));
        prop_assert_eq!(
            s.upgrade.map(|u| u.raw().to_string()),
            upgrade.map(|(_, t)| t)
        );
    }
}
