//! How long to wait before retrying a failed message or carrier call, and when
//! to give up and dead-letter it (PRODUCT.md §4.2: exponential backoff with
//! jitter, default limit 3).
//!
//! The delay before the next attempt is exponential and capped,
//! `cap(n) = min(max_delay_ms, base_delay_ms * multiplier^(n-1))` after `n`
//! failed attempts, with "equal jitter": half of `cap(n)` is fixed and the other
//! half is drawn from the caller's random `jitter`, so the delay lies in
//! `[cap(n) - cap(n)/2, cap(n)]`. Retries of many messages that failed together
//! spread out instead of stampeding, yet each still waits at least half its cap.
//! Once `max_attempts` attempts have failed there is no delay: the message goes
//! to the dead-letter store.
//!
//! ```
//! use orderly_domain::shipping::retry::RetryPolicy;
//!
//! let policy = RetryPolicy::new(3, 1_000, 60_000, 2).expect("valid policy");
//! assert_eq!(policy.delay_ms(1, 0), Some(500)); // after the 1st failure: 500..=1000
//! assert_eq!(policy.delay_ms(2, 999), Some(1_999)); // after the 2nd: 1000..=2000
//! assert_eq!(policy.delay_ms(3, 7), None); // the 3rd failure dead-letters
//! ```

use serde::Serialize;

/// Default number of attempts before a message is dead-lettered.
pub const MAX_ATTEMPTS_DEFAULT: u32 = 3;

/// Default delay cap after the first failure.
pub const BASE_DELAY_MS_DEFAULT: u64 = 1_000;

/// Default longest delay.
pub const MAX_DELAY_MS_DEFAULT: u64 = 60_000;

/// Default growth factor between attempts.
pub const MULTIPLIER_DEFAULT: u32 = 2;

/// Most attempts a policy may allow.
pub const MAX_ATTEMPTS_MAX: u32 = 100;

/// Longest delay a policy may ask for: one day.
pub const DELAY_MS_MAX: u64 = 86_400_000;

/// Largest growth factor a policy may use.
pub const MULTIPLIER_MAX: u32 = 16;

/// Why a retry policy is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetryError {
    /// `max_attempts` is zero (nothing would ever be tried) or above [`MAX_ATTEMPTS_MAX`].
    #[error("max_attempts must be between 1 and {max}")]
    MaxAttempts {
        /// The limit.
        max: u32,
    },
    /// `base_delay_ms` is zero (retries would spin) or above `max_delay_ms`.
    #[error("base_delay_ms must be at least 1 and at most max_delay_ms")]
    BaseDelay,
    /// `max_delay_ms` is above [`DELAY_MS_MAX`].
    #[error("max_delay_ms must be at most {max}")]
    MaxDelay {
        /// The limit.
        max: u64,
    },
    /// `multiplier` is zero or above [`MULTIPLIER_MAX`].
    #[error("multiplier must be between 1 and {max}")]
    Multiplier {
        /// The limit.
        max: u32,
    },
}

/// A bounded exponential backoff with equal jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    max_attempts: u32,
    base_delay_ms: u64,
    max_delay_ms: u64,
    multiplier: u32,
}

impl RetryPolicy {
    /// A policy, validated against the limits.
    pub fn new(
        max_attempts: u32,
        base_delay_ms: u64,
        max_delay_ms: u64,
        multiplier: u32,
    ) -> Result<RetryPolicy, RetryError> {
        if !(1..=MAX_ATTEMPTS_MAX).contains(&max_attempts) {
            return Err(RetryError::MaxAttempts { max: MAX_ATTEMPTS_MAX });
        }
        if max_delay_ms > DELAY_MS_MAX {
            return Err(RetryError::MaxDelay { max: DELAY_MS_MAX });
        }
        if base_delay_ms == 0 || base_delay_ms > max_delay_ms {
            return Err(RetryError::BaseDelay);
        }
        if !(1..=MULTIPLIER_MAX).contains(&multiplier) {
            return Err(RetryError::Multiplier { max: MULTIPLIER_MAX });
        }
        Ok(RetryPolicy { max_attempts, base_delay_ms, max_delay_ms, multiplier })
    }

    /// The delay before the next attempt after `failed_attempts` attempts have
    /// failed, with `jitter` a random `u64` from the caller; `None` once
    /// `max_attempts` attempts have failed (dead-letter it). The delay lies in
    /// `[cap - cap/2, cap]` with `cap` = [`RetryPolicy::cap_ms`].
    pub fn delay_ms(&self, failed_attempts: u32, jitter: u64) -> Option<u64> {
        if self.is_exhausted(failed_attempts) {
            return None;
        }
        let cap_ms = self.cap_ms(failed_attempts);
        let random_half_ms = cap_ms / 2;
        Some(cap_ms - random_half_ms + jitter % (random_half_ms + 1))
    }

