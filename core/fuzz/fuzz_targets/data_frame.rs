//! Data-frame codec: decoding arbitrary base64 text (and arbitrary raw frames) never panics,
//! and every frame that decodes re-encodes to the same text, which decodes to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_core::wire::{DataFrame, b64};

fuzz_target!(|data: &[u8]| {
    let mut out = [0u8; 8192];
    let mut enc = [0u8; 12000];
    let mut back = [0u8; 8192];

    // 1. `data` as base64 text.
    if let Ok(frame) = DataFrame::decode(data, &mut out) {
        let n = frame.encode(&mut enc).expect("re-encode");
        assert_eq!(n, frame.encoded_len());
        // Canonical base64 decodes from exactly one text.
        assert_eq!(&enc[..n], data);
        let again = DataFrame::decode(&enc[..n], &mut back).expect("re-decode");
        assert_eq!(again, frame);
    }

    // 2. `data` as a raw frame: parse, encode, decode, compare.
    if let Ok(frame) = DataFrame::parse(data) {
        let n = frame.encode(&mut enc).expect("encode");
        assert_eq!(n, b64::encoded_len(data.len()));
        let again = DataFrame::decode(&enc[..n], &mut back).expect("decode");
        assert_eq!(again, frame);
        let mut raw = [0u8; 8192];
        let m = frame.write_raw(&mut raw).expect("raw");
        assert_eq!(&raw[..m], data);
    }

    // 3. Length helpers agree with the codec.
    if let Some(len) = b64::decoded_len(data) {
        if let Ok(n) = b64::decode(data, &mut out) {
            assert_eq!(n, len);
        }
    }
});
