//! When to send a batch again after a transient failure. Whether a reply is worth retrying
//! at all is the wire mapping's decision ([`super::wire::Verdict::Transient`]); this module
//! only decides how long to wait (vector's split between retry logic and backoff).
//!
//! Time, sleeping and randomness come in through [`Pacer`], so the dispatcher can be run
//! deterministically in tests, without real sleeps.

use std::time::{Duration, SystemTime};

/// The longest wait a server can ask for with `Retry-After` (contract §7).
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(5 * 60);

/// The clock, the sleep and the jitter of a drain.
pub trait Pacer {
    fn now(&self) -> SystemTime;
    fn sleep(&mut self, duration: Duration);
    /// A random factor in `[0, 1)`.
    fn jitter(&mut self) -> f64;

    fn now_ms(&self) -> i64 {
        self.now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    }
}

/// The real clock, `thread::sleep` and `rand`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemPacer;

impl Pacer for SystemPacer {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep(&mut self, duration: Duration) {
        std::thread::sleep(duration);
    }

    fn jitter(&mut self) -> f64 {
        rand::random::<f64>()
    }
}

/// What a server asked for in `Retry-After`: a number of seconds or an HTTP date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    Delay(Duration),
    At(SystemTime),
}

impl RetryAfter {
    /// `Retry-After: 120` or `Retry-After: Wed, 21 Oct 2015 07:28:00 GMT`; anything else is
    /// ignored (the exponential backoff applies).
    pub fn parse(value: &str) -> Option<RetryAfter> {
        let value = value.trim();
        if let Ok(seconds) = value.parse::<u64>() {
            return Some(RetryAfter::Delay(Duration::from_secs(seconds)));
        }
        httpdate::parse_http_date(value).ok().map(RetryAfter::At)
    }

    /// The wait it asks for as seen at `now` (a date in the past asks for none), capped.
    pub fn wait_from(self, now: SystemTime) -> Duration {
        let asked = match self {
            RetryAfter::Delay(delay) => delay,
            RetryAfter::At(at) => at.duration_since(now).unwrap_or(Duration::ZERO),
        };
        asked.min(RETRY_AFTER_CAP)
    }
}

/// Exponential backoff with jitter: `base · 2^attempt`, scaled by a factor in `[0.5, 1)`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    /// Re-sends allowed after the first try.
    pub retries: u32,
}

impl Backoff {
    /// The wait before re-send number `attempt + 1`, or `None` when the retries are used up.
    /// A server's `Retry-After` (already capped) wins over a shorter backoff step.
    pub fn delay(&self, attempt: u32, jitter: f64, retry_after: Option<Duration>) -> Option<Duration> {
        if attempt >= self.retries {
            return None;
        }
        let exponential = self.base.saturating_mul(1u32 << attempt.min(16));
        let jittered = exponential.mul_f64(0.5 + jitter.clamp(0.0, 1.0) * 0.5);
        Some(match retry_after {
            Some(asked) => asked.max(jittered / 4),
            None => jittered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_or_http_date_capped() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(RetryAfter::parse(" 7 ").map(|r| r.wait_from(now)), Some(Duration::from_secs(7)));
        let date = RetryAfter::parse("Wed, 21 Oct 2015 07:28:30 GMT").unwrap();
        assert_eq!(date.wait_from(now), Duration::from_secs(30));
        let past = RetryAfter::parse("Wed, 21 Oct 2015 07:00:00 GMT").unwrap();
        assert_eq!(past.wait_from(now), Duration::ZERO);
        let far = RetryAfter::parse("Thu, 22 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(far.wait_from(now), RETRY_AFTER_CAP);
        assert_eq!(RetryAfter::parse("86400").unwrap().wait_from(now), RETRY_AFTER_CAP);
        assert_eq!(RetryAfter::parse("soon"), None);
        assert_eq!(RetryAfter::parse("-5"), None);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_stops_after_the_retries() {
        let b = Backoff { base: Duration::from_millis(100), retries: 3 };
        assert_eq!(b.delay(0, 0.0, None), Some(Duration::from_millis(50)));
        assert_eq!(b.delay(1, 1.0, None), Some(Duration::from_millis(200)));
        assert_eq!(b.delay(2, 0.5, None), Some(Duration::from_millis(300)));
        assert_eq!(b.delay(3, 0.5, None), None);
        assert_eq!(b.delay(0, 0.0, Some(Duration::from_secs(9))), Some(Duration::from_secs(9)));
        assert_eq!(b.delay(2, 1.0, Some(Duration::ZERO)), Some(Duration::from_millis(100)));
    }
}
