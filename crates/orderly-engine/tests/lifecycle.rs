//! The engine end to end over memory stores: an order goes from creation
//! through allocation, picking and packing, a flash sale never oversells,
//! and a cancel releases stock.

use orderly_domain::allocation::{Location, LocationKind};
use orderly_domain::order::{Order, OrderState};
use orderly_domain::{CustomerId, LocationId, Money, OrderId, Priority, Sku, Zone};
use orderly_engine::app::{Customer, Engine, LineRequest, OrderRequest, ShipTo};
use orderly_engine::config::Settings;
use orderly_engine::engine::{Adapters, SERVICES};
use orderly_engine::memory_store::MemoryStore;
use orderly_engine::ports::{SeededRng, Store, SystemClock};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct NoWebhook;
#[async_trait::async_trait]
impl orderly_engine::ports::WebhookSink for NoWebhook {
    async fn deliver(&self, _id: &str, _body: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

async fn engine(settings: Settings) -> Engine {
    let stores: HashMap<&'static str, Arc<dyn Store>> =
        SERVICES.iter().map(|s| (*s, Arc::new(MemoryStore::new()) as Arc<dyn Store>)).collect();
    let adapters = Adapters { stores, clock: Arc::new(SystemClock), rng: Arc::new(SeededRng::new(7)) };
    Engine::start(settings, adapters, HashMap::new(), None, Arc::new(NoWebhook)).await.expect("engine starts")
}

fn id<T: TryFrom<String>>(s: &str) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s.to_owned()).expect("valid id")
}

fn order_req(sku: &str, qty: u32, price: &str, priority: Priority) -> OrderRequest {
    OrderRequest {
        customer: Customer { id: id::<CustomerId>("c-1"), email: "c1@example.com".into() },
        ship_to: ShipTo { zone: id::<Zone>("EU") },
        priority,
        lines: vec![LineRequest { sku: id::<Sku>(sku), qty, unit_price: Money::parse(price).expect("money") }],
        hold_ids: vec![],
        delivery_window: None,
    }
}

