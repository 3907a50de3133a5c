//! The token bucket that paces carrier label requests (PRODUCT.md §4.9,
//! `shipping.labels_per_minute` and `shipping.label_burst`). When it is empty the
//! shipping service asks [`TokenBucket::ready_at`] when the next batch can go,
//! waits until then, and sends that batch; nothing here reads a clock.
//!
//! The arithmetic is exact: one token is [`UNITS_PER_TOKEN`] (60 000) fixed-point
//! units, so a rate of `per_minute` tokens a minute adds exactly `per_minute`
//! units every millisecond and refill never rounds. Two guarantees follow, and
//! the property tests pin them:
//! - over any window of `W` ms, at most `burst + per_minute * W / 60_000` tokens
//!   are granted (integer division);
//! - a clock that goes backwards never mints tokens: time before the latest
//!   `now` the bucket has seen is never counted twice.
//!
//! ```
//! use orderly_domain::shipping::token_bucket::TokenBucket;
//! use orderly_domain::Timestamp;
//!
//! // Given 60 labels a minute with a burst of 2, starting full.
//! let mut bucket = TokenBucket::new(60, 2, Timestamp(0)).expect("valid limits");
//! // When a batch of 5 asks at once, only the burst is granted.
//! assert_eq!(bucket.try_take(Timestamp(0), 5), 2);
//! // Then the next token is there one second later.
//! assert_eq!(bucket.next_refill_at(Timestamp(0)), Timestamp(1_000));
//! assert_eq!(bucket.try_take(Timestamp(1_000), 5), 1);
//! ```

use crate::time::Timestamp;

/// Fixed-point units in one token: the number of milliseconds in a minute, so
/// that refilling at `per_minute` tokens a minute is exactly `per_minute` units
/// per millisecond.
pub const UNITS_PER_TOKEN: u64 = 60_000;

/// Highest refill rate accepted, in tokens per minute.
pub const PER_MINUTE_MAX: u32 = 1_000_000;

/// Largest burst accepted, in tokens.
pub const BURST_MAX: u32 = 1_000_000;

/// Why a token bucket cannot be built from the given limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenBucketError {
    /// A rate of zero would never refill, so no label could ever be requested.
    #[error("the refill rate must be at least 1 token per minute")]
    ZeroRate,
    /// A burst of zero could never hold a token.
    #[error("the burst must be at least 1 token")]
    ZeroBurst,
    /// The rate is above [`PER_MINUTE_MAX`].
    #[error("the refill rate must be at most {max} tokens per minute")]
    RateTooHigh {
        /// The limit.
        max: u32,
    },
    /// The burst is above [`BURST_MAX`].
    #[error("the burst must be at most {max} tokens")]
    BurstTooHigh {
        /// The limit.
        max: u32,
    },
}

/// A token bucket that refills at `per_minute` tokens a minute up to `burst`
/// tokens. It starts full, so a freshly started service can send one burst.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    per_minute: u32,
    burst: u32,
    /// Tokens held, in [`UNITS_PER_TOKEN`] units; never above `burst` tokens.
    level_units: u64,
    /// The latest `now` the bucket has been refilled to. It never moves back,
    /// which is what keeps a backwards clock from minting tokens.
    refilled_at: Timestamp,
}

impl TokenBucket {
    /// A full bucket refilling at `per_minute` tokens a minute, holding at most `burst`.
    pub fn new(per_minute: u32, burst: u32, now: Timestamp) -> Result<TokenBucket, TokenBucketError> {
        if per_minute == 0 {
            return Err(TokenBucketError::ZeroRate);
        }
        if burst == 0 {
            return Err(TokenBucketError::ZeroBurst);
        }
        if per_minute > PER_MINUTE_MAX {
            return Err(TokenBucketError::RateTooHigh { max: PER_MINUTE_MAX });
        }
        if burst > BURST_MAX {
            return Err(TokenBucketError::BurstTooHigh { max: BURST_MAX });
        }
        let level_units = u64::from(burst) * UNITS_PER_TOKEN;
        Ok(TokenBucket { per_minute, burst, level_units, refilled_at: now })
    }

