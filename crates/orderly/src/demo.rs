//! `orderly demo`: an embedded engine with a sample catalog (two warehouses
//! and a drop-shipper, SKUs, two carriers with rates), the carrier simulator
//! in-process, and simulated storefront, pickers, packers and carrier
//! callbacks that keep orders flowing until Ctrl-C.

use crate::{Application, RunOptions};
use anyhow::{Context, Result};
use orderly_domain::allocation::{Location, LocationKind};
use orderly_domain::order::OrderState;
use orderly_domain::{CustomerId, LocationId, Money, Priority, Sku, Zone};
use orderly_engine::app::{Customer, Engine, LineRequest, OrderRequest, ShipTo};
use orderly_engine::config::{ApiKey, CarrierEndpoint, Settings, ZoneRoute};
use orderly_engine::ports::{Rng, SeededRng};
use orderly_store_sqlite::Durability;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The demo catalog: SKU, unit price, units per warehouse.
const CATALOG: &[(&str, &str, u32)] = &[
    ("TSHIRT-BLK-M", "19.99", 400),
    ("TSHIRT-WHT-L", "19.99", 300),
    ("HOODIE-GRY-M", "49.00", 150),
    ("SNEAKER-42", "89.00", 80),
    ("SMARTWATCH-2", "249.00", 40),
    ("HOT-DROP-1", "29.00", 120),
];

const LOCATIONS: &[(&str, &str, LocationKind)] = &[
    ("WH-EU-1", "EU", LocationKind::Warehouse),
    ("WH-US-1", "US", LocationKind::Warehouse),
    ("DS-EU-1", "EU", LocationKind::Dropship),
];

const RATES: &str = "# orderly demo carrier rates\nversion,2026-11-01.1\ncarrier,zone,max_weight_g,price\n\
fastship,EU,1000,4.95\nfastship,EU,5000,8.50\nfastship,US,1000,6.95\nfastship,US,5000,11.50\n\
slowpost,EU,1000,3.50\nslowpost,EU,5000,6.00\nslowpost,US,1000,4.50\nslowpost,US,5000,8.00\n";

/// Runs the demo until Ctrl-C.
pub async fn run(
    listen: SocketAddr,
    data_dir: Option<PathBuf>,
    carriers_down: &[String],
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let data_dir = match data_dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("orderly-demo-{}", std::process::id())),
    };
    let mut sim = orderly_carrier::sim::SimConfig::demo(7);
    for name in carriers_down {
        let mut settings = sim
            .settings(name)
            .with_context(|| format!("--carrier-down {name}: the demo's carriers are fastship and slowpost"))?;
        settings.down = true;
        sim = sim.with_carrier(name, &settings)?;
    }
    let carrier = orderly_carrier::sim::spawn_local(sim).await.context("carrier simulator")?;
    let rates_dir = data_dir.join("rates");
    std::fs::create_dir_all(&rates_dir)?;
    std::fs::write(rates_dir.join("demo.csv"), RATES)?;
    let (settings, keys) = demo_settings(carrier.url(), &rates_dir)?;
    let app = Application::build(
        settings,
        &RunOptions { data_dir: data_dir.clone(), listen, store: None, durability: Durability::Normal },
    )
    .await?;
    let engine = app.engine();
    let addr = app.local_addr();
    seed_catalog(&engine).await?;
    println!(
        "\nOrderly demo running.\n  dashboard: http://{addr}/\n  API:       http://{addr}/v1  (docs at http://{addr}/docs)"
    );
    println!(
        "  carrier simulator: {}\n  data: {}\n\nAPI keys for this run (shown once):",
        carrier.url(),
        data_dir.display()
    );
    for (role, key) in &keys {
        println!("  {role:<10} {key}");
    }
    println!(
        "\nTake the primary EU carrier down to watch fallbacks:\n  curl -X PUT {}/admin/carriers/fastship -H 'content-type: application/json' -d '{{\"down\":true}}'\n",
        carrier.url()
    );
    let actors = spawn_actors(engine);
    let result = app.run_until(shutdown).await;
    for a in actors {
        a.abort();
    }
    let _ = carrier.shutdown().await;
    result
}

/// The demo's carrier layout: `fastship` and `slowpost` at the simulator's
/// `carrier_url`, fastship first in EU and slowpost first in US, rates from
/// `rates_dir`. The soak uses the same layout.
pub(crate) fn wire_carriers(settings: &mut Settings, carrier_url: &str, rates_dir: &std::path::Path) {
    settings.carriers.rates_dir = Some(rates_dir.display().to_string());
    for id in ["fastship", "slowpost"] {
        settings.carriers.endpoints.push(CarrierEndpoint { id: id.to_owned(), url: carrier_url.to_owned() });
    }
    settings.carriers.routes.push(ZoneRoute {
        zone: "EU".into(),
        primary: "fastship".into(),
        secondary: "slowpost".into(),
    });
    settings.carriers.routes.push(ZoneRoute {
        zone: "US".into(),
        primary: "slowpost".into(),
        secondary: "fastship".into(),
    });
}

