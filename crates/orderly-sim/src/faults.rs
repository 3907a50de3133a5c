//! The faults the simulator injects (PRODUCT.md §6), how `--faults` names
//! them, and the per-kind counts a run reports.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// An event is delivered again: an ack lost after the consumer committed,
    /// a copy inside a batch, a carrier callback or a scanner confirmation sent twice.
    Duplicate,
    /// A delivered batch is reordered across subjects (each subject keeps its order).
    Reorder,
    /// Delivery is held back for a while, or only a prefix of the backlog is delivered.
    Delay,
    /// A service process dies (between batches, mid-commit, or after a commit
    /// whose acks are lost) and restarts later from its durable state.
    Crash,
    /// A service's store fails its next commits (the batch is rolled back).
    CommitFailure,
    /// The broker answers every poll of a subscription with an error for a while.
    BrokerOutage,
    /// A carrier answers after the call timeout (sometimes having made the label).
    CarrierTimeout,
    /// A carrier answers with errors (5xx) for a while.
    CarrierError,
    /// A carrier refuses every call for a while.
    CarrierOutage,
    /// The webhook endpoint fails, times out (sometimes after accepting) or is down.
    WebhookFailure,
    /// Wall time jumps forward (minutes) or back (seconds).
    ClockJump,
    /// Many cart holds are made, then the clock jumps past their expiry.
    HoldStampede,
    /// Many orders for one hot SKU arrive in the same step.
    FlashSale,
    /// Orders are canceled while allocated, picking or packed.
    CancelMidFlow,
    /// A picker finds fewer units than the task asks for.
    ShortPick,
}

impl FaultKind {
    /// Every kind, in report order.
    pub const ALL: [FaultKind; 15] = [
        FaultKind::Duplicate,
        FaultKind::Reorder,
        FaultKind::Delay,
        FaultKind::Crash,
        FaultKind::CommitFailure,
        FaultKind::BrokerOutage,
        FaultKind::CarrierTimeout,
        FaultKind::CarrierError,
        FaultKind::CarrierOutage,
        FaultKind::WebhookFailure,
        FaultKind::ClockJump,
        FaultKind::HoldStampede,
        FaultKind::FlashSale,
        FaultKind::CancelMidFlow,
        FaultKind::ShortPick,
    ];

    /// The name `--faults` uses.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Duplicate => "duplicate",
            FaultKind::Reorder => "reorder",
            FaultKind::Delay => "delay",
            FaultKind::Crash => "crash",
            FaultKind::CommitFailure => "commit_failure",
            FaultKind::BrokerOutage => "broker_outage",
            FaultKind::CarrierTimeout => "carrier_timeout",
            FaultKind::CarrierError => "carrier_error",
            FaultKind::CarrierOutage => "carrier_outage",
            FaultKind::WebhookFailure => "webhook_failure",
            FaultKind::ClockJump => "clock_jump",
            FaultKind::HoldStampede => "hold_stampede",
            FaultKind::FlashSale => "flash_sale",
            FaultKind::CancelMidFlow => "cancel_mid_flow",
            FaultKind::ShortPick => "short_pick",
        }
    }

    /// Parses a name (`-` and `_` are the same).
    pub fn parse(s: &str) -> Option<FaultKind> {
        let s = s.trim().replace('-', "_");
        FaultKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a `--faults` list did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultSetError {
    /// A name that is no fault kind.
    #[error("unknown fault {0:?}; known: all, none, {known}", known = known_names())]
    Unknown(String),
}

fn known_names() -> String {
    FaultKind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
}

/// The fault kinds a run may inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultSet(BTreeSet<FaultKind>);

impl FaultSet {
    /// Every kind.
    pub fn all() -> FaultSet {
        FaultSet(FaultKind::ALL.into_iter().collect())
    }

    /// No fault at all (the workload still runs).
    pub fn none() -> FaultSet {
        FaultSet(BTreeSet::new())
    }

    /// Parses `all`, `none`, or a comma-separated list of names.
    pub fn parse(list: &str) -> Result<FaultSet, FaultSetError> {
        let mut set = BTreeSet::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item {
                "all" => set.extend(FaultKind::ALL),
                "none" => {}
                name => {
                    set.insert(FaultKind::parse(name).ok_or_else(|| FaultSetError::Unknown(name.to_owned()))?);
                }
            }
        }
        Ok(FaultSet(set))
    }

    /// Whether a kind may be injected.
    pub fn has(&self, kind: FaultKind) -> bool {
        self.0.contains(&kind)
    }

    /// The kinds, in report order.
    pub fn kinds(&self) -> impl Iterator<Item = FaultKind> + '_ {
        self.0.iter().copied()
    }
}

impl Default for FaultSet {
    fn default() -> FaultSet {
        FaultSet::all()
    }
}

/// How many faults of each kind were injected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultCounts(BTreeMap<FaultKind, u64>);

impl FaultCounts {
    /// Counts one injection.
    pub fn add(&mut self, kind: FaultKind, n: u64) {
        *self.0.entry(kind).or_insert(0) += n;
    }

    /// The counts by name, every enabled kind listed (0 when never injected).
    pub fn by_name(&self, enabled: &FaultSet) -> BTreeMap<String, u64> {
        enabled.kinds().map(|k| (k.name().to_owned(), self.0.get(&k).copied().unwrap_or(0))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse() {
        assert_eq!(FaultSet::parse("all").expect("all"), FaultSet::all());
        assert_eq!(FaultSet::parse("none").expect("none"), FaultSet::none());
        let s = FaultSet::parse("crash, clock-jump").expect("list");
        assert!(s.has(FaultKind::Crash) && s.has(FaultKind::ClockJump) && !s.has(FaultKind::Reorder));
        assert!(FaultSet::parse("crash,meteor").is_err());
        for k in FaultKind::ALL {
            assert_eq!(FaultKind::parse(k.name()), Some(k));
        }
    }
}
