//! Invariants of the pick queue, checked against a plain list model over any
//! interleaving of pushes (with out-of-order enqueue times), pops with a
//! non-decreasing clock, cancellations and snapshot/restore:
//! starved standard work is never passed over by newer work, same-day work
//! goes first otherwise, each priority is FIFO, and no task is lost or served
//! twice.

use orderly_domain::Priority;
use orderly_domain::pick_queue::{PickQueue, Queued};
use orderly_domain::time::Timestamp;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Push a task enqueued `back_ms` before the current time.
    Push {
        same_day: bool,
        back_ms: i64,
    },
    Pop,
    /// Move the clock forward.
    Advance(i64),
    /// Cancel every task whose id is `k` modulo 5.
    Cancel(u32),
    /// Replace the queue by a JSON snapshot of itself.
    Snapshot,
}

/// A task the model knows is waiting: (id = push index, priority, enqueued_at).
#[derive(Debug, Clone, Copy)]
struct Waiting {
    id: u32,
    priority: Priority,
    enqueued_at: Timestamp,
}

impl Waiting {
    /// Service order: enqueue time, then insertion.
    fn key(&self) -> (Timestamp, u32) {
        (self.enqueued_at, self.id)
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (any::<bool>(), prop_oneof![Just(0i64), 0i64..40]).prop_map(|(same_day, back_ms)| Op::Push { same_day, back_ms }),
        4 => Just(Op::Pop),
        3 => (0i64..30).prop_map(Op::Advance),
        1 => (0u32..5).prop_map(Op::Cancel),
        1 => Just(Op::Snapshot),
    ]
}

/// Checks one pop against the model and removes the popped task from it.
fn check_pop(
    popped: Option<Queued<u32>>,
    model: &mut Vec<Waiting>,
    now: Timestamp,
    limit_ms: i64,
) -> Result<u32, TestCaseError> {
    let Some(popped) = popped else {
        prop_assert!(model.is_empty(), "pop returned nothing while {} tasks wait", model.len());
        return Err(TestCaseError::reject("empty"));
    };
    let at = model.iter().position(|w| w.id == popped.task);
    let at = at.ok_or_else(|| TestCaseError::fail(format!("task {} popped but not waiting", popped.task)))?;
    let served = model.remove(at);
    prop_assert_eq!((popped.priority, popped.enqueued_at), (served.priority, served.enqueued_at));
    let starved = |w: &Waiting| w.priority == Priority::Standard && now.since(w.enqueued_at) > limit_ms;
    for w in model.iter() {
        // (a) a starved standard task is never passed over by newer work.
        prop_assert!(!(starved(w) && w.key() < served.key()), "{:?} starved but {:?} served at {:?}", w, served, now);
        // (b) FIFO within a priority.
        prop_assert!(!(w.priority == served.priority && w.key() < served.key()), "{:?} before {:?}", w, served);
        // Same-day first, unless the standard task served is starved and older.
        if served.priority == Priority::Standard && w.priority == Priority::SameDay {
            prop_assert!(starved(&served) && served.key() < w.key(), "{:?} served before {:?}", served, w);
        }
    }
    Ok(served.id)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn serves_by_priority_with_aging_and_loses_nothing(
        ops in prop::collection::vec(op(), 0..120),
        limit_ms in 0i64..60,
    ) {
        let mut queue = PickQueue::new();
        let mut model: Vec<Waiting> = Vec::new();
        let mut now = Timestamp(1_000);
        let mut pushed = 0u32;
        let mut gone: Vec<u32> = Vec::new();
        for op in ops {
            match op {
                Op::Push { same_day, back_ms } => {
                    let priority = if same_day { Priority::SameDay } else { Priority::Standard };
                    let enqueued_at = Timestamp(now.millis() - back_ms);
                    queue.push(pushed, priority, enqueued_at);
                    model.push(Waiting { id: pushed, priority, enqueued_at });
                    pushed += 1;
                }
                Op::Pop => match check_pop(queue.pop(now, limit_ms), &mut model, now, limit_ms) {
                    Ok(id) => gone.push(id),
                    Err(TestCaseError::Reject(_)) => {}
                    Err(e) => return Err(e),
                },
                Op::Advance(ms) => now = now.plus_ms(ms),
                Op::Cancel(k) => {
                    let removed = queue.remove_where(|id| id % 5 == k);
                    let mut removed: Vec<u32> = removed.into_iter().map(|q| q.task).collect();
                    removed.sort_unstable();
                    let expected: Vec<u32> = model.iter().map(|w| w.id).filter(|id| id % 5 == k).collect();
                    prop_assert_eq!(&removed, &expected);
                    model.retain(|w| w.id % 5 != k);
                    gone.extend(removed);
                }
                Op::Snapshot => {
                    let json = serde_json::to_string(&queue).expect("serializable");
                    queue = serde_json::from_str(&json).expect("a snapshot parses");
                }
            }
            prop_assert_eq!(queue.len(), model.len());
            let by_priority = queue.len_by_priority();
            prop_assert_eq!(by_priority.same_day, model.iter().filter(|w| w.priority == Priority::SameDay).count());
        }
        // (c) drained, every pushed task left exactly once.
        while !model.is_empty() {
            gone.push(check_pop(queue.pop(now, limit_ms), &mut model, now, limit_ms)?);
        }
        prop_assert!(queue.pop(now, limit_ms).is_none());
        gone.sort_unstable();
        prop_assert_eq!(gone, (0..pushed).collect::<Vec<u32>>());
    }

    #[test]
    fn oldest_waits_match_the_model(
        pushes in prop::collection::vec((any::<bool>(), 0i64..1_000), 0..40),
        now in 1_000i64..2_000,
    ) {
        let mut queue = PickQueue::new();
        for (i, (same_day, at)) in pushes.iter().enumerate() {
            queue.push(i, if *same_day { Priority::SameDay } else { Priority::Standard }, Timestamp(*at));
        }
        let oldest = |same_day: bool| {
            pushes.iter().filter(|(s, _)| *s == same_day).map(|(_, at)| now - at).max()
        };
        let waits = queue.oldest_wait_ms(Timestamp(now));
        prop_assert_eq!((waits.same_day, waits.standard), (oldest(true), oldest(false)));
    }
}
