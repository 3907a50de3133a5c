//! A circuit breaker, one per downstream (a carrier, a webhook endpoint, the
//! broker; PRODUCT.md §4.12). It stops calling a downstream that keeps failing,
//! and after a cooldown lets a single probe through to learn whether it is back.
//!
//! ```text
//!            failure_threshold consecutive failures
//!   Closed ─────────────────────────────────────────▶ Open{until = now + cooldown}
//!     ▲                                               │  ▲
//!     │ probe succeeds                 cooldown passes │  │ probe fails
//!     │                                               ▼  │
//!     └──────────────────────────────────────────── HalfOpen{probe_in_flight}
//! ```
//!
//! The caller's contract: every [`CircuitBreaker::allow`] that returns `true` is
//! followed by exactly one [`CircuitBreaker::on_success`] or
//! [`CircuitBreaker::on_failure`] (a timeout is a failure). Results that arrive
//! while the breaker is open, or half-open with no probe out, belong to calls
//! admitted before it opened; they are stale and ignored, so a late success
//! cannot skip the probe and a late failure cannot stretch the cooldown.
//!
//! ```
//! use orderly_domain::shipping::breaker::{BreakerConfig, CircuitBreaker};
//! use orderly_domain::Timestamp;
//!
//! let config = BreakerConfig::new(2, 30_000).expect("valid config");
//! let mut breaker = CircuitBreaker::new(config);
//! breaker.on_failure(Timestamp(0));
//! breaker.on_failure(Timestamp(10));
//! assert_eq!(breaker.state_name(), "open");
//! assert!(!breaker.allow(Timestamp(29_999)));
//! assert!(breaker.allow(Timestamp(30_010)), "one probe after the cooldown");
//! assert!(!breaker.allow(Timestamp(30_011)), "and only one");
//! breaker.on_success(Timestamp(30_500));
//! assert_eq!(breaker.state_name(), "closed");
//! ```

use crate::time::Timestamp;
use serde::Serialize;

/// Default number of consecutive failures that opens the breaker.
pub const FAILURE_THRESHOLD_DEFAULT: u32 = 5;

/// Default time an open breaker waits before letting a probe through.
pub const COOLDOWN_MS_DEFAULT: u64 = 30_000;

/// Largest failure threshold accepted.
pub const FAILURE_THRESHOLD_MAX: u32 = 1_000;

/// Longest cooldown accepted: one day.
pub const COOLDOWN_MS_MAX: u64 = 86_400_000;

/// Why a breaker configuration is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BreakerError {
    /// The threshold is zero (the breaker would open before any call) or above
    /// [`FAILURE_THRESHOLD_MAX`].
    #[error("failure_threshold must be between 1 and {max}")]
    FailureThreshold {
        /// The limit.
        max: u32,
    },
    /// The cooldown is zero (the breaker would never hold off) or above [`COOLDOWN_MS_MAX`].
    #[error("cooldown_ms must be between 1 and {max}")]
    Cooldown {
        /// The limit.
        max: u64,
    },
}

/// How a breaker decides to open and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BreakerConfig {
    failure_threshold: u32,
    cooldown_ms: u64,
}

impl BreakerConfig {
    /// A configuration, validated against the limits.
    pub fn new(failure_threshold: u32, cooldown_ms: u64) -> Result<BreakerConfig, BreakerError> {
        if !(1..=FAILURE_THRESHOLD_MAX).contains(&failure_threshold) {
            return Err(BreakerError::FailureThreshold { max: FAILURE_THRESHOLD_MAX });
        }
        if !(1..=COOLDOWN_MS_MAX).contains(&cooldown_ms) {
            return Err(BreakerError::Cooldown { max: COOLDOWN_MS_MAX });
        }
        Ok(BreakerConfig { failure_threshold, cooldown_ms })
    }

    /// Consecutive failures that open the breaker.
    pub fn failure_threshold(&self) -> u32 {
        self.failure_threshold
    }

    /// How long the breaker stays open before a probe, in milliseconds.
    pub fn cooldown_ms(&self) -> u64 {
        self.cooldown_ms
    }
}

impl Default for BreakerConfig {
    /// Five failures, thirty seconds.
    fn default() -> BreakerConfig {
        BreakerConfig { failure_threshold: FAILURE_THRESHOLD_DEFAULT, cooldown_ms: COOLDOWN_MS_DEFAULT }
    }
}

