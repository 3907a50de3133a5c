//! Time as milliseconds since the Unix epoch, passed into the domain by the
//! caller. Formats as RFC 3339 UTC without a date library.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A point in time, milliseconds since 1970-01-01T00:00:00Z. Serialized as
/// an RFC 3339 UTC string; deserialized from that or from integer milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.rfc3339_fixed() {
            Some(bytes) => s.serialize_str(std::str::from_utf8(&bytes).expect("ASCII digits and separators")),
            None => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 UTC time such as \"2026-11-26T10:00:00Z\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Timestamp, E> {
                Timestamp::parse_rfc3339(v)
                    .ok_or_else(|| E::custom("time must be RFC 3339 UTC, e.g. \"2026-11-26T10:00:00Z\""))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Timestamp, E> {
                // Only instants RFC 3339 can write (years 0000 to 9999), so
                // whatever is accepted serializes to a time that parses again.
                if (Timestamp::MIN.0..=Timestamp::MAX.0).contains(&v) {
                    Ok(Timestamp(v))
                } else {
                    Err(E::custom("time out of range (years 0000 to 9999)"))
                }
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Timestamp, E> {
                let v = i64::try_from(v).map_err(|_| E::custom("time out of range (years 0000 to 9999)"))?;
                self.visit_i64(v)
            }
        }
        d.deserialize_any(V)
    }
}

impl Timestamp {
    /// The earliest instant RFC 3339 can write: `0000-01-01T00:00:00.000Z`.
    pub const MIN: Timestamp = Timestamp(-62_167_219_200_000);
    /// The latest instant RFC 3339 can write: `9999-12-31T23:59:59.999Z`.
    pub const MAX: Timestamp = Timestamp(253_402_300_799_999);

    /// Milliseconds since the epoch.
    pub const fn millis(self) -> i64 {
        self.0
    }

