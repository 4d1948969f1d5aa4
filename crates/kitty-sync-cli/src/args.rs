//! Value parsers shared by the flags of several commands, so every `--wait`/`--timeout`
//! accepts and refuses the same values with the same message.

use std::time::Duration;

/// The longest `--wait`/`--timeout` accepted: one day. Without a bound, a huge value
/// overflows the deadline arithmetic (`Instant + Duration`) and the process panics; a wait
/// longer than a day is better written as a loop or left to the daemon.
pub const MAX_SECONDS: u64 = 86_400;

/// `--wait SECS`: 0 to [`MAX_SECONDS`], fractions allowed.
pub fn seconds(text: &str) -> Result<Duration, String> {
    parse_seconds(text)
}

/// `--timeout SECS`: like [`seconds`], but 0 would time out every request at once.
pub fn positive_seconds(text: &str) -> Result<Duration, String> {
    match parse_seconds(text)? {
        Duration::ZERO => Err(format!("expected more than 0 and at most {MAX_SECONDS} seconds, e.g. 30 or 0.5")),
        duration => Ok(duration),
    }
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("expected a number of seconds (at most {MAX_SECONDS}), e.g. 30 or 0.5"))?;
    if !value.is_finite() || value < 0.0 || value > MAX_SECONDS as f64 {
        return Err(format!("expected 0 to {MAX_SECONDS} seconds (one day), e.g. 30 or 0.5"));
    }
    Ok(Duration::from_secs_f64(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert_eq!(seconds("0"), Ok(Duration::ZERO));
        assert_eq!(seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(seconds("86400"), Ok(Duration::from_secs(MAX_SECONDS)));
        for bad in ["86401", "1e20", "18446744073709551616", "-1", "NaN", "inf", "", "ten"] {
            assert!(seconds(bad).is_err(), "{bad}");
        }
        assert!(positive_seconds("0").is_err());
        assert_eq!(positive_seconds("60"), Ok(Duration::from_secs(60)));
    }
}
