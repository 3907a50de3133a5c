//! The simulator's shared state: each carrier's scripted faults, seeded RNG
//! and counters, and the label book. Every method takes the lock briefly and
//! never across an `.await`; waiting (latency, held requests) happens in the
//! handlers, interruptible by shutdown.

use super::config::{CARRIERS_MAX, ConfigError, Profile, SimConfig, parse_carrier_name};
use super::labels::{self, Created, LabelBook, LabelError};
use crate::rng::SplitMix64;
use crate::wire::{CarrierSettings, CarrierStats, LabelRequest, SecondCount, SimStats, TrackingInfo};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::watch;
use tokio::time::Instant;

/// How many label creation times each carrier remembers for its stats.
pub const LABEL_TIMES_MAX: usize = 4_096;

/// What a call to a carrier suffers before it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Served normally.
    None,
    /// Answered `503`, for the given reason.
    Unavailable(&'static str),
    /// Held far beyond any client timeout.
    Hold,
}

/// The verdict on one call: latency to add, then the fault to act out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admission {
    pub(crate) latency: Duration,
    pub(crate) fault: Fault,
}

/// State shared by all handlers of one simulator.
#[derive(Debug)]
pub(crate) struct SimState {
    inner: Mutex<Inner>,
    started: Instant,
    stop: watch::Receiver<bool>,
}

#[derive(Debug)]
struct Inner {
    seed: u64,
    carriers: BTreeMap<String, Carrier>,
    book: LabelBook,
}

#[derive(Debug)]
struct Carrier {
    profile: Profile,
    /// When the profile took effect: the origin of its outage window.
    since: Instant,
    rng: SplitMix64,
    stats: CarrierStats,
    label_times_ms: VecDeque<u64>,
}

impl Carrier {
    fn new(seed: u64, name: &str, profile: Profile, since: Instant) -> Carrier {
        let rng = SplitMix64::for_stream(seed, name);
        Carrier { profile, since, rng, stats: CarrierStats::default(), label_times_ms: VecDeque::new() }
    }

    /// Decides what this call suffers. Draws exactly one random number per
    /// call, whatever the verdict, so a seed replays the same sequence.
    fn admit(&mut self, now: Instant) -> Admission {
        let draw = self.rng.next_unit();
        let profile = &self.profile;
        let in_outage = profile.outage.is_some_and(|outage| {
            let start = self.since + Duration::from_millis(outage.after_ms);
            now >= start && now < start + Duration::from_millis(outage.duration_ms)
        });
        let fault = if profile.down {
            Fault::Unavailable("the carrier is down")
        } else if in_outage {
            Fault::Unavailable("the carrier is in a scheduled outage")
        } else if draw < profile.timeout_rate {
            Fault::Hold
        } else if draw < profile.timeout_rate + profile.error_rate {
            Fault::Unavailable("the carrier failed (scripted error)")
        } else {
            Fault::None
        };
        self.stats.requests += 1;
        match fault {
            Fault::Unavailable(_) => self.stats.errors += 1,
            Fault::Hold => self.stats.timeouts += 1,
            Fault::None => {}
        }
        Admission { latency: profile.latency, fault }
    }

    fn record_label(&mut self, time_ms: u64) {
        self.stats.labels_created += 1;
        if self.label_times_ms.len() >= LABEL_TIMES_MAX {
            self.label_times_ms.pop_front();
        }
        self.label_times_ms.push_back(time_ms);
    }

    fn report(&self) -> CarrierStats {
        let label_times_ms: Vec<u64> = self.label_times_ms.iter().copied().collect();
        CarrierStats { labels_per_second: per_second(&label_times_ms), label_times_ms, ..self.stats.clone() }
    }
}

impl SimState {
    /// State for `config`; `stop` turns true when the server shuts down.
    pub(crate) fn new(config: SimConfig, stop: watch::Receiver<bool>) -> SimState {
        let started = Instant::now();
        let (seed, profiles) = config.into_parts();
        let carriers = profiles
            .into_iter()
            .map(|(name, profile)| (name.clone(), Carrier::new(seed, &name, profile, started)))
            .collect();
        let inner = Inner { seed, carriers, book: LabelBook::default() };
        SimState { inner: Mutex::new(inner), started, stop }
    }

    /// Counts a call to `carrier` and decides its fate; `None` if the carrier is unknown.
    pub(crate) fn admit(&self, carrier: &str) -> Option<Admission> {
        let now = Instant::now();
        self.lock().carriers.get_mut(carrier).map(|c| c.admit(now))
    }