    /// This time plus `ms` milliseconds (saturating).
    pub const fn plus_ms(self, ms: i64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self` (negative if `earlier` is later).
    pub const fn since(self, earlier: Timestamp) -> i64 {
        self.0.saturating_sub(earlier.0)
    }

    /// Parses an RFC 3339 UTC time such as `2026-11-26T10:00:00Z` or
    /// `2026-11-26T10:00:00.123Z`. Offsets other than `Z`/`+00:00` are rejected.
    pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
        let b = s.as_bytes();
        if b.len() < 20
            || b[4] != b'-'
            || b[7] != b'-'
            || !(b[10] == b'T' || b[10] == b't')
            || b[13] != b':'
            || b[16] != b':'
        {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<i64> {
            let t = s.get(r)?;
            if !t.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            t.parse().ok()
        };
        let (y, mo, d, h, mi, sec) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || sec > 60 {
            return None;
        }
        let mut rest = &s[19..];
        let mut ms = 0i64;
        if let Some(frac) = rest.strip_prefix('.') {
            let n = frac.bytes().take_while(u8::is_ascii_digit).count();
            if n == 0 {
                return None;
            }
            let digits = &frac[..n.min(3)];
            ms = digits.parse::<i64>().ok()? * 10i64.pow(3 - digits.len() as u32);
            rest = &frac[n..];
        }
        if !(rest == "Z" || rest == "z" || rest == "+00:00") {
            return None;
        }
        let days = days_from_civil(y, mo, d);
        Some(Timestamp(((days * 24 + h) * 60 + mi) * 60_000 + sec * 1000 + ms))
    }
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl Timestamp {
    /// The RFC 3339 form when the year has four digits (0000–9999, every
    /// time an engine makes), written into a fixed buffer: no formatter
    /// machinery on the hot path (every event and document carries times).
    fn rfc3339_fixed(self) -> Option<[u8; 24]> {
        let days = self.0.div_euclid(86_400_000);
        let ms_of_day = self.0.rem_euclid(86_400_000);
        let (y, m, d) = civil_from_days(days);
        if !(0..=9999).contains(&y) {
            return None;
        }
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut v: i64| {
            for i in (at..at + width).rev() {
                out[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, 4, y);
        put(5, 2, m);
        put(8, 2, d);
        put(11, 2, ms_of_day / 3_600_000);
        put(14, 2, ms_of_day % 3_600_000 / 60_000);
        put(17, 2, ms_of_day % 60_000 / 1000);
        put(20, 3, ms_of_day % 1000);
        Some(out)
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 UTC with milliseconds, e.g. `2026-11-26T10:00:00.000Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(bytes) = self.rfc3339_fixed() {
            return f.write_str(std::str::from_utf8(&bytes).expect("ASCII digits and separators"));
        }
        let days = self.0.div_euclid(86_400_000);
        let ms_of_day = self.0.rem_euclid(86_400_000);
        let (y, m, d) = civil_from_days(days);
        let (h, rem) = (ms_of_day / 3_600_000, ms_of_day % 3_600_000);
        let (mi, rem) = (rem / 60_000, rem % 60_000);
        write!(f, "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{:02}.{:03}Z", rem / 1000, rem % 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The general formatting the fixed buffer must agree with.
    fn formatted(t: Timestamp) -> String {
        let days = t.0.div_euclid(86_400_000);
        let ms_of_day = t.0.rem_euclid(86_400_000);
        let (y, m, d) = civil_from_days(days);
        let (h, rem) = (ms_of_day / 3_600_000, ms_of_day % 3_600_000);
        let (mi, rem) = (rem / 60_000, rem % 60_000);
        format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{:02}.{:03}Z", rem / 1000, rem % 1000)
    }

    #[test]
    fn the_fixed_buffer_formats_like_the_general_path() {
        let year_0 = -62_167_219_200_000i64;
        let year_10000 = 253_402_300_800_000i64;
        let mut samples = vec![0, -1, 1, 999, 86_399_999, 951_782_400_000, 1_795_823_936_279, year_0, year_10000 - 1];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            samples.push(year_0 + (x % (year_10000 - year_0) as u64) as i64);
        }
        for ms in samples {
            let t = Timestamp(ms);
            let fixed = t.rfc3339_fixed().expect("a four-digit year");
            assert_eq!(std::str::from_utf8(&fixed).unwrap(), formatted(t), "{ms}");
            assert_eq!(t.to_string(), formatted(t));
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{}\"", formatted(t)));
            assert_eq!(Timestamp::parse_rfc3339(&t.to_string()), Some(t), "{ms}");
        }
        for ms in [year_0 - 1, year_10000, i64::MIN, i64::MAX] {
            let t = Timestamp(ms);
            assert!(t.rfc3339_fixed().is_none(), "{ms}");
            assert_eq!(t.to_string(), formatted(t));
        }
    }

    #[test]
    fn integer_times_outside_rfc_3339_years_are_refused() {
        assert_eq!(Timestamp::MIN.to_string(), "0000-01-01T00:00:00.000Z");
        assert_eq!(Timestamp::MAX.to_string(), "9999-12-31T23:59:59.999Z");
        for edge in [Timestamp::MIN, Timestamp::MAX] {
            let parsed: Timestamp = serde_json::from_str(&edge.0.to_string()).expect("in range");
            assert_eq!(
                serde_json::from_str::<Timestamp>(&serde_json::to_string(&parsed).expect("ser")).ok(),
                Some(edge)
            );
        }
        for out in [Timestamp::MIN.0 - 1, Timestamp::MAX.0 + 1, i64::MIN, i64::MAX] {
            assert!(serde_json::from_str::<Timestamp>(&out.to_string()).is_err(), "{out}");
        }
        assert!(serde_json::from_str::<Timestamp>(&u64::MAX.to_string()).is_err());
    }

    #[test]
    fn formats_and_parses_known_instants() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000Z");
        let t = Timestamp::parse_rfc3339("2026-11-26T10:48:02Z").expect("valid");
        assert_eq!(t.to_string(), "2026-11-26T10:48:02.000Z");
        assert_eq!(Timestamp::parse_rfc3339("2024-02-29T00:00:00.5Z").map(|t| t.0 % 1000), Some(500));
        assert!(Timestamp::parse_rfc3339("2023-02-29T00:00:00Z").is_none());
        assert!(Timestamp::parse_rfc3339("2026-11-26 10:48:02Z").is_none());
        assert!(Timestamp::parse_rfc3339("2026-11-26T10:48:02+02:00").is_none());
    }

    #[test]
    fn serde_is_rfc3339_and_accepts_millis() {
        let t = Timestamp(1_764_150_000_123);
        let json = serde_json::to_string(&t).expect("serializes");
        assert_eq!(json, "\"2025-11-26T09:40:00.123Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).expect("parses"), t);
        assert_eq!(serde_json::from_str::<Timestamp>("1764150000123").expect("millis"), t);
        assert!(serde_json::from_str::<Timestamp>("\"yesterday\"").is_err());
    }
}
