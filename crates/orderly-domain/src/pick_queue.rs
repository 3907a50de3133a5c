//! The pick queue of one warehouse: two priority queues (`same_day` and
//! `standard`) with aging, so same-day work goes first but standard work is
//! never starved past `picking.starvation_limit`.
//!
//! The queue is an in-memory index over the picking service's durable task
//! rows, generic over the task payload. The engine may either snapshot it
//! (it is `Serialize`/`Deserialize` when the payload is; a snapshot lists the
//! waiting tasks in insertion order and restores to the same service order) or
//! rebuild it at startup by pushing its open task rows in (enqueued_at, id)
//! order. Either way the rows stay the source of truth.

use crate::Priority;
use crate::time::Timestamp;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// Default of `picking.starvation_limit`: two hours.
pub const DEFAULT_STARVATION_LIMIT_MS: i64 = 2 * 60 * 60 * 1000;

/// Waiting pick tasks of one warehouse, served by [`PickQueue::pop`]:
///
/// - same-day tasks before standard ones;
/// - except that a standard task that has waited longer than the starvation
///   limit goes before every task enqueued after it, including newer same-day
///   tasks (a same-day task enqueued before it still goes first);
/// - within a priority, oldest `enqueued_at` first, ties in insertion order.
///
/// Push and pop take O(log n); removal of canceled work is a scan.
#[derive(Debug, Clone)]
pub struct PickQueue<T> {
    same_day: BTreeMap<Key, T>,
    standard: BTreeMap<Key, T>,
    /// Insertion counter: breaks ties between equal `enqueued_at`.
    next_seq: u64,
}

/// A task as it leaves the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued<T> {
    /// The payload given to [`PickQueue::push`].
    pub task: T,
    /// Which queue it waited in.
    pub priority: Priority,
    /// When it was enqueued.
    pub enqueued_at: Timestamp,
}

/// One value per priority, e.g. queue lengths or oldest waits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerPriority<V> {
    /// The `same_day` value.
    pub same_day: V,
    /// The `standard` value.
    pub standard: V,
}

impl<V> PerPriority<V> {
    /// The value of one priority.
    pub fn get(&self, priority: Priority) -> &V {
        match priority {
            Priority::SameDay => &self.same_day,
            Priority::Standard => &self.standard,
        }
    }
}

/// Service order within a priority: oldest first, then first inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    enqueued_at: Timestamp,
    seq: u64,
}

impl<T> PickQueue<T> {
    /// An empty queue.
    pub fn new() -> Self {
        PickQueue { same_day: BTreeMap::new(), standard: BTreeMap::new(), next_seq: 0 }
    }

    /// Adds a task. `enqueued_at` need not be monotonic: a task rebuilt from
    /// an older row takes its place by its own time.
    pub fn push(&mut self, task: T, priority: Priority, enqueued_at: Timestamp) {
        let key = Key { enqueued_at, seq: self.next_seq };
        self.next_seq += 1;
        self.queue_mut(priority).insert(key, task);
    }

    /// Takes the next task to pick at `now`, by the rule on [`PickQueue`].
    /// A standard task is starved when `now - enqueued_at > starvation_limit_ms`.
    pub fn pop(&mut self, now: Timestamp, starvation_limit_ms: i64) -> Option<Queued<T>> {
        let priority = self.next_priority(now, starvation_limit_ms)?;
        let (key, task) = self.queue_mut(priority).pop_first().expect("next_priority names a non-empty queue");
        Some(Queued { task, priority, enqueued_at: key.enqueued_at })
    }

    /// How many tasks wait.
    pub fn len(&self) -> usize {
        self.same_day.len() + self.standard.len()
    }

    /// Whether no task waits.
    pub fn is_empty(&self) -> bool {
        self.same_day.is_empty() && self.standard.is_empty()
    }

    /// How many tasks wait in each queue.
    pub fn len_by_priority(&self) -> PerPriority<usize> {
        PerPriority { same_day: self.same_day.len(), standard: self.standard.len() }
    }

