//! The bus contract: behaviour every event bus must show to the runtime, as
//! [`crate::contract`] is for stores. The embedded outbox reader and the NATS
//! JetStream bus both run [`check_bus`]: what a producer commits reaches the
//! consumer, in order per subject, filtered by type; nothing is lost before
//! the consumer commits; nothing committed is applied again (a bus that may
//! deliver it again says so with `at_least_once`, and it is in the inbox).

use crate::broker::EventFilter;
use crate::bus::{EventSource, Polled};
use crate::ports::{Batch, Store};
use async_trait::async_trait;
use orderly_domain::Timestamp;
use orderly_domain::event::{Envelope, EventType};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The producer every check publishes as.
pub const PRODUCER: &str = "orders";

/// Longest the contract waits for an event to arrive.
pub const ARRIVAL: Duration = Duration::from_secs(10);

/// A bus under test between a producer's store and a consumer's store.
#[async_trait]
pub trait BusFixture: Send + Sync {
    /// A fresh source for the consumer reading [`PRODUCER`] (as after a
    /// restart: nothing but what the stores and the bus keep).
    async fn source(&self, filter: EventFilter) -> Arc<dyn EventSource>;
    /// Tells the bus that the producer's outbox now reaches `head` (what the
    /// runtime does after each commit).
    fn published(&self, head: u64);
}

fn event(id: &str, subject: &str, event_type: EventType, seq: u64, high: bool) -> Envelope {
    let mut env = Envelope::new(
        id.into(),
        "/orderly/orders",
        event_type,
        subject,
        Timestamp(1_000),
        seq,
        serde_json::json!({ "n": seq }),
    );
    if high {
        env.priority = Some("high".into());
    }
    env
}

fn not_returned(t: &str) -> bool {
    t != "orderly.order.returned"
}

fn set<S: AsRef<str>>(items: &[S]) -> BTreeSet<String> {
    items.iter().map(|s| s.as_ref().to_owned()).collect()
}

fn ids(p: &Polled) -> Vec<String> {
    p.records.iter().map(|r| r.envelope.id.clone()).collect()
}

/// Polls until `want` events are offered (or [`ARRIVAL`] passes).
async fn poll_until(source: &dyn EventSource, want: usize) -> Polled {
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let polled = source.poll(64).await.expect("poll");
        if polled.records.len() >= want || Instant::now() >= deadline {
            return polled;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Commits that the consumer processed everything up to `upto` (with the
/// inbox entries an at-least-once bus needs), as the runtime does.
async fn commit_upto(consumer: &dyn Store, source: &dyn EventSource, polled: &Polled, upto: u64) {
    let mut batch = Batch::default();
    source.mark(upto, &mut batch);
    if source.at_least_once() {
        batch.inbox = polled.records.iter().filter(|r| r.position <= upto).map(|r| r.envelope.id.clone()).collect();
    }
    if !batch.is_empty() {
        consumer.commit(batch).await.expect("consumer commit");
    }
    source.committed(upto);
}

/// Events offered that the consumer has not processed (an at-least-once bus
/// may offer processed ones again: the inbox filters them, as in the runtime).
async fn fresh(consumer: &dyn Store, source: &dyn EventSource, polled: &Polled) -> Vec<String> {
    let mut out = Vec::new();
    for id in ids(polled) {
        let seen = consumer.inbox_contains(&id).await.expect("inbox");
        assert!(!seen || source.at_least_once(), "an exactly-once bus offered processed event {id} again");
        if !seen {
            out.push(id);
        }
    }
    out
}

/// Runs every bus check. `producer` and `consumer` start empty.
/// Panics (it is test support) with the name of the failed check.
pub async fn check_bus(producer: &dyn Store, consumer: &dyn Store, fixture: &dyn BusFixture) {
    let head = producer
        .commit(Batch {
            outbox: vec![
                event("e1", "o-1", EventType::OrderCreated, 1, false),
                event("e2", "o-2", EventType::OrderCreated, 1, false),
                event("e3", "o-1", EventType::OrderCanceled, 2, false),
                event("e4", "o-3", EventType::OrderReturned, 1, false),
            ],
            ..Batch::default()
        })
        .await
        .expect("producer commit");
    fixture.published(head);
    let source = fixture.source(not_returned).await;
    assert_eq!(source.producer(), PRODUCER);

    let first = poll_until(source.as_ref(), 3).await;
    let got = ids(&first);
    assert_eq!(set(&got), set(&["e1", "e2", "e3"]), "every event passing the filter arrives, and only those: {got:?}");
    let at = |id: &str| got.iter().position(|g| g == id).expect("present");
    assert!(at("e1") < at("e3"), "per-subject order kept: {got:?}");
    assert!(first.upto >= first.records.iter().map(|r| r.position).max().unwrap_or(0), "upto covers what is offered");
    assert!(first.upto > first.from, "something to commit");

    let again = poll_until(source.as_ref(), 3).await;
    assert_eq!(ids(&again), got, "nothing committed: the same events are offered again, in the same order");

    let e1 = first.records[at("e1")].position;
    let before_e1 = first.records.iter().filter(|r| r.position < e1).count();
    assert_eq!(before_e1, 0, "e1 is the first event offered");
    commit_upto(consumer, source.as_ref(), &first, e1).await;
    let rest = poll_until(source.as_ref(), 2).await;
    let rest_ids = fresh(consumer, source.as_ref(), &rest).await;
    assert_eq!(
        set(&rest_ids),
        set(&["e2", "e3"]),
        "a partial commit: the rest is still offered, the committed part is not processed again"
    );
    assert!(rest.from >= e1, "the source stands at the committed position");

    commit_upto(consumer, source.as_ref(), &rest, rest.upto).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done = source.poll(64).await.expect("poll");
    assert!(fresh(consumer, source.as_ref(), &done).await.is_empty(), "everything committed: nothing new offered");
    drop(source);

    // A restart: a fresh source offers nothing unprocessed...
    let source = fixture.source(not_returned).await;
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        let p = source.poll(64).await.expect("poll");
        assert!(fresh(consumer, source.as_ref(), &p).await.is_empty(), "after a restart nothing is processed twice");
        if p.upto > p.from {
            commit_upto(consumer, source.as_ref(), &p, p.upto).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and what is published next, in either priority, arrives once.
    let head = producer
        .commit(Batch {
            outbox: vec![
                event("e5", "o-4", EventType::OrderCreated, 1, true),
                event("e6", "o-5", EventType::OrderCreated, 1, false),
            ],
            ..Batch::default()
        })
        .await
        .expect("producer commit");
    fixture.published(head);
    let deadline = Instant::now() + ARRIVAL;
    let mut seen: Vec<String> = Vec::new();
    while seen.len() < 2 && Instant::now() < deadline {
        let p = source.poll(64).await.expect("poll");
        let new = fresh(consumer, source.as_ref(), &p).await;
        for id in &new {
            assert!(!seen.contains(id), "{id} offered again after it was processed");
        }
        seen.extend(new);
        if p.upto > p.from {
            commit_upto(consumer, source.as_ref(), &p, p.upto).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen.sort();
    assert_eq!(seen, vec!["e5", "e6"], "events of both priorities arrive after a restart");
}
