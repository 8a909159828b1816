//! Reading the timestamps of cached values (the session view, the access token) fast.
//!
//! chrono's `Deserialize` for `DateTime<Utc>` accepts a relaxed RFC 3339 through its general
//! format parser, which was about a quarter of opening a cached session view (callgrind; three
//! timestamps per view, two more per cached token on `/auth`). What the broker writes (chrono's
//! `Serialize`) is strict RFC 3339, which `DateTime::parse_from_rfc3339` reads directly; anything
//! else still goes through the relaxed parser. The stored format does not change, so replicas of
//! the previous version read and write the same values during a rolling upgrade.

use chrono::{DateTime, FixedOffset, Utc};
use serde::de::{self, Deserializer, Visitor};

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