    /// How long the oldest task of each queue has waited at `now`, in
    /// milliseconds (`None` for an empty queue), for metrics and alerts.
    pub fn oldest_wait_ms(&self, now: Timestamp) -> PerPriority<Option<i64>> {
        let wait = |queue: &BTreeMap<Key, T>| queue.first_key_value().map(|(key, _)| now.since(key.enqueued_at));
        PerPriority { same_day: wait(&self.same_day), standard: wait(&self.standard) }
    }

    /// Removes every task `pred` matches (e.g. those of a canceled order) and
    /// returns them, same-day first, each queue in service order.
    pub fn remove_where(&mut self, mut pred: impl FnMut(&T) -> bool) -> Vec<Queued<T>> {
        let mut removed = Vec::new();
        for priority in [Priority::SameDay, Priority::Standard] {
            let taken = self.queue_mut(priority).extract_if(.., |_, task| pred(task));
            removed.extend(taken.map(|(key, task)| Queued { task, priority, enqueued_at: key.enqueued_at }));
        }
        removed
    }

    /// Which queue [`PickQueue::pop`] serves at `now`, looking only at the
    /// two heads: the oldest standard task is the first to starve.
    fn next_priority(&self, now: Timestamp, starvation_limit_ms: i64) -> Option<Priority> {
        let same_day = self.same_day.first_key_value().map(|(key, _)| *key);
        let standard = self.standard.first_key_value().map(|(key, _)| *key);
        match (same_day, standard) {
            (None, None) => None,
            (Some(_), None) => Some(Priority::SameDay),
            (None, Some(_)) => Some(Priority::Standard),
            (Some(same_day), Some(standard)) => {
                let starved = now.since(standard.enqueued_at) > starvation_limit_ms;
                Some(if starved && standard < same_day { Priority::Standard } else { Priority::SameDay })
            }
        }
    }

    fn queue_mut(&mut self, priority: Priority) -> &mut BTreeMap<Key, T> {
        match priority {
            Priority::SameDay => &mut self.same_day,
            Priority::Standard => &mut self.standard,
        }
    }
}

impl<T> Default for PickQueue<T> {
    fn default() -> Self {
        PickQueue::new()
    }
}