/// Where a breaker is. Serializes as `{"state":"open","until":…}` for the ops summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls flow; failures in a row are counted.
    Closed {
        /// Failures since the last success.
        consecutive_failures: u32,
    },
    /// Calls are refused until `until`.
    Open {
        /// When the cooldown ends.
        until: Timestamp,
    },
    /// The cooldown has passed; one probe may go out to test the downstream.
    HalfOpen {
        /// Whether the probe has been admitted and its result is awaited.
        probe_in_flight: bool,
    },
}

impl BreakerState {
    /// `"closed"`, `"open"` or `"half_open"`: the metric label and summary name.
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed { .. } => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }
}

/// A circuit breaker for one downstream. Serializes as its state plus its config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CircuitBreaker {
    #[serde(flatten)]
    state: BreakerState,
    config: BreakerConfig,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> CircuitBreaker {
        CircuitBreaker { state: BreakerState::Closed { consecutive_failures: 0 }, config }
    }

    /// Whether a call may go out at `now`. Closed: yes. Open: no until the
    /// cooldown has passed, then the breaker half-opens and this call is the
    /// probe. Half-open with the probe out: no.
    pub fn allow(&mut self, now: Timestamp) -> bool {
        self.refresh(now);
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { .. } | BreakerState::HalfOpen { probe_in_flight: true } => false,
            BreakerState::HalfOpen { probe_in_flight: false } => {
                self.state = BreakerState::HalfOpen { probe_in_flight: true };
                true
            }
        }
    }

    /// Records a successful call: the breaker closes and the failure count resets.
    /// Ignored while open or half-open with no probe out (a stale result).
    pub fn on_success(&mut self, _now: Timestamp) {
        match self.state {
            BreakerState::Closed { .. } | BreakerState::HalfOpen { probe_in_flight: true } => {
                self.state = BreakerState::Closed { consecutive_failures: 0 };
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen { probe_in_flight: false } => {}
        }
    }

    /// Records a failed call (a timeout counts). Closed: counts it and opens at
    /// the threshold. Half-open with the probe out: the probe failed, so the
    /// breaker opens for another cooldown. Otherwise ignored (a stale result).
    pub fn on_failure(&mut self, now: Timestamp) {
        match self.state {
            BreakerState::Closed { consecutive_failures } => {
                let consecutive_failures = consecutive_failures.saturating_add(1);
                self.state = if consecutive_failures >= self.config.failure_threshold {
                    self.open_state(now)
                } else {
                    BreakerState::Closed { consecutive_failures }
                };
            }
            BreakerState::HalfOpen { probe_in_flight: true } => self.state = self.open_state(now),
            BreakerState::Open { .. } | BreakerState::HalfOpen { probe_in_flight: false } => {}
        }
    }

    /// Moves an open breaker whose cooldown has passed to half-open (no probe out
    /// yet), so metrics read `half_open` before the next call. [`CircuitBreaker::allow`]
    /// does this itself.
    pub fn refresh(&mut self, now: Timestamp) {
        if let BreakerState::Open { until } = self.state
            && now >= until
        {
            self.state = BreakerState::HalfOpen { probe_in_flight: false };
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// `"closed"`, `"open"` or `"half_open"`, for metrics and the ops summary.
    pub fn state_name(&self) -> &'static str {
        self.state.name()
    }

    /// The configuration.
    pub fn config(&self) -> BreakerConfig {
        self.config
    }

    fn open_state(&self, now: Timestamp) -> BreakerState {
        // The cooldown is at most a day, so it always fits in i64.
        let cooldown_ms = i64::try_from(self.config.cooldown_ms).expect("cooldown_ms is at most COOLDOWN_MS_MAX");
        BreakerState::Open { until: now.plus_ms(cooldown_ms) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32) -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig::new(threshold, 1_000).expect("valid config"))
    }

    fn opened_at(at: i64) -> CircuitBreaker {
        let mut b = breaker(1);
        b.on_failure(Timestamp(at));
        assert_eq!(b.state(), BreakerState::Open { until: Timestamp(at + 1_000) });
        b
    }

    #[test]
    fn config_defaults_and_limits() {
        let d = BreakerConfig::default();
        assert_eq!((d.failure_threshold(), d.cooldown_ms()), (5, 30_000));
        assert!(matches!(BreakerConfig::new(0, 1), Err(BreakerError::FailureThreshold { .. })));
        assert!(matches!(BreakerConfig::new(FAILURE_THRESHOLD_MAX + 1, 1), Err(BreakerError::FailureThreshold { .. })));
        assert!(matches!(BreakerConfig::new(1, 0), Err(BreakerError::Cooldown { .. })));
        assert!(matches!(BreakerConfig::new(1, COOLDOWN_MS_MAX + 1), Err(BreakerError::Cooldown { .. })));
    }

    #[test]
    fn given_a_closed_breaker_when_failures_stay_below_the_threshold_then_calls_flow() {
        let mut b = breaker(3);
        b.on_failure(Timestamp(0));
        b.on_failure(Timestamp(1));
        assert_eq!(b.state(), BreakerState::Closed { consecutive_failures: 2 });
        assert!(b.allow(Timestamp(2)));
    }

    #[test]
    fn given_a_closed_breaker_when_a_success_interrupts_failures_then_the_count_resets() {
        let mut b = breaker(3);
        b.on_failure(Timestamp(0));
        b.on_failure(Timestamp(1));
        b.on_success(Timestamp(2));
        b.on_failure(Timestamp(3));
        assert_eq!(b.state(), BreakerState::Closed { consecutive_failures: 1 });
    }

    #[test]
    fn given_a_closed_breaker_when_failures_reach_the_threshold_then_it_opens_for_the_cooldown() {
        let mut b = breaker(3);
        for t in 0..3 {
            b.on_failure(Timestamp(t));
        }
        assert_eq!(b.state(), BreakerState::Open { until: Timestamp(1_002) });
        assert_eq!(b.state_name(), "open");
        assert!(!b.allow(Timestamp(1_001)));
    }

    #[test]
    fn given_an_open_breaker_when_the_cooldown_passes_then_exactly_one_probe_goes_out() {
        let mut b = opened_at(0);
        b.refresh(Timestamp(1_000));
        assert_eq!(b.state(), BreakerState::HalfOpen { probe_in_flight: false });
        assert_eq!(b.state_name(), "half_open");
        assert!(b.allow(Timestamp(1_000)));
        assert_eq!(b.state(), BreakerState::HalfOpen { probe_in_flight: true });
        assert!(!b.allow(Timestamp(1_001)));
        assert!(!b.allow(Timestamp(900_000)), "the probe's result is awaited, however long");
    }

    #[test]
    fn given_a_probe_out_when_it_succeeds_then_the_breaker_closes() {
        let mut b = opened_at(0);
        assert!(b.allow(Timestamp(1_500)));
        b.on_success(Timestamp(1_600));
        assert_eq!(b.state(), BreakerState::Closed { consecutive_failures: 0 });
        assert!(b.allow(Timestamp(1_601)));
    }

    #[test]
    fn given_a_probe_out_when_it_fails_then_the_breaker_reopens_for_another_cooldown() {
        let mut b = opened_at(0);
        assert!(b.allow(Timestamp(1_500)));
        b.on_failure(Timestamp(1_600));
        assert_eq!(b.state(), BreakerState::Open { until: Timestamp(2_600) });
        assert!(!b.allow(Timestamp(2_599)));
        assert!(b.allow(Timestamp(2_600)));
    }

    #[test]
    fn given_an_open_breaker_when_stale_results_arrive_then_they_change_nothing() {
        let mut b = opened_at(0);
        b.on_success(Timestamp(10));
        b.on_failure(Timestamp(20));
        assert_eq!(b.state(), BreakerState::Open { until: Timestamp(1_000) });
        b.refresh(Timestamp(1_000));
        b.on_success(Timestamp(1_001));
        b.on_failure(Timestamp(1_002));
        assert_eq!(b.state(), BreakerState::HalfOpen { probe_in_flight: false });
    }

    #[test]
    fn given_a_clock_that_jumps_back_when_open_then_calls_stay_refused() {
        let mut b = opened_at(5_000);
        assert!(!b.allow(Timestamp(0)));
        assert_eq!(b.state_name(), "open");
    }

    #[test]
    fn serializes_state_and_config_for_display() {
        let b = opened_at(0);
        let json = serde_json::to_value(&b).expect("serializable");
        assert_eq!(
            json,
            serde_json::json!({"state": "open", "until": "1970-01-01T00:00:01.000Z", "config": {"failure_threshold": 1, "cooldown_ms": 1000}})
        );
    }
}
