//! The JSON shapes spoken between a carrier label API and its clients: label
//! requests and labels, tracking answers, the simulator's admin settings and
//! statistics, and the RFC 9457 problem body used for every error.
//!
//! These are plain data at the edge; the simulator parses them into validated
//! internal types before acting on them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A request for one shipping label (`POST /v1/labels`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LabelRequest {
    /// The carrier asked for, e.g. `fastship`.
    pub carrier: String,
    /// The caller's shipment id; echoed on tracking.
    pub shipment_id: String,
    /// Destination zone, e.g. `EU`.
    pub zone: String,
    /// Parcel weight in grams.
    pub weight_g: u32,
    /// The same key always yields the same label, and is charged once.
    pub idempotency_key: String,
}

/// A label the carrier created (`201` answer to `POST /v1/labels`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Label {
    /// The carrier's tracking number.
    pub tracking_number: String,
    /// The carrier that created the label.
    pub carrier: String,
    /// The price charged, a decimal string such as `"4.95"`.
    pub cost: String,
    /// When the label was created, RFC 3339 UTC.
    pub created_at: String,
    /// The carrier's id for the label document.
    pub label_id: String,
}

/// What `GET /v1/tracking/{tracking_number}` answers: the label plus what it
/// was created for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TrackingInfo {
    /// The carrier's tracking number.
    pub tracking_number: String,
    /// The carrier that created the label.
    pub carrier: String,
    /// The price charged, a decimal string.
    pub cost: String,
    /// When the label was created, RFC 3339 UTC.
    pub created_at: String,
    /// The carrier's id for the label document.
    pub label_id: String,
    /// The caller's shipment id.
    pub shipment_id: String,
    /// Destination zone.
    pub zone: String,
    /// Parcel weight in grams.
    pub weight_g: u32,
    /// Parcel status; the simulator only knows `label_created`.
    pub status: String,
}

/// Scripted behaviour of one simulated carrier (`PUT /admin/carriers/{carrier}`).
///
/// A `PUT` replaces all settings; fields left out take their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CarrierSettings {
    /// Latency added to every label and tracking call, in milliseconds.
    pub latency_ms: u64,
    /// Probability in `[0, 1]` that a call answers `503`.
    pub error_rate: f64,
    /// Probability in `[0, 1]` that a call is held far beyond any client
    /// timeout. `error_rate + timeout_rate` must not exceed 1.
    pub timeout_rate: f64,
    /// When true every call answers `503`.
    pub down: bool,
    /// A window during which the carrier is down, measured from when these
    /// settings took effect (server start, or the `PUT`).
    pub outage: Option<Outage>,
    /// Price of a label up to 1 kg, a decimal string such as `"4.95"`.
    pub base_price: String,
}

impl Default for CarrierSettings {
    fn default() -> Self {
        CarrierSettings {
            latency_ms: 0,
            error_rate: 0.0,
            timeout_rate: 0.0,
            down: false,
            outage: None,
            base_price: DEFAULT_BASE_PRICE.to_owned(),
        }
    }
}

/// The label price of a carrier whose settings name none.
pub const DEFAULT_BASE_PRICE: &str = "4.95";

/// A down window `[start + after_ms, start + after_ms + duration_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// Delay from the settings taking effect to the outage start.
    pub after_ms: u64,
    /// Length of the outage.
    pub duration_ms: u64,
}

/// Everything `GET /admin/stats` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Milliseconds since the simulator started; `label_times_ms` use the same origin.
    pub uptime_ms: u64,
    /// Per carrier name.
    pub carriers: BTreeMap<String, CarrierStats>,
}

/// Counters of one simulated carrier.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarrierStats {
    /// Label and tracking calls addressed to this carrier.
    pub requests: u64,
    /// Labels created (idempotent replays excluded: they are not charged).
    pub labels_created: u64,
    /// Label requests answered with an existing label for a known key.
    pub idempotent_replays: u64,
    /// Calls answered `503` (scripted errors, `down`, outages).
    pub errors: u64,
    /// Calls held to simulate a timeout.
    pub timeouts: u64,
    /// Calls refused as invalid (`4xx` other than unknown carrier).
    pub rejected: u64,
    /// Creation times of the most recent labels, milliseconds since simulator
    /// start, oldest first (a bounded ring: the oldest fall off).
    pub label_times_ms: Vec<u64>,
    /// Labels created per second since simulator start, from `label_times_ms`;
    /// only seconds with at least one label appear.
    pub labels_per_second: Vec<SecondCount>,
}

impl CarrierStats {
    /// The largest number of recorded labels created within any window of
    /// `window_ms` milliseconds: what a client's rate limit must keep small.
    pub fn max_labels_in_window(&self, window_ms: u64) -> usize {
        let times = &self.label_times_ms;
        let mut best = 0;
        let mut start = 0;
        for (end, &t) in times.iter().enumerate() {
            while t.saturating_sub(times[start]) >= window_ms {
                start += 1;
            }
            best = best.max(end + 1 - start);
        }
        best
    }
}

/// How many labels were created during one second of simulator uptime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondCount {
    /// Whole seconds since simulator start.
    pub second: u64,
    /// Labels created during that second.
    pub count: u64,
}

/// An RFC 9457 problem body (`application/problem+json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// A stable identifier of the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short human summary of the kind.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
}
