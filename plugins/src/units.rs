//! Durations (`250ms`, `10s`, `5m`, `12h`, `30d`) and sizes (`512KiB`, `10MiB`, `1GB`).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration setting: written as `250ms`, `10s`, `5m`, `12h` or `30d`, parsed once when
/// the config is read (a bad one is an error of the config, naming the setting), and
/// shown back in the largest unit that states it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span(Duration);

impl Span {
    pub const fn from_secs(secs: u64) -> Self {
        Span(Duration::from_secs(secs))
    }

    pub const fn get(self) -> Duration {
        self.0
    }
}

impl From<Span> for Duration {
    fn from(span: Span) -> Duration {
        span.0
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis();
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms >= size && ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl std::str::FromStr for Span {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        parse_duration(text).map(Span)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Span;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as 250ms, 10s, 5m, 12h or 30d")
            }

            // A bare number is the commonest slip (`timeout: 10`): say which unit is
            // missing rather than that a string was expected.
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Span, E> {
                self.visit_str(&n.to_string())
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Span, E> {
                self.visit_str(&n.to_string())
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Span, E> {
                text.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A byte-size setting: a plain number of bytes (`4096`) or `512KiB`, `10MiB`, `1GB`;
/// parsed once when the config is read and shown back in the largest binary unit that
/// states it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(u64);

impl Size {
    pub const fn bytes(n: u64) -> Self {
        Size(n)
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for Size {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        parse_size(text).map(Size)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Size;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size such as 10MiB")
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Size, E> {
                Ok(Size(n))
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Size, E> {
                u64::try_from(n)
                    .map(Size)
                    .map_err(|_| E::custom("must be a positive size"))
            }

            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Size, E> {
                Err(E::custom(
                    "must be a whole number of bytes or a size such as 10MiB",
                ))
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Size, E> {
                text.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A rate setting: `20/s`, `100/min` or `1000/h`, parsed once when the config is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// How many, at least 1.
    pub count: u64,
    /// In how long: a second, a minute or an hour.
    pub per: Duration,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        parse_rate(text).map(|(count, per)| Rate { count, per })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Parses `20/s`, `100/min`, `1000/h`.
pub fn parse_rate(text: &str) -> Result<(u64, Duration), String> {
    let (n, unit) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a rate like 20/s, 100/min or 1000/h"))?;
    let n: u64 = n
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?}: the count must be a positive integer"))?;
    let period = match unit.trim() {
        "s" | "sec" => Duration::from_secs(1),
        "m" | "min" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => return Err(format!("{text:?}: unknown unit {other:?}; use s, min or h")),
    };
    Ok((n, period))
}

impl schemars::JsonSchema for Span {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^\\s*[0-9]+(ms|s|m|h|d)\\s*$",
            "description": "A duration: 250ms, 10s, 5m, 12h or 30d.",
        })
    }
}

impl schemars::JsonSchema for Size {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Size".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "anyOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "pattern": "^\\s*[0-9]+\\s*(B|KiB|MiB|GiB|KB|MB|GB)?\\s*$" },
            ],
            "description": "A size in bytes: 4096, 512KiB, 10MiB, 1GB.",
        })
    }
}

impl schemars::JsonSchema for Rate {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Rate".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^\\s*[0-9]*[1-9][0-9]*\\s*/\\s*(s|sec|m|min|h|hour)\\s*$",
            "description": "A rate: 20/s, 100/min or 1000/h.",
        })
    }
}

/// Parses `250ms`, `10s`, `5m`, `12h` or `30d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit; write it like 250ms, 10s, 5m, 12h or 30d"))?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 250ms, 10s, 5m, 12h or 30d"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit {unit:?}; use ms, s, m, h or d"
            ))
        }
    }
    .ok_or_else(|| format!("{text:?} is too long"))?;
    Ok(Duration::from_millis(ms))
}

/// Parses a byte size: a plain number of bytes, or `KiB`/`MiB`/`GiB` (powers of 1024)
/// or `KB`/`MB`/`GB` (powers of 1000).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 512KiB or 10MiB"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "{text:?} has an unknown unit {other:?}; use KiB, MiB, GiB, KB, MB or GB"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_reads_once_and_shows_in_its_largest_exact_unit() {
        #[derive(Deserialize, Serialize)]
        struct S {
            ttl: Span,
        }
        let s: S = serde_yaml_ng::from_str("ttl: 90m").unwrap();
        assert_eq!(s.ttl.get(), Duration::from_secs(5400));
        assert_eq!(s.ttl.to_string(), "90m");
        for (written, shown) in [
            ("120s", "2m"),
            ("1500ms", "1500ms"),
            ("48h", "2d"),
            ("0s", "0ms"),
        ] {
            assert_eq!(written.parse::<Span>().unwrap().to_string(), shown);
        }
        let err = serde_yaml_ng::from_str::<S>("ttl: 5 minutes")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("unknown unit"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("12h").unwrap(), Duration::from_secs(43_200));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(2_592_000)
        );
        for bad in ["10", "s", "10x", "-1s", "1.5s", ""] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_size_reads_numbers_and_units_and_shows_its_largest_exact_unit() {
        #[derive(Deserialize, Serialize)]
        struct S {
            max: Size,
        }
        for (written, bytes, shown) in [
            ("max: 4096", 4096, "4KiB"),
            ("max: 10MiB", 10 << 20, "10MiB"),
            ("max: '1000'", 1000, "1000"),
            ("max: 1GB", 1_000_000_000, "1000000000"),
        ] {
            let s: S = serde_yaml_ng::from_str(written).unwrap();
            assert_eq!(s.max.get(), bytes, "{written}");
            assert_eq!(s.max.to_string(), shown, "{written}");
        }
        for bad in ["max: -1", "max: 1.5", "max: 10 parsecs", "max: [1]"] {
            assert!(serde_yaml_ng::from_str::<S>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512KiB").unwrap(), 512 * 1024);
        assert_eq!(parse_size("10MiB").unwrap(), 10 * 1024 * 1024);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["10 parsecs", "MiB", "99999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
