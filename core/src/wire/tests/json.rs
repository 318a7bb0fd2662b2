use std::string::String;
use std::vec::Vec;

use crate::wire::error::{BufferTooSmall, JsonError};
use crate::wire::json::{JsonValue, JsonWriter, Value, WireStr, parse, parse_with_depth};

fn malformed(src: &str) -> usize {
    match parse(src.as_bytes()) {
        Err(JsonError::Malformed { offset }) => offset,
        other => panic!("{src:?}: expected Malformed, got {other:?}"),
    }
}

#[test]
fn scalars() {
    assert_eq!(parse(b"null").unwrap(), JsonValue::Null);
    assert_eq!(parse(b" true ").unwrap(), JsonValue::Bool(true));
    assert_eq!(parse(b"false").unwrap(), JsonValue::Bool(false));
    let n = parse(b"-12.5e+3").unwrap().as_number().unwrap();
    assert_eq!(n.raw(), "-12.5e+3");
    assert_eq!(n.as_f64(), -12500.0);
    assert_eq!(n.as_i64(), Some(-12500));
    assert_eq!(n.as_u64(), None);
    assert_eq!(
        parse(b"200").unwrap().as_number().unwrap().as_u64(),
        Some(200)
    );
    assert_eq!(
        parse(b"2e2").unwrap().as_number().unwrap().as_u64(),
        Some(200)
    );
    assert_eq!(parse(b"200.5").unwrap().as_number().unwrap().as_u64(), None);
    assert_eq!(
        parse(b"18446744073709551615")
            .unwrap()
            .as_number()
            .unwrap()
            .as_u64(),
        Some(u64::MAX)
    );
    assert_eq!(
        parse(b"18446744073709551616")
            .unwrap()
            .as_number()
            .unwrap()
            .as_u64(),
        None
    );
    let s = parse(br#""a\u0062c""#).unwrap().as_str().unwrap();
    assert!(s == "abc");
}

#[test]
fn malformed_inputs() {
    assert_eq!(malformed(""), 0);
    assert_eq!(malformed("   "), 3);
    assert_eq!(malformed("{"), 1);
    assert_eq!(malformed("{\"a\" 1}"), 5);
    assert_eq!(malformed("{\"a\":1,}"), 7);
    assert_eq!(malformed("[1,]"), 3);
    assert_eq!(malformed("[1 2]"), 3);
    assert_eq!(malformed("01"), 1);
    assert_eq!(malformed("1."), 2);
    assert_eq!(malformed("1e"), 2);
    assert_eq!(malformed("-"), 1);
    assert_eq!(malformed("tru"), 0);
    assert_eq!(malformed("\"abc"), 4);
    assert_eq!(malformed("\"a\\x\""), 2);
    assert_eq!(malformed("\"\\u12g4\""), 1);
    assert_eq!(malformed("\"a\nb\""), 2);
    assert_eq!(malformed("{} x"), 3);
    assert_eq!(malformed("{1:2}"), 1);
    assert_eq!(malformed("[}"), 1);
    assert_eq!(malformed("{]"), 1);
    assert_eq!(malformed("[1}"), 2);
    assert_eq!(malformed("{\"a\":1]"), 6);
    assert_eq!(malformed("nul"), 0);
    assert_eq!(malformed("'a'"), 0);
    assert_eq!(
        parse(b"\"\xff\""),
        Err(JsonError::InvalidUtf8 { offset: 1 })
    );
}

#[test]
fn depth_limit() {
    let deep = |n: usize| {
        let mut s = String::new();
        for _ in 0..n {
            s.push('[');
        }
        for _ in 0..n {
            s.push(']');
        }
        s
    };
    assert!(parse(deep(32).as_bytes()).is_ok());
    assert_eq!(parse(deep(33).as_bytes()), Err(JsonError::TooDeep));
    assert_eq!(parse_with_depth(b"[]", 0), Err(JsonError::TooDeep));
    assert!(parse_with_depth(b"1", 0).is_ok());
    // Clamped to MAX_DEPTH_LIMIT: no shift overflow, no recursion.
    assert!(parse_with_depth(deep(128).as_bytes(), usize::MAX).is_ok());
    assert_eq!(
        parse_with_depth(deep(129).as_bytes(), usize::MAX),
        Err(JsonError::TooDeep)
    );
    // A hostile million-deep document fails fast without recursion.
    let huge = "[".repeat(1_000_000);
    assert_eq!(parse(huge.as_bytes()), Err(JsonError::TooDeep));
    // Mixed nesting tracks object/array per level.
    assert!(parse(br#"{"a":[{"b":[1,{"c":{}}]}],"d":[[],{}]}"#).is_ok());
}

#[test]
fn object_and_array_views() {
    let v = parse(br#" { "a" : 1 , "b":[true, null ,"x", {"n":[]}], "a":"last", "e\u0073c":{} } "#)
        .unwrap();
    let o = v.as_object().unwrap();
    let keys: Vec<String> = o.iter().map(|(k, _)| std::format!("{k}")).collect();
    assert_eq!(keys, ["a", "b", "a", "esc"]);
    assert!(o.get("a").unwrap().as_str().unwrap() == "last");
    assert!(o.get("esc").unwrap().as_object().unwrap().is_empty());
    assert!(o.get("missing").is_none());
    let [a, b, c] = o.fields(["b", "esc", "zzz"]);
    let arr = a.unwrap().as_array().unwrap();
    let items: Vec<JsonValue<'_>> = arr.iter().collect();
    assert_eq!(items.len(), 4);
    assert_eq!(items[0], JsonValue::Bool(true));
    assert_eq!(items[1], JsonValue::Null);
    assert!(items[2].as_str().unwrap() == "x");
    assert_eq!(items[3].as_object().unwrap().raw(), r#"{"n":[]}"#);
    assert!(b.is_some());
    assert!(c.is_none());
    assert!(parse(b"[]").unwrap().as_array().unwrap().is_empty());
    assert!(
        parse(b"[ ]")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .next()
            .is_none()
    );
    assert!(parse(b"{ }").unwrap().as_object().unwrap().is_empty());
    // Strings containing brackets and quotes do not confuse the skipping.
    let o = parse(br#"{"a":"]}\"{[","b":["}",{"c":"\\"}],"d":2}"#).unwrap();
    let o = o.as_object().unwrap();
    assert_eq!(o.get("d").unwrap().as_number().unwrap().raw(), "2");
    assert_eq!(o.get("b").unwrap().as_array().unwrap().iter().count(), 2);
}

#[test]
fn strings_through_escapes() {
    let v = parse(br#""tab\tquote\"slash\/uni\u00e9\ud83d\ude00end""#).unwrap();
    let s = v.as_str().unwrap();
    let want = "tab\tquote\"slash/uni\u{e9}\u{1F600}end";
    assert!(s.has_escapes());
    assert_eq!(s.as_str(), None);
    assert!(s == want);
    assert!(s.eq(want));
    assert!(s != "tab");
    assert_eq!(s.unescaped_len(), want.len());
    let mut buf = [0u8; 64];
    assert_eq!(s.unescape_into(&mut buf).unwrap(), want);
    assert_eq!(s.to_str(&mut buf).unwrap(), want);
    let mut small = [0u8; 4];
    assert_eq!(
        s.unescape_into(&mut small),
        Err(BufferTooSmall { needed: want.len() })
    );
    assert_eq!(std::format!("{s}"), want);
    // Lone surrogates become U+FFFD.
    let lone = parse(br#""\ud800x\udc00""#).unwrap().as_str().unwrap();
    assert!(lone == "\u{FFFD}x\u{FFFD}");
    let hi_then_hi = parse(br#""\ud800\ud800""#).unwrap().as_str().unwrap();
    assert!(hi_then_hi == "\u{FFFD}\u{FFFD}");
    // Plain strings borrow without copying.
    let plain = parse(br#""plain""#).unwrap().as_str().unwrap();
    assert_eq!(plain.as_str(), Some("plain"));
    assert!(plain.eq_ignore_ascii_case("PLAIN"));
    let esc = parse(br#""S\u0065c-WebSocket""#).unwrap().as_str().unwrap();
    assert!(esc.eq_ignore_ascii_case("sec-websocket"));
    assert!(!esc.eq_ignore_ascii_case("sec-websockets"));
    // JsonStr equality looks through escapes.
    let a = parse(br#""\u0041""#).unwrap().as_str().unwrap();
    let b = parse(br#""A""#).unwrap().as_str().unwrap();
    assert_eq!(a, b);
}

fn write(f: impl FnOnce(&mut JsonWriter<'_>)) -> String {
    let mut buf = [0u8; 512];
    let mut w = JsonWriter::new(&mut buf);
    f(&mut w);
    let n = w.finish().unwrap();
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

#[test]
fn writer_escapes_and_nests() {
    assert_eq!(
        write(|w| w.string("a\"b\\c\nd\re\tf\u{1}g\u{1f}h/é")),
        r#""a\"b\\c\nd\re\tf\u0001g\u001fh/é""#
    );
    assert_eq!(
        write(|w| w.string_lossy(b"ok\xffend\xc3")),
        "\"ok\u{FFFD}end\u{FFFD}\""
    );
    assert_eq!(write(|w| w.u64(0)), "0");
    assert_eq!(write(|w| w.u64(u64::MAX)), "18446744073709551615");
    assert_eq!(write(|w| w.i64(i64::MIN)), "-9223372036854775808");
    assert_eq!(
        write(|w| w.object(|o| {
            o.str("a", "x");
            o.u64("b", 2);
            o.object("c", |_| {});
            o.array("d", |a| {
                a.item().bool(true);
                a.item().null();
            });
            o.wire_str("e", WireStr::Plain("q\""));
        })),
        r#"{"a":"x","b":2,"c":{},"d":[true,null],"e":"q\""}"#
    );
    let nested = [("k", Value::Str("v")), ("n", Value::I64(-1))];
    let items = [Value::U64(1), Value::Object(&nested), Value::Null];
    assert_eq!(
        write(|w| w.value(&Value::Array(&items))),
        r#"[1,{"k":"v","n":-1},null]"#
    );
    // Re-emitting a parsed value copies its raw text.
    let v = parse(br#"{"x" : [1, "\u00e9"]}"#).unwrap();
    assert_eq!(write(|w| w.json_value(v)), r#"{"x" : [1, "\u00e9"]}"#);
    let s = v.as_object().unwrap().get("x").unwrap().as_array().unwrap();
    let s = s.iter().nth(1).unwrap().as_str().unwrap();
    assert_eq!(write(|w| w.wire_str(WireStr::Json(s))), r#""\u00e9""#);
}

#[test]
fn writer_reports_exact_size() {
    let doc = |w: &mut JsonWriter<'_>| {
        w.object(|o| {
            o.str("key", "value with \"quotes\"");
            o.base64("b", &[b"hello", b" world"]);
        })
    };
    let full = write(doc);
    for cap in 0..full.len() {
        let mut buf = std::vec![0u8; cap];
        let mut w = JsonWriter::new(&mut buf);
        doc(&mut w);
        assert_eq!(
            w.finish(),
            Err(BufferTooSmall { needed: full.len() }),
            "cap {cap}"
        );
    }
    // Output round-trips through the reader.
    let v = parse(full.as_bytes()).unwrap().as_object().unwrap();
    assert!(v.get("key").unwrap().as_str().unwrap() == "value with \"quotes\"");
    assert!(v.get("b").unwrap().as_str().unwrap() == "aGVsbG8gd29ybGQ=");
}

#[test]
fn base64_parts_concatenate() {
    let data: Vec<u8> = (0..=255u8).collect();
    for split1 in 0..8 {
        for split2 in split1..12 {
            let (a, rest) = data[..20].split_at(split1);
            let (b, c) = rest.split_at(split2 - split1);
            let got = write(|w| w.base64(&[a, b, c, &[]]));
            let mut want = [0u8; 40];
            let n = crate::wire::b64::encode(&data[..20], &mut want).unwrap();
            assert_eq!(got.as_bytes()[1..got.len() - 1], want[..n]);
        }
    }
    assert_eq!(write(|w| w.base64(&[])), "\"\"");
    assert_eq!(write(|w| w.base64(&[b"\x01", b"hello"])), "\"AWhlbGxv\"");
}

#[test]
fn huge_numbers_are_valid_json_but_not_integers() {
    // Valid grammar (Go's decoder also scans it); only reading it as a number can fail.
    let JsonValue::Number(n) = parse(b"1e901").unwrap() else {
        panic!("1e901 is a JSON number");
    };
    assert_eq!(n.as_u64(), None);
    assert_eq!(n.as_i64(), None);
    let JsonValue::Number(n) = parse(b"18446744073709551616").unwrap() else {
        panic!("2^64 is a JSON number");
    };
    assert_eq!(n.as_u64(), None, "2^64 does not fit u64");
}
