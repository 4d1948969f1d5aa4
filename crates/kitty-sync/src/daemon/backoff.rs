//! Per-target backoff after failures: exponential with jitter up to the operator's maximum,
//! never shorter than what the receiver asked for with `Retry-After`.

use std::time::Duration;

const FIRST_STEP: Duration = Duration::from_millis(500);
/// A `Retry-After` is honoured up to this (the dispatcher's own cap).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The wait after the `failures`-th consecutive failure (1-based).
pub fn delay(failures: u32, retry_after: Option<Duration>, max_backoff: Duration) -> Duration {
    let exponential = FIRST_STEP.saturating_mul(1u32 << failures.saturating_sub(1).min(20)).min(max_backoff);
    // Jitter downwards only, so the configured maximum stays a maximum.
    let jittered = exponential.mul_f64(0.8 + rand::random::<f64>() * 0.2);
    match retry_after {
        Some(asked) => jittered.max(asked.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_maximum_and_honours_retry_after() {
        let max = Duration::from_secs(300);
        assert!(delay(1, None, max) <= FIRST_STEP);
        assert!(delay(3, None, max) > delay(1, None, max));
        assert!(delay(40, None, Duration::from_secs(2)) <= Duration::from_secs(2));
        assert!(delay(40, None, Duration::from_secs(2)) >= Duration::from_millis(1600));
        assert_eq!(delay(1, Some(Duration::from_secs(3)), max), Duration::from_secs(3));
        assert_eq!(delay(1, Some(Duration::from_secs(9999)), max), MAX_RETRY_AFTER);
    }
}
