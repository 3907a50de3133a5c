//! Receipts, adjustments, cycle counts and cart holds sent with an
//! Idempotency-Key take effect at most once, even when the first answer was
//! lost and the engine restarted in between.
//!
//! The HTTP layer records a keyed response only after the handler answered,
//! in a commit of its own; a crash between the stock change's commit and that
//! record used to let the client's retry change the stock a second time. The
//! engine now commits the key with the change (table `request_keys`): these
//! tests play that retry directly against the engine, over stores that
//! outlive it (the restart).

use orderly_domain::allocation::{Location, LocationKind};
use orderly_domain::ledger::InventorySnapshot;
use orderly_domain::{LocationId, Sku, Zone};
use orderly_engine::app::Engine;
use orderly_engine::config::Settings;
use orderly_engine::engine::{Adapters, SERVICES};
use orderly_engine::memory_store::MemoryStore;
use orderly_engine::ports::{SeededRng, Store, SystemClock};
use orderly_engine::services::common::ApiError;
use std::collections::HashMap;
use std::sync::Arc;

struct NoWebhook;
#[async_trait::async_trait]
impl orderly_engine::ports::WebhookSink for NoWebhook {
    async fn deliver(&self, _id: &str, _body: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

type Stores = HashMap<&'static str, Arc<dyn Store>>;

fn stores() -> Stores {
    SERVICES.iter().map(|s| (*s, Arc::new(MemoryStore::new()) as Arc<dyn Store>)).collect()
}

/// An engine over `stores`: starting a second one over the same stores is a restart.
async fn engine(stores: &Stores) -> Engine {
    let adapters = Adapters { stores: stores.clone(), clock: Arc::new(SystemClock), rng: Arc::new(SeededRng::new(7)) };
    Engine::start(Settings::default(), adapters, HashMap::new(), None, Arc::new(NoWebhook))
        .await
        .expect("engine starts")
}

/// Stops `e` and starts a fresh engine over the same stores.
async fn restart(e: Engine, stores: &Stores) -> Engine {
    e.shutdown().await;
    drop(e);
    engine(stores).await
}

fn id<T: TryFrom<String>>(s: &str) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s.to_owned()).expect("valid id")
}

const WH: &str = "WH-EU-1";

async fn location(e: &Engine) {
    e.put_location(Location { id: id(WH), zone: id::<Zone>("EU"), kind: LocationKind::Warehouse })
        .await
        .expect("location");
}

fn on_hand(inv: &InventorySnapshot) -> u64 {
    inv.locations.iter().find(|l| l.location.as_str() == WH).map_or(0, |l| l.on_hand)
}

fn reserved(inv: &InventorySnapshot) -> u64 {
    inv.locations.iter().find(|l| l.location.as_str() == WH).map_or(0, |l| l.reserved)
}