    /// Counts a call to `carrier` refused as invalid.
    pub(crate) fn count_rejected(&self, carrier: &str) {
        if let Some(c) = self.lock().carriers.get_mut(carrier) {
            c.stats.rejected += 1;
        }
    }

    /// Creates (or replays) the label for a request to a known carrier.
    pub(crate) fn create_label(&self, request: &LabelRequest) -> Result<Created, LabelError> {
        labels::validate(request)?;
        let time_ms = self.uptime_ms();
        let mut inner = self.lock();
        if let Some(label) = inner.book.replay(request)? {
            if let Some(c) = inner.carriers.get_mut(&request.carrier) {
                c.stats.idempotent_replays += 1;
            }
            return Ok(Created::Replay(label));
        }
        let Inner { carriers, book, .. } = &mut *inner;
        let carrier = carriers
            .get_mut(&request.carrier)
            .ok_or_else(|| LabelError::Invalid(format!("unknown carrier {:?}", request.carrier)))?;
        let cost = labels::price(carrier.profile.base_price, request.weight_g);
        let label = book.create(request, cost, now_rfc3339());
        carrier.record_label(time_ms);
        Ok(Created::New(label))
    }

    /// Tracking information for a known tracking number.
    pub(crate) fn tracking(&self, tracking_number: &str) -> Option<TrackingInfo> {
        self.lock().book.tracking(tracking_number)
    }

    /// Replaces (or adds) a carrier's settings; its outage window restarts now.
    pub(crate) fn set_carrier(&self, name: &str, settings: &CarrierSettings) -> Result<CarrierSettings, ConfigError> {
        let name = parse_carrier_name(name)?;
        let profile = Profile::parse(settings)?;
        let now = Instant::now();
        let mut inner = self.lock();
        let seed = inner.seed;
        if !inner.carriers.contains_key(&name) && inner.carriers.len() >= CARRIERS_MAX {
            return Err(ConfigError::TooManyCarriers);
        }
        let carrier =
            inner.carriers.entry(name.clone()).or_insert_with(|| Carrier::new(seed, &name, profile.clone(), now));
        carrier.profile = profile;
        carrier.since = now;
        Ok(carrier.profile.to_settings())
    }

    /// The settings of every carrier.
    pub(crate) fn carriers(&self) -> BTreeMap<String, CarrierSettings> {
        self.lock().carriers.iter().map(|(name, c)| (name.clone(), c.profile.to_settings())).collect()
    }

    /// The settings of one carrier.
    pub(crate) fn carrier(&self, name: &str) -> Option<CarrierSettings> {
        self.lock().carriers.get(name).map(|c| c.profile.to_settings())
    }

    /// A snapshot of every carrier's counters.
    pub(crate) fn stats(&self) -> SimStats {
        let uptime_ms = self.uptime_ms();
        let carriers = self.lock().carriers.iter().map(|(name, c)| (name.clone(), c.report())).collect();
        SimStats { uptime_ms, carriers }
    }

    /// Waits `duration`, or less if the server shuts down; true if the whole
    /// duration passed.
    pub(crate) async fn pause(&self, duration: Duration) -> bool {
        if duration.is_zero() {
            return true;
        }
        let mut stop = self.stop.clone();
        tokio::select! {
            () = tokio::time::sleep(duration) => true,
            _ = stop.wait_for(|stopped| *stopped) => false,
        }
    }

    fn uptime_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug already reported; the data
        // stays consistent because every update is a few field writes.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Counts of `times_ms` (ascending) per whole second.
fn per_second(times_ms: &[u64]) -> Vec<SecondCount> {
    let mut counts: Vec<SecondCount> = Vec::new();
    for second in times_ms.iter().map(|t| t / 1000) {
        match counts.last_mut() {
            Some(last) if last.second == second => last.count += 1,
            _ => counts.push(SecondCount { second, count: 1 }),
        }
    }
    counts
}

fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc();
    let now = now.replace_millisecond(now.millisecond()).unwrap_or(now);
    now.format(&Rfc3339).unwrap_or_else(|_| now.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_second_groups_times() {
        let counts = per_second(&[0, 10, 999, 1000, 3500]);
        let expected = [
            SecondCount { second: 0, count: 3 },
            SecondCount { second: 1, count: 1 },
            SecondCount { second: 3, count: 1 },
        ];
        assert_eq!(counts, expected);
    }

    #[test]
    fn created_at_is_rfc3339_utc() {
        let text = now_rfc3339();
        let bytes = text.as_bytes();
        assert!(text.ends_with('Z'), "{text}");
        assert!(bytes.len() >= 20 && bytes[4] == b'-' && bytes[10] == b'T' && bytes[13] == b':', "{text}");
    }
}
