use crate::wire::b64;
use crate::wire::error::FrameError;
use crate::wire::frame::{CloseFrame, DataFrame, Opcode};

fn encode(f: &DataFrame<'_>) -> std::string::String {
    let mut out = [0u8; 256];
    let n = f.encode(&mut out).unwrap();
    assert_eq!(n, f.encoded_len());
    std::string::String::from_utf8(out[..n].to_vec()).unwrap()
}

#[test]
fn design_example_hello_as_text() {
    assert_eq!(encode(&DataFrame::Text(b"hello")), "AWhlbGxv");
    let mut out = [0u8; 16];
    assert_eq!(
        DataFrame::decode(b"AWhlbGxv", &mut out),
        Ok(DataFrame::Text(b"hello"))
    );
}

#[test]
fn every_opcode() {
    let mut buf = [0u8; 64];
    let cases: [(DataFrame<'_>, &str); 7] = [
        (DataFrame::Binary(&[0, 1, 2, 3]), "AgABAgM="),
        (DataFrame::Close(None), "CA=="),
        (
            DataFrame::Close(Some(CloseFrame {
                code: 1000,
                reason: "bye",
            })),
            "CAPoYnll",
        ),
        (
            DataFrame::Close(Some(CloseFrame {
                code: 4000,
                reason: "",
            })),
            "CA+g",
        ),
        (DataFrame::Ping(b""), "CQ=="),
        (DataFrame::Pong(b"p"), "CnA="),
        (DataFrame::Text(b""), "AQ=="),
    ];
    for (frame, text) in cases {
        assert_eq!(encode(&frame), text);
        assert_eq!(DataFrame::decode(text.as_bytes(), &mut buf), Ok(frame));
    }
    assert_eq!(DataFrame::Ping(b"").opcode(), Opcode::Ping);
    assert_eq!(Opcode::try_from(10), Ok(Opcode::Pong));
    assert_eq!(DataFrame::Text(b"hi").text(), Some("hi"));
    assert_eq!(DataFrame::Text(b"\xff").text(), None);
    assert_eq!(DataFrame::Binary(b"hi").text(), None);
}

#[test]
fn bad_frames() {
    let mut buf = [0u8; 256];
    // Unknown opcodes: every byte but 1, 2, 8, 9, 10.
    for op in 0..=255u8 {
        let raw = [op, b'x', b'x'];
        let r = DataFrame::parse(&raw);
        if [1, 2, 8, 9, 10].contains(&op) {
            assert!(r.is_ok(), "{op}");
        } else {
            assert_eq!(r, Err(FrameError::UnknownOpcode(op)));
        }
    }
    assert_eq!(DataFrame::parse(&[]), Err(FrameError::Empty));
    assert_eq!(DataFrame::decode(b"", &mut buf), Err(FrameError::Empty));
    assert_eq!(DataFrame::parse(&[8, 3]), Err(FrameError::BadClose));
    assert_eq!(
        DataFrame::parse(&[8, 3, 232, 0xff]),
        Err(FrameError::BadClose)
    );
    let long = [9u8; 127];
    assert_eq!(DataFrame::parse(&long), Err(FrameError::ControlTooLong));
    assert!(DataFrame::parse(&long[..126]).is_ok());
    let mut close = [b'x'; 127];
    close[0] = 8;
    assert_eq!(DataFrame::parse(&close), Err(FrameError::ControlTooLong));
    assert!(DataFrame::parse(&close[..126]).is_ok());
    assert_eq!(
        DataFrame::Ping(&[0; 126]).encode(&mut buf),
        Err(FrameError::ControlTooLong)
    );
    // Bad base64: wrong length, bad chars, non-canonical padding/trailing bits, inner padding.
    for bad in [
        &b"AWhlbGx"[..],
        b"AWhlbGx*",
        b"AWhlbGx=",
        b"AQ=",
        b"AR==",
        b"A===",
        b"AQ==AQ==",
        b"AWhl bGxv",
        b"AWhlbGxv\n",
        b"AWhl-Gxv",
        b"AWhl_Gxv",
    ] {
        assert_eq!(
            DataFrame::decode(bad, &mut buf),
            Err(FrameError::BadBase64),
            "{:?}",
            core::str::from_utf8(bad)
        );
    }
    // Buffer sizes are exact.
    let mut small = [0u8; 5];
    assert_eq!(
        DataFrame::decode(b"AWhlbGxv", &mut small),
        Err(FrameError::BufferTooSmall { needed: 6 })
    );
    let mut six = [0u8; 6];
    assert!(DataFrame::decode(b"AWhlbGxv", &mut six).is_ok());
    assert_eq!(
        DataFrame::Text(b"hello").encode(&mut [0u8; 7]),
        Err(FrameError::BufferTooSmall { needed: 8 })
    );
    let mut raw = [0u8; 5];
    assert_eq!(
        DataFrame::Text(b"hello")
            .write_raw(&mut raw)
            .unwrap_err()
            .needed,
        6
    );
}

#[test]
fn length_math_every_boundary() {
    let data: std::vec::Vec<u8> = (0..600u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut enc = [0u8; 1024];
    let mut dec = [0u8; 600];
    for n in 0..=600usize {
        let want = n.div_ceil(3) * 4;
        assert_eq!(b64::encoded_len(n), want);
        let m = b64::encode(&data[..n], &mut enc).unwrap();
        assert_eq!(m, want);
        assert_eq!(b64::decoded_len(&enc[..m]), Some(n));
        assert!(b64::decoded_len_max(m) >= n && b64::decoded_len_max(m) - n < 3);
        // Exact output buffer suffices; one byte less does not.
        assert_eq!(b64::decode(&enc[..m], &mut dec[..n]), Ok(n));
        assert_eq!(&dec[..n], &data[..n]);
        if n > 0 {
            assert_eq!(
                b64::decode(&enc[..m], &mut dec[..n - 1]),
                Err(FrameError::BufferTooSmall { needed: n })
            );
            assert_eq!(
                b64::encode(&data[..n], &mut enc[..m - 1]),
                Err(FrameError::BufferTooSmall { needed: m })
            );
        }
        // Lengths that are not a multiple of 4 are rejected up front.
        for cut in 1..4.min(m + 1) {
            assert_eq!(b64::decoded_len(&enc[..m - cut]), None);
        }
    }
    assert_eq!(b64::encoded_len(usize::MAX), usize::MAX);
    assert_eq!(b64::encoded_len(usize::MAX / 4 * 3), usize::MAX / 4 * 4);
}