/// A snapshot is the list of waiting tasks as [`Queued`] records, in insertion
/// order, so that pushing them back restores the same tie-breaks.
impl<T: Serialize> Serialize for PickQueue<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Entry<'a, T> {
            task: &'a T,
            priority: Priority,
            enqueued_at: Timestamp,
        }
        let mut entries: Vec<(u64, Entry<'_, T>)> = Vec::with_capacity(self.len());
        for (priority, queue) in [(Priority::SameDay, &self.same_day), (Priority::Standard, &self.standard)] {
            entries.extend(
                queue.iter().map(|(key, task)| (key.seq, Entry { task, priority, enqueued_at: key.enqueued_at })),
            );
        }
        entries.sort_unstable_by_key(|(seq, _)| *seq);
        serializer.collect_seq(entries.into_iter().map(|(_, entry)| entry))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for PickQueue<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entries = Vec::<Queued<T>>::deserialize(deserializer)?;
        let mut queue = PickQueue::new();
        for entry in entries {
            queue.push(entry.task, entry.priority, entry.enqueued_at);
        }
        Ok(queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT_MS: i64 = DEFAULT_STARVATION_LIMIT_MS;
    const MINUTE_MS: i64 = 60_000;

    fn at(minutes: i64) -> Timestamp {
        Timestamp(minutes * MINUTE_MS)
    }

    fn drain<T>(queue: &mut PickQueue<T>, now: Timestamp) -> Vec<T> {
        std::iter::from_fn(|| queue.pop(now, LIMIT_MS)).map(|q| q.task).collect()
    }

    #[test]
    fn same_day_goes_first_and_each_queue_is_fifo() {
        // Given standard and same-day work interleaved, none starved
        let mut queue = PickQueue::new();
        queue.push("std-1", Priority::Standard, at(0));
        queue.push("sd-1", Priority::SameDay, at(1));
        queue.push("std-2", Priority::Standard, at(2));
        queue.push("sd-2", Priority::SameDay, at(3));
        // When it is drained within the limit
        let order = drain(&mut queue, at(60));
        // Then same-day work comes first, each queue oldest first
        assert_eq!(order, ["sd-1", "sd-2", "std-1", "std-2"]);
    }

    #[test]
    fn a_starved_standard_task_goes_before_newer_same_day_work() {
        // Given a standard task enqueued before some same-day work and after other
        let mut queue = PickQueue::new();
        queue.push("sd-old", Priority::SameDay, at(0));
        queue.push("std", Priority::Standard, at(10));
        queue.push("sd-new", Priority::SameDay, at(20));
        // When it has waited longer than the limit
        let now = at(10).plus_ms(LIMIT_MS + 1);
        // Then the older same-day task goes first, then the starved standard
        // task, then the newer same-day task
        assert_eq!(drain(&mut queue, now), ["sd-old", "std", "sd-new"]);
    }

    #[test]
    fn waiting_exactly_the_limit_is_not_starving() {
        let mut queue = PickQueue::new();
        queue.push("std", Priority::Standard, at(0));
        queue.push("sd", Priority::SameDay, at(1));
        assert_eq!(queue.pop(at(0).plus_ms(LIMIT_MS), LIMIT_MS).map(|q| q.task), Some("sd"));
    }

    #[test]
    fn equal_times_keep_insertion_order() {
        let mut queue = PickQueue::new();
        for task in ["a", "b", "c"] {
            queue.push(task, Priority::Standard, at(5));
        }
        queue.push("early", Priority::Standard, at(1));
        assert_eq!(drain(&mut queue, at(6)), ["early", "a", "b", "c"]);
    }

    #[test]
    fn reports_lengths_and_oldest_waits() {
        let mut queue = PickQueue::new();
        assert_eq!(queue.oldest_wait_ms(at(0)), PerPriority { same_day: None, standard: None });
        queue.push("std", Priority::Standard, at(0));
        queue.push("sd-1", Priority::SameDay, at(5));
        queue.push("sd-2", Priority::SameDay, at(7));
        assert_eq!((queue.len(), queue.is_empty()), (3, false));
        assert_eq!(queue.len_by_priority(), PerPriority { same_day: 2, standard: 1 });
        assert_eq!(*queue.len_by_priority().get(Priority::SameDay), 2);
        let waits = queue.oldest_wait_ms(at(10));
        assert_eq!(waits, PerPriority { same_day: Some(5 * MINUTE_MS), standard: Some(10 * MINUTE_MS) });
    }

    #[test]
    fn removes_the_tasks_of_a_canceled_order() {
        // Given tasks of two orders in both queues
        let mut queue = PickQueue::new();
        queue.push("o1-a", Priority::Standard, at(0));
        queue.push("o2-a", Priority::SameDay, at(1));
        queue.push("o1-b", Priority::SameDay, at(2));
        // When order o1 is canceled
        let removed = queue.remove_where(|task| task.starts_with("o1"));
        // Then its tasks leave the queue and only the other order's remain
        let removed: Vec<_> = removed.into_iter().map(|q| (q.task, q.priority)).collect();
        assert_eq!(removed, [("o1-b", Priority::SameDay), ("o1-a", Priority::Standard)]);
        assert_eq!(drain(&mut queue, at(3)), ["o2-a"]);
    }

    #[test]
    fn a_snapshot_restores_the_same_service_order() {
        // Given a queue with ties across priorities
        let mut queue = PickQueue::new();
        queue.push("std-1", Priority::Standard, at(0));
        queue.push("sd-1", Priority::SameDay, at(0));
        queue.push("std-2", Priority::Standard, at(0));
        queue.push("sd-0", Priority::SameDay, at(-1));
        // When it is snapshotted and restored
        let json = serde_json::to_value(&queue).expect("serializable");
        assert_eq!(
            json[0],
            serde_json::json!({"task": "std-1", "priority": "standard", "enqueued_at": "1970-01-01T00:00:00.000Z"})
        );
        let mut restored: PickQueue<String> = serde_json::from_value(json).expect("parses");
        // Then both serve the same tasks in the same order, starved or not
        let now = at(0).plus_ms(LIMIT_MS + 1);
        assert_eq!(drain(&mut restored.clone(), now), drain(&mut queue.clone(), now));
        assert_eq!(drain(&mut restored, at(1)), drain(&mut queue, at(1)));
    }
}
