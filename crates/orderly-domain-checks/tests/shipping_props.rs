//! Property tests for the shipping policies: the token bucket's rate bound, the
//! circuit breaker's open/half-open guarantees, the retry delay bounds, and the
//! rate table parser (never panics, round-trips, prices by the right bracket).

use orderly_domain::shipping::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use orderly_domain::shipping::carrier_routing::CarrierId;
use orderly_domain::shipping::rates::{HEADER, RateBook, RateBookError, RateTable};
use orderly_domain::shipping::retry::RetryPolicy;
use orderly_domain::shipping::token_bucket::TokenBucket;
use orderly_domain::{Money, Timestamp, Zone};
use proptest::collection::vec;
use proptest::prelude::*;
use std::collections::BTreeMap;

// ---------------------------------------------------------------- token bucket

/// A step of elapsed time: mostly short, sometimes long enough to refill fully.
fn forward_ms() -> impl Strategy<Value = i64> {
    prop_oneof![4 => 0i64..=5_000, 1 => 0i64..=600_000]
}

proptest! {
    #[test]
    fn token_bucket_grants_at_most_burst_plus_rate_in_any_window(
        per_minute in 1u32..=600,
        burst in 1u32..=50,
        start_ms in -1_000_000_000i64..1_000_000_000,
        steps in vec((forward_ms(), 0u32..=20), 1..120),
    ) {
        let mut bucket = TokenBucket::new(per_minute, burst, Timestamp(start_ms)).expect("valid limits");
        let mut now_ms = start_ms;
        let mut grants = Vec::with_capacity(steps.len());
        for (elapsed_ms, wanted) in steps {
            now_ms += elapsed_ms;
            let granted = bucket.try_take(Timestamp(now_ms), wanted);
            prop_assert!(granted <= wanted);
            prop_assert!(bucket.available(Timestamp(now_ms)) <= burst);
            grants.push((now_ms, u64::from(granted)));
        }
        // Every window [a, b] holds the same takes as the window from its first to
        // its last take, which is the tightest, so checking those covers all windows.
        for first in 0..grants.len() {
            let mut granted = 0;
            for &(at_ms, count) in &grants[first..] {
                granted += count;
                let window_ms = u64::try_from(at_ms - grants[first].0).expect("time is non-decreasing");
                let bound = u64::from(burst) + u64::from(per_minute) * window_ms / 60_000;
                prop_assert!(granted <= bound, "granted {} in {} ms, bound {}", granted, window_ms, bound);
            }
        }
    }

    #[test]
    fn token_bucket_never_mints_tokens_when_the_clock_goes_backwards(
        per_minute in 1u32..=600,
        burst in 1u32..=50,
        steps in vec((-120_000i64..=5_000, 0u32..=20), 1..120),
    ) {
        let mut bucket = TokenBucket::new(per_minute, burst, Timestamp(0)).expect("valid limits");
        let (mut now_ms, mut latest_ms, mut granted) = (0i64, 0i64, 0u64);
        for (elapsed_ms, wanted) in steps {
            now_ms += elapsed_ms;
            if now_ms <= latest_ms {
                // Time already counted adds nothing, however far back the clock is.
                prop_assert_eq!(bucket.available(Timestamp(now_ms)), bucket.available(Timestamp(latest_ms)));
            }
            granted += u64::from(bucket.try_take(Timestamp(now_ms), wanted));
            latest_ms = latest_ms.max(now_ms);
        }
        let elapsed_ms = u64::try_from(latest_ms).expect("latest is at least the start");
        prop_assert!(granted <= u64::from(burst) + u64::from(per_minute) * elapsed_ms / 60_000);
    }

    #[test]
    fn token_bucket_ready_at_is_the_exact_moment_a_batch_fits(
        per_minute in 1u32..=600,
        burst in 1u32..=50,
        taken in 0u32..=50,
        waited_ms in 0i64..=120_000,
        batch in 0u32..=60,
    ) {
        let mut bucket = TokenBucket::new(per_minute, burst, Timestamp(0)).expect("valid limits");
        bucket.try_take(Timestamp(0), taken);
        let now = Timestamp(waited_ms);
        let wanted = batch.clamp(1, burst);
        let ready = bucket.ready_at(now, batch);
        prop_assert!(ready >= now);
        prop_assert!(bucket.available(ready) >= wanted);
        if ready > now {
            prop_assert!(bucket.available(ready.plus_ms(-1)) < wanted, "not a millisecond later than needed");
        }
        let next = bucket.next_refill_at(now);
        prop_assert!(bucket.available(next) >= 1);
    }
}

