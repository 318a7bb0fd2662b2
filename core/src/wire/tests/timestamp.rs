use crate::wire::error::TimestampError;
use crate::wire::timestamp::{MAX_SECS, UnixTime, civil_from_days, days_from_civil};

fn fmt(secs: u64, nanos: u32) -> std::string::String {
    let b = UnixTime::new(secs, nanos).to_rfc3339().unwrap();
    std::string::String::from_utf8(b.to_vec()).unwrap()
}

#[test]
fn known_dates() {
    assert_eq!(fmt(0, 0), "1970-01-01T00:00:00.000000000Z");
    assert_eq!(fmt(951_782_400, 1), "2000-02-29T00:00:00.000000001Z");
    assert_eq!(
        fmt(1_771_409_459, 123_456_789),
        "2026-02-18T10:10:59.123456789Z"
    );
    assert_eq!(
        fmt(1_709_251_199, 999_999_999),
        "2024-02-29T23:59:59.999999999Z"
    );
    assert_eq!(fmt(4_107_542_400, 0), "2100-03-01T00:00:00.000000000Z");
    assert_eq!(fmt(MAX_SECS, 999_999_999), "9999-12-31T23:59:59.999999999Z");
    assert_eq!(
        UnixTime::new(MAX_SECS + 1, 0).to_rfc3339(),
        Err(TimestampError::OutOfRange)
    );
    assert_eq!(
        UnixTime::new(0, 1_000_000_000).to_rfc3339(),
        Err(TimestampError::OutOfRange)
    );
}

#[test]
fn civil_round_trip_every_day() {
    // Every day from 0000-03-01 to 9999-12-31, against a naive calendar walk.
    let (mut y, mut m, mut d) = (1970i64, 1u32, 1u32);
    for days in 0..(MAX_SECS / 86_400 + 1) as i64 {
        assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
        assert_eq!(days_from_civil(y, m, d), days);
        let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
        let dim = [
            31,
            if leap { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        d += 1;
        if d > dim[m as usize - 1] {
            d = 1;
            m += 1;
            if m > 12 {
                m = 1;
                y += 1;
            }
        }
    }
    assert_eq!(civil_from_days(-719_468), (0, 3, 1));
    assert_eq!(civil_from_days(-1), (1969, 12, 31));
}

#[test]
fn parse_rfc3339() {
    let p = UnixTime::parse_rfc3339;
    assert_eq!(p("1970-01-01T00:00:00Z"), Ok(UnixTime::EPOCH));
    assert_eq!(
        p("2026-02-18T10:10:59.123456789+01:00"),
        Ok(UnixTime::new(1_771_409_459 - 3600, 123_456_789))
    );
    assert_eq!(
        p("2026-02-18t10:10:59.5z"),
        Ok(UnixTime::new(1_771_409_459, 500_000_000))
    );
    assert_eq!(
        p("2026-02-18T10:10:59-00:30"),
        Ok(UnixTime::new(1_771_409_459 + 1800, 0))
    );
    for bad in [
        "",
        "2026-02-18",
        "2026-02-18T10:10:59",
        "2026-02-18T10:10:59.Z",
        "2026-02-18T10:10:59.1234567890Z",
        "2026-02-30T10:10:59Z",
        "2025-02-29T10:10:59Z",
        "2026-13-01T10:10:59Z",
        "2026-02-18T24:00:00Z",
        "2026-02-18T10:60:00Z",
        "2026-02-18T10:10:60Z",
        "2026-02-18T10:10:59+0100",
        "2026-02-18T10:10:59+24:00",
        "2026-02-18 10:10:59Z",
        "2026-02-18T10:10:59Zjunk",
        "+026-02-18T10:10:59Z",
    ] {
        assert_eq!(p(bad), Err(TimestampError::Malformed), "{bad}");
    }
    assert_eq!(
        p("1970-01-01T00:00:00+00:01"),
        Err(TimestampError::OutOfRange)
    );
    assert_eq!(p("1969-12-31T23:59:59Z"), Err(TimestampError::OutOfRange));
}
