//! Criterion benches of the wire codecs (issue 5, item 6): compat envelope encode/decode of a
//! `proxy_websocket_data` message, the compat data frame (`[opcode][payload]` base64), and the
//! native data frame (6-byte header, raw payload), at the payload sizes the end-to-end benches
//! use (64 B interactive, 32 KiB bulk).
//!
//! `cargo bench -p tether-core --bench wire`; `cargo xtask bench` runs it and tabulates it.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tether_core::wire::native::{self, DataKind, NativeFrame};
use tether_core::wire::{DataFrame, Inbound, Outbound, UnixTime};

const SIZES: [usize; 2] = [64, 32 * 1024];
const NOW: UnixTime = UnixTime::new(1_700_000_000, 123_456_789);
const ID: &str = "3f2c9a4e-5b1d-4c7e-9f10-aa55bb66cc77";

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

fn envelope(data: &[u8]) -> Vec<u8> {
    let msg = Outbound::WebSocketData {
        stream_id: ID.into(),
        frame: DataFrame::Binary(data),
        app_request_id: None,
    };
    let len = msg.encoded_len(Some(ID.into()), NOW).expect("length");
    let mut buf = vec![0; len];
    let n = msg.encode(Some(ID.into()), NOW, &mut buf).expect("encode");
    buf.truncate(n);
    buf
}

fn data_frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_frame");
    for len in SIZES {
        let data = payload(len);
        let frame = DataFrame::Binary(&data);
        let mut b64 = vec![0; frame.encoded_len()];
        let n = frame.encode(&mut b64).expect("encode");
        b64.truncate(n);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("encode", len), &data, |b, data| {
            let mut out = vec![0; b64.len()];
            b.iter(|| {
                DataFrame::Binary(black_box(data))
                    .encode(&mut out)
                    .expect("encode")
            })
        });
        g.bench_with_input(BenchmarkId::new("decode", len), &b64, |b, b64| {
            let mut out = vec![0; len + 1];
            b.iter(|| {
                let f = DataFrame::decode(black_box(b64), &mut out).expect("decode");
                black_box(f.payload_len())
            })
        });
    }
    g.finish();
}

fn envelope_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("envelope");
    for len in SIZES {
        let data = payload(len);
        let wire = envelope(&data);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("encode", len), &data, |b, data| {
            let mut out = vec![0; wire.len()];
            b.iter(|| {
                Outbound::WebSocketData {
                    stream_id: ID.into(),
                    frame: DataFrame::Binary(black_box(data)),
                    app_request_id: None,
                }
                .encode(Some(ID.into()), NOW, &mut out)
                .expect("encode")
            })
        });
        // Envelope parse + typed payload, then the data frame's base64 decode: what a
        // receiver does per `proxy_websocket_data`.
        g.bench_with_input(BenchmarkId::new("decode", len), &wire, |b, wire| {
            let mut out = vec![0; len + 1];
            b.iter(|| {
                let (_, msg) = Inbound::decode(black_box(wire)).expect("decode");
                let Inbound::WebSocketData(d) = msg else {
                    panic!("not data")
                };
                let f = DataFrame::decode_json(d.data, &mut out).expect("frame");
                black_box(f.payload_len())
            })
        });
    }
    g.finish();
}

/// Native data frames: encode = header + payload copied into the transmit buffer (what
/// `poll_transmit` does; `poll_transmit_owned` skips the copy), decode = header checks and the
/// payload view (what a receiver does before queueing it).
fn native_frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("native_frame");
    for len in SIZES {
        let data = payload(len);
        let frame = NativeFrame::Data {
            stream: 7,
            kind: DataKind::Binary,
            payload: &data,
        };
        let mut wire = vec![0; frame.encoded_len()];
        let n = frame.encode(&mut wire).expect("encode");
        wire.truncate(n);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("encode", len), &data, |b, data| {
            let mut out = vec![0; wire.len()];
            b.iter(|| {
                NativeFrame::Data {
                    stream: 7,
                    kind: DataKind::Binary,
                    payload: black_box(data),
                }
                .encode(&mut out)
                .expect("encode")
            })
        });
        g.bench_with_input(BenchmarkId::new("decode", len), &wire, |b, wire| {
            b.iter(|| {
                let f = NativeFrame::decode(black_box(wire), usize::MAX).expect("decode");
                let NativeFrame::Data { payload, .. } = f else {
                    panic!("not data")
                };
                black_box(payload.len())
            })
        });
        assert_eq!(native::HEADER_LEN + len, wire.len());
    }
    g.finish();
}

criterion_group!(benches, data_frame, envelope_codec, native_frame);
criterion_main!(benches);