    /// Takes up to `wanted` tokens at `now` and returns how many were granted
    /// (0 when the bucket is empty). The caller sends that many requests now and
    /// asks [`TokenBucket::ready_at`] when to send the rest.
    pub fn try_take(&mut self, now: Timestamp, wanted: u32) -> u32 {
        self.refill(now);
        let granted = wanted.min(whole_tokens(self.level_units));
        self.level_units -= u64::from(granted) * UNITS_PER_TOKEN;
        debug_assert!(self.level_units <= self.capacity_units(), "a bucket never holds more than its burst");
        granted
    }

    /// Whole tokens that [`TokenBucket::try_take`] would grant at `now`.
    pub fn available(&self, now: Timestamp) -> u32 {
        whole_tokens(self.level_at(now))
    }

    /// When at least one token will be available: `now` if one already is.
    pub fn next_refill_at(&self, now: Timestamp) -> Timestamp {
        self.ready_at(now, 1)
    }

    /// When `tokens` tokens will be available, so the caller can wait once and
    /// send a whole batch: `now` if they already are. Asking for more than the
    /// burst waits for a full bucket; asking for zero is asking for one.
    pub fn ready_at(&self, now: Timestamp, tokens: u32) -> Timestamp {
        let wanted_units = u64::from(tokens.clamp(1, self.burst)) * UNITS_PER_TOKEN;
        let level_units = self.level_at(now);
        if level_units >= wanted_units {
            return now;
        }
        // Refill counts only from the latest time seen, whatever `now` says.
        let from = now.max(self.refilled_at);
        let wait_ms = (wanted_units - level_units).div_ceil(u64::from(self.per_minute));
        from.plus_ms(i64::try_from(wait_ms).unwrap_or(i64::MAX))
    }

    /// The refill rate, in tokens per minute.
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// The most tokens the bucket holds.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    fn capacity_units(&self) -> u64 {
        u64::from(self.burst) * UNITS_PER_TOKEN
    }

    /// The level at `now` without changing state; a `now` before the latest time
    /// seen adds nothing.
    fn level_at(&self, now: Timestamp) -> u64 {
        let elapsed_ms = now.since(self.refilled_at);
        if elapsed_ms <= 0 {
            return self.level_units;
        }
        let added_units = elapsed_ms.unsigned_abs().saturating_mul(u64::from(self.per_minute));
        self.level_units.saturating_add(added_units).min(self.capacity_units())
    }

    fn refill(&mut self, now: Timestamp) {
        self.level_units = self.level_at(now);
        self.refilled_at = self.refilled_at.max(now);
    }
}

