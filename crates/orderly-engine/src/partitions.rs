//! Sharing a service's work between replicas: the bus's subject partitions
//! are split between the live replicas of a service, each consuming only
//! the partitions it owns, so an order's events are handled by one replica
//! at a time and in order.
//!
//! [`plan`] is the pure decision (how many partitions a replica should hold
//! and which to give up); [`Ownership`] is what the replica's parts share:
//! the membership task (PostgreSQL advisory locks in
//! `orderly-store-postgres`) writes the owned set and the member count, the
//! bus sources read the owned set and report their uncommitted work per
//! partition, and the runtime asks whether another replica is live (then
//! it drops its caches of rows other replicas may write).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::watch;

/// The services whose replicas share the work (all their writes to rows
/// another replica may write are versioned); any other service runs as one
/// active replica at a time, the others standing by.
pub const SHAREABLE: [&str; 2] = ["inventory", "picking"];

/// What a replica should do with its partitions this round.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// How many more partitions to try to take (free ones, lowest first).
    pub acquire: usize,
    /// Partitions to give up (stop consuming, drain, then unlock).
    pub release: Vec<u32>,
}

/// The partitions a replica should hold out of `partitions` when `members`
/// replicas are live: `ceil(partitions / members)` each, so every partition
/// has an owner even when the division is uneven. `held` is what it holds
/// now; it gives up its highest partitions first, so the others' lowest
/// free ones get taken.
pub fn plan(partitions: u32, members: usize, held: &BTreeSet<u32>) -> Plan {
    let members = members.max(1) as u32;
    let target = partitions.div_ceil(members) as usize;
    if held.len() > target {
        let release = held.iter().rev().take(held.len() - target).copied().collect();
        Plan { acquire: 0, release }
    } else {
        Plan { acquire: target - held.len(), release: Vec::new() }
    }
}

/// The partition of a bus subject (`<prefix>.<producer>.<lane>.<n>`).
pub fn partition_of_subject(subject: &str) -> Option<u32> {
    subject.rsplit('.').next()?.parse().ok()
}

/// A replica's share of one service's partitions, shared by its parts.
#[derive(Debug)]
pub struct Ownership {
    /// `None`: every partition (a service that is not shared).
    owned: watch::Sender<Option<BTreeSet<u32>>>,
    members: AtomicUsize,
    inflight: Mutex<BTreeMap<u32, u64>>,
}

impl Ownership {
    /// Owns every partition, alone (a service with a single active replica).
    pub fn all() -> Ownership {
        Ownership { owned: watch::Sender::new(None), members: AtomicUsize::new(1), inflight: Mutex::default() }
    }

    /// Owns nothing yet: the membership task hands partitions out.
    pub fn shared() -> Ownership {
        Ownership {
            owned: watch::Sender::new(Some(BTreeSet::new())),
            members: AtomicUsize::new(1),
            inflight: Mutex::default(),
        }
    }

    /// True for a shared service (partitions handed out by membership).
    pub fn is_shared(&self) -> bool {
        self.owned.borrow().is_some()
    }

    /// The owned partitions (`None`: all), as they change.
    pub fn watch(&self) -> watch::Receiver<Option<BTreeSet<u32>>> {
        self.owned.subscribe()
    }

    /// True when partition `p` is this replica's now.
    pub fn owns(&self, p: u32) -> bool {
        self.owned.borrow().as_ref().is_none_or(|s| s.contains(&p))
    }

    /// Sets the owned partitions (the membership task).
    pub fn set_owned(&self, owned: BTreeSet<u32>) {
        self.owned.send_if_modified(|o| {
            let changed = o.as_ref() != Some(&owned);
            *o = Some(owned);
            changed
        });
    }

    /// Live replicas of the service, this one included.
    pub fn members(&self) -> usize {
        self.members.load(Ordering::Relaxed)
    }

    /// Records the live replica count (the membership task).
    pub fn set_members(&self, n: usize) {
        self.members.store(n.max(1), Ordering::Relaxed);
    }

    /// True while another replica of the service is live: rows other
    /// replicas may write must not be trusted from a cache for long.
    pub fn others_live(&self) -> bool {
        self.members() > 1
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, u64>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A message of partition `p` was taken in and is not committed yet.
    pub fn took(&self, p: u32) {
        *self.counts().entry(p).or_default() += 1;
    }

    /// A message of partition `p` taken in was committed (or dropped).
    pub fn finished(&self, p: u32) {
        let mut counts = self.counts();
        if let Some(n) = counts.get_mut(&p) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&p);
            }
        }
    }

    /// Messages of partition `p` taken in and not committed yet.
    pub fn inflight(&self, p: u32) -> u64 {
        self.counts().get(&p).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u32]) -> BTreeSet<u32> {
        v.iter().copied().collect()
    }

    #[test]
    fn a_lone_replica_takes_every_partition() {
        assert_eq!(plan(16, 1, &set(&[])), Plan { acquire: 16, release: vec![] });
        assert_eq!(plan(16, 0, &set(&[3])), Plan { acquire: 15, release: vec![] }, "0 members counts as 1");
    }

    #[test]
    fn two_replicas_split_sixteen_and_the_holder_gives_up_its_highest() {
        let all: BTreeSet<u32> = (0..16).collect();
        let p = plan(16, 2, &all);
        assert_eq!(p.acquire, 0);
        assert_eq!(p.release, (8..16).rev().collect::<Vec<_>>());
        assert_eq!(plan(16, 2, &set(&[])), Plan { acquire: 8, release: vec![] });
    }

    #[test]
    fn uneven_splits_round_up_so_every_partition_has_an_owner() {
        // ceil(16/3) = 6: three replicas can hold 18 ≥ 16.
        assert_eq!(plan(16, 3, &set(&[0, 1, 2, 3, 4, 5, 6, 7])).release, vec![7, 6]);
        assert_eq!(plan(16, 3, &set(&[0])).acquire, 5);
        assert_eq!(plan(16, 32, &set(&[0, 1])).release, vec![1], "more replicas than partitions: one each");
    }

    #[test]
    fn when_a_replica_dies_the_survivor_takes_the_rest() {
        let half: BTreeSet<u32> = (0..8).collect();
        assert_eq!(plan(16, 1, &half), Plan { acquire: 8, release: vec![] });
    }

    #[test]
    fn subjects_name_their_partition() {
        assert_eq!(partition_of_subject("orderly.orders.events.7"), Some(7));
        assert_eq!(partition_of_subject("orderly.orders.events.x"), None);
    }

    #[test]
    fn ownership_counts_work_in_flight_per_partition() {
        let o = Ownership::shared();
        assert!(o.is_shared() && !o.owns(1));
        o.set_owned(set(&[1, 2]));
        assert!(o.owns(1) && !o.owns(3));
        o.took(1);
        o.took(1);
        o.finished(1);
        assert_eq!((o.inflight(1), o.inflight(2)), (1, 0));
        o.finished(1);
        o.finished(1);
        assert_eq!(o.inflight(1), 0);
        let all = Ownership::all();
        assert!(!all.is_shared() && all.owns(99) && !all.others_live());
    }
}