#[track_caller]
fn assert_key_reuse(r: Result<impl std::fmt::Debug, ApiError>) {
    match r {
        Err(ApiError::Invalid { kind, .. }) => assert_eq!(kind, "idempotency-key-reuse"),
        other => panic!("expected an idempotency-key-reuse refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_retried_receipt_receives_once_even_across_a_restart() {
    let stores = stores();
    let e = engine(&stores).await;
    location(&e).await;
    let (loc, sku) = (id::<LocationId>(WH), id::<Sku>("RK-1"));
    let first = e.receive_keyed(loc.clone(), sku.clone(), 10, Some("k-receipt".into())).await.expect("receipt");
    assert_eq!(on_hand(&first), 10);
    // The answer was lost: the client retries with the same key.
    let again = e.receive_keyed(loc.clone(), sku.clone(), 10, Some("k-receipt".into())).await.expect("retry");
    assert_eq!(again, first, "a retry gets the first answer");
    // The crash came between the commit and the HTTP layer's record.
    let e = restart(e, &stores).await;
    let after = e.receive_keyed(loc.clone(), sku.clone(), 10, Some("k-receipt".into())).await.expect("retry");
    assert_eq!(after, first, "a retry after a restart gets the first answer");
    assert_eq!(on_hand(&e.inventory(sku.clone()).await.expect("stock")), 10, "received once");
    // The same key for another request is refused; a new key is a new receipt; no key, no dedupe.
    assert_key_reuse(e.receive_keyed(loc.clone(), sku.clone(), 11, Some("k-receipt".into())).await);
    e.receive_keyed(loc.clone(), sku.clone(), 10, Some("k-receipt-2".into())).await.expect("another receipt");
    e.receive(loc.clone(), sku.clone(), 1).await.expect("unkeyed");
    e.receive(loc, sku.clone(), 1).await.expect("unkeyed");
    assert_eq!(on_hand(&e.inventory(sku).await.expect("stock")), 22);
}

async fn adjust(e: &Engine, key: &str, delta: i64) -> Result<InventorySnapshot, ApiError> {
    e.adjust_keyed(id("RK-2"), id(WH), delta, None, "damaged".into(), "ops".into(), Some(key.into())).await
}

async fn count(e: &Engine, key: &str, counted: u64) -> Result<InventorySnapshot, ApiError> {
    let reason = "cycle_count".to_owned();
    e.adjust_keyed(id("RK-2"), id(WH), 0, Some(counted), reason, "scanner".into(), Some(key.into())).await
}

#[tokio::test]
async fn a_retried_adjustment_or_cycle_count_applies_once_even_across_a_restart() {
    let stores = stores();
    let e = engine(&stores).await;
    location(&e).await;
    let (loc, sku) = (id::<LocationId>(WH), id::<Sku>("RK-2"));
    e.receive(loc.clone(), sku.clone(), 50).await.expect("receipt");
    let first = adjust(&e, "k-adjust", -5).await.expect("adjustment");
    assert_eq!(on_hand(&first), 45);
    assert_eq!(adjust(&e, "k-adjust", -5).await.expect("retry"), first);
    let e = restart(e, &stores).await;
    assert_eq!(adjust(&e, "k-adjust", -5).await.expect("retry after restart"), first);
    assert_key_reuse(adjust(&e, "k-adjust", -6).await);
    assert_eq!(on_hand(&e.inventory(sku.clone()).await.expect("stock")), 45, "adjusted once");

    let counted = count(&e, "k-count", 40).await.expect("cycle count");
    assert_eq!(on_hand(&counted), 40);
    // Stock moves on after the count; a late retry of the count must not reset it.
    e.receive(loc.clone(), sku.clone(), 7).await.expect("receipt");
    let e = restart(e, &stores).await;
    assert_eq!(count(&e, "k-count", 40).await.expect("retry"), counted, "the retry gets the count's answer");
    assert_eq!(on_hand(&e.inventory(sku).await.expect("stock")), 47, "the count applied once, the receipt kept");
}

#[tokio::test]
async fn a_retried_hold_holds_once_even_across_a_restart() {
    let stores = stores();
    let e = engine(&stores).await;
    location(&e).await;
    let (loc, sku) = (id::<LocationId>(WH), id::<Sku>("RK-3"));
    e.receive(loc.clone(), sku.clone(), 100).await.expect("receipt");
    let first = e.create_hold_keyed(sku.clone(), 3, None, Some("k-hold".into())).await.expect("hold");
    assert_eq!(e.create_hold_keyed(sku.clone(), 3, None, Some("k-hold".into())).await.expect("retry"), first);
    let e = restart(e, &stores).await;
    assert_eq!(e.create_hold_keyed(sku.clone(), 3, None, Some("k-hold".into())).await.expect("retry"), first);
    assert_key_reuse(e.create_hold_keyed(sku.clone(), 4, None, Some("k-hold".into())).await);
    assert_eq!(reserved(&e.inventory(sku.clone()).await.expect("stock")), 3, "one hold of 3");
    let other = e.create_hold_keyed(sku.clone(), 3, None, Some("k-hold-2".into())).await.expect("hold");
    assert_ne!(other.id, first.id);
    assert_eq!(reserved(&e.inventory(sku).await.expect("stock")), 6);
}
