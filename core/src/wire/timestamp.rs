//! Envelope timestamps: RFC 3339 formatting and parsing of a caller-supplied [`UnixTime`]
//! (the core has no clock).

use crate::wire::error::TimestampError;

/// A point in time as seconds and nanoseconds since 1970-01-01T00:00:00Z (UTC, no leap
/// seconds), supplied by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct UnixTime {
    /// Whole seconds since the Unix epoch.
    pub secs: u64,
    /// Nanoseconds within the second; must be below 10⁹ to be formatted.
    pub nanos: u32,
}

/// Length of a formatted timestamp: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
pub const RFC3339_LEN: usize = 30;

/// Last second that fits a four-digit year: 9999-12-31T23:59:59Z.
pub const MAX_SECS: u64 = 253_402_300_799;

const SECS_PER_DAY: u64 = 86_400;

impl UnixTime {
    /// Unix epoch.
    pub const EPOCH: Self = Self { secs: 0, nanos: 0 };

    /// A time from seconds and nanoseconds.
    pub const fn new(secs: u64, nanos: u32) -> Self {
        Self { secs, nanos }
    }

    /// Formats as RFC 3339 in UTC with exactly nine fraction digits, e.g.
    /// `2026-02-18T10:10:59.123456789Z` (Go's `time.Time` accepts any fraction length).
    ///
    /// Errors with [`TimestampError::OutOfRange`] after [`MAX_SECS`] or when
    /// `nanos >= 10⁹`.
    pub fn to_rfc3339(&self) -> Result<[u8; RFC3339_LEN], TimestampError> {
        if self.secs > MAX_SECS || self.nanos >= 1_000_000_000 {
            return Err(TimestampError::OutOfRange);
        }
        let days = self.secs / SECS_PER_DAY;
        let rem = self.secs % SECS_PER_DAY;
        let (y, m, d) = civil_from_days(days as i64);
        let mut out = *b"0000-00-00T00:00:00.000000000Z";
        put_digits(&mut out[0..4], y as u64);
        put_digits(&mut out[5..7], u64::from(m));
        put_digits(&mut out[8..10], u64::from(d));
        put_digits(&mut out[11..13], rem / 3600);
        put_digits(&mut out[14..16], rem / 60 % 60);
        put_digits(&mut out[17..19], rem % 60);
        put_digits(&mut out[20..29], u64::from(self.nanos));
        Ok(out)
    }

    /// Parses an RFC 3339 date-time: `YYYY-MM-DDTHH:MM:SS`, an optional fraction of 1 to 9
    /// digits (more are rejected), then `Z` or `±HH:MM`. `T`/`Z` may be lower case. The
    /// result must not be before the Unix epoch.
    pub fn parse_rfc3339(s: &str) -> Result<Self, TimestampError> {
        use TimestampError::{Malformed, OutOfRange};
        let b = s.as_bytes();
        if b.len() < 20 {
            return Err(Malformed);
        }
        let num = |r: core::ops::Range<usize>| -> Result<u64, TimestampError> {
            let digits = b.get(r).ok_or(Malformed)?;
            digits.iter().try_fold(0u64, |acc, &c| {
                if c.is_ascii_digit() {
                    Ok(acc * 10 + u64::from(c - b'0'))
                } else {
                    Err(Malformed)
                }
            })
        };
        let sep = |i: usize, want: &[u8]| -> Result<(), TimestampError> {
            match b.get(i) {
                Some(c) if want.contains(c) => Ok(()),
                _ => Err(Malformed),
            }
        };
        let year = num(0..4)?;
        sep(4, b"-")?;
        let month = num(5..7)?;
        sep(7, b"-")?;
        let day = num(8..10)?;
        sep(10, b"Tt")?;
        let hour = num(11..13)?;
        sep(13, b":")?;
        let minute = num(14..16)?;
        sep(16, b":")?;
        let second = num(17..19)?;
        if !(1..=12).contains(&month)
            || day == 0
            || day > u64::from(days_in_month(year as i64, month as u32))
            || hour > 23
            || minute > 59
            || second > 59
        {
            return Err(Malformed);
        }
        let mut i = 19;
        let mut nanos = 0u32;
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            let mut end = start;
            while b.get(end).is_some_and(u8::is_ascii_digit) {
                end += 1;
            }
            let n = end - start;
            if n == 0 || n > 9 {
                return Err(Malformed);
            }
            nanos = (num(start..end)? * 10u64.pow((9 - n) as u32)) as u32;
            i = end;
        }
        let offset_secs: i64 = match b.get(i..) {
            Some(b"Z" | b"z") => 0,
            Some([sign @ (b'+' | b'-'), _, _, b':', _, _]) => {
                let h = num(i + 1..i + 3)? as i64;
                let m = num(i + 4..i + 6)? as i64;
                if h > 23 || m > 59 {
                    return Err(Malformed);
                }
                let off = h * 3600 + m * 60;
                if *sign == b'+' { off } else { -off }
            }
            _ => return Err(Malformed),
        };
        let days = days_from_civil(year as i64, month as u32, day as u32);
        let local = days * SECS_PER_DAY as i64 + (hour * 3600 + minute * 60 + second) as i64;
        let utc = local - offset_secs;
        if utc < 0 || utc as u64 > MAX_SECS {
            return Err(OutOfRange);
        }
        Ok(Self {
            secs: utc as u64,
            nanos,
        })
    }
}

fn put_digits(out: &mut [u8], mut v: u64) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of the proleptic Gregorian date `y-m-d` (era arithmetic: 400-year
/// eras of 146 097 days, years starting in March so the leap day is last).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400); // [0, 399]
    let mp = (i64::from(m) + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`].
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}
