//! The invariants of PRODUCT.md §6, checked on committed state after every
//! step: no oversell and a safety buffer really held, stock conserved
//! against the simulator's own books, no effect twice (each event applied at
//! most once per consumer, each pick picked at most its line's units, orders
//! consistent), no stale event applied, no duplicate notification, no dead
//! letter, standard picks never starved; and, once faults stop, liveness.
//!
//! The checker reads each store's commit log and outbox incrementally, so a
//! step costs what it changed, plus the (few) ledgers.

use crate::clients::Books;
use crate::store::SimStore;
use crate::world::World;
use orderly_domain::ledger::SkuLedger;
use orderly_domain::order::{Order, OrderState};
use orderly_domain::{LineId, PickId, Priority, Qty, Sku, Timestamp};
use orderly_engine::engine::SERVICES;
use orderly_engine::events::StockMoved;
use orderly_engine::ports::Store;
use orderly_engine::runtime::DeadLetter;
use orderly_engine::services::picking::{PickStatus, PickTask};
use orderly_engine::table::{read_all_ledgers, read_ledger};
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet};

/// Most rows read per scan page.
const PAGE: u32 = 1_000;
/// How late past its expiry a hold may still be live once faults stopped.
const HOLD_EXPIRY_SLACK_MS: i64 = 60_000;

/// A broken invariant: its name and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The invariant's name.
    pub invariant: &'static str,
    /// What was wrong.
    pub detail: String,
}

fn fail<T>(invariant: &'static str, detail: String) -> Result<T, Failure> {
    Err(Failure { invariant, detail })
}

/// An event as the registry remembers it.
#[derive(Debug, Clone)]
struct EventMeta {
    producer: &'static str,
    subject: String,
    sequence: u64,
    event_type: String,
}

/// Stock movements the inventory service published, per SKU.
#[derive(Debug, Default, Clone, Copy)]
struct Moves {
    restocked: u64,
    written_off: u64,
    adjusted: i64,
}

/// The checker's incremental state.
pub struct Checker {
    safety_pct: u64,
    starvation_limit_ms: i64,
    registry: BTreeMap<String, EventMeta>,
    scanned: BTreeMap<&'static str, u64>,
    applied: BTreeSet<(&'static str, String)>,
    last_seq: BTreeMap<(&'static str, &'static str, String), u64>,
    expected_safety: BTreeMap<(String, String), u64>,
    moves: BTreeMap<String, Moves>,
    restocks: BTreeSet<(String, String, String)>,
    picked: BTreeMap<LineId, BTreeMap<PickId, Qty>>,
    facts: BTreeMap<String, String>,
    checks: BTreeMap<&'static str, u64>,
}

impl Checker {
    /// A checker for a run with these settings.
    pub fn new(world: &World) -> Checker {
        Checker {
            safety_pct: u64::from(world.settings.inventory.safety_stock_pct),
            starvation_limit_ms: world.settings.picking.starvation_limit.0,
            registry: BTreeMap::new(),
            scanned: BTreeMap::new(),
            applied: BTreeSet::new(),
            last_seq: BTreeMap::new(),
            expected_safety: BTreeMap::new(),
            moves: BTreeMap::new(),
            restocks: BTreeSet::new(),
            picked: BTreeMap::new(),
            facts: BTreeMap::new(),
            checks: BTreeMap::new(),
        }
    }

