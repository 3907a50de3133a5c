//! What a simulated seed reports: steps, faults injected by kind, orders by
//! final state, invariant checks, violations (with the seed, the step and a
//! short trace of what happened last) and a fingerprint of the final state
//! that two runs of one seed must share.

use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};

/// The last things that happened, newest last, each tagged with its step.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    step: u64,
    lines: VecDeque<String>,
    len_max: usize,
}

impl Trace {
    /// A trace keeping the last `len_max` lines.
    pub fn new(len_max: usize) -> Trace {
        Trace { step: 0, lines: VecDeque::new(), len_max: len_max.max(1) }
    }

    /// Tags the following lines with `step`.
    pub fn at(&mut self, step: u64) {
        self.step = step;
    }

    /// Records a line.
    pub fn push(&mut self, line: String) {
        self.lines.push_back(format!("[{}] {line}", self.step));
        while self.lines.len() > self.len_max {
            self.lines.pop_front();
        }
    }

    /// The recorded lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.lines.iter().cloned().collect()
    }
}

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The seed that replays it.
    pub seed: u64,
    /// The step after which it was seen.
    pub step: u64,
    /// The invariant's name, e.g. `no_oversell`.
    pub invariant: String,
    /// What was wrong.
    pub detail: String,
    /// What happened last.
    pub trace: Vec<String>,
}

/// The outcome of one seed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeedReport {
    /// The seed.
    pub seed: u64,
    /// Steps run (fault phase plus quiet phase).
    pub steps: u64,
    /// Steps of the quiet phase.
    pub quiet_steps: u64,
    /// Faults injected, by kind.
    pub faults_injected: BTreeMap<String, u64>,
    /// Orders by state at the end.
    pub orders_by_state: BTreeMap<String, u64>,
    /// How many times each invariant was checked.
    pub invariants_checked: BTreeMap<String, u64>,
    /// What went wrong (empty for a clean run; a run stops at its first violation).
    pub violations: Vec<Violation>,
    /// Workload and engine counters.
    pub stats: BTreeMap<String, u64>,
    /// A fingerprint of every outbox and every stored document at the end.
    pub fingerprint: String,
}

/// FNV-1a over a stream of bytes.
#[derive(Debug, Clone, Copy)]
pub struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Fingerprint {
        Fingerprint(0xcbf2_9ce4_8422_2325)
    }
}

impl Fingerprint {
    /// Feeds bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }

    /// The fingerprint as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}
