//! The outbox relay: one task per producing service in this process.

use crate::{BusError, NatsBus, breaker};
use orderly_engine::ports::{Batch, Clock, Store, SystemClock};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The cursor, in the producer's own store, up to which its outbox is relayed.
pub const RELAY_CURSOR: &str = "nats-relay";

/// Longest the relay sleeps before looking at the outbox again.
const TICK: Duration = Duration::from_millis(250);

/// Relays `producer`'s outbox until `shutdown`: publishes what follows the
/// stored relay cursor, then stores the cursor. While the broker fails the
/// breaker opens and the outbox simply grows; it drains when the broker is
/// back.
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
    let batch = bus.options().publish_batch;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let mut idle = true;
        if breaker.allow(clock.now()) {
            match step(&bus, producer, store.as_ref(), &mut relayed, batch).await {
                Ok(sent) => {
                    if breaker.state_name() != "closed" {
                        tracing::info!(producer, "broker reachable again: relaying the outbox backlog");
                    }
                    breaker.on_success(clock.now());
                    idle = sent == 0;
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
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// One relay round: returns how many events went out.
async fn step(
    bus: &NatsBus,
    producer: &'static str,
    store: &dyn Store,
    relayed: &mut Option<u64>,
    batch: u32,
) -> Result<u64, BusError> {
    let after = match *relayed {
        Some(p) => p,
        None => {
            let p = store.cursor(RELAY_CURSOR).await.map_err(|e| BusError::Unavailable(e.to_string()))?;
            *relayed = Some(p);
            p
        }
    };
    let records = store.outbox_after(after, batch).await.map_err(|e| BusError::Unavailable(e.to_string()))?;
    let Some(last) = records.last().map(|r| r.position) else { return Ok(0) };
    bus.publish(producer, &records).await?;
    *relayed = Some(last);
    // Storing the cursor may fail (the store is down): the events are
    // published, and the next start publishes them again, deduplicated.
    let cursor = Batch { cursors: vec![(RELAY_CURSOR.to_owned(), last)], ..Batch::default() };
    if let Err(e) = store.commit(cursor).await {
        tracing::warn!(producer, error = %e, "relay cursor not stored; events will be published again");
    }
    Ok(records.len() as u64)
}