    /// The delay cap (the delay without jitter) after `failed_attempts` failures:
    /// `min(max_delay_ms, base_delay_ms * multiplier^(failed_attempts - 1))`.
    /// Non-decreasing in `failed_attempts`; 0 is treated like 1.
    pub fn cap_ms(&self, failed_attempts: u32) -> u64 {
        let exponent = failed_attempts.saturating_sub(1);
        u64::from(self.multiplier)
            .checked_pow(exponent)
            .and_then(|factor| self.base_delay_ms.checked_mul(factor))
            .map_or(self.max_delay_ms, |delay_ms| delay_ms.min(self.max_delay_ms))
    }

    /// Whether `failed_attempts` failures use up the policy.
    pub fn is_exhausted(&self, failed_attempts: u32) -> bool {
        failed_attempts >= self.max_attempts
    }

    /// Attempts allowed in all, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay cap after the first failure.
    pub fn base_delay_ms(&self) -> u64 {
        self.base_delay_ms
    }

    /// The longest delay.
    pub fn max_delay_ms(&self) -> u64 {
        self.max_delay_ms
    }

    /// The growth factor between attempts.
    pub fn multiplier(&self) -> u32 {
        self.multiplier
    }
}

impl Default for RetryPolicy {
    /// 3 attempts, 1 s doubling up to 60 s.
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: MAX_ATTEMPTS_DEFAULT,
            base_delay_ms: BASE_DELAY_MS_DEFAULT,
            max_delay_ms: MAX_DELAY_MS_DEFAULT,
            multiplier: MULTIPLIER_DEFAULT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_policies_outside_the_limits() {
        assert_eq!(RetryPolicy::new(0, 1, 1, 2), Err(RetryError::MaxAttempts { max: MAX_ATTEMPTS_MAX }));
        assert_eq!(RetryPolicy::new(MAX_ATTEMPTS_MAX + 1, 1, 1, 2), Err(RetryError::MaxAttempts { max: 100 }));
        assert_eq!(RetryPolicy::new(3, 0, 1, 2), Err(RetryError::BaseDelay));
        assert_eq!(RetryPolicy::new(3, 10, 9, 2), Err(RetryError::BaseDelay));
        assert_eq!(RetryPolicy::new(3, 1, DELAY_MS_MAX + 1, 2), Err(RetryError::MaxDelay { max: DELAY_MS_MAX }));
        assert_eq!(RetryPolicy::new(3, 1, 1, 0), Err(RetryError::Multiplier { max: MULTIPLIER_MAX }));
        assert_eq!(RetryPolicy::new(3, 1, 1, MULTIPLIER_MAX + 1), Err(RetryError::Multiplier { max: 16 }));
    }

    #[test]
    fn default_allows_three_attempts() {
        let p = RetryPolicy::default();
        assert_eq!(p, RetryPolicy::new(3, 1_000, 60_000, 2).expect("valid policy"));
        assert!(p.delay_ms(1, 0).is_some());
        assert!(p.delay_ms(2, 0).is_some());
        assert_eq!(p.delay_ms(3, 0), None);
    }

    #[test]
    fn given_repeated_failures_when_asking_for_delays_then_the_cap_grows_then_flattens() {
        let p = RetryPolicy::new(10, 100, 1_000, 3).expect("valid policy");
        let caps: Vec<u64> = (1..=5).map(|n| p.cap_ms(n)).collect();
        assert_eq!(caps, [100, 300, 900, 1_000, 1_000]);
        assert_eq!(p.cap_ms(0), 100, "0 failures is treated like 1");
    }

    #[test]
    fn given_a_cap_when_jitter_varies_then_the_delay_spans_the_upper_half() {
        let p = RetryPolicy::new(5, 1_000, 60_000, 2).expect("valid policy");
        assert_eq!(p.delay_ms(2, 0), Some(1_000));
        assert_eq!(p.delay_ms(2, 1_000), Some(2_000));
        assert_eq!(p.delay_ms(2, 1_001), Some(1_000), "jitter wraps");
        let odd = RetryPolicy::new(5, 3, 60_000, 2).expect("valid policy");
        assert_eq!(odd.delay_ms(1, 0), Some(2), "the fixed half rounds up");
        assert_eq!(odd.delay_ms(1, 1), Some(3));
    }

    #[test]
    fn given_huge_attempt_numbers_when_computing_the_cap_then_it_saturates_at_the_max() {
        let p = RetryPolicy::new(MAX_ATTEMPTS_MAX, 1, DELAY_MS_MAX, MULTIPLIER_MAX).expect("valid policy");
        assert_eq!(p.cap_ms(u32::MAX), DELAY_MS_MAX);
        assert_eq!(p.cap_ms(99), DELAY_MS_MAX);
        let flat = RetryPolicy::new(MAX_ATTEMPTS_MAX, 5, 5, 1).expect("valid policy");
        assert_eq!(flat.cap_ms(u32::MAX), 5);
    }
}
