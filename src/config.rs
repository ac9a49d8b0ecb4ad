//! Small pure parsers for the values people write in flags and annotations: durations
//! (`"30s"`, `"500ms"`, `"1m30s"`) and byte sizes (`"32MiB"`). Each returns a message that
//! says what was expected, so callers can name the flag or key around it.
//!
//! [`ConfigError`] is the one error every settings check returns (the agent's, the
//! controller's, remote write's): it names the flag and what is wrong, so `meshcanary`
//! exits with one line that says what to fix.

use std::path::PathBuf;
use std::time::Duration;

/// A configuration that cannot run: which flag, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value out of range, or malformed.
    #[error("{flag}: {problem}")]
    Invalid { flag: &'static str, problem: String },
    /// Two flags that exclude each other.
    #[error("give {first} or {second}, not both")]
    Conflict {
        first: &'static str,
        second: &'static str,
    },
    /// A flag that needs another.
    #[error("{flag} needs {needs}")]
    Needs { flag: &'static str, needs: String },
    /// A file a flag names that cannot be read.
    #[error("{flag}: reading {}: {source}", path.display())]
    File {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ConfigError {
    /// `flag`'s value is wrong: `problem` says how.
    pub fn invalid(flag: &'static str, problem: impl Into<String>) -> Self {
        ConfigError::Invalid {
            flag,
            problem: problem.into(),
        }
    }

    /// The flag the error is about (the first, for a conflict).
    pub fn flag(&self) -> &'static str {
        match self {
            ConfigError::Invalid { flag, .. }
            | ConfigError::Needs { flag, .. }
            | ConfigError::File { flag, .. } => flag,
            ConfigError::Conflict { first, .. } => first,
        }
    }
}

/// `Err(ConfigError::Invalid)` for `flag` unless `ok`.
///
/// ### Errors
/// `problem` about `flag`, when `ok` is false.
pub fn require(
    ok: bool,
    flag: &'static str,
    problem: impl FnOnce() -> String,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(flag, problem()))
    }
}

/// Parse a duration written as one or more `<number><unit>` parts, units `ms`, `s`, `m`, `h`
/// (`"1s"`, `"250ms"`, `"1m30s"`, `"1.5s"`). A bare `0` is zero.
///
/// ```
/// use std::time::Duration;
/// use meshcanary::config::parse_duration;
/// assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
/// assert!(parse_duration("30").is_err()); // a unit is required
/// ```
///
/// ### Errors
/// A message quoting the input and the expected form.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let expected = || format!("invalid duration {s:?}: expected e.g. 500ms, 30s, 1m30s");
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(expected());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(expected)?;
        let value: f64 = rest[..num_len].parse().map_err(|_| expected())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(expected()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > 1e9 {
        return Err(expected());
    }
    Ok(Duration::from_secs_f64(total))
}

/// Write a duration the way [`parse_duration`] reads it, in whole units: `10m`, `1m30s`,
/// `2s`, `500ms`.
///
/// ```
/// use std::time::Duration;
/// use meshcanary::config::format_duration;
/// assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
/// assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
/// ```
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) || ms == 0 {
        return format!("{ms}ms");
    }
    let (h, m, s) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60);
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

/// Parse a byte size: a whole number with an optional unit `B`, `KiB`, `MiB`, `GiB`, `KB`,
/// `MB`, `GB`.
///
/// ### Errors
/// A message quoting the input and the expected form.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let expected = || format!("invalid size {s:?}: expected e.g. 32MiB, 512KiB, 1000000");
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: usize = s[..split].parse().map_err(|_| expected())?;
    let scale: usize = match &s[split..] {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(expected()),
    };
    n.checked_mul(scale).ok_or_else(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("0", 0),
            ("1s", 1_000),
            ("250ms", 250),
            ("1m30s", 90_000),
            ("1.5s", 1_500),
            ("2h", 7_200_000),
            (" 30s ", 30_000),
        ];
        for (text, ms) in ok {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
        for bad in ["", "s", "10", "1x", "-1s", "1s2", "ms", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("32MiB"), Ok(32 << 20));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("2MB"), Ok(2_000_000));
        for bad in ["", "MiB", "1.5MiB", "-1", "3PiB", "99999999999999999999GiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }
}