    /// How many times each invariant was checked.
    pub fn checks(&self) -> BTreeMap<String, u64> {
        self.checks.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    fn checked(&mut self, invariant: &'static str) {
        *self.checks.entry(invariant).or_insert(0) += 1;
    }

    /// Every per-step invariant, on what is committed now.
    pub async fn after_step(&mut self, world: &World, books: &Books) -> Result<(), Failure> {
        self.checked("no_double_effect");
        if let Some(broken) = books.keys_broken.first() {
            return fail("no_double_effect", broken.clone());
        }
        self.scan_outboxes(world).await?;
        let touched = self.scan_commits(world).await?;
        self.check_ledgers(world, books, &touched.ledgers).await?;
        self.check_orders(world, &touched.orders).await?;
        self.check_picks(world, books, &touched.picks).await?;
        self.check_notifications(world)
    }

    /// Reads every outbox's new events into the registry, and inventory's
    /// stock movements into the expectations.
    async fn scan_outboxes(&mut self, world: &World) -> Result<(), Failure> {
        for producer in SERVICES {
            let store = world.store(producer);
            loop {
                let from = self.scanned.get(producer).copied().unwrap_or(0);
                let records = store.outbox_after(from, PAGE).await.map_err(store_failure)?;
                let Some(last) = records.last().map(|r| r.position) else { break };
                for r in &records {
                    let e = &r.envelope;
                    if producer == "inventory" {
                        self.note_movement(e.event_type.as_str(), &e.data.value())?;
                    }
                    let meta = EventMeta {
                        producer,
                        subject: e.subject.clone(),
                        sequence: e.sequence,
                        event_type: e.event_type.as_str().to_owned(),
                    };
                    self.registry.insert(e.id.clone(), meta);
                }
                self.scanned.insert(producer, last);
            }
        }
        Ok(())
    }

    /// Updates the safety buffer expected at a location (a lower bound: each
    /// receipt holds back its percentage; a pick there may release it all, a
    /// short pick at most what it wrote off) and the published adjustments.
    fn note_movement(&mut self, event_type: &str, data: &serde_json::Value) -> Result<(), Failure> {
        let kind = match event_type {
            "orderly.inventory.received" | "orderly.inventory.committed" | "orderly.inventory.adjusted" => event_type,
            _ => return Ok(()),
        };
        let m: StockMoved = serde_json::from_value(data.clone())
            .map_err(|e| Failure { invariant: "stock_conserved", detail: format!("unreadable {kind}: {e}") })?;
        let key = (m.sku.as_str().to_owned(), m.location.as_str().to_owned());
        let expected = self.expected_safety.entry(key.clone()).or_insert(0);
        let units = m.delta.unsigned_abs();
        match (kind, m.reason.as_str()) {
            ("orderly.inventory.received", _) => *expected += (units * self.safety_pct).div_ceil(100).min(units),
            ("orderly.inventory.committed", _) => *expected = 0,
            (_, "return") => {
                let restock = (m.user.clone().unwrap_or_default(), key.0.clone(), key.1.clone());
                if !self.restocks.insert(restock) {
                    return fail("no_double_effect", format!("return of {:?} restocked twice at {}", m.user, key.1));
                }
                self.moves.entry(key.0.clone()).or_default().restocked += units;
            }
            (_, "short_pick") => {
                *expected = expected.saturating_sub(units);
                self.moves.entry(key.0.clone()).or_default().written_off += units;
            }
            _ => *expected = if m.delta < 0 { expected.saturating_sub(units) } else { *expected },
        }
        if kind == "orderly.inventory.adjusted" {
            self.moves.entry(key.0).or_default().adjusted += m.delta;
        }
        Ok(())
    }

    /// Checks every event applied in the new commits (at most once per
    /// consumer, never older than one already applied on its subject) and
    /// collects the documents the commits changed.
    async fn scan_commits(&mut self, world: &World) -> Result<Touched, Failure> {
        let mut touched = Touched::default();
        for consumer in SERVICES {
            let store = world.store(consumer);
            for commit in store.take_log() {
                for id in &commit.inbox {
                    self.check_applied(consumer, id)?;
                }
                for (table, key) in commit.puts {
                    match (consumer, table) {
                        (_, "dead_letters") => return dead_letter(&store, &key).await,
                        ("orders", "orders") => touched.orders.insert(key),
                        ("picking", "picks") => touched.picks.insert(key),
                        ("inventory", "ledgers") => touched.ledgers.insert(key),
                        _ => false,
                    };
                }
            }
        }
        Ok(touched)
    }

    fn check_applied(&mut self, consumer: &'static str, id: &str) -> Result<(), Failure> {
        self.checked("no_double_effect");
        self.checked("no_stale_event");
        if !self.applied.insert((consumer, id.to_owned())) {
            return fail("no_double_effect", format!("{consumer} applied event {id} twice"));
        }
        let Some(meta) = self.registry.get(id) else {
            return fail("no_stale_event", format!("{consumer} applied event {id}, which no producer published"));
        };
        let key = (consumer, meta.producer, meta.subject.clone());
        let last = self.last_seq.get(&key).copied().unwrap_or(0);
        if meta.sequence <= last {
            return fail(
                "no_stale_event",
                format!(
                    "{consumer} applied {} {id} (subject {}, sequence {}) after sequence {last}",
                    meta.event_type, meta.subject, meta.sequence
                ),
            );
        }
        self.last_seq.insert(key, meta.sequence);
        Ok(())
    }

    /// Every ledger a commit changed: its own invariants, no oversell per
    /// partition, the safety buffer held, and stock conserved against the
    /// books (which only move the other way while a ledger stays unchanged).
    async fn check_ledgers(&mut self, world: &World, books: &Books, keys: &BTreeSet<String>) -> Result<(), Failure> {
        let store = world.store("inventory");
        for key in keys {
            let Some(ledger) = read_ledger(&*store, key).await.map_err(store_failure)?.map(|s| s.ledger) else {
                continue;
            };
            let ledger = &ledger;
            self.checked("ledger_consistent");
            if let Err(e) = ledger.check_invariants() {
                return fail("ledger_consistent", format!("{}: {e}", ledger.sku()));
            }
            self.check_stock_levels(ledger)?;
            self.check_conservation(ledger, books)?;
        }
        Ok(())
    }

    fn check_stock_levels(&mut self, ledger: &SkuLedger) -> Result<(), Failure> {
        for loc in ledger.snapshot().locations {
            self.checked("no_oversell");
            for p in &loc.partitions {
                if p.reserved + p.safety > p.on_hand {
                    return fail(
                        "no_oversell",
                        format!(
                            "{} at {}/{}: reserved {} + safety {} > on hand {}",
                            ledger.sku(),
                            loc.location,
                            p.partition,
                            p.reserved,
                            p.safety,
                            p.on_hand
                        ),
                    );
                }
            }
            self.checked("safety_buffer_held");
            let key = (ledger.sku().as_str().to_owned(), loc.location.as_str().to_owned());
            let expected = self.expected_safety.get(&key).copied().unwrap_or(0);
            if loc.safety < expected {
                return fail(
                    "safety_buffer_held",
                    format!(
                        "{} at {}: safety buffer {} but at least {expected} must be held for unpicked receipts",
                        ledger.sku(),
                        loc.location,
                        loc.safety
                    ),
                );
            }
        }
        Ok(())
    }

    fn check_conservation(&mut self, ledger: &SkuLedger, books: &Books) -> Result<(), Failure> {
        self.checked("stock_conserved");
        let sku = ledger.sku();
        let t = ledger.totals();
        let get = |m: &BTreeMap<Sku, u64>| m.get(sku).copied().unwrap_or(0);
        let moves = self.moves.get(sku.as_str()).copied().unwrap_or_default();
        let problem = if t.received != get(&books.received) {
            Some(format!("received {} but receipts acknowledged {}", t.received, get(&books.received)))
        } else if t.committed > get(&books.confirmed) {
            Some(format!("picked {} but pickers confirmed {}", t.committed, get(&books.confirmed)))
        } else if moves.restocked > get(&books.returned) {
            Some(format!("restocked {} but returns received {}", moves.restocked, get(&books.returned)))
        } else if moves.written_off > get(&books.short_missing) {
            Some(format!("wrote off {} but pickers missed {}", moves.written_off, get(&books.short_missing)))
        } else if t.adjusted != moves.adjusted {
            Some(format!("adjusted {} but published adjustments add up to {}", t.adjusted, moves.adjusted))
        } else if i128::from(t.on_hand) != i128::from(t.received) + i128::from(t.adjusted) - i128::from(t.committed) {
            Some(format!("on hand {} ≠ received + adjusted − picked", t.on_hand))
        } else {
            None
        };
        match problem {
            Some(p) => fail("stock_conserved", format!("{sku}: {p}")),
            None => Ok(()),
        }
    }

    async fn check_orders(&mut self, world: &World, keys: &BTreeSet<String>) -> Result<(), Failure> {
        let store = world.store("orders");
        for key in keys {
            self.checked("order_consistent");
            let Some(order) = get::<Order>(&store, "orders", key).await? else { continue };
            if let Err(e) = order.check_invariants() {
                return fail("order_consistent", e.0);
            }
        }
        Ok(())
    }

    /// No line is picked for more units than it ordered, however often its
    /// allocation was delivered.
    async fn check_picks(&mut self, world: &World, books: &Books, keys: &BTreeSet<String>) -> Result<(), Failure> {
        let store = world.store("picking");
        for key in keys {
            let Some(task) = get::<PickTask>(&store, "picks", key).await? else { continue };
            if !matches!(task.status, PickStatus::Completed | PickStatus::Short) {
                continue;
            }
            self.checked("no_double_effect");
            let line = self.picked.entry(task.line_id.clone()).or_default();
            line.insert(task.id.clone(), task.qty_picked);
            let picked: u64 = line.values().map(|q| u64::from(*q)).sum();
            let ordered = books.line_qty.get(&task.line_id).copied().map_or(u64::MAX, u64::from);
            if picked > ordered {
                return fail(
                    "no_double_effect",
                    format!("line {} ordered {ordered} units but {picked} were picked", task.line_id),
                );
            }
        }
        Ok(())
    }

    /// Each notification the endpoint accepted tells of a real event, and no
    /// fact (an order canceled, a shipment labeled…) is told twice.
    fn check_notifications(&mut self, world: &World) -> Result<(), Failure> {
        for n in world.webhook.take_fresh() {
            self.checked("no_duplicate_notification");
            match self.registry.get(&n.id) {
                Some(meta) if meta.event_type == n.kind => {}
                _ => return fail("no_duplicate_notification", format!("notification {} tells of no event", n.id)),
            }
            let Some(fact) = fact_key(&n.kind, &n.order_id, n.shipment_id.as_deref()) else { continue };
            if let Some(first) = self.facts.insert(fact.clone(), n.id.clone()) {
                return fail("no_duplicate_notification", format!("{fact} told twice: {first} and {}", n.id));
            }
        }
        Ok(())
    }

    /// A standard task waiting past the starvation limit goes before any
    /// newer task: for each task handed out, no older starved standard task
    /// of its location that was queued before the batch is still queued after it.
    pub async fn check_handouts(
        &mut self,
        world: &World,
        before: &[PickTask],
        handouts: &[PickTask],
    ) -> Result<(), Failure> {
        let store = world.store("picking");
        for t in handouts {
            self.checked("no_starvation");
            let now = t.assigned_at.unwrap_or(t.enqueued_at);
            let starved = before.iter().filter(|s| {
                s.location == t.location
                    && s.priority == Priority::Standard
                    && s.status == PickStatus::Queued
                    && s.id != t.id
                    && s.enqueued_at < t.enqueued_at
                    && now.since(s.enqueued_at) > self.starvation_limit_ms
            });
            for s in starved {
                let still = get::<PickTask>(&store, "picks", s.id.as_str()).await?;
                if still.is_some_and(|x| x.status == PickStatus::Queued) {
                    return fail(
                        "no_starvation",
                        format!(
                            "task {} ({}, waiting {} s) was handed out at {} while standard task {} had waited {} s",
                            t.id,
                            t.priority.as_str(),
                            now.since(t.enqueued_at) / 1000,
                            t.location,
                            s.id,
                            now.since(s.enqueued_at) / 1000
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// Once faults stopped and the quiet phase ran: every acknowledged order
    /// is durable and delivered, canceled, returned or waiting for stock;
    /// every subscription is drained; no notification, label or pick is left
    /// undone; no hold outlived its expiry.
    pub async fn liveness(&mut self, world: &World, books: &Books, now: Timestamp) -> Result<(), Failure> {
        self.checked("liveness");
        let store = world.store("orders");
        for id in books.acked.keys() {
            self.checked("acknowledged_durable");
            let Some(order) = get::<Order>(&store, "orders", id.as_str()).await? else {
                return fail("acknowledged_durable", format!("acknowledged order {id} is not in the store"));
            };
            if !settled(&order) {
                return fail("liveness", format!("order {id} is stuck in {}", order.state()));
            }
        }
        for source in &world.sources {
            let head = world.store(source.producer()).outbox_head().await.map_err(store_failure)?;
            if source.acked() < head {
                let (c, p, a) = (source.consumer(), source.producer(), source.acked());
                return fail("liveness", format!("{c} is behind {p}: acked {a} of {head}"));
            }
        }
        idle(world, "notifications", "notifications", &["pending", "failed"]).await?;
        idle(world, "shipping", "shipments", &["label_pending", "failed"]).await?;
        idle(world, "picking", "picks", &["queued", "assigned"]).await?;
        let ledgers = read_all_ledgers(&*world.store("inventory")).await.map_err(store_failure)?;
        for l in ledgers {
            if l.next_expiry().is_some_and(|t| now.since(t) > HOLD_EXPIRY_SLACK_MS) {
                return fail("liveness", format!("{} has a hold live past its expiry", l.sku()));
            }
            // A synchronous reservation's hold never expires: its order consumes
            // it, or (never created) the orders service voids it once inventory
            // asks, one hold lifetime after it was made.
            let ttl = world.settings.inventory.hold_ttl.0;
            for h in l.holds().filter(|h| h.expires_at == Timestamp::MAX) {
                self.checked("no_orphan_reservation");
                if now.since(h.created_at) > ttl + HOLD_EXPIRY_SLACK_MS {
                    return fail(
                        "no_orphan_reservation",
                        format!(
                            "{}: synchronous reservation {} of {} units unclaimed for {} ms",
                            l.sku(),
                            h.hold_id,
                            h.qty,
                            now.since(h.created_at)
                        ),
                    );
                }
            }
            // Units reserved for an order that is over (or unknown) are units
            // nobody will pick: a leak the stock counts alone do not show.
            for r in l.reservations().into_iter().filter(|r| r.qty > 0) {
                self.checked("no_orphan_reservation");
                let order = get::<Order>(&store, "orders", r.order.as_str()).await?;
                if order.as_ref().is_none_or(|o| o.state().is_terminal()) {
                    let state = order.map_or("unknown".to_owned(), |o| o.state().to_string());
                    let (sku, line, qty) = (l.sku(), &r.line, r.qty);
                    return fail(
                        "no_orphan_reservation",
                        format!("{sku}: {qty} units reserved for line {line} of a {state} order"),
                    );
                }
            }
        }
        Ok(())
    }
}

/// What the new commits changed.
#[derive(Default)]
struct Touched {
    orders: BTreeSet<String>,
    picks: BTreeSet<String>,
    ledgers: BTreeSet<String>,
}

/// Terminal, or waiting for stock with everything allocated already shipped and delivered.
fn settled(o: &Order) -> bool {
    let delivered = o.shipments().iter().all(|s| s.delivered_at.is_some());
    match o.state() {
        s if s.is_terminal() => true,
        OrderState::Backordered => true,
        OrderState::PartiallyShipped => o.allocated_qty() == o.shipped_qty() && o.unallocated_qty() > 0 && delivered,
        _ => false,
    }
}

/// The fact a notification tells, when it may be told only once.
fn fact_key(kind: &str, order: &str, shipment: Option<&str>) -> Option<String> {
    match kind {
        "orderly.order.confirmed"
        | "orderly.order.shipped"
        | "orderly.order.delivered"
        | "orderly.order.canceled"
        | "orderly.order.return_requested"
        | "orderly.order.returned" => Some(format!("{kind} of {order}")),
        "orderly.shipment.label_created" | "orderly.shipment.delivered" => {
            Some(format!("{kind} of {}", shipment.unwrap_or(order)))
        }
        _ => None,
    }
}

async fn idle(world: &World, service: &str, table: &'static str, busy: &[&str]) -> Result<(), Failure> {
    let counts = world.store(service).count_by_idx(table).await.map_err(store_failure)?;
    for (state, n) in counts {
        if n > 0 && busy.contains(&state.as_str()) {
            let rows = world.store(service).scan(table, Some(&state), None, 3).await.map_err(store_failure)?;
            let ids: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
            return fail("liveness", format!("{service}: {n} {table} still {state} ({})", ids.join(", ")));
        }
    }
    Ok(())
}

async fn dead_letter(store: &SimStore, key: &str) -> Result<Touched, Failure> {
    let letter = get::<DeadLetter>(store, "dead_letters", key).await?;
    let detail = match letter {
        Some(d) => format!(
            "{} dead-lettered {} {} about {} from {} after {} attempts: {}",
            d.consumer, d.envelope.event_type, d.id, d.envelope.subject, d.producer, d.attempts, d.error
        ),
        None => format!("dead letter {key}"),
    };
    fail("no_dead_letter", detail)
}

/// Every document of a table (optionally with one index value), decoded.
pub async fn scan_all<T: DeserializeOwned>(
    store: &SimStore,
    table: &'static str,
    idx: Option<&str>,
) -> Result<Vec<T>, Failure> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let rows = store.scan(table, idx, after.as_deref(), PAGE).await.map_err(store_failure)?;
        let done = rows.len() < PAGE as usize;
        for row in rows {
            out.push(decode(table, &row.key, &row.doc)?);
            after = Some(row.key);
        }
        if done {
            return Ok(out);
        }
    }
}

async fn get<T: DeserializeOwned>(store: &SimStore, table: &'static str, key: &str) -> Result<Option<T>, Failure> {
    match store.get(table, key).await.map_err(store_failure)? {
        Some(row) => decode(table, key, &row.doc).map(Some),
        None => Ok(None),
    }
}

fn decode<T: DeserializeOwned>(table: &str, key: &str, doc: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(doc)
        .map_err(|e| Failure { invariant: "store_readable", detail: format!("{table}/{key} does not decode: {e}") })
}

pub(crate) fn store_failure(e: orderly_engine::ports::StoreError) -> Failure {
    Failure { invariant: "store_readable", detail: e.to_string() }
}