fn whole_tokens(units: u64) -> u32 {
    // The level is capped at `burst` tokens, and `burst` is a u32.
    u32::try_from(units / UNITS_PER_TOKEN).expect("the level never exceeds the burst, which fits in u32")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(per_minute: u32, burst: u32) -> TokenBucket {
        TokenBucket::new(per_minute, burst, Timestamp(0)).expect("valid limits")
    }

    #[test]
    fn rejects_limits_that_could_never_grant() {
        assert_eq!(TokenBucket::new(0, 5, Timestamp(0)), Err(TokenBucketError::ZeroRate));
        assert_eq!(TokenBucket::new(5, 0, Timestamp(0)), Err(TokenBucketError::ZeroBurst));
        assert!(matches!(
            TokenBucket::new(PER_MINUTE_MAX + 1, 5, Timestamp(0)),
            Err(TokenBucketError::RateTooHigh { .. })
        ));
        assert!(matches!(TokenBucket::new(5, BURST_MAX + 1, Timestamp(0)), Err(TokenBucketError::BurstTooHigh { .. })));
    }

    #[test]
    fn given_a_full_bucket_when_a_batch_asks_then_only_the_burst_is_granted() {
        let mut b = bucket(60, 10);
        assert_eq!(b.available(Timestamp(0)), 10);
        assert_eq!(b.try_take(Timestamp(0), 25), 10);
        assert_eq!(b.try_take(Timestamp(0), 1), 0);
        assert_eq!(b.available(Timestamp(0)), 0);
    }

    #[test]
    fn given_an_empty_bucket_when_time_passes_then_it_refills_at_the_rate_up_to_the_burst() {
        let mut b = bucket(120, 3);
        b.try_take(Timestamp(0), 3);
        assert_eq!(b.available(Timestamp(499)), 0);
        assert_eq!(b.available(Timestamp(500)), 1);
        assert_eq!(b.available(Timestamp(1_000)), 2);
        assert_eq!(b.available(Timestamp(3_600_000)), 3);
        assert_eq!(b.try_take(Timestamp(3_600_000), 10), 3);
    }

    #[test]
    fn given_a_slow_rate_when_refilling_then_fractions_of_a_token_are_kept() {
        // 7 a minute is one token every 8571.43 ms: exact units must not drift.
        // (A burst of 2 keeps the bucket from ever being full, where refill is discarded.)
        let mut b = bucket(7, 2);
        b.try_take(Timestamp(0), 2);
        let mut granted = 0;
        for step in 1..=60_000 {
            granted += b.try_take(Timestamp(step), 1);
        }
        assert_eq!(granted, 7);
    }

    #[test]
    fn given_an_empty_bucket_when_asking_when_to_wait_then_it_names_the_next_token_or_batch() {
        let mut b = bucket(60, 5);
        b.try_take(Timestamp(10_000), 5);
        assert_eq!(b.next_refill_at(Timestamp(10_000)), Timestamp(11_000));
        assert_eq!(b.next_refill_at(Timestamp(10_400)), Timestamp(11_000));
        assert_eq!(b.ready_at(Timestamp(10_000), 3), Timestamp(13_000));
        assert_eq!(b.ready_at(Timestamp(10_000), 99), Timestamp(15_000), "more than the burst waits for a full bucket");
        assert_eq!(b.next_refill_at(Timestamp(12_000)), Timestamp(12_000), "a token is already there");
        assert_eq!(b.try_take(b.ready_at(Timestamp(10_000), 3), 3), 3);
    }

    #[test]
    fn given_a_clock_that_jumps_back_when_taking_then_no_tokens_are_minted() {
        let mut b = bucket(60, 5);
        assert_eq!(b.try_take(Timestamp(100_000), 5), 5);
        // The clock jumps back a minute: that minute was already counted.
        assert_eq!(b.available(Timestamp(40_000)), 0);
        assert_eq!(b.try_take(Timestamp(40_000), 5), 0);
        // Refill resumes from the latest time seen, not from the jumped-back one.
        assert_eq!(b.try_take(Timestamp(41_000), 5), 0);
        assert_eq!(b.next_refill_at(Timestamp(40_000)), Timestamp(101_000));
        assert_eq!(b.try_take(Timestamp(101_000), 5), 1);
    }

    #[test]
    fn given_extreme_times_when_refilling_then_nothing_overflows() {
        let mut b = TokenBucket::new(PER_MINUTE_MAX, BURST_MAX, Timestamp(i64::MIN)).expect("valid limits");
        assert_eq!(b.try_take(Timestamp(i64::MIN), u32::MAX), BURST_MAX);
        assert_eq!(b.available(Timestamp(i64::MAX)), BURST_MAX);
        assert_eq!(b.try_take(Timestamp(i64::MAX), 1), 1);
        assert_eq!(b.ready_at(Timestamp(i64::MAX), BURST_MAX), Timestamp(i64::MAX));
    }
}