// -------------------------------------------------------------------- breaker

#[derive(Debug, Clone, Copy)]
enum BreakerOp {
    Allow,
    Success,
    Failure,
}

fn breaker_op() -> impl Strategy<Value = BreakerOp> {
    prop_oneof![3 => Just(BreakerOp::Allow), 1 => Just(BreakerOp::Success), 3 => Just(BreakerOp::Failure)]
}

proptest! {
    #[test]
    fn breaker_never_allows_while_open_and_lets_exactly_one_probe_through(
        threshold in 1u32..=5,
        cooldown_ms in 1u64..=30_000,
        ops in vec((breaker_op(), prop_oneof![5 => 0i64..=10_000, 1 => -10_000i64..0]), 1..200),
    ) {
        let mut breaker = CircuitBreaker::new(BreakerConfig::new(threshold, cooldown_ms).expect("valid config"));
        let mut now_ms = 0i64;
        // Failures since the breaker last closed, counted by the test itself.
        let mut failures_while_closed = 0u32;
        for (op, elapsed_ms) in ops {
            now_ms += elapsed_ms;
            let now = Timestamp(now_ms);
            let before = breaker.state();
            match op {
                BreakerOp::Allow => {
                    let allowed = breaker.allow(now);
                    match before {
                        BreakerState::Closed { .. } => prop_assert!(allowed),
                        BreakerState::Open { until } if now < until => prop_assert!(!allowed, "open before cooldown"),
                        // The first call after the cooldown is the one probe.
                        BreakerState::Open { .. } | BreakerState::HalfOpen { probe_in_flight: false } => {
                            prop_assert!(allowed);
                            prop_assert_eq!(breaker.state(), BreakerState::HalfOpen { probe_in_flight: true });
                        }
                        BreakerState::HalfOpen { probe_in_flight: true } => prop_assert!(!allowed, "a second probe"),
                    }
                }
                BreakerOp::Success => {
                    breaker.on_success(now);
                    if matches!(before, BreakerState::Closed { .. } | BreakerState::HalfOpen { probe_in_flight: true }) {
                        prop_assert_eq!(breaker.state(), BreakerState::Closed { consecutive_failures: 0 });
                        failures_while_closed = 0;
                    } else {
                        prop_assert_eq!(breaker.state(), before, "a stale success changes nothing");
                    }
                }
                BreakerOp::Failure => {
                    breaker.on_failure(now);
                    if let BreakerState::Closed { .. } = before {
                        failures_while_closed += 1;
                    }
                    let opened = BreakerState::Open { until: now.plus_ms(cooldown_ms as i64) };
                    match before {
                        BreakerState::Closed { .. } if failures_while_closed >= threshold => {
                            prop_assert_eq!(breaker.state(), opened);
                            failures_while_closed = 0;
                        }
                        BreakerState::Closed { .. } => prop_assert_eq!(
                            breaker.state(),
                            BreakerState::Closed { consecutive_failures: failures_while_closed }
                        ),
                        BreakerState::HalfOpen { probe_in_flight: true } => prop_assert_eq!(breaker.state(), opened),
                        _ => prop_assert_eq!(breaker.state(), before, "a stale failure changes nothing"),
                    }
                }
            }
            prop_assert_eq!(breaker.state_name(), breaker.state().name());
        }
    }
}

// ---------------------------------------------------------------------- retry

proptest! {
    #[test]
    fn retry_delays_stay_in_the_upper_half_of_a_non_decreasing_cap(
        max_attempts in 1u32..=100,
        // Small delays too, so the jitter range's edges are hit often.
        base_delay_ms in prop_oneof![1u64..=8, 1u64..=10_000],
        extra_ms in prop_oneof![0u64..=8, 0u64..=100_000],
        multiplier in 1u32..=16,
        failed_attempts in 0u32..=110,
        jitter in prop_oneof![0u64..=16, any::<u64>()],
    ) {
        let max_delay_ms = base_delay_ms + extra_ms;
        let policy = RetryPolicy::new(max_attempts, base_delay_ms, max_delay_ms, multiplier).expect("valid policy");
        let cap_ms = policy.cap_ms(failed_attempts);
        prop_assert!((base_delay_ms..=max_delay_ms).contains(&cap_ms));
        prop_assert!(cap_ms <= policy.cap_ms(failed_attempts.saturating_add(1)), "the cap never shrinks");
        match policy.delay_ms(failed_attempts, jitter) {
            None => prop_assert!(failed_attempts >= max_attempts, "gave up early"),
            Some(delay_ms) => {
                prop_assert!(failed_attempts < max_attempts, "retried past the limit");
                prop_assert!(delay_ms >= cap_ms - cap_ms / 2 && delay_ms <= cap_ms, "{} outside the cap {}", delay_ms, cap_ms);
            }
        }
    }
}