fn demo_settings(carrier_url: &str, rates_dir: &std::path::Path) -> Result<(Settings, Vec<(&'static str, String)>)> {
    let mut settings = Settings::default();
    let mut keys = Vec::new();
    for role in ["ops", "storefront", "warehouse", "carrier", "viewer"] {
        let (key, hash) = orderly_http::auth::generate_key().context("no randomness")?;
        settings.auth.keys.push(ApiKey { name: format!("demo-{role}"), role: role.to_owned(), hash });
        keys.push((role, key));
    }
    wire_carriers(&mut settings, carrier_url, rates_dir);
    settings.shipping.max_retries = 2;
    settings.carriers.breaker_cooldown = orderly_engine::config::Millis(10_000);
    Ok((settings, keys))
}

fn id<T: TryFrom<String>>(s: &str) -> Result<T>
where
    T::Error: std::fmt::Display,
{
    T::try_from(s.to_owned()).map_err(|e| anyhow::anyhow!("{e}"))
}

async fn seed_catalog(engine: &Engine) -> Result<()> {
    for (loc, zone, kind) in LOCATIONS {
        engine.put_location(Location { id: id(loc)?, zone: id(zone)?, kind: *kind }).await?;
    }
    for (sku, _, qty) in CATALOG {
        for (loc, _, kind) in LOCATIONS {
            if *kind == LocationKind::Warehouse {
                engine.receive(id(loc)?, id(sku)?, *qty).await?;
            }
        }
    }
    Ok(())
}

fn spawn_actors(engine: Arc<Engine>) -> Vec<tokio::task::JoinHandle<()>> {
    let rng = Arc::new(SeededRng::new(42));
    let mut tasks = vec![tokio::spawn(storefront(engine.clone(), rng.clone()))];
    for (loc, _, kind) in LOCATIONS {
        if *kind == LocationKind::Warehouse {
            tasks.push(tokio::spawn(picker(engine.clone(), rng.clone(), loc)));
        }
    }
    tasks.push(tokio::spawn(carrier_callbacks(engine)));
    tasks
}

/// Orders every ~150 ms, a flash-sale burst on the hot SKU every 30 s, and a restock now and then.
async fn storefront(engine: Arc<Engine>, rng: Arc<SeededRng>) {
    let mut n: u64 = 0;
    loop {
        n += 1;
        let burst = n.is_multiple_of(200);
        let count = if burst { 60 } else { 1 };
        for _ in 0..count {
            let (sku, price, _) =
                if burst { CATALOG[5] } else { CATALOG[(rng.next_u64() % CATALOG.len() as u64) as usize] };
            let zone = if rng.next_u64().is_multiple_of(3) { "US" } else { "EU" };
            let priority =
                if burst || rng.next_u64().is_multiple_of(4) { Priority::SameDay } else { Priority::Standard };
            let qty = 1 + (rng.next_u64() % 2) as u32;
            let _ = place(&engine, n, sku, price, qty, zone, priority).await;
        }
        if n.is_multiple_of(100) {
            let (sku, _, _) = CATALOG[(rng.next_u64() % CATALOG.len() as u64) as usize];
            if let (Ok(l), Ok(s)) = (id::<LocationId>("WH-EU-1"), id::<Sku>(sku)) {
                let _ = engine.receive(l, s, 50).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

async fn place(
    engine: &Engine,
    n: u64,
    sku: &str,
    price: &str,
    qty: u32,
    zone: &str,
    priority: Priority,
) -> Result<()> {
    let req = OrderRequest {
        customer: Customer {
            id: id::<CustomerId>(&format!("c-{}", n % 500))?,
            email: format!("customer{}@example.com", n % 500),
        },
        ship_to: ShipTo { zone: id::<Zone>(zone)? },
        priority,
        lines: vec![LineRequest {
            sku: id(sku)?,
            qty,
            unit_price: Money::parse(price).map_err(|e| anyhow::anyhow!("{e}"))?,
        }],
        hold_ids: vec![],
        delivery_window: None,
    };
    engine.create_order(req).await?;
    Ok(())
}

/// Takes the next task, "walks" to it, confirms it (sometimes short) and packs it.
async fn picker(engine: Arc<Engine>, rng: Arc<SeededRng>, location: &'static str) {
    let Ok(loc) = id::<LocationId>(location) else { return };
    loop {
        let task = match engine.next_pick(loc.clone()).await {
            Ok(Some(t)) => t,
            _ => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        tokio::time::sleep(Duration::from_millis(80)).await;
        let short = rng.next_u64().is_multiple_of(50) && task.qty > 1;
        let done = if short {
            engine.short_pick(task.id.clone(), task.instruction_key.clone(), task.qty - 1, "bin empty".into()).await
        } else {
            engine.confirm_pick(task.id.clone(), task.instruction_key.clone(), task.qty).await
        };
        if done.is_err() {
            continue;
        }
        for _ in 0..50 {
            if engine.pack(task.order_id.clone(), loc.clone(), vec![task.id.clone()]).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Reports shipments delivered a few seconds after their labels.
async fn carrier_callbacks(engine: Arc<Engine>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        for state in [OrderState::Shipped, OrderState::PartiallyShipped] {
            let Ok(orders) = engine.orders(Some(state), None, 200).await else { continue };
            for o in orders {
                for s in o.shipments() {
                    if s.delivered_at.is_none() {
                        let _ = engine.delivered(s.shipment_id.clone()).await;
                    }
                }
            }
        }
    }
}
