//! RFC 3339 timestamps on the hot path: reading those of cached values (the session view, the
//! access token), writing those of `/session` responses and log lines.
//!
//! chrono's `Deserialize` for `DateTime<Utc>` accepts a relaxed RFC 3339 through its general
//! format parser, which was about a quarter of opening a cached session view (callgrind; three
//! timestamps per view, two more per cached token on `/auth`). What the broker writes (chrono's
//! `Serialize`) is strict RFC 3339, which `DateTime::parse_from_rfc3339` reads directly; anything
//! else still goes through the relaxed parser. The stored format does not change, so replicas of
//! the previous version read and write the same values during a rolling upgrade.
//!
//! Writing goes through chrono's formatting machinery too (`core::fmt` with a `Display` per
//! field, and an allocated `String`): [`Stamp`] writes the same text into a buffer on the stack.

use chrono::{DateTime, Datelike, FixedOffset, SecondsFormat, Timelike, Utc};
use serde::de::{self, Deserializer, Visitor};
use serde::Serializer;

/// A timestamp written as chrono's `to_rfc3339_opts(format, true)` writes it (UTC, `Z`).
pub struct Stamp {
    bytes: [u8; 30],
    len: usize,
}

impl Stamp {
    /// `None` where chrono's own writer must do it: a year outside 0–9999, a leap second, or a
    /// `SecondsFormat` this does not know.
    pub fn new(at: &DateTime<Utc>, format: SecondsFormat) -> Option<Self> {
        let nanos = at.nanosecond();
        let year = at.year();
        if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
            return None;
        }
        let digits = match format {
            SecondsFormat::Secs => 0,
            SecondsFormat::Millis => 3,
            SecondsFormat::Micros => 6,
            SecondsFormat::Nanos => 9,
            SecondsFormat::AutoSi if nanos == 0 => 0,
            SecondsFormat::AutoSi if nanos % 1_000_000 == 0 => 3,
            SecondsFormat::AutoSi if nanos % 1_000 == 0 => 6,
            SecondsFormat::AutoSi => 9,
            _ => return None,
        };
        let mut stamp = Stamp {
            bytes: [0; 30],
            len: 0,
        };
        let year = year.unsigned_abs();
        stamp.number(year, 4);
        stamp.byte(b'-');
        stamp.number(at.month(), 2);
        stamp.byte(b'-');
        stamp.number(at.day(), 2);
        stamp.byte(b'T');
        stamp.number(at.hour(), 2);
        stamp.byte(b':');
        stamp.number(at.minute(), 2);
        stamp.byte(b':');
        stamp.number(at.second(), 2);
        if digits > 0 {
            stamp.byte(b'.');
            stamp.number(nanos / 10u32.pow(9 - digits), digits);
        }
        stamp.byte(b'Z');
        Some(stamp)
    }

    fn byte(&mut self, byte: u8) {
        self.bytes[self.len] = byte;
        self.len += 1;
    }

    /// `value` in exactly `width` decimal digits (zero-padded; the caller keeps it in range).
    fn number(&mut self, mut value: u32, width: u32) {
        let width = width as usize;
        for index in (0..width).rev() {
            self.bytes[self.len + index] = b'0' + (value % 10) as u8;
            value /= 10;
        }
        self.len += width;
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators are written.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

/// Appends `at` as chrono's `to_rfc3339_opts(format, true)` would.
pub fn push(out: &mut String, at: &DateTime<Utc>, format: SecondsFormat) {
    match Stamp::new(at, format) {
        Some(stamp) => out.push_str(stamp.as_str()),
        None => out.push_str(&at.to_rfc3339_opts(format, true)),
    }
}

/// The same text as chrono's `Serialize` for `DateTime<Utc>`, for `serialize_with`.
pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    match Stamp::new(at, SecondsFormat::AutoSi) {
        Some(stamp) => serializer.serialize_str(stamp.as_str()),
        None => serde::Serialize::serialize(at, serializer),
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    deserializer.deserialize_str(Rfc3339)
}

struct Rfc3339;

impl Visitor<'_> for Rfc3339 {
    type Value = DateTime<Utc>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("an RFC 3339 timestamp")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        DateTime::parse_from_rfc3339(text)
            .or_else(|_| text.parse::<DateTime<FixedOffset>>())
            .map(|time| time.with_timezone(&Utc))
            .map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    struct Stamped {
        #[serde(deserialize_with = "deserialize")]
        at: DateTime<Utc>,
    }

    fn read(json: &str) -> Result<DateTime<Utc>, serde_json::Error> {
        serde_json::from_str::<Stamped>(json).map(|stamped| stamped.at)
    }

    #[test]
    fn reads_what_chrono_writes_and_what_chrono_reads() {
        let time = Utc.with_ymd_and_hms(2026, 11, 23, 20, 45, 1).unwrap()
            + chrono::Duration::nanoseconds(123_456_789);
        let written = serde_json::to_string(&serde_json::json!({ "at": time })).unwrap();
        assert_eq!(read(&written).unwrap(), time);
        // The relaxed forms chrono's own `Deserialize` accepts still read the same.
        for relaxed in [
            r#"{"at":"2026-11-23 20:45:01.123456789Z"}"#,
            r#"{"at":"2026-11-23T21:45:01.123456789+01:00"}"#,
        ] {
            assert_eq!(read(relaxed).unwrap(), time, "{relaxed}");
        }
    }

    #[test]
    fn writes_what_chrono_writes() {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        let formats = [
            SecondsFormat::Secs,
            SecondsFormat::Millis,
            SecondsFormat::Micros,
            SecondsFormat::Nanos,
            SecondsFormat::AutoSi,
        ];
        let mut times: Vec<DateTime<Utc>> = vec![
            DateTime::<Utc>::UNIX_EPOCH,
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(2024, 2, 29, 12, 0, 0).unwrap(),
        ];
        for _ in 0..2000 {
            let seconds = rng.gen_range(-62_000_000_000i64..253_000_000_000);
            // Whole, milli, micro and nano fractions, so each `AutoSi` width is reached.
            let nanos = match rng.gen_range(0..4) {
                0 => 0,
                1 => rng.gen_range(0..1000) * 1_000_000,
                2 => rng.gen_range(0..1_000_000) * 1000,
                _ => rng.gen_range(0..1_000_000_000),
            };
            times.push(DateTime::from_timestamp(seconds, nanos).unwrap());
        }
        for time in &times {
            for format in formats {
                let mut written = String::new();
                push(&mut written, time, format);
                assert_eq!(written, time.to_rfc3339_opts(format, true), "{format:?}");
            }
            #[derive(serde::Serialize)]
            struct Ours(#[serde(serialize_with = "serialize")] DateTime<Utc>);
            assert_eq!(
                serde_json::to_string(&Ours(*time)).unwrap(),
                serde_json::to_string(time).unwrap()
            );
        }
        // Outside what `Stamp` writes, chrono's writer answers.
        let far = Utc.with_ymd_and_hms(12345, 6, 7, 8, 9, 10).unwrap();
        assert!(Stamp::new(&far, SecondsFormat::Secs).is_none());
        let mut written = String::new();
        push(&mut written, &far, SecondsFormat::Secs);
        assert_eq!(written, far.to_rfc3339_opts(SecondsFormat::Secs, true));
    }

    #[test]
    fn refuses_what_is_not_a_timestamp() {
        for bad in [
            r#"{"at":"2026-13-01T00:00:00Z"}"#,
            r#"{"at":"yesterday"}"#,
            r#"{"at":1764000000}"#,
            r#"{"at":"2026-11-23T20:45:01Z trailing"}"#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
    }
}