// ---------------------------------------------------------------------- rates

/// Fragments that make near-valid rate files, to reach past the preamble checks.
fn rate_fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("version".to_owned()),
        Just("2026-11-01.1".to_owned()),
        Just(HEADER.to_owned()),
        Just("fastship".to_owned()),
        Just("EU".to_owned()),
        Just(",".to_owned()),
        Just("\n".to_owned()),
        Just("\r\n".to_owned()),
        Just("#".to_owned()),
        Just("\u{feff}".to_owned()),
        Just("é".to_owned()),
        "-?[0-9]{0,12}(\\.[0-9]{0,3})?",
        "\\PC{0,8}",
    ]
}

proptest! {
    #[test]
    fn rate_parse_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = RateTable::parse(&text);
    }

    #[test]
    fn rate_parse_never_panics_on_near_valid_text(parts in vec(rate_fragment(), 0..80)) {
        let text = parts.concat();
        let _ = RateTable::parse(&text);
        let _ = RateTable::parse(&format!("version,2026-11-01.1\n{HEADER}\n{text}"));
    }
}

/// Brackets per (carrier, zone): weight → price in minor units.
type Model = BTreeMap<(String, String), BTreeMap<u32, i64>>;

fn model() -> impl Strategy<Value = Model> {
    let key = ("(fastship|slowpost|cargo-1)", "(EU|US|APAC)");
    let brackets = prop::collection::btree_map(1u32..=1_000_000, 0i64..=10_000_000, 1..6);
    prop::collection::btree_map(key, brackets, 1..6)
}

fn write_file(version: &str, model: &Model) -> String {
    let mut text = format!("# generated\nversion,{version}\n{HEADER}\n");
    for ((carrier, zone), brackets) in model {
        for (weight_g, price_minor) in brackets {
            text.push_str(&format!("{carrier},{zone},{weight_g},{}\n", Money::from_minor(*price_minor)));
        }
    }
    text
}

proptest! {
    #[test]
    fn rate_tables_round_trip_and_price_by_the_smallest_fitting_bracket(
        model in model(),
        revision in 1u32..=9_999,
        weight_g in 0u32..=1_100_000,
    ) {
        let version = format!("2026-11-01.{revision}");
        let table = RateTable::parse(&write_file(&version, &model)).expect("a generated table is valid");
        prop_assert_eq!(table.version().to_string(), version);
        let rendered = table.render();
        let reparsed = RateTable::parse(&rendered).expect("a rendered table is valid");
        prop_assert_eq!(&reparsed, &table);
        prop_assert_eq!(reparsed.render(), rendered);
        // Probe a random weight and both sides of every bracket bound.
        let bounds = model.values().flat_map(|brackets| brackets.keys().copied());
        let probes: Vec<u32> = bounds.flat_map(|w| [w - 1, w, w + 1]).chain([weight_g]).collect();
        for ((carrier, zone), brackets) in &model {
            let carrier = CarrierId::parse(carrier.as_str()).expect("generated id");
            let zone = Zone::parse(zone.as_str()).expect("generated zone");
            for &probe_g in &probes {
                let expected = brackets.range(probe_g..).next().map(|(_, minor)| Money::from_minor(*minor));
                prop_assert_eq!(table.price(&carrier, &zone, probe_g), expected, "{} g", probe_g);
            }
        }
    }

    #[test]
    fn rate_book_only_moves_forward(uploads in vec((1u32..=30, any::<bool>()), 1..20)) {
        let rows = "fastship,EU,1000,4.95\n";
        let initial = RateTable::parse(&format!("version,2026-11-01.15\n{HEADER}\n{rows}")).expect("valid table");
        let mut book = RateBook::new(initial);
        for (revision, activate) in uploads {
            let before = book.clone();
            let table = RateTable::parse(&format!("version,2026-11-01.{revision}\n{HEADER}\n{rows}")).expect("valid table");
            let uploaded = table.version();
            match book.upload(table) {
                Ok(()) => prop_assert!(uploaded > before.latest_version()),
                Err(RateBookError::NotNewer { latest, .. }) => {
                    prop_assert!(uploaded <= latest);
                    prop_assert_eq!(&book, &before, "a refused upload changes nothing");
                }
            }
            if activate {
                let active_before = book.active().version();
                book.activate_pending();
                prop_assert!(book.active().version() >= active_before);
                prop_assert!(book.pending().is_none());
            }
        }
    }
}
