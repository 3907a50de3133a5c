//! Micro-benchmarks of the domain's hot paths in a flash sale: reserving
//! stock on a hot SKU, backordering behind a long queue, routing a line,
//! popping the pick queue, encoding and decoding an event, and storing a
//! ledger's changed pieces. Run with `cargo bench -p orderly-domain-checks`; under
//! `cargo test`/nextest each runs once as a smoke test.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use orderly_domain::allocation::{Location, LocationKind, RouteLine, route};
use orderly_domain::event::{Envelope, EventType};
use orderly_domain::ledger::{LedgerCommand, LedgerConfig, SkuLedger};
use orderly_domain::pick_queue::PickQueue;
use orderly_domain::{LineId, LocationId, OrderId, Priority, Sku, Timestamp, Zone};
use std::hint::black_box;

fn order(i: u64) -> OrderId {
    OrderId::parse(format!("o-{i}")).expect("order id")
}

fn line(i: u64) -> LineId {
    LineId::parse(format!("o-{i}:1")).expect("line id")
}

fn loc(s: &str) -> LocationId {
    LocationId::parse(s).expect("location id")
}

/// A hot SKU with `units` received over two warehouses and `queued` lines
/// already waiting in its backorder queue.
fn hot_ledger(cfg: &LedgerConfig, units: u32, queued: u64) -> SkuLedger {
    let mut ledger = SkuLedger::new(Sku::parse("HOT-1").expect("sku"));
    let mut run = |cmd: LedgerCommand| {
        for ev in ledger.decide(&cmd, cfg).expect("accepted") {
            ledger.apply(&ev);
        }
    };
    for i in 0..queued {
        run(LedgerCommand::Backorder { order: order(i), line: line(i), qty: 1, since: Timestamp(0) });
    }
    for (location, qty) in [("WH-1", units / 2), ("WH-2", units - units / 2)] {
        if qty > 0 {
            run(LedgerCommand::Receive { location: loc(location), qty });
        }
    }
    ledger.take_changes();
    ledger
}

fn ledger_benches(c: &mut Criterion) {
    let cfg = LedgerConfig::new(8, 5).expect("config");
    let base = hot_ledger(&cfg, 1_000_000, 0);
    let mut n = 1_000_000u64;
    c.bench_function("ledger/reserve (decide + apply, 8 partitions)", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |ledger| {
                n += 1;
                let cmd = LedgerCommand::Reserve {
                    order: order(n),
                    line: line(n),
                    qty: 1,
                    location: loc("WH-1"),
                    partition_hint: (n % 8) as u32,
                };
                for ev in ledger.decide(&cmd, &cfg).expect("in stock") {
                    ledger.apply(&ev);
                }
            },
            BatchSize::LargeInput,
        )
    });
    let queued = hot_ledger(&cfg, 0, 100_000);
    c.bench_function("ledger/backorder behind 100k waiting lines", |b| {
        b.iter_batched_ref(
            || queued.clone(),
            |ledger| {
                let cmd = LedgerCommand::Backorder {
                    order: order(1 << 40),
                    line: line(1 << 40),
                    qty: 1,
                    since: Timestamp(1),
                };
                for ev in ledger.decide(&cmd, &cfg).expect("accepted") {
                    ledger.apply(&ev);
                }
            },
            BatchSize::LargeInput,
        )
    });
    c.bench_function("ledger/store changed pieces (1 backorder, 100k queued)", |b| {
        b.iter_batched_ref(
            || {
                let mut ledger = queued.clone();
                let cmd = LedgerCommand::Backorder {
                    order: order(1 << 40),
                    line: line(1 << 40),
                    qty: 1,
                    since: Timestamp(1),
                };
                for ev in ledger.decide(&cmd, &cfg).expect("accepted") {
                    ledger.apply(&ev);
                }
                ledger
            },
            |ledger| {
                let mut bytes = serde_json::to_vec(&ledger.core()).expect("core").len();
                for key in ledger.take_changes() {
                    if let Some(piece) = ledger.piece(&key) {
                        bytes += serde_json::to_vec(&piece).expect("piece").len();
                    }
                }
                black_box(bytes)
            },
            BatchSize::LargeInput,
        )
    });
}

fn route_bench(c: &mut Criterion) {
    let locations: Vec<Location> = (1..=4)
        .map(|i| Location {
            id: loc(&format!("WH-{i}")),
            zone: Zone::parse(if i % 2 == 0 { "EU" } else { "US" }).expect("zone"),
            kind: LocationKind::Warehouse,
        })
        .collect();
    let lines: Vec<RouteLine> = (0..3)
        .map(|i| RouteLine { line_id: line(i), sku: Sku::parse(format!("SKU-{i}")).expect("sku"), qty: 2 })
        .collect();
    let zone = Zone::parse("EU").expect("zone");
    c.bench_function("allocation/route 3 lines over 4 locations", |b| {
        b.iter(|| route(black_box(&lines), &zone, &locations, |_, l| if l.as_str() == "WH-3" { 1 } else { 10 }))
    });
}

fn pick_queue_bench(c: &mut Criterion) {
    let mut queue: PickQueue<u64> = PickQueue::new();
    for i in 0..10_000u64 {
        let priority = if i % 3 == 0 { Priority::SameDay } else { Priority::Standard };
        queue.push(i, priority, Timestamp(i as i64));
    }
    let mut t = 10_000i64;
    c.bench_function("pick_queue/pop + push (10k queued, aging)", |b| {
        b.iter(|| {
            t += 1;
            let next = queue.pop(Timestamp(t), 7_200_000).expect("never empty");
            queue.push(next.task, Priority::Standard, Timestamp(t));
        })
    });
}

fn event_bench(c: &mut Criterion) {
    let data = serde_json::json!({
        "order_id": "0190e1a2-7b3c-7d4e-8f90-123456789abc",
        "allocations": [{"line_id": "0190e1a2-7b3c-7d4e-8f90-123456789abc:1", "sku": "HOT-1", "location": "WH-1", "qty": 1}],
        "from_backorder": false
    });
    let env = Envelope::new(
        "0190e1a2-7b3c-7d4e-8f90-aaaaaaaaaaaa".into(),
        "/orderly/inventory",
        EventType::InventoryReserved,
        "0190e1a2-7b3c-7d4e-8f90-123456789abc",
        Timestamp(1_764_000_000_000),
        42,
        data,
    );
    let bytes = serde_json::to_vec(&env).expect("encode");
    c.bench_function("event/encode (inventory.reserved, JSON)", |b| {
        b.iter(|| serde_json::to_vec(black_box(&env)).expect("encode"))
    });
    c.bench_function("event/decode (inventory.reserved, JSON)", |b| {
        b.iter(|| serde_json::from_slice::<Envelope>(black_box(&bytes)).expect("decode"))
    });
}

criterion_group!(benches, ledger_benches, route_bench, pick_queue_bench, event_bench);
criterion_main!(benches);