async fn wait_for(e: &Engine, order: &OrderId, pred: impl Fn(&Order) -> bool) -> Order {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = e.order(order).await.expect("order exists");
        if pred(&o) {
            return o;
        }
        assert!(Instant::now() < deadline, "order {order} stuck in {:?}", o.state());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn stock(e: &Engine, sku: &str, qty: u32) {
    for (loc, zone) in [("WH-EU-1", "EU"), ("WH-US-1", "US")] {
        e.put_location(Location { id: id(loc), zone: id(zone), kind: LocationKind::Warehouse })
            .await
            .expect("location");
    }
    e.receive(id::<LocationId>("WH-EU-1"), id(sku), qty).await.expect("receipt");
}

#[tokio::test]
async fn an_order_goes_from_created_to_packed() {
    let e = engine(Settings::default()).await;
    stock(&e, "SKU-1", 100).await;
    let order = e.create_order(order_req("SKU-1", 2, "10.00", Priority::Standard)).await.expect("created");
    assert!(matches!(order.state(), OrderState::Allocating | OrderState::Created), "{:?}", order.state());
    let allocated =
        wait_for(&e, order.id(), |o| matches!(o.state(), OrderState::Allocated | OrderState::Picking)).await;
    assert_eq!(allocated.allocated_qty(), 2);

    let task = loop {
        if let Some(t) = e.next_pick(id("WH-EU-1")).await.expect("next") {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(task.qty, 2);
    let done = e.confirm_pick(task.id.clone(), task.instruction_key.clone(), 2).await.expect("confirm");
    assert!(!done.duplicate);
    let again = e.confirm_pick(task.id.clone(), task.instruction_key.clone(), 2).await.expect("duplicate is fine");
    assert!(again.duplicate, "a duplicate confirmation has no second effect");
    wait_for(&e, order.id(), |o| o.state() == OrderState::Picked).await;

    let package = loop {
        match e.pack(order.id().clone(), id("WH-EU-1"), vec![task.id.clone()]).await {
            Ok(p) => break p,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    assert_eq!(package.lines.len(), 1);
    wait_for(&e, order.id(), |o| o.state() == OrderState::Packed).await;

    let inv = e.inventory(id("SKU-1")).await.expect("inventory");
    let loc = &inv.locations[0];
    assert_eq!(loc.on_hand, 98, "picked units left the ledger");
    assert_eq!(loc.reserved, 0);
    e.shutdown().await;
}

#[tokio::test]
async fn a_flash_sale_never_oversells() {
    let e = Arc::new(engine(Settings::default()).await);
    stock(&e, "HOT", 105).await;
    let sellable = e.inventory(id("HOT")).await.expect("inventory").available; // after the safety buffer
    let mut tasks = Vec::new();
    for i in 0..400 {
        let e = e.clone();
        tasks.push(tokio::spawn(async move {
            let prio = if i % 3 == 0 { Priority::SameDay } else { Priority::Standard };
            e.create_order(order_req("HOT", 1, "9.99", prio)).await.expect("accepted")
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task").id().clone());
    }
    let mut allocated = 0u64;
    let mut backordered = 0u64;
    for order_id in &ids {
        let o = wait_for(&e, order_id, |o| {
            matches!(o.state(), OrderState::Allocated | OrderState::Picking | OrderState::Backordered)
        })
        .await;
        match o.state() {
            OrderState::Allocated | OrderState::Picking => allocated += 1,
            _ => backordered += 1,
        }
    }
    assert!(sellable >= 95, "5% safety buffer, rounded up per partition: {sellable}");
    assert_eq!(allocated, sellable, "exactly the sellable units were allocated");
    assert_eq!(backordered, 400 - sellable);
    let inv = e.inventory(id("HOT")).await.expect("inventory");
    assert_eq!(inv.locations[0].reserved, sellable);
    assert!(inv.locations[0].reserved + inv.locations[0].safety <= inv.locations[0].on_hand, "no oversell");
    e.shutdown().await;
}

#[tokio::test]
async fn sync_allocation_answers_with_the_reservation_or_409() {
    let e = engine(Settings::default()).await;
    stock(&e, "TV", 21).await; // 20 sellable after the 5% buffer.
    let big = e.create_order(order_req("TV", 10, "500.00", Priority::Standard)).await.expect("reserved");
    assert_eq!(big.lines()[0].allocated_qty(), 10, "a sync line is reserved before the answer");
    let too_big = e.create_order(order_req("TV", 11, "500.00", Priority::Standard)).await;
    assert!(
        matches!(too_big, Err(orderly_engine::services::common::ApiError::Conflict { kind: "insufficient-stock", .. })),
        "{too_big:?}"
    );
    let inv = e.inventory(id("TV")).await.expect("inventory");
    assert_eq!(inv.locations[0].reserved, 10, "a refused sync order reserves nothing");
    e.shutdown().await;
}

#[tokio::test]
async fn cancel_releases_stock_and_backorders_fill_on_receipt() {
    let e = engine(Settings::default()).await;
    stock(&e, "S", 100).await; // 95 sellable after the 5% buffer.
    let a = e.create_order(order_req("S", 90, "1.00", Priority::Standard)).await.expect("a");
    wait_for(&e, a.id(), |o| matches!(o.state(), OrderState::Allocated | OrderState::Picking)).await;
    let b = e.create_order(order_req("S", 10, "1.00", Priority::Standard)).await.expect("b");
    wait_for(&e, b.id(), |o| o.state() == OrderState::Backordered).await;
    e.cancel_order(a.id().clone(), "customer changed mind".into()).await.expect("cancel");
    wait_for(&e, b.id(), |o| matches!(o.state(), OrderState::Allocated | OrderState::Picking)).await;
    let inv = e.inventory(id("S")).await.expect("inventory");
    assert_eq!(inv.locations[0].reserved, 10, "a's units were released and b took them");
    e.shutdown().await;
}

#[tokio::test]
async fn a_package_of_a_canceled_order_never_gets_a_label() {
    let e = engine(Settings::default()).await; // No carrier routes: labels wait.
    stock(&e, "SKU-C", 100).await;
    let order = e.create_order(order_req("SKU-C", 1, "10.00", Priority::Standard)).await.expect("created");
    let task = loop {
        if let Some(t) = e.next_pick(id("WH-EU-1")).await.expect("next") {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    e.confirm_pick(task.id.clone(), task.instruction_key.clone(), 1).await.expect("confirm");
    let package = loop {
        match e.pack(order.id().clone(), id("WH-EU-1"), vec![task.id.clone()]).await {
            Ok(p) => break p,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let shipment_id: orderly_domain::ShipmentId = id(&format!("{}.shp", package.id));
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.shipment(shipment_id.clone()).await.is_err() {
        assert!(Instant::now() < deadline, "shipment never created");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    e.cancel_order(order.id().clone(), "changed mind".into()).await.expect("cancel");
    loop {
        let s = e.shipment(shipment_id.clone()).await.expect("shipment");
        if s.state == orderly_engine::services::shipping::ShipmentState::Canceled {
            break;
        }
        assert!(Instant::now() < deadline, "shipment still {:?}", s.state);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delivered = e.delivered(shipment_id).await;
    assert!(
        matches!(
            delivered,
            Err(orderly_engine::services::common::ApiError::Conflict { kind: "shipment-canceled", .. })
        ),
        "{delivered:?}"
    );
    e.shutdown().await;
}

/// An order this process created is cached, and a new order has no parked
/// events: the events that carry it to allocated and picked cost the orders
/// store no read (a flash sale's orders loop once spent a sixth of its time
/// asking the store for parked events that were never there).
#[tokio::test]
async fn events_about_a_new_order_read_nothing_from_the_orders_store() {
    let orders_store = Arc::new(MemoryStore::new());
    let stores: HashMap<&'static str, Arc<dyn Store>> = SERVICES
        .iter()
        .map(|s| {
            let store: Arc<dyn Store> =
                if *s == "orders" { orders_store.clone() } else { Arc::new(MemoryStore::new()) };
            (*s, store)
        })
        .collect();
    let adapters = Adapters { stores, clock: Arc::new(SystemClock), rng: Arc::new(SeededRng::new(7)) };
    let e = Engine::start(Settings::default(), adapters, HashMap::new(), None, Arc::new(NoWebhook))
        .await
        .expect("engine starts");
    stock(&e, "SKU-1", 100).await;
    let before = orders_store.reads();
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            e.create_order(order_req("SKU-1", 1, "10.00", Priority::Standard)).await.expect("created").id().clone(),
        );
    }
    // Waits on the decisions counter: reading an order through the engine reads the store.
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.runtime.metrics.counter("orderly_orders_decided_total", &[]) < ids.len() as u64 {
        assert!(Instant::now() < deadline, "orders not allocated in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(orders_store.reads(), before, "no point or many-key read for orders created here");
    for order in &ids {
        wait_for(&e, order, |o| matches!(o.state(), OrderState::Allocated | OrderState::Picking)).await;
    }
    e.shutdown().await;
}
