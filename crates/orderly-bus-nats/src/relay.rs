//! The outbox relay: one task per producing service in this process.

use crate::{BusError, NatsBus, breaker};
use orderly_engine::bus::outbox_announced;
use orderly_engine::ports::{Batch, Clock, Store, SystemClock};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The cursor, in the producer's own store, up to which its outbox is relayed.
pub const RELAY_CURSOR: &str = "nats-relay";

/// Longest the relay sleeps before looking at the outbox again.
const TICK: Duration = Duration::from_millis(250);

/// While events keep coming, the relay cursor is stored at most this often;
/// otherwise once the producer has been quiet for a [`TICK`], and at
/// shutdown. Storing it is a durable commit in the producer's store: after
/// every publish, that was one more commit per round, about as many as the
/// producer's own under load. A crash republishes at most about this much,
/// which the broker drops by `Nats-Msg-Id` (its window is minutes) and
/// consumers' inboxes would absorb anyway.
pub const CURSOR_EVERY: Duration = Duration::from_secs(1);

/// Relays `producer`'s outbox until `shutdown`: publishes what follows the
/// stored relay cursor, and stores the cursor (see [`CURSOR_EVERY`]). While
/// the broker fails the breaker opens and the outbox simply grows; it
/// drains when the broker is back.
pub(crate) async fn run(
    bus: NatsBus,
    producer: &'static str,
    store: Arc<dyn Store>,
    mut head: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let clock = SystemClock;
    let mut breaker = breaker(bus.options());
    let mut relayed: Option<u64> = None;
    let mut stored = Stored { position: None, at: Instant::now() };
    let batch = bus.options().publish_batch;
    loop {
        if *shutdown.borrow() {
            stored.save(producer, store.as_ref(), relayed).await;
            return;
        }
        let mut idle = true;
        if breaker.allow(clock.now()) {
            let durable_head = *head.borrow_and_update();
            match step(&bus, producer, store.as_ref(), &mut relayed, &mut stored, batch, durable_head).await {
                Ok(sent) => {
                    if breaker.state_name() != "closed" {
                        tracing::info!(producer, "broker reachable again: relaying the outbox backlog");
                    }
                    breaker.on_success(clock.now());
                    idle = sent == 0;
                    if stored.at.elapsed() >= CURSOR_EVERY {
                        stored.save(producer, store.as_ref(), relayed).await;
                    }
                }
                Err(e) => {
                    breaker.on_failure(clock.now());
                    tracing::warn!(producer, breaker = breaker.state_name(), error = %e,
                        "relay failed; events stay in the outbox");
                }
            }
        }
        if !idle {
            continue;
        }
        tokio::select! {
            _ = head.changed() => {}
            _ = tokio::time::sleep(TICK) => stored.save(producer, store.as_ref(), relayed).await,
            _ = shutdown.changed() => {}
        }
    }
}

/// The relay cursor as last stored.
struct Stored {
    position: Option<u64>,
    at: Instant,
}

impl Stored {
    /// Stores `relayed` as the relay cursor if it moved since. Storing may
    /// fail (the store is down): the events are published, and the next
    /// start publishes them again, deduplicated.
    async fn save(&mut self, producer: &'static str, store: &dyn Store, relayed: Option<u64>) {
        let Some(last) = relayed.filter(|r| Some(*r) != self.position) else { return };
        let cursor = Batch { cursors: vec![(RELAY_CURSOR.to_owned(), last)], ..Batch::default() };
        match store.commit(cursor).await {
            Ok(_) => *self = Stored { position: Some(last), at: Instant::now() },
            Err(e) => tracing::warn!(producer, error = %e, "relay cursor not stored; events will be published again"),
        }
    }
}

/// One relay round: returns how many events went out; from a store whose
/// commits are visible before they are synced, never past `head` (the
/// producer's announced head). A shared PostgreSQL store holds other
/// replicas' events past this one's head, all durable: those are relayed
/// too. The first round reads the stored cursor
/// (so `stored` knows it: nothing to store again); storing the new one is
/// the caller's.
async fn step(
    bus: &NatsBus,
    producer: &'static str,
    store: &dyn Store,
    relayed: &mut Option<u64>,
    stored: &mut Stored,
    batch: u32,
    head: u64,
) -> Result<u64, BusError> {
    let after = match *relayed {
        Some(p) => p,
        None => {
            let p = store.cursor(RELAY_CURSOR).await.map_err(|e| BusError::Unavailable(e.to_string()))?;
            *relayed = Some(p);
            stored.position = Some(p);
            p
        }
    };
    let records =
        outbox_announced(store, after, batch, head).await.map_err(|e| BusError::Unavailable(e.to_string()))?;
    let Some(last) = records.last().map(|r| r.position) else { return Ok(0) };
    bus.publish(producer, &records).await?;
    *relayed = Some(last);
    Ok(records.len() as u64)
}
