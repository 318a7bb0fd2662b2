//! Native frame codec: decoding arbitrary bytes never panics, every frame that decodes
//! re-encodes to exactly the same bytes, and start bodies parse (or fail) without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_core::wire::native::{self, NativeFrame};

fuzz_target!(|data: &[u8]| {
    let mut enc = [0u8; 8192];

    // Inputs ending in 0xA5 are one byte over the limit, so `TooLarge` is exercised too.
    let max = match data.last() {
        Some(0xA5) => data.len() - 1,
        _ => usize::MAX,
    };
    match NativeFrame::decode(data, max) {
        Ok(frame) => {
            assert!(native::is_native(data));
            assert_eq!(frame.check(), Ok(()));
            assert_eq!(native::peek_stream(data), Some(frame.stream()));
            assert_eq!(frame.encoded_len(), data.len());
            if let Ok(n) = frame.encode(&mut enc) {
                assert_eq!(&enc[..n], data);
            }
            if let NativeFrame::Start { request, .. } = frame {
                let _ = native::decode_start_body(request);
            }
        }
        Err(native::NativeError::TooLarge { len, stream, .. }) => {
            assert_eq!(len, data.len());
            assert_eq!(stream, native::peek_stream(data));
        }
        Err(_) => {}
    }

    // Every body as a start body.
    if let Some(body) = data.get(native::HEADER_LEN..) {
        let _ = native::decode_start_body(body);
    }
});
