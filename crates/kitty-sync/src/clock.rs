//! Wall-clock helpers. Times are stored as Unix epoch milliseconds and shown as RFC 3339 UTC.

use jiff::Timestamp;

pub fn now_ms() -> i64 {
    Timestamp::now().as_millisecond()
}

/// RFC 3339 UTC with millisecond precision, e.g. `2026-11-24T00:25:25.123Z`.
pub fn rfc3339_ms(ms: i64) -> String {
    match Timestamp::from_millisecond(ms) {
        Ok(ts) => format!("{ts:.3}"),
        Err(_) => format!("@{ms}ms"),
    }
}

/// Parses an RFC 3339 timestamp given by an operator.
pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    text.trim().parse::<Timestamp>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_millis() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_771_575_301_123), "2026-02-20T08:15:01.123Z");
    }

    #[test]
    fn parses_offsets() {
        let ts = parse_rfc3339("2026-02-20T09:15:01+01:00").unwrap();
        assert_eq!(ts.as_second(), 1_771_575_301);
        assert!(parse_rfc3339("yesterday").is_none());
    }
}
